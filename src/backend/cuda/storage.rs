//! One layer's hot and warm page pools in device memory, and the [`BackendStorage`] impl over them.
//!
//! Owns: [`CudaStorage`] (two slot pools, one device buffer per tier, grown by reallocating and
//! copying on the device stream; the staging buffer for appends; host bookkeeping: the largest
//! |value| written to each hot slot), [`CudaScratch`] (the caller-owned decode plan and host
//! vectors that `attend` reuses), and the trait impl: append, demotion, attention (host or device
//! queries, optional page selection) and prefill. Page bytes cross the host boundary in
//! `transfer.rs`, planning is `plan.rs`, launching `launch.rs`.
//! Must never: write a dequantised page anywhere, free a slot whose bytes a queued kernel may still
//! read without stream ordering, lose a stored page on an error (a failed grow keeps the old buffer;
//! a failed or unrepresentable demotion leaves the hot page as it was), or hold a lock while a
//! kernel runs (attention is `&self` with the caller's scratch).

use super::device::{drv, CudaDevice, Kernels};
use super::kernels::KernelSpec;
use super::plan::DecodePlan;
use super::pool::{GrowBuf, PinnedBuf, Pool};
use crate::attention::Attention;
use crate::backend::{
    hot_page_bytes, AttendInput, BackendStorage, DeviceBuffers, DeviceLocation, DeviceRotation,
    DeviceRows, HotRow, PageBytes, PageResults, Scratch, StorageBytes,
};
use crate::cache::{PageEntry, PageTable, Tier};
use crate::config::{CacheConfig, HotDtype};
use crate::error::{Error, Result};
use crate::quant::{WarmFormat, WarmLayout};
use cudarc::driver::{result as cu, CudaEvent, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Largest |x| a hot page may hold for demotion to be unable to fail (every range then fits f16
/// after rounding to any hot dtype), so the demotion needs no read-back of the kernel's flag.
pub(super) const SAFE_ABS: f32 = 60_000.0;

/// Ids that tie a [`DecodePlan`] to the storage (and kernel build) that planned it.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh storage id.
pub(super) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Reusable working memory of CUDA decode attention (the CUDA variant of [`Scratch`]): the device
/// decode plan (page lists, work items, partials; buffers only grow) and host vectors. One
/// scratch may serve every storage of every device; it re-plans (and, for another device,
/// reallocates) on each call.
#[derive(Default)]
pub struct CudaScratch {
    /// Boxed: a plan is some 700 bytes, and `Scratch` is an enum over every backend's scratch.
    pub(super) plan: Box<DecodePlan>,
    /// The last `attend_device_async` not yet finished, and what it returns per page.
    pub(super) pending: Option<PageResults>,
}

impl CudaScratch {
    /// The plan of the last call.
    pub fn plan(&self) -> &DecodePlan {
        &self.plan
    }
    /// Device bytes held (the plan's buffers).
    pub fn device_bytes(&self) -> usize {
        self.plan.device_bytes()
    }
    /// Host bytes held.
    pub fn host_bytes(&self) -> usize {
        self.plan.host_bytes()
    }
}

/// One layer's pages on a CUDA device.
pub struct CudaStorage {
    pub(super) id: u64,
    pub(super) dev: CudaDevice,
    pub(super) k: Arc<Kernels>,
    pub(super) layout: WarmLayout,
    pub(super) kvh: usize,
    pub(super) qh: usize,
    pub(super) d: usize,
    pub(super) ps: usize,
    pub(super) hot_dtype: HotDtype,
    pub(super) scale: f32,
    pub(super) warm_enabled: bool,
    pub(super) hot: Pool,
    pub(super) warm: Pool,
    /// Largest |x| ever written to each hot slot (since its allocation): decides whether a
    /// demotion must read back the kernel's overflow flag.
    pub(super) hot_absmax: Vec<f32>,
    staging: GrowBuf,
    /// Demotion jobs and their failure words (`demote.rs`).
    pub(super) flag: GrowBuf,
    /// Device appends (`append.rs`): the row map, check words and signs on the device, their
    /// page-locked host copy, and the event that orders the caller's stream after ours.
    pub(super) rows_dev: GrowBuf,
    pub(super) rows_host: PinnedBuf,
    pub(super) rows_ev: Option<CudaEvent>,
    /// Page-locked landing buffer of batched exports (`transfer.rs`, the archive of a demotion
    /// batch).
    pub(super) export_host: PinnedBuf,
}

impl CudaStorage {
    /// Empty pools for a validated config; compiles the config's kernels on first use. Refuses
    /// (typed) fitted value ranges, which the demotion kernel does not reproduce.
    pub fn new(dev: CudaDevice, cfg: &CacheConfig) -> Result<Self> {
        if cfg.value_fit {
            return Err(Error::Unsupported(
                "fitted value ranges (value_fit) on the CUDA backend",
            ));
        }
        let spec = KernelSpec::new(cfg, dev.tuning(), dev.smem_optin())?;
        let k = dev.kernels(&spec)?;
        let layout = WarmLayout::of(cfg);
        Ok(CudaStorage {
            id: next_id(),
            layout,
            kvh: cfg.num_kv_heads,
            qh: cfg.num_q_heads,
            d: cfg.head_dim,
            ps: cfg.page_size,
            hot_dtype: cfg.hot_dtype,
            scale: cfg.scale(),
            warm_enabled: cfg.warm_enabled,
            hot: Pool::new(hot_page_bytes(cfg, cfg.hot_dtype)),
            warm: Pool::new(layout.head_bytes * cfg.num_kv_heads),
            hot_absmax: Vec::new(),
            staging: GrowBuf::default(),
            flag: GrowBuf::default(),
            rows_dev: GrowBuf::default(),
            rows_host: PinnedBuf::default(),
            rows_ev: None,
            export_host: PinnedBuf::default(),
            dev,
            k,
        })
    }

    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.inner.stream
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Grows the pools so that `hot` and `warm` slots exist without further reallocation.
    pub fn reserve(&mut self, hot: usize, warm: usize) -> Result<()> {
        let st = self.dev.inner.stream.clone();
        self.hot.reserve(&st, hot)?;
        self.warm.reserve(&st, warm)?;
        Ok(())
    }

    pub(super) fn hot_slot_check(&self, slot: u32) -> Result<()> {
        if !self.hot.is_live(slot) {
            return Err(Error::internal(format!("hot slot {slot} is not allocated")));
        }
        Ok(())
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        // A step queued with `attend_device_async` may still read these pools (and run this
        // module's kernels): this stream waits for it, so let it drain before they go.
        let _ = self.stream().synchronize();
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
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: slot `s` is live and `slot_bytes` long; the memset is ordered on the stream
        // after every earlier use of the slot (a freed slot is only reused through this stream).
        let z = unsafe {
            cu::memset_d8_async(self.hot.slot_ptr(s), 0, self.hot.slot_bytes, st.cu_stream())
        };
        if let Err(e) = z {
            self.hot.release(s);
            return Err(drv(e).into());
        }
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
            return Err(Error::internal(format!(
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
        let (first_a, n_a) = (first as u32, n as u32);
        let cfg = LaunchConfig {
            grid_dim: ((n * row).div_ceil(256).min(4096) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = st.launch_builder(&self.k.append);
        b.arg(&base)
            .arg(&vptr)
            .arg(&hot)
            .arg(&slot)
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

    fn write_hot_device(
        &mut self,
        rows: &[HotRow],
        src: &DeviceRows,
        rotation: Option<DeviceRotation>,
    ) -> Result<()> {
        self.write_rows(rows, src, rotation)
    }

    fn demote(&mut self, slot: u32, n_tokens: usize, format: WarmFormat) -> Result<Option<u32>> {
        let mut out = Vec::with_capacity(1);
        self.demote_pages(&[(slot, n_tokens)], format, &mut out)?;
        out.pop()
            .ok_or_else(|| Error::internal("a demotion of one page returned no result"))
    }

    fn demote_many(
        &mut self,
        pages: &[(u32, usize)],
        format: WarmFormat,
        out: &mut Vec<Option<u32>>,
    ) -> Result<()> {
        self.demote_pages(pages, format, out)
    }

    fn supports_format(&self, format: WarmFormat) -> bool {
        format == self.layout.format()
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
        self.read_page_f32(entry)
    }

    fn warm_key_bounds(&self, entry: &PageEntry, lo: &mut [f32], hi: &mut [f32]) -> Result<()> {
        self.key_bounds(entry, lo, hi)
    }

    fn warm_value_error(&self, entry: &PageEntry, out: &mut [f32]) -> Result<()> {
        self.value_error(entry, out)
    }

    fn export_page(&self, entry: &PageEntry) -> Result<PageBytes> {
        self.export(entry)
    }

    fn export_pages(&mut self, entries: &[PageEntry]) -> Result<Vec<PageBytes>> {
        self.export_many(entries)
    }

    fn import_page(&mut self, page: &PageBytes) -> Result<u32> {
        self.import(page)
    }

    fn attend(&self, scratch: &mut Scratch, input: &AttendInput) -> Result<Attention> {
        let want = input.tables.len() * self.qh * self.d;
        if input.queries.len() != want {
            return Err(Error::shape("queries", want, input.queries.len()));
        }
        let pages = scratch.page_results();
        let s = scratch.cuda();
        self.plan_into(&mut s.plan, input.tables, input.selection)?;
        self.attend_plan_with(&mut s.plan, input.queries, pages)
    }

    fn attend_device(
        &self,
        scratch: &mut Scratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
    ) -> Result<Attention> {
        let pages = scratch.page_results();
        let s = scratch.cuda();
        let user = self.enqueue_device(s, input, bufs, pages)?;
        // Collecting synchronises `user`, so our later work cannot overtake this launch.
        self.collect(&mut s.plan, user, false, pages)
    }

    fn attend_device_async(
        &self,
        scratch: &mut Scratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
    ) -> Result<()> {
        let pages = scratch.page_results();
        self.enqueue_device_async(scratch.cuda(), input, bufs, pages)
    }

    fn finish_device(&self, scratch: &mut Scratch) -> Result<Attention> {
        self.finish_pending(scratch.cuda())
    }

    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let shape = (self.qh, self.kvh, self.d);
        crate::backend::prefill::prefill_with(
            table,
            queries,
            keys,
            values,
            n,
            shape,
            self.scale,
            |input| {
                let mut scratch = CudaScratch::default();
                self.plan_into(&mut scratch.plan, input.tables, input.selection)?;
                // Output and statistics only: the per-page results would be n * pages * q_heads
                // floats.
                self.attend_plan_with(&mut scratch.plan, input.queries, PageResults::None)
            },
        )
    }

    fn bytes(&self) -> StorageBytes {
        // The decode plan lives in the caller's `Scratch` (`CudaScratch::device_bytes`), so it is
        // not counted here.
        StorageBytes {
            hot: self.hot.bytes(),
            warm: self.warm.bytes(),
            metadata: self.hot.metadata_bytes()
                + self.warm.metadata_bytes()
                + self.hot_absmax.capacity() * 4
                + self.staging.bytes()
                + self.flag.bytes()
                + self.rows_dev.bytes()
                + self.rows_host.bytes()
                + self.export_host.bytes(),
        }
    }
}
