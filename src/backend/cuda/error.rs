/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// kvtier was built without the `cuda` feature.
    #[error("kvtier was built without the `cuda` feature")]
    NotCompiled,
    /// No CUDA driver or no device with that ordinal.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// Device allocation failed.
    #[error("CUDA out of memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
    /// NVRTC rejected a kernel; the log says why.
    #[error("NVRTC failed to compile {kernel}: {log}")]
    Compile { kernel: &'static str, log: String },
    /// Any other driver error.
    #[error("CUDA driver error: {0}")]
    Driver(String),
}
