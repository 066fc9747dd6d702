//! kv heads sharded across the GPUs of one node, one cache per device (docs/scale-out.md): each
//! device's cache holds its share of the kv heads (and their q heads); the concatenated outputs
//! must equal one cache holding every head, and the step's time is measured both ways. Needs two
//! CUDA devices; skips with a message otherwise.
#![cfg(feature = "cuda")]

use std::time::Instant;

use kvtier::backend::cuda::CudaDevice;
use kvtier::{CacheConfig, Device, HotDtype, KvCache};

const QH: usize = 32;
const KVH: usize = 8;
const D: usize = 128;

fn rows(n: usize, heads: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * heads * D)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Heads `h0 .. h0 + nh` of `[n][heads][D]` rows.
fn heads_of(x: &[f32], n: usize, heads: usize, h0: usize, nh: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * nh * D);
    for t in 0..n {
        out.extend_from_slice(&x[(t * heads + h0) * D..(t * heads + h0 + nh) * D]);
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn kv_heads_sharded_over_devices_match_one_cache() {
    let devs: Vec<CudaDevice> = (0..8).map_while(|i| CudaDevice::new(i).ok()).collect();
    if devs.len() < 2 {
        eprintln!("SKIP: {} CUDA device(s): sharding needs two", devs.len());
        return;
    }
    let g = 2usize;
    for n in [32768usize, 131072] {
        let cfg = |kvh: usize, qh: usize| {
            CacheConfig::builder(1, qh, kvh, D)
                .hot_dtype(HotDtype::BF16)
                .max_seq_len(n + 1)
                .build()
                .unwrap()
        };
        let mut one = KvCache::with_device(cfg(KVH, QH), Device::Cuda(devs[0].clone())).unwrap();
        let s1 = one.add_sequence();
        let mut shards: Vec<(KvCache, kvtier::SeqId)> = (0..g)
            .map(|i| {
                let mut c =
                    KvCache::with_device(cfg(KVH / g, QH / g), Device::Cuda(devs[i].clone()))
                        .unwrap();
                let s = c.add_sequence();
                (c, s)
            })
            .collect();
        let chunk = 4096;
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            let k = rows(m, KVH, start as u64 * 2 + 1);
            let v = rows(m, KVH, start as u64 * 2 + 2);
            one.append(s1, 0, &k, &v).unwrap();
            for (i, (c, s)) in shards.iter_mut().enumerate() {
                let per = KVH / g;
                c.append(
                    *s,
                    0,
                    &heads_of(&k, m, KVH, i * per, per),
                    &heads_of(&v, m, KVH, i * per, per),
                )
                .unwrap();
            }
        }
        let q = rows(1, QH, 77);
        let full = one.attend(0, &[s1], &q).unwrap().output;
        let qper = QH / g;
        let mut max_err = 0f32;
        for (i, (c, s)) in shards.iter().enumerate() {
            let out = c
                .attend(0, &[*s], &heads_of(&q, 1, QH, i * qper, qper))
                .unwrap()
                .output;
            let want = &full[i * qper * D..(i + 1) * qper * D];
            for (a, b) in out.iter().zip(want) {
                max_err = max_err.max((a - b).abs());
            }
        }
        assert!(max_err < 1e-4, "sharded output differs by {max_err}");
        let reps = 30;
        let mut t_one = Vec::new();
        let mut t_sharded = Vec::new();
        for _ in 0..reps + 3 {
            let t = Instant::now();
            one.attend(0, &[s1], &q).unwrap();
            t_one.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            std::thread::scope(|sc| {
                for (i, (c, s)) in shards.iter().enumerate() {
                    let qs = heads_of(&q, 1, QH, i * qper, qper);
                    sc.spawn(move || c.attend(0, &[*s], &qs).unwrap());
                }
            });
            t_sharded.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (a, b) = (median(t_one[3..].to_vec()), median(t_sharded[3..].to_vec()));
        let per_dev: Vec<usize> = shards
            .iter()
            .map(|(c, _)| c.memory_report().device_bytes())
            .collect();
        println!(
            "shard: {n} tokens, 32/8/128 int4: one device {a:.3} ms, {g} devices {b:.3} ms ({:.2}x); \
             device bytes one {} vs per shard {:?}; max |diff| {max_err:.2e}",
            a / b,
            one.memory_report().device_bytes(),
            per_dev
        );
    }
}
