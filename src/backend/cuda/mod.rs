//! CUDA backend (cudarc + NVRTC).
//!
//! Owns: device pools of hot and warm pages, device page tables, and the `.cu` kernels compiled
//! lazily once per device. Until the kernels land this module holds the typed error and stub types,
//! so code that names the CUDA backend compiles with or without the `cuda` feature.
//! Must never: panic in `Drop` (record the error instead) or hand out host copies of device pages.

mod error;
mod stub;

pub use error::CudaError;
pub use stub::{CudaDevice, CudaStorage};
