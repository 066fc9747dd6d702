//! The crate's one error type.
//!
//! Owns: every failure a caller can see, as a typed variant with a message that names the offending
//! input. Backend-specific enums (`CpuError`, `CudaError`, `MetalError`) fold in here. The C ABI maps
//! these to numbered status codes in exactly one place (`ffi`), so variants added here must be mapped
//! there. Must never: carry a panic payload or a borrowed value (errors cross threads and the C ABI),
//! or name an engine's error type (the example engine's `ModelError` wraps this one, never the
//! reverse: no type cycle).

use crate::backend::cuda::CudaError;
use crate::backend::metal::MetalError;

/// A tier of the cache, used in error messages and reports.
pub use crate::cache::Tier;

/// Everything that can go wrong in kvtier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration field is out of range or inconsistent with another field.
    #[error("invalid config: field `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// A slice or tensor has the wrong number of elements or the wrong shape.
    #[error("shape mismatch for `{what}`: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: String,
        got: String,
    },

    /// A tensor has a dtype kvtier does not accept there.
    #[error("unsupported dtype for `{what}`: {got} (accepted: {accepted})")]
    DType {
        what: &'static str,
        got: String,
        accepted: &'static str,
    },

    /// The sequence id is not (or no longer) in the cache.
    #[error("unknown sequence id {0}")]
    UnknownSequence(u64),

    /// The layer index is past the configured number of layers.
    #[error("layer {layer} out of range (cache has {num_layers} layers)")]
    LayerOutOfRange { layer: usize, num_layers: usize },

    /// The same sequence appears twice in one batched call.
    #[error("sequence id {0} appears more than once in one batch")]
    DuplicateSequence(u64),

    /// A sequence would grow past the configured maximum length.
    #[error("sequence {seq} would hold {requested} tokens in layer {layer}; max_seq_len is {max}")]
    SequenceTooLong {
        seq: u64,
        layer: usize,
        requested: usize,
        max: usize,
    },

    /// A tier budget would be exceeded and no policy may free room.
    #[error("{tier:?} tier budget exceeded: need {needed} bytes, budget {budget} bytes")]
    BudgetExceeded {
        tier: Tier,
        needed: usize,
        budget: usize,
    },

    /// A non-finite value (NaN or infinity) was passed where it would poison the cache.
    #[error("non-finite value in `{what}` at index {index}")]
    NonFinite { what: &'static str, index: usize },

    /// An allocation failed (host or device memory).
    #[error("out of memory: could not allocate {bytes} bytes for {what}")]
    OutOfMemory { what: &'static str, bytes: usize },

    /// The operation is not available on this backend or in this build.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),

    /// A finite input value does not fit the storage dtype (e.g. above 65504 for f16 hot pages).
    #[error(
        "value {value} in `{what}` at index {index} is beyond the {dtype} range (|x| <= {max})"
    )]
    OutOfRange {
        what: &'static str,
        index: usize,
        value: f32,
        dtype: &'static str,
        max: f32,
    },

    /// A page reference names no page: wrong sequence, layer or page index.
    #[error("no page {page} in layer {layer} of sequence {seq} (it has {n_pages} pages)")]
    UnknownPage {
        seq: u64,
        layer: usize,
        page: usize,
        n_pages: usize,
    },

    /// A page move is not possible from the page's current state; nothing was changed.
    #[error("cannot {op} page {page} of sequence {seq} in layer {layer}: {reason}")]
    InvalidMove {
        op: &'static str,
        seq: u64,
        layer: usize,
        page: usize,
        reason: String,
    },

    /// Statistics passed to `observe` do not describe the cache as it is now (pages moved,
    /// sequences changed, or the result came from another layer).
    #[error("stale attention result: {0}")]
    Stale(String),

    /// Attention over finite inputs would have produced a non-finite result (scores overflow f32);
    /// nothing is returned rather than infinities.
    #[error("attention overflowed: {0}")]
    Overflow(String),

    /// Reading or writing a spilled page's file failed (disk full, permissions, I/O error). The
    /// operation changed nothing: the page is still where it was.
    #[error("disk I/O failed: {what}: {source}")]
    Disk {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A page read back from disk failed its integrity check (checksum, header, length): it was
    /// torn, truncated or corrupted on disk. Nothing is returned for it; other pages are unaffected.
    #[error("page {page} of layer {layer} on disk is corrupt: {reason}")]
    CorruptPage {
        layer: usize,
        page: u32,
        reason: String,
    },

    /// A saved sequence file is not one this build can restore, or it is damaged (bad magic,
    /// version, checksum, truncated). Nothing was restored.
    #[error("saved sequence is unreadable: {reason}")]
    CorruptFile { reason: String },

    /// A saved sequence was written by a cache whose configuration differs where the bytes
    /// depend on it (heads, head size, page size, hot dtype, value group, rotation). Nothing was
    /// restored.
    #[error(
        "saved sequence does not match this cache: {field} is {file} in the file, {cache} here"
    )]
    ConfigMismatch {
        field: &'static str,
        file: String,
        cache: String,
    },

    /// A shared page store (memory, directory or remote server) could not do `op`: connection
    /// refused or dropped, a timeout, a server error, a directory I/O error, or a key outside the
    /// store's alphabet. The text never carries a credential. Nothing in the cache changed.
    #[error("page store: {op}: {reason}")]
    Remote { op: &'static str, reason: String },

    /// A broken internal invariant: a bug in kvtier, never the caller's fault. Please report it.
    #[error("internal error (a kvtier bug): {0}")]
    Internal(String),

    /// The CUDA backend failed.
    #[error("cuda: {0}")]
    Cuda(#[from] CudaError),

    /// The Metal backend failed.
    #[error("metal: {0}")]
    Metal(#[from] MetalError),

    /// An error from candle (tensor interop, feature `candle`).
    #[cfg(feature = "candle")]
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with kvtier's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(what: &'static str, expected: impl ToString, got: impl ToString) -> Self {
        Error::Shape {
            what,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
    pub(crate) fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }
}
