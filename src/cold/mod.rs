//! Host-RAM page stores: the lossless archive and the cold tier.
//!
//! Owns: [`HostPages`], a slot pool of [`PageBytes`] in host memory with an exact byte count, used
//! twice by the cache: as the **archive** (every page that left the hot tier, exactly as appended,
//! in the hot dtype, so any page can be brought back bit for bit) and as the **cold store** (pages
//! that left the device: their quantised copy, or nothing extra when the archive already holds
//! them exactly). Must never: decide which pages go where (the cache's moves do), or hand bytes to
//! a kernel directly (the cache imports them into a device storage first).
//!
//! The disk tier (memmap2 files, LRU of resident pages, checksums, prefetch) grows from here.

use crate::backend::PageBytes;
use crate::error::{Error, Result};

/// A slot pool of page bytes in host memory.
#[derive(Debug, Default)]
pub struct HostPages {
    slots: Vec<Option<PageBytes>>,
    free: Vec<u32>,
    bytes: usize,
    live: usize,
}

impl HostPages {
    /// Stores `page`; returns its id.
    pub fn insert(&mut self, page: PageBytes) -> Result<u32> {
        let b = page.bytes();
        let id = if let Some(id) = self.free.pop() {
            self.slots[id as usize] = Some(page);
            id
        } else {
            if self.slots.len() >= u32::MAX as usize {
                return Err(Error::OutOfMemory {
                    what: "host page ids",
                    bytes: 0,
                });
            }
            self.slots.try_reserve(1).map_err(|_| Error::OutOfMemory {
                what: "host page table",
                bytes: std::mem::size_of::<Option<PageBytes>>(),
            })?;
            self.slots.push(Some(page));
            (self.slots.len() - 1) as u32
        };
        // Keep the free list able to take every slot back without allocating on removal.
        if self.free.capacity() < self.slots.len() {
            let extra = self.slots.len() - self.free.len();
            let _ = self.free.try_reserve(extra);
        }
        self.bytes += b;
        self.live += 1;
        Ok(id)
    }

    /// The page with id `id`.
    pub fn get(&self, id: u32) -> Option<&PageBytes> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// Removes and returns the page with id `id`.
    pub fn remove(&mut self, id: u32) -> Option<PageBytes> {
        let p = self.slots.get_mut(id as usize)?.take()?;
        self.bytes -= p.bytes();
        self.live -= 1;
        self.free.push(id);
        Some(p)
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no page is held.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bookkeeping bytes: the slot table and the free list.
    pub fn metadata_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<PageBytes>>() + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Tier;
    use crate::config::Bits;
    use crate::quant::WarmFormat;

    #[test]
    fn counts_bytes_and_reuses_ids() {
        let mut h = HostPages::default();
        let page = |n: usize| PageBytes {
            tier: Tier::Hot,
            format: WarmFormat::uniform(Bits::B4),
            n_tokens: 1,
            data: vec![7; n],
        };
        let a = h.insert(page(10)).unwrap();
        let b = h.insert(page(20)).unwrap();
        assert_eq!(h.bytes(), 30);
        assert_eq!(h.remove(a).unwrap().data.len(), 10);
        assert!(h.remove(a).is_none());
        assert_eq!(h.bytes(), 20);
        let c = h.insert(page(5)).unwrap();
        assert_eq!(c, a);
        assert_eq!(h.len(), 2);
        assert_eq!(h.get(b).unwrap().data.len(), 20);
    }
}
