//! Running a decode plan: kernel launches and reading the results back.
//!
//! Owns: [`CudaStorage::launch`] (the fused split-K decode on a plan), the conversion of f16 / bf16
//! device queries into the plan's f32 query buffer, and collecting statistics and per-page
//! log-sum-exp into an [`Attention`]: device list entries mapped back to the caller's page indices,
//! `-inf` for pages not attended, page masses from [`Attention::finish_masses`] (the one shared
//! definition). Must never: launch a plan built by another storage (its slots may lie outside
//! this storage's pools), read results before the stream that wrote them is synchronised, or
//! derive page masses any other way.

use super::device::drv;
use super::plan::DecodePlan;
use super::storage::CudaStorage;
use crate::attention::{Attention, HeadStats};
use crate::backend::InputDtype;
use crate::error::{Error, Result};
use cudarc::driver::{result as cu, sys, LaunchConfig, PushKernelArg};

/// A rotation fused into a decode launch (`CudaStorage::launch`): the sign vector is the plan's
/// (`upload_signs`).
#[derive(Debug, Clone, Copy)]
pub struct FusedRotation {
    pub norm: f32,
    /// Rotate the queries into the key basis on load.
    pub queries: bool,
    /// Rotate the output back (rotated values).
    pub output: bool,
}

impl CudaStorage {
    /// Fails unless `plan` was last built (successfully) by this storage.
    pub(super) fn check_plan(&self, plan: &DecodePlan) -> Result<()> {
        if plan.owner != self.id {
            return Err(Error::Unsupported(
                "a decode plan built by another storage (or whose last build failed)",
            ));
        }
        Ok(())
    }

    /// Launches the decode kernel of `plan` on `stream` (`None`: this device's stream; `Some(0)`:
    /// the legacy default stream), reading queries `[n_seqs, q_heads, head_dim]` f32 at `queries`
    /// and writing the output, in the same shape, at `output`. Statistics and per-page lse stay in
    /// the plan until they are collected. With `rotation` the kernel rotates the queries on load
    /// and (with rotated values) the output before it stores it, with the plan's sign vector
    /// (`upload_signs` first).
    ///
    /// # Safety
    /// `queries` and `output` must be device pointers of this context to at least
    /// `n_seqs * q_heads * head_dim` f32 each, valid until the launch completes, and a
    /// `Some(stream)` must be a live stream of this context (or 0) that is ordered after this
    /// device's stream (`attend_device` arranges that with an event).
    pub unsafe fn launch(
        &self,
        plan: &DecodePlan,
        queries: u64,
        output: u64,
        stream: Option<u64>,
        rotation: Option<FusedRotation>,
    ) -> Result<()> {
        self.check_plan(plan)?;
        if plan.n_items == 0 {
            return Ok(());
        }
        let st = self.stream();
        let cu_stream = match stream {
            None => st.cu_stream(),
            Some(s) => s as sys::CUstream,
        };
        // SAFETY: a borrowed wrapper of a live stream of this context (the caller's, by the
        // contract above, or ours); dropping it does not destroy the stream.
        let s = unsafe { st.context().wrap_borrowed_stream(cu_stream) };
        let (items, pages) = (plan.items.ptr(), plan.pages.ptr());
        let (hot, warm) = (self.hot.base(), self.warm.base());
        let (ps, pa, pl) = (
            plan.part_state.ptr(),
            plan.part_acc.ptr(),
            plan.page_lse.ptr(),
        );
        let (cnt, stats) = (plan.counters.ptr(), plan.stats.ptr());
        let (lse_stride, lse_kvcol) = (plan.lse_stride, plan.lse_kvcol);
        let cfg = LaunchConfig {
            grid_dim: (plan.n_items as u32, 1, 1),
            block_dim: (self.k.spec.decode_threads(), 1, 1),
            shared_mem_bytes: self.k.decode_smem,
        };
        let mut b = s.launch_builder(&self.k.decode);
        b.arg(&items)
            .arg(&pages)
            .arg(&queries)
            .arg(&hot)
            .arg(&warm)
            .arg(&ps)
            .arg(&pa)
            .arg(&pl)
            .arg(&cnt)
            .arg(&output)
            .arg(&stats)
            .arg(&self.scale)
            .arg(&lse_stride)
            .arg(&lse_kvcol);
        let (signs, norm, flags) = match rotation {
            Some(r) => (
                plan.rot_signs.ptr(),
                r.norm,
                u32::from(r.queries) | u32::from(r.output) << 1,
            ),
            None => (0u64, 1.0f32, 0u32),
        };
        b.arg(&signs).arg(&norm).arg(&flags);
        // SAFETY: argument types and order match `kvt_decode`; the sign vector is read only with a
        // rotation, when `upload_signs` put `head_dim` f32 there; every plan pointer is a live device
        // allocation sized by `plan_pages_into` for this plan (built by this storage, checked
        // above, so every listed slot is below this storage's pool capacities), and `queries` /
        // `output` satisfy the caller's contract above.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Returns the address of f32 queries for a launch of `plan`: `src` itself for f32, else the
    /// plan's own query buffer after converting `src` into it on `stream`.
    ///
    /// # Safety
    /// `src` must be a device pointer of this context to at least `n_seqs * q_heads * head_dim`
    /// elements of `dtype`, valid until the conversion completes, and `stream` a live stream of
    /// this context (or 0) ordered after this device's stream.
    pub(super) unsafe fn convert_queries(
        &self,
        plan: &DecodePlan,
        src: u64,
        dtype: InputDtype,
        stream: u64,
    ) -> Result<u64> {
        self.check_plan(plan)?;
        let f = match dtype {
            InputDtype::F32 => return Ok(src),
            InputDtype::F16 => &self.k.queries_f16,
            InputDtype::BF16 => &self.k.queries_bf16,
        };
        let n = plan.n_seqs * self.qh * self.d;
        let dst = plan.queries.ptr();
        if n == 0 {
            return Ok(dst);
        }
        // SAFETY: a borrowed wrapper of the caller's live stream of this context (contract above).
        let s = unsafe {
            self.stream()
                .context()
                .wrap_borrowed_stream(stream as sys::CUstream)
        };
        let n64 = n as u64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(1024) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = s.launch_builder(f);
        b.arg(&src).arg(&dst).arg(&n64);
        // SAFETY: matches `kvt_queries_f16` / `kvt_queries_bf16`: reads `n` 16-bit elements at
        // `src` (caller's contract) and writes `n` f32 into the plan's query buffer, which
        // `plan_pages_into` sized for `n_seqs * q_heads * head_dim` f32.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(dst)
    }

    /// Uploads the rotation's sign vector into the plan, on this storage's stream (before the
    /// caller's stream is ordered after it).
    pub(super) fn upload_signs(&self, plan: &mut DecodePlan, signs: &[f32]) -> Result<()> {
        if signs.len() != self.d {
            return Err(Error::internal(format!(
                "rotation signs: {} for head_dim {}",
                signs.len(),
                self.d
            )));
        }
        let st = self.stream();
        let dst = plan.rot_signs.ensure(st, 4 * self.d, false)?;
        // SAFETY: `dst` holds at least `4 * d` bytes (ensured above) and `signs` is `d` f32; the
        // copy is ordered on this storage's stream.
        unsafe { cu::memcpy_htod_async(dst, signs, st.cu_stream()) }.map_err(drv)?;
        Ok(())
    }

    /// Reads statistics, (with `want_output`) the plan's own output buffer and (with `lse`, reusable
    /// host scratch) the per-page lse and masses after the last launch of `plan`, ordered on
    /// `stream`, which is synchronised. Without `lse` the result's `page_lse` and `page_mass` are
    /// empty (prefill needs neither, and they are `n_seqs * n_pages * q_heads` floats).
    pub(super) fn collect(
        &self,
        plan: &DecodePlan,
        stream: sys::CUstream,
        want_output: bool,
        lse: Option<&mut Vec<f32>>,
    ) -> Result<Attention> {
        let want_pages = lse.is_some();
        let mut none = Vec::new();
        let lse = lse.unwrap_or(&mut none);
        let (n, qh, d, kvh) = (plan.n_seqs, self.qh, self.d, self.kvh);
        let g = self.k.spec.gfull;
        let mut stats = vec![0f32; n * qh * 4];
        let mut out = vec![0f32; if want_output { n * qh * d } else { 0 }];
        let lse_len = if want_pages {
            plan.entries * plan.lse_stride as usize
        } else {
            0
        };
        lse.clear();
        lse.resize(lse_len, f32::NEG_INFINITY);
        if plan.n_items > 0 {
            // SAFETY: each plan buffer holds at least as many f32 as copied (sized by
            // `plan_pages_into` for this plan); the copies are ordered after the launch on
            // `stream`, which is synchronised before any host vector is read.
            unsafe {
                if !stats.is_empty() {
                    cu::memcpy_dtoh_async(&mut stats, plan.stats.ptr(), stream).map_err(drv)?;
                }
                if !lse.is_empty() {
                    cu::memcpy_dtoh_async(&mut lse[..], plan.page_lse.ptr(), stream)
                        .map_err(drv)?;
                }
                if !out.is_empty() {
                    cu::memcpy_dtoh_async(&mut out, plan.out.ptr(), stream).map_err(drv)?;
                }
                cu::stream::synchronize(stream).map_err(drv)?;
            }
        }
        let heads: Vec<HeadStats> = stats
            .chunks_exact(4)
            .map(|s| HeadStats {
                entropy: s[0],
                varentropy: s[1],
                max_score: s[2],
                log_z: s[3],
            })
            .collect();
        if !want_pages {
            return Ok(Attention {
                output: out,
                heads,
                page_mass: Vec::new(),
                page_lse: Vec::new(),
                num_q_heads: qh,
                num_kv_heads: kvh,
                head_dim: d,
                disk: Default::default(),
            });
        }
        let mut page_lse: Vec<Vec<f32>> = plan
            .page_counts
            .iter()
            .map(|&np| vec![f32::NEG_INFINITY; np * qh])
            .collect();
        for (si, dst) in page_lse.iter_mut().enumerate() {
            if plan.per_head {
                // Rows [entry][gfull]: kv head `kv`'s heads of the entry's page.
                for kv in 0..kvh {
                    let (off, np) = plan.list(si, kv, kvh);
                    for e in off..off + np {
                        let at = plan.sel_pages[e] as usize * qh + kv * g;
                        dst[at..at + g].copy_from_slice(&lse[e * g..(e + 1) * g]);
                    }
                }
            } else {
                // Rows [entry][q_heads], the sequence's pages in order.
                let (off, np) = plan.list(si, 0, kvh);
                dst.copy_from_slice(&lse[off * qh..(off + np) * qh]);
            }
        }
        let mut att = Attention {
            output: out,
            heads,
            page_mass: plan.page_counts.iter().map(|&np| vec![0.0; np]).collect(),
            page_lse,
            num_q_heads: qh,
            num_kv_heads: kvh,
            head_dim: d,
            disk: Default::default(),
        };
        att.finish_masses();
        Ok(att)
    }

    /// Decode over `plan` with host queries; uses the plan's own query and output buffers.
    pub fn attend_plan(&self, plan: &DecodePlan, queries: &[f32]) -> Result<Attention> {
        self.attend_plan_with(plan, queries, Some(&mut Vec::new()))
    }

    /// [`CudaStorage::attend_plan`] with reusable host scratch for the per-page lse (`None`: no
    /// per-page results, see [`CudaStorage::collect`]).
    pub(super) fn attend_plan_with(
        &self,
        plan: &DecodePlan,
        queries: &[f32],
        lse: Option<&mut Vec<f32>>,
    ) -> Result<Attention> {
        self.check_plan(plan)?;
        let want = plan.n_seqs * self.qh * self.d;
        if queries.len() != want {
            return Err(Error::shape("queries", want, queries.len()));
        }
        let st = self.stream();
        st.context().bind_to_thread().map_err(drv)?;
        if want > 0 {
            // SAFETY: `plan.queries` holds `want` f32 (sized by `plan_pages_into`); the copy from
            // pageable memory is staged before the call returns.
            unsafe { cu::memcpy_htod_async(plan.queries.ptr(), queries, st.cu_stream()) }
                .map_err(drv)?;
        }
        // SAFETY: the plan's own query and output buffers (sized for this plan), this device's
        // stream.
        unsafe { self.launch(plan, plan.queries.ptr(), plan.out.ptr(), None, None)? };
        self.collect(plan, st.cu_stream(), true, lse)
    }
}
