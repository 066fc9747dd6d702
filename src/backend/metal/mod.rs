//! Metal backend (candle-metal-kernels).
//!
//! Owns: device pools of hot and warm pages, device page tables, and the `.metal` kernels compiled
//! lazily once per device. Until the kernels land this module holds the typed error and stub types,
//! so code that names the Metal backend compiles with or without the `metal` feature.
//! Must never: panic in `Drop` (record the error instead) or hand out host copies of device pages.

mod error;

pub use error::MetalError;

/// Query and output buffers in Metal device memory (reserved: the Metal kernels are not written
/// yet, so nothing accepts them today).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetalBuffers {
    /// `MTLBuffer` of the queries (an opaque handle).
    pub queries: u64,
    /// `MTLBuffer` of the f32 output.
    pub output: u64,
}

mod stubs {
    use super::MetalError;
    crate::backend::stub::stub_backend!(MetalDevice, MetalStorage, MetalError, "metal", ());
}
pub use stubs::{MetalDevice, MetalStorage};
