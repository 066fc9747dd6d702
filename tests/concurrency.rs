//! What may run concurrently on one cache, checked: `KvCache` is `Send + Sync`, and attends from
//! several threads at once (each with its own or the default scratch) give results bit-identical
//! to the same attends run one at a time, on every CPU kernel path this machine has.

mod common;

use common::Rng;
use kvtier::{Bits, CacheConfig, CpuKernel, KvCache, Rows, Scratch};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn the_cache_is_send_and_sync() {
    assert_send_sync::<KvCache>();
    assert_send_sync::<kvtier::Attention>();
}

#[test]
fn concurrent_attends_match_sequential_ones_bit_for_bit() {
    for path in CpuKernel::ALL.into_iter().filter(|k| k.available()) {
        let (qh, kvh, d) = (8, 2, 64);
        let cfg = CacheConfig::builder(2, qh, kvh, d)
            .k_bits(Bits::B4)
            .v_bits(Bits::B2)
            .hot_window(64)
            .threads(Some(2))
            .cpu_kernel(path)
            .build()
            .unwrap();
        let mut cache = KvCache::new(cfg).unwrap();
        let mut rng = Rng(42);
        let seqs: Vec<_> = (0..3).map(|_| cache.add_sequence()).collect();
        for (i, &s) in seqs.iter().enumerate() {
            let n = 300 + 97 * i;
            for layer in 0..2 {
                let (k, v) = (rng.vec(n * kvh * d, 1.0), rng.vec(n * kvh * d, 1.0));
                cache.append(s, layer, &k, &v).unwrap();
            }
        }
        // Queries per (thread, round): a mix of layers and sequence subsets.
        let work: Vec<(usize, Vec<_>, Vec<f32>)> = (0..24)
            .map(|i| {
                let sub: Vec<_> = seqs.iter().copied().skip(i % 3).collect();
                let q = rng.vec(sub.len() * qh * d, 1.5);
                (i % 2, sub, q)
            })
            .collect();
        let expected: Vec<_> = work
            .iter()
            .map(|(l, s, q)| cache.attend(*l, s, q).unwrap())
            .collect();
        let cache = &cache;
        std::thread::scope(|sc| {
            for t in 0..4 {
                let (work, expected) = (&work, &expected);
                sc.spawn(move || {
                    let mut scratch = Scratch::default();
                    for round in 0..3 {
                        for (i, (l, s, q)) in work.iter().enumerate() {
                            if (i + t + round) % 2 == 0 {
                                continue;
                            }
                            let got = if t % 2 == 0 {
                                cache.attend(*l, s, q).unwrap()
                            } else {
                                cache
                                    .attend_with(&mut scratch, *l, s, Rows::F32(q), None)
                                    .unwrap()
                            };
                            let want = &expected[i];
                            assert_eq!(got.output, want.output, "{path:?} thread {t} item {i}");
                            assert_eq!(got.page_lse, want.page_lse);
                            for (a, b) in got.heads.iter().zip(&want.heads) {
                                assert_eq!(a.log_z.to_bits(), b.log_z.to_bits());
                                assert_eq!(a.entropy.to_bits(), b.entropy.to_bits());
                            }
                        }
                    }
                });
            }
        });
    }
}

/// Prefills of distinct sequences compute at once (`prefill_attend` takes `&self`), then append
/// one at a time: outputs and the cache afterwards equal sequential `prefill` calls.
#[test]
fn concurrent_prefill_attention_then_appends_equals_prefill() {
    let cfg = CacheConfig::builder(1, 8, 2, 64)
        .hot_window(32)
        .build()
        .unwrap();
    let mut rng = Rng(31);
    let (n0, n1) = (200, 96);
    let data: Vec<_> = (0..4)
        .map(|_| {
            (
                rng.vec(n0 * 128, 1.0),
                rng.vec(n0 * 128, 1.0),
                rng.vec(n1 * 8 * 64, 1.0),
                rng.vec(n1 * 128, 1.0),
                rng.vec(n1 * 128, 1.0),
            )
        })
        .collect();
    let build = || {
        let mut c = KvCache::new(cfg.clone()).unwrap();
        let seqs: Vec<_> = data
            .iter()
            .map(|(k, v, ..)| {
                let s = c.add_sequence();
                c.append(s, 0, k, v).unwrap();
                s
            })
            .collect();
        (c, seqs)
    };
    let (mut serial, ss) = build();
    let want: Vec<Vec<f32>> = data
        .iter()
        .zip(&ss)
        .map(|((_, _, q, k, v), s)| serial.prefill(*s, 0, q, k, v).unwrap())
        .collect();
    let (mut par, ps) = build();
    let got: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let c = &par;
        let hs: Vec<_> = data
            .iter()
            .zip(&ps)
            .map(|((_, _, q, k, v), s)| sc.spawn(move || c.prefill_attend(*s, 0, q, k, v).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(got, want);
    for ((_, _, _, k, v), s) in data.iter().zip(&ps) {
        par.append(*s, 0, k, v).unwrap();
    }
    let q = rng.vec(8 * 64, 1.0);
    for (a, b) in ss.iter().zip(&ps) {
        assert_eq!(
            serial.attend(0, &[*a], &q).unwrap().output,
            par.attend(0, &[*b], &q).unwrap().output
        );
        assert_eq!(
            serial.read_tokens(*a, 0).unwrap(),
            par.read_tokens(*b, 0).unwrap()
        );
    }
}
