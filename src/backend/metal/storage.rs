//! One layer's hot and warm page pools in shared Metal buffers, and the [`BackendStorage`] impl.
//!
//! Owns: [`MetalStorage`] (two slot pools, one buffer per tier, grown by allocating a larger
//! buffer and copying; the append staging buffer; the demotion failure flag) and the trait impl:
//! append (`kvt_append`), demotion (`kvt_quantize`), attention (`kvt_decode` + `kvt_combine`,
//! host or device queries, optional page selection) and prefill. Pages are in the CPU's byte
//! formats, so host reads (export, read-back, key bounds, value error) use the `quant` module
//! directly on the shared bytes. Planning is `plan.rs`.
//! Must never: write a dequantised page anywhere, lose a stored page on an error (a failed grow
//! keeps the old buffer; a failed demotion leaves the hot page as it was), or touch a buffer
//! while a dispatch is in flight (every run waits before returning).

use super::device::MetalDevice;
use super::gpu::{Dispatch, Kernel, MetalBuffer};
use super::params::{quant_tg_bytes, AppendParams, QuantParams};
use crate::attention::Attention;
use crate::backend::cpu::{bits_index, ALL_BITS};
use crate::backend::{
    hot_page_bytes, AttendInput, BackendStorage, DeviceBuffers, DeviceLocation, PageBytes, Scratch,
    StorageBytes,
};
use crate::cache::{PageEntry, PageTable, Tier};
use crate::config::{CacheConfig, HotDtype};
use crate::error::{Error, Result};
use crate::quant::{self, WarmFormat, WarmLayout};
use half::{bf16, f16};

/// Slots of one tier: one buffer of `cap * slot_bytes`, slot `i` at `i * slot_bytes`.
pub(super) struct Pool {
    pub(super) buf: Option<MetalBuffer>,
    pub(super) slot_bytes: usize,
    cap: usize,
    live: Vec<bool>,
    free: Vec<u32>,
}

impl Pool {
    fn new(slot_bytes: usize) -> Self {
        Pool {
            buf: None,
            slot_bytes,
            cap: 0,
            live: Vec::new(),
            free: Vec::new(),
        }
    }

    /// A free slot, growing the buffer (doubling) when none is left; the old buffer stays until
    /// the new one holds a copy, so a failed grow loses nothing.
    fn alloc(&mut self, dev: &MetalDevice) -> Result<u32> {
        if let Some(s) = self.free.pop() {
            self.live[s as usize] = true;
            return Ok(s);
        }
        if self.live.len() == self.cap {
            let cap = (self.cap * 2).max(4);
            if cap > u32::MAX as usize {
                return Err(Error::OutOfMemory {
                    what: "metal page slots",
                    bytes: usize::MAX,
                });
            }
            let bytes = cap.checked_mul(self.slot_bytes).ok_or(Error::OutOfMemory {
                what: "metal page pool",
                bytes: usize::MAX,
            })?;
            let mut nb = dev.gpu().alloc(bytes)?;
            if let Some(old) = &self.buf {
                let used = self.cap * self.slot_bytes;
                nb.write(0, old.bytes(0, used)?)?;
            }
            self.buf = Some(nb);
            self.cap = cap;
        }
        self.live.try_reserve(1).map_err(|_| Error::OutOfMemory {
            what: "metal slot table",
            bytes: self.live.len() + 1,
        })?;
        self.live.push(true);
        Ok((self.live.len() - 1) as u32)
    }

    fn is_live(&self, slot: u32) -> bool {
        self.live.get(slot as usize).copied().unwrap_or(false)
    }

    fn release(&mut self, slot: u32) -> bool {
        if !self.is_live(slot) {
            return false;
        }
        self.live[slot as usize] = false;
        self.free.push(slot);
        true
    }

    fn buffer(&self) -> Result<&MetalBuffer> {
        self.buf
            .as_ref()
            .ok_or_else(|| Error::internal("metal pool has no buffer".to_string()))
    }

    /// The bytes of live slot `slot`.
    fn slot(&self, slot: u32) -> Result<&[u8]> {
        if !self.is_live(slot) {
            return Err(Error::internal(format!(
                "metal slot {slot} is not allocated"
            )));
        }
        self.buffer()?
            .bytes(slot as usize * self.slot_bytes, self.slot_bytes)
    }

    fn slot_mut(&mut self, slot: u32) -> Result<&mut [u8]> {
        if !self.is_live(slot) {
            return Err(Error::internal(format!(
                "metal slot {slot} is not allocated"
            )));
        }
        let sb = self.slot_bytes;
        self.buf
            .as_mut()
            .ok_or_else(|| Error::internal("metal pool has no buffer".to_string()))?
            .bytes_mut(slot as usize * sb, sb)
    }

    fn live_count(&self) -> usize {
        self.live.len() - self.free.len()
    }

    fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, MetalBuffer::len)
    }

    fn metadata_bytes(&self) -> usize {
        self.live.capacity() + self.free.capacity() * 4
    }
}

/// One layer's pages on a Metal device.
pub struct MetalStorage {
    pub(super) dev: MetalDevice,
    pub(super) kvh: usize,
    pub(super) qh: usize,
    pub(super) d: usize,
    pub(super) ps: usize,
    pub(super) hot_dtype: HotDtype,
    pub(super) scale: f32,
    pub(super) value_group: usize,
    layouts: [[WarmLayout; 4]; 4],
    pub(super) hot: Pool,
    pub(super) warm: Pool,
    staging: Option<MetalBuffer>,
    flag: MetalBuffer,
}

/// The kernels' code of a hot dtype.
pub(super) fn dtype_code(d: HotDtype) -> u32 {
    match d {
        HotDtype::F32 => 0,
        HotDtype::F16 => 1,
        HotDtype::BF16 => 2,
    }
}

/// A `u32` kernel parameter, checked.
pub(super) fn u32_of(what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::shape(what, "a count below 2^32", v))
}

impl MetalStorage {
    /// Empty pools for a validated config. Refuses (typed) what these kernels do not handle: key
    /// outlier channels, fitted value ranges, and shapes whose threadgroup memory would exceed 32 KiB.
    pub fn new(dev: MetalDevice, cfg: &CacheConfig) -> Result<Self> {
        if cfg.key_outliers > 0 {
            return Err(Error::Unsupported(
                "key outlier channels on the Metal backend",
            ));
        }
        if cfg.value_fit {
            return Err(Error::Unsupported(
                "fitted value ranges (value_fit) on the Metal backend",
            ));
        }
        let (d, ps) = (cfg.head_dim, cfg.page_size);
        let g = cfg.num_q_heads / cfg.num_kv_heads;
        if d > 256 || d % 8 != 0 {
            return Err(Error::Unsupported(
                "head_dim above 256 (or not a multiple of 8) on the Metal backend",
            ));
        }
        let tg =
            quant_tg_bytes(d, ps, cfg.value_group).max(super::params::decode_tg_bytes(g, d, ps));
        if tg > super::gpu::MAX_TG_BYTES {
            return Err(Error::Unsupported(
                "page_size x head_dim x group this large on the Metal backend (over 32 KiB of threadgroup memory)",
            ));
        }
        let layouts = ALL_BITS.map(|k_bits| {
            ALL_BITS.map(|v_bits| WarmLayout::of_format(cfg, WarmFormat { k_bits, v_bits }))
        });
        let widest = layouts
            .iter()
            .flatten()
            .map(|l| l.head_bytes)
            .max()
            .unwrap_or(0);
        let flag = dev.gpu().alloc(16)?;
        Ok(MetalStorage {
            kvh: cfg.num_kv_heads,
            qh: cfg.num_q_heads,
            d,
            ps,
            hot_dtype: cfg.hot_dtype,
            scale: cfg.scale(),
            value_group: cfg.value_group,
            layouts,
            hot: Pool::new(hot_page_bytes(cfg, cfg.hot_dtype)),
            warm: Pool::new(widest * cfg.num_kv_heads),
            staging: None,
            flag,
            dev,
        })
    }

    /// The warm layout of `fmt`.
    pub(super) fn layout(&self, fmt: WarmFormat) -> &WarmLayout {
        &self.layouts[bits_index(fmt.k_bits)][bits_index(fmt.v_bits)]
    }

    fn hot_elems(&self) -> usize {
        self.kvh * self.ps * self.d
    }

    /// Element `i` of a hot half (keys or values) as f32.
    fn hot_elem(&self, bytes: &[u8], i: usize) -> f32 {
        match self.hot_dtype {
            HotDtype::F32 => f32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ]),
            HotDtype::F16 => f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
            HotDtype::BF16 => bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32(),
        }
    }

    /// The warm head blocks of `entry` (`kvh` blocks of its format's layout).
    fn warm_block(&self, entry: &PageEntry) -> Result<(&[u8], &WarmLayout)> {
        if entry.tier != Tier::Warm {
            return Err(Error::internal(format!(
                "a warm read of a {:?} page",
                entry.tier
            )));
        }
        let l = self.layout(entry.format);
        let b = self.warm.slot(entry.slot)?;
        Ok((&b[..l.head_bytes * self.kvh], l))
    }

    /// Makes the staging buffer at least `bytes` long.
    fn staging(&mut self, bytes: usize) -> Result<&mut MetalBuffer> {
        if self.staging.as_ref().is_none_or(|b| b.len() < bytes) {
            let want = bytes.max(self.staging.as_ref().map_or(0, |b| b.len() * 2));
            self.staging = Some(self.dev.gpu().alloc(want)?);
        }
        self.staging
            .as_mut()
            .ok_or_else(|| Error::internal("metal staging buffer".to_string()))
    }
}

impl BackendStorage for MetalStorage {
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Metal
    }

    fn alloc_hot(&mut self) -> Result<u32> {
        let slot = self.hot.alloc(&self.dev)?;
        // A reused slot holds an old page: hot pages start zeroed (tokens past n_tokens are zero).
        self.hot.slot_mut(slot)?.fill(0);
        Ok(slot)
    }

    fn write_hot(
        &mut self,
        slot: u32,
        first: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()> {
        let (kvh, d, ps) = (self.kvh, self.d, self.ps);
        if first + n > ps {
            return Err(Error::internal(format!(
                "write of {n} tokens at {first} overflows a page of {ps}"
            )));
        }
        let len = n * kvh * d;
        if keys.len() != len || values.len() != len {
            return Err(Error::shape(
                "keys/values",
                len,
                keys.len().max(values.len()),
            ));
        }
        if !self.hot.is_live(slot) {
            return Err(Error::internal(format!("hot slot {slot} is not allocated")));
        }
        if n == 0 {
            return Ok(());
        }
        let st = self.staging(8 * len)?;
        st.write(0, bytemuck::cast_slice(keys))?;
        st.write(4 * len, bytemuck::cast_slice(values))?;
        let p = AppendParams {
            slot,
            first: first as u32,
            n: n as u32,
            kvh: kvh as u32,
            ps: ps as u32,
            d: d as u32,
            hot_dtype: dtype_code(self.hot_dtype),
            src_dtype: 0,
            hot_page_bytes: u32_of("hot page bytes", self.hot.slot_bytes)?,
            pad: [0; 3],
        };
        let (hot, st) = (self.hot.buffer()?, self.staging.as_ref());
        let st = st.ok_or_else(|| Error::internal("metal staging buffer".to_string()))?;
        self.dev.gpu().run(&[Dispatch {
            kernel: Kernel::Append,
            groups: u32_of("append elements", len.div_ceil(256))?,
            threads: 256,
            tg_bytes: 0,
            bufs: &[(hot, 0), (st, 0), (st, 4 * len)],
            params: bytemuck::bytes_of(&p),
        }])
    }

    fn demote(&mut self, slot: u32, n_tokens: usize, format: WarmFormat) -> Result<Option<u32>> {
        if n_tokens > self.ps {
            return Err(Error::internal(format!("demote of {n_tokens} tokens")));
        }
        if !self.hot.is_live(slot) {
            return Err(Error::internal(format!("hot slot {slot} is not allocated")));
        }
        let l = *self.layout(format);
        let warm = self.warm.alloc(&self.dev)?;
        self.flag.write(0, &[0; 4])?;
        let p = QuantParams {
            hot_slot: slot,
            warm_slot: warm,
            n: n_tokens as u32,
            ps: self.ps as u32,
            d: self.d as u32,
            hot_dtype: dtype_code(self.hot_dtype),
            hot_page_bytes: u32_of("hot page bytes", self.hot.slot_bytes)?,
            warm_page_bytes: u32_of("warm page bytes", self.warm.slot_bytes)?,
            head_bytes: l.head_bytes as u32,
            k_bits: l.k_bits.bits() as u32,
            v_bits: l.v_bits.bits() as u32,
            value_group: l.value_group as u32,
            k_min: l.k_min as u32,
            k_step: l.k_step as u32,
            v_min: l.v_min as u32,
            v_step: l.v_step as u32,
            k_codes: l.k_codes as u32,
            v_codes: l.v_codes as u32,
            pad: [0; 2],
        };
        let run = self.dev.gpu().run(&[Dispatch {
            kernel: Kernel::Quantize,
            groups: self.kvh as u32,
            threads: 256,
            tg_bytes: quant_tg_bytes(self.d, self.ps, self.value_group),
            bufs: &[
                (self.hot.buffer()?, 0),
                (self.warm.buffer()?, 0),
                (&self.flag, 0),
            ],
            params: bytemuck::bytes_of(&p),
        }]);
        let failed = match run {
            Ok(()) => self.flag.bytes(0, 4)? != [0; 4],
            Err(e) => {
                self.warm.release(warm);
                return Err(e);
            }
        };
        if failed {
            // Beyond f16: the hot page stays as it was.
            self.warm.release(warm);
            return Ok(None);
        }
        self.hot.release(slot);
        Ok(Some(warm))
    }

    fn supports_format(&self, _format: WarmFormat) -> bool {
        // Every width pair of `ALL_BITS` (outlier configs are refused at creation).
        true
    }

    fn free(&mut self, tier: Tier, slot: u32) {
        match tier {
            Tier::Hot => {
                self.hot.release(slot);
            }
            Tier::Warm => {
                self.warm.release(slot);
            }
            Tier::Cold | Tier::Evicted => {}
        }
    }

    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = entry.n_tokens as usize;
        if n > self.ps {
            return Err(Error::internal(format!("a page of {n} tokens")));
        }
        let (kvh, d, ps) = (self.kvh, self.d, self.ps);
        let (mut ks, mut vs) = (
            Vec::with_capacity(kvh * n * d),
            Vec::with_capacity(kvh * n * d),
        );
        match entry.tier {
            Tier::Hot => {
                let b = self.hot.slot(entry.slot)?;
                let (kb, vb) = b.split_at(b.len() / 2);
                for h in 0..kvh {
                    for i in h * ps * d..(h * ps + n) * d {
                        ks.push(self.hot_elem(kb, i));
                        vs.push(self.hot_elem(vb, i));
                    }
                }
            }
            Tier::Warm => {
                let (b, l) = self.warm_block(entry)?;
                for blk in b.chunks_exact(l.head_bytes) {
                    ks.extend(quant::dequantize_keys(blk, n, l));
                    vs.extend(quant::dequantize_values(blk, n, l));
                }
            }
            t => {
                return Err(Error::internal(format!(
                    "page in tier {t:?} has no bytes on the device"
                )))
            }
        }
        Ok((ks, vs))
    }

    fn warm_key_bounds(&self, entry: &PageEntry, lo: &mut [f32], hi: &mut [f32]) -> Result<()> {
        let d = self.d;
        if lo.len() != self.kvh * d || hi.len() != self.kvh * d {
            return Err(Error::shape(
                "key bounds",
                self.kvh * d,
                lo.len().min(hi.len()),
            ));
        }
        let (b, l) = self.warm_block(entry)?;
        for (h, blk) in b.chunks_exact(l.head_bytes).enumerate() {
            let (l_h, h_h) = quant::keys::key_bounds(blk, l);
            lo[h * d..(h + 1) * d].copy_from_slice(&l_h);
            hi[h * d..(h + 1) * d].copy_from_slice(&h_h);
        }
        Ok(())
    }

    fn warm_value_error(&self, entry: &PageEntry, out: &mut [f32]) -> Result<()> {
        if out.len() != self.kvh {
            return Err(Error::shape("value steps", self.kvh, out.len()));
        }
        let (b, l) = self.warm_block(entry)?;
        for (o, blk) in out.iter_mut().zip(b.chunks_exact(l.head_bytes)) {
            *o = quant::values::value_error_bound(blk, entry.n_tokens as usize, l);
        }
        Ok(())
    }

    fn export_page(&self, entry: &PageEntry) -> Result<PageBytes> {
        let src = match entry.tier {
            Tier::Hot => self.hot.slot(entry.slot)?,
            Tier::Warm => self.warm_block(entry)?.0,
            t => {
                return Err(Error::internal(format!(
                    "export of a page in tier {t:?}, which has no bytes on the device"
                )))
            }
        };
        let mut data = Vec::new();
        data.try_reserve_exact(src.len())
            .map_err(|_| Error::OutOfMemory {
                what: "exported page",
                bytes: src.len(),
            })?;
        data.extend_from_slice(src);
        Ok(PageBytes {
            tier: entry.tier,
            format: entry.format,
            n_tokens: entry.n_tokens,
            data,
        })
    }

    fn import_page(&mut self, page: &PageBytes) -> Result<u32> {
        if page.n_tokens as usize > self.ps {
            return Err(Error::shape(
                "page bytes",
                format!("at most {} tokens", self.ps),
                page.n_tokens,
            ));
        }
        match page.tier {
            Tier::Hot => {
                let want = 2 * self.hot_elems() * self.hot_dtype.size();
                if page.data.len() != want {
                    return Err(Error::shape("hot page bytes", want, page.data.len()));
                }
                let slot = self.hot.alloc(&self.dev)?;
                self.hot.slot_mut(slot)?.copy_from_slice(&page.data);
                Ok(slot)
            }
            Tier::Warm => {
                let l = *self.layout(page.format);
                let want = l.head_bytes * self.kvh;
                if page.data.len() != want {
                    return Err(Error::shape("warm page bytes", want, page.data.len()));
                }
                let slot = self.warm.alloc(&self.dev)?;
                self.warm.slot_mut(slot)?[..want].copy_from_slice(&page.data);
                Ok(slot)
            }
            t => Err(Error::shape(
                "page bytes",
                "a hot or warm page",
                format!("{t:?}"),
            )),
        }
    }

    fn attend(&self, scratch: &mut Scratch, input: &AttendInput) -> Result<Attention> {
        let what = scratch.page_results();
        self.attend_with(scratch.metal(), input, None, what)
    }

    fn attend_device(
        &self,
        scratch: &mut Scratch,
        input: &AttendInput,
        bufs: &DeviceBuffers,
    ) -> Result<Attention> {
        let DeviceBuffers::Metal(b) = bufs else {
            return Err(Error::Unsupported(
                "attend_device on a Metal cache needs Metal buffers",
            ));
        };
        let what = scratch.page_results();
        self.attend_with(scratch.metal(), input, Some(b), what)
    }

    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        crate::backend::prefill::prefill_with(
            table,
            queries,
            keys,
            values,
            n,
            (self.qh, self.kvh, self.d),
            self.scale,
            |input| {
                let mut scratch = super::MetalScratch::default();
                self.attend_with(&mut scratch, input, None, crate::backend::PageResults::None)
            },
        )
    }

    fn bytes(&self) -> StorageBytes {
        StorageBytes {
            hot: self.hot.bytes(),
            warm: self.warm.bytes(),
            metadata: self.hot.metadata_bytes()
                + self.warm.metadata_bytes()
                + self.staging.as_ref().map_or(0, MetalBuffer::len)
                + self.flag.len(),
        }
    }
}

impl MetalStorage {
    /// Pages held, hot and warm (for tests).
    pub fn live_pages(&self) -> (usize, usize) {
        (self.hot.live_count(), self.warm.live_count())
    }
}
