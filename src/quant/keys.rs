//! Key quantisation: per channel over a page's tokens (KIVI). Outlier channels get their own range,
//! which is why keys are quantised along tokens rather than along channels.

use super::{code_of, inv, min_and_step, pack::pack_row, pack::unpack_row, WarmLayout};
use half::f16;

/// Quantises the keys of one kv head of one page into `block` (a head block of `layout`).
/// `keys` is `[n_tokens][head_dim]` with `1 <= n_tokens <= page_size`; rows past `n_tokens` are
/// encoded as code 0. Returns `false`, leaving `block` unspecified, when a channel's range does not
/// fit f16 (the caller then keeps the page exact).
pub fn quantize_keys(keys: &[f32], n_tokens: usize, layout: &WarmLayout, block: &mut [u8]) -> bool {
    let d = layout.head_dim;
    let bits = layout.k_bits;
    let max_code = bits.max_code();
    debug_assert_eq!(keys.len(), n_tokens * d);
    let mut range = vec![(f32::INFINITY, f32::NEG_INFINITY); d];
    for t in 0..n_tokens {
        for (c, r) in range.iter_mut().enumerate() {
            let x = keys[t * d + c];
            *r = (r.0.min(x), r.1.max(x));
        }
    }
    // The widest channels (ties to the lower index) are kept exact instead of coded.
    let outliers = if layout.outliers == 0 {
        Vec::new()
    } else {
        let mut by_width: Vec<usize> = (0..d).collect();
        by_width.sort_by(|&a, &b| {
            let w = |c: usize| range[c].1 - range[c].0;
            w(b).total_cmp(&w(a)).then(a.cmp(&b))
        });
        let mut o = by_width[..layout.outliers].to_vec();
        o.sort_unstable();
        o
    };
    let mut mins = vec![f16::ZERO; d];
    let mut steps = vec![f16::ZERO; d];
    for c in 0..d {
        if outliers.binary_search(&c).is_ok() {
            continue;
        }
        match min_and_step(range[c].0, range[c].1, max_code) {
            Some((m, s)) => {
                mins[c] = m;
                steps[c] = s;
            }
            None => return false,
        }
    }
    // Per channel once (the same values `code_of` took per element before).
    let mins32: Vec<f32> = mins.iter().map(|m| m.to_f32()).collect();
    let invs: Vec<f32> = steps.iter().map(|s| inv(s.to_f32())).collect();
    let mut codes = vec![0u8; d];
    let row = layout.k_row_bytes();
    for t in 0..layout.page_size {
        if t < n_tokens {
            let x = &keys[t * d..(t + 1) * d];
            for (c, code) in codes.iter_mut().enumerate() {
                *code = code_of(x[c], mins32[c], invs[c], max_code);
            }
            for &c in &outliers {
                codes[c] = 0;
            }
        } else {
            codes.fill(0);
        }
        let off = layout.k_codes + t * row;
        pack_row(&codes, bits, &mut block[off..off + row]);
    }
    write_f16(&mut block[layout.k_min..layout.k_min + 2 * d], &mins);
    write_f16(&mut block[layout.k_step..layout.k_step + 2 * d], &steps);
    if layout.outliers > 0 {
        let n = layout.outliers;
        for (i, &c) in outliers.iter().enumerate() {
            let at = layout.out_idx + 2 * i;
            block[at..at + 2].copy_from_slice(&(c as u16).to_le_bytes());
        }
        let mut vals = vec![f16::ZERO; layout.page_size * n];
        for t in 0..layout.page_size {
            // Rows past n_tokens repeat token 0, so the page bounds stay exact.
            let src = if t < n_tokens { t } else { 0 };
            for (i, &c) in outliers.iter().enumerate() {
                let x = f16::from_f32(keys[src * d + c]);
                if !x.is_finite() {
                    return false;
                }
                vals[t * n + i] = x;
            }
        }
        write_f16(
            &mut block[layout.out_val..layout.out_val + 2 * layout.page_size * n],
            &vals,
        );
    }
    true
}

/// The key outlier channels of a head block (ascending) and their f16 keys `[page_size][outliers]`.
pub fn outliers(block: &[u8], layout: &WarmLayout) -> (Vec<usize>, Vec<f32>) {
    let n = layout.outliers;
    let idx = block[layout.out_idx..layout.out_idx + 2 * n]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .collect();
    let vals = read_f16(&block[layout.out_val..layout.out_val + 2 * layout.page_size * n]);
    (idx, vals)
}

/// Dequantises the keys of one head block into `[n_tokens][head_dim]` f32.
pub fn dequantize_keys(block: &[u8], n_tokens: usize, layout: &WarmLayout) -> Vec<f32> {
    let d = layout.head_dim;
    let mins = read_f16(&block[layout.k_min..layout.k_min + 2 * d]);
    let steps = read_f16(&block[layout.k_step..layout.k_step + 2 * d]);
    let row = layout.k_row_bytes();
    let mut codes = vec![0u8; d];
    let mut out = Vec::with_capacity(n_tokens * d);
    for t in 0..n_tokens {
        let off = layout.k_codes + t * row;
        unpack_row(&block[off..off + row], layout.k_bits, &mut codes);
        out.extend((0..d).map(|c| mins[c] + steps[c] * codes[c] as f32));
    }
    if layout.outliers > 0 {
        let (idx, vals) = outliers(block, layout);
        for t in 0..n_tokens {
            for (i, &c) in idx.iter().enumerate() {
                out[t * d + c] = vals[t * layout.outliers + i];
            }
        }
    }
    out
}

/// Per-channel key bounds `(lo, hi)` of a head block: every key in the page satisfies
/// `lo[c] <= k[c] <= hi[c]` after dequantisation.
pub fn key_bounds(block: &[u8], layout: &WarmLayout) -> (Vec<f32>, Vec<f32>) {
    let d = layout.head_dim;
    let mut lo = read_f16(&block[layout.k_min..layout.k_min + 2 * d]);
    let steps = read_f16(&block[layout.k_step..layout.k_step + 2 * d]);
    let top = layout.k_bits.max_code() as f32;
    let mut hi: Vec<f32> = lo.iter().zip(&steps).map(|(m, s)| m + top * s).collect();
    if layout.outliers > 0 {
        let (idx, vals) = outliers(block, layout);
        for (i, &c) in idx.iter().enumerate() {
            let col = vals.iter().skip(i).step_by(layout.outliers).copied();
            lo[c] = col.clone().fold(f32::INFINITY, f32::min);
            hi[c] = col.fold(f32::NEG_INFINITY, f32::max);
        }
    }
    (lo, hi)
}

pub(crate) fn write_f16(dst: &mut [u8], src: &[f16]) {
    for (d, s) in dst.chunks_exact_mut(2).zip(src) {
        d.copy_from_slice(&s.to_bits().to_le_bytes());
    }
}

pub(crate) fn read_f16(src: &[u8]) -> Vec<f32> {
    src.chunks_exact(2)
        .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
        .collect()
}
