#![no_main]
//! Fuzzes kvtier's C ABI with sequences of calls decoded from the input bytes.
//!
//! Every call gets arguments a C program may legally pass: handles that are live, NULL or
//! misaligned; arrays that are NULL, misaligned, too short, too long (only ever within their real
//! allocation: reading past it would be the C caller's undefined behaviour, not kvtier's), or
//! exactly right; sequence ids that are live, removed, duplicated or random; layers in and out of
//! range; enum values and config fields in and out of range; NaN and infinite data. After every
//! call it checks the ABI's promises:
//! - no call panics (`KVTIER_STATUS_PANIC`) and every status is a known code;
//! - a failure records a last error that names a `kvtier_` function, and writes no output;
//! - a successful attention over finite, moderate inputs gives finite outputs and page offsets
//!   that agree with `kvtier_cache_sequence_pages`.
//!
//! Handles still live at the end of an input are freed, so LeakSanitizer sees real leaks only.

use kvtier::ffi::*;
use libfuzzer_sys::fuzz_target;
use std::ffi::c_char;
use std::mem::size_of;
use std::ptr::{null, null_mut};

const POOL: usize = 1 << 14;
/// An output element nobody writes: a NaN with a recognisable payload.
const SENTINEL: u32 = 0x7fc0_dead;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.u8()?,
            self.u8()?,
            self.u8()?,
            self.u8()?,
        ]))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from(self.u32()?) | (u64::from(self.u32()?) << 32))
    }
    /// One of `choices`.
    fn pick<T: Copy>(&mut self, choices: &[T]) -> Option<T> {
        Some(choices[self.u8()? as usize % choices.len()])
    }
}

/// Sizes that stress the boundary: small good ones, 0, odd ones, and huge ones.
const BIG: [usize; 4] = [1 << 20, 1 << 40, usize::MAX / 2, usize::MAX];

struct Cache {
    ptr: *mut kvtier_cache,
    shape: kvtier_shape,
    seqs: Vec<u64>,
}

struct State {
    configs: Vec<*mut kvtier_config>,
    caches: Vec<Cache>,
    /// Input data: moderate values unless `poison` put NaN, infinities or huge values in.
    data: Vec<f32>,
    poisoned: bool,
    out: Vec<f32>,
    ids: Vec<u64>,
    heads: Vec<kvtier_head_stats>,
    masses: Vec<f32>,
    offsets: Vec<usize>,
    text: Vec<c_char>,
    scalar: [u64; 4],
    stores: Vec<*mut kvtier_prefix_store>,
    tokens: Vec<u32>,
}

/// An input array as C would pass it.
fn in_array<T>(b: &mut Bytes, pool: &[T], want: usize) -> Option<(*const T, usize)> {
    let base = pool.as_ptr();
    Some(match b.u8()? % 10 {
        0 => (null(), 0),
        1 => (null(), want.max(1)),
        2 => (null(), b.pick(&BIG)?),
        // Misaligned (never read: refused first), with any count.
        3 => ((base as *const u8).wrapping_add(1) as *const T, want.max(1)),
        4 => {
            // Off by a little, within the pool.
            let delta = b.u8()? as usize % 5;
            let len = if b.u8()? % 2 == 0 {
                want + delta
            } else {
                want.saturating_sub(delta)
            };
            (base, len.min(pool.len()))
        }
        _ => {
            let off = (b.u8()? as usize % 4 * 64).min(pool.len());
            (base.wrapping_add(off), want.min(pool.len() - off))
        }
    })
}

/// An output array as C would pass it: (pointer, count, offset into the pool or None).
fn out_array<T>(
    b: &mut Bytes,
    pool: &mut [T],
    want: usize,
) -> Option<(*mut T, usize, Option<usize>)> {
    let base = pool.as_mut_ptr();
    Some(match b.u8()? % 10 {
        0 => (null_mut(), 0, None),
        1 => (null_mut(), want.max(1), None),
        2 => (null_mut(), b.pick(&BIG)?, None),
        3 => (
            (base as *mut u8).wrapping_add(1) as *mut T,
            want.max(1),
            None,
        ),
        4 => {
            let len = want
                .saturating_sub(1 + b.u8()? as usize % 3)
                .min(pool.len());
            (base, len, Some(0))
        }
        _ => {
            let off = (b.u8()? as usize % 4 * 16).min(pool.len());
            (
                base.wrapping_add(off),
                want.min(pool.len() - off),
                Some(off),
            )
        }
    })
}

impl State {
    fn new() -> Self {
        State {
            configs: Vec::new(),
            caches: Vec::new(),
            data: (0..POOL)
                .map(|i| ((i * 2_654_435_761) % 2001) as f32 / 250.0 - 4.0)
                .collect(),
            poisoned: false,
            out: vec![0.0; POOL],
            ids: vec![0; 64],
            heads: vec![kvtier_head_stats::default(); 1024],
            masses: vec![0.0; 1024],
            offsets: vec![0; 64],
            text: vec![0; 256],
            scalar: [0; 4],
            stores: Vec::new(),
            tokens: (0..4096u32).map(|i| i.wrapping_mul(2_654_435_761) % 50_000).collect(),
        }
    }

    fn config(&mut self, b: &mut Bytes) -> Option<*mut kvtier_config> {
        Some(match b.u8()? % 8 {
            0 => null_mut(),
            1 => (self.scalar.as_mut_ptr() as *mut u8).wrapping_add(1) as *mut kvtier_config,
            _ if self.configs.is_empty() => null_mut(),
            i => self.configs[i as usize % self.configs.len()],
        })
    }

    fn cache(&mut self, b: &mut Bytes) -> Option<(*mut kvtier_cache, Option<usize>)> {
        Some(match b.u8()? % 8 {
            0 => (null_mut(), None),
            1 => (
                (self.scalar.as_mut_ptr() as *mut u8).wrapping_add(1) as *mut kvtier_cache,
                None,
            ),
            _ if self.caches.is_empty() => (null_mut(), None),
            i => {
                let i = i as usize % self.caches.len();
                (self.caches[i].ptr, Some(i))
            }
        })
    }

    fn seq(&self, b: &mut Bytes, cache: Option<usize>) -> Option<u64> {
        let known = cache.map(|c| &self.caches[c].seqs[..]).unwrap_or(&[]);
        Some(match b.u8()? % 6 {
            0 => b.u64()?,
            1 => b.u8()? as u64,
            _ if known.is_empty() => 0,
            i => known[(i as usize + b.u8()? as usize) % known.len()],
        })
    }

    fn layer(&self, b: &mut Bytes, cache: Option<usize>) -> Option<usize> {
        let layers = cache.map_or(1, |c| self.caches[c].shape.num_layers);
        Some(match b.u8()? % 8 {
            0 => layers,
            1 => usize::MAX,
            i => i as usize % layers.max(1),
        })
    }

    /// The row length of `heads` heads of this cache (or a guess for a bad handle).
    fn row(&self, cache: Option<usize>, q: bool) -> usize {
        cache.map_or(64, |c| {
            let s = &self.caches[c].shape;
            (if q { s.num_q_heads } else { s.num_kv_heads }) * s.head_dim
        })
    }

    fn free_all(&mut self) {
        for p in self.stores.drain(..) {
            // SAFETY: a live handle from kvtier_prefix_store_new_*, freed once.
            unsafe { kvtier_prefix_store_free(p) };
        }
        for c in self.caches.drain(..) {
            // SAFETY: a live handle from kvtier_cache_new, freed once.
            unsafe { kvtier_cache_free(c.ptr) };
        }
        for c in self.configs.drain(..) {
            // SAFETY: a live handle from kvtier_config_new*, freed once.
            unsafe { kvtier_config_free(c) };
        }
    }
}

/// The promises every status-returning call keeps.
fn check(st: kvtier_status, call: &str) {
    assert_ne!(
        st,
        kvtier_status::Panic,
        "{call} panicked: {}",
        last_error()
    );
    if st != kvtier_status::Ok {
        let msg = last_error();
        assert!(
            msg.starts_with("kvtier_"),
            "{call} -> {st:?}: last error `{msg}`"
        );
    }
}

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 1024];
    let mut len = 0usize;
    // SAFETY: `buf` holds 1024 bytes; `len` is a live usize.
    let st = unsafe { kvtier_last_error(buf.as_mut_ptr(), buf.len(), &mut len) };
    assert!(st == kvtier_status::Ok || st == kvtier_status::BufferTooSmall);
    let end = buf.iter().position(|&c| c == 0).expect("NUL-terminated");
    assert!(end <= len);
    String::from_utf8(buf[..end].iter().map(|&c| c as u8).collect()).expect("UTF-8 prefix")
}

/// Fills the output region with the sentinel.
fn arm(out: &mut [f32], region: Option<usize>, len: usize) {
    if let Some(off) = region {
        for x in &mut out[off..off + len] {
            *x = f32::from_bits(SENTINEL);
        }
    }
}

/// On failure, the output region must still hold the sentinel.
fn untouched(out: &[f32], region: Option<usize>, len: usize, call: &str) {
    if let Some(off) = region {
        assert!(
            out[off..off + len].iter().all(|x| x.to_bits() == SENTINEL),
            "{call} failed but wrote its output"
        );
    }
}

fn step(s: &mut State, b: &mut Bytes) -> Option<()> {
    match b.u8()? % 24 {
        0 | 1 => {
            let dims = [
                b.pick(&[1usize, 2, 3, 0, 1 << 40])?,
                b.pick(&[1usize, 2, 4, 8, 9, 0, 1 << 33])?,
                b.pick(&[1usize, 2, 3, 4, 0, 1 << 33])?,
                b.pick(&[32usize, 64, 0, 48, 1024, 1 << 36])?,
            ];
            let preset = b.pick(&[0u32, 1, 2, 3, u32::MAX])?;
            let mut out: *mut kvtier_config = null_mut();
            let out_ptr = if b.u8()? % 8 == 0 {
                null_mut()
            } else {
                &mut out as *mut _
            };
            // SAFETY: `out_ptr` is NULL or a live local.
            let st = unsafe {
                if b.u8()? % 2 == 0 {
                    kvtier_config_new(dims[0], dims[1], dims[2], dims[3], out_ptr)
                } else {
                    kvtier_config_new_preset(preset, dims[0], dims[1], dims[2], dims[3], out_ptr)
                }
            };
            check(st, "kvtier_config_new*");
            if st == kvtier_status::Ok {
                assert!(!out.is_null());
                s.configs.push(out);
            }
        }
        2 | 3 => {
            let cfg = s.config(b)?;
            let v = b.pick(&[
                0usize,
                1,
                2,
                4,
                8,
                12,
                16,
                32,
                64,
                48,
                100,
                256,
                512,
                1 << 32,
                usize::MAX,
            ])?;
            let small = b.pick(&[0u32, 1, 2, 3, 4, 8, 16, u32::MAX])?;
            // SAFETY: `cfg` is NULL, misaligned or live; arrays are as `in_array` documents.
            let st = unsafe {
                match b.u8()? % 11 {
                    0 => kvtier_config_set_page_size(cfg, v),
                    1 => kvtier_config_set_hot_dtype(cfg, small),
                    2 => kvtier_config_set_sink_tokens(cfg, v),
                    3 => kvtier_config_set_hot_window(cfg, v),
                    4 => kvtier_config_set_bits(cfg, small, b.pick(&[2u32, 4, 8, 3])?),
                    5 => kvtier_config_set_value_group(cfg, v),
                    6 => {
                        let layers: Vec<usize> = (0..8).map(|i| i % 3).collect();
                        let want = b.u8()? as usize % 4;
                        let (p, n) = in_array(b, &layers, want)?;
                        kvtier_config_set_protected_layers(cfg, p, n)
                    }
                    7 => kvtier_config_set_warm_enabled(cfg, b.u8()? % 2 == 0),
                    8 => kvtier_config_set_budgets(cfg, v.wrapping_mul(1024), v, KVTIER_UNLIMITED),
                    9 => kvtier_config_set_max_seq_len(cfg, v),
                    _ => kvtier_config_set_softmax_scale(
                        cfg,
                        b.pick(&[0.0f32, 0.125, 1.0, -1.0, f32::NAN, f32::INFINITY])?,
                    ),
                }
            };
            check(st, "kvtier_config_set_*");
        }
        4 => {
            if !s.configs.is_empty() {
                let i = b.u8()? as usize % s.configs.len();
                // SAFETY: a live handle, removed from the list so it is never used again.
                unsafe { kvtier_config_free(s.configs.swap_remove(i)) };
            }
        }
        5 | 6 => {
            if s.caches.len() >= 3 {
                return Some(());
            }
            let cfg = s.config(b)?;
            let mut out: *mut kvtier_cache = null_mut();
            let out_ptr = if b.u8()? % 8 == 0 {
                null_mut()
            } else {
                &mut out as *mut _
            };
            // SAFETY: `cfg` is NULL, misaligned or live; `out_ptr` NULL or a live local.
            let st = unsafe {
                let pick = b.u8()?;
                if pick % 8 == 0 {
                    kvtier_cache_new_cuda(cfg, 0, out_ptr)
                } else if pick % 8 == 1 {
                    kvtier_cache_new_metal(cfg, out_ptr)
                } else {
                    kvtier_cache_new(cfg, out_ptr)
                }
            };
            check(st, "kvtier_cache_new*");
            if st == kvtier_status::Ok {
                let mut shape = kvtier_shape::default();
                // SAFETY: a live handle and a live local.
                check(
                    unsafe { kvtier_cache_shape(out, &mut shape) },
                    "kvtier_cache_shape",
                );
                s.caches.push(Cache {
                    ptr: out,
                    shape,
                    seqs: Vec::new(),
                });
            }
        }
        7 => {
            if !s.caches.is_empty() {
                let i = b.u8()? as usize % s.caches.len();
                // SAFETY: a live handle, removed from the list so it is never used again.
                unsafe { kvtier_cache_free(s.caches.swap_remove(i).ptr) };
            }
        }
        8 | 9 => {
            let (cache, ci) = s.cache(b)?;
            let mut id = 0u64;
            let out = if b.u8()? % 8 == 0 {
                null_mut()
            } else {
                &mut id as *mut u64
            };
            // SAFETY: `cache` NULL, misaligned or live; `out` NULL or a live local.
            let st = unsafe { kvtier_cache_sequence_add(cache, out) };
            check(st, "kvtier_cache_sequence_add");
            if let (kvtier_status::Ok, Some(ci)) = (st, ci) {
                s.caches[ci].seqs.push(id);
            }
        }
        10 => {
            let (cache, ci) = s.cache(b)?;
            let seq = s.seq(b, ci)?;
            // SAFETY: `cache` NULL, misaligned or live.
            let st = unsafe {
                if b.u8()? % 2 == 0 {
                    kvtier_cache_sequence_remove(cache, seq)
                } else {
                    kvtier_cache_sequence_reset(cache, seq)
                }
            };
            check(st, "kvtier_cache_sequence_remove/reset");
        }
        11 => {
            let (cache, ci) = s.cache(b)?;
            let (seq, layer) = (s.seq(b, ci)?, s.layer(b, ci)?);
            let mut n = 0usize;
            let out = if b.u8()? % 8 == 0 {
                null_mut()
            } else {
                &mut n as *mut usize
            };
            // SAFETY: `cache` NULL, misaligned or live; `out` NULL or a live local.
            let st = unsafe {
                if b.u8()? % 2 == 0 {
                    kvtier_cache_sequence_len(cache, seq, layer, out)
                } else {
                    kvtier_cache_sequence_pages(cache, seq, layer, out)
                }
            };
            check(st, "kvtier_cache_sequence_len/pages");
        }
        12 | 13 | 14 => {
            let (cache, ci) = s.cache(b)?;
            let (seq, layer) = (s.seq(b, ci)?, s.layer(b, ci)?);
            let n = b.u8()? as usize % 40;
            let want = n * s.row(ci, false);
            let (k, kn) = in_array(b, &s.data, want)?;
            let (v, vn) = in_array(b, &s.data[POOL / 2..], want)?;
            // SAFETY: arrays are NULL/misaligned with any count, or within their pools.
            let st = unsafe { kvtier_cache_append(cache, seq, layer, k, kn, v, vn) };
            check(st, "kvtier_cache_append");
        }
        15 => {
            let (cache, ci) = s.cache(b)?;
            let (seq, layer) = (s.seq(b, ci)?, s.layer(b, ci)?);
            let n = b.u8()? as usize % 24;
            let (wq, wkv) = (n * s.row(ci, true), n * s.row(ci, false));
            let (q, qn) = in_array(b, &s.data, wq)?;
            let (k, kn) = in_array(b, &s.data[POOL / 4..], wkv)?;
            let (v, vn) = in_array(b, &s.data[POOL / 2..], wkv)?;
            let (o, on, region) = out_array(b, &mut s.out, wq)?;
            arm(&mut s.out, region, on);
            // SAFETY: as above.
            let st = unsafe { kvtier_cache_prefill(cache, seq, layer, q, qn, k, kn, v, vn, o, on) };
            check(st, "kvtier_cache_prefill");
            if st != kvtier_status::Ok {
                untouched(&s.out, region, on, "kvtier_cache_prefill");
            }
        }
        16 | 17 => attend(s, b)?,
        20 | 21 => sequences(s, b)?,
        22 => save_restore(s, b)?,
        23 => {
            let (cache, ci) = s.cache(b)?;
            let seq = s.seq(b, ci)?;
            let len = b.pick(&[0usize, 1, 31, 32, 33, 100, usize::MAX])?;
            let mut n = [0usize; 2];
            let (t, d) = if b.u8()? % 2 == 0 {
                (null_mut(), null_mut())
            } else {
                (&mut n[0] as *mut usize, &mut n[1] as *mut usize)
            };
            let mut stats = kvtier_disk_stats::default();
            let mut comp = kvtier_compaction::default();
            // SAFETY: `cache` NULL, misaligned or live; outputs NULL or live locals.
            unsafe {
                match b.u8()? % 3 {
                    0 => check(
                        kvtier_cache_sequence_truncate(cache, seq, len, t, d),
                        "kvtier_cache_sequence_truncate",
                    ),
                    1 => check(
                        kvtier_cache_disk_stats(cache, &mut stats),
                        "kvtier_cache_disk_stats",
                    ),
                    _ => check(
                        kvtier_cache_compact_spill(
                            cache,
                            if b.u8()? % 2 == 0 { null_mut() } else { &mut comp },
                        ),
                        "kvtier_cache_compact_spill",
                    ),
                }
            }
        }
        18 => {
            let (cache, _) = s.cache(b)?;
            let mut report = kvtier_memory_report::default();
            let mut counters = kvtier_counters::default();
            let mut shape = kvtier_shape::default();
            let null_out = b.u8()? % 8 == 0;
            // SAFETY: `cache` NULL, misaligned or live; outputs NULL or live locals.
            unsafe {
                let st = kvtier_cache_memory_report(
                    cache,
                    if null_out { null_mut() } else { &mut report },
                );
                check(st, "kvtier_cache_memory_report");
                if st == kvtier_status::Ok {
                    assert_eq!(
                        report.device_bytes,
                        report.hot_bytes + report.warm_bytes + report.metadata_bytes
                    );
                }
                check(
                    kvtier_cache_counters(cache, &mut counters),
                    "kvtier_cache_counters",
                );
                check(kvtier_cache_shape(cache, &mut shape), "kvtier_cache_shape");
                let cfg = s.config(b)?;
                check(kvtier_config_shape(cfg, &mut shape), "kvtier_config_shape");
            }
        }
        _ => {
            match b.u8()? % 4 {
                // Poison or restore the data.
                0 => {
                    let i = b.u8()? as usize * 61 % POOL;
                    s.data[i] =
                        b.pick(&[f32::NAN, f32::INFINITY, -f32::INFINITY, 1e30, 7e4, -1e9])?;
                    s.poisoned = true;
                }
                1 => {
                    let len = b.pick(&[0usize, 1, 5, 16, 256, 300])?;
                    let (p, n) = if len > s.text.len() {
                        (null_mut(), len)
                    } else {
                        (s.text.as_mut_ptr(), len)
                    };
                    let mut full = 0usize;
                    let lp = if b.u8()? % 2 == 0 {
                        null_mut()
                    } else {
                        &mut full as *mut usize
                    };
                    // SAFETY: `p` is NULL or holds `n` bytes; `lp` NULL or a live local.
                    let st = unsafe { kvtier_last_error(p, n, lp) };
                    assert!(matches!(
                        st,
                        kvtier_status::Ok
                            | kvtier_status::BufferTooSmall
                            | kvtier_status::NullParameter
                    ));
                }
                2 => {
                    let name = kvtier_status_name(b.u32()?);
                    assert!(!name.is_null());
                    assert!(!kvtier_version().is_null());
                    assert_eq!(kvtier_abi_version() >> 24, 0);
                }
                _ => prefix(s, b)?,
            }
        }
    }
    Some(())
}

/// Fork and beam-search reorder.
fn sequences(s: &mut State, b: &mut Bytes) -> Option<()> {
    let (cache, ci) = s.cache(b)?;
    if b.u8()? % 2 == 0 {
        let seq = s.seq(b, ci)?;
        let mut id = 0u64;
        let out = if b.u8()? % 8 == 0 {
            null_mut()
        } else {
            &mut id as *mut u64
        };
        // SAFETY: `cache` NULL, misaligned or live; `out` NULL or a live local.
        let st = unsafe { kvtier_cache_sequence_fork(cache, seq, out) };
        check(st, "kvtier_cache_sequence_fork");
        if let (kvtier_status::Ok, Some(ci)) = (st, ci) {
            s.caches[ci].seqs.push(id);
        }
        return Some(());
    }
    let n = b.u8()? as usize % 5;
    for i in 0..n {
        s.ids[i] = s.seq(b, ci)?;
    }
    let from: Vec<usize> = (0..8)
        .map(|_| b.u8().map_or(0, |x| x as usize % 6))
        .collect();
    let (seqs, ns) = in_array(b, &s.ids, n)?;
    let (f, nf) = in_array(b, &from, n)?;
    // One count for both arrays: each pointer is NULL, misaligned, or valid for at least its
    // own count, so for the smaller one.
    // SAFETY: as above.
    let st = unsafe { kvtier_cache_reorder(cache, seqs, f, ns.min(nf)) };
    check(st, "kvtier_cache_reorder");
    Some(())
}

/// Save and restore, with paths that are NULL, not UTF-8, in a missing directory, or a file
/// that is garbage or a real saved sequence.
fn save_restore(s: &mut State, b: &mut Bytes) -> Option<()> {
    let dir = std::env::temp_dir().join(format!("kvtier-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let good = format!("{}/seq.kvts\0", dir.display());
    let junk = format!("{}/junk.kvts\0", dir.display());
    let _ = std::fs::write(&junk[..junk.len() - 1], b"KVTS\x01\x00 garbage");
    let missing = format!("{}/no/such/dir/seq\0", dir.display());
    let bad_utf8 = [0xffu8, 0xfe, 0];
    let path: *const c_char = match b.u8()? % 6 {
        0 => null(),
        1 => bad_utf8.as_ptr() as *const c_char,
        2 => missing.as_ptr() as *const c_char,
        3 => junk.as_ptr() as *const c_char,
        _ => good.as_ptr() as *const c_char,
    };
    let (cache, ci) = s.cache(b)?;
    if b.u8()? % 2 == 0 {
        let seq = s.seq(b, ci)?;
        let mut bytes = 0u64;
        let out = if b.u8()? % 4 == 0 {
            null_mut()
        } else {
            &mut bytes as *mut u64
        };
        // SAFETY: `cache` NULL, misaligned or live; `path` NULL or NUL-terminated; `out` NULL
        // or a live local.
        let st = unsafe { kvtier_cache_sequence_save(cache, seq, path, b.u8()? % 2 == 0, out) };
        check(st, "kvtier_cache_sequence_save");
    } else {
        let mut id = 0u64;
        let out = if b.u8()? % 8 == 0 {
            null_mut()
        } else {
            &mut id as *mut u64
        };
        // SAFETY: as above.
        let st = unsafe { kvtier_cache_sequence_restore(cache, path, out) };
        check(st, "kvtier_cache_sequence_restore");
        if let (kvtier_status::Ok, Some(ci)) = (st, ci) {
            s.caches[ci].seqs.push(id);
        }
    }
    Some(())
}

/// Prefix stores in host memory: created with good and bad namespaces and fingerprints, then
/// lookup / import / publish / flush on any cache and sequence with any token array.
fn prefix(s: &mut State, b: &mut Bytes) -> Option<()> {
    let fp = [7u8; 32];
    let bad_utf8 = [0xffu8, 0xfe, 0];
    if s.stores.is_empty() || b.u8()? % 4 == 0 {
        let ns: *const c_char = match b.u8()? % 5 {
            0 => null(),
            1 => bad_utf8.as_ptr() as *const c_char,
            2 => c"a:b".as_ptr(),
            _ => c"fuzz".as_ptr(),
        };
        let fpp = if b.u8()? % 6 == 0 { null() } else { fp.as_ptr() };
        let budget = b.pick(&[0u64, 1, 1 << 20, 1 << 26, u64::MAX])?;
        let mut out: *mut kvtier_prefix_store = null_mut();
        let outp = if b.u8()? % 8 == 0 { null_mut() } else { &mut out as *mut _ };
        // SAFETY: strings NULL or NUL-terminated; `fpp` NULL or 32 bytes; `outp` NULL or a local.
        let st = unsafe { kvtier_prefix_store_new_memory(budget, ns, fpp, outp) };
        check(st, "kvtier_prefix_store_new_memory");
        if st == kvtier_status::Ok {
            assert!(!out.is_null());
            s.stores.push(out);
        } else {
            assert!(out.is_null(), "a failed constructor wrote its handle");
        }
        return Some(());
    }
    let store = match b.u8()? % 8 {
        0 => null_mut(),
        _ => s.stores[b.u8()? as usize % s.stores.len()],
    };
    let (cache, ci) = s.cache(b)?;
    let seq = s.seq(b, ci)?;
    let n = b.pick(&[0usize, 1, 15, 16, 17, 64, 200, 4096])?;
    let (t, tn) = in_array(b, &s.tokens, n)?;
    let mut rep = kvtier_prefix_report::default();
    let repp = if b.u8()? % 8 == 0 { null_mut() } else { &mut rep as *mut _ };
    // SAFETY: handles NULL, misaligned or live; `t` NULL/misaligned with any count or within the
    // token pool; `repp` NULL or a live local.
    let st = unsafe {
        match b.u8()? % 4 {
            0 => kvtier_prefix_lookup(store, cache, t, tn, repp),
            1 => kvtier_prefix_import(store, cache, seq, t, tn, repp),
            2 => kvtier_prefix_publish(store, cache, seq, t, tn, b.u8()? % 2, repp),
            _ => kvtier_prefix_flush(store, repp),
        }
    };
    check(st, "kvtier_prefix_*");
    if st == kvtier_status::Ok {
        assert!(rep.tokens as usize <= tn, "more tokens than the prompt: {rep:?}");
        assert!(rep.pages <= rep.tokens);
    }
    Some(())
}

fn attend(s: &mut State, b: &mut Bytes) -> Option<()> {
    let (cache, ci) = s.cache(b)?;
    let layer = s.layer(b, ci)?;
    let n = b.u8()? as usize % 5;
    for i in 0..n {
        s.ids[i] = s.seq(b, ci)?;
    }
    let (seqs, n_seqs) = in_array(b, &s.ids, n)?;
    let want = n * s.row(ci, true);
    let (q, qn) = in_array(b, &s.data, want)?;
    let device = b.u8()? % 6 == 0;
    let (o, on, region) = out_array(b, &mut s.out, want)?;
    arm(&mut s.out, region, on);
    let qh = ci.map_or(4, |c| s.caches[c].shape.num_q_heads);
    let mut stats = kvtier_attention_stats {
        heads: null_mut(),
        heads_len: 0,
        page_mass: null_mut(),
        page_mass_len: 0,
        page_offsets: null_mut(),
        page_offsets_len: 0,
    };
    let stats_kind = b.u8()? % 4;
    if stats_kind >= 2 {
        let (h, hn, _) = out_array(b, &mut s.heads, n * qh)?;
        let (m, mn, _) = out_array(b, &mut s.masses, 64)?;
        let (off, offn, _) = out_array(b, &mut s.offsets, n + 1)?;
        stats = kvtier_attention_stats {
            heads: h,
            heads_len: hn,
            page_mass: m,
            page_mass_len: mn,
            page_offsets: off,
            page_offsets_len: offn,
        };
    }
    let stats_ptr: *const kvtier_attention_stats = match stats_kind {
        0 => null(),
        1 => (s.scalar.as_ptr() as *const u8).wrapping_add(1) as *const kvtier_attention_stats,
        _ => &stats,
    };
    // SAFETY: arrays are NULL/misaligned with any count or within their pools; the stats struct
    // is NULL, misaligned or a live local naming pool buffers within their lengths. Device
    // addresses are never dereferenced on a CPU cache (it refuses device attention).
    let eliminate = !device && b.u8()? % 4 == 0;
    let eps = b.pick(&[0.0f32, 1e-3, 0.1, 0.999, 1.0, -1.0, f32::NAN])?;
    let group = b.pick(&[0usize, 1, 2, 4, usize::MAX])?;
    let mut rep = kvtier_elimination_report::default();
    let st = unsafe {
        if eliminate {
            kvtier_cache_attend_eliminated(
                cache,
                layer,
                seqs,
                n_seqs,
                q,
                qn,
                eps,
                group,
                o,
                on,
                stats_ptr,
                if b.u8()? % 2 == 0 { null_mut() } else { &mut rep },
            )
        } else if device && b.u8()? % 2 == 0 {
            // A queued step and its finish: refused on a CPU cache, the step handle freed.
            let mut step = null_mut();
            assert_eq!(kvtier_step_new(b.u8()? % 2 == 0, &mut step), kvtier_status::Ok);
            let st = kvtier_cache_attend_device_async(
                cache,
                step,
                layer,
                seqs,
                n_seqs,
                0x1000,
                0x2000,
                null_mut(),
            );
            check(st, "kvtier_cache_attend_device_async");
            assert_ne!(st, kvtier_status::Ok, "a CPU cache cannot queue a device step");
            let fin = kvtier_cache_finish_device(cache, step, layer, stats_ptr);
            check(fin, "kvtier_cache_finish_device");
            kvtier_step_free(step);
            fin
        } else if device {
            kvtier_cache_attend_device(
                cache,
                layer,
                seqs,
                n_seqs,
                0x1000,
                0x2000,
                null_mut(),
                stats_ptr,
            )
        } else {
            kvtier_cache_attend(cache, layer, seqs, n_seqs, q, qn, o, on, stats_ptr)
        }
    };
    check(st, "kvtier_cache_attend*");
    if eliminate && st == kvtier_status::Ok {
        assert!(rep.skipped_pages <= rep.candidates);
        assert!(rep.max_mass_bound <= eps.max(0.0));
    }
    if device {
        assert_ne!(
            st,
            kvtier_status::Ok,
            "a CPU cache cannot attend on a device"
        );
    }
    if st != kvtier_status::Ok {
        untouched(&s.out, region, on, "kvtier_cache_attend");
        return Some(());
    }
    let ci = ci.expect("success needs a live cache");
    // What the call really read: `n_seqs` ids from the start of `ids` (a non-zero count that
    // succeeded came with the pool's own pointer), and wrote: one row per sequence.
    let used: Vec<u64> = s.ids[..n_seqs].to_vec();
    let written = n_seqs * s.row(Some(ci), true);
    if !s.poisoned {
        let off = region.unwrap_or(0);
        assert!(
            s.out[off..off + written].iter().all(|x| x.is_finite()),
            "non-finite attention output from finite inputs"
        );
    }
    if stats_kind >= 2 && stats.page_offsets_len > 0 {
        let off = (stats.page_offsets as usize - s.offsets.as_ptr() as usize) / size_of::<usize>();
        let mut total = 0usize;
        for (i, id) in used.iter().enumerate() {
            let mut pages = 0usize;
            // SAFETY: a live handle and a live local.
            let st =
                unsafe { kvtier_cache_sequence_pages(s.caches[ci].ptr, *id, layer, &mut pages) };
            assert_eq!(st, kvtier_status::Ok);
            assert_eq!(
                s.offsets[off + i],
                total,
                "page offsets disagree with sequence_pages"
            );
            total += pages;
        }
        assert_eq!(s.offsets[off + used.len()], total);
    }
    Some(())
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mut s = State::new();
    let mut steps = 0;
    while steps < 200 && step(&mut s, &mut b).is_some() {
        steps += 1;
    }
    s.free_all();
});
