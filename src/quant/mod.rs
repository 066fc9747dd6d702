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

/// Nearest code for `x` given min and reciprocal step, clamped to `[0, max_code]`.
#[inline(always)]
pub(crate) fn code_of(x: f32, min: f32, inv_step: f32, max_code: u32) -> u8 {
    let c = ((x - min) * inv_step).round();
    c.clamp(0.0, max_code as f32) as u8
}

#[inline(always)]
pub(crate) fn inv(step: f32) -> f32 {
    if step > 0.0 {
        1.0 / step
    } else {
        0.0
    }
}
