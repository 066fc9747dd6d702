//! Score upper bounds per (page, q head) from per-channel key bounds.
//!
//! Owns: [`score_upper_bound`] (the bound for one query and one page's channel bounds, with the
//! slack that covers f32 rounding of the kernels' dot products) and [`PageBounds`], the table of
//! bounds a decode step's selection reads. Must never: decode page payloads (bounds come from
//! [`KvCache::page_key_bounds`]) or treat a page without bounds as skippable.

use crate::cache::{KvCache, SeqId, Tier};
use crate::error::{Error, Result};

/// Upper bound on `scale * q . k` over every `k` with `lo <= k <= hi` (per channel), plus a slack
/// of `2 D 2^-24 scale sum |q_c| max(|lo_c|, |hi_c|)`: the textbook bound on the rounding error of
/// an f32 dot product of length D (gamma_D ~ D u), doubled, so that the scores the kernels
/// actually compute stay below it too.
pub fn score_upper_bound(q: &[f32], lo: &[f32], hi: &[f32], scale: f32) -> f32 {
    let (mut ub, mut mag) = (0f64, 0f64);
    for ((&q, &l), &h) in q.iter().zip(lo).zip(hi) {
        let (q, l, h) = (q as f64, l as f64, h as f64);
        ub += (q * l).max(q * h);
        mag += q.abs() * l.abs().max(h.abs());
    }
    let d = q.len() as f64;
    let s = scale as f64;
    (s * ub + 2.0 * d * (2f64).powi(-24) * s * mag) as f32
}

/// One page of one sequence as a selection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PageInfo {
    /// Index in the sequence's page table.
    pub page: u32,
    pub tier: Tier,
    pub n_tokens: u32,
    /// False when the page has no key bounds (it must be attended), and for hot pages, which
    /// every selection attends: their bounds are not computed.
    pub bounded: bool,
}

/// For a batch: every page's tier, tokens and, per q head, its score upper bound for this
/// step's queries. Reused across steps (buffers keep their capacity).
#[derive(Debug, Default, Clone)]
pub struct PageBounds {
    q_heads: usize,
    /// Start of each sequence's pages in `pages` (`n_seqs + 1` entries).
    offsets: Vec<usize>,
    pages: Vec<PageInfo>,
    /// `[page][q_heads]`, parallel to `pages` (`-inf` for unbounded and evicted pages).
    ub: Vec<f32>,
    lo: Vec<f32>,
    hi: Vec<f32>,
}

impl PageBounds {
    /// Fills the table for `seqs` in `layer` and `queries` (`[n_seqs][q_heads][head_dim]`).
    pub fn fill(
        &mut self,
        cache: &KvCache,
        layer: usize,
        seqs: &[SeqId],
        queries: &[f32],
    ) -> Result<()> {
        let cfg = cache.config();
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = cfg.group_size();
        let want = seqs
            .len()
            .checked_mul(qh * d)
            .ok_or_else(|| Error::shape("queries", "a batch that fits memory", seqs.len()))?;
        if queries.len() != want {
            return Err(Error::shape("queries", want, queries.len()));
        }
        let scale = cfg.scale();
        // Page key bounds are in the cache's key basis (rotated keys when the config rotates).
        let queries = &*cache.queries_in_key_basis(layer, queries);
        self.q_heads = qh;
        self.offsets.clear();
        self.pages.clear();
        self.ub.clear();
        self.lo.resize(kvh * d, 0.0);
        self.hi.resize(kvh * d, 0.0);
        self.offsets.push(0);
        for (i, &seq) in seqs.iter().enumerate() {
            let table = cache.page_table(seq, layer)?;
            for (p, e) in table.pages().iter().enumerate() {
                let bounded = !matches!(e.tier, Tier::Evicted | Tier::Hot)
                    && cache.page_key_bounds(seq, layer, p, &mut self.lo, &mut self.hi)?;
                self.pages.push(PageInfo {
                    page: p as u32,
                    tier: e.tier,
                    n_tokens: e.n_tokens,
                    bounded,
                });
                for h in 0..qh {
                    let kv = h / g;
                    self.ub.push(if bounded {
                        let q = &queries[(i * qh + h) * d..(i * qh + h + 1) * d];
                        score_upper_bound(
                            q,
                            &self.lo[kv * d..(kv + 1) * d],
                            &self.hi[kv * d..(kv + 1) * d],
                            scale,
                        )
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
            self.offsets.push(self.pages.len());
        }
        Ok(())
    }

    /// Sequences in the table.
    pub fn n_seqs(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The pages of batch entry `i`.
    pub fn pages(&self, i: usize) -> &[PageInfo] {
        &self.pages[self.offsets[i]..self.offsets[i + 1]]
    }

    /// Upper bounds `[q_heads]` of the `k`-th page of batch entry `i`.
    pub fn ub(&self, i: usize, k: usize) -> &[f32] {
        let at = (self.offsets[i] + k) * self.q_heads;
        &self.ub[at..at + self.q_heads]
    }

    /// The same, writable: another estimator's values replace the box bounds (a comparison
    /// eliminator without the guarantee).
    pub(crate) fn ub_mut(&mut self, i: usize, k: usize) -> &mut [f32] {
        let at = (self.offsets[i] + k) * self.q_heads;
        &mut self.ub[at..at + self.q_heads]
    }
}
