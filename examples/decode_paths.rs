//! Decode attention time per CPU kernel path, interleaved in one run (medians of rounds), for
//! quick A/B work on a noisy machine; the criterion bench `decode` is the reported figure.
//!
//! `cargo run --release --example decode_paths -- [tokens] [rounds] [int8|int4|int2] [avx512|avx2]
//! [32/8/128|9/3/64]`

use kvtier::{Bits, CacheConfig, CpuKernel, KvCache};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens = args.first().copied().unwrap_or(32768);
    let rounds = args.get(1).copied().unwrap_or(15);
    // Optional filter: a mode name (int8, int4, int2) and/or a path name among the arguments.
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    let want = |s: &str| words.iter().any(|w| w == s);
    let paths: Vec<CpuKernel> = CpuKernel::ALL
        .into_iter()
        .filter(|k| k.available() && *k != CpuKernel::Portable)
        .filter(|k| {
            !words.iter().any(|w| CpuKernel::from_name(w).is_some())
                || words.iter().any(|w| w == k.name())
        })
        .collect();
    for (shape, qh, kvh, d) in [("32/8/128", 32, 8, 128), ("9/3/64", 9, 3, 64)] {
        if words.iter().any(|w| w.contains('/')) && !want(shape) {
            continue;
        }
        for (mode, kb, vb) in [
            ("int8", Bits::B8, Bits::B8),
            ("int4", Bits::B4, Bits::B4),
            ("int2", Bits::B2, Bits::B2),
        ] {
            if words.iter().any(|w| w.starts_with("int")) && !want(mode) {
                continue;
            }
            let mut caches = Vec::new();
            for &p in &paths {
                let cfg = CacheConfig::builder(1, qh, kvh, d)
                    .k_bits(kb)
                    .v_bits(vb)
                    .cpu_kernel(p)
                    .build()
                    .unwrap();
                let mut c = KvCache::new(cfg).unwrap();
                let s = c.add_sequence();
                let mut x = 0x2545_F491_4F6C_DD1Du64;
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                };
                let row = kvh * d;
                let k: Vec<f32> = (0..tokens * row).map(|_| rnd()).collect();
                let v: Vec<f32> = (0..tokens * row).map(|_| rnd()).collect();
                c.append(s, 0, &k, &v).unwrap();
                let q: Vec<f32> = (0..qh * d).map(|_| rnd()).collect();
                let bytes = c.memory_report().device_bytes();
                caches.push((p, c, s, q, bytes, Vec::new()));
            }
            for _ in 0..rounds {
                for (_, c, s, q, _, times) in caches.iter_mut() {
                    let t = Instant::now();
                    for _ in 0..5 {
                        std::hint::black_box(c.attend(0, &[*s], q).unwrap());
                    }
                    times.push(t.elapsed().as_secs_f64() / 5.0);
                }
            }
            for (p, _, _, _, bytes, times) in caches.iter_mut() {
                times.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let med = times[times.len() / 2];
                println!(
                    "{shape} {mode} {tokens} {:>8}: {:8.3} ms  {:6.2} GB/s",
                    p.name(),
                    med * 1e3,
                    *bytes as f64 / med / 1e9
                );
            }
        }
    }
}
