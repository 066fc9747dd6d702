//! The disk half of a host page store: page records in a set of append-only segment files.
//!
//! Owns: [`DiskStore`] (the files of one store in the configured directory, created `0600`, removed
//! when the store is dropped), the record format and its integrity check, the relocation of
//! checked records that compaction uses (a segment whose records are all freed or moved out is
//! deleted), and [`Faults`] (injected I/O failures, for tests). Must never: write outside its directory, return bytes that failed the
//! check, or decide which pages spill (the cache does).
//!
//! Record (little-endian), at `DiskRef::offset` of segment `DiskRef::segment`:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | magic | `b"KVTP"` | |
//! | version | u16 | [`FORMAT_VERSION`] |
//! | tier | u8 | 1 hot, 2 warm |
//! | k_bits, v_bits | u8, u8 | the page's warm format |
//! | reserved | u8 | 0 |
//! | cache_id | u64 | the owning cache (records of another cache are refused) |
//! | page_id | u32 | the store's id of the page |
//! | layer | u32 | |
//! | n_tokens | u32 | |
//! | data_len | u64 | payload bytes that follow |
//! | payload | `data_len` bytes | the page's bytes exactly as `export_page` gave them |
//! | crc32 | u32 | CRC-32 (IEEE) of everything above |
//!
//! Reads go through `pread` on the store's open file handles rather than a memory map: a file
//! truncated under a mapping turns a read into SIGBUS, which no typed error can catch, while
//! `pread` reports a short read. A segment removed from the directory stays readable through the
//! open handle (Unix semantics), so the cache keeps serving it.

use crate::backend::PageBytes;
use crate::cache::Tier;
use crate::config::Bits;
use crate::error::{Error, Result};
use crate::quant::WarmFormat;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version of the record format above.
pub const FORMAT_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"KVTP";
pub const HEADER: usize = 4 + 2 + 4 + 8 + 4 + 4 + 4 + 8;
/// A segment file is closed to new records once it holds this many bytes (the default of
/// [`crate::SpillConfig::segment_bytes`]).
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Where one record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskRef {
    pub segment: u32,
    pub offset: u64,
    /// Record bytes (header, payload, checksum).
    pub len: u64,
}

/// Injected I/O faults (tests drive the failure paths with these; all off by default).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every write fails with this error (`StorageFull` simulates a full disk).
    pub write: Option<io::ErrorKind>,
    /// Every read fails with this error.
    pub read: Option<io::ErrorKind>,
    /// A write stores only this many bytes of the record and reports success: a torn page, as a
    /// crash in the middle of a write leaves it.
    pub torn_after: Option<usize>,
}

struct Segment {
    path: PathBuf,
    file: Option<Arc<File>>,
    len: u64,
    live: u32,
    /// Bytes of the live records in this segment.
    live_bytes: u64,
}

/// The segment files of one host page store.
pub struct DiskStore {
    dir: PathBuf,
    created_dir: bool,
    prefix: String,
    cache_id: u64,
    segments: Vec<Segment>,
    /// Bytes of live records.
    bytes: u64,
    budget: Option<u64>,
    segment_bytes: u64,
    /// Injected faults (see [`Faults`]).
    pub faults: Faults,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> Error {
    Error::Disk {
        what: format!("{what} {}", path.display()),
        source: e,
    }
}

fn corrupt(layer: u32, page: u32, reason: impl Into<String>) -> Error {
    Error::CorruptPage {
        layer: layer as usize,
        page,
        reason: reason.into(),
    }
}

fn tier_code(t: Tier) -> u8 {
    match t {
        Tier::Hot => 1,
        _ => 2,
    }
}

/// The record bytes of `page` (see the module table).
pub fn encode(page: &PageBytes, cache_id: u64, page_id: u32, layer: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(HEADER + page.data.len() + 4);
    r.extend_from_slice(MAGIC);
    r.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    r.push(tier_code(page.tier));
    r.push(page.format.k_bits.bits() as u8);
    r.push(page.format.v_bits.bits() as u8);
    r.push(0);
    r.extend_from_slice(&cache_id.to_le_bytes());
    r.extend_from_slice(&page_id.to_le_bytes());
    r.extend_from_slice(&layer.to_le_bytes());
    r.extend_from_slice(&page.n_tokens.to_le_bytes());
    r.extend_from_slice(&(page.data.len() as u64).to_le_bytes());
    r.extend_from_slice(&page.data);
    let crc = crc32fast::hash(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

/// Checks one record read back for page `page_id` of `layer` of cache `cache_id`: its checksum,
/// magic, version, identity, formats and length. Returns the header fields.
fn check(rec: &[u8], cache_id: u64, page_id: u32, layer: u32) -> Result<(Tier, WarmFormat, u32)> {
    let bad = |why: String| corrupt(layer, page_id, why);
    if rec.len() < HEADER + 4 {
        return Err(bad(format!(
            "record of {} bytes is shorter than a header",
            rec.len()
        )));
    }
    let (body, tail) = rec.split_at(rec.len() - 4);
    let want = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let got = crc32fast::hash(body);
    if want != got {
        return Err(bad(format!(
            "checksum {got:#010x}, stored {want:#010x} (torn or corrupted)"
        )));
    }
    let u32_at = |o: usize| u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[o..o + 8]);
        u64::from_le_bytes(b)
    };
    if &body[..4] != MAGIC {
        return Err(bad("bad magic".into()));
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let (cid, pid, lay) = (u64_at(10), u32_at(18), u32_at(22));
    if (cid, pid, lay) != (cache_id, page_id, layer) {
        return Err(bad(format!(
            "record is page {pid} of layer {lay} of cache {cid:#x}, not of cache {cache_id:#x}"
        )));
    }
    let tier = match body[6] {
        1 => Tier::Hot,
        2 => Tier::Warm,
        t => return Err(bad(format!("tier code {t}"))),
    };
    let bits = |b: u8| Bits::from_bits(b as u32).map_err(|_| bad(format!("code width {b}")));
    let format = WarmFormat {
        k_bits: bits(body[7])?,
        v_bits: bits(body[8])?,
    };
    let n_tokens = u32_at(26);
    let len = u64_at(30);
    if len != (body.len() - HEADER) as u64 {
        return Err(bad(format!(
            "payload of {} bytes, header says {len}",
            body.len() - HEADER
        )));
    }
    Ok((tier, format, n_tokens))
}

/// Checks and decodes one record read back for page `page_id` of `layer` of cache `cache_id`.
pub fn decode(rec: &[u8], cache_id: u64, page_id: u32, layer: u32) -> Result<PageBytes> {
    let (tier, format, n_tokens) = check(rec, cache_id, page_id, layer)?;
    Ok(PageBytes {
        tier,
        format,
        n_tokens,
        data: rec[HEADER..rec.len() - 4].to_vec(),
    })
}

impl DiskStore {
    /// A store writing files named `<prefix>-<n>.kvp` into `dir` (created if missing, and then
    /// removed again when the store is dropped and empty). `budget` bounds the live record bytes.
    pub fn new(dir: &Path, prefix: String, cache_id: u64, budget: Option<u64>) -> Result<Self> {
        let created_dir = !dir.exists();
        if created_dir {
            std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
        }
        if !dir.is_dir() {
            return Err(Error::Disk {
                what: format!("spill directory {}", dir.display()),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(DiskStore {
            dir: dir.to_path_buf(),
            created_dir,
            prefix,
            cache_id,
            segments: Vec::new(),
            bytes: 0,
            budget,
            segment_bytes: SEGMENT_BYTES,
            faults: Faults::default(),
        })
    }

    /// Closes segments to new records at `bytes` (at least one record each) instead of
    /// [`SEGMENT_BYTES`].
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(1);
        self
    }

    /// Makes this store remove the directory (if it created it) instead of `other`: of two stores
    /// sharing a directory, the one dropped last must own it.
    pub fn take_dir_ownership(&mut self, other: &mut DiskStore) {
        self.created_dir |= std::mem::take(&mut other.created_dir);
    }

    /// Live record bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the segment files (live records plus freed space not yet reclaimed).
    pub fn file_bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.file.is_some())
            .map(|s| s.len)
            .sum()
    }

    /// Paths of the open segment files.
    pub fn files(&self) -> Vec<PathBuf> {
        self.segments
            .iter()
            .filter(|s| s.file.is_some())
            .map(|s| s.path.clone())
            .collect()
    }

    /// Heap bytes of the store's bookkeeping.
    pub fn metadata_bytes(&self) -> usize {
        self.segments.capacity() * std::mem::size_of::<Segment>()
            + self
                .segments
                .iter()
                .map(|s| s.path.capacity())
                .sum::<usize>()
    }

    fn open_segment(&mut self) -> Result<u32> {
        use std::os::unix::fs::OpenOptionsExt;
        let n = self.segments.len();
        let path = self.dir.join(format!("{}-{n:06}.kvp", self.prefix));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("cannot create", &path, e))?;
        self.segments.push(Segment {
            path,
            file: Some(Arc::new(file)),
            len: 0,
            live: 0,
            live_bytes: 0,
        });
        Ok(n as u32)
    }

    /// Writes `page` (id `page_id` of `layer`) as one record. On error nothing is referenced:
    /// the caller still holds the page.
    pub fn write(&mut self, page: &PageBytes, page_id: u32, layer: u32) -> Result<DiskRef> {
        let rec = encode(page, self.cache_id, page_id, layer);
        let len = rec.len() as u64;
        if let Some(b) = self.budget {
            if self.bytes + len > b {
                return Err(Error::BudgetExceeded {
                    tier: Tier::Cold,
                    needed: (self.bytes + len) as usize,
                    budget: b as usize,
                });
            }
        }
        self.write_record(&rec)
    }

    /// Appends the encoded record `rec` to the open segment (a new one when it is full).
    fn write_record(&mut self, rec: &[u8]) -> Result<DiskRef> {
        use std::os::unix::fs::FileExt;
        let len = rec.len() as u64;
        let cap = self.segment_bytes.max(len);
        let seg = match self.segments.last() {
            Some(s) if s.file.is_some() && s.len + len <= cap => (self.segments.len() - 1) as u32,
            _ => self.open_segment()?,
        };
        let s = &mut self.segments[seg as usize];
        let file = s
            .file
            .as_ref()
            .ok_or_else(|| Error::internal("writing to a closed segment"))?;
        if let Some(kind) = self.faults.write {
            return Err(io_err("cannot write", &s.path, io::Error::from(kind)));
        }
        let data = match self.faults.torn_after {
            Some(n) => &rec[..n.min(rec.len())],
            None => rec,
        };
        let offset = s.len;
        if let Err(e) = file.write_all_at(data, offset) {
            // Leave the segment's length where it was: a partial record is never referenced and
            // the next record overwrites it.
            return Err(io_err("cannot write", &s.path, e));
        }
        s.len += len;
        s.live += 1;
        s.live_bytes += len;
        self.bytes += len;
        Ok(DiskRef {
            segment: seg,
            offset,
            len,
        })
    }

    /// Bytes of the segment files that no live record uses (freed records not yet reclaimed).
    pub fn dead_bytes(&self) -> u64 {
        self.file_bytes().saturating_sub(self.bytes)
    }

    /// True when compaction would pay: the files hold at least a segment of dead bytes and more
    /// dead than live bytes (so compaction keeps the files within about twice the live bytes
    /// plus the open segment).
    pub fn wants_compaction(&self) -> bool {
        let dead = self.dead_bytes();
        dead >= self.segment_bytes && dead >= self.bytes && !self.sparse_segments().is_empty()
    }

    /// The closed (full) segments at most half of whose bytes are live: compaction's victims.
    pub fn sparse_segments(&self) -> Vec<u32> {
        let last = self.segments.len().saturating_sub(1);
        self.segments
            .iter()
            .enumerate()
            .filter(|&(i, s)| i != last && s.file.is_some() && s.live_bytes * 2 <= s.len)
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Copies the record at `r` (page `page_id` of `layer`) to the open segment after checking
    /// it, then frees the old copy; returns the new place. A record that fails its check is left
    /// where it is ([`Error::CorruptPage`]: reading it keeps reporting the damage); on a write
    /// error the old copy stays valid. Not counted against the disk budget: live bytes do not
    /// change.
    pub fn relocate(&mut self, r: &DiskRef, page_id: u32, layer: u32) -> Result<DiskRef> {
        let (file, path) = self.segment_file(r)?;
        if let Some(kind) = self.faults.read {
            return Err(io_err("cannot read", path, io::Error::from(kind)));
        }
        let rec = read_raw(file, path, r, page_id, layer)?;
        check(&rec, self.cache_id, page_id, layer)?;
        let new = self.write_record(&rec)?;
        self.free(r);
        Ok(new)
    }

    /// Reads back and checks the record at `r` for page `page_id` of `layer`.
    pub fn read(&self, r: &DiskRef, page_id: u32, layer: u32) -> Result<PageBytes> {
        let (file, path) = self.segment_file(r)?;
        if let Some(kind) = self.faults.read {
            return Err(io_err("cannot read", path, io::Error::from(kind)));
        }
        read_record(file, path, r, self.cache_id, page_id, layer)
    }

    /// The open file and path of the segment holding `r`.
    pub fn segment_file(&self, r: &DiskRef) -> Result<(&Arc<File>, &Path)> {
        let s = self
            .segments
            .get(r.segment as usize)
            .ok_or_else(|| Error::internal(format!("segment {} does not exist", r.segment)))?;
        let file = s
            .file
            .as_ref()
            .ok_or_else(|| Error::internal(format!("segment {} is closed", r.segment)))?;
        Ok((file, &s.path))
    }

    /// The id of the cache the records belong to.
    pub fn cache_id(&self) -> u64 {
        self.cache_id
    }

    /// Forgets the record at `r`; a segment with no live record left (and not the one being
    /// written) is deleted.
    pub fn free(&mut self, r: &DiskRef) {
        let last = self.segments.len().saturating_sub(1);
        let Some(s) = self.segments.get_mut(r.segment as usize) else {
            return;
        };
        s.live = s.live.saturating_sub(1);
        s.live_bytes = s.live_bytes.saturating_sub(r.len);
        self.bytes = self.bytes.saturating_sub(r.len);
        if s.live == 0 && r.segment as usize != last {
            s.file = None;
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

/// Reads and checks one record from `file` (see [`DiskStore::read`]); also the prefetch thread's
/// read.
pub fn read_record(
    file: &File,
    path: &Path,
    r: &DiskRef,
    cache_id: u64,
    page_id: u32,
    layer: u32,
) -> Result<PageBytes> {
    let rec = read_raw(file, path, r, page_id, layer)?;
    decode(&rec, cache_id, page_id, layer)
}

/// The `r.len` bytes at `r.offset` of `file`; a short file is reported as a truncated page.
fn read_raw(file: &File, path: &Path, r: &DiskRef, page_id: u32, layer: u32) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut rec = Vec::new();
    rec.try_reserve_exact(r.len as usize)
        .map_err(|_| Error::OutOfMemory {
            what: "page read from disk",
            bytes: r.len as usize,
        })?;
    rec.resize(r.len as usize, 0);
    match file.read_exact_at(&mut rec, r.offset) {
        Ok(()) => Ok(rec),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            let have = file.metadata().map(|m| m.len()).unwrap_or(0);
            Err(corrupt(
                layer,
                page_id,
                format!(
                    "{} is {have} bytes, the record ends at {} (truncated)",
                    path.display(),
                    r.offset + r.len
                ),
            ))
        }
        Err(e) => Err(io_err("cannot read", path, e)),
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        for s in &mut self.segments {
            if s.file.take().is_some() {
                let _ = std::fs::remove_file(&s.path);
            }
        }
        if self.created_dir {
            // Only if empty: never removes anything the store did not write.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(n: usize, seed: u8) -> PageBytes {
        PageBytes {
            tier: Tier::Warm,
            format: WarmFormat {
                k_bits: Bits::B4,
                v_bits: Bits::B2,
            },
            n_tokens: 32,
            data: (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect(),
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_typed() {
        let p = page(100, 3);
        let rec = encode(&p, 7, 5, 2);
        assert_eq!(rec.len(), HEADER + 100 + 4);
        let back = decode(&rec, 7, 5, 2).unwrap();
        assert_eq!(back.data, p.data);
        assert_eq!(
            (back.tier, back.format, back.n_tokens),
            (p.tier, p.format, p.n_tokens)
        );
        // Every single flipped byte is caught.
        for i in 0..rec.len() {
            let mut r = rec.clone();
            r[i] ^= 0x40;
            assert!(
                matches!(decode(&r, 7, 5, 2), Err(Error::CorruptPage { .. })),
                "byte {i}"
            );
        }
        // Torn (short) records, and a record of another page or cache.
        for n in [0, 10, HEADER, rec.len() - 1] {
            assert!(matches!(
                decode(&rec[..n], 7, 5, 2),
                Err(Error::CorruptPage { .. })
            ));
        }
        assert!(matches!(
            decode(&rec, 7, 6, 2),
            Err(Error::CorruptPage { .. })
        ));
        assert!(matches!(
            decode(&rec, 8, 5, 2),
            Err(Error::CorruptPage { .. })
        ));
    }
}
