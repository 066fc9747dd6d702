//! The AVX-512 tail of a warm page once its scores are known: the softmax block in 16 lanes, and
//! the value weights (`e · step`) with the `Σ e · min` term read straight from the page's f16
//! value parameters (row-major `[token][group]`, as stored), so no transposed copy is made.
//!
//! Owns no state; must only run after run-time detection of avx512f/bw/dq/vl.

use std::arch::x86_64::*;

/// The softmax block of `n` scores at `s` against the running max `m`: writes `e[t] = exp(s[t] -
/// m)` and returns `(Σ e, Σ e·x, Σ e·x²)` with `x = max(s - m, -87)`. The same operations as
/// `avx2::softmax_block` per lane (so every weight is bit-identical to it), in 16 lanes with a
/// masked tail instead of a padded copy.
///
/// # Safety
/// avx512f/bw/dq/vl available; `s` and `e` are valid for `n` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub unsafe fn softmax16(s: *const f32, m: f32, e: *mut f32, n: usize) -> (f32, f32, f32) {
    use crate::attention::exp::{EXP_POLY, LN2_HI, LN2_LO, LOG2E, MAGIC};
    let (mut l, mut s1, mut s2) = (
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
        _mm512_setzero_ps(),
    );
    let vm = _mm512_set1_ps(m);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut t0 = 0;
    while t0 < n {
        let k = (n - t0).min(16);
        let mask = ((1u32 << k) - 1) as u16;
        // Lanes past the tail read as -inf, whose weight is exactly 0.
        let x = _mm512_mask_loadu_ps(ninf, mask, s.add(t0));
        let xj = _mm512_max_ps(_mm512_sub_ps(x, vm), _mm512_set1_ps(-87.0));
        let t = _mm512_add_ps(
            _mm512_mul_ps(xj, _mm512_set1_ps(LOG2E)),
            _mm512_set1_ps(MAGIC),
        );
        let nf = _mm512_sub_ps(t, _mm512_set1_ps(MAGIC));
        let r = _mm512_sub_ps(
            _mm512_sub_ps(xj, _mm512_mul_ps(nf, _mm512_set1_ps(LN2_HI))),
            _mm512_mul_ps(nf, _mm512_set1_ps(LN2_LO)),
        );
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &coef in &EXP_POLY[1..] {
            p = _mm512_add_ps(_mm512_set1_ps(coef), _mm512_mul_ps(r, p));
        }
        let ni = _mm512_sub_epi32(
            _mm512_castps_si512(t),
            _mm512_set1_epi32(MAGIC.to_bits() as i32),
        );
        let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127)));
        let w = _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
        let inf_lanes = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, ninf);
        let w = _mm512_maskz_mov_ps(!inf_lanes, w);
        l = _mm512_add_ps(l, w);
        let wx = _mm512_mul_ps(w, xj);
        s1 = _mm512_add_ps(s1, wx);
        s2 = _mm512_add_ps(s2, _mm512_mul_ps(wx, xj));
        _mm512_mask_storeu_ps(e.add(t0), mask, w);
        t0 += k;
    }
    (
        _mm512_reduce_add_ps(l),
        _mm512_reduce_add_ps(s1),
        _mm512_reduce_add_ps(s2),
    )
}

/// Whether [`weights16`] handles `groups` value groups per token: a power of two up to 16, so a
/// 16-lane vector covers whole tokens.
pub fn weights16_supported(groups: usize) -> bool {
    groups.is_power_of_two() && groups <= 16
}

/// One head's value weights and min terms for `n` tokens: `w[t · groups + g] = e[t] · step[t][g]`
/// and `acc_b[g] += Σ_t e[t] · min[t][g]`, with `step` and `min` the page's f16 value parameters,
/// row-major `[token][group]`.
///
/// # Safety
/// avx512f/bw/dq/vl available; `weights16_supported(groups)`; `e` valid for `n` floats, `step` and
/// `min` for `2 · n · groups` bytes, `w` for `n · groups` floats, `acc_b` for `groups` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub unsafe fn weights16(
    e: *const f32,
    n: usize,
    groups: usize,
    step: *const u8,
    min: *const u8,
    w: *mut f32,
    acc_b: *mut f32,
) {
    let total = n * groups;
    let shift = groups.trailing_zeros();
    let per = 16 / groups;
    // Lane j of a chunk belongs to token j / groups of the chunk.
    let idx = _mm512_srl_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm_cvtsi32_si128(shift as i32),
    );
    let mut acc = _mm512_setzero_ps();
    let mut i0 = 0;
    while i0 < total {
        let cnt = (total - i0).min(16);
        let mask = ((1u32 << cnt) - 1) as u16;
        let t0 = i0 / groups;
        let tmask = ((1u32 << (n - t0).min(per)) - 1) as u16;
        let ev = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(tmask, e.add(t0)));
        let st = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            mask,
            step.add(2 * i0) as *const i16,
        ));
        let mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            mask,
            min.add(2 * i0) as *const i16,
        ));
        _mm512_mask_storeu_ps(w.add(i0), mask, _mm512_mul_ps(ev, st));
        acc = _mm512_fmadd_ps(ev, mn, acc);
        i0 += cnt;
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    for (j, x) in lanes.iter().enumerate() {
        *acc_b.add(j % groups) += *x;
    }
}
