//! The disk tier through C: read counters and compaction of a spilling cache.
//!
//! Owns: the `#[repr(C)]` [`kvtier_disk_stats`] and [`kvtier_compaction`] and their calls. Spilling
//! itself is configured with `kvtier_config_set_spill`; the bytes on disk are in
//! `kvtier_memory_report`. Must never: change the cache before the out-parameters are checked.

use super::boundary::{handle, OutParam};
use super::cache::kvtier_cache;
use super::status::kvtier_status;

/// Disk reads of a spilling cache, cumulative over its life. A decode step's cost is the
/// difference across it (see also `kvtier_compaction`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvtier_disk_stats {
    /// Spilled pages read back (attention, promotion, from-cold), and their record bytes.
    pub pages_read: u64,
    pub bytes_read: u64,
    /// Reads asked of the prefetch thread, and those it completed into its buffer.
    pub prefetch_requested: u64,
    pub prefetched: u64,
    /// Reads of spilled pages served from the buffer, after waiting for a read in flight, and
    /// read synchronously.
    pub hits: u64,
    pub waited: u64,
    pub misses: u64,
    /// Time readers waited for reads in flight, and spent in synchronous reads, in ns.
    pub wait_ns: u64,
    pub sync_read_ns: u64,
    /// Host pages written to disk, and moves refused because a spill failed (nothing lost).
    pub spills: u64,
    pub spill_failures: u64,
    /// Compactions run, and those stopped by an I/O error (nothing lost).
    pub compactions: u64,
    pub compaction_failures: u64,
}

/// What one compaction of a spilling cache's page files did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct kvtier_compaction {
    /// Records moved out of sparse segment files, and their bytes.
    pub pages_moved: u64,
    pub bytes_moved: u64,
    /// File bytes given back.
    pub bytes_reclaimed: u64,
    /// Records left in place because they failed their integrity check.
    pub corrupt_left: u64,
}

/// Writes the cache's disk counters to `*stats_out` (all zero for a cache that does not spill).
///
/// Errors: `NULL_PARAMETER`, `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `stats_out` must be valid for a write of one
/// `kvtier_disk_stats`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_disk_stats(
    cache: *const kvtier_cache,
    stats_out: *mut kvtier_disk_stats,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_disk_stats", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let c = unsafe { handle(cache, "cache") }?.read()?;
        let out = OutParam::new(stats_out, "stats_out")?;
        let d = c.disk_stats();
        let (pages_read, bytes_read) = c.disk_reads();
        let k = c.counters();
        let stats = kvtier_disk_stats {
            pages_read,
            bytes_read,
            prefetch_requested: d.prefetch_requested,
            prefetched: d.prefetched,
            hits: d.hits,
            waited: d.waited,
            misses: d.misses,
            wait_ns: d.wait_ns,
            sync_read_ns: d.sync_read_ns,
            spills: k.spills,
            spill_failures: k.spill_failures,
            compactions: k.compactions,
            compaction_failures: k.compaction_failures,
        };
        // SAFETY: checked; writable (this function's contract).
        unsafe { out.write(stats) };
        Ok(())
    })
}

/// Compacts the cache's page files now: the live records of every segment file at most half live
/// move into the open segment, and the emptied files are deleted (the cache also does this by
/// itself once the files hold more dead than live bytes). `result_out` may be NULL. A no-op for a
/// cache that does not spill.
///
/// Errors: `NULL_PARAMETER` (`cache`), `DISK` (a write failed: the records moved so far stand and
/// every page keeps a valid record), `POISONED`.
///
/// # Safety
///
/// `cache` must be NULL or a live handle; `result_out` NULL or valid for a write of one
/// `kvtier_compaction`.
#[no_mangle]
pub unsafe extern "C" fn kvtier_cache_compact_spill(
    cache: *mut kvtier_cache,
    result_out: *mut kvtier_compaction,
) -> kvtier_status {
    ffi_panic_boundary!("kvtier_cache_compact_spill", {
        // SAFETY: `cache` is NULL or live (this function's contract).
        let mut c = unsafe { handle(cache, "cache") }?.write()?;
        let out = (!result_out.is_null())
            .then(|| OutParam::new(result_out, "result_out"))
            .transpose()?;
        let r = c.compact_spill()?;
        if let Some(out) = out {
            // SAFETY: checked; writable (this function's contract).
            unsafe {
                out.write(kvtier_compaction {
                    pages_moved: r.pages_moved,
                    bytes_moved: r.bytes_moved,
                    bytes_reclaimed: r.bytes_reclaimed,
                    corrupt_left: r.corrupt_left,
                })
            };
        }
        Ok(())
    })
}
