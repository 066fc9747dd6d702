//! candle `Tensor` interop.
//!
//! Owns: conversion between candle tensors and the cache's f32 row-major slices, with shape and
//! dtype checks (f32, f16 and bf16 accepted; anything else is `Error::DType`). Must never: keep a
//! reference to the caller's tensor.

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

fn to_rows(t: &Tensor, what: &'static str, heads: usize, head_dim: usize) -> Result<Vec<f32>> {
    check_dtype(t, what)?;
    let dims = t.dims();
    if dims.len() != 3 || dims[1] != heads || dims[2] != head_dim {
        return Err(Error::shape(
            what,
            format!("[n, {heads}, {head_dim}]"),
            format!("{dims:?}"),
        ));
    }
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl KvCache {
    /// [`KvCache::append`] for tensors of shape `[n, num_kv_heads, head_dim]`.
    pub fn append_tensors(
        &mut self,
        seq: SeqId,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<()> {
        let (h, d) = (self.config().num_kv_heads, self.config().head_dim);
        let k = to_rows(keys, "keys", h, d)?;
        let v = to_rows(values, "values", h, d)?;
        self.append(seq, layer, &k, &v)
    }

    /// [`KvCache::attend`] for a query tensor `[n_seqs, num_q_heads, head_dim]`; the output tensor
    /// has the query's shape, dtype f32, on the CPU.
    pub fn attend_tensor(
        &self,
        layer: usize,
        seqs: &[SeqId],
        queries: &Tensor,
    ) -> Result<(Tensor, Attention)> {
        let (h, d) = (self.config().num_q_heads, self.config().head_dim);
        let q = to_rows(queries, "queries", h, d)?;
        let att = self.attend(layer, seqs, &q)?;
        let out = Tensor::from_slice(&att.output, (seqs.len(), h, d), &Device::Cpu)?;
        Ok((out, att))
    }
}
