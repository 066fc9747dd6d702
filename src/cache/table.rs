//! The page table of one (sequence, layer): which slot of which tier holds each page.
//!
//! Owns: the [`Tier`] vocabulary, [`PageEntry`] and [`PageTable`]. Must never: touch page bytes
//! (storage belongs to the backend) or decide anything from statistics (policies do).

use crate::quant::WarmFormat;

/// Where a page lives and in what form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tier {
    /// Device memory, exact (f32/f16/bf16).
    Hot = 0,
    /// Device memory, quantised and packed.
    Warm = 1,
    /// Host RAM: the page left the device; its bytes (exact or quantised) sit in the cold store.
    Cold = 2,
    /// Dropped on purpose (`KvCache::evict`): its tokens keep their positions but are never
    /// attended again.
    Evicted = 3,
}

/// One page of a page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Tier the page is in.
    pub tier: Tier,
    /// Slot index inside that tier's pool of the layer (the cold store's id for cold pages).
    pub slot: u32,
    /// Valid tokens in the page (`page_size` except for the last page).
    pub n_tokens: u32,
    /// Code widths, meaningful for warm pages (and cold pages that were warm).
    pub format: WarmFormat,
}

/// Pages of one sequence in one layer, in token order: page `i` holds positions
/// `i * page_size .. i * page_size + n_tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTable {
    pages: Vec<PageEntry>,
    len: usize,
}

impl PageTable {
    /// A table over `pages` holding `len` tokens (for engines and benchmarks that manage slots
    /// themselves; the cache builds its own).
    pub fn from_pages(pages: Vec<PageEntry>) -> Self {
        let len = pages.iter().map(|p| p.n_tokens as usize).sum();
        PageTable { pages, len }
    }
    /// Tokens stored (evicted pages included: positions never shift).
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when no token is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Pages in order.
    pub fn pages(&self) -> &[PageEntry] {
        &self.pages
    }
    pub(crate) fn pages_mut(&mut self) -> &mut [PageEntry] {
        &mut self.pages
    }
    pub(crate) fn push(&mut self, entry: PageEntry) {
        self.pages.push(entry);
    }
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
    /// Removes and returns the pages from index `keep` on.
    pub(crate) fn split_off(&mut self, keep: usize) -> Vec<PageEntry> {
        self.pages.split_off(keep.min(self.pages.len()))
    }
    pub(crate) fn clear(&mut self) -> Vec<PageEntry> {
        self.len = 0;
        std::mem::take(&mut self.pages)
    }
    /// Bytes this table allocates (its metadata).
    pub fn metadata_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<PageEntry>()
    }
    /// Pages per tier.
    pub fn count(&self, tier: Tier) -> usize {
        self.pages.iter().filter(|p| p.tier == tier).count()
    }
}
