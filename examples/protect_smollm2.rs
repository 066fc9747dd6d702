//! `protect(model, sensitivity)` on SmolLM2-135M-Instruct: stream a greedy answer to a chat prompt
//! through a kvtier cache, then print decode speed and the cache's bytes per tier.
//!
//! ```text
//! scripts/fetch-assets.sh
//! cargo run --release --example protect_smollm2 -- --prompt "Explain what a KV cache is."
//! ```

use std::io::Write;
use std::sync::Arc;

use clap::{Arg, Command};
use kvtier::model::corpus::Assets;
use kvtier::model::{protect, GenerateOptions, Llama};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let m = Command::new("protect_smollm2")
        .about("Generate with SmolLM2-135M through a kvtier cache")
        .arg(
            Arg::new("prompt")
                .long("prompt")
                .default_value("Write a short paragraph about why the sky is blue."),
        )
        .arg(
            Arg::new("max-tokens")
                .long("max-tokens")
                .default_value("200"),
        )
        .arg(
            Arg::new("sensitivity")
                .long("sensitivity")
                .default_value("0.85"),
        )
        .arg(
            Arg::new("assets")
                .long("assets")
                .help("assets folder (default: $KVTIER_ASSETS or <crate>/assets)"),
        )
        .get_matches();
    let prompt = m.get_one::<String>("prompt").expect("has default");
    let max_new_tokens: usize = m
        .get_one::<String>("max-tokens")
        .expect("has default")
        .parse()?;
    let sensitivity: f32 = m
        .get_one::<String>("sensitivity")
        .expect("has default")
        .parse()?;
    let assets = match m.get_one::<String>("assets") {
        Some(p) => Assets { root: p.into() },
        None => Assets::locate(),
    };
    if !assets.available() {
        return Err(format!(
            "assets missing in {} (run scripts/fetch-assets.sh)",
            assets.root.display()
        )
        .into());
    }

    let model = Arc::new(Llama::load(assets.model())?);
    let mut session = protect(model.clone(), sensitivity)?;
    eprintln!("cache: {:?}", session.cache().kv_cache().config());

    let tok = model.tokenizer();
    let ids = tok.encode_user_prompt(prompt)?;
    println!("user: {prompt}\nassistant:");
    // Stream: decode everything generated so far and print what is new (multi-byte characters can
    // span tokens, so per-token decoding would split them).
    let mut generated = Vec::new();
    let mut printed = 0usize;
    let mut out = std::io::stdout();
    let gen = session.generate_tokens(
        &ids,
        GenerateOptions {
            max_new_tokens,
            stop_at_eos: true,
        },
        |t| {
            generated.push(t);
            if let Ok(text) = tok.decode(&generated, true) {
                if text.len() > printed && text.is_char_boundary(printed) {
                    let _ = write!(out, "{}", &text[printed..]);
                    let _ = out.flush();
                    printed = text.len();
                }
            }
        },
    )?;
    println!();

    let mem = session.memory_report();
    let seq_len = session.history().len();
    let layers = model.config().num_layers;
    eprintln!(
        "\nprompt {} tokens, prefill {:.0} ms ({:.0} tok/s); generated {} tokens, decode {:.1} tok/s; stop: {:?}",
        gen.prompt_tokens,
        gen.prefill_time.as_secs_f64() * 1e3,
        gen.prefill_tokens_per_sec(),
        gen.tokens.len(),
        gen.decode_tokens_per_sec(),
        gen.stop
    );
    eprintln!("cache holds {seq_len} tokens x {layers} layers:");
    for (tier, bytes) in [
        ("hot", mem.hot_bytes),
        ("warm", mem.warm_bytes),
        ("cold", mem.cold_bytes),
        ("metadata", mem.metadata_bytes),
    ] {
        eprintln!(
            "  {tier:<9} {bytes:>10} bytes  ({:.0} bytes/token)",
            bytes as f64 / seq_len.max(1) as f64
        );
    }
    eprintln!(
        "  device    {:>10} bytes  ({:.0} bytes/token); plain f16 cache: {} bytes ({:.2}x)",
        mem.device_bytes(),
        mem.device_bytes() as f64 / seq_len.max(1) as f64,
        mem.f16_equivalent_bytes,
        mem.compression()
    );
    Ok(())
}
