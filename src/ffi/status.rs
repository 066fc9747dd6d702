//! Status codes of the C ABI, and the one mapping from [`crate::Error`] to them.
//!
//! Owns: [`kvtier_status`] (numbered, `#[repr(u32)]`), `FfiError` (a status plus its message, the
//! error type of every entry point's body), `status_of` (the **only** place where a core error
//! becomes a number) and `kvtier_status_name`.
//! Must never: renumber or reuse a code. A number, once released, means the same thing forever;
//! a code that is no longer produced is retired (its number stays taken and documented), and a new
//! code takes the next free number of its block:
//!
//! | block       | meaning                                                       |
//! |-------------|---------------------------------------------------------------|
//! | 0           | success                                                       |
//! | 1..=99      | the C boundary itself (pointers, buffers, panics, enums)      |
//! | 100..=199   | the core's [`crate::Error`] variants                          |
//! | 200..=299   | backends (CUDA, Metal): device, driver, kernel compilation    |
//! | 300..=399   | reserved for the protect session (monitor and healer)         |
//!
//! The `numbers_are_permanent` test pins every number; changing one fails it.

use crate::backend::cuda::CudaError;
use crate::backend::metal::MetalError;
use crate::error::Error;
use std::ffi::{c_char, CStr};

/// The result of a kvtier call. `KVTIER_STATUS_OK` (0) is success; every other value names what
/// went wrong, and `kvtier_last_error` gives the message.
///
/// Numbers are permanent: a code is never renumbered and a retired number is never reused, so a
/// program may store, log and compare them across library versions. New codes may be added in any
/// release: treat an unknown value as a generic failure. Function documentation names the codes
/// it can return without the `KVTIER_STATUS_` prefix.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum kvtier_status {
    /// Success.
    Ok = 0,

    // 1..=99: the C boundary.
    /// A required pointer (handle, out-parameter, or array with a non-zero count) was NULL.
    NullParameter = 1,
    /// kvtier panicked inside the call (a bug: please report it with the last error text).
    Panic = 2,
    /// A value is not meaningful at the C boundary: an unknown enum value, a pointer not aligned
    /// for its type, or sizes whose product overflows.
    InvalidArgument = 3,
    /// An output buffer holds fewer elements (or bytes) than the call must write.
    BufferTooSmall = 4,
    /// An earlier call panicked while changing this cache; it can only be freed now.
    Poisoned = 5,

    // 100..=199: the core's errors (crate::Error).
    /// A configuration field is out of range or inconsistent with another.
    InvalidConfig = 100,
    /// An array has the wrong number of elements for the shape it must have.
    Shape = 101,
    /// A tensor has an element type kvtier does not accept there.
    Dtype = 102,
    /// The sequence id is not (or no longer) in the cache.
    UnknownSequence = 103,
    /// The layer index is not below the configured number of layers.
    LayerOutOfRange = 104,
    /// The same sequence appears twice in one batched call.
    DuplicateSequence = 105,
    /// A sequence would grow past the configured maximum length.
    SequenceTooLong = 106,
    /// A tier's byte budget would be exceeded.
    BudgetExceeded = 107,
    /// A NaN or infinity was passed where it would poison the cache.
    NonFinite = 108,
    /// Host or device memory could not be allocated.
    OutOfMemory = 109,
    /// The operation is not available on this backend or in this build (for example device
    /// attention on a CPU cache).
    Unsupported = 110,
    /// Tensor interop (candle) failed. Only in builds with the `candle` feature; no C call
    /// returns it today.
    Candle = 111,
    /// Retired: the real-model layer left the core (feature `model`), so no C call returns it.
    /// The number stays taken.
    Model = 112,
    /// A finite value is beyond the range of the storage dtype (for example above 65504 for f16
    /// hot pages); nothing was stored.
    OutOfRange = 113,
    /// A page reference names no page (page index past the sequence's pages).
    UnknownPage = 114,
    /// A page move is not possible from the page's state (pinned, wrong tier, still being
    /// written); nothing was changed.
    InvalidMove = 115,
    /// Attention statistics passed to observe do not match the cache as it is now.
    Stale = 116,
    /// Attention over finite inputs overflowed f32; no result is returned.
    Overflow = 117,
    /// A broken internal invariant: a kvtier bug, never the caller's fault (please report it).
    Internal = 118,
    /// Reading or writing a spilled page's file failed (disk full, permissions, I/O); nothing
    /// was changed.
    Disk = 119,
    /// A page read back from disk failed its integrity check (torn, truncated or corrupted).
    CorruptPage = 120,
    /// A saved sequence file is damaged or not a kvtier sequence file; nothing was restored.
    CorruptFile = 121,
    /// A saved sequence was written under a different cache configuration; nothing was restored.
    ConfigMismatch = 122,
    /// A shared page store (memory, directory, Redis / Valkey) failed: connection, timeout,
    /// server or I/O error; the cache is unchanged (prefill locally instead).
    Remote = 123,

    // 200..=299: backends.
    /// The requested backend was not compiled into this library (for example CUDA without the
    /// `cuda` feature).
    BackendNotCompiled = 200,
    /// No such device, or no driver for it.
    NoDevice = 201,
    /// The device driver reported an error.
    DeviceError = 202,
    /// A device kernel failed to compile.
    KernelCompile = 203,
}

/// Every status, for tests and `kvtier_status_name`.
pub(crate) const ALL: [kvtier_status; 34] = {
    use kvtier_status::*;
    [
        Ok,
        NullParameter,
        Panic,
        InvalidArgument,
        BufferTooSmall,
        Poisoned,
        InvalidConfig,
        Shape,
        Dtype,
        UnknownSequence,
        LayerOutOfRange,
        DuplicateSequence,
        SequenceTooLong,
        BudgetExceeded,
        NonFinite,
        OutOfMemory,
        Unsupported,
        Candle,
        Model,
        OutOfRange,
        UnknownPage,
        InvalidMove,
        Stale,
        Overflow,
        Internal,
        Disk,
        CorruptPage,
        CorruptFile,
        ConfigMismatch,
        Remote,
        BackendNotCompiled,
        NoDevice,
        DeviceError,
        KernelCompile,
    ]
};

impl kvtier_status {
    /// The C name of the code, `KVTIER_STATUS_...`.
    pub fn name(self) -> &'static CStr {
        use kvtier_status::*;
        match self {
            Ok => c"KVTIER_STATUS_OK",
            NullParameter => c"KVTIER_STATUS_NULL_PARAMETER",
            Panic => c"KVTIER_STATUS_PANIC",
            InvalidArgument => c"KVTIER_STATUS_INVALID_ARGUMENT",
            BufferTooSmall => c"KVTIER_STATUS_BUFFER_TOO_SMALL",
            Poisoned => c"KVTIER_STATUS_POISONED",
            InvalidConfig => c"KVTIER_STATUS_INVALID_CONFIG",
            Shape => c"KVTIER_STATUS_SHAPE",
            Dtype => c"KVTIER_STATUS_DTYPE",
            UnknownSequence => c"KVTIER_STATUS_UNKNOWN_SEQUENCE",
            LayerOutOfRange => c"KVTIER_STATUS_LAYER_OUT_OF_RANGE",
            DuplicateSequence => c"KVTIER_STATUS_DUPLICATE_SEQUENCE",
            SequenceTooLong => c"KVTIER_STATUS_SEQUENCE_TOO_LONG",
            BudgetExceeded => c"KVTIER_STATUS_BUDGET_EXCEEDED",
            NonFinite => c"KVTIER_STATUS_NON_FINITE",
            OutOfMemory => c"KVTIER_STATUS_OUT_OF_MEMORY",
            Unsupported => c"KVTIER_STATUS_UNSUPPORTED",
            Candle => c"KVTIER_STATUS_CANDLE",
            Model => c"KVTIER_STATUS_MODEL",
            OutOfRange => c"KVTIER_STATUS_OUT_OF_RANGE",
            UnknownPage => c"KVTIER_STATUS_UNKNOWN_PAGE",
            InvalidMove => c"KVTIER_STATUS_INVALID_MOVE",
            Stale => c"KVTIER_STATUS_STALE",
            Overflow => c"KVTIER_STATUS_OVERFLOW",
            Internal => c"KVTIER_STATUS_INTERNAL",
            Disk => c"KVTIER_STATUS_DISK",
            CorruptPage => c"KVTIER_STATUS_CORRUPT_PAGE",
            CorruptFile => c"KVTIER_STATUS_CORRUPT_FILE",
            ConfigMismatch => c"KVTIER_STATUS_CONFIG_MISMATCH",
            Remote => c"KVTIER_STATUS_REMOTE",
            BackendNotCompiled => c"KVTIER_STATUS_BACKEND_NOT_COMPILED",
            NoDevice => c"KVTIER_STATUS_NO_DEVICE",
            DeviceError => c"KVTIER_STATUS_DEVICE_ERROR",
            KernelCompile => c"KVTIER_STATUS_KERNEL_COMPILE",
        }
    }

    /// The status with number `n`, if there is one.
    pub fn from_u32(n: u32) -> Option<Self> {
        ALL.iter().copied().find(|s| *s as u32 == n)
    }
}

/// The one mapping from a core error to a status. A new [`Error`] (or backend error) variant
/// fails to compile here until it is given a code: give it the next free number of its block.
pub(crate) fn status_of(e: &Error) -> kvtier_status {
    use kvtier_status as S;
    match e {
        Error::InvalidConfig { .. } => S::InvalidConfig,
        Error::Shape { .. } => S::Shape,
        Error::DType { .. } => S::Dtype,
        Error::UnknownSequence(_) => S::UnknownSequence,
        Error::LayerOutOfRange { .. } => S::LayerOutOfRange,
        Error::DuplicateSequence(_) => S::DuplicateSequence,
        Error::SequenceTooLong { .. } => S::SequenceTooLong,
        Error::BudgetExceeded { .. } => S::BudgetExceeded,
        Error::NonFinite { .. } => S::NonFinite,
        Error::OutOfMemory { .. } => S::OutOfMemory,
        Error::Unsupported(_) => S::Unsupported,
        #[cfg(feature = "candle")]
        Error::Candle(_) => S::Candle,
        Error::OutOfRange { .. } => S::OutOfRange,
        Error::UnknownPage { .. } => S::UnknownPage,
        Error::InvalidMove { .. } => S::InvalidMove,
        Error::Stale(_) => S::Stale,
        Error::Overflow(_) => S::Overflow,
        Error::Internal(_) => S::Internal,
        Error::Disk { .. } => S::Disk,
        Error::CorruptPage { .. } => S::CorruptPage,
        Error::CorruptFile { .. } => S::CorruptFile,
        Error::ConfigMismatch { .. } => S::ConfigMismatch,
        Error::Remote { .. } => S::Remote,
        Error::Cuda(c) => match c {
            CudaError::NotCompiled => S::BackendNotCompiled,
            CudaError::NoDevice(_) => S::NoDevice,
            CudaError::OutOfMemory { .. } => S::OutOfMemory,
            CudaError::Compile { .. } => S::KernelCompile,
            CudaError::Driver(_) => S::DeviceError,
        },
        Error::Metal(m) => match m {
            MetalError::NotCompiled => S::BackendNotCompiled,
            MetalError::NoDevice(_) => S::NoDevice,
            MetalError::OutOfMemory { .. } => S::OutOfMemory,
            MetalError::Compile { .. } => S::KernelCompile,
            MetalError::Command(_) => S::DeviceError,
        },
    }
}

/// A failed entry point: the status to return and the message for `kvtier_last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FfiError {
    pub status: kvtier_status,
    pub message: String,
}

impl FfiError {
    pub(crate) fn new(status: kvtier_status, message: impl Into<String>) -> Self {
        FfiError {
            status,
            message: message.into(),
        }
    }
    /// `what` was NULL.
    pub(crate) fn null(what: &str) -> Self {
        Self::new(
            kvtier_status::NullParameter,
            format!("`{what}` must not be NULL"),
        )
    }
    /// An argument that is not meaningful at the boundary.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(kvtier_status::InvalidArgument, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError::new(status_of(&e), e.to_string())
    }
}

/// The name of a status code (`"KVTIER_STATUS_SHAPE"` for 101), or `"KVTIER_STATUS_UNKNOWN"` for a
/// number that is not a status of this library version. The string is static: never free it.
#[no_mangle]
pub extern "C" fn kvtier_status_name(status: u32) -> *const c_char {
    ffi_panic_boundary_or! { c"KVTIER_STATUS_UNKNOWN".as_ptr(), "kvtier_status_name", {
        Ok(kvtier_status::from_u32(status)
            .map_or(c"KVTIER_STATUS_UNKNOWN", kvtier_status::name)
            .as_ptr())
    }}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released numbers. Append here when adding a code; never edit a line.
    const PINNED: &[(kvtier_status, u32, &str)] = &[
        (kvtier_status::Ok, 0, "KVTIER_STATUS_OK"),
        (
            kvtier_status::NullParameter,
            1,
            "KVTIER_STATUS_NULL_PARAMETER",
        ),
        (kvtier_status::Panic, 2, "KVTIER_STATUS_PANIC"),
        (
            kvtier_status::InvalidArgument,
            3,
            "KVTIER_STATUS_INVALID_ARGUMENT",
        ),
        (
            kvtier_status::BufferTooSmall,
            4,
            "KVTIER_STATUS_BUFFER_TOO_SMALL",
        ),
        (kvtier_status::Poisoned, 5, "KVTIER_STATUS_POISONED"),
        (
            kvtier_status::InvalidConfig,
            100,
            "KVTIER_STATUS_INVALID_CONFIG",
        ),
        (kvtier_status::Shape, 101, "KVTIER_STATUS_SHAPE"),
        (kvtier_status::Dtype, 102, "KVTIER_STATUS_DTYPE"),
        (
            kvtier_status::UnknownSequence,
            103,
            "KVTIER_STATUS_UNKNOWN_SEQUENCE",
        ),
        (
            kvtier_status::LayerOutOfRange,
            104,
            "KVTIER_STATUS_LAYER_OUT_OF_RANGE",
        ),
        (
            kvtier_status::DuplicateSequence,
            105,
            "KVTIER_STATUS_DUPLICATE_SEQUENCE",
        ),
        (
            kvtier_status::SequenceTooLong,
            106,
            "KVTIER_STATUS_SEQUENCE_TOO_LONG",
        ),
        (
            kvtier_status::BudgetExceeded,
            107,
            "KVTIER_STATUS_BUDGET_EXCEEDED",
        ),
        (kvtier_status::NonFinite, 108, "KVTIER_STATUS_NON_FINITE"),
        (
            kvtier_status::OutOfMemory,
            109,
            "KVTIER_STATUS_OUT_OF_MEMORY",
        ),
        (kvtier_status::Unsupported, 110, "KVTIER_STATUS_UNSUPPORTED"),
        (kvtier_status::Candle, 111, "KVTIER_STATUS_CANDLE"),
        (kvtier_status::Model, 112, "KVTIER_STATUS_MODEL"),
        (kvtier_status::OutOfRange, 113, "KVTIER_STATUS_OUT_OF_RANGE"),
        (
            kvtier_status::UnknownPage,
            114,
            "KVTIER_STATUS_UNKNOWN_PAGE",
        ),
        (
            kvtier_status::InvalidMove,
            115,
            "KVTIER_STATUS_INVALID_MOVE",
        ),
        (kvtier_status::Stale, 116, "KVTIER_STATUS_STALE"),
        (kvtier_status::Overflow, 117, "KVTIER_STATUS_OVERFLOW"),
        (kvtier_status::Internal, 118, "KVTIER_STATUS_INTERNAL"),
        (kvtier_status::Disk, 119, "KVTIER_STATUS_DISK"),
        (
            kvtier_status::CorruptPage,
            120,
            "KVTIER_STATUS_CORRUPT_PAGE",
        ),
        (
            kvtier_status::CorruptFile,
            121,
            "KVTIER_STATUS_CORRUPT_FILE",
        ),
        (
            kvtier_status::ConfigMismatch,
            122,
            "KVTIER_STATUS_CONFIG_MISMATCH",
        ),
        (kvtier_status::Remote, 123, "KVTIER_STATUS_REMOTE"),
        (
            kvtier_status::BackendNotCompiled,
            200,
            "KVTIER_STATUS_BACKEND_NOT_COMPILED",
        ),
        (kvtier_status::NoDevice, 201, "KVTIER_STATUS_NO_DEVICE"),
        (
            kvtier_status::DeviceError,
            202,
            "KVTIER_STATUS_DEVICE_ERROR",
        ),
        (
            kvtier_status::KernelCompile,
            203,
            "KVTIER_STATUS_KERNEL_COMPILE",
        ),
    ];

    #[test]
    fn numbers_are_permanent() {
        for &(s, n, name) in PINNED {
            assert_eq!(s as u32, n, "{s:?} was renumbered");
            assert_eq!(kvtier_status::from_u32(n), Some(s));
            assert_eq!(s.name().to_str().unwrap(), name);
            // SAFETY: kvtier_status_name returns a pointer to a static NUL-terminated string.
            let c = unsafe { CStr::from_ptr(kvtier_status_name(n)) };
            assert_eq!(c.to_str().unwrap(), name);
        }
        let mut all: Vec<u32> = ALL.iter().map(|s| *s as u32).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            PINNED.len(),
            "ALL and PINNED list the same codes"
        );
        assert_eq!(kvtier_status::from_u32(6), None);
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(kvtier_status_name(99_999)) };
        assert_eq!(unknown.to_str().unwrap(), "KVTIER_STATUS_UNKNOWN");
    }
}
