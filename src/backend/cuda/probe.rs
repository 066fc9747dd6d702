//! Benchmark probes of a [`CudaStorage`] (`#[doc(hidden)]`: for `kvtier-gpu-bench`, not a stable
//! API).
//!
//! Owns: timing decode launches of a prepared plan with device events ([`CudaStorage::time_decode`]),
//! the read-bandwidth ceiling ([`CudaStorage::read_bandwidth_probe`]), recompiling the decode kernel
//! with other launch-shape knobs ([`CudaStorage::retune`]) and reporting the kernel's shape
//! ([`CudaStorage::decode_kernel_info`]). Must never: change a stored page or the warm layout, or be
//! needed by the cache.

use super::device::drv;
use super::kernels::KernelSpec;
use super::plan::DecodePlan;
use super::pool::DevBuf;
use super::storage::CudaStorage;
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use cudarc::driver::{result as cu, sys, LaunchConfig, PushKernelArg};

impl CudaStorage {
    /// Registers per thread and CTAs per SM of the decode kernel, and its tuning-derived shape
    /// (warps per CTA, value channels per lane, heads per CTA).
    #[doc(hidden)]
    pub fn decode_kernel_info(&self) -> (i32, u32, usize, usize, usize) {
        let s = &self.k.spec;
        (
            self.k.decode_regs,
            self.k.decode_blocks_per_sm,
            s.nwarps,
            s.cpl,
            s.gs,
        )
    }

    /// True when warm pages of this storage decode on tensor cores (see `kernels/decode_mma.cuh`),
    /// or, in a hot-only bf16 module, its hot pages (`kernels/decode_hmma.cuh`).
    #[doc(hidden)]
    pub fn decode_uses_tensor_cores(&self) -> bool {
        self.k.spec.mma || self.k.spec.hmma
    }

    /// Recompiles the decode kernel with other launch-shape knobs; pools and pages are kept
    /// (the warm layout does not depend on them). Plans built before must be rebuilt (their
    /// work split depends on the kernel's occupancy; launching one fails). For benchmarks.
    #[doc(hidden)]
    pub fn retune(&mut self, tuning: super::CudaTuning, cfg: &CacheConfig) -> Result<()> {
        let spec = KernelSpec::new(cfg, tuning, self.dev.smem_optin())?;
        let s = &self.k.spec;
        if spec.layout != s.layout
            || spec.d != s.d
            || spec.kvh != s.kvh
            || spec.qh != s.qh
            || spec.ps != s.ps
            || spec.hot != s.hot
            || spec.warm != s.warm
        {
            return Err(Error::Unsupported(
                "retune with a different geometry than the storage's",
            ));
        }
        self.k = self.dev.kernels(&spec)?;
        // Plans split for the old kernel's occupancy must be rebuilt.
        self.id = super::storage::next_id();
        Ok(())
    }

    /// Times `iters` decode launches of `plan` (queries and output in the plan's buffers) with
    /// device events, writing `flush_bytes` of scratch before each to evict L2. Returns the
    /// per-launch times in milliseconds. For benchmarks.
    #[doc(hidden)]
    pub fn time_decode(
        &self,
        plan: &DecodePlan,
        iters: usize,
        flush_bytes: usize,
    ) -> Result<Vec<f32>> {
        self.check_plan(plan)?;
        let st = self.stream().clone();
        let flush = DevBuf::alloc(&st, flush_bytes)?;
        let ctx = st.context();
        let (e0, e1) = (
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)?,
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)?,
        );
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            // SAFETY: `flush` is a live allocation of `flush.len()` bytes on `st`.
            unsafe { cu::memset_d8_async(flush.ptr(), 0, flush.len(), st.cu_stream()) }
                .map_err(drv)?;
            e0.record(&st).map_err(drv)?;
            // SAFETY: the plan's own query and output buffers (sized for it), this device's
            // stream.
            unsafe { self.launch(plan, plan.queries_ptr(), plan.output_ptr(), None, None)? };
            e1.record(&st).map_err(drv)?;
            times.push(e0.elapsed_ms(&e1).map_err(drv)?);
        }
        Ok(times)
    }

    /// Times a streaming read of `bytes` bytes of device memory (L2 flushed first) and returns
    /// the best of `iters` runs in GB/s: the read-bandwidth ceiling benchmarks compare against.
    #[doc(hidden)]
    pub fn read_bandwidth_probe(&self, bytes: usize, iters: usize) -> Result<f64> {
        let st = self.stream().clone();
        let buf = DevBuf::alloc(&st, bytes)?;
        let blocks = self.dev.inner.sms * 8;
        let sink = DevBuf::alloc(&st, blocks as usize * 512 * 4)?;
        // SAFETY: `buf` is a live allocation of `buf.len()` bytes on `st`.
        unsafe { cu::memset_d8_async(buf.ptr(), 1, buf.len(), st.cu_stream()) }.map_err(drv)?;
        let n16 = (buf.len() / 16) as u64;
        let (bp, sp) = (buf.ptr(), sink.ptr());
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let ctx = st.context();
        let (e0, e1) = (
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)?,
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv)?,
        );
        let mut best = 0f64;
        for _ in 0..iters.max(1) {
            e0.record(&st).map_err(drv)?;
            let mut b = st.launch_builder(&self.k.read_probe);
            b.arg(&bp).arg(&n16).arg(&sp);
            // SAFETY: matches `kvt_read_probe`: reads `n16` 16-byte words of `buf`, writes one
            // word per thread of the grid into `sink` (sized blocks * 512 words).
            unsafe { b.launch(cfg) }.map_err(drv)?;
            e1.record(&st).map_err(drv)?;
            let ms = e0.elapsed_ms(&e1).map_err(drv)? as f64;
            best = best.max(bytes as f64 / (ms * 1e-3) / 1e9);
        }
        Ok(best)
    }
}
