//! CPU backend: host page pools and the reference (oracle) kernels.
//!
//! Owns: [`CpuStorage`] (one layer's hot and warm pools in host memory) and the split-K decode
//! attention in [`kernel`]. Every other backend is tested against this one on the same inputs.
//! Must never: keep a dequantised copy of a warm page (dequantisation happens in registers and
//! per-row scratch inside the kernel).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod dispatch;
mod kernel;
mod pools;
mod simd;

use crate::attention::Attention;
use crate::backend::{
    AttendInput, BackendDevice, BackendStorage, DeviceLocation, PageBytes, Scratch, StorageBytes,
};
use crate::cache::{PageEntry, PageTable, Tier};
use crate::config::{Bits, CacheConfig, HotDtype};
use crate::error::{Error, Result};
use crate::quant::{self, WarmFormat, WarmLayout};
use pools::{try_zeroed_bytes, HotBuf, HotPage, Pool};

pub use dispatch::CpuKernel;
pub use kernel::CpuScratch;

/// The host device.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuDevice;

impl BackendDevice for CpuDevice {
    type Storage = CpuStorage;
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Cpu
    }
    fn storage(&self, cfg: &CacheConfig, _layer: usize) -> Result<CpuStorage> {
        // Resolved here so a path this CPU lacks is an error at cache creation.
        Ok(CpuStorage::with_kernel(cfg, cfg.cpu_kernel.resolve()?))
    }
}

/// Shape facts the kernels need, copied out of the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub kv_heads: usize,
    pub q_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub scale: f32,
    pub hot_dtype: HotDtype,
}

impl Geometry {
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Elements of one hot page's K (or V): `[kv_heads][page_size][head_dim]`.
    pub fn hot_elems(&self) -> usize {
        self.kv_heads * self.page_size * self.head_dim
    }
}

/// Index of a code width in per-width tables.
pub(crate) const fn bits_index(b: Bits) -> usize {
    match b {
        Bits::B8 => 0,
        Bits::B4 => 1,
        Bits::B2 => 2,
        Bits::B3 => 3,
    }
}

/// Every code width, in [`bits_index`] order.
pub(crate) const ALL_BITS: [Bits; 4] = [Bits::B8, Bits::B4, Bits::B2, Bits::B3];

/// One layer's pages in host memory.
pub struct CpuStorage {
    geo: Geometry,
    /// Warm layouts by `[k bits][v bits]` index: pages of one layer may have different widths.
    layouts: [[WarmLayout; 4]; 4],
    hot: Pool<HotPage>,
    warm: Pool<Box<[u8]>>,
    hot_bytes: usize,
    warm_bytes: usize,
    /// Lane orders of each bit width (see `quant::pack`), by width index.
    orders: [Vec<usize>; 4],
    /// Lane orders of 16-byte unpacking (the AVX-512 value loop), by width index.
    orders16: [Vec<usize>; 4],
    /// Byte order of the integer key loops' query pattern, by width index (see `kernel::wide`).
    orders_int: [Vec<usize>; 4],
    /// The resolved kernel path (never `Auto`); off x86-64 only `Portable` exists.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    kernel: CpuKernel,
}

impl CpuStorage {
    /// Empty pools for a validated config. Storages made for a moment (page conversion, reports)
    /// run no attention path a cache did not already accept; an unresolvable path falls back to
    /// portable here, while [`CpuDevice::storage`] reports it.
    pub fn new(cfg: &CacheConfig) -> Self {
        Self::with_kernel(cfg, cfg.cpu_kernel.resolve().unwrap_or(CpuKernel::Portable))
    }

    /// Empty pools running `kernel` (a resolved path, never `Auto`).
    fn with_kernel(cfg: &CacheConfig, kernel: CpuKernel) -> Self {
        // of_format carries the config's key outlier count into every width.
        let layouts = ALL_BITS.map(|k_bits| {
            ALL_BITS.map(|v_bits| WarmLayout::of_format(cfg, WarmFormat { k_bits, v_bits }))
        });
        CpuStorage {
            geo: Geometry {
                kv_heads: cfg.num_kv_heads,
                q_heads: cfg.num_q_heads,
                head_dim: cfg.head_dim,
                page_size: cfg.page_size,
                scale: cfg.scale(),
                hot_dtype: cfg.hot_dtype,
            },
            layouts,
            hot: Pool::default(),
            warm: Pool::default(),
            hot_bytes: 0,
            warm_bytes: 0,
            orders: ALL_BITS.map(|b| quant::pack::lane_order(b, cfg.head_dim)),
            orders16: ALL_BITS.map(|b| quant::pack::lane_order_chunk(b, cfg.head_dim, 16)),
            orders_int: ALL_BITS.map(|b| match b {
                Bits::B8 => (0..cfg.head_dim).collect(),
                b => {
                    let chunk = (cfg.head_dim * b.bits() / 8).min(64);
                    quant::pack::lane_order_chunk(b, cfg.head_dim, chunk)
                }
            }),
            kernel,
        }
    }

    /// The warm layout of `fmt`.
    pub(crate) fn layout(&self, fmt: WarmFormat) -> &WarmLayout {
        &self.layouts[bits_index(fmt.k_bits)][bits_index(fmt.v_bits)]
    }

    /// The kernel path this storage runs.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn kernel(&self) -> CpuKernel {
        self.kernel
    }

    /// Lane order of 16-byte unpacking of codes of width `b` (empty when `head_dim` codes are not
    /// a whole number of 16-byte chunks).
    pub(crate) fn order16(&self, b: Bits) -> &[usize] {
        &self.orders16[bits_index(b)]
    }

    /// The integer key loops' query order for width `b` (empty when the row shape has none).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn int_order(&self, b: Bits) -> &[usize] {
        &self.orders_int[bits_index(b)]
    }

    /// Lane order of codes of width `b`.
    pub(crate) fn order(&self, b: Bits) -> &[usize] {
        &self.orders[bits_index(b)]
    }

    fn hot_elems_bytes(&self) -> usize {
        2 * self.geo.hot_elems() * self.geo.hot_dtype.size()
    }

    fn hot_page(&self, slot: u32) -> Result<&HotPage> {
        self.hot
            .get(slot)
            .ok_or_else(|| internal(format!("hot slot {slot} is not allocated")))
    }

    fn warm_page(&self, slot: u32) -> Result<&[u8]> {
        self.warm
            .get(slot)
            .map(|b| &b[..])
            .ok_or_else(|| internal(format!("warm slot {slot} is not allocated")))
    }

    /// Hot page keys and values of one kv head as f32 `[page_size][head_dim]`, `n` tokens.
    fn hot_head(&self, slot: u32, head: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let p = self.hot_page(slot)?;
        let d = self.geo.head_dim;
        let at = head * self.geo.page_size * d;
        let (mut sk, mut sv) = (Vec::new(), Vec::new());
        Ok((
            p.k.read(at, n * d, &mut sk).to_vec(),
            p.v.read(at, n * d, &mut sv).to_vec(),
        ))
    }
}

/// A broken internal invariant reported as an error rather than a panic.
fn internal(msg: String) -> Error {
    Error::internal(msg)
}

impl BackendStorage for CpuStorage {
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Cpu
    }

    fn alloc_hot(&mut self) -> Result<u32> {
        let n = self.geo.hot_elems();
        let page = HotPage {
            k: HotBuf::new(self.geo.hot_dtype, n)?,
            v: HotBuf::new(self.geo.hot_dtype, n)?,
        };
        let bytes = page.k.bytes() + page.v.bytes();
        let slot = self.hot.insert(page)?;
        self.hot_bytes += bytes;
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
        let Geometry {
            kv_heads,
            head_dim: d,
            page_size,
            ..
        } = self.geo;
        if first + n > page_size {
            return Err(internal(format!(
                "write of {n} tokens at {first} overflows a page of {page_size}"
            )));
        }
        let page = self
            .hot
            .get_mut(slot)
            .ok_or_else(|| internal(format!("hot slot {slot} is not allocated")))?;
        for t in 0..n {
            for h in 0..kv_heads {
                let src = (t * kv_heads + h) * d;
                let dst = (h * page_size + first + t) * d;
                page.k.write(dst, &keys[src..src + d]);
                page.v.write(dst, &values[src..src + d]);
            }
        }
        Ok(())
    }

    fn demote(&mut self, slot: u32, n_tokens: usize, format: WarmFormat) -> Result<Option<u32>> {
        if n_tokens > self.geo.page_size {
            return Err(internal(format!("demote of {n_tokens} tokens")));
        }
        let layout = *self.layout(format);
        let mut block = try_zeroed_bytes(layout.head_bytes * self.geo.kv_heads)?;
        for h in 0..self.geo.kv_heads {
            let (k, v) = self.hot_head(slot, h, n_tokens)?;
            let dst = &mut block[h * layout.head_bytes..(h + 1) * layout.head_bytes];
            if !quant::quantize_keys(&k, n_tokens, &layout, dst)
                || !quant::quantize_values(&v, n_tokens, &layout, dst)
            {
                return Ok(None);
            }
        }
        let len = block.len();
        let warm = self.warm.insert(block)?;
        self.warm_bytes += len;
        self.free(Tier::Hot, slot);
        Ok(Some(warm))
    }

    fn supports_format(&self, _format: WarmFormat) -> bool {
        true
    }

    fn free(&mut self, tier: Tier, slot: u32) {
        match tier {
            Tier::Hot => {
                if let Some(p) = self.hot.remove(slot) {
                    self.hot_bytes -= p.k.bytes() + p.v.bytes();
                }
            }
            Tier::Warm => {
                if let Some(b) = self.warm.remove(slot) {
                    self.warm_bytes -= b.len();
                }
            }
            Tier::Cold | Tier::Evicted => {}
        }
    }

    fn warm_value_error(&self, entry: &PageEntry, out: &mut [f32]) -> Result<()> {
        if entry.tier != Tier::Warm {
            return Err(internal(format!(
                "warm_value_error of a {:?} page",
                entry.tier
            )));
        }
        let l = self.layout(entry.format);
        let kvh = self.geo.kv_heads;
        if out.len() != kvh {
            return Err(Error::shape("value steps", kvh, out.len()));
        }
        let block = self.warm_page(entry.slot)?;
        for (h, o) in out.iter_mut().enumerate() {
            *o = quant::values::value_error_bound(
                &block[h * l.head_bytes..(h + 1) * l.head_bytes],
                entry.n_tokens as usize,
                l,
            );
        }
        Ok(())
    }

    fn warm_key_bounds(&self, entry: &PageEntry, lo: &mut [f32], hi: &mut [f32]) -> Result<()> {
        if entry.tier != Tier::Warm {
            return Err(internal(format!(
                "warm_key_bounds of a {:?} page",
                entry.tier
            )));
        }
        let l = self.layout(entry.format);
        let (kvh, d) = (self.geo.kv_heads, self.geo.head_dim);
        if lo.len() != kvh * d || hi.len() != kvh * d {
            return Err(Error::shape("key bounds", kvh * d, lo.len().min(hi.len())));
        }
        let block = self.warm_page(entry.slot)?;
        for h in 0..kvh {
            let (l_h, h_h) =
                quant::keys::key_bounds(&block[h * l.head_bytes..(h + 1) * l.head_bytes], l);
            lo[h * d..(h + 1) * d].copy_from_slice(&l_h);
            hi[h * d..(h + 1) * d].copy_from_slice(&h_h);
        }
        Ok(())
    }

    fn export_page(&self, entry: &PageEntry) -> Result<PageBytes> {
        let data = match entry.tier {
            Tier::Hot => {
                let p = self.hot_page(entry.slot)?;
                let mut d = Vec::new();
                d.try_reserve_exact(self.hot_elems_bytes())
                    .map_err(|_| Error::OutOfMemory {
                        what: "exported page",
                        bytes: self.hot_elems_bytes(),
                    })?;
                p.k.append_le_bytes(&mut d);
                p.v.append_le_bytes(&mut d);
                d
            }
            Tier::Warm => {
                let b = self.warm_page(entry.slot)?;
                let mut d = Vec::new();
                d.try_reserve_exact(b.len())
                    .map_err(|_| Error::OutOfMemory {
                        what: "exported page",
                        bytes: b.len(),
                    })?;
                d.extend_from_slice(b);
                d
            }
            t => {
                return Err(internal(format!(
                    "export of a page in tier {t:?}, which has no bytes on the device"
                )))
            }
        };
        Ok(PageBytes {
            tier: entry.tier,
            format: entry.format,
            n_tokens: entry.n_tokens,
            data,
        })
    }

    fn import_page(&mut self, page: &PageBytes) -> Result<u32> {
        if page.n_tokens as usize > self.geo.page_size {
            return Err(Error::shape(
                "page bytes",
                format!("at most {} tokens", self.geo.page_size),
                page.n_tokens,
            ));
        }
        match page.tier {
            Tier::Hot => {
                let want = self.hot_elems_bytes();
                if page.data.len() != want {
                    return Err(Error::shape("hot page bytes", want, page.data.len()));
                }
                let n = self.geo.hot_elems();
                let half = want / 2;
                let p = HotPage {
                    k: HotBuf::from_le_bytes(self.geo.hot_dtype, n, &page.data[..half])?,
                    v: HotBuf::from_le_bytes(self.geo.hot_dtype, n, &page.data[half..])?,
                };
                let slot = self.hot.insert(p)?;
                self.hot_bytes += want;
                Ok(slot)
            }
            Tier::Warm => {
                let want = self.layout(page.format).head_bytes * self.geo.kv_heads;
                if page.data.len() != want {
                    return Err(Error::shape("warm page bytes", want, page.data.len()));
                }
                let l = self.layout(page.format);
                for h in 0..self.geo.kv_heads {
                    let blk = &page.data[h * l.head_bytes..(h + 1) * l.head_bytes];
                    let (idx, _) = quant::keys::outliers(blk, l);
                    if idx.iter().any(|&c| c >= self.geo.head_dim) {
                        return Err(Error::shape(
                            "warm page outlier channels",
                            format!("channels < {}", self.geo.head_dim),
                            format!("{idx:?}"),
                        ));
                    }
                }
                let mut b = try_zeroed_bytes(want)?;
                b.copy_from_slice(&page.data);
                let slot = self.warm.insert(b)?;
                self.warm_bytes += want;
                Ok(slot)
            }
            t => Err(Error::shape(
                "page bytes",
                "a hot or warm page",
                format!("{t:?}"),
            )),
        }
    }

    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = entry.n_tokens as usize;
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for h in 0..self.geo.kv_heads {
            let (k, v) = match entry.tier {
                Tier::Hot => self.hot_head(entry.slot, h, n)?,
                Tier::Warm => {
                    let b = self.warm_page(entry.slot)?;
                    let l = self.layout(entry.format);
                    let blk = b
                        .get(h * l.head_bytes..(h + 1) * l.head_bytes)
                        .ok_or_else(|| internal("warm page shorter than its format".into()))?;
                    (
                        quant::dequantize_keys(blk, n, l),
                        quant::dequantize_values(blk, n, l),
                    )
                }
                t => {
                    return Err(internal(format!(
                        "page in tier {t:?} has no bytes on the device"
                    )))
                }
            };
            ks.extend(k);
            vs.extend(v);
        }
        Ok((ks, vs))
    }

    fn attend(&self, scratch: &mut Scratch, input: &AttendInput) -> Result<Attention> {
        let what = scratch.page_results();
        kernel::attend(self, scratch.cpu(), input, what)
    }

    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        kernel::prefill(self, table, queries, keys, values, n)
    }

    fn bytes(&self) -> StorageBytes {
        StorageBytes {
            hot: self.hot_bytes,
            warm: self.warm_bytes,
            metadata: self.hot.metadata_bytes()
                + self.warm.metadata_bytes()
                + self
                    .orders
                    .iter()
                    .map(|o| o.capacity() * std::mem::size_of::<usize>())
                    .sum::<usize>(),
        }
    }
}
