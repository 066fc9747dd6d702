//! Metal backend: MSL kernels through candle-metal-kernels / objc2-metal.
//!
//! Owns: [`MetalDevice`] (an executor with the kernels compiled once), [`MetalStorage`] (one
//! layer's hot and warm pools in shared-storage `MTLBuffer`s, in the CPU's byte formats),
//! [`MetalScratch`] (the caller's reusable plan and result buffers), and the `.metal` kernels
//! embedded with `include_str!`: append, quantise (byte-identical to the CPU), split-K decode over
//! hot and warm pages with the fused statistics, and its combine; page selection is honoured by
//! planning only the selected pages.
//!
//! Pools are in shared storage: on Apple silicon the GPU and the CPU share memory, so the host
//! reads exported pages, results and key bounds in place and nothing is blitted; private storage
//! would add a blit per append and per read-back and save nothing on unified memory.
//!
//! Builds: on macOS with the `metal` feature the executor is Metal (`apple.rs`). With the
//! `metal-emu` feature (any host) it is the emulator (`emu.rs`): the same storage and the same
//! kernel sources, compiled as C++ and run on the CPU, which is how this project's CI (Linux, no
//! Apple GPU) tests them. Otherwise this module holds the typed error and stub types.
//! Must never: panic in `Drop`, hand out host copies of device pages on the hot path, or keep a
//! dequantised copy of a warm page.

mod error;

pub use error::MetalError;

/// Query and output buffers in Metal memory for [`crate::KvCache::attend_device`]: `queries` is
/// `[n_seqs, num_q_heads, head_dim]` in `query_dtype` at byte `queries_offset`, `output` the same
/// shape in f32 at byte `output_offset`, each a buffer handle (`id<MTLBuffer>` in shared storage
/// on Metal; see `MetalBuffer::handle`). The caller keeps both alive, and does not touch them,
/// until the call returns (it waits for the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetalBuffers {
    pub queries: u64,
    pub query_dtype: crate::backend::InputDtype,
    pub output: u64,
    /// Byte offset of the queries in their buffer (a multiple of the element size).
    pub queries_offset: usize,
    /// Byte offset of the output in its buffer (a multiple of 4).
    pub output_offset: usize,
}

#[cfg(all(feature = "metal", target_vendor = "apple"))]
mod apple;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
mod attend;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
mod device;
#[cfg(feature = "metal-emu")]
mod emu;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
mod gpu;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
mod params;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
mod storage;

// The candle tensor interop (src/tensor/metal.rs) reads Metal tensors' buffers in place.
#[cfg(all(feature = "metal", feature = "candle", target_vendor = "apple"))]
pub(crate) use apple::{handle_of, shared_len};
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
pub use attend::MetalScratch;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
pub use device::MetalDevice;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
pub use gpu::MetalBuffer;
#[cfg(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu"))]
pub use storage::MetalStorage;

#[cfg(not(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu")))]
mod stubs {
    use super::MetalError;
    crate::backend::stub::stub_backend!(MetalDevice, MetalStorage, MetalError, "metal", ());

    impl MetalDevice {
        /// The device's name (stub: no value of this type exists).
        pub fn name(&self) -> &str {
            match self._never {}
        }
    }

    /// Reusable decode plan (stub: holds nothing without the backend).
    #[derive(Default)]
    pub struct MetalScratch {
        _private: (),
    }
}
#[cfg(not(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu")))]
pub use stubs::{MetalDevice, MetalScratch, MetalStorage};
