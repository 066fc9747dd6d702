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
}
