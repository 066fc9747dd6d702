//! CUDA backend (cudarc + NVRTC).
//!
//! Owns: device pools of hot and warm pages ([`CudaStorage`]), device page tables and work items
//! ([`DecodePlan`]), and the `.cu` kernels (append, quantise, fused split-K decode with its
//! combine) compiled lazily by NVRTC once per device and configuration, for the device's own
//! architecture ([`CudaDevice`] caches them). Warm pages have exactly the byte layout of
//! [`crate::quant::WarmLayout`], so they can move between backends. Without the `cuda` feature
//! this module holds the typed error and stub types, so code that names the CUDA backend compiles
//! either way.
//!
//! Must never: panic in `Drop` (cudarc records driver errors in the context instead), call cudarc
//! before checking that libcuda / libnvrtc can be loaded (cudarc panics when they cannot), hand
//! out host copies of device pages on the hot path, or keep a dequantised copy of a warm page.

mod error;
pub use error::CudaError;

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaDevice, CudaStorage};

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod storage;
#[cfg(feature = "cuda")]
pub use device::{compile_for_arch, compile_source, CudaDevice};
#[cfg(feature = "cuda")]
pub use kernels::CudaTuning;
#[cfg(feature = "cuda")]
pub use storage::{CudaStorage, DecodePlan};
