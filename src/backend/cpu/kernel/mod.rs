//! Split-K decode attention on the CPU ("flash-decoding" on threads).
//!
//! Work items are (sequence, kv head, chunk of pages). An item loads each page once for all q heads
//! of its GQA group, computes scores (warm keys straight from packed codes: `q·k = q·min + (q∘step)·code`),
//! keeps an online softmax with the entropy sums of [`crate::attention`], and accumulates values
//! (warm values as `Σ e·step·code + Σ e·min` per group). Items run on rayon's pool; a combine step
//! merges the chunks of one (sequence, kv head) in order.
//!
//! The inner loops are compiled three times: AVX-512 (integer key scores, [`wide`]), AVX2+FMA and
//! portable; the storage's [`CpuKernel`] (resolved at creation) picks one.
//!
//! Batch invariance: a sequence's work items depend only on its own pages (a fixed number of
//! pages per item), and chunks merge in page order, so its result is bit-identical whatever else
//! is in the batch and however many threads run.
//!
//! Warm pages of one layer may have different code widths (a policy can demote a page to fewer
//! bits): the query is permuted once per key width met, and value accumulators are kept per value
//! width, each in its own lane order, folded into channel order at the end.

#[cfg(target_arch = "x86_64")]
mod wide;

use super::simd::{axpy, dot, f16_to_f32, prefetch_line, scale, sum, unpack_lanes};
#[cfg(target_arch = "x86_64")]
use super::CpuKernel;
use super::{bits_index, internal, CpuStorage, Geometry, ALL_BITS};
use crate::attention::exp::exp_nonpos;
use crate::attention::{Attention, OnlineSoftmax, PageSelection};
use crate::backend::AttendInput;
use crate::cache::{PageEntry, PageTable, Tier};
use crate::error::{Error, Result};
use crate::quant::{WarmFormat, WarmLayout};
use rayon::prelude::*;

/// Pages per decode work item. Fixed (not derived from the batch or the thread count) so results
/// are batch invariant; 16 pages keep an item's merge cost negligible next to its loads.
const ITEM_PAGES: usize = 16;

/// Reusable working memory of CPU decode attention (see [`crate::backend::Scratch`]).
#[derive(Default)]
pub struct CpuScratch {
    q: Vec<f32>,
    items: Vec<Item>,
}

/// Running state of one work item: a GQA group of q heads.
struct Acc {
    st: Vec<OnlineSoftmax>,
    /// Exact-page value accumulator, standard channel order, `[group][head_dim]`.
    acc: Vec<f32>,
    /// Warm-page value accumulators of `step·code`, one per value width (empty until a page of
    /// that width is met), each in that width's lane order, `[group][head_dim]`.
    acc_w: [Vec<f32>; 4],
    /// Warm-page value accumulator of `min` terms, `[group][value groups]`.
    acc_b: Vec<f32>,
    /// `(m_p, l_p)` per page per head, when page masses are wanted.
    page_stats: Option<Vec<(f32, f32)>>,
}

/// Per-item scratch, allocated once per item.
struct Scratch {
    scores: Vec<f32>,
    e: Vec<f32>,
    row: Vec<f32>,
    qs: Vec<f32>,
    qm: Vec<f32>,
    kmin: Vec<f32>,
    kstep: Vec<f32>,
    /// Value minima and steps of the page, transposed to `[groups][ps]` so the per-group loops
    /// over tokens are contiguous.
    vmin: Vec<f32>,
    vstep: Vec<f32>,
    /// Row-major `[ps][groups]` staging of the f16 value parameters before the transpose.
    vtmp: Vec<f32>,
    hot_k: Vec<f32>,
    hot_v: Vec<f32>,
    /// `e · step` per head, token and group (the AVX2 value loop's weights).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    w: Vec<f32>,
    /// The item's queries in each key width's lane order, `[group][head_dim]` (empty until met).
    q_lanes: [Vec<f32>; 4],
    /// The item's page entries.
    entries: Vec<PageEntry>,
    /// The item's queries in each key width's integer-pattern order (AVX-512 path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    q_int: [Vec<f32>; 4],
    /// One page's quantised query patterns, all heads (AVX-512 path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qpat: Vec<u8>,
    /// The query quantisation step per head (AVX-512 path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qscale: Vec<f32>,
    /// The next page's head block, prefetched a quarter at a time while this page is computed.
    pf: Prefetch,
}

/// Cache lines still to prefetch (addresses only: a prefetch never faults, so a range that
/// outlives its page is harmless). Issuing a whole ~80-line head block at once stalled the core
/// on its miss buffers; spreading it over the page's phases lets the loads overlap the work.
#[derive(Default)]
struct Prefetch {
    next: usize,
    end: usize,
    lines: usize,
}

impl Prefetch {
    fn of(blk: &[u8]) -> Self {
        let next = blk.as_ptr() as usize;
        Prefetch {
            next,
            end: next + blk.len(),
            lines: blk.len().div_ceil(64),
        }
    }

    /// A quarter of the block, in lines (at least one).
    fn quarter(&self) -> usize {
        self.lines.div_ceil(4)
    }

    /// Prefetches up to `lines` more lines of the range.
    #[inline(always)]
    fn pump(&mut self, lines: usize) {
        for _ in 0..lines {
            if self.next >= self.end {
                return;
            }
            prefetch_line(self.next);
            self.next += 64;
        }
    }
}

struct Kernel<'a> {
    s: &'a CpuStorage,
    geo: Geometry,
    g: usize,
    groups: usize,
    /// Per key width: scores as integer dot products (AVX-512 path, supported row shape).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    k_int: [bool; 4],
    /// Per value width: the 16-lane value loop, accumulating in the 16-byte lane order.
    v16: [bool; 4],
    /// Decode items record per-page (max, sum) for the page results.
    record_pages: bool,
}

impl<'a> Kernel<'a> {
    fn new(s: &'a CpuStorage) -> Self {
        #[cfg(target_arch = "x86_64")]
        let (k_int, v16) = if s.kernel() == CpuKernel::Avx512 {
            wide::wide_tables(s)
        } else {
            ([false; 4], [false; 4])
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (k_int, v16) = ([false; 4], [false; 4]);
        Kernel {
            s,
            geo: s.geo,
            g: s.geo.group(),
            groups: s.layouts[0][0].groups(),
            k_int,
            v16,
            record_pages: true,
        }
    }

    /// The lane order the value accumulator of width `b` is kept in.
    fn value_order(&self, b: crate::config::Bits) -> &[usize] {
        if self.v16[bits_index(b)] {
            self.s.order16(b)
        } else {
            self.s.order(b)
        }
    }

    fn acc(&self, record_pages: bool) -> Acc {
        let d = self.geo.head_dim;
        Acc {
            st: vec![OnlineSoftmax::default(); self.g],
            acc: vec![0.0; self.g * d],
            acc_w: [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
            acc_b: vec![0.0; self.g * self.groups],
            page_stats: record_pages.then(Vec::new),
        }
    }

    fn scratch(&self) -> Scratch {
        let (d, ps, g) = (self.geo.head_dim, self.geo.page_size, self.g);
        Scratch {
            scores: vec![0.0; g * ps],
            e: vec![0.0; g * ps],
            row: vec![0.0; d],
            qs: vec![0.0; g * d],
            qm: vec![0.0; g],
            kmin: Vec::with_capacity(d),
            kstep: Vec::with_capacity(d),
            vmin: vec![0.0; ps * self.groups],
            vstep: vec![0.0; ps * self.groups],
            vtmp: Vec::with_capacity(ps * self.groups),
            hot_k: Vec::new(),
            hot_v: Vec::new(),
            w: Vec::new(),
            q_lanes: [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
            entries: Vec::new(),
            q_int: [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
            qpat: Vec::new(),
            qscale: vec![0.0; g],
            pf: Prefetch::default(),
        }
    }

    /// Softmax update for `n` scores per head in `sc.scores`; leaves the weights in `sc.e`.
    #[inline(always)]
    fn softmax_update<const FMA: bool>(&self, n: usize, a: &mut Acc, sc: &mut Scratch) {
        self.softmax_update_by(n, a, sc, |s, m, e| {
            #[cfg(target_arch = "x86_64")]
            if FMA {
                // SAFETY: FMA instantiations run only after detection of avx2 and fma; `s` and
                // `e` hold n floats.
                return unsafe { super::avx2::softmax_block(s, m, e, s.len()) };
            }
            softmax_lanes(s, m, e)
        })
    }

    /// [`Self::softmax_update`] with the block `(scores, running max, weights out) -> (Σ e, Σ e·x,
    /// Σ e·x²)` of the caller's instruction set.
    #[inline(always)]
    fn softmax_update_by(
        &self,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
        block: impl Fn(&[f32], f32, &mut [f32]) -> (f32, f32, f32),
    ) {
        let (d, ps) = (self.geo.head_dim, self.geo.page_size);
        for h in 0..self.g {
            let s = &sc.scores[h * ps..h * ps + n];
            let mp = max_lanes(s);
            let st = &mut a.st[h];
            if mp > st.m {
                let alpha = st.rescale_to(mp);
                scale(&mut a.acc[h * d..(h + 1) * d], alpha);
                for w in a.acc_w.iter_mut().filter(|w| !w.is_empty()) {
                    scale(&mut w[h * d..(h + 1) * d], alpha);
                }
                scale(&mut a.acc_b[h * self.groups..(h + 1) * self.groups], alpha);
            }
            let m = st.m;
            let e = &mut sc.e[h * ps..h * ps + n];
            let (lsum, s1, s2) = block(s, m, e);
            st.l += lsum;
            st.s1 += s1;
            st.s2 += s2;
            if let Some(ps) = a.page_stats.as_mut() {
                // log Σ exp(s) = m + ln Σ exp(s - m), with m the running max (>= the page's own
                // max). Rescaling to the page's max instead would need exp(m - mp), which
                // overflows once the running max is 88 above the page's: masses became inf.
                ps.push((m, lsum));
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // all are hot-loop operands; a struct would only rename them
    /// Exact tokens: `n <= page_size` rows at `k[t * stride..]`, `v[t * stride..]`.
    #[inline(always)]
    fn exact_block<const FMA: bool>(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        stride: usize,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
    ) {
        let (d, ps) = (self.geo.head_dim, self.geo.page_size);
        for h in 0..self.g {
            let qh = &q[h * d..(h + 1) * d];
            for t in 0..n {
                sc.scores[h * ps + t] = dot::<FMA>(qh, &k[t * stride..t * stride + d]);
            }
        }
        self.softmax_update::<FMA>(n, a, sc);
        for t in 0..n {
            let vr = &v[t * stride..t * stride + d];
            for h in 0..self.g {
                axpy::<FMA>(&mut a.acc[h * d..(h + 1) * d], sc.e[h * ps + t], vr);
            }
        }
    }

    /// One warm page's head block, of format `fmt`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)] // hot-loop operands, as in exact_block
    fn warm_block<const FMA: bool, const WIDE: bool>(
        &self,
        q: &[f32],
        blk: &[u8],
        fmt: WarmFormat,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
    ) {
        let (d, ps, groups) = (self.geo.head_dim, self.geo.page_size, self.groups);
        let l = self.s.layout(fmt);
        let vg = l.value_group;
        let (ki, vi) = (bits_index(fmt.k_bits), bits_index(fmt.v_bits));
        if a.acc_w[vi].is_empty() {
            a.acc_w[vi] = vec![0.0; self.g * d];
        }
        f16_to_f32::<FMA>(&blk[l.k_min..l.k_min + 2 * d], &mut sc.kmin);
        f16_to_f32::<FMA>(&blk[l.k_step..l.k_step + 2 * d], &mut sc.kstep);
        sc.pf.pump(sc.pf.quarter());
        // The AVX-512 value tail reads the f16 value parameters as stored; the other loops want
        // them in f32, transposed to `[groups][ps]`.
        let tail16 = FMA && WIDE && self.v16[vi];
        if !tail16 {
            f16_to_f32::<FMA>(&blk[l.v_min..l.v_min + 2 * ps * groups], &mut sc.vtmp);
            transpose_into(&sc.vtmp, groups, ps, &mut sc.vmin);
            f16_to_f32::<FMA>(&blk[l.v_step..l.v_step + 2 * ps * groups], &mut sc.vtmp);
            transpose_into(&sc.vtmp, groups, ps, &mut sc.vstep);
        }
        for h in 0..self.g {
            sc.qm[h] = dot::<FMA>(&q[h * d..(h + 1) * d], &sc.kmin);
        }
        #[cfg(target_arch = "x86_64")]
        if FMA && WIDE && self.k_int[ki] {
            // SAFETY: WIDE instantiations run only on storages whose resolved path is Avx512,
            // which requires detected avx512f/bw/vl/vnni, avx2, fma and f16c; k_int holds only
            // for row shapes the integer loops support, and `blk` is a whole head block.
            if unsafe { self.warm_block_wide(q, blk, fmt, n, a, sc) } {
                return;
            }
        }
        if sc.q_lanes[ki].is_empty() {
            let order = self.s.order(fmt.k_bits);
            for h in 0..self.g {
                sc.q_lanes[ki].extend(order.iter().map(|&c| q[h * d + c]));
            }
        }
        // Key steps in lane order once per page; the query was permuted once per item.
        sc.row.clear();
        sc.row
            .extend(self.s.order(fmt.k_bits).iter().map(|&c| sc.kstep[c]));
        for h in 0..self.g {
            let qp = &sc.q_lanes[ki][h * d..(h + 1) * d];
            for ((o, &x), &st) in sc.qs[h * d..(h + 1) * d].iter_mut().zip(qp).zip(&sc.row) {
                *o = x * st;
            }
        }
        let (kr, vr) = (l.k_row_bytes(), l.v_row_bytes());
        #[cfg(target_arch = "x86_64")]
        if FMA {
            // SAFETY: FMA instantiations run only after detection of avx2, fma and f16c; the
            // pointers cover the scratch and page ranges the layout defines (checked by slicing).
            unsafe {
                self.warm_scores_avx2(blk, fmt, n, sc);
                if tail16 {
                    // SAFETY: tail16 implies WIDE, whose instantiations run only on Avx512
                    // storages (avx512f/bw/dq/vl detected), and v16 for this value width.
                    self.warm_tail_wide(q, blk, fmt, n, a, sc);
                } else {
                    self.warm_values_simd(q, blk, fmt, n, a, sc);
                }
            }
            return;
        }
        for t in 0..n {
            let off = l.k_codes + t * kr;
            unpack_lanes::<FMA>(&blk[off..off + kr], l.k_bits, &mut sc.row);
            for h in 0..self.g {
                sc.scores[h * ps + t] = sc.qm[h] + dot::<FMA>(&sc.qs[h * d..(h + 1) * d], &sc.row);
            }
        }
        self.outlier_scores(q, blk, l, n, sc);
        self.softmax_update::<FMA>(n, a, sc);
        for t in 0..n {
            let off = l.v_codes + t * vr;
            unpack_lanes::<FMA>(&blk[off..off + vr], l.v_bits, &mut sc.row);
            for h in 0..self.g {
                let e = sc.e[h * ps + t];
                for gi in 0..groups {
                    let w = e * sc.vstep[gi * ps + t];
                    let at = h * d + gi * vg;
                    axpy::<FMA>(
                        &mut a.acc_w[vi][at..at + vg],
                        w,
                        &sc.row[gi * vg..(gi + 1) * vg],
                    );
                }
            }
        }
        self.value_mins(n, a, sc);
    }

    /// Adds the exact key outlier channels' part of each score (their codes contribute 0).
    /// A stored channel index beyond `head_dim` (a corrupt page) is skipped: `import_page` refuses
    /// such pages, so it cannot occur for pages this cache holds.
    #[inline(always)]
    fn outlier_scores(&self, q: &[f32], blk: &[u8], l: &WarmLayout, n: usize, sc: &mut Scratch) {
        let no = l.outliers;
        if no == 0 {
            return;
        }
        let (d, ps) = (self.geo.head_dim, self.geo.page_size);
        for i in 0..no {
            let at = l.out_idx + 2 * i;
            let c = u16::from_le_bytes([blk[at], blk[at + 1]]) as usize;
            if c >= d {
                continue;
            }
            for t in 0..n {
                let at = l.out_val + 2 * (t * no + i);
                let k = half::f16::from_bits(u16::from_le_bytes([blk[at], blk[at + 1]])).to_f32();
                for h in 0..self.g {
                    sc.scores[h * ps + t] += q[h * d + c] * k;
                }
            }
        }
    }

    /// `acc_b[h][g] += Σ_t e[h][t] · min[g][t]`.
    #[inline(always)]
    fn value_mins(&self, n: usize, a: &mut Acc, sc: &Scratch) {
        let (ps, groups) = (self.geo.page_size, self.groups);
        for h in 0..self.g {
            let e = &sc.e[h * ps..h * ps + n];
            for gi in 0..groups {
                let m = &sc.vmin[gi * ps..gi * ps + n];
                a.acc_b[h * groups + gi] += dot_any(e, m);
            }
        }
    }

    /// The AVX2 score loop of [`Self::warm_block`] (f32, lane order) after the per-page setup.
    ///
    /// # Safety
    /// avx2, fma and f16c must be available; `blk` is a whole head block of this storage's layout.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn warm_scores_avx2(&self, blk: &[u8], fmt: WarmFormat, n: usize, sc: &mut Scratch) {
        use super::avx2::{scores, scores3, ScoreArgs};
        let (d, ps) = (self.geo.head_dim, self.geo.page_size);
        let l = self.s.layout(fmt);
        assert!(blk.len() >= l.head_bytes && n <= ps);
        let kr = l.k_row_bytes();
        let mut hb = 0;
        while hb < self.g {
            let h = (self.g - hb).min(4);
            let args = ScoreArgs {
                qs: sc.qs.as_ptr().add(hb * d),
                qm: sc.qm.as_ptr().add(hb),
                codes: blk.as_ptr().add(l.k_codes),
                row_bytes: kr,
                d,
                n,
                out: sc.scores.as_mut_ptr().add(hb * ps),
                ps,
            };
            // SAFETY: heads hb..hb+h exist in qs/qm/scores; n rows of kr bytes follow k_codes.
            match (h, l.k_bits.bits()) {
                (4, 3) => scores3::<4>(&args),
                (3, 3) => scores3::<3>(&args),
                (2, 3) => scores3::<2>(&args),
                (1, 3) => scores3::<1>(&args),
                (4, 4) => scores::<4, 4>(&args),
                (3, 4) => scores::<3, 4>(&args),
                (2, 4) => scores::<2, 4>(&args),
                (1, 4) => scores::<1, 4>(&args),
                (4, 2) => scores::<4, 2>(&args),
                (3, 2) => scores::<3, 2>(&args),
                (2, 2) => scores::<2, 2>(&args),
                (1, 2) => scores::<1, 2>(&args),
                (4, _) => scores::<4, 8>(&args),
                (3, _) => scores::<3, 8>(&args),
                (2, _) => scores::<2, 8>(&args),
                _ => scores::<1, 8>(&args),
            }
            hb += h;
        }
    }

    /// The rest of a warm page once its scores are in `sc.scores`: outlier channels, softmax, and
    /// the AVX2 value loop (the AVX-512 path has its own tail, `warm_tail_wide`).
    ///
    /// # Safety
    /// avx2, fma and f16c must be available; `blk` is a whole head block of this storage's
    /// layout, and `sc.vmin` / `sc.vstep` hold its value parameters.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn warm_values_simd(
        &self,
        q: &[f32],
        blk: &[u8],
        fmt: WarmFormat,
        n: usize,
        a: &mut Acc,
        sc: &mut Scratch,
    ) {
        use super::avx2::{values, values3, ValueArgs};
        let (d, ps, groups) = (self.geo.head_dim, self.geo.page_size, self.groups);
        let l = self.s.layout(fmt);
        let vi = bits_index(fmt.v_bits);
        assert!(blk.len() >= l.head_bytes && n <= ps);
        let vr = l.v_row_bytes();
        self.outlier_scores(q, blk, l, n, sc);
        self.softmax_update::<true>(n, a, sc);
        // w[h][g][t] = e · step, the per-token, per-group weight of the codes.
        sc.w.resize(self.g * ps * groups, 0.0);
        for h in 0..self.g {
            let e = &sc.e[h * ps..h * ps + n];
            for gi in 0..groups {
                let w = &mut sc.w[(h * groups + gi) * ps..(h * groups + gi) * ps + n];
                for ((o, &x), &st) in w.iter_mut().zip(e).zip(&sc.vstep[gi * ps..]) {
                    *o = x * st;
                }
            }
        }
        sc.pf.pump(sc.pf.quarter());
        let vb = l.v_bits.bits();
        let block = if vb <= 3 { 2 } else { 4 };
        let mut hb = 0;
        while hb < self.g {
            let h = (self.g - hb).min(block);
            let args = ValueArgs {
                w: sc.w.as_ptr().add(hb * ps * groups),
                ps,
                groups,
                vg: l.value_group,
                codes: blk.as_ptr().add(l.v_codes),
                row_bytes: vr,
                n,
                acc: a.acc_w[vi].as_mut_ptr().add(hb * d),
                d,
            };
            // SAFETY: heads hb..hb+h exist in w and acc_w; n rows of vr bytes follow v_codes.
            match (h, vb) {
                (2, 3) => values3::<2>(&args),
                (1, 3) => values3::<1>(&args),
                (4, 4) => values::<4, 4, 2>(&args),
                (3, 4) => values::<3, 4, 2>(&args),
                (2, 4) => values::<2, 4, 2>(&args),
                (1, 4) => values::<1, 4, 2>(&args),
                (2, 2) => values::<2, 2, 4>(&args),
                (1, 2) => values::<1, 2, 4>(&args),
                (4, _) => values::<4, 8, 1>(&args),
                (3, _) => values::<3, 8, 1>(&args),
                (2, _) => values::<2, 8, 1>(&args),
                _ => values::<1, 8, 1>(&args),
            }
            hb += h;
        }
        self.value_mins(n, a, sc);
    }

    /// Attends `pages` (hot and warm only) for kv head `kv` with the group's queries `q`.
    #[inline(always)]
    fn pages<const FMA: bool, const WIDE: bool>(
        &self,
        kv: usize,
        q: &[f32],
        pages: &[PageEntry],
        a: &mut Acc,
        sc: &mut Scratch,
    ) -> Result<()> {
        let d = self.geo.head_dim;
        // The permuted queries belong to `q`: a reused scratch must not keep another item's.
        for l in sc.q_lanes.iter_mut().chain(sc.q_int.iter_mut()) {
            l.clear();
        }
        let ps = self.geo.page_size;
        for (i, p) in pages.iter().enumerate() {
            let n = p.n_tokens as usize;
            // Pages are separate allocations, so the hardware prefetcher cannot run ahead across
            // them: ask for the next warm page's head block while this one is computed.
            if let Some(next) = pages.get(i + 1).filter(|x| x.tier == Tier::Warm) {
                if let Ok(b) = self.s.warm_page(next.slot) {
                    let hb = self.s.layout(next.format).head_bytes;
                    if let Some(blk) = b.get(kv * hb..(kv + 1) * hb) {
                        sc.pf = Prefetch::of(blk);
                        sc.pf.pump(sc.pf.quarter());
                    }
                }
            }
            match p.tier {
                Tier::Hot => {
                    let page = self.s.hot_page(p.slot)?;
                    let at = kv * ps * d;
                    let (mut hk, mut hv) =
                        (std::mem::take(&mut sc.hot_k), std::mem::take(&mut sc.hot_v));
                    let k = page.k.read(at, n * d, &mut hk);
                    let v = page.v.read(at, n * d, &mut hv);
                    self.exact_block::<FMA>(q, k, v, d, n, a, sc);
                    sc.hot_k = hk;
                    sc.hot_v = hv;
                }
                Tier::Warm => {
                    let b = self.s.warm_page(p.slot)?;
                    let hb = self.s.layout(p.format).head_bytes;
                    let blk = b
                        .get(kv * hb..(kv + 1) * hb)
                        .ok_or_else(|| internal("warm page shorter than its format".into()))?;
                    self.warm_block::<FMA, WIDE>(q, blk, p.format, n, a, sc);
                }
                t => {
                    return Err(internal(format!(
                        "a kernel was handed a page in tier {t:?} (the cache must not select it)"
                    )))
                }
            }
            // Whatever the page's phases did not issue.
            sc.pf.pump(usize::MAX);
        }
        Ok(())
    }

    /// Folds the warm accumulators into the standard-order accumulator.
    fn finish(&self, a: &mut Acc) {
        let d = self.geo.head_dim;
        let vg = self.s.layouts[0][0].value_group;
        for h in 0..self.g {
            for (w, &bits) in a.acc_w.iter().zip(&ALL_BITS) {
                if w.is_empty() {
                    continue;
                }
                for (p, &c) in self.value_order(bits).iter().enumerate() {
                    a.acc[h * d + c] += w[h * d + p];
                }
            }
            for c in 0..d {
                a.acc[h * d + c] += a.acc_b[h * self.groups + c / vg];
            }
        }
    }
}

/// The portable softmax block (see `avx2::softmax_block`, which computes the same operations):
/// 8 lanes at a time so the exponentials vectorise; the tail is padded with -inf scores, whose
/// weight is exactly 0.
#[inline(always)]
fn softmax_lanes(s: &[f32], m: f32, e: &mut [f32]) -> (f32, f32, f32) {
    let (mut l, mut s1, mut s2) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    // 8 lanes at a time so the exponentials vectorise; the tail is padded with -inf
    // scores, whose weight is exactly 0.
    for (ec, sc8) in e.chunks_mut(8).zip(s.chunks(8)) {
        let mut x = [f32::NEG_INFINITY; 8];
        x[..sc8.len()].copy_from_slice(sc8);
        let mut w = [0f32; 8];
        for j in 0..8 {
            let xj = (x[j] - m).max(-87.0);
            w[j] = if x[j] == f32::NEG_INFINITY {
                0.0
            } else {
                exp_nonpos(xj)
            };
            l[j] += w[j];
            s1[j] += w[j] * xj;
            s2[j] += w[j] * xj * xj;
        }
        ec.copy_from_slice(&w[..ec.len()]);
    }
    (sum(&l), sum(&s1), sum(&s2))
}

/// `max x` (`-inf` when empty), in 8 lanes so it vectorises.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let tail = c
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for v in c {
        for i in 0..8 {
            m[i] = m[i].max(v[i]);
        }
    }
    m.iter().copied().fold(tail, f32::max)
}

/// `Σ a[i] · b[i]` for any length, in 8 lanes (so it vectorises) plus a scalar tail.
#[inline(always)]
fn dot_any(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    sum(&acc) + tail
}

/// `out[g][t] = src[t][g]` for `src` of `[n][groups]` (n <= ps) into `out` of `[groups][ps]`.
#[inline(always)]
fn transpose_into(src: &[f32], groups: usize, ps: usize, out: &mut [f32]) {
    for (t, row) in src.chunks_exact(groups).enumerate() {
        for (g, &x) in row.iter().enumerate() {
            out[g * ps + t] = x;
        }
    }
}

/// One decode work item: pages `first..first + n` of the (sequence, kv head)'s page list (its
/// selection, or all its pages).
#[derive(Clone, Copy)]
struct Item {
    seq: usize,
    kv: usize,
    first: usize,
    n: usize,
}

struct Partial {
    st: Vec<OnlineSoftmax>,
    acc: Vec<f32>,
    /// `(m_p, l_p)` per page of the item, per head of the group.
    page_stats: Vec<(f32, f32)>,
}

/// Page index `j` of the list of (sequence `seq`, kv head `kv`).
#[inline(always)]
fn page_index(sel: Option<&PageSelection>, seq: usize, kv: usize, j: usize) -> usize {
    match sel {
        Some(s) => s.pages(seq, kv)[j] as usize,
        None => j,
    }
}

#[inline(always)]
fn decode_item_generic<const FMA: bool, const WIDE: bool>(
    k: &Kernel,
    input: &AttendInput,
    q: &[f32],
    it: &Item,
    sc: &mut Scratch,
) -> Result<Partial> {
    let (d, g) = (k.geo.head_dim, k.g);
    let q0 = (it.seq * k.geo.q_heads + it.kv * g) * d;
    let qg = &q[q0..q0 + g * d];
    let mut a = k.acc(k.record_pages);
    let all = input.tables[it.seq].pages();
    sc.entries.clear();
    for j in it.first..it.first + it.n {
        sc.entries
            .push(all[page_index(input.selection, it.seq, it.kv, j)]);
    }
    let entries = std::mem::take(&mut sc.entries);
    let r = k.pages::<FMA, WIDE>(it.kv, qg, &entries, &mut a, sc);
    sc.entries = entries;
    r?;
    k.finish(&mut a);
    Ok(Partial {
        st: a.st,
        acc: a.acc,
        page_stats: a.page_stats.unwrap_or_default(),
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY (for callers): only call after run-time detection of avx2, fma and f16c.
unsafe fn decode_item_avx2(
    k: &Kernel,
    input: &AttendInput,
    q: &[f32],
    it: &Item,
    sc: &mut Scratch,
) -> Result<Partial> {
    decode_item_generic::<true, false>(k, input, q, it, sc)
}

/// The AVX-512 path: the generic code is compiled for AVX2 (with AVX-512 enabled, LLVM turns
/// strided loops into gathers and scatters, which made hot pages 3x slower on Zen 4); `WIDE` calls
/// the explicit AVX-512 loops, each its own `target_feature` function.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY (for callers): only call after run-time detection of avx512f/bw/vl/vnni, avx2, fma, f16c.
unsafe fn decode_item_avx512(
    k: &Kernel,
    input: &AttendInput,
    q: &[f32],
    it: &Item,
    sc: &mut Scratch,
) -> Result<Partial> {
    decode_item_generic::<true, true>(k, input, q, it, sc)
}

fn decode_item(
    k: &Kernel,
    input: &AttendInput,
    q: &[f32],
    it: &Item,
    sc: &mut Scratch,
) -> Result<Partial> {
    #[cfg(target_arch = "x86_64")]
    match k.s.kernel() {
        // SAFETY: a storage's path is resolved (CpuKernel::resolve) only to paths whose features
        // this CPU was detected to have.
        CpuKernel::Avx512 => return unsafe { decode_item_avx512(k, input, q, it, sc) },
        // SAFETY: as above.
        CpuKernel::Avx2 => return unsafe { decode_item_avx2(k, input, q, it, sc) },
        _ => {}
    }
    decode_item_generic::<false, false>(k, input, q, it, sc)
}

/// Decode attention over `input`, with the per-page results `what` asks for.
pub(super) fn attend(
    s: &CpuStorage,
    scratch: &mut CpuScratch,
    input: &AttendInput,
    what: crate::backend::PageResults,
) -> Result<Attention> {
    let pages = what.masses();
    let geo = s.geo;
    let (d, qh, kvh) = (geo.head_dim, geo.q_heads, geo.kv_heads);
    let tables = input.tables;
    let want = tables.len() * qh * d;
    if input.queries.len() != want {
        return Err(Error::shape("queries", want, input.queries.len()));
    }
    let n_pages: Vec<usize> = tables.iter().map(|t| t.pages().len()).collect();
    if let Some(sel) = input.selection {
        sel.validate(&n_pages, kvh)?;
    }
    scratch.q.clear();
    scratch
        .q
        .extend(input.queries.iter().map(|x| x * geo.scale));
    let k = Kernel {
        record_pages: pages,
        ..Kernel::new(s)
    };
    scratch.items.clear();
    for (si, &np) in n_pages.iter().enumerate() {
        for kv in 0..kvh {
            let len = input.selection.map_or(np, |sel| sel.pages(si, kv).len());
            let mut first = 0;
            while first < len {
                let n = ITEM_PAGES.min(len - first);
                scratch.items.push(Item {
                    seq: si,
                    kv,
                    first,
                    n,
                });
                first += n;
            }
        }
    }
    let (q, items) = (&scratch.q, &scratch.items);
    // One scratch per rayon job (not per item): its buffers are sized once and reused.
    let partials: Vec<Partial> = items
        .par_iter()
        .map_init(|| k.scratch(), |sc, it| decode_item(&k, input, q, it, sc))
        .collect::<Result<_>>()?;

    // Combine, in item order: items of one (seq, kv) are consecutive and ordered by page.
    let g = k.g;
    let mut att = Attention::empty(&n_pages, qh, kvh, d);
    let mut i = 0;
    for si in 0..tables.len() {
        for kv in 0..kvh {
            let mut st = vec![OnlineSoftmax::default(); g];
            let mut acc = vec![0f32; g * d];
            let start = i;
            while i < items.len() && items[i].seq == si && items[i].kv == kv {
                let p = &partials[i];
                for h in 0..g {
                    let (a, b) = st[h].merge(&p.st[h]);
                    for c in 0..d {
                        acc[h * d + c] = a * acc[h * d + c] + b * p.acc[h * d + c];
                    }
                }
                i += 1;
            }
            for h in 0..g {
                let head = si * qh + kv * g + h;
                att.heads[head] = st[h].stats();
                let l = st[h].l;
                if l > 0.0 {
                    for c in 0..d {
                        att.output[head * d + c] = acc[h * d + c] / l;
                    }
                }
            }
            if !pages {
                continue;
            }
            for (it, p) in items[start..i].iter().zip(&partials[start..i]) {
                for j in 0..it.n {
                    let page = page_index(input.selection, si, kv, it.first + j);
                    for h in 0..g {
                        let (mp, lp) = p.page_stats[j * g + h];
                        if lp > 0.0 {
                            att.page_lse[si][page * qh + kv * g + h] = mp + lp.ln();
                        }
                    }
                }
            }
        }
    }
    if pages {
        att.finish_masses();
    }
    att.keep_page_results(what);
    Ok(att)
}

#[inline(always)]
fn prefill_item_generic<const FMA: bool, const WIDE: bool>(
    k: &Kernel,
    table: &PageTable,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    tok: usize,
    kv: usize,
) -> Result<Vec<f32>> {
    let (d, g, kvh, ps) = (k.geo.head_dim, k.g, k.geo.kv_heads, k.geo.page_size);
    let q0 = (tok * k.geo.q_heads + kv * g) * d;
    let qg = &q[q0..q0 + g * d];
    let mut a = k.acc(false);
    let mut sc = k.scratch();
    k.pages::<FMA, WIDE>(kv, qg, table.pages(), &mut a, &mut sc)?;
    let stride = kvh * d;
    let mut b0 = 0;
    while b0 <= tok {
        let n = ps.min(tok + 1 - b0);
        let at = (b0 * kvh + kv) * d;
        k.exact_block::<FMA>(qg, &keys[at..], &values[at..], stride, n, &mut a, &mut sc);
        b0 += n;
    }
    k.finish(&mut a);
    for h in 0..g {
        let l = a.st[h].l;
        for c in 0..d {
            a.acc[h * d + c] /= l;
        }
    }
    Ok(a.acc)
}

/// One prefill item (query token `tok`, kv head `kv`) on the storage's kernel path.
#[allow(clippy::too_many_arguments)] // the item's operands, as prefill_item_generic's
fn prefill_item(
    k: &Kernel,
    table: &PageTable,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    tok: usize,
    kv: usize,
) -> Result<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma,f16c")]
        // SAFETY (for callers): only after run-time detection of avx2, fma and f16c.
        unsafe fn avx2(
            k: &Kernel,
            t: &PageTable,
            q: &[f32],
            ks: &[f32],
            vs: &[f32],
            tok: usize,
            kv: usize,
        ) -> Result<Vec<f32>> {
            prefill_item_generic::<true, false>(k, t, q, ks, vs, tok, kv)
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        // SAFETY (for callers): only after run-time detection of avx512f/bw/vl/vnni, avx2, fma
        // and f16c (generic code compiled for AVX2, as decode_item_avx512).
        unsafe fn avx512(
            k: &Kernel,
            t: &PageTable,
            q: &[f32],
            ks: &[f32],
            vs: &[f32],
            tok: usize,
            kv: usize,
        ) -> Result<Vec<f32>> {
            prefill_item_generic::<true, true>(k, t, q, ks, vs, tok, kv)
        }
        match k.s.kernel() {
            // SAFETY: a storage's path is resolved only to paths this CPU was detected to run.
            CpuKernel::Avx512 => return unsafe { avx512(k, table, q, keys, values, tok, kv) },
            // SAFETY: as above.
            CpuKernel::Avx2 => return unsafe { avx2(k, table, q, keys, values, tok, kv) },
            _ => {}
        }
    }
    prefill_item_generic::<false, false>(k, table, q, keys, values, tok, kv)
}

pub(super) fn prefill(
    s: &CpuStorage,
    table: &PageTable,
    queries: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
) -> Result<Vec<f32>> {
    let geo = s.geo;
    let (d, qh, kvh) = (geo.head_dim, geo.q_heads, geo.kv_heads);
    if queries.len() != n * qh * d {
        return Err(Error::shape("queries", n * qh * d, queries.len()));
    }
    if keys.len() != n * kvh * d || values.len() != n * kvh * d {
        return Err(Error::shape(
            "keys/values",
            n * kvh * d,
            keys.len().max(values.len()),
        ));
    }
    let q: Vec<f32> = queries.iter().map(|x| x * geo.scale).collect();
    let k = Kernel::new(s);
    let parts: Vec<Vec<f32>> = (0..n * kvh)
        .into_par_iter()
        .map(|i| prefill_item(&k, table, &q, keys, values, i / kvh, i % kvh))
        .collect::<Result<_>>()?;
    // Items are (token, kv head) in order, each `[group][head_dim]`: concatenation is `[n][q_heads][d]`.
    Ok(parts.concat())
}
