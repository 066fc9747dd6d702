//! Device memory: single allocations, grow-only scratch buffers and slot pools.
//!
//! Owns: [`DevBuf`] (one device allocation of bytes, freed stream-ordered on drop), [`GrowBuf`] (a
//! scratch buffer that is replaced by a larger one when a call needs more, contents not kept),
//! [`PinnedBuf`] (its page-locked host counterpart, for asynchronous copies) and
//! [`Pool`] (the slots of one tier: one device buffer of `cap * slot_bytes`, a live map and a free
//! list). Must never: shrink a pool (a slot index below `cap` always addresses memory of the current
//! buffer, which is what makes a stale page table memory-safe), lose a pool's contents when a grow
//! fails (the old buffer is kept), or issue work on any stream but the one it was given.

use super::device::{drv, drv_alloc};
use super::CudaError;
use cudarc::driver::{result as cu, CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

/// Page-locked host memory that grows (contents not kept) when a call needs more: the staging of
/// plan uploads and result read-backs, which the driver copies asynchronously (a copy from
/// pageable memory is staged through a driver buffer first, and one to it is synchronous).
///
/// The owner must make sure no copy to or from the buffer is in flight when it is written, read,
/// grown or dropped (the decode plan synchronises its event first).
#[derive(Default)]
pub(crate) struct PinnedBuf {
    ptr: Option<(std::ptr::NonNull<u8>, usize, Arc<CudaContext>)>,
}

// SAFETY: the buffer is plain host memory owned by this value alone (no aliasing handle exists);
// moving or sharing it between threads is as safe as for a `Vec<u8>`.
unsafe impl Send for PinnedBuf {}
// SAFETY: as above; `&PinnedBuf` only reads the pointer and length.
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    /// Makes the buffer hold at least `bytes` (rounded up to a power of two, 4096 minimum) of
    /// `ctx` and returns it as a byte slice.
    pub(crate) fn ensure(
        &mut self,
        ctx: &Arc<CudaContext>,
        bytes: usize,
    ) -> std::result::Result<&mut [u8], CudaError> {
        let fits = self
            .ptr
            .as_ref()
            .is_some_and(|(_, len, c)| *len >= bytes && Arc::ptr_eq(c, ctx));
        if !fits {
            self.free();
            let len = bytes.max(4096).next_power_of_two();
            ctx.bind_to_thread().map_err(drv)?;
            // SAFETY: a plain page-locked allocation (no flags: cached, readable from the host);
            // freed in `free`.
            let p = unsafe { cu::malloc_host(len, 0) }.map_err(|e| drv_alloc(e, len))?;
            let p = std::ptr::NonNull::new(p.cast::<u8>())
                .ok_or_else(|| CudaError::Driver("cuMemHostAlloc returned NULL".into()))?;
            self.ptr = Some((p, len, ctx.clone()));
        }
        Ok(self.slice_mut())
    }
    /// [`PinnedBuf::ensure`] for `n` f32, as f32.
    pub(crate) fn ensure_f32(
        &mut self,
        ctx: &Arc<CudaContext>,
        n: usize,
    ) -> std::result::Result<&mut [f32], CudaError> {
        let bytes = self.ensure(ctx, n * 4)?;
        // SAFETY: the allocation is page-aligned (hence 4-aligned) and holds at least `4 * n`
        // bytes; every bit pattern is a valid f32; the borrow of `self` carries over.
        Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), n) })
    }
    /// The whole buffer (empty before the first `ensure`).
    pub(crate) fn slice_mut(&mut self) -> &mut [u8] {
        match &self.ptr {
            // SAFETY: `p` points to `len` bytes allocated by `ensure` and owned by `self`, which is
            // borrowed mutably for the slice's lifetime.
            Some((p, len, _)) => unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), *len) },
            None => &mut [],
        }
    }
    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.ptr.as_ref().map_or(0, |(_, len, _)| *len)
    }
    fn free(&mut self) {
        if let Some((p, _, ctx)) = self.ptr.take() {
            // Nothing to report to from a drop; a failure leaks the buffer.
            let _ = ctx.bind_to_thread();
            // SAFETY: `p` came from `cuMemHostAlloc` in `ensure` and is freed once (taken out of
            // `self`); the owner guarantees no copy is in flight.
            let _ = unsafe { cu::free_host(p.as_ptr().cast()) };
        }
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// A device allocation of bytes.
pub(crate) struct DevBuf {
    s: CudaSlice<u8>,
}

impl DevBuf {
    /// Allocates at least `bytes` (16 minimum) uninitialised bytes, stream-ordered on `stream`.
    pub(crate) fn alloc(
        stream: &Arc<CudaStream>,
        bytes: usize,
    ) -> std::result::Result<Self, CudaError> {
        let bytes = bytes.max(16);
        // SAFETY: the memory is uninitialised; every user either writes before reading (pools,
        // staging, scratch) or zeroes it right after allocation (`GrowBuf::ensure` with `zero`,
        // `CudaStorage::alloc_hot`).
        let s = unsafe { stream.alloc::<u8>(bytes) }.map_err(|e| drv_alloc(e, bytes))?;
        Ok(DevBuf { s })
    }
    /// Device address of the first byte.
    pub(crate) fn ptr(&self) -> u64 {
        let (p, _sync) = self.s.device_ptr(self.s.stream());
        p
    }
    /// Bytes allocated.
    pub(crate) fn len(&self) -> usize {
        self.s.len()
    }
}

/// A scratch buffer that grows (without keeping contents) when a call needs more.
#[derive(Default)]
pub(crate) struct GrowBuf {
    b: Option<DevBuf>,
}

impl GrowBuf {
    /// Makes the buffer hold at least `bytes` (rounded up to a power of two, 256 minimum) and
    /// returns its address. A new buffer is zeroed on `stream` when `zero` is set; an existing
    /// buffer that is large enough is returned as it is.
    pub(crate) fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        bytes: usize,
        zero: bool,
    ) -> std::result::Result<u64, CudaError> {
        if self.b.as_ref().is_none_or(|b| b.len() < bytes) {
            let nb = DevBuf::alloc(stream, bytes.max(256).next_power_of_two())?;
            if zero {
                // SAFETY: `nb` is a live allocation of `nb.len()` bytes, ordered on `stream`.
                unsafe { cu::memset_d8_async(nb.ptr(), 0, nb.len(), stream.cu_stream()) }
                    .map_err(drv)?;
            }
            self.b = Some(nb);
        }
        Ok(self.ptr())
    }
    /// Device address (0 before the first `ensure`).
    pub(crate) fn ptr(&self) -> u64 {
        self.b.as_ref().map_or(0, DevBuf::ptr)
    }
    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.b.as_ref().map_or(0, DevBuf::len)
    }
}

/// Slots of one tier: one device buffer of `cap * slot_bytes`, slot `i` at `i * slot_bytes`.
pub(crate) struct Pool {
    buf: Option<DevBuf>,
    pub(crate) slot_bytes: usize,
    cap: usize,
    live: Vec<bool>,
    free: Vec<u32>,
}

impl Pool {
    pub(crate) fn new(slot_bytes: usize) -> Self {
        Pool {
            buf: None,
            slot_bytes,
            cap: 0,
            live: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Grows the buffer to at least `cap` slots, copying the old contents on the stream. On
    /// failure nothing changes.
    pub(crate) fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        cap: usize,
    ) -> std::result::Result<(), CudaError> {
        if cap <= self.cap {
            return Ok(());
        }
        let bytes = cap
            .checked_mul(self.slot_bytes)
            .ok_or(CudaError::OutOfMemory { bytes: usize::MAX })?;
        let nb = DevBuf::alloc(stream, bytes)?;
        if let Some(old) = &self.buf {
            // SAFETY: both ranges are live allocations of at least `self.cap * slot_bytes` bytes;
            // the copy is ordered on the stream after every kernel that wrote `old`, and `old` is
            // freed (stream-ordered) only after the copy.
            unsafe {
                cu::memcpy_dtod_async(
                    nb.ptr(),
                    old.ptr(),
                    self.cap * self.slot_bytes,
                    stream.cu_stream(),
                )
            }
            .map_err(drv)?;
        }
        self.buf = Some(nb);
        self.cap = cap;
        Ok(())
    }

    /// A free slot (its bytes are whatever they were: the caller initialises them).
    pub(crate) fn alloc(
        &mut self,
        stream: &Arc<CudaStream>,
    ) -> std::result::Result<u32, CudaError> {
        if let Some(s) = self.free.pop() {
            self.live[s as usize] = true;
            return Ok(s);
        }
        let next = self.live.len();
        if next >= u32::MAX as usize {
            return Err(CudaError::OutOfMemory { bytes: 0 });
        }
        if next >= self.cap {
            let want = (self.cap * 2).max(16).max(next + 1);
            self.reserve(stream, want)?;
        }
        self.live.push(true);
        Ok(next as u32)
    }

    pub(crate) fn is_live(&self, slot: u32) -> bool {
        self.live.get(slot as usize).copied().unwrap_or(false)
    }

    /// Frees a live slot; false when it was not live.
    pub(crate) fn release(&mut self, slot: u32) -> bool {
        match self.live.get_mut(slot as usize) {
            Some(l) if *l => {
                *l = false;
                self.free.push(slot);
                true
            }
            _ => false,
        }
    }

    /// Device address of slot 0 (0 before the first allocation).
    pub(crate) fn base(&self) -> u64 {
        self.buf.as_ref().map_or(0, DevBuf::ptr)
    }

    pub(crate) fn slot_ptr(&self, slot: u32) -> u64 {
        self.base() + slot as u64 * self.slot_bytes as u64
    }

    /// Payload bytes allocated (`cap` slots).
    pub(crate) fn bytes(&self) -> usize {
        self.cap * self.slot_bytes
    }

    /// Host bookkeeping bytes (live map and free list).
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.live.capacity() + self.free.capacity() * 4
    }
}
