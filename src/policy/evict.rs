//! Eviction policies from the literature, at page granularity: each protects what its paper keeps
//! (sinks, a recent window) and evicts the lowest-scoring movable pages until the budget holds.

use super::{Budget, PageView, RetentionPolicy, SeqView};
use crate::cache::{Move, Tier};
use std::collections::HashMap;

/// Whether `view` is over `budget` after evicting pages whose kept tokens / bytes are subtracted.
fn over(budget: &Budget, tokens: usize, bytes: usize) -> bool {
    budget.tokens.is_some_and(|b| tokens > b) || budget.device_bytes.is_some_and(|b| bytes > b)
}

/// Evicts movable pages not protected by `keep`, lowest `score` first, until `budget` holds.
pub(crate) fn evict_until(
    view: &SeqView,
    budget: &Budget,
    keep: impl Fn(&PageView) -> bool,
    score: impl Fn(&PageView) -> f32,
) -> Vec<Move> {
    let (mut tokens, mut bytes) = (view.kept_tokens(), view.device_bytes());
    if !over(budget, tokens, bytes) {
        return Vec::new();
    }
    let mut cand: Vec<(&PageView, f32)> = view
        .pages
        .iter()
        .filter(|p| p.movable() && !keep(p))
        .map(|p| (p, score(p)))
        .collect();
    // Lowest score first; ties: oldest first (deterministic).
    cand.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.index.cmp(&b.0.index)));
    let mut moves = Vec::new();
    for (p, _) in cand {
        if !over(budget, tokens, bytes) {
            break;
        }
        moves.push(Move::Evict(view.page_ref(p.index)));
        tokens -= p.n_tokens;
        bytes -= p.device_bytes;
    }
    moves
}

/// Keeps everything (the reference).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeepAll;

impl RetentionPolicy for KeepAll {
    fn name(&self) -> &str {
        "keep_all"
    }
    fn plan(&mut self, _: &SeqView, _: &Budget) -> Vec<Move> {
        Vec::new()
    }
}

/// A sliding window: evicts the oldest pages first (only the config's sink pins survive).
#[derive(Debug, Clone, Copy, Default)]
pub struct Recent;

impl RetentionPolicy for Recent {
    fn name(&self) -> &str {
        "recent"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        evict_until(v, b, |_| false, |p| p.start as f32)
    }
}

/// StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks"):
/// the first `sinks` tokens and the most recent ones; the oldest non-sink pages go first.
#[derive(Debug, Clone, Copy)]
pub struct StreamingLlm {
    pub sinks: usize,
}

impl Default for StreamingLlm {
    fn default() -> Self {
        StreamingLlm { sinks: 4 }
    }
}

impl RetentionPolicy for StreamingLlm {
    fn name(&self) -> &str {
        "streaming_llm"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        let sinks = self.sinks;
        evict_until(v, b, |p| p.start < sinks, |p| p.start as f32)
    }
}

/// H2O (Zhang et al., 2023, "Heavy-Hitter Oracle"): a recent window plus the pages of largest
/// accumulated attention; the rest is evicted, lowest accumulated mass first.
#[derive(Debug, Clone, Copy)]
pub struct H2o {
    /// Recent tokens always kept.
    pub recent: usize,
}

impl Default for H2o {
    fn default() -> Self {
        H2o { recent: 128 }
    }
}

impl RetentionPolicy for H2o {
    fn name(&self) -> &str {
        "h2o"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        evict_until(
            v,
            b,
            |p| v.in_window(p.index, self.recent),
            |p| p.total_mass(),
        )
    }
}

/// TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): evicts the page with the lowest
/// attention at the current step (no accumulation, no window).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tova;

impl RetentionPolicy for Tova {
    fn name(&self) -> &str {
        "tova"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        evict_until(v, b, |_| false, |p| p.last_mass)
    }
}

/// ScissorHands (Liu et al., 2023, "Persistence of Importance"): counts, over a history of steps,
/// how often each page was unimportant (latest mass below the uniform share `1/pages`) and evicts
/// the most persistently unimportant first; a recent window is kept. `plan` must run once per
/// observed step for the counts to mean steps.
#[derive(Debug, Clone, Default)]
pub struct ScissorHands {
    pub recent: usize,
    /// Per (sequence, layer, page): unimportant-step count.
    counts: HashMap<(u64, usize, usize), u32>,
}

impl ScissorHands {
    /// With a `recent`-token window.
    pub fn new(recent: usize) -> Self {
        ScissorHands {
            recent,
            counts: HashMap::new(),
        }
    }
}

impl RetentionPolicy for ScissorHands {
    fn name(&self) -> &str {
        "scissorhands"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        let recent = if self.recent == 0 { 128 } else { self.recent };
        let live = v
            .pages
            .iter()
            .filter(|p| p.tier != Tier::Evicted)
            .count()
            .max(1);
        let share = 1.0 / live as f32;
        for p in &v.pages {
            let c = self.counts.entry((v.seq.0, v.layer, p.index)).or_insert(0);
            if p.last_mass < share {
                *c += 1;
            }
        }
        let counts = &self.counts;
        let moves = evict_until(
            v,
            b,
            |p| v.in_window(p.index, recent),
            |p| {
                -(counts
                    .get(&(v.seq.0, v.layer, p.index))
                    .copied()
                    .unwrap_or(0) as f32)
            },
        );
        for m in &moves {
            self.counts.remove(&(v.seq.0, v.layer, m.page().page));
        }
        moves
    }
}

/// SnapKV (Li et al., 2024): pages scored by the attention of an observation window (the steps
/// observed so far, e.g. the last prompt queries), max-pooled over neighbouring pages (SnapKV pools
/// over neighbouring tokens), per kv head; a page survives if any kv head ranks it. Storage pages
/// hold all kv heads, so per-head selections are combined by taking each page's best head.
#[derive(Debug, Clone, Copy)]
pub struct SnapKv {
    pub recent: usize,
    /// Pooling radius in pages.
    pub pool: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        SnapKv {
            recent: 64,
            pool: 1,
        }
    }
}

/// Per page: the max over kv heads of the mass max-pooled over `pool` neighbouring pages, with
/// each head's masses normalised to sum to 1.
pub(crate) fn snap_scores(v: &SeqView, pool: usize) -> Vec<f32> {
    let n = v.pages.len();
    let kvh = v.pages.first().map_or(0, |p| p.mass.len());
    let mut best = vec![0f32; n];
    for kv in 0..kvh {
        let total: f32 = v
            .pages
            .iter()
            .map(|p| p.mass[kv])
            .sum::<f32>()
            .max(f32::MIN_POSITIVE);
        for (i, b) in best.iter_mut().enumerate() {
            let lo = i.saturating_sub(pool);
            let hi = (i + pool + 1).min(n);
            let pooled = v.pages[lo..hi]
                .iter()
                .map(|p| p.mass[kv])
                .fold(0f32, f32::max);
            *b = b.max(pooled / total);
        }
    }
    best
}

impl RetentionPolicy for SnapKv {
    fn name(&self) -> &str {
        "snapkv"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        let s = snap_scores(v, self.pool);
        evict_until(v, b, |p| v.in_window(p.index, self.recent), |p| s[p.index])
    }
}

/// PyramidKV (Cai et al., 2024): SnapKV scoring with per-layer budgets that shrink linearly with
/// depth (layer `l` of `L` gets `2 (L - l) / (L + 1)` of the mean budget: lower layers, whose
/// attention is spread wide, keep more).
#[derive(Debug, Clone, Copy, Default)]
pub struct PyramidKv {
    pub snap: SnapKv,
}

impl RetentionPolicy for PyramidKv {
    fn name(&self) -> &str {
        "pyramidkv"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        let l = v.num_layers.max(1) as f64;
        let f = 2.0 * (l - v.layer as f64) / (l + 1.0);
        self.snap.plan(v, &b.scaled(f))
    }
}

/// The seed's "heavy_hitter": top pages by accumulated mass, nothing else protected.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeavyHitter;

impl RetentionPolicy for HeavyHitter {
    fn name(&self) -> &str {
        "heavy_hitter"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        evict_until(v, b, |_| false, |p| p.total_mass())
    }
}

/// The seed's "hybrid": recent window ∪ 16 sink tokens ∪ top pages by
/// `0.75 · attention + 0.25 · novelty`, where attention is the page's share of accumulated mass
/// and novelty is `1 / (1 + steps since the page was last attended)` (a page attention keeps
/// returning to stays; one it left fades).
#[derive(Debug, Clone, Copy)]
pub struct Hybrid {
    pub recent: usize,
    pub sinks: usize,
}

impl Default for Hybrid {
    fn default() -> Self {
        Hybrid {
            recent: 128,
            sinks: 16,
        }
    }
}

impl RetentionPolicy for Hybrid {
    fn name(&self) -> &str {
        "hybrid"
    }
    fn plan(&mut self, v: &SeqView, b: &Budget) -> Vec<Move> {
        let total: f32 = v
            .pages
            .iter()
            .map(PageView::total_mass)
            .sum::<f32>()
            .max(f32::MIN_POSITIVE);
        let step = v.step;
        evict_until(
            v,
            b,
            |p| p.start < self.sinks || v.in_window(p.index, self.recent),
            |p| {
                let novelty = p
                    .last_attended
                    .map_or(0.0, |s| 1.0 / (1.0 + step.saturating_sub(s + 1) as f32));
                0.75 * p.total_mass() / total + 0.25 * novelty
            },
        )
    }
}
