//! Truncation: a rolled-back sequence is the sequence it would have been had the dropped tokens
//! never been appended, whatever tier its pages were in.

mod common;
use common::Rng;
use kvtier::{Bits, CacheConfig, Error, HotDtype, KvCache, PageRef, SeqId, Tier};

fn cfg(archive: bool) -> CacheConfig {
    CacheConfig::builder(2, 6, 2, 64)
        .hot_dtype(HotDtype::F16)
        .k_bits(Bits::B4)
        .v_bits(Bits::B2)
        .hot_window(64)
        .archive(archive)
        .build()
        .unwrap()
}

fn append(c: &mut KvCache, s: SeqId, k: &[f32], v: &[f32]) {
    for layer in 0..2 {
        c.append(s, layer, k, v).unwrap();
    }
}

#[test]
fn truncate_then_append_equals_never_appending() {
    let row = 128;
    let mut rng = Rng(4);
    let (k, v) = (rng.vec(400 * row, 1.0), rng.vec(400 * row, 1.0));
    let (k2, v2) = (rng.vec(90 * row, 1.0), rng.vec(90 * row, 1.0));
    let q = rng.vec(6 * 64, 1.0);
    for cut in [0usize, 1, 31, 32, 250, 399, 400, 401] {
        let mut a = KvCache::new(cfg(true)).unwrap();
        let sa = a.add_sequence();
        append(&mut a, sa, &k, &v);
        // Some pages to cold first: the rollback must reach every tier.
        for page in [2usize, 4, 6] {
            let p = PageRef {
                seq: sa,
                layer: 1,
                page,
            };
            if a.page(p).unwrap().tier == Tier::Warm {
                a.to_cold(p).unwrap();
            }
        }
        let t = a.truncate(sa, cut).unwrap();
        let kept = cut.min(400);
        assert_eq!(t.tokens, 2 * (400 - kept), "cut {cut}");
        assert_eq!(
            t.restored_dequantised, 0,
            "the archive makes every restore exact"
        );
        append(&mut a, sa, &k2, &v2);

        let mut b = KvCache::new(cfg(true)).unwrap();
        let sb = b.add_sequence();
        append(&mut b, sb, &k[..kept * row], &v[..kept * row]);
        append(&mut b, sb, &k2, &v2);
        for layer in 0..2 {
            assert_eq!(a.seq_len(sa, layer).unwrap(), kept + 90);
            let (ka, va) = a.read_tokens(sa, layer).unwrap();
            let (kb, vb) = b.read_tokens(sb, layer).unwrap();
            // Layer 0 went through the same tiering; layer 1 had pages moved to cold, which
            // attention reads the same way.
            assert_eq!(ka, kb, "cut {cut} layer {layer}: keys");
            assert_eq!(va, vb, "cut {cut} layer {layer}: values");
            let (oa, ob) = (
                a.attend(layer, &[sa], &q).unwrap(),
                b.attend(layer, &[sb], &q).unwrap(),
            );
            if layer == 0 {
                assert_eq!(oa.output, ob.output, "cut {cut}: attention");
            } else {
                // Cold pages are attended apart and merged, so the sums run in another order.
                let d = oa.output.iter().zip(&ob.output).map(|(x, y)| (x - y).abs());
                assert!(
                    d.fold(0f32, f32::max) < 1e-5,
                    "cut {cut} layer 1: attention"
                );
            }
        }
        if cut == 0 {
            let r = a.memory_report();
            assert_eq!(r.tokens, 2 * 90);
        }
    }
}

#[test]
fn without_an_archive_the_boundary_page_is_dequantised() {
    let mut c = KvCache::new(cfg(false)).unwrap();
    let s = c.add_sequence();
    let mut rng = Rng(9);
    append(
        &mut c,
        s,
        &rng.vec(300 * 128, 1.0),
        &rng.vec(300 * 128, 1.0),
    );
    let (before, _) = c.read_tokens(s, 0).unwrap();
    let t = c.truncate(s, 100).unwrap();
    assert_eq!(t.restored_dequantised, 2, "one boundary page per layer");
    assert_eq!(
        c.page(PageRef {
            seq: s,
            layer: 0,
            page: 3
        })
        .unwrap()
        .tier,
        Tier::Hot
    );
    // The kept tokens are what the cache held: the boundary page's dequantised values, rounded
    // to the f16 hot page.
    let (after, _) = c.read_tokens(s, 0).unwrap();
    assert_eq!(after.len(), 100 * 128);
    for (i, (a, b)) in after.iter().zip(&before[..100 * 128]).enumerate() {
        let want = if i >= 96 * 128 {
            half::f16::from_f32(*b).to_f32()
        } else {
            *b
        };
        assert_eq!(*a, want, "element {i}");
    }
}

#[test]
fn errors_change_nothing() {
    let mut c = KvCache::new(cfg(true)).unwrap();
    let s = c.add_sequence();
    let mut rng = Rng(2);
    append(
        &mut c,
        s,
        &rng.vec(300 * 128, 1.0),
        &rng.vec(300 * 128, 1.0),
    );
    c.evict(PageRef {
        seq: s,
        layer: 1,
        page: 3,
    })
    .unwrap();
    let report = c.memory_report();
    match c.truncate(s, 100) {
        Err(Error::InvalidMove { reason, .. }) => assert!(reason.contains("evicted"), "{reason}"),
        other => panic!("expected InvalidMove, got {other:?}"),
    }
    assert_eq!(c.memory_report(), report);
    assert_eq!(c.seq_len(s, 0).unwrap(), 300);
    // Truncating to the evicted page's start is fine.
    c.truncate(s, 96).unwrap();
    assert_eq!(c.seq_len(s, 1).unwrap(), 96);
    assert!(matches!(
        c.truncate(SeqId(999), 0),
        Err(Error::UnknownSequence(999))
    ));
    // Longer than the sequence: nothing to drop.
    assert_eq!(c.truncate(s, 10_000).unwrap().tokens, 0);
}
