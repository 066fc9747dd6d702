//! candle `Tensor` interop.
//!
//! Owns: conversion between candle tensors and the cache's f32 row-major slices, with shape and
//! dtype checks (f32, f16 and bf16 accepted; anything else is `Error::DType`), and on macOS with
//! the `metal` feature the in-place paths for Metal tensors (`metal.rs`). Must never: keep a
//! reference to the caller's tensor.

#[cfg(all(feature = "metal", target_vendor = "apple"))]
mod metal;

use crate::attention::Attention;
use crate::cache::{KvCache, SeqId};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The dtypes the cache takes from tensors: f32, f16, bf16 (anything else is `Error::DType`).
pub(crate) fn check_dtype(t: &Tensor, what: &'static str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(Error::DType {
            what,
            got: format!("{other:?}"),
            accepted: "f32, f16, bf16",
        }),
    }
}

/// Checks dtype and shape `[n, heads, head_dim]`.
fn check_rows(t: &Tensor, what: &'static str, heads: usize, head_dim: usize) -> Result<()> {
    check_dtype(t, what)?;
    let dims = t.dims();
    if dims.len() != 3 || dims[1] != heads || dims[2] != head_dim {
        return Err(Error::shape(
            what,
            format!("[n, {heads}, {head_dim}]"),
            format!("{dims:?}"),
        ));
    }
    Ok(())
}

fn to_rows(t: &Tensor, what: &'static str, heads: usize, head_dim: usize) -> Result<Vec<f32>> {
    check_rows(t, what, heads, head_dim)?;
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl KvCache {
    /// [`KvCache::append`] for tensors of shape `[n, num_kv_heads, head_dim]`. Contiguous tensors
    /// on a Metal device (macOS, `metal`) are read in place from their shared buffers, in their
    /// own dtype (no copy).
    pub fn append_tensors(
        &mut self,
        seq: SeqId,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<()> {
        let (h, d) = (self.config().num_kv_heads, self.config().head_dim);
        #[cfg(all(feature = "metal", target_vendor = "apple"))]
        {
            check_rows(keys, "keys", h, d)?;
            check_rows(values, "values", h, d)?;
            if let Some(r) = metal::append(self, seq, layer, keys, values)? {
                return Ok(r);
            }
        }
        let k = to_rows(keys, "keys", h, d)?;
        let v = to_rows(values, "values", h, d)?;
        self.append(seq, layer, &k, &v)
    }

    /// [`KvCache::attend`] for a query tensor `[n_seqs, num_q_heads, head_dim]`; the output tensor
    /// has the query's shape, dtype f32, on the CPU. A Metal cache given a contiguous query tensor
    /// on the same Metal device (macOS, `metal`) decodes from the tensor's own buffer and writes a
    /// new f32 tensor on that device: no host copy either way.
    pub fn attend_tensor(
        &self,
        layer: usize,
        seqs: &[SeqId],
        queries: &Tensor,
    ) -> Result<(Tensor, Attention)> {
        let (h, d) = (self.config().num_q_heads, self.config().head_dim);
        #[cfg(all(feature = "metal", target_vendor = "apple"))]
        {
            check_rows(queries, "queries", h, d)?;
            if let Some(r) = metal::attend(self, layer, seqs, queries)? {
                return Ok(r);
            }
        }
        let q = to_rows(queries, "queries", h, d)?;
        let att = self.attend(layer, seqs, &q)?;
        let out = Tensor::from_slice(&att.output, (seqs.len(), h, d), &Device::Cpu)?;
        Ok((out, att))
    }
}
