//! One layer's hot and warm page pools in device memory, and the calls that launch the kernels.
//!
//! Owns: [`CudaStorage`] (two slot pools, one device buffer per tier, grown by reallocating and
//! copying on the device stream), the staging buffer for appends, the decode scratch
//! ([`DecodePlan`]: device page table, work items, partials) and the host-side bookkeeping (live
//! slots, free lists, the largest |value| written to each hot slot). Must never: write a
//! dequantised page anywhere, free a slot whose bytes a queued kernel may still read without
//! stream ordering, or lose a stored page on an error (a failed grow keeps the old buffer; a
//! failed or unrepresentable demotion leaves the hot page as it was).

use super::device::{drv, drv_alloc, CudaDevice, Kernels};
use super::kernels::{KernelSpec, MAX_SPLIT};
use super::CudaError;
use crate::attention::{Attention, HeadStats};
use crate::backend::{BackendStorage, DeviceBuffers, DeviceLocation, StorageBytes};
use crate::config::{CacheConfig, HotDtype};
use crate::error::{Error, Result};
use crate::quant::{self, WarmLayout};
use crate::tiers::{PageEntry, PageTable, Tier};
use cudarc::driver::{
    result as cu, sys, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use half::{bf16, f16};
use std::sync::{Arc, Mutex};

/// Largest |x| a hot page may hold for demotion to be unable to fail (every range then fits f16
/// after rounding to any hot dtype), so the demotion needs no read-back of the kernel's flag.
const SAFE_ABS: f32 = 60_000.0;

/// A device allocation of bytes.
pub(crate) struct DevBuf {
    s: CudaSlice<u8>,
}

impl DevBuf {
    pub(crate) fn alloc(
        stream: &Arc<CudaStream>,
        bytes: usize,
    ) -> std::result::Result<Self, CudaError> {
        let bytes = bytes.max(16);
        // SAFETY: the memory is uninitialised; every user either writes before reading (pools,
        // staging, scratch) or zeroes it right after allocation (`GrowBuf::ensure` with `zero`).
        let s = unsafe { stream.alloc::<u8>(bytes) }.map_err(|e| drv_alloc(e, bytes))?;
        Ok(DevBuf { s })
    }
    pub(crate) fn ptr(&self) -> u64 {
        let (p, _sync) = self.s.device_ptr(self.s.stream());
        p
    }
    pub(crate) fn len(&self) -> usize {
        self.s.len()
    }
}

/// A scratch buffer that grows (without keeping contents) when a call needs more.
#[derive(Default)]
pub(crate) struct GrowBuf {
    b: Option<DevBuf>,
}

impl GrowBuf {
    fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        bytes: usize,
        zero: bool,
    ) -> std::result::Result<u64, CudaError> {
        if self.b.as_ref().is_none_or(|b| b.len() < bytes) {
            let nb = DevBuf::alloc(stream, bytes.max(256).next_power_of_two())?;
            if zero {
                // SAFETY: `nb` is a live allocation of `nb.len()` bytes, ordered on `stream`.
                unsafe { cu::memset_d8_async(nb.ptr(), 0, nb.len(), stream.cu_stream()) }
                    .map_err(drv)?;
            }
            self.b = Some(nb);
        }
        Ok(self.ptr())
    }
    fn ptr(&self) -> u64 {
        self.b.as_ref().map_or(0, DevBuf::ptr)
    }
    fn bytes(&self) -> usize {
        self.b.as_ref().map_or(0, DevBuf::len)
    }
}

/// Slots of one tier: one device buffer of `cap * slot_bytes`, slot `i` at `i * slot_bytes`.
struct Pool {
    buf: Option<DevBuf>,
    slot_bytes: usize,
    cap: usize,
    live: Vec<bool>,
    free: Vec<u32>,
}

impl Pool {
    fn new(slot_bytes: usize) -> Self {
        Pool {
            buf: None,
            slot_bytes,
            cap: 0,
            live: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Grows the buffer to at least `cap` slots, copying the old contents on the stream. On
    /// failure nothing changes.
    fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        cap: usize,
    ) -> std::result::Result<(), CudaError> {
        if cap <= self.cap {
            return Ok(());
        }
        let bytes = cap
            .checked_mul(self.slot_bytes)
            .ok_or(CudaError::OutOfMemory { bytes: usize::MAX })?;
        let nb = DevBuf::alloc(stream, bytes)?;
        if let Some(old) = &self.buf {
            // SAFETY: both ranges are live allocations of at least `self.cap * slot_bytes` bytes;
            // the copy is ordered on the stream after every kernel that wrote `old`, and `old` is
            // freed (stream-ordered) only after the copy.
            unsafe {
                cu::memcpy_dtod_async(
                    nb.ptr(),
                    old.ptr(),
                    self.cap * self.slot_bytes,
                    stream.cu_stream(),
                )
            }
            .map_err(drv)?;
        }
        self.buf = Some(nb);
        self.cap = cap;
        Ok(())
    }

    fn alloc(&mut self, stream: &Arc<CudaStream>) -> std::result::Result<u32, CudaError> {
        if let Some(s) = self.free.pop() {
            self.live[s as usize] = true;
            return Ok(s);
        }
        let next = self.live.len();
        if next >= u32::MAX as usize {
            return Err(CudaError::OutOfMemory { bytes: 0 });
        }
        if next >= self.cap {
            let want = (self.cap * 2).max(16).max(next + 1);
            self.reserve(stream, want)?;
        }
        self.live.push(true);
        Ok(next as u32)
    }

    fn is_live(&self, slot: u32) -> bool {
        self.live.get(slot as usize).copied().unwrap_or(false)
    }

    fn release(&mut self, slot: u32) -> bool {
        match self.live.get_mut(slot as usize) {
            Some(l) if *l => {
                *l = false;
                self.free.push(slot);
                true
            }
            _ => false,
        }
    }

    fn base(&self) -> u64 {
        self.buf.as_ref().map_or(0, DevBuf::ptr)
    }

    fn slot_ptr(&self, slot: u32) -> u64 {
        self.base() + slot as u64 * self.slot_bytes as u64
    }

    fn bytes(&self) -> usize {
        self.cap * self.slot_bytes
    }

    fn metadata_bytes(&self) -> usize {
        self.live.capacity() + self.free.capacity() * 4
    }
}

/// One decode work item; mirrors `struct Item` in decode.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Item {
    seq: u32,
    kv: u32,
    sub: u32,
    page_begin: u32,
    page_end: u32,
    page_off: u32,
    n_pages: u32,
    group: u32,
    first_item: u32,
    n_items: u32,
}

/// Device page table, work items and scratch for one batch shape. [`CudaStorage::plan`] builds
/// one; [`CudaStorage::launch`] runs the decode on it any number of times (benchmarks time that).
#[derive(Default)]
pub struct DecodePlan {
    n_seqs: usize,
    page_counts: Vec<usize>,
    total_pages: usize,
    n_items: usize,
    items: GrowBuf,
    pages: GrowBuf,
    part_state: GrowBuf,
    part_acc: GrowBuf,
    page_lse: GrowBuf,
    counters: GrowBuf,
    stats: GrowBuf,
    mass: GrowBuf,
    queries: GrowBuf,
    out: GrowBuf,
}

impl DecodePlan {
    /// Sequences in the batch.
    pub fn n_seqs(&self) -> usize {
        self.n_seqs
    }
    /// Work items (CTAs) of one launch.
    pub fn n_items(&self) -> usize {
        self.n_items
    }
    /// Pages over the whole batch.
    pub fn total_pages(&self) -> usize {
        self.total_pages
    }
    /// Device address of the plan's own query buffer (`[n_seqs, q_heads, head_dim]` f32).
    pub fn queries_ptr(&self) -> u64 {
        self.queries.ptr()
    }
    /// Device address of the plan's own output buffer (`[n_seqs, q_heads, head_dim]` f32).
    pub fn output_ptr(&self) -> u64 {
        self.out.ptr()
    }
    fn bytes(&self) -> usize {
        [
            &self.items,
            &self.pages,
            &self.part_state,
            &self.part_acc,
            &self.page_lse,
            &self.counters,
            &self.stats,
            &self.mass,
            &self.queries,
            &self.out,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
    }
}

/// One layer's pages on a CUDA device.
pub struct CudaStorage {
    dev: CudaDevice,
    k: Arc<Kernels>,
    layout: WarmLayout,
    kvh: usize,
    qh: usize,
    d: usize,
    ps: usize,
    hot_dtype: HotDtype,
    scale: f32,
    warm_enabled: bool,
    hot: Pool,
    warm: Pool,
    hot_absmax: Vec<f32>,
    staging: GrowBuf,
    flag: GrowBuf,
    scratch: Mutex<DecodePlan>,
}

fn internal(msg: String) -> Error {
    Error::config("internal", msg)
}

impl CudaStorage {
    /// Empty pools for a validated config; compiles the config's kernels on first use.
    pub fn new(dev: CudaDevice, cfg: &CacheConfig) -> Result<Self> {
        let spec = KernelSpec::new(cfg, dev.tuning(), dev.smem_optin())?;
        let k = dev.kernels(&spec)?;
        let layout = WarmLayout::of(cfg);
        let hot_page = 2 * cfg.num_kv_heads * cfg.page_size * cfg.head_dim * cfg.hot_dtype.size();
        Ok(CudaStorage {
            layout,
            kvh: cfg.num_kv_heads,
            qh: cfg.num_q_heads,
            d: cfg.head_dim,
            ps: cfg.page_size,
            hot_dtype: cfg.hot_dtype,
            scale: cfg.scale(),
            warm_enabled: cfg.warm_enabled,
            hot: Pool::new(hot_page),
            warm: Pool::new(layout.head_bytes * cfg.num_kv_heads),
            hot_absmax: Vec::new(),
            staging: GrowBuf::default(),
            flag: GrowBuf::default(),
            scratch: Mutex::new(DecodePlan::default()),
            dev,
            k,
        })
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.inner.stream
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Registers per thread and CTAs per SM of the decode kernel, and its tuning-derived shape
    /// (warps per CTA, value channels per lane, heads per CTA).
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

    /// Grows the pools so that `hot` and `warm` slots exist without further reallocation.
    pub fn reserve(&mut self, hot: usize, warm: usize) -> Result<()> {
        let st = self.dev.inner.stream.clone();
        self.hot.reserve(&st, hot)?;
        self.warm.reserve(&st, warm)?;
        Ok(())
    }

    /// The raw bytes of warm page `slot` (all kv heads), exactly as stored.
    pub fn warm_bytes(&self, slot: u32) -> Result<Vec<u8>> {
        if !self.warm.is_live(slot) {
            return Err(internal(format!("warm slot {slot} is not allocated")));
        }
        self.read_bytes(self.warm.slot_ptr(slot), self.warm.slot_bytes)
    }

    /// The raw bytes of hot page `slot`: K then V, each `[kv_heads][page_size][head_dim]`.
    pub fn hot_bytes(&self, slot: u32) -> Result<Vec<u8>> {
        if !self.hot.is_live(slot) {
            return Err(internal(format!("hot slot {slot} is not allocated")));
        }
        self.read_bytes(self.hot.slot_ptr(slot), self.hot.slot_bytes)
    }

    fn read_bytes(&self, ptr: u64, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        let st = self.stream();
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: `ptr..ptr+n` lies inside a live pool slot; the copy is ordered after every
        // kernel that wrote it, and the stream is synchronised before `v` is read.
        unsafe { cu::memcpy_dtoh_async(&mut v, ptr, st.cu_stream()) }.map_err(drv)?;
        st.synchronize().map_err(drv)?;
        Ok(v)
    }

    fn check_entry(&self, p: &PageEntry) -> Result<()> {
        let ok = match p.tier {
            Tier::Hot => self.hot.is_live(p.slot),
            Tier::Warm => self.warm_enabled && self.warm.is_live(p.slot),
            t => {
                return Err(internal(format!(
                    "attention over a page in tier {t:?} is not supported"
                )))
            }
        };
        if !ok || p.n_tokens as usize > self.ps {
            return Err(internal(format!(
                "page {p:?} is not a live slot of this storage"
            )));
        }
        Ok(())
    }

    /// Builds the device page table and work items for `tables` into `plan` (reusing its buffers).
    pub fn plan_into(&self, plan: &mut DecodePlan, tables: &[&PageTable]) -> Result<()> {
        let seqs: Vec<&[PageEntry]> = tables.iter().map(|t| t.pages()).collect();
        self.plan_pages_into(plan, &seqs)
    }

    /// [`CudaStorage::plan_into`] from raw page lists (one per sequence, in token order), for
    /// callers that manage slots themselves (benchmarks, engines with their own page tables).
    pub fn plan_pages_into(&self, plan: &mut DecodePlan, tables: &[&[PageEntry]]) -> Result<()> {
        let spec = &self.k.spec;
        let nsub = spec.nsub();
        let st = self.stream().clone();
        let mut pages: Vec<[u32; 2]> = Vec::new();
        let mut counts = Vec::with_capacity(tables.len());
        for t in tables {
            for p in t.iter() {
                self.check_entry(p)?;
                let warm = (p.tier == Tier::Warm) as u32;
                pages.push([p.slot, (warm << 31) | p.n_tokens]);
            }
            counts.push(t.len());
        }
        let total = pages.len();
        if total > u32::MAX as usize / 2 {
            return Err(internal("too many pages in one batch".into()));
        }
        let slots = (self.dev.inner.sms * self.k.decode_blocks_per_sm).max(1) as usize;
        let total_ph = total * self.kvh * nsub;
        let chunk = total_ph.div_ceil(slots).max(spec.nwarps);
        let mut items: Vec<Item> = Vec::new();
        let mut off = 0usize;
        let mut group = 0u32;
        for (si, &np) in counts.iter().enumerate() {
            let splits = np.div_ceil(chunk).clamp(1, MAX_SPLIT);
            for kv in 0..self.kvh {
                for sub in 0..nsub {
                    let first = items.len() as u32;
                    for s in 0..splits {
                        items.push(Item {
                            seq: si as u32,
                            kv: kv as u32,
                            sub: sub as u32,
                            page_begin: (np * s / splits) as u32,
                            page_end: (np * (s + 1) / splits) as u32,
                            page_off: off as u32,
                            n_pages: np as u32,
                            group,
                            first_item: first,
                            n_items: splits as u32,
                        });
                    }
                    group += 1;
                }
            }
            off += np;
        }
        let gs = spec.gs;
        let n_items = items.len();
        let f = 4usize;
        plan.items
            .ensure(&st, n_items * std::mem::size_of::<Item>(), false)?;
        plan.pages.ensure(&st, total.max(1) * 8, false)?;
        plan.part_state.ensure(&st, n_items * gs * 4 * f, false)?;
        plan.part_acc
            .ensure(&st, n_items * gs * self.d * f, false)?;
        plan.page_lse
            .ensure(&st, total.max(1) * self.qh * f, false)?;
        plan.counters.ensure(&st, group as usize * 4, true)?;
        plan.stats
            .ensure(&st, tables.len() * self.qh * 4 * f, false)?;
        plan.mass
            .ensure(&st, total.max(1) * self.kvh * nsub * f, false)?;
        plan.queries
            .ensure(&st, tables.len() * self.qh * self.d * f, false)?;
        plan.out
            .ensure(&st, tables.len() * self.qh * self.d * f, false)?;
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: `Item` is `repr(C)` plain u32s; the destination buffers were just sized for
        // these byte counts. Copies from pageable host memory are staged by the driver before
        // the call returns, so the host vectors may be dropped afterwards.
        unsafe {
            let ib = std::slice::from_raw_parts(
                items.as_ptr() as *const u8,
                n_items * std::mem::size_of::<Item>(),
            );
            cu::memcpy_htod_async(plan.items.ptr(), ib, st.cu_stream()).map_err(drv)?;
            if total > 0 {
                cu::memcpy_htod_async(plan.pages.ptr(), &pages, st.cu_stream()).map_err(drv)?;
            }
        }
        plan.n_seqs = tables.len();
        plan.page_counts = counts;
        plan.total_pages = total;
        plan.n_items = n_items;
        Ok(())
    }

    /// A fresh plan for raw page lists (see [`CudaStorage::plan_pages_into`]).
    pub fn plan_pages(&self, tables: &[&[PageEntry]]) -> Result<DecodePlan> {
        let mut p = DecodePlan::default();
        self.plan_pages_into(&mut p, tables)?;
        Ok(p)
    }

    /// Recompiles the decode kernel with other launch-shape knobs; pools and pages are kept
    /// (the warm layout does not depend on them). For benchmarks.
    #[doc(hidden)]
    pub fn retune(&mut self, tuning: super::CudaTuning, cfg: &CacheConfig) -> Result<()> {
        let spec = KernelSpec::new(cfg, tuning, self.dev.smem_optin())?;
        if spec.layout != self.k.spec.layout || spec.d != self.d || spec.kvh != self.kvh {
            return Err(internal("retune with a different geometry".into()));
        }
        self.k = self.dev.kernels(&spec)?;
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
            // SAFETY: the plan's own buffers, this device's stream.
            unsafe { self.launch(plan, plan.queries.ptr(), plan.out.ptr(), None)? };
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

    /// Launches the decode kernel of `plan` on `stream` (`None`: this device's stream; `Some(0)`:
    /// the legacy default stream), reading
    /// queries `[n_seqs, q_heads, head_dim]` f32 at `queries` and writing the output there too.
    /// Statistics and page-mass parts stay in the plan until [`CudaStorage::collect`].
    ///
    /// # Safety
    /// `queries` and `output` must be device pointers of this context to at least
    /// `n_seqs * q_heads * head_dim` f32 each, valid until the launch completes, and a
    /// `Some(stream)` must be a live stream of this context (or 0) that is ordered after this
    /// device's stream (see [`CudaStorage::attend_device`], which arranges that with an event).
    pub unsafe fn launch(
        &self,
        plan: &DecodePlan,
        queries: u64,
        output: u64,
        stream: Option<u64>,
    ) -> Result<()> {
        if plan.n_items == 0 {
            return Ok(());
        }
        let st = self.stream();
        let cu_stream = match stream {
            None => st.cu_stream(),
            Some(s) => s as sys::CUstream,
        };
        // SAFETY: a borrowed wrapper of a caller-owned live stream (or ours); not destroyed on drop.
        let s = unsafe { st.context().wrap_borrowed_stream(cu_stream) };
        let (items, pages) = (plan.items.ptr(), plan.pages.ptr());
        let (hot, warm) = (self.hot.base(), self.warm.base());
        let (ps, pa, pl) = (
            plan.part_state.ptr(),
            plan.part_acc.ptr(),
            plan.page_lse.ptr(),
        );
        let (cnt, stats, mass) = (plan.counters.ptr(), plan.stats.ptr(), plan.mass.ptr());
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
            .arg(&mass)
            .arg(&self.scale);
        // SAFETY: argument types and order match `kvt_decode`; every pointer is a live device
        // allocation sized by `plan_into` for this plan (or by the caller's contract above).
        unsafe { b.launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    /// Reads statistics and page masses of the last launch of `plan` (ordered on `stream`).
    fn collect(
        &self,
        plan: &DecodePlan,
        stream: sys::CUstream,
        output: Option<&mut Vec<f32>>,
    ) -> Result<Attention> {
        let (n, qh, d) = (plan.n_seqs, self.qh, self.d);
        let nq = self.kvh * self.k.spec.nsub();
        let mut stats = vec![0f32; n * qh * 4];
        let mut mass = vec![0f32; plan.total_pages * nq];
        let mut out = Vec::new();
        // SAFETY: each buffer holds at least as many f32 as copied (sized by `plan_into`); the
        // copies are ordered after the launch on `stream`, which is synchronised before use.
        unsafe {
            if !stats.is_empty() {
                cu::memcpy_dtoh_async(&mut stats, plan.stats.ptr(), stream).map_err(drv)?;
            }
            if !mass.is_empty() {
                cu::memcpy_dtoh_async(&mut mass, plan.mass.ptr(), stream).map_err(drv)?;
            }
            if output.is_some() {
                out = vec![0f32; n * qh * d];
                if !out.is_empty() {
                    cu::memcpy_dtoh_async(&mut out, plan.out.ptr(), stream).map_err(drv)?;
                }
            }
            cu::stream::synchronize(stream).map_err(drv)?;
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
        let mut page_mass = Vec::with_capacity(n);
        let mut off = 0;
        for &np in &plan.page_counts {
            page_mass.push(
                (0..np)
                    .map(|p| {
                        mass[(off + p) * nq..(off + p + 1) * nq].iter().sum::<f32>() / qh as f32
                    })
                    .collect(),
            );
            off += np;
        }
        if let Some(o) = output {
            *o = out;
        }
        Ok(Attention {
            output: Vec::new(),
            heads,
            page_mass,
            num_q_heads: qh,
            head_dim: d,
        })
    }

    /// Decode over `plan` with host queries; uses the plan's own query and output buffers.
    pub fn attend_plan(&self, plan: &DecodePlan, queries: &[f32]) -> Result<Attention> {
        let want = plan.n_seqs * self.qh * self.d;
        if queries.len() != want {
            return Err(Error::shape("queries", want, queries.len()));
        }
        let st = self.stream();
        st.context().bind_to_thread().map_err(drv)?;
        if want > 0 {
            // SAFETY: `plan.queries` holds `want` f32 (sized by `plan_into`).
            unsafe { cu::memcpy_htod_async(plan.queries.ptr(), queries, st.cu_stream()) }
                .map_err(drv)?;
        }
        // SAFETY: plan-owned query/output buffers of the right size, this device's stream.
        unsafe { self.launch(plan, plan.queries.ptr(), plan.out.ptr(), None)? };
        let mut out = Vec::new();
        let mut att = self.collect(plan, st.cu_stream(), Some(&mut out))?;
        att.output = out;
        Ok(att)
    }

    fn hot_slot_check(&self, slot: u32) -> Result<()> {
        if !self.hot.is_live(slot) {
            return Err(internal(format!("hot slot {slot} is not allocated")));
        }
        Ok(())
    }
}

impl BackendStorage for CudaStorage {
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Cuda {
            ordinal: self.dev.inner.ordinal,
        }
    }

    fn alloc_hot(&mut self) -> Result<u32> {
        let st = self.stream().clone();
        let s = self.hot.alloc(&st)?;
        if self.hot_absmax.len() <= s as usize {
            self.hot_absmax.resize(s as usize + 1, 0.0);
        }
        self.hot_absmax[s as usize] = 0.0;
        Ok(s)
    }

    fn write_hot(
        &mut self,
        slot: u32,
        first: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()> {
        self.hot_slot_check(slot)?;
        let row = self.kvh * self.d;
        if first + n > self.ps || keys.len() != n * row || values.len() != n * row {
            return Err(internal(format!(
                "write of {n} tokens at {first} does not fit a page of {} (keys {}, values {})",
                self.ps,
                keys.len(),
                values.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let st = self.stream().clone();
        let base = self.staging.ensure(&st, 2 * n * row * 4, false)?;
        let vptr = base + (n * row * 4) as u64;
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: staging holds 2 * n * row f32; pageable host copies are staged before return.
        unsafe {
            cu::memcpy_htod_async(base, keys, st.cu_stream()).map_err(drv)?;
            cu::memcpy_htod_async(vptr, values, st.cu_stream()).map_err(drv)?;
        }
        let hot = self.hot.base();
        let (slot_a, first_a, n_a) = (slot, first as u32, n as u32);
        let total = n * row;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).min(4096) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = st.launch_builder(&self.k.append);
        b.arg(&base)
            .arg(&vptr)
            .arg(&hot)
            .arg(&slot_a)
            .arg(&first_a)
            .arg(&n_a);
        // SAFETY: matches `kvt_append`; the slot is live and `first + n <= page_size`, so every
        // store lands inside the slot.
        unsafe { b.launch(cfg) }.map_err(drv)?;
        let m = keys.iter().chain(values).fold(0f32, |a, x| a.max(x.abs()));
        let am = &mut self.hot_absmax[slot as usize];
        *am = am.max(m);
        Ok(())
    }

    fn demote(&mut self, slot: u32, n_tokens: usize) -> Result<Option<u32>> {
        self.hot_slot_check(slot)?;
        if !self.warm_enabled {
            return Ok(None);
        }
        if n_tokens == 0 || n_tokens > self.ps {
            return Err(internal(format!("demote of {n_tokens} tokens")));
        }
        let st = self.stream().clone();
        let ws = self.warm.alloc(&st)?;
        let check = self.hot_absmax[slot as usize] > SAFE_ABS;
        let run = |this: &mut Self| -> Result<bool> {
            let flag = this.flag.ensure(&st, 16, true)?;
            if check {
                // SAFETY: `flag` is a live 16+ byte device buffer.
                unsafe { cu::memset_d8_async(flag, 0, 4, st.cu_stream()) }.map_err(drv)?;
            }
            let (hot, warm) = (this.hot.base(), this.warm.base());
            let n = n_tokens as u32;
            let cfg = LaunchConfig {
                grid_dim: (this.kvh as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = st.launch_builder(&this.k.quantize);
            b.arg(&hot)
                .arg(&warm)
                .arg(&slot)
                .arg(&ws)
                .arg(&n)
                .arg(&flag);
            // SAFETY: matches `kvt_quantize`; both slots are live, `n <= page_size`.
            unsafe { b.launch(cfg) }.map_err(drv)?;
            if !check {
                return Ok(true);
            }
            let mut f = [0u32; 1];
            // SAFETY: reads the 4-byte flag after the kernel on the same stream, then syncs.
            unsafe {
                cu::memcpy_dtoh_async(&mut f, flag, st.cu_stream()).map_err(drv)?;
            }
            st.synchronize().map_err(drv)?;
            Ok(f[0] == 0)
        };
        match run(self) {
            Ok(true) => {
                self.hot.release(slot);
                Ok(Some(ws))
            }
            Ok(false) => {
                self.warm.release(ws);
                Ok(None)
            }
            Err(e) => {
                self.warm.release(ws);
                Err(e)
            }
        }
    }

    fn free(&mut self, tier: Tier, slot: u32) {
        match tier {
            Tier::Hot => {
                self.hot.release(slot);
            }
            Tier::Warm => {
                self.warm.release(slot);
            }
            Tier::Cold | Tier::Evicted => {}
        }
    }

    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = entry.n_tokens as usize;
        let (d, ps) = (self.d, self.ps);
        match entry.tier {
            Tier::Hot => {
                let b = self.hot_bytes(entry.slot)?;
                let es = self.hot_dtype.size();
                let half = self.kvh * ps * d;
                let get = |i: usize| -> f32 {
                    let o = i * es;
                    match self.hot_dtype {
                        HotDtype::F32 => f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]),
                        HotDtype::F16 => f16::from_le_bytes([b[o], b[o + 1]]).to_f32(),
                        HotDtype::BF16 => bf16::from_le_bytes([b[o], b[o + 1]]).to_f32(),
                    }
                };
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for h in 0..self.kvh {
                    let at = h * ps * d;
                    ks.extend((at..at + n * d).map(get));
                    vs.extend((at..at + n * d).map(|i| get(half + i)));
                }
                Ok((ks, vs))
            }
            Tier::Warm => {
                let b = self.warm_bytes(entry.slot)?;
                let hb = self.layout.head_bytes;
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for h in 0..self.kvh {
                    let blk = &b[h * hb..(h + 1) * hb];
                    ks.extend(quant::dequantize_keys(blk, n, &self.layout));
                    vs.extend(quant::dequantize_values(blk, n, &self.layout));
                }
                Ok((ks, vs))
            }
            t => Err(internal(format!(
                "page in tier {t:?} has no bytes on the device"
            ))),
        }
    }

    fn attend(&self, tables: &[&PageTable], queries: &[f32]) -> Result<Attention> {
        let want = tables.len() * self.qh * self.d;
        if queries.len() != want {
            return Err(Error::shape("queries", want, queries.len()));
        }
        let mut plan = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        self.plan_into(&mut plan, tables)?;
        self.attend_plan(&plan, queries)
    }

    fn attend_device(&self, tables: &[&PageTable], bufs: DeviceBuffers) -> Result<Attention> {
        if bufs.queries == 0 || bufs.output == 0 {
            return Err(internal(
                "attend_device: null queries or output pointer".into(),
            ));
        }
        let mut plan = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        self.plan_into(&mut plan, tables)?;
        let st = self.stream();
        // 0 is the legacy default stream, which a non-blocking stream does not order against.
        let user = bufs.stream as sys::CUstream;
        // Order the caller's stream after our pending work (page writes, demotions, the plan).
        let ev = st.context().new_event(None).map_err(drv)?;
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
        // SAFETY: the caller guarantees `queries`/`output` are device buffers of this context of
        // `n_seqs * q_heads * head_dim` f32 on `user`; `user` is ordered after our stream above.
        unsafe { self.launch(&plan, bufs.queries, bufs.output, Some(bufs.stream))? };
        // Collecting synchronises `user`, so our later work cannot overtake this launch.
        self.collect(&plan, user, None)
    }

    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let (qh, kvh, d) = (self.qh, self.kvh, self.d);
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
        // Cached part on the device (one query per new token, all over the same table), causal
        // block of new tokens exact on the host, merged by log-sum-exp.
        let cached = if table.pages().is_empty() || n == 0 {
            None
        } else {
            let tabs = vec![table; n];
            Some(self.attend(&tabs, queries)?)
        };
        let g = qh / kvh;
        let mut out = vec![0f32; n * qh * d];
        use rayon::prelude::*;
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let (tok, h) = (i / qh, i % qh);
            let kv = h / g;
            let q: Vec<f32> = queries[i * d..(i + 1) * d]
                .iter()
                .map(|x| x * self.scale)
                .collect();
            let s: Vec<f32> = (0..=tok)
                .map(|j| {
                    let k = &keys[(j * kvh + kv) * d..(j * kvh + kv + 1) * d];
                    q.iter().zip(k).map(|(a, b)| a * b).sum()
                })
                .collect();
            let (lz, co) = match &cached {
                Some(a) => (a.heads[i].log_z, &a.output[i * d..(i + 1) * d]),
                None => (f32::NEG_INFINITY, &[][..]),
            };
            let m = s.iter().copied().fold(lz, f32::max);
            let wc = if lz == f32::NEG_INFINITY {
                0.0
            } else {
                (lz - m).exp()
            };
            let mut l = wc;
            for (c, x) in o.iter_mut().enumerate() {
                *x = if wc > 0.0 { wc * co[c] } else { 0.0 };
            }
            for (j, &sj) in s.iter().enumerate() {
                let w = (sj - m).exp();
                l += w;
                let v = &values[(j * kvh + kv) * d..(j * kvh + kv + 1) * d];
                for (x, vv) in o.iter_mut().zip(v) {
                    *x += w * vv;
                }
            }
            for x in o.iter_mut() {
                *x /= l;
            }
        });
        Ok(out)
    }

    fn bytes(&self) -> StorageBytes {
        let scratch = self.scratch.lock().map(|p| p.bytes()).unwrap_or(0);
        StorageBytes {
            hot: self.hot.bytes(),
            warm: self.warm.bytes(),
            metadata: self.hot.metadata_bytes()
                + self.warm.metadata_bytes()
                + self.hot_absmax.capacity() * 4
                + self.staging.bytes()
                + self.flag.bytes()
                + scratch,
        }
    }
}
