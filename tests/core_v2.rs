//! Core v2: page moves, the archive, the cold tier, selections, observe, input dtypes, batched
//! append, and regressions for what an independent C client found at 6ff2382.

mod common;
use common::{naive, Rng};
use half::{bf16, f16};
use kvtier::{
    Bits, CacheConfig, Error, HotDtype, KvCache, Move, PageRef, PageResults, PageSelection,
    Restored, Rows, Scratch, SeqId, Tier, WarmFormat,
};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A cache of one layer with `len` random tokens in one sequence.
fn filled(cfg: CacheConfig, len: usize, seed: u64) -> (KvCache, SeqId, Vec<f32>, Vec<f32>) {
    let row = cfg.num_kv_heads * cfg.head_dim;
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let mut rng = Rng(seed);
    let (k, v) = (rng.vec(len * row, 1.5), rng.vec(len * row, 1.0));
    c.append(s, 0, &k, &v).unwrap();
    (c, s, k, v)
}

fn cfg(qh: usize, kvh: usize, d: usize) -> kvtier::CacheConfigBuilder {
    CacheConfig::builder(1, qh, kvh, d)
        .hot_window(32)
        .sink_tokens(0)
}

fn pr(seq: SeqId, page: usize) -> PageRef {
    PageRef {
        seq,
        layer: 0,
        page,
    }
}

#[test]
fn promote_restores_bit_identical_pages_from_the_archive() {
    let (mut c, s, _, _) = filled(cfg(8, 2, 64).build().unwrap(), 300, 1);
    let q = Rng(2).vec(8 * 64, 2.0);
    let table = c.page_table(s, 0).unwrap().clone();
    assert!(table.count(Tier::Warm) >= 7);
    // A cache that never demoted: same data, full precision (f16 hot pages as in the first).
    let (exact, se, _, _) = filled(cfg(8, 2, 64).full_precision().build().unwrap(), 300, 1);
    for i in 0..table.pages().len() {
        if table.pages()[i].tier == Tier::Warm {
            assert_eq!(c.promote(pr(s, i)).unwrap(), Restored::Exact);
        }
    }
    assert_eq!(c.page_table(s, 0).unwrap().count(Tier::Warm), 0);
    assert_eq!(
        c.memory_report().archive_bytes,
        0,
        "hot pages need no archive copy"
    );
    assert_eq!(
        c.read_tokens(s, 0).unwrap(),
        exact.read_tokens(se, 0).unwrap()
    );
    let a = c.attend(0, &[s], &q).unwrap();
    let b = exact.attend(0, &[se], &q).unwrap();
    assert_eq!(a.output, b.output, "promoted pages attend bit-identically");
    // Promoted pages are not re-demoted by the hot-window rule on the next append.
    c.append(s, 0, &[0.1; 128], &[0.2; 128]).unwrap();
    assert_eq!(c.page(pr(s, 0)).unwrap().tier, Tier::Hot);
}

#[test]
fn without_archive_promote_dequantises_and_says_so() {
    let (mut c, s, k, _) = filled(cfg(4, 1, 32).archive(false).build().unwrap(), 200, 3);
    assert_eq!(c.memory_report().archive_bytes, 0);
    let before = c.read_tokens(s, 0).unwrap();
    assert_eq!(c.promote(pr(s, 0)).unwrap(), Restored::Dequantised);
    let after = c.read_tokens(s, 0).unwrap();
    // The promoted page holds the dequantised values (rounded to f16), not the originals.
    let n = 32 * 32;
    assert!(max_abs_diff(&after.0[..n], &before.0[..n]) < 2e-3);
    assert!(max_abs_diff(&after.0[..n], &k[..n]) > 0.0);
}

#[test]
fn warm_pages_go_to_fewer_bits_and_attention_stays_in_bound() {
    let (mut c, s, k, v) = filled(cfg(8, 2, 64).build().unwrap(), 256, 4);
    let q = Rng(5).vec(8 * 64, 1.0);
    let b2 = WarmFormat::uniform(Bits::B2);
    assert!(matches!(
        c.demote(pr(s, 0), WarmFormat::uniform(Bits::B8)),
        Err(Error::InvalidMove { .. })
    ));
    c.demote(pr(s, 0), b2).unwrap();
    c.demote(
        pr(s, 1),
        WarmFormat {
            k_bits: Bits::B4,
            v_bits: Bits::B2,
        },
    )
    .unwrap();
    c.demote(
        pr(s, 2),
        WarmFormat {
            k_bits: Bits::B2,
            v_bits: Bits::B4,
        },
    )
    .unwrap();
    assert_eq!(c.page(pr(s, 0)).unwrap().format, b2);
    let att = c.attend(0, &[s], &q).unwrap();
    let (want, _, _) = naive(&q, &k, &v, 256, 8, 2, 64);
    let err = max_abs_diff(&att.output, &want);
    assert!(err < 0.25, "mixed-width attention error {err}");
    // Requantised from the archive: the same as demoting the exact page straight to int2.
    let (mut d, sd, _, _) = filled(cfg(8, 2, 64).hot_window(10_000).build().unwrap(), 256, 4);
    d.demote(pr(sd, 0), b2).unwrap();
    let a = c.read_tokens(s, 0).unwrap();
    let b = d.read_tokens(sd, 0).unwrap();
    assert_eq!(a.0[..32 * 128], b.0[..32 * 128]);
}

#[test]
fn cold_pages_attend_as_if_on_the_device_and_come_back_exactly() {
    for archive in [true, false] {
        let (mut c, s, _, _) = filled(cfg(8, 2, 64).archive(archive).build().unwrap(), 300, 6);
        let (reference, sr, _, _) = filled(cfg(8, 2, 64).archive(archive).build().unwrap(), 300, 6);
        let q = Rng(7).vec(8 * 64, 2.0);
        let want = reference.attend(0, &[sr], &q).unwrap();
        // Page 0 and 1 are warm, page 8 hot (outside the window only after more appends: pin it
        // and unpin to check pins block the move).
        c.to_cold(pr(s, 0)).unwrap();
        c.to_cold(pr(s, 1)).unwrap();
        c.pin(pr(s, 8)).unwrap();
        assert!(matches!(
            c.to_cold(pr(s, 8)),
            Err(Error::InvalidMove { .. })
        ));
        c.unpin(pr(s, 8)).unwrap();
        c.to_cold(pr(s, 8)).unwrap();
        let r = c.memory_report();
        assert_eq!(r.cold_pages, 3);
        assert!(r.cold_bytes > 0);
        let got = c.attend(0, &[s], &q).unwrap();
        let err = max_abs_diff(&got.output, &want.output);
        assert!(
            err < 1e-5,
            "archive {archive}: cold attention differs by {err}"
        );
        for (a, b) in got.heads.iter().zip(&want.heads) {
            assert!((a.log_z - b.log_z).abs() < 1e-4 && (a.entropy - b.entropy).abs() < 1e-3);
        }
        for (a, b) in got.page_mass[0].iter().zip(&want.page_mass[0]) {
            assert!((a - b).abs() < 1e-5);
        }
        c.from_cold(pr(s, 0)).unwrap();
        assert_eq!(c.page(pr(s, 0)).unwrap().tier, Tier::Warm);
        assert_eq!(
            c.promote(pr(s, 1)).unwrap(),
            if archive {
                Restored::Exact
            } else {
                Restored::Dequantised
            }
        );
        c.from_cold(pr(s, 8)).unwrap();
        assert_eq!(c.page(pr(s, 8)).unwrap().tier, Tier::Hot);
        assert_eq!(c.memory_report().cold_pages, 0);
        assert_eq!(c.memory_report().cold_bytes, 0);
        let k8 = c.read_tokens(s, 0).unwrap().0;
        let r8 = reference.read_tokens(sr, 0).unwrap().0;
        let at = 8 * 32 * 128;
        assert_eq!(
            k8[at..at + 32 * 128],
            r8[at..at + 32 * 128],
            "hot page back exactly"
        );
    }
}

#[test]
fn evicted_pages_are_never_attended_and_free_everything() {
    let (mut c, s, k, v) = filled(
        cfg(4, 2, 32)
            .hot_dtype(HotDtype::F32)
            .full_precision()
            .build()
            .unwrap(),
        150,
        8,
    );
    let q = Rng(9).vec(4 * 32, 1.0);
    let before = c.memory_report();
    c.evict(pr(s, 1)).unwrap();
    assert!(matches!(c.evict(pr(s, 1)), Err(Error::InvalidMove { .. })));
    assert!(
        matches!(c.evict(pr(s, 4)), Err(Error::InvalidMove { .. })),
        "last partial page"
    );
    let r = c.memory_report();
    assert_eq!(r.evicted_pages, 1);
    assert!(r.hot_bytes < before.hot_bytes);
    assert_eq!(c.seq_len(s, 0).unwrap(), 150, "positions do not shift");
    // Reference over the kept tokens only.
    let row = 2 * 32;
    let keep: Vec<usize> = (0..150).filter(|t| !(32..64).contains(t)).collect();
    let kk: Vec<f32> = keep
        .iter()
        .flat_map(|&t| k[t * row..(t + 1) * row].to_vec())
        .collect();
    let vv: Vec<f32> = keep
        .iter()
        .flat_map(|&t| v[t * row..(t + 1) * row].to_vec())
        .collect();
    let (want, _, _) = naive(&q, &kk, &vv, keep.len(), 4, 2, 32);
    let att = c.attend(0, &[s], &q).unwrap();
    assert!(max_abs_diff(&att.output, &want) < 1e-5);
    assert_eq!(att.page_mass[0][1], 0.0);
    assert!(!att.attended(0, 1, 0));
}

#[test]
fn selection_equals_a_cache_holding_only_the_selected_pages() {
    let (qh, kvh, d) = (8, 2, 64);
    let (c, s, k, v) = filled(cfg(qh, kvh, d).build().unwrap(), 20 * 32, 10);
    let q = Rng(11).vec(qh * d, 2.0);
    // Half the pages, different per kv head.
    let mut sel = PageSelection::none(1, kvh);
    sel.set(0, 0, (0..20).filter(|p| p % 2 == 0)).unwrap();
    sel.set(0, 1, (0..20).filter(|p| p % 2 == 1)).unwrap();
    let got = c.attend_select(0, &[s], &q, &sel).unwrap();
    // A cache holding only kv head h's pages, with the same hot/warm state per page.
    let row = kvh * d;
    for kv in 0..kvh {
        let pages: Vec<usize> = sel.pages(0, kv).iter().map(|&p| p as usize).collect();
        let mut only = KvCache::new(cfg(qh, kvh, d).hot_window(1 << 20).build().unwrap()).unwrap();
        let so = only.add_sequence();
        for &p in &pages {
            only.append(
                so,
                0,
                &k[p * 32 * row..(p + 1) * 32 * row],
                &v[p * 32 * row..(p + 1) * 32 * row],
            )
            .unwrap();
        }
        let table = c.page_table(s, 0).unwrap();
        for (i, &p) in pages.iter().enumerate() {
            if table.pages()[p].tier == Tier::Warm {
                only.demote(pr(so, i), WarmFormat::of(c.config())).unwrap();
            }
        }
        let want = only.attend(0, &[so], &q).unwrap();
        let g = qh / kvh;
        let (a, b) = (
            &got.output[kv * g * d..(kv + 1) * g * d],
            &want.output[kv * g * d..(kv + 1) * g * d],
        );
        let err = max_abs_diff(a, b);
        assert!(
            err < 1e-5,
            "kv head {kv}: selection differs from a cache of those pages by {err}"
        );
        for h in kv * g..(kv + 1) * g {
            assert!((got.heads[h].log_z - want.heads[h].log_z).abs() < 1e-4);
        }
        for p in 0..20 {
            assert_eq!(got.attended(0, p, kv), pages.contains(&p));
        }
    }
    // Bad selections are typed errors.
    let wrong = PageSelection::none(2, kvh);
    assert!(matches!(
        c.attend_select(0, &[s], &q, &wrong),
        Err(Error::Shape { .. })
    ));
    let mut oob = PageSelection::none(1, kvh);
    oob.set(0, 0, [25]).unwrap();
    assert!(matches!(
        c.attend_select(0, &[s], &q, &oob),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn observe_accumulates_per_kv_head_mass_with_decay() {
    let (mut c, s, _, _) = filled(cfg(8, 2, 64).mass_decay(0.5).build().unwrap(), 200, 12);
    let q = Rng(13).vec(8 * 64, 2.0);
    let a1 = c.attend(0, &[s], &q).unwrap();
    c.observe(0, &[s], &a1).unwrap();
    let m1: Vec<Vec<f32>> = c
        .page_meta(s, 0)
        .unwrap()
        .iter()
        .map(|m| m.mass.to_vec())
        .collect();
    let kv = a1.kv_page_mass(0);
    for (p, m) in m1.iter().enumerate() {
        assert_eq!(m.as_slice(), &kv[p * 2..p * 2 + 2]);
    }
    for h in 0..2 {
        let total: f32 = m1.iter().map(|m| m[h]).sum();
        assert!(
            (total - 1.0).abs() < 1e-4,
            "kv head {h} masses sum to {total}"
        );
    }
    c.observe(0, &[s], &a1).unwrap();
    for (m, m0) in c.page_meta(s, 0).unwrap().iter().zip(&m1) {
        for (x, x0) in m.mass.iter().zip(m0) {
            assert!((x - 1.5 * x0).abs() < 1e-6);
        }
        assert_eq!(m.last_attended, Some(1));
    }
    assert_eq!(c.observed_steps(s, 0).unwrap(), 2);
    // A result from before an append is stale.
    c.append(s, 0, &vec![0.0; 128 * 33], &vec![0.0; 128 * 33])
        .unwrap();
    assert!(matches!(c.observe(0, &[s], &a1), Err(Error::Stale(_))));
}

#[test]
fn f16_and_bf16_inputs_and_batched_decode_append() {
    let (qh, kvh, d) = (4, 2, 32);
    let row = kvh * d;
    let base = cfg(qh, kvh, d).build().unwrap();
    let mut a = KvCache::new(base.clone()).unwrap();
    let mut b = KvCache::new(base).unwrap();
    let seqs_a: Vec<SeqId> = (0..3).map(|_| a.add_sequence()).collect();
    let seqs_b: Vec<SeqId> = (0..3).map(|_| b.add_sequence()).collect();
    let mut rng = Rng(14);
    for _ in 0..70 {
        let k: Vec<f16> = rng
            .vec(3 * row, 1.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let v: Vec<bf16> = rng
            .vec(3 * row, 1.0)
            .iter()
            .map(|&x| bf16::from_f32(x))
            .collect();
        a.append_decode(0, &seqs_a, Rows::F16(&k), Rows::BF16(&v))
            .unwrap();
        for (i, &s) in seqs_b.iter().enumerate() {
            let kf: Vec<f32> = k[i * row..(i + 1) * row]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let vf: Vec<f32> = v[i * row..(i + 1) * row]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            b.append(s, 0, &kf, &vf).unwrap();
        }
    }
    let q: Vec<f32> = rng.vec(3 * qh * d, 1.0);
    let qh16: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
    let q16: Vec<f32> = qh16.iter().map(|x| x.to_f32()).collect();
    let x = a
        .attend_with(&mut Scratch::default(), 0, &seqs_a, Rows::F16(&qh16), None)
        .unwrap();
    let y = b.attend(0, &seqs_b, &q16).unwrap();
    assert_eq!(x.output, y.output);
    // Batched append validates the whole batch first.
    let before = a.memory_report();
    let k = vec![0.0f32; 3 * row];
    assert!(matches!(
        a.append_decode(
            0,
            &[seqs_a[0], seqs_a[0], seqs_a[1]],
            Rows::F32(&k),
            Rows::F32(&k)
        ),
        Err(Error::DuplicateSequence(_))
    ));
    assert!(matches!(
        a.append_decode(
            0,
            &[seqs_a[0], SeqId(99), seqs_a[1]],
            Rows::F32(&k),
            Rows::F32(&k)
        ),
        Err(Error::UnknownSequence(99))
    ));
    assert_eq!(a.memory_report(), before);
}

#[test]
fn regression_huge_hot_window_or_sinks_keep_everything_hot() {
    for (w, s) in [
        (usize::MAX, 0),
        (0, usize::MAX),
        (usize::MAX - 3, usize::MAX),
    ] {
        let (c, seq, _, _) = filled(
            cfg(4, 1, 32).hot_window(w).sink_tokens(s).build().unwrap(),
            500,
            15,
        );
        assert_eq!(
            c.page_table(seq, 0).unwrap().count(Tier::Warm),
            0,
            "window {w} sinks {s}"
        );
        assert_eq!(c.counters().demotions, 0);
    }
}

#[test]
fn regression_values_beyond_f16_are_refused_and_attention_is_never_inf() {
    let mut c = KvCache::new(cfg(4, 1, 32).build().unwrap()).unwrap();
    let s = c.add_sequence();
    let ok = vec![0.5f32; 32];
    let mut big = ok.clone();
    big[7] = 1e5;
    assert!(matches!(
        c.append(s, 0, &big, &ok),
        Err(Error::OutOfRange { index: 7, .. })
    ));
    assert!(matches!(
        c.append(s, 0, &ok, &big),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(c.seq_len(s, 0).unwrap(), 0, "nothing stored");
    c.append(s, 0, &ok, &ok).unwrap();
    // f32 hot pages hold 1e5 exactly; attention stays finite.
    let mut c32 = KvCache::new(cfg(4, 1, 32).hot_dtype(HotDtype::F32).build().unwrap()).unwrap();
    let s32 = c32.add_sequence();
    c32.append(s32, 0, &big, &big).unwrap();
    let att = c32.attend(0, &[s32], &vec![1.0; 4 * 32]).unwrap();
    assert!(att.is_finite());
    // Queries that overflow the scores give a typed error, not inf / NaN.
    let mut h = KvCache::new(cfg(4, 1, 32).hot_dtype(HotDtype::F32).build().unwrap()).unwrap();
    let sh = h.add_sequence();
    h.append(sh, 0, &[3e38; 32], &ok).unwrap();
    assert!(matches!(
        h.attend(0, &[sh], &vec![3e38; 4 * 32]),
        Err(Error::Overflow(_))
    ));
}

#[test]
fn regression_counts_are_checked_before_anything_is_read() {
    let c = KvCache::new(cfg(4, 1, 32).max_seq_len(1000).build().unwrap()).unwrap();
    let mut c = c;
    let s = c.add_sequence();
    assert!(matches!(
        c.check_append_len(s, 0, usize::MAX / 64 * 32, usize::MAX / 64 * 32),
        Err(Error::SequenceTooLong { .. })
    ));
    assert!(matches!(
        c.check_append_len(s, 0, 1001 * 32, 1001 * 32),
        Err(Error::SequenceTooLong { .. })
    ));
    assert_eq!(
        c.check_append_len(s, 0, 1000 * 32, 1000 * 32).unwrap(),
        1000
    );
}

#[test]
fn results_are_batch_invariant() {
    let (qh, kvh, d) = (8, 2, 64);
    let mut c = KvCache::new(cfg(qh, kvh, d).build().unwrap()).unwrap();
    let mut rng = Rng(16);
    let lens = [3000usize, 17, 900, 64, 2500];
    let seqs: Vec<SeqId> = lens
        .iter()
        .map(|&n| {
            let s = c.add_sequence();
            c.append(s, 0, &rng.vec(n * kvh * d, 1.0), &rng.vec(n * kvh * d, 1.0))
                .unwrap();
            s
        })
        .collect();
    let q = rng.vec(lens.len() * qh * d, 2.0);
    let all = c.attend(0, &seqs, &q).unwrap();
    let n = qh * d;
    for (i, &s) in seqs.iter().enumerate() {
        let alone = c.attend(0, &[s], &q[i * n..(i + 1) * n]).unwrap();
        assert_eq!(
            alone.output,
            all.output_of(i),
            "sequence {i} alone vs in the batch"
        );
        assert_eq!(alone.heads, all.heads_of(i));
        assert_eq!(alone.page_mass[0], all.page_mass[i]);
    }
    // And with other batch-mates, in another order.
    let sub = [seqs[4], seqs[0]];
    let qs = [&q[4 * n..5 * n], &q[..n]].concat();
    let part = c.attend(0, &sub, &qs).unwrap();
    assert_eq!(part.output_of(0), all.output_of(4));
    assert_eq!(part.output_of(1), all.output_of(0));
}

#[test]
fn apply_validates_every_page_and_refuses_duplicates() {
    let (mut c, s, _, _) = filled(cfg(4, 1, 32).build().unwrap(), 300, 17);
    let fmt = WarmFormat::uniform(Bits::B2);
    let before = c.memory_report();
    assert!(matches!(
        c.apply(&[Move::Demote(pr(s, 0), fmt), Move::Evict(pr(s, 99))]),
        Err(Error::UnknownPage { .. })
    ));
    assert!(matches!(
        c.apply(&[Move::Demote(pr(s, 0), fmt), Move::Evict(pr(s, 0))]),
        Err(Error::InvalidMove { .. })
    ));
    assert_eq!(c.memory_report(), before, "a refused batch changes nothing");
    assert_eq!(
        c.apply(&[
            Move::Demote(pr(s, 0), fmt),
            Move::ToCold(pr(s, 1)),
            Move::Pin(pr(s, 2))
        ])
        .unwrap(),
        3
    );
    assert!(c.page_meta(s, 0).unwrap()[2]
        .pins
        .contains(kvtier::Pins::USER));
    assert!(
        matches!(c.promote(pr(s, 8)), Err(Error::InvalidMove { .. })),
        "already hot"
    );
    assert!(matches!(
        c.demote(
            PageRef {
                seq: s,
                layer: 3,
                page: 0
            },
            fmt
        ),
        Err(Error::LayerOutOfRange { .. })
    ));
    assert!(matches!(
        c.demote(pr(SeqId(77), 0), fmt),
        Err(Error::UnknownSequence(77))
    ));
}

#[test]
fn budgets_count_allocated_bytes() {
    let base = cfg(4, 1, 32).hot_window(1 << 20).build().unwrap();
    let page = 2 * 32 * 32 * 2; // one hot page: K and V, 32 tokens x 32 dims, f16
    let mut b = base.budgets;
    b.hot_bytes = Some(3 * page);
    let mut c = KvCache::new(
        CacheConfig {
            budgets: b,
            ..base.clone()
        }
        .clone(),
    )
    .unwrap();
    let s = c.add_sequence();
    let kv = vec![0.1f32; 96 * 32];
    c.append(s, 0, &kv, &kv).unwrap();
    assert_eq!(c.memory_report().hot_bytes, 3 * page);
    assert!(matches!(
        c.append(s, 0, &kv[..32], &kv[..32]),
        Err(Error::BudgetExceeded {
            tier: Tier::Hot,
            ..
        })
    ));
    assert_eq!(c.seq_len(s, 0).unwrap(), 96);
    // A cold budget bounds the archive: demotions that would exceed it are skipped, nothing lost.
    let mut b = base.budgets;
    b.cold_bytes = Some(page);
    let mut c = KvCache::new(CacheConfig {
        budgets: b,
        hot_window: 32,
        ..base
    })
    .unwrap();
    let s = c.add_sequence();
    let kv = vec![0.1f32; 300 * 32];
    c.append(s, 0, &kv, &kv).unwrap();
    let r = c.memory_report();
    assert_eq!(r.archived_pages, 1);
    assert!(r.archive_bytes <= page);
    assert!(c.counters().demotions_skipped > 0);
}

/// The preset docs (config.rs, the C header, README) state these device-memory ratios against
/// plain f16 K/V, measured here: 32 q / 8 kv heads, d128, one layer, 32K tokens, archive off (the
/// archive is host memory and does not count against device bytes either way).
#[test]
fn preset_compression_is_what_the_docs_state() {
    let tokens = 32 * 1024;
    for (name, f, stated) in [
        (
            "quality",
            CacheConfig::quality as fn(usize, usize, usize, usize) -> kvtier::Result<CacheConfig>,
            1.76,
        ),
        ("balanced", CacheConfig::balanced, 3.15),
        ("compact", CacheConfig::compact, 3.94),
    ] {
        let cfg = CacheConfig {
            archive: false,
            ..f(1, 32, 8, 128).unwrap()
        };
        let (c, _, _, _) = filled(cfg, tokens, 20);
        let got = c.memory_report().compression();
        println!("{name}: {got:.3}x");
        assert!(
            (got - stated).abs() < 0.01,
            "{name}: measured {got:.3}x, docs say {stated}x"
        );
    }
}

/// Regression: when a later page's scores exceed an earlier page's by more than 88, the earlier
/// page's mass was computed through exp(88+) and came out inf.
#[test]
fn page_masses_stay_finite_over_a_huge_score_range() {
    let mut c = KvCache::new(cfg(4, 1, 32).hot_dtype(HotDtype::F32).build().unwrap()).unwrap();
    let s = c.add_sequence();
    let mut k = vec![0.01f32; 256 * 32];
    for x in &mut k[200 * 32..201 * 32] {
        *x = 20.0;
    }
    c.append(s, 0, &k, &k).unwrap();
    let att = c.attend(0, &[s], &[20.0; 4 * 32]).unwrap();
    let total: f32 = att.page_mass[0].iter().sum();
    assert!(
        att.page_mass[0].iter().all(|m| m.is_finite() && *m >= 0.0),
        "{:?}",
        att.page_mass
    );
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    assert!(att.page_mass[0][6] > 0.999);
}

/// A scratch without page results: the same output and statistics as the full call (with warm,
/// cold and selected pages), no per-page vectors, `observe` refuses the result; switched back, the
/// same scratch gives the full result again. `kv_mass` is the per kv head mass of `page_lse`, and
/// `page_mass` its mean over kv heads.
#[test]
fn page_results_can_be_skipped_and_kv_masses_agree_with_page_lse() {
    let (mut c, s, _, _) = filled(cfg(8, 2, 64).build().unwrap(), 300, 21);
    c.to_cold(pr(s, 1)).unwrap();
    // The same cache again, to observe the masses-only results into.
    let (mut twin, ts, _, _) = filled(cfg(8, 2, 64).build().unwrap(), 300, 21);
    twin.to_cold(pr(ts, 1)).unwrap();
    let q = Rng(22).vec(8 * 64, 2.0);
    let n_pages = c.page_table(s, 0).unwrap().pages().len();
    let mut sel = PageSelection::all(&[n_pages], 2);
    sel.remove(0, 3);
    let mut scratch = Scratch::default();
    for selection in [None, Some(&sel)] {
        let full = c
            .attend_with(&mut scratch, 0, &[s], Rows::F32(&q), selection)
            .unwrap();
        assert!(full.has_page_results());
        let (qh, kvh, g) = (8, 2, 4);
        for p in 0..n_pages {
            let mut mean = 0.0;
            for kv in 0..kvh {
                let want: f32 = (kv * g..(kv + 1) * g)
                    .map(|h| {
                        let x = full.page_lse[0][p * qh + h];
                        if x == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (x - full.heads[h].log_z).exp()
                        }
                    })
                    .sum::<f32>()
                    / g as f32;
                let got = full.kv_mass[0][p * kvh + kv];
                assert!(
                    (got - want).abs() < 1e-6,
                    "page {p} kv {kv}: {got} vs {want}"
                );
                mean += got / kvh as f32;
            }
            assert!((full.page_mass[0][p] - mean).abs() < 1e-6);
        }
        if selection.is_some() {
            assert_eq!(full.kv_mass[0][3 * kvh], 0.0, "unselected page has no mass");
        }
        // Page masses only: the same masses, no lse; observe takes it like the full result.
        scratch.set_page_results(PageResults::Masses);
        let masses = c
            .attend_with(&mut scratch, 0, &[s], Rows::F32(&q), selection)
            .unwrap();
        assert_eq!(masses.output, full.output);
        assert_eq!(masses.heads, full.heads);
        assert_eq!(masses.kv_mass, full.kv_mass);
        assert_eq!(masses.page_mass, full.page_mass);
        assert!(masses.page_lse.is_empty() && masses.has_page_results() && !masses.has_page_lse());
        for p in 0..n_pages {
            for kv in 0..kvh {
                assert_eq!(masses.attended(0, p, kv), full.attended(0, p, kv));
            }
        }
        scratch.set_page_results(PageResults::None);
        assert_eq!(scratch.page_results(), PageResults::None);
        let bare = c
            .attend_with(&mut scratch, 0, &[s], Rows::F32(&q), selection)
            .unwrap();
        assert_eq!(bare.output, full.output);
        assert_eq!(bare.heads, full.heads);
        assert!(bare.page_lse.is_empty() && bare.page_mass.is_empty() && bare.kv_mass.is_empty());
        assert!(!bare.has_page_results());
        assert!(matches!(c.observe(0, &[s], &bare), Err(Error::Stale(_))));
        scratch.set_page_results(PageResults::All);
        let again = c
            .attend_with(&mut scratch, 0, &[s], Rows::F32(&q), selection)
            .unwrap();
        assert_eq!(again, full);
        // Observing the masses-only result updates the page statistics as the full one does.
        c.observe(0, &[s], &again).unwrap();
        twin.observe(0, &[ts], &masses).unwrap();
        assert_eq!(c.page_meta(s, 0).unwrap(), twin.page_meta(ts, 0).unwrap());
    }
    let mut bare = Scratch::without_page_results();
    let a = c
        .attend_with(&mut bare, 0, &[s], Rows::F32(&q), None)
        .unwrap();
    assert!(!a.has_page_results());
}
