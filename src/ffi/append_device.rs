//! Appends from device memory through the C ABI: `kvtier_cache_append_device`.
//!
//! Owns: the checks of the call (handle, counts against the live sequences before anything is
//! read or allocated, NULL device addresses, the dtype) and its mapping onto
//! [`crate::KvCache::append_device`]. Must never: dereference a device address on the host, or
//! read the caller's arrays past the counts it gave.

use super::boundary::{handle, input};
use super::cache::kvtier_cache;
use super::pages::kvtier_dtype;
use super::status::{kvtier_status, FfiError};
use crate::backend::cuda::CudaRows;
use crate::backend::{DeviceRows, InputDtype};
use crate::cache::SeqId;
use std::ffi::c_void;

/// Appends `counts[i]` tokens to sequence `seqs[i]` (distinct) in `layer`, for `i < n_seqs`, from
/// keys and values in CUDA device memory: `keys_device` and `values_device` are `CUdeviceptr`s of
/// `[sum of counts][num_kv_heads][head_dim]` elements of `dtype` (`kvtier_dtype`), the rows of the
/// entries one after another, readable on `stream` (a `CUstream`; NULL for the legacy default
/// stream). A decode step is `counts` all 1; a prefill chunk one entry with its token count. One
/// launch converts the rows to the hot dtype (and rotates them for a rotated cache); the pages
/// leaving the hot window are then demoted in one launch. The stored bytes equal those of
/// `kvtier_cache_append_typed` with the same values.
///
/// Every element is checked as a host append checks it; a bad one fails the whole batch
/// (`NON_FINITE` or `OUT_OF_RANGE`, the last error naming its index) and no sequence changes. The
/// call synchronises `stream` before it returns, so the buffers may be reused at once.
///
/// Errors: `NULL_PARAMETER` (`cache`; `seqs` or `counts` with `n_seqs > 0`; a device address of 0
/// with rows to append), `INVALID_ARGUMENT` (unknown dtype), `SHAPE` (more entries than live
/// sequences, misaligned device addresses), `UNKNOWN_SEQUENCE`, `DUPLICATE_SEQUENCE`,
/// `LAYER_OUT_OF_RANGE`, `SEQUENCE_TOO_LONG`, `BUDGET_EXCEEDED`, `NON_FINITE`, `OUT_OF_RANGE`,
/// `UNSUPPORTED` (a cache not on a CUDA device), `DEVICE_ERROR`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `seqs` and `counts` must hold `n_seqs` readable
/// elements each (NULL when `n_seqs` is 0). The device addresses must be live allocations of the
/// sizes above on the cache's device, usable from `stream`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn kvtier_cache_append_device(
    cache: *mut kvtier_cache,
    layer: usize,
    seqs: *const u64,
    counts: *const usize,
    n_seqs: usize,
    dtype: u32,
    keys_device: u64,
    values_device: u64,
    stream: *mut c_void,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_append_device", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        let dtype = match super::pages::dtype_of(dtype)? {
            kvtier_dtype::F32 => InputDtype::F32,
            kvtier_dtype::F16 => InputDtype::F16,
            kvtier_dtype::BF16 => InputDtype::BF16,
        };
        let live = c.sequences().count();
        if n_seqs > live {
            return Err(crate::Error::shape(
                "append_device",
                format!("n_seqs <= {live} live sequences"),
                format!("n_seqs {n_seqs}"),
            )
            .into());
        }
        // SAFETY: `seqs` and `counts` hold `n_seqs` readable elements (this function's contract).
        let (ids, ns) = unsafe {
            (
                input(seqs, n_seqs, "seqs")?,
                input(counts, n_seqs, "counts")?,
            )
        };
        let batch: Vec<(SeqId, usize)> = ids.iter().zip(ns).map(|(&s, &n)| (SeqId(s), n)).collect();
        if ns.iter().any(|&n| n > 0) {
            if keys_device == 0 {
                return Err(FfiError::null("keys_device"));
            }
            if values_device == 0 {
                return Err(FfiError::null("values_device"));
            }
        }
        let rows = DeviceRows::Cuda(CudaRows {
            keys: keys_device,
            values: values_device,
            dtype,
            stream: stream as usize as u64,
        });
        c.append_device(layer, &batch, &rows)?;
        Ok(())
    })
}
