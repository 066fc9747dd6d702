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
use super::pool::PinnedBuf;
use super::storage::CudaStorage;
use crate::attention::{Attention, HeadStats};
use crate::backend::{InputDtype, PageResults};
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
        let items = plan.upload.ptr();
        let pages = items + plan.up_pages as u64;
        let (hot, warm) = (self.hot.base(), self.warm.base());
        let (ps, pa, pl) = (
            plan.part_state.ptr(),
            plan.part_acc.ptr(),
            plan.res_ptr(plan.res_lse),
        );
        let (cnt, stats) = (plan.counters.ptr(), plan.res_ptr(0));
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

    /// Per (page, kv head) masses of the last launch of `plan` into its results buffer, on
    /// `stream` (after the launch): `mass.cu`. [`CudaStorage::collect`] with page masses reads
    /// them.
    pub(super) fn fold_masses(&self, plan: &DecodePlan, stream: sys::CUstream) -> Result<()> {
        let (entries, total) = (plan.entries, plan.total_pages());
        if entries == 0 || plan.n_items == 0 {
            return Ok(());
        }
        let mass = plan.res_ptr(plan.res_mass);
        if plan.per_head {
            // Unselected (page, kv head) pairs keep mass 0.
            // SAFETY: the mass region holds `total * kv_heads` f32 (sized by `upload`), ordered
            // on `stream`.
            unsafe { cu::memset_d8_async(mass, 0, total * self.kvh * 4, stream) }.map_err(drv)?;
        }
        // SAFETY: a borrowed wrapper of a live stream of this context (the caller's contract).
        let s = unsafe { self.stream().context().wrap_borrowed_stream(stream) };
        let threads = if plan.per_head {
            entries
        } else {
            entries * self.kvh
        };
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(256).min(4096) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lse, stats) = (plan.res_ptr(plan.res_lse), plan.res_ptr(0));
        let emap = plan.upload.ptr() + plan.up_emap as u64;
        let (n, stride, per_head) = (entries as u32, plan.lse_stride, u32::from(plan.per_head));
        let mut b = s.launch_builder(&self.k.page_mass);
        b.arg(&lse)
            .arg(&stats)
            .arg(&emap)
            .arg(&mass)
            .arg(&n)
            .arg(&stride)
            .arg(&per_head);
        // SAFETY: matches `kvt_page_mass`: the lse and statistics regions were written by the
        // decode launch before it on `stream`; the entry map holds `entries` pairs (uploaded by
        // `upload`) whose page indices are below the batch's page count, so every write lands in
        // the mass region (`total * kv_heads` f32).
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Reads statistics, (with `want_output`) the plan's own output and the per-page results
    /// `what` asks for (masses folded by [`CudaStorage::fold_masses`] first) after the last launch
    /// of `plan`, ordered on `stream`, which is synchronised. Prefill and callers that asked for no
    /// page results get empty per-page vectors; the lse (`n_seqs * n_pages * q_heads` floats) is
    /// copied only for [`PageResults::All`]. Everything comes back through the plan's page-locked
    /// buffer in one copy (two with both the output and the pages).
    pub(super) fn collect(
        &self,
        plan: &mut DecodePlan,
        stream: sys::CUstream,
        want_output: bool,
        what: PageResults,
    ) -> Result<Attention> {
        // The page-locked buffer is taken out of the plan while it is filled and read (the plan
        // itself is read alongside), and put back whatever happens.
        let mut pinned = std::mem::take(&mut plan.host_res);
        let r = self.read_results(plan, &mut pinned, stream, want_output, what);
        if r.is_err() {
            // A copy may still be in flight into `pinned`: let it land before the buffer is reused.
            // SAFETY: `stream` is live (the caller's contract).
            let _ = unsafe { cu::stream::synchronize(stream) };
        }
        plan.host_res = pinned;
        r
    }

    /// The copies and the host side of [`CudaStorage::collect`].
    fn read_results(
        &self,
        plan: &DecodePlan,
        pinned: &mut PinnedBuf,
        stream: sys::CUstream,
        want_output: bool,
        what: PageResults,
    ) -> Result<Attention> {
        let (n, qh, d, kvh) = (plan.n_seqs, self.qh, self.d, self.kvh);
        let g = self.k.spec.gfull;
        // Copy ranges of the results buffer (in f32): the prefix up to the end of what is wanted
        // (statistics; then masses; then the lse) and the output.
        let head = match what {
            PageResults::All => plan.res_out,
            PageResults::Masses => plan.res_lse,
            PageResults::None => plan.res_mass,
        };
        let out_len = if want_output {
            plan.res_len - plan.res_out
        } else {
            0
        };
        let host = pinned.ensure_f32(self.stream().context(), head + out_len)?;
        if plan.n_items > 0 {
            // SAFETY: the results buffer holds `res_len` f32 (sized by `upload` for this plan) and
            // the host buffer `head + out_len`; the copies are ordered after the launch on
            // `stream`, which is synchronised before the host buffer is read.
            unsafe {
                if head > 0 {
                    cu::memcpy_dtoh_async(&mut host[..head], plan.res_ptr(0), stream)
                        .map_err(drv)?;
                }
                if out_len > 0 {
                    cu::memcpy_dtoh_async(
                        &mut host[head..head + out_len],
                        plan.res_ptr(plan.res_out),
                        stream,
                    )
                    .map_err(drv)?;
                }
                cu::stream::synchronize(stream).map_err(drv)?;
            }
        } else {
            // No items: an empty batch (every sequence has at least one item), nothing to read.
            host.fill(0.0);
        }
        let heads: Vec<HeadStats> = host[..n * qh * 4]
            .chunks_exact(4)
            .map(|s| HeadStats {
                entropy: s[0],
                varentropy: s[1],
                max_score: s[2],
                log_z: s[3],
            })
            .collect();
        let mut att = Attention {
            output: host[head..head + out_len].to_vec(),
            heads,
            page_mass: Vec::new(),
            kv_mass: Vec::new(),
            page_lse: Vec::new(),
            num_q_heads: qh,
            num_kv_heads: kvh,
            head_dim: d,
            disk: Default::default(),
        };
        if !what.masses() {
            return Ok(att);
        }
        let mass = &host[plan.res_mass..plan.res_lse];
        let mut first = 0;
        for &np in &plan.page_counts {
            att.kv_mass
                .push(mass[first * kvh..(first + np) * kvh].to_vec());
            first += np;
        }
        att.masses_from_kv();
        if !what.lse() {
            return Ok(att);
        }
        let lse = &host[plan.res_lse..plan.res_out];
        for (si, &np) in plan.page_counts.iter().enumerate() {
            let mut dst = vec![f32::NEG_INFINITY; np * qh];
            if plan.per_head {
                // Rows [entry][gfull]: kv head `kv`'s heads of the entry's page.
                for kv in 0..kvh {
                    let (off, len) = plan.list(si, kv, kvh);
                    for e in off..off + len {
                        let at = plan.sel_pages[e] as usize * qh + kv * g;
                        dst[at..at + g].copy_from_slice(&lse[e * g..(e + 1) * g]);
                    }
                }
            } else {
                // Rows [entry][q_heads], the sequence's pages in order.
                let (off, len) = plan.list(si, 0, kvh);
                dst.copy_from_slice(&lse[off * qh..(off + len) * qh]);
            }
            att.page_lse.push(dst);
        }
        Ok(att)
    }

    /// Decode over `plan` with host queries; uses the plan's own query and output buffers.
    pub fn attend_plan(&self, plan: &mut DecodePlan, queries: &[f32]) -> Result<Attention> {
        self.attend_plan_with(plan, queries, PageResults::All)
    }

    /// [`CudaStorage::attend_plan`] with the per-page results `what` asks for (see
    /// [`CudaStorage::collect`]).
    pub(super) fn attend_plan_with(
        &self,
        plan: &mut DecodePlan,
        queries: &[f32],
        what: PageResults,
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
        unsafe { self.launch(plan, plan.queries.ptr(), plan.output_ptr(), None, None)? };
        if what.masses() {
            self.fold_masses(plan, st.cu_stream())?;
        }
        self.collect(plan, st.cu_stream(), true, what)
    }
}
