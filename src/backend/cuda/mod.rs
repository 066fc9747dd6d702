//! CUDA backend (cudarc + NVRTC).
//!
//! Owns: device pools of hot and warm pages ([`CudaStorage`]), device page lists and work items
//! ([`DecodePlan`], kept in the caller's [`CudaScratch`]), and the `.cu` kernels (append,
//! quantise, fused split-K decode with its combine, query conversion) compiled lazily by NVRTC
//! once per device and configuration, for the device's own architecture ([`CudaDevice`] caches
//! them).
//!
//! Files: `append.rs` (appends from device memory), `demote.rs` (batched demotion), `device.rs` (context, stream, module cache), `kernels.rs` (sources, specialisation,
//! NVRTC), `pool.rs` (device buffers and slot pools), `plan.rs` (page lists and work items, with
//! or without a page selection), `launch.rs` (launches, reading results back), `storage.rs`
//! (the storage and its trait impl), `transfer.rs` (page bytes to and from the host), `probe.rs`
//! (benchmark probes). Warm pages have exactly the byte layout of
//! [`crate::quant::WarmLayout`], so they can move between backends. Without the `cuda` feature
//! this module holds the typed error and stub types, so code that names the CUDA backend compiles
//! either way.
//!
//! Must never: panic in `Drop` (cudarc records driver errors in the context instead), call cudarc
//! before checking that libcuda / libnvrtc can be loaded (cudarc panics when they cannot), hand
//! out host copies of device pages on the hot path, or keep a dequantised copy of a warm page.

mod error;
pub use error::CudaError;

/// Query and output buffers in CUDA device memory for [`crate::KvCache::attend_device`].
/// `queries` is `[n_seqs, num_q_heads, head_dim]` in `query_dtype`, `output` the same shape in f32;
/// `stream` is a `CUstream` (0: the storage's own stream). The caller keeps both allocations
/// alive until the call returns (the call synchronises its stream before returning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaBuffers {
    pub queries: u64,
    pub query_dtype: crate::backend::InputDtype,
    pub output: u64,
    pub stream: u64,
}

/// Keys and values in CUDA device memory for [`crate::KvCache::append_device`]: `keys` and
/// `values` are `[rows, num_kv_heads, head_dim]` in `dtype`, readable on `stream` (a `CUstream`;
/// 0 is the legacy default stream). The call synchronises `stream` before it returns, so the
/// buffers may be reused as soon as it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaRows {
    pub keys: u64,
    pub values: u64,
    pub dtype: crate::backend::InputDtype,
    pub stream: u64,
}

#[cfg(not(feature = "cuda"))]
mod stubs {
    use super::CudaError;
    crate::backend::stub::stub_backend!(CudaDevice, CudaStorage, CudaError, "cuda", (ordinal: usize));

    /// Reusable decode plan (stub: holds nothing without the `cuda` feature; a braced struct so
    /// that `CudaScratch::default()` reads the same in both builds).
    #[derive(Default)]
    pub struct CudaScratch {
        _private: (),
    }
}
#[cfg(not(feature = "cuda"))]
pub use stubs::{CudaDevice, CudaScratch, CudaStorage};

#[cfg(feature = "cuda")]
mod append;
#[cfg(feature = "cuda")]
mod demote;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod plan;
#[cfg(feature = "cuda")]
mod pool;
#[cfg(feature = "cuda")]
mod probe;
#[cfg(feature = "cuda")]
mod resident;
#[cfg(feature = "cuda")]
mod storage;
#[cfg(feature = "cuda")]
mod transfer;
#[cfg(feature = "cuda")]
pub use device::{compile_for_arch, compile_source, module_source, CudaDevice};
#[cfg(feature = "cuda")]
pub use kernels::CudaTuning;
#[cfg(feature = "cuda")]
pub use launch::FusedRotation;
#[cfg(feature = "cuda")]
pub use plan::DecodePlan;
#[cfg(feature = "cuda")]
pub use storage::{CudaScratch, CudaStorage};
