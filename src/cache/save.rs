//! Save / restore: one sequence (every layer, every tier, the archive optionally) to a file and
//! back into a cache with a compatible config.
//!
//! Owns: the sequence file format below, its writer (atomic: a temporary file in the target's
//! directory, mode 0600, fsynced, then renamed over the target) and its reader, which checks the
//! config, every page record (the disk tier's header and CRC-32, [`crate::cold::disk`]) and the
//! file checksum before the restored sequence is made visible. Must never: leave a half-restored
//! sequence behind an error (everything imported is freed), or replace an existing file with a
//! partial one.
//!
//! File (little-endian):
//!
//! | part | contents |
//! |---|---|
//! | header | magic `b"KVTS"`, u16 version, u16 flags (bit 0: archive included, bit 1: value ranges fitted, `CacheConfig::value_fit`), then the config fields the bytes depend on: 10 × u64 (layers, q heads, kv heads, head dim, page size, hot dtype, value group, rotation, rotation seed, key outliers) |
//! | per layer | u64 tokens, u64 observe steps, u32 pages |
//! | per page | u8 tier (0 hot, 1 warm, 2 cold, 3 evicted), u8 pins, u8 flags (bit 0 promoted, bit 1 has archive copy, bit 2 cold bytes are the archive copy, bit 3 has key bounds), u8 0, u32 tokens, u8 k bits, u8 v bits, u16 0, f32 last mass, i64 last attended (-1: never), kv heads × f32 mass, key bounds (2 × kv heads × head dim f16) when flagged; then the page record (absent for evicted pages), then the archive record when flagged and included |
//! | trailer | u32 CRC-32 of everything above |
//!
//! Page records are [`crate::cold::disk`] records with cache id 0, page id = the page's index and
//! the layer, so a record moved to another position or layer is caught by its own check.

use super::meta::{KeyBounds, Pins};
use super::moves::IN_ARCHIVE;
use super::{KvCache, PageEntry, PageMeta, PageRef, SeqId, Tier};
use crate::backend::{BackendStorage, PageBytes};
use crate::cold::disk;
use crate::error::{Error, Result};
use crate::quant::WarmFormat;
use std::io::{Read, Write};
use std::path::Path;

/// Version of the sequence file format.
pub const SEQUENCE_FORMAT_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"KVTS";
/// Largest record the reader accepts (a hot f32 page of the largest shape is far below).
const MAX_RECORD: u64 = 1 << 32;

/// What a save wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Saved {
    /// Bytes of the file.
    pub bytes: u64,
    /// Page records written (pages and archive copies).
    pub records: u64,
}

fn corrupt(reason: impl Into<String>) -> Error {
    Error::CorruptFile {
        reason: reason.into(),
    }
}

fn tier_code(t: Tier) -> u8 {
    t as u8
}

fn config_fields(c: &crate::config::CacheConfig) -> [(&'static str, u64); 10] {
    [
        ("num_layers", c.num_layers as u64),
        ("num_q_heads", c.num_q_heads as u64),
        ("num_kv_heads", c.num_kv_heads as u64),
        ("head_dim", c.head_dim as u64),
        ("page_size", c.page_size as u64),
        ("hot_dtype", c.hot_dtype as u64),
        ("value_group", c.value_group as u64),
        ("rotation", c.rotation as u64),
        ("rotation_seed", c.rotation_seed),
        ("key_outliers", c.key_outliers as u64),
    ]
}

/// A writer that checksums what passes through it.
struct Crc<W> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Crc<W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        self.inner.write_all(b).map_err(|e| Error::Disk {
            what: "cannot write the sequence".into(),
            source: e,
        })
    }
}

/// A reader that checksums what it reads; a short read is a truncated file.
struct CrcRead<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> CrcRead<R> {
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut b = Vec::new();
        b.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
            what: "saved page",
            bytes: n,
        })?;
        b.resize(n, 0);
        self.inner.read_exact(&mut b).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt("the file ends early (truncated)"),
            _ => Error::Disk {
                what: "cannot read the sequence".into(),
                source: e,
            },
        })?;
        self.crc.update(&b);
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }
    /// One page record: its 38-byte header says how long the rest is.
    fn record(&mut self, page: u32, layer: u32) -> Result<PageBytes> {
        let head = self.take(disk::HEADER)?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[disk::HEADER - 8..]);
        let len = u64::from_le_bytes(len);
        if len > MAX_RECORD {
            return Err(corrupt(format!(
                "page {page} of layer {layer}: a record of {len} bytes"
            )));
        }
        let mut rec = head;
        rec.extend_from_slice(&self.take(len as usize + 4)?);
        disk::decode(&rec, 0, page, layer)
    }
}

impl KvCache {
    /// Writes `seq` (every layer and tier; its archive copies too when `archive`) to `path`,
    /// atomically: a temporary file in the same directory (mode 0600) is written, synced and
    /// renamed over `path`, so `path` is either the old file or the whole new one. Spilled pages
    /// are read back (and checked) from disk. Errors: an unknown sequence; `Disk` (nothing is
    /// left behind); `CorruptPage` for a spilled page that fails its check.
    pub fn save_sequence(&self, seq: SeqId, path: &Path, archive: bool) -> Result<Saved> {
        use std::os::unix::fs::OpenOptionsExt;
        self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let io = |what: &str, e| Error::Disk {
            what: format!("{what} {}", path.display()),
            source: e,
        };
        let name = path
            .file_name()
            .ok_or_else(|| io("no file name in", std::io::ErrorKind::InvalidInput.into()))?;
        let tmp = path.with_file_name(format!(
            ".{}.kvtier-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("cannot create", e))?;
        let result = (|| {
            let mut w = std::io::BufWriter::new(&file);
            let saved = self.write_sequence(seq, &mut w, archive)?;
            w.flush().map_err(|e| io("cannot write", e))?;
            drop(w);
            file.sync_all().map_err(|e| io("cannot sync", e))?;
            std::fs::rename(&tmp, path).map_err(|e| io("cannot rename onto", e))?;
            Ok(saved)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// [`KvCache::save_sequence`] into any writer (not atomic: the caller owns the target).
    pub fn write_sequence(&self, seq: SeqId, w: &mut impl Write, archive: bool) -> Result<Saved> {
        let s = self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        let mut out = Crc {
            inner: w,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        };
        let mut records = 0u64;
        out.put(MAGIC)?;
        out.put(&SEQUENCE_FORMAT_VERSION.to_le_bytes())?;
        let flags = u16::from(archive) | u16::from(self.cfg.value_fit) << 1;
        out.put(&flags.to_le_bytes())?;
        for (_, v) in config_fields(&self.cfg) {
            out.put(&v.to_le_bytes())?;
        }
        for (layer, sl) in s.layers.iter().enumerate() {
            out.put(&(sl.table.len() as u64).to_le_bytes())?;
            out.put(&sl.steps.to_le_bytes())?;
            out.put(&(sl.table.pages().len() as u32).to_le_bytes())?;
            for (i, (e, m)) in sl.table.pages().iter().zip(&sl.meta).enumerate() {
                let p = PageRef {
                    seq,
                    layer,
                    page: i,
                };
                let in_archive = e.tier == Tier::Cold && e.slot == IN_ARCHIVE;
                // A cold page whose bytes are its archive copy writes them as the page record.
                let with_archive = archive && m.archive.is_some() && !in_archive;
                let flags = u8::from(m.promoted)
                    | u8::from(with_archive) << 1
                    | u8::from(in_archive) << 2
                    | u8::from(m.bounds.is_some()) << 3;
                out.put(&[tier_code(e.tier), pins_code(m.pins), flags, 0])?;
                out.put(&e.n_tokens.to_le_bytes())?;
                out.put(&[
                    e.format.k_bits.bits() as u8,
                    e.format.v_bits.bits() as u8,
                    0,
                    0,
                ])?;
                out.put(&m.last_mass.to_le_bytes())?;
                out.put(&m.last_attended.map_or(-1i64, |s| s as i64).to_le_bytes())?;
                for x in m.mass.iter() {
                    out.put(&x.to_le_bytes())?;
                }
                if let Some(b) = &m.bounds {
                    for x in b.lo.iter().chain(b.hi.iter()) {
                        out.put(&x.to_le_bytes())?;
                    }
                }
                let bytes = match e.tier {
                    Tier::Evicted => None,
                    Tier::Cold => Some(self.cold_bytes(p, e)?.into_owned()),
                    _ => Some(self.layers[layer].export_page(e)?),
                };
                if let Some(b) = bytes {
                    out.put(&disk::encode(&b, 0, i as u32, layer as u32))?;
                    records += 1;
                }
                if with_archive {
                    if let Some(id) = m.archive {
                        let b = self.archive.get(id)?;
                        out.put(&disk::encode(&b, 0, i as u32, layer as u32))?;
                        records += 1;
                    }
                }
            }
        }
        let crc = out.crc.clone().finalize();
        out.put(&crc.to_le_bytes())?;
        Ok(Saved {
            bytes: out.bytes,
            records,
        })
    }

    /// Reads a sequence saved by [`KvCache::save_sequence`] into a new sequence of this cache and
    /// returns its id. Every page goes back to the tier it was saved in (cold pages to the cold
    /// store, archive copies to the archive when this cache keeps one). Errors, with nothing
    /// restored: `CorruptFile` (not a sequence file, another version, a failed checksum, a
    /// truncated file), `CorruptPage` (a page record fails its own check), `ConfigMismatch`, the
    /// budgets, `Disk`.
    pub fn restore_sequence(&mut self, path: &Path) -> Result<SeqId> {
        let f = std::fs::File::open(path).map_err(|e| Error::Disk {
            what: format!("cannot open {}", path.display()),
            source: e,
        })?;
        self.read_sequence(&mut std::io::BufReader::new(f))
    }

    /// [`KvCache::restore_sequence`] from any reader.
    pub fn read_sequence(&mut self, r: &mut impl Read) -> Result<SeqId> {
        let mut rd = CrcRead {
            inner: r,
            crc: crc32fast::Hasher::new(),
        };
        if rd.take(4)? != MAGIC {
            return Err(corrupt("not a kvtier sequence file (bad magic)"));
        }
        let version = rd.u16()?;
        if version != SEQUENCE_FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {version}, this build reads {SEQUENCE_FORMAT_VERSION}"
            )));
        }
        let flags = rd.u16()?;
        let with_archive = flags & 1 != 0;
        // Fitted pages clip values by up to a step: a cache that bounds errors by half a step must
        // not take them. The other way round is safe (half a step is within one).
        if flags & 2 != 0 && !self.cfg.value_fit {
            return Err(Error::ConfigMismatch {
                field: "value_fit",
                file: "true".into(),
                cache: "false".into(),
            });
        }
        for (field, here) in config_fields(&self.cfg) {
            let there = rd.u64()?;
            if there != here {
                return Err(Error::ConfigMismatch {
                    field,
                    file: there.to_string(),
                    cache: here.to_string(),
                });
            }
        }
        let seq = self.add_sequence();
        match self.read_layers(&mut rd, seq, with_archive) {
            Ok(()) => Ok(seq),
            Err(e) => {
                self.remove_sequence(seq)?;
                Err(e)
            }
        }
    }

    fn read_layers<R: Read>(
        &mut self,
        rd: &mut CrcRead<R>,
        seq: SeqId,
        with_archive: bool,
    ) -> Result<()> {
        let (kvh, d, ps) = (self.cfg.num_kv_heads, self.cfg.head_dim, self.cfg.page_size);
        for layer in 0..self.cfg.num_layers {
            let len = rd.u64()?;
            let steps = rd.u64()?;
            let n_pages = rd.u32()? as u64;
            if len > self.cfg.max_seq_len as u64 {
                return Err(Error::SequenceTooLong {
                    seq: seq.0,
                    layer,
                    requested: len as usize,
                    max: self.cfg.max_seq_len,
                });
            }
            if n_pages != len.div_ceil(ps as u64) {
                return Err(corrupt(format!(
                    "layer {layer}: {n_pages} pages for {len} tokens"
                )));
            }
            let mut total = 0u64;
            for i in 0..n_pages as usize {
                let tier = match rd.u8()? {
                    0 => Tier::Hot,
                    1 => Tier::Warm,
                    2 => Tier::Cold,
                    3 => Tier::Evicted,
                    t => return Err(corrupt(format!("layer {layer} page {i}: tier {t}"))),
                };
                // The caller's pins travel; sink and protected pins follow this cache's config.
                let mut pins = Pins::none();
                if pins_from(rd.u8()?).contains(Pins::USER) {
                    pins.insert(Pins::USER);
                }
                if i * ps < self.cfg.sink_tokens {
                    pins.insert(Pins::SINK);
                }
                if self.cfg.protected_layers.contains(&layer) {
                    pins.insert(Pins::PROTECTED);
                }
                let flags = rd.u8()?;
                rd.u8()?;
                let n_tokens = rd.u32()?;
                let want = if (i as u64 + 1) < n_pages {
                    ps as u64
                } else {
                    len - i as u64 * ps as u64
                };
                if n_tokens as u64 != want {
                    return Err(corrupt(format!(
                        "layer {layer} page {i}: {n_tokens} tokens, expected {want}"
                    )));
                }
                total += n_tokens as u64;
                let bits = |b: u8| {
                    crate::config::Bits::from_bits(b as u32)
                        .map_err(|_| corrupt(format!("layer {layer} page {i}: code width {b}")))
                };
                let format = WarmFormat {
                    k_bits: bits(rd.u8()?)?,
                    v_bits: bits(rd.u8()?)?,
                };
                rd.u16()?;
                let last_mass = f32::from_le_bytes(rd.take(4)?.try_into().unwrap_or([0; 4]));
                let last = rd.u64()? as i64;
                let mut meta = PageMeta::new(kvh, d, pins);
                meta.last_mass = last_mass;
                meta.last_attended = (last >= 0).then_some(last as u64);
                for x in meta.mass.iter_mut() {
                    *x = f32::from_le_bytes(rd.take(4)?.try_into().unwrap_or([0; 4]));
                }
                meta.promoted = flags & 1 != 0;
                meta.bounds = if flags & 8 != 0 {
                    let raw = rd.take(2 * 2 * kvh * d)?;
                    let h: Vec<half::f16> = raw
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    let (lo, hi) = h.split_at(kvh * d);
                    Some(KeyBounds {
                        lo: lo.into(),
                        hi: hi.into(),
                    })
                } else {
                    None
                };
                let mut entry = PageEntry {
                    tier,
                    slot: 0,
                    n_tokens,
                    format,
                };
                let (page_id, lay) = (i as u32, layer as u32);
                if tier != Tier::Evicted {
                    let b = rd.record(page_id, lay)?;
                    if b.n_tokens != n_tokens {
                        return Err(corrupt(format!(
                            "layer {layer} page {i}: record of {} tokens",
                            b.n_tokens
                        )));
                    }
                    entry.slot = match tier {
                        Tier::Cold if flags & 4 != 0 => {
                            let id = self.host_insert(true, b, layer)?;
                            meta.archive = Some(id);
                            IN_ARCHIVE
                        }
                        Tier::Cold => {
                            let id = self.host_insert(false, b, layer)?;
                            entry.format = format;
                            id
                        }
                        _ => {
                            if b.tier != tier {
                                return Err(corrupt(format!(
                                    "layer {layer} page {i}: a {:?} record for a {tier:?} page",
                                    b.tier
                                )));
                            }
                            match tier {
                                Tier::Hot => self.check_hot_budget(1)?,
                                _ => self.check_warm_budget(b.format, 0)?,
                            }
                            self.layers[layer].import_page(&b)?
                        }
                    };
                }
                // Visible to remove_sequence from here on, so an error later frees it.
                let sl = self.seq_layer_mut(seq, layer)?;
                sl.table.push(entry);
                sl.meta.push(meta);
                if flags & 2 != 0 {
                    let b = rd.record(page_id, lay)?;
                    if with_archive && self.cfg.archive {
                        let id = self.host_insert(true, b, layer)?;
                        if let Some(m) = self.seq_layer_mut(seq, layer)?.meta.last_mut() {
                            m.archive = Some(id);
                        }
                    }
                }
            }
            let sl = self.seq_layer_mut(seq, layer)?;
            sl.table.set_len(total as usize);
            sl.steps = steps;
        }
        let want = rd.crc.clone().finalize();
        let got = rd.u32()?;
        if got != want {
            return Err(corrupt(format!(
                "file checksum {want:#010x}, stored {got:#010x}"
            )));
        }
        Ok(())
    }
}

fn pins_code(p: Pins) -> u8 {
    [Pins::SINK, Pins::USER, Pins::PROTECTED]
        .iter()
        .enumerate()
        .map(|(i, &x)| u8::from(p.contains(x)) << i)
        .sum()
}

fn pins_from(b: u8) -> Pins {
    let mut p = Pins::none();
    for (i, &x) in [Pins::SINK, Pins::USER, Pins::PROTECTED].iter().enumerate() {
        if b >> i & 1 != 0 {
            p.insert(x);
        }
    }
    p
}
