//! The executor under the Metal storage: host-visible buffers and ordered kernel dispatches.
//!
//! Owns: [`MetalBuffer`] (a buffer in shared storage: the GPU and the host see the same bytes,
//! which on Apple silicon's unified memory costs no copy), [`Gpu`] (allocates buffers and runs a
//! list of dispatches in order, waiting for them), and the kernel ABI ([`Kernel`], [`Dispatch`]).
//! Two executors implement it: the Metal one (`apple.rs`, macOS only) and the emulator
//! (`emu.rs`, feature `metal-emu`), which runs the same `.metal` sources compiled as C++ against
//! a shim of the Metal standard library, so the storage above and the kernels are exercised on
//! machines without an Apple GPU.
//! Must never: decide anything about pages (the storage does), or return before the dispatches it
//! was given have finished (the storage reads results straight from shared memory).

use super::MetalError;
use crate::error::Result;

/// The kernels of `kernels/*.metal`, by function name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// `kvt_append`: f32 / f16 / bf16 rows into a hot page.
    Append,
    /// `kvt_quantize`: one hot page into one warm page (byte-identical to the CPU).
    Quantize,
    /// `kvt_decode`: one page of one kv head for its GQA group: partial softmax state and sums.
    Decode,
    /// `kvt_combine`: merges a (sequence, q head)'s page partials into output and statistics.
    Combine,
}

impl Kernel {
    #[cfg_attr(not(all(feature = "metal", target_vendor = "apple")), allow(dead_code))]
    pub(crate) const ALL: [Kernel; 4] = [
        Kernel::Append,
        Kernel::Quantize,
        Kernel::Decode,
        Kernel::Combine,
    ];
    /// The MSL function name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Append => "kvt_append",
            Kernel::Quantize => "kvt_quantize",
            Kernel::Decode => "kvt_decode",
            Kernel::Combine => "kvt_combine",
        }
    }
}

/// One kernel launch: a 1-D grid of `groups` threadgroups of `threads` threads.
pub(crate) struct Dispatch<'a> {
    pub kernel: Kernel,
    pub groups: u32,
    /// Threads per threadgroup: a multiple of 32 (one SIMD group), at most 256.
    pub threads: u32,
    /// Bytes of threadgroup memory bound at `[[threadgroup(0)]]` (a multiple of 16).
    pub tg_bytes: usize,
    /// Buffers bound at `[[buffer(0)]]`, `[[buffer(1)]]`, ... with their byte offsets.
    pub bufs: &'a [(&'a MetalBuffer, usize)],
    /// The kernel's parameter struct, bound at `[[buffer(bufs.len())]]` (`constant`).
    pub params: &'a [u8],
}

/// The most threadgroup memory a dispatch may ask for: the 32 KiB every Apple GPU family has.
pub(crate) const MAX_TG_BYTES: usize = 32 * 1024;

/// A buffer in shared storage: `contents()` is valid for `len()` bytes while it lives.
pub struct MetalBuffer {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
    #[allow(dead_code)] // holds the allocation (released on drop)
    pub(crate) inner: BufInner,
}

// SAFETY: the buffer is plain shared memory owned by this value (a retained MTLBuffer or a heap
// allocation); access to the bytes is ordered by the storage (`&mut self` for writes, dispatches
// wait before returning).
unsafe impl Send for MetalBuffer {}
// SAFETY: as above; `&MetalBuffer` hands out only the raw pointer.
unsafe impl Sync for MetalBuffer {}

pub(crate) enum BufInner {
    #[cfg(all(feature = "metal", target_vendor = "apple"))]
    Apple(candle_metal_kernels::metal::Buffer),
    #[cfg(feature = "metal-emu")]
    Emu(Box<super::emu::EmuMem>),
    /// A caller's buffer wrapped for one call (not owned; see [`Gpu::wrap`]).
    #[allow(dead_code)]
    Borrowed,
}

impl MetalBuffer {
    /// Bytes of the buffer.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The shared bytes (host-visible).
    pub fn contents(&self) -> *mut u8 {
        self.ptr
    }
    /// The handle that [`super::MetalBuffers`] and the C ABI take for this buffer: the
    /// `id<MTLBuffer>` on Metal, the emulator's own handle under `metal-emu`.
    pub fn handle(&self) -> u64 {
        match &self.inner {
            #[cfg(all(feature = "metal", target_vendor = "apple"))]
            BufInner::Apple(b) => super::apple::handle_of(b),
            #[cfg(feature = "metal-emu")]
            BufInner::Emu(m) => m.handle(),
            BufInner::Borrowed => self.ptr as usize as u64,
        }
    }
    /// Copies `src` to byte offset `at` (no kernel reads the buffer meanwhile: every kvtier
    /// call waits for its dispatches).
    pub fn write(&mut self, at: usize, src: &[u8]) -> Result<()> {
        let end = at
            .checked_add(src.len())
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                crate::Error::Internal(format!("metal buffer write past {}", self.len))
            })?;
        // SAFETY: `at..end` is inside the allocation (checked above); `&mut self` excludes other
        // host access, and no dispatch is in flight (runs wait before returning).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), end - at) };
        Ok(())
    }
    /// The bytes `at..at + n`.
    pub fn bytes(&self, at: usize, n: usize) -> Result<&[u8]> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                crate::Error::Internal(format!("metal buffer read past {}", self.len))
            })?;
        if n == 0 {
            return Ok(&[]);
        }
        // SAFETY: inside the allocation (checked above); writes need `&mut self`, and no dispatch
        // is in flight when the storage reads.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(at), end - at) })
    }
    /// The bytes `at..at + n`, mutable.
    pub(crate) fn bytes_mut(&mut self, at: usize, n: usize) -> Result<&mut [u8]> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                crate::Error::Internal(format!("metal buffer write past {}", self.len))
            })?;
        if n == 0 {
            return Ok(&mut []);
        }
        // SAFETY: inside the allocation; `&mut self` gives exclusive host access.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), end - at) })
    }
}

/// An executor (see the module docs).
pub(crate) enum Gpu {
    #[cfg(all(feature = "metal", target_vendor = "apple"))]
    Apple(super::apple::AppleGpu),
    #[cfg(feature = "metal-emu")]
    Emu(super::emu::EmuGpu),
}

impl Gpu {
    /// A zeroed shared buffer of `bytes` (at least 16, so that every binding is valid).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<MetalBuffer> {
        let bytes = bytes.max(16);
        let b = match self {
            #[cfg(all(feature = "metal", target_vendor = "apple"))]
            Gpu::Apple(g) => g.alloc(bytes)?,
            #[cfg(feature = "metal-emu")]
            Gpu::Emu(g) => g.alloc(bytes)?,
        };
        // SAFETY: a fresh allocation of `bytes` bytes that nothing else references yet.
        unsafe { std::ptr::write_bytes(b.ptr, 0, b.len) };
        Ok(b)
    }

    /// The caller's buffer `handle` (see [`MetalBuffer::handle`]) for one call, not owned.
    ///
    /// # Safety
    ///
    /// `handle` must be a live buffer of this executor (an `id<MTLBuffer>` in shared storage on
    /// Metal) that outlives the returned value, with no other access to it during the call.
    pub(crate) unsafe fn wrap(&self, handle: u64) -> Result<MetalBuffer> {
        if handle == 0 {
            return Err(MetalError::Command("a null buffer handle".into()).into());
        }
        match self {
            #[cfg(all(feature = "metal", target_vendor = "apple"))]
            // SAFETY: forwarded (the caller's contract).
            Gpu::Apple(g) => unsafe { g.wrap(handle) },
            #[cfg(feature = "metal-emu")]
            // SAFETY: forwarded (the caller's contract).
            Gpu::Emu(g) => unsafe { g.wrap(handle) },
        }
    }

    /// Runs `list` in order and waits for the last one.
    pub(crate) fn run(&self, list: &[Dispatch]) -> Result<()> {
        for d in list {
            if d.threads == 0 || d.threads % 32 != 0 || d.threads > 256 {
                return Err(MetalError::Command(format!(
                    "{}: {} threads per threadgroup",
                    d.kernel.name(),
                    d.threads
                ))
                .into());
            }
            if d.tg_bytes > MAX_TG_BYTES || d.tg_bytes % 16 != 0 {
                return Err(MetalError::Command(format!(
                    "{}: {} bytes of threadgroup memory",
                    d.kernel.name(),
                    d.tg_bytes
                ))
                .into());
            }
            for &(b, off) in d.bufs {
                if off >= b.len {
                    return Err(crate::Error::Internal(format!(
                        "{}: offset {off} past a {}-byte buffer",
                        d.kernel.name(),
                        b.len
                    )));
                }
            }
        }
        match self {
            #[cfg(all(feature = "metal", target_vendor = "apple"))]
            Gpu::Apple(g) => g.run(list),
            #[cfg(feature = "metal-emu")]
            Gpu::Emu(g) => g.run(list),
        }
    }
}
