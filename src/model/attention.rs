//! An exact reference cache for the forward pass (the seam itself, [`AttentionCache`], lives in
//! the core: [`crate::protect`]).
//!
//! Owns: [`ExactAttention`], a plain f32 cache with exact causal
//! softmax attention used to validate the forward pass independently of kvtier's tiered cache. Must
//! never: apply RoPE or any projection (keys arrive post-RoPE, outputs leave pre-`attn_output`), or
//! approximate anything in [`ExactAttention`] — it is the oracle the tiered cache is compared with.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

pub use crate::protect::{check_decode, check_qkv, AttentionCache, AttentionShape};
use crate::{Error, MemoryReport, Result};

/// Keys and values as a cache received them, per layer (`[n, kv_heads, head_dim]` each).
#[derive(Debug, Clone, PartialEq)]
pub struct KvRecord {
    /// Per layer, post-RoPE keys.
    pub keys: Vec<Vec<f32>>,
    /// Per layer, values.
    pub values: Vec<Vec<f32>>,
}

impl KvRecord {
    /// An empty record for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
        }
    }

    /// Bytes held by the record.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|x| x.len() * 4)
            .sum()
    }
}

/// Passes every call through to `inner` and records the keys/values that went in, so an exact
/// prefill computed once can be replayed ([`AttentionCache::append`]) into caches of other
/// configurations: prefill attention over the new tokens is exact in every configuration, so the
/// K/V it produces are the same whatever the cache.
pub struct Recorder<'a> {
    inner: &'a mut dyn AttentionCache,
    record: KvRecord,
}

impl<'a> Recorder<'a> {
    /// Starts recording calls made to `inner`.
    pub fn new(inner: &'a mut dyn AttentionCache) -> Self {
        let layers = inner.shape().num_layers;
        Self {
            inner,
            record: KvRecord::new(layers),
        }
    }

    /// What went through.
    pub fn into_record(self) -> KvRecord {
        self.record
    }

    fn keep(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.record.keys[layer].extend_from_slice(k);
        self.record.values[layer].extend_from_slice(v);
    }
}

impl AttentionCache for Recorder<'_> {
    fn shape(&self) -> AttentionShape {
        self.inner.shape()
    }
    fn prefill(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let out = self.inner.prefill(layer, q, k, v)?;
        self.keep(layer, k, v);
        Ok(out)
    }
    fn decode(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let out = self.inner.decode(layer, q, k, v)?;
        self.keep(layer, k, v);
        Ok(out)
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        self.inner.append(layer, k, v)?;
        self.keep(layer, k, v);
        Ok(())
    }
    fn reset(&mut self) -> Result<()> {
        self.record = KvRecord::new(self.record.keys.len());
        self.inner.reset()
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler vectorises the loop.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Where one kv head's channels sit inside a cached token row.
#[derive(Debug, Clone, Copy)]
struct KvHead {
    /// Floats per token row (`kv_heads * head_dim`).
    row: usize,
    /// First channel of this head in a row.
    offset: usize,
    /// Channels per head.
    hd: usize,
}

impl KvHead {
    #[inline]
    fn of<'a>(&self, x: &'a [f32], token: usize) -> &'a [f32] {
        let at = token * self.row + self.offset;
        &x[at..at + self.hd]
    }
}

/// Exact softmax attention of one query head over the first `t` cached tokens of one kv head.
fn attend_one(q: &[f32], keys: &[f32], values: &[f32], t: usize, head: KvHead, out: &mut [f32]) {
    let scale = 1.0 / (head.hd as f32).sqrt();
    let mut scores = Vec::with_capacity(t);
    let mut m = f32::NEG_INFINITY;
    for j in 0..t {
        let s = dot(q, head.of(keys, j)) * scale;
        m = m.max(s);
        scores.push(s);
    }
    let mut z = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        z += *s;
    }
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        let w = p / z;
        for (o, &x) in out.iter_mut().zip(head.of(values, j)) {
            *o += w * x;
        }
    }
}

/// A full-precision f32 KV cache with exact attention: the oracle for the forward pass.
#[derive(Debug, Clone)]
pub struct ExactAttention {
    shape: AttentionShape,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl ExactAttention {
    /// An empty cache for `shape`.
    pub fn new(shape: AttentionShape) -> Result<Self> {
        if shape.num_kv_heads == 0
            || shape.head_dim == 0
            || !shape.num_q_heads.is_multiple_of(shape.num_kv_heads)
        {
            return Err(Error::shape(
                "shape",
                "kv_heads > 0, head_dim > 0, q_heads a multiple of kv_heads",
                format!("{shape:?}"),
            ));
        }
        Ok(Self {
            shape,
            keys: vec![Vec::new(); shape.num_layers],
            values: vec![Vec::new(); shape.num_layers],
        })
    }

    /// Tokens stored in `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.keys.get(layer).map_or(0, |k| {
            k.len() / (self.shape.num_kv_heads * self.shape.head_dim)
        })
    }

    /// Whether no layer holds a token.
    pub fn is_empty(&self) -> bool {
        self.keys.iter().all(Vec::is_empty)
    }

    /// Block prefill with candle GEMMs: for each kv head, scores `Q_g K^T` of the query rows of
    /// its group, causal mask and softmax on the host, then `P V`. Query rows go in chunks of
    /// `GEMM_CHUNK_ROWS` tokens to bound the score matrix. The new K/V are already stored.
    fn prefill_gemm(&self, layer: usize, q: &[f32], n: usize, past: usize) -> Result<Vec<f32>> {
        let s = self.shape;
        let (hd, qh, kvh) = (s.head_dim, s.num_q_heads, s.num_kv_heads);
        let group = qh / kvh;
        let total = past + n;
        let dev = Device::Cpu;
        let scale = 1.0 / (hd as f32).sqrt();
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        let mut out = vec![0f32; n * qh * hd];
        for g in 0..kvh {
            // K_g^T [hd, total] and V_g [total, hd] of this kv head.
            let mut kt = vec![0f32; hd * total];
            let mut vg = vec![0f32; total * hd];
            for j in 0..total {
                let at = (j * kvh + g) * hd;
                for c in 0..hd {
                    kt[c * total + j] = keys[at + c];
                }
                vg[j * hd..(j + 1) * hd].copy_from_slice(&values[at..at + hd]);
            }
            let kt = Tensor::from_vec(kt, (hd, total), &dev)?;
            let vg = Tensor::from_vec(vg, (total, hd), &dev)?;
            for c0 in (0..n).step_by(GEMM_CHUNK_ROWS) {
                let rows = GEMM_CHUNK_ROWS.min(n - c0);
                // The last key any row of this chunk may see.
                let width = past + c0 + rows;
                // Q rows (token i, head h of the group), row-major.
                let mut qg = Vec::with_capacity(rows * group * hd);
                for i in c0..c0 + rows {
                    let at = (i * qh + g * group) * hd;
                    qg.extend_from_slice(&q[at..at + group * hd]);
                }
                let qg = Tensor::from_vec(qg, (rows * group, hd), &dev)?;
                let scores = qg.matmul(&kt.narrow(1, 0, width)?)?;
                let mut p = scores.flatten_all()?.to_vec1::<f32>()?;
                p.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
                    let visible = past + c0 + r / group + 1;
                    let m = row[..visible]
                        .iter()
                        .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                    let mut z = 0f32;
                    for x in row[..visible].iter_mut() {
                        *x = (*x * scale - m).exp();
                        z += *x;
                    }
                    for x in row[..visible].iter_mut() {
                        *x /= z;
                    }
                    row[visible..].fill(0.0);
                });
                let p = Tensor::from_vec(p, (rows * group, width), &dev)?;
                let o = p
                    .matmul(&vg.narrow(0, 0, width)?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (r, orow) in o.chunks_exact(hd).enumerate() {
                    let (i, h) = (c0 + r / group, g * group + r % group);
                    out[(i * qh + h) * hd..(i * qh + h + 1) * hd].copy_from_slice(orow);
                }
            }
        }
        Ok(out)
    }
}

/// Prefills of at least this many tokens use [`ExactAttention::prefill_gemm`].
const GEMM_MIN_ROWS: usize = 16;
/// Query tokens per GEMM chunk.
const GEMM_CHUNK_ROWS: usize = 256;

impl AttentionCache for ExactAttention {
    fn shape(&self) -> AttentionShape {
        self.shape
    }

    fn prefill(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let s = self.shape;
        let n = check_qkv(&s, layer, q, k, v)?;
        let past = self.len(layer);
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
        if n >= GEMM_MIN_ROWS {
            return self.prefill_gemm(layer, q, n, past);
        }
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        let (hd, qh, kvh) = (s.head_dim, s.num_q_heads, s.num_kv_heads);
        let group = qh / kvh;
        let mut out = vec![0f32; n * qh * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
            let (i, h) = (idx / qh, idx % qh);
            let qv = &q[(i * qh + h) * hd..(i * qh + h + 1) * hd];
            let head = KvHead {
                row: kvh * hd,
                offset: (h / group) * hd,
                hd,
            };
            attend_one(qv, keys, values, past + i + 1, head, o);
        });
        Ok(out)
    }

    fn decode(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        check_decode(&self.shape, layer, q, k, v)?;
        self.prefill(layer, q, k, v)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let row = self.shape.num_kv_heads * self.shape.head_dim;
        if layer >= self.shape.num_layers || k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(Error::shape(
                "append",
                format!(
                    "a layer < {} and equal multiples of {row}",
                    self.shape.num_layers
                ),
                format!("layer {layer}, {} keys, {} values", k.len(), v.len()),
            ));
        }
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.keys
            .iter_mut()
            .chain(self.values.iter_mut())
            .for_each(Vec::clear);
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let floats: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        let row = self.shape.num_kv_heads * self.shape.head_dim;
        MemoryReport {
            hot_bytes: floats * std::mem::size_of::<f32>(),
            f16_equivalent_bytes: floats * 2,
            tokens: self.keys.iter().map(|k| k.len() / row).sum(),
            ..MemoryReport::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> AttentionShape {
        AttentionShape {
            num_layers: 2,
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
        }
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn first_token_attends_only_to_itself() {
        let s = shape();
        let mut c = ExactAttention::new(s).unwrap();
        let (q, k, v) = (pseudo(32, 1), pseudo(16, 2), pseudo(16, 3));
        let out = c.prefill(0, &q, &k, &v).unwrap();
        // One key: softmax weight 1, output = that key's value for every q head of the group.
        for h in 0..4 {
            let kvh = h / 2;
            assert_eq!(&out[h * 8..(h + 1) * 8], &v[kvh * 8..(kvh + 1) * 8]);
        }
    }

    #[test]
    fn prefill_equals_token_by_token_decode() {
        let s = shape();
        let n = 7;
        let (q, k, v) = (pseudo(n * 32, 4), pseudo(n * 16, 5), pseudo(n * 16, 6));
        let mut a = ExactAttention::new(s).unwrap();
        let block = a.prefill(1, &q, &k, &v).unwrap();
        let mut b = ExactAttention::new(s).unwrap();
        let mut steps = Vec::new();
        for i in 0..n {
            steps.extend(
                b.decode(
                    1,
                    &q[i * 32..(i + 1) * 32],
                    &k[i * 16..(i + 1) * 16],
                    &v[i * 16..(i + 1) * 16],
                )
                .unwrap(),
            );
        }
        for (x, y) in block.iter().zip(&steps) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        assert_eq!(a.len(1), n);
        assert_eq!(a.len(0), 0);
    }

    #[test]
    fn gemm_prefill_matches_per_head_loop() {
        // Prefill of 300 tokens in two blocks (GEMM path, chunked), against token-by-token decode.
        let s = AttentionShape {
            num_layers: 1,
            num_q_heads: 6,
            num_kv_heads: 2,
            head_dim: 16,
        };
        let n = 300;
        let (q, k, v) = (pseudo(n * 96, 21), pseudo(n * 32, 22), pseudo(n * 32, 23));
        let mut a = ExactAttention::new(s).unwrap();
        let mut block = a
            .prefill(0, &q[..40 * 96], &k[..40 * 32], &v[..40 * 32])
            .unwrap();
        block.extend(
            a.prefill(0, &q[40 * 96..], &k[40 * 32..], &v[40 * 32..])
                .unwrap(),
        );
        let mut b = ExactAttention::new(s).unwrap();
        let mut steps = Vec::new();
        for i in 0..n {
            steps.extend(
                b.decode(
                    0,
                    &q[i * 96..(i + 1) * 96],
                    &k[i * 32..(i + 1) * 32],
                    &v[i * 32..(i + 1) * 32],
                )
                .unwrap(),
            );
        }
        let worst = block
            .iter()
            .zip(&steps)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "worst difference {worst}");
    }

    #[test]
    fn rejects_bad_lengths_and_layers() {
        let mut c = ExactAttention::new(shape()).unwrap();
        assert!(c.prefill(2, &[0.0; 32], &[0.0; 16], &[0.0; 16]).is_err());
        assert!(c.prefill(0, &[0.0; 31], &[0.0; 16], &[0.0; 16]).is_err());
        assert!(c.prefill(0, &[0.0; 32], &[0.0; 15], &[0.0; 16]).is_err());
        assert!(c.decode(0, &[0.0; 64], &[0.0; 32], &[0.0; 32]).is_err());
    }

    #[test]
    fn recorded_prefill_replays_to_the_same_state() {
        let s = shape();
        let (q, k, v) = (pseudo(5 * 32, 7), pseudo(5 * 16, 8), pseudo(5 * 16, 9));
        let mut a = ExactAttention::new(s).unwrap();
        let record = {
            let mut rec = Recorder::new(&mut a);
            rec.prefill(0, &q, &k, &v).unwrap();
            rec.prefill(1, &q, &k, &v).unwrap();
            rec.into_record()
        };
        assert_eq!(record.keys[0], k);
        assert_eq!(record.bytes(), 4 * 5 * 16 * 4);
        let mut b = ExactAttention::new(s).unwrap();
        for layer in 0..2 {
            b.append(layer, &record.keys[layer], &record.values[layer])
                .unwrap();
        }
        let (q1, k1, v1) = (pseudo(32, 10), pseudo(16, 11), pseudo(16, 12));
        assert_eq!(
            a.decode(1, &q1, &k1, &v1).unwrap(),
            b.decode(1, &q1, &k1, &v1).unwrap()
        );
        assert!(b.append(0, &[0.0; 15], &[0.0; 15]).is_err());
    }

    #[test]
    fn reset_and_memory() {
        let mut c = ExactAttention::new(shape()).unwrap();
        c.prefill(0, &pseudo(64, 1), &pseudo(32, 2), &pseudo(32, 3))
            .unwrap();
        c.prefill(1, &pseudo(64, 1), &pseudo(32, 2), &pseudo(32, 3))
            .unwrap();
        let m = c.memory();
        assert_eq!(m.tokens, 4); // 2 tokens in each of 2 layers
        assert_eq!(m.hot_bytes, 2 * 2 * 2 * 16 * 4);
        assert_eq!(m.f16_equivalent_bytes * 2, m.hot_bytes);
        c.reset().unwrap();
        assert!(c.is_empty());
        assert_eq!(c.memory().hot_bytes, 0);
    }
}
