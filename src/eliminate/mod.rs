//! Query-time elimination: which pages a decode step may skip, with a proven bound on the cost.
//!
//! Owns: per-page score upper bounds ([`bounds`]), the ε-bounded selection and the two-phase
//! decode that applies it ([`Eliminator`]), a Quest-style top-k selection ([`QuestSelector`],
//! a baseline without a guarantee), the comparison eliminators on the same interface
//! ([`SuperPageEliminator`], two-level and proven; [`SketchEliminator`], the GhostKV seed's rule), and the check mode against exact attention ([`check`]). Must never: move, modify or read the payload of pages (the
//! cache executes attention; this module only chooses pages), or skip a page whose bound it could
//! not compute.
//!
//! The guarantee (proof in docs/eliminate.md): for every q head, the softmax mass of the tokens
//! [`Eliminator::attend`] skips is at most ε, and so the output differs from full attention by at
//! most `2 ε max_t ||v_t||`. Phase one attends the hot pages, the pages without bounds and the
//! `exact_top` candidates of highest bound exactly, which gives `Z1 = sum exp(s)` over them; a
//! candidate page `p` of `n_p` tokens has every score below `ub_p`, so skipping a set `S` costs
//! at most `sum_{p in S} n_p exp(ub_p) / Z1` of the mass (the full partition function is at least
//! `Z1`). Pages are skipped in increasing bound while that sum stays within ε for every q head of
//! the page's kv head group (the selection is per kv head).

pub mod bounds;
mod compare;

pub use bounds::{score_upper_bound, PageBounds, PageInfo};
pub use compare::{SketchEliminator, SuperPageEliminator};

use crate::attention::{Attention, PageSelection};
use crate::cache::{KvCache, SeqId, Tier};
use crate::error::{Error, Result};

/// One decode step's input: the batch and its queries (`[n_seqs][q_heads][head_dim]` f32).
#[derive(Debug, Clone, Copy)]
pub struct EliminationInput<'a> {
    pub layer: usize,
    pub seqs: &'a [SeqId],
    pub queries: &'a [f32],
}

/// Caller-owned buffers, reused across steps.
#[derive(Debug, Default, Clone)]
pub struct EliminationScratch {
    pub bounds: PageBounds,
    order: Vec<(f32, usize)>,
    acc: Vec<f32>,
    lz: Vec<f32>,
}

/// What one eliminated step skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EliminationReport {
    /// Pages (per kv head) that were candidates: bounded, not hot, not attended in phase one.
    pub candidates: usize,
    /// Candidate pages (per kv head) skipped.
    pub skipped_pages: usize,
    /// Tokens (per kv head) skipped.
    pub skipped_tokens: usize,
    /// Per batch entry and q head, the proven bound on the skipped softmax mass (<= ε).
    pub mass_bound: Vec<f32>,
    /// Super-pages skipped whole (two-level selection only).
    pub super_skips: usize,
}

/// The ε-bounded eliminator (immutable engine; see the module docs for the guarantee).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eliminator {
    epsilon: f32,
    exact_top: usize,
}

impl Eliminator {
    /// An eliminator that skips at most `epsilon` of the softmax mass (0 <= ε < 1) and attends
    /// the 1 highest-bound candidate page per kv head exactly in phase one.
    pub fn new(epsilon: f32) -> Result<Self> {
        check_epsilon(epsilon)?;
        Ok(Eliminator {
            epsilon,
            exact_top: 1,
        })
    }

    /// Attends the `k` highest-bound candidates per kv head exactly in phase one (a larger `Z1`
    /// lets more of the rest be skipped; 0 relies on hot pages alone).
    pub fn with_exact_top(mut self, k: usize) -> Self {
        self.exact_top = k;
        self
    }

    /// The mass bound ε.
    pub fn epsilon(&self) -> f32 {
        self.epsilon
    }

    /// Decode attention over the pages this eliminator keeps: phase one (hot pages, pages
    /// without bounds, the `exact_top` best candidates) exactly, then the candidates it cannot
    /// skip, merged. Skipped pages have `-inf` page lse (no mass) in the result.
    pub fn attend(
        &self,
        cache: &KvCache,
        scratch: &mut EliminationScratch,
        input: &EliminationInput,
    ) -> Result<(Attention, EliminationReport)> {
        scratch
            .bounds
            .fill(cache, input.layer, input.seqs, input.queries)?;
        two_phase(cache, scratch, input, self.epsilon, self.exact_top, None)
    }
}

/// Super-pages of a two-level selection: per batch entry and kv head, the candidate pages
/// (indices into the entry's pages) of each super-page and its bound per q head of the group.
#[derive(Debug, Default, Clone)]
pub(crate) struct Supers {
    /// `[n_seqs][kvh]`: the super-pages.
    pub lists: Vec<Vec<SuperList>>,
}

/// Super-pages of one (batch entry, kv head): (candidate members, `[g]` bounds) each.
pub(crate) type SuperList = Vec<(Vec<usize>, Vec<f32>)>;

/// The two-phase decode over the bounds in `scratch.bounds` (the box bounds, or another
/// estimator's values put there): phase one attends hot and unbounded pages and the `exact_top`
/// highest-bound candidates; phase two skips, in increasing bound, the candidates whose charged
/// mass `n exp(ub - log Z1)` keeps every head of the group within `epsilon`. With `supers`,
/// phase two first skips whole super-pages in increasing super bound, then single pages.
pub(crate) fn two_phase(
    cache: &KvCache,
    scratch: &mut EliminationScratch,
    input: &EliminationInput,
    epsilon: f32,
    exact_top: usize,
    supers: Option<&Supers>,
) -> Result<(Attention, EliminationReport)> {
    let cfg = cache.config();
    let (qh, kvh) = (cfg.num_q_heads, cfg.num_kv_heads);
    let g = cfg.group_size();
    if scratch.bounds.n_seqs() != input.seqs.len() {
        return Err(Error::internal(
            "two-phase decode over bounds of another batch",
        ));
    }
    let b = &scratch.bounds;
    let n = input.seqs.len();
    // Phase one.
    let mut first = PageSelection::none(n, kvh);
    let mut exact = vec![false; 0];
    let mut exact_at = Vec::with_capacity(n + 1);
    exact_at.push(0);
    for i in 0..n {
        let pages = b.pages(i);
        for kv in 0..kvh {
            let base = exact.len();
            exact.extend(
                pages
                    .iter()
                    .map(|p| p.tier != Tier::Evicted && (p.tier == Tier::Hot || !p.bounded)),
            );
            let order = &mut scratch.order;
            order.clear();
            for (k, p) in pages.iter().enumerate() {
                if p.bounded && p.tier != Tier::Hot && p.tier != Tier::Evicted {
                    order.push((group_max(b.ub(i, k), kv, g), k));
                }
            }
            order.sort_by(|a, b| b.0.total_cmp(&a.0));
            for &(_, k) in order.iter().take(exact_top) {
                exact[base + k] = true;
            }
            first.set(
                i,
                kv,
                pages
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| exact[base + k])
                    .map(|(_, p)| p.page),
            )?;
        }
        exact_at.push(exact.len());
    }
    let mut att = cache.attend_select(input.layer, input.seqs, input.queries, &first)?;
    // Phase two: skip candidates in increasing bound while every head's sum stays <= ε.
    let mut report = EliminationReport {
        mass_bound: vec![0.0; n * qh],
        ..Default::default()
    };
    let mut second = PageSelection::none(n, kvh);
    let mut any = false;
    for (i, &at) in exact_at.iter().take(n).enumerate() {
        let pages = b.pages(i);
        for kv in 0..kvh {
            let base = at + kv * pages.len();
            let order = &mut scratch.order;
            order.clear();
            for (k, p) in pages.iter().enumerate() {
                if p.tier != Tier::Evicted && !exact[base + k] {
                    order.push((group_max(b.ub(i, k), kv, g), k));
                }
            }
            order.sort_by(|a, b| a.0.total_cmp(&b.0));
            report.candidates += order.len();
            // log Z1 per head, lowered by a relative margin for the f32 rounding of lse.
            let lz = &mut scratch.lz;
            lz.clear();
            lz.extend(
                att.heads[i * qh + kv * g..i * qh + (kv + 1) * g]
                    .iter()
                    .map(|hs| hs.log_z - 1e-5 * hs.log_z.abs().max(1.0)),
            );
            let acc = &mut scratch.acc;
            acc.clear();
            acc.resize(g, 0.0);
            // Charges `n` tokens under bounds `ub` if every head of the group stays within ε.
            let charge = |acc: &mut Vec<f32>, ub: &[f32], n: f32| -> bool {
                let fits = lz.iter().zip(ub).zip(acc.iter()).all(|((&z, &u), &a)| {
                    z > f32::NEG_INFINITY && a + n * (u - z).exp() <= epsilon
                });
                if fits {
                    for ((a, &z), &u) in acc.iter_mut().zip(lz.iter()).zip(ub) {
                        *a += n * (u - z).exp();
                    }
                }
                fits
            };
            let mut skipped = vec![false; pages.len()];
            if let Some(sp) = supers {
                // Whole super-pages first (their members not attended in phase one).
                let mut list: Vec<(f32, usize)> = sp.lists[i][kv]
                    .iter()
                    .enumerate()
                    .map(|(j, (_, ub))| (ub.iter().copied().fold(f32::NEG_INFINITY, f32::max), j))
                    .collect();
                list.sort_by(|a, b| a.0.total_cmp(&b.0));
                for &(_, j) in &list {
                    let (members, ub) = &sp.lists[i][kv][j];
                    if members.iter().any(|&k| exact[base + k]) {
                        continue;
                    }
                    let n: f32 = members.iter().map(|&k| pages[k].n_tokens as f32).sum();
                    if !charge(acc, ub, n) {
                        break;
                    }
                    report.super_skips += 1;
                    for &k in members {
                        skipped[k] = true;
                    }
                }
            }
            for &(_, k) in order.iter() {
                if skipped[k] {
                    continue;
                }
                let ub = &b.ub(i, k)[kv * g..(kv + 1) * g];
                // Skip page k only if every head of the group stays within ε.
                if !charge(acc, ub, pages[k].n_tokens as f32) {
                    break;
                }
                skipped[k] = true;
            }
            for &(_, k) in order.iter() {
                if skipped[k] {
                    report.skipped_pages += 1;
                    report.skipped_tokens += pages[k].n_tokens as usize;
                }
            }
            report.mass_bound[i * qh + kv * g..i * qh + (kv + 1) * g].copy_from_slice(acc);
            let keep: Vec<u32> = order
                .iter()
                .filter(|&&(_, k)| !skipped[k])
                .map(|&(_, k)| pages[k].page)
                .collect();
            any |= !keep.is_empty();
            second.set(i, kv, keep)?;
        }
    }
    if any {
        // Spilled survivors are read ahead while the survivors on the device are attended.
        let _ = cache.prefetch(input.layer, input.seqs, Some(&second));
        let rest = cache.attend_select(input.layer, input.seqs, input.queries, &second)?;
        att.merge_disjoint(&rest);
    }
    Ok((att, report))
}

/// A mass bound must be in [0, 1).
pub(crate) fn check_epsilon(epsilon: f32) -> Result<()> {
    if !(epsilon.is_finite() && (0.0..1.0).contains(&epsilon)) {
        return Err(Error::config(
            "epsilon",
            format!("must be in [0, 1), got {epsilon}"),
        ));
    }
    Ok(())
}

/// Largest bound over the q heads of kv head `kv`'s group.
fn group_max(ub: &[f32], kv: usize, g: usize) -> f32 {
    ub[kv * g..(kv + 1) * g]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Quest-style query-aware page selection (Tang et al., 2024, "Quest"): per kv head, the hot
/// pages, the pages without bounds, and the `pages` pages of highest score bound. A baseline: it
/// has no bound on what it leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuestSelector {
    pub pages: usize,
}

impl QuestSelector {
    /// The selection for one decode step (attend it with [`KvCache::attend_select`]).
    pub fn select(
        &self,
        cache: &KvCache,
        scratch: &mut EliminationScratch,
        input: &EliminationInput,
    ) -> Result<PageSelection> {
        let cfg = cache.config();
        let (kvh, g) = (cfg.num_kv_heads, cfg.group_size());
        scratch
            .bounds
            .fill(cache, input.layer, input.seqs, input.queries)?;
        let b = &scratch.bounds;
        let mut sel = PageSelection::none(input.seqs.len(), kvh);
        for i in 0..input.seqs.len() {
            let pages = b.pages(i);
            for kv in 0..kvh {
                let order = &mut scratch.order;
                order.clear();
                let mut keep = Vec::new();
                for (k, p) in pages.iter().enumerate() {
                    match (p.tier, p.bounded) {
                        (Tier::Evicted, _) => {}
                        (Tier::Hot, _) | (_, false) => keep.push(p.page),
                        _ => order.push((group_max(b.ub(i, k), kv, g), k)),
                    }
                }
                order.sort_by(|a, b| b.0.total_cmp(&a.0));
                keep.extend(order.iter().take(self.pages).map(|&(_, k)| pages[k].page));
                sel.set(i, kv, keep)?;
            }
        }
        Ok(sel)
    }
}

/// What an eliminated step really cost, measured against exact attention of the same step
/// (check mode: the caller also runs [`KvCache::attend`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EliminationCheck {
    /// Per batch entry and q head: softmax mass, under exact attention, of the pages the
    /// eliminated step did not attend (at most the reported bound).
    pub realised_mass: Vec<f32>,
    /// Per batch entry and q head: L2 distance between the two outputs (at most `2 ε max |v|`).
    pub output_error: Vec<f32>,
    /// (page, q head) pairs left out by the eliminated step.
    pub skipped: usize,
    /// Of those, pairs whose exact mass exceeded `false_mass`: false eliminations. The GhostKV
    /// seed counted a skipped page as falsely eliminated when its true attention weight was above
    /// a threshold; here the weight is the page's mass for that q head.
    pub false_eliminations: usize,
}

/// Compares `eliminated` (attention over a subset of pages) with `exact` (attention over every
/// page) for the same batch and queries.
pub fn check(
    exact: &Attention,
    eliminated: &Attention,
    false_mass: f32,
) -> Result<EliminationCheck> {
    let (qh, d) = (exact.num_q_heads, exact.head_dim);
    if eliminated.num_q_heads != qh
        || eliminated.head_dim != d
        || eliminated.page_lse.len() != exact.page_lse.len()
        || eliminated.output.len() != exact.output.len()
        || eliminated
            .page_lse
            .iter()
            .zip(&exact.page_lse)
            .any(|(a, b)| a.len() != b.len())
    {
        return Err(Error::shape(
            "eliminated attention",
            "the exact attention's batch, heads and pages",
            "a different shape",
        ));
    }
    let mut c = EliminationCheck {
        realised_mass: vec![0.0; exact.heads.len()],
        output_error: vec![0.0; exact.heads.len()],
        ..Default::default()
    };
    for (i, (full, kept)) in exact.page_lse.iter().zip(&eliminated.page_lse).enumerate() {
        for (fl, el) in full.chunks(qh).zip(kept.chunks(qh)) {
            for h in 0..qh {
                if fl[h] > f32::NEG_INFINITY && el[h] == f32::NEG_INFINITY {
                    let m = (fl[h] - exact.heads[i * qh + h].log_z).exp();
                    c.realised_mass[i * qh + h] += m;
                    c.skipped += 1;
                    if m > false_mass {
                        c.false_eliminations += 1;
                    }
                }
            }
        }
    }
    for (k, e) in c.output_error.iter_mut().enumerate() {
        let (a, b) = (
            &exact.output[k * d..(k + 1) * d],
            &eliminated.output[k * d..(k + 1) * d],
        );
        *e = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
    }
    Ok(c)
}
