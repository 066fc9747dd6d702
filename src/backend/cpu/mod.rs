//! CPU backend: host page pools and the reference (oracle) kernels.
//!
//! Owns: [`CpuStorage`] (one layer's hot and warm pools in host memory) and the split-K decode
//! attention in [`kernel`]. Every other backend is tested against this one on the same inputs.
//! Must never: keep a dequantised copy of a warm page (dequantisation happens in registers and
//! per-row scratch inside the kernel).

#[cfg(target_arch = "x86_64")]
mod avx2;
mod kernel;
mod pools;
mod simd;

use crate::attention::Attention;
use crate::backend::{BackendDevice, BackendStorage, DeviceLocation, StorageBytes};
use crate::config::{CacheConfig, HotDtype};
use crate::error::{Error, Result};
use crate::quant::{self, WarmLayout};
use crate::tiers::{PageEntry, PageTable, Tier};
use pools::{try_zeroed_bytes, HotBuf, HotPage, Pool};

/// The host device.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuDevice;

impl BackendDevice for CpuDevice {
    type Storage = CpuStorage;
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Cpu
    }
    fn storage(&self, cfg: &CacheConfig, _layer: usize) -> Result<CpuStorage> {
        Ok(CpuStorage::new(cfg))
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

/// One layer's pages in host memory.
pub struct CpuStorage {
    geo: Geometry,
    layout: WarmLayout,
    hot: Pool<HotPage>,
    warm: Pool<Box<[u8]>>,
    /// Lane orders of the key and value bit widths (see `quant::pack`).
    k_order: Vec<usize>,
    v_order: Vec<usize>,
}

impl CpuStorage {
    /// Empty pools for a validated config.
    pub fn new(cfg: &CacheConfig) -> Self {
        let layout = WarmLayout::of(cfg);
        CpuStorage {
            geo: Geometry {
                kv_heads: cfg.num_kv_heads,
                q_heads: cfg.num_q_heads,
                head_dim: cfg.head_dim,
                page_size: cfg.page_size,
                scale: cfg.scale(),
                hot_dtype: cfg.hot_dtype,
            },
            layout,
            hot: Pool::default(),
            warm: Pool::default(),
            k_order: quant::pack::lane_order(cfg.k_bits, cfg.head_dim),
            v_order: quant::pack::lane_order(cfg.v_bits, cfg.head_dim),
        }
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
    Error::config("internal", msg)
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
        self.hot.insert(page)
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

    fn demote(&mut self, slot: u32, n_tokens: usize) -> Result<Option<u32>> {
        let mut block = try_zeroed_bytes(self.layout.head_bytes * self.geo.kv_heads)?;
        for h in 0..self.geo.kv_heads {
            let (k, v) = self.hot_head(slot, h, n_tokens)?;
            let dst = &mut block[h * self.layout.head_bytes..(h + 1) * self.layout.head_bytes];
            if !quant::quantize_keys(&k, n_tokens, &self.layout, dst)
                || !quant::quantize_values(&v, n_tokens, &self.layout, dst)
            {
                return Ok(None);
            }
        }
        let warm = self.warm.insert(block)?;
        self.hot.remove(slot);
        Ok(Some(warm))
    }

    fn free(&mut self, tier: Tier, slot: u32) {
        match tier {
            Tier::Hot => drop(self.hot.remove(slot)),
            Tier::Warm => drop(self.warm.remove(slot)),
            Tier::Cold | Tier::Evicted => {}
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
                    let blk = &b[h * self.layout.head_bytes..(h + 1) * self.layout.head_bytes];
                    (
                        quant::dequantize_keys(blk, n, &self.layout),
                        quant::dequantize_values(blk, n, &self.layout),
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

    fn attend(&self, tables: &[&PageTable], queries: &[f32]) -> Result<Attention> {
        kernel::attend(self, tables, queries)
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
            hot: self.hot.iter().map(|p| p.k.bytes() + p.v.bytes()).sum(),
            warm: self.warm.iter().map(|b| b.len()).sum(),
            metadata: self.hot.metadata_bytes()
                + self.warm.metadata_bytes()
                + (self.k_order.capacity() + self.v_order.capacity())
                    * std::mem::size_of::<usize>(),
        }
    }
}
