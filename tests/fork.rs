//! Prefix sharing: a forked sequence shares its source's full pages (no bytes copied, counted
//! once), each side then behaves exactly as a sequence that was built alone, moves on a shared
//! page move it for every sharer, and copy-on-write keeps a truncation private. Beam-search
//! reorder is fork underneath.

mod common;
use common::Rng;
use kvtier::{
    Bits, CacheConfig, Error, HotDtype, KvCache, Move, PageRef, SeqId, SpillConfig, Tier,
};

const ROW: usize = 2 * 64;

fn cfg() -> CacheConfig {
    CacheConfig::builder(2, 6, 2, 64)
        .hot_dtype(HotDtype::F16)
        .k_bits(Bits::B4)
        .v_bits(Bits::B2)
        .hot_window(64)
        .build()
        .unwrap()
}

fn append(c: &mut KvCache, s: SeqId, k: &[f32], v: &[f32]) {
    for layer in 0..2 {
        c.append(s, layer, k, v).unwrap();
    }
}

/// A cache with one sequence built from `parts` appended in order.
fn alone(cfg: &CacheConfig, parts: &[(&[f32], &[f32])]) -> (KvCache, SeqId) {
    let mut c = KvCache::new(cfg.clone()).unwrap();
    let s = c.add_sequence();
    for (k, v) in parts {
        append(&mut c, s, k, v);
    }
    (c, s)
}

fn same_attention(a: &KvCache, sa: SeqId, b: &KvCache, sb: SeqId, q: &[f32]) {
    for layer in 0..2 {
        let (x, y) = (
            a.attend(layer, &[sa], q).unwrap(),
            b.attend(layer, &[sb], q).unwrap(),
        );
        assert_eq!(x.output, y.output, "layer {layer}");
        assert_eq!(x.heads, y.heads, "layer {layer}");
    }
}

#[test]
fn fork_shares_full_pages_and_each_side_is_its_own_sequence() {
    let mut rng = Rng(5);
    // 300 tokens: 9 full pages and a partial one per layer.
    let (k, v) = (rng.vec(300 * ROW, 1.0), rng.vec(300 * ROW, 1.0));
    let (ka, va) = (rng.vec(150 * ROW, 1.0), rng.vec(150 * ROW, 1.0));
    let (kb, vb) = (rng.vec(70 * ROW, 1.0), rng.vec(70 * ROW, 1.0));
    let q = rng.vec(6 * 64, 1.0);
    let (mut c, a) = alone(&cfg(), &[(&k, &v)]);
    let before = c.memory_report();
    let b = c.fork(a).unwrap();
    let after = c.memory_report();
    assert_eq!(after.shared_pages, 2 * 9, "every full page of both layers");
    assert_eq!(after.warm_bytes, before.warm_bytes, "no warm byte copied");
    let hot_page = (before.hot_bytes) / before.hot_pages;
    assert_eq!(
        after.hot_bytes,
        before.hot_bytes + 2 * hot_page,
        "only the two partial pages are copied"
    );
    assert_eq!(
        (after.hot_pages, after.warm_pages),
        (before.hot_pages + 2, before.warm_pages),
        "shared pages are counted once"
    );
    assert_eq!(after.tokens, 2 * before.tokens, "tokens are per sequence");
    assert_eq!(c.seq_len(b, 0).unwrap(), 300);

    // Each side grows on its own (the default policy demotes shared pages for both) and equals a
    // sequence built alone from the same tokens.
    append(&mut c, a, &ka, &va);
    append(&mut c, b, &kb, &vb);
    let (ra, sa) = alone(&cfg(), &[(&k, &v), (&ka, &va)]);
    let (rb, sb) = alone(&cfg(), &[(&k, &v), (&kb, &vb)]);
    same_attention(&c, a, &ra, sa, &q);
    same_attention(&c, b, &rb, sb, &q);
    assert_eq!(c.read_tokens(b, 1).unwrap(), rb.read_tokens(sb, 1).unwrap());

    // The source goes: the fork keeps every page it shared.
    c.remove_sequence(a).unwrap();
    same_attention(&c, b, &rb, sb, &q);
    let r = c.memory_report();
    assert_eq!(r.shared_pages, 0);
    let alone_report = rb.memory_report();
    assert_eq!(
        (r.hot_bytes, r.warm_bytes, r.archive_bytes),
        (
            alone_report.hot_bytes,
            alone_report.warm_bytes,
            alone_report.archive_bytes
        ),
        "nothing leaked, nothing freed twice"
    );
    c.remove_sequence(b).unwrap();
    let r = c.memory_report();
    assert_eq!((r.hot_bytes, r.warm_bytes, r.archive_bytes), (0, 0, 0));
    assert!(matches!(c.fork(a), Err(Error::UnknownSequence(_))));
}

#[test]
fn moves_on_a_shared_page_move_it_for_every_sharer() {
    let mut rng = Rng(6);
    let (k, v) = (rng.vec(256 * ROW, 1.0), rng.vec(256 * ROW, 1.0));
    let q = rng.vec(6 * 64, 1.0);
    let cfg = CacheConfig {
        hot_window: 256,
        ..cfg()
    };
    let (mut c, a) = alone(&cfg, &[(&k, &v)]);
    let b = c.fork(a).unwrap();
    let pa = |page| PageRef {
        seq: a,
        layer: 0,
        page,
    };
    let pb = |page| PageRef {
        seq: b,
        layer: 0,
        page,
    };
    // Demote through one sequence: one warm page, named by both.
    let warm0 = c.memory_report().warm_bytes;
    c.demote(pa(2), cfg.warm_format(0)).unwrap();
    assert_eq!(c.page(pb(2)).unwrap().tier, Tier::Warm);
    assert_eq!(c.page(pa(2)).unwrap(), c.page(pb(2)).unwrap());
    let one_warm = c.memory_report().warm_bytes - warm0;
    c.apply(&[Move::ToCold(pb(2)), Move::ToCold(pb(3))])
        .unwrap();
    assert_eq!(c.page(pa(3)).unwrap().tier, Tier::Cold);
    assert!(c.memory_report().warm_bytes < one_warm + warm0);
    c.promote(pa(3)).unwrap();
    assert_eq!(c.page(pb(3)).unwrap().tier, Tier::Hot);
    // A pin of either sharer holds the page for both.
    c.pin(pa(4)).unwrap();
    assert!(matches!(c.to_cold(pb(4)), Err(Error::InvalidMove { .. })));
    c.unpin(pa(4)).unwrap();
    c.to_cold(pb(4)).unwrap();
    // Evict drops only the caller's reference.
    c.evict(pb(5)).unwrap();
    assert_eq!(c.page(pa(5)).unwrap().tier, Tier::Hot);
    assert_eq!(c.page(pb(5)).unwrap().tier, Tier::Evicted);
    // Both still attend as one sequence with the same moves would.
    let (mut r, s) = alone(&cfg, &[(&k, &v)]);
    let ps = |page| PageRef {
        seq: s,
        layer: 0,
        page,
    };
    r.demote(ps(2), cfg.warm_format(0)).unwrap();
    r.apply(&[
        Move::ToCold(ps(2)),
        Move::ToCold(ps(3)),
        Move::ToCold(ps(4)),
    ])
    .unwrap();
    r.promote(ps(3)).unwrap();
    let x = r.attend(0, &[s], &q).unwrap();
    assert_eq!(c.attend(0, &[a], &q).unwrap().output, x.output);
    r.evict(ps(5)).unwrap();
    let x = r.attend(0, &[s], &q).unwrap();
    assert_eq!(c.attend(0, &[b], &q).unwrap().output, x.output);
    // Freed with the last reference only.
    c.remove_sequence(a).unwrap();
    c.remove_sequence(b).unwrap();
    let m = c.memory_report();
    assert_eq!(
        (m.hot_bytes, m.warm_bytes, m.cold_bytes, m.archive_bytes),
        (0, 0, 0, 0)
    );
}

#[test]
fn truncating_a_shared_page_copies_it_first() {
    let mut rng = Rng(7);
    let (k, v) = (rng.vec(320 * ROW, 1.0), rng.vec(320 * ROW, 1.0));
    let (k2, v2) = (rng.vec(40 * ROW, 1.0), rng.vec(40 * ROW, 1.0));
    let q = rng.vec(6 * 64, 1.0);
    let (mut c, a) = alone(&cfg(), &[(&k, &v)]);
    let b = c.fork(a).unwrap();
    let want_a: Vec<_> = (0..2)
        .map(|l| c.attend(l, &[a], &q).unwrap().output)
        .collect();
    // Cut b inside page 9 (hot, shared) and page 4 (warm, shared), then grow it: b is the
    // sequence a private one truncated the same way would be.
    for cut in [300usize, 140] {
        let t = c.truncate(b, cut).unwrap();
        assert_eq!(
            t.restored_dequantised, 0,
            "the archive makes the copy exact"
        );
        append(&mut c, b, &k2, &v2);
        let (mut r, s) = alone(&cfg(), &[(&k, &v)]);
        r.truncate(s, cut).unwrap();
        append(&mut r, s, &k2, &v2);
        same_attention(&c, b, &r, s, &q);
        assert_eq!(c.read_tokens(b, 0).unwrap(), r.read_tokens(s, 0).unwrap());
        c.truncate(b, cut).unwrap();
    }
    for (l, w) in want_a.iter().enumerate() {
        assert_eq!(&c.attend(l, &[a], &q).unwrap().output, w, "a is untouched");
    }
}

#[test]
fn reorder_is_beam_search_over_shared_pages() {
    let mut rng = Rng(8);
    let (k, v) = (rng.vec(200 * ROW, 1.0), rng.vec(200 * ROW, 1.0));
    let ext: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|_| (rng.vec(10 * ROW, 1.0), rng.vec(10 * ROW, 1.0)))
        .collect();
    let q = rng.vec(6 * 64, 1.0);
    let mut c = KvCache::new(cfg()).unwrap();
    let root = c.add_sequence();
    append(&mut c, root, &k, &v);
    let beams = [root, c.fork(root).unwrap(), c.fork(root).unwrap()];
    for (s, (ke, ve)) in beams.iter().zip(&ext) {
        append(&mut c, *s, ke, ve);
    }
    let before: Vec<_> = beams
        .iter()
        .map(|s| c.attend(1, &[*s], &q).unwrap().output)
        .collect();
    // Beam 1 is dropped; beam 0 spawns two.
    c.reorder(&beams, &[0, 0, 2]).unwrap();
    for (i, want) in [0usize, 0, 2].iter().enumerate() {
        assert_eq!(
            c.attend(1, &[beams[i]], &q).unwrap().output,
            before[*want],
            "beam {i}"
        );
    }
    // Validation: nothing changes on bad input.
    assert!(c.reorder(&beams, &[0, 1]).is_err());
    assert!(c.reorder(&beams, &[0, 1, 3]).is_err());
    assert!(matches!(
        c.reorder(&[beams[0], beams[0]], &[0, 1]),
        Err(Error::DuplicateSequence(_))
    ));
    assert!(matches!(
        c.reorder(&[SeqId(999)], &[0]),
        Err(Error::UnknownSequence(999))
    ));
    for s in beams {
        c.remove_sequence(s).unwrap();
    }
    let m = c.memory_report();
    assert_eq!((m.hot_bytes, m.warm_bytes, m.archive_bytes), (0, 0, 0));
}

#[test]
fn fork_of_a_spilling_cache_frees_records_with_the_last_reference() {
    let dir = std::env::temp_dir().join(format!("kvtier-fork-spill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = CacheConfig {
        spill: Some(SpillConfig::new(&dir, 16 << 10)),
        ..cfg()
    };
    let mut rng = Rng(9);
    let (k, v) = (rng.vec(400 * ROW, 1.0), rng.vec(400 * ROW, 1.0));
    let q = rng.vec(6 * 64, 1.0);
    let (mut c, a) = alone(&cfg, &[(&k, &v)]);
    for page in 0..10 {
        let p = PageRef {
            seq: a,
            layer: 0,
            page,
        };
        if c.page(p).unwrap().tier == Tier::Warm {
            c.to_cold(p).unwrap();
        }
    }
    let disk = c.memory_report().disk_pages;
    assert!(disk > 0);
    let b = c.fork(a).unwrap();
    assert_eq!(c.memory_report().disk_pages, disk, "no record copied");
    let want = c.attend(0, &[a], &q).unwrap().output;
    c.remove_sequence(a).unwrap();
    assert_eq!(c.memory_report().disk_pages, disk, "b still names them");
    assert_eq!(c.attend(0, &[b], &q).unwrap().output, want);
    c.remove_sequence(b).unwrap();
    assert_eq!(c.memory_report().disk_pages, 0);
    drop(c);
    assert!(!dir.exists());
}
