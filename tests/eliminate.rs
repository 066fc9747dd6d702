//! Query-time elimination: key bounds hold for every stored key in every tier, score bounds hold
//! for every score, the ε guarantee holds against full attention (skipped mass and output
//! error), and the Quest baseline picks the top pages by bound.

mod common;
use common::Rng;
use kvtier::eliminate::{
    check, score_upper_bound, EliminationInput, EliminationScratch, Eliminator, QuestSelector,
};
use kvtier::{Bits, CacheConfig, Error, HotDtype, KvCache, PageRef, Rotation, SeqId, Tier};

fn pr(seq: SeqId, page: usize) -> PageRef {
    PageRef {
        seq,
        layer: 0,
        page,
    }
}

/// A cache whose keys have page-level structure (as real keys do): each page's keys are a
/// multiple `a_page` of one direction `u` plus small noise, so a query along `u` attends a few
/// pages strongly and the bounds of the others are tight. Some warm pages and one hot page go
/// cold; `archive` keeps exact copies of demoted pages.
fn structured(
    kb: Bits,
    vb: Bits,
    len: usize,
    seed: u64,
    archive: bool,
) -> (KvCache, SeqId, Vec<f32>) {
    structured_with(kb, vb, len, seed, archive, Rotation::None, 0)
}

/// [`structured`] with a rotation and key outlier channels.
fn structured_with(
    kb: Bits,
    vb: Bits,
    len: usize,
    seed: u64,
    archive: bool,
    rotation: Rotation,
    outliers: usize,
) -> (KvCache, SeqId, Vec<f32>) {
    let (qh, kvh, d) = (8, 2, 64);
    let cfg = CacheConfig::builder(1, qh, kvh, d)
        .rotation(rotation)
        .key_outliers(outliers)
        .k_bits(kb)
        .v_bits(vb)
        .hot_dtype(HotDtype::F16)
        .hot_window(64)
        .sink_tokens(0)
        .archive(archive)
        .build()
        .unwrap();
    let mut rng = Rng(seed);
    let u: Vec<f32> = rng.vec(d, 1.0);
    let ps = cfg.page_size;
    let mut k = Vec::with_capacity(len * kvh * d);
    for t in 0..len {
        let a = (((t / ps) * 7919 + seed as usize) % 13) as f32 / 3.0 - 2.0;
        for _h in 0..kvh {
            for &uc in &u {
                k.push(a * uc + 0.1 * rng.f32());
            }
        }
    }
    let v = rng.vec(len * kvh * d, 1.0);
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    c.append(s, 0, &k, &v).unwrap();
    // Some pages cold: every fifth warm page, and the first hot page if it is not the last.
    let table = c.page_table(s, 0).unwrap().clone();
    for (i, e) in table.pages().iter().enumerate() {
        if e.tier == Tier::Warm && i % 5 == 2 {
            c.to_cold(pr(s, i)).unwrap();
        }
    }
    let q: Vec<f32> = (0..qh)
        .flat_map(|h| u.iter().map(move |x| x * (2.0 + h as f32 * 0.1)))
        .collect();
    (c, s, q)
}

#[test]
fn bounds_hold_for_every_stored_key_and_score() {
    for (kb, vb) in [
        (Bits::B4, Bits::B4),
        (Bits::B2, Bits::B2),
        (Bits::B8, Bits::B4),
    ] {
        let (c, s, q) = structured(kb, vb, 700, 3, true);
        let cfg = c.config().clone();
        let (qh, kvh, d, ps) = (
            cfg.num_q_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.page_size,
        );
        let (keys, _) = c.read_tokens(s, 0).unwrap();
        let table = c.page_table(s, 0).unwrap().clone();
        assert!(table.count(Tier::Cold) > 0 && table.count(Tier::Warm) > 0);
        let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
        let mut checked = 0;
        for (p, e) in table.pages().iter().enumerate() {
            assert!(
                c.page_key_bounds(s, 0, p, &mut lo, &mut hi).unwrap(),
                "page {p}"
            );
            for t in p * ps..p * ps + e.n_tokens as usize {
                for h in 0..kvh {
                    for ch in 0..d {
                        let x = keys[(t * kvh + h) * d + ch];
                        let (l, u) = (lo[h * d + ch], hi[h * d + ch]);
                        assert!(
                            l <= x && x <= u,
                            "{kb:?} page {p} {:?}: {l} <= {x} <= {u}",
                            e.tier
                        );
                    }
                }
                for hq in 0..qh {
                    let kv = hq / (qh / kvh);
                    let qv = &q[hq * d..(hq + 1) * d];
                    let kk = &keys[(t * kvh + kv) * d..(t * kvh + kv + 1) * d];
                    let score: f32 =
                        qv.iter().zip(kk).map(|(a, b)| a * b).sum::<f32>() * cfg.scale();
                    let ub = score_upper_bound(
                        qv,
                        &lo[kv * d..(kv + 1) * d],
                        &hi[kv * d..(kv + 1) * d],
                        cfg.scale(),
                    );
                    assert!(score <= ub, "score {score} above its bound {ub}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 0);
    }
}

#[test]
fn skipped_mass_and_output_error_stay_within_epsilon() {
    let mut skipped_any = false;
    for seed in 0..6u64 {
        for (kb, vb, rot, outliers) in [
            (Bits::B4, Bits::B4, Rotation::None, 0),
            (Bits::B2, Bits::B2, Rotation::None, 0),
            (Bits::B3, Bits::B3, Rotation::KeysValues, 0),
            (Bits::B2, Bits::B4, Rotation::None, 4),
            (Bits::B3, Bits::B2, Rotation::Keys, 2),
        ] {
            let (c, s, q) = structured_with(kb, vb, 1500, seed, seed % 2 == 0, rot, outliers);
            let full = c.attend(0, &[s], &q).unwrap();
            let (_, vals) = c.read_tokens(s, 0).unwrap();
            let d = c.config().head_dim;
            let vmax = vals
                .chunks(d)
                .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt())
                .fold(0f32, f32::max);
            let qh = c.config().num_q_heads;
            for eps in [0.0f32, 1e-3, 1e-2, 0.1] {
                let e = Eliminator::new(eps).unwrap();
                let mut scratch = EliminationScratch::default();
                let input = EliminationInput {
                    layer: 0,
                    seqs: &[s],
                    queries: &q,
                };
                let (att, rep) = e.attend(&c, &mut scratch, &input).unwrap();
                skipped_any |= rep.skipped_pages > 0;
                if seed == 0 {
                    eprintln!(
                        "{kb:?} ε {eps}: skipped {} of {} candidate pages ({} tokens)",
                        rep.skipped_pages, rep.candidates, rep.skipped_tokens
                    );
                }
                let n_pages = full.page_mass[0].len();
                // Check mode: realised mass and error, compared with the manual sums below.
                let ck = check(&full, &att, 0.01).unwrap();
                let pairs: usize = (0..n_pages * qh)
                    .filter(|&x| {
                        full.page_lse[0][x] > f32::NEG_INFINITY
                            && att.page_lse[0][x] == f32::NEG_INFINITY
                    })
                    .count();
                assert_eq!(ck.skipped, pairs);
                if eps <= 0.01 {
                    // No skipped page can carry more than the whole bound.
                    assert_eq!(ck.false_eliminations, 0, "ε {eps}");
                }
                for h in 0..qh {
                    assert!(
                        rep.mass_bound[h] <= eps,
                        "bound {} > ε {eps}",
                        rep.mass_bound[h]
                    );
                    // True skipped mass of head h, from the full attention.
                    let mut skipped = 0f64;
                    for p in 0..n_pages {
                        let (fl, el) = (full.page_lse[0][p * qh + h], att.page_lse[0][p * qh + h]);
                        if fl > f32::NEG_INFINITY && el == f32::NEG_INFINITY {
                            skipped += ((fl - full.heads[h].log_z) as f64).exp();
                        }
                    }
                    assert!(
                        skipped <= rep.mass_bound[h] as f64 + 1e-6,
                        "seed {seed} {kb:?} ε {eps} head {h}: skipped {skipped} > bound {}",
                        rep.mass_bound[h]
                    );
                    let err = full.output[h * d..(h + 1) * d]
                        .iter()
                        .zip(&att.output[h * d..(h + 1) * d])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>()
                        .sqrt();
                    assert!((ck.realised_mass[h] as f64 - skipped).abs() <= 1e-6);
                    assert!((ck.output_error[h] - err).abs() <= 1e-6);
                    assert!(
                        err <= 2.0 * eps * vmax + 1e-5 * vmax.max(1.0),
                        "seed {seed} ε {eps} head {h}: output error {err} > 2 ε max|v| = {}",
                        2.0 * eps * vmax
                    );
                }
                if eps == 0.0 {
                    assert!(rep.mass_bound.iter().all(|&m| m == 0.0));
                }
            }
        }
    }
    assert!(
        skipped_any,
        "the structured caches must let the eliminator skip pages"
    );
}

#[test]
fn quest_keeps_hot_pages_and_the_top_bounds() {
    let (c, s, q) = structured(Bits::B4, Bits::B4, 1200, 7, false);
    let cfg = c.config().clone();
    let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
    let g = qh / kvh;
    let table = c.page_table(s, 0).unwrap().clone();
    let mut scratch = EliminationScratch::default();
    let input = EliminationInput {
        layer: 0,
        seqs: &[s],
        queries: &q,
    };
    let sel = QuestSelector { pages: 5 }
        .select(&c, &mut scratch, &input)
        .unwrap();
    let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
    for kv in 0..kvh {
        let list = sel.pages(0, kv);
        let hot: Vec<u32> = (0..table.pages().len() as u32)
            .filter(|&p| table.pages()[p as usize].tier == Tier::Hot)
            .collect();
        assert!(hot.iter().all(|p| list.contains(p)));
        assert_eq!(list.len(), hot.len() + 5);
        let bound = |p: usize, lo: &mut Vec<f32>, hi: &mut Vec<f32>| {
            c.page_key_bounds(s, 0, p, lo, hi).unwrap();
            (0..g)
                .map(|j| {
                    let h = kv * g + j;
                    score_upper_bound(
                        &q[h * d..(h + 1) * d],
                        &lo[kv * d..(kv + 1) * d],
                        &hi[kv * d..(kv + 1) * d],
                        cfg.scale(),
                    )
                })
                .fold(f32::NEG_INFINITY, f32::max)
        };
        let kept_min = list
            .iter()
            .filter(|p| !hot.contains(p))
            .map(|&p| bound(p as usize, &mut lo, &mut hi))
            .fold(f32::INFINITY, f32::min);
        for p in 0..table.pages().len() {
            if !list.contains(&(p as u32)) {
                assert!(bound(p, &mut lo, &mut hi) <= kept_min);
            }
        }
    }
    let att = c.attend_select(0, &[s], &q, &sel).unwrap();
    assert!(att.is_finite());
}

#[test]
fn bad_input_is_a_typed_error() {
    for eps in [-0.1f32, 1.0, f32::NAN, f32::INFINITY] {
        assert!(
            matches!(Eliminator::new(eps), Err(Error::InvalidConfig { .. })),
            "{eps}"
        );
    }
    let (c, s, q) = structured(Bits::B4, Bits::B4, 200, 1, false);
    let mut scratch = EliminationScratch::default();
    let short = &q[..q.len() - 1];
    let input = EliminationInput {
        layer: 0,
        seqs: &[s],
        queries: short,
    };
    let e = Eliminator::new(0.01).unwrap();
    assert!(matches!(
        e.attend(&c, &mut scratch, &input),
        Err(Error::Shape { .. })
    ));
    let bad_layer = EliminationInput {
        layer: 5,
        seqs: &[s],
        queries: &q,
    };
    assert!(e.attend(&c, &mut scratch, &bad_layer).is_err());
    let kvd = c.config().num_kv_heads * c.config().head_dim;
    let (mut lo, mut hi) = (vec![0f32; kvd], vec![0f32; kvd - 1]);
    assert!(c.page_key_bounds(s, 0, 0, &mut lo, &mut hi).is_err());
    let mut hi = vec![0f32; kvd];
    assert!(c.page_key_bounds(s, 0, 10_000, &mut lo, &mut hi).is_err());
    // check() of attentions of different batches is a shape error.
    let (mut c2, s1, q2) = structured(Bits::B4, Bits::B4, 200, 1, false);
    let s2 = c2.add_sequence();
    let row = c2.config().num_kv_heads * c2.config().head_dim;
    c2.append(s2, 0, &vec![0.5; 40 * row], &vec![0.5; 40 * row])
        .unwrap();
    let both: Vec<f32> = q2.iter().chain(&q2).copied().collect();
    let two = c2.attend(0, &[s1, s2], &both).unwrap();
    let one = c.attend(0, &[s], &q).unwrap();
    assert!(matches!(check(&one, &two, 0.01), Err(Error::Shape { .. })));
}

mod random_shapes {
    use super::*;
    use proptest::prelude::*;

    /// A cache of random shape and tier mix (hot, warm of any width, cold, evicted pages),
    /// keys with page-level structure of random strength, and a query along it.
    #[allow(clippy::too_many_arguments)]
    fn build(
        g: usize,
        kvh: usize,
        d: usize,
        ps: usize,
        kb: Bits,
        vb: Bits,
        len: usize,
        noise: f32,
        seed: u64,
    ) -> (KvCache, SeqId, Vec<f32>) {
        let qh = g * kvh;
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .k_bits(kb)
            .v_bits(vb)
            .page_size(ps)
            .hot_window(ps)
            .sink_tokens(0)
            .build()
            .unwrap();
        let mut rng = Rng(seed);
        let u = rng.vec(d, 1.0);
        let mut k = Vec::with_capacity(len * kvh * d);
        for t in 0..len {
            let a = (((t / ps) as u64 * 2654435761 + seed) % 17) as f32 / 4.0 - 2.0;
            for _ in 0..kvh {
                for &uc in &u {
                    k.push(a * uc + noise * rng.f32());
                }
            }
        }
        let v = rng.vec(len * kvh * d, 1.0);
        let mut c = KvCache::new(cfg).unwrap();
        let s = c.add_sequence();
        c.append(s, 0, &k, &v).unwrap();
        let table = c.page_table(s, 0).unwrap().clone();
        for (i, e) in table.pages().iter().enumerate() {
            if e.tier != Tier::Warm {
                continue;
            }
            match rng.next_u64() % 6 {
                0 => c.to_cold(pr(s, i)).unwrap(),
                1 => c.evict(pr(s, i)).unwrap(),
                _ => {}
            }
        }
        let q: Vec<f32> = (0..qh)
            .flat_map(|h| u.iter().map(move |x| x * (1.0 + 0.3 * h as f32)))
            .collect();
        (c, s, q)
    }

    fn bits() -> impl Strategy<Value = Bits> {
        prop_oneof![Just(Bits::B2), Just(Bits::B4), Just(Bits::B8)]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(64),
            ..ProptestConfig::default()
        })]
        #[test]
        fn epsilon_guarantee_holds_on_random_caches(
            g in prop_oneof![Just(1usize), Just(2), Just(4)],
            kvh in 1usize..3,
            d in prop_oneof![Just(32usize), Just(64)],
            ps in prop_oneof![Just(16usize), Just(32)],
            kb in bits(),
            vb in bits(),
            len in 40usize..700,
            noise in prop_oneof![Just(0.02f32), Just(0.2), Just(1.0)],
            eps in prop_oneof![Just(0.0f32), Just(1e-3), Just(0.05), Just(0.3)],
            seed in any::<u64>(),
        ) {
            let (c, s, q) = build(g, kvh, d, ps, kb, vb, len, noise, seed);
            let full = c.attend(0, &[s], &q).unwrap();
            let (_, vals) = c.read_tokens(s, 0).unwrap();
            let vmax = vals.chunks(d).map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt()).fold(0f32, f32::max);
            let (att, rep) = Eliminator::new(eps)
                .unwrap()
                .attend(&c, &mut EliminationScratch::default(), &EliminationInput { layer: 0, seqs: &[s], queries: &q })
                .unwrap();
            let qh = g * kvh;
            let n_pages = full.page_mass[0].len();
            let table = c.page_table(s, 0).unwrap();
            for h in 0..qh {
                prop_assert!(rep.mass_bound[h] <= eps);
                let mut skipped = 0f64;
                for p in 0..n_pages {
                    let (fl, el) = (full.page_lse[0][p * qh + h], att.page_lse[0][p * qh + h]);
                    // Evicted pages are attended by neither.
                    if table.pages()[p].tier == Tier::Evicted {
                        prop_assert!(fl == f32::NEG_INFINITY && el == f32::NEG_INFINITY);
                    }
                    if fl > f32::NEG_INFINITY && el == f32::NEG_INFINITY {
                        skipped += ((fl - full.heads[h].log_z) as f64).exp();
                    }
                }
                prop_assert!(skipped <= rep.mass_bound[h] as f64 + 1e-6, "skipped {} > bound {}", skipped, rep.mass_bound[h]);
                let err = full.output[h * d..(h + 1) * d]
                    .iter()
                    .zip(&att.output[h * d..(h + 1) * d])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                // 2 ε max|v|, plus f32 rounding: the two phases sum the kept tokens in another
                // order than one call does (relative error up to ~N u for N tokens).
                let slack = 1e-5 * vmax.max(1.0);
                prop_assert!(err <= 2.0 * eps * vmax + slack, "output error {} > {} + {}", err, 2.0 * eps * vmax, slack);
            }
        }
    }
}

/// The two-level (super-page) eliminator keeps the ε guarantee and skips whole super-pages; the
/// GhostKV seed's sketch rule runs on the same interface and attends exactly the pages it keeps.
#[test]
fn comparison_eliminators_on_the_same_interface() {
    use kvtier::eliminate::{SketchEliminator, SuperPageEliminator};
    let mut super_skips = 0;
    for seed in 0..6u64 {
        let (c, s, q) = structured(Bits::B4, Bits::B4, 1500, seed, true);
        let full = c.attend(0, &[s], &q).unwrap();
        let qh = c.config().num_q_heads;
        let input = EliminationInput {
            layer: 0,
            seqs: &[s],
            queries: &q,
        };
        for eps in [0.0f32, 1e-3, 1e-2, 0.1] {
            for group in [2usize, 4, 8] {
                let e = SuperPageEliminator::new(eps, group).unwrap();
                let mut scratch = EliminationScratch::default();
                let (att, rep) = e.attend(&c, &mut scratch, &input).unwrap();
                super_skips += rep.super_skips;
                let ck = check(&full, &att, 0.01).unwrap();
                for h in 0..qh {
                    assert!(
                        rep.mass_bound[h] <= eps,
                        "bound {} > ε {eps}",
                        rep.mass_bound[h]
                    );
                    assert!(
                        ck.realised_mass[h] <= rep.mass_bound[h] + 1e-6,
                        "seed {seed} ε {eps} group {group} head {h}: {} > {}",
                        ck.realised_mass[h],
                        rep.mass_bound[h]
                    );
                }
                assert!(rep.skipped_pages <= rep.candidates);
            }
        }
        // The sketch rule: no guarantee, but what it keeps is attended exactly.
        for slack in [-50.0f32, 0.0, 4.0, 1e4] {
            let e = SketchEliminator::new(1e-3, 16, 7, slack, c.config().head_dim).unwrap();
            let mut scratch = EliminationScratch::default();
            let (att, rep) = e.attend(&c, &mut scratch, &input).unwrap();
            if slack >= 1e4 {
                assert_eq!(rep.skipped_pages, 0, "a huge slack skips nothing");
                // Two attends merged: equal to one up to f32 rounding.
                for (a, b) in att.output.iter().zip(&full.output) {
                    assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
                }
            }
            let (kvh, g) = (c.config().num_kv_heads, c.config().group_size());
            let n_pages = full.page_mass[0].len();
            let mut kept = kvtier::PageSelection::none(1, kvh);
            for kv in 0..kvh {
                let pages = (0..n_pages as u32)
                    .filter(|&p| att.page_lse[0][p as usize * qh + kv * g] > f32::NEG_INFINITY);
                kept.set(0, kv, pages).unwrap();
            }
            let again = c.attend_select(0, &[s], &q, &kept).unwrap();
            for (a, b) in att.output.iter().zip(&again.output) {
                assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
            }
        }
    }
    assert!(
        super_skips > 0,
        "whole super-pages must be skipped somewhere"
    );
    assert!(SuperPageEliminator::new(1e-3, 1).is_err());
    assert!(SuperPageEliminator::new(1.0, 4).is_err());
    assert!(SketchEliminator::new(1e-3, 0, 1, 0.0, 64).is_err());
    assert!(SketchEliminator::new(1e-3, 8, 1, f32::NAN, 64).is_err());
}
