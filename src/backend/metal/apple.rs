//! The Metal executor behind [`super::gpu::Gpu`] on Apple targets.
//!
//! Owns: the system default `MTLDevice`, one command queue, and one compute pipeline per
//! [`Kernel`] compiled from the kvtier MSL with fast math off (the kernels must produce bytes
//! identical to the CPU, which needs IEEE f32 division and no reassociation). Allocates and wraps
//! shared-storage buffers and runs dispatch lists in one serial compute encoder.
//! Must never: return from [`AppleGpu::run`] before the command buffer it committed has completed
//! (the storage reads results straight from shared memory), leave an encoder open (everything that
//! can fail is checked before encoding starts), or panic: no `unwrap`/`expect` on Objective-C
//! results, every nil or error becomes a [`MetalError`].

use std::ffi::c_void;
use std::ptr::NonNull;

use candle_metal_kernels::metal::{Buffer, Device};
use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSString;
use objc2_metal::{
    MTLBuffer, MTLCommandBuffer, MTLCommandBufferStatus, MTLCommandEncoder, MTLCommandQueue,
    MTLCompileOptions, MTLComputeCommandEncoder, MTLComputePipelineState, MTLDevice,
    MTLDispatchType, MTLLibrary, MTLResource, MTLResourceOptions, MTLSize, MTLStorageMode,
};

use super::gpu::{BufInner, Dispatch, Kernel, MetalBuffer};
use super::MetalError;
use crate::error::Result;

/// Zero bytes bound as the parameter block of a dispatch that has none, so that every
/// `[[buffer(n)]]` a kernel declares is bound.
const NO_PARAMS: [u8; 16] = [0; 16];

/// The most bytes `setBytes:length:atIndex:` takes (Apple documents it for data under 4 KiB).
const MAX_PARAM_BYTES: usize = 4096;

type Pipeline = Retained<ProtocolObject<dyn MTLComputePipelineState>>;

/// A Metal device with the kvtier kernels compiled for it (see the module docs).
pub(crate) struct AppleGpu {
    device: Device,
    queue: Retained<ProtocolObject<dyn MTLCommandQueue>>,
    /// Indexed by `Kernel as usize`, in the order of [`Kernel::ALL`].
    pipes: Vec<Pipeline>,
}

// SAFETY: Apple documents `MTLDevice`, `MTLCommandQueue` and `MTLComputePipelineState` as safe to
// use from any thread; the only per-call objects (command buffers, encoders) are created and
// finished inside `run` and never shared.
unsafe impl Send for AppleGpu {}
// SAFETY: as above; `&AppleGpu` only creates new command buffers on the thread-safe queue and
// reads the immutable pipelines.
unsafe impl Sync for AppleGpu {}

impl AppleGpu {
    /// The system default device with `source` (the concatenated kernels) compiled for it.
    pub(crate) fn new(source: &str) -> Result<AppleGpu> {
        autoreleasepool(|_| {
            let device = Device::system_default()
                .ok_or_else(|| MetalError::NoDevice("no system default Metal device".into()))?;
            let dev = device.as_ref();
            let queue = dev
                .newCommandQueue()
                .ok_or_else(|| MetalError::NoDevice("the device gave no command queue".into()))?;

            let options = MTLCompileOptions::new();
            // `mathMode` (its replacement) needs macOS 15; the deprecated setter works everywhere
            // and turns off the reassociation and approximate division fast math allows.
            #[allow(deprecated)]
            options.setFastMathEnabled(false);
            let library = dev
                .newLibraryWithSource_options_error(&NSString::from_str(source), Some(&options))
                .map_err(|e| MetalError::Compile {
                    kernel: "kvtier kernels",
                    log: e.localizedDescription().to_string(),
                })?;

            let mut pipes = Vec::with_capacity(Kernel::ALL.len());
            for (i, k) in Kernel::ALL.into_iter().enumerate() {
                if k as usize != i {
                    return Err(crate::Error::Internal(format!(
                        "Kernel::ALL is out of order at {}",
                        k.name()
                    )));
                }
                let function = library
                    .newFunctionWithName(&NSString::from_str(k.name()))
                    .ok_or_else(|| MetalError::Compile {
                        kernel: k.name(),
                        log: "no such function in the compiled library".into(),
                    })?;
                let pipe = dev
                    .newComputePipelineStateWithFunction_error(&function)
                    .map_err(|e| MetalError::Compile {
                        kernel: k.name(),
                        log: e.localizedDescription().to_string(),
                    })?;
                pipes.push(pipe);
            }
            Ok(AppleGpu {
                device,
                queue,
                pipes,
            })
        })
    }

    /// The device's name, for diagnostics.
    pub(crate) fn name(&self) -> String {
        autoreleasepool(|_| self.device.as_ref().name().to_string())
    }

    /// A new buffer of `bytes` in shared storage.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<MetalBuffer> {
        // Shared storage: on unified memory the host writes appends into, and reads results out
        // of, the very bytes the GPU uses, with no blit and no managed-mode synchronisation.
        let buf = self
            .device
            .new_buffer(bytes, MTLResourceOptions::StorageModeShared)
            .map_err(|_| MetalError::OutOfMemory { bytes })?;
        Ok(MetalBuffer {
            ptr: buf.contents(),
            len: bytes,
            inner: BufInner::Apple(buf),
        })
    }

    /// The caller's `id<MTLBuffer>` `handle` as a [`MetalBuffer`] (retained while it lives).
    ///
    /// # Safety
    ///
    /// `handle` must be null or a pointer to a live object conforming to `MTLBuffer`; the caller
    /// must not access its contents while the returned value is used by the storage.
    pub(crate) unsafe fn wrap(&self, handle: u64) -> Result<MetalBuffer> {
        let raw = handle as usize as *mut ProtocolObject<dyn MTLBuffer>;
        // SAFETY: the caller guarantees `handle` is null or a live `MTLBuffer`; retaining it keeps
        // it alive for as long as the returned value, whatever the caller does with its own
        // reference.
        let retained = unsafe { Retained::retain(raw) }
            .ok_or_else(|| MetalError::Command("a null MTLBuffer handle".into()))?;
        // Only shared storage has host-visible contents (private ones have none, managed ones
        // would need explicit synchronisation the storage never does).
        if retained.storageMode() != MTLStorageMode::Shared {
            return Err(MetalError::Command(format!(
                "the MTLBuffer is not in shared storage (storage mode {})",
                retained.storageMode().0
            ))
            .into());
        }
        // A buffer of another device cannot be bound to this device's encoders.
        if retained.device().registryID() != self.device.registry_id() {
            return Err(MetalError::Command(
                "the MTLBuffer belongs to another Metal device".into(),
            )
            .into());
        }
        let buf = Buffer::new(retained);
        Ok(MetalBuffer {
            ptr: buf.contents(),
            len: buf.length(),
            inner: BufInner::Apple(buf),
        })
    }

    /// Runs `list` in order in one serial compute encoder and waits for it to complete.
    pub(crate) fn run(&self, list: &[Dispatch]) -> Result<()> {
        // Everything that can fail is checked before an encoder exists: an encoder must be ended
        // before it is released, and a half-encoded command buffer must not run.
        let mut pipes = Vec::with_capacity(list.len());
        let mut binds = Vec::with_capacity(list.len());
        for d in list {
            let pipe = self.pipes.get(d.kernel as usize).ok_or_else(|| {
                crate::Error::Internal(format!("no pipeline for {}", d.kernel.name()))
            })?;
            let max = pipe.maxTotalThreadsPerThreadgroup();
            if d.threads as usize > max {
                return Err(MetalError::Command(format!(
                    "{}: {} threads per threadgroup, the pipeline allows {max}",
                    d.kernel.name(),
                    d.threads
                ))
                .into());
            }
            if d.params.len() > MAX_PARAM_BYTES {
                return Err(MetalError::Command(format!(
                    "{}: {} bytes of parameters",
                    d.kernel.name(),
                    d.params.len()
                ))
                .into());
            }
            let bufs = d
                .bufs
                .iter()
                .map(|&(b, off)| Ok((apple_buf(b)?, off)))
                .collect::<Result<Vec<_>>>()?;
            binds.push(bufs);
            pipes.push(pipe);
        }
        if list.iter().all(|d| d.groups == 0) {
            return Ok(());
        }

        autoreleasepool(|_| {
            let cmd = self
                .queue
                .commandBuffer()
                .ok_or_else(|| MetalError::Command("the queue gave no command buffer".into()))?;
            // Serial: each dispatch starts after the previous one finished and sees its writes.
            let enc = cmd
                .computeCommandEncoderWithDispatchType(MTLDispatchType::Serial)
                .ok_or_else(|| MetalError::Command("no compute command encoder".into()))?;
            for ((d, pipe), bufs) in list.iter().zip(&pipes).zip(&binds) {
                if d.groups == 0 {
                    continue;
                }
                enc.setComputePipelineState(pipe);
                for (i, &(b, off)) in bufs.iter().enumerate() {
                    // SAFETY: `b` is alive for the whole call and the command buffer retains it;
                    // `off` is inside it (checked by `Gpu::run`); the kernel ABI fixes the index
                    // and the type of the bytes.
                    unsafe { enc.setBuffer_offset_atIndex(Some(b), off, i) };
                }
                let params: &[u8] = if d.params.is_empty() {
                    &NO_PARAMS
                } else {
                    d.params
                };
                let bytes = NonNull::from(params).cast::<c_void>();
                // SAFETY: `bytes` points to `params.len()` readable bytes (under 4 KiB, checked
                // above), which Metal copies before returning.
                unsafe { enc.setBytes_length_atIndex(bytes, params.len(), d.bufs.len()) };
                if d.tg_bytes > 0 {
                    // SAFETY: index 0 is the one `[[threadgroup(0)]]` binding the kernels declare;
                    // `Gpu::run` caps the length at the 32 KiB every Apple GPU has.
                    unsafe { enc.setThreadgroupMemoryLength_atIndex(d.tg_bytes, 0) };
                }
                enc.dispatchThreadgroups_threadsPerThreadgroup(
                    MTLSize {
                        width: d.groups as usize,
                        height: 1,
                        depth: 1,
                    },
                    MTLSize {
                        width: d.threads as usize,
                        height: 1,
                        depth: 1,
                    },
                );
            }
            enc.endEncoding();
            cmd.commit();
            cmd.waitUntilCompleted();
            let status = cmd.status();
            if status == MTLCommandBufferStatus::Completed {
                return Ok(());
            }
            let why = match cmd.error() {
                Some(e) => e.localizedDescription().to_string(),
                None => format!("command buffer ended with status {}", status.0),
            };
            Err(MetalError::Command(why).into())
        })
    }
}

/// The `MTLBuffer` under a [`MetalBuffer`] of this executor.
fn apple_buf(b: &MetalBuffer) -> Result<&ProtocolObject<dyn MTLBuffer>> {
    match &b.inner {
        BufInner::Apple(buf) => Ok(buf.as_ref()),
        _ => Err(MetalError::Command("a buffer that is not an MTLBuffer".into()).into()),
    }
}

/// The `id<MTLBuffer>` pointer of `b`, the handle the storage and the C ABI pass around.
pub(crate) fn handle_of(b: &Buffer) -> u64 {
    let raw: &ProtocolObject<dyn MTLBuffer> = b.as_ref();
    raw as *const ProtocolObject<dyn MTLBuffer> as usize as u64
}

/// The length of `b` when its contents are host-visible (shared storage), else `None`: what
/// candle tensor interop reads in place.
#[cfg(feature = "candle")]
pub(crate) fn shared_len(b: &Buffer) -> Option<usize> {
    let raw: &ProtocolObject<dyn MTLBuffer> = b.as_ref();
    (raw.storageMode() == MTLStorageMode::Shared).then(|| b.length())
}
