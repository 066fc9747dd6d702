//! Truncation (rollback): dropping the last tokens of a sequence in every layer.
//!
//! Owns: [`KvCache::truncate`] and its report. The page that ends up holding the new last token is
//! made hot again so appends continue into it: restored **exactly from the archive** when it has a
//! copy (the default: every demoted page has one), otherwise from its quantised bytes
//! (`Restored::Dequantised`, counted in the report); every page wholly past the new end is freed
//! in whatever tier it is (device, cold, disk, archive). Must never: change anything when the call
//! fails (everything that can fail is checked first, or happens before the first change).

use super::{free_page, KvCache, PageRef, Restored, SeqId, Tier};
use crate::error::{Error, Result};

/// What [`KvCache::truncate`] did, summed over layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Tokens dropped.
    pub tokens: usize,
    /// Pages freed.
    pub pages_freed: usize,
    /// Boundary pages brought back to hot exactly (from the archive or the cold tier's exact copy)
    /// and from their quantised bytes.
    pub restored_exact: usize,
    pub restored_dequantised: usize,
}

impl KvCache {
    /// Drops every token of `seq` at a position `>= len`, in every layer (speculative decoding
    /// rejecting drafts, an edited chat history). A layer holding `len` tokens or fewer is left as
    /// it is. The page that then holds the last token becomes hot (exactly, from the archive, when
    /// it has a copy) so the next append continues into it.
    ///
    /// Errors, with nothing changed: an unknown sequence; a new end inside an evicted page (its
    /// tokens are gone: truncate to the page's start instead); the hot budget, when boundary pages
    /// must come back to the hot tier.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<Truncation> {
        let ps = self.cfg.page_size;
        let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let mut to_restore = 0;
        for (layer, sl) in s.layers.iter().enumerate() {
            if len >= sl.table.len() || len.is_multiple_of(ps) {
                continue;
            }
            let e = sl.table.pages()[len / ps];
            let shared = sl.meta[len / ps].shared.is_some();
            match e.tier {
                // A shared page gets a private hot copy before it is cut (copy-on-write).
                Tier::Hot if shared => to_restore += 1,
                Tier::Hot => {}
                Tier::Evicted => {
                    return Err(Error::InvalidMove {
                        op: "truncate",
                        seq: seq.0,
                        layer,
                        page: len / ps,
                        reason: format!(
                            "position {len} falls inside an evicted page; truncate to {}",
                            len / ps * ps
                        ),
                    })
                }
                _ => to_restore += 1,
            }
        }
        self.check_hot_budget(to_restore)?;
        let mut out = Truncation::default();
        for layer in 0..self.cfg.num_layers {
            let sl = self.seq_layer(seq, layer)?;
            let old = sl.table.len();
            if len >= old {
                continue;
            }
            let keep = len.div_ceil(ps);
            // The boundary page first: once it is hot, only frees remain, which cannot fail.
            if !len.is_multiple_of(ps) {
                let p = PageRef {
                    seq,
                    layer,
                    page: len / ps,
                };
                if let Some(how) = self.unshare_to_hot(p)? {
                    match how {
                        Restored::Exact => out.restored_exact += 1,
                        Restored::Dequantised => out.restored_dequantised += 1,
                    }
                } else if self.page(p)?.tier != Tier::Hot {
                    match self.promote(p)? {
                        Restored::Exact => out.restored_exact += 1,
                        Restored::Dequantised => out.restored_dequantised += 1,
                    }
                }
            }
            let sl = self.seq_layer_mut(seq, layer)?;
            let gone = sl.table.split_off(keep);
            let gone_meta = sl.meta.split_off(keep.min(sl.meta.len()));
            sl.table.set_len(len);
            if let Some(last) = sl.table.pages_mut().last_mut() {
                last.n_tokens = (len - (keep - 1) * ps) as u32;
            }
            if let Some(m) = sl.meta.last_mut() {
                // Appends continue into it: ordinary tiering applies again.
                m.promoted = false;
            }
            for (e, m) in gone.iter().zip(&gone_meta) {
                free_page(
                    &mut self.layers[layer],
                    &mut self.archive,
                    &mut self.cold,
                    &mut self.shares,
                    seq,
                    e,
                    m,
                );
            }
            out.pages_freed += gone.len();
            out.tokens += old - len;
            if keep > 0 && !len.is_multiple_of(ps) {
                self.refresh_bounds(PageRef {
                    seq,
                    layer,
                    page: keep - 1,
                })?;
            }
        }
        self.auto_compact();
        Ok(out)
    }
}
