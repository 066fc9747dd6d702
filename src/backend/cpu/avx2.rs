//! AVX2/FMA inner loops for warm pages, specialised by GQA head block `H` and code width `B`.
//!
//! Scores: for each token, the packed key row is unpacked 8 bytes at a time into `8/B` vectors of
//! codes (lane order, see `quant::pack`) and multiplied into `H` register accumulators against the
//! per-page `q∘step` rows, so each code is unpacked once for the whole head block.
//!
//! Values: loop order is (8-byte chunk of the row) outer, token inner, so the `H × 8/B` vector
//! accumulators of one chunk stay in registers for the whole page and are added to memory once.
//! A chunk never straddles a value group (groups are multiples of 32 codes).
//!
//! Everything here is `unsafe` and only reachable from `kernel`'s AVX2 instantiation, which runs
//! after run-time detection of avx2, fma and f16c.

use std::arch::x86_64::*;

/// Raw operands of the warm-page score loop for one head block.
pub struct ScoreArgs {
    /// `q∘step` rows in lane order, `[H][d]`, first head of the block.
    pub qs: *const f32,
    /// `q·min` per head, `[H]`.
    pub qm: *const f32,
    /// First packed key row of the page.
    pub codes: *const u8,
    pub row_bytes: usize,
    pub d: usize,
    pub n: usize,
    /// Score output, `[H][ps]`.
    pub out: *mut f32,
    pub ps: usize,
}

/// Raw operands of the warm-page value loop for one head block.
pub struct ValueArgs {
    /// `e · step` per head, group and token: `[H][groups][ps]`.
    pub w: *const f32,
    pub ps: usize,
    pub groups: usize,
    pub vg: usize,
    /// First packed value row of the page.
    pub codes: *const u8,
    pub row_bytes: usize,
    pub n: usize,
    /// Lane-order accumulator `[H][d]`, first head of the block.
    pub acc: *mut f32,
    pub d: usize,
}

/// Sum of the 8 lanes.
///
/// # Safety
/// avx available (only called from the `target_feature(enable = "avx2,fma")` loops).
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
}

/// Bit field `kk` of `B`-bit codes in 8 widened bytes, as f32.
///
/// # Safety
/// avx2 available.
#[inline(always)]
unsafe fn codes_of<const B: usize>(v: __m256i, kk: usize) -> __m256 {
    let mask = _mm256_set1_epi32(((1u32 << B) - 1) as i32);
    _mm256_cvtepi32_ps(_mm256_and_si256(
        _mm256_srl_epi32(v, _mm_cvtsi32_si128((kk * B) as i32)),
        mask,
    ))
}

/// # Safety
/// avx2 and fma available; `a` describes `H` heads of valid `qs`/`qm` rows, `n` valid code rows of
/// `row_bytes` (a multiple of 8) bytes, and an `out` of at least `H * ps` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn scores<const H: usize, const B: usize>(a: &ScoreArgs) {
    let nper = 8 / B;
    for t in 0..a.n {
        let row = a.codes.add(t * a.row_bytes);
        let mut acc = [_mm256_setzero_ps(); H];
        for c in 0..a.row_bytes / 8 {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c * 8) as *const __m128i));
            for kk in 0..nper {
                let x = codes_of::<B>(v, kk);
                let p = c * 8 * nper + kk * 8;
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    *acc_h = _mm256_fmadd_ps(_mm256_loadu_ps(a.qs.add(h * a.d + p)), x, *acc_h);
                }
            }
        }
        for (h, acc_h) in acc.iter().enumerate() {
            *a.out.add(h * a.ps + t) = *a.qm.add(h) + hsum(*acc_h);
        }
    }
}

/// # Safety
/// avx2 and fma available; `a` describes `H` heads of valid `w` (`[H][groups][ps]`) and `acc`
/// (`[H][d]`) rows and `n` valid code rows of `row_bytes` (a multiple of 8) bytes. `NPER == 8 / B`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn values<const H: usize, const B: usize, const NPER: usize>(a: &ValueArgs) {
    for c in 0..a.row_bytes / 8 {
        let p0 = c * 8 * NPER;
        let g = p0 / a.vg;
        let mut acc = [[_mm256_setzero_ps(); NPER]; H];
        for t in 0..a.n {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                a.codes.add(t * a.row_bytes + c * 8) as *const __m128i
            ));
            let mut x = [_mm256_setzero_ps(); NPER];
            for (kk, xk) in x.iter_mut().enumerate() {
                *xk = codes_of::<B>(v, kk);
            }
            for (h, acc_h) in acc.iter_mut().enumerate() {
                let w = _mm256_broadcast_ss(&*a.w.add((h * a.groups + g) * a.ps + t));
                for kk in 0..NPER {
                    acc_h[kk] = _mm256_fmadd_ps(w, x[kk], acc_h[kk]);
                }
            }
        }
        for (h, acc_h) in acc.iter().enumerate() {
            for (kk, v) in acc_h.iter().enumerate() {
                let dst = a.acc.add(h * a.d + p0 + kk * 8);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *v));
            }
        }
    }
}

/// 3-bit codes of one 32-code block in lane order: vector `kk` of the 2-bit low plane (`v`, 8 bytes
/// widened to lanes) with the high bit added from the block's 32-bit high word `hw`: lane `j` of
/// vector `kk` is code `4j + kk`, whose high bit is bit `4j + kk` of `hw` (see `quant::pack`).
///
/// # Safety
/// avx2 available.
#[inline(always)]
unsafe fn codes3_of(v: __m256i, hw: __m256i, kk: usize) -> __m256 {
    let low = _mm256_and_si256(
        _mm256_srl_epi32(v, _mm_cvtsi32_si128((kk * 2) as i32)),
        _mm256_set1_epi32(3),
    );
    let sh = _mm256_add_epi32(
        _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
        _mm256_set1_epi32(kk as i32),
    );
    let high = _mm256_slli_epi32(
        _mm256_and_si256(_mm256_srlv_epi32(hw, sh), _mm256_set1_epi32(1)),
        2,
    );
    _mm256_cvtepi32_ps(_mm256_or_si256(low, high))
}

/// [`scores`] for 3-bit rows (`row_bytes = 3 d / 8`: the 2-bit plane, then the high bits).
///
/// # Safety
/// As for [`scores`], with `row_bytes == 3 * d / 8` and `d` a multiple of 32.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn scores3<const H: usize>(a: &ScoreArgs) {
    let lo_bytes = a.d / 4;
    for t in 0..a.n {
        let row = a.codes.add(t * a.row_bytes);
        let mut acc = [_mm256_setzero_ps(); H];
        for c in 0..lo_bytes / 8 {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c * 8) as *const __m128i));
            let hw = _mm256_set1_epi32((row.add(lo_bytes + 4 * c) as *const i32).read_unaligned());
            for kk in 0..4 {
                let x = codes3_of(v, hw, kk);
                let p = c * 32 + kk * 8;
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    *acc_h = _mm256_fmadd_ps(_mm256_loadu_ps(a.qs.add(h * a.d + p)), x, *acc_h);
                }
            }
        }
        for (h, acc_h) in acc.iter().enumerate() {
            *a.out.add(h * a.ps + t) = *a.qm.add(h) + hsum(*acc_h);
        }
    }
}

/// [`values`] for 3-bit rows.
///
/// # Safety
/// As for [`values`], with `row_bytes == 3 * d / 8` and `d` a multiple of 32.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn values3<const H: usize>(a: &ValueArgs) {
    let lo_bytes = a.d / 4;
    for c in 0..lo_bytes / 8 {
        let p0 = c * 32;
        let g = p0 / a.vg;
        let mut acc = [[_mm256_setzero_ps(); 4]; H];
        for t in 0..a.n {
            let row = a.codes.add(t * a.row_bytes);
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(c * 8) as *const __m128i));
            let hw = _mm256_set1_epi32((row.add(lo_bytes + 4 * c) as *const i32).read_unaligned());
            let mut x = [_mm256_setzero_ps(); 4];
            for (kk, xk) in x.iter_mut().enumerate() {
                *xk = codes3_of(v, hw, kk);
            }
            for (h, acc_h) in acc.iter_mut().enumerate() {
                let w = _mm256_broadcast_ss(&*a.w.add((h * a.groups + g) * a.ps + t));
                for kk in 0..4 {
                    acc_h[kk] = _mm256_fmadd_ps(w, x[kk], acc_h[kk]);
                }
            }
        }
        for (h, acc_h) in acc.iter().enumerate() {
            for (kk, v) in acc_h.iter().enumerate() {
                let dst = a.acc.add(h * a.d + p0 + kk * 8);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *v));
            }
        }
    }
}

/// One head's softmax block: `e[t] = exp(max(s[t] - m, -87))` (0 where `s[t]` is `-inf`) for
/// `t < n`, returning `(Σ e, Σ e·x, Σ e·x²)` with `x = max(s - m, -87)`, summed in 8 lanes. The
/// same operations, in the same order, as `attention::exp::exp_nonpos` and the portable loop.
///
/// # Safety
/// avx2 and fma available; `s` and `e` hold at least `n` floats.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub unsafe fn softmax_block(s: &[f32], m: f32, e: &mut [f32], n: usize) -> (f32, f32, f32) {
    use crate::attention::exp::{EXP_POLY, LN2_HI, LN2_LO, LOG2E, MAGIC};
    let (mut l, mut s1, mut s2) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let vm = _mm256_set1_ps(m);
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut t0 = 0;
    while t0 < n {
        let k = (n - t0).min(8);
        // Whole vectors load directly; only a page's partial tail goes through the padded buffer
        // (a variable-length copy is a memcpy call, which cost more than the exponentials).
        let x = if k == 8 {
            _mm256_loadu_ps(s.as_ptr().add(t0))
        } else {
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..k].copy_from_slice(&s[t0..t0 + k]);
            _mm256_loadu_ps(buf.as_ptr())
        };
        let xj = _mm256_max_ps(_mm256_sub_ps(x, vm), _mm256_set1_ps(-87.0));
        let xc = _mm256_max_ps(xj, _mm256_set1_ps(-87.0));
        let t = _mm256_add_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
            _mm256_set1_ps(MAGIC),
        );
        let nf = _mm256_sub_ps(t, _mm256_set1_ps(MAGIC));
        let r = _mm256_sub_ps(
            _mm256_sub_ps(xc, _mm256_mul_ps(nf, _mm256_set1_ps(LN2_HI))),
            _mm256_mul_ps(nf, _mm256_set1_ps(LN2_LO)),
        );
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for &coef in &EXP_POLY[1..] {
            p = _mm256_add_ps(_mm256_set1_ps(coef), _mm256_mul_ps(r, p));
        }
        let ni = _mm256_sub_epi32(
            _mm256_castps_si256(t),
            _mm256_set1_epi32(MAGIC.to_bits() as i32),
        );
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127)));
        let w = _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
        let w = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(x, ninf), w);
        l = _mm256_add_ps(l, w);
        let wx = _mm256_mul_ps(w, xj);
        s1 = _mm256_add_ps(s1, wx);
        s2 = _mm256_add_ps(s2, _mm256_mul_ps(wx, xj));
        if k == 8 {
            _mm256_storeu_ps(e.as_mut_ptr().add(t0), w);
        } else {
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), w);
            e[t0..t0 + k].copy_from_slice(&out[..k]);
        }
        t0 += k;
    }
    let (mut al, mut a1, mut a2) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    _mm256_storeu_ps(al.as_mut_ptr(), l);
    _mm256_storeu_ps(a1.as_mut_ptr(), s1);
    _mm256_storeu_ps(a2.as_mut_ptr(), s2);
    (
        super::simd::sum(&al),
        super::simd::sum(&a1),
        super::simd::sum(&a2),
    )
}
