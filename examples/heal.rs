//! The monitor and healing on SmolLM2-135M.
//!
//! Score mode (default): the last `--tail` tokens of the most recent SOTU speech of `--length`
//! tokens are decoded one at a time after an exact prefill, through int2 pages with and without
//! healing (and through a wider hot window that spends the same average device bytes as healing,
//! the matched-memory baseline), and through full precision as the reference. Prints PPL, PPL
//! loss recovered, firings per 1K tokens, average device bytes per token and the loop's own time
//! per step (monitor + heal, median and p99 of a ring of timings).
//!
//! A streamed answer with each token's health and every healing event as it happens is
//! `kvtier protect --show-health` (feature `cli`).
//!
//! ```text
//! cargo run --release --features model --example heal -- --length 4096 --tail 512
//! ```

use std::sync::Arc;

use clap::{Arg, Command};
use kvtier::model::corpus::{latest_with_tokens, load_speeches, Assets};
use kvtier::model::{token_nll, ExactAttention, Llama, LoadOptions, Session};
use kvtier::monitor::{Certifier, Healer, Monitor};
use kvtier::protect::Healing;
use kvtier::{Bits, CacheConfig, HotDtype, KvTierAttention};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn config(model: &Llama, bits: Option<u32>, window: usize) -> AnyResult<CacheConfig> {
    let c = model.config();
    let b = CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
        .hot_dtype(HotDtype::F16)
        .hot_window(window);
    Ok(match bits {
        Some(n) => b
            .k_bits(Bits::from_bits(n)?)
            .v_bits(Bits::from_bits(n)?)
            .build()?,
        None => b.full_precision().build()?,
    })
}

struct Run {
    name: String,
    ppl: f64,
    bytes_per_token: f64,
    fired: u64,
    steps: u64,
    loop_ns: Vec<u32>,
}

fn main() -> AnyResult<()> {
    let m = Command::new("heal")
        .about("monitor + healing on SmolLM2: PPL with and without healing")
        .arg(Arg::new("length").long("length").default_value("4096"))
        .arg(Arg::new("tail").long("tail").default_value("512"))
        .arg(Arg::new("bits").long("bits").default_value("2"))
        .arg(Arg::new("window").long("window").default_value("128"))
        .arg(
            Arg::new("sensitivity")
                .long("sensitivity")
                .default_value("0.85"),
        )
        .arg(
            Arg::new("pages")
                .long("pages")
                .default_value("4")
                .help("pages healed per layer"),
        )
        .arg(Arg::new("hold").long("hold").default_value("32"))
        .arg(
            Arg::new("budget")
                .long("budget")
                .default_value("4")
                .help("most healed pages per layer"),
        )
        .arg(
            Arg::new("certify")
                .long("certify")
                .action(clap::ArgAction::SetTrue)
                .help(
                    "measure certified attention (tolerance from sensitivity) instead of healing",
                ),
        )
        .get_matches();
    let num = |k: &str| -> AnyResult<usize> { Ok(m.get_one::<String>(k).unwrap().parse()?) };
    let (len, tail, bits, window) = (num("length")?, num("tail")?, num("bits")?, num("window")?);
    let sensitivity: f32 = m.get_one::<String>("sensitivity").unwrap().parse()?;
    let healer = Healer {
        pages_per_layer: num("pages")?,
        hold: num("hold")? as u64,
        max_pages_per_layer: num("budget")?,
    };
    let assets = Assets::locate();
    if !assets.available() {
        return Err("real-model assets missing: run scripts/fetch-assets.sh".into());
    }
    let model = Arc::new(Llama::load_with(
        assets.model(),
        LoadOptions {
            dense_prefill: true,
            dense_decode: true,
        },
    )?);
    let monitor = Monitor::new(sensitivity)?;

    let speeches = load_speeches(&assets.sotu())?;
    let (name, ids) = latest_with_tokens(&speeches, model.tokenizer(), len)?;
    let ids = &ids[..len];
    let mc = model.config().clone();
    let mut oracle = Session::new(
        model.clone(),
        ExactAttention::new(mc.attention_shape())?,
        0.0,
    )?;
    let cap = oracle.capture_prefill(&ids[..len - tail])?;
    let certifier = Certifier::from_sensitivity(sensitivity)?;
    let score = |cfg: CacheConfig, heal: bool, certify: bool, label: String| -> AnyResult<Run> {
        let mut cache = KvTierAttention::new(cfg)?;
        if certify {
            cache = cache.with_certified(certifier);
        }
        let mut s = Session::new(model.clone(), cache, sensitivity)?;
        if heal {
            s = s.with_healing(Healing::new(monitor, healer));
        }
        let logits = s.replay(&cap)?;
        let p = len - tail;
        let mut nll = token_nll(&logits, ids[p]);
        let mut bytes = 0f64;
        for i in p..len - 1 {
            let logits = s.step(ids[i])?;
            nll += token_nll(&logits, ids[i + 1]);
            let mem = s.cache().kv_cache().memory_report();
            bytes += mem.device_bytes() as f64 / (mem.tokens / mc.num_layers) as f64;
        }
        let cs = s.cache().certified_stats();
        if cs.calls > 0 {
            eprintln!(
                "[heal] {label}: certified attention read {} of {} warm pages exactly ({:.1}%), {:.1} ms per step",
                cs.pages_exact,
                cs.pages_checked,
                100.0 * cs.pages_exact as f64 / cs.pages_checked.max(1) as f64,
                cs.nanos as f64 / 1e6 / (tail - 1) as f64
            );
        }
        let (steps, fired) = s.healing().map(|h| h.counts()).unwrap_or((0, 0));
        let loop_ns = s
            .healing()
            .map(|h| h.timings_ns().to_vec())
            .unwrap_or_default();
        let r = Run {
            name: label,
            ppl: (nll / tail as f64).exp(),
            bytes_per_token: bytes / (tail - 1) as f64,
            fired,
            steps,
            loop_ns,
        };
        eprintln!(
            "[heal] {}: PPL {:.4}, {:.0} B/token",
            r.name, r.ppl, r.bytes_per_token
        );
        Ok(r)
    };
    let fp = score(config(&model, None, window)?, false, false, "fp".into())?;
    let base = score(
        config(&model, Some(bits as u32), window)?,
        false,
        false,
        format!("k{bits}v{bits}-w{window}"),
    )?;
    if m.get_flag("certify") {
        let c = score(
            config(&model, Some(bits as u32), window)?,
            false,
            true,
            format!(
                "k{bits}v{bits}-w{window} + certified (tol {:.3} nats)",
                certifier.tol
            ),
        )?;
        println!("| cache | PPL | PPL ratio vs fp |\n|---|---:|---:|");
        for r in [&fp, &base, &c] {
            println!("| {} | {:.3} | {:.4} |", r.name, r.ppl, r.ppl / fp.ppl);
        }
        return Ok(());
    }
    let healed = score(
        config(&model, Some(bits as u32), window)?,
        true,
        false,
        format!("k{bits}v{bits}-w{window} + healing"),
    )?;
    // Matched memory: the hot window that spends healing's average extra device bytes.
    // Each extra hot token costs about its f16 bytes minus what its warm page held.
    let extra = (healed.bytes_per_token - base.bytes_per_token).max(0.0) * len as f64;
    let f16_token = (2 * mc.num_kv_heads * mc.head_dim * 2 * mc.num_layers) as f64;
    let more = (extra / (f16_token - base.bytes_per_token).max(1.0)).round() as usize;
    let w2 = (window + more).div_ceil(32) * 32;
    let matched = score(
        config(&model, Some(bits as u32), w2)?,
        false,
        false,
        format!("k{bits}v{bits}-w{w2} (matched memory)"),
    )?;

    println!(
        "SmolLM2-135M, {name}: exact prefill {} tokens, {tail} decoded and scored; sensitivity {sensitivity}, \
         {} pages per layer per firing, at most {} healed per layer, hold {}\n",
        len - tail,
        healer.pages_per_layer,
        healer.max_pages_per_layer,
        healer.hold
    );
    println!("| cache | PPL | PPL ratio vs fp | loss recovered | device B/token (mean over steps) | vs no healing | firings / 1K tokens | loop time / step (median, p99) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let loss = base.ppl.ln() - fp.ppl.ln();
    for r in [&fp, &base, &healed, &matched] {
        let rec = if r.name == fp.name || r.name == base.name || loss <= 0.0 {
            "-".to_string()
        } else {
            format!("{:.0}%", 100.0 * (base.ppl.ln() - r.ppl.ln()) / loss)
        };
        let timing = if r.loop_ns.is_empty() {
            "-".to_string()
        } else {
            let mut t = r.loop_ns.clone();
            t.sort_unstable();
            format!(
                "{:.1} µs, {:.1} µs",
                t[t.len() / 2] as f64 / 1e3,
                t[(t.len() * 99) / 100] as f64 / 1e3
            )
        };
        println!(
            "| {} | {:.3} | {:.4} | {rec} | {:.0} | {:+.1}% | {} | {timing} |",
            r.name,
            r.ppl,
            r.ppl / fp.ppl,
            r.bytes_per_token,
            100.0 * (r.bytes_per_token / base.bytes_per_token - 1.0),
            if r.steps > 0 {
                format!("{:.0}", 1000.0 * r.fired as f64 / r.steps as f64)
            } else {
                "-".into()
            },
        );
    }
    Ok(())
}
