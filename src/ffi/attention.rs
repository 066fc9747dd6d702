//! Decode attention through the C ABI: host buffers (`kvtier_cache_attend`) and device buffers
//! (`kvtier_cache_attend_device`), with the statistics that come free with it.
//!
//! Owns: [`kvtier_head_stats`], [`kvtier_attention_stats`] (where the caller wants statistics
//! written) and the two attention entry points. Every output buffer is checked against the sizes
//! the call will write (the page counts are read from the cache first) before attention runs, so
//! a failing call writes nothing. Must never: dereference a device address on the host (device
//! addresses are handed to the backend as numbers), or write more than the caller said fits.

use super::boundary::{handle, input, optional_struct, Out};
use super::cache::kvtier_cache;
use super::status::{kvtier_status, FfiError};
use crate::attention::Attention;
use crate::backend::cuda::CudaBuffers;
use crate::backend::metal::MetalBuffers;
use crate::backend::{
    BackendStorage, DeviceBuffers, DeviceLocation, InputDtype, PageResults, Scratch,
};
use crate::cache::Rows;
use crate::cache::{KvCache, SeqId};
use std::ffi::c_void;

/// Statistics of one query head's attention distribution in one step.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct kvtier_head_stats {
    /// Shannon entropy (nats) of the attention weights.
    pub entropy: f32,
    /// Varentropy: variance of the surprisal `-log p` under the weights.
    pub varentropy: f32,
    /// Largest scaled score (`-INFINITY` for an empty sequence).
    pub max_score: f32,
    /// `log sum exp(score)` over the attended tokens (`-INFINITY` for an empty sequence).
    pub log_z: f32,
}

/// Where an attention call writes its statistics: any pair with a count of 0 is not wanted (its
/// pointer is ignored and may be NULL); otherwise the pointer must be non-NULL and the count at
/// least what the call writes. Pass NULL instead of this struct to skip all statistics. A call
/// that wants neither `page_mass` nor `page_offsets` skips the per-page results altogether (on a
/// GPU: the per-page fold and its copy back); one that wants them gets page masses only (on a GPU
/// folded on the device: `n_pages * num_kv_heads` floats come back).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvtier_attention_stats {
    /// `[n_seqs][num_q_heads]`: per sequence of the batch, per query head.
    pub heads: *mut kvtier_head_stats,
    pub heads_len: usize,
    /// The attention mass of every page (sum of its tokens' softmax weights, averaged over the
    /// query heads), the pages of batch entry 0 first; each sequence's masses sum to 1. Needs the
    /// total page count of the batch (see `kvtier_cache_sequence_pages`).
    pub page_mass: *mut f32,
    pub page_mass_len: usize,
    /// `[n_seqs + 1]`: batch entry `i`'s masses are `page_mass[page_offsets[i] ..
    /// page_offsets[i + 1]]`; `page_offsets[n_seqs]` is the total page count.
    pub page_offsets: *mut usize,
    pub page_offsets_len: usize,
}

/// The statistics outputs of one call, checked.
pub(super) struct StatsOut {
    heads: Option<Out<kvtier_head_stats>>,
    page_mass: Option<Out<f32>>,
    page_offsets: Option<Out<usize>>,
}

impl StatsOut {
    /// Checks `stats` (possibly NULL) for a batch whose sequences occupy `pages[i]` pages.
    ///
    /// # Safety
    ///
    /// `stats` must be NULL or point to an initialised `kvtier_attention_stats`.
    pub(super) unsafe fn check(
        stats: *const kvtier_attention_stats,
        n_seqs: usize,
        num_q_heads: usize,
        pages: &[usize],
    ) -> Result<Self, FfiError> {
        // SAFETY: `stats` is NULL or initialised (caller).
        let Some(s) = (unsafe { optional_struct(stats, "stats") })? else {
            return Ok(StatsOut {
                heads: None,
                page_mass: None,
                page_offsets: None,
            });
        };
        let n_heads = n_seqs
            .checked_mul(num_q_heads)
            .ok_or_else(|| FfiError::invalid("n_seqs * num_q_heads overflows"))?;
        let total_pages: usize = pages.iter().sum();
        Ok(StatsOut {
            heads: Out::optional(s.heads, s.heads_len, n_heads, "stats.heads")?,
            page_mass: Out::optional(s.page_mass, s.page_mass_len, total_pages, "stats.page_mass")?,
            page_offsets: Out::optional(
                s.page_offsets,
                s.page_offsets_len,
                n_seqs + 1,
                "stats.page_offsets",
            )?,
        })
    }

    /// A scratch for the call: page masses only when the caller asked for them or for page
    /// offsets, never the per-page lse (the C calls do not return it).
    pub(super) fn scratch(&self) -> Scratch {
        Scratch::with_page_results(if self.wants_pages() {
            PageResults::Masses
        } else {
            PageResults::None
        })
    }

    /// Whether the caller asked for page masses or page offsets.
    pub(super) fn wants_pages(&self) -> bool {
        self.page_mass.is_some() || self.page_offsets.is_some()
    }

    /// Writes what was asked for.
    ///
    /// # Safety
    ///
    /// The buffers named by the `kvtier_attention_stats` given to `check` must be writable for
    /// their counts.
    pub(super) unsafe fn write(&self, att: &Attention) -> Result<(), FfiError> {
        if let Some(out) = &self.heads {
            let heads: Vec<kvtier_head_stats> = att
                .heads
                .iter()
                .map(|h| kvtier_head_stats {
                    entropy: h.entropy,
                    varentropy: h.varentropy,
                    max_score: h.max_score,
                    log_z: h.log_z,
                })
                .collect();
            // SAFETY: checked for `n_seqs * num_q_heads == heads.len()` elements; writable (caller).
            unsafe { out.write(&heads) };
        }
        if let Some(out) = &self.page_mass {
            let masses: Vec<f32> = att.page_mass.iter().flatten().copied().collect();
            // SAFETY: checked for the batch's total page count, which is `masses.len()`.
            unsafe { out.write(&masses) };
        }
        if let Some(out) = &self.page_offsets {
            let mut offsets = Vec::with_capacity(att.page_mass.len() + 1);
            offsets.push(0usize);
            for m in &att.page_mass {
                offsets.push(offsets[offsets.len() - 1] + m.len());
            }
            // SAFETY: checked for `n_seqs + 1 == offsets.len()` elements; writable (caller).
            unsafe { out.write(&offsets) };
        }
        Ok(())
    }
}

/// The device buffers of a device attention call on `cache`'s device: f32 queries and output at
/// device addresses (non-zero for a non-empty batch). CUDA: `CUdeviceptr`s on `stream` (NULL: the
/// default stream). Metal: `id<MTLBuffer>` handles of shared-storage buffers (`stream` must be
/// NULL: the cache waits for its own command queue).
pub(super) fn device_buffers(
    cache: &KvCache,
    n_seqs: usize,
    queries_device: u64,
    output_device: u64,
    stream: *mut c_void,
) -> Result<DeviceBuffers, FfiError> {
    if n_seqs > 0 && queries_device == 0 {
        return Err(FfiError::null("queries_device"));
    }
    if n_seqs > 0 && output_device == 0 {
        return Err(FfiError::null("output_device"));
    }
    if cache.layer_storage(0)?.location() == DeviceLocation::Metal {
        if !stream.is_null() {
            return Err(crate::Error::shape(
                "stream",
                "NULL for a Metal cache (it has no caller stream)",
                "a stream",
            )
            .into());
        }
        return Ok(DeviceBuffers::Metal(MetalBuffers {
            queries: queries_device,
            query_dtype: InputDtype::F32,
            output: output_device,
            queries_offset: 0,
            output_offset: 0,
        }));
    }
    Ok(DeviceBuffers::Cuda(CudaBuffers {
        queries: queries_device,
        query_dtype: InputDtype::F32,
        output: output_device,
        stream: stream as usize as u64,
    }))
}

/// Reads the batch's sequence ids and the pages each occupies in `layer` (which also checks that
/// the layer is in range and every id is known).
///
/// # Safety
///
/// `seqs` must point to `n_seqs` readable `uint64_t`s (or `n_seqs` is 0).
pub(super) unsafe fn batch(
    cache: &KvCache,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
) -> Result<(Vec<SeqId>, Vec<usize>), FfiError> {
    // Every id must be a distinct live sequence: a larger count is refused before anything is
    // read or allocated.
    let live = cache.sequences().count();
    if n_seqs > live {
        return Err(crate::Error::shape(
            "n_seqs",
            format!("at most the {live} live sequences (ids must be distinct)"),
            n_seqs,
        )
        .into());
    }
    // SAFETY: forwarded from the caller.
    let ids: Vec<SeqId> = unsafe { input(seqs, n_seqs, "seqs") }?
        .iter()
        .map(|&s| SeqId(s))
        .collect();
    let pages = ids
        .iter()
        .map(|&s| Ok(cache.page_table(s, layer)?.pages().len()))
        .collect::<Result<Vec<usize>, FfiError>>()?;
    Ok((ids, pages))
}

/// Checks that `queries_len` is a batch's query count, `n_seqs * num_q_heads * head_dim`
/// (overflow-checked), before anything is read; returns it.
pub(super) fn query_len(
    cfg: &crate::CacheConfig,
    n_seqs: usize,
    queries_len: usize,
) -> Result<usize, FfiError> {
    let needed = cfg
        .num_q_heads
        .checked_mul(cfg.head_dim)
        .and_then(|row| row.checked_mul(n_seqs))
        .ok_or_else(|| FfiError::invalid("n_seqs * num_q_heads * head_dim overflows"))?;
    if queries_len != needed {
        return Err(crate::Error::shape(
            "queries",
            format!("{needed} values (n_seqs x num_q_heads x head_dim)"),
            queries_len,
        )
        .into());
    }
    Ok(needed)
}

/// Decode attention in `layer` for a batch of `n_seqs` sequences, one query token each, over every
/// stored token of each sequence (hot pages exact, warm pages read as quantised).
///
/// `seqs` holds the `n_seqs` distinct sequence ids; `queries` is `[n_seqs][num_q_heads][head_dim]`
/// (`queries_len` elements); `output` receives the same shape, so `output_len` must be at least
/// `n_seqs * num_q_heads * head_dim`; it may alias `queries`. `stats` may be NULL, or name buffers for per-head
/// statistics and per-page attention masses. `n_seqs == 0` is a no-op (NULL arrays allowed).
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT`, `BUFFER_TOO_SMALL`, `SHAPE`, `NON_FINITE`,
/// `UNKNOWN_SEQUENCE`, `DUPLICATE_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `POISONED`. On error no buffer
/// is written.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `seqs` and `queries` must hold their counts of readable
/// elements, `output` `output_len` writable floats, and the buffers named in `*stats` (when `stats`
/// is not NULL) their counts of writable elements (any array whose count is 0 may be NULL).
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_attend(
    cache: *const kvtier_cache,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    queries: *const f32,
    queries_len: usize,
    output: *mut f32,
    output_len: usize,
    stats: *const kvtier_attention_stats,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_attend", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let cfg = c.config();
        // Counts first: nothing is read or allocated before they agree.
        let needed = query_len(cfg, n_seqs, queries_len)?;
        let out = Out::new(output, output_len, needed, "output")?;
        // SAFETY: `seqs` holds `n_seqs` readable ids (this function's contract).
        let (ids, pages) = unsafe { batch(&c, layer, seqs, n_seqs) }?;
        // SAFETY: `stats` is NULL or initialised (this function's contract).
        let stats_out = unsafe { StatsOut::check(stats, n_seqs, cfg.num_q_heads, &pages) }?;
        let att = {
            // SAFETY: `queries` holds `queries_len` readable floats (this function's contract).
            let q = unsafe { input(queries, queries_len, "queries") }?;
            c.attend_with(&mut stats_out.scratch(), layer, &ids, Rows::F32(q), None)?
        };
        // The input borrow has ended: `output` may alias `queries`.
        // SAFETY: `out` was checked for `needed == att.output.len()` elements; the stats buffers
        // for their counts; all writable (this function's contract).
        unsafe {
            out.write(&att.output);
            stats_out.write(&att)
        }
    })
}

/// `kvtier_cache_attend` with the queries and the output in device memory: `queries_device` and
/// `output_device` are device addresses of `n_seqs * num_q_heads * head_dim` floats each, on the
/// cache's device: `CUdeviceptr`s for CUDA, with `stream` the `CUstream` (NULL for the default
/// stream); `id<MTLBuffer>` handles of shared-storage buffers for Metal, with `stream` NULL. Statistics are written to host buffers as for
/// `kvtier_cache_attend`.
///
/// A CPU cache returns `KVTIER_STATUS_UNSUPPORTED` (use `kvtier_cache_attend`).
///
/// Errors: as `kvtier_cache_attend`, plus `UNSUPPORTED`, `DEVICE_ERROR`; `NULL_PARAMETER` when a
/// device address is 0 and `n_seqs > 0`.
///
/// # Safety
///
/// As `kvtier_cache_attend` for `cache`, `seqs` and `stats`. The device addresses must be live
/// allocations of the sizes above on the cache's device, usable from `stream`, and not used by
/// anything else until the work queued on `stream` has finished.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_attend_device(
    cache: *const kvtier_cache,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    queries_device: u64,
    output_device: u64,
    stream: *mut c_void,
    stats: *const kvtier_attention_stats,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_attend_device", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        // SAFETY: `seqs` holds `n_seqs` readable ids (this function's contract).
        let (ids, pages) = unsafe { batch(&c, layer, seqs, n_seqs) }?;
        let bufs = device_buffers(&c, n_seqs, queries_device, output_device, stream)?;
        // SAFETY: `stats` is NULL or initialised (this function's contract).
        let stats_out = unsafe { StatsOut::check(stats, n_seqs, c.config().num_q_heads, &pages) }?;
        let att = c.attend_device_with(&mut stats_out.scratch(), layer, &ids, &bufs, None)?;
        // SAFETY: the stats buffers were checked for their counts; writable (this function's
        // contract).
        unsafe { stats_out.write(&att) }
    })
}
