//! A Metal device with kvtier's kernels: the executor, shared by every storage made on it.
//!
//! Owns: [`MetalDevice`] (cheap to clone: an `Arc` of the executor, whose kernels were compiled
//! once when it was made) and its [`BackendDevice`] impl.
//! Must never: compile the kernels more than once per device object.

use super::gpu::{Gpu, MetalBuffer};
use super::storage::MetalStorage;
use crate::backend::{BackendDevice, DeviceLocation};
use crate::config::CacheConfig;
use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[cfg_attr(not(all(feature = "metal", target_vendor = "apple")), allow(dead_code))]
/// The MSL of every kernel, in dependency order (one library: compiled once per device).
pub(crate) const SOURCES: [&str; 4] = [
    include_str!("kernels/common.metal"),
    include_str!("kernels/append.metal"),
    include_str!("kernels/quant.metal"),
    include_str!("kernels/decode.metal"),
];

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    gpu: Gpu,
    name: String,
}

/// A Metal device (or, with the `metal-emu` feature, the host emulator of one).
#[derive(Clone)]
pub struct MetalDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MetalDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetalDevice")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl MetalDevice {
    /// The system's default Metal device, with the kernels compiled for it (once).
    #[cfg(all(feature = "metal", target_vendor = "apple"))]
    pub fn new() -> Result<Self> {
        let g = super::apple::AppleGpu::new(&SOURCES.concat())?;
        let name = g.name();
        Ok(Self::from_gpu(Gpu::Apple(g), name))
    }

    /// Always fails here: Metal needs macOS and the `metal` feature.
    #[cfg(not(all(feature = "metal", target_vendor = "apple")))]
    pub fn new() -> Result<Self> {
        Err(super::MetalError::NotCompiled.into())
    }

    /// The host emulator (feature `metal-emu`): the same storage code and the same `.metal`
    /// kernels, compiled as C++ and run on the CPU. For testing on machines without an Apple
    /// GPU; its speed means nothing.
    #[cfg(feature = "metal-emu")]
    pub fn emulated() -> Self {
        Self::from_gpu(
            Gpu::Emu(super::emu::EmuGpu),
            "kvtier Metal emulator (host)".into(),
        )
    }

    fn from_gpu(gpu: Gpu, name: String) -> Self {
        MetalDevice {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                gpu,
                name,
            }),
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A zeroed buffer of `bytes` in shared storage on this device (for queries and outputs of
    /// [`crate::KvCache::attend_device`]; its [`MetalBuffer::handle`] goes in
    /// [`super::MetalBuffers`]).
    pub fn buffer(&self, bytes: usize) -> Result<MetalBuffer> {
        self.inner.gpu.alloc(bytes)
    }

    pub(crate) fn gpu(&self) -> &Gpu {
        &self.inner.gpu
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
}

impl BackendDevice for MetalDevice {
    type Storage = MetalStorage;
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Metal
    }
    fn storage(&self, cfg: &CacheConfig, _layer: usize) -> Result<MetalStorage> {
        MetalStorage::new(self.clone(), cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::gpu::Kernel;
    use super::SOURCES;

    #[test]
    fn every_kernel_is_defined_once_in_the_sources() {
        let all = SOURCES.concat();
        for k in Kernel::ALL {
            let def = format!("kernel void {}(", k.name());
            assert_eq!(all.matches(&def).count(), 1, "{}", k.name());
        }
    }
}
