//! Backends: where page bytes live and where attention runs.
//!
//! Owns: the [`BackendStorage`] trait (one pool of hot and warm pages for one layer on one device,
//! plus the kernels over it) and the [`BackendDevice`] trait (creates storages), in the candle-core
//! shape, with enum dispatch through [`Storage`] and [`Device`]. Backends not compiled in still exist
//! as stub types (one macro, [`stub_backend!`]) whose constructors return a typed error, so user code
//! and the C ABI need no `cfg`. Methods a backend may lack have default [`Error::Unsupported`] bodies,
//! so adding one is one edit in the trait and one in each backend that implements it.
//!
//! Attention follows regex-automata's split: the storage is an immutable engine (`&self`, usable
//! from several threads), the caller owns a reusable [`Scratch`], and each call passes an
//! [`AttendInput`] (page tables, queries, an optional page selection).
//!
//! The CPU backend is the oracle: every other backend is tested against it on the same inputs.
//! Must never: decide which pages move between tiers (the cache and its policies do), see a cold
//! page (the cache brings cold pages back before a kernel runs), or keep a dequantised copy of a
//! warm page.

pub mod cpu;
pub mod cuda;
pub mod metal;
#[cfg(any(
    feature = "cuda",
    all(feature = "metal", target_vendor = "apple"),
    feature = "metal-emu"
))]
pub(crate) mod prefill;
mod stub;

use crate::attention::{Attention, PageSelection};
use crate::cache::{PageEntry, PageTable, Tier};
use crate::config::{CacheConfig, HotDtype};
use crate::error::{Error, Result};
use crate::quant::WarmFormat;

/// Bytes a storage has allocated, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageBytes {
    /// Hot page payload (K and V, all kv heads).
    pub hot: usize,
    /// Warm page payload: packed codes plus their f16 minimums and steps.
    pub warm: usize,
    /// Pool bookkeeping: slot vectors, free lists.
    pub metadata: usize,
}

/// Where a storage's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLocation {
    Cpu,
    Cuda { ordinal: usize },
    Metal,
}

/// Element type of queries (and of keys/values an engine appends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputDtype {
    F32,
    F16,
    BF16,
}

impl InputDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            InputDtype::F32 => 4,
            InputDtype::F16 | InputDtype::BF16 => 2,
        }
    }
}

/// Query and output buffers in accelerator memory, by backend (each backend defines its own type:
/// no raw handle of one backend appears in the shared trait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceBuffers {
    Cuda(cuda::CudaBuffers),
    Metal(metal::MetalBuffers),
}

/// Keys and values in accelerator memory for [`crate::KvCache::append_device`], by backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRows {
    Cuda(cuda::CudaRows),
}

/// Where one appended row goes: token `pos` of hot page `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotRow {
    pub slot: u32,
    pub pos: u32,
}

/// The portable bytes of one page, for the archive, the cold store and migration between
/// backends. `data` is the page exactly as the storage holds it:
/// - hot: keys then values, each `[num_kv_heads][page_size][head_dim]` in `hot_dtype`
///   (little-endian), the whole page (tokens past `n_tokens` are zero);
/// - warm: `num_kv_heads` head blocks of [`crate::quant::WarmLayout`] for `format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBytes {
    pub tier: Tier,
    pub format: WarmFormat,
    pub n_tokens: u32,
    pub data: Vec<u8>,
}

impl PageBytes {
    /// Bytes held (the payload; the struct itself is metadata).
    pub fn bytes(&self) -> usize {
        self.data.capacity()
    }
}

/// One decode-attention call: one query token per sequence.
#[derive(Debug, Clone, Copy)]
pub struct AttendInput<'a> {
    /// Page tables, one per sequence of the batch. Cold and evicted pages must not be selected.
    pub tables: &'a [&'a PageTable],
    /// `[tables.len(), num_q_heads, head_dim]` f32 (empty for [`BackendStorage::attend_device`]).
    pub queries: &'a [f32],
    /// The pages to attend per sequence and kv head; `None` attends every page.
    pub selection: Option<&'a PageSelection>,
    /// For [`BackendStorage::attend_device`] of a rotated cache: the rotation the backend applies
    /// to the queries (into its own buffer, never the caller's) and, with `values`, back to the
    /// output on the device. Host attention receives queries already rotated (`None`).
    pub rotation: Option<DeviceRotation<'a>>,
}

/// The rotation of one layer, as an accelerator applies it (see [`crate::quant::rotate`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceRotation<'a> {
    /// `head_dim` signs (±1).
    pub signs: &'a [f32],
    /// `1 / sqrt(block)`, the normalisation the host uses (so both give the same bits).
    pub norm: f32,
    /// Values are rotated too: the output is rotated back.
    pub values: bool,
}

/// Caller-owned, reusable working memory for [`BackendStorage::attend`], and what the caller wants
/// back. Each backend keeps its own state and replaces another backend's, so one `Scratch` can serve
/// any storage. A fresh `Scratch::default()` is always valid; reusing one saves allocations (and
/// device uploads).
#[derive(Default)]
pub struct Scratch {
    /// What the calls return per page (see [`PageResults`]).
    page_results: PageResults,
    state: ScratchState,
}

/// What a decode call returns per page besides the output and the head statistics, set on the
/// [`Scratch`] it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageResults {
    /// `page_lse` (per page and q head), `page_mass` and `kv_mass`: the default.
    #[default]
    All,
    /// `page_mass` and `kv_mass`, `page_lse` left empty: what [`crate::KvCache::observe`] and the
    /// policies read, without the `n_pages * q_heads` log-sum-exps (which a GPU copies back).
    Masses,
    /// No per-page results: output and head statistics only.
    None,
}

impl PageResults {
    /// Whether page masses are returned.
    pub fn masses(self) -> bool {
        self != PageResults::None
    }
    /// Whether the per-page log-sum-exps are returned.
    pub fn lse(self) -> bool {
        self == PageResults::All
    }
}

#[derive(Default)]
enum ScratchState {
    #[default]
    Empty,
    Cpu(cpu::CpuScratch),
    Cuda(cuda::CudaScratch),
    /// Boxed: its buffers are several times the other variants.
    Metal(Box<metal::MetalScratch>),
}

impl Scratch {
    /// A scratch whose calls return output and head statistics only ([`PageResults::None`]): the
    /// per-page results (`page_lse`, `page_mass`, `kv_mass`) stay empty, which spares the backend
    /// computing and (on a GPU) folding and copying them back. For decode steps whose caller does
    /// not `observe` or select pages from masses; [`crate::KvCache::observe`] refuses such a
    /// result with [`crate::Error::Stale`].
    pub fn without_page_results() -> Self {
        Self::with_page_results(PageResults::None)
    }
    /// A scratch whose calls return `what` per page.
    pub fn with_page_results(what: PageResults) -> Self {
        Scratch {
            page_results: what,
            state: ScratchState::Empty,
        }
    }
    /// Sets what calls with this scratch return per page (the default: [`PageResults::All`]).
    pub fn set_page_results(&mut self, what: PageResults) {
        self.page_results = what;
    }
    /// What calls with this scratch return per page.
    pub fn page_results(&self) -> PageResults {
        self.page_results
    }
    pub(crate) fn cpu(&mut self) -> &mut cpu::CpuScratch {
        if !matches!(self.state, ScratchState::Cpu(_)) {
            self.state = ScratchState::Cpu(cpu::CpuScratch::default());
        }
        match &mut self.state {
            ScratchState::Cpu(s) => s,
            // Set just above.
            _ => unreachable!(),
        }
    }
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn cuda(&mut self) -> &mut cuda::CudaScratch {
        if !matches!(self.state, ScratchState::Cuda(_)) {
            self.state = ScratchState::Cuda(cuda::CudaScratch::default());
        }
        match &mut self.state {
            ScratchState::Cuda(s) => s,
            // Set just above.
            _ => unreachable!(),
        }
    }
    #[cfg_attr(
        not(any(all(feature = "metal", target_vendor = "apple"), feature = "metal-emu")),
        allow(dead_code)
    )]
    pub(crate) fn metal(&mut self) -> &mut metal::MetalScratch {
        if !matches!(self.state, ScratchState::Metal(_)) {
            self.state = ScratchState::Metal(Box::default());
        }
        match &mut self.state {
            ScratchState::Metal(s) => s,
            // Set just above.
            _ => unreachable!(),
        }
    }
    /// The CUDA state of the last call (`None` before a CUDA call), for plan inspection.
    pub fn cuda_state(&self) -> Option<&cuda::CudaScratch> {
        match &self.state {
            ScratchState::Cuda(s) => Some(s),
            _ => None,
        }
    }
}

fn unsupported<T>(what: &'static str) -> Result<T> {
    Err(Error::Unsupported(what))
}

/// One layer's page pools on one device, and the kernels that read them.
///
/// Slots are stable: a slot index stays valid until freed. Keys and values enter as f32,
/// `[n_tokens, num_kv_heads, head_dim]` row-major, already validated by the cache.
pub trait BackendStorage: Send + Sync {
    /// Where the bytes live.
    fn location(&self) -> DeviceLocation;
    /// Allocates an empty (zeroed) hot page.
    fn alloc_hot(&mut self) -> Result<u32>;
    /// Writes `n` tokens into hot page `slot` starting at token offset `first`.
    fn write_hot(
        &mut self,
        slot: u32,
        first: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()>;
    /// Writes row `r` of `src` (keys and values in accelerator memory, `[rows.len(),
    /// num_kv_heads, head_dim]`) to token `rows[r].pos` of hot page `rows[r].slot`, converted to
    /// the hot dtype and, with `rotation`, rotated as the host rotates appended rows. The backend
    /// checks every element as the cache checks host rows (finite, within the hot dtype, also
    /// after rotation); on a bad element nothing it wrote remains (the rows are zero again, as
    /// tokens past a page's length are) and the error names the element. Slots are live hot pages
    /// and positions lie past their stored tokens (the cache's contract).
    fn write_hot_device(
        &mut self,
        _rows: &[HotRow],
        _src: &DeviceRows,
        _rotation: Option<DeviceRotation>,
    ) -> Result<()> {
        unsupported("append_device needs a CUDA backend")
    }
    /// Quantises the first `n_tokens` of hot page `slot` into a new warm page of `format` and frees
    /// the hot one. Returns `Ok(None)`, leaving the hot page untouched, when its values do not fit
    /// the warm format (beyond f16 range).
    fn demote(&mut self, slot: u32, n_tokens: usize, format: WarmFormat) -> Result<Option<u32>>;
    /// [`BackendStorage::demote`] of several hot pages (`pages[i] = (slot, n_tokens)`, distinct
    /// slots) to `format`: pushes one result per page to `out` (cleared first), in order. On an
    /// error, the pages past those with a result in `out` are untouched. The default demotes one
    /// page at a time; CUDA quantises the whole batch in one launch.
    fn demote_many(
        &mut self,
        pages: &[(u32, usize)],
        format: WarmFormat,
        out: &mut Vec<Option<u32>>,
    ) -> Result<()> {
        out.clear();
        for &(slot, n) in pages {
            let r = self.demote(slot, n, format)?;
            out.push(r);
        }
        Ok(())
    }
    /// Whether [`BackendStorage::demote`] accepts `format` (the config's own always is).
    fn supports_format(&self, format: WarmFormat) -> bool;
    /// Frees a slot of `tier`.
    fn free(&mut self, tier: Tier, slot: u32);
    /// Reads a page back as f32 `(keys, values)`, each `[num_kv_heads, n_tokens, head_dim]`
    /// (dequantised for warm pages). For tests, the archive and debugging, not the hot path.
    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)>;
    /// Per-channel bounds of the keys of warm page `entry` as attention dequantises them, written
    /// to `lo` / `hi` (`[num_kv_heads][head_dim]` each): every stored key satisfies
    /// `lo <= k <= hi`. Read from the page's own quantisation parameters (no payload is decoded);
    /// for query-time elimination (`crate::eliminate`).
    fn warm_key_bounds(&self, _entry: &PageEntry, _lo: &mut [f32], _hi: &mut [f32]) -> Result<()> {
        unsupported("warm_key_bounds on this backend")
    }
    /// Per kv head, a bound on `|v̂ - v|` over every value of warm page `entry` (`v̂` as attention
    /// dequantises it), written to `out` (`[num_kv_heads]`; see `quant::values::value_error_bound`);
    /// from the page's own parameters (no payload is decoded), for certified attention.
    fn warm_value_error(&self, _entry: &PageEntry, _out: &mut [f32]) -> Result<()> {
        unsupported("warm_value_error on this backend")
    }
    /// The page's bytes (see [`PageBytes`]); the page stays where it is.
    fn export_page(&self, _entry: &PageEntry) -> Result<PageBytes> {
        unsupported("export_page on this backend")
    }
    /// [`BackendStorage::export_page`] of several pages (the archive copies of a demotion batch).
    /// The default exports one page at a time; CUDA queues every copy and synchronises once.
    fn export_pages(&mut self, entries: &[PageEntry]) -> Result<Vec<PageBytes>> {
        entries.iter().map(|e| self.export_page(e)).collect()
    }
    /// Allocates a page of `page.tier` holding exactly `page.data`; returns its slot.
    fn import_page(&mut self, _page: &PageBytes) -> Result<u32> {
        unsupported("import_page on this backend")
    }
    /// Decode attention for a batch over the selected (default: all) pages.
    fn attend(&self, scratch: &mut Scratch, input: &AttendInput) -> Result<Attention>;
    /// Decode attention reading queries from and writing the f32 output to accelerator memory.
    /// The returned [`Attention`] carries statistics and page masses; its `output` is empty.
    fn attend_device(
        &self,
        _scratch: &mut Scratch,
        _input: &AttendInput,
        _bufs: &DeviceBuffers,
    ) -> Result<Attention> {
        unsupported("attend_device needs an accelerator backend")
    }
    /// [`BackendStorage::attend_device`] without waiting for it: the work is queued on the
    /// buffers' stream and the call returns; everything this storage does afterwards is ordered
    /// after it. [`BackendStorage::finish_device`] with the same scratch reads the statistics (and
    /// page results); a later call with the scratch replaces the pending one.
    fn attend_device_async(
        &self,
        _scratch: &mut Scratch,
        _input: &AttendInput,
        _bufs: &DeviceBuffers,
    ) -> Result<()> {
        unsupported("attend_device_async needs an accelerator backend")
    }
    /// Waits for the pending [`BackendStorage::attend_device_async`] of `scratch` (queued on
    /// this storage) and returns its result, `output` empty.
    fn finish_device(&self, _scratch: &mut Scratch) -> Result<Attention> {
        unsupported("finish_device needs an accelerator backend")
    }
    /// Causal attention of `n` new tokens over the cached pages of `table` (as stored) plus the
    /// new tokens themselves (exact). `queries` is `[n, num_q_heads, head_dim]`, keys and values
    /// `[n, num_kv_heads, head_dim]`. Returns `[n, num_q_heads, head_dim]`.
    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>>;
    /// Bytes allocated (kept as running counters: O(1)).
    fn bytes(&self) -> StorageBytes;
}

/// Creates storages on a device.
pub trait BackendDevice: Send + Sync {
    /// The storage type of this device.
    type Storage: BackendStorage;
    /// Where the device's storages live.
    fn location(&self) -> DeviceLocation;
    /// Creates the page pools of one layer.
    fn storage(&self, cfg: &CacheConfig, layer: usize) -> Result<Self::Storage>;
}

/// A device, by backend.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    Cuda(cuda::CudaDevice),
    Metal(metal::MetalDevice),
}

impl Device {
    /// Creates the page pools of one layer on this device.
    pub fn storage(&self, cfg: &CacheConfig, layer: usize) -> Result<Storage> {
        Ok(match self {
            Device::Cpu => Storage::Cpu(cpu::CpuDevice.storage(cfg, layer)?),
            Device::Cuda(d) => Storage::Cuda(d.storage(cfg, layer)?),
            Device::Metal(d) => Storage::Metal(d.storage(cfg, layer)?),
        })
    }
    /// Where this device's bytes live.
    pub fn location(&self) -> DeviceLocation {
        match self {
            Device::Cpu => DeviceLocation::Cpu,
            Device::Cuda(d) => d.location(),
            Device::Metal(d) => d.location(),
        }
    }
}

/// A layer's storage, by backend. Variants differ in size only while a backend is a stub; one
/// `Storage` exists per layer, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Storage {
    Cpu(cpu::CpuStorage),
    Cuda(cuda::CudaStorage),
    Metal(metal::MetalStorage),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Storage::Cpu($s) => $e,
            Storage::Cuda($s) => $e,
            Storage::Metal($s) => $e,
        }
    };
}

impl BackendStorage for Storage {
    fn location(&self) -> DeviceLocation {
        dispatch!(self, s => s.location())
    }
    fn alloc_hot(&mut self) -> Result<u32> {
        dispatch!(self, s => s.alloc_hot())
    }
    fn write_hot(
        &mut self,
        slot: u32,
        first: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()> {
        dispatch!(self, s => s.write_hot(slot, first, keys, values, n))
    }
    fn write_hot_device(
        &mut self,
        rows: &[HotRow],
        src: &DeviceRows,
        rotation: Option<DeviceRotation>,
    ) -> Result<()> {
        dispatch!(self, s => s.write_hot_device(rows, src, rotation))
    }
    fn demote(&mut self, slot: u32, n_tokens: usize, format: WarmFormat) -> Result<Option<u32>> {
        dispatch!(self, s => s.demote(slot, n_tokens, format))
    }
    fn demote_many(
        &mut self,
        pages: &[(u32, usize)],
        format: WarmFormat,
        out: &mut Vec<Option<u32>>,
    ) -> Result<()> {
        dispatch!(self, s => s.demote_many(pages, format, out))
    }
    fn supports_format(&self, format: WarmFormat) -> bool {
        dispatch!(self, s => s.supports_format(format))
    }
    fn free(&mut self, tier: Tier, slot: u32) {
        dispatch!(self, s => s.free(tier, slot))
    }
    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        dispatch!(self, s => s.read_page(entry))
    }
    fn warm_key_bounds(&self, entry: &PageEntry, lo: &mut [f32], hi: &mut [f32]) -> Result<()> {
        dispatch!(self, s => s.warm_key_bounds(entry, lo, hi))
    }
    fn warm_value_error(&self, entry: &PageEntry, out: &mut [f32]) -> Result<()> {
        dispatch!(self, s => s.warm_value_error(entry, out))
    }
    fn export_page(&self, entry: &PageEntry) -> Result<PageBytes> {
        dispatch!(self, s => s.export_page(entry))
    }
    fn export_pages(&mut self, entries: &[PageEntry]) -> Result<Vec<PageBytes>> {
        dispatch!(self, s => s.export_pages(entries))
    }
    fn import_page(&mut self, page: &PageBytes) -> Result<u32> {
        dispatch!(self, s => s.import_page(page))
    }
    fn attend(&self, scratch: &mut Scratch, input: &AttendInput) -> Result<Attention> {
        dispatch!(self, s => s.attend(scratch, input))
    }
    fn attend_device(
        &self,
        scratch: &mut Scratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
    ) -> Result<Attention> {
        dispatch!(self, s => s.attend_device(scratch, input, bufs))
    }
    fn attend_device_async(
        &self,
        scratch: &mut Scratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
    ) -> Result<()> {
        dispatch!(self, s => s.attend_device_async(scratch, input, bufs))
    }
    fn finish_device(&self, scratch: &mut Scratch) -> Result<Attention> {
        dispatch!(self, s => s.finish_device(scratch))
    }
    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        dispatch!(self, s => s.prefill(table, queries, keys, values, n))
    }
    fn bytes(&self) -> StorageBytes {
        dispatch!(self, s => s.bytes())
    }
}

/// Bytes of one whole hot page (K and V) of `cfg` in `dtype`.
pub(crate) fn hot_page_bytes(cfg: &CacheConfig, dtype: HotDtype) -> usize {
    2 * cfg.num_kv_heads * cfg.page_size * cfg.head_dim * dtype.size()
}
