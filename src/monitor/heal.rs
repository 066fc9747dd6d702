//! Healing decisions: which pages come back exactly when the monitor fires, and when they go.
//!
//! Owns: [`Healer`] (pages per layer, hold time, budget) and its two plans over a policy view:
//! promotions (the non-hot pages with the largest latest-step mass that have an exact archive
//! copy) and releases (healed pages still hot once the hold has passed, or the oldest ones when
//! the budget is full, go back to the config's warm format). Must never: execute moves (the cache does) or promote a page it cannot restore
//! bit for bit.

use crate::cache::{Move, Tier};
use crate::policy::SeqView;

/// How much healing may bring back, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Healer {
    /// Pages promoted per layer on one firing (the healing budget).
    pub pages_per_layer: usize,
    /// Steps without a firing after which healed pages are released.
    pub hold: u64,
    /// Most healed pages per layer at once (the healing budget): a firing that would exceed it
    /// first releases the oldest healed pages.
    pub max_pages_per_layer: usize,
}

impl Default for Healer {
    fn default() -> Self {
        Healer {
            pages_per_layer: 4,
            hold: 32,
            max_pages_per_layer: 4,
        }
    }
}

impl Healer {
    /// Promotions for one layer: up to `pages_per_layer` warm or cold pages with an archive copy,
    /// largest latest-step mass first (accumulated mass breaks ties), skipping pages already hot.
    pub fn promotions(&self, v: &SeqView) -> Vec<Move> {
        let mut c: Vec<_> = v
            .pages
            .iter()
            .filter(|p| matches!(p.tier, Tier::Warm | Tier::Cold) && p.archived)
            .collect();
        c.sort_by(|a, b| {
            b.last_mass
                .total_cmp(&a.last_mass)
                .then(b.total_mass().total_cmp(&a.total_mass()))
                .then(a.index.cmp(&b.index))
        });
        c.iter()
            .take(self.pages_per_layer)
            .map(|p| Move::Promote(v.page_ref(p.index)))
            .collect()
    }

    /// Releases for one layer: the `healed` pages that are still hot (and not pinned) go back to
    /// the config's warm format.
    pub fn releases(&self, v: &SeqView, healed: &[usize]) -> Vec<Move> {
        let Some(&warm) = v.ladder.first() else {
            return Vec::new();
        };
        if !v.warm_enabled {
            return Vec::new();
        }
        healed
            .iter()
            .filter_map(|&i| v.pages.get(i))
            .filter(|p| p.tier == Tier::Hot && !p.pins.any() && !p.writing)
            .map(|p| Move::Demote(v.page_ref(p.index), warm))
            .collect()
    }
}
