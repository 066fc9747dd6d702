//! The page table of one (sequence, layer): which slot of which tier holds each page.

use super::Tier;

/// One page of a page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// Tier the page is in.
    pub tier: Tier,
    /// Slot index inside that tier's pool of the layer.
    pub slot: u32,
    /// Valid tokens in the page (`page_size` except for the last page).
    pub n_tokens: u32,
}

/// Pages of one sequence in one layer, in token order: page `i` holds positions
/// `i * page_size .. i * page_size + n_tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageTable {
    pages: Vec<PageEntry>,
    len: usize,
}

impl PageTable {
    /// Tokens stored.
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
