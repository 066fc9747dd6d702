//! Importance-aware tiering: lower precision before deleting anything, and bring pages back when
//! attention returns to them.

use super::{Budget, PageView, RetentionPolicy, SeqView};
use crate::cache::{Move, Tier};
use std::collections::HashMap;

/// AKV-style importance-aware demotion: instead of a FIFO hot window, the `anchors` pages of
/// highest accumulated mass stay (or come back, exactly from the archive) hot, with the `recent`
/// window; every other hot page is demoted to the config's warm format. Never evicts.
#[derive(Debug, Clone, Copy)]
pub struct AnchorPages {
    pub anchors: usize,
    pub recent: usize,
}

impl Default for AnchorPages {
    fn default() -> Self {
        AnchorPages {
            anchors: 4,
            recent: 128,
        }
    }
}

impl RetentionPolicy for AnchorPages {
    fn name(&self) -> &str {
        "anchor"
    }
    fn plan(&mut self, v: &SeqView, _: &Budget) -> Vec<Move> {
        if !v.warm_enabled || v.ladder.is_empty() {
            return Vec::new();
        }
        let mut order: Vec<&PageView> = v
            .pages
            .iter()
            .filter(|p| {
                matches!(p.tier, Tier::Hot | Tier::Warm) && !v.in_window(p.index, self.recent)
            })
            .collect();
        order.sort_by(|a, b| {
            b.total_mass()
                .total_cmp(&a.total_mass())
                .then(a.index.cmp(&b.index))
        });
        let mut moves = Vec::new();
        for (rank, p) in order.iter().enumerate() {
            let anchor = rank < self.anchors && p.total_mass() > 0.0;
            match (anchor, p.tier) {
                (true, Tier::Warm) => moves.push(Move::Promote(v.page_ref(p.index))),
                (false, Tier::Hot) if p.movable() && !p.pins.any() => {
                    moves.push(Move::Demote(v.page_ref(p.index), v.ladder[0]))
                }
                _ => {}
            }
        }
        moves
    }
}

/// kvtier's default policy, **tiered**: within a device-byte budget, pages descend by importance
/// (accumulated mass) hot → the config's warm width → cold (host RAM, still attended), least
/// important deepest, before anything is evicted (only with `allow_evict`, and only what no tier
/// can hold). The config's warm width is the floor on the device: narrower widths (int2) come
/// before cold only with `narrow` (`tiered_int2`), because on SmolLM2 int2 pages cost +6-10% PPL
/// (docs/results.md) while a cold page keeps its int4 precision and only costs transfer. A non-hot page whose latest-step mass reaches `promote_mass` comes
/// back hot (exactly, from the archive) when the budget allows. Hysteresis, so pages do not thrash
/// between tiers: a page demoted is not promoted again for `cooldown` observe steps, and a page
/// promoted is the last to be demoted again for `cooldown` steps (only when the budget cannot be
/// met otherwise: the budget wins).
#[derive(Debug, Clone)]
pub struct Tiered {
    /// Recent tokens kept hot.
    pub recent: usize,
    /// Latest-step mass (summed over kv heads) at which a page is promoted.
    pub promote_mass: f32,
    /// Observe steps a moved page is left alone.
    pub cooldown: u64,
    /// Evict when even the cold tier cannot make the budget (off: the budget is then missed).
    pub allow_evict: bool,
    /// Use the narrower warm widths (int4 → int2) before the cold tier (`tiered_int2`).
    pub narrow: bool,
    /// Step of each page's latest demotion / promotion.
    demoted: HashMap<(u64, usize, usize), u64>,
    promoted: HashMap<(u64, usize, usize), u64>,
}

impl Default for Tiered {
    fn default() -> Self {
        Tiered {
            recent: 64,
            promote_mass: 0.5,
            cooldown: 16,
            allow_evict: false,
            narrow: false,
            demoted: HashMap::new(),
            promoted: HashMap::new(),
        }
    }
}

impl Tiered {
    /// The ladder with the narrower widths in use before cold (the old default).
    pub fn narrow() -> Self {
        Tiered {
            narrow: true,
            ..Tiered::default()
        }
    }

    /// Depth of a tier: 0 hot, 1..=ladder.len() warm widths, ladder.len() + 1 cold.
    fn level(v: &SeqView, p: &PageView) -> usize {
        match p.tier {
            Tier::Hot => 0,
            Tier::Warm => v
                .ladder
                .iter()
                .position(|&f| f == p.format)
                .map_or(1, |i| i + 1),
            _ => v.ladder.len() + 1,
        }
    }

    fn bytes_at(v: &SeqView, level: usize) -> usize {
        if level == 0 {
            v.hot_page_bytes
        } else if level <= v.ladder.len() {
            v.warm_page_bytes[level - 1]
        } else {
            0
        }
    }

    fn recent(&self, map: &HashMap<(u64, usize, usize), u64>, v: &SeqView, p: &PageView) -> bool {
        map.get(&(v.seq.0, v.layer, p.index))
            .is_some_and(|&s| v.step < s + self.cooldown)
    }
}

impl RetentionPolicy for Tiered {
    fn name(&self) -> &str {
        if self.narrow {
            "tiered_int2"
        } else {
            "tiered"
        }
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        let cold = v.ladder.len() + 1;
        let floor = if self.narrow { v.ladder.len() } else { 1 };
        let usable = |lvl: usize| lvl == 0 || lvl == cold || (v.warm_enabled && lvl <= floor);
        let mut target: Vec<usize> = v.pages.iter().map(|p| Self::level(v, p)).collect();
        let mut bytes = v.device_bytes();
        let budget = b.device_bytes.unwrap_or(usize::MAX);
        // 1. Promotions: attention came back to a page that left the hot tier.
        let mut back: Vec<&PageView> = v
            .pages
            .iter()
            .filter(|p| {
                matches!(p.tier, Tier::Warm | Tier::Cold)
                    && p.last_mass >= self.promote_mass
                    && !self.recent(&self.demoted, v, p)
            })
            .collect();
        back.sort_by(|a, b| b.last_mass.total_cmp(&a.last_mass));
        for p in back {
            let after = bytes - p.device_bytes + v.hot_page_bytes;
            if after <= budget {
                target[p.index] = 0;
                bytes = after;
            }
        }
        // 2. Descend, least important first, one level at a time across all candidates.
        let mut cand: Vec<&PageView> = v
            .pages
            .iter()
            .filter(|p| {
                p.movable()
                    && !p.pins.any()
                    && !v.in_window(p.index, self.recent)
                    && target[p.index] == Self::level(v, p)
            })
            .collect();
        // Recently promoted pages last, then least important first.
        cand.sort_by(|a, b| {
            let (ra, rb) = (
                self.recent(&self.promoted, v, a),
                self.recent(&self.promoted, v, b),
            );
            ra.cmp(&rb)
                .then(a.total_mass().total_cmp(&b.total_mass()))
                .then(a.index.cmp(&b.index))
        });
        let mut lvl = 1;
        while bytes > budget && lvl <= cold {
            if usable(lvl) {
                for p in &cand {
                    if bytes <= budget {
                        break;
                    }
                    let cur = target[p.index];
                    if cur < lvl {
                        bytes = bytes - Self::bytes_at(v, cur) + Self::bytes_at(v, lvl);
                        target[p.index] = lvl;
                    }
                }
            }
            lvl += 1;
        }
        // 3. Eviction, only if allowed and the cold tier could not make the budget.
        let mut moves = Vec::new();
        if bytes > budget && self.allow_evict {
            for p in &cand {
                if bytes <= budget {
                    break;
                }
                bytes -= Self::bytes_at(v, target[p.index]);
                target[p.index] = usize::MAX;
            }
        }
        for p in &v.pages {
            let (from, to) = (Self::level(v, p), target[p.index]);
            if from == to {
                continue;
            }
            let r = v.page_ref(p.index);
            moves.push(match to {
                usize::MAX => Move::Evict(r),
                0 => Move::Promote(r),
                t if t == cold => Move::ToCold(r),
                t => Move::Demote(r, v.ladder[t - 1]),
            });
            let key = (v.seq.0, v.layer, p.index);
            if to == 0 {
                self.promoted.insert(key, v.step);
            } else {
                self.demoted.insert(key, v.step);
            }
        }
        moves
    }
}
