//! Page selections: which pages a decode step attends, per sequence and kv head.
//!
//! Owns: [`PageSelection`] and its validation against a batch. Produced by eliminators and by the
//! cache (to skip cold and evicted pages); read by every backend's attention kernel, which then
//! attends exactly the listed pages. Must never: decide what to select.

use crate::error::{Error, Result};

/// For each sequence of a batch and each kv head, the page indices to attend (ascending, unique).
/// A q head attends what its kv head's list holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSelection {
    kv_heads: usize,
    /// `[n_seqs * kv_heads]`.
    lists: Vec<Vec<u32>>,
}

impl PageSelection {
    /// A selection of nothing for `n_seqs` sequences of `kv_heads` heads.
    pub fn none(n_seqs: usize, kv_heads: usize) -> Self {
        PageSelection {
            kv_heads,
            lists: vec![Vec::new(); n_seqs * kv_heads],
        }
    }

    /// Every page of each sequence (`n_pages[i]` pages for batch entry `i`), every head.
    pub fn all(n_pages: &[usize], kv_heads: usize) -> Self {
        let mut s = Self::none(n_pages.len(), kv_heads);
        for (i, &n) in n_pages.iter().enumerate() {
            for kv in 0..kv_heads {
                s.lists[i * kv_heads + kv] = (0..n as u32).collect();
            }
        }
        s
    }

    /// Sequences in the batch.
    pub fn n_seqs(&self) -> usize {
        self.lists.len().checked_div(self.kv_heads).unwrap_or(0)
    }

    /// Kv heads per sequence.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Sets the pages batch entry `seq` attends with kv head `kv` (sorted and deduplicated here).
    pub fn set(
        &mut self,
        seq: usize,
        kv: usize,
        pages: impl IntoIterator<Item = u32>,
    ) -> Result<()> {
        if seq >= self.n_seqs() || kv >= self.kv_heads {
            return Err(Error::shape(
                "selection",
                format!("seq < {} and kv head < {}", self.n_seqs(), self.kv_heads),
                format!("seq {seq}, kv head {kv}"),
            ));
        }
        let l = &mut self.lists[seq * self.kv_heads + kv];
        l.clear();
        l.extend(pages);
        l.sort_unstable();
        l.dedup();
        Ok(())
    }

    /// Sets the same pages for every kv head of batch entry `seq`.
    pub fn set_all_heads(&mut self, seq: usize, pages: &[u32]) -> Result<()> {
        for kv in 0..self.kv_heads {
            self.set(seq, kv, pages.iter().copied())?;
        }
        Ok(())
    }

    /// The pages batch entry `seq` attends with kv head `kv`.
    pub fn pages(&self, seq: usize, kv: usize) -> &[u32] {
        &self.lists[seq * self.kv_heads + kv]
    }

    /// Removes page `page` of batch entry `seq` from every head's list.
    pub fn remove(&mut self, seq: usize, page: u32) {
        for kv in 0..self.kv_heads {
            let l = &mut self.lists[seq * self.kv_heads + kv];
            if let Ok(i) = l.binary_search(&page) {
                l.remove(i);
            }
        }
    }

    /// Selected (page, kv head) pairs in total.
    pub fn count(&self) -> usize {
        self.lists.iter().map(Vec::len).sum()
    }

    /// Checks the selection against a batch of `n_pages[i]` pages per sequence and `kv_heads`
    /// heads: same batch size, every index in range. (Lists are sorted and unique by construction.)
    pub fn validate(&self, n_pages: &[usize], kv_heads: usize) -> Result<()> {
        if self.kv_heads != kv_heads || self.n_seqs() != n_pages.len() {
            return Err(Error::shape(
                "selection",
                format!("{} sequences x {kv_heads} kv heads", n_pages.len()),
                format!("{} sequences x {} kv heads", self.n_seqs(), self.kv_heads),
            ));
        }
        for (i, &n) in n_pages.iter().enumerate() {
            for kv in 0..kv_heads {
                if let Some(&last) = self.pages(i, kv).last() {
                    if last as usize >= n {
                        return Err(Error::shape(
                            "selection",
                            format!("page indices < {n} for batch entry {i}"),
                            format!("page {last}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lists.capacity() * std::mem::size_of::<Vec<u32>>()
            + self.lists.iter().map(|l| l.capacity() * 4).sum::<usize>()
    }
}
