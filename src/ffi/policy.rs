//! Retention policies through the C ABI: a policy handle made by name, and enforcing it on a
//! sequence of a cache under a budget.
//!
//! Owns: the opaque [`kvtier_policy`] (a boxed [`RetentionPolicy`] behind a mutex: policies such as
//! ScissorHands and tiered keep state between steps) and its entry points. Must never: run a
//! policy's moves without the cache's lock, or keep the name string past the call.

use super::boundary::{handle, OutParam};
use super::cache::kvtier_cache;
use super::status::{kvtier_status, FfiError};
use crate::cache::SeqId;
use crate::policy::{by_name, Budget, RetentionPolicy};
use std::ffi::{c_char, CStr};
use std::sync::Mutex;

/// A retention policy. Opaque: make one with `kvtier_policy_new`, free it with
/// `kvtier_policy_free`. One policy may serve many caches and sequences; calls on it are
/// serialised by an internal lock.
pub struct kvtier_policy {
    inner: Mutex<Box<dyn RetentionPolicy>>,
}

/// Makes the built-in policy named `name` (NUL-terminated: "keep_all", "recent", "streaming_llm",
/// "h2o", "tova", "scissorhands", "snapkv", "pyramidkv", "heavy_hitter", "hybrid", "anchor",
/// "tiered", "tiered_int2") with its documented defaults, and writes its handle to `*policy_out`.
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (not UTF-8), `INVALID_CONFIG` (unknown name).
///
/// # Safety
///
/// `name` must be NULL or a NUL-terminated string; `policy_out` must be valid for a write of one
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_policy_new(
    name: *const c_char,
    policy_out: *mut *mut kvtier_policy,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_policy_new", {
        if name.is_null() {
            return Err(FfiError::null("name"));
        }
        let out = OutParam::new(policy_out, "policy_out")?;
        // SAFETY: non-NULL and NUL-terminated (this function's contract).
        let name = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| FfiError::invalid("`name` is not UTF-8"))?;
        let p = by_name(name)?;
        let ptr = Box::into_raw(Box::new(kvtier_policy {
            inner: Mutex::new(p),
        }));
        // SAFETY: checked non-NULL and aligned; writable (this function's contract).
        unsafe { out.write(ptr) };
        Ok(())
    })
}

/// Frees a policy (NULL is a no-op).
///
/// # Safety
///
/// `policy` must be NULL or a handle from `kvtier_policy_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn kvtier_policy_free(policy: *mut kvtier_policy) {
    ffi_panic_boundary_or!((), "kvtier_policy_free", {
        if !policy.is_null() {
            // SAFETY: a live handle from `kvtier_policy_new` (this function's contract), freed once.
            drop(unsafe { Box::from_raw(policy) });
        }
        Ok(())
    })
}

/// Asks `policy` for the moves that bring `seq` in `layer` within the budget (`max_tokens` kept
/// tokens and/or `max_device_bytes` device bytes; `KVTIER_UNLIMITED` for no limit) and executes
/// them; writes the number of moves run to `*moves_out` (may be NULL). Moves are validated by the
/// cache: one the cache refuses stops the call with its status, the moves before it applied.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `LAYER_OUT_OF_RANGE`, `INVALID_MOVE`,
/// `BUDGET_EXCEEDED`, `OUT_OF_MEMORY`, `POISONED`.
///
/// # Safety
///
/// `cache` and `policy` must be NULL or live handles; `moves_out` NULL or valid for a write of one
/// `size_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_enforce(
    cache: *mut kvtier_cache,
    policy: *mut kvtier_policy,
    seq: u64,
    layer: usize,
    max_tokens: usize,
    max_device_bytes: usize,
    moves_out: *mut usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_enforce", {
        // SAFETY: NULL or live (this function's contract).
        let h = unsafe { handle(cache, "cache") }?;
        // SAFETY: NULL or live (this function's contract).
        let p = unsafe { handle(policy, "policy") }?;
        let out = if moves_out.is_null() {
            None
        } else {
            Some(OutParam::new(moves_out, "moves_out")?)
        };
        let limit = |x: usize| (x != usize::MAX).then_some(x);
        let budget = Budget {
            tokens: limit(max_tokens),
            device_bytes: limit(max_device_bytes),
            f16_fraction: None,
        };
        let mut pol = p.inner.lock().unwrap_or_else(|e| e.into_inner());
        let moves = h
            .write()?
            .enforce(pol.as_mut(), SeqId(seq), layer, &budget)?;
        if let Some(o) = out {
            // SAFETY: checked; writable (this function's contract).
            unsafe { o.write(moves.len()) };
        }
        Ok(())
    })
}
