//! Engine operations on whole sequences through C: fork (prefix sharing), beam-search reorder,
//! save and restore.
//!
//! Owns: `kvtier_cache_sequence_fork`, `kvtier_cache_reorder`, `kvtier_cache_sequence_save` and
//! `kvtier_cache_sequence_restore`. Must never: change the cache before every pointer and count
//! is checked (the core validates the rest before it changes anything).

use super::boundary::{handle, input, OutParam};
use super::cache::kvtier_cache;
use super::status::{kvtier_status, FfiError};
use crate::cache::SeqId;
use std::ffi::{c_char, CStr};
use std::path::PathBuf;

/// `path` as a path: non-NULL, NUL-terminated, UTF-8.
///
/// # Safety
///
/// `path` must be NULL or a NUL-terminated string.
unsafe fn path_arg(path: *const c_char) -> Result<PathBuf, FfiError> {
    if path.is_null() {
        return Err(FfiError::new(
            kvtier_status::NullParameter,
            "`path` is NULL",
        ));
    }
    // SAFETY: non-NULL and NUL-terminated (this function's contract).
    let s = unsafe { CStr::from_ptr(path) }
        .to_str()
        .map_err(|_| FfiError::invalid("`path` is not UTF-8"))?;
    Ok(PathBuf::from(s))
}

/// A new sequence holding the same tokens as `seq` in every layer, sharing every full page with
/// it copy-on-write (no bytes copied; freed with the last sequence naming it); only each layer's
/// partial last page is copied. Moves on a shared page move it for every sequence sharing it
/// (pins of any of them count); evicting drops only the caller's reference. On success
/// `*seq_out` holds the new id.
///
/// Errors, with nothing changed: `NULL_PARAMETER`, `UNKNOWN_SEQUENCE`, `BUDGET_EXCEEDED`,
/// `OUT_OF_MEMORY`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `seq_out` valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_fork(
    cache: *mut kvtier_cache,
    seq: u64,
    seq_out: *mut u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_fork", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        let out = OutParam::new(seq_out, "seq_out")?;
        let id = c.fork(SeqId(seq))?;
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(id.0) };
        Ok(())
    })
}

/// Beam-search reorder: afterwards `seqs[i]` holds what `seqs[from[i]]` held before, for every
/// `i < n` (sources may repeat or be dropped), sharing pages copy-on-write.
///
/// Errors, with nothing changed: `NULL_PARAMETER` (an array with `n > 0`), `SHAPE` (an index
/// `>= n`), `UNKNOWN_SEQUENCE`, `DUPLICATE_SEQUENCE`, `BUDGET_EXCEEDED`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `seqs` and `from` must hold `n` readable elements each
/// (or be NULL with `n == 0`).
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_reorder(
    cache: *mut kvtier_cache,
    seqs: *const u64,
    from: *const usize,
    n: usize,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_reorder", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        // SAFETY: `n` readable elements each (this function's contract); checked for NULL and
        // alignment.
        let (s, f) = unsafe { (input(seqs, n, "seqs")?, input(from, n, "from")?) };
        let ids: Vec<SeqId> = s.iter().map(|&x| SeqId(x)).collect();
        c.reorder(&ids, f)?;
        Ok(())
    })
}

/// Writes `seq` (every layer and tier, its archive copies too when `archive`) to the file at
/// `path`, atomically (a temporary file beside it, mode 0600, synced, then renamed over it).
/// `*bytes_out` (may be NULL) receives the file's size.
///
/// Errors: `NULL_PARAMETER`, `INVALID_ARGUMENT` (`path` not UTF-8), `UNKNOWN_SEQUENCE`, `DISK`
/// (nothing is left behind; an existing file at `path` is unchanged), `CORRUPT_PAGE` (a spilled
/// page failed its check), `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `path` NULL or NUL-terminated; `bytes_out` NULL or
/// valid for a write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_save(
    cache: *const kvtier_cache,
    seq: u64,
    path: *const c_char,
    archive: bool,
    bytes_out: *mut u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_save", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        // SAFETY: NULL or NUL-terminated (this function's contract).
        let p = unsafe { path_arg(path) }?;
        let out = (!bytes_out.is_null())
            .then(|| OutParam::new(bytes_out, "bytes_out"))
            .transpose()?;
        let saved = c.save_sequence(SeqId(seq), &p, archive)?;
        if let Some(o) = out {
            // SAFETY: checked; writable (this function's contract).
            unsafe { o.write(saved.bytes) };
        }
        Ok(())
    })
}

/// Reads a sequence saved by `kvtier_cache_sequence_save` into a new sequence of `cache` (whose
/// config must match where the bytes depend on it: heads, head size, page size, hot dtype, value
/// group, rotation); on success `*seq_out` holds its id.
///
/// Errors, with nothing restored: `NULL_PARAMETER`, `INVALID_ARGUMENT`, `CORRUPT_FILE` (not a
/// sequence file, another format version, a failed checksum, truncated), `CORRUPT_PAGE`,
/// `CONFIG_MISMATCH`, `BUDGET_EXCEEDED`, `SEQUENCE_TOO_LONG`, `DISK`, `OUT_OF_MEMORY`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `path` NULL or NUL-terminated; `seq_out` valid for a
/// write of one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_sequence_restore(
    cache: *mut kvtier_cache,
    path: *const c_char,
    seq_out: *mut u64,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_sequence_restore", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        // SAFETY: NULL or NUL-terminated (this function's contract).
        let p = unsafe { path_arg(path) }?;
        let out = OutParam::new(seq_out, "seq_out")?;
        let id = c.restore_sequence(&p)?;
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(id.0) };
        Ok(())
    })
}
