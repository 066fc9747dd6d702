//! Spilling host pages to disk: the RAM budget of the archive and the cold store.
//!
//! Owns: inserting into the host stores under [`crate::SpillConfig::host_ram_bytes`] (least
//! recently used pages written to disk, archive pages first), the all-or-nothing rule when a spill
//! fails, compaction of the page files (on demand and automatic), and the fault hooks tests use. Must never: drop a page whose write failed, or leave a
//! half-inserted page behind an error.

use super::{KvCache, PageRef, SeqId, Tier};
use crate::attention::PageSelection;
use crate::backend::PageBytes;
use crate::cold::{Compaction, DiskStats, Faults};
use crate::error::{Error, Result};

impl KvCache {
    /// Inserts `bytes` of `layer` into the archive (`to_archive`) or the cold store, then keeps
    /// host RAM within the spill budget by writing the least recently used pages to disk (archive
    /// pages first: only promotion reads them, attention reads cold pages every step). When a
    /// spill fails while RAM is over the budget, the new page is taken out again and the error
    /// returned: nothing is lost, the caller still holds the page (and the page whose write failed
    /// stays in RAM).
    pub(crate) fn host_insert(
        &mut self,
        to_archive: bool,
        bytes: PageBytes,
        layer: usize,
    ) -> Result<u32> {
        let id = if to_archive {
            self.archive.insert(bytes, layer)?
        } else {
            self.cold.insert(bytes, layer)?
        };
        if let Err(e) = self.enforce_host_ram() {
            if to_archive {
                self.archive.remove(id);
            } else {
                self.cold.remove(id);
            }
            self.counters.spill_failures += 1;
            return Err(e);
        }
        Ok(id)
    }

    /// Spills least recently used host pages until the archive and the cold store fit the
    /// spill budget (no budget: nothing to do).
    fn enforce_host_ram(&mut self) -> Result<()> {
        let Some(budget) = self.cfg.spill.as_ref().map(|s| s.host_ram_bytes) else {
            return Ok(());
        };
        self.auto_compact();
        while self.archive.bytes() + self.cold.bytes() > budget {
            let freed = match self.archive.spill_lru()? {
                Some(b) => Some(b),
                None => self.cold.spill_lru()?,
            };
            if freed.is_none() {
                return Err(Error::internal(
                    "host RAM over the spill budget with nothing to spill",
                ));
            }
            self.counters.spills += 1;
        }
        Ok(())
    }

    /// Compacts the page files of the archive and the cold store now: the live records of every
    /// segment at most half live move into the open segment and the emptied files are deleted.
    /// Records that fail their integrity check stay in place (`corrupt_left`; reading them keeps
    /// giving [`Error::CorruptPage`]). On an I/O error (a full disk) the moves done so far stand,
    /// every page keeps a valid record, and the error is returned. No-op without spilling.
    pub fn compact_spill(&mut self) -> Result<Compaction> {
        let mut c = self.archive.compact()?;
        c.add(&self.cold.compact()?);
        self.counters.compactions += 1;
        Ok(c)
    }

    /// Compacts when the files hold more dead than live bytes (and at least a segment's worth),
    /// after the calls that free host pages. A failure loses nothing and is counted; the next
    /// write to the disk reports the cause if it persists.
    pub(crate) fn auto_compact(&mut self) {
        if !(self.archive.wants_compaction() || self.cold.wants_compaction()) {
            return;
        }
        if self.compact_spill().is_err() {
            self.counters.compaction_failures += 1;
        }
    }

    /// Injects I/O faults into both spill stores (for tests of the failure paths; see
    /// [`Faults`]). No effect without [`crate::SpillConfig`].
    pub fn set_spill_faults(&mut self, faults: Faults) {
        for h in [&mut self.archive, &mut self.cold] {
            if let Some(d) = h.disk_mut() {
                d.faults = faults.clone();
            }
        }
    }

    /// The page files the cache has open (archive and cold), for inspection and tests.
    pub fn spill_files(&self) -> Vec<std::path::PathBuf> {
        [&self.archive, &self.cold]
            .iter()
            .filter_map(|h| h.disk())
            .flat_map(|d| d.files())
            .collect()
    }

    /// Asks the prefetch thread to read the spilled cold pages of `seqs` in `layer` (those in
    /// `selection` when given, e.g. an eliminator's survivors) ahead of attention. Returns the
    /// reads queued; 0 without spilling or prefetch. Attending a layer does this for the next one.
    pub fn prefetch(
        &self,
        layer: usize,
        seqs: &[SeqId],
        selection: Option<&PageSelection>,
    ) -> Result<usize> {
        let Some(pf) = self.cold.prefetcher() else {
            return Ok(0);
        };
        self.check_layer(layer)?;
        let mut queued = 0;
        for (i, &s) in seqs.iter().enumerate() {
            let sl = self.seq_layer(s, layer)?;
            for (p, e) in sl.table.pages().iter().enumerate() {
                if e.tier != Tier::Cold {
                    continue;
                }
                if let Some(sel) = selection {
                    let kvh = self.cfg.num_kv_heads;
                    if i >= sel.n_seqs()
                        || !(0..kvh).any(|kv| sel.pages(i, kv).binary_search(&(p as u32)).is_ok())
                    {
                        continue;
                    }
                }
                let r = PageRef {
                    seq: s,
                    layer,
                    page: p,
                };
                let job = match self.cold_id(r, e)? {
                    (true, id) => self.archive.prefetch_job(id),
                    (false, id) => self.cold.prefetch_job(id),
                };
                if let Some(j) = job {
                    pf.request(j);
                    queued += 1;
                }
            }
        }
        Ok(queued)
    }

    /// Queues the read-ahead of what the moves in `moves` will read from disk: the archive copy
    /// of a page to promote, the cold bytes of a page to bring back (policy hints: `apply` calls
    /// this before it executes a batch, so later moves' reads overlap earlier moves' work).
    pub(crate) fn prefetch_moves(&self, moves: &[super::Move]) {
        use super::Move;
        let Some(pf) = self.cold.prefetcher() else {
            return;
        };
        for m in moves {
            let (p, promote) = match *m {
                Move::Promote(p) => (p, true),
                Move::FromCold(p) => (p, false),
                _ => continue,
            };
            let Ok(sl) = self.seq_layer(p.seq, p.layer) else {
                continue;
            };
            let (Some(e), Some(meta)) = (sl.table.pages().get(p.page), sl.meta.get(p.page)) else {
                continue;
            };
            let job = if promote {
                meta.archive.and_then(|id| self.archive.prefetch_job(id))
            } else if e.tier == Tier::Cold {
                match self.cold_id(p, e) {
                    Ok((true, id)) => self.archive.prefetch_job(id),
                    Ok((false, id)) => self.cold.prefetch_job(id),
                    Err(_) => None,
                }
            } else {
                None
            };
            if let Some(j) = job {
                pf.request(j);
            }
        }
    }

    /// Disk read counters: read-aheads, buffer hits, waits and synchronous reads, with the time
    /// spent waiting (a decode step's wait is the difference across it). Zero without spilling.
    pub fn disk_stats(&self) -> DiskStats {
        self.cold
            .prefetcher()
            .map(|p| p.stats())
            .unwrap_or_default()
    }

    /// Pages read back from disk so far and their record bytes (archive and cold together).
    pub fn disk_reads(&self) -> (u64, u64) {
        let (a, b) = (self.archive.disk_reads(), self.cold.disk_reads());
        (a.0 + b.0, a.1 + b.1)
    }
}
