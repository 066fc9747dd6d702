/// Errors of the Metal backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetalError {
    /// kvtier was built without the `metal` feature (or not for an Apple target).
    #[error("kvtier was built without the `metal` feature")]
    NotCompiled,
    /// No Metal device.
    #[error("no Metal device: {0}")]
    NoDevice(String),
    /// A buffer could not be allocated.
    #[error("Metal out of memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
    /// The Metal compiler rejected the kernels; the log says why.
    #[error("Metal failed to compile {kernel}: {log}")]
    Compile { kernel: &'static str, log: String },
    /// A command buffer failed on the device (or the executor refused a dispatch).
    #[error("Metal command failed: {0}")]
    Command(String),
}
