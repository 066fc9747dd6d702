//! The disk tier: host pages spilled past a RAM budget, read back for attention and promotion,
//! checked on every read, and every fault of the issue injected: disk full / write error, a file
//! removed or truncated under the cache, a read error, a corrupted byte, a torn write.

mod common;
use common::Rng;
use kvtier::cold::{disk, Faults};
use kvtier::{
    Bits, CacheConfig, Error, HotDtype, KvCache, PageBytes, PageRef, SeqId, SpillConfig, Tier,
    WarmFormat,
};
use std::path::PathBuf;

const LEN: usize = 600;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvtier-disk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(spill: Option<SpillConfig>) -> CacheConfig {
    CacheConfig::builder(1, 4, 2, 64)
        .hot_dtype(HotDtype::F16)
        .k_bits(Bits::B4)
        .v_bits(Bits::B2)
        .hot_window(32)
        .spill(spill)
        .build()
        .unwrap()
}

/// A cache with two sequences of LEN tokens whose pages outside the hot window are moved to the
/// cold tier (warm pages: their quantised copy; the archive holds every demoted page exactly).
fn filled(spill: Option<SpillConfig>) -> (KvCache, Vec<SeqId>, Vec<f32>) {
    let mut c = KvCache::new(config(spill)).unwrap();
    let mut rng = Rng(11);
    let mut seqs = Vec::new();
    for _ in 0..2 {
        let s = c.add_sequence();
        c.append(s, 0, &rng.vec(LEN * 128, 1.0), &rng.vec(LEN * 128, 1.0))
            .unwrap();
        let n = c.page_table(s, 0).unwrap().pages().len();
        for page in 0..n {
            let p = PageRef {
                seq: s,
                layer: 0,
                page,
            };
            if c.page(p).unwrap().tier == Tier::Warm {
                c.to_cold(p).unwrap();
            }
        }
        seqs.push(s);
    }
    let q = rng.vec(2 * 4 * 64, 1.0);
    (c, seqs, q)
}

fn spill(dir: &std::path::Path, ram: usize) -> Option<SpillConfig> {
    Some(SpillConfig::new(dir, ram))
}

#[test]
fn spilled_pages_attend_and_promote_exactly() {
    let dir = tmpdir("exact");
    let (ram, seqs, q) = filled(None);
    let (mut c, _, _) = filled(spill(&dir, 16 << 10));
    let r = c.memory_report();
    assert!(r.disk_pages > 20 && r.disk_bytes > 0, "{r:?}");
    assert!(r.cold_bytes + r.archive_bytes <= 16 << 10, "{r:?}");
    assert!(c.counters().spills as usize >= r.disk_pages);
    // Attention over spilled cold pages is bit-identical to the all-in-RAM cache.
    let (a, b) = (
        ram.attend(0, &seqs, &q).unwrap(),
        c.attend(0, &seqs, &q).unwrap(),
    );
    assert_eq!(a.output, b.output);
    assert_eq!(a.heads, b.heads);
    assert!(c.disk_reads().0 > 0);
    assert_eq!(
        ram.read_tokens(seqs[0], 0).unwrap(),
        c.read_tokens(seqs[0], 0).unwrap()
    );
    // Promotion restores spilled archive pages bit for bit, and frees their records.
    let before = c.memory_report().disk_pages;
    for page in 0..4 {
        let p = PageRef {
            seq: seqs[1],
            layer: 0,
            page,
        };
        if c.page(p).unwrap().tier == Tier::Cold {
            c.promote(p).unwrap();
        }
    }
    assert!(c.memory_report().disk_pages < before);
    let mut exact = KvCache::new(config(None).clone()).unwrap();
    let mut rng = Rng(11);
    let _ = rng.vec(LEN * 128, 1.0);
    let _ = rng.vec(LEN * 128, 1.0);
    let s = exact.add_sequence();
    let (k, v) = (rng.vec(LEN * 128, 1.0), rng.vec(LEN * 128, 1.0));
    exact.append(s, 0, &k, &v).unwrap();
    let (ke, _) = exact.read_tokens(s, 0).unwrap();
    let (kc, _) = c.read_tokens(seqs[1], 0).unwrap();
    let _ = ke;
    // The first pages (promoted or sinks) are exact again: their keys equal the f16 input.
    for i in 0..4 * 32 * 128 {
        assert_eq!(kc[i], half::f16::from_f32(k[i]).to_f32(), "element {i}");
    }
    // Files: in the directory only, 0600, removed with the cache (and the directory it made).
    let files = c.spill_files();
    assert!(!files.is_empty());
    for f in &files {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(f.parent().unwrap(), dir.as_path());
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    drop(c);
    assert!(files.iter().all(|f| !f.exists()));
    assert!(!dir.exists(), "the directory the cache created is removed");
}

#[test]
fn corrupted_truncated_removed_files_and_read_errors() {
    let dir = tmpdir("faults");
    let (ram, seqs, q) = filled(None);
    let (mut c, _, _) = filled(spill(&dir, 8 << 10));
    let want = ram.attend(0, &seqs, &q).unwrap();
    let cold_files: Vec<PathBuf> = c
        .spill_files()
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("-cold-"))
        .collect();
    assert!(!cold_files.is_empty());

    // A removed file stays readable through the open handle: nothing changes.
    std::fs::rename(&cold_files[0], dir.join("moved-away")).unwrap();
    assert_eq!(c.attend(0, &seqs, &q).unwrap().output, want.output);
    std::fs::rename(dir.join("moved-away"), &cold_files[0]).unwrap();

    // A read error is a typed disk error; clearing it restores service.
    c.set_spill_faults(Faults {
        read: Some(std::io::ErrorKind::Other),
        ..Faults::default()
    });
    assert!(matches!(c.attend(0, &seqs, &q), Err(Error::Disk { .. })));
    c.set_spill_faults(Faults::default());
    assert_eq!(c.attend(0, &seqs, &q).unwrap().output, want.output);

    // One corrupted byte: that sequence's attention fails naming a page, never wrong numbers;
    // a sequence with no page in the damaged region still attends.
    let f = &cold_files[0];
    let mut bytes = std::fs::read(f).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x5a;
    std::fs::write(f, &bytes).unwrap();
    let errs: Vec<_> = seqs
        .iter()
        .map(|s| c.attend(0, &[*s], &q[..4 * 64]))
        .collect();
    assert!(errs
        .iter()
        .any(|r| matches!(r, Err(Error::CorruptPage { layer: 0, .. }))));
    let msg = errs
        .iter()
        .find_map(|r| r.as_ref().err())
        .unwrap()
        .to_string();
    assert!(msg.contains("checksum"), "{msg}");
    bytes[at] ^= 0x5a;
    std::fs::write(f, &bytes).unwrap();
    assert_eq!(c.attend(0, &seqs, &q).unwrap().output, want.output);

    // Truncated under the cache: a typed error that says so.
    let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.set_len(bytes.len() as u64 / 2).unwrap();
    let e = seqs
        .iter()
        .find_map(|s| c.attend(0, &[*s], &q[..4 * 64]).err())
        .expect("a page of the truncated half is read");
    assert!(
        matches!(e, Error::CorruptPage { .. }) && e.to_string().contains("truncated"),
        "{e}"
    );
}

#[test]
fn disk_full_and_torn_writes_lose_nothing() {
    let dir = tmpdir("full");
    let (mut c, seqs, q) = filled(spill(&dir, 8 << 10));
    let before = c.attend(0, &seqs, &q).unwrap();
    let s = seqs[0];
    // Disk full: with host RAM over the budget the move is refused, the page stays on the device.
    c.set_spill_faults(Faults {
        write: Some(std::io::ErrorKind::StorageFull),
        ..Faults::default()
    });
    let n = c.page_table(s, 0).unwrap().pages().len();
    let tiers: Vec<Tier> = (0..n)
        .map(|page| {
            c.page(PageRef {
                seq: s,
                layer: 0,
                page,
            })
            .unwrap()
            .tier
        })
        .collect();
    // The newest full page: hot (inside the window), not a sink, not being written.
    let hot = PageRef {
        seq: s,
        layer: 0,
        page: n - 2,
    };
    assert_eq!(tiers[n - 2], Tier::Hot, "{tiers:?}");
    assert_eq!(c.page(hot).unwrap().tier, Tier::Hot);
    match c.to_cold(hot) {
        Err(Error::Disk { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull)
        }
        other => panic!("expected a disk error, got {other:?}"),
    }
    assert!(c.counters().spill_failures >= 1);
    assert_eq!(c.attend(0, &seqs, &q).unwrap().output, before.output);
    // Appends still work: demotions that cannot archive leave pages hot (counted), nothing lost.
    let mut rng = Rng(3);
    c.append(s, 0, &rng.vec(64 * 128, 1.0), &rng.vec(64 * 128, 1.0))
        .unwrap();
    assert!(c.counters().demotions_skipped > 0);
    c.set_spill_faults(Faults::default());
    c.to_cold(hot).unwrap();

    // A torn write (a crash in the middle of it) is detected when the page is read back.
    c.set_spill_faults(Faults {
        torn_after: Some(20),
        ..Faults::default()
    });
    let n = c.page_table(s, 0).unwrap().pages().len();
    let mut moved = 0;
    for page in 0..n {
        let p = PageRef {
            seq: s,
            layer: 0,
            page,
        };
        if c.page(p).unwrap().tier == Tier::Hot && c.to_cold(p).is_ok() {
            moved += 1;
        }
    }
    assert!(moved > 0);
    c.set_spill_faults(Faults::default());
    // Every page is read back (attention reads the cold ones, promotion the archive copies):
    // the torn records fail their check, and nothing else does.
    let mut errors = vec![c.attend(0, &[s], &q[..4 * 64]).err()];
    for page in 0..n {
        let p = PageRef {
            seq: s,
            layer: 0,
            page,
        };
        if c.page(p).unwrap().tier != Tier::Hot {
            errors.push(c.promote(p).err());
        }
    }
    let errors: Vec<Error> = errors.into_iter().flatten().collect();
    assert!(!errors.is_empty());
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, Error::CorruptPage { .. })),
        "{errors:?}"
    );
    // The other sequence is untouched.
    c.attend(0, &[seqs[1]], &q[4 * 64..]).unwrap();
}

#[test]
fn disk_budget_is_enforced() {
    let dir = tmpdir("budget");
    let sp = SpillConfig {
        disk_bytes: Some(40 << 10),
        prefetch: false,
        ..SpillConfig::new(&dir, 8 << 10)
    };
    // No archive: only the cold copies spill, so the disk budget binds at to_cold.
    let mut cfg = config(Some(sp));
    cfg.archive = false;
    let mut c = KvCache::new(cfg).unwrap();
    let mut rng = Rng(5);
    let s = c.add_sequence();
    c.append(s, 0, &rng.vec(LEN * 128, 1.0), &rng.vec(LEN * 128, 1.0))
        .unwrap();
    let n = c.page_table(s, 0).unwrap().pages().len();
    let mut refused = 0;
    for page in 0..n {
        let p = PageRef {
            seq: s,
            layer: 0,
            page,
        };
        if c.page(p).unwrap().tier == Tier::Warm && c.to_cold(p).is_err() {
            refused += 1;
            assert_eq!(c.page(p).unwrap().tier, Tier::Warm);
        }
    }
    assert!(refused > 0);
    assert!(c.memory_report().disk_bytes <= 40 << 10);
}

#[test]
fn record_format_is_pinned() {
    // A golden record: change the format and this test (and FORMAT_VERSION) must change.
    let page = PageBytes {
        tier: Tier::Warm,
        format: WarmFormat {
            k_bits: Bits::B4,
            v_bits: Bits::B2,
        },
        n_tokens: 32,
        data: (0u8..16).collect(),
    };
    let rec = disk::encode(&page, 0x0102_0304_0506_0708, 9, 3);
    let hex: String = rec.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        include_str!("golden/page-record-v1.hex").trim(),
        "the on-disk page record changed"
    );
    assert_eq!(disk::FORMAT_VERSION, 1);
    let back = disk::decode(&rec, 0x0102_0304_0506_0708, 9, 3).unwrap();
    assert_eq!(back.data, page.data);
}

#[test]
fn bad_spill_directory_is_a_typed_error() {
    let file = std::env::temp_dir().join(format!("kvtier-disk-notadir-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let r = KvCache::new(config(spill(&file, 1024)));
    assert!(matches!(r, Err(Error::Disk { .. })), "{:?}", r.err());
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn prefetch_reads_the_next_layer_ahead() {
    let dir = tmpdir("prefetch");
    let mk = |spill: Option<SpillConfig>| {
        let cfg = CacheConfig::builder(3, 4, 2, 64)
            .hot_window(32)
            .spill(spill)
            .build()
            .unwrap();
        let mut c = KvCache::new(cfg).unwrap();
        let mut rng = Rng(21);
        let s = c.add_sequence();
        for layer in 0..3 {
            c.append(s, layer, &rng.vec(LEN * 128, 1.0), &rng.vec(LEN * 128, 1.0))
                .unwrap();
            let n = c.page_table(s, layer).unwrap().pages().len();
            for page in 0..n {
                let p = PageRef {
                    seq: s,
                    layer,
                    page,
                };
                if c.page(p).unwrap().tier == Tier::Warm {
                    c.to_cold(p).unwrap();
                }
            }
        }
        (c, s, rng.vec(4 * 64, 1.0))
    };
    let (ram, s, q) = mk(None);
    let (c, _, _) = mk(spill(&dir, 8 << 10));
    assert_eq!(c.disk_stats(), kvtier::cold::DiskStats::default());
    for layer in 0..3 {
        // Layer l's attention queues layer l + 1's spilled pages; layer 0's are read now.
        let (a, b) = (
            ram.attend(layer, &[s], &q).unwrap(),
            c.attend(layer, &[s], &q).unwrap(),
        );
        assert_eq!(a.output, b.output, "layer {layer}");
        // Each step says what it read and how: layer 0 synchronously, later layers mostly
        // from the read-ahead buffer.
        let d = b.disk;
        assert!(d.pages > 0, "layer {layer}: {d:?}");
        assert_eq!(d.pages, d.hits + d.waited + d.sync_reads, "{d:?}");
        if layer == 0 {
            assert_eq!(d.sync_reads, d.pages, "{d:?}");
            assert!(d.wait_ns > 0, "{d:?}");
        } else if layer == 1 {
            // (Layer 2's read-aheads mostly find the 8 KiB buffer still full of layer 1's.)
            assert!(d.hits + d.waited > 0, "layer {layer}: {d:?}");
        }
    }
    let st = c.disk_stats();
    assert!(st.prefetch_requested > 0 && st.prefetched > 0, "{st:?}");
    assert!(st.hits + st.waited > 0, "read-aheads were used: {st:?}");
    assert!(st.misses > 0, "layer 0 was read synchronously: {st:?}");
    // Policy hints: a batch of promotions queues its archive reads before it runs, and the pages
    // come back exact.
    let before = c.disk_stats().prefetch_requested;
    let n = c.page_table(s, 2).unwrap().pages().len();
    let moves: Vec<kvtier::Move> = (1..n)
        .map(|page| PageRef {
            seq: s,
            layer: 2,
            page,
        })
        .filter(|p| c.page(*p).unwrap().tier == Tier::Cold)
        .take(6)
        .map(kvtier::Move::Promote)
        .collect();
    assert_eq!(moves.len(), 6);
    let mut c = c;
    c.apply(&moves).unwrap();
    assert!(c.disk_stats().prefetch_requested > before);
    for m in &moves {
        assert_eq!(c.page(m.page()).unwrap().tier, Tier::Hot);
    }
    // Explicit requests (an eliminator's survivors), then the page goes: its copy is dropped.
    let mut sel = kvtier::PageSelection::none(1, 2);
    sel.set(0, 0, [1u32]).unwrap();
    assert!(c.prefetch(0, &[s], Some(&sel)).unwrap() <= 1);
    c.remove_sequence(s).unwrap();
    assert!(c.prefetch(0, &[s], None).is_err());
    assert!(c.spill_files().len() <= 2, "emptied segments are deleted");
}

/// The 128K check: a SmolLM2-shaped layer of 131072 tokens, its pages outside the hot
/// window moved to the cold tier, 10% of the host pages in RAM: attention equals the all-in-RAM
/// cache bit for bit.
#[test]
fn attention_at_128k_tokens_with_90_percent_on_disk_is_identical() {
    let dir = tmpdir("128k");
    let tokens = 131072;
    let build = |spill: Option<SpillConfig>| {
        let cfg = CacheConfig::builder(1, 9, 3, 64)
            .spill(spill)
            .max_seq_len(tokens)
            .build()
            .unwrap();
        let mut c = KvCache::new(cfg).unwrap();
        let s = c.add_sequence();
        let mut rng = Rng(128);
        for _ in 0..tokens / 8192 {
            c.append(s, 0, &rng.vec(8192 * 192, 1.0), &rng.vec(8192 * 192, 1.0))
                .unwrap();
        }
        let n = c.page_table(s, 0).unwrap().pages().len();
        for page in 0..n {
            let p = PageRef {
                seq: s,
                layer: 0,
                page,
            };
            if c.page(p).unwrap().tier == Tier::Warm {
                c.to_cold(p).unwrap();
            }
        }
        (c, s)
    };
    let (ram, s) = build(None);
    let r = ram.memory_report();
    let host = r.cold_bytes + r.archive_bytes;
    let (c, _) = build(spill(&dir, host / 10));
    let rc = c.memory_report();
    assert!(rc.cold_bytes + rc.archive_bytes <= host / 10);
    assert!(
        rc.disk_bytes * 10 >= host * 9,
        "90% of the host pages' bytes are on disk: {rc:?}"
    );
    let q = Rng(7).vec(9 * 64, 1.0);
    let (a, b) = (
        ram.attend(0, &[s], &q).unwrap(),
        c.attend(0, &[s], &q).unwrap(),
    );
    assert_eq!(a.output, b.output);
    assert_eq!(a.heads, b.heads);
    assert_eq!(a.page_lse, b.page_lse);
}

/// Freed records leave dead space; compaction (explicit, and automatic once more than half the
/// file bytes are dead) gives it back, and every page still attends bit for bit as in RAM.
#[test]
fn compaction_reclaims_dead_space_and_keeps_attention_identical() {
    let dir = tmpdir("compact");
    let sp = SpillConfig {
        segment_bytes: 64 << 10,
        ..SpillConfig::new(&dir, 8 << 10)
    };
    let (mut ram, seqs, q) = filled(None);
    let (mut c, _, _) = filled(Some(sp));
    let promote_every = |c: &mut KvCache, seq: SeqId, keep: usize| {
        let n = c.page_table(seq, 0).unwrap().pages().len();
        let moves: Vec<kvtier::Move> = (0..n)
            .filter(|page| page % keep != 0)
            .map(|page| PageRef {
                seq,
                layer: 0,
                page,
            })
            .filter(|p| c.page(*p).unwrap().tier == Tier::Cold)
            .map(kvtier::Move::Promote)
            .collect();
        c.apply(&moves).unwrap();
    };
    let r0 = c.memory_report();
    assert!(
        r0.disk_file_bytes >= r0.disk_bytes && r0.disk_pages > 20,
        "{r0:?}"
    );
    // Every other page of the first sequence back hot: half its records are dead, not yet
    // enough for the automatic rule (the second sequence's records are live).
    promote_every(&mut ram, seqs[0], 2);
    promote_every(&mut c, seqs[0], 2);
    let r1 = c.memory_report();
    assert_eq!(c.counters().compactions, 0);
    assert!(r1.disk_file_bytes > r1.disk_bytes, "{r1:?}");
    let files = c.spill_files().len();
    let k = c.compact_spill().unwrap();
    let r2 = c.memory_report();
    assert!(k.pages_moved > 0 && k.bytes_reclaimed > 0, "{k:?}");
    assert_eq!(k.corrupt_left, 0);
    assert_eq!(r2.disk_bytes, r1.disk_bytes, "live records are unchanged");
    assert_eq!(
        r1.disk_file_bytes - r2.disk_file_bytes,
        k.bytes_reclaimed as usize
    );
    assert!(c.spill_files().len() < files);
    assert_eq!(
        c.attend(0, &seqs, &q).unwrap().output,
        ram.attend(0, &seqs, &q).unwrap().output
    );
    // The second sequence's pages back hot one move at a time, strided so that segments thin
    // out: once a store holds more dead than live bytes (and a segment's worth) the cache
    // compacts by itself, so the files never grow past about twice the live bytes.
    let n = c.page_table(seqs[1], 0).unwrap().pages().len();
    for page in (1..n).step_by(3).chain((2..n).step_by(3)) {
        let p = PageRef {
            seq: seqs[1],
            layer: 0,
            page,
        };
        if c.page(p).unwrap().tier != Tier::Cold {
            continue;
        }
        ram.apply(&[kvtier::Move::Promote(p)]).unwrap();
        c.apply(&[kvtier::Move::Promote(p)]).unwrap();
        let r = c.memory_report();
        assert!(
            r.disk_file_bytes <= 2 * r.disk_bytes + 4 * (64 << 10),
            "page {page}: {r:?}"
        );
    }
    assert!(c.counters().compactions >= 2, "{:?}", c.counters());
    assert_eq!(c.counters().compaction_failures, 0);
    let (a, b) = (
        ram.attend(0, &seqs, &q).unwrap(),
        c.attend(0, &seqs, &q).unwrap(),
    );
    assert_eq!(a.output, b.output);
    assert_eq!(a.heads, b.heads);
    // What the step read from disk is in the result; the all-RAM cache read nothing.
    assert_eq!(a.disk, kvtier::cold::DiskStep::default());
    assert!(b.disk.pages > 0 && b.disk.bytes > 0, "{:?}", b.disk);
    assert_eq!(
        b.disk.pages,
        b.disk.hits + b.disk.waited + b.disk.sync_reads,
        "{:?}",
        b.disk
    );
    drop(c);
    assert!(!dir.exists());
}
