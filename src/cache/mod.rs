//! The cache: sequences, page tables, per-page metadata, page moves, budgets and attention calls.
//!
//! Owns: [`KvCache`], the map from [`SeqId`] to per-layer [`PageTable`]s and their [`PageMeta`]
//! side tables, input validation, the page-move API ([`KvCache::demote`], [`KvCache::promote`],
//! [`KvCache::evict`], [`KvCache::to_cold`], [`KvCache::from_cold`], [`KvCache::pin`],
//! [`KvCache::apply`]) with the default hot-window policy expressed through it, the lossless
//! archive and the cold store (host RAM, [`crate::cold`]), `observe` (folding attention masses into
//! `PageMeta`), byte budgets checked against what storages really allocated, and the memory report.
//!
//! Every public method validates its input completely before it changes anything, so an error
//! leaves the cache as it was. Must never: touch page bytes directly (the backend storage does),
//! decide retention from statistics (policies return moves; the cache executes them), or panic on
//! caller input.

mod append;
mod append_device;
mod attend;
mod bounds;
mod meta;
mod moves;
mod report;
mod save;
mod share;
mod spill;
mod table;
mod tiering;
mod truncate;

pub use append::Rows;
pub use meta::{KeyBounds, PageMeta, Pins};
pub use moves::{Move, PageRef, Restored};
pub use save::{Saved, SEQUENCE_FORMAT_VERSION};
pub use table::{PageEntry, PageTable, Tier};
pub use truncate::Truncation;

use crate::backend::{Device, Storage};
use crate::cold::{DiskStore, HostPages, Prefetcher};
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::quant::Rotator;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Identifies one sequence (request) in a cache. Ids are never reused within a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One sequence in one layer: its page table, the metadata side table (one entry per page) and the
/// number of observe steps so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct SeqLayer {
    pub(crate) table: PageTable,
    pub(crate) meta: Vec<PageMeta>,
    pub(crate) steps: u64,
}

pub(crate) struct Sequence {
    pub(crate) layers: Vec<SeqLayer>,
}

/// Counters of events that do not fail a call but that a user may want to see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Pages quantised from hot to warm (or to fewer bits).
    pub demotions: u64,
    /// Pages the default policy left hot because they could not be quantised (values beyond f16
    /// range), a budget was full, or memory ran out.
    pub demotions_skipped: u64,
    /// Pages brought back to hot.
    pub promotions: u64,
    /// Pages evicted.
    pub evictions: u64,
    /// Pages moved to the cold tier / back.
    pub to_cold: u64,
    pub from_cold: u64,
    /// Host pages written to disk to keep host RAM within the spill budget.
    pub spills: u64,
    /// Page moves refused because a spill failed with host RAM over the budget (nothing lost).
    pub spill_failures: u64,
    /// Compactions of the page files run, and those that stopped on an I/O error (nothing is
    /// lost: the records not moved stay valid where they are).
    pub compactions: u64,
    pub compaction_failures: u64,
}

/// A paged, tiered KV cache for one model.
pub struct KvCache {
    pub(crate) cfg: CacheConfig,
    pub(crate) device: Device,
    pub(crate) layers: Vec<Storage>,
    pub(crate) seqs: BTreeMap<SeqId, Sequence>,
    pub(crate) next_id: u64,
    pub(crate) counters: CacheCounters,
    /// Exact copies of pages that left the hot tier. Declared before `cold`: dropped first (the
    /// cold store removes the spill directory it shares).
    pub(crate) archive: HostPages,
    /// Bytes of pages in the cold tier (those not already exact in the archive).
    pub(crate) cold: HostPages,
    /// The key/value rotation applied before storage (identity when off).
    pub(crate) rotator: Rotator,
    /// The cache's own thread pool (`CacheConfig::threads`); `None` runs on rayon's global pool.
    pub(crate) pool: Option<std::sync::Arc<rayon::ThreadPool>>,
    /// Pages named by several sequences (`fork`, `reorder`).
    pub(crate) shares: share::Shares,
}

impl KvCache {
    /// A cache on the CPU backend.
    pub fn new(cfg: CacheConfig) -> Result<Self> {
        Self::with_device(cfg, Device::Cpu)
    }

    /// A cache whose pages live on `device`.
    pub fn with_device(cfg: CacheConfig, device: Device) -> Result<Self> {
        cfg.validate()?;
        let layers = (0..cfg.num_layers)
            .map(|l| device.storage(&cfg, l))
            .collect::<Result<_>>()?;
        let rotator = Rotator::new(
            cfg.rotation,
            cfg.num_layers,
            cfg.head_dim,
            cfg.rotation_seed,
        );
        let (archive, cold) = match &cfg.spill {
            None => (HostPages::default(), HostPages::default()),
            Some(sp) => {
                // Unique per process and cache, so caches sharing a directory never collide.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let pid = std::process::id();
                let id = ((pid as u64) << 32) | n;
                let store = |kind: &str| {
                    DiskStore::new(
                        &sp.dir,
                        format!("kvtier-{pid}-{n}-{kind}"),
                        id,
                        sp.disk_bytes.map(|b| b as u64),
                    )
                    .map(|d| d.with_segment_bytes(sp.segment_bytes as u64))
                };
                let mut archive = store("archive")?;
                let mut cold = store("cold")?;
                // `cold` is dropped after `archive` (field order): it removes the directory.
                cold.take_dir_ownership(&mut archive);
                let pf = if sp.prefetch {
                    let p = Prefetcher::new(sp.host_ram_bytes).map_err(|e| Error::Disk {
                        what: "cannot start the prefetch thread".into(),
                        source: e,
                    })?;
                    Some(std::sync::Arc::new(p))
                } else {
                    None
                };
                (
                    HostPages::with_disk(archive, 0, pf.clone()),
                    HostPages::with_disk(cold, 1, pf),
                )
            }
        };
        let pool = match cfg.threads {
            None => None,
            Some(n) => Some(std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("kvtier-{i}"))
                    .build()
                    // Spawning threads fails only when the system is out of resources.
                    .map_err(|_| Error::OutOfMemory {
                        what: "the cache's thread pool",
                        bytes: 0,
                    })?,
            )),
        };
        Ok(KvCache {
            pool,
            shares: Default::default(),
            rotator,
            cfg,
            device,
            layers,
            seqs: BTreeMap::new(),
            next_id: 0,
            counters: CacheCounters::default(),
            archive,
            cold,
        })
    }

    /// Runs `f` on the cache's own pool when it has one (`CacheConfig::threads`), so the kernels'
    /// parallel loops use exactly that many threads.
    pub(crate) fn in_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Threads attention and prefill run on: the cache's pool, or rayon's global pool.
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    /// The rotation this cache applies to keys, queries and values before storage.
    pub fn rotator(&self) -> &Rotator {
        &self.rotator
    }

    /// Queries (`[rows][num_q_heads][head_dim]`) in the basis the cache stores keys in: rotated
    /// when the config rotates keys, borrowed unchanged otherwise. Page key bounds
    /// ([`KvCache::page_key_bounds`]) are in that basis, so bound computations take these.
    pub fn queries_in_key_basis<'a>(&self, layer: usize, queries: &'a [f32]) -> Cow<'a, [f32]> {
        if !self.cfg.rotation.keys() {
            return Cow::Borrowed(queries);
        }
        let mut q = queries.to_vec();
        self.rotator.forward(layer, &mut q);
        Cow::Owned(q)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The device the pages live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The storage of `layer` (for export, migration and backend-level tests).
    pub fn layer_storage(&self, layer: usize) -> Result<&Storage> {
        self.check_layer(layer)?;
        Ok(&self.layers[layer])
    }

    /// Event counters.
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// Starts a new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            id,
            Sequence {
                layers: vec![SeqLayer::default(); self.cfg.num_layers],
            },
        );
        id
    }

    /// Removes a sequence and frees all its pages (device, cold and archive).
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.reset_sequence(seq)?;
        self.seqs.remove(&seq);
        Ok(())
    }

    /// Frees all pages of a sequence and sets its length to 0 in every layer; the id stays valid.
    pub fn reset_sequence(&mut self, seq: SeqId) -> Result<()> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?;
        for (layer, sl) in s.layers.iter_mut().enumerate() {
            let meta = std::mem::take(&mut sl.meta);
            for (p, m) in sl.table.clear().into_iter().zip(meta) {
                free_page(
                    &mut self.layers[layer],
                    &mut self.archive,
                    &mut self.cold,
                    &mut self.shares,
                    seq,
                    &p,
                    &m,
                );
            }
            sl.steps = 0;
        }
        self.auto_compact();
        Ok(())
    }

    /// Live sequence ids, ascending.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Whether `seq` is live.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    pub(crate) fn seq_layer(&self, seq: SeqId, layer: usize) -> Result<&SeqLayer> {
        self.check_layer(layer)?;
        Ok(&self
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?
            .layers[layer])
    }

    pub(crate) fn seq_layer_mut(&mut self, seq: SeqId, layer: usize) -> Result<&mut SeqLayer> {
        self.check_layer(layer)?;
        Ok(&mut self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?
            .layers[layer])
    }

    /// The page table of `seq` in `layer`.
    pub fn page_table(&self, seq: SeqId, layer: usize) -> Result<&PageTable> {
        Ok(&self.seq_layer(seq, layer)?.table)
    }

    /// The per-page metadata of `seq` in `layer`, parallel to its page table.
    pub fn page_meta(&self, seq: SeqId, layer: usize) -> Result<&[PageMeta]> {
        Ok(&self.seq_layer(seq, layer)?.meta)
    }

    /// Observe steps folded into `seq`'s metadata in `layer` so far.
    pub fn observed_steps(&self, seq: SeqId, layer: usize) -> Result<u64> {
        Ok(self.seq_layer(seq, layer)?.steps)
    }

    /// Tokens stored for `seq` in `layer` (evicted positions included: positions never shift).
    pub fn seq_len(&self, seq: SeqId, layer: usize) -> Result<usize> {
        Ok(self.page_table(seq, layer)?.len())
    }

    pub(crate) fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.num_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                num_layers: self.cfg.num_layers,
            });
        }
        Ok(())
    }
}

/// Drops `seq`'s reference to a page; with the last reference, frees whatever the page holds: its
/// device slot, its cold bytes, its archive copy.
pub(crate) fn free_page(
    storage: &mut Storage,
    archive: &mut HostPages,
    cold: &mut HostPages,
    shares: &mut share::Shares,
    seq: SeqId,
    p: &PageEntry,
    m: &PageMeta,
) {
    use crate::backend::BackendStorage;
    if !share::release(shares, seq, m) {
        return;
    }
    match p.tier {
        Tier::Hot | Tier::Warm => storage.free(p.tier, p.slot),
        Tier::Cold => {
            cold.remove(p.slot);
        }
        Tier::Evicted => {}
    }
    if let Some(a) = m.archive {
        archive.remove(a);
    }
}
