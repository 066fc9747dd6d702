//! `--eliminate`: query-time elimination on the GPU, through the cache (`Eliminator::attend` on a
//! CUDA `KvCache`: phase one's bounds from the host copy of each warm page's parameters, the hot
//! pages and the best candidate attended exactly, then the survivors through the kernel's page
//! selection), against the same cache's full decode (`KvCache::attend_with`), host queries and
//! output in both. Wall time per call (each call synchronises), median of `--iters` after warm-up,
//! the two interleaved call by call. 32 q / 8 kv heads, d128, batch 1, int4 warm pages, bf16 hot.
//!
//! Keys are synthetic and say so: every key of a (page, kv head) near one level (uniform in
//! [-1, 1] times `spread`, noise 0.1) and queries in [0.5, 1.5], so page scores differ by several
//! nats and the box bounds are tight: the skip rate is set by `spread`, not by a model. Spread 0
//! is the no-structure case (uniform keys), where nothing can be skipped.

use kvtier::eliminate::{EliminationInput, EliminationScratch, Eliminator};
use kvtier::{backend::cuda::CudaDevice, CacheConfig, Device, HotDtype, KvCache, Rows, Scratch};
use std::fmt::Write as _;
use std::time::Instant;

fn filled(dev: &CudaDevice, len: usize, spread: f32) -> (KvCache, kvtier::SeqId) {
    let cfg = CacheConfig::builder(1, 32, 8, 128)
        .hot_dtype(HotDtype::BF16)
        .max_seq_len(len + 1)
        .build()
        .expect("cfg");
    let (kvh, d, ps) = (cfg.num_kv_heads, cfg.head_dim, cfg.page_size);
    let mut cache = KvCache::with_device(cfg, Device::Cuda(dev.clone())).expect("cache");
    let mut next = super::uniform();
    let s = cache.add_sequence();
    let row = kvh * d;
    let chunk = 1024;
    let (mut k, mut v) = (vec![0f32; chunk * row], vec![0f32; chunk * row]);
    let mut levels = vec![0f32; kvh];
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at);
        for t in 0..n {
            if (at + t) % ps == 0 {
                levels.iter_mut().for_each(|l| *l = spread * next());
            }
            for (h, &level) in levels.iter().enumerate() {
                for c in 0..d {
                    let i = t * row + h * d + c;
                    k[i] = if spread > 0.0 {
                        level + 0.1 * next()
                    } else {
                        next()
                    };
                    v[i] = next();
                }
            }
        }
        cache
            .append(s, 0, &k[..n * row], &v[..n * row])
            .expect("append");
        at += n;
    }
    (cache, s)
}

/// Runs the comparison; returns JSON rows.
pub fn eliminate_bench(dev: &CudaDevice, iters: usize, seqs: &[usize]) -> String {
    let mut json = String::new();
    println!(
        "\n{:>7} {:>6} {:>8} | {:>9} {:>11} {:>7} | {:>9} {:>9}",
        "S", "spread", "eps", "full ms", "elim ms", "x full", "skipped", "bound"
    );
    for &len in seqs {
        for spread in [0.0f32, 1.0, 3.0] {
            let (cache, s) = filled(dev, len, spread);
            let q: Vec<f32> = (0..32 * 128)
                .map(|i| 1.0 + 0.5 * (((i * 7919) % 1000) as f32 / 500.0 - 1.0))
                .collect();
            for eps in [1e-3f32, 1e-2] {
                let e = Eliminator::new(eps).expect("eps");
                let mut es = EliminationScratch::default();
                let mut sc = Scratch::default();
                let input = EliminationInput {
                    layer: 0,
                    seqs: &[s],
                    queries: &q,
                };
                let (mut tf, mut te) = (Vec::new(), Vec::new());
                let mut rep = None;
                for it in 0..iters + 5 {
                    let t = Instant::now();
                    cache
                        .attend_with(&mut sc, 0, &[s], Rows::F32(&q), None)
                        .expect("attend");
                    let full = t.elapsed().as_secs_f64() * 1e3;
                    let t = Instant::now();
                    let (_, r) = e.attend(&cache, &mut es, &input).expect("eliminated");
                    let el = t.elapsed().as_secs_f64() * 1e3;
                    if it >= 5 {
                        tf.push(full);
                        te.push(el);
                    }
                    rep = Some(r);
                }
                let med = |mut v: Vec<f64>| {
                    v.sort_by(|a, b| a.total_cmp(b));
                    v[v.len() / 2]
                };
                let (mf, me) = (med(tf), med(te));
                let r = rep.expect("ran");
                let skipped = r.skipped_pages as f64 / r.candidates.max(1) as f64;
                let bound = r.mass_bound.iter().copied().fold(0f32, f32::max);
                println!(
                    "{len:>7} {spread:>6.1} {eps:>8.0e} | {mf:>9.4} {me:>11.4} {:>7.3} | {:>8.1}% {bound:>9.2e}",
                    mf / me,
                    100.0 * skipped
                );
                if !json.is_empty() {
                    json.push(',');
                }
                let _ = write!(
                    json,
                    "{{\"seq\":{len},\"spread\":{spread},\"eps\":{eps},\"full_ms\":{mf:.5},\"eliminated_ms\":{me:.5},\"candidates\":{},\"skipped_pages\":{},\"mass_bound_max\":{bound:e}}}",
                    r.candidates, r.skipped_pages
                );
            }
        }
    }
    json
}
