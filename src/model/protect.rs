//! `protect(model, sensitivity)`: give a model a kvtier cache in one call.
//!
//! Owns: [`KvTierAttention`], the adapter that serves the forward pass's [`AttentionCache`] calls
//! from one sequence of a [`KvCache`] (prefill → `KvCache::prefill`, decode → `append` + `attend`),
//! keeping the per-head attention statistics of the latest decode step; and [`protect`] /
//! [`protect_with`], which build a cache shaped for the model and return a [`ProtectedSession`].
//! Must never: change what the cache stores or how it attends (configuration is the caller's), or
//! run the monitor / healer itself — `sensitivity` is validated and stored for the monitor, which
//! plugs in here later.

use std::sync::Arc;

use super::attention::{check_qkv, AttentionCache, AttentionShape};
use super::error::{ModelError, Result};
use super::llama::Llama;
use super::session::Session;
use crate::{CacheConfig, HeadStats, KvCache, MemoryReport, SeqId};

/// One sequence of a [`KvCache`], seen through [`AttentionCache`].
pub struct KvTierAttention {
    cache: KvCache,
    seq: SeqId,
    shape: AttentionShape,
    /// Per layer: head statistics of the latest decode step (`[q_heads]`), empty before one.
    last_heads: Vec<Vec<HeadStats>>,
}

impl std::fmt::Debug for KvTierAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTierAttention")
            .field("config", self.cache.config())
            .field("seq", &self.seq)
            .field("memory", &self.cache.memory_report())
            .finish()
    }
}

impl KvTierAttention {
    /// A cache built from `config`, holding one fresh sequence.
    pub fn new(config: CacheConfig) -> Result<Self> {
        let shape = AttentionShape {
            num_layers: config.num_layers,
            num_q_heads: config.num_q_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let mut cache = KvCache::new(config)?;
        let seq = cache.add_sequence();
        Ok(Self {
            cache,
            seq,
            shape,
            last_heads: vec![Vec::new(); shape.num_layers],
        })
    }

    /// The underlying cache.
    pub fn kv_cache(&self) -> &KvCache {
        &self.cache
    }

    /// The sequence this adapter drives.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// Attention statistics per q head of `layer` at the latest decode step (empty before the first
    /// decode step or after a reset).
    pub fn last_head_stats(&self, layer: usize) -> &[HeadStats] {
        self.last_heads.get(layer).map_or(&[], Vec::as_slice)
    }
}

impl AttentionCache for KvTierAttention {
    fn shape(&self) -> AttentionShape {
        self.shape
    }

    fn prefill(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        check_qkv(&self.shape, layer, q, k, v)?;
        Ok(self.cache.prefill(self.seq, layer, q, k, v)?)
    }

    fn decode(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let n = check_qkv(&self.shape, layer, q, k, v)?;
        if n != 1 {
            return Err(ModelError::InvalidArgument {
                what: "q",
                reason: format!("decode takes one token, got {n}"),
            });
        }
        self.cache.append(self.seq, layer, k, v)?;
        let att = self.cache.attend(layer, &[self.seq], q)?;
        self.last_heads[layer] = att.heads_of(0).to_vec();
        Ok(att.output)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        Ok(self.cache.append(self.seq, layer, k, v)?)
    }

    fn reset(&mut self) -> Result<()> {
        self.cache.reset_sequence(self.seq)?;
        self.last_heads.iter_mut().for_each(Vec::clear);
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        self.cache.memory_report()
    }
}

/// A model bound to a kvtier cache: generation, scoring and memory reports (see [`Session`]).
pub type ProtectedSession = Session<KvTierAttention>;

/// The cache configuration [`protect`] uses: kvtier's `balanced` preset (int4 K and V, 128-token hot
/// window, 4 sinks) shaped for `model`.
pub fn default_config(model: &Llama) -> Result<CacheConfig> {
    let c = model.config();
    Ok(CacheConfig::balanced(
        c.num_layers,
        c.num_q_heads,
        c.num_kv_heads,
        c.head_dim,
    )?)
}

/// Gives `model` a kvtier cache with the default configuration and returns a session.
/// `sensitivity` in `[0, 1]` sets how readily the (upcoming) monitor fires; it is validated and
/// stored.
pub fn protect(model: impl Into<Arc<Llama>>, sensitivity: f32) -> Result<ProtectedSession> {
    let model = model.into();
    let config = default_config(&model)?;
    protect_with(model, sensitivity, config)
}

/// [`protect`] with an explicit cache configuration; its shape must match the model's.
pub fn protect_with(
    model: impl Into<Arc<Llama>>,
    sensitivity: f32,
    config: CacheConfig,
) -> Result<ProtectedSession> {
    let model = model.into();
    let cache = KvTierAttention::new(config)?;
    Session::new(model, cache, sensitivity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ExactAttention;

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
            Err(ModelError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn cache_errors_convert_and_model_errors_unwrap() {
        let e: ModelError = crate::Error::UnknownSequence(3).into();
        assert!(matches!(e, ModelError::Cache(_)));
        let e: ModelError = crate::Error::Model(ModelError::MissingTensor("x".into())).into();
        assert!(matches!(e, ModelError::MissingTensor(_)));
        let e: crate::Error = ModelError::MissingTensor("y".into()).into();
        assert!(matches!(e, crate::Error::Model(_)));
    }
}
