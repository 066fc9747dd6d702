//! Healing through the engine seam: the [`Healing`] loop an engine runs after each decode step
//! (monitor → heal / release on any [`AttentionCache`]), and [`KvTierAttention`]'s execution of
//! the [`Healer`]'s plans.
//!
//! Owns: the loop's state (the monitor's calibration, steps since the last firing, the event
//! queue, an optional callback, a ring of per-step overhead timings). Must never: decide which
//! pages to heal (the [`Healer`] does) or change what a page holds (promotion restores archive
//! bytes exactly; release re-quantises from them).

use std::collections::VecDeque;
use std::time::Instant;

use super::{AttentionCache, KvTierAttention};
use crate::cache::{KvCache, SeqId};
use crate::error::Result;
use crate::monitor::{Healer, Monitor, MonitorState, Reason, StepSignals, Verdict};
use crate::HeadStats;

/// What the [`Healing`] loop acts on: every [`AttentionCache`] (through its default or own
/// `step_heads` / `heal` / `release_healed`), or a sequence of a bare [`KvCache`] that an engine
/// attends itself ([`CacheSequence`], the C session's target).
pub trait Healable {
    /// Appends the latest decode step's attention statistics to `out`.
    fn step_heads(&self, out: &mut Vec<HeadStats>);
    /// Promotes the healer's pages; returns `(pages, device bytes added)`.
    fn heal(&mut self, healer: &Healer) -> Result<(usize, usize)>;
    /// Releases the healed pages; returns how many went back.
    fn release_healed(&mut self, healer: &Healer) -> Result<usize>;
}

impl<T: AttentionCache> Healable for T {
    fn step_heads(&self, out: &mut Vec<HeadStats>) {
        AttentionCache::step_heads(self, out)
    }
    fn heal(&mut self, healer: &Healer) -> Result<(usize, usize)> {
        AttentionCache::heal(self, healer)
    }
    fn release_healed(&mut self, healer: &Healer) -> Result<usize> {
        AttentionCache::release_healed(self, healer)
    }
}

/// One sequence of a [`KvCache`] as a healing target, for engines that call `attend` themselves
/// and pass the step's head statistics in.
pub struct CacheSequence<'a> {
    pub cache: &'a mut KvCache,
    pub seq: SeqId,
    /// Per layer: pages healed and not yet released (kept by the caller between steps).
    pub healed: &'a mut Vec<Vec<usize>>,
    /// This step's attention statistics (any layers, any heads; may be empty).
    pub heads: &'a [HeadStats],
}

impl Healable for CacheSequence<'_> {
    fn step_heads(&self, out: &mut Vec<HeadStats>) {
        out.extend_from_slice(self.heads);
    }
    fn heal(&mut self, healer: &Healer) -> Result<(usize, usize)> {
        heal_sequence(self.cache, self.seq, healer, self.healed)
    }
    fn release_healed(&mut self, healer: &Healer) -> Result<usize> {
        release_sequence(self.cache, self.seq, healer, self.healed)
    }
}

/// What happened when the monitor fired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealEvent {
    /// Decode step (0-based, counted by the loop) after which healing ran.
    pub step: u64,
    pub reason: Reason,
    pub health: f32,
    /// Pages promoted (all layers) and the device bytes they added.
    pub promoted_pages: usize,
    pub promoted_bytes: usize,
}

/// Called with every healing event.
type EventCallback = Box<dyn FnMut(&HealEvent) + Send>;
/// The critic: sees each verdict and the logits; `Some(fire)` overrides the monitor's decision.
type Critic = Box<dyn FnMut(&Verdict, &[f32]) -> Option<bool> + Send>;

/// Events kept for [`Healing::drain_events`] before the oldest are dropped.
const EVENT_QUEUE: usize = 1024;
/// Per-step overhead timings kept.
const TIMINGS: usize = 4096;

/// The monitor-and-heal loop: call [`Healing::after_step`] with each decode step's logits.
pub struct Healing {
    monitor: Monitor,
    state: MonitorState,
    healer: Healer,
    steps: u64,
    since_fire: Option<u64>,
    heads: Vec<HeadStats>,
    events: VecDeque<HealEvent>,
    on_event: Option<EventCallback>,
    critic: Option<Critic>,
    timings_ns: Vec<u32>,
    last: Option<Verdict>,
    /// Totals over the loop's life: pages promoted and released.
    pub promoted_pages: u64,
    pub released_pages: u64,
}

impl std::fmt::Debug for Healing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Healing")
            .field("monitor", &self.monitor)
            .field("healer", &self.healer)
            .field("steps", &self.steps)
            .field("fired", &self.state.fired)
            .finish()
    }
}

impl Healing {
    pub fn new(monitor: Monitor, healer: Healer) -> Self {
        Healing {
            monitor,
            state: MonitorState::default(),
            healer,
            steps: 0,
            since_fire: None,
            heads: Vec::new(),
            events: VecDeque::new(),
            on_event: None,
            critic: None,
            timings_ns: Vec::new(),
            last: None,
            promoted_pages: 0,
            released_pages: 0,
        }
    }

    /// Calls `f` with every healing event, as it happens (events also go to the queue).
    pub fn with_callback(mut self, f: impl FnMut(&HealEvent) + Send + 'static) -> Self {
        self.on_event = Some(Box::new(f));
        self
    }

    /// A critic (in place of the seed's `critic_model_path`): called with every verdict and the
    /// step's logits; `Some(true)` heals even when the monitor did not fire (the reason is then
    /// `Reason::Critic`), `Some(false)` vetoes a firing, `None` keeps the monitor's decision.
    pub fn with_critic(
        mut self,
        f: impl FnMut(&Verdict, &[f32]) -> Option<bool> + Send + 'static,
    ) -> Self {
        self.critic = Some(Box::new(f));
        self
    }

    /// Judges the step whose prediction is `logits` (read the attention statistics from `cache`),
    /// heals when the monitor fires and releases healed pages once `hold` calm steps have passed.
    pub fn after_step(&mut self, cache: &mut impl Healable, logits: &[f32]) -> Result<Verdict> {
        let t0 = Instant::now();
        self.heads.clear();
        cache.step_heads(&mut self.heads);
        let v = self.monitor.observe(
            &mut self.state,
            &StepSignals {
                logits,
                heads: &self.heads,
                key_variance: None,
            },
        )?;
        let mut v = v;
        if let Some(c) = self.critic.as_mut() {
            match (c(&v, logits), v.fire) {
                (Some(true), None) => v.fire = Some(Reason::Critic),
                (Some(false), Some(_)) => v.fire = None,
                _ => {}
            }
        }
        if let Some(reason) = v.fire {
            let (pages, bytes) = cache.heal(&self.healer)?;
            self.promoted_pages += pages as u64;
            self.since_fire = Some(0);
            let ev = HealEvent {
                step: self.steps,
                reason,
                health: v.health,
                promoted_pages: pages,
                promoted_bytes: bytes,
            };
            if self.events.len() == EVENT_QUEUE {
                self.events.pop_front();
            }
            self.events.push_back(ev);
            if let Some(f) = self.on_event.as_mut() {
                f(&ev);
            }
        } else if let Some(n) = self.since_fire.as_mut() {
            *n += 1;
            if *n >= self.healer.hold {
                self.released_pages += cache.release_healed(&self.healer)? as u64;
                self.since_fire = None;
            }
        }
        self.steps += 1;
        self.last = Some(v);
        let ns = t0.elapsed().as_nanos().min(u32::MAX as u128) as u32;
        if self.timings_ns.len() < TIMINGS {
            self.timings_ns.push(ns);
        } else {
            self.timings_ns[(self.steps as usize) % TIMINGS] = ns;
        }
        Ok(v)
    }

    /// The latest step's verdict (health, regime, firing).
    pub fn last(&self) -> Option<&Verdict> {
        self.last.as_ref()
    }

    /// Steps judged and steps fired.
    pub fn counts(&self) -> (u64, u64) {
        (self.steps, self.state.fired)
    }

    /// Takes the oldest queued event.
    pub fn pop_event(&mut self) -> Option<HealEvent> {
        self.events.pop_front()
    }

    /// Takes the queued events (oldest first).
    pub fn drain_events(&mut self) -> Vec<HealEvent> {
        self.events.drain(..).collect()
    }

    /// The loop's own time per step (monitor + heal / release), nanoseconds, the last 4096 steps.
    pub fn timings_ns(&self) -> &[u32] {
        &self.timings_ns
    }
}

impl KvTierAttention {
    /// Heals this adapter's sequence and makes the next decode step attend every page.
    pub(super) fn heal_pages(&mut self, healer: &Healer) -> Result<(usize, usize)> {
        let r = heal_sequence(&mut self.cache, self.seq, healer, &mut self.healed)?;
        self.exact_calls = self.shape.num_layers;
        Ok(r)
    }

    pub(super) fn release_pages(&mut self, healer: &Healer) -> Result<usize> {
        release_sequence(&mut self.cache, self.seq, healer, &mut self.healed)
    }
}

/// Executes the healer's promotions for `seq` in every layer, within its budget (the oldest
/// healed pages make room). `healed` (one list per layer) is updated. Returns `(pages promoted,
/// device bytes added)`.
pub fn heal_sequence(
    cache: &mut KvCache,
    seq: SeqId,
    healer: &Healer,
    healed: &mut Vec<Vec<usize>>,
) -> Result<(usize, usize)> {
    let layers = cache.config().num_layers;
    healed.resize(layers, Vec::new());
    let before = cache.memory_report().device_bytes();
    let mut n = 0;
    for (layer, list) in healed.iter_mut().enumerate() {
        let view = cache.policy_view(seq, layer)?;
        let moves = healer.promotions(&view);
        let room = healer.max_pages_per_layer.saturating_sub(moves.len());
        if list.len() > room {
            let over = list.len() - room;
            let old: Vec<usize> = list.drain(..over).collect();
            cache.apply(&healer.releases(&view, &old))?;
        }
        let moves = &moves[..moves.len().min(healer.max_pages_per_layer)];
        cache.apply(moves)?;
        for m in moves {
            if let crate::Move::Promote(r) = m {
                if !list.contains(&r.page) {
                    list.push(r.page);
                }
            }
        }
        n += moves.len();
    }
    let after = cache.memory_report().device_bytes();
    Ok((n, after.saturating_sub(before)))
}

/// Demotes the healed pages of `seq` still hot back to the warm format; clears `healed`.
pub fn release_sequence(
    cache: &mut KvCache,
    seq: SeqId,
    healer: &Healer,
    healed: &mut [Vec<usize>],
) -> Result<usize> {
    let mut n = 0;
    for (layer, list) in healed.iter_mut().enumerate() {
        let view = cache.policy_view(seq, layer)?;
        let moves = healer.releases(&view, list);
        cache.apply(&moves)?;
        n += moves.len();
        list.clear();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CacheConfig, HotDtype, Tier};

    #[test]
    fn healing_promotes_exactly_on_firing_and_releases_after_the_hold() {
        let cfg = CacheConfig::builder(2, 4, 2, 32)
            .hot_dtype(HotDtype::F32)
            .hot_window(64)
            .page_size(32)
            .build()
            .unwrap();
        let mut a = KvTierAttention::new(cfg).unwrap();
        let n = 512;
        let kv: Vec<f32> = (0..n * 64).map(|i| ((i as f32) * 0.731).sin()).collect();
        for l in 0..2 {
            a.append(l, &kv, &kv).unwrap();
        }
        let seq = a.seq();
        let warm_before = a.kv_cache().read_tokens(seq, 0).unwrap();
        let monitor = Monitor::new(1.0).unwrap().with_window(64, 4).unwrap();
        let healer = Healer {
            pages_per_layer: 2,
            hold: 3,
            max_pages_per_layer: 2,
        };
        let mut h = Healing::new(monitor, healer);
        let calm = vec![0.25f32; 16];
        let mut spike = vec![-8f32; 16];
        spike[0] = 4.0;
        spike[1] = 4.0;
        spike[2] = 1.0;
        // Each head's query points at one key of page 3, so attention (and healing) goes there.
        let mut q = vec![0f32; 4 * 32];
        for hd in 0..4 {
            let kvh = hd / 2;
            for d in 0..32 {
                q[hd * 32 + d] = 30.0 * kv[((3 * 32 + 7) * 2 + kvh) * 32 + d];
            }
        }
        let tok = |i: usize| -> Vec<f32> {
            (0..64)
                .map(|d| ((i * 64 + d) as f32 * 0.37).cos())
                .collect()
        };
        let step = |a: &mut KvTierAttention, h: &mut Healing, i: usize, logits: &[f32]| {
            let t = tok(i);
            for l in 0..2 {
                a.decode(l, &q, &t, &t).unwrap();
            }
            h.after_step(a, logits).unwrap()
        };
        for i in 0..6 {
            assert!(step(&mut a, &mut h, i, &calm).fire.is_none());
        }
        let v = step(&mut a, &mut h, 6, &spike);
        assert!(v.fire.is_some(), "{v:?}");
        let ev = h.drain_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].promoted_pages, 4);
        assert!(ev[0].promoted_bytes > 0);
        // Page 3 carries the attention: it is hot again, holding exactly what was appended.
        let page = |a: &KvTierAttention, l: usize, p: usize| {
            a.kv_cache()
                .page(crate::PageRef {
                    seq,
                    layer: l,
                    page: p,
                })
                .unwrap()
                .tier
        };
        assert_eq!(page(&a, 0, 3), Tier::Hot);
        assert_eq!(page(&a, 1, 3), Tier::Hot);
        let (k_now, _) = a.kv_cache().read_tokens(seq, 0).unwrap();
        assert_eq!(
            &k_now[3 * 32 * 64..4 * 32 * 64],
            &kv[3 * 32 * 64..4 * 32 * 64]
        );
        // A second firing at once: the budget (2 per layer) holds; the oldest healed pages go back.
        let hot_before = a.kv_cache().memory_report().hot_pages;
        let v = step(&mut a, &mut h, 7, &spike);
        assert!(v.fire.is_some(), "{v:?}");
        assert_eq!(h.drain_events()[0].promoted_pages, 4);
        assert_eq!(a.kv_cache().memory_report().hot_pages, hot_before);
        assert!(a.healed.iter().all(|l| l.len() == 2));
        // Calm steps: released after the hold, back to the same warm codes as before.
        for i in 8..8 + 3 {
            assert!(step(&mut a, &mut h, i, &calm).fire.is_none());
        }
        assert_eq!(h.released_pages, 4);
        assert_eq!(page(&a, 0, 3), Tier::Warm);
        let (k_after, _) = a.kv_cache().read_tokens(seq, 0).unwrap();
        assert_eq!(
            &k_after[..n * 64],
            &warm_before.0[..n * 64],
            "released pages re-quantise to the same codes"
        );
        assert_eq!(h.counts(), (11, 2));
        assert_eq!(h.timings_ns().len(), 11);
    }

    #[test]
    fn a_critic_can_veto_or_force_healing() {
        let cfg = CacheConfig::builder(1, 2, 1, 32)
            .hot_window(32)
            .page_size(16)
            .build()
            .unwrap();
        let mut a = KvTierAttention::new(cfg).unwrap();
        let kv: Vec<f32> = (0..256 * 32).map(|i| ((i as f32) * 0.3).sin()).collect();
        a.append(0, &kv, &kv).unwrap();
        let monitor = Monitor::new(1.0).unwrap().with_window(16, 2).unwrap();
        let mut n = 0;
        let mut h = Healing::new(monitor, Healer::default()).with_critic(move |_, _| {
            n += 1;
            Some(n == 5)
        });
        let calm = vec![0.0f32; 8];
        let mut spike = vec![-9f32; 8];
        spike[0] = 3.0;
        spike[1] = 3.0;
        for logits in [&calm, &calm, &calm, &spike] {
            assert!(
                h.after_step(&mut a, logits).unwrap().fire.is_none(),
                "vetoed"
            );
        }
        let v = h.after_step(&mut a, &calm).unwrap();
        assert_eq!(v.fire, Some(Reason::Critic));
        assert_eq!(h.drain_events()[0].reason, Reason::Critic);
        assert!(h.promoted_pages > 0);
    }
}
