//! Real-model layer: a Llama-family GGUF model driven through a KV cache.
//!
//! Owns: loading a GGUF model (weights, hyperparameters, tokenizer, chat template) with candle,
//! running its forward pass with attention delegated to an [`AttentionCache`], and the session API
//! (generation, scoring / perplexity, memory report) that evaluations and examples use. Must never:
//! implement cache storage or quantisation itself (that is the core's job; [`ExactAttention`] is only
//! an oracle), download anything (assets come from `scripts/fetch-assets.sh`), or use a GPU —
//! candle ops run on the CPU; the cache decides where K/V live.
//!
//! ```no_run
//! use kvtier::model::{corpus::Assets, protect, GenerateOptions, Llama, ScoreOptions};
//! # fn main() -> Result<(), kvtier::model::ModelError> {
//! // scripts/fetch-assets.sh puts the model and the SOTU corpus in assets/.
//! let model = Llama::load(Assets::locate().model())?;
//! let mut session = protect(model, 0.85)?; // default cache: int4 K/V, 128-token hot window
//! let answer = session.generate("Name three primary colours.", GenerateOptions::default())?;
//! println!("{} ({:.1} tok/s)", answer.text, answer.decode_tokens_per_sec());
//! let ppl = session.perplexity("Four score and seven years ago ...", ScoreOptions::decode_tail(4))?;
//! println!("ppl {ppl:.2}; cache: {}", session.memory_report());
//! # Ok(())
//! # }
//! ```

pub mod attention;
pub mod corpus;
pub mod error;
pub mod gguf;
pub mod llama;
pub mod protect;
pub mod session;
pub mod share;
#[cfg(test)]
mod synthetic;
pub mod tokenizer;

pub use attention::{AttentionCache, AttentionShape, ExactAttention, KvRecord, Recorder};
pub use error::ModelError;
pub use gguf::GgufFile;
pub use llama::{Llama, LlamaConfig, LoadOptions, Rope};
pub use protect::{default_config, protect, protect_with, KvTierAttention, ProtectedSession};
pub use session::{
    argmax, token_nll, CapturedPrefill, GenerateOptions, Generation, Score, ScoreOptions, Session,
    StopReason,
};
pub use tokenizer::{ChatMessage, ChatTemplate, GgufTokenizer};
