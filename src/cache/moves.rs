//! Page moves: the one API through which pages change tier, and the default policy built on it.
//!
//! Owns: [`PageRef`], [`Move`], the move methods of [`KvCache`] (each validated completely before it
//! changes anything) and the archive writes that make demotion lossless (the hot-window rule
//! built on them is `tiering.rs`). Must never: choose pages from statistics (policies do, in
//! `crate::policy`), or leave a page in two tiers at once.
//!
//! Tier moves:
//!
//! | move | from | to | bytes |
//! |---|---|---|---|
//! | `demote(p, fmt)` | hot | warm (`fmt`) | exact copy archived first (archive on) |
//! | `demote(p, fmt)` | warm | warm, fewer bits | requantised from the archive (exact) or, without one, from the dequantised page |
//! | `promote(p)` | warm / cold | hot | restored exactly from the archive; without one, dequantised ([`Restored::Dequantised`]) |
//! | `evict(p)` | hot / warm / cold | evicted | everything freed, archive copy included |
//! | `to_cold(p)` | hot / warm | cold (host RAM) | warm: the quantised copy; hot: the archive copy (archive on) or the exact bytes |
//! | `from_cold(p)` | cold | the tier it left | imported back |
//! | `pin(p)` / `unpin(p)` | any | same | pinned (and sink) pages refuse demote, evict and to_cold; pages of protected layers refuse demote |

use super::meta::{KeyBounds, Pins};
use super::{free_page, KvCache, PageEntry, SeqId, Tier};
use crate::backend::{BackendStorage, PageBytes};
use crate::cold::DiskStep;
use crate::error::{Error, Result};
use crate::quant::{WarmFormat, WarmLayout};
use std::borrow::Cow;

/// Cold slot value meaning "the cold form is the page's archive copy" (nothing else stored).
pub(crate) const IN_ARCHIVE: u32 = u32::MAX;

/// One page of one sequence in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRef {
    pub seq: SeqId,
    pub layer: usize,
    /// Page index in the sequence's page table (positions `page * page_size ..`).
    pub page: usize,
}

/// A page move a policy can request; [`KvCache::apply`] executes a list of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    Demote(PageRef, WarmFormat),
    Promote(PageRef),
    Evict(PageRef),
    ToCold(PageRef),
    FromCold(PageRef),
    Pin(PageRef),
    Unpin(PageRef),
}

impl Move {
    /// The page the move acts on.
    pub fn page(&self) -> PageRef {
        match *self {
            Move::Demote(p, _)
            | Move::Promote(p)
            | Move::Evict(p)
            | Move::ToCold(p)
            | Move::FromCold(p)
            | Move::Pin(p)
            | Move::Unpin(p) => p,
        }
    }
}

/// How a promoted page's contents were restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// Bit for bit, from the archive (or from exact cold bytes).
    Exact,
    /// From the quantised copy (no archive): within the quantisation bound of the page.
    Dequantised,
}

fn invalid(op: &'static str, p: PageRef, reason: impl Into<String>) -> Error {
    Error::InvalidMove {
        op,
        seq: p.seq.0,
        layer: p.layer,
        page: p.page,
        reason: reason.into(),
    }
}

impl KvCache {
    /// The entry of page `p` (validating the reference).
    pub fn page(&self, p: PageRef) -> Result<PageEntry> {
        let sl = self.seq_layer(p.seq, p.layer)?;
        sl.table
            .pages()
            .get(p.page)
            .copied()
            .ok_or(Error::UnknownPage {
                seq: p.seq.0,
                layer: p.layer,
                page: p.page,
                n_pages: sl.table.pages().len(),
            })
    }

    pub(crate) fn set_page(&mut self, p: PageRef, e: PageEntry) -> Result<()> {
        let sl = self.seq_layer_mut(p.seq, p.layer)?;
        let slot = sl
            .table
            .pages_mut()
            .get_mut(p.page)
            .ok_or_else(|| Error::internal("page vanished during a move"))?;
        *slot = e;
        Ok(())
    }

    pub(crate) fn meta_mut(&mut self, p: PageRef) -> Result<&mut super::PageMeta> {
        self.seq_layer_mut(p.seq, p.layer)?
            .meta
            .get_mut(p.page)
            .ok_or_else(|| Error::internal("page table and metadata disagree"))
    }

    fn own_pins(&self, p: PageRef) -> Result<Pins> {
        Ok(self.seq_layer(p.seq, p.layer)?.meta[p.page].pins)
    }

    pub(super) fn is_last_partial(&self, p: PageRef, e: &PageEntry) -> bool {
        let n = self
            .seq_layer(p.seq, p.layer)
            .map_or(0, |s| s.table.pages().len());
        p.page + 1 == n && (e.n_tokens as usize) < self.cfg.page_size
    }

    /// Exact bytes of `p` as the archive keeps them: its archive copy, or (hot) its device bytes.
    fn archive_copy(&self, p: PageRef, e: &PageEntry) -> Result<Option<PageBytes>> {
        if let Some(id) = self.seq_layer(p.seq, p.layer)?.meta[p.page].archive {
            return Ok(Some(self.archive.get(id)?.into_owned()));
        }
        if e.tier == Tier::Hot {
            return Ok(Some(self.layers[p.layer].export_page(e)?));
        }
        Ok(None)
    }

    /// Page `p`'s exact bytes (its archive copy, or the hot page itself), `None` when only
    /// quantised or no contents remain (warm without an archive, evicted).
    pub(crate) fn exact_page(&self, p: PageRef) -> Result<Option<PageBytes>> {
        let e = self.page(p)?;
        match e.tier {
            Tier::Hot | Tier::Warm | Tier::Cold => self.archive_copy(p, &e),
            _ => Ok(None),
        }
    }

    /// Page `p`'s contents as hot bytes: exact (its archive copy, hot bytes, or exact cold bytes)
    /// or else dequantised from its warm codes (on the device or in the cold store).
    pub(crate) fn exact_or_dequantised(
        &self,
        p: PageRef,
        e: &PageEntry,
    ) -> Result<(PageBytes, Restored)> {
        if let Some(b) = self.archive_copy(p, e)? {
            return Ok((b, Restored::Exact));
        }
        match e.tier {
            Tier::Warm => Ok((
                self.dequantised_hot_bytes(&self.layers[p.layer], e)?,
                Restored::Dequantised,
            )),
            Tier::Cold => {
                let b = self.cold_bytes(p, e)?.into_owned();
                if b.tier == Tier::Hot {
                    return Ok((b, Restored::Exact));
                }
                let mut tmp = crate::backend::cpu::CpuStorage::new(&self.cfg);
                let slot = tmp.import_page(&b)?;
                let w = PageEntry {
                    tier: Tier::Warm,
                    slot,
                    format: b.format,
                    ..*e
                };
                Ok((self.dequantised_hot_bytes(&tmp, &w)?, Restored::Dequantised))
            }
            t => Err(Error::internal(format!("no contents for a {t:?} page"))),
        }
    }

    /// The cold budget bounds host memory: the cold store and the archive.
    fn check_cold_budget(&self, more: usize) -> Result<()> {
        within(Tier::Cold, self.cfg.budgets.cold_bytes, || {
            self.cold.bytes() + self.archive.bytes() + more
        })
    }

    pub(crate) fn check_warm_budget(&self, fmt: WarmFormat, freed: usize) -> Result<()> {
        within(Tier::Warm, self.cfg.budgets.warm_bytes, || {
            let page = WarmLayout::of_format(&self.cfg, fmt).head_bytes * self.cfg.num_kv_heads;
            (self.warm_bytes_allocated() + page).saturating_sub(freed)
        })
    }

    /// Makes page `p` (entry `e`) the warm page `slot` of format `fmt`.
    fn set_warm(&mut self, p: PageRef, e: PageEntry, slot: u32, fmt: WarmFormat) -> Result<()> {
        self.set_page(
            p,
            PageEntry {
                tier: Tier::Warm,
                slot,
                format: fmt,
                ..e
            },
        )?;
        self.meta_mut(p)?.warm_bounds.clear();
        Ok(())
    }

    /// Records hot page `p` (entry `e`) as demoted to warm page `slot` of `fmt`, for its sharers too.
    pub(super) fn finish_demotion(
        &mut self,
        p: PageRef,
        e: PageEntry,
        slot: u32,
        fmt: WarmFormat,
    ) -> Result<()> {
        self.set_warm(p, e, slot, fmt)?;
        let m = self.meta_mut(p)?;
        m.bounds = None;
        m.promoted = false;
        self.counters.demotions += 1;
        self.sync_sharers(p)
    }

    /// Quantises page `p` (hot) to warm format `fmt`, or requantises a warm page to fewer bits.
    /// With the archive on, the exact bytes are archived first, so nothing is lost.
    pub fn demote(&mut self, p: PageRef, fmt: WarmFormat) -> Result<()> {
        let e = self.page(p)?;
        if !self.cfg.warm_enabled {
            return Err(invalid(
                "demote",
                p,
                "the warm tier is disabled (full-precision config)",
            ));
        }
        if self.shared_pins(p)?.any() {
            return Err(invalid("demote", p, "the page is pinned"));
        }
        if !self.layers[p.layer].supports_format(fmt) {
            return Err(invalid(
                "demote",
                p,
                format!("this backend cannot store warm pages of {fmt:?}"),
            ));
        }
        match e.tier {
            Tier::Hot => {
                if self.is_last_partial(p, &e) {
                    return Err(invalid("demote", p, "the page is still being written"));
                }
                self.check_warm_budget(fmt, 0)?;
                let archived = self.archive_hot(p, &e)?;
                match self.layers[p.layer].demote(e.slot, e.n_tokens as usize, fmt) {
                    Ok(Some(slot)) => self.finish_demotion(p, e, slot, fmt),
                    other => {
                        if archived {
                            self.unarchive(p)?;
                        }
                        match other {
                            Err(err) => Err(err),
                            _ => Err(invalid(
                                "demote",
                                p,
                                "values beyond the f16 range of warm minimums and steps",
                            )),
                        }
                    }
                }
            }
            Tier::Warm => {
                if fmt == e.format || !fmt.no_wider_than(e.format) {
                    return Err(invalid(
                        "demote",
                        p,
                        format!(
                            "a warm page of {:?} can only go to fewer bits, not {fmt:?}",
                            e.format
                        ),
                    ));
                }
                let old =
                    WarmLayout::of_format(&self.cfg, e.format).head_bytes * self.cfg.num_kv_heads;
                self.check_warm_budget(fmt, old)?;
                // Exact source when archived; otherwise the dequantised page (lossy on lossy).
                let src = match self.archive_copy(p, &e)? {
                    Some(b) => b,
                    None => self.dequantised_hot_bytes(&self.layers[p.layer], &e)?,
                };
                let storage = &mut self.layers[p.layer];
                let hot = storage.import_page(&src)?;
                match storage.demote(hot, e.n_tokens as usize, fmt) {
                    Ok(Some(slot)) => {
                        storage.free(Tier::Warm, e.slot);
                        self.set_warm(p, e, slot, fmt)?;
                        self.counters.demotions += 1;
                        self.sync_sharers(p)
                    }
                    Ok(None) => {
                        storage.free(Tier::Hot, hot);
                        Err(invalid("demote", p, "values beyond the f16 range"))
                    }
                    Err(err) => {
                        storage.free(Tier::Hot, hot);
                        Err(err)
                    }
                }
            }
            t => Err(invalid("demote", p, format!("the page is {t:?}"))),
        }
    }

    /// Archives hot page `p` if the archive is on and it has no copy yet; returns whether it did.
    pub(super) fn archive_hot(&mut self, p: PageRef, e: &PageEntry) -> Result<bool> {
        if !self.needs_archive(p)? {
            return Ok(false);
        }
        let bytes = self.layers[p.layer].export_page(e)?;
        self.archive_insert(p, bytes)?;
        Ok(true)
    }

    /// Whether demoting `p` must archive it first (the archive is on and holds no copy yet).
    pub(super) fn needs_archive(&self, p: PageRef) -> Result<bool> {
        Ok(self.cfg.archive
            && self.seq_layer(p.seq, p.layer)?.meta[p.page]
                .archive
                .is_none())
    }

    /// Stores `bytes` (page `p` as exported) as `p`'s archive copy, within the cold budget.
    pub(super) fn archive_insert(&mut self, p: PageRef, bytes: PageBytes) -> Result<()> {
        self.check_cold_budget(bytes.bytes())?;
        let id = self.host_insert(true, bytes, p.layer)?;
        self.meta_mut(p)?.archive = Some(id);
        Ok(())
    }

    pub(super) fn unarchive(&mut self, p: PageRef) -> Result<()> {
        if let Some(id) = self.meta_mut(p)?.archive.take() {
            self.archive.remove(id);
        }
        Ok(())
    }

    /// A hot page's bytes holding the dequantised contents of warm page `e`.
    fn dequantised_hot_bytes(
        &self,
        storage: &impl BackendStorage,
        e: &PageEntry,
    ) -> Result<PageBytes> {
        let (k, v) = storage.read_page(e)?;
        let mut tmp = crate::backend::cpu::CpuStorage::new(&self.cfg);
        let slot = tmp.alloc_hot()?;
        let (kvh, d, n) = (
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            e.n_tokens as usize,
        );
        // read_page gives [kv_heads][n][d]; write_hot takes [n][kv_heads][d].
        let mut kr = vec![0f32; n * kvh * d];
        let mut vr = vec![0f32; n * kvh * d];
        for h in 0..kvh {
            for t in 0..n {
                let (src, dst) = ((h * n + t) * d, (t * kvh + h) * d);
                kr[dst..dst + d].copy_from_slice(&k[src..src + d]);
                vr[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        tmp.write_hot(slot, 0, &kr, &vr, n)?;
        let mut b = tmp.export_page(&PageEntry {
            tier: Tier::Hot,
            slot,
            ..*e
        })?;
        b.n_tokens = e.n_tokens;
        Ok(b)
    }

    /// Brings page `p` (warm or cold) back to the hot tier: exactly from the archive when it has a
    /// copy, otherwise from its quantised bytes.
    pub fn promote(&mut self, p: PageRef) -> Result<Restored> {
        let mut e = self.page(p)?;
        match e.tier {
            Tier::Hot => return Err(invalid("promote", p, "the page is already hot")),
            Tier::Evicted => return Err(invalid("promote", p, "the page was evicted")),
            _ => {}
        }
        self.check_hot_budget(1)?;
        if e.tier == Tier::Cold {
            // Bring it to the device in the form it left in, then go on from there.
            self.from_cold(p)?;
            e = self.page(p)?;
            if e.tier == Tier::Hot {
                self.meta_mut(p)?.promoted = true;
                self.counters.promotions += 1;
                self.sync_sharers(p)?;
                return Ok(Restored::Exact);
            }
        }
        let (src, how) = self.exact_or_dequantised(p, &e)?;
        let slot = self.layers[p.layer].import_page(&src)?;
        self.layers[p.layer].free(Tier::Warm, e.slot);
        self.set_page(
            p,
            PageEntry {
                tier: Tier::Hot,
                slot,
                ..e
            },
        )?;
        self.unarchive(p)?;
        self.refresh_bounds(p)?;
        self.meta_mut(p)?.warm_bounds.clear();
        self.meta_mut(p)?.promoted = true;
        self.counters.promotions += 1;
        self.sync_sharers(p)?;
        Ok(how)
    }

    /// Recomputes the key bounds of hot page `p` from its stored keys.
    pub(crate) fn refresh_bounds(&mut self, p: PageRef) -> Result<()> {
        let e = self.page(p)?;
        let (k, _) = self.layers[p.layer].read_page(&e)?;
        let (kvh, d, n) = (
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            e.n_tokens as usize,
        );
        let mut b = KeyBounds::empty(kvh * d);
        // Token-major rows `[n][kvh * d]` from the head-major page, widened in one call.
        let mut rows = vec![0f32; n * kvh * d];
        for t in 0..n {
            for h in 0..kvh {
                rows[(t * kvh + h) * d..(t * kvh + h + 1) * d]
                    .copy_from_slice(&k[(h * n + t) * d..(h * n + t + 1) * d]);
            }
        }
        b.extend(&rows);
        self.meta_mut(p)?.bounds = Some(b);
        Ok(())
    }

    /// Drops page `p` for good: its device bytes, cold bytes and archive copy are freed; its
    /// positions stay (the sequence length does not change) and are never attended again.
    pub fn evict(&mut self, p: PageRef) -> Result<()> {
        let e = self.page(p)?;
        if e.tier == Tier::Evicted {
            return Err(invalid("evict", p, "the page was already evicted"));
        }
        if self.own_pins(p)?.blocks_removal() {
            return Err(invalid("evict", p, "the page is pinned"));
        }
        if self.is_last_partial(p, &e) {
            return Err(invalid("evict", p, "the page is still being written"));
        }
        let m = self.seq_layer(p.seq, p.layer)?.meta[p.page].clone();
        free_page(
            &mut self.layers[p.layer],
            &mut self.archive,
            &mut self.cold,
            &mut self.shares,
            p.seq,
            &e,
            &m,
        );
        self.set_page(
            p,
            PageEntry {
                tier: Tier::Evicted,
                slot: 0,
                ..e
            },
        )?;
        let m = self.meta_mut(p)?;
        m.archive = None;
        m.bounds = None;
        m.shared = None;
        m.warm_bounds.clear();
        self.counters.evictions += 1;
        Ok(())
    }

    /// Moves page `p` (hot or warm) off the device into host RAM. Attention still reads it (the
    /// cache brings it back for the step); [`KvCache::from_cold`] or [`KvCache::promote`] return it.
    pub fn to_cold(&mut self, p: PageRef) -> Result<()> {
        let e = self.page(p)?;
        if !matches!(e.tier, Tier::Hot | Tier::Warm) {
            return Err(invalid("to_cold", p, format!("the page is {:?}", e.tier)));
        }
        if self.shared_pins(p)?.blocks_removal() {
            return Err(invalid("to_cold", p, "the page is pinned"));
        }
        if self.is_last_partial(p, &e) {
            return Err(invalid("to_cold", p, "the page is still being written"));
        }
        let slot = if e.tier == Tier::Hot && self.cfg.archive {
            // The archive copy is the cold form: nothing stored twice.
            self.archive_hot(p, &e)?;
            IN_ARCHIVE
        } else {
            let bytes = self.layers[p.layer].export_page(&e)?;
            self.check_cold_budget(bytes.bytes())?;
            self.host_insert(false, bytes, p.layer)?
        };
        self.layers[p.layer].free(e.tier, e.slot);
        self.set_page(
            p,
            PageEntry {
                tier: Tier::Cold,
                slot,
                ..e
            },
        )?;
        self.counters.to_cold += 1;
        self.sync_sharers(p)
    }

    /// Where the bytes of cold page `e` of `p` are: `(true, archive id)` when its archive copy is
    /// its cold form, `(false, cold slot)` otherwise.
    pub(crate) fn cold_id(&self, p: PageRef, e: &PageEntry) -> Result<(bool, u32)> {
        if e.slot != IN_ARCHIVE {
            return Ok((false, e.slot));
        }
        let id = self.seq_layer(p.seq, p.layer)?.meta[p.page]
            .archive
            .ok_or_else(|| Error::internal("cold page in the archive has no archive copy"))?;
        Ok((true, id))
    }

    /// The bytes of cold page `e` of `p` (its cold copy, or its archive copy), read back and
    /// checked when they were spilled to disk.
    pub(crate) fn cold_bytes(&self, p: PageRef, e: &PageEntry) -> Result<Cow<'_, PageBytes>> {
        self.cold_bytes_counted(p, e, &mut DiskStep::default())
    }

    /// [`KvCache::cold_bytes`], adding what a disk read cost to `step`.
    pub(crate) fn cold_bytes_counted(
        &self,
        p: PageRef,
        e: &PageEntry,
        step: &mut DiskStep,
    ) -> Result<Cow<'_, PageBytes>> {
        match self.cold_id(p, e)? {
            (true, id) => self.archive.get_counted(id, step),
            (false, id) => self.cold.get_counted(id, step),
        }
    }

    /// Tier and format of cold page `e` of `p`, without reading its bytes.
    fn cold_info(&self, p: PageRef, e: &PageEntry) -> Result<(Tier, WarmFormat)> {
        let info = match self.cold_id(p, e)? {
            (true, id) => self.archive.info(id),
            (false, id) => self.cold.info(id),
        };
        info.map(|(t, f, _)| (t, f))
            .ok_or_else(|| Error::internal("cold page bytes missing"))
    }

    /// Brings cold page `p` back to the device, in the tier it left.
    pub fn from_cold(&mut self, p: PageRef) -> Result<()> {
        let e = self.page(p)?;
        if e.tier != Tier::Cold {
            return Err(invalid("from_cold", p, format!("the page is {:?}", e.tier)));
        }
        let (tier, format) = self.cold_info(p, &e)?;
        match tier {
            Tier::Hot => self.check_hot_budget(1)?,
            _ => self.check_warm_budget(format, 0)?,
        }
        // Disjoint fields: the cold store / archive are read while the storage imports.
        let (in_archive, id) = self.cold_id(p, &e)?;
        let bytes = if in_archive {
            self.archive.get(id)
        } else {
            self.cold.get(id)
        }?;
        let slot = self.layers[p.layer].import_page(&bytes)?;
        drop(bytes);
        if in_archive {
            // Exact again on the device: the archive copy is no longer needed.
            self.unarchive(p)?;
        } else {
            self.cold.remove(e.slot);
        }
        self.set_page(p, PageEntry { tier, slot, ..e })?;
        self.counters.from_cold += 1;
        self.sync_sharers(p)
    }

    /// Pins page `p`: it refuses demote, evict and to_cold until unpinned.
    pub fn pin(&mut self, p: PageRef) -> Result<()> {
        self.page(p)?;
        self.meta_mut(p)?.pins.insert(Pins::USER);
        Ok(())
    }

    /// Removes the caller's pin of page `p` (sink and protected-layer pins stay: they follow the
    /// config).
    pub fn unpin(&mut self, p: PageRef) -> Result<()> {
        self.page(p)?;
        self.meta_mut(p)?.pins.remove(Pins::USER);
        Ok(())
    }

    /// Executes `moves` in order. All are validated first (page references, duplicates of one
    /// page); each move then validates its own state (tier, pins, budgets) before it changes
    /// anything. On the first failing move the call stops and returns its error: the moves before
    /// it stay applied and the rest are not run; `Ok(n)` means all `n` ran.
    pub fn apply(&mut self, moves: &[Move]) -> Result<usize> {
        for (i, m) in moves.iter().enumerate() {
            let p = m.page();
            self.page(p)?;
            if moves[..i].iter().any(|o| o.page() == p) {
                return Err(invalid(
                    "apply",
                    p,
                    "the page appears in two moves of one batch",
                ));
            }
        }
        self.prefetch_moves(moves);
        for m in moves {
            match *m {
                Move::Demote(p, f) => self.demote(p, f)?,
                Move::Promote(p) => {
                    self.promote(p)?;
                }
                Move::Evict(p) => self.evict(p)?,
                Move::ToCold(p) => self.to_cold(p)?,
                Move::FromCold(p) => self.from_cold(p)?,
                Move::Pin(p) => self.pin(p)?,
                Move::Unpin(p) => self.unpin(p)?,
            }
        }
        self.auto_compact();
        Ok(moves.len())
    }
}

/// `Ok` when the bytes `needed()` would make fit `budget`. `None` is unlimited, and then nothing is
/// summed: appends with no budget do not walk the layers' storages.
pub(crate) fn within(
    tier: Tier,
    budget: Option<usize>,
    needed: impl FnOnce() -> usize,
) -> Result<()> {
    let Some(budget) = budget else {
        return Ok(());
    };
    let needed = needed();
    if needed > budget {
        return Err(Error::BudgetExceeded {
            tier,
            needed,
            budget,
        });
    }
    Ok(())
}

/// Whether page `index` of a sequence of `len` tokens is full and every token in it is older than
/// the `hot_window` most recent ones. A window of any size (up to `usize::MAX`) means "keep all".
pub(crate) fn outside_window(
    index: usize,
    page_size: usize,
    len: usize,
    hot_window: usize,
) -> bool {
    let end = index.saturating_mul(page_size).saturating_add(page_size);
    end <= len && end.saturating_add(hot_window) <= len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rule() {
        assert!(!outside_window(0, 32, 159, 128));
        assert!(outside_window(0, 32, 160, 128));
        // a partial page is never outside.
        assert!(!outside_window(3, 32, 100, 0));
        assert!(outside_window(2, 32, 96, 0));
        // a huge window keeps everything (no overflow).
        assert!(!outside_window(0, 32, 10_000, usize::MAX));
    }
}
