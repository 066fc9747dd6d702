//! The SmolLM2 / Llama engine behind the core's engine-agnostic [`crate::protect()`].
//!
//! Owns: the [`Engine`] implementation of [`Llama`] (and `Arc<Llama>`), the [`ProtectedSession`]
//! alias, and the model-shaped [`default_config`]. Must never: implement the seam or the protect
//! logic itself (both live in [`crate::protect`]).

use std::sync::Arc;

use super::error::ModelError;
use super::llama::Llama;
use super::session::Session;
pub use crate::protect::{protect, protect_with, KvTierAttention};
use crate::protect::{AttentionShape, Engine};
use crate::CacheConfig;

/// A model bound to a kvtier cache: generation, scoring and memory reports (see [`Session`]).
pub type ProtectedSession = Session<KvTierAttention>;

impl Engine for Arc<Llama> {
    type Session = ProtectedSession;
    type Error = ModelError;
    fn attention_shape(&self) -> AttentionShape {
        self.config().attention_shape()
    }
    fn bind(
        self,
        cache: KvTierAttention,
        sensitivity: f32,
    ) -> Result<ProtectedSession, ModelError> {
        Session::new(self, cache, sensitivity)
    }
}

/// An owned model is shared behind an `Arc` (the session keeps it).
impl Engine for Llama {
    type Session = ProtectedSession;
    type Error = ModelError;
    fn attention_shape(&self) -> AttentionShape {
        self.config().attention_shape()
    }
    fn bind(self, cache: KvTierAttention, s: f32) -> Result<ProtectedSession, ModelError> {
        Arc::new(self).bind(cache, s)
    }
}

/// The cache configuration [`protect`] uses for `model`: kvtier's `balanced` preset shaped for it.
pub fn default_config(model: &Llama) -> Result<CacheConfig, ModelError> {
    Ok(crate::protect::default_config(model.attention_shape())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ExactAttention;
    use crate::protect::AttentionCache;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::model::corpus::SplitMix64::new(seed);
        (0..n)
            .map(|_| (r.below(2001) as f32 - 1000.0) / 1000.0)
            .collect()
    }

    #[test]
    fn full_precision_kvtier_matches_exact_oracle() {
        let cfg = CacheConfig::builder(2, 4, 2, 32)
            .hot_dtype(crate::HotDtype::F32)
            .full_precision()
            .build()
            .unwrap();
        let shape = AttentionShape {
            num_layers: 2,
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
        };
        let mut a = KvTierAttention::new(cfg).unwrap();
        let mut b = ExactAttention::new(shape).unwrap();
        let n = 40;
        let (q, k, v) = (pseudo(n * 128, 1), pseudo(n * 64, 2), pseudo(n * 64, 3));
        for layer in 0..2 {
            let x = a.prefill(layer, &q, &k, &v).unwrap();
            let y = b.prefill(layer, &q, &k, &v).unwrap();
            assert!(x.iter().zip(&y).all(|(x, y)| (x - y).abs() < 1e-4));
        }
        let (q1, k1, v1) = (pseudo(128, 4), pseudo(64, 5), pseudo(64, 6));
        let x = a.decode(1, &q1, &k1, &v1).unwrap();
        let y = b.decode(1, &q1, &k1, &v1).unwrap();
        assert!(x.iter().zip(&y).all(|(x, y)| (x - y).abs() < 1e-4));
        assert_eq!(a.last_head_stats(1).len(), 4);
        assert!(a.last_head_stats(0).is_empty());
        assert_eq!(a.memory().tokens, 2 * n + 1);
        a.reset().unwrap();
        assert_eq!(a.memory().tokens, 0);
        assert!(a.last_head_stats(1).is_empty());
    }

    #[test]
    fn decode_rejects_blocks() {
        let cfg = CacheConfig::builder(1, 2, 1, 32).build().unwrap();
        let mut a = KvTierAttention::new(cfg).unwrap();
        assert!(matches!(
            a.decode(0, &[0.0; 128], &[0.0; 64], &[0.0; 64]),
            Err(crate::Error::Shape { .. })
        ));
    }

    #[test]
    fn cache_errors_convert() {
        let e: ModelError = crate::Error::UnknownSequence(3).into();
        assert!(matches!(
            e,
            ModelError::Cache(crate::Error::UnknownSequence(3))
        ));
    }
}
