//! `kvtier_config`: the configuration handle, its presets and setters.
//!
//! Owns: the opaque [`kvtier_config`] (a [`CacheConfig`] behind a mutex), the C enums
//! [`kvtier_preset`] and [`kvtier_hot_dtype`], and [`kvtier_shape`]. A config handle is valid at
//! all times: it starts from a validated preset, and each setter validates the whole config with
//! the change applied and keeps the change only if it is valid, so a bad value is reported by the
//! setter that passed it (`KVTIER_STATUS_INVALID_CONFIG`, the message naming the field) and leaves
//! the config as it was. Must never: accept a config that `CacheConfig::validate` refuses, or
//! convert a C integer into a Rust enum without checking its value.

use super::boundary::{handle, input, OutParam};
use super::status::{kvtier_status, FfiError};
use crate::config::{Bits, CacheConfig, HotDtype};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Budget value meaning "no limit" for `kvtier_config_set_budgets`. The header spells it
/// `#define KVTIER_UNLIMITED SIZE_MAX` (in cbindgen.toml: cbindgen cannot translate `usize::MAX`).
///
/// cbindgen:ignore
pub const KVTIER_UNLIMITED: usize = usize::MAX;

/// A cache configuration: model shape, page geometry, warm-tier precision, budgets. Opaque: make
/// one with `kvtier_config_new` or `kvtier_config_new_preset`, adjust it with the setters, pass it
/// to `kvtier_cache_new` (which copies it) and free it with `kvtier_config_free`.
pub struct kvtier_config {
    inner: Mutex<CacheConfig>,
}

impl kvtier_config {
    /// The config (a mutex poisoned by a panic elsewhere still holds a valid config: setters
    /// replace it whole, only after validation).
    pub(crate) fn lock(&self) -> MutexGuard<'_, CacheConfig> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Named starting points (pass as `uint32_t`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_preset {
    /// int4 keys and values (KIVI-4), f16 hot pages, 128-token hot window, 4 sink tokens: 3.15x
    /// smaller than f16 in device bytes (measured at 32K tokens, 32/8/128; the format allows at
    /// most 3.20x). The same as `kvtier_config_new`.
    Balanced = 0,
    /// int8 keys and values, 256-token hot window, first and last layer exact: near-lossless,
    /// 1.76x smaller than f16 (measured as for Balanced; the format allows at most 1.78x).
    Quality = 1,
    /// int4 keys, int2 values, 64-token hot window: 3.94x smaller than f16 (measured as for
    /// Balanced; the format allows at most 4.00x).
    Compact = 2,
}

/// Element type of hot (exact) pages (pass as `uint32_t`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum kvtier_hot_dtype {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

/// The sizes a caller needs to shape its buffers. Arrays of the ABI are row-major:
/// keys and values `[n_tokens][num_kv_heads][head_dim]`, queries and outputs
/// `[n][num_q_heads][head_dim]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvtier_shape {
    pub num_layers: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Token positions per page.
    pub page_size: usize,
    /// Longest sequence accepted, per layer.
    pub max_seq_len: usize,
}

impl kvtier_shape {
    pub(crate) fn of(cfg: &CacheConfig) -> Self {
        kvtier_shape {
            num_layers: cfg.num_layers,
            num_q_heads: cfg.num_q_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            page_size: cfg.page_size,
            max_seq_len: cfg.max_seq_len,
        }
    }
}

fn hand_out(cfg: CacheConfig, out: OutParam<*mut kvtier_config>) {
    let ptr = Box::into_raw(Box::new(kvtier_config {
        inner: Mutex::new(cfg),
    }));
    // SAFETY: `out` was checked non-NULL and aligned; the entry point's caller guarantees it is
    // writable.
    unsafe { out.write(ptr) };
}

/// A config with the default settings (the balanced preset) for a model with `num_layers` layers,
/// `num_q_heads` query heads, `num_kv_heads` key/value heads (dividing `num_q_heads`) and
/// `head_dim` channels per head (a multiple of 32, at most 512). On success `*config_out` holds a
/// new handle to free with `kvtier_config_free`.
///
/// Errors: `NULL_PARAMETER` (`config_out`), `INVALID_CONFIG` (the shape).
///
/// # Safety
///
/// `config_out` must be valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_new(
    num_layers: usize,
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    config_out: *mut *mut kvtier_config,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_new", {
        let out = OutParam::new(config_out, "config_out")?;
        let cfg = CacheConfig::builder(num_layers, num_q_heads, num_kv_heads, head_dim).build()?;
        hand_out(cfg, out);
        Ok(())
    })
}

/// A config from a preset (`preset` is a `kvtier_preset` value), for the model shape as in
/// `kvtier_config_new`.
///
/// Errors: `NULL_PARAMETER` (`config_out`), `INVALID_ARGUMENT` (unknown preset), `INVALID_CONFIG`.
///
/// # Safety
///
/// `config_out` must be valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_new_preset(
    preset: u32,
    num_layers: usize,
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    config_out: *mut *mut kvtier_config,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_new_preset", {
        let out = OutParam::new(config_out, "config_out")?;
        let make = match preset {
            p if p == kvtier_preset::Balanced as u32 => CacheConfig::balanced,
            p if p == kvtier_preset::Quality as u32 => CacheConfig::quality,
            p if p == kvtier_preset::Compact as u32 => CacheConfig::compact,
            other => {
                return Err(FfiError::invalid(format!(
                    "preset {other} is not a kvtier_preset (0..=2)"
                )))
            }
        };
        hand_out(make(num_layers, num_q_heads, num_kv_heads, head_dim)?, out);
        Ok(())
    })
}

/// Frees a config. NULL is a no-op. Caches made from it are not affected (they hold a copy).
///
/// # Safety
///
/// `config` must be NULL or a handle from `kvtier_config_new*` that was not freed yet; it must not
/// be used again, nor by another thread during this call.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_free(config: *mut kvtier_config) {
    ffi_panic_boundary_or! { (), "kvtier_config_free", {
        if !config.is_null() {
            // SAFETY: a live handle made by `Box::into_raw` in `hand_out` (caller), freed once.
            drop(unsafe { Box::from_raw(config) });
        }
        Ok(())
    }}
}

/// Applies `change` to a copy of the config, validates it, and keeps it only if valid.
///
/// # Safety
///
/// As for every setter: `config` is NULL or a live handle.
pub(super) unsafe fn update(
    config: *mut kvtier_config,
    change: impl FnOnce(&mut CacheConfig),
) -> Result<(), FfiError> {
    // SAFETY: forwarded from the setter's contract.
    let h = unsafe { handle(config, "config") }?;
    let mut guard = h.lock();
    let mut next = guard.clone();
    change(&mut next);
    next.validate()?;
    *guard = next;
    Ok(())
}

// The setters are written out one by one: cbindgen reads source text and does not expand macros.

/// Sets the tokens per page (a multiple of 8 in 8..=256; default 32).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_page_size(
    config: *mut kvtier_config,
    page_size: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_page_size", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.page_size = page_size) }
    })
}

/// Sets the element type of hot pages (`dtype` is a `kvtier_hot_dtype` value; default F16).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_ARGUMENT` (unknown dtype).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_hot_dtype(
    config: *mut kvtier_config,
    dtype: u32,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_hot_dtype", {
        let dtype = match dtype {
            d if d == kvtier_hot_dtype::F32 as u32 => HotDtype::F32,
            d if d == kvtier_hot_dtype::F16 as u32 => HotDtype::F16,
            d if d == kvtier_hot_dtype::Bf16 as u32 => HotDtype::BF16,
            other => {
                return Err(FfiError::invalid(format!(
                    "dtype {other} is not a kvtier_hot_dtype (0..=2)"
                )))
            }
        };
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.hot_dtype = dtype) }
    })
}

/// Sets how many leading tokens of every sequence stay hot forever (attention sinks; default 4).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_sink_tokens(
    config: *mut kvtier_config,
    sink_tokens: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_sink_tokens", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.sink_tokens = sink_tokens) }
    })
}

/// Sets how many recent tokens stay hot (exact); older full pages are quantised to the warm tier.
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_hot_window(
    config: *mut kvtier_config,
    hot_window: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_hot_window", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.hot_window = hot_window) }
    })
}

/// Sets the warm-tier code widths of keys and values (each 8, 4, 3 or 2; on CUDA 3-bit pages
/// decode on the CUDA-core path, the others on tensor cores).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (a width is not 8, 4, 3 or 2; the config
/// is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_bits(
    config: *mut kvtier_config,
    k_bits: u32,
    v_bits: u32,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_bits", {
        let (k, v) = (Bits::from_bits(k_bits)?, Bits::from_bits(v_bits)?);
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe {
            update(config, |c| {
                c.k_bits = k;
                c.v_bits = v;
            })
        }
    })
}

/// Sets the channels per value quantisation group (a multiple of 32 dividing head_dim; default 32).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_value_group(
    config: *mut kvtier_config,
    value_group: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_value_group", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.value_group = value_group) }
    })
}

/// Sets the layers kept entirely exact (each below num_layers), replacing the previous list.
/// `layers` may be NULL when `n_layers` is 0 (no protected layer).
///
/// Errors: `NULL_PARAMETER` (`config`, or `layers` with `n_layers > 0`), `INVALID_ARGUMENT`
/// (misaligned `layers`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`; `layers` must point to
/// `n_layers` readable `size_t`s (or `n_layers` is 0).
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_protected_layers(
    config: *mut kvtier_config,
    layers: *const usize,
    n_layers: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_protected_layers", {
        // SAFETY: `layers` holds `n_layers` readable elements (this function's contract).
        let list = unsafe { input(layers, n_layers, "layers") }?.to_vec();
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.protected_layers = list) }
    })
}

/// Enables (default) or disables the warm tier. Disabled, every page stays hot and exact: the
/// full-precision reference cache.
///
/// Errors: `NULL_PARAMETER` (`config`).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_warm_enabled(
    config: *mut kvtier_config,
    enabled: bool,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_warm_enabled", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.warm_enabled = enabled) }
    })
}

/// Keeps (default) or drops the lossless archive: with it, every page that leaves the hot tier
/// keeps its exact bytes in host RAM (reported as `archive_bytes`), so a promoted page is restored
/// bit for bit.
///
/// Errors: `NULL_PARAMETER` (`config`).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_archive(
    config: *mut kvtier_config,
    enabled: bool,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_archive", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.archive = enabled) }
    })
}

/// Sets the per-step decay of the attention mass accumulated per page by observing attention
/// (in (0, 1]; default 1: plain accumulation, as H2O).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_mass_decay(
    config: *mut kvtier_config,
    decay: f32,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_mass_decay", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.mass_decay = decay) }
    })
}

/// Sets the byte budgets of the hot, warm and cold tiers (bytes actually allocated, metadata
/// included); `KVTIER_UNLIMITED` (`SIZE_MAX`, the default) means no limit.
///
/// Errors: `NULL_PARAMETER` (`config`).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_budgets(
    config: *mut kvtier_config,
    hot_bytes: usize,
    warm_bytes: usize,
    cold_bytes: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_budgets", {
        let limit = |b: usize| (b != KVTIER_UNLIMITED).then_some(b);
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe {
            update(config, |c| {
                c.budgets.hot_bytes = limit(hot_bytes);
                c.budgets.warm_bytes = limit(warm_bytes);
                c.budgets.cold_bytes = limit(cold_bytes);
            })
        }
    })
}

/// Sets the longest sequence accepted per layer (1..=UINT32_MAX; default 2^20).
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_max_seq_len(
    config: *mut kvtier_config,
    max_seq_len: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_max_seq_len", {
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.max_seq_len = max_seq_len) }
    })
}

/// Sets the softmax scale applied to q·k; 0 restores the default `1/sqrt(head_dim)`. Any other
/// value must be finite and positive.
///
/// Errors: `NULL_PARAMETER` (`config`), `INVALID_CONFIG` (the config is left unchanged).
///
/// # Safety
///
/// `config` must be NULL or a live handle from `kvtier_config_new*`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_set_softmax_scale(
    config: *mut kvtier_config,
    scale: f32,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_set_softmax_scale", {
        let scale = (scale != 0.0).then_some(scale);
        // SAFETY: `config` is NULL or live (this function's contract).
        unsafe { update(config, |c| c.softmax_scale = scale) }
    })
}

/// Writes the config's shape (layers, heads, head_dim, page size, max length) to `*shape_out`.
///
/// Errors: `NULL_PARAMETER` (`config`, `shape_out`).
///
/// # Safety
///
/// `config` must be NULL or a live handle; `shape_out` must be valid for a write of one
/// `kvtier_shape`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_config_shape(
    config: *const kvtier_config,
    shape_out: *mut kvtier_shape,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_config_shape", {
        // SAFETY: `config` is NULL or live (this function's contract).
        let h = unsafe { handle(config, "config") }?;
        let out = OutParam::new(shape_out, "shape_out")?;
        let shape = kvtier_shape::of(&h.lock());
        // SAFETY: checked non-NULL and aligned; writable (this function's contract).
        unsafe { out.write(shape) };
        Ok(())
    })
}
