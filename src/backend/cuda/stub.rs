//! Stub CUDA types used when the `cuda` feature is off: they exist so that `Device::Cuda` and
//! `Storage::Cuda` are always nameable, and can never be constructed.

use super::CudaError;
use crate::attention::Attention;
use crate::backend::{BackendDevice, BackendStorage, DeviceLocation, StorageBytes};
use crate::config::CacheConfig;
use crate::error::Result;
use crate::tiers::{PageEntry, PageTable, Tier};

/// A CUDA device (stub: cannot be created without the `cuda` feature).
#[derive(Debug, Clone)]
pub struct CudaDevice {
    _never: Never,
}

#[derive(Debug, Clone, Copy)]
enum Never {}

impl CudaDevice {
    /// Always fails: kvtier was built without the `cuda` feature.
    pub fn new(_ordinal: usize) -> Result<Self> {
        Err(CudaError::NotCompiled.into())
    }
}

/// CUDA page pools (stub: uninhabited).
pub enum CudaStorage {}

impl BackendDevice for CudaDevice {
    type Storage = CudaStorage;
    fn location(&self) -> DeviceLocation {
        match self._never {}
    }
    fn storage(&self, _cfg: &CacheConfig, _layer: usize) -> Result<CudaStorage> {
        match self._never {}
    }
}

impl BackendStorage for CudaStorage {
    fn location(&self) -> DeviceLocation {
        match *self {}
    }
    fn alloc_hot(&mut self) -> Result<u32> {
        match *self {}
    }
    fn write_hot(&mut self, _: u32, _: usize, _: &[f32], _: &[f32], _: usize) -> Result<()> {
        match *self {}
    }
    fn demote(&mut self, _: u32, _: usize) -> Result<Option<u32>> {
        match *self {}
    }
    fn free(&mut self, _: Tier, _: u32) {
        match *self {}
    }
    fn read_page(&self, _: &PageEntry) -> Result<(Vec<f32>, Vec<f32>)> {
        match *self {}
    }
    fn attend(&self, _: &[&PageTable], _: &[f32]) -> Result<Attention> {
        match *self {}
    }
    fn prefill(
        &self,
        _: &PageTable,
        _: &[f32],
        _: &[f32],
        _: &[f32],
        _: usize,
    ) -> Result<Vec<f32>> {
        match *self {}
    }
    fn bytes(&self) -> StorageBytes {
        match *self {}
    }
}
