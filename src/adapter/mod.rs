//! Engine adapters: kvtier behind the cache interfaces other engines define.
//!
//! Owns: one module per engine interface, each behind its own feature, so the core never links an
//! engine's crates. Must never: hold state of its own beyond the mapping from the interface's
//! notions (batch rows, layers) to kvtier sequences; the cache decides everything else.

#[cfg(feature = "mistralrs")]
pub mod mistralrs;
