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
    /// averaged over the q heads. Each sequence's masses sum to 1.
    pub page_mass: Vec<Vec<f32>>,
    pub num_q_heads: usize,
    pub head_dim: usize,
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
