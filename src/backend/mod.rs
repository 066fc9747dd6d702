//! Backends: where page bytes live and where attention runs.
//!
//! Owns: the [`BackendStorage`] trait (one pool of hot and warm pages for one layer on one device,
//! plus the kernels over it) and the [`BackendDevice`] trait (creates storages), in the candle-core
//! shape, with enum dispatch through [`Storage`] and [`Device`]. Backends not compiled in still exist
//! as stub types whose constructors return a typed error, so user code and the C ABI need no `cfg`.
//!
//! The CPU backend is the oracle: every other backend is tested against it on the same inputs.
//! Must never: decide which pages move between tiers (the cache and its policies do) or keep a
//! dequantised copy of a warm page.

pub mod cpu;
pub mod cuda;
pub mod metal;

use crate::attention::Attention;
use crate::config::CacheConfig;
use crate::error::Result;
use crate::tiers::{PageEntry, PageTable, Tier};

/// Bytes a storage has allocated, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageBytes {
    /// Hot page payload (K and V, all kv heads).
    pub hot: usize,
    /// Warm page payload: packed codes plus their f16 minimums and steps.
    pub warm: usize,
    /// Pool bookkeeping: slot vectors, free lists.
    pub metadata: usize,
}

/// Where a storage's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceLocation {
    Cpu,
    Cuda { ordinal: usize },
    Metal,
}

/// Raw device addresses for attention whose queries and output stay on an accelerator.
/// `queries` is `[n_seqs, num_q_heads, head_dim]` f32, `output` the same shape; `stream` is the
/// backend's stream handle (a `CUstream` for CUDA), 0 for the default stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBuffers {
    pub queries: u64,
    pub output: u64,
    pub stream: u64,
}

/// One layer's page pools on one device, and the kernels that read them.
///
/// Slots are stable: a slot index stays valid until freed. Keys and values enter as f32,
/// `[n_tokens, num_kv_heads, head_dim]` row-major, already validated by the cache.
pub trait BackendStorage: Send + Sync {
    /// Where the bytes live.
    fn location(&self) -> DeviceLocation;
    /// Allocates an empty hot page.
    fn alloc_hot(&mut self) -> Result<u32>;
    /// Writes `n` tokens into hot page `slot` starting at token offset `first`.
    fn write_hot(
        &mut self,
        slot: u32,
        first: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()>;
    /// Quantises the first `n_tokens` of hot page `slot` into a new warm page and frees the hot one.
    /// Returns `Ok(None)`, leaving the hot page untouched, when its values do not fit the warm
    /// format (beyond f16 range).
    fn demote(&mut self, slot: u32, n_tokens: usize) -> Result<Option<u32>>;
    /// Frees a slot of `tier`.
    fn free(&mut self, tier: Tier, slot: u32);
    /// Reads a page back as f32 `(keys, values)`, each `[num_kv_heads, n_tokens, head_dim]`
    /// (dequantised for warm pages). For tests, the archive and debugging, not the hot path.
    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)>;
    /// Decode attention for a batch: one query token per sequence, `queries` is
    /// `[tables.len(), num_q_heads, head_dim]`.
    fn attend(&self, tables: &[&PageTable], queries: &[f32]) -> Result<Attention>;
    /// Decode attention reading queries from and writing the output to device memory. The returned
    /// [`Attention`] carries statistics and page masses; its `output` is empty. Backends without
    /// device memory return [`crate::Error::Unsupported`].
    fn attend_device(&self, _tables: &[&PageTable], _bufs: DeviceBuffers) -> Result<Attention> {
        Err(crate::Error::Unsupported(
            "attend_device needs an accelerator backend",
        ))
    }
    /// Causal attention of `n` new tokens over the cached pages of `table` (as stored) plus the
    /// new tokens themselves (exact). `queries` is `[n, num_q_heads, head_dim]`, keys and values
    /// `[n, num_kv_heads, head_dim]`. Returns `[n, num_q_heads, head_dim]`.
    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>>;
    /// Bytes allocated.
    fn bytes(&self) -> StorageBytes;
}

/// Creates storages on a device.
pub trait BackendDevice: Send + Sync {
    /// The storage type of this device.
    type Storage: BackendStorage;
    /// Where the device's storages live.
    fn location(&self) -> DeviceLocation;
    /// Creates the page pools of one layer.
    fn storage(&self, cfg: &CacheConfig, layer: usize) -> Result<Self::Storage>;
}

/// A device, by backend.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    Cuda(cuda::CudaDevice),
    Metal(metal::MetalDevice),
}

impl Device {
    /// Creates the page pools of one layer on this device.
    pub fn storage(&self, cfg: &CacheConfig, layer: usize) -> Result<Storage> {
        Ok(match self {
            Device::Cpu => Storage::Cpu(cpu::CpuDevice.storage(cfg, layer)?),
            Device::Cuda(d) => Storage::Cuda(d.storage(cfg, layer)?),
            Device::Metal(d) => Storage::Metal(d.storage(cfg, layer)?),
        })
    }
    /// Where this device's bytes live.
    pub fn location(&self) -> DeviceLocation {
        match self {
            Device::Cpu => DeviceLocation::Cpu,
            Device::Cuda(d) => d.location(),
            Device::Metal(d) => d.location(),
        }
    }
}

/// A layer's storage, by backend. Variants differ in size only while a backend is a stub; one
/// `Storage` exists per layer, so boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Storage {
    Cpu(cpu::CpuStorage),
    Cuda(cuda::CudaStorage),
    Metal(metal::MetalStorage),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Storage::Cpu($s) => $e,
            Storage::Cuda($s) => $e,
            Storage::Metal($s) => $e,
        }
    };
}

impl BackendStorage for Storage {
    fn location(&self) -> DeviceLocation {
        dispatch!(self, s => s.location())
    }
    fn alloc_hot(&mut self) -> Result<u32> {
        dispatch!(self, s => s.alloc_hot())
    }
    fn write_hot(
        &mut self,
        slot: u32,
        first: usize,
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<()> {
        dispatch!(self, s => s.write_hot(slot, first, keys, values, n))
    }
    fn demote(&mut self, slot: u32, n_tokens: usize) -> Result<Option<u32>> {
        dispatch!(self, s => s.demote(slot, n_tokens))
    }
    fn free(&mut self, tier: Tier, slot: u32) {
        dispatch!(self, s => s.free(tier, slot))
    }
    fn read_page(&self, entry: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        dispatch!(self, s => s.read_page(entry))
    }
    fn attend(&self, tables: &[&PageTable], queries: &[f32]) -> Result<Attention> {
        dispatch!(self, s => s.attend(tables, queries))
    }
    fn attend_device(&self, tables: &[&PageTable], bufs: DeviceBuffers) -> Result<Attention> {
        dispatch!(self, s => s.attend_device(tables, bufs))
    }
    fn prefill(
        &self,
        table: &PageTable,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        dispatch!(self, s => s.prefill(table, queries, keys, values, n))
    }
    fn bytes(&self) -> StorageBytes {
        dispatch!(self, s => s.bytes())
    }
}
