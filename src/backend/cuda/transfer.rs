//! Page bytes across the host boundary: reading pages back, and the portable page format.
//!
//! Owns: raw slot reads and writes (`hot_bytes`, `warm_bytes`), decoding hot elements, and the
//! bodies of `read_page`, `export_page`, `import_page`, `warm_key_bounds` and `warm_value_error`
//! for [`CudaStorage`]. Exported bytes are
//! exactly the [`PageBytes`] format of `backend/mod.rs`, which is how the device stores them, so
//! pages move between the CPU and CUDA backends byte for byte. Must never: accept bytes whose
//! tier, format or length differ from what the storage holds (typed errors instead), import a hot
//! page without recording its largest |value| (demotion relies on it), or run on the hot path.

use super::device::drv;
use super::storage::CudaStorage;
use crate::backend::PageBytes;
use crate::cache::{PageEntry, Tier};
use crate::config::HotDtype;
use crate::error::{Error, Result};
use crate::quant;
use cudarc::driver::result as cu;

/// Bytes of pages one synchronisation of a batched export copies (the page-locked landing buffer
/// holds this, or one page when a page is larger).
const EXPORT_CHUNK: usize = 8 << 20;
use half::{bf16, f16};

impl CudaStorage {
    /// The raw bytes of warm page `slot` (all kv heads), exactly as stored.
    pub fn warm_bytes(&self, slot: u32) -> Result<Vec<u8>> {
        if !self.warm.is_live(slot) {
            return Err(Error::internal(format!(
                "warm slot {slot} is not allocated"
            )));
        }
        self.read_bytes(self.warm.slot_ptr(slot), self.warm.slot_bytes)
    }

    /// The bytes of warm page `entry` (its kv heads' blocks in this storage's layout), checked to
    /// be a warm page of this storage's format. One copy of the whole page: the page's parameters
    /// are spread over its head blocks, and one transfer costs less than `kv_heads` small ones.
    pub(super) fn warm_page_blocks(&self, entry: &PageEntry) -> Result<Vec<u8>> {
        if entry.tier != Tier::Warm {
            return Err(Error::internal(format!(
                "warm page bytes of a {:?} page",
                entry.tier
            )));
        }
        if entry.format != self.layout.format() {
            return Err(Error::internal(format!(
                "warm page {entry:?} is not in this storage's format"
            )));
        }
        self.warm_bytes(entry.slot)
    }

    /// See [`crate::backend::BackendStorage::warm_key_bounds`]: the bounds come from the page's
    /// own parameters, decoded on the host by the same code as the CPU backend's.
    pub(super) fn key_bounds(
        &self,
        entry: &PageEntry,
        lo: &mut [f32],
        hi: &mut [f32],
    ) -> Result<()> {
        let (kvh, d) = (self.kvh, self.d);
        if lo.len() != kvh * d || hi.len() != kvh * d {
            return Err(Error::shape("key bounds", kvh * d, lo.len().min(hi.len())));
        }
        let b = self.warm_page_blocks(entry)?;
        for (h, blk) in b.chunks_exact(self.layout.head_bytes).enumerate() {
            let (l_h, h_h) = quant::keys::key_bounds(blk, &self.layout);
            lo[h * d..(h + 1) * d].copy_from_slice(&l_h);
            hi[h * d..(h + 1) * d].copy_from_slice(&h_h);
        }
        Ok(())
    }

    /// See [`crate::backend::BackendStorage::warm_value_error`].
    pub(super) fn value_error(&self, entry: &PageEntry, out: &mut [f32]) -> Result<()> {
        if out.len() != self.kvh {
            return Err(Error::shape("value steps", self.kvh, out.len()));
        }
        let b = self.warm_page_blocks(entry)?;
        let n = entry.n_tokens as usize;
        for (o, blk) in out.iter_mut().zip(b.chunks_exact(self.layout.head_bytes)) {
            *o = quant::values::value_error_bound(blk, n, &self.layout);
        }
        Ok(())
    }

    /// The raw bytes of hot page `slot`: K then V, each `[kv_heads][page_size][head_dim]`.
    pub fn hot_bytes(&self, slot: u32) -> Result<Vec<u8>> {
        self.hot_slot_check(slot)?;
        self.read_bytes(self.hot.slot_ptr(slot), self.hot.slot_bytes)
    }

    fn read_bytes(&self, ptr: u64, n: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; n];
        let st = self.stream();
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: `ptr..ptr+n` lies inside a live pool slot; the copy is ordered after every
        // kernel that wrote it, and the stream is synchronised before `v` is read.
        unsafe { cu::memcpy_dtoh_async(&mut v, ptr, st.cu_stream()) }.map_err(drv)?;
        st.synchronize().map_err(drv)?;
        Ok(v)
    }

    /// Copies `data` into the device at `ptr` (a live slot of at least `data.len()` bytes).
    fn write_bytes(&self, ptr: u64, data: &[u8]) -> Result<()> {
        let st = self.stream();
        st.context().bind_to_thread().map_err(drv)?;
        // SAFETY: the callers pass a live slot of `data.len()` bytes; the copy is ordered on the
        // stream after every earlier use of the slot, and pageable host memory is staged before
        // the call returns.
        unsafe { cu::memcpy_htod_async(ptr, data, st.cu_stream()) }.map_err(drv)?;
        Ok(())
    }

    fn element(&self, b: &[u8], i: usize) -> f32 {
        let o = i * self.hot_dtype.size();
        match self.hot_dtype {
            HotDtype::F32 => f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]),
            HotDtype::F16 => f16::from_le_bytes([b[o], b[o + 1]]).to_f32(),
            HotDtype::BF16 => bf16::from_le_bytes([b[o], b[o + 1]]).to_f32(),
        }
    }

    /// Largest |x| of a whole hot page in this storage's hot dtype; non-finite values are an error.
    fn hot_page_absmax(&self, data: &[u8]) -> Result<f32> {
        let mut m = 0f32;
        for i in 0..data.len() / self.hot_dtype.size() {
            let x = self.element(data, i);
            if !x.is_finite() {
                return Err(Error::NonFinite {
                    what: "page bytes",
                    index: i,
                });
            }
            m = m.max(x.abs());
        }
        Ok(m)
    }

    /// Stored page bytes checked against the tier's layout, for `import_page`.
    fn check_import(&self, page: &PageBytes) -> Result<()> {
        if page.n_tokens as usize > self.ps {
            return Err(Error::shape(
                "page n_tokens",
                format!("at most {}", self.ps),
                page.n_tokens,
            ));
        }
        let want =
            match page.tier {
                Tier::Hot => self.hot.slot_bytes,
                Tier::Warm if !self.warm_enabled => {
                    return Err(Error::Unsupported(
                        "warm pages on a CUDA storage without a warm tier",
                    ))
                }
                Tier::Warm if page.format != self.layout.format() => {
                    return Err(Error::Unsupported("CUDA warm pages use the config's bits"))
                }
                Tier::Warm => self.warm.slot_bytes,
                Tier::Cold | Tier::Evicted => return Err(Error::Unsupported(
                    "import_page of a cold or evicted page (only hot and warm pages have bytes)",
                )),
            };
        if page.data.len() != want {
            return Err(Error::shape("page bytes", want, page.data.len()));
        }
        Ok(())
    }

    /// See [`crate::backend::BackendStorage::read_page`].
    pub(super) fn read_page_f32(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = entry.n_tokens as usize;
        let (d, ps) = (self.d, self.ps);
        if n > ps {
            return Err(Error::internal(format!(
                "page {entry:?} holds more than {ps} tokens"
            )));
        }
        match entry.tier {
            Tier::Hot => {
                let b = self.hot_bytes(entry.slot)?;
                let half = self.kvh * ps * d;
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for h in 0..self.kvh {
                    let at = h * ps * d;
                    ks.extend((at..at + n * d).map(|i| self.element(&b, i)));
                    vs.extend((at..at + n * d).map(|i| self.element(&b, half + i)));
                }
                Ok((ks, vs))
            }
            Tier::Warm => {
                let b = self.warm_page_blocks(entry)?;
                let hb = self.layout.head_bytes;
                let (mut ks, mut vs) = (Vec::new(), Vec::new());
                for h in 0..self.kvh {
                    let blk = &b[h * hb..(h + 1) * hb];
                    ks.extend(quant::dequantize_keys(blk, n, &self.layout));
                    vs.extend(quant::dequantize_values(blk, n, &self.layout));
                }
                Ok((ks, vs))
            }
            t => Err(Error::internal(format!(
                "page in tier {t:?} has no bytes on the device"
            ))),
        }
    }

    /// Where the bytes of `entry` live on the device, checked: (address, length).
    fn export_src(&self, entry: &PageEntry) -> Result<(u64, usize)> {
        if entry.n_tokens as usize > self.ps {
            return Err(Error::internal(format!(
                "page {entry:?} holds more than {} tokens",
                self.ps
            )));
        }
        // Both tiers are stored exactly in the portable format: a hot slot is K then V, each
        // [kv_heads][page_size][head_dim] little-endian (zeroed at allocation, so tokens past
        // n_tokens are zero); a warm slot is kv_heads head blocks of the layout.
        match entry.tier {
            Tier::Hot => {
                self.hot_slot_check(entry.slot)?;
                Ok((self.hot.slot_ptr(entry.slot), self.hot.slot_bytes))
            }
            Tier::Warm if entry.format != self.layout.format() => Err(Error::internal(format!(
                "warm page {entry:?} is not in this storage's format"
            ))),
            Tier::Warm if !self.warm.is_live(entry.slot) => Err(Error::internal(format!(
                "warm slot {} is not allocated",
                entry.slot
            ))),
            Tier::Warm => Ok((self.warm.slot_ptr(entry.slot), self.warm.slot_bytes)),
            t => Err(Error::internal(format!(
                "export of a page in tier {t:?}: it has no bytes on the device"
            ))),
        }
    }

    /// See [`crate::backend::BackendStorage::export_page`].
    pub(super) fn export(&self, entry: &PageEntry) -> Result<PageBytes> {
        let (ptr, len) = self.export_src(entry)?;
        Ok(PageBytes {
            tier: entry.tier,
            format: entry.format,
            n_tokens: entry.n_tokens,
            data: self.read_bytes(ptr, len)?,
        })
    }

    /// See [`crate::backend::BackendStorage::export_pages`]: the copies queued into page-locked
    /// memory, one synchronisation per [`EXPORT_CHUNK`] bytes (so the buffer, kept for the next
    /// batch, stays small whatever the batch).
    pub(super) fn export_many(&mut self, entries: &[PageEntry]) -> Result<Vec<PageBytes>> {
        let src = entries
            .iter()
            .map(|e| self.export_src(e))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(entries.len());
        let mut first = 0;
        while first < entries.len() {
            // At least one page per chunk, then as many as fit the chunk.
            let mut end = first + 1;
            let mut bytes = src[first].1;
            while end < entries.len() && bytes + src[end].1 <= EXPORT_CHUNK {
                bytes += src[end].1;
                end += 1;
            }
            self.export_chunk(&entries[first..end], &src[first..end], bytes, &mut out)?;
            first = end;
        }
        Ok(out)
    }

    /// One chunk of [`Self::export_many`]: `total` bytes from the checked `src` ranges.
    fn export_chunk(
        &mut self,
        entries: &[PageEntry],
        src: &[(u64, usize)],
        total: usize,
        out: &mut Vec<PageBytes>,
    ) -> Result<()> {
        let st = self.stream().clone();
        st.context().bind_to_thread().map_err(drv)?;
        let host = self.export_host.ensure(st.context(), total)?;
        let mut at = 0;
        for &(ptr, len) in src {
            // SAFETY: `ptr..ptr+len` lies inside a live pool slot (checked by `export_src`),
            // ordered after every kernel that wrote it; `host[at..at+len]` is page-locked memory
            // of this context that nothing reads or frees until the synchronise below (also on
            // the error path).
            let r = unsafe { cu::memcpy_dtoh_async(&mut host[at..at + len], ptr, st.cu_stream()) };
            if let Err(e) = r {
                let _ = st.synchronize();
                return Err(drv(e).into());
            }
            at += len;
        }
        st.synchronize().map_err(drv)?;
        let host = self.export_host.slice_mut();
        let mut at = 0;
        for (e, &(_, len)) in entries.iter().zip(src) {
            out.push(PageBytes {
                tier: e.tier,
                format: e.format,
                n_tokens: e.n_tokens,
                data: host[at..at + len].to_vec(),
            });
            at += len;
        }
        Ok(())
    }

    /// See [`crate::backend::BackendStorage::import_page`].
    pub(super) fn import(&mut self, page: &PageBytes) -> Result<u32> {
        self.check_import(page)?;
        let st = self.stream().clone();
        match page.tier {
            Tier::Hot => {
                let absmax = self.hot_page_absmax(&page.data)?;
                let s = self.hot.alloc(&st)?;
                if let Err(e) = self.write_bytes(self.hot.slot_ptr(s), &page.data) {
                    self.hot.release(s);
                    return Err(e);
                }
                if self.hot_absmax.len() <= s as usize {
                    self.hot_absmax.resize(s as usize + 1, 0.0);
                }
                // Demotion of this page must read back the overflow flag exactly when a written
                // page with these values would.
                self.hot_absmax[s as usize] = absmax;
                Ok(s)
            }
            _ => {
                let s = self.warm.alloc(&st)?;
                if let Err(e) = self.write_bytes(self.warm.slot_ptr(s), &page.data) {
                    self.warm.release(s);
                    return Err(e);
                }
                Ok(s)
            }
        }
    }
}
