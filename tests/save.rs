//! Save / restore of a sequence: every tier and the archive round-trip bit for bit, a file of
//! another config or a damaged file is a typed error that restores nothing, and the save is
//! atomic.

mod common;
use common::Rng;
use kvtier::{Bits, CacheConfig, Error, HotDtype, KvCache, PageRef, SeqId, SpillConfig, Tier};
use std::path::PathBuf;

fn cfg() -> CacheConfig {
    CacheConfig::builder(2, 6, 2, 64)
        .hot_dtype(HotDtype::F16)
        .k_bits(Bits::B4)
        .v_bits(Bits::B2)
        .hot_window(64)
        .sink_tokens(4)
        .build()
        .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvtier-save-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A sequence of 400 tokens in both layers with pages in every tier: hot (sink, window), warm,
/// cold (quantised, and exact in the archive), evicted; a user pin and observed masses.
fn varied(c: &mut KvCache, rng: &mut Rng, q: &[f32]) -> SeqId {
    let s = c.add_sequence();
    let row = 2 * 64;
    for layer in 0..2 {
        c.append(s, layer, &rng.vec(400 * row, 1.0), &rng.vec(400 * row, 1.0))
            .unwrap();
        let p = |page| PageRef {
            seq: s,
            layer,
            page,
        };
        c.to_cold(p(2)).unwrap();
        c.to_cold(p(3)).unwrap();
        c.promote(p(4)).unwrap();
        c.to_cold(p(4)).unwrap(); // hot with an archive: its cold bytes are the archive copy
        c.evict(p(5)).unwrap();
        c.pin(p(6)).unwrap();
        let att = c.attend(layer, &[s], q).unwrap();
        c.observe(layer, &[s], &att).unwrap();
    }
    s
}

fn assert_same(a: &KvCache, sa: SeqId, b: &KvCache, sb: SeqId, q: &[f32]) {
    for layer in 0..2 {
        let (ta, tb) = (
            a.page_table(sa, layer).unwrap(),
            b.page_table(sb, layer).unwrap(),
        );
        assert_eq!(ta.len(), tb.len());
        for (x, y) in ta.pages().iter().zip(tb.pages()) {
            assert_eq!(
                (x.tier, x.n_tokens, x.format),
                (y.tier, y.n_tokens, y.format)
            );
        }
        let (ma, mb) = (
            a.page_meta(sa, layer).unwrap(),
            b.page_meta(sb, layer).unwrap(),
        );
        for (x, y) in ma.iter().zip(mb) {
            assert_eq!(
                (&x.mass, x.last_attended, x.pins),
                (&y.mass, y.last_attended, y.pins)
            );
            assert_eq!(x.archive.is_some(), y.archive.is_some());
            assert_eq!(x.bounds, y.bounds);
        }
        assert_eq!(
            a.observed_steps(sa, layer).unwrap(),
            b.observed_steps(sb, layer).unwrap()
        );
        let (x, y) = (
            a.attend(layer, &[sa], q).unwrap(),
            b.attend(layer, &[sb], q).unwrap(),
        );
        assert_eq!(x.output, y.output, "layer {layer}");
        assert_eq!(x.heads, y.heads);
        assert_eq!(
            a.read_tokens(sa, layer).unwrap(),
            b.read_tokens(sb, layer).unwrap()
        );
    }
}

#[test]
fn every_tier_and_the_archive_round_trip() {
    let dir = tmp("round");
    let mut rng = Rng(3);
    let q = rng.vec(6 * 64, 1.0);
    let mut a = KvCache::new(cfg()).unwrap();
    let sa = varied(&mut a, &mut rng, &q);
    let path = dir.join("seq.kvts");
    let saved = a.save_sequence(sa, &path, true).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.bytes);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut b = KvCache::new(cfg()).unwrap();
    let other = b.add_sequence();
    let sb = b.restore_sequence(&path).unwrap();
    assert_ne!(sb, other);
    assert_same(&a, sa, &b, sb, &q);
    let (ra, rb) = (a.memory_report(), b.memory_report());
    assert_eq!(
        (ra.hot_bytes, ra.warm_bytes, ra.cold_bytes, ra.archive_bytes),
        (rb.hot_bytes, rb.warm_bytes, rb.cold_bytes, rb.archive_bytes)
    );
    // The archive came along: promotion is exact in both.
    for c in [&mut a, &mut b] {
        let s = *c.sequences().collect::<Vec<_>>().last().unwrap();
        let p = PageRef {
            seq: s,
            layer: 1,
            page: 3,
        };
        assert_eq!(c.promote(p).unwrap(), kvtier::Restored::Exact);
    }
    assert_same(&a, sa, &b, sb, &q);

    // Without the archive: smaller, and the pages that relied on it come back dequantised.
    let lean = dir.join("lean.kvts");
    let s2 = a.save_sequence(sa, &lean, false).unwrap();
    assert!(s2.bytes < saved.bytes);
    let mut c = KvCache::new(cfg()).unwrap();
    let sc = c.restore_sequence(&lean).unwrap();
    assert!(c.memory_report().archive_bytes < a.memory_report().archive_bytes);
    let p = PageRef {
        seq: sc,
        layer: 0,
        page: 7,
    };
    assert_eq!(c.page(p).unwrap().tier, Tier::Warm);
    assert_eq!(c.promote(p).unwrap(), kvtier::Restored::Dequantised);
}

#[test]
fn a_spilling_cache_saves_and_restores_its_disk_pages() {
    let dir = tmp("spill");
    let mut rng = Rng(4);
    let q = rng.vec(6 * 64, 1.0);
    let spill = |d: &str| CacheConfig {
        spill: Some(SpillConfig::new(dir.join(d), 8 << 10)),
        ..cfg()
    };
    let mut a = KvCache::new(spill("a")).unwrap();
    let sa = varied(&mut a, &mut rng, &q);
    assert!(a.memory_report().disk_pages > 0);
    let path = dir.join("seq.kvts");
    a.save_sequence(sa, &path, true).unwrap();
    let mut b = KvCache::new(spill("b")).unwrap();
    let sb = b.restore_sequence(&path).unwrap();
    assert!(
        b.memory_report().disk_pages > 0,
        "restored past the RAM budget too"
    );
    assert_same(&a, sa, &b, sb, &q);
}

#[test]
fn another_config_or_a_damaged_file_restores_nothing() {
    let dir = tmp("bad");
    let mut rng = Rng(5);
    let q = rng.vec(6 * 64, 1.0);
    let mut a = KvCache::new(cfg()).unwrap();
    let sa = varied(&mut a, &mut rng, &q);
    let path = dir.join("seq.kvts");
    a.save_sequence(sa, &path, true).unwrap();
    let good = std::fs::read(&path).unwrap();

    let other = CacheConfig {
        page_size: 64,
        ..cfg()
    };
    let mut b = KvCache::new(other).unwrap();
    match b.restore_sequence(&path) {
        Err(Error::ConfigMismatch { field, .. }) => assert_eq!(field, "page_size"),
        r => panic!("{r:?}"),
    }
    let rot = CacheConfig {
        rotation: kvtier::Rotation::Keys,
        ..cfg()
    };
    assert!(matches!(
        KvCache::new(rot).unwrap().restore_sequence(&path),
        Err(Error::ConfigMismatch {
            field: "rotation",
            ..
        })
    ));
    // Other differences (windows, budgets, bits of future pages) are fine.
    let wider = CacheConfig {
        hot_window: 256,
        k_bits: Bits::B8,
        ..cfg()
    };
    let mut w = KvCache::new(wider).unwrap();
    let sw = w.restore_sequence(&path).unwrap();
    assert_eq!(
        w.attend(0, &[sw], &q).unwrap().output,
        a.attend(0, &[sa], &q).unwrap().output
    );

    // Fitted value ranges clip by up to a step: their pages restore into a fitted cache (and a
    // plain file does too), never into a plain one, which bounds value errors by half a step.
    let fit = CacheConfig {
        value_fit: true,
        ..cfg()
    };
    let mut f = KvCache::new(fit.clone()).unwrap();
    let mut rng = Rng(6);
    let sf = varied(&mut f, &mut rng, &q);
    let fpath = dir.join("fit.kvts");
    f.save_sequence(sf, &fpath, true).unwrap();
    match KvCache::new(cfg()).unwrap().restore_sequence(&fpath) {
        Err(Error::ConfigMismatch { field, .. }) => assert_eq!(field, "value_fit"),
        r => panic!("{r:?}"),
    }
    let mut f2 = KvCache::new(fit.clone()).unwrap();
    let sf2 = f2.restore_sequence(&fpath).unwrap();
    assert_same(&f, sf, &f2, sf2, &q);
    KvCache::new(fit).unwrap().restore_sequence(&path).unwrap();

    // Damage: a flipped byte anywhere, or a truncated file, is an error and leaves the cache
    // empty.
    let mut c = KvCache::new(cfg()).unwrap();
    let bad = dir.join("bad.kvts");
    let step = (good.len() / 301).max(1);
    for at in (0..good.len()).step_by(step).chain([good.len() - 1]) {
        let mut b = good.clone();
        b[at] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        let r = c.restore_sequence(&bad);
        assert!(
            matches!(
                r,
                Err(Error::CorruptFile { .. }
                    | Error::CorruptPage { .. }
                    | Error::ConfigMismatch { .. }
                    | Error::SequenceTooLong { .. })
            ),
            "byte {at}: {r:?}"
        );
    }
    for n in [
        0,
        3,
        10,
        100,
        good.len() / 2,
        good.len() - 4,
        good.len() - 1,
    ] {
        std::fs::write(&bad, &good[..n]).unwrap();
        let r = c.restore_sequence(&bad);
        assert!(
            matches!(r, Err(Error::CorruptFile { .. })),
            "{n} bytes: {r:?}"
        );
    }
    assert_eq!(c.sequences().count(), 0);
    let m = c.memory_report();
    assert_eq!(
        (m.hot_bytes, m.warm_bytes, m.cold_bytes, m.archive_bytes),
        (0, 0, 0, 0),
        "nothing leaked by the failed restores"
    );
    assert!(matches!(
        c.restore_sequence(&dir.join("missing")),
        Err(Error::Disk { .. })
    ));
    assert!(matches!(
        a.save_sequence(SeqId(999), &bad, true),
        Err(Error::UnknownSequence(999))
    ));
}

/// A writer that fails once `room` bytes are used (a full disk).
struct Full {
    room: usize,
}

impl std::io::Write for Full {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.room {
            return Err(std::io::ErrorKind::StorageFull.into());
        }
        self.room -= b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_save_is_a_disk_error_and_the_old_file_stays() {
    let dir = tmp("atomic");
    let mut rng = Rng(6);
    let q = rng.vec(6 * 64, 1.0);
    let mut a = KvCache::new(cfg()).unwrap();
    let sa = varied(&mut a, &mut rng, &q);
    assert!(matches!(
        a.write_sequence(sa, &mut Full { room: 5000 }, true),
        Err(Error::Disk { .. })
    ));
    // Saving over an existing file replaces it whole; into a missing directory fails cleanly.
    let path = dir.join("seq.kvts");
    std::fs::write(&path, b"old").unwrap();
    a.save_sequence(sa, &path, false).unwrap();
    let mut b = KvCache::new(cfg()).unwrap();
    b.restore_sequence(&path).unwrap();
    assert!(matches!(
        a.save_sequence(sa, &dir.join("no/such/dir/seq"), true),
        Err(Error::Disk { .. })
    ));
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left behind: {names:?}");
}
