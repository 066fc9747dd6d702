//! Typed errors of the real-model layer.
//!
//! Owns: every failure of loading a GGUF model, building its tokenizer, running its forward pass, and
//! driving a cache from it. Folds into the crate's `Error` as `Error::Model`. Must never: carry a
//! borrowed value or a panic payload, or swallow the source error of a lower layer (candle, I/O, the
//! tokenizer, the cache) — the source is kept so a caller can walk the chain.

use std::path::PathBuf;

/// Everything that can go wrong in [`crate::model`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The model file could not be opened or read.
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// candle failed while parsing GGUF or running a tensor op.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),

    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata key `{0}` is missing")]
    MissingMetadata(String),

    /// A GGUF metadata key is present but has the wrong type or an unusable value.
    #[error("GGUF metadata key `{key}`: {reason}")]
    BadMetadata { key: String, reason: String },

    /// The GGUF declares an architecture this module does not implement.
    #[error("unsupported architecture `{0}` (supported: llama)")]
    UnsupportedArchitecture(String),

    /// A required weight tensor is absent from the GGUF.
    #[error("GGUF tensor `{0}` is missing")]
    MissingTensor(String),

    /// A weight tensor has a shape inconsistent with the hyperparameters.
    #[error("GGUF tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// The tokenizer could not be built or failed to encode / decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A token id is outside the vocabulary.
    #[error("token id {id} out of range (vocabulary has {vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },

    /// A sequence would run past the model's context length.
    #[error("position {position} is past the model's context length {context}")]
    ContextOverflow { position: usize, context: usize },

    /// An argument is out of its documented range.
    #[error("invalid argument `{what}`: {reason}")]
    InvalidArgument { what: &'static str, reason: String },

    /// The kvtier cache rejected a call.
    #[error("kv cache: {0}")]
    Cache(#[from] crate::Error),
}

/// Result alias of the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;

impl From<tokenizers::Error> for ModelError {
    fn from(e: tokenizers::Error) -> Self {
        ModelError::Tokenizer(e.to_string())
    }
}
