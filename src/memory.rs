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
    /// Host / NVMe tier (0 until the cold tier exists).
    pub cold_bytes: usize,
    /// Bookkeeping.
    pub metadata_bytes: usize,
    /// Tokens stored, summed over sequences and layers.
    pub tokens: usize,
    /// Pages per tier.
    pub hot_pages: usize,
    pub warm_pages: usize,
    /// What the same tokens take as plain f16 K and V with no padding.
    pub f16_equivalent_bytes: usize,
}

impl MemoryReport {
    /// Device bytes: hot + warm + metadata (cold lives on the host).
    pub fn device_bytes(&self) -> usize {
        self.hot_bytes + self.warm_bytes + self.metadata_bytes
    }
    /// All bytes.
    pub fn total(&self) -> usize {
        self.device_bytes() + self.cold_bytes
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
            "tokens {} | hot {:.2} MiB ({} pages) | warm {:.2} MiB ({} pages) | cold {:.2} MiB | metadata {:.3} MiB | \
             total {:.2} MiB vs f16 {:.2} MiB ({:.2}x)",
            self.tokens,
            mib(self.hot_bytes),
            self.hot_pages,
            mib(self.warm_bytes),
            self.warm_pages,
            mib(self.cold_bytes),
            mib(self.metadata_bytes),
            mib(self.total()),
            mib(self.f16_equivalent_bytes),
            self.compression()
        )
    }
}
