//! Value quantisation: per token, in groups of `value_group` channels (KIVI). Values are mixed by
//! the attention weights per token, so a per-token range keeps each token's error local.
//!
//! Two encoders write the same format. The default maps each group's min/max range onto the
//! codes (every value within half a step of its code). The clipped encoder
//! (`WarmLayout::value_clip`) tries ranges shrunk from either end and keeps the one of least
//! squared error among those where no value is more than one step from its code: the extremes of
//! a group of 32 values sit far out in its distribution, so the min/max range wastes code levels
//! on them. The one-step limit keeps a bound the certifier can read from the parameters alone.

use super::keys::{read_f16, write_f16};
use super::{code_of, inv, min_and_step, pack::pack_row, pack::unpack_row, WarmLayout};
use half::f16;

/// Quantises the values of one kv head of one page into `block`. `values` is `[n_tokens][head_dim]`.
/// Returns `false` when a group's range does not fit f16.
pub fn quantize_values(
    values: &[f32],
    n_tokens: usize,
    layout: &WarmLayout,
    block: &mut [u8],
) -> bool {
    let d = layout.head_dim;
    let g = layout.value_group;
    let groups = layout.groups();
    let bits = layout.v_bits;
    let max_code = bits.max_code();
    debug_assert_eq!(values.len(), n_tokens * d);
    let mut mins = vec![f16::ZERO; layout.page_size * groups];
    let mut steps = vec![f16::ZERO; layout.page_size * groups];
    let mut codes = vec![0u8; d];
    let row = layout.v_row_bytes();
    for t in 0..layout.page_size {
        if t < n_tokens {
            let x = &values[t * d..(t + 1) * d];
            for gi in 0..groups {
                let grp = &x[gi * g..(gi + 1) * g];
                let lo = grp.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let range = if layout.value_clip {
                    clipped_range(grp, lo, hi, max_code)
                } else {
                    min_and_step(lo, hi, max_code)
                };
                let Some((m, s)) = range else {
                    return false;
                };
                mins[t * groups + gi] = m;
                steps[t * groups + gi] = s;
                let (mf, invs) = (m.to_f32(), inv(s.to_f32()));
                for (c, &v) in codes[gi * g..(gi + 1) * g].iter_mut().zip(grp) {
                    *c = code_of(v, mf, invs, max_code);
                }
            }
        } else {
            codes.fill(0);
        }
        let off = layout.v_codes + t * row;
        pack_row(&codes, bits, &mut block[off..off + row]);
    }
    let n = layout.page_size * groups;
    write_f16(&mut block[layout.v_min..layout.v_min + 2 * n], &mins);
    write_f16(&mut block[layout.v_step..layout.v_step + 2 * n], &steps);
    true
}

/// Each end of a group's range moves in by 0..=CLIP_STEPS 32nds of the range in the clipped search.
pub const CLIP_STEPS: u32 = 8;

/// The clipped encoder's min and step for one group with range `[lo, hi]`: of the min/max range
/// and its shrinks (`lo + i r/32`, `hi - j r/32`, `i, j <= CLIP_STEPS`), the one of least squared
/// error (first of equals, in `i`-major order) among those that leave every value within one step
/// of its code. The min/max range is always a candidate, so this never fails where
/// [`min_and_step`] succeeds. Ports must evaluate in this order with the same f32 operations.
pub(crate) fn clipped_range(grp: &[f32], lo: f32, hi: f32, max_code: u32) -> Option<(f16, f16)> {
    let base = min_and_step(lo, hi, max_code)?;
    let r = hi - lo;
    if r.is_nan() || r <= 0.0 {
        return Some(base);
    }
    let u = r * (1.0 / 32.0);
    let mut best = base;
    let mut best_err = group_error(grp, base, max_code, f32::INFINITY, f32::INFINITY);
    for i in 0..=CLIP_STEPS {
        for j in 0..=CLIP_STEPS {
            if i == 0 && j == 0 {
                continue;
            }
            let Some(c) = min_and_step(lo + i as f32 * u, hi - j as f32 * u, max_code) else {
                continue;
            };
            let err = group_error(grp, c, max_code, c.1.to_f32(), best_err);
            if err < best_err {
                best = c;
                best_err = err;
            }
        }
    }
    Some(best)
}

/// Squared error of `grp` coded with `(min, step)`; infinite when a value is more than `limit`
/// from its code. Stops (returning at least `stop`) once the sum reaches `stop`.
fn group_error(grp: &[f32], (m, s): (f16, f16), max_code: u32, limit: f32, stop: f32) -> f32 {
    let (mf, sf) = (m.to_f32(), s.to_f32());
    let invs = inv(sf);
    let mut err = 0.0f32;
    for &x in grp {
        let d = x - (mf + sf * code_of(x, mf, invs, max_code) as f32);
        if d.abs() > limit {
            return f32::INFINITY;
        }
        err += d * d;
        if err >= stop {
            return err;
        }
    }
    err
}

/// Dequantises the values of one head block into `[n_tokens][head_dim]` f32.
pub fn dequantize_values(block: &[u8], n_tokens: usize, layout: &WarmLayout) -> Vec<f32> {
    let d = layout.head_dim;
    let g = layout.value_group;
    let groups = layout.groups();
    let n = layout.page_size * groups;
    let mins = read_f16(&block[layout.v_min..layout.v_min + 2 * n]);
    let steps = read_f16(&block[layout.v_step..layout.v_step + 2 * n]);
    let row = layout.v_row_bytes();
    let mut codes = vec![0u8; d];
    let mut out = Vec::with_capacity(n_tokens * d);
    for t in 0..n_tokens {
        let off = layout.v_codes + t * row;
        unpack_row(&block[off..off + row], layout.v_bits, &mut codes);
        out.extend((0..d).map(|c| {
            let i = t * groups + c / g;
            mins[i] + steps[i] * codes[c] as f32
        }));
    }
    out
}

/// Per-token, per-group steps of a head block (`[page_size][groups]`), for error bounds.
pub fn value_steps(block: &[u8], layout: &WarmLayout) -> Vec<f32> {
    let n = layout.page_size * layout.groups();
    read_f16(&block[layout.v_step..layout.v_step + 2 * n])
}

/// A bound on `|v̂ - v|` for every value of the first `n_tokens` tokens of a head block, per
/// (token, group): half the step (codes round to nearest; the step is rounded up so the top code
/// reaches the group's maximum), or the whole step for the clipped encoder (it keeps only ranges
/// where every value is within one step of its code, checked in f32 as below), widened by 2^-10 of it for the rounding of the code choice; plus
/// 2^-10 of `|min|` (the minimum is the group's lowest value rounded to nearest f16, within half
/// an f16 ulp, 2^-11 relative, so a value below it is clamped to code 0); plus 2^-22 of the
/// group's largest magnitude for the f32 arithmetic of `min + step * code`, and 2^-24 for f16
/// subnormals.
pub fn value_error_bound(block: &[u8], n_tokens: usize, layout: &WarmLayout) -> f32 {
    let groups = layout.groups();
    let n = layout.page_size * groups;
    let mins = read_f16(&block[layout.v_min..layout.v_min + 2 * n]);
    let steps = value_steps(block, layout);
    let top = layout.v_bits.max_code() as f32;
    let used = n_tokens.min(layout.page_size) * groups;
    let half = if layout.value_clip { 1.0 } else { 0.5 };
    mins.iter()
        .zip(&steps)
        .take(used)
        .map(|(&m, &s)| {
            s * half * (1.0 + 1.0 / 1024.0)
                + m.abs() / 1024.0
                + (m.abs() + s * top) * (2f32).powi(-22)
                + (2f32).powi(-24)
        })
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bits;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut u = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        };
        (0..n)
            .map(|_| {
                // Box-Muller: rotated values are close to Gaussian per token.
                let (a, b) = (u(), u());
                (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
            })
            .collect()
    }

    fn sse(x: &[f32], layout: &WarmLayout) -> f64 {
        let mut block = vec![0u8; layout.head_bytes];
        assert!(quantize_values(x, layout.page_size, layout, &mut block));
        let y = dequantize_values(&block, layout.page_size, layout);
        let steps = value_steps(&block, layout);
        let g = layout.value_group;
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let s = steps[i / g];
            let lim = if layout.value_clip { s } else { s / 2.0 } * (1.0 + 1.0 / 1024.0) + 1e-6;
            assert!((a - b).abs() <= lim, "value {i}: {a} -> {b}, step {s}");
        }
        x.iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum()
    }

    /// On Gaussian groups the clipped encoder removes a large share of the squared error at 2 and
    /// 3 bits (less at 4), and every value stays within one step of its code.
    #[test]
    fn clipping_lowers_the_error_within_one_step() {
        for (bits, want) in [(Bits::B2, 0.7), (Bits::B3, 0.85), (Bits::B4, 0.9)] {
            let plain = WarmLayout::new(32, 64, Bits::B4, bits, 32);
            let clip = plain.with_value_clip(true);
            let x = gaussian(32 * 64, 7);
            let (a, b) = (sse(&x, &plain), sse(&x, &clip));
            assert!(b < a * want, "{bits:?}: clipped {b} vs min/max {a}");
        }
    }

    /// A constant group, a two-valued one and a single outlier: the min/max candidate is always
    /// there, so the clipped encoder is never worse.
    #[test]
    fn clipping_is_never_worse_than_min_max() {
        let cases: [Vec<f32>; 4] = [
            vec![3.25; 32],
            (0..32)
                .map(|i| if i % 2 == 0 { -1.0 } else { 1.0 })
                .collect(),
            (0..32)
                .map(|i| if i == 5 { 40.0 } else { (i as f32 * 0.1).sin() })
                .collect(),
            gaussian(32, 3).iter().map(|v| 1000.0 + v).collect(),
        ];
        for x in cases {
            for bits in [Bits::B2, Bits::B3, Bits::B4, Bits::B8] {
                let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mc = bits.max_code();
                let base = min_and_step(lo, hi, mc).unwrap();
                let c = clipped_range(&x, lo, hi, mc).unwrap();
                let e = |r| group_error(&x, r, mc, f32::INFINITY, f32::INFINITY);
                assert!(e(c) <= e(base), "{bits:?} {x:?}");
            }
        }
    }
}
