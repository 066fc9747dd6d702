//! Host page stores: the lossless archive and the cold tier, in RAM and spilled to disk.
//!
//! Owns: [`HostPages`], a slot pool of [`PageBytes`] with exact byte counts, used twice by the
//! cache: as the **archive** (every page that left the hot tier, exactly as appended, in the hot
//! dtype, so any page can be brought back bit for bit) and as the **cold store** (pages that left
//! the device: their quantised copy, or nothing extra when the archive already holds them exactly).
//! With a [`DiskStore`] attached, pages can be spilled: the least recently used resident page
//! (an LRU of resident ids) is written to disk and dropped from RAM, and reads of a spilled page
//! go to the disk and are integrity-checked ([`disk`]). Freed records leave dead space in the
//! segment files; [`HostPages::compact`] moves the live records out of sparse segments and deletes
//! them. Must never: decide which pages go where or
//! when to spill (the cache's moves and its RAM budget do), or hand bytes to a kernel directly (the
//! cache imports them into a device storage first).

pub mod disk;
pub mod prefetch;
#[cfg(feature = "redis")]
pub mod redis;
pub mod store;

pub use disk::{DiskRef, DiskStore, Faults};
pub use prefetch::{DiskStats, DiskStep, Prefetcher};

use crate::backend::PageBytes;
use crate::cache::Tier;
use crate::error::{Error, Result};
use crate::quant::WarmFormat;
use std::borrow::Cow;
use std::sync::Mutex;

/// What one compaction of the page files did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Records moved out of sparse segments, and their bytes.
    pub pages_moved: u64,
    pub bytes_moved: u64,
    /// File bytes given back (segments deleted, net of the bytes moved).
    pub bytes_reclaimed: u64,
    /// Records left in place because they failed their check.
    pub corrupt_left: u64,
}

impl Compaction {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Compaction) {
        self.pages_moved += other.pages_moved;
        self.bytes_moved += other.bytes_moved;
        self.bytes_reclaimed += other.bytes_reclaimed;
        self.corrupt_left += other.corrupt_left;
    }
}

#[derive(Debug)]
enum Where {
    Ram(PageBytes),
    Disk {
        at: DiskRef,
        tier: Tier,
        format: WarmFormat,
        n_tokens: u32,
        bytes: usize,
    },
}

#[derive(Debug)]
struct Slot {
    at: Where,
    layer: u32,
}

/// A slot pool of page bytes in host memory, optionally spilling to disk.
#[derive(Default)]
pub struct HostPages {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    ram_bytes: usize,
    disk_payload: usize,
    spilled: usize,
    live: usize,
    disk: Option<DiskStore>,
    /// Resident (RAM) ids by recency of use, when a disk is attached.
    lru: Option<Mutex<lru::LruCache<u32, ()>>>,
    /// The cache's prefetch thread (shared by its stores) and this store's tag in its keys.
    prefetch: Option<std::sync::Arc<Prefetcher>>,
    tag: u8,
    /// Pages read from disk and their bytes (`get` of a spilled page).
    disk_reads: std::sync::atomic::AtomicU64,
    disk_read_bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for HostPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPages")
            .field("pages", &self.live)
            .field("ram_bytes", &self.ram_bytes)
            .field("disk_payload", &self.disk_payload)
            .field("spills", &self.disk.is_some())
            .finish()
    }
}

impl HostPages {
    /// A store that can spill to `disk`, reading ahead through `prefetch` (keys tagged `tag`).
    pub fn with_disk(
        disk: DiskStore,
        tag: u8,
        prefetch: Option<std::sync::Arc<Prefetcher>>,
    ) -> Self {
        HostPages {
            disk: Some(disk),
            lru: Some(Mutex::new(lru::LruCache::unbounded())),
            prefetch,
            tag,
            ..Default::default()
        }
    }

    /// A read-ahead job for page `id` when it is spilled (`None` when resident or absent).
    pub fn prefetch_job(&self, id: u32) -> Option<prefetch::Job> {
        let slot = self.slots.get(id as usize)?.as_ref()?;
        let Where::Disk { at, .. } = &slot.at else {
            return None;
        };
        let disk = self.disk.as_ref()?;
        let (file, path) = disk.segment_file(at).ok()?;
        Some(prefetch::Job {
            key: (self.tag, at.segment, at.offset),
            file: file.clone(),
            path: path.to_path_buf(),
            at: *at,
            cache_id: disk.cache_id(),
            page_id: id,
            layer: slot.layer,
        })
    }

    /// The prefetch thread, when there is one.
    pub fn prefetcher(&self) -> Option<&Prefetcher> {
        self.prefetch.as_deref()
    }

    /// The attached disk store, if any.
    pub fn disk(&self) -> Option<&DiskStore> {
        self.disk.as_ref()
    }

    /// The attached disk store, mutably (fault injection in tests).
    pub fn disk_mut(&mut self) -> Option<&mut DiskStore> {
        self.disk.as_mut()
    }

    /// Stores `page` (of `layer`) in RAM; returns its id.
    pub fn insert(&mut self, page: PageBytes, layer: usize) -> Result<u32> {
        let b = page.bytes();
        let slot = Slot {
            at: Where::Ram(page),
            layer: layer as u32,
        };
        let id = if let Some(id) = self.free.pop() {
            self.slots[id as usize] = Some(slot);
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
                bytes: std::mem::size_of::<Option<Slot>>(),
            })?;
            self.slots.push(Some(slot));
            (self.slots.len() - 1) as u32
        };
        // Keep the free list able to take every slot back without allocating on removal.
        if self.free.capacity() < self.slots.len() {
            let extra = self.slots.len() - self.free.len();
            let _ = self.free.try_reserve(extra);
        }
        if let Some(l) = &self.lru {
            l.lock().unwrap_or_else(|p| p.into_inner()).put(id, ());
        }
        self.ram_bytes += b;
        self.live += 1;
        Ok(id)
    }

    /// The page with id `id`: borrowed from RAM, or read back from disk and checked
    /// ([`Error::CorruptPage`] when the check fails). A RAM read counts as a use for the LRU.
    pub fn get(&self, id: u32) -> Result<Cow<'_, PageBytes>> {
        self.get_counted(id, &mut DiskStep::default())
    }

    /// [`HostPages::get`], adding what a disk read cost to `step`.
    pub fn get_counted(&self, id: u32, step: &mut DiskStep) -> Result<Cow<'_, PageBytes>> {
        let slot = self
            .slots
            .get(id as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::internal(format!("host page {id} is empty")))?;
        match &slot.at {
            Where::Ram(p) => {
                if let Some(l) = &self.lru {
                    l.lock().unwrap_or_else(|p| p.into_inner()).get(&id);
                }
                Ok(Cow::Borrowed(p))
            }
            Where::Disk { at, .. } => {
                let disk = self
                    .disk
                    .as_ref()
                    .ok_or_else(|| Error::internal("a spilled page without a disk store"))?;
                let p = match &self.prefetch {
                    Some(pf) => pf.take_or_read((self.tag, at.segment, at.offset), step, || {
                        disk.read(at, id, slot.layer)
                    })?,
                    None => {
                        let t = std::time::Instant::now();
                        step.sync_reads += 1;
                        let r = disk.read(at, id, slot.layer);
                        step.wait_ns += t.elapsed().as_nanos() as u64;
                        r?
                    }
                };
                step.pages += 1;
                step.bytes += at.len;
                use std::sync::atomic::Ordering::Relaxed;
                self.disk_reads.fetch_add(1, Relaxed);
                self.disk_read_bytes.fetch_add(at.len, Relaxed);
                Ok(Cow::Owned(p))
            }
        }
    }

    /// Tier, format and token count of page `id`, without reading it.
    pub fn info(&self, id: u32) -> Option<(Tier, WarmFormat, u32)> {
        match &self.slots.get(id as usize)?.as_ref()?.at {
            Where::Ram(p) => Some((p.tier, p.format, p.n_tokens)),
            Where::Disk {
                tier,
                format,
                n_tokens,
                ..
            } => Some((*tier, *format, *n_tokens)),
        }
    }

    /// True when page `id` is held in RAM (not spilled).
    pub fn is_resident(&self, id: u32) -> bool {
        matches!(
            self.slots.get(id as usize).and_then(Option::as_ref),
            Some(Slot {
                at: Where::Ram(_),
                ..
            })
        )
    }

    /// Removes page `id` (from RAM or disk); false when it was not there.
    pub fn remove(&mut self, id: u32) -> bool {
        let Some(slot) = self.slots.get_mut(id as usize).and_then(Option::take) else {
            return false;
        };
        match slot.at {
            Where::Ram(p) => {
                self.ram_bytes -= p.bytes();
                if let Some(l) = &self.lru {
                    l.lock().unwrap_or_else(|p| p.into_inner()).pop(&id);
                }
            }
            Where::Disk { at, bytes, .. } => {
                self.disk_payload -= bytes;
                self.spilled -= 1;
                if let Some(pf) = &self.prefetch {
                    pf.forget((self.tag, at.segment, at.offset));
                }
                if let Some(d) = self.disk.as_mut() {
                    d.free(&at);
                }
            }
        }
        self.live -= 1;
        self.free.push(id);
        true
    }

    /// Writes the least recently used resident page to disk and drops it from RAM; returns the
    /// RAM bytes freed, `None` when nothing can spill (no disk, or nothing resident). On error the
    /// page stays in RAM.
    pub fn spill_lru(&mut self) -> Result<Option<usize>> {
        let (Some(disk), Some(lru)) = (self.disk.as_mut(), self.lru.as_ref()) else {
            return Ok(None);
        };
        let mut lru = lru.lock().unwrap_or_else(|p| p.into_inner());
        let Some((&id, _)) = lru.peek_lru() else {
            return Ok(None);
        };
        let slot = self.slots[id as usize]
            .as_mut()
            .ok_or_else(|| Error::internal("LRU names an empty host page"))?;
        let Where::Ram(page) = &slot.at else {
            lru.pop(&id);
            return Err(Error::internal("LRU names a spilled page"));
        };
        let at = disk.write(page, id, slot.layer)?;
        lru.pop(&id);
        let bytes = page.bytes();
        slot.at = Where::Disk {
            at,
            tier: page.tier,
            format: page.format,
            n_tokens: page.n_tokens,
            bytes,
        };
        self.ram_bytes -= bytes;
        self.disk_payload += bytes;
        self.spilled += 1;
        Ok(Some(bytes))
    }

    /// Moves the live records out of the disk store's sparse segments (those at most half live,
    /// see [`DiskStore::sparse_segments`]) into the open one, deleting each emptied segment file.
    /// A record that fails its check stays where it is (reading it reports the damage) and is
    /// counted in `corrupt_left`. On a write error the moves done so far stand, every page keeps a
    /// valid record, and the error is returned.
    pub fn compact(&mut self) -> Result<Compaction> {
        let mut c = Compaction::default();
        let Some(disk) = self.disk.as_mut() else {
            return Ok(c);
        };
        let victims = disk.sparse_segments();
        if victims.is_empty() {
            return Ok(c);
        }
        let before = disk.file_bytes();
        let mut result = Ok(());
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let Some(Slot {
                at: Where::Disk { at, .. },
                layer,
            }) = slot
            else {
                continue;
            };
            if victims.binary_search(&at.segment).is_err() {
                continue;
            }
            match disk.relocate(at, id as u32, *layer) {
                Ok(new) => {
                    if let Some(pf) = &self.prefetch {
                        pf.forget((self.tag, at.segment, at.offset));
                    }
                    c.pages_moved += 1;
                    c.bytes_moved += new.len;
                    *at = new;
                }
                Err(Error::CorruptPage { .. }) => c.corrupt_left += 1,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        c.bytes_reclaimed = before.saturating_sub(disk.file_bytes());
        result.map(|()| c)
    }

    /// True when the disk store has enough dead bytes for [`HostPages::compact`] to pay.
    pub fn wants_compaction(&self) -> bool {
        self.disk.as_ref().is_some_and(DiskStore::wants_compaction)
    }

    /// Payload bytes held in RAM.
    pub fn bytes(&self) -> usize {
        self.ram_bytes
    }

    /// Payload bytes spilled to disk (the record headers and checksums are in
    /// [`DiskStore::bytes`]).
    pub fn disk_bytes(&self) -> usize {
        self.disk_payload
    }

    /// Pages read back from disk so far, and their record bytes.
    pub fn disk_reads(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.disk_reads.load(Relaxed),
            self.disk_read_bytes.load(Relaxed),
        )
    }

    /// Pages spilled to disk.
    pub fn spilled(&self) -> usize {
        self.spilled
    }

    /// Pages held (RAM and disk).
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no page is held.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bookkeeping bytes: the slot table, the free list, the LRU and the disk store's tables.
    pub fn metadata_bytes(&self) -> usize {
        let lru = self.lru.as_ref().map_or(0, |l| {
            let n = l.lock().unwrap_or_else(|p| p.into_inner()).len();
            n * (std::mem::size_of::<u32>() + 4 * std::mem::size_of::<usize>())
        });
        self.slots.capacity() * std::mem::size_of::<Option<Slot>>()
            + self.free.capacity() * 4
            + lru
            + self.disk.as_ref().map_or(0, DiskStore::metadata_bytes)
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
        let a = h.insert(page(10), 0).unwrap();
        let b = h.insert(page(20), 0).unwrap();
        assert_eq!(h.bytes(), 30);
        assert!(h.remove(a));
        assert!(!h.remove(a));
        assert_eq!(h.bytes(), 20);
        let c = h.insert(page(5), 0).unwrap();
        assert_eq!(c, a);
        assert_eq!(h.len(), 2);
        assert_eq!(h.get(b).unwrap().data.len(), 20);
        assert_eq!(h.spill_lru().unwrap(), None);
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kvtier-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn page(i: usize) -> PageBytes {
        PageBytes {
            tier: Tier::Warm,
            format: WarmFormat::uniform(Bits::B4),
            n_tokens: 32,
            data: (0..1000).map(|j| (i * 7 + j * 13) as u8).collect(),
        }
    }

    /// 40 pages spilled into segments of about three records each, the even ones freed.
    fn spilled(dir: &std::path::Path) -> HostPages {
        let disk = DiskStore::new(dir, "t".into(), 9, None)
            .unwrap()
            .with_segment_bytes(3200);
        let mut h = HostPages::with_disk(disk, 0, None);
        for i in 0..40 {
            assert_eq!(h.insert(page(i), 1).unwrap(), i as u32);
        }
        while h.spill_lru().unwrap().is_some() {}
        assert_eq!((h.spilled(), h.bytes()), (40, 0));
        for i in (0..40).step_by(2) {
            assert!(h.remove(i));
        }
        h
    }

    #[test]
    fn compaction_moves_live_records_and_leaves_corrupt_ones() {
        let dir = tmp("compact");
        let mut h = spilled(&dir);
        let d = h.disk().unwrap();
        let (files, file_bytes, live) = (d.files().len(), d.file_bytes(), d.bytes());
        assert!(d.dead_bytes() >= live - 4000, "half the records are dead");
        assert!(d.wants_compaction());
        // Damage page 1's record (its segment, pages 0-2, is a third live): compaction must not
        // copy it, and reading it still says so.
        let Some(Slot {
            at: Where::Disk { at, .. },
            ..
        }) = h.slots[1].as_ref()
        else {
            panic!("page 1 is spilled")
        };
        let (file, _) = d.segment_file(at).unwrap();
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[0xff], at.offset + 100).unwrap();
        let c = h.compact().unwrap();
        assert_eq!(c.corrupt_left, 1);
        assert!(
            c.pages_moved >= 6,
            "the one live record of each third-live segment: {c:?}"
        );
        let d = h.disk().unwrap();
        assert_eq!(d.bytes(), live, "live bytes are unchanged");
        assert!(
            d.file_bytes() < file_bytes && d.files().len() < files,
            "{c:?}"
        );
        assert_eq!(c.bytes_reclaimed, file_bytes - d.file_bytes());
        assert!(
            d.file_bytes() <= 2 * live + 3200,
            "at most half dead afterwards"
        );
        assert!(!d.wants_compaction());
        for i in (1..40).step_by(2) {
            let got = h.get(i as u32);
            if i == 1 {
                assert!(matches!(got, Err(Error::CorruptPage { page: 1, .. })));
            } else {
                assert_eq!(got.unwrap().data, page(i).data, "page {i}");
            }
        }
        drop(h);
        assert!(!dir.exists(), "every file and the directory are removed");
    }

    #[test]
    fn compaction_that_cannot_write_loses_nothing() {
        let dir = tmp("compact-full");
        let mut h = spilled(&dir);
        h.disk_mut().unwrap().faults.write = Some(std::io::ErrorKind::StorageFull);
        assert!(matches!(h.compact(), Err(Error::Disk { .. })));
        h.disk_mut().unwrap().faults.write = None;
        for i in (1..40).step_by(2) {
            assert_eq!(h.get(i as u32).unwrap().data, page(i).data, "page {i}");
        }
        let c = h.compact().unwrap();
        assert!(c.pages_moved > 0 && c.bytes_reclaimed > 0, "{c:?}");
        for i in (1..40).step_by(2) {
            assert_eq!(h.get(i as u32).unwrap().data, page(i).data, "page {i}");
        }
    }
}
