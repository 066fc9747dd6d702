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

#[test]
fn tolerances_are_checked() {
    assert!(Certifier::new(0.0).is_err());
    assert!(Certifier::new(f32::NAN).is_err());
    assert!(Certifier::from_sensitivity(1.5).is_err());
    let c = Certifier::from_sensitivity(0.85).unwrap();
    assert!((c.tol - 0.085).abs() < 1e-6);
}
