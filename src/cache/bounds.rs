//! Per-page key bounds, for query-time elimination, and value error bounds, for certified
//! attention.
//!
//! Owns: [`KvCache::page_key_bounds`], the one place that says where a page's key bounds come
//! from in each tier, and [`KvCache::page_value_error`]. Must never: decode a page's payload, move a page, or report bounds that a
//! stored key can fall outside of (callers build a guarantee on them).

use super::{KvCache, PageRef, SeqId, Tier};
use crate::backend::{BackendStorage, DeviceLocation};
use crate::error::{Error, Result};
use crate::quant::{keys::key_bounds, values::value_error_bound, WarmLayout};

impl KvCache {
    /// Writes per-channel bounds `[num_kv_heads][head_dim]` of the keys of page `page` of `seq`
    /// in `layer` into `lo` / `hi` and returns true: every key of the page, as attention reads
    /// it, lies in `[lo, hi]`. Returns false when the page has no bounds (evicted pages; cold
    /// copies of exact pages without a summary): callers must then attend it, not skip it.
    ///
    /// Hot pages: the outward-rounded f16 summary kept since append. Warm pages: their own
    /// quantisation parameters (`min`, `min + step * max_code`), read from the device once per
    /// page on device backends and kept on the host (in the page's metadata, counted in
    /// `metadata_bytes`: `8 * kv_heads * head_dim` bytes per warm page that was asked). Cold pages: the summary when they
    /// left the hot tier with one, else the parameters in their cold or archive bytes.
    pub fn page_key_bounds(
        &self,
        seq: SeqId,
        layer: usize,
        page: usize,
        lo: &mut [f32],
        hi: &mut [f32],
    ) -> Result<bool> {
        let n = self.cfg.num_kv_heads * self.cfg.head_dim;
        if lo.len() != n || hi.len() != n {
            return Err(Error::shape(
                "key bounds",
                format!("{n} values each"),
                format!("{} and {}", lo.len(), hi.len()),
            ));
        }
        let p = PageRef { seq, layer, page };
        let e = self.page(p)?;
        let summary = |lo: &mut [f32], hi: &mut [f32]| -> Result<bool> {
            match self.page_meta(seq, layer)?[page].bounds.as_ref() {
                Some(b) => {
                    for (d, s) in lo.iter_mut().zip(b.lo.iter()) {
                        *d = s.to_f32();
                    }
                    for (d, s) in hi.iter_mut().zip(b.hi.iter()) {
                        *d = s.to_f32();
                    }
                    Ok(true)
                }
                None => Ok(false),
            }
        };
        match e.tier {
            Tier::Hot => summary(lo, hi),
            Tier::Warm => {
                let st = self.layer_storage(layer)?;
                if st.location() == DeviceLocation::Cpu {
                    st.warm_key_bounds(&e, lo, hi)?;
                    return Ok(true);
                }
                // A device page's parameters cross to the host once (see WarmBoundsCache).
                let cached = &self.page_meta(seq, layer)?[page].warm_bounds;
                if !cached.keys(&e, lo, hi) {
                    st.warm_key_bounds(&e, lo, hi)?;
                    cached.put_keys(&e, lo, hi);
                }
                Ok(true)
            }
            Tier::Cold => {
                if summary(lo, hi)? {
                    return Ok(true);
                }
                let bytes = self.cold_bytes(p, &e)?;
                if bytes.tier != Tier::Warm {
                    return Ok(false);
                }
                let l = WarmLayout::of_format(&self.cfg, bytes.format);
                let d = self.cfg.head_dim;
                for h in 0..self.cfg.num_kv_heads {
                    let block = bytes
                        .data
                        .get(h * l.head_bytes..(h + 1) * l.head_bytes)
                        .ok_or_else(|| Error::internal("cold warm page shorter than its layout"))?;
                    let (bl, bh) = key_bounds(block, &l);
                    lo[h * d..(h + 1) * d].copy_from_slice(&bl);
                    hi[h * d..(h + 1) * d].copy_from_slice(&bh);
                }
                Ok(true)
            }
            Tier::Evicted => Ok(false),
        }
    }

    /// Writes, per kv head, a bound on how far any value of page `page` of `seq` in `layer` is,
    /// as attention reads it, from the value stored (`[num_kv_heads]`), and returns true: from the
    /// page's own parameters for quantised pages (warm, or cold with quantised bytes; see
    /// `quant::values::value_error_bound`), 0 for exact pages (hot, or cold exact). Returns false
    /// for evicted pages (never attended). Since softmax weights sum to 1, the value half of a
    /// quantised step's output error is at most the largest bound over the pages it attends.
    pub fn page_value_error(
        &self,
        seq: SeqId,
        layer: usize,
        page: usize,
        out: &mut [f32],
    ) -> Result<bool> {
        let kvh = self.cfg.num_kv_heads;
        if out.len() != kvh {
            return Err(Error::shape("value error bounds", kvh, out.len()));
        }
        let p = PageRef { seq, layer, page };
        let e = self.page(p)?;
        match e.tier {
            Tier::Hot => out.fill(0.0),
            Tier::Warm => {
                let st = self.layer_storage(layer)?;
                if st.location() == DeviceLocation::Cpu {
                    st.warm_value_error(&e, out)?;
                } else {
                    let cached = &self.page_meta(seq, layer)?[page].warm_bounds;
                    if !cached.values(&e, out) {
                        st.warm_value_error(&e, out)?;
                        cached.put_values(&e, out);
                    }
                }
            }
            Tier::Cold => {
                let bytes = self.cold_bytes(p, &e)?;
                if bytes.tier != Tier::Warm {
                    out.fill(0.0);
                } else {
                    let l = WarmLayout::of_format(&self.cfg, bytes.format);
                    for (h, o) in out.iter_mut().enumerate() {
                        let block = bytes
                            .data
                            .get(h * l.head_bytes..(h + 1) * l.head_bytes)
                            .ok_or_else(|| {
                                Error::internal("cold warm page shorter than its layout")
                            })?;
                        *o = value_error_bound(block, e.n_tokens as usize, &l);
                    }
                }
            }
            Tier::Evicted => return Ok(false),
        }
        Ok(true)
    }
}
