//! AVX-512 inner loops for warm pages: integer key scores (VNNI) and 16-lane f32 value
//! accumulation.
//!
//! Scores: the query of each head, times the page's per-channel key step, is quantised once per
//! page to int8 (4- and 2-bit codes, `vpdpbusd`: unsigned codes × signed query bytes) or int16
//! (8-bit codes widened, `vpdpwssd`), laid out in the byte order the packed rows unpack to, so a
//! 64-byte load of codes needs only a shift and a mask per bit plane. Each token's dot product is
//! exact in i32; its 16 lanes are summed with those of 15 other tokens by a transpose-add tree
//! ([`reduce16`]), so one vector of 16 scores costs 45 shuffles and adds instead of 16 horizontal
//! sums. Rows shorter than 64 bytes share a load (2 or 4 tokens per vector) and enter the tree
//! one or two levels later.
//!
//! Values: loop order (16-byte chunk) outer, token inner as in `avx2`, with 16 codes per vector;
//! the accumulator is in the 16-byte lane order (`quant::pack::lane_order_chunk(.., 16)`).
//!
//! Everything here is `unsafe` and only reachable from `kernel`'s AVX-512 instantiation, which
//! runs after run-time detection of avx512f/bw/vl/vnni (and avx2, fma, f16c).

mod tail;

use std::arch::x86_64::*;
pub use tail::{softmax16, weights16, weights16_supported};

/// Raw operands of the integer score loop of one page's head block.
pub struct IntScoreArgs {
    /// Quantised query pattern: `[heads][chunks][planes][hi, lo][64]` i8 (4/2-bit codes: the query
    /// is `256 · hi + lo` in units of its step, two int8 halves of a 16-bit value) or
    /// `[heads][chunks][32]` i16 (8-bit codes), chunk = one 64-byte (i8) or 32-byte (i16) load.
    pub q: *const u8,
    /// Per head: the query's quantisation step `s` (score = `qm + s · Σ q_int · code`).
    pub qscale: *const f32,
    /// Per head: `q·min`.
    pub qm: *const f32,
    /// First packed key row of the page.
    pub codes: *const u8,
    pub row_bytes: usize,
    pub n: usize,
    pub heads: usize,
    /// Score output, `[heads][ps]`.
    pub out: *mut f32,
    pub ps: usize,
}

/// Whether [`scores_i8`] handles rows of `row_bytes` with pages of `ps` tokens: whole 64-byte
/// chunks, or a power of two of at least 16 bytes dividing 64 (then up to `64 / row_bytes` tokens
/// share a load, which may read rows past the page's last token but never past its `ps` rows).
pub fn i8_rows_supported(row_bytes: usize, ps: usize) -> bool {
    if row_bytes >= 64 {
        row_bytes.is_multiple_of(64)
    } else {
        matches!(row_bytes, 16 | 32) && ps.is_multiple_of(64 / row_bytes)
    }
}

/// Whether [`scores_i16`] handles 8-bit rows of `head_dim` codes: whole 32-code chunks, and
/// sums that fit i32 (`head_dim · 255 · 32767 < 2^31`).
pub fn i16_rows_supported(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32) && head_dim <= 256
}

/// Sums the 16 lanes of each of `v[0..16]`: lane `4q + m` of the result is the sum of `v[4m + q]`.
/// Levels: 512 → 256 bits (`v` pairs), 256 → 128, 128 → 64, 64 → 32.
///
/// # Safety
/// avx512f available (only called from the `target_feature` loops below).
#[inline(always)]
unsafe fn reduce16(v: &[__m512i; 16]) -> __m512i {
    let mut r = [_mm512_setzero_si512(); 8];
    for (k, rk) in r.iter_mut().enumerate() {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        *rk = _mm512_add_epi32(
            _mm512_shuffle_i64x2::<0x44>(a, b),
            _mm512_shuffle_i64x2::<0xEE>(a, b),
        );
    }
    reduce8(&r)
}

/// As [`reduce16`] for 8 vectors holding two 8-lane items each (lanes 0-7, 8-15): item `i` is
/// half `i % 2` of `v[i / 2]`, and lane `4q + m` of the result sums item `4m + q`.
///
/// # Safety
/// avx512f available.
#[inline(always)]
unsafe fn reduce8(r: &[__m512i; 8]) -> __m512i {
    let mut s = [_mm512_setzero_si512(); 4];
    for (j, sj) in s.iter_mut().enumerate() {
        let (x, y) = (r[2 * j], r[2 * j + 1]);
        *sj = _mm512_add_epi32(
            _mm512_shuffle_i64x2::<0x88>(x, y),
            _mm512_shuffle_i64x2::<0xDD>(x, y),
        );
    }
    reduce4(&s)
}

/// As [`reduce16`] for 4 vectors holding four 4-lane items each: item `i` is 128-bit quarter
/// `i % 4` of `v[i / 4]`.
///
/// # Safety
/// avx512f available.
#[inline(always)]
unsafe fn reduce4(s: &[__m512i; 4]) -> __m512i {
    let c0 = _mm512_add_epi32(
        _mm512_unpacklo_epi64(s[0], s[1]),
        _mm512_unpackhi_epi64(s[0], s[1]),
    );
    let c1 = _mm512_add_epi32(
        _mm512_unpacklo_epi64(s[2], s[3]),
        _mm512_unpackhi_epi64(s[2], s[3]),
    );
    let (f0, f1) = (_mm512_castsi512_ps(c0), _mm512_castsi512_ps(c1));
    _mm512_add_epi32(
        _mm512_castps_si512(_mm512_shuffle_ps::<0x88>(f0, f1)),
        _mm512_castps_si512(_mm512_shuffle_ps::<0xDD>(f0, f1)),
    )
}

/// Puts a reduction's lanes in item order (lane `t` = item `t`) and writes `qm + s · sum` for the
/// first `m` items.
///
/// # Safety
/// avx512f available; `m <= 16` and `out` valid for `m` floats (the masked store touches no more).
#[inline(always)]
unsafe fn store_scores(r: __m512i, s: f32, qm: f32, out: *mut f32, m: usize) {
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let nat = _mm512_permutexvar_epi32(idx, r);
    let f = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(nat),
        _mm512_set1_ps(s),
        _mm512_set1_ps(qm),
    );
    _mm512_mask_storeu_ps(out, ((1u32 << m) - 1) as u16, f);
}

/// Integer scores of `B`-bit codes (`B` = 4 or 2) against the two-byte query pattern (sums stay
/// below `2^31`: `head_dim · 3 · 2^15 · 15` for head_dim up to 256 is `3.8e8`).
///
/// # Safety
/// avx512f/bw/vnni available; `i8_rows_supported(a.row_bytes, a.ps)`; `a.q` holds the pattern
/// for `a.heads` heads; the page has `a.ps >= a.n` rows of `a.row_bytes` bytes at `a.codes`;
/// `a.out` has `a.heads * a.ps` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn scores_i8<const B: usize>(a: &IntScoreArgs) {
    // Up to four heads share each row's load and unpacking.
    let mut h0 = 0;
    while h0 < a.heads {
        match a.heads - h0 {
            1 => scores_i8_heads::<B, 1>(a, h0),
            2 => scores_i8_heads::<B, 2>(a, h0),
            3 => scores_i8_heads::<B, 3>(a, h0),
            _ => scores_i8_heads::<B, 4>(a, h0),
        }
        h0 += 4.min(a.heads - h0);
    }
}

/// [`scores_i8`] for heads `h0..h0 + H`: each row is loaded and split into its bit planes once,
/// then multiplied with every head's pattern.
///
/// # Safety
/// As for [`scores_i8`], with `h0 + H <= a.heads`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn scores_i8_heads<const B: usize, const H: usize>(a: &IntScoreArgs, h0: usize) {
    let nper = 8 / B;
    let kr = a.row_bytes;
    let (lanes, chunks, stride) = if kr >= 64 {
        (16, kr / 64, kr)
    } else {
        (kr / 4, 1, 64)
    };
    let tpv = 16 / lanes;
    let nv = a.n.div_ceil(tpv);
    let mask = _mm512_set1_epi8(((1u32 << B) - 1) as i8);
    let per_head = chunks * nper * 128;
    let q0 = a.q.add(h0 * per_head);
    let mut v0 = 0;
    while v0 < nv {
        let cnt = lanes.min(nv - v0);
        let mut p = [[_mm512_setzero_si512(); 16]; H];
        for i in 0..cnt {
            let base = a.codes.add((v0 + i) * stride);
            let mut acc = [_mm512_setzero_si512(); H];
            let mut lo = [_mm512_setzero_si512(); H];
            for c in 0..chunks {
                let v = _mm512_loadu_si512(base.add(c * 64) as *const _);
                for k in 0..nper {
                    let x = _mm512_and_si512(
                        _mm512_srl_epi16(v, _mm_cvtsi32_si128((k * B) as i32)),
                        mask,
                    );
                    for h in 0..H {
                        let at = q0.add(h * per_head + (c * nper + k) * 128);
                        let q_hi = _mm512_loadu_si512(at as *const _);
                        let q_lo = _mm512_loadu_si512(at.add(64) as *const _);
                        acc[h] = _mm512_dpbusd_epi32(acc[h], x, q_hi);
                        lo[h] = _mm512_dpbusd_epi32(lo[h], x, q_lo);
                    }
                }
            }
            // The query is q_hi + q_lo / 256 in units of its step: fold the low half in.
            for ((ph, ah), lh) in p.iter_mut().zip(&acc).zip(&lo) {
                ph[i] = _mm512_add_epi32(_mm512_slli_epi32::<8>(*ah), *lh);
            }
        }
        let t0 = v0 * tpv;
        for (h, ph) in p.iter().enumerate() {
            let r = match lanes {
                16 => reduce16(ph),
                8 => reduce8(&[ph[0], ph[1], ph[2], ph[3], ph[4], ph[5], ph[6], ph[7]]),
                _ => reduce4(&[ph[0], ph[1], ph[2], ph[3]]),
            };
            let hh = h0 + h;
            store_scores(
                r,
                *a.qscale.add(hh),
                *a.qm.add(hh),
                a.out.add(hh * a.ps + t0),
                16.min(a.n - t0),
            );
        }
        v0 += cnt;
    }
}

/// Integer scores of 8-bit codes against the int16 query pattern (`head_dim / 32` chunks).
///
/// # Safety
/// As for [`scores_i8`], with `i16_rows_supported(a.row_bytes)` (8-bit rows: `row_bytes ==
/// head_dim`) and an i16 pattern.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
pub unsafe fn scores_i16(a: &IntScoreArgs) {
    let kr = a.row_bytes;
    let chunks = kr / 32;
    for h in 0..a.heads {
        let qh = a.q.add(h * chunks * 64);
        let mut t0 = 0;
        while t0 < a.n {
            let cnt = 16.min(a.n - t0);
            let mut p = [_mm512_setzero_si512(); 16];
            for (i, pi) in p.iter_mut().enumerate().take(cnt) {
                let row = a.codes.add((t0 + i) * kr);
                let mut acc = _mm512_setzero_si512();
                for c in 0..chunks {
                    let x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(row.add(c * 32) as *const _));
                    let qv = _mm512_loadu_si512(qh.add(c * 64) as *const _);
                    acc = _mm512_dpwssd_epi32(acc, x, qv);
                }
                *pi = acc;
            }
            store_scores(
                reduce16(&p),
                *a.qscale.add(h),
                *a.qm.add(h),
                a.out.add(h * a.ps + t0),
                cnt,
            );
            t0 += cnt;
        }
    }
}

/// `max_c |q[c] · step[c]|` over `q.len()` (a multiple of 16) channels.
///
/// # Safety
/// avx512f available; `step.len() >= q.len()`, `q.len() % 16 == 0`.
#[target_feature(enable = "avx512f")]
pub unsafe fn amax_of_product(q: &[f32], step: &[f32]) -> f32 {
    let mut m = _mm512_setzero_ps();
    for i in (0..q.len()).step_by(16) {
        let x = _mm512_mul_ps(
            _mm512_loadu_ps(q.as_ptr().add(i)),
            _mm512_loadu_ps(step.as_ptr().add(i)),
        );
        m = _mm512_max_ps(m, _mm512_abs_ps(x));
    }
    _mm512_reduce_max_ps(m)
}

/// Writes the two-byte int8 pattern of one head (see [`IntScoreArgs`]): element `e = j·seg + i`
/// of `q∘step` (pattern order) becomes `hi = rne(u)` at `out[128 j + r·seg + i]` and
/// `lo = sat8(rne(256 (u − hi)))` 64 bytes later, for every replica `r < 64 / seg`, with
/// `u = q·step·inv`.
///
/// # Safety
/// avx512f/bw available; `q.len() == step.len()`, a multiple of `seg`; `seg` in {16, 32, 64};
/// `out.len() >= 128 · q.len() / seg`; `|u| <= 127.5` (inv = 127 / max|q·step|).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pattern_i8(q: &[f32], step: &[f32], inv: f32, seg: usize, out: &mut [u8]) {
    let vinv = _mm512_set1_ps(inv);
    let k256 = _mm512_set1_ps(256.0);
    let reps = 64 / seg;
    for e in (0..q.len()).step_by(16) {
        let (j, i) = (e / seg, e % seg);
        let u = _mm512_mul_ps(
            _mm512_mul_ps(
                _mm512_loadu_ps(q.as_ptr().add(e)),
                _mm512_loadu_ps(step.as_ptr().add(e)),
            ),
            vinv,
        );
        // cvtps rounds to nearest even (the default MXCSR mode).
        let hi = _mm512_cvtps_epi32(u);
        let lo = _mm512_cvtps_epi32(_mm512_mul_ps(
            _mm512_sub_ps(u, _mm512_cvtepi32_ps(hi)),
            k256,
        ));
        let (hb, lb) = (_mm512_cvtsepi32_epi8(hi), _mm512_cvtsepi32_epi8(lo));
        for r in 0..reps {
            let at = out.as_mut_ptr().add(128 * j + r * seg + i);
            _mm_storeu_si128(at as *mut __m128i, hb);
            _mm_storeu_si128(at.add(64) as *mut __m128i, lb);
        }
    }
}

/// Writes the int16 pattern of one head (8-bit codes): `rne(q·step·inv)` as little-endian i16.
///
/// # Safety
/// avx512f/bw available; `q.len() == step.len()`, a multiple of 16; `out.len() >= 2 q.len()`;
/// `|q·step·inv| <= 32767.5`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pattern_i16(q: &[f32], step: &[f32], inv: f32, out: &mut [u8]) {
    let vinv = _mm512_set1_ps(inv);
    for e in (0..q.len()).step_by(16) {
        let u = _mm512_mul_ps(
            _mm512_mul_ps(
                _mm512_loadu_ps(q.as_ptr().add(e)),
                _mm512_loadu_ps(step.as_ptr().add(e)),
            ),
            vinv,
        );
        let w = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(u));
        _mm256_storeu_si256(out.as_mut_ptr().add(2 * e) as *mut __m256i, w);
    }
}

/// Raw operands of the 16-lane value loop for one head block (see `avx2::ValueArgs`).
pub struct ValueArgs16 {
    /// `e · step` per head, token and group: `[H][ps][groups]` (as [`weights16`] writes them).
    pub w: *const f32,
    pub ps: usize,
    pub groups: usize,
    pub vg: usize,
    pub codes: *const u8,
    pub row_bytes: usize,
    pub n: usize,
    /// Accumulator `[H][d]` in 16-byte lane order, first head of the block.
    pub acc: *mut f32,
    pub d: usize,
}

/// Whether [`values16`] handles value rows of `row_bytes` with value groups of `vg` codes: whole
/// 16-byte chunks, each within one group or (2-bit codes, 32-code groups) split 8 + 8 lanes.
pub fn values16_supported(row_bytes: usize, bits: usize, vg: usize) -> bool {
    let codes_per_chunk = 16 * 8 / bits;
    row_bytes.is_multiple_of(16)
        && (vg.is_multiple_of(codes_per_chunk) || (codes_per_chunk == 2 * vg && bits == 2))
}

/// `acc += Σ_t w[t] · code[t]` for `H` heads, `B`-bit codes (`NPER = 8 / B` planes).
///
/// # Safety
/// avx512f available; `values16_supported(a.row_bytes, B, a.vg)`; `a.w` holds `[H][ps][groups]`
/// weights and `a.acc` `[H][d]` floats; `a.n` rows of `a.row_bytes` bytes follow `a.codes`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub unsafe fn values16<const H: usize, const B: usize, const NPER: usize>(a: &ValueArgs16) {
    let mask = _mm512_set1_epi32(((1u32 << B) - 1) as i32);
    // 2-bit codes with 32-code groups: lanes 0-7 and 8-15 of a chunk lie in adjacent groups.
    let split = 16 * NPER > a.vg;
    for c in 0..a.row_bytes / 16 {
        let p0 = c * 16 * NPER;
        let g = p0 / a.vg;
        let mut acc = [[_mm512_setzero_ps(); NPER]; H];
        for t in 0..a.n {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                a.codes.add(t * a.row_bytes + c * 16) as *const __m128i
            ));
            let mut x = [_mm512_setzero_ps(); NPER];
            for (kk, xk) in x.iter_mut().enumerate() {
                *xk = _mm512_cvtepi32_ps(_mm512_and_si512(
                    _mm512_srl_epi32(v, _mm_cvtsi32_si128((kk * B) as i32)),
                    mask,
                ));
            }
            for (h, acc_h) in acc.iter_mut().enumerate() {
                let wp = a.w.add((h * a.ps + t) * a.groups + g);
                let w = if split {
                    _mm512_insertf32x8::<1>(_mm512_set1_ps(*wp), _mm256_set1_ps(*wp.add(1)))
                } else {
                    _mm512_set1_ps(*wp)
                };
                for kk in 0..NPER {
                    acc_h[kk] = _mm512_fmadd_ps(w, x[kk], acc_h[kk]);
                }
            }
        }
        for (h, acc_h) in acc.iter().enumerate() {
            for (kk, v) in acc_h.iter().enumerate() {
                let dst = a.acc.add(h * a.d + p0 + kk * 16);
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), *v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have() -> bool {
        crate::backend::cpu::CpuKernel::Avx512.available()
    }

    /// The integer loops compute exactly `Σ_c q[c] · code[c]` per token and head, for every row
    /// shape they accept (1, 2 or 4 tokens per 64-byte load; several loads per token).
    #[test]
    fn integer_scores_are_exact_dot_products_of_the_pattern() {
        if !have() {
            eprintln!("skipping: no AVX-512 VNNI here");
            return;
        }
        let mut x = 0x1234_5678u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (bits, d) in [
            (4, 32),
            (4, 64),
            (4, 128),
            (4, 256),
            (2, 64),
            (2, 128),
            (2, 256),
        ] {
            let (ps, heads) = (32, 3);
            let kr = d * bits / 8;
            assert!(i8_rows_supported(kr, ps), "{bits} {d}");
            let nper = 8 / bits;
            let codes: Vec<u8> = (0..ps * kr).map(|_| next() as u8).collect();
            let qi: Vec<i8> = (0..heads * d).map(|_| (next() % 255) as i8).collect();
            let ql: Vec<i8> = (0..heads * d).map(|_| (next() % 255) as i8).collect();
            // Channel of pattern byte (chunk c, plane k, byte j) per the lane_order_chunk rule.
            let cb = kr.min(64);
            let chunks = kr.div_ceil(64);
            let mut pat = vec![0u8; heads * chunks * nper * 128];
            for h in 0..heads {
                for c in 0..chunks {
                    for k in 0..nper {
                        for j in 0..64 {
                            let ch = (c * cb + j % cb) * nper + k;
                            let at = ((h * chunks + c) * nper + k) * 128 + j;
                            pat[at] = qi[h * d + ch] as u8;
                            pat[at + 64] = ql[h * d + ch] as u8;
                        }
                    }
                }
            }
            for n in [ps, 17, 5, 1] {
                let mut out = vec![f32::NAN; heads * ps];
                let (qscale, qm) = (vec![1.0f32; heads], vec![0.0f32; heads]);
                let a = IntScoreArgs {
                    q: pat.as_ptr(),
                    qscale: qscale.as_ptr(),
                    qm: qm.as_ptr(),
                    codes: codes.as_ptr(),
                    row_bytes: kr,
                    n,
                    heads,
                    out: out.as_mut_ptr(),
                    ps,
                };
                // SAFETY: AVX-512 VNNI detected above; buffers sized per the contract.
                unsafe {
                    if bits == 4 {
                        scores_i8::<4>(&a)
                    } else {
                        scores_i8::<2>(&a)
                    }
                };
                for h in 0..heads {
                    for t in 0..ps {
                        let got = out[h * ps + t];
                        if t >= n {
                            assert!(got.is_nan(), "wrote past n");
                            continue;
                        }
                        let want: i64 = (0..d)
                            .map(|c| {
                                let byte = codes[t * kr + c / nper];
                                let code = (byte >> ((c % nper) * bits)) & ((1 << bits) - 1);
                                (256 * qi[h * d + c] as i64 + ql[h * d + c] as i64) * code as i64
                            })
                            .sum();
                        assert_eq!(got, want as f32, "bits {bits} d {d} n {n} h {h} t {t}");
                    }
                }
            }
        }
    }
}
