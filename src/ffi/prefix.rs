//! Prefix sharing through C: a shared page store (host memory, a directory, Redis / Valkey) bound
//! to a model fingerprint and a namespace, and lookup / import / publish of a prompt's pages.
//!
//! Owns: the opaque `kvtier_prefix_store`, its constructors and `_free`, the `#[repr(C)]`
//! [`kvtier_prefix_report`], and `kvtier_fingerprint_file`. Must never: change a cache before
//! every pointer and count is checked, or put a URL's password into the last-error text (the
//! Redis store redacts it).

use std::ffi::{c_char, CStr};
use std::sync::Arc;

use super::boundary::{handle, input, OutParam};
use super::cache::kvtier_cache;
use super::status::{kvtier_status, FfiError};
use crate::cache::SeqId;
use crate::cold::store::{ColdStore, DirStore, MemoryStore};
use crate::prefix::{Fingerprint, Imported, PrefixStore, Published};

/// A shared page store for one model in one namespace (see `kvtier::prefix`). Safe to use from
/// several threads at once.
pub struct kvtier_prefix_store {
    inner: PrefixStore,
}

/// What a lookup, import, publish or flush did (fields a call does not set stay 0).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvtier_prefix_report {
    /// Leading prompt tokens available (lookup) or now in the sequence (import).
    pub tokens: u64,
    /// Pages imported (per layer).
    pub pages: u64,
    /// Record bytes read (import) or written (publish, flush).
    pub bytes: u64,
    /// Records that failed their check; the import stopped before the first one.
    pub corrupt: u64,
    /// Records written, records the store already had, and full pages with no exact copy
    /// (publish, flush; `queued` for an asynchronous publish).
    pub written: u64,
    pub present: u64,
    pub not_exact: u64,
    pub queued: u64,
    /// Time spent waiting for the store (import), in ns.
    pub fetch_ns: u64,
}

impl kvtier_prefix_report {
    fn imported(i: &Imported) -> Self {
        kvtier_prefix_report {
            tokens: i.tokens as u64,
            pages: i.pages as u64,
            bytes: i.bytes as u64,
            corrupt: i.corrupt as u64,
            fetch_ns: i.fetch_time.as_nanos().min(u64::MAX as u128) as u64,
            ..Default::default()
        }
    }
    fn published(p: &Published) -> Self {
        kvtier_prefix_report {
            bytes: p.bytes as u64,
            written: p.written as u64,
            present: p.present as u64,
            not_exact: p.not_exact as u64,
            ..Default::default()
        }
    }
}

/// A non-NULL, NUL-terminated UTF-8 string argument.
///
/// # Safety
///
/// `s` must be NULL or a NUL-terminated string.
unsafe fn str_arg<'a>(s: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    if s.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-NULL and NUL-terminated (this function's contract).
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map_err(|_| FfiError::invalid(format!("`{what}` is not UTF-8")))
}

/// The 32 bytes at `fp`.
///
/// # Safety
///
/// `fp` must be NULL or point to 32 readable bytes.
unsafe fn fingerprint_arg(fp: *const u8) -> Result<Fingerprint, FfiError> {
    // SAFETY: NULL or 32 readable bytes (this function's contract).
    let b = unsafe { input(fp, 32, "model_fingerprint") }?;
    let mut a = [0u8; 32];
    a.copy_from_slice(b);
    Ok(Fingerprint(a))
}

/// # Safety
///
/// As the public constructors: strings NUL-terminated, `fp` 32 bytes, `out` writable.
unsafe fn make(
    store: impl FnOnce() -> Result<Arc<dyn ColdStore>, FfiError>,
    namespace: *const c_char,
    fp: *const u8,
    out: *mut *mut kvtier_prefix_store,
) -> Result<(), FfiError> {
    let out = OutParam::new(out, "store_out")?;
    // SAFETY: this function's contract.
    let ns = unsafe { str_arg(namespace, "namespace") }?;
    // SAFETY: this function's contract.
    let fp = unsafe { fingerprint_arg(fp) }?;
    let inner = PrefixStore::new(store()?, ns, fp)?;
    let ptr = Box::into_raw(Box::new(kvtier_prefix_store { inner }));
    // SAFETY: checked non-NULL and aligned; writable (the caller's contract).
    unsafe { out.write(ptr) };
    Ok(())
}

/// A store in this process's memory (LRU within `budget_bytes`): shares pages between caches of
/// one process. `model_fingerprint` is 32 bytes identifying the weights (see
/// `kvtier_fingerprint_file`); `namespace` is 1 to 64 of `[A-Za-z0-9_-]`. On success `*store_out`
/// holds a handle to free with `kvtier_prefix_store_free`.
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (a string not UTF-8), `INVALID_CONFIG` (the
/// namespace).
///
/// # Safety
///
/// `namespace` must be NULL or NUL-terminated; `model_fingerprint` NULL or 32 readable bytes;
/// `store_out` valid for a write of one pointer.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_store_new_memory(
    budget_bytes: u64,
    namespace: *const c_char,
    model_fingerprint: *const u8,
    store_out: *mut *mut kvtier_prefix_store,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_store_new_memory", {
        let budget = usize::try_from(budget_bytes).unwrap_or(usize::MAX);
        // SAFETY: this function's contract.
        unsafe {
            make(
                || Ok(Arc::new(MemoryStore::new(budget))),
                namespace,
                model_fingerprint,
                store_out,
            )
        }
    })
}

/// A store of one file per page record in directory `path` (created if missing): shares pages
/// between processes of one machine or over a network file system.
///
/// Errors: as `kvtier_prefix_store_new_memory`, and `REMOTE` (the directory cannot be created).
///
/// # Safety
///
/// As `kvtier_prefix_store_new_memory`; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_store_new_dir(
    path: *const c_char,
    namespace: *const c_char,
    model_fingerprint: *const u8,
    store_out: *mut *mut kvtier_prefix_store,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_store_new_dir", {
        // SAFETY: this function's contract.
        let p = unsafe { str_arg(path, "path") }?.to_string();
        // SAFETY: this function's contract.
        unsafe {
            make(
                || Ok(Arc::new(DirStore::new(p)?)),
                namespace,
                model_fingerprint,
                store_out,
            )
        }
    })
}

/// A store on a Redis or Valkey server: `url` is `redis://[user:password@]host:port[/db]` or
/// `rediss://...` (TLS). Each call waits at most `connect_timeout_ms + io_timeout_ms` (0: the
/// defaults, 2000 each); `ttl_seconds > 0` makes records expire. Connects once now. Only a
/// library built with the `redis` feature has it; otherwise `BACKEND_NOT_COMPILED`.
///
/// Errors: as `kvtier_prefix_store_new_memory`, `REMOTE` (no connection, refused AUTH; the text
/// names host and port, never the password), `BACKEND_NOT_COMPILED`.
///
/// # Safety
///
/// As `kvtier_prefix_store_new_memory`; `url` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_store_new_redis(
    url: *const c_char,
    connect_timeout_ms: u32,
    io_timeout_ms: u32,
    ttl_seconds: u32,
    namespace: *const c_char,
    model_fingerprint: *const u8,
    store_out: *mut *mut kvtier_prefix_store,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_store_new_redis", {
        // SAFETY: this function's contract.
        let url = unsafe { str_arg(url, "url") }?.to_string();
        let open = move || -> Result<Arc<dyn ColdStore>, FfiError> {
            #[cfg(feature = "redis")]
            {
                use crate::cold::redis::{RedisOptions, RedisStore};
                use std::time::Duration;
                let d = RedisOptions::default();
                let ms = |v: u32, dflt: Duration| {
                    if v == 0 {
                        dflt
                    } else {
                        Duration::from_millis(v as u64)
                    }
                };
                let opts = RedisOptions {
                    connect_timeout: ms(connect_timeout_ms, d.connect_timeout),
                    io_timeout: ms(io_timeout_ms, d.io_timeout),
                    ttl: (ttl_seconds > 0).then(|| Duration::from_secs(ttl_seconds as u64)),
                    ..d
                };
                Ok(Arc::new(RedisStore::connect(&url, opts)?))
            }
            #[cfg(not(feature = "redis"))]
            {
                let _ = (&url, connect_timeout_ms, io_timeout_ms, ttl_seconds);
                Err(FfiError::new(
                    kvtier_status::BackendNotCompiled,
                    "this library was built without the `redis` feature",
                ))
            }
        };
        // SAFETY: this function's contract.
        unsafe { make(open, namespace, model_fingerprint, store_out) }
    })
}

/// Frees a store; waits for its background publishing first. NULL is a no-op.
///
/// # Safety
///
/// `store` must be NULL or a handle from `kvtier_prefix_store_new_*` not freed yet; no other
/// thread may use it during or after this call.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_store_free(store: *mut kvtier_prefix_store) {
    ffi_panic_boundary_or! { (), "kvtier_prefix_store_free", {
        if !store.is_null() {
            // SAFETY: a live handle made by `Box::into_raw` in `make` (caller), freed once.
            drop(unsafe { Box::from_raw(store) });
        }
        Ok(())
    }}
}

/// SHA-256 of the file at `path` (a model's weights) into `fingerprint_out[0..32]`.
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT`, `REMOTE` (the file cannot be read).
///
/// # Safety
///
/// `path` NULL or NUL-terminated; `fingerprint_out` NULL or valid for 32 byte writes.
#[no_mangle]
pub unsafe extern "C" fn kvtier_fingerprint_file(
    path: *const c_char,
    fingerprint_out: *mut u8,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_fingerprint_file", {
        // SAFETY: this function's contract.
        let p = unsafe { str_arg(path, "path") }?;
        let out = super::boundary::Out::new(fingerprint_out, 32, 32, "fingerprint_out")?;
        let fp = Fingerprint::of_file(std::path::Path::new(p))?;
        // SAFETY: checked for 32 elements; writable (this function's contract).
        unsafe { out.write(&fp.0) };
        Ok(())
    })
}

/// How many leading tokens of `tokens[0..n]` the store holds for every layer of `cache`'s shape
/// (a multiple of the page size, less than `n`), into `report_out->tokens`. Existence only:
/// `kvtier_prefix_import` verifies.
///
/// Errors: `NULL_PARAMETER`, `REMOTE`, `POISONED`.
///
/// # Safety
///
/// Handles NULL or live; `tokens` `n` readable `uint32_t` (or NULL with `n == 0`);
/// `report_out` valid for a write of one `kvtier_prefix_report`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_lookup(
    store: *const kvtier_prefix_store,
    cache: *const kvtier_cache,
    tokens: *const u32,
    n: usize,
    report_out: *mut kvtier_prefix_report,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_lookup", {
        // SAFETY: NULL or live (this function's contract).
        let s = unsafe { handle(store, "store") }?;
        // SAFETY: NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?;
        // SAFETY: `n` readable elements (this function's contract).
        let t = unsafe { input(tokens, n, "tokens") }?;
        let out = OutParam::new(report_out, "report_out")?;
        let cfg = c.read()?.config().clone();
        let have = s.inner.lookup(&cfg, t)?;
        // SAFETY: checked; writable (this function's contract).
        unsafe {
            out.write(kvtier_prefix_report {
                tokens: have as u64,
                ..Default::default()
            })
        };
        Ok(())
    })
}

/// Imports the longest verified run of leading pages of `tokens[0..n]` into the empty sequence
/// `seq` (each page quantised and tiered by the cache's own configuration); the engine prefills
/// tokens `report_out->tokens ..` itself. A missing or damaged record ends the run (counted in
/// `corrupt`); on an error the sequence is left empty. The cache is locked for writing during
/// the store's round trips.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `SHAPE` (the sequence is not empty), `REMOTE`,
/// `BUDGET_EXCEEDED`, `POISONED`.
///
/// # Safety
///
/// As `kvtier_prefix_lookup`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_import(
    store: *const kvtier_prefix_store,
    cache: *mut kvtier_cache,
    seq: u64,
    tokens: *const u32,
    n: usize,
    report_out: *mut kvtier_prefix_report,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_import", {
        // SAFETY: NULL or live (this function's contract).
        let s = unsafe { handle(store, "store") }?;
        // SAFETY: NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?;
        // SAFETY: `n` readable elements (this function's contract).
        let t = unsafe { input(tokens, n, "tokens") }?;
        let out = OutParam::new(report_out, "report_out")?;
        let mut guard = c.write()?;
        let got = s.inner.import(&mut guard, SeqId(seq), t)?;
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(kvtier_prefix_report::imported(&got)) };
        Ok(())
    })
}

/// Publishes the full pages of `seq`, whose first tokens are `tokens[0..n]`, that the store
/// lacks (each layer up to its first page with no exact copy). `background != 0` copies the
/// records now and sends them from the store's thread (`report_out->queued`; see
/// `kvtier_prefix_flush`); otherwise waits for the store.
///
/// Errors: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `REMOTE`, `POISONED`.
///
/// # Safety
///
/// As `kvtier_prefix_lookup`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_publish(
    store: *const kvtier_prefix_store,
    cache: *const kvtier_cache,
    seq: u64,
    tokens: *const u32,
    n: usize,
    background: u8,
    report_out: *mut kvtier_prefix_report,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_publish", {
        // SAFETY: NULL or live (this function's contract).
        let s = unsafe { handle(store, "store") }?;
        // SAFETY: NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?;
        // SAFETY: `n` readable elements (this function's contract).
        let t = unsafe { input(tokens, n, "tokens") }?;
        let out = OutParam::new(report_out, "report_out")?;
        let guard = c.read()?;
        let report = if background != 0 {
            let queued = s.inner.publish_async(&guard, SeqId(seq), t)?;
            kvtier_prefix_report {
                queued: queued as u64,
                ..Default::default()
            }
        } else {
            kvtier_prefix_report::published(&s.inner.publish(&guard, SeqId(seq), t)?)
        };
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(report) };
        Ok(())
    })
}

/// Waits for every background publish so far; their totals since the last flush go to
/// `*report_out`, or the first store error among them is returned.
///
/// Errors: `NULL_PARAMETER`, `REMOTE`.
///
/// # Safety
///
/// `store` NULL or live; `report_out` valid for a write of one `kvtier_prefix_report`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_prefix_flush(
    store: *const kvtier_prefix_store,
    report_out: *mut kvtier_prefix_report,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_prefix_flush", {
        // SAFETY: NULL or live (this function's contract).
        let s = unsafe { handle(store, "store") }?;
        let out = OutParam::new(report_out, "report_out")?;
        let p = s.inner.flush()?;
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(kvtier_prefix_report::published(&p)) };
        Ok(())
    })
}
