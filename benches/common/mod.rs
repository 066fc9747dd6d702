//! Shared bench setup: a one-layer cache filled with synthetic post-RoPE-like keys.
#![allow(dead_code)]

use kvtier::{CacheConfigBuilder, KvCache, SeqId};

pub struct Rng(pub u64);
impl Rng {
    pub fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A cache with one sequence of `tokens` tokens in layer 0, and a query for it.
pub fn filled(b: CacheConfigBuilder, tokens: usize) -> (KvCache, SeqId, Vec<f32>) {
    let mut cache = KvCache::new(b.build().expect("valid bench config")).expect("cache");
    let cfg = cache.config().clone();
    let row = cfg.num_kv_heads * cfg.head_dim;
    let s = cache.add_sequence();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let chunk = 1024;
    let mut k = vec![0f32; chunk * row];
    let mut v = vec![0f32; chunk * row];
    let mut at = 0;
    while at < tokens {
        let n = chunk.min(tokens - at);
        for (i, (kx, vx)) in k[..n * row].iter_mut().zip(&mut v[..n * row]).enumerate() {
            let c = i % row;
            *kx = if c.is_multiple_of(37) { 8.0 } else { 1.0 } * rng.f32();
            *vx = rng.f32();
        }
        cache
            .append(s, 0, &k[..n * row], &v[..n * row])
            .expect("append");
        at += n;
    }
    let q = (0..cfg.num_q_heads * cfg.head_dim)
        .map(|_| rng.f32())
        .collect();
    (cache, s, q)
}

/// Sums `buf` on the current rayon pool in chunks of `chunk` words: the read roofline of the
/// benches (every byte read once, 8 independent adds per cache line).
pub fn read_sum(buf: &[u64], chunk: usize) -> u64 {
    use rayon::prelude::*;
    buf.par_chunks(chunk)
        .map(|c| {
            let mut acc = [0u64; 8];
            for w in c.chunks_exact(8) {
                for i in 0..8 {
                    acc[i] = acc[i].wrapping_add(w[i]);
                }
            }
            acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
        })
        .reduce(|| 0, u64::wrapping_add)
}
