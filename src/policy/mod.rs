//! Retention policies: statistics in, page moves out.
//!
//! Owns: the [`RetentionPolicy`] trait, the read-only [`SeqView`] / [`PageView`] a policy decides
//! from (per-page mass per kv head, the latest step's mass, age, position, pins, tier, format,
//! device bytes), [`Budget`] (tokens and/or device bytes per sequence and layer, scaled per layer
//! for pyramid-shaped budgets), the registry of built-in policies by name ([`by_name`]), and
//! [`KvCache::enforce`], which builds the view, asks the policy and executes its moves; and
//! [`sim`], a seeded simulator that compares a policy with the full cache; and [`trace`], captured
//! attention traces and the replay of any policy over them.
//!
//! Must never: touch page bytes or the backend (a policy sees statistics only and returns
//! [`Move`]s; the cache validates and executes them), or evict a pinned, sink or still-written page
//! (the cache refuses such moves anyway).
//!
//! Granularity is the page, everywhere: a page is the unit the storage allocates, quantises, moves
//! and attends, and attention statistics come per page for free from the kernel (no per-token
//! scores are written). A token-level policy (H2O, TOVA, SnapKV) is reproduced at page level by
//! scoring each page with the summed mass of its tokens.

mod evict;
pub mod sim;
mod tiered;
pub mod trace;

pub use evict::{
    H2o, HeavyHitter, Hybrid, KeepAll, PyramidKv, Recent, ScissorHands, SnapKv, StreamingLlm, Tova,
};
pub use tiered::{AnchorPages, Tiered};

use crate::cache::{KvCache, Move, PageRef, Pins, SeqId, Tier};
use crate::error::{Error, Result};
use crate::quant::{WarmFormat, WarmLayout};

/// What a policy may spend, per sequence and layer. `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Budget {
    /// Tokens kept (not evicted) per sequence and layer.
    pub tokens: Option<usize>,
    /// Device bytes (hot + warm payload) per sequence and layer.
    pub device_bytes: Option<usize>,
    /// Device bytes as a fraction of what the sequence's tokens take as plain f16 K/V (e.g. 0.25):
    /// a budget that grows with the sequence. Resolved into `device_bytes` (the smaller of the
    /// two when both are set) before a policy sees it.
    pub f16_fraction: Option<f64>,
}

impl Budget {
    /// A token budget.
    pub fn tokens(n: usize) -> Self {
        Budget {
            tokens: Some(n),
            ..Budget::default()
        }
    }
    /// A device-byte budget.
    pub fn device_bytes(n: usize) -> Self {
        Budget {
            device_bytes: Some(n),
            ..Budget::default()
        }
    }
    /// Device bytes as a fraction of the f16 size of the sequence (see `f16_fraction`).
    pub fn f16_fraction(f: f64) -> Self {
        Budget {
            f16_fraction: Some(f),
            ..Budget::default()
        }
    }
    /// Every limit scaled by `f` (per-layer budgets).
    pub fn scaled(self, f: f64) -> Self {
        let s = |x: Option<usize>| x.map(|v| (v as f64 * f).round().max(0.0) as usize);
        Budget {
            tokens: s(self.tokens),
            device_bytes: s(self.device_bytes),
            f16_fraction: self.f16_fraction.map(|x| x * f),
        }
    }
    /// The absolute budget for `view` (`f16_fraction` turned into device bytes).
    pub fn resolve(&self, view: &SeqView) -> Budget {
        let rel = self
            .f16_fraction
            .map(|f| (f * (view.len * view.f16_token_bytes) as f64).max(0.0) as usize);
        let device_bytes = match (self.device_bytes, rel) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Budget {
            tokens: self.tokens,
            device_bytes,
            f16_fraction: None,
        }
    }
}

/// One page as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PageView {
    /// Page index in the sequence's page table.
    pub index: usize,
    /// First token position.
    pub start: usize,
    pub n_tokens: usize,
    pub tier: Tier,
    /// Code widths (warm pages).
    pub format: WarmFormat,
    /// Accumulated (decayed) mass per kv head.
    pub mass: Vec<f32>,
    /// Mass at the latest observe step, summed over kv heads.
    pub last_mass: f32,
    /// Observe step at which the page was last attended.
    pub last_attended: Option<u64>,
    pub pins: Pins,
    /// Promoted since it last left the hot tier.
    pub promoted: bool,
    /// Has an exact copy in the archive.
    pub archived: bool,
    /// Device bytes the page holds now (0 when cold or evicted).
    pub device_bytes: usize,
    /// The page still receives tokens (the last, partial page): no move may take it.
    pub writing: bool,
}

impl PageView {
    /// Accumulated mass summed over kv heads.
    pub fn total_mass(&self) -> f32 {
        self.mass.iter().sum()
    }
    /// True when the page is neither evicted nor off limits (pinned, sink, being written).
    pub fn movable(&self) -> bool {
        self.tier != Tier::Evicted && !self.pins.blocks_removal() && !self.writing
    }
}

/// One sequence in one layer as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqView {
    pub seq: SeqId,
    pub layer: usize,
    pub num_layers: usize,
    /// Tokens stored (evicted positions included).
    pub len: usize,
    pub page_size: usize,
    /// Observe steps so far.
    pub step: u64,
    pub pages: Vec<PageView>,
    /// Warm formats this backend stores, the config's first, then narrower ones, narrowest last.
    pub ladder: Vec<WarmFormat>,
    /// Device bytes of one hot page, and of one warm page per format of `ladder`.
    pub hot_page_bytes: usize,
    pub warm_page_bytes: Vec<usize>,
    pub warm_enabled: bool,
    /// Bytes one token takes as plain f16 K and V (all kv heads).
    pub f16_token_bytes: usize,
}

impl SeqView {
    /// Tokens not evicted.
    pub fn kept_tokens(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| p.tier != Tier::Evicted)
            .map(|p| p.n_tokens)
            .sum()
    }
    /// Device bytes held.
    pub fn device_bytes(&self) -> usize {
        self.pages.iter().map(|p| p.device_bytes).sum()
    }
    /// Reference to page `i`.
    pub fn page_ref(&self, i: usize) -> PageRef {
        PageRef {
            seq: self.seq,
            layer: self.layer,
            page: i,
        }
    }
    /// Whether page `i` holds any of the `window` most recent tokens.
    pub fn in_window(&self, i: usize, window: usize) -> bool {
        let end = self.pages[i].start + self.pages[i].n_tokens;
        end.saturating_add(window) > self.len
    }
}

/// A retention policy: reads a [`SeqView`] and a [`Budget`], returns moves. Implement it for your
/// own policy; the built-in ones are listed in [`NAMES`].
pub trait RetentionPolicy: Send {
    /// The policy's name (as [`by_name`] takes it).
    fn name(&self) -> &str;
    /// The moves that bring `view` within `budget` (or otherwise improve it).
    fn plan(&mut self, view: &SeqView, budget: &Budget) -> Vec<Move>;
}

/// Names [`by_name`] accepts.
pub const NAMES: &[&str] = &[
    "keep_all",
    "recent",
    "streaming_llm",
    "h2o",
    "tova",
    "scissorhands",
    "snapkv",
    "pyramidkv",
    "heavy_hitter",
    "hybrid",
    "anchor",
    "tiered",
    "tiered_int2",
];

/// A built-in policy with its documented defaults.
pub fn by_name(name: &str) -> Result<Box<dyn RetentionPolicy>> {
    Ok(match name {
        "keep_all" => Box::new(KeepAll),
        "recent" => Box::new(Recent),
        "streaming_llm" => Box::new(StreamingLlm::default()),
        "h2o" => Box::new(H2o::default()),
        "tova" => Box::new(Tova),
        "scissorhands" => Box::new(ScissorHands::default()),
        "snapkv" => Box::new(SnapKv::default()),
        "pyramidkv" => Box::new(PyramidKv::default()),
        "heavy_hitter" => Box::new(HeavyHitter),
        "hybrid" => Box::new(Hybrid::default()),
        "anchor" => Box::new(AnchorPages::default()),
        "tiered" => Box::new(Tiered::default()),
        "tiered_int2" => Box::new(Tiered::narrow()),
        other => {
            return Err(Error::config(
                "policy",
                format!("unknown policy `{other}` (known: {})", NAMES.join(", ")),
            ))
        }
    })
}

impl KvCache {
    /// The view a policy decides from, for `seq` in `layer`.
    pub fn policy_view(&self, seq: SeqId, layer: usize) -> Result<SeqView> {
        use crate::backend::BackendStorage;
        let cfg = self.config();
        let table = self.page_table(seq, layer)?;
        let meta = self.page_meta(seq, layer)?;
        let n_pages = table.pages().len();
        let storage = self.layer_storage(layer)?;
        let def = cfg.warm_format(layer);
        let mut ladder = vec![def];
        for b in [crate::Bits::B4, crate::Bits::B2] {
            let f = WarmFormat {
                k_bits: def.k_bits.min_bits(b),
                v_bits: def.v_bits.min_bits(b),
            };
            if !ladder.contains(&f) && storage.supports_format(f) {
                ladder.push(f);
            }
        }
        let warm_size = |f: WarmFormat| WarmLayout::of_format(cfg, f).head_bytes * cfg.num_kv_heads;
        let hot_page_bytes = crate::backend::hot_page_bytes(cfg, cfg.hot_dtype);
        let pages = table
            .pages()
            .iter()
            .zip(meta)
            .enumerate()
            .map(|(i, (e, m))| PageView {
                index: i,
                start: i * cfg.page_size,
                n_tokens: e.n_tokens as usize,
                tier: e.tier,
                format: e.format,
                mass: m.mass.to_vec(),
                last_mass: m.last_mass,
                last_attended: m.last_attended,
                pins: m.pins,
                promoted: m.promoted,
                archived: m.archive.is_some(),
                device_bytes: match e.tier {
                    Tier::Hot => hot_page_bytes,
                    Tier::Warm => warm_size(e.format),
                    _ => 0,
                },
                writing: i + 1 == n_pages && (e.n_tokens as usize) < cfg.page_size,
            })
            .collect();
        Ok(SeqView {
            seq,
            layer,
            num_layers: cfg.num_layers,
            len: table.len(),
            page_size: cfg.page_size,
            step: self.observed_steps(seq, layer)?,
            pages,
            warm_page_bytes: ladder.iter().map(|&f| warm_size(f)).collect(),
            ladder,
            hot_page_bytes,
            warm_enabled: cfg.warm_enabled,
            f16_token_bytes: 2 * cfg.num_kv_heads * cfg.head_dim * 2,
        })
    }

    /// Asks `policy` for the moves that bring `seq` in `layer` within `budget`, and executes them
    /// (see [`KvCache::apply`]). Returns the moves run.
    pub fn enforce(
        &mut self,
        policy: &mut dyn RetentionPolicy,
        seq: SeqId,
        layer: usize,
        budget: &Budget,
    ) -> Result<Vec<Move>> {
        let view = self.policy_view(seq, layer)?;
        let moves = policy.plan(&view, &budget.resolve(&view));
        self.apply(&moves)?;
        Ok(moves)
    }

    /// [`KvCache::enforce`] for every live sequence in every layer.
    pub fn enforce_all(
        &mut self,
        policy: &mut dyn RetentionPolicy,
        budget: &Budget,
    ) -> Result<usize> {
        let seqs: Vec<SeqId> = self.sequences().collect();
        let mut n = 0;
        for layer in 0..self.config().num_layers {
            for &s in &seqs {
                n += self.enforce(policy, s, layer, budget)?.len();
            }
        }
        Ok(n)
    }
}
