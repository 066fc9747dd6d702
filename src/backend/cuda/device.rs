//! A CUDA device: one context, one stream, and the per-device cache of compiled modules.
//!
//! Owns: the cudarc context (event tracking off: every storage of this device issues its work on
//! the one stream here, and `attend_device` orders itself against a caller's stream with events),
//! device facts (name, compute capability, SM count) and the map from [`KernelSpec`] to the loaded
//! module. Must never: call into cudarc before checking that libcuda is loadable (cudarc panics
//! when it is not), or hold the cache lock while a kernel runs.

use super::kernels::{self, CudaTuning, KernelSpec};
use super::storage::CudaStorage;
use super::CudaError;
use crate::backend::{BackendDevice, DeviceLocation};
use crate::config::CacheConfig;
use crate::error::Result;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Maps a driver error to the crate's typed variants.
pub(crate) fn drv(e: DriverError) -> CudaError {
    use cudarc::driver::sys::CUresult as R;
    match e.0 {
        R::CUDA_ERROR_OUT_OF_MEMORY => CudaError::OutOfMemory { bytes: 0 },
        R::CUDA_ERROR_NO_DEVICE | R::CUDA_ERROR_INVALID_DEVICE | R::CUDA_ERROR_NOT_INITIALIZED => {
            CudaError::NoDevice(format!("{e:?}"))
        }
        _ => CudaError::Driver(format!("{e:?}")),
    }
}

/// Like [`drv`], naming the size of a failed allocation.
pub(crate) fn drv_alloc(e: DriverError, bytes: usize) -> CudaError {
    match drv(e) {
        CudaError::OutOfMemory { .. } => CudaError::OutOfMemory { bytes },
        other => other,
    }
}

/// The compiled kernels of one [`KernelSpec`] on one device.
pub(crate) struct Kernels {
    pub spec: KernelSpec,
    pub append: CudaFunction,
    /// Rows from device memory into hot pages (`write_hot_device`).
    pub append_rows: CudaFunction,
    pub quantize: CudaFunction,
    pub decode: CudaFunction,
    pub read_probe: CudaFunction,
    /// f16 / bf16 queries to f32 (`attend_device`).
    pub queries_f16: CudaFunction,
    pub queries_bf16: CudaFunction,
    /// Per (page, kv head) masses from a decode's page lse (`mass.cu`).
    pub page_mass: CudaFunction,
    pub decode_smem: u32,
    /// Decode CTAs resident per SM (occupancy), at least 1.
    pub decode_blocks_per_sm: u32,
    /// Registers per decode thread, for reports.
    pub decode_regs: i32,
}

pub(crate) struct Inner {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    pub cc: (i32, i32),
    pub sms: u32,
    pub smem_optin: usize,
    cache: Mutex<HashMap<KernelSpec, Arc<Kernels>>>,
    tuning: Mutex<CudaTuning>,
}

/// A CUDA device. Cheap to clone (shared state); storages keep it alive.
#[derive(Clone)]
pub struct CudaDevice {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.inner.ordinal)
            .field("name", &self.inner.name)
            .field("compute_capability", &self.inner.cc)
            .field("sms", &self.inner.sms)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal`. Fails with [`CudaError::NoDevice`] when no driver (libcuda) is
    /// installed or the ordinal does not exist.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(Self::open(ordinal)?)
    }

    fn open(ordinal: usize) -> std::result::Result<Self, CudaError> {
        // SAFETY: `is_culib_present` only tries to dlopen libcuda under its known names and drops
        // the handle. Every later cudarc call would panic if the library were missing.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDevice(
                "libcuda (the NVIDIA driver library) was not found".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(drv)?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError::NoDevice(format!(
                "ordinal {ordinal} requested, {count} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // SAFETY: disabling event tracking before any slice exists means no slice relies on it;
        // this module orders all work on `stream` and joins foreign streams with explicit events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv)?;
        let name = ctx.name().map_err(drv)?;
        let cc = ctx.compute_capability().map_err(drv)?;
        let sms = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv)?
            .max(1) as u32;
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(drv)?
            .max(48 * 1024) as usize;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ordinal,
                ctx,
                stream,
                name,
                cc,
                sms,
                smem_optin,
                cache: Mutex::new(HashMap::new()),
                tuning: Mutex::new(CudaTuning::default()),
            }),
        })
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.cc
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.inner.sms
    }

    /// Largest dynamic shared memory a block may opt into.
    pub(crate) fn smem_optin(&self) -> usize {
        self.inner.smem_optin
    }

    /// The raw `CUstream` this device's storages issue their work on.
    pub fn stream_handle(&self) -> u64 {
        self.inner.stream.cu_stream() as u64
    }

    /// Waits for all work issued by this device's storages.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.inner.stream.synchronize().map_err(drv)?)
    }

    /// Launch-shape knobs for storages created from now on.
    pub fn tuning(&self) -> CudaTuning {
        *self.inner.tuning.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the launch-shape knobs for storages created from now on (benchmarks use this).
    pub fn set_tuning(&self, t: CudaTuning) {
        *self.inner.tuning.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// Compiles (once per device and spec) and loads the kernels of `spec`.
    pub(crate) fn kernels(
        &self,
        spec: &KernelSpec,
    ) -> std::result::Result<Arc<Kernels>, CudaError> {
        if let Some(k) = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(spec)
        {
            return Ok(k.clone());
        }
        // Compile outside the lock; a concurrent compile of the same spec just loses the race.
        let arch = format!("sm_{}{}", self.inner.cc.0, self.inner.cc.1);
        let ptx = kernels::compile(&spec.source(), &arch, "kvtier_kernels")?;
        let module = self.inner.ctx.load_module(ptx).map_err(drv)?;
        let f = |n: &str| module.load_function(n).map_err(drv);
        let (append, quantize, decode) = (f("kvt_append")?, f("kvt_quantize")?, f("kvt_decode")?);
        let read_probe = f("kvt_read_probe")?;
        let append_rows = f("kvt_append_rows")?;
        let (queries_f16, queries_bf16) = (f("kvt_queries_f16")?, f("kvt_queries_bf16")?);
        let page_mass = f("kvt_page_mass")?;
        let smem = spec.decode_smem() as u32;
        decode
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(drv)?;
        let blocks = decode
            .occupancy_max_active_blocks_per_multiprocessor(
                spec.decode_threads(),
                smem as usize,
                None,
            )
            .map_err(drv)?
            .max(1);
        let regs = decode.num_regs().unwrap_or(-1);
        let k = Arc::new(Kernels {
            spec: spec.clone(),
            append,
            append_rows,
            quantize,
            decode,
            read_probe,
            queries_f16,
            queries_bf16,
            page_mass,
            decode_smem: smem,
            decode_blocks_per_sm: blocks,
            decode_regs: regs,
        });
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.clone(), k.clone());
        Ok(k)
    }
}

impl BackendDevice for CudaDevice {
    type Storage = CudaStorage;
    fn location(&self) -> DeviceLocation {
        DeviceLocation::Cuda {
            ordinal: self.inner.ordinal,
        }
    }
    fn storage(&self, cfg: &CacheConfig, layer: usize) -> Result<CudaStorage> {
        // One storage holds one warm format: the layer's own widths.
        CudaStorage::new(self.clone(), &cfg.for_layer(layer))
    }
}

/// Compiles the kernels of `cfg` for `arch` (e.g. `"sm_90"`) with NVRTC, without a device.
/// Returns the PTX. Lets tests and tools check the sources where libnvrtc exists but no GPU does.
#[doc(hidden)]
pub fn compile_for_arch(cfg: &CacheConfig, arch: &str) -> Result<String> {
    let spec = KernelSpec::new(cfg, CudaTuning::default(), 227 * 1024)?;
    Ok(kernels::compile(&spec.source(), arch, "kvtier_kernels")?.to_src())
}

/// The NVRTC source of the module `cfg` compiles to (defines and kernels), for offline checks.
#[doc(hidden)]
pub fn module_source(cfg: &CacheConfig) -> Result<String> {
    Ok(KernelSpec::new(cfg, CudaTuning::default(), 227 * 1024)?.source())
}

/// Compiles arbitrary CUDA source with NVRTC (for testing the compile-error path).
#[doc(hidden)]
pub fn compile_source(src: &str, arch: &str) -> Result<()> {
    kernels::compile(src, arch, "user_source")?;
    Ok(())
}
