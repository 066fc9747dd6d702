//! KIVI-style asymmetric quantisation of pages.
//!
//! Owns: the byte layout of a warm page ([`WarmLayout`]), packing of codes ([`pack`]), and the
//! reference quantise / dequantise routines for keys (per channel over a page's tokens) and values
//! (per token, in groups of channels). Minimums and scales are stored as f16; codes are really packed
//! (2 per byte at int4, 4 per byte at int2). Every backend must produce and read exactly this layout,
//! so pages can move between backends and the CPU stays the oracle.
//!
//! Must never: allocate per-token storage outside the page block, or keep a dequantised copy.
//!
//! Error bound (tested by proptest): for every element, `|x - dequant(x)| <= scale/2 + rounding`,
//! where `scale` is the stored f16 step of its channel (keys) or group (values) and `rounding` is the
//! f16 rounding of the stored minimum plus f32 arithmetic slack.

pub mod keys;
pub mod layout;
pub mod pack;
pub mod rotate;
pub mod values;

pub use keys::{dequantize_keys, quantize_keys};
pub use layout::{WarmFormat, WarmLayout};
pub use rotate::{Rotation, Rotator};
pub use values::{dequantize_values, quantize_values};

use half::f16;

/// Min and step for a range `[lo, hi]` at `max_code` levels, both representable in f16 and chosen so
/// that every value in `[lo, hi]` maps to a code in range (the step is rounded up, never down).
/// Returns `None` when the range does not fit f16 (|x| beyond 65504), so the caller can keep
/// the data exact instead of storing infinities.
pub(crate) fn min_and_step(lo: f32, hi: f32, max_code: u32) -> Option<(f16, f16)> {
    let min16 = f16::from_f32(lo);
    let min = min16.to_f32();
    if !min.is_finite() {
        return None;
    }
    let span = (hi - min).max(0.0);
    let mut step16 = f16::from_f32(span / max_code as f32);
    // Round up so that min + max_code * step >= hi.
    while step16.to_f32() * (max_code as f32) + min < hi {
        step16 = f16::from_bits(step16.to_bits() + 1);
        if !step16.to_f32().is_finite() {
            return None;
        }
    }
    if !step16.to_f32().is_finite() {
        return None;
    }
    Some((min16, step16))
}

/// Nearest code for `x` given min and reciprocal step, clamped to `[0, max_code]`: the position
/// rounded half away from zero (as `f32::round`), then clamped. Clamping first gives the same code
/// for every input and leaves an integer-valued position in `[0, 255]`, so no libm `trunc` (a call
/// on baseline x86-64, which has no SSE4.1) and no saturating conversion keep the loops scalar:
/// `max(NaN, 0) = 0` maps NaN to code 0 as `NaN as u8` did, adding and subtracting 2^23 rounds to
/// nearest-even exactly for values below 2^23, and a tie it rounded down is moved up.
#[inline(always)]
pub(crate) fn code_of(x: f32, min: f32, inv_step: f32, max_code: u32) -> u8 {
    const MAGIC: f32 = 8_388_608.0; // 2^23
    let c = ((x - min) * inv_step).max(0.0).min(max_code as f32);
    let r = (c + MAGIC) - MAGIC;
    let r = if c - r == 0.5 { r + 1.0 } else { r };
    // SAFETY: `c` is in [0, max_code] (NaN was mapped to 0 by `max`) and max_code <= 255, so `r`
    // is an integer in [0, 255]: representable in u8.
    unsafe { r.to_int_unchecked::<u8>() }
}

/// `f32::round` (half away from zero) for finite `x`, without the libm call that keeps loops
/// scalar: `x - trunc(x)` is exact, so the comparison decides exactly as `round` does.
#[cfg(test)]
#[inline(always)]
pub(crate) fn round_half_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

#[inline(always)]
pub(crate) fn inv(step: f32) -> f32 {
    if step > 0.0 {
        1.0 / step
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::{code_of, round_half_away};

    /// The clamp-first `code_of` gives the codes of rounding first and clamping after, for every
    /// width, on positions around every code boundary, far outside the range, and non-finite.
    #[test]
    fn code_of_equals_round_then_clamp() {
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e30,
            -1e30,
        ];
        for i in -20..600 {
            let h = i as f32 * 0.5;
            xs.extend([
                h,
                f32::from_bits(h.to_bits().wrapping_add(1)),
                f32::from_bits(h.to_bits().wrapping_sub(1)),
            ]);
        }
        let mut s = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            xs.push((s as f32 / u32::MAX as f32) * 300.0 - 20.0);
        }
        for max_code in [1u32, 3, 7, 15, 255] {
            for &x in &xs {
                for (min, inv) in [(0.0f32, 1.0f32), (0.25, 1.0), (-3.0, 0.37), (0.0, 0.0)] {
                    let want = round_half_away((x - min) * inv).clamp(0.0, max_code as f32) as u8;
                    assert_eq!(
                        code_of(x, min, inv, max_code),
                        want,
                        "x {x} min {min} inv {inv} max {max_code}"
                    );
                }
            }
        }
    }

    #[test]
    fn round_half_away_equals_round() {
        let mut special = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
            8_388_607.5,
            8_388_608.0,
            16_777_217.0,
            1e30,
            -1e30,
            f32::MIN_POSITIVE,
        ];
        // Every f32 in [0, 300) on a fine grid and the neighbours of each half-integer.
        for i in 0..600 {
            let h = i as f32 * 0.5;
            special.extend([h, f32::from_bits(h.to_bits() + 1), -h]);
            if h > 0.0 {
                special.push(f32::from_bits(h.to_bits() - 1));
            }
        }
        let mut s = 0x1234_5678u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            if x.is_finite() {
                special.push(x);
            }
        }
        for x in special {
            assert_eq!(
                round_half_away(x).to_bits(),
                x.round().to_bits(),
                "{x} ({:#x})",
                x.to_bits()
            );
        }
    }
}
