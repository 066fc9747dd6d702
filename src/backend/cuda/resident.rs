//! Attention with queries and output in device memory (`attend_device`), waited for or not.
//!
//! Owns: checking the caller's [`CudaBuffers`], queuing one decode step on the caller's stream
//! (plan upload on this storage's stream, the caller's stream ordered after it with the plan's
//! event, query conversion, the fused decode, and the page-mass fold when page results are wanted)
//! and, for the asynchronous call, ordering this storage's stream after the step (so later page
//! writes, demotions, frees and pool growth cannot overtake the kernel that reads them) and reading
//! the result later ([`CudaStorage::finish_pending`]). Must never: block the host in the
//! asynchronous call (the only wait is for the plan's previous upload from page-locked memory), or
//! read a pending result from a plan another storage built.

use super::device::drv;
use super::launch::FusedRotation;
use super::storage::{CudaScratch, CudaStorage};
use super::CudaBuffers;
use crate::attention::Attention;
use crate::backend::{AttendInput, DeviceBuffers, PageResults};
use crate::error::{Error, Result};
use cudarc::driver::{result as cu, sys};

impl CudaStorage {
    /// Queues one decode step with device queries and output on the buffers' stream (see the
    /// module docs); returns that stream.
    pub(super) fn enqueue_device(
        &self,
        s: &mut CudaScratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
        what: PageResults,
    ) -> Result<sys::CUstream> {
        let b: CudaBuffers = match bufs {
            DeviceBuffers::Cuda(b) => *b,
            _ => {
                return Err(Error::Unsupported(
                    "attend_device on a CUDA storage takes CUDA device buffers",
                ))
            }
        };
        let es = b.query_dtype.size() as u64;
        if b.queries == 0
            || b.output == 0
            || !b.queries.is_multiple_of(es)
            || !b.output.is_multiple_of(4)
        {
            return Err(Error::shape(
                "device buffers",
                format!("non-null queries aligned to {es} bytes and output aligned to 4"),
                format!("queries {:#x}, output {:#x}", b.queries, b.output),
            ));
        }
        // A new step replaces whatever was pending on this scratch.
        s.pending = None;
        self.plan_into(&mut s.plan, input.tables, input.selection)?;
        if let Some(r) = input.rotation {
            self.upload_signs(&mut s.plan, r.signs)?;
        }
        let st = self.stream();
        // 0 is the legacy default stream, which a non-blocking stream does not order against.
        let user = b.stream as sys::CUstream;
        // Order the caller's stream after our pending work (page writes, demotions, the plan and
        // the signs): the plan's event, recorded again now.
        let ev = s
            .plan
            .ev
            .as_ref()
            .ok_or_else(|| Error::internal("a built plan without its event"))?;
        ev.record(st).map_err(drv)?;
        // SAFETY: `user` is the caller's live stream (or the legacy default stream) and `ev` is a
        // live event of the same context; waiting adds only a dependency.
        unsafe {
            cu::stream::wait_event(
                user,
                ev.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(drv)?;
        // SAFETY: the caller guarantees `queries` / `output` are device buffers of this context
        // holding `n_seqs * q_heads * head_dim` elements of `query_dtype` / f32, usable on
        // `user`, which is ordered after our stream above.
        // A rotated cache's queries are rotated by the decode kernel as it loads them (the
        // caller's buffer stays as it is) and, with rotated values, its output before it stores
        // it: one launch, as without rotation.
        unsafe {
            let q = self.convert_queries(&s.plan, b.queries, b.query_dtype, b.stream)?;
            let rot = input.rotation.map(|r| FusedRotation {
                norm: r.norm,
                queries: true,
                output: r.values,
            });
            self.launch(&s.plan, q, b.output, Some(b.stream), rot)?;
        }
        if what.masses() {
            self.fold_masses(&s.plan, user)?;
        }
        Ok(user)
    }

    /// [`CudaStorage::enqueue_device`], then this storage's stream is made to wait for the step
    /// (an event recorded on the caller's stream), and the step is left pending on the scratch.
    pub(super) fn enqueue_device_async(
        &self,
        s: &mut CudaScratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
        what: PageResults,
    ) -> Result<()> {
        let user = self.enqueue_device(s, input, bufs, what)?;
        let st = self.stream();
        if s.plan.done.is_none() {
            s.plan.done = Some(st.context().new_event(None).map_err(drv)?);
        }
        let done = s
            .plan
            .done
            .as_ref()
            .ok_or_else(|| Error::internal("the step event was just created"))?;
        // SAFETY: `done` is a live event of this context and `user` the caller's live stream (the
        // buffers' contract); recording and waiting only add dependencies.
        unsafe {
            cu::event::record(done.cu_event(), user).map_err(drv)?;
            cu::stream::wait_event(
                st.cu_stream(),
                done.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
            .map_err(drv)?;
        }
        s.pending = Some(what);
        Ok(())
    }

    /// Waits for the pending step of `s` and returns its statistics (and page results if it
    /// folded them); the copies run on this storage's stream, which waits for the step.
    pub(super) fn finish_pending(&self, s: &mut CudaScratch) -> Result<Attention> {
        let what = s
            .pending
            .ok_or_else(|| Error::Stale("no attend_device_async pending on this scratch".into()))?;
        if s.plan.owner != self.id {
            return Err(Error::Stale(
                "the step pending on this scratch was queued on another layer".into(),
            ));
        }
        s.pending = None;
        self.collect(&mut s.plan, self.stream().cu_stream(), false, what)
    }
}
