//! C setters of the quantisation-quality options (rotation, key outlier channels, per-layer bits),
//! of spilling host pages to disk, and of the cache's thread pool.
//!
//! Owns: [`kvtier_rotation`] and the `kvtier_config_set_*` functions for those fields of
//! [`crate::CacheConfig`]. Like every setter they validate a copy and keep it only when valid
//! (`config::update`). Must never: leave a config half-changed.

use super::config::{kvtier_config, update};
use super::status::{kvtier_status, FfiError};
use crate::config::{Bits, CpuKernel, LayerBits, Rotation};

/// Which vectors a cache rotates before storing them (pass as `uint32_t`): see `Rotation`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_rotation {
    /// Nothing is rotated (the default).
    None = 0,
    /// Keys (and so queries) are rotated.
    Keys = 1,
    /// Keys, queries and values; the attention output is rotated back.
    KeysValues = 2,
}

/// Sets the seeded Walsh-Hadamard rotation applied before storage (`mode` is a `kvtier_rotation`
/// value) and the seed of its per-layer sign vectors. Scores are unchanged in exact arithmetic;
/// outputs and read-backs stay in model space; `kvtier_cache_attend_device` rotates the queries
/// into its own device buffer (the caller's are left as they are) and the output back in place.
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (unknown mode).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_rotation(
    config: *mut kvtier_config,
    mode: u32,
    seed: u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_rotation", {
        let rot = match mode {
            m if m == kvtier_rotation::None as u32 => Rotation::None,
            m if m == kvtier_rotation::Keys as u32 => Rotation::Keys,
            m if m == kvtier_rotation::KeysValues as u32 => Rotation::KeysValues,
            other => {
                return Err(FfiError::invalid(format!(
                    "mode {other} is not a kvtier_rotation (0..=2)"
                )))
            }
        };
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe {
            update(config, |c| {
                c.rotation = rot;
                c.rotation_seed = seed;
            })
        }
    })
}

/// Sets how many key channels per warm page and kv head are kept exact (f16) beside the codes:
/// the page's widest-range channels (0, the default: none; at most head_dim / 4). On CUDA such
/// pages decode on the CUDA-core path (not tensor cores).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (too many; the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_key_outliers(
    config: *mut kvtier_config,
    channels: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_key_outliers", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.key_outliers = channels) }
    })
}

/// Fits each value group's range to the least squared error (`fit` true) instead of taking its
/// minimum and maximum (false, the default): the same bytes, about 0.6x the squared error at
/// 2 bits, a value error bound of one step instead of half a step, and ~10-20x the quantisation
/// work at demotion. CPU storage only: CUDA and Metal cache creation fails with `UNSUPPORTED`.
///
/// Errors: `NULL_PARAMETER` (`config`).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_value_fit(
    config: *mut kvtier_config,
    fit: bool,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_value_fit", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.value_fit = fit) }
    })
}

/// Sets the warm code widths of one layer (each 8, 4, 3 or 2), overriding `kvtier_config_set_bits`
/// there; a second call for the same layer replaces the first.
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (a width is not 8, 4, 3 or 2, or `layer`
/// is not below num_layers; the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_layer_bits(
    config: *mut kvtier_config,
    layer: usize,
    k_bits: u32,
    v_bits: u32,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_layer_bits", {
        let (k_bits, v_bits) = (Bits::from_bits(k_bits)?, Bits::from_bits(v_bits)?);
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe {
            update(config, |c| {
                c.layer_bits.retain(|b| b.layer != layer);
                c.layer_bits.push(LayerBits {
                    layer,
                    k_bits,
                    v_bits,
                });
            })
        }
    })
}

/// Removes every per-layer width: all layers use the config's widths again.
///
/// Errors: `NULL_PARAMETER` (`config`).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_clear_layer_bits(
    config: *mut kvtier_config,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_clear_layer_bits", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.layer_bits.clear()) }
    })
}

/// Spills the archive and cold pages to page files in `dir` once they hold more than
/// `host_ram_bytes` of RAM (least recently used first; `disk_bytes` bounds the files,
/// `KVTIER_UNLIMITED` for no limit). `dir` NULL turns spilling off. The directory is created if
/// missing; the cache writes only its own files there (mode 0600) and removes them when freed.
/// A background thread reads the next layer's spilled pages ahead while a layer is attended.
/// Disk failures later surface as `DISK` (nothing changed) and failed integrity checks of pages
/// read back as `CORRUPT_PAGE`.
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (`dir` not UTF-8).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`; `dir` NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_spill(
    config: *mut kvtier_config,
    dir: *const std::ffi::c_char,
    host_ram_bytes: usize,
    disk_bytes: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_spill", {
        let spill = if dir.is_null() {
            None
        } else {
            // SAFETY: non-NULL and NUL-terminated (this function's contract).
            let d = unsafe { std::ffi::CStr::from_ptr(dir) }
                .to_str()
                .map_err(|_| FfiError::invalid("`dir` is not UTF-8"))?;
            Some(crate::config::SpillConfig {
                disk_bytes: (disk_bytes != super::KVTIER_UNLIMITED).then_some(disk_bytes),
                ..crate::config::SpillConfig::new(d, host_ram_bytes)
            })
        };
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.spill = spill) }
    })
}

/// Gives the cache its own pool of `threads` worker threads for attention and prefill (0, the
/// default: rayon's global pool, one thread per core, shared by every cache of the process).
/// Results do not depend on the count.
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (more than 1024; the config is left
/// unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_threads(
    config: *mut kvtier_config,
    threads: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_threads", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.threads = (threads > 0).then_some(threads)) }
    })
}

/// The CPU kernel path of a cache's CPU storage (see `CpuKernel` in the Rust docs).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_cpu_kernel {
    /// `KVTIER_CPU_KERNEL` from the environment if set, else the fastest path this CPU runs (the
    /// default).
    Auto = 0,
    /// AVX-512 (F/BW/DQ/VL, VNNI): warm key scores as integer dot products with a query quantised
    /// to 16 bits per page (bounded extra error, below the key quantisation error).
    Avx512 = 1,
    /// AVX2 + FMA + F16C, f32 scores.
    Avx2 = 2,
    /// Portable code, f32 scores.
    Portable = 3,
}

/// Chooses the CPU kernel path (`kernel` is a `kvtier_cpu_kernel` value).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (unknown value), `INVALID_CONFIG`
/// (this CPU cannot run that path); the config is unchanged on error.
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_cpu_kernel(
    config: *mut kvtier_config,
    kernel: u32,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_cpu_kernel", {
        let k = match kernel {
            k if k == kvtier_cpu_kernel::Auto as u32 => CpuKernel::Auto,
            k if k == kvtier_cpu_kernel::Avx512 as u32 => CpuKernel::Avx512,
            k if k == kvtier_cpu_kernel::Avx2 as u32 => CpuKernel::Avx2,
            k if k == kvtier_cpu_kernel::Portable as u32 => CpuKernel::Portable,
            other => {
                return Err(FfiError::invalid(format!(
                    "kernel {other} is not a kvtier_cpu_kernel (0..=3)"
                )))
            }
        };
        if !k.available() {
            return Err(crate::Error::config(
                "cpu_kernel",
                format!("this CPU cannot run the {} path", k.name()),
            )
            .into());
        }
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.cpu_kernel = k) }
    })
}
