//! Decode plans: the device page lists and work items of one batch.
//!
//! Owns: [`Item`] (one work item, one CTA of the decode kernel; mirrors `struct Item` in
//! decode.cu), [`DecodePlan`] (device page lists and items, the kernel's scratch: partials,
//! combine counters, and one results buffer holding statistics, per-page masses and log-sum-exp
//! and the plan-owned output; a plan-owned query buffer; the page-locked host staging of uploads
//! and read-backs, and the event that says when they are free) and building a plan from page
//! tables and an optional [`PageSelection`] (`CudaStorage::plan_*`).
//!
//! One plan costs one host-to-device copy (items, page list and the entry map of `mass.cu`, from
//! page-locked memory, so the driver does not stage it) and its read-back one or two copies into
//! page-locked memory (`launch.rs`).
//!
//! Without a selection each sequence has one page list (its pages in order) that every kv head
//! reads, exactly the layout the kernel was tuned on. With a selection each (sequence, kv head)
//! "group" has its own list holding only the selected pages, and the plan remembers which page
//! index each entry stands for so that results map back to the caller's page indices.
//!
//! Must never: list a page that is not a live slot of the storage building the plan (every listed
//! entry is checked, unselected entries are never looked at: they may be cold or evicted), launch
//! anything, or keep buffers of one device while planning for another.

use super::device::drv;
use super::kernels::MAX_SPLIT;
use super::pool::{GrowBuf, PinnedBuf};
use super::storage::CudaStorage;
use crate::attention::PageSelection;
use crate::cache::{PageEntry, PageTable, Tier};
use crate::error::{Error, Result};
use cudarc::driver::{result as cu, CudaEvent, CudaStream};
use std::sync::Arc;

/// One decode work item; mirrors `struct Item` in decode.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Item {
    pub seq: u32,
    pub kv: u32,
    pub sub: u32,
    pub page_begin: u32,
    pub page_end: u32,
    pub page_off: u32,
    pub n_pages: u32,
    pub group: u32,
    pub first_item: u32,
    pub n_items: u32,
}

/// Device page lists, work items and scratch for one batch. [`CudaStorage::plan_pages_into`] builds
/// one; [`CudaStorage::attend_plan`] (or a benchmark's `time_decode`) runs the decode on it any
/// number of times. Reusing a plan reuses its device buffers (they only grow).
#[derive(Default)]
pub struct DecodePlan {
    /// Id of the storage that built the plan (0: none, or the last build failed).
    pub(super) owner: u64,
    /// The stream (hence device) every buffer below was allocated on.
    pub(super) stream: Option<Arc<CudaStream>>,
    pub(super) n_seqs: usize,
    /// Pages per sequence (the tables' lengths, selected or not).
    pub(super) page_counts: Vec<usize>,
    /// Whether each (sequence, kv head) has its own list (a selection was given).
    pub(super) per_head: bool,
    /// Start of each list in the device page list, plus the end: per sequence without a
    /// selection (`n_seqs + 1`), per (sequence, kv head) with one (`n_seqs * kv_heads + 1`).
    pub(super) list_off: Vec<usize>,
    /// With a selection: the page index each device list entry stands for.
    pub(super) sel_pages: Vec<u32>,
    /// Entries of the device page list.
    pub(super) entries: usize,
    /// Row stride and kv-head column factor of `page_lse` (see decode.cu).
    pub(super) lse_stride: u32,
    pub(super) lse_kvcol: u32,
    pub(super) n_items: usize,
    host_pages: Vec<[u32; 2]>,
    host_items: Vec<Item>,
    /// Per device list entry: its list group and its page's index over the batch (`mass.cu`).
    host_emap: Vec<[u32; 2]>,
    /// Items, then the page list, then the entry map, at `up_pages` / `up_emap` bytes.
    pub(super) upload: GrowBuf,
    pub(super) up_pages: usize,
    pub(super) up_emap: usize,
    pub(super) part_state: GrowBuf,
    pub(super) part_acc: GrowBuf,
    pub(super) counters: GrowBuf,
    /// f32 results: `[n_seqs][q_heads][4]` statistics at 0, `[total pages][kv_heads]` masses at
    /// `res_mass`, page lse (`entries * lse_stride`) at `res_lse`, the plan-owned output
    /// `[n_seqs][q_heads][head_dim]` at `res_out`; `res_len` in all (offsets in f32).
    pub(super) results: GrowBuf,
    pub(super) res_mass: usize,
    pub(super) res_lse: usize,
    pub(super) res_out: usize,
    pub(super) res_len: usize,
    pub(super) queries: GrowBuf,
    /// The rotation's sign vector (`attend_device` of a rotated cache).
    pub(super) rot_signs: GrowBuf,
    /// Page-locked staging of the upload and of the read-back.
    pub(super) host_up: PinnedBuf,
    pub(super) host_res: PinnedBuf,
    /// Recorded on this plan's storage stream after its last upload (and, for `attend_device`,
    /// waited on by the caller's stream): once it completes, `host_up` is free again.
    pub(super) ev: Option<CudaEvent>,
    /// Recorded on the caller's stream after an asynchronous step (`resident.rs`); this plan's
    /// storage stream waits on it.
    pub(super) done: Option<CudaEvent>,
}

impl Drop for DecodePlan {
    fn drop(&mut self) {
        // The page-locked buffers must not be freed under a copy in flight, nor the plan's device
        // buffers while a queued step still reads them.
        for ev in [&self.ev, &self.done].into_iter().flatten() {
            let _ = ev.synchronize();
        }
    }
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
    /// Pages over the whole batch (selected or not).
    pub fn total_pages(&self) -> usize {
        self.page_counts.iter().sum()
    }
    /// Entries of the device page list: the batch's pages without a selection, the selected
    /// (page, kv head) pairs with one.
    pub fn entries(&self) -> usize {
        self.entries
    }
    /// Device address of the plan's own query buffer (`[n_seqs, q_heads, head_dim]` f32).
    pub fn queries_ptr(&self) -> u64 {
        self.queries.ptr()
    }
    /// Device address of the plan's own output buffer (`[n_seqs, q_heads, head_dim]` f32).
    pub fn output_ptr(&self) -> u64 {
        self.res_ptr(self.res_out)
    }
    /// Device address of f32 `at` of the results buffer.
    pub(super) fn res_ptr(&self, at: usize) -> u64 {
        self.results.ptr() + 4 * at as u64
    }
    /// Host bytes of page-locked staging the plan holds.
    pub fn pinned_bytes(&self) -> usize {
        self.host_up.bytes() + self.host_res.bytes()
    }
    /// Device bytes the plan holds.
    pub fn device_bytes(&self) -> usize {
        [
            &self.upload,
            &self.part_state,
            &self.part_acc,
            &self.counters,
            &self.results,
            &self.queries,
            &self.rot_signs,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum()
    }
    /// Host bytes the plan holds (its reusable vectors).
    pub fn host_bytes(&self) -> usize {
        self.page_counts.capacity() * 8
            + self.list_off.capacity() * 8
            + self.sel_pages.capacity() * 4
            + self.host_pages.capacity() * 8
            + self.host_emap.capacity() * 8
            + self.host_items.capacity() * std::mem::size_of::<Item>()
            + self.pinned_bytes()
    }
    /// `(offset, length)` of the device list that kv head `kv` of sequence `seq` reads.
    pub(super) fn list(&self, seq: usize, kv: usize, kv_heads: usize) -> (usize, usize) {
        let g = if self.per_head {
            seq * kv_heads + kv
        } else {
            seq
        };
        (self.list_off[g], self.list_off[g + 1] - self.list_off[g])
    }
}

impl CudaStorage {
    /// Builds the device page lists and work items for `tables` into `plan` (reusing its buffers),
    /// over the pages `selection` lists (`None`: every page).
    pub fn plan_into(
        &self,
        plan: &mut DecodePlan,
        tables: &[&PageTable],
        selection: Option<&PageSelection>,
    ) -> Result<()> {
        let seqs: Vec<&[PageEntry]> = tables.iter().map(|t| t.pages()).collect();
        self.plan_pages_into(plan, &seqs, selection)
    }

    /// [`CudaStorage::plan_into`] from raw page lists (one per sequence, in token order), for
    /// callers that manage slots themselves (benchmarks, engines with their own page tables).
    pub fn plan_pages_into(
        &self,
        plan: &mut DecodePlan,
        tables: &[&[PageEntry]],
        selection: Option<&PageSelection>,
    ) -> Result<()> {
        let st = self.stream().clone();
        if plan.stream.as_ref().is_some_and(|s| !Arc::ptr_eq(s, &st)) {
            // Buffers of another device (or context): start over rather than mix them.
            *plan = DecodePlan::default();
        }
        plan.stream = Some(st.clone());
        plan.owner = 0;
        self.fill_lists(plan, tables, selection)?;
        self.fill_items(plan);
        self.upload(plan, &st)?;
        plan.owner = self.id;
        Ok(())
    }

    /// A fresh plan for raw page lists (see [`CudaStorage::plan_pages_into`]).
    pub fn plan_pages(
        &self,
        tables: &[&[PageEntry]],
        selection: Option<&PageSelection>,
    ) -> Result<DecodePlan> {
        let mut p = DecodePlan::default();
        self.plan_pages_into(&mut p, tables, selection)?;
        Ok(p)
    }

    /// Checks that a listed page is a live slot of this storage that the kernels can read.
    fn check_entry(&self, p: &PageEntry) -> Result<()> {
        let ok = match p.tier {
            Tier::Hot => self.hot.is_live(p.slot),
            Tier::Warm => {
                if p.format != self.layout.format() {
                    return Err(Error::internal(format!(
                        "warm page {p:?} is not in this storage's format {:?}",
                        self.layout.format()
                    )));
                }
                self.warm_enabled && self.warm.is_live(p.slot)
            }
            t => {
                return Err(Error::internal(format!(
                    "attention over a page in tier {t:?} (cold and evicted pages must not be \
                     selected)"
                )))
            }
        };
        if !ok || p.n_tokens as usize > self.ps {
            return Err(Error::internal(format!(
                "page {p:?} is not a live slot of this storage"
            )));
        }
        Ok(())
    }

    /// The host page lists (`plan.host_pages`, `plan.list_off`, `plan.sel_pages`) and the lse
    /// layout.
    fn fill_lists(
        &self,
        plan: &mut DecodePlan,
        tables: &[&[PageEntry]],
        selection: Option<&PageSelection>,
    ) -> Result<()> {
        let entry = |p: &PageEntry| -> [u32; 2] {
            let warm = (p.tier == Tier::Warm) as u32;
            [p.slot, (warm << 31) | p.n_tokens]
        };
        plan.n_seqs = tables.len();
        plan.page_counts.clear();
        plan.page_counts.extend(tables.iter().map(|t| t.len()));
        if plan.page_counts.iter().sum::<usize>() > u32::MAX as usize / 2 {
            return Err(Error::Unsupported("more than 2^31 pages in one batch"));
        }
        plan.host_pages.clear();
        plan.host_emap.clear();
        plan.list_off.clear();
        plan.sel_pages.clear();
        plan.per_head = selection.is_some();
        match selection {
            None => {
                for (si, t) in tables.iter().enumerate() {
                    plan.list_off.push(plan.host_pages.len());
                    for p in t.iter() {
                        self.check_entry(p)?;
                        let at = plan.host_pages.len() as u32;
                        plan.host_pages.push(entry(p));
                        plan.host_emap.push([si as u32, at]);
                    }
                }
                plan.lse_stride = self.qh as u32;
                plan.lse_kvcol = self.k.spec.gfull as u32;
            }
            Some(sel) => {
                sel.validate(&plan.page_counts, self.kvh)?;
                let mut first = 0u32;
                for (si, t) in tables.iter().enumerate() {
                    for kv in 0..self.kvh {
                        plan.list_off.push(plan.host_pages.len());
                        let group = (si * self.kvh + kv) as u32;
                        for &pi in sel.pages(si, kv) {
                            let p = &t[pi as usize];
                            self.check_entry(p)?;
                            plan.host_pages.push(entry(p));
                            plan.host_emap.push([group, first + pi]);
                            plan.sel_pages.push(pi);
                        }
                    }
                    first += t.len() as u32;
                }
                plan.lse_stride = self.k.spec.gfull as u32;
                plan.lse_kvcol = 0;
            }
        }
        plan.list_off.push(plan.host_pages.len());
        plan.entries = plan.host_pages.len();
        if plan.entries > u32::MAX as usize / 2 {
            return Err(Error::Unsupported(
                "more than 2^31 page entries in one batch",
            ));
        }
        Ok(())
    }

    /// Work items: per (sequence, kv head, head subgroup), the group's list split into ranges so
    /// that the whole batch fills the device about once.
    fn fill_items(&self, plan: &mut DecodePlan) {
        let spec = &self.k.spec;
        let nsub = spec.nsub();
        let slots = (self.dev.inner.sms * self.k.decode_blocks_per_sm).max(1) as usize;
        // (entry, kv head, subgroup) triples the kernel visits.
        let work = if plan.per_head {
            plan.entries * nsub
        } else {
            plan.entries * self.kvh * nsub
        };
        // Smallest chunk (pages per item) whose items fit one wave: with one CTA per SM, 17 items
        // per kv head on 8 kv heads (136 > 132 slots) would run a second, nearly empty wave and
        // take almost twice as long as 16 items. Item counts fall as the chunk grows, so binary
        // search it; when the groups alone exceed the slots, every group gets one item.
        let items_for = |chunk: usize| -> usize {
            (0..plan.n_seqs)
                .flat_map(|si| (0..self.kvh).map(move |kv| (si, kv)))
                .map(|(si, kv)| {
                    plan.list(si, kv, self.kvh)
                        .1
                        .div_ceil(chunk)
                        .clamp(1, MAX_SPLIT)
                })
                .sum::<usize>()
                * nsub
        };
        let (mut lo, mut hi) = (work.div_ceil(slots).max(spec.nwarps), work.max(1));
        if items_for(lo) > slots {
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if items_for(mid) <= slots {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
        }
        let chunk = lo;
        let mut items = std::mem::take(&mut plan.host_items);
        items.clear();
        let mut group = 0u32;
        for si in 0..plan.n_seqs {
            for kv in 0..self.kvh {
                let (off, np) = plan.list(si, kv, self.kvh);
                let splits = np.div_ceil(chunk).clamp(1, MAX_SPLIT);
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
        }
        plan.n_items = items.len();
        plan.host_items = items;
    }

    /// Sizes the device buffers for the plan and uploads its items, page lists and entry map in
    /// one copy from page-locked memory.
    fn upload(&self, plan: &mut DecodePlan, st: &Arc<CudaStream>) -> Result<()> {
        let (gs, nsub) = (self.k.spec.gs, self.k.spec.nsub());
        let (n_items, entries, n) = (plan.n_items, plan.entries, plan.n_seqs);
        if n_items > i32::MAX as usize {
            return Err(Error::Unsupported("more than 2^31 work items in one batch"));
        }
        let groups = n * self.kvh * nsub;
        let f = 4usize;
        let item_bytes = n_items * std::mem::size_of::<Item>();
        let list_bytes = entries * 8;
        plan.up_pages = item_bytes;
        plan.up_emap = item_bytes + list_bytes;
        let up_bytes = item_bytes + 2 * list_bytes;
        plan.upload.ensure(st, up_bytes.max(1), false)?;
        plan.part_state.ensure(st, n_items * gs * 4 * f, false)?;
        plan.part_acc.ensure(st, n_items * gs * self.d * f, false)?;
        plan.counters.ensure(st, groups * 4, true)?;
        let total_pages: usize = plan.page_counts.iter().sum();
        plan.res_mass = n * self.qh * 4;
        plan.res_lse = plan.res_mass + total_pages * self.kvh;
        plan.res_out = plan.res_lse + entries * plan.lse_stride as usize;
        plan.res_len = plan.res_out + n * self.qh * self.d;
        plan.results.ensure(st, plan.res_len * f, false)?;
        plan.queries.ensure(st, n * self.qh * self.d * f, false)?;
        let ctx = st.context().clone();
        ctx.bind_to_thread().map_err(drv)?;
        // The last upload from the staging buffer must be done before it is written again.
        if let Some(ev) = &plan.ev {
            ev.synchronize().map_err(drv)?;
        }
        if up_bytes > 0 {
            let host = plan.host_up.ensure(&ctx, up_bytes)?;
            fn bytes_of<T>(v: &[T]) -> &[u8] {
                // SAFETY: only called on `Item` (`repr(C)`, ten u32, no padding) and `[u32; 2]`
                // (no padding): every byte is initialised.
                unsafe {
                    std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
                }
            }
            host[..item_bytes].copy_from_slice(bytes_of(&plan.host_items));
            host[plan.up_pages..plan.up_emap].copy_from_slice(bytes_of(&plan.host_pages));
            host[plan.up_emap..up_bytes].copy_from_slice(bytes_of(&plan.host_emap));
            // SAFETY: the device buffer was just sized for `up_bytes`; the page-locked source stays
            // untouched until `plan.ev` (recorded right after) completes, which every later write
            // to it, its growth and its drop wait for.
            unsafe {
                cu::memcpy_htod_async(plan.upload.ptr(), &host[..up_bytes], st.cu_stream())
                    .map_err(drv)?;
            }
        }
        if plan.ev.is_none() {
            plan.ev = Some(ctx.new_event(None).map_err(drv)?);
        }
        if let Some(ev) = &plan.ev {
            ev.record(st).map_err(drv)?;
        }
        Ok(())
    }
}
