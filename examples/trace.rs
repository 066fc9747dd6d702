//! Captures an attention trace from SmolLM2-135M over a State of the Union speech (exact
//! full-precision cache, so every page's mass is recorded), then replays every retention policy over
//! it at 25% and 12.5% of the tokens (eviction policies) / of the f16 device bytes (tiered, anchor),
//! printing a markdown table (docs/policies.md).
//!
//! `cargo run --release --features model --example trace -- [prefill] [decode] [trace.bin]`
//! (defaults 1024, 256, target/kvtier-trace-sotu2021.bin). Needs `scripts/fetch-assets.sh`.

use kvtier::model::corpus::{find_speech, Assets};
use kvtier::model::{Llama, ScoreOptions, Session};
use kvtier::policy::trace::{read_trace, replay};
use kvtier::policy::{by_name, Budget, NAMES};
use kvtier::{CacheConfig, HotDtype, KvTierAttention};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prefill: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let decode: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let path = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "target/kvtier-trace-sotu2021.bin".into());
    let assets = Assets::locate();
    if !assets.available() {
        return Err("real-model assets missing: run scripts/fetch-assets.sh".into());
    }
    let model = Arc::new(Llama::load(assets.model())?);
    let speech = find_speech(&assets.sotu(), 2021, "biden")?;
    let ids = model.tokenizer().encode(&speech.text)?;
    let n = (prefill + decode).min(ids.len());
    let c = model.config().clone();
    let cfg = CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
        .hot_dtype(HotDtype::F32)
        .full_precision()
        .build()?;
    let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let cache = KvTierAttention::new(cfg)?.with_trace(Box::new(file), false)?;
    let mut session = Session::new(model, cache, 0.85)?;
    let score = session.score(&ids[..n], ScoreOptions::decode_tail(prefill))?;
    session.cache_mut().finish_trace()?;
    let (header, steps) = read_trace(std::fs::File::open(&path)?)?;
    println!(
        "SmolLM2-135M, SOTU 2021: exact prefill {prefill} tokens, {} decode steps x {} layers traced \
         (PPL of the decoded tail {:.3}); trace {path}, {} records\n",
        n - prefill,
        header.num_layers,
        score.perplexity(),
        steps.len()
    );
    println!("| policy | budget | kept ratio | heavy-hitter recall | mass retained | pages demoted / step |");
    println!("|---|---|---|---|---|---|");
    let f16_page = 2 * c.num_kv_heads * 32 * c.head_dim * 2;
    for frac in [0.25, 0.125] {
        for name in NAMES {
            let budget = match *name {
                "tiered" | "tiered_int2" | "anchor" => {
                    Budget::device_bytes(((n.div_ceil(32) * f16_page) as f64 * frac) as usize)
                }
                _ => Budget::tokens((n as f64 * frac) as usize),
            };
            let r = replay(&header, &steps, by_name(name)?.as_mut(), &budget)?;
            println!(
                "| {name} | {:.1}% | {:.3} | {:.3} | {:.4} | {:.2} |",
                frac * 100.0,
                r.kept_ratio,
                r.heavy_hitter_recall,
                r.mass_retained,
                r.demoted_pages
            );
        }
    }
    Ok(())
}
