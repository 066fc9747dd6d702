//! The kvtier demo: one Llama-3-8B-shaped layer (32 q / 8 kv heads, d128), a long synthetic
//! sequence appended token-block by token-block, then for each cache preset: memory per tier and
//! the attention error against an exact f32 cache holding the same tokens (largest output error,
//! values are in [-1, 1]; and the total-variation distance of the per-page attention masses).
//!
//! Run: `cargo run --release --example demo [tokens]` (default 32768).
//!
//! The keys carry a few large outlier channels and a slow drift, as real post-RoPE keys do, so the
//! per-channel key quantisation has something to do.

use kvtier::{Bits, CacheConfig, HotDtype, KvCache};
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn main() -> kvtier::Result<()> {
    let tokens: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let (qh, kvh, d) = (32, 8, 128);
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let row = kvh * d;
    let mut keys = vec![0f32; tokens * row];
    let mut values = vec![0f32; tokens * row];
    for t in 0..tokens {
        for c in 0..row {
            let outlier = if c % 37 == 0 { 8.0 } else { 1.0 };
            keys[t * row + c] = outlier * (rng.f32() + 0.3 * ((t as f32) * 0.001 + c as f32).sin());
            values[t * row + c] = rng.f32();
        }
    }
    // A query that attends sharply to a few tokens (like a retrieval head) plus a diffuse part.
    let probe = tokens / 3;
    let mut q = vec![0f32; qh * d];
    for h in 0..qh {
        let kv = h / (qh / kvh);
        for c in 0..d {
            q[h * d + c] = 0.5 * keys[probe * row + kv * d + c] + 0.3 * rng.f32();
        }
    }

    let build = |b: kvtier::CacheConfigBuilder| -> kvtier::Result<(KvCache, f64)> {
        let mut cache = KvCache::new(b.build()?)?;
        let s = cache.add_sequence();
        let t0 = Instant::now();
        for chunk in 0..tokens.div_ceil(512) {
            let (a, z) = (chunk * 512, ((chunk + 1) * 512).min(tokens));
            cache.append(s, 0, &keys[a * row..z * row], &values[a * row..z * row])?;
        }
        Ok((cache, t0.elapsed().as_secs_f64()))
    };
    let base = || CacheConfig::builder(1, qh, kvh, d);
    let (exact, _) = build(base().hot_dtype(HotDtype::F32).full_precision())?;
    let seq = exact.sequences().next().expect("one sequence");
    let reference = exact.attend(0, &[seq], &q)?;

    println!("kvtier demo: 1 layer, {qh} q / {kvh} kv heads, d{d}, {tokens} tokens\n");
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>8} {:>12} {:>12} {:>9} {:>9}",
        "config",
        "hot MiB",
        "warm MiB",
        "total MiB",
        "vs f16",
        "max |err|",
        "mass TV",
        "append s",
        "attend ms"
    );
    let configs: Vec<(&str, kvtier::CacheConfigBuilder)> = vec![
        ("f16 (all hot)", base().full_precision()),
        (
            "quality: int8, w256",
            base().k_bits(Bits::B8).v_bits(Bits::B8).hot_window(256),
        ),
        ("balanced: int4, w128", base()),
        (
            "compact: k4 v2, w64",
            base().v_bits(Bits::B2).hot_window(64),
        ),
        ("int2, w128", base().k_bits(Bits::B2).v_bits(Bits::B2)),
    ];
    for (name, b) in configs {
        let (cache, append_s) = build(b)?;
        let t0 = Instant::now();
        let att = cache.attend(0, &[seq], &q)?;
        let attend_ms = t0.elapsed().as_secs_f64() * 1e3;
        let max_err = att
            .output
            .iter()
            .zip(&reference.output)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Total-variation distance between the per-page attention masses: how far the attention
        // distribution itself moved (0 = identical, 1 = disjoint).
        let tv = 0.5
            * att.page_mass[0]
                .iter()
                .zip(&reference.page_mass[0])
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>();
        let r = cache.memory_report();
        let mib = |b: usize| b as f64 / 1048576.0;
        println!(
            "{:<26} {:>10.2} {:>10.2} {:>10.2} {:>7.2}x {:>12.3e} {:>12.3e} {:>9.2} {:>9.2}",
            name,
            mib(r.hot_bytes),
            mib(r.warm_bytes),
            mib(r.device_bytes()),
            r.compression(),
            max_err,
            tv,
            append_s,
            attend_ms
        );
    }
    let h = &reference.heads[0];
    println!(
        "\nhead 0 of the exact cache: entropy {:.3} nats, varentropy {:.3}, max score {:.2}",
        h.entropy, h.varentropy, h.max_score
    );
    Ok(())
}
