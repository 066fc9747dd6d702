//! Vector-friendly f32 loops for the CPU kernels.
//!
//! Written as fixed-width lane arrays so LLVM emits packed instructions; the `FMA` parameter picks
//! fused multiply-add, which is only correct to request inside a function compiled with the `fma`
//! target feature (otherwise `mul_add` is a slow libm call).

const LANES: usize = 16;

#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `Σ a[i] * b[i]`; lengths are equal multiples of 16 (head_dim is a multiple of 32).
#[inline(always)]
pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = fmadd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut s = 0.0;
    for v in acc {
        s += v;
    }
    s
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yc, xc) in y.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        // Work on register-sized locals: LLVM's SLP vectoriser does not pack the in-place form.
        let mut t = [0f32; LANES];
        let mut u = [0f32; LANES];
        t.copy_from_slice(yc);
        u.copy_from_slice(xc);
        for i in 0..LANES {
            t[i] = fmadd::<FMA>(a, u[i], t[i]);
        }
        yc.copy_from_slice(&t);
    }
}

/// `y *= a`.
#[inline(always)]
pub fn scale(y: &mut [f32], a: f32) {
    for v in y {
        *v *= a;
    }
}

/// `Σ x`.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s: f32 = chunks.remainder().iter().sum();
    for v in acc {
        s += v;
    }
    s
}

/// Unpacks a row of codes in lane order (see `quant::pack`) to f32: the portable form, or AVX2
/// when `AVX2` is set.
#[inline(always)]
pub fn unpack_lanes<const AVX2: bool>(packed: &[u8], bits: crate::config::Bits, out: &mut [f32]) {
    if bits == crate::config::Bits::B3 {
        let (lo, hi) = packed.split_at(out.len() / 4);
        unpack_lanes::<AVX2>(lo, crate::config::Bits::B2, out);
        crate::quant::pack::add_high_plane_lanes(hi, out);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        debug_assert_eq!(out.len(), packed.len() * 8 / bits.bits());
        // SAFETY: `AVX2` is only set in kernel instantiations reached through functions compiled
        // with `target_feature(enable = "avx2,fma")`, which are only called after run-time
        // detection of both features; the lengths are checked above (and by the layout).
        unsafe { unpack_lanes_avx2(packed, bits.bits(), out) };
        return;
    }
    crate::quant::pack::unpack_row_lanes_f32(packed, bits, out)
}

/// # Safety
/// The CPU must support AVX2, and `out.len() >= packed.len() / 8 * 64 / bits` (8 bytes in, `64 /
/// bits` floats out per step).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn unpack_lanes_avx2(packed: &[u8], bits: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = 8 / bits;
    let mask = _mm256_set1_epi32(((1u32 << bits) - 1) as i32);
    let dst = out.as_mut_ptr();
    for (c, bytes) in packed.chunks_exact(8).enumerate() {
        // SAFETY: `bytes` has exactly 8 readable bytes; the unaligned 64-bit load reads just those.
        let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.as_ptr() as *const __m128i));
        for k in 0..n {
            let codes = _mm256_and_si256(
                _mm256_srl_epi32(v, _mm_cvtsi32_si128((k * bits) as i32)),
                mask,
            );
            // SAFETY: c * 8n + 8k + 8 <= packed.len() / 8 * 8n <= out.len() by the contract above.
            _mm256_storeu_ps(dst.add(c * 8 * n + k * 8), _mm256_cvtepi32_ps(codes));
        }
    }
}

/// Reads little-endian f16 values from `src` into `out` (cleared first).
#[inline(always)]
pub fn f16_to_f32<const AVX2: bool>(src: &[u8], out: &mut Vec<f32>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if AVX2 && src.len().is_multiple_of(16) {
        out.resize(src.len() / 2, 0.0);
        // SAFETY: as for `unpack_lanes`, AVX2 instantiations run only after detecting avx2, fma and
        // f16c; `src` holds `out.len()` f16 values and is a whole number of 16-byte blocks.
        unsafe { f16_to_f32_f16c(src, out) };
        return;
    }
    out.extend(
        src.chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
    );
}

/// # Safety
/// The CPU must support F16C and AVX; `src.len() == 2 * out.len()` and is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_to_f32_f16c(src: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    for (i, block) in src.chunks_exact(16).enumerate() {
        // SAFETY: `block` has 16 readable bytes (8 f16); output index 8i + 8 <= out.len().
        let h = _mm_loadu_si128(block.as_ptr() as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i * 8), _mm256_cvtph_ps(h));
    }
}

/// Hints the CPU to bring the cache line at address `addr` into L2 (a no-op off x86-64). T1, not
/// T0: a page's ~80-line burst into L1 stalled on the core's miss buffers; on Zen 4 T1 was 10-20%
/// faster at 32/8/128 int4 32K (benches/decode.rs, T0 / T1 / T2 / none interleaved, three rounds).
#[inline(always)]
pub fn prefetch_line(addr: usize) {
    // SAFETY: prefetch is a hint that never faults, whatever the address; SSE is part of the
    // x86-64 baseline.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(addr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}
