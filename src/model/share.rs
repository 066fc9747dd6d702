//! Prefill that reuses a shared prefix (`kvtier::prefix`): the SmolLM2 / Llama engine's side of
//! prefix sharing.
//!
//! Owns: [`Session::prefill_shared`] (import the stored leading pages, prefill only the rest,
//! hand the prompt's full pages to the store's background publisher) and its [`SharedPrefill`]
//! report. Must never: fail a prefill because the store failed (a store error means a local
//! prefill, reported), or publish pages the session did not compute or verify.

use std::time::{Duration, Instant};

use super::error::Result;
use super::protect::KvTierAttention;
use super::session::Session;
use crate::prefix::{Imported, PrefixStore};

/// What [`Session::prefill_shared`] did.
#[derive(Debug, Clone)]
pub struct SharedPrefill {
    /// Logits after the last prompt token.
    pub logits: Vec<f32>,
    pub imported: Imported,
    /// Prompt tokens prefilled here (at least one: its logits start the answer).
    pub computed: usize,
    /// The store failed (nothing was imported and the whole prompt was prefilled here).
    pub store_error: Option<String>,
    /// Records handed to the background publisher (pages of every layer the store may lack).
    pub queued: usize,
    /// Time to import, and to prefill the rest (together: time to first token's logits).
    pub import_time: Duration,
    pub prefill_time: Duration,
}

impl Session<KvTierAttention> {
    /// Resets and prefills `tokens`, importing first the leading pages `store` holds for them
    /// (verified; the rest is prefilled here, attending over the imported pages as the cache
    /// stores them); then queues the prompt's full pages for publishing (`publish_async`;
    /// `store.flush()` waits for them). A store error falls back to a local prefill of
    /// everything, reported in [`SharedPrefill::store_error`].
    pub fn prefill_shared(&mut self, tokens: &[u32], store: &PrefixStore) -> Result<SharedPrefill> {
        if tokens.is_empty() {
            return Err(super::error::ModelError::InvalidArgument {
                what: "prompt",
                reason: "no tokens to prefill".into(),
            });
        }
        self.reset()?;
        let t0 = Instant::now();
        let seq = self.cache.seq();
        let (imported, store_error) = match store.import(self.cache.kv_cache_mut(), seq, tokens) {
            Ok(i) => (i, None),
            Err(e) => (Imported::default(), Some(e.to_string())),
        };
        self.history.extend_from_slice(&tokens[..imported.tokens]);
        let import_time = t0.elapsed();
        let t1 = Instant::now();
        let logits = self.prefill(&tokens[imported.tokens..])?;
        let prefill_time = t1.elapsed();
        // Publishing is best effort: the answer does not depend on it.
        let (queued, publish_error) = match store.publish_async(self.cache.kv_cache(), seq, tokens)
        {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e.to_string())),
        };
        Ok(SharedPrefill {
            logits,
            imported,
            computed: tokens.len() - imported.tokens,
            store_error: store_error.or(publish_error),
            queued,
            import_time,
            prefill_time,
        })
    }
}
