//! Prefix sharing: `fork`, beam-search `reorder`, and copy-on-write of shared pages.
//!
//! Owns: [`Shares`] (share groups: the sequences whose page tables name one physical page, at the
//! same index of the same layer, since positions never shift), `fork` and `reorder`, the rule
//! that a shared page's bytes are freed with its last reference, the propagation of a move on a
//! shared page to every sharer (it is one page: it has one tier), and copy-on-write, which gives a
//! sequence a private hot copy before the page is written (truncate into it, then append).
//! Must never: copy a full page at fork (only the partial last page, which the next append
//! writes), or free bytes another sequence still names.
//!
//! Semantics of moves on a shared page: demote, promote, to_cold and from_cold move the page for
//! every sharer (policies and eliminators read per-sequence statistics, but the bytes are one);
//! pins of any sharer count; evict drops only the calling sequence's reference.

use super::meta::Pins;
use super::moves::PageRef;
use super::{KvCache, PageEntry, PageMeta, SeqId, SeqLayer, Sequence, Tier};
use crate::backend::BackendStorage;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Share groups: id → the sequences that name the page (in fork order).
#[derive(Debug, Default)]
pub(crate) struct Shares {
    groups: HashMap<u32, Vec<SeqId>>,
    next: u32,
}

impl Shares {
    /// Drops `seq`'s reference to group `g`; true when it was the last one (free the bytes).
    pub(crate) fn release(&mut self, g: u32, seq: SeqId) -> bool {
        let Some(list) = self.groups.get_mut(&g) else {
            return true;
        };
        list.retain(|&s| s != seq);
        if list.is_empty() {
            self.groups.remove(&g);
            return true;
        }
        false
    }

    /// The sequences of group `g`.
    pub(crate) fn members(&self, g: u32) -> &[SeqId] {
        self.groups.get(&g).map_or(&[], Vec::as_slice)
    }

    fn join(&mut self, existing: Option<u32>, owner: SeqId, new: SeqId) -> u32 {
        match existing {
            Some(g) if self.groups.contains_key(&g) => {
                self.groups.entry(g).or_default().push(new);
                g
            }
            _ => {
                // Ids are reused only after 2^32 groups; a live id is never handed out twice.
                let mut g = self.next;
                while self.groups.contains_key(&g) {
                    g = g.wrapping_add(1);
                }
                self.next = g.wrapping_add(1);
                self.groups.insert(g, vec![owner, new]);
                g
            }
        }
    }

    /// Physical pages named by more than one sequence.
    pub(crate) fn shared_pages(&self) -> usize {
        self.groups.values().filter(|l| l.len() > 1).count()
    }

    /// Heap bytes of the table.
    pub(crate) fn metadata_bytes(&self) -> usize {
        self.groups.capacity() * (std::mem::size_of::<(u32, Vec<SeqId>)>() + 1)
            + self
                .groups
                .values()
                .map(|l| l.capacity() * std::mem::size_of::<SeqId>())
                .sum::<usize>()
    }
}

impl KvCache {
    /// A new sequence holding the same tokens as `seq` in every layer, sharing every full page
    /// with it (no bytes copied; reference-counted, freed with the last sequence naming it). Only
    /// the partial last page of each layer is copied, since the next append writes it. Per-page
    /// statistics, pins and observe steps are copied; from here on each sequence keeps its own.
    /// Errors, with nothing changed: an unknown sequence; the hot budget (one page per layer
    /// with a partial last page).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let src = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let ps = self.cfg.page_size;
        let partial = src
            .layers
            .iter()
            .filter(|sl| !sl.table.len().is_multiple_of(ps))
            .count();
        self.check_hot_budget(partial)?;
        // Copy the partial pages first: the only step that can fail.
        let mut copies: Vec<Option<u32>> = Vec::with_capacity(src.layers.len());
        for (layer, sl) in src.layers.iter().enumerate() {
            let last = sl.table.pages().last().copied();
            let copy = match last {
                Some(e) if (e.n_tokens as usize) < ps => {
                    let storage = &mut self.layers[layer];
                    let made = storage
                        .export_page(&e)
                        .and_then(|b| storage.import_page(&b));
                    match made {
                        Ok(slot) => Some(slot),
                        Err(err) => {
                            for (l, c) in copies.iter().enumerate() {
                                if let Some(slot) = c {
                                    self.layers[l].free(Tier::Hot, *slot);
                                }
                            }
                            return Err(err);
                        }
                    }
                }
                _ => None,
            };
            copies.push(copy);
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let src = self
            .seqs
            .get_mut(&seq)
            .ok_or_else(|| Error::internal("forked sequence vanished"))?;
        let mut layers = Vec::with_capacity(src.layers.len());
        for (sl, copy) in src.layers.iter_mut().zip(copies) {
            let mut table = sl.table.clone();
            let mut meta = sl.meta.clone();
            let n = table.pages().len();
            for (i, (e, m)) in table.pages_mut().iter_mut().zip(&mut meta).enumerate() {
                if i + 1 == n {
                    if let Some(slot) = copy {
                        e.slot = slot;
                        m.archive = None;
                        m.shared = None;
                        continue;
                    }
                }
                if e.tier == Tier::Evicted {
                    m.shared = None;
                    continue;
                }
                let g = self.shares.join(sl.meta[i].shared, seq, id);
                sl.meta[i].shared = Some(g);
                m.shared = Some(g);
            }
            layers.push(SeqLayer {
                table,
                meta,
                steps: sl.steps,
            });
        }
        self.seqs.insert(id, Sequence { layers });
        Ok(id)
    }

    /// Beam-search reorder (the HF Cache API's `reorder_cache`): afterwards `seqs[i]` holds what
    /// `seqs[from[i]]` held before, for every `i`, sharing pages copy-on-write. Sources may repeat
    /// (a beam that spawned two) and be dropped. Errors, with nothing changed: lengths differ, an
    /// index out of range, an unknown or repeated sequence, the hot budget.
    pub fn reorder(&mut self, seqs: &[SeqId], from: &[usize]) -> Result<()> {
        if from.len() != seqs.len() {
            return Err(Error::shape(
                "reorder",
                format!("{} source indices (one per sequence)", seqs.len()),
                from.len(),
            ));
        }
        for (i, s) in seqs.iter().enumerate() {
            if !self.seqs.contains_key(s) {
                return Err(Error::UnknownSequence(s.0));
            }
            if seqs[..i].contains(s) {
                return Err(Error::DuplicateSequence(s.0));
            }
        }
        if let Some(&bad) = from.iter().find(|&&f| f >= seqs.len()) {
            return Err(Error::shape(
                "reorder",
                format!("source indices below {}", seqs.len()),
                bad,
            ));
        }
        // Fork every source once per use; on failure remove the forks made so far.
        let mut forks = Vec::with_capacity(seqs.len());
        for (i, &f) in from.iter().enumerate() {
            if f == i {
                forks.push(None);
                continue;
            }
            match self.fork(seqs[f]) {
                Ok(id) => forks.push(Some(id)),
                Err(e) => {
                    for id in forks.into_iter().flatten() {
                        self.remove_sequence(id)?;
                    }
                    return Err(e);
                }
            }
        }
        // Each fork's contents become seqs[i]'s; the old contents go with the fork's id.
        for (i, fork) in forks.iter().enumerate() {
            let Some(f) = *fork else { continue };
            self.swap_contents(seqs[i], f)?;
        }
        for id in forks.into_iter().flatten() {
            self.remove_sequence(id)?;
        }
        Ok(())
    }

    /// Exchanges the contents of sequences `a` and `b`, share groups included.
    fn swap_contents(&mut self, a: SeqId, b: SeqId) -> Result<()> {
        let la = std::mem::take(
            &mut self
                .seqs
                .get_mut(&a)
                .ok_or(Error::UnknownSequence(a.0))?
                .layers,
        );
        let lb = std::mem::replace(
            &mut self
                .seqs
                .get_mut(&b)
                .ok_or(Error::UnknownSequence(b.0))?
                .layers,
            la,
        );
        self.seqs
            .get_mut(&a)
            .ok_or(Error::UnknownSequence(a.0))?
            .layers = lb;
        for g in self.shares.groups.values_mut() {
            for s in g.iter_mut() {
                if *s == a {
                    *s = b;
                } else if *s == b {
                    *s = a;
                }
            }
        }
        Ok(())
    }

    /// Pins of page `p` in every sequence that shares it.
    pub(crate) fn shared_pins(&self, p: PageRef) -> Result<Pins> {
        let sl = self.seq_layer(p.seq, p.layer)?;
        let m = sl
            .meta
            .get(p.page)
            .ok_or_else(|| Error::internal("page table and metadata disagree"))?;
        let mut pins = m.pins;
        if let Some(g) = m.shared {
            for &s in self.shares.members(g) {
                if let Some(o) = self
                    .seqs
                    .get(&s)
                    .and_then(|q| q.layers[p.layer].meta.get(p.page))
                {
                    pins.insert(o.pins);
                }
            }
        }
        Ok(pins)
    }

    /// After a move of page `p`: every other sequence sharing it names the page's new place.
    pub(crate) fn sync_sharers(&mut self, p: PageRef) -> Result<()> {
        let sl = self.seq_layer(p.seq, p.layer)?;
        let (e, m) = (sl.table.pages()[p.page], sl.meta[p.page].clone());
        let Some(g) = m.shared else {
            return Ok(());
        };
        let others: Vec<SeqId> = self
            .shares
            .members(g)
            .iter()
            .copied()
            .filter(|&s| s != p.seq)
            .collect();
        for s in others {
            let sl = self.seq_layer_mut(s, p.layer)?;
            let (Some(oe), Some(om)) = (
                sl.table.pages_mut().get_mut(p.page),
                sl.meta.get_mut(p.page),
            ) else {
                return Err(Error::internal("a sharer lacks the shared page"));
            };
            *oe = PageEntry {
                n_tokens: oe.n_tokens,
                ..e
            };
            om.archive = m.archive;
            om.bounds.clone_from(&m.bounds);
            om.promoted = m.promoted;
        }
        Ok(())
    }

    /// Copy-on-write: if page `p` is shared, gives `p.seq` a private hot copy of it (exact from
    /// the archive or the hot bytes, else dequantised) and drops its reference; other sharers keep
    /// the page as it was. Returns how the copy was made, `None` when the page was not shared.
    pub(crate) fn unshare_to_hot(&mut self, p: PageRef) -> Result<Option<super::Restored>> {
        let e = self.page(p)?;
        let Some(g) = self.seq_layer(p.seq, p.layer)?.meta[p.page].shared else {
            return Ok(None);
        };
        if self.shares.members(g).len() <= 1 {
            // The last reference: the page is this sequence's alone already.
            self.shares.release(g, p.seq);
            self.meta_mut(p)?.shared = None;
            return Ok(None);
        }
        let (bytes, how) = self.exact_or_dequantised(p, &e)?;
        let slot = self.layers[p.layer].import_page(&bytes)?;
        self.shares.release(g, p.seq);
        self.set_page(
            p,
            PageEntry {
                tier: Tier::Hot,
                slot,
                ..e
            },
        )?;
        let m = self.meta_mut(p)?;
        m.shared = None;
        m.archive = None;
        self.refresh_bounds(p)?;
        Ok(Some(how))
    }
}

/// Whether freeing `m`'s page for `seq` frees its bytes (its last reference); drops the reference.
pub(crate) fn release(shares: &mut Shares, seq: SeqId, m: &PageMeta) -> bool {
    match m.shared {
        Some(g) => shares.release(g, seq),
        None => true,
    }
}
