//! `kvtier_cache`: the cache handle, its sequences, appends, prefill and reports.
//!
//! Owns: the opaque [`kvtier_cache`] (a [`KvCache`] behind a read-write lock: attention and reports
//! share it, changes take it exclusively, and a panic during a change poisons it), and the
//! `#[repr(C)]` report structs. Must never: change the cache before every argument of the call has
//! been checked (the core's methods validate completely before they mutate, and output buffers are
//! checked here before the core is called), or hold the lock across a call back into C.

use super::boundary::{handle, input, Out, OutParam};
use super::config::{kvtier_config, kvtier_shape};
use super::status::{kvtier_status, FfiError};
use crate::backend::cuda::CudaDevice;
use crate::backend::metal::MetalDevice;
use crate::backend::Device;
use crate::cache::{KvCache, SeqId};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A KV cache for one model. Opaque: make one with `kvtier_cache_new` (or `_new_cuda`), free it
/// with `kvtier_cache_free`. Thread-safe: calls that take `const kvtier_cache *` may run
/// concurrently; calls that change it are serialised by an internal lock.
pub struct kvtier_cache {
    inner: RwLock<KvCache>,
}

fn poisoned() -> FfiError {
    FfiError::new(
        kvtier_status::Poisoned,
        "an earlier call panicked while changing this cache; free it",
    )
}

impl kvtier_cache {
    pub(crate) fn read(&self) -> Result<RwLockReadGuard<'_, KvCache>, FfiError> {
        self.inner.read().map_err(|_| poisoned())
    }
    pub(crate) fn write(&self) -> Result<RwLockWriteGuard<'_, KvCache>, FfiError> {
        self.inner.write().map_err(|_| poisoned())
    }
}

/// Bytes a cache has actually allocated, per tier, metadata included.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct kvtier_memory_report {
    /// Exact pages (K and V).
    pub hot_bytes: usize,
    /// Quantised pages: packed codes plus their minimums and steps.
    pub warm_bytes: usize,
    /// Cold tier (host RAM): pages that left the device and are not already in the archive.
    pub cold_bytes: usize,
    /// Bookkeeping: slot tables, free lists, page tables, the sequence map.
    pub metadata_bytes: usize,
    /// hot + warm + metadata.
    pub device_bytes: usize,
    /// device + cold + archive.
    pub total_bytes: usize,
    /// Tokens stored, summed over sequences and layers.
    pub tokens: usize,
    pub hot_pages: usize,
    pub warm_pages: usize,
    /// What the same tokens take as plain f16 K and V.
    pub f16_equivalent_bytes: usize,
    /// f16_equivalent_bytes / device_bytes (higher is smaller).
    pub compression: f64,
    /// Lossless archive (host RAM): exact copies of pages that left the hot tier.
    pub archive_bytes: usize,
    pub cold_pages: usize,
    pub evicted_pages: usize,
    /// Pages with an archive copy.
    pub archived_pages: usize,
    /// Archive and cold pages spilled to disk (`kvtier_config_set_spill`): bytes of their live
    /// records (payload, header, checksum), and how many pages. Not in `total_bytes` (memory).
    pub disk_bytes: usize,
    pub disk_pages: usize,
    /// Bytes of the page files: live records plus freed space not yet compacted away.
    pub disk_file_bytes: usize,
    /// Tokens in evicted pages (counted in `tokens`, never attended).
    pub evicted_tokens: usize,
    /// Pages named by more than one sequence (`kvtier_cache_sequence_fork`): page counts and
    /// bytes count each once, `tokens` counts every sequence's tokens.
    pub shared_pages: usize,
}

/// Events that did not fail a call but that a caller may want to see.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvtier_counters {
    /// Pages quantised from hot to warm (or to fewer bits).
    pub demotions: u64,
    /// Pages the default policy left hot: not representable in the warm format, a budget was
    /// full, or memory ran out.
    pub demotions_skipped: u64,
    /// Pages brought back to hot.
    pub promotions: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Pages moved to the cold tier.
    pub to_cold: u64,
    /// Pages moved back from the cold tier.
    pub from_cold: u64,
}

/// Creates a cache, and its handle, from `out`'s checked pointer.
fn hand_out(cache: KvCache, out: OutParam<*mut kvtier_cache>) {
    let ptr = Box::into_raw(Box::new(kvtier_cache {
        inner: RwLock::new(cache),
    }));
    // SAFETY: `out` was checked non-NULL and aligned; the entry point's caller guarantees it is
    // writable.
    unsafe { out.write(ptr) };
}

/// A cache on the CPU backend, configured by a copy of `config`. On success `*cache_out` holds a
/// new handle to free with `kvtier_cache_free`.
///
/// Errors: `NULL_PARAMETER` (`config`, `cache_out`), `OUT_OF_MEMORY`.
///
/// # Safety
///
/// `config` must be NULL or a live config handle; `cache_out` must be valid for a write of one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_new(
    config: *const kvtier_config,
    cache_out: *mut *mut kvtier_cache,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_new", {
        // SAFETY: `config` is NULL or live (this function's contract).
        let cfg = unsafe { handle(config, "config") }?.lock().clone();
        let out = OutParam::new(cache_out, "cache_out")?;
        hand_out(KvCache::new(cfg)?, out);
        Ok(())
    })
}

/// A cache whose pages live on CUDA device `ordinal`. Only a library built with the `cuda`
/// feature can make one; otherwise this returns `KVTIER_STATUS_BACKEND_NOT_COMPILED`.
///
/// Errors: `NULL_PARAMETER`, `BACKEND_NOT_COMPILED`, `NO_DEVICE`, `DEVICE_ERROR`,
/// `KERNEL_COMPILE`, `OUT_OF_MEMORY`.
///
/// # Safety
///
/// As `kvtier_cache_new`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_new_cuda(
    config: *const kvtier_config,
    ordinal: usize,
    cache_out: *mut *mut kvtier_cache,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_new_cuda", {
        // SAFETY: `config` is NULL or live (this function's contract).
        let cfg = unsafe { handle(config, "config") }?.lock().clone();
        let out = OutParam::new(cache_out, "cache_out")?;
        let device = Device::Cuda(CudaDevice::new(ordinal)?);
        hand_out(KvCache::with_device(cfg, device)?, out);
        Ok(())
    })
}

/// A cache whose pages live on the system's default Metal device (macOS). Only a library built
/// for macOS with the `metal` feature can make one; otherwise this returns
/// `KVTIER_STATUS_BACKEND_NOT_COMPILED`. `kvtier_cache_attend_device` on it takes `id<MTLBuffer>`
/// handles (shared storage) and a NULL stream.
///
/// Errors: `NULL_PARAMETER`, `BACKEND_NOT_COMPILED`, `NO_DEVICE`, `KERNEL_COMPILE`,
/// `UNSUPPORTED` (a config the Metal kernels do not handle: key outlier channels, head_dim above
/// 256), `OUT_OF_MEMORY`.
///
/// # Safety
///
/// As `kvtier_cache_new`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_new_metal(
    config: *const kvtier_config,
    cache_out: *mut *mut kvtier_cache,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_new_metal", {
        // SAFETY: `config` is NULL or live (this function's contract).
        let cfg = unsafe { handle(config, "config") }?.lock().clone();
        let out = OutParam::new(cache_out, "cache_out")?;
        let device = Device::Metal(MetalDevice::new()?);
        hand_out(KvCache::with_device(cfg, device)?, out);
        Ok(())
    })
}

/// Frees a cache and every page it holds. NULL is a no-op.
///
/// # Safety
///
/// `cache` must be NULL or a handle from `kvtier_cache_new*` that was not freed yet; no other
/// thread may use it during or after this call.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_free(cache: *mut kvtier_cache) {
    ffi_panic_boundary_or! { (), "kvtier_cache_free", {
        if !cache.is_null() {
            // SAFETY: a live handle made by `Box::into_raw` in `hand_out` (caller), freed once.
            drop(unsafe { Box::from_raw(cache) });
        }
        Ok(())
    }}
}

/// Writes the cache's shape to `*shape_out`.
///
/// Errors: `NULL_PARAMETER`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `shape_out` must be valid for a write of one
/// `kvtier_shape`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_shape(
    cache: *const kvtier_cache,
    shape_out: *mut kvtier_shape,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_shape", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(shape_out, "shape_out")?;
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(kvtier_shape::of(c.config())) };
        Ok(())
    })
}

/// Starts a new, empty sequence and writes its id to `*seq_out`. Ids are never reused within a
/// cache.
///
/// Errors: `NULL_PARAMETER`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `seq_out` must be valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_add(
    cache: *mut kvtier_cache,
    seq_out: *mut u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_add", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        let out = OutParam::new(seq_out, "seq_out")?;
        let id = h.write()?.add_sequence();
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(id.0) };
        Ok(())
    })
}

/// Removes a sequence and frees all its pages; its id becomes unknown.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_remove(
    cache: *mut kvtier_cache,
    seq: u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_remove", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        h.write()?.remove_sequence(SeqId(seq))?;
        Ok(())
    })
}

/// Frees all pages of a sequence and sets its length to 0 in every layer; the id stays valid.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_reset(
    cache: *mut kvtier_cache,
    seq: u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_reset", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        h.write()?.reset_sequence(SeqId(seq))?;
        Ok(())
    })
}

/// Writes the number of tokens stored for `seq` in `layer` to `*len_out`.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `len_out` must be valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_len(
    cache: *const kvtier_cache,
    seq: u64,
    layer: usize,
    len_out: *mut usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_len", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(len_out, "len_out")?;
        let len = c.seq_len(SeqId(seq), layer)?;
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(len) };
        Ok(())
    })
}

/// Writes the number of pages `seq` occupies in `layer` (`ceil(len / page_size)`) to
/// `*pages_out`: the number of page masses `kvtier_cache_attend` reports for it.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `pages_out` must be valid for a write of one `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_pages(
    cache: *const kvtier_cache,
    seq: u64,
    layer: usize,
    pages_out: *mut usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_pages", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(pages_out, "pages_out")?;
        let pages = c.page_table(SeqId(seq), layer)?.pages().len();
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(pages) };
        Ok(())
    })
}

/// Appends `n` tokens' keys (after RoPE) and values to `seq` in `layer`. `keys` and `values` are
/// `[n][num_kv_heads][head_dim]` row-major, `keys_len` and `values_len` their element counts (equal,
/// a multiple of `num_kv_heads * head_dim`; 0 appends nothing and allows NULL). Pages that leave
/// the hot window are then quantised to the warm tier.
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (misaligned array), `SHAPE`, `NON_FINITE`,
/// `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `SEQUENCE_TOO_LONG`, `BUDGET_EXCEEDED`,
/// `OUT_OF_MEMORY`, `POISONED`. On error the cache is unchanged.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `keys` and `values` must point to `keys_len` and
/// `values_len` readable floats (or the count is 0).
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_append(
    cache: *mut kvtier_cache,
    seq: u64,
    layer: usize,
    keys: *const f32,
    keys_len: usize,
    values: *const f32,
    values_len: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_append", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        let mut c = h.write()?;
        // Counts against the config before a slice is formed over the caller's memory.
        c.check_append_len(SeqId(seq), layer, keys_len, values_len)?;
        // SAFETY: each array holds its count of readable floats (this function's contract).
        let (k, v) = unsafe {
            (
                input(keys, keys_len, "keys")?,
                input(values, values_len, "values")?,
            )
        };
        c.append(SeqId(seq), layer, k, v)?;
        Ok(())
    })
}

/// Chunked prefill of `n` new tokens of `seq` in `layer`: causal attention of each new query over
/// the cached tokens (as stored) and the new tokens up to itself, then the new keys and values are
/// appended. `queries` is `[n][num_q_heads][head_dim]`, `keys` and `values` are
/// `[n][num_kv_heads][head_dim]`; `output` receives `[n][num_q_heads][head_dim]`, so
/// `output_len >= queries_len`. `output` may alias `queries`.
///
/// The attention runs under the handle's shared lock (prefills of different sequences compute at
/// once from several threads); the append takes it exclusively.
///
/// Errors: as `kvtier_cache_append`, plus `BUFFER_TOO_SMALL` (`output`) and `STALE` (another
/// thread changed this sequence in this layer during the call). On error neither the cache nor
/// `output` is changed.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; each input array must hold its count of readable floats
/// and `output` `output_len` writable floats (or the count is 0).
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_prefill(
    cache: *mut kvtier_cache,
    seq: u64,
    layer: usize,
    queries: *const f32,
    queries_len: usize,
    keys: *const f32,
    keys_len: usize,
    values: *const f32,
    values_len: usize,
    output: *mut f32,
    output_len: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_prefill", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        // The output is `[n, q_heads, head_dim]` like the queries: check it before anything changes.
        let out = Out::new(output, output_len, queries_len, "output")?;
        // The attention runs under the shared lock, so prefills of other sequences (and attends)
        // proceed at once; only the append takes the lock exclusively. A change to this sequence
        // in this layer in between (another thread's call) is refused as `STALE`.
        let (result, len) = {
            let c = h.read()?;
            // Counts against the config before a slice is formed over the caller's memory.
            c.check_append_len(SeqId(seq), layer, keys_len, values_len)?;
            let len = c.seq_len(SeqId(seq), layer)?;
            // SAFETY: each array holds its count of readable floats (this function's contract).
            let (q, k, v) = unsafe {
                (
                    input(queries, queries_len, "queries")?,
                    input(keys, keys_len, "keys")?,
                    input(values, values_len, "values")?,
                )
            };
            (c.prefill_attend(SeqId(seq), layer, q, k, v)?, len)
        };
        {
            let mut c = h.write()?;
            if c.seq_len(SeqId(seq), layer)? != len {
                return Err(FfiError::new(
                    kvtier_status::Stale,
                    format!(
                        "sequence {seq} changed in layer {layer} during the prefill (another \
                         thread); nothing was appended"
                    ),
                ));
            }
            // SAFETY: as above; `output` is not written before these borrows end.
            let (k, v) = unsafe {
                (
                    input(keys, keys_len, "keys")?,
                    input(values, values_len, "values")?,
                )
            };
            c.append(SeqId(seq), layer, k, v)?;
        }
        // The input borrows have ended: `output` may alias them.
        if result.len() != queries_len {
            return Err(FfiError::new(
                kvtier_status::Shape,
                format!(
                    "prefill produced {} values for {queries_len} query values",
                    result.len()
                ),
            ));
        }
        // SAFETY: `out` was checked for `queries_len == result.len()` elements; writable (contract).
        unsafe { out.write(&result) };
        Ok(())
    })
}

/// Writes the bytes the cache has allocated, per tier, to `*report_out`.
///
/// Errors: `NULL_PARAMETER`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `report_out` must be valid for a write of one
/// `kvtier_memory_report`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_memory_report(
    cache: *const kvtier_cache,
    report_out: *mut kvtier_memory_report,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_memory_report", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(report_out, "report_out")?;
        let r = c.memory_report();
        let report = kvtier_memory_report {
            hot_bytes: r.hot_bytes,
            warm_bytes: r.warm_bytes,
            cold_bytes: r.cold_bytes,
            metadata_bytes: r.metadata_bytes,
            device_bytes: r.device_bytes(),
            total_bytes: r.total(),
            tokens: r.tokens,
            hot_pages: r.hot_pages,
            warm_pages: r.warm_pages,
            f16_equivalent_bytes: r.f16_equivalent_bytes,
            compression: r.compression(),
            archive_bytes: r.archive_bytes,
            cold_pages: r.cold_pages,
            evicted_pages: r.evicted_pages,
            archived_pages: r.archived_pages,
            disk_bytes: r.disk_bytes,
            disk_pages: r.disk_pages,
            disk_file_bytes: r.disk_file_bytes,
            evicted_tokens: r.evicted_tokens,
            shared_pages: r.shared_pages,
        };
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(report) };
        Ok(())
    })
}

/// Writes the cache's event counters to `*counters_out`.
///
/// Errors: `NULL_PARAMETER`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `counters_out` must be valid for a write of one
/// `kvtier_counters`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_counters(
    cache: *const kvtier_cache,
    counters_out: *mut kvtier_counters,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_counters", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(counters_out, "counters_out")?;
        let k = c.counters();
        // SAFETY: checked; writable (this function's contract).
        unsafe {
            out.write(kvtier_counters {
                demotions: k.demotions,
                demotions_skipped: k.demotions_skipped,
                promotions: k.promotions,
                evictions: k.evictions,
                to_cold: k.to_cold,
                from_cold: k.from_cold,
            })
        };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::attention::kvtier_cache_attend;
    use crate::ffi::config::kvtier_config_new;
    use crate::ffi::last_error::kvtier_last_error;
    use std::ptr::null_mut;

    /// The pointer of a live cache, shareable between threads (the handle is Sync).
    #[derive(Clone, Copy)]
    struct Shared(*mut kvtier_cache);
    // SAFETY: `kvtier_cache` is `Sync` (its state sits behind a RwLock) and the test frees it only
    // after every thread has been joined.
    unsafe impl Send for Shared {}
    impl Shared {
        /// By method, so that closures capture the whole `Shared` (not its raw-pointer field).
        fn get(self) -> *mut kvtier_cache {
            self.0
        }
    }

    #[test]
    fn concurrent_calls_on_one_cache() {
        const ROW: usize = 2 * 32;
        let mut cfg = null_mut();
        let mut cache = null_mut();
        let mut seqs = [0u64; 3];
        // SAFETY: out-parameters are live locals; the handles are live until freed at the end.
        unsafe {
            assert_eq!(kvtier_config_new(1, 4, 2, 32, &mut cfg), kvtier_status::Ok);
            assert_eq!(kvtier_cache_new(cfg, &mut cache), kvtier_status::Ok);
            crate::ffi::config::kvtier_config_free(cfg);
            for s in &mut seqs {
                assert_eq!(kvtier_cache_sequence_add(cache, s), kvtier_status::Ok);
                let kv = vec![0.5f32; 40 * ROW];
                let st =
                    kvtier_cache_append(cache, *s, 0, kv.as_ptr(), kv.len(), kv.as_ptr(), kv.len());
                assert_eq!(st, kvtier_status::Ok);
            }
        }
        let shared = Shared(cache);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let cache = shared.get();
                    let q = vec![0.25f32; 2 * 4 * 32];
                    let mut out = vec![0f32; q.len()];
                    for i in 0..50 {
                        // SAFETY: the cache outlives the threads; buffers are live locals.
                        unsafe {
                            if t == 0 {
                                // Appends to its own sequence while the others attend.
                                let kv = vec![0.1f32 * i as f32; ROW];
                                let st = kvtier_cache_append(
                                    cache,
                                    seqs[2],
                                    0,
                                    kv.as_ptr(),
                                    ROW,
                                    kv.as_ptr(),
                                    ROW,
                                );
                                assert_eq!(st, kvtier_status::Ok);
                            } else {
                                let st = kvtier_cache_attend(
                                    cache,
                                    0,
                                    seqs.as_ptr(),
                                    2,
                                    q.as_ptr(),
                                    q.len(),
                                    out.as_mut_ptr(),
                                    out.len(),
                                    std::ptr::null(),
                                );
                                assert_eq!(st, kvtier_status::Ok);
                                assert!(out.iter().all(|x| (x - 0.5).abs() < 1e-2));
                                // Each thread has its own last error.
                                let st = kvtier_cache_sequence_remove(cache, 1000 + t);
                                assert_eq!(st, kvtier_status::UnknownSequence);
                                let mut buf = [0 as std::ffi::c_char; 128];
                                kvtier_last_error(buf.as_mut_ptr(), buf.len(), null_mut());
                                let msg = std::ffi::CStr::from_ptr(buf.as_ptr());
                                assert!(msg.to_str().unwrap().ends_with(&format!("{}", 1000 + t)));
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut len = 0usize;
        // SAFETY: live handle, live local; freed once.
        unsafe {
            assert_eq!(
                kvtier_cache_sequence_len(cache, seqs[2], 0, &mut len),
                kvtier_status::Ok
            );
            assert_eq!(len, 90);
            kvtier_cache_free(cache);
        }
    }

    #[test]
    fn a_panic_while_changing_poisons_the_cache() {
        let mut cfg = null_mut();
        let mut cache = null_mut();
        // SAFETY: out-parameters are live locals; handles are used while live and freed once.
        unsafe {
            assert_eq!(kvtier_config_new(1, 2, 1, 32, &mut cfg), kvtier_status::Ok);
            assert_eq!(kvtier_cache_new(cfg, &mut cache), kvtier_status::Ok);
            let h: &kvtier_cache = &*cache;
            let st = ffi_panic_boundary!("kvtier_test_poison", {
                let _guard = h.write()?;
                panic!("while holding the write lock");
            });
            assert_eq!(st, kvtier_status::Panic);
            let mut seq = 0u64;
            assert_eq!(
                kvtier_cache_sequence_add(cache, &mut seq),
                kvtier_status::Poisoned
            );
            let mut report = kvtier_memory_report::default();
            assert_eq!(
                kvtier_cache_memory_report(cache, &mut report),
                kvtier_status::Poisoned
            );
            kvtier_cache_free(cache);
            crate::ffi::config::kvtier_config_free(cfg);
        }
    }
}
