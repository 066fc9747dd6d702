//! Certified attention: the score error bound of `monitor::score_error_bound` holds for every
//! token of every warm page, for random keys, queries, widths and shapes.

use kvtier::monitor::{score_error_bound, Certifier};
use kvtier::{Bits, CacheConfig, HotDtype, KvCache, Tier};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn quantised_scores_stay_within_the_bound(
        seed in any::<u64>(),
        bits in prop::sample::select(vec![2u32, 4, 8]),
        kvh in 1usize..3,
        group in 1usize..4,
        d in prop::sample::select(vec![32usize, 64]),
        pages in 1usize..6,
        key_scale in 0.01f32..50.0,
        q_scale in 0.01f32..20.0,
    ) {
        let qh = kvh * group;
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .hot_dtype(HotDtype::F32)
            .hot_window(0)
            .sink_tokens(0)
            .k_bits(Bits::from_bits(bits).unwrap())
            .build()
            .unwrap();
        let ps = cfg.page_size;
        let n = pages * ps + 1;
        let mut state = seed | 1;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        // Channels with different offsets and spreads, as real keys have.
        let offs: Vec<f32> = (0..kvh * d).map(|_| rnd() * key_scale).collect();
        let k: Vec<f32> = (0..n * kvh * d).map(|i| offs[i % (kvh * d)] + rnd() * key_scale).collect();
        let v: Vec<f32> = (0..n * kvh * d).map(|_| rnd()).collect();
        let q: Vec<f32> = (0..qh * d).map(|_| rnd() * q_scale).collect();
        let mut c = KvCache::new(cfg.clone()).unwrap();
        let s = c.add_sequence();
        c.append(s, 0, &k, &v).unwrap();
        let (kq, _) = c.read_tokens(s, 0).unwrap();
        let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
        let mut warm = 0;
        for (p, e) in c.page_table(s, 0).unwrap().pages().iter().enumerate() {
            if e.tier != Tier::Warm {
                continue;
            }
            warm += 1;
            prop_assert!(c.page_key_bounds(s, 0, p, &mut lo, &mut hi).unwrap());
            for h in 0..qh {
                let kv = h / group;
                let qv = &q[h * d..(h + 1) * d];
                let b = score_error_bound(qv, &lo[kv * d..(kv + 1) * d], &hi[kv * d..(kv + 1) * d], bits as usize, cfg.scale());
                for t in p * ps..p * ps + e.n_tokens as usize {
                    let at = (t * kvh + kv) * d;
                    let exact: f64 = qv.iter().zip(&k[at..at + d]).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let quant: f64 = qv.iter().zip(&kq[at..at + d]).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let err = ((exact - quant) * cfg.scale() as f64).abs();
                    prop_assert!(err <= b as f64, "page {p} head {h} token {t}: error {err} > bound {b}");
                }
            }
        }
        prop_assert!(warm >= pages);
        // Every warm page is uncertain at a tolerance below its bound, none above the largest.
        let mut out = Vec::new();
        let worst = Certifier::new(1e-30).unwrap().uncertain_pages(&c, 0, s, &q, &mut out).unwrap();
        prop_assert_eq!(out.len(), warm);
        Certifier::new(worst * 1.01 + 1e-30).unwrap().uncertain_pages(&c, 0, s, &q, &mut out).unwrap();
        prop_assert!(out.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The value half: every dequantised value is within its page's `page_value_error` of the
    /// value stored, in every tier, for random widths, scales and offsets; the certifier's value
    /// tolerance picks exactly the warm pages above it.
    #[test]
    fn quantised_values_stay_within_the_bound(
        seed in any::<u64>(),
        bits in prop::sample::select(vec![2u32, 3, 4, 8]),
        kvh in 1usize..3,
        d in prop::sample::select(vec![32usize, 64]),
        pages in 2usize..6,
        scale in 0.001f32..100.0,
        offset in -1000.0f32..1000.0,
    ) {
        let cfg = CacheConfig::builder(1, kvh, kvh, d)
            .hot_dtype(HotDtype::F32)
            .hot_window(0)
            .sink_tokens(0)
            .v_bits(Bits::from_bits(bits).unwrap())
            .build()
            .unwrap();
        let ps = cfg.page_size;
        let n = pages * ps + 5;
        let mut state = seed | 1;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let k: Vec<f32> = (0..n * kvh * d).map(|_| rnd()).collect();
        // Tokens of different magnitudes around an offset (tight ranges far from zero included).
        let v: Vec<f32> = (0..n * kvh * d)
            .map(|i| offset + rnd() * scale * (1 + i / (kvh * d) % 7) as f32)
            .collect();
        let mut c = KvCache::new(cfg.clone()).unwrap();
        let s = c.add_sequence();
        c.append(s, 0, &k, &v).unwrap();
        // One page to the cold tier: its bound comes from its cold bytes.
        let p_cold = kvtier::PageRef { seq: s, layer: 0, page: 0 };
        if c.page(p_cold).unwrap().tier == Tier::Warm {
            c.to_cold(p_cold).unwrap();
        }
        let (_, vq) = c.read_tokens(s, 0).unwrap();
        let mut eta = vec![0f32; kvh];
        let mut warm = Vec::new();
        for (p, e) in c.page_table(s, 0).unwrap().pages().iter().enumerate() {
            prop_assert!(c.page_value_error(s, 0, p, &mut eta).unwrap());
            if e.tier == Tier::Hot {
                prop_assert!(eta.iter().all(|&x| x == 0.0));
            }
            if e.tier == Tier::Warm {
                warm.push((p, eta.iter().copied().fold(0.0, f32::max)));
            }
            for t in p * ps..p * ps + e.n_tokens as usize {
                for (kv, &bound) in eta.iter().enumerate() {
                    let at = (t * kvh + kv) * d;
                    for ch in 0..d {
                        let err = (vq[at + ch] - v[at + ch]).abs();
                        prop_assert!(err <= bound, "{:?} page {p} kv {kv} token {t}: error {err} > bound {bound}", e.tier);
                    }
                }
            }
        }
        prop_assert!(!warm.is_empty());
        // The value tolerance decides alone when the score tolerance is huge.
        let q = vec![0f32; kvh * d];
        let tol = warm.iter().map(|w| w.1).fold(0.0, f32::max) * 0.999;
        let cert = Certifier::new(1e30).unwrap().with_value_tolerance(tol).unwrap();
        let mut out = Vec::new();
        cert.uncertain_pages(&c, 0, s, &q, &mut out).unwrap();
        let want: Vec<usize> = warm.iter().filter(|w| w.1 > tol).map(|w| w.0).collect();
        prop_assert_eq!(out, want);
    }
}

#[test]
fn tolerances_are_checked() {
    assert!(Certifier::new(0.0).is_err());
    assert!(Certifier::new(f32::NAN).is_err());
    assert!(Certifier::from_sensitivity(1.5).is_err());
    let c = Certifier::from_sensitivity(0.85).unwrap();
    assert!((c.tol - 0.085).abs() < 1e-6);
}
