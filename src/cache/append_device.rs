//! Appends whose keys and values are in accelerator memory: a batch of sequences (decode: one
//! token each; prefill: a chunk) in one launch, without a host copy of a single element.
//!
//! Owns: [`KvCache::append_device`]: validation of the whole batch (ids, duplicates, counts,
//! lengths, the hot budget) before anything changes, hot-page allocation for every sequence, the
//! row map (the slot and token each row goes to) handed to the backend, the commit of the new
//! lengths once the backend has checked every element, and the default policy afterwards. Must
//! never: change a sequence when any part of the batch fails (fresh pages are freed again, the
//! backend leaves no row behind), or claim key bounds for tokens it never saw on the host (the
//! pages they land in lose their hot summary: elimination attends them).

use super::append::start_page;
use super::{KvCache, SeqId, Tier};
use crate::backend::{BackendStorage, DeviceLocation, DeviceRotation, DeviceRows, HotRow};
use crate::error::{Error, Result};

impl KvCache {
    /// Appends, for each `(seq, n)` of `batch`, `n` tokens to `seq` in `layer` from keys and
    /// values in device memory (`rows`: `[sum of n, num_kv_heads, head_dim]`, the rows of the
    /// batch's entries one after another), then runs the default policy. The engine's K/V
    /// projections can stay on the device: the backend converts them to the hot dtype (and
    /// rotates them for a rotated cache) in one launch on the caller's stream, and the stored
    /// bytes equal those of [`KvCache::append_rows`] with the same values.
    ///
    /// Every element is checked as a host append checks it (finite, within the hot dtype, also
    /// after rotation); a bad one fails the whole batch with [`Error::NonFinite`] or
    /// [`Error::OutOfRange`] naming its index in `rows`, and no sequence changes. The call waits
    /// for the caller's stream (one synchronisation) to read that check. CUDA caches only; other
    /// backends return [`Error::Unsupported`].
    pub fn append_device(
        &mut self,
        layer: usize,
        batch: &[(SeqId, usize)],
        rows: &DeviceRows,
    ) -> Result<()> {
        self.check_layer(layer)?;
        if !matches!(self.layers[layer].location(), DeviceLocation::Cuda { .. }) {
            return Err(Error::Unsupported("append_device needs a CUDA cache"));
        }
        let ps = self.cfg.page_size;
        let mut total = 0usize;
        let mut new_pages = 0usize;
        let mut lens = Vec::with_capacity(batch.len());
        for (i, &(s, n)) in batch.iter().enumerate() {
            if batch[..i].iter().any(|(o, _)| *o == s) {
                return Err(Error::DuplicateSequence(s.0));
            }
            let len = self.seq_layer(s, layer)?.table.len();
            if n > self.cfg.max_seq_len || len + n > self.cfg.max_seq_len {
                return Err(Error::SequenceTooLong {
                    seq: s.0,
                    layer,
                    requested: len.saturating_add(n),
                    max: self.cfg.max_seq_len,
                });
            }
            total = total.checked_add(n).ok_or_else(|| {
                Error::shape("device rows", "a row count that fits memory", usize::MAX)
            })?;
            new_pages += (len + n).div_ceil(ps) - len.div_ceil(ps);
            lens.push(len);
        }
        if total == 0 {
            return Ok(());
        }
        self.check_hot_budget(new_pages)?;
        // Allocate every fresh page first, so a failure changes nothing.
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
        // The row map: each token's slot (the open last page, then fresh pages) and position.
        let mut map = Vec::with_capacity(total);
        let mut next = fresh.iter().copied();
        let mut placed = Vec::with_capacity(batch.len());
        for (&(s, n), &len) in batch.iter().zip(&lens) {
            let last = self.seq_layer(s, layer)?.table.pages().last().copied();
            let mut slots = Vec::new();
            let mut slot = match last {
                Some(e) if !len.is_multiple_of(ps) => {
                    if e.tier != Tier::Hot {
                        return Err(self.undo(
                            layer,
                            &fresh,
                            Error::internal(format!(
                                "append into a {:?} page (only full pages leave the hot tier)",
                                e.tier
                            )),
                        ));
                    }
                    e.slot
                }
                _ => 0,
            };
            for pos in len..len + n {
                if pos % ps == 0 {
                    let Some(f) = next.next() else {
                        return Err(self.undo(
                            layer,
                            &fresh,
                            Error::internal("fewer fresh pages than page starts"),
                        ));
                    };
                    slot = f;
                    slots.push(f);
                }
                map.push(HotRow {
                    slot,
                    pos: (pos % ps) as u32,
                });
            }
            placed.push(slots);
        }
        // As `device_rotation`, borrowing only the rotator (the storage is borrowed mutably).
        let rot = self.cfg.rotation.keys().then(|| DeviceRotation {
            signs: self.rotator.signs(layer),
            norm: self.rotator.norm(),
            values: self.cfg.rotation.values(),
        });
        if let Err(e) = self.layers[layer].write_hot_device(&map, rows, rot) {
            return Err(self.undo(layer, &fresh, e));
        }
        // Commit: new pages, token counts, lengths; then the default policy.
        let protected = self.cfg.protected_layers.contains(&layer);
        let (kvh, d, sinks) = (
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.cfg.sink_tokens,
        );
        let fmt = self.cfg.warm_format(layer);
        for ((&(s, n), &len), slots) in batch.iter().zip(&lens).zip(placed) {
            if n == 0 {
                continue;
            }
            let sl = &mut self
                .seqs
                .get_mut(&s)
                .ok_or(Error::UnknownSequence(s.0))?
                .layers[layer];
            let mut slots = slots.into_iter();
            let mut pos = len;
            while pos < len + n {
                if pos % ps == 0 {
                    let slot = slots
                        .next()
                        .ok_or_else(|| Error::internal("a page start without its slot"))?;
                    start_page(sl, slot, fmt, pos < sinks, protected, (kvh, d));
                }
                let take = (ps - pos % ps).min(len + n - pos);
                let page = sl
                    .table
                    .pages_mut()
                    .last_mut()
                    .ok_or_else(|| Error::internal("no page to append to"))?;
                page.n_tokens += take as u32;
                // The host never saw these keys: no summary (elimination attends the page).
                if let Some(m) = sl.meta.last_mut() {
                    m.bounds = None;
                }
                pos += take;
            }
            sl.table.set_len(len + n);
        }
        let seqs: Vec<SeqId> = batch.iter().map(|&(s, _)| s).collect();
        self.tier_batch(layer, &seqs);
        Ok(())
    }

    /// Frees `fresh` hot slots of `layer` after a failed device append and returns `err`.
    fn undo(&mut self, layer: usize, fresh: &[u32], err: Error) -> Error {
        for &slot in fresh {
            self.layers[layer].free(Tier::Hot, slot);
        }
        err
    }
}
