//! The cache: sequences, page tables, appends, tiering and attention calls.
//!
//! Owns: [`KvCache`], the map from [`SeqId`] to per-layer [`PageTable`]s, input validation, the
//! demotion of pages that leave the hot window (sinks stay hot), budgets and the memory report.
//! Every public method validates its input completely before it changes anything, so an error
//! leaves the cache as it was. Must never: touch page bytes directly (the backend storage does) or
//! panic on caller input.

use crate::attention::Attention;
use crate::backend::{BackendStorage, Device, DeviceBuffers, Storage};
use crate::config::CacheConfig;
use crate::error::{Error, Result};
use crate::memory::MemoryReport;
use crate::quant::WarmLayout;
use crate::tiers::{demotable, PageEntry, PageTable, Tier};
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

struct Sequence {
    /// One page table per layer.
    tables: Vec<PageTable>,
}

/// Counters of events that do not fail a call but that a user may want to see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Pages quantised from hot to warm.
    pub demotions: u64,
    /// Pages that stayed hot because they could not be quantised (values beyond f16 range) or the
    /// warm tier was full / out of memory.
    pub demotions_skipped: u64,
}

/// A paged, tiered KV cache for one model.
pub struct KvCache {
    cfg: CacheConfig,
    device: Device,
    layers: Vec<Storage>,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: u64,
    hot_pages: usize,
    warm_pages: usize,
    counters: CacheCounters,
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
        Ok(KvCache {
            cfg,
            device,
            layers,
            seqs: BTreeMap::new(),
            next_id: 0,
            hot_pages: 0,
            warm_pages: 0,
            counters: CacheCounters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The device the pages live on.
    pub fn device(&self) -> &Device {
        &self.device
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
                tables: vec![PageTable::default(); self.cfg.num_layers],
            },
        );
        id
    }

    /// Removes a sequence and frees all its pages.
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
        for (layer, table) in s.tables.iter_mut().enumerate() {
            for p in table.clear() {
                match p.tier {
                    Tier::Hot => self.hot_pages -= 1,
                    Tier::Warm => self.warm_pages -= 1,
                    _ => {}
                }
                self.layers[layer].free(p.tier, p.slot);
            }
        }
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

    /// The page table of `seq` in `layer`.
    pub fn page_table(&self, seq: SeqId, layer: usize) -> Result<&PageTable> {
        self.check_layer(layer)?;
        Ok(&self
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?
            .tables[layer])
    }

    /// Tokens stored for `seq` in `layer`.
    pub fn seq_len(&self, seq: SeqId, layer: usize) -> Result<usize> {
        Ok(self.page_table(seq, layer)?.len())
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.num_layers {
            return Err(Error::LayerOutOfRange {
                layer,
                num_layers: self.cfg.num_layers,
            });
        }
        Ok(())
    }

    fn check_rows(&self, what: &'static str, data: &[f32], heads: usize) -> Result<usize> {
        let row = heads * self.cfg.head_dim;
        if !data.len().is_multiple_of(row) {
            return Err(Error::shape(
                what,
                format!("a multiple of {heads} heads x {} dims", self.cfg.head_dim),
                data.len(),
            ));
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { what, index: i });
        }
        Ok(data.len() / row)
    }

    fn hot_page_bytes(&self) -> usize {
        2 * self.cfg.num_kv_heads
            * self.cfg.page_size
            * self.cfg.head_dim
            * self.cfg.hot_dtype.size()
    }

    fn warm_page_bytes(&self) -> usize {
        WarmLayout::of(&self.cfg).head_bytes * self.cfg.num_kv_heads
    }

    /// Appends `n` tokens' keys (post-RoPE) and values, each `[n, num_kv_heads, head_dim]`
    /// row-major, to `seq` in `layer`; then demotes pages that left the hot window. Prefill
    /// appends many tokens at once; decode appends one.
    pub fn append(&mut self, seq: SeqId, layer: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let n = self.check_rows("keys", keys, self.cfg.num_kv_heads)?;
        let nv = self.check_rows("values", values, self.cfg.num_kv_heads)?;
        if n != nv {
            return Err(Error::shape(
                "values",
                format!("{n} tokens (as keys)"),
                format!("{nv} tokens"),
            ));
        }
        let ps = self.cfg.page_size;
        let hot_page_bytes = self.hot_page_bytes();
        let table = &self
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?
            .tables[layer];
        let len = table.len();
        if len + n > self.cfg.max_seq_len {
            return Err(Error::SequenceTooLong {
                seq: seq.0,
                layer,
                requested: len + n,
                max: self.cfg.max_seq_len,
            });
        }
        if n == 0 {
            return Ok(());
        }
        let new_pages = (len + n).div_ceil(ps) - len.div_ceil(ps);
        if let Some(budget) = self.cfg.budgets.hot_bytes {
            let needed = (self.hot_pages + new_pages) * hot_page_bytes;
            if needed > budget {
                return Err(Error::BudgetExceeded {
                    tier: Tier::Hot,
                    needed,
                    budget,
                });
            }
        }
        // Allocate first so a failure changes nothing.
        let storage = &mut self.layers[layer];
        let mut fresh = Vec::with_capacity(new_pages);
        for _ in 0..new_pages {
            match storage.alloc_hot() {
                Ok(slot) => fresh.push(slot),
                Err(e) => {
                    for slot in fresh {
                        storage.free(Tier::Hot, slot);
                    }
                    return Err(e);
                }
            }
        }
        self.hot_pages += new_pages;
        let table = &mut self.seqs.get_mut(&seq).expect("checked above").tables[layer];
        let row = self.cfg.num_kv_heads * self.cfg.head_dim;
        let mut fresh = fresh.into_iter();
        let mut pos = len;
        while pos < len + n {
            let in_page = pos % ps;
            if in_page == 0 {
                let slot = fresh
                    .next()
                    .ok_or_else(|| Error::config("internal", "page count"))?;
                table.push(PageEntry {
                    tier: Tier::Hot,
                    slot,
                    n_tokens: 0,
                });
            }
            let take = (ps - in_page).min(len + n - pos);
            let page = table
                .pages_mut()
                .last_mut()
                .ok_or_else(|| Error::config("internal", "no page"))?;
            let src = (pos - len) * row;
            storage.write_hot(
                page.slot,
                in_page,
                &keys[src..src + take * row],
                &values[src..src + take * row],
                take,
            )?;
            page.n_tokens += take as u32;
            pos += take;
        }
        table.set_len(len + n);
        self.tier_pages(seq, layer);
        Ok(())
    }

    /// Demotes, newest first, every hot page that left the hot window; stops at the first page
    /// that is not hot (older pages were handled by earlier appends).
    fn tier_pages(&mut self, seq: SeqId, layer: usize) {
        if self.cfg.is_protected(layer) {
            return;
        }
        let warm_page_bytes = self.warm_page_bytes();
        let (ps, sinks, window) = (
            self.cfg.page_size,
            self.cfg.sink_tokens,
            self.cfg.hot_window,
        );
        let Some(s) = self.seqs.get_mut(&seq) else {
            return;
        };
        let table = &mut s.tables[layer];
        let len = table.len();
        let storage = &mut self.layers[layer];
        for i in (0..table.pages().len()).rev() {
            if !demotable(i, ps, len, sinks, window) {
                continue;
            }
            let page = table.pages()[i];
            if page.tier != Tier::Hot {
                break;
            }
            if let Some(budget) = self.cfg.budgets.warm_bytes {
                if (self.warm_pages + 1) * warm_page_bytes > budget {
                    self.counters.demotions_skipped += 1;
                    continue;
                }
            }
            match storage.demote(page.slot, page.n_tokens as usize) {
                Ok(Some(slot)) => {
                    table.pages_mut()[i] = PageEntry {
                        tier: Tier::Warm,
                        slot,
                        n_tokens: page.n_tokens,
                    };
                    self.hot_pages -= 1;
                    self.warm_pages += 1;
                    self.counters.demotions += 1;
                }
                // Not representable or out of memory: the page stays hot and exact; nothing is lost.
                Ok(None) | Err(_) => self.counters.demotions_skipped += 1,
            }
        }
    }

    /// Decode attention in `layer` for a batch: `queries` is `[seqs.len(), num_q_heads, head_dim]`,
    /// one query token per sequence, attending to every stored token of that sequence.
    pub fn attend(&self, layer: usize, seqs: &[SeqId], queries: &[f32]) -> Result<Attention> {
        self.check_layer(layer)?;
        let n = self.check_rows("queries", queries, self.cfg.num_q_heads)?;
        if n != seqs.len() {
            return Err(Error::shape(
                "queries",
                format!("{} rows (one per sequence)", seqs.len()),
                format!("{n} rows"),
            ));
        }
        let mut tables = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            if seqs[..i].contains(s) {
                return Err(Error::DuplicateSequence(s.0));
            }
            tables.push(&self.seqs.get(s).ok_or(Error::UnknownSequence(s.0))?.tables[layer]);
        }
        self.layers[layer].attend(&tables, queries)
    }

    /// [`KvCache::attend`] with queries and output in device memory (see [`DeviceBuffers`]).
    /// Only accelerator backends support it; the CPU backend returns [`Error::Unsupported`].
    pub fn attend_device(
        &self,
        layer: usize,
        seqs: &[SeqId],
        bufs: DeviceBuffers,
    ) -> Result<Attention> {
        self.check_layer(layer)?;
        let mut tables = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            if seqs[..i].contains(s) {
                return Err(Error::DuplicateSequence(s.0));
            }
            tables.push(&self.seqs.get(s).ok_or(Error::UnknownSequence(s.0))?.tables[layer]);
        }
        self.layers[layer].attend_device(&tables, bufs)
    }

    /// Chunked prefill: causal attention of `n` new tokens over the cached pages of `seq` (as
    /// stored, so earlier chunks may already be quantised) plus the new tokens (exact), then appends
    /// the new keys and values. `queries` is `[n, num_q_heads, head_dim]`, keys and values
    /// `[n, num_kv_heads, head_dim]`. Returns `[n, num_q_heads, head_dim]`.
    pub fn prefill(
        &mut self,
        seq: SeqId,
        layer: usize,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
    ) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let nq = self.check_rows("queries", queries, self.cfg.num_q_heads)?;
        let nk = self.check_rows("keys", keys, self.cfg.num_kv_heads)?;
        let nv = self.check_rows("values", values, self.cfg.num_kv_heads)?;
        if nq != nk || nk != nv {
            return Err(Error::shape(
                "prefill",
                format!("{nq} tokens in queries, keys and values"),
                format!("{nq}/{nk}/{nv}"),
            ));
        }
        let table = &self
            .seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence(seq.0))?
            .tables[layer];
        if table.len() + nk > self.cfg.max_seq_len {
            return Err(Error::SequenceTooLong {
                seq: seq.0,
                layer,
                requested: table.len() + nk,
                max: self.cfg.max_seq_len,
            });
        }
        let out = self.layers[layer].prefill(table, queries, keys, values, nq)?;
        self.append(seq, layer, keys, values)?;
        Ok(out)
    }

    /// Every stored token of `seq` in `layer` as f32 `(keys, values)`, each `[len, num_kv_heads,
    /// head_dim]` in position order (warm pages dequantised). For tests and debugging.
    pub fn read_tokens(&self, seq: SeqId, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let table = self.page_table(seq, layer)?;
        let (kvh, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let mut ks = vec![0f32; table.len() * kvh * d];
        let mut vs = vec![0f32; table.len() * kvh * d];
        for (i, p) in table.pages().iter().enumerate() {
            let (k, v) = self.layers[layer].read_page(p)?;
            let n = p.n_tokens as usize;
            for h in 0..kvh {
                for t in 0..n {
                    let src = (h * n + t) * d;
                    let dst = ((i * self.cfg.page_size + t) * kvh + h) * d;
                    ks[dst..dst + d].copy_from_slice(&k[src..src + d]);
                    vs[dst..dst + d].copy_from_slice(&v[src..src + d]);
                }
            }
        }
        Ok((ks, vs))
    }

    /// Bytes actually allocated, per tier, metadata included.
    pub fn memory_report(&self) -> MemoryReport {
        let mut r = MemoryReport::default();
        for s in &self.layers {
            let b = s.bytes();
            r.hot_bytes += b.hot;
            r.warm_bytes += b.warm;
            r.metadata_bytes += b.metadata;
        }
        r.metadata_bytes += self.layers.capacity() * std::mem::size_of::<Storage>();
        for seq in self.seqs.values() {
            r.metadata_bytes += std::mem::size_of::<(SeqId, Sequence)>()
                + seq.tables.capacity() * std::mem::size_of::<PageTable>()
                + seq
                    .tables
                    .iter()
                    .map(PageTable::metadata_bytes)
                    .sum::<usize>();
            r.tokens += seq.tables.iter().map(PageTable::len).sum::<usize>();
        }
        r.hot_pages = self.hot_pages;
        r.warm_pages = self.warm_pages;
        r.f16_equivalent_bytes = r.tokens * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * 2;
        r
    }
}
