//! Certified attention: how far a quantised page's scores can be from the exact ones, and which
//! pages a step should read exactly.
//!
//! Owns: [`score_error_bound`] (for one query head and one warm page: `|s·q·k − s·q·k̂| <=
//! s·Σ_c |q_c|·step_c/2` for every token, since dequantisation `k̂ = min + step·code` with
//! `code = round((k − min)/step)` is within half a step of `k` per channel) and [`Certifier`] (the
//! pages of a step whose bound exceeds a tolerance). Must never: read page payloads (the steps
//! come from the page's own quantisation parameters, [`KvCache::page_key_bounds`]) or certify a
//! page it has no parameters for.
//!
//! The values' error is bounded from the page's value parameters ([`KvCache::page_value_error`]):
//! every dequantised value is within `η_p` of the stored one, so for any softmax weights the
//! value half of the output error is at most the largest `η_p` over the attended warm pages. With
//! a value tolerance ([`Certifier::with_value_tolerance`]) pages whose `η_p` exceeds it are
//! uncertain too.

use crate::cache::{KvCache, SeqId, Tier};
use crate::error::{Error, Result};

/// The largest `|scale·q·k − scale·q·k̂|` over the tokens of a warm page whose per-channel key
/// range is `[lo, hi]` at `k_bits` bits (`hi = min + step·(2^bits − 1)`), for query `q`, plus a
/// relative slack of `2 D 2^-24` for f16 and f32 rounding of the parameters and the dot product.
pub fn score_error_bound(q: &[f32], lo: &[f32], hi: &[f32], k_bits: usize, scale: f32) -> f32 {
    let max_code = ((1u32 << k_bits) - 1) as f64;
    let (mut e, mut mag) = (0f64, 0f64);
    for ((&q, &l), &h) in q.iter().zip(lo).zip(hi) {
        let step = (h as f64 - l as f64) / max_code;
        e += (q as f64).abs() * step / 2.0;
        mag += (q as f64).abs() * (l as f64).abs().max((h as f64).abs());
    }
    let s = scale as f64;
    (s * e + 2.0 * q.len() as f64 * (2f64).powi(-24) * s * mag) as f32
}

/// Picks the warm pages whose score error bound, for some q head of the step, exceeds `tol`
/// (nats).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Certifier {
    pub tol: f32,
    /// Largest value error (absolute, in the values' units) a page may have: pages above it are
    /// read exactly too (`None`: the values do not decide).
    pub value_tol: Option<f32>,
}

impl Certifier {
    /// A certifier at `tol` nats (> 0).
    pub fn new(tol: f32) -> Result<Self> {
        if !(tol.is_finite() && tol > 0.0) {
            return Err(Error::config(
                "tolerance",
                format!("must be finite and > 0, got {tol}"),
            ));
        }
        Ok(Certifier {
            tol,
            value_tol: None,
        })
    }

    /// Also reads exactly the warm pages whose value error bound ([`KvCache::page_value_error`])
    /// exceeds `tol` (> 0) for some kv head.
    pub fn with_value_tolerance(mut self, tol: f32) -> Result<Self> {
        if !(tol.is_finite() && tol > 0.0) {
            return Err(Error::config(
                "value tolerance",
                format!("must be finite and > 0, got {tol}"),
            ));
        }
        self.value_tol = Some(tol);
        Ok(self)
    }

    /// The tolerance a monitor `sensitivity` asks for: `0.5 (1 − s)` nats plus 0.01, so 0.085 at
    /// the default 0.85 and 0.01 at 1 (most demanding).
    pub fn from_sensitivity(sensitivity: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&sensitivity) {
            return Err(Error::config(
                "sensitivity",
                format!("must be in [0, 1], got {sensitivity}"),
            ));
        }
        Self::new(0.5 * (1.0 - sensitivity) + 0.01)
    }

    /// Writes to `out` the warm pages of `seq` in `layer` whose score bound exceeds the tolerance
    /// for `queries` (`[q_heads][head_dim]`, one sequence), or whose value error bound exceeds the
    /// value tolerance; returns the largest score bound seen.
    pub fn uncertain_pages(
        &self,
        cache: &KvCache,
        layer: usize,
        seq: SeqId,
        queries: &[f32],
        out: &mut Vec<usize>,
    ) -> Result<f32> {
        let cfg = cache.config();
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        if queries.len() != qh * d {
            return Err(Error::shape("queries", qh * d, queries.len()));
        }
        let g = cfg.group_size();
        let queries = &*cache.queries_in_key_basis(layer, queries);
        let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
        let mut verr = vec![0f32; kvh];
        out.clear();
        let mut worst = 0f32;
        for (p, e) in cache.page_table(seq, layer)?.pages().iter().enumerate() {
            if e.tier != Tier::Warm || !cache.page_key_bounds(seq, layer, p, &mut lo, &mut hi)? {
                continue;
            }
            let bits = e.format.k_bits.bits();
            let mut over = false;
            for h in 0..qh {
                let kv = h / g;
                let b = score_error_bound(
                    &queries[h * d..(h + 1) * d],
                    &lo[kv * d..(kv + 1) * d],
                    &hi[kv * d..(kv + 1) * d],
                    bits,
                    cfg.scale(),
                );
                worst = worst.max(b);
                over |= b > self.tol;
            }
            if let Some(vt) = self.value_tol {
                if cache.page_value_error(seq, layer, p, &mut verr)? {
                    over |= verr.iter().any(|&x| x > vt);
                }
            }
            if over {
                out.push(p);
            }
        }
        Ok(worst)
    }
}
