//! The host emulator executor (feature `metal-emu`): the kernels of `kernels/*.metal` compiled as
//! C++ by build.rs against `emu/shim.h`, run on the CPU.
//!
//! Owns: [`EmuGpu`] and [`EmuMem`] (heap buffers standing in for shared MTLBuffers; a buffer's
//! handle is the address of its `EmuMem`). It exists so that the Metal storage, its plans and the
//! MSL sources are tested on machines without an Apple GPU (this project's CI): everything above
//! the executor is the code that runs on a Mac.
//! Must never: be mistaken for a GPU (it reports itself as an emulator; its speed means nothing),
//! or run two launches at once (the C++ runtime has one fiber scheduler: a process-wide lock).

use super::gpu::{BufInner, Dispatch, Kernel, MetalBuffer};
use super::MetalError;
use crate::error::Result;
use std::sync::Mutex;

extern "C" {
    fn kvt_emu_run(
        kernel: i32,
        groups: u32,
        threads: u32,
        tg_bytes: usize,
        bufs: *const *mut u8,
        n_bufs: usize,
        params: *const u8,
    ) -> i32;
}

/// One launch at a time (the runtime's scheduler is global).
static RUN: Mutex<()> = Mutex::new(());

/// A heap buffer aligned to 16 bytes (as Metal buffers are at least).
pub(crate) struct EmuMem {
    words: Vec<u128>,
}

impl EmuMem {
    /// The handle of the buffer: the address of this `EmuMem` (stable: it lives in a `Box`).
    pub(crate) fn handle(&self) -> u64 {
        self as *const EmuMem as usize as u64
    }
}

/// The emulator executor.
pub(crate) struct EmuGpu;

impl EmuGpu {
    pub(crate) fn alloc(&self, bytes: usize) -> Result<MetalBuffer> {
        let n = bytes.div_ceil(16);
        let mut words = Vec::new();
        words
            .try_reserve_exact(n)
            .map_err(|_| MetalError::OutOfMemory { bytes })?;
        words.resize(n, 0u128);
        let mem = Box::new(EmuMem { words });
        let ptr = mem.words.as_ptr() as *mut u8;
        Ok(MetalBuffer {
            ptr,
            len: bytes,
            inner: BufInner::Emu(mem),
        })
    }

    /// # Safety
    ///
    /// `handle` must be [`MetalBuffer::handle`] of a live emulator buffer that outlives the
    /// returned value.
    pub(crate) unsafe fn wrap(&self, handle: u64) -> Result<MetalBuffer> {
        // SAFETY: the caller guarantees `handle` is the address of a live `EmuMem`.
        let mem = unsafe { &*(handle as usize as *const EmuMem) };
        Ok(MetalBuffer {
            ptr: mem.words.as_ptr() as *mut u8,
            len: mem.words.len() * 16,
            inner: BufInner::Borrowed,
        })
    }

    pub(crate) fn run(&self, list: &[Dispatch]) -> Result<()> {
        let _one = RUN.lock().unwrap_or_else(|e| e.into_inner());
        for d in list {
            if d.groups == 0 {
                continue;
            }
            let kid = match d.kernel {
                Kernel::Append => 0,
                Kernel::Quantize => 1,
                Kernel::Decode => 2,
                Kernel::Combine => 3,
            };
            // SAFETY: offsets were checked against each buffer's length by `Gpu::run`.
            let ptrs: Vec<*mut u8> = d
                .bufs
                .iter()
                .map(|&(b, off)| unsafe { b.ptr.add(off) })
                .collect();
            // Parameters aligned for the C++ side's struct reads.
            let mut params = vec![0u128; d.params.len().div_ceil(16).max(1)];
            bytemuck::cast_slice_mut::<u128, u8>(&mut params)[..d.params.len()]
                .copy_from_slice(d.params);
            // SAFETY: every pointer is inside a live buffer; the kernels index within the sizes
            // the storage allocated for this dispatch (the same contract as on Metal); the lock
            // above serialises the runtime.
            let rc = unsafe {
                kvt_emu_run(
                    kid,
                    d.groups,
                    d.threads,
                    d.tg_bytes,
                    ptrs.as_ptr(),
                    ptrs.len(),
                    params.as_ptr() as *const u8,
                )
            };
            if rc != 0 {
                return Err(
                    MetalError::Command(format!("emulator refused {}", d.kernel.name())).into(),
                );
            }
        }
        Ok(())
    }
}
