//! Decode attention on a Metal storage: the plan (work items, ranges, result buffers in the
//! caller's [`MetalScratch`]), the two dispatches, and reading the results from shared memory.
//!
//! Owns: [`MetalScratch`] (grow-only buffers, tied to the device that allocated them) and
//! `MetalStorage::attend_with`.
//! Must never: plan a cold or evicted page (they have no device bytes: they are left out, their
//! log-sum-exp `-inf`), or read a result before the run that writes it has returned.

use super::device::MetalDevice;
use super::gpu::{Dispatch, Kernel, MetalBuffer};
use super::params::{decode_tg_bytes, CombineParams, DecodeItem, DecodeParams};
use super::storage::{u32_of, MetalStorage};
use super::MetalBuffers;
use crate::attention::{Attention, HeadStats};
use crate::backend::{AttendInput, InputDtype, PageResults};
use crate::cache::Tier;
use crate::error::{Error, Result};

/// Reusable working memory of Metal decode attention (the Metal variant of
/// [`crate::backend::Scratch`]). Buffers only grow; a scratch used with another device
/// reallocates them there.
#[derive(Default)]
pub struct MetalScratch {
    device: u64,
    items: Vec<DecodeItem>,
    ranges: Vec<u32>,
    bases: Vec<u32>,
    bufs: [Option<MetalBuffer>; 7],
}

/// Indices into `MetalScratch::bufs`.
const QUERIES: usize = 0;
const ITEMS: usize = 1;
const PARTS: usize = 2;
const RANGES: usize = 3;
const OUT: usize = 4;
const HEADS: usize = 5;
const LSE: usize = 6;
// `lse_base` shares the ranges buffer, after the ranges.
impl MetalScratch {
    /// Device bytes held.
    pub fn device_bytes(&self) -> usize {
        self.bufs.iter().flatten().map(MetalBuffer::len).sum()
    }

    /// Buffer `i` with at least `bytes` bytes on `dev`.
    fn ensure(&mut self, dev: &MetalDevice, i: usize, bytes: usize) -> Result<()> {
        if self.device != dev.id() {
            self.bufs = Default::default();
            self.device = dev.id();
        }
        if self.bufs[i].as_ref().is_none_or(|b| b.len() < bytes) {
            let want = bytes.max(self.bufs[i].as_ref().map_or(0, |b| b.len() * 2));
            self.bufs[i] = Some(dev.gpu().alloc(want)?);
        }
        Ok(())
    }

    fn buf(&self, i: usize) -> Result<&MetalBuffer> {
        self.bufs[i]
            .as_ref()
            .ok_or_else(|| Error::internal("metal scratch buffer missing".to_string()))
    }

    fn buf_mut(&mut self, i: usize) -> Result<&mut MetalBuffer> {
        self.bufs[i]
            .as_mut()
            .ok_or_else(|| Error::internal("metal scratch buffer missing".to_string()))
    }
}

fn f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

impl MetalStorage {
    /// Decode attention over the planned pages: queries from `input.queries` (f32, host) or from
    /// `dev.queries` (device, in its dtype), output to the result (host) or to `dev.output`.
    pub(super) fn attend_with(
        &self,
        sc: &mut MetalScratch,
        input: &AttendInput,
        dev: Option<&MetalBuffers>,
        what: PageResults,
    ) -> Result<Attention> {
        let (qh, kvh, d, ps) = (self.qh, self.kvh, self.d, self.ps);
        let g = qh / kvh;
        let n_seqs = input.tables.len();
        let n_pages: Vec<usize> = input.tables.iter().map(|t| t.pages().len()).collect();
        if let Some(sel) = input.selection {
            sel.validate(&n_pages, kvh)?;
        }
        if dev.is_none() && input.queries.len() != n_seqs * qh * d {
            return Err(Error::shape(
                "queries",
                n_seqs * qh * d,
                input.queries.len(),
            ));
        }
        // Plan: one item per (sequence, kv head, attended page), in page order.
        sc.items.clear();
        sc.ranges.clear();
        sc.bases.clear();
        let mut base = 0usize;
        for (i, t) in input.tables.iter().enumerate() {
            sc.bases.push(u32_of("pages in the batch", base)?);
            base += t.pages().len();
            for kv in 0..kvh {
                let first = sc.items.len();
                let all: Vec<u32>;
                let pages: &[u32] = match input.selection {
                    Some(s) => s.pages(i, kv),
                    None => {
                        all = (0..t.pages().len() as u32).collect();
                        &all
                    }
                };
                for &p in pages {
                    let e = t.pages()[p as usize];
                    if e.n_tokens == 0 || !matches!(e.tier, Tier::Hot | Tier::Warm) {
                        continue;
                    }
                    let l = self.layout(e.format);
                    let warm = e.tier == Tier::Warm;
                    let live = if warm {
                        self.warm.buf.is_some()
                    } else {
                        self.hot.buf.is_some()
                    };
                    if !live || e.n_tokens as usize > ps {
                        return Err(Error::internal(format!(
                            "a {:?} page without bytes",
                            e.tier
                        )));
                    }
                    sc.items.push(DecodeItem {
                        seq: i as u32,
                        kv: kv as u32,
                        page: p,
                        tier: warm as u32,
                        slot: e.slot,
                        n: e.n_tokens,
                        k_bits: l.k_bits.bits() as u32,
                        v_bits: l.v_bits.bits() as u32,
                        k_min: l.k_min as u32,
                        k_step: l.k_step as u32,
                        v_min: l.v_min as u32,
                        v_step: l.v_step as u32,
                        k_codes: l.k_codes as u32,
                        v_codes: l.v_codes as u32,
                        head_bytes: l.head_bytes as u32,
                        pad: 0,
                    });
                }
                sc.ranges.push(u32_of("work items", first)?);
                sc.ranges
                    .push(u32_of("work items", sc.items.len() - first)?);
            }
        }
        let n_items = sc.items.len();
        let total_pages = base;
        let out_len = n_seqs * qh * d;
        let dv = &self.dev;
        sc.ensure(dv, ITEMS, n_items * std::mem::size_of::<DecodeItem>())?;
        sc.ensure(dv, PARTS, n_items * g * (4 + d) * 4)?;
        sc.ensure(dv, RANGES, (sc.ranges.len() + sc.bases.len()) * 4)?;
        sc.ensure(dv, HEADS, n_seqs * qh * 16)?;
        sc.ensure(dv, LSE, total_pages * qh * 4)?;
        if dev.is_none() {
            sc.ensure(dv, QUERIES, out_len * 4)?;
            sc.ensure(dv, OUT, out_len * 4)?;
        }
        let items = std::mem::take(&mut sc.items);
        sc.buf_mut(ITEMS)?.write(0, bytemuck::cast_slice(&items))?;
        sc.items = items;
        let nr = sc.ranges.len() * 4;
        let rb: Vec<u32> = sc.ranges.iter().chain(&sc.bases).copied().collect();
        sc.buf_mut(RANGES)?.write(0, bytemuck::cast_slice(&rb))?;
        let want_lse = what.masses();
        if want_lse {
            let neg = vec![f32::NEG_INFINITY; total_pages * qh];
            sc.buf_mut(LSE)?.write(0, bytemuck::cast_slice(&neg))?;
        }
        let q_dtype = match dev {
            None => {
                sc.buf_mut(QUERIES)?
                    .write(0, bytemuck::cast_slice(input.queries))?;
                InputDtype::F32
            }
            Some(b) => b.query_dtype,
        };
        // The caller's buffers, wrapped for this call.
        let (qbuf, obuf) = match dev {
            // SAFETY: `MetalBuffers`' contract (see its docs): live shared buffers of this device
            // with the sizes of the batch, not accessed by anyone else during the call.
            Some(b) => unsafe {
                let q = dv.gpu().wrap(b.queries)?;
                let o = dv.gpu().wrap(b.output)?;
                let qb = out_len * b.query_dtype.size();
                let fits =
                    |len: usize, off: usize, n: usize| off.checked_add(n).is_some_and(|e| e <= len);
                if !fits(q.len(), b.queries_offset, qb)
                    || !fits(o.len(), b.output_offset, out_len * 4)
                    || b.queries_offset % b.query_dtype.size() != 0
                    || b.output_offset % 4 != 0
                {
                    return Err(Error::shape(
                        "metal query / output buffers",
                        format!("{qb} / {} bytes at aligned offsets", out_len * 4),
                        format!(
                            "{} / {} bytes at offsets {} / {}",
                            q.len(),
                            o.len(),
                            b.queries_offset,
                            b.output_offset
                        ),
                    ));
                }
                (Some(q), Some(o))
            },
            None => (None, None),
        };
        let (q_off, o_off) = dev.map_or((0, 0), |b| (b.queries_offset, b.output_offset));
        let rot_q;
        let (qsrc, q_off): (&MetalBuffer, usize) = match (&qbuf, input.rotation) {
            (Some(q), None) => (q, q_off),
            (Some(q), Some(r)) => {
                // Unified memory: the host rotates the caller's queries into a buffer of ours.
                let raw = q.bytes(q_off, out_len * q_dtype.size())?;
                let mut x = to_f32(raw, q_dtype);
                crate::quant::rotate::forward_with(r.signs, r.norm, d, &mut x);
                let mut b = dv.gpu().alloc(out_len * 4)?;
                b.write(0, bytemuck::cast_slice(&x))?;
                rot_q = b;
                (&rot_q, 0)
            }
            (None, _) => (sc.buf(QUERIES)?, 0),
        };
        let q_code = if qbuf.is_some() && input.rotation.is_some() {
            0
        } else {
            match q_dtype {
                InputDtype::F32 => 0,
                InputDtype::F16 => 1,
                InputDtype::BF16 => 2,
            }
        };
        let dp = DecodeParams {
            n_items: u32_of("work items", n_items)?,
            qh: qh as u32,
            kvh: kvh as u32,
            d: d as u32,
            ps: ps as u32,
            g: g as u32,
            hot_dtype: super::storage::dtype_code(self.hot_dtype),
            q_dtype: q_code,
            hot_page_bytes: u32_of("hot page bytes", self.hot.slot_bytes)?,
            warm_page_bytes: u32_of("warm page bytes", self.warm.slot_bytes)?,
            value_group: self.value_group as u32,
            pad0: 0,
            scale: self.scale,
            pad1: [0.0; 3],
        };
        let cp = CombineParams {
            n_seqs: u32_of("sequences", n_seqs)?,
            qh: qh as u32,
            kvh: kvh as u32,
            g: g as u32,
            d: d as u32,
            want_lse: want_lse as u32,
            pad: [0; 2],
        };
        // A pool that has never held a page still needs a binding.
        let spare;
        let (hot, warm) = match (&self.hot.buf, &self.warm.buf) {
            (Some(h), Some(w)) => (h, w),
            (h, w) => {
                spare = dv.gpu().alloc(16)?;
                (h.as_ref().unwrap_or(&spare), w.as_ref().unwrap_or(&spare))
            }
        };
        let (out, o_off) = match &obuf {
            Some(o) => (o, o_off),
            None => (sc.buf(OUT)?, 0),
        };
        let ranges = sc.buf(RANGES)?;
        dv.gpu().run(&[
            Dispatch {
                kernel: Kernel::Decode,
                groups: n_items as u32,
                threads: 128,
                tg_bytes: decode_tg_bytes(g, d, ps),
                bufs: &[
                    (hot, 0),
                    (warm, 0),
                    (qsrc, q_off),
                    (sc.buf(ITEMS)?, 0),
                    (sc.buf(PARTS)?, 0),
                ],
                params: bytemuck::bytes_of(&dp),
            },
            Dispatch {
                kernel: Kernel::Combine,
                groups: u32_of("sequences x q heads", n_seqs * qh)?,
                threads: 64,
                tg_bytes: 0,
                bufs: &[
                    (sc.buf(PARTS)?, 0),
                    (ranges, 0),
                    (sc.buf(ITEMS)?, 0),
                    (out, o_off),
                    (sc.buf(HEADS)?, 0),
                    (sc.buf(LSE)?, 0),
                    (ranges, nr),
                ],
                params: bytemuck::bytes_of(&cp),
            },
        ])?;
        // Results, straight from shared memory.
        let mut att = Attention::empty(&n_pages, qh, kvh, d);
        att.heads.clear();
        let hb = sc.buf(HEADS)?.bytes(0, n_seqs * qh * 16)?;
        let hv: Vec<f32> = f32s(hb).collect();
        att.heads.extend(hv.chunks_exact(4).map(|h| HeadStats {
            entropy: h[0],
            varentropy: h[1],
            max_score: h[2],
            log_z: h[3],
        }));
        match &obuf {
            Some(o) => {
                if let (Some(r), true) = (input.rotation, input.rotation.is_some_and(|r| r.values))
                {
                    // The output back out of the rotated basis, in the caller's buffer.
                    let mut x: Vec<f32> = f32s(o.bytes(o_off, out_len * 4)?).collect();
                    crate::quant::rotate::inverse_with(r.signs, r.norm, d, &mut x);
                    let mut o2 = o_as_mut(o)?;
                    o2.write(o_off, bytemuck::cast_slice(&x))?;
                }
                att.output = Vec::new();
            }
            None => {
                att.output.clear();
                att.output.extend(f32s(sc.buf(OUT)?.bytes(0, out_len * 4)?));
            }
        }
        if want_lse {
            let lb = sc.buf(LSE)?.bytes(0, total_pages * qh * 4)?;
            let all: Vec<f32> = f32s(lb).collect();
            for (i, n) in n_pages.iter().enumerate() {
                let at = sc.bases[i] as usize * qh;
                att.page_lse[i].copy_from_slice(&all[at..at + n * qh]);
            }
            att.finish_masses();
        }
        att.keep_page_results(what);
        Ok(att)
    }
}

/// A writable view of a wrapped caller buffer (the same bytes).
fn o_as_mut(o: &MetalBuffer) -> Result<MetalBuffer> {
    Ok(MetalBuffer {
        ptr: o.ptr,
        len: o.len,
        inner: super::gpu::BufInner::Borrowed,
    })
}

/// Elements of `dtype` as f32.
fn to_f32(b: &[u8], dtype: InputDtype) -> Vec<f32> {
    match dtype {
        InputDtype::F32 => f32s(b).collect(),
        InputDtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        InputDtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}
