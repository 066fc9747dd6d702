//! A seeded simulator: a policy against the full cache on synthetic decode streams.
//!
//! Owns: [`SimConfig`], [`simulate`] and [`SimReport`]. Two caches receive the same tokens: the
//! full reference (exact, nothing moved) and one run by the policy under a budget. Streams have
//! heavy hitters: a fraction of tokens carry keys along a few recurring "topic" directions that
//! the queries return to, as attention in real models returns to a few tokens. Per step the
//! simulator measures the seed runner's metrics (kept tokens, kept ratio, saved bytes,
//! heavy-hitter recall, sink recall) and two that do not favour policies that define heavy
//! hitters by attention: the reference attention mass on the pages the policy kept, and the output
//! error against the reference. Must never: feed the policy anything but its own cache's view.

use super::{Budget, RetentionPolicy};
use crate::cache::{KvCache, Tier};
use crate::config::CacheConfig;
use crate::error::{Error, Result};

/// A synthetic stream.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Tokens appended before decoding starts (one prefill chunk).
    pub prompt: usize,
    /// Decode steps (one token appended, attended, observed and the policy enforced per step).
    pub steps: usize,
    /// Fraction of tokens that are heavy hitters.
    pub heavy_fraction: f32,
    /// Topic directions the heavy hitters and the queries share.
    pub topics: usize,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            prompt: 2048,
            steps: 64,
            heavy_fraction: 0.05,
            topics: 4,
            seed: 1,
        }
    }
}

/// Means over the decode steps.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimReport {
    pub kept_tokens: f64,
    pub kept_ratio: f64,
    /// Device bytes the policy's cache holds, and what the full f16 cache would.
    pub device_bytes: f64,
    pub f16_bytes: f64,
    pub saved_bytes: f64,
    /// Fraction of the reference's heaviest pages (top 10% by accumulated mass) still kept.
    pub heavy_hitter_recall: f64,
    /// Fraction of sink pages kept.
    pub sink_recall: f64,
    /// The reference attention mass on the pages the policy kept (1 = nothing of weight lost).
    pub mass_retained: f64,
    /// ‖out − out_ref‖ / ‖out_ref‖ of the attention output.
    pub output_error: f64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Runs `policy` under `budget` on the stream `sim` for a one-layer cache of `cfg`'s shape.
pub fn simulate(
    cfg: &CacheConfig,
    policy: &mut dyn RetentionPolicy,
    budget: &Budget,
    sim: &SimConfig,
) -> Result<SimReport> {
    if sim.steps == 0 || sim.topics == 0 {
        return Err(Error::config("sim", "steps and topics must be positive"));
    }
    let cfg = CacheConfig {
        num_layers: 1,
        protected_layers: Vec::new(),
        ..cfg.clone()
    };
    let reference_cfg = CacheConfig {
        warm_enabled: false,
        archive: false,
        ..cfg.clone()
    };
    let (kvh, qh, d) = (cfg.num_kv_heads, cfg.num_q_heads, cfg.head_dim);
    let mut rng = Rng(sim.seed);
    let topics: Vec<Vec<f32>> = (0..sim.topics)
        .map(|_| (0..d).map(|_| rng.next()).collect())
        .collect();
    let token = |rng: &mut Rng| -> (Vec<f32>, Vec<f32>) {
        let mut k = Vec::with_capacity(kvh * d);
        for _ in 0..kvh {
            let heavy = (rng.next() + 1.0) / 2.0 < sim.heavy_fraction;
            let t = ((rng.next() + 1.0) / 2.0 * sim.topics as f32) as usize % sim.topics;
            for &dir in &topics[t] {
                let noise = 0.5 * rng.next();
                k.push(if heavy { 3.0 * dir + noise } else { noise });
            }
        }
        let v = (0..kvh * d).map(|_| rng.next()).collect();
        (k, v)
    };
    let mut full = KvCache::new(reference_cfg)?;
    let mut mine = KvCache::new(cfg.clone())?;
    let (sf, sm) = (full.add_sequence(), mine.add_sequence());
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for _ in 0..sim.prompt {
        let (k, v) = token(&mut rng);
        ks.extend(k);
        vs.extend(v);
    }
    full.append(sf, 0, &ks, &vs)?;
    mine.append(sm, 0, &ks, &vs)?;
    let mut r = SimReport::default();
    let f16_token = 2 * kvh * d * 2;
    for step in 0..sim.steps {
        let (k, v) = token(&mut rng);
        full.append(sf, 0, &k, &v)?;
        mine.append(sm, 0, &k, &v)?;
        let t = &topics[step % sim.topics];
        let q: Vec<f32> = (0..qh).flat_map(|_| t.iter().map(|x| 2.0 * x)).collect();
        let a_full = full.attend(0, &[sf], &q)?;
        let a_mine = mine.attend(0, &[sm], &q)?;
        full.observe(0, &[sf], &a_full)?;
        mine.observe(0, &[sm], &a_mine)?;
        mine.enforce(policy, sm, 0, budget)?;
        // Metrics after the policy's step.
        let view = mine.policy_view(sm, 0)?;
        let kept: Vec<bool> = view.pages.iter().map(|p| p.tier != Tier::Evicted).collect();
        let len = view.len as f64;
        r.kept_tokens += view.kept_tokens() as f64;
        r.kept_ratio += view.kept_tokens() as f64 / len;
        r.device_bytes += view.device_bytes() as f64;
        r.f16_bytes += (view.len * f16_token) as f64;
        r.saved_bytes += (view.len * f16_token) as f64 - view.device_bytes() as f64;
        let fm = full.page_meta(sf, 0)?;
        let mut order: Vec<usize> = (0..fm.len()).collect();
        order.sort_by(|&a, &b| fm[b].total_mass().total_cmp(&fm[a].total_mass()));
        let top = (fm.len() / 10).max(1);
        r.heavy_hitter_recall +=
            order[..top].iter().filter(|&&p| kept[p]).count() as f64 / top as f64;
        let sinks = cfg.sink_tokens.div_ceil(cfg.page_size).min(kept.len());
        r.sink_recall += if sinks == 0 {
            1.0
        } else {
            kept[..sinks].iter().filter(|&&k| k).count() as f64 / sinks as f64
        };
        r.mass_retained += a_full.page_mass[0]
            .iter()
            .zip(&kept)
            .filter(|(_, &k)| k)
            .map(|(m, _)| *m as f64)
            .sum::<f64>();
        let (num, den) = a_mine
            .output
            .iter()
            .zip(&a_full.output)
            .fold((0.0f64, 0.0f64), |(n, d), (&x, &y)| {
                (n + ((x - y) as f64).powi(2), d + (y as f64).powi(2))
            });
        r.output_error += (num / den.max(f64::MIN_POSITIVE)).sqrt();
    }
    let n = sim.steps as f64;
    for x in [
        &mut r.kept_tokens,
        &mut r.kept_ratio,
        &mut r.device_bytes,
        &mut r.f16_bytes,
        &mut r.saved_bytes,
        &mut r.heavy_hitter_recall,
        &mut r.sink_recall,
        &mut r.mass_retained,
        &mut r.output_error,
    ] {
        *x /= n;
    }
    Ok(r)
}
