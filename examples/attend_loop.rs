//! Profiling helper: repeats one decode-attention step (32 q / 8 kv heads, d128) for `perf`.
//! `cargo run --release --example attend_loop -- [tokens] [iters] [bits]`
use kvtier::{Bits, CacheConfig, KvCache};
fn main() -> kvtier::Result<()> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32768);
    let iters: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let bits = Bits::from_bits(args.next().and_then(|s| s.parse().ok()).unwrap_or(4))?;
    let (qh, kvh, d) = (32, 8, 128);
    let mut cache = KvCache::new(
        CacheConfig::builder(1, qh, kvh, d)
            .k_bits(bits)
            .v_bits(bits)
            .build()?,
    )?;
    let s = cache.add_sequence();
    let row = kvh * d;
    let kv: Vec<f32> = (0..1024 * row)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for _ in 0..tokens / 1024 {
        cache.append(s, 0, &kv, &kv)?;
    }
    let q: Vec<f32> = (0..qh * d).map(|i| (i % 7) as f32 * 0.1).collect();
    let t0 = std::time::Instant::now();
    let mut acc = 0.0;
    for _ in 0..iters {
        acc += cache.attend(0, &[s], &q)?.output[0];
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let bytes = cache.memory_report().device_bytes() as f64;
    println!(
        "{tokens} tokens int{}: {ms:.3} ms/step, {:.2} GB/s ({acc})",
        bits.bits(),
        bytes / ms / 1e6
    );
    Ok(())
}
