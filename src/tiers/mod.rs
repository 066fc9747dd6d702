//! Tiers and page tables.
//!
//! Owns: the [`Tier`] vocabulary, the per-(sequence, layer) [`PageTable`] that maps token positions to
//! pages and pages to storage slots, and the demotion rule ([`demotable`]). Must never: touch page
//! bytes (storage belongs to the backend) or decide anything from attention statistics (that is the
//! policy layer's job).

pub mod pages;

pub use pages::{PageEntry, PageTable};

/// Where a page lives and in what form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tier {
    /// Device memory, exact (f32/f16/bf16).
    Hot = 0,
    /// Device memory, quantised and packed.
    Warm = 1,
    /// Host RAM / NVMe (not yet implemented: reserved so page tables and reports keep their shape).
    Cold = 2,
    /// Dropped by a retention policy.
    Evicted = 3,
}

/// Whether page `index` of a sequence that now holds `len` tokens must leave the hot tier:
/// it is full, holds no sink token, and every token in it is older than the hot window.
pub fn demotable(
    index: usize,
    page_size: usize,
    len: usize,
    sink_tokens: usize,
    hot_window: usize,
) -> bool {
    let start = index * page_size;
    let end = start + page_size;
    end <= len && start >= sink_tokens && end + hot_window <= len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demotion_rule() {
        // page 0 holds the sinks: never demoted.
        assert!(!demotable(0, 32, 10_000, 4, 128));
        // with no sinks page 0 leaves once 32 + 128 tokens exist.
        assert!(!demotable(0, 32, 159, 0, 128));
        assert!(demotable(0, 32, 160, 0, 128));
        // a partial page is never demoted.
        assert!(!demotable(3, 32, 100, 0, 0));
        assert!(demotable(2, 32, 96, 0, 0));
    }
}
