//! Llama-architecture forward pass over GGUF weights.
//!
//! Owns: reading `llama.*` hyperparameters and `blk.N.*` weights from a GGUF file, and the forward
//! pass — token embedding, RMSNorm, Q/K/V projections, interleaved-pair RoPE, attention through an
//! [`AttentionCache`], output projection, SwiGLU feed-forward, final norm, (tied) output head. Weights
//! stay quantised and are multiplied with candle's `QMatMul` on the CPU; norms, activations and
//! residuals are candle ops; attention and RoPE run on host f32 slices because that is what the
//! cache takes.
//!
//! RoPE form: GGUF converters permute the rows of `attn_q` / `attn_k` so that rotary pairs are
//! *adjacent* channels `(2i, 2i+1)` (the original Meta layout), not the Hugging Face half-split
//! `(i, i + d/2)`. Rotating half-split pairs on GGUF weights runs without error and gives a
//! perplexity around 274 on the reference text instead of about 24; [`Rope`] therefore rotates
//! adjacent pairs only.
//!
//! Must never: keep its own KV state (all of it lives in the cache it is handed), dequantise the big
//! projection matrices, or read anything but the GGUF file.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::attention::{AttentionCache, AttentionShape};
use super::error::{ModelError, Result};
use super::gguf::{get_f32_opt, get_u32, get_u32_opt, metadata_str, GgufFile};
use super::tokenizer::GgufTokenizer;

/// Hyperparameters of a Llama-family model, from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `{arch}.block_count`.
    pub num_layers: usize,
    /// `{arch}.embedding_length`.
    pub hidden_size: usize,
    /// `{arch}.attention.head_count`.
    pub num_q_heads: usize,
    /// `{arch}.attention.head_count_kv` (defaults to the query head count).
    pub num_kv_heads: usize,
    /// `{arch}.attention.key_length`, else `hidden_size / num_q_heads`.
    pub head_dim: usize,
    /// `{arch}.feed_forward_length`.
    pub ffn_size: usize,
    /// Rows of `token_embd.weight`.
    pub vocab_size: usize,
    /// `{arch}.context_length`: positions past it are refused.
    pub context_length: usize,
    /// `{arch}.rope.freq_base` (default 10000).
    pub rope_base: f32,
    /// `{arch}.rope.dimension_count` (default `head_dim`): leading channels of each head that rotate.
    pub rope_dim: usize,
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// Whether the output head reuses `token_embd.weight` (no `output.weight` in the file).
    pub tied_embeddings: bool,
}

impl LlamaConfig {
    /// Reads the hyperparameters of `file`; refuses architectures other than `llama`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let c = file.content();
        let arch = metadata_str(c, "general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let num_layers = get_u32(c, &key("block_count"))? as usize;
        let hidden_size = get_u32(c, &key("embedding_length"))? as usize;
        let num_q_heads = get_u32(c, &key("attention.head_count"))? as usize;
        let num_kv_heads =
            get_u32_opt(c, &key("attention.head_count_kv"))?.map_or(num_q_heads, |x| x as usize);
        let ffn_size = get_u32(c, &key("feed_forward_length"))? as usize;
        let context_length = get_u32(c, &key("context_length"))? as usize;
        let rms_eps = get_f32_opt(c, &key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| ModelError::MissingMetadata(key("attention.layer_norm_rms_epsilon")))?;
        let rope_base = get_f32_opt(c, &key("rope.freq_base"))?.unwrap_or(10_000.0);
        let bad = |k: String, reason: String| ModelError::BadMetadata { key: k, reason };
        if num_q_heads == 0 || num_kv_heads == 0 || !num_q_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(
                key("attention.head_count_kv"),
                format!("{num_kv_heads} kv heads must be > 0 and divide {num_q_heads} query heads"),
            ));
        }
        let head_dim = match get_u32_opt(c, &key("attention.key_length"))? {
            Some(d) => d as usize,
            None if hidden_size.is_multiple_of(num_q_heads) => hidden_size / num_q_heads,
            None => {
                return Err(bad(
                    key("embedding_length"),
                    format!("{hidden_size} is not a multiple of {num_q_heads} heads"),
                ))
            }
        };
        let rope_dim =
            get_u32_opt(c, &key("rope.dimension_count"))?.map_or(head_dim, |x| x as usize);
        if rope_dim == 0 || rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(bad(
                key("rope.dimension_count"),
                format!("{rope_dim} must be even and in 2..={head_dim}"),
            ));
        }
        if !(rms_eps > 0.0 && rope_base > 1.0) {
            return Err(bad(
                key("rope.freq_base"),
                format!("rope base {rope_base}, rms eps {rms_eps}"),
            ));
        }
        let embd = file.tensor_shape("token_embd.weight")?;
        if embd.len() != 2 || embd[1] != hidden_size {
            return Err(ModelError::TensorShape {
                name: "token_embd.weight".into(),
                expected: vec![0, hidden_size],
                got: embd,
            });
        }
        Ok(Self {
            num_layers,
            hidden_size,
            num_q_heads,
            num_kv_heads,
            head_dim,
            ffn_size,
            vocab_size: embd[0],
            context_length,
            rope_base,
            rope_dim,
            rms_eps,
            tied_embeddings: !file.has_tensor("output.weight"),
        })
    }

    /// The attention geometry a cache for this model must have.
    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            num_layers: self.num_layers,
            num_q_heads: self.num_q_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// Rotary position embedding over adjacent channel pairs `(2i, 2i+1)` — the GGUF layout.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Angular frequency of pair `i`: `base^(-2i/rope_dim) / freq_factor[i]`.
    inv_freq: Vec<f64>,
    head_dim: usize,
}

/// cos/sin of every (position, pair) of one forward call.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

impl Rope {
    /// Frequencies for `rope_dim` rotating channels of `head_dim`; `freq_factors` (Llama 3 style
    /// `rope_freqs.weight`) divide the frequencies when present.
    pub fn new(
        base: f32,
        rope_dim: usize,
        head_dim: usize,
        freq_factors: Option<&[f32]>,
    ) -> Result<Self> {
        let pairs = rope_dim / 2;
        if let Some(f) = freq_factors {
            if f.len() != pairs {
                return Err(ModelError::TensorShape {
                    name: "rope_freqs.weight".into(),
                    expected: vec![pairs],
                    got: vec![f.len()],
                });
            }
        }
        let inv_freq = (0..pairs)
            .map(|i| {
                let f = (base as f64).powf(-(2.0 * i as f64) / rope_dim as f64);
                f / freq_factors.map_or(1.0, |ff| ff[i] as f64)
            })
            .collect();
        Ok(Self { inv_freq, head_dim })
    }

    /// cos/sin for positions `pos0 .. pos0 + n`.
    pub fn table(&self, pos0: usize, n: usize) -> RopeTable {
        let pairs = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * pairs);
        let mut sin = Vec::with_capacity(n * pairs);
        for p in pos0..pos0 + n {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { cos, sin, pairs }
    }

    /// Rotates `x` (`[n, heads, head_dim]`, row `i` at position `pos0 + i` of `table`) in place.
    pub fn apply(&self, x: &mut [f32], heads: usize, table: &RopeTable) {
        let hd = self.head_dim;
        for (i, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            let cos = &table.cos[i * table.pairs..(i + 1) * table.pairs];
            let sin = &table.sin[i * table.pairs..(i + 1) * table.pairs];
            for head in row.chunks_exact_mut(hd) {
                for (j, pair) in head[..2 * table.pairs].chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[j] - b * sin[j];
                    pair[1] = a * sin[j] + b * cos[j];
                }
            }
        }
    }
}

/// A projection: the quantised GGUF weight, plus (optionally) a dequantised f32 copy for blocks.
///
/// candle's quantised matmul computes one row at a time against the packed weight (about 8 GFLOP/s
/// on two cores whatever the row count), which is right for decode; a dense f32 GEMM reaches about
/// 180 GFLOP/s at 512 rows. So block prefill of `DENSE_MIN_ROWS` rows or more uses the f32 copy,
/// and decode always uses the quantised weight.
#[derive(Debug)]
struct Linear {
    quant: QMatMul,
    /// `[in, out]`: the transposed dequantised weight, contiguous for the GEMM.
    dense_t: Option<Tensor>,
    /// Use `dense_t` for every call, single rows included (see [`LoadOptions::dense_decode`]).
    dense_always: bool,
}

/// Row count from which a block uses the dense copy (when the model was loaded with one).
const DENSE_MIN_ROWS: usize = 8;

impl Linear {
    fn new(t: Arc<QTensor>, opts: LoadOptions) -> Result<Self> {
        let dense_t = if opts.dense_prefill || opts.dense_decode {
            Some(t.dequantize(&Device::Cpu)?.t()?.contiguous()?)
        } else {
            None
        };
        Ok(Self {
            quant: QMatMul::from_arc(t)?,
            dense_t,
            dense_always: opts.dense_decode,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.dense_t {
            Some(w) if self.dense_always || x.dim(0)? >= DENSE_MIN_ROWS => Ok(x.matmul(w)?),
            _ => Ok(self.quant.forward(x)?),
        }
    }

    fn dense_bytes(&self) -> usize {
        self.dense_t
            .as_ref()
            .map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes())
    }
}

/// How [`Llama::load_with`] prepares the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep a dequantised f32 copy of every projection for block prefill (about 4.5x the Q4_1
    /// weight bytes extra; prefill gets ~20x faster on the CPU).
    pub dense_prefill: bool,
    /// Use the dequantised f32 weights for decode steps too, instead of candle's quantised matmul.
    /// Slower per token (~17 vs ~25 tok/s here), but free of the Q8_1 rounding that the quantised
    /// matmul applies to activations: that rounding turns 1e-6 differences in attention outputs
    /// into ~0.05 nats of per-token NLL noise, which hides small cache effects. Evaluations that
    /// compare cache configurations use it; the default keeps decode on the quantised weights.
    pub dense_decode: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dense_prefill: true,
            dense_decode: false,
        }
    }
}

#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// A Llama-family model loaded from GGUF, with its tokenizer.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    tokenizer: GgufTokenizer,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Linear,
    rope: Rope,
    device: Device,
    weight_bytes: usize,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps as f64)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

impl Llama {
    /// Loads weights, hyperparameters and tokenizer from a GGUF file (on the CPU), with the default
    /// [`LoadOptions`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, LoadOptions::default())
    }

    /// Loads weights, hyperparameters and tokenizer from a GGUF file (on the CPU).
    pub fn load_with(path: impl AsRef<Path>, opts: LoadOptions) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&file)?;
        let tokenizer = GgufTokenizer::from_gguf(file.content())?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                reason: format!(
                    "{} tokens but token_embd has {} rows",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        let device = Device::Cpu;
        let c = &config;
        let mut weight_bytes = 0usize;
        let mut load = |file: &mut GgufFile, name: &str, expected: &[usize]| -> Result<QTensor> {
            let t = file.tensor(name, &device)?;
            if t.shape().dims() != expected {
                return Err(ModelError::TensorShape {
                    name: name.into(),
                    expected: expected.to_vec(),
                    got: t.shape().dims().to_vec(),
                });
            }
            weight_bytes += t.storage_size_in_bytes();
            Ok(t)
        };
        let dense = |t: QTensor| -> Result<Tensor> {
            Ok(t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)
        };
        let qm = |t: QTensor| Linear::new(Arc::new(t), opts);

        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_q_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let embed = Arc::new(load(&mut file, "token_embd.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: dense(load(&mut file, &n("attn_norm"), &[h])?)?,
                wq: qm(load(&mut file, &n("attn_q"), &[q_dim, h])?)?,
                wk: qm(load(&mut file, &n("attn_k"), &[kv_dim, h])?)?,
                wv: qm(load(&mut file, &n("attn_v"), &[kv_dim, h])?)?,
                wo: qm(load(&mut file, &n("attn_output"), &[h, q_dim])?)?,
                ffn_norm: dense(load(&mut file, &n("ffn_norm"), &[h])?)?,
                w_gate: qm(load(&mut file, &n("ffn_gate"), &[c.ffn_size, h])?)?,
                w_up: qm(load(&mut file, &n("ffn_up"), &[c.ffn_size, h])?)?,
                w_down: qm(load(&mut file, &n("ffn_down"), &[h, c.ffn_size])?)?,
            });
        }
        let output_norm = dense(load(&mut file, "output_norm.weight", &[h])?)?;
        let output = if c.tied_embeddings {
            Linear::new(embed.clone(), opts)?
        } else {
            qm(load(&mut file, "output.weight", &[c.vocab_size, h])?)?
        };
        let freq_factors = if file.has_tensor("rope_freqs.weight") {
            let t = load(&mut file, "rope_freqs.weight", &[c.rope_dim / 2])?;
            Some(dense(t)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(c.rope_base, c.rope_dim, c.head_dim, freq_factors.as_deref())?;
        let mut dense = output.dense_bytes();
        for l in &layers {
            dense += [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                .iter()
                .map(|w| w.dense_bytes())
                .sum::<usize>();
        }
        let weight_bytes = weight_bytes + dense;
        Ok(Self {
            config,
            tokenizer,
            embed,
            layers,
            output_norm,
            output,
            rope,
            device,
            weight_bytes,
        })
    }

    /// Hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The tokenizer read from the same GGUF.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    /// Bytes of weights held: quantised sizes as stored, plus the dense prefill copies if any.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn check_cache(&self, cache: &dyn AttentionCache) -> Result<()> {
        let want = self.config.attention_shape();
        let got = cache.shape();
        if want != got {
            return Err(ModelError::InvalidArgument {
                what: "cache",
                reason: format!("cache shape {got:?} does not match the model's {want:?}"),
            });
        }
        Ok(())
    }

    /// Runs `tokens` at positions `pos0..pos0+n` through every layer. `decode` selects the cache's
    /// one-token decode path (requires `n == 1`) instead of block prefill. Returns the final-normed
    /// hidden states `[n, hidden]`.
    fn run(
        &self,
        tokens: &[u32],
        pos0: usize,
        cache: &mut dyn AttentionCache,
        decode: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::InvalidArgument {
                what: "tokens",
                reason: "empty".into(),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: c.vocab_size,
            });
        }
        if pos0 + n > c.context_length {
            return Err(ModelError::ContextOverflow {
                position: pos0 + n - 1,
                context: c.context_length,
            });
        }
        self.check_cache(cache)?;
        let (q_dim, kv_dim) = (c.num_q_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let table = self.rope.table(pos0, n);
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.embedding(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut q = layer.wq.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.wk.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.wv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            debug_assert_eq!(
                (q.len(), k.len(), v.len()),
                (n * q_dim, n * kv_dim, n * kv_dim)
            );
            self.rope.apply(&mut q, c.num_q_heads, &table);
            self.rope.apply(&mut k, c.num_kv_heads, &table);
            let att = if decode {
                cache.decode(li, &q, &k, &v)?
            } else {
                cache.prefill(li, &q, &k, &v)?
            };
            if att.len() != n * q_dim {
                return Err(ModelError::InvalidArgument {
                    what: "cache output",
                    reason: format!("layer {li}: {} values, expected {}", att.len(), n * q_dim),
                });
            }
            let att = Tensor::from_vec(att, (n, q_dim), &self.device)?;
            x = (x + layer.wo.forward(&att)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate = layer.w_gate.forward(&h)?.silu()?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        rms_norm(&x, &self.output_norm, c.rms_eps)
    }

    /// Block prefill: `tokens` at positions `pos0..`, attention through `cache.prefill`.
    /// Returns final hidden states `[n, hidden]`; turn rows into logits with [`Llama::logits`].
    pub fn prefill(
        &self,
        tokens: &[u32],
        pos0: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor> {
        self.run(tokens, pos0, cache, false)
    }

    /// One decode step: `token` at position `pos`, attention through `cache.decode`.
    /// Returns the final hidden state `[1, hidden]`.
    pub fn decode(&self, token: u32, pos: usize, cache: &mut dyn AttentionCache) -> Result<Tensor> {
        self.run(&[token], pos, cache, true)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`, as host rows.
    pub fn logits(&self, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .output
            .forward(hidden)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_adjacent_pairs_and_preserves_norm() {
        let rope = Rope::new(10_000.0, 8, 8, None).unwrap();
        let t = rope.table(3, 1);
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let before = x.clone();
        rope.apply(&mut x, 1, &t);
        // Pair 0 rotates by angle 3 rad (inv_freq 1).
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((x[0] - (1.0 * c - 2.0 * s)).abs() < 1e-5);
        assert!((x[1] - (1.0 * s + 2.0 * c)).abs() < 1e-5);
        // Each adjacent pair keeps its length (a half-split rotation would mix pairs (0,4), (1,5), ...).
        for p in 0..4 {
            let n0 = before[2 * p].hypot(before[2 * p + 1]);
            let n1 = x[2 * p].hypot(x[2 * p + 1]);
            assert!((n0 - n1).abs() < 1e-4, "pair {p}: {n0} vs {n1}");
        }
    }

    #[test]
    fn rope_position_zero_is_identity_and_partial_dims_untouched() {
        let rope = Rope::new(100_000.0, 4, 8, None).unwrap();
        let mut x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let orig = x.clone();
        rope.apply(&mut x, 2, &rope.table(0, 1));
        assert_eq!(x, orig);
        rope.apply(&mut x, 2, &rope.table(5, 1));
        // Channels 4..8 of each head are past rope_dim and must not move.
        assert_eq!(&x[4..8], &orig[4..8]);
        assert_eq!(&x[12..16], &orig[12..16]);
        assert_ne!(&x[0..4], &orig[0..4]);
    }

    #[test]
    fn rope_relative_property() {
        // <R(p)q, R(p+d)k> depends only on d.
        let rope = Rope::new(100_000.0, 8, 8, None).unwrap();
        let q: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32 * 0.91).cos()).collect();
        let score = |p: usize, d: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope.apply(&mut a, 1, &rope.table(p, 1));
            rope.apply(&mut b, 1, &rope.table(p + d, 1));
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(0, 5) - score(100, 5)).abs() < 1e-4);
        assert!((score(0, 5) - score(0, 6)).abs() > 1e-4);
    }

    #[test]
    fn freq_factors_must_match_pairs() {
        assert!(Rope::new(10_000.0, 8, 8, Some(&[1.0; 3])).is_err());
        let r = Rope::new(10_000.0, 8, 8, Some(&[2.0; 4])).unwrap();
        let plain = Rope::new(10_000.0, 8, 8, None).unwrap();
        assert!((r.inv_freq[1] * 2.0 - plain.inv_freq[1]).abs() < 1e-12);
    }
}
