//! Memory accounting.
//!
//! Owns: [`MemoryReport`], the bytes a cache has actually allocated, per tier, metadata included,
//! and the f16 bytes the same tokens would take in a plain cache for comparison. Must never estimate:
//! every figure is summed from live allocations (page payloads, pool slot tables, page tables).

/// Bytes allocated by a cache. Payload figures count every byte of every live page allocation;
/// `metadata_bytes` counts slot tables, free lists, page tables and the sequence map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Exact pages (K and V).
    pub hot_bytes: usize,
    /// Quantised pages: packed codes plus f16 minimums and steps.
    pub warm_bytes: usize,
    /// Cold tier (host RAM): bytes of pages that left the device and are not already in the
    /// archive.
    pub cold_bytes: usize,
    /// Lossless archive (host RAM): exact copies of pages that left the hot tier.
    pub archive_bytes: usize,
    /// Archive and cold pages spilled to disk (`CacheConfig::spill`): bytes of their records
    /// (payload, header and checksum). Not in `cold_bytes` / `archive_bytes`, which are RAM.
    pub disk_bytes: usize,
    /// Pages held on disk.
    pub disk_pages: usize,
    /// Bytes of the page files: `disk_bytes` plus freed records not yet compacted away.
    pub disk_file_bytes: usize,
    /// Bookkeeping.
    pub metadata_bytes: usize,
    /// Tokens stored, summed over sequences and layers.
    pub tokens: usize,
    /// Pages per tier.
    pub hot_pages: usize,
    pub warm_pages: usize,
    pub cold_pages: usize,
    pub evicted_pages: usize,
    /// Tokens in evicted pages (counted in `tokens`, never attended).
    pub evicted_tokens: usize,
    /// Pages with an archive copy.
    pub archived_pages: usize,
    /// Pages named by more than one sequence ([`crate::KvCache::fork`]); page counts and bytes
    /// count each once, `tokens` counts every sequence's tokens.
    pub shared_pages: usize,
    /// What the same (not evicted) tokens take as plain f16 K and V with no padding.
    pub f16_equivalent_bytes: usize,
}

impl MemoryReport {
    /// Device bytes: hot + warm + metadata (cold and archive live on the host).
    pub fn device_bytes(&self) -> usize {
        self.hot_bytes + self.warm_bytes + self.metadata_bytes
    }
    /// Host RAM bytes: cold tier + archive (spilled pages are in `disk_bytes`).
    pub fn host_bytes(&self) -> usize {
        self.cold_bytes + self.archive_bytes
    }
    /// All memory bytes (device and host RAM; disk not included).
    pub fn total(&self) -> usize {
        self.device_bytes() + self.host_bytes()
    }
    /// f16 bytes divided by device bytes (compression ratio; higher is smaller).
    pub fn compression(&self) -> f64 {
        self.f16_equivalent_bytes as f64 / self.device_bytes().max(1) as f64
    }
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        write!(
            f,
            "tokens {} | hot {:.2} MiB ({} pages) | warm {:.2} MiB ({} pages) | cold {:.2} MiB ({} pages) | \
             archive {:.2} MiB ({} pages) | metadata {:.3} MiB | device {:.2} MiB vs f16 {:.2} MiB ({:.2}x)",
            self.tokens,
            mib(self.hot_bytes),
            self.hot_pages,
            mib(self.warm_bytes),
            self.warm_pages,
            mib(self.cold_bytes),
            self.cold_pages,
            mib(self.archive_bytes),
            self.archived_pages,
            mib(self.metadata_bytes),
            mib(self.device_bytes()),
            mib(self.f16_equivalent_bytes),
            self.compression()
        )?;
        if self.disk_pages > 0 {
            write!(
                f,
                " | disk {:.2} MiB ({} pages, files {:.2} MiB)",
                mib(self.disk_bytes),
                self.disk_pages,
                mib(self.disk_file_bytes)
            )?;
        }
        Ok(())
    }
}
