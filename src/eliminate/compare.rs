//! Comparison eliminators on the ε-eliminator's interface (same input, scratch, two-phase decode
//! and report): a two-level bound over super-pages, and the GhostKV seed's random-projection
//! sketches with its constant-slack rule.
//!
//! Owns: [`SuperPageEliminator`] (keeps the ε guarantee: a super-page's bound comes from the
//! union of its pages' key boxes, so it bounds every member token) and [`SketchEliminator`]
//! (no guarantee: its "bound" is a sketched score estimate plus a constant). Must never: skip a
//! page that is hot, unbounded or evicted-in-phase-one, or call the sketch rule a bound.

use super::{check_epsilon, score_upper_bound, two_phase, EliminationInput, EliminationReport};
use super::{EliminationScratch, SuperList, Supers};
use crate::attention::Attention;
use crate::cache::{KvCache, Tier};
use crate::error::{Error, Result};

/// Two-level ε-bounded elimination: candidate pages are grouped, in page-table order, into
/// super-pages of `group` pages whose key box is the union of the members' boxes. Phase two skips
/// whole super-pages in increasing super bound first (one bound per super-page: the work a
/// hierarchical implementation saves at long contexts), then single pages, charging each skip
/// its bound, so the skipped mass stays <= ε exactly as for [`super::Eliminator`]. A super bound is
/// at least its members' page bounds, so it never skips more than the page-level rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuperPageEliminator {
    epsilon: f32,
    group: usize,
    exact_top: usize,
}

impl SuperPageEliminator {
    /// Super-pages of `group` (>= 2) candidate pages, mass bound `epsilon` in [0, 1).
    pub fn new(epsilon: f32, group: usize) -> Result<Self> {
        check_epsilon(epsilon)?;
        if group < 2 {
            return Err(Error::config("group", format!("must be >= 2, got {group}")));
        }
        Ok(SuperPageEliminator {
            epsilon,
            group,
            exact_top: 1,
        })
    }

    /// The two-phase decode with super-pages (see the type's docs).
    pub fn attend(
        &self,
        cache: &KvCache,
        scratch: &mut EliminationScratch,
        input: &EliminationInput,
    ) -> Result<(Attention, EliminationReport)> {
        scratch
            .bounds
            .fill(cache, input.layer, input.seqs, input.queries)?;
        let cfg = cache.config();
        let (qh, kvh, d, g) = (
            cfg.num_q_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.group_size(),
        );
        let q = &*cache.queries_in_key_basis(input.layer, input.queries);
        let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
        let mut supers = Supers::default();
        for (i, &seq) in input.seqs.iter().enumerate() {
            let pages = scratch.bounds.pages(i).to_vec();
            let cands: Vec<usize> = (0..pages.len())
                .filter(|&k| {
                    let p = &pages[k];
                    p.bounded && p.tier != Tier::Hot && p.tier != Tier::Evicted
                })
                .collect();
            let mut per_kv: Vec<SuperList> = vec![Vec::new(); kvh];
            for chunk in cands.chunks(self.group) {
                // Union of the members' boxes, per kv head.
                let (mut ulo, mut uhi) = (
                    vec![f32::INFINITY; kvh * d],
                    vec![f32::NEG_INFINITY; kvh * d],
                );
                for &k in chunk {
                    if !cache.page_key_bounds(
                        seq,
                        input.layer,
                        pages[k].page as usize,
                        &mut lo,
                        &mut hi,
                    )? {
                        return Err(Error::internal("a bounded page lost its key bounds"));
                    }
                    for c in 0..kvh * d {
                        ulo[c] = ulo[c].min(lo[c]);
                        uhi[c] = uhi[c].max(hi[c]);
                    }
                }
                for (kv, list) in per_kv.iter_mut().enumerate() {
                    let ub: Vec<f32> = (kv * g..(kv + 1) * g)
                        .map(|h| {
                            score_upper_bound(
                                &q[(i * qh + h) * d..(i * qh + h + 1) * d],
                                &ulo[kv * d..(kv + 1) * d],
                                &uhi[kv * d..(kv + 1) * d],
                                cfg.scale(),
                            )
                        })
                        .collect();
                    list.push((chunk.to_vec(), ub));
                }
            }
            supers.lists.push(per_kv);
        }
        two_phase(
            cache,
            scratch,
            input,
            self.epsilon,
            self.exact_top,
            Some(&supers),
        )
    }
}

/// The GhostKV seed's rule: each page is summarised by a seeded random projection (dimension
/// `dim`) of its mean key per kv head; a page's "bound" for a query is the sketched score
/// `scale (P q) . (P mean_k)` plus a constant `slack` (nats), and pages are skipped by the same
/// ε rule as the proven eliminator. **No guarantee**: a sketch estimates an average, and a
/// constant cannot cover every page's spread; the frontier measures how often it is wrong. The
/// sketches are made from the page's stored keys at each call (a deployment would keep them).
#[derive(Debug, Clone, PartialEq)]
pub struct SketchEliminator {
    epsilon: f32,
    slack: f32,
    /// `[dim][head_dim]`, entries N(0, 1/dim).
    proj: Vec<f32>,
    dim: usize,
}

impl SketchEliminator {
    /// Sketches of dimension `dim` (>= 1) from `seed`, head size `head_dim`, slack `slack` nats.
    pub fn new(epsilon: f32, dim: usize, seed: u64, slack: f32, head_dim: usize) -> Result<Self> {
        check_epsilon(epsilon)?;
        if dim == 0 || dim > 4096 {
            return Err(Error::config(
                "dim",
                format!("must be in 1..=4096, got {dim}"),
            ));
        }
        if !slack.is_finite() {
            return Err(Error::config(
                "slack",
                format!("must be finite, got {slack}"),
            ));
        }
        // splitmix64 -> uniform (0, 1) -> Box-Muller.
        let mut x = seed;
        let mut uniform = move || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 0.5 / (1u64 << 53) as f64
        };
        let sd = (1.0 / dim as f64).sqrt();
        let proj = (0..dim * head_dim)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos() * sd) as f32
            })
            .collect();
        Ok(SketchEliminator {
            epsilon,
            slack,
            proj,
            dim,
        })
    }

    fn sketch(&self, x: &[f32], out: &mut [f32]) {
        let d = x.len();
        for (r, o) in out.iter_mut().enumerate() {
            *o = self.proj[r * d..(r + 1) * d]
                .iter()
                .zip(x)
                .map(|(p, v)| p * v)
                .sum();
        }
    }

    /// The two-phase decode with sketched estimates in place of bounds.
    pub fn attend(
        &self,
        cache: &KvCache,
        scratch: &mut EliminationScratch,
        input: &EliminationInput,
    ) -> Result<(Attention, EliminationReport)> {
        let cfg = cache.config();
        let (qh, kvh, d, g, ps) = (
            cfg.num_q_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.group_size(),
            cfg.page_size,
        );
        if self.proj.len() != self.dim * d {
            return Err(Error::shape(
                "sketch head_dim",
                self.proj.len() / self.dim,
                d,
            ));
        }
        scratch
            .bounds
            .fill(cache, input.layer, input.seqs, input.queries)?;
        let (mut sq, mut sk) = (vec![0f32; self.dim], vec![0f32; self.dim]);
        let mut mean = vec![0f32; d];
        for (i, &seq) in input.seqs.iter().enumerate() {
            // Model-space keys (the queries are in model space too).
            let (keys, _) = cache.read_tokens(seq, input.layer)?;
            let pages = scratch.bounds.pages(i).to_vec();
            for (k, p) in pages.iter().enumerate() {
                if !p.bounded || p.tier == Tier::Hot || p.tier == Tier::Evicted {
                    continue;
                }
                let (start, n) = (p.page as usize * ps, p.n_tokens as usize);
                for kv in 0..kvh {
                    mean.iter_mut().for_each(|m| *m = 0.0);
                    for t in start..start + n {
                        let row = &keys[(t * kvh + kv) * d..(t * kvh + kv + 1) * d];
                        for (m, x) in mean.iter_mut().zip(row) {
                            *m += x / n as f32;
                        }
                    }
                    self.sketch(&mean, &mut sk);
                    for h in kv * g..(kv + 1) * g {
                        self.sketch(
                            &input.queries[(i * qh + h) * d..(i * qh + h + 1) * d],
                            &mut sq,
                        );
                        let est: f32 = sq.iter().zip(&sk).map(|(a, b)| a * b).sum();
                        scratch.bounds.ub_mut(i, k)[h] = cfg.scale() * est + self.slack;
                    }
                }
            }
        }
        two_phase(cache, scratch, input, self.epsilon, 1, None)
    }
}
