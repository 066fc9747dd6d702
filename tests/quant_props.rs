//! Property tests of the warm formats: every round-trip error is within half a quantisation step
//! plus the f16 rounding of the stored minimum.

use half::f16;
use kvtier::quant::{self, WarmLayout};
use kvtier::Bits;
use proptest::prelude::*;

fn bits() -> impl Strategy<Value = Bits> {
    prop_oneof![
        Just(Bits::B8),
        Just(Bits::B4),
        Just(Bits::B3),
        Just(Bits::B2)
    ]
}

/// f16 rounding of `x` (half an ulp at its magnitude), the slack the stored minimum may carry.
fn f16_round(x: f32) -> f32 {
    (f16::from_f32(x).to_f32() - x).abs()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn keys_round_trip_within_half_step(
        kb in bits(), vb in bits(),
        n in 1usize..=32,
        amp in prop_oneof![Just(0.0f32), 1e-3f32..1.0, 1.0f32..300.0],
        seed in any::<u64>(),
        offset in -50.0f32..50.0,
        outliers in 0usize..=4,
    ) {
        let d = 64;
        let layout = WarmLayout::new(32, d, kb, vb, 32).with_outliers(outliers);
        let mut s = seed;
        let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 };
        let keys: Vec<f32> = (0..n * d).map(|_| offset + amp * next()).collect();
        let values: Vec<f32> = (0..n * d).map(|_| offset + amp * next()).collect();
        let mut block = vec![0u8; layout.head_bytes];
        prop_assert!(quant::quantize_keys(&keys, n, &layout, &mut block));
        prop_assert!(quant::quantize_values(&values, n, &layout, &mut block));

        let kq = quant::dequantize_keys(&block, n, &layout);
        let (lo, hi) = quant::keys::key_bounds(&block, &layout);
        let (out_idx, _) = quant::keys::outliers(&block, &layout);
        prop_assert_eq!(out_idx.len(), outliers);
        prop_assert!(out_idx.windows(2).all(|w| w[0] < w[1]) && out_idx.iter().all(|&c| c < d));
        for c in 0..d {
            if out_idx.contains(&c) {
                // An outlier channel is its keys rounded to f16, and the bound is their range.
                for t in 0..n {
                    let x = keys[t * d + c];
                    prop_assert!((x - kq[t * d + c]).abs() <= f16_round(x) + 1e-9, "outlier c{c}");
                    prop_assert!(kq[t * d + c] >= lo[c] && kq[t * d + c] <= hi[c]);
                }
                continue;
            }
            let step = (hi[c] - lo[c]) / kb.max_code() as f32;
            let cmin = (0..n).map(|t| keys[t * d + c]).fold(f32::INFINITY, f32::min);
            let slack = f16_round(cmin) + 1e-6 * (1.0 + cmin.abs() + amp);
            for t in 0..n {
                let e = (keys[t * d + c] - kq[t * d + c]).abs();
                prop_assert!(e <= step / 2.0 + slack, "key t{t} c{c}: err {e} step {step} slack {slack}");
                // every dequantised key sits inside the page bound
                prop_assert!(kq[t * d + c] >= lo[c] - 1e-6 && kq[t * d + c] <= hi[c] + 1e-6);
            }
        }
        let vq = quant::dequantize_values(&block, n, &layout);
        let steps = quant::values::value_steps(&block, &layout);
        for t in 0..n {
            for g in 0..d / 32 {
                let grp = &values[t * d + g * 32..t * d + (g + 1) * 32];
                let gmin = grp.iter().copied().fold(f32::INFINITY, f32::min);
                let step = steps[t * (d / 32) + g];
                let slack = f16_round(gmin) + 1e-6 * (1.0 + gmin.abs() + amp);
                for c in 0..32 {
                    let i = t * d + g * 32 + c;
                    let e = (values[i] - vq[i]).abs();
                    prop_assert!(e <= step / 2.0 + slack, "value t{t} c{c}: err {e} step {step}");
                }
                // the step covers the range (min + max_code * step >= max) and is the range over
                // max_code rounded up to f16, never wildly larger
                let gmax = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let min16 = f16::from_f32(gmin).to_f32();
                prop_assert!(min16 + vb.max_code() as f32 * step >= gmax);
                let ideal = (gmax - min16).max(0.0) / vb.max_code() as f32;
                prop_assert!(step <= ideal * 1.002 + 1e-7, "step {step} ideal {ideal}");
            }
        }
    }
}

#[test]
fn out_of_f16_range_is_refused() {
    let layout = WarmLayout::new(32, 32, Bits::B4, Bits::B4, 32);
    let mut block = vec![0u8; layout.head_bytes];
    let mut keys = vec![0.0f32; 32];
    keys[3] = 1.0e6;
    assert!(!quant::quantize_keys(&keys, 1, &layout, &mut block));
    assert!(!quant::quantize_values(&keys, 1, &layout, &mut block));
}

#[test]
fn packed_sizes_are_real() {
    // d128, 32 tokens, int2 keys and values: 1024 + 1024 code bytes, plus scales.
    let l = WarmLayout::new(32, 128, Bits::B2, Bits::B2, 32);
    assert_eq!(l.k_row_bytes() * 32, 1024);
    assert_eq!(l.v_row_bytes() * 32, 1024);
    assert_eq!(l.head_bytes, 2 * 128 * 2 + 2 * 32 * 4 * 2 + 2048);
}
