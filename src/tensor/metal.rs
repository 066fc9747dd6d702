//! candle tensors on Metal devices, in place (macOS, features `metal` and `candle`).
//!
//! Owns: reading a contiguous Metal tensor's shared buffer as rows (Apple silicon's unified
//! memory: the host reads the GPU's bytes where they are), and passing a query tensor's buffer to
//! the Metal decode by handle, with the output written into a new f32 Metal tensor.
//! Must never: read a buffer before candle's queued work on it has completed (every path waits on
//! the tensor's device first), or fail where the copying path would work (`None` falls back to it:
//! private buffers, another device, a non-Metal cache).

use crate::attention::Attention;
use crate::backend::metal::{handle_of, shared_len, MetalBuffers, MetalError};
use crate::backend::{BackendStorage, DeviceBuffers, DeviceLocation, InputDtype};
use crate::cache::{KvCache, Rows, SeqId};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Storage, Tensor};
use half::{bf16, f16};

/// The rows of `t` read in place, handed to `f`; `Ok(None)` when `t` is not a contiguous tensor
/// in a shared Metal buffer.
fn with_rows<R>(t: &Tensor, f: impl FnOnce(Rows) -> Result<R>) -> Result<Option<R>> {
    let Device::Metal(md) = t.device() else {
        return Ok(None);
    };
    if !t.is_contiguous() {
        return Ok(None);
    }
    // candle queues its work: let everything that writes `t` finish before the host reads it.
    md.wait_until_completed()?;
    let (st, layout) = t.storage_and_layout();
    let Storage::Metal(ms) = &*st else {
        return Ok(None);
    };
    let Some(len) = shared_len(ms.buffer()) else {
        return Ok(None);
    };
    let n = t.elem_count();
    let size = t.dtype().size_in_bytes();
    let off = layout.start_offset() * size;
    if off.checked_add(n * size).is_none_or(|e| e > len) {
        return Err(Error::internal(format!(
            "a Metal tensor of {n} elements at byte {off} in a {len}-byte buffer"
        )));
    }
    let base = ms.buffer().contents() as *const u8;
    // SAFETY: `base + off .. + n * size` lies in the shared buffer's contents (checked above),
    // aligned for the dtype (Metal buffers are page-aligned and `off` is a whole number of
    // elements); candle's writes to it have completed (waited above) and the storage read guard
    // `st` keeps the buffer alive, unchanged, while `f` runs.
    let rows = unsafe {
        let p = base.add(off);
        match t.dtype() {
            DType::F32 => Rows::F32(std::slice::from_raw_parts(p as *const f32, n)),
            DType::F16 => Rows::F16(std::slice::from_raw_parts(p as *const f16, n)),
            DType::BF16 => Rows::BF16(std::slice::from_raw_parts(p as *const bf16, n)),
            _ => return Ok(None),
        }
    };
    let r = f(rows)?;
    drop(st);
    Ok(Some(r))
}

/// [`KvCache::append_tensors`] in place, when both tensors are readable so.
pub(super) fn append(
    cache: &mut KvCache,
    seq: SeqId,
    layer: usize,
    keys: &Tensor,
    values: &Tensor,
) -> Result<Option<()>> {
    let done = with_rows(keys, |k| {
        with_rows(values, |v| cache.append_rows(seq, layer, k, v))
    })?;
    Ok(done.flatten())
}

/// [`KvCache::attend_tensor`] on a Metal cache with queries on a Metal device.
pub(super) fn attend(
    cache: &KvCache,
    layer: usize,
    seqs: &[SeqId],
    queries: &Tensor,
) -> Result<Option<(Tensor, Attention)>> {
    let Device::Metal(md) = queries.device() else {
        return Ok(None);
    };
    if cache.layer_storage(layer)?.location() != DeviceLocation::Metal || !queries.is_contiguous() {
        return Ok(None);
    }
    let query_dtype = match queries.dtype() {
        DType::F32 => InputDtype::F32,
        DType::F16 => InputDtype::F16,
        DType::BF16 => InputDtype::BF16,
        _ => return Ok(None),
    };
    let out = Tensor::zeros(queries.dims(), DType::F32, queries.device())?;
    // The queries and the zeroed output exist once candle's queue has run.
    md.wait_until_completed()?;
    let (qs, ql) = queries.storage_and_layout();
    let (os, ol) = out.storage_and_layout();
    let (Storage::Metal(qm), Storage::Metal(om)) = (&*qs, &*os) else {
        return Ok(None);
    };
    if shared_len(qm.buffer()).is_none() || shared_len(om.buffer()).is_none() {
        return Ok(None);
    }
    let bufs = DeviceBuffers::Metal(MetalBuffers {
        queries: handle_of(qm.buffer()),
        query_dtype,
        output: handle_of(om.buffer()),
        queries_offset: ql.start_offset() * queries.dtype().size_in_bytes(),
        output_offset: ol.start_offset() * 4,
    });
    let att = match cache.attend_device(layer, seqs, bufs) {
        Ok(a) => a,
        // A buffer of another Metal device than the cache's: the copying path still works.
        Err(Error::Metal(MetalError::Command(_))) => return Ok(None),
        Err(e) => return Err(e),
    };
    drop((qs, os));
    Ok(Some((out, att)))
}
