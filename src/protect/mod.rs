//! The engine seam and `protect(engine, sensitivity)`: give any engine a kvtier cache in one call.
//!
//! Owns: [`AttentionCache`], the trait a forward pass calls once per layer (prefill of a block of
//! tokens, or one decode step), [`AttentionShape`], [`KvTierAttention`] (the adapter that serves
//! those calls from one sequence of a [`KvCache`]: prefill → `KvCache::prefill`, decode → `append`
//! then `attend`, keeping the per-head statistics of the latest decode step), the [`Engine`] trait an
//! engine implements to be protected, and [`protect`] / [`protect_with`]. Engine-agnostic: the
//! example SmolLM2 engine (`crate::model`, feature `model`) is one implementation.
//!
//! Must never: apply RoPE or any projection (keys arrive post-RoPE, outputs leave before the output
//! projection), depend on a particular engine, or change what the cache stores (configuration is
//! the caller's). `sensitivity` is validated and handed to the engine's session for the monitor.

mod certify;
mod heal;
pub use certify::CertStats;
pub use heal::{heal_sequence, release_sequence, CacheSequence, HealEvent, Healable, Healing};

use crate::eliminate::{EliminationInput, EliminationScratch, Eliminator, QuestSelector};
use crate::error::{Error, Result};
use crate::monitor::Healer;
use crate::policy::trace::{TraceHeader, TraceStep, TraceWriter};
use crate::policy::{Budget, RetentionPolicy};

/// Where a [`KvTierAttention`] records its trace.
type TraceSink = TraceWriter<Box<dyn std::io::Write + Send>>;
use crate::{CacheConfig, HeadStats, KvCache, MemoryReport, SeqId, Tier};

/// Geometry of the attention a cache serves; identical to the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Transformer layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_q_heads: usize,
    /// Key/value heads (GQA groups); divides `num_q_heads`.
    pub num_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// The shape of a config.
    pub fn of(cfg: &CacheConfig) -> Self {
        AttentionShape {
            num_layers: cfg.num_layers,
            num_q_heads: cfg.num_q_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        }
    }
}

/// What a forward pass needs from a KV cache, for one sequence.
///
/// Layouts are row-major f32: queries `[n, q_heads, head_dim]`, keys/values `[n, kv_heads,
/// head_dim]`, outputs `[n, q_heads, head_dim]`. Keys are post-RoPE. Softmax scale is
/// `1/sqrt(head_dim)`. Within one forward pass layers are called in order 0..num_layers.
pub trait AttentionCache {
    /// The geometry this cache was built for.
    fn shape(&self) -> AttentionShape;

    /// Causal attention of `n` new tokens over everything cached in `layer` plus the new tokens
    /// themselves; then the new keys/values are stored.
    fn prefill(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>>;

    /// Stores one token's key/value in `layer`, then attends its query over the whole sequence.
    fn decode(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>>;

    /// Stores keys/values `[n, kv_heads, head_dim]` in `layer` without attending (replaying K/V that
    /// an exact prefill computed elsewhere: the result is the state `prefill` would have left).
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()>;

    /// Forgets every token; the cache can be reused for a new sequence.
    fn reset(&mut self) -> Result<()>;

    /// Bytes held, by tier.
    fn memory(&self) -> MemoryReport;

    /// Appends the latest decode step's attention statistics (every layer, every q head) to `out`
    /// (for the monitor). Default: none.
    fn step_heads(&self, _out: &mut Vec<HeadStats>) {}

    /// Healing after the monitor fired: bring back `healer`'s pages exactly and attend every page
    /// on the next step. Returns `(pages promoted, bytes they added on the device)`. Default: a
    /// cache that cannot heal does nothing.
    fn heal(&mut self, _healer: &Healer) -> Result<(usize, usize)> {
        Ok((0, 0))
    }

    /// Lets go of the healed pages (back to the warm format). Returns the pages released.
    fn release_healed(&mut self, _healer: &Healer) -> Result<usize> {
        Ok(0)
    }
}

/// Checks `q`, `k`, `v` lengths against the shape; returns the token count.
pub fn check_qkv(
    shape: &AttentionShape,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<usize> {
    if layer >= shape.num_layers {
        return Err(Error::LayerOutOfRange {
            layer,
            num_layers: shape.num_layers,
        });
    }
    let q_row = shape.num_q_heads * shape.head_dim;
    let kv_row = shape.num_kv_heads * shape.head_dim;
    if q.is_empty() || !q.len().is_multiple_of(q_row) {
        return Err(Error::shape(
            "q",
            format!("a positive multiple of q_heads*head_dim = {q_row}"),
            q.len(),
        ));
    }
    let n = q.len() / q_row;
    for (what, x) in [("k", k), ("v", v)] {
        if x.len() != n * kv_row {
            return Err(Error::shape(what, n * kv_row, x.len()));
        }
    }
    Ok(n)
}

/// [`check_qkv`] for one decode step: exactly one token.
pub fn check_decode(
    shape: &AttentionShape,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<()> {
    let n = check_qkv(shape, layer, q, k, v)?;
    if n != 1 {
        return Err(Error::shape(
            "q",
            "one token (decode)",
            format!("{n} tokens"),
        ));
    }
    Ok(())
}

/// One sequence of a [`KvCache`], seen through [`AttentionCache`].
pub struct KvTierAttention {
    cache: KvCache,
    seq: SeqId,
    shape: AttentionShape,
    /// Per layer: head statistics of the latest decode step (`[q_heads]`), empty before one.
    last_heads: Vec<Vec<HeadStats>>,
    /// A retention policy run after every decode step of every layer, with its budget.
    policy: Option<(Box<dyn RetentionPolicy>, Budget)>,
    /// Prefill rows whose attention is observed before the policy runs at the end of a prefill.
    observe_window: usize,
    /// Where decode steps are recorded (see [`crate::policy::trace`]), and steps per layer.
    trace: Option<(TraceSink, Vec<u32>)>,
    /// How decode steps choose the pages they attend (default: all), and its buffers.
    choice: PageChoice,
    elim_scratch: EliminationScratch,
    /// Over every decode step so far: candidate pages (per kv head) and pages skipped.
    elim_totals: (u64, u64),
    /// Per layer: pages promoted by healing and not yet released.
    healed: Vec<Vec<usize>>,
    /// Decode calls (layers) left that attend every page regardless of `choice` (after healing).
    exact_calls: usize,
    /// Certified attention: warm pages whose score error bound exceeds the tolerance are read
    /// exactly (from the archive) for the step; and its counters.
    certify: Option<crate::monitor::Certifier>,
    cert: certify::CertStats,
}

/// How a [`KvTierAttention`] decode step chooses the pages it attends.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum PageChoice {
    /// Every page (exact attention over what the cache holds).
    #[default]
    All,
    /// Skip pages within a proven ε of softmax mass ([`Eliminator`]).
    Eliminate(Eliminator),
    /// Quest-style top pages by score bound ([`QuestSelector`], no guarantee).
    Quest(QuestSelector),
}

impl std::fmt::Debug for KvTierAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvTierAttention")
            .field("config", self.cache.config())
            .field("seq", &self.seq)
            .field("memory", &self.cache.memory_report())
            .finish()
    }
}

impl KvTierAttention {
    /// A cache built from `config`, holding one fresh sequence.
    pub fn new(config: CacheConfig) -> Result<Self> {
        Self::with_cache(KvCache::new(config)?)
    }

    /// An adapter over `cache` (any device), driving a fresh sequence of it.
    pub fn with_cache(mut cache: KvCache) -> Result<Self> {
        let shape = AttentionShape::of(cache.config());
        let seq = cache.add_sequence();
        Ok(Self {
            cache,
            seq,
            shape,
            last_heads: vec![Vec::new(); shape.num_layers],
            policy: None,
            observe_window: 16,
            trace: None,
            choice: PageChoice::All,
            elim_scratch: EliminationScratch::default(),
            elim_totals: (0, 0),
            healed: vec![Vec::new(); shape.num_layers],
            exact_calls: 0,
            certify: None,
            cert: certify::CertStats::default(),
        })
    }

    /// Chooses the pages of every decode step with `choice` (see [`PageChoice`]).
    pub fn with_page_choice(mut self, choice: PageChoice) -> Self {
        self.choice = choice;
        self
    }

    /// Over every decode step so far: `(candidate pages, skipped pages)`, counted per kv head
    /// (candidates: pages a selection could leave out; 0 with [`PageChoice::All`]).
    pub fn elimination_totals(&self) -> (u64, u64) {
        self.elim_totals
    }

    /// Records every decode step (page masses per kv head, per-head entropy, and with `with_qk` the
    /// query and new key) to `out` in the trace format of [`crate::policy::trace`], for policy
    /// replay without the model.
    pub fn with_trace(
        mut self,
        out: Box<dyn std::io::Write + Send>,
        with_qk: bool,
    ) -> Result<Self> {
        let s = self.shape;
        let header = TraceHeader {
            num_layers: s.num_layers as u32,
            num_q_heads: s.num_q_heads as u32,
            num_kv_heads: s.num_kv_heads as u32,
            head_dim: s.head_dim as u32,
            page_size: self.cache.config().page_size as u32,
            with_qk,
        };
        self.trace = Some((TraceWriter::new(out, header)?, vec![0; s.num_layers]));
        Ok(self)
    }

    /// Flushes the trace (if any) and stops recording.
    pub fn finish_trace(&mut self) -> Result<()> {
        if let Some((w, _)) = self.trace.take() {
            w.finish()?;
        }
        Ok(())
    }

    /// Runs `policy` (e.g. `policy::by_name("tiered")?`) under `budget` after every decode step:
    /// the step's attention is observed into the page statistics, then the policy's moves are
    /// executed for that layer. It also runs at the end of every prefill, after the attention of
    /// the prompt's last rows (an observation window, as SnapKV's; see
    /// [`Self::with_observation_window`]) is observed, so a long prompt is compressed before the
    /// first decode step reads it.
    pub fn with_policy(mut self, policy: Box<dyn RetentionPolicy>, budget: Budget) -> Self {
        self.policy = Some((policy, budget));
        self
    }

    /// Prefill rows observed before the policy runs at the end of a prefill (default 16; 0: the
    /// policy does not run after prefills). Each row's query attends the whole stored sequence,
    /// including the few window tokens after it: these are statistics, not outputs, and the
    /// window's own pages are the newest, which every policy keeps.
    pub fn with_observation_window(mut self, rows: usize) -> Self {
        self.observe_window = rows;
        self
    }

    /// The underlying cache.
    pub fn kv_cache(&self) -> &KvCache {
        &self.cache
    }

    /// The underlying cache, mutably (page moves, policies, observe).
    pub fn kv_cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The sequence this adapter drives.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// Attention statistics per q head of `layer` at the latest decode step (empty before the first
    /// decode step or after a reset).
    pub fn last_head_stats(&self, layer: usize) -> &[HeadStats] {
        self.last_heads.get(layer).map_or(&[], Vec::as_slice)
    }
}

impl AttentionCache for KvTierAttention {
    fn shape(&self) -> AttentionShape {
        self.shape
    }

    fn prefill(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        check_qkv(&self.shape, layer, q, k, v)?;
        let out = self.cache.prefill(self.seq, layer, q, k, v)?;
        if let Some((policy, budget)) = self.policy.as_mut() {
            let row = self.shape.num_q_heads * self.shape.head_dim;
            let rows = q.len() / row;
            if self.observe_window > 0 && rows > 0 {
                for r in rows.saturating_sub(self.observe_window)..rows {
                    let att = self
                        .cache
                        .attend(layer, &[self.seq], &q[r * row..(r + 1) * row])?;
                    self.cache.observe(layer, &[self.seq], &att)?;
                }
                self.cache
                    .enforce(policy.as_mut(), self.seq, layer, budget)?;
            }
        }
        Ok(out)
    }

    fn decode(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        check_decode(&self.shape, layer, q, k, v)?;
        self.cache.append(self.seq, layer, k, v)?;
        let exact_now = self.certify_before(layer, q)?;
        let seqs = [self.seq];
        let input = EliminationInput {
            layer,
            seqs: &seqs,
            queries: q,
        };
        let choice = if self.exact_calls > 0 {
            self.exact_calls -= 1;
            PageChoice::All
        } else {
            self.choice
        };
        let att = match choice {
            PageChoice::All => self.cache.attend(layer, &seqs, q)?,
            PageChoice::Eliminate(e) => {
                let (att, rep) = e.attend(&self.cache, &mut self.elim_scratch, &input)?;
                self.elim_totals.0 += rep.candidates as u64;
                self.elim_totals.1 += rep.skipped_pages as u64;
                att
            }
            PageChoice::Quest(qs) => {
                let sel = qs.select(&self.cache, &mut self.elim_scratch, &input)?;
                let b = &self.elim_scratch.bounds;
                let kvh = self.shape.num_kv_heads;
                let candidates = b
                    .pages(0)
                    .iter()
                    .filter(|p| p.bounded && !matches!(p.tier, Tier::Hot | Tier::Evicted))
                    .count()
                    * kvh;
                let kept: usize = (0..kvh).map(|kv| sel.pages(0, kv).len()).sum();
                let hot = b
                    .pages(0)
                    .iter()
                    .filter(|p| p.tier != Tier::Evicted && (p.tier == Tier::Hot || !p.bounded))
                    .count()
                    * kvh;
                self.elim_totals.0 += candidates as u64;
                self.elim_totals.1 += candidates.saturating_sub(kept.saturating_sub(hot)) as u64;
                self.cache.attend_select(layer, &seqs, q, &sel)?
            }
        };
        self.last_heads[layer] = att.heads_of(0).to_vec();
        if let Some((w, steps)) = self.trace.as_mut() {
            let qk = w.header().with_qk;
            w.write(&TraceStep {
                layer: layer as u32,
                step: steps[layer],
                len: self.cache.seq_len(self.seq, layer)? as u32,
                entropy: att.heads_of(0).iter().map(|h| h.entropy).collect(),
                mass: att.kv_page_mass(0),
                q: if qk { q.to_vec() } else { Vec::new() },
                k: if qk { k.to_vec() } else { Vec::new() },
            })?;
            steps[layer] += 1;
        }
        // Page statistics feed the policy and healing (which pages attention is on now).
        self.cache.observe(layer, &[self.seq], &att)?;
        self.certify_after(layer, exact_now)?;
        if let Some((policy, budget)) = self.policy.as_mut() {
            self.cache
                .enforce(policy.as_mut(), self.seq, layer, budget)?;
        }
        Ok(att.output)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        self.cache.append(self.seq, layer, k, v)
    }

    fn reset(&mut self) -> Result<()> {
        self.cache.reset_sequence(self.seq)?;
        self.last_heads.iter_mut().for_each(Vec::clear);
        self.healed.iter_mut().for_each(Vec::clear);
        self.exact_calls = 0;
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        self.cache.memory_report()
    }

    fn step_heads(&self, out: &mut Vec<HeadStats>) {
        self.last_heads
            .iter()
            .for_each(|h| out.extend_from_slice(h));
    }

    fn heal(&mut self, healer: &Healer) -> Result<(usize, usize)> {
        self.heal_pages(healer)
    }

    fn release_healed(&mut self, healer: &Healer) -> Result<usize> {
        self.release_pages(healer)
    }
}

/// Validates a monitor sensitivity: finite and in `[0, 1]`.
pub fn check_sensitivity(sensitivity: f32) -> Result<f32> {
    if (0.0..=1.0).contains(&sensitivity) {
        Ok(sensitivity)
    } else {
        Err(Error::config(
            "sensitivity",
            format!("{sensitivity} is not in [0, 1]"),
        ))
    }
}

/// An engine that can be protected: it says its attention shape and binds a kvtier cache.
pub trait Engine: Sized {
    /// What protecting returns (a session that generates and scores through the cache).
    type Session;
    /// The engine's error type; kvtier's errors convert into it.
    type Error: From<Error>;
    /// The attention geometry of the engine's model.
    fn attention_shape(&self) -> AttentionShape;
    /// Binds `cache` (shaped for this engine) and a validated `sensitivity`.
    fn bind(
        self,
        cache: KvTierAttention,
        sensitivity: f32,
    ) -> std::result::Result<Self::Session, Self::Error>;
}

/// The configuration [`protect`] uses: kvtier's `balanced` preset (int4 K and V, 128-token hot
/// window, 4 sinks, archive on) shaped for `shape`.
pub fn default_config(shape: AttentionShape) -> Result<CacheConfig> {
    CacheConfig::balanced(
        shape.num_layers,
        shape.num_q_heads,
        shape.num_kv_heads,
        shape.head_dim,
    )
}

/// Gives `engine` a kvtier cache with the default configuration. `sensitivity` in `[0, 1]`
/// (default 0.85) sets how readily the monitor fires.
pub fn protect<E: Engine>(
    engine: E,
    sensitivity: f32,
) -> std::result::Result<E::Session, E::Error> {
    let config = default_config(engine.attention_shape())?;
    protect_with(engine, sensitivity, config)
}

/// [`protect`] with an explicit cache configuration; its shape must match the engine's.
pub fn protect_with<E: Engine>(
    engine: E,
    sensitivity: f32,
    config: CacheConfig,
) -> std::result::Result<E::Session, E::Error> {
    let sensitivity = check_sensitivity(sensitivity)?;
    let want = engine.attention_shape();
    if AttentionShape::of(&config) != want {
        return Err(Error::config(
            "shape",
            format!(
                "cache shape {:?} differs from the engine's {want:?}",
                AttentionShape::of(&config)
            ),
        )
        .into());
    }
    let cache = KvTierAttention::new(config)?;
    engine.bind(cache, sensitivity)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy engine: proves the seam needs no particular model.
    struct Echo(AttentionShape);
    struct EchoSession(KvTierAttention, f32);

    impl Engine for Echo {
        type Session = EchoSession;
        type Error = Error;
        fn attention_shape(&self) -> AttentionShape {
            self.0
        }
        fn bind(self, cache: KvTierAttention, s: f32) -> Result<EchoSession> {
            Ok(EchoSession(cache, s))
        }
    }

    #[test]
    fn protect_binds_a_shaped_cache_and_checks_sensitivity() {
        let shape = AttentionShape {
            num_layers: 2,
            num_q_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
        };
        let mut s = protect(Echo(shape), 0.85).unwrap();
        assert_eq!(s.1, 0.85);
        assert_eq!(s.0.shape(), shape);
        let (q, k) = (vec![0.1; 4 * 32], vec![0.2; 2 * 32]);
        assert_eq!(s.0.decode(1, &q, &k, &k).unwrap().len(), 4 * 32);
        assert_eq!(s.0.last_head_stats(1).len(), 4);
        assert!(matches!(
            s.0.decode(0, &[0.0; 256], &k, &k),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            protect(Echo(shape), 1.5),
            Err(Error::InvalidConfig { .. })
        ));
        let other = CacheConfig::balanced(3, 4, 2, 32).unwrap();
        assert!(protect_with(Echo(shape), 0.5, other).is_err());
        // A policy chosen by name runs after each decode step and holds its budget.
        let mut a = KvTierAttention::new(CacheConfig::balanced(1, 4, 2, 32).unwrap())
            .unwrap()
            .with_policy(crate::policy::by_name("h2o").unwrap(), Budget::tokens(256));
        let mut x = 0.0f32;
        for _ in 0..400 {
            x += 0.37;
            let k: Vec<f32> = (0..64).map(|i| ((i as f32) * x).sin()).collect();
            a.decode(0, &q, &k, &k).unwrap();
        }
        let view = a.kv_cache().policy_view(a.seq(), 0).unwrap();
        assert!(view.kept_tokens() <= 256, "{}", view.kept_tokens());
        assert!(a.kv_cache().memory_report().evicted_pages > 0);
    }

    #[test]
    fn a_policy_compresses_a_prompt_at_the_end_of_its_prefill() {
        let cfg = CacheConfig::balanced(1, 4, 2, 32).unwrap();
        let rows = 1024;
        let q: Vec<f32> = (0..rows * 128).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..rows * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        let kept = |window: usize| {
            let mut a = KvTierAttention::new(cfg.clone())
                .unwrap()
                .with_policy(crate::policy::by_name("h2o").unwrap(), Budget::tokens(256))
                .with_observation_window(window);
            let out = a.prefill(0, &q, &k, &k).unwrap();
            assert_eq!(out.len(), q.len());
            let v = a.kv_cache().policy_view(a.seq(), 0).unwrap();
            (v.kept_tokens(), v.step)
        };
        // The last 16 rows are observed, then the budget is enforced before any decode step.
        let (n, steps) = kept(16);
        assert!(n <= 256, "{n}");
        assert_eq!(steps, 16);
        // Window 0: the policy waits for the first decode step.
        assert_eq!(kept(0), (rows, 0));
    }
}
