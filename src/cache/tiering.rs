//! The default policy: the hot-window rule, run after every append, batched per layer.
//!
//! Owns: choosing the hot pages that have left the hot window (`window_leavers`) and demoting all
//! of them in a layer with one backend call (`BackendStorage::demote_many`: one `kvt_quantize`
//! launch on CUDA for a whole decode batch or prefill chunk), archiving each first. Must never:
//! choose pages from statistics (policies do, in `crate::policy`), demote a page that
//! `KvCache::demote` would refuse (pinned, promoted, still being written, over the warm budget:
//! with a warm budget set the pages go one by one),
//! or lose a page when a demotion fails (it stays hot and exact, counted in
//! `demotions_skipped`).

use super::moves::{outside_window, PageRef};
use super::{KvCache, PageEntry, SeqId, Tier};
use crate::backend::BackendStorage;
use crate::quant::WarmFormat;
use std::collections::HashSet;

impl KvCache {
    /// The default policy after an append of `seq` in `layer`: see [`KvCache::tier_batch`].
    pub(crate) fn tier_pages(&mut self, seq: SeqId, layer: usize) {
        self.tier_batch(layer, &[seq]);
    }

    /// The default policy after an append of `seqs` in `layer`: demotes (newest first) each hot
    /// page that has left the hot window (full, not pinned, every token older than `hot_window`),
    /// stopping per sequence at the first page already off the hot tier, all of them in one
    /// backend call. Pages it cannot demote stay hot and exact (counted in `demotions_skipped`).
    pub(crate) fn tier_batch(&mut self, layer: usize, seqs: &[SeqId]) {
        if !self.cfg.warm_enabled || self.cfg.is_protected(layer) {
            return;
        }
        let mut pages = Vec::new();
        for &seq in seqs {
            self.window_leavers(seq, layer, &mut pages);
        }
        if !pages.is_empty() {
            let fmt = self.cfg.warm_format(layer);
            self.demote_hot_batch(layer, &pages, fmt);
        }
    }

    /// Appends to `out` the hot pages of `seq` in `layer` that the hot-window rule demotes.
    fn window_leavers(&self, seq: SeqId, layer: usize, out: &mut Vec<PageRef>) {
        let (ps, window) = (self.cfg.page_size, self.cfg.hot_window);
        let Ok(sl) = self.seq_layer(seq, layer) else {
            return;
        };
        let len = sl.table.len();
        // With shared pages, a hot page may sit below a demoted one (it was still inside another
        // sharer's window), so the walk cannot stop at the first page that is not hot.
        let any_shared = sl.meta.iter().any(|m| m.shared.is_some());
        for i in (0..sl.table.pages().len()).rev() {
            if !outside_window(i, ps, len, window) {
                continue;
            }
            let (e, m) = (sl.table.pages()[i], &sl.meta[i]);
            if e.tier != Tier::Hot {
                if any_shared {
                    continue;
                }
                break;
            }
            if m.pins.any() || m.promoted {
                continue;
            }
            // A shared page leaves the hot tier only once it is outside every sharer's window.
            if let Some(g) = m.shared {
                let inside_some = self.shares.members(g).iter().any(|s| {
                    self.seq_layer(*s, layer)
                        .is_ok_and(|o| !outside_window(i, ps, o.table.len(), window))
                });
                if inside_some {
                    continue;
                }
            }
            out.push(PageRef {
                seq,
                layer,
                page: i,
            });
        }
    }

    /// Demotes the hot pages `pages` of `layer` to `fmt` as [`KvCache::demote`] would one by one
    /// (same checks, archive first), with one `export_pages` and one `demote_many` call for all
    /// that pass. With a warm budget set, page by page instead: what a storage reports as
    /// allocated is its pools' capacity, so only demoting one page and checking again is exact.
    fn demote_hot_batch(&mut self, layer: usize, pages: &[PageRef], fmt: WarmFormat) {
        if self.cfg.budgets.warm_bytes.is_some() {
            for &p in pages {
                if self.page(p).is_ok_and(|e| e.tier == Tier::Hot) && self.demote(p, fmt).is_err() {
                    self.counters.demotions_skipped += 1;
                }
            }
            return;
        }
        if !self.layers[layer].supports_format(fmt) {
            self.counters.demotions_skipped += pages.len() as u64;
            return;
        }
        // Pages that pass demote's checks, with their entries; a page shared by two of these
        // sequences goes once (its sharers follow it).
        let mut passed: Vec<(PageRef, PageEntry)> = Vec::with_capacity(pages.len());
        let mut slots_seen = HashSet::with_capacity(pages.len());
        for &p in pages {
            let Ok(e) = self.page(p) else {
                self.counters.demotions_skipped += 1;
                continue;
            };
            if e.tier == Tier::Hot && slots_seen.contains(&e.slot) {
                continue;
            }
            let ok = e.tier == Tier::Hot
                && self.shared_pins(p).is_ok_and(|pins| !pins.any())
                && !self.is_last_partial(p, &e);
            if !ok {
                self.counters.demotions_skipped += 1;
                continue;
            }
            slots_seen.insert(e.slot);
            passed.push((p, e));
        }
        // The archive copies first, in one export (one synchronisation on CUDA; page by page if
        // that fails); a page whose copy cannot be kept is not demoted.
        let to_archive: Vec<usize> = (0..passed.len())
            .filter(|&i| self.needs_archive(passed[i].0).unwrap_or(false))
            .collect();
        let entries: Vec<PageEntry> = to_archive.iter().map(|&i| passed[i].1).collect();
        let storage = &mut self.layers[layer];
        let mut copies: Vec<Option<_>> = match storage.export_pages(&entries) {
            Ok(c) if c.len() == entries.len() => c.into_iter().map(Some).collect(),
            _ => entries
                .iter()
                .map(|e| storage.export_page(e).ok())
                .collect(),
        };
        // (page, entry, archived here) of every page that goes to the backend, and its job.
        let mut chosen = Vec::with_capacity(passed.len());
        let mut jobs = Vec::with_capacity(passed.len());
        for (i, &(p, e)) in passed.iter().enumerate() {
            let archived = match to_archive.binary_search(&i) {
                Ok(k) => {
                    let kept = copies
                        .get_mut(k)
                        .and_then(Option::take)
                        .is_some_and(|b| self.archive_insert(p, b).is_ok());
                    if !kept {
                        self.counters.demotions_skipped += 1;
                        continue;
                    }
                    true
                }
                Err(_) => false,
            };
            chosen.push((p, e, archived));
            jobs.push((e.slot, e.n_tokens as usize));
        }
        if jobs.is_empty() {
            return;
        }
        let storage = &mut self.layers[layer];
        let mut slots = Vec::with_capacity(jobs.len());
        // On an error the pages past the results it returned are untouched (hot, as they were):
        // those go page by page (a pool that cannot grow by the whole batch may still have room
        // for some of them).
        if storage.demote_many(&jobs, fmt, &mut slots).is_err() {
            for &(slot, n) in &jobs[slots.len()..] {
                slots.push(storage.demote(slot, n, fmt).ok().flatten());
            }
        }
        for (i, &(p, e, archived)) in chosen.iter().enumerate() {
            match slots.get(i).copied().flatten() {
                Some(slot) => {
                    if self.finish_demotion(p, e, slot, fmt).is_err() {
                        self.counters.demotions_skipped += 1;
                    }
                }
                None => {
                    if archived {
                        let _ = self.unarchive(p);
                    }
                    self.counters.demotions_skipped += 1;
                }
            }
        }
    }
}
