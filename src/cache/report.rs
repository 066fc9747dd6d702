//! Reading tokens back and the memory report.
//!
//! Owns: [`KvCache::read_tokens`] (every stored token in position order, whatever its tier) and
//! [`KvCache::memory_report`], which sums what the storages, the archive, the cold store and the
//! page tables really hold. Must never: estimate (every figure comes from a live allocation).

use super::{KvCache, PageMeta, PageRef, PageTable, SeqId, SeqLayer, Sequence, Tier};
use crate::backend::{BackendStorage, Storage};
use crate::error::Result;
use crate::memory::MemoryReport;

impl KvCache {
    /// Every stored token of `seq` in `layer` as f32 `(keys, values)`, each `[len, num_kv_heads,
    /// head_dim]` in position order: hot and cold-exact pages exactly, warm pages dequantised,
    /// evicted positions as zeros, in model space (a rotated cache rotates them back, so hot tokens
    /// equal the input up to f32 rounding of the rotation). For tests and debugging.
    pub fn read_tokens(&self, seq: SeqId, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let table = self.page_table(seq, layer)?;
        let (kvh, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let mut ks = vec![0f32; table.len() * kvh * d];
        let mut vs = vec![0f32; table.len() * kvh * d];
        for (i, p) in table.pages().iter().enumerate() {
            let (k, v) = match p.tier {
                Tier::Evicted => continue,
                Tier::Cold => {
                    let bytes = self.cold_bytes(
                        PageRef {
                            seq,
                            layer,
                            page: i,
                        },
                        p,
                    )?;
                    let mut tmp = crate::backend::cpu::CpuStorage::new(&self.cfg);
                    let slot = tmp.import_page(&bytes)?;
                    let e = super::PageEntry {
                        tier: bytes.tier,
                        slot,
                        ..*p
                    };
                    tmp.read_page(&e)?
                }
                _ => self.layers[layer].read_page(p)?,
            };
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
        if self.cfg.rotation.keys() {
            self.rotator.inverse(layer, &mut ks);
        }
        if self.cfg.rotation.values() {
            self.rotator.inverse(layer, &mut vs);
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
        r.cold_bytes = self.cold.bytes();
        r.archive_bytes = self.archive.bytes();
        r.metadata_bytes += self.cold.metadata_bytes() + self.archive.metadata_bytes();
        for (id, seq) in &self.seqs {
            r.metadata_bytes += std::mem::size_of::<(super::SeqId, Sequence)>()
                + seq.layers.capacity() * std::mem::size_of::<SeqLayer>();
            for sl in &seq.layers {
                r.metadata_bytes += PageTable::metadata_bytes(&sl.table)
                    + sl.meta.capacity() * std::mem::size_of::<PageMeta>()
                    + sl.meta.iter().map(PageMeta::heap_bytes).sum::<usize>();
                r.tokens += sl.table.len();
                for (p, m) in sl.table.pages().iter().zip(&sl.meta) {
                    // A shared page is counted with the first sequence naming it.
                    if let Some(g) = m.shared {
                        if self.shares.members(g).first().is_some_and(|&f| f != *id) {
                            continue;
                        }
                    }
                    match p.tier {
                        Tier::Hot => r.hot_pages += 1,
                        Tier::Warm => r.warm_pages += 1,
                        Tier::Cold => r.cold_pages += 1,
                        Tier::Evicted => {
                            r.evicted_pages += 1;
                            r.evicted_tokens += p.n_tokens as usize;
                        }
                    }
                }
            }
        }
        r.archived_pages = self.archive.len();
        r.shared_pages = self.shares.shared_pages();
        r.metadata_bytes += self.shares.metadata_bytes();
        for h in [&self.archive, &self.cold] {
            if let Some(d) = h.disk() {
                r.disk_bytes += d.bytes() as usize;
                r.disk_file_bytes += d.file_bytes() as usize;
            }
            r.disk_pages += h.spilled();
        }
        r.f16_equivalent_bytes =
            (r.tokens - r.evicted_tokens) * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * 2;
        r
    }
}
