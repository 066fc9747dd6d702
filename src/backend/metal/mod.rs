//! Metal backend (candle-metal-kernels).
//!
//! Owns: device pools of hot and warm pages, device page tables, and the `.metal` kernels compiled
//! lazily once per device. Until the kernels land this module holds the typed error and stub types,
//! so code that names the Metal backend compiles with or without the `metal` feature.
//! Must never: panic in `Drop` (record the error instead) or hand out host copies of device pages.

mod error;
mod stub;

pub use error::MetalError;
pub use stub::{MetalDevice, MetalStorage};
