//! Decode steps queued without a host wait: `kvtier_step` (a reusable scratch that holds one
//! pending step), `kvtier_cache_attend_device_async` and `kvtier_cache_finish_device`.
//!
//! Owns: the `kvtier_step` handle (a [`Scratch`] behind a lock, with or without per-page results),
//! and the checks of the two calls. Must never: finish a step into buffers that were not checked
//! for the result's counts, or hold a step's lock across anything but its own call.

use super::attention::{batch, device_buffers, kvtier_attention_stats, StatsOut};
use super::boundary::{handle, OutParam};
use super::cache::kvtier_cache;
use super::status::{kvtier_status, FfiError};
use crate::backend::{PageResults, Scratch};
use std::ffi::c_void;
use std::sync::{Mutex, PoisonError};

/// Working memory of decode steps (the device plan and its staging), and at most one step queued by
/// `kvtier_cache_attend_device_async` and not yet finished. Keep one per layer for steps queued
/// layer after layer. Free with `kvtier_step_free`. Thread-safe (calls on one handle are
/// serialised).
pub struct kvtier_step {
    inner: Mutex<Scratch>,
}

/// A step handle. With `page_results` false its steps return head statistics only (no per-page
/// masses: cheaper on a GPU, see `kvtier_attention_stats`). On success `*step_out` holds a new
/// handle to free with `kvtier_step_free`.
///
/// Errors: `NULL_PARAMETER` (`step_out`).
///
/// # Safety
///
/// `step_out` must be valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_step_new(
    page_results: bool,
    step_out: *mut *mut kvtier_step,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_step_new", {
        let out = OutParam::new(step_out, "step_out")?;
        let s = Scratch::with_page_results(if page_results {
            PageResults::Masses
        } else {
            PageResults::None
        });
        let ptr = Box::into_raw(Box::new(kvtier_step {
            inner: Mutex::new(s),
        }));
        // SAFETY: `out` was checked non-NULL and aligned; writable (this function's contract).
        unsafe { out.write(ptr) };
        Ok(())
    })
}

/// Frees a step handle (a step still queued completes on its stream; its result is dropped). NULL
/// is a no-op.
///
/// # Safety
///
/// `step` must be NULL or a handle from `kvtier_step_new` not freed yet; no other thread may use it
/// during or after this call.
#[no_mangle]
pub unsafe extern "C" fn kvtier_step_free(step: *mut kvtier_step) {
    ffi_panic_boundary_or! { (), "kvtier_step_free", {
        if !step.is_null() {
            // SAFETY: a live handle made by `Box::into_raw` in `kvtier_step_new` (caller), freed
            // once.
            drop(unsafe { Box::from_raw(step) });
        }
        Ok(())
    }}
}

/// `kvtier_cache_attend_device` without waiting: the decode step (and, for a step handle with page
/// results, the page-mass fold) is queued on `stream` and the call returns; the output appears in
/// `output_device` when the stream gets there, and everything the cache later does on the device
/// (appends, page moves) is ordered after the step. `kvtier_cache_finish_device` with the same
/// handle and layer returns its statistics; a step never finished costs nothing more, and the next
/// step on the handle replaces it.
///
/// Errors: as `kvtier_cache_attend_device` (`UNSUPPORTED` on a CPU cache, and for a batch whose
/// sequences hold cold pages: bring them back first); on error nothing is queued.
///
/// # Safety
///
/// As `kvtier_cache_attend_device`; `step` must be NULL or a live step handle. The device buffers
/// and `stream` must stay valid until the stream has run the step.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvtier_cache_attend_device_async(
    cache: *const kvtier_cache,
    step: *const kvtier_step,
    layer: usize,
    seqs: *const u64,
    n_seqs: usize,
    queries_device: u64,
    output_device: u64,
    stream: *mut c_void,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_attend_device_async", {
        // SAFETY: `cache` and `step` are NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        // SAFETY: as above.
        let step = unsafe { handle(step, "step") }?;
        // SAFETY: `seqs` holds `n_seqs` readable ids (this function's contract).
        let (ids, _) = unsafe { batch(&c, layer, seqs, n_seqs) }?;
        let bufs = device_buffers(&c, n_seqs, queries_device, output_device, stream)?;
        let mut s = step.inner.lock().unwrap_or_else(PoisonError::into_inner);
        c.attend_device_async(&mut s, layer, &ids, &bufs, None)?;
        Ok(())
    })
}

/// Waits for the step `kvtier_cache_attend_device_async` queued on `step` in `layer` and writes
/// its statistics as `kvtier_cache_attend_device` does (`stats` may be NULL); the step is consumed.
/// Page masses can be asked for only from a step handle made with page results.
///
/// Errors: `NULL_PARAMETER`, `LAYER_OUT_OF_RANGE`, `STALE` (nothing pending on `step`, or it was
/// queued in another layer), `INVALID_ARGUMENT` (page masses asked of a handle without page
/// results), `BUFFER_TOO_SMALL`, `DEVICE_ERROR`; on error no buffer is written.
///
/// # Safety
///
/// `cache` and `step` must be NULL or live handles; the buffers named in `*stats` (when not NULL)
/// must hold their counts of writable elements.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_finish_device(
    cache: *const kvtier_cache,
    step: *const kvtier_step,
    layer: usize,
    stats: *const kvtier_attention_stats,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_finish_device", {
        // SAFETY: `cache` and `step` are NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        // SAFETY: as above.
        let step = unsafe { handle(step, "step") }?;
        let mut s = step.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let att = c.finish_device(&mut s, layer)?;
        let qh = c.config().num_q_heads;
        let n_seqs = att.heads.len() / qh.max(1);
        let pages: Vec<usize> = if att.has_page_results() {
            att.page_mass.iter().map(Vec::len).collect()
        } else {
            vec![0; n_seqs]
        };
        // SAFETY: `stats` is NULL or initialised (this function's contract).
        let stats_out = unsafe { StatsOut::check(stats, n_seqs, qh, &pages) }?;
        if stats_out.wants_pages() && !att.has_page_results() {
            return Err(FfiError::invalid(
                "page masses asked of a step handle made without page results",
            ));
        }
        // SAFETY: the stats buffers were checked for their counts; writable (this function's
        // contract).
        unsafe { stats_out.write(&att) }
    })
}
