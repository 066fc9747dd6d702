//! Decode-attention results and the online-softmax algebra every backend shares.
//!
//! Owns: [`Attention`] (output plus the statistics that come free with it), [`HeadStats`], and
//! [`OnlineSoftmax`], the running (max, sum, Σe·x, Σe·x², accumulator) state with its rescale and
//! merge rules. Backends run the loops; this module fixes the maths so that CPU, CUDA and Metal
//! agree. Must never: read page storage or allocate per token.
//!
//! Statistics: with scaled scores `s`, running max `m`, `e = exp(s - m)`, `x = s - m`, the state keeps
//! `l = Σe`, `s1 = Σe·x`, `s2 = Σe·x²`. Then `p = e / l`, `log p = x - ln l`, so the attention entropy
//! is `H = ln l - s1/l` and the varentropy (variance of `-log p` under `p`) is `s2/l - (s1/l)²`.
//! Keeping `x` relative to the running max keeps `s2/l - (s1/l)²` free of catastrophic cancellation.

pub mod exp;
mod selection;

pub use selection::PageSelection;

/// Per query head statistics of one attention step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HeadStats {
    /// Shannon entropy (nats) of the attention distribution.
    pub entropy: f32,
    /// Varentropy: variance of the surprisal `-log p` under the distribution.
    pub varentropy: f32,
    /// Largest scaled score.
    pub max_score: f32,
    /// `log Σ exp(s)` over every attended token (the log partition function).
    pub log_z: f32,
}

/// The result of one decode-attention call over a batch of sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `[n_seqs, num_q_heads, head_dim]`.
    pub output: Vec<f32>,
    /// `[n_seqs * num_q_heads]`.
    pub heads: Vec<HeadStats>,
    /// Per sequence, per page: the attention mass of the page (sum of softmax weights of its tokens),
    /// averaged over the q heads. Each sequence's masses sum to 1 over the pages attended.
    pub page_mass: Vec<Vec<f32>>,
    /// Per sequence, `[n_pages][num_q_heads]`: `log Σ exp(s)` over the page's tokens for that q
    /// head; `-inf` where the page was not attended (not selected, cold-skipped, evicted). The mass
    /// of page `p` for head `h` is `exp(page_lse - heads[h].log_z)`.
    pub page_lse: Vec<Vec<f32>>,
    /// Per sequence, `[n_pages][num_kv_heads]`: the page's mass averaged over the q heads of each
    /// kv head's GQA group (see [`Attention::kv_page_mass`]); `page_mass` is its mean over the kv
    /// heads. Derived from `page_lse` ([`Attention::finish_masses`]; the CUDA backend folds it on
    /// the device).
    pub kv_mass: Vec<Vec<f32>>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// What reading spilled cold pages from disk cost this call: pages and bytes read, how many
    /// came from the read-ahead buffer, and how long the call waited (zero without spilling).
    pub disk: crate::cold::DiskStep,
}

impl Attention {
    /// An empty result for `n_pages[i]` pages per sequence: zero output, `-inf` statistics.
    pub fn empty(
        n_pages: &[usize],
        num_q_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        Attention {
            output: vec![0.0; n_pages.len() * num_q_heads * head_dim],
            heads: vec![OnlineSoftmax::default().stats(); n_pages.len() * num_q_heads],
            page_mass: n_pages.iter().map(|&n| vec![0.0; n]).collect(),
            kv_mass: n_pages
                .iter()
                .map(|&n| vec![0.0; n * num_kv_heads])
                .collect(),
            page_lse: n_pages
                .iter()
                .map(|&n| vec![f32::NEG_INFINITY; n * num_q_heads])
                .collect(),
            num_q_heads,
            num_kv_heads,
            head_dim,
            disk: Default::default(),
        }
    }

    /// Recomputes `kv_mass` and `page_mass` from `page_lse` and the heads' `log_z`.
    pub fn finish_masses(&mut self) {
        let (qh, kvh) = (self.num_q_heads, self.num_kv_heads.max(1));
        let g = qh / kvh;
        self.kv_mass.resize(self.page_lse.len(), Vec::new());
        for (i, (kvm, lse)) in self.kv_mass.iter_mut().zip(&self.page_lse).enumerate() {
            let heads = &self.heads[i * qh..(i + 1) * qh];
            let n = lse.len() / qh.max(1);
            kvm.clear();
            kvm.resize(n * kvh, 0.0);
            for p in 0..n {
                for kv in 0..kvh {
                    let mut sum = 0.0f32;
                    for h in kv * g..(kv + 1) * g {
                        let x = lse[p * qh + h];
                        if x > f32::NEG_INFINITY && heads[h].log_z > f32::NEG_INFINITY {
                            sum += (x - heads[h].log_z).exp();
                        }
                    }
                    kvm[p * kvh + kv] = sum / g as f32;
                }
            }
        }
        self.masses_from_kv();
    }

    /// `page_mass` from `kv_mass`: the mean over kv heads (each GQA group has the same number of q
    /// heads, so this is the mean over q heads).
    pub(crate) fn masses_from_kv(&mut self) {
        let kvh = self.num_kv_heads.max(1);
        self.page_mass.resize(self.kv_mass.len(), Vec::new());
        for (m, kvm) in self.page_mass.iter_mut().zip(&self.kv_mass) {
            m.clear();
            m.extend(
                kvm.chunks_exact(kvh)
                    .map(|c| c.iter().sum::<f32>() / kvh as f32),
            );
        }
    }

    /// Keeps only the per-page results `what` asks for (output and heads always stay).
    pub(crate) fn keep_page_results(&mut self, what: crate::backend::PageResults) {
        if !what.lse() {
            self.page_lse = Vec::new();
        }
        if !what.masses() {
            self.page_mass = Vec::new();
            self.kv_mass = Vec::new();
        }
    }

    /// Whether the result carries page masses (`page_mass` and `kv_mass`); a call with a scratch
    /// without page results ([`crate::backend::PageResults::None`]) leaves them empty.
    pub fn has_page_results(&self) -> bool {
        self.kv_mass.len() * self.num_q_heads == self.heads.len()
            && self.page_mass.len() == self.kv_mass.len()
    }

    /// Whether the result carries the per-page log-sum-exps ([`crate::backend::PageResults::All`]).
    pub fn has_page_lse(&self) -> bool {
        self.page_lse.len() * self.num_q_heads == self.heads.len()
    }

    /// Per kv head masses of sequence `i`, `[n_pages][num_kv_heads]`: the mass of each page averaged
    /// over the q heads of that kv head's GQA group (each kv head's masses sum to 1 over the pages
    /// it attended). This is what per-head policies (SnapKV, PyramidKV) read. Empty when the result
    /// has no per-page results.
    pub fn kv_page_mass(&self, i: usize) -> Vec<f32> {
        self.kv_mass.get(i).cloned().unwrap_or_default()
    }

    /// Whether any q head of kv head `kv` attended page `page` of sequence `i`: from `page_lse`
    /// when the result has it, else from `kv_mass` (a positive mass; a page whose mass underflows
    /// f32, about 104 nats below the step's log Z, then counts as not attended).
    pub fn attended(&self, i: usize, page: usize, kv: usize) -> bool {
        let (qh, kvh) = (self.num_q_heads, self.num_kv_heads.max(1));
        let g = qh / kvh;
        match self.page_lse.get(i).filter(|l| !l.is_empty()) {
            Some(lse) => lse[page * qh + kv * g..page * qh + (kv + 1) * g]
                .iter()
                .any(|&x| x > f32::NEG_INFINITY),
            None => self.kv_mass[i][page * kvh + kv] > 0.0,
        }
    }

    /// Folds `other`, attention of the same batch and queries over a disjoint set of pages (pages
    /// `other` did not attend have `-inf` lse), into `self`: the result is attention over the
    /// union, as one call over both would give (up to f32 rounding of the log-sum-exp merge).
    pub fn merge_disjoint(&mut self, other: &Attention) {
        let (qh, d) = (self.num_q_heads, self.head_dim);
        for (i, hs) in self.heads.iter_mut().enumerate() {
            let o = &other.heads[i];
            let mut a = OnlineSoftmax::from_stats(hs);
            let (wa, wb) = a.merge(&OnlineSoftmax::from_stats(o));
            let (la, lb) = (
                OnlineSoftmax::from_stats(hs).l * wa,
                OnlineSoftmax::from_stats(o).l * wb,
            );
            let l = a.l;
            if l > 0.0 {
                let (fa, fb) = (la / l, lb / l);
                for c in 0..d {
                    let at = i * d + c;
                    self.output[at] = fa * self.output[at] + fb * other.output[at];
                }
            }
            *hs = a.stats();
        }
        self.disk.add(&other.disk);
        for (mine, theirs) in self.page_lse.iter_mut().zip(&other.page_lse) {
            for (x, &y) in mine.iter_mut().zip(theirs) {
                if y > f32::NEG_INFINITY {
                    *x = if *x > f32::NEG_INFINITY {
                        log_add_exp(*x, y)
                    } else {
                        y
                    };
                }
            }
        }
        let _ = qh;
        self.finish_masses();
    }

    /// True when every output value and every statistic of a non-empty head is finite.
    pub fn is_finite(&self) -> bool {
        self.output.iter().all(|x| x.is_finite())
            && self.heads.iter().all(|h| {
                h.log_z == f32::NEG_INFINITY
                    || (h.log_z.is_finite()
                        && h.max_score.is_finite()
                        && h.entropy.is_finite()
                        && h.varentropy.is_finite())
            })
    }
}

/// `ln(e^a + e^b)` for finite `a`, `b`.
pub fn log_add_exp(a: f32, b: f32) -> f32 {
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// Merges per-chunk partial results of one query head, in order: each part is its softmax state
/// and its unnormalised accumulator (`Σ e·v` relative to the part's own max). Returns the merged
/// state and the normalised output. This is the prefill / split-K combine every backend shares.
pub fn combine_parts<'a>(
    parts: impl IntoIterator<Item = (OnlineSoftmax, &'a [f32])>,
    out: &mut [f32],
) -> OnlineSoftmax {
    let mut st = OnlineSoftmax::default();
    out.iter_mut().for_each(|x| *x = 0.0);
    for (p, acc) in parts {
        let (a, b) = st.merge(&p);
        for (o, &x) in out.iter_mut().zip(acc) {
            *o = a * *o + b * x;
        }
    }
    if st.l > 0.0 {
        let inv = 1.0 / st.l;
        out.iter_mut().for_each(|x| *x *= inv);
    }
    st
}

impl Attention {
    /// Output of sequence `i` (index in the batch), `[num_q_heads, head_dim]`.
    pub fn output_of(&self, i: usize) -> &[f32] {
        let n = self.num_q_heads * self.head_dim;
        &self.output[i * n..(i + 1) * n]
    }
    /// Head statistics of sequence `i`.
    pub fn heads_of(&self, i: usize) -> &[HeadStats] {
        &self.heads[i * self.num_q_heads..(i + 1) * self.num_q_heads]
    }
}

/// Running softmax state of one query head (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnlineSoftmax {
    pub m: f32,
    pub l: f32,
    pub s1: f32,
    pub s2: f32,
}

impl Default for OnlineSoftmax {
    fn default() -> Self {
        OnlineSoftmax {
            m: f32::NEG_INFINITY,
            l: 0.0,
            s1: 0.0,
            s2: 0.0,
        }
    }
}

impl OnlineSoftmax {
    /// Moves the reference max to `m_new >= self.m`; returns the factor by which any accumulator
    /// kept alongside must be multiplied.
    #[inline(always)]
    pub fn rescale_to(&mut self, m_new: f32) -> f32 {
        if self.l == 0.0 {
            self.m = m_new;
            self.s1 = 0.0;
            self.s2 = 0.0;
            return 0.0;
        }
        let delta = self.m - m_new;
        let alpha = delta.exp();
        self.s2 = alpha * (self.s2 + 2.0 * delta * self.s1 + delta * delta * self.l);
        self.s1 = alpha * (self.s1 + delta * self.l);
        self.l *= alpha;
        self.m = m_new;
        alpha
    }

    /// Merges `other` into `self`; returns `(alpha_self, alpha_other)`, the factors to apply to the
    /// two accumulators before adding them.
    pub fn merge(&mut self, other: &OnlineSoftmax) -> (f32, f32) {
        if other.l == 0.0 {
            return (1.0, 0.0);
        }
        let m = self.m.max(other.m);
        let mut o = *other;
        let ao = o.rescale_to(m);
        let a = self.rescale_to(m);
        self.l += o.l;
        self.s1 += o.s1;
        self.s2 += o.s2;
        (a, ao)
    }

    /// The state that [`OnlineSoftmax::stats`] summarised (exact up to f32 rounding): `l` relative
    /// to `m = max_score`, `s1`, `s2` recovered from entropy and varentropy.
    pub fn from_stats(h: &HeadStats) -> Self {
        if h.log_z == f32::NEG_INFINITY || !h.max_score.is_finite() {
            return OnlineSoftmax::default();
        }
        let l = (h.log_z - h.max_score).exp();
        let ex = l.ln() - h.entropy;
        OnlineSoftmax {
            m: h.max_score,
            l,
            s1: ex * l,
            s2: (h.varentropy + ex * ex) * l,
        }
    }

    /// Final statistics.
    pub fn stats(&self) -> HeadStats {
        if self.l <= 0.0 {
            return HeadStats {
                entropy: 0.0,
                varentropy: 0.0,
                max_score: f32::NEG_INFINITY,
                log_z: f32::NEG_INFINITY,
            };
        }
        let ex = self.s1 / self.l;
        let ex2 = self.s2 / self.l;
        HeadStats {
            entropy: (self.l.ln() - ex).max(0.0),
            varentropy: (ex2 - ex * ex).max(0.0),
            max_score: self.m,
            log_z: self.m + self.l.ln(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(scores: &[f32]) -> HeadStats {
        let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = scores.iter().map(|&s| ((s - m) as f64).exp()).sum();
        let p: Vec<f64> = scores.iter().map(|&s| ((s - m) as f64).exp() / z).collect();
        let h: f64 = -p.iter().map(|&p| p * p.ln()).sum::<f64>();
        let v: f64 = p.iter().map(|&p| p * (p.ln() + h).powi(2)).sum();
        HeadStats {
            entropy: h as f32,
            varentropy: v as f32,
            max_score: m,
            log_z: m + z.ln() as f32,
        }
    }

    #[test]
    fn online_and_merged_stats_match_direct() {
        let scores: Vec<f32> = (0..300)
            .map(|i| ((i * 37 % 101) as f32 / 17.0).sin() * 4.0)
            .collect();
        let want = direct(&scores);
        let mut parts = [OnlineSoftmax::default(), OnlineSoftmax::default()];
        for (k, chunk) in scores.chunks(70).enumerate() {
            let st = &mut parts[k % 2];
            let mx = chunk.iter().copied().fold(st.m, f32::max);
            st.rescale_to(mx);
            for &s in chunk {
                let x = s - st.m;
                let e = x.exp();
                st.l += e;
                st.s1 += e * x;
                st.s2 += e * x * x;
            }
        }
        let [mut a, b] = parts;
        a.merge(&b);
        let got = a.stats();
        assert!(
            (got.entropy - want.entropy).abs() < 1e-4,
            "{got:?} {want:?}"
        );
        assert!(
            (got.varentropy - want.varentropy).abs() < 1e-3,
            "{got:?} {want:?}"
        );
        assert!((got.log_z - want.log_z).abs() < 1e-4);
        assert_eq!(got.max_score, want.max_score);
    }
}
