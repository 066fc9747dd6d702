//! kvtier as a `mistralrs_kv_cache::CompressedKVCache`: the trait mistral.rs (and other candle
//! engines) plug compressed KV caches into.
//!
//! Owns: [`MistralRsCache`] (a [`KvCache`] behind a lock, one kvtier sequence per batch row) and
//! the tensor layout conversions of the trait (`[batch, heads, tokens, head_dim]`, any of f32 /
//! f16 / bf16, any candle device). Prefill stores the new tokens and returns every cached token
//! as the cache holds it (hot exact, warm dequantised) for the engine's flash attention; decode
//! stores the token and returns the fused attention kvtier computed (`DecodeOutput::Fused`).
//! Must never: hold the lock across a call back into the engine, or accept a shape, dtype or
//! GQA grouping that does not match the cache's config (a typed error instead).

use crate::cache::{KvCache, SeqId};
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use mistralrs_kv_cache::{AttendConfig, CompressedKVCache, DecodeOutput, DequantResult};
use std::sync::Mutex;

/// A kvtier cache that mistral.rs (or any engine on the `CompressedKVCache` trait) drives.
///
/// The trait has no sequence ids: each batch row is one kvtier sequence, created at the first
/// prefill (a later call with another batch size is an error until `reset`).
pub struct MistralRsCache {
    inner: Mutex<State>,
}

struct State {
    cache: KvCache,
    seqs: Vec<SeqId>,
}

fn wrap(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl MistralRsCache {
    /// A cache with `cfg` on the CPU backend.
    pub fn new(cfg: CacheConfig) -> Result<Self> {
        Ok(Self::from_cache(KvCache::new(cfg)?))
    }

    /// Wraps an existing cache (any backend). Its sequences are left alone; the adapter makes
    /// its own.
    pub fn from_cache(cache: KvCache) -> Self {
        MistralRsCache {
            inner: Mutex::new(State {
                cache,
                seqs: Vec::new(),
            }),
        }
    }

    /// Runs `f` on the underlying cache (reports, policies, save / restore of its sequences).
    pub fn with_cache<T>(&self, f: impl FnOnce(&mut KvCache, &[SeqId]) -> T) -> Result<T> {
        let mut st = self.lock()?;
        let State { cache, seqs } = &mut *st;
        Ok(f(cache, seqs))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.inner
            .lock()
            .map_err(|_| Error::internal("a call panicked while holding the mistral.rs adapter"))
    }
}

/// `t` (`[batch, heads, n, head_dim]`) as `batch` row-major f32 blocks `[n][heads][head_dim]`.
fn rows(
    t: &Tensor,
    what: &'static str,
    heads: usize,
    d: usize,
) -> Result<(usize, usize, Vec<f32>)> {
    crate::tensor::check_dtype(t, what)?;
    let dims = t.dims();
    if dims.len() != 4 || dims[1] != heads || dims[3] != d {
        return Err(Error::shape(
            what,
            format!("[batch, {heads}, tokens, {d}]"),
            format!("{dims:?}"),
        ));
    }
    let (b, n) = (dims[0], dims[2]);
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((b, n, v))
}

impl State {
    /// The kvtier sequences for a batch of `b` rows (made at the first call).
    fn batch(&mut self, b: usize) -> Result<Vec<SeqId>> {
        if self.seqs.is_empty() {
            self.seqs = (0..b).map(|_| self.cache.add_sequence()).collect();
        }
        if self.seqs.len() != b {
            return Err(Error::shape(
                "batch",
                format!(
                    "{} rows (as at the first prefill; reset to change)",
                    self.seqs.len()
                ),
                b,
            ));
        }
        Ok(self.seqs.clone())
    }

    /// Appends `[b][n][kvh][d]` keys and values to the batch's sequences in `layer`.
    fn store(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<Vec<SeqId>> {
        let c = self.cache.config();
        let (kvh, d) = (c.num_kv_heads, c.head_dim);
        let (b, n, kr) = rows(k, "keys", kvh, d)?;
        let (bv, nv, vr) = rows(v, "values", kvh, d)?;
        if (b, n) != (bv, nv) {
            return Err(Error::shape(
                "values",
                format!("[{b}, {kvh}, {n}, {d}] (as keys)"),
                format!("[{bv}, {kvh}, {nv}, {d}]"),
            ));
        }
        let seqs = self.batch(b)?;
        let per = n * kvh * d;
        if n == 1 && b > 1 {
            self.cache
                .append_decode(layer, &seqs, kr[..].into(), vr[..].into())?;
        } else {
            for (i, &s) in seqs.iter().enumerate() {
                self.cache.append(
                    s,
                    layer,
                    &kr[i * per..(i + 1) * per],
                    &vr[i * per..(i + 1) * per],
                )?;
            }
        }
        Ok(seqs)
    }
}

impl CompressedKVCache for MistralRsCache {
    fn prefill(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        _q: &Tensor,
    ) -> candle_core::Result<DequantResult> {
        let mut st = self.lock().map_err(wrap)?;
        let seqs = st.store(layer, k, v).map_err(wrap)?;
        let c = st.cache.config();
        let (kvh, d) = (c.num_kv_heads, c.head_dim);
        let len = st.cache.seq_len(seqs[0], layer).map_err(wrap)?;
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for &s in &seqs {
            let (kk, vv) = st.cache.read_tokens(s, layer).map_err(wrap)?;
            if kk.len() != len * kvh * d {
                return Err(wrap(Error::shape(
                    "batch",
                    format!("{len} tokens in every row"),
                    kk.len() / (kvh * d),
                )));
            }
            ks.extend_from_slice(&kk);
            vs.extend_from_slice(&vv);
        }
        drop(st);
        // [b][len][kvh][d] -> [b, kvh, len, d], in the engine's dtype and on its device.
        let shape = (seqs.len(), len, kvh, d);
        let out = |x: Vec<f32>| -> candle_core::Result<Tensor> {
            Tensor::from_vec(x, shape, &Device::Cpu)?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(k.dtype())?
                .to_device(k.device())
        };
        Ok(DequantResult {
            k: out(ks)?,
            v: out(vs)?,
            logit_bias: None,
        })
    }

    fn decode(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        q: &Tensor,
        config: &AttendConfig,
    ) -> candle_core::Result<DecodeOutput> {
        let mut st = self.lock().map_err(wrap)?;
        let c = st.cache.config().clone();
        if config.n_kv_groups * c.num_kv_heads != c.num_q_heads {
            return Err(wrap(Error::shape(
                "AttendConfig::n_kv_groups",
                format!(
                    "{} ({} q heads / {} kv heads)",
                    c.num_q_heads / c.num_kv_heads,
                    c.num_q_heads,
                    c.num_kv_heads
                ),
                config.n_kv_groups,
            )));
        }
        if !(config.softmax_scale.is_finite() && config.softmax_scale > 0.0) {
            return Err(wrap(Error::InvalidConfig {
                field: "AttendConfig::softmax_scale",
                reason: format!("{} is not a positive finite scale", config.softmax_scale),
            }));
        }
        let (b, n, mut qr) = rows(q, "queries", c.num_q_heads, c.head_dim).map_err(wrap)?;
        if n != 1 {
            return Err(wrap(Error::shape("queries", "one token per row", n)));
        }
        let seqs = st.store(layer, k, v).map_err(wrap)?;
        if seqs.len() != b {
            return Err(wrap(Error::shape(
                "queries",
                format!("{} rows", seqs.len()),
                b,
            )));
        }
        // The engine's scale, through the cache's own: scores are (q * ratio) . k * scale.
        let ratio = config.softmax_scale / c.scale();
        if ratio != 1.0 {
            qr.iter_mut().for_each(|x| *x *= ratio);
        }
        let att = st.cache.attend(layer, &seqs, &qr).map_err(wrap)?;
        drop(st);
        let out = Tensor::from_vec(att.output, (b, c.num_q_heads, 1, c.head_dim), &Device::Cpu)?
            .to_dtype(q.dtype())?
            .to_device(q.device())?;
        Ok(DecodeOutput::Fused(out))
    }

    fn seq_len(&self, layer: usize) -> usize {
        let Ok(st) = self.lock() else { return 0 };
        st.seqs
            .first()
            .and_then(|&s| st.cache.seq_len(s, layer).ok())
            .unwrap_or(0)
    }

    fn reset(&self) -> candle_core::Result<()> {
        let mut st = self.lock().map_err(wrap)?;
        let seqs = std::mem::take(&mut st.seqs);
        for s in seqs {
            st.cache.remove_sequence(s).map_err(wrap)?;
        }
        Ok(())
    }

    fn memory_usage(&self) -> usize {
        self.lock().map_or(0, |st| st.cache.memory_report().total())
    }
}
