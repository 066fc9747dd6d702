//! The AVX-512 path of a warm page: the per-page integer query pattern and the calls into
//! `super::super::avx512`. Owns nothing beyond the scratch it fills; must never run unless the
//! storage's resolved path is `CpuKernel::Avx512`.

use super::super::avx512::{
    amax_of_product, i16_rows_supported, i8_rows_supported, pattern_i16, pattern_i8, scores_i16,
    scores_i8, softmax16, values16, values16_supported, weights16, weights16_supported,
    IntScoreArgs, ValueArgs16,
};
use super::{Acc, Kernel, Scratch};
use crate::backend::cpu::{bits_index, CpuStorage, ALL_BITS};
use crate::config::Bits;
use crate::quant::WarmFormat;

/// Per key width: integer scores apply; per value width: the 16-lane value loop applies. Shapes
/// only, so every page of a width in a storage takes the same path.
pub(super) fn wide_tables(s: &CpuStorage) -> ([bool; 4], [bool; 4]) {
    let (d, ps) = (s.geo.head_dim, s.geo.page_size);
    let vg = s.layouts[0][0].value_group;
    let k = ALL_BITS.map(|b| match b {
        Bits::B8 => i16_rows_supported(d),
        Bits::B4 | Bits::B2 => {
            i8_rows_supported(d * b.bits() / 8, ps) && !s.int_order(b).is_empty()
        }
        Bits::B3 => false,
    });
    let v = ALL_BITS.map(|b| {
        b != Bits::B3
            && weights16_supported(d / vg)
            && values16_supported(d * b.bits() / 8, b.bits(), vg)
            && !s.order16(b).is_empty()
    });
    (k, v)
}

impl Kernel<'_> {
    /// Fills `sc.qpat` / `sc.qscale` with the page's quantised query (`q∘step`, all heads) in the
    /// integer loops' byte order. False (nothing usable written) when `q∘step` is not finite.
    ///
    /// # Safety
    /// avx512f/bw available.
    #[inline(always)]
    unsafe fn int_pattern(&self, q: &[f32], fmt: WarmFormat, sc: &mut Scratch) -> bool {
        let (d, g) = (self.geo.head_dim, self.g);
        let ki = bits_index(fmt.k_bits);
        let order = self.s.int_order(fmt.k_bits);
        if sc.q_int[ki].is_empty() {
            for h in 0..g {
                sc.q_int[ki].extend(order.iter().map(|&c| q[h * d + c]));
            }
        }
        sc.row.clear();
        sc.row.extend(order.iter().map(|&c| sc.kstep[c]));
        let bits = fmt.k_bits.bits();
        // 8-bit codes: one int16 query (vpdpwssd). 4/2-bit codes: a 16-bit query as two int8
        // halves, `256 · hi + lo` (two vpdpbusd), so both kinds carry ~15 bits.
        let (seg, per_head) = if bits == 8 {
            (d, 2 * d)
        } else {
            let cb = (d * bits / 8).min(64);
            (cb, 2 * d * 64 / cb)
        };
        sc.qpat.resize(g * per_head, 0);
        for h in 0..g {
            let qh = &sc.q_int[ki][h * d..(h + 1) * d];
            // SAFETY: avx512f per this function's contract; head_dim is a multiple of 32.
            let amax = amax_of_product(qh, &sc.row);
            if !amax.is_finite() {
                return false;
            }
            let out = &mut sc.qpat[h * per_head..(h + 1) * per_head];
            let qmax = if bits == 8 { 32767.0 } else { 127.0 };
            let inv = if amax > 0.0 { qmax / amax } else { 0.0 };
            // hi at step amax / 127, lo at 1/256 of it: the score's unit is amax / 127 / 256.
            sc.qscale[h] = if bits == 8 {
                amax / qmax
            } else {
                amax / qmax / 256.0
            };
            // SAFETY: avx512f/bw per the contract; lengths per pattern_i8/i16 (seg in {16, 32,
            // 64} for the shapes k_int admits; |u| <= qmax by the choice of inv).
            if bits == 8 {
                pattern_i16(qh, &sc.row, inv, out);
            } else {
                pattern_i8(qh, &sc.row, inv, seg, out);
            }
        }
        true
    }

    /// A warm page on the AVX-512 path: integer scores, then the shared value phase. False (and
    /// nothing accumulated) when the page must take the f32 path instead.
    ///
    /// # Safety
    /// avx512f/bw/vl/vnni, avx2, fma and f16c must be available; `self.k_int` holds for the
    /// page's key width; `blk` is a whole head block of this storage's layout for `fmt`, and the
    /// per-page setup of `warm_block` (key/value parameters, `sc.qm`) is done.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn warm_block_wide(
        &self,
        q: &[f32],
        blk: &[u8],
        fmt: WarmFormat,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
    ) -> bool {
        if !self.int_pattern(q, fmt, sc) {
            return false;
        }
        let l = self.s.layout(fmt);
        let ps = self.geo.page_size;
        assert!(blk.len() >= l.head_bytes && n <= ps && sc.scores.len() >= self.g * ps);
        let args = IntScoreArgs {
            q: sc.qpat.as_ptr(),
            qscale: sc.qscale.as_ptr(),
            qm: sc.qm.as_ptr(),
            codes: blk.as_ptr().add(l.k_codes),
            row_bytes: l.k_row_bytes(),
            n,
            heads: self.g,
            out: sc.scores.as_mut_ptr(),
            ps,
        };
        // SAFETY: the caller guarantees the features and the row shape (k_int); the pattern was
        // just written for every head; the page block holds ps rows of codes at k_codes.
        match fmt.k_bits {
            Bits::B8 => scores_i16(&args),
            Bits::B4 => scores_i8::<4>(&args),
            _ => scores_i8::<2>(&args),
        }
        if self.v16[bits_index(fmt.v_bits)] {
            // SAFETY: as above (the avx512 features are present); v16 holds for this width.
            self.warm_tail_wide(q, blk, fmt, n, a, sc);
        } else {
            // SAFETY: avx2/fma/f16c per the contract; warm_block converted the value parameters
            // (it does unless v16 holds for the page's value width).
            self.warm_values_simd(q, blk, fmt, n, a, sc);
        }
        true
    }

    /// The rest of a warm page once its scores are in `sc.scores`, on AVX-512: outlier channels,
    /// the 16-lane softmax, the value weights and `Σ e·min` straight from the page's f16 value
    /// parameters, and the 16-lane value loop.
    ///
    /// # Safety
    /// avx512f/bw/dq/vl, avx2, fma and f16c available; `self.v16` holds for the page's value
    /// width; `blk` is a whole head block of this storage's layout for `fmt`; `n <= page_size`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn warm_tail_wide(
        &self,
        q: &[f32],
        blk: &[u8],
        fmt: WarmFormat,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
    ) {
        let (ps, groups) = (self.geo.page_size, self.groups);
        let l = self.s.layout(fmt);
        assert!(
            blk.len() >= l.head_bytes
                && n <= ps
                && l.v_min + 2 * ps * groups <= blk.len()
                && l.v_step + 2 * ps * groups <= blk.len()
                && a.acc_b.len() >= self.g * groups
        );
        self.outlier_scores(q, blk, l, n, sc);
        self.softmax_update_by(n, a, sc, |s, m, e| {
            // SAFETY: avx512f/bw/dq/vl per this function's contract; `s` and `e` hold s.len()
            // floats (the same n for both).
            unsafe { softmax16(s.as_ptr(), m, e.as_mut_ptr(), s.len().min(e.len())) }
        });
        sc.w.resize(self.g * ps * groups, 0.0);
        for h in 0..self.g {
            // SAFETY: e holds n weights of head h; the value parameters hold ps * groups f16
            // each (asserted); w has ps * groups floats per head and acc_b groups per head.
            weights16(
                sc.e.as_ptr().add(h * ps),
                n,
                groups,
                blk.as_ptr().add(l.v_step),
                blk.as_ptr().add(l.v_min),
                sc.w.as_mut_ptr().add(h * ps * groups),
                a.acc_b.as_mut_ptr().add(h * groups),
            );
        }
        sc.pf.pump(sc.pf.quarter());
        self.values_wide(blk, fmt, n, a, sc);
    }

    /// The 16-lane value loop over the group's heads.
    ///
    /// # Safety
    /// avx512f/bw/vl available; `self.v16` holds for the page's value width; `sc.w` holds the
    /// weights `[g][ps][groups]`; `blk` is a whole head block for `fmt`.
    pub(super) unsafe fn values_wide(
        &self,
        blk: &[u8],
        fmt: WarmFormat,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
    ) {
        let (d, ps, groups) = (self.geo.head_dim, self.geo.page_size, self.groups);
        let l = self.s.layout(fmt);
        let vi = bits_index(fmt.v_bits);
        assert!(sc.w.len() >= self.g * ps * groups && a.acc_w[vi].len() >= self.g * d);
        let mut hb = 0;
        while hb < self.g {
            let h = (self.g - hb).min(4);
            let args = ValueArgs16 {
                w: sc.w.as_ptr().add(hb * ps * groups),
                ps,
                groups,
                vg: l.value_group,
                codes: blk.as_ptr().add(l.v_codes),
                row_bytes: l.v_row_bytes(),
                n,
                acc: a.acc_w[vi].as_mut_ptr().add(hb * d),
                d,
            };
            // SAFETY: heads hb..hb+h exist in w and acc_w (asserted); n rows follow v_codes.
            match (h, fmt.v_bits) {
                (4, Bits::B4) => values16::<4, 4, 2>(&args),
                (3, Bits::B4) => values16::<3, 4, 2>(&args),
                (2, Bits::B4) => values16::<2, 4, 2>(&args),
                (1, Bits::B4) => values16::<1, 4, 2>(&args),
                (4, Bits::B2) => values16::<4, 2, 4>(&args),
                (3, Bits::B2) => values16::<3, 2, 4>(&args),
                (2, Bits::B2) => values16::<2, 2, 4>(&args),
                (1, Bits::B2) => values16::<1, 2, 4>(&args),
                (4, _) => values16::<4, 8, 1>(&args),
                (3, _) => values16::<3, 8, 1>(&args),
                (2, _) => values16::<2, 8, 1>(&args),
                _ => values16::<1, 8, 1>(&args),
            }
            hb += h;
        }
    }
}
