//! Value quantisation: per token, in groups of `value_group` channels (KIVI). Values are mixed by
//! the attention weights per token, so a per-token range keeps each token's error local.

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
                let Some((m, s)) = min_and_step(lo, hi, max_code) else {
                    return false;
                };
                let (m, s) = if layout.value_fit {
                    fit_range(grp, lo, hi, (m, s), max_code)
                } else {
                    (m, s)
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

/// Clipped ranges tried by [`fit_range`]: the low end raised and the high end lowered by
/// `0..=FIT_STEPS` sixteenths of the group's span each (25 candidates, min/max first).
const FIT_STEPS: u32 = 4;

/// The min and step of a group with the least squared error among the min/max range `first` and
/// the clipped ranges of [`FIT_STEPS`], keeping only ranges where no value is more than one step
/// from its dequantised value (so `value_error_bound` holds with one step). Ties keep the earlier
/// candidate. Plain f32 arithmetic in a fixed order (no fused multiply-add), so a GPU demotion
/// kernel could repeat the choice bit for bit; none does yet (CUDA and Metal refuse `value_fit`).
fn fit_range(grp: &[f32], lo: f32, hi: f32, first: (f16, f16), max_code: u32) -> (f16, f16) {
    let span = hi - lo;
    let mut best = first;
    let mut best_sse = f32::INFINITY;
    for i in 0..=FIT_STEPS {
        for j in 0..=FIT_STEPS {
            let cand = if i == 0 && j == 0 {
                first
            } else {
                let l = lo + span * (i as f32 * 0.0625);
                let h = hi - span * (j as f32 * 0.0625);
                match min_and_step(l, h, max_code) {
                    Some(ms) => ms,
                    None => continue,
                }
            };
            if let Some(sse) = clipped_sse(grp, cand, max_code) {
                if sse < best_sse {
                    best = cand;
                    best_sse = sse;
                }
            }
        }
    }
    best
}

/// Squared error of a group coded with `(min, step)`, summed in order, or `None` when a value
/// lies more than one step from its dequantised value.
#[inline]
fn clipped_sse(grp: &[f32], (m, s): (f16, f16), max_code: u32) -> Option<f32> {
    let (mf, sf) = (m.to_f32(), s.to_f32());
    let invs = inv(sf);
    let mut sse = 0.0f32;
    for &v in grp {
        let e = (mf + sf * code_of(v, mf, invs, max_code) as f32) - v;
        // Most clipped ranges fail early (at 4 bits a sixteenth of the span is over a step).
        if e.abs() > sf {
            return None;
        }
        sse += e * e;
    }
    Some(sse)
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
/// reaches the group's maximum; one step for fitted ranges, `WarmLayout::value_fit`), widened by
/// 2^-10 of it for the rounding of the code choice; plus
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
    // A fitted range clips values, but never by more than one step (`fit_range`).
    let half = if layout.value_fit { 1.0 } else { 0.5 };
    let used = n_tokens.min(layout.page_size) * groups;
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
