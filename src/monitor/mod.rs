//! The uncertainty monitor: per decode step, how unsure the model is, and whether to act.
//!
//! Owns: entropy and varentropy of next-token logits ([`logit_uncertainty`], entropix's two
//! signals), the summary of attention's fused per-head statistics ([`attention_uncertainty`]), the
//! entropix regimes ([`Regime`]), a health score per token, and the firing rule ([`Monitor`]: an
//! immutable engine; [`MonitorState`]: the caller-owned running calibration; [`StepSignals`]: one
//! step's input). Must never: touch the cache or the model (it reads numbers and returns a
//! [`Verdict`]; whoever embeds it decides what healing means), or allocate per step beyond its
//! fixed window.
//!
//! **Calibration** (what `sensitivity` means): the monitor keeps the last `window` steps' logit
//! varentropy and fires on a step whose varentropy is above the running quantile at level
//! `1 - sensitivity / 10` of that window, once `warmup` steps have been seen. So on a stationary
//! stream it fires on about `sensitivity / 10` of the steps: 8.5% at the default 0.85, never at 0,
//! 10% at 1. The rule is relative to the model's own recent behaviour, so it needs no per-model
//! constant; the test `firing_rate_follows_sensitivity` checks the rate.
//!
//! **Health** is `1 - H / ln(V)`: one minus the next-token entropy normalised by its maximum for a
//! vocabulary of `V`, in `[0, 1]`, 1 for a certain prediction.

mod certify;
mod heal;
mod legacy;
pub use certify::{score_error_bound, Certifier};
pub use heal::Healer;
pub use legacy::{key_variance, Hysteresis, HysteresisState};

use crate::attention::exp::exp_nonpos;
use crate::attention::HeadStats;
use crate::error::{Error, Result};

/// Entropy and varentropy of one distribution (nats, nats²).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Uncertainty {
    /// `H = -Σ p log p`.
    pub entropy: f32,
    /// `Σ p (log p + H)²`: the variance of the surprisal.
    pub varentropy: f32,
}

/// [`Uncertainty`] of `softmax(logits)`, computed in f64 from the log-softmax (stable for any
/// finite logits). Errors on an empty slice or a non-finite logit.
pub fn logit_uncertainty(logits: &[f32]) -> Result<Uncertainty> {
    if logits.is_empty() {
        return Err(Error::shape("logits", "at least one value", 0));
    }
    if let Some(index) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: "logits",
            index,
        });
    }
    // One pass after the max, relative to it (the attention module's algebra: with d = x - m,
    // e = exp(d), l = Σe, s1 = Σe·d, s2 = Σe·d², H = ln l - s1/l and V = s2/l - (s1/l)², free of
    // cancellation). The exponentials are the vectorised f32 `exp_nonpos` (relative error < 4e-7);
    // 8 lanes accumulate 256 logits in f32, then f64 across blocks.
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut l, mut s1, mut s2) = (0f64, 0f64, 0f64);
    for block in logits.chunks(256) {
        let (mut bl, mut b1, mut b2) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        let mut lanes = block.chunks_exact(8);
        for c in &mut lanes {
            for j in 0..8 {
                let d = c[j] - m;
                let e = exp_nonpos(d);
                bl[j] += e;
                b1[j] += e * d;
                b2[j] += e * d * d;
            }
        }
        for &x in lanes.remainder() {
            let d = x - m;
            let e = exp_nonpos(d);
            bl[0] += e;
            b1[0] += e * d;
            b2[0] += e * d * d;
        }
        l += bl.iter().map(|&v| v as f64).sum::<f64>();
        s1 += b1.iter().map(|&v| v as f64).sum::<f64>();
        s2 += b2.iter().map(|&v| v as f64).sum::<f64>();
    }
    let (ex, ex2) = (s1 / l, s2 / l);
    Ok(Uncertainty {
        entropy: (l.ln() - ex).max(0.0) as f32,
        varentropy: (ex2 - ex * ex).max(0.0) as f32,
    })
}

/// Mean entropy and varentropy over attention heads (the decode kernel's fused statistics).
/// `None` when `heads` is empty.
pub fn attention_uncertainty(heads: &[HeadStats]) -> Option<Uncertainty> {
    if heads.is_empty() {
        return None;
    }
    let n = heads.len() as f32;
    Some(Uncertainty {
        entropy: heads.iter().map(|h| h.entropy).sum::<f32>() / n,
        varentropy: heads.iter().map(|h| h.varentropy).sum::<f32>() / n,
    })
}

/// entropix's four regimes of (entropy, varentropy), each against its running median.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Regime {
    /// Low entropy, low varentropy: the model is sure (entropix: take the argmax).
    Confident,
    /// High entropy, low varentropy: uniformly unsure (entropix: ask or think before answering).
    Uncertain,
    /// Low entropy, high varentropy: a few strong, competing options (entropix: branch).
    Branching,
    /// High entropy, high varentropy: lost (entropix: resample hotter); the regime healing targets.
    Lost,
}

/// Why a step fired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Logit varentropy above the calibrated quantile (`threshold`).
    Varentropy { value: f32, threshold: f32 },
    /// The seed's key-variance signal above its calibrated quantile ([`Signal::KeyVariance`]).
    KeyVariance { value: f32, threshold: f32 },
    /// The caller's critic asked for healing (`Healing::with_critic`).
    Critic,
}

/// The monitor's judgement of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// `1 - H / ln(V)` in `[0, 1]`.
    pub health: f32,
    pub logits: Uncertainty,
    /// Mean over attention heads, when the step reported them.
    pub attention: Option<Uncertainty>,
    /// Against the window's medians; `None` during warm-up.
    pub regime: Option<Regime>,
    /// `Some` when the monitor fires (act on this step).
    pub fire: Option<Reason>,
}

/// One step's signals.
#[derive(Debug, Clone, Copy)]
pub struct StepSignals<'a> {
    /// Next-token logits, `[vocab]`.
    pub logits: &'a [f32],
    /// The decode step's attention statistics (any layers, any heads; may be empty).
    pub heads: &'a [HeadStats],
    /// The seed's signal, [`key_variance`] of recent keys, when the caller computes it (needed
    /// with [`Signal::KeyVariance`]).
    pub key_variance: Option<f32>,
}

/// What the monitor fires on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signal {
    /// Next-token logit varentropy (entropix; the default).
    #[default]
    LogitVarentropy,
    /// The seed's variance of recent keys (legacy; `StepSignals::key_variance` must be given).
    KeyVariance,
}

/// The monitor's settings (immutable engine; state lives in [`MonitorState`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Monitor {
    sensitivity: f32,
    window: usize,
    warmup: usize,
    signal: Signal,
    hysteresis: Option<Hysteresis>,
}

impl Monitor {
    /// A monitor at `sensitivity` in `[0, 1]` (the default 0.85 fires on about 8.5% of steps),
    /// over a 256-step window with a 32-step warm-up.
    pub fn new(sensitivity: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&sensitivity) {
            return Err(Error::config(
                "sensitivity",
                format!("must be in [0, 1], got {sensitivity}"),
            ));
        }
        Ok(Monitor {
            sensitivity,
            window: 256,
            warmup: 32,
            signal: Signal::LogitVarentropy,
            hysteresis: None,
        })
    }

    /// Fires on `signal` instead of logit varentropy.
    pub fn with_signal(mut self, signal: Signal) -> Self {
        self.signal = signal;
        self
    }

    /// Moves the fire quantile with the seed's hysteresis controller (see [`legacy`]); the
    /// calibration window becomes the controller's (`h.window`, warm-up capped to it).
    pub fn with_hysteresis(mut self, h: Hysteresis) -> Result<Self> {
        h.validate()?;
        self.window = h.window;
        self.warmup = self.warmup.min(h.window);
        self.hysteresis = Some(h);
        Ok(self)
    }

    /// The calibration window and warm-up, in steps (`1 <= warmup <= window`).
    pub fn with_window(mut self, window: usize, warmup: usize) -> Result<Self> {
        if warmup == 0 || warmup > window || window > 1 << 20 {
            return Err(Error::config(
                "window",
                format!("need 1 <= warmup ({warmup}) <= window ({window}) <= 2^20"),
            ));
        }
        self.window = window;
        self.warmup = warmup;
        Ok(self)
    }

    pub fn sensitivity(&self) -> f32 {
        self.sensitivity
    }

    /// The quantile level above which a step fires.
    pub fn fire_quantile(&self) -> f32 {
        1.0 - self.sensitivity / 10.0
    }

    /// Judges one step and records it into `state`'s window.
    pub fn observe(&self, state: &mut MonitorState, step: &StepSignals) -> Result<Verdict> {
        let logits = logit_uncertainty(step.logits)?;
        let attention = attention_uncertainty(step.heads);
        let value = match self.signal {
            Signal::LogitVarentropy => logits.varentropy,
            Signal::KeyVariance => match step.key_variance {
                Some(v) if v.is_finite() => v,
                _ => {
                    return Err(Error::shape(
                        "key_variance",
                        "a finite value (the monitor fires on Signal::KeyVariance)",
                        format!("{:?}", step.key_variance),
                    ))
                }
            },
        };
        let max_h = (step.logits.len() as f32).ln();
        let health = if max_h > 0.0 {
            (1.0 - logits.entropy / max_h).clamp(0.0, 1.0)
        } else {
            1.0
        };
        let (mut regime, mut fire) = (None, None);
        if state.len() >= self.warmup {
            let med_h = state.quantile(&state.entropy, 0.5);
            let med_v = state.quantile(&state.varentropy, 0.5);
            regime = Some(match (logits.entropy > med_h, logits.varentropy > med_v) {
                (false, false) => Regime::Confident,
                (true, false) => Regime::Uncertain,
                (false, true) => Regime::Branching,
                (true, true) => Regime::Lost,
            });
            if self.sensitivity > 0.0 {
                let level = match &self.hysteresis {
                    Some(h) => state.hyst.level(h, self.fire_quantile()),
                    None => self.fire_quantile(),
                };
                let threshold = state.quantile(&state.signal, level);
                if value > threshold {
                    fire = Some(match self.signal {
                        Signal::LogitVarentropy => Reason::Varentropy { value, threshold },
                        Signal::KeyVariance => Reason::KeyVariance { value, threshold },
                    });
                }
            }
        }
        if let Some(h) = &self.hysteresis {
            state.hyst.update(h, self.fire_quantile(), value);
        }
        state.push(self.window, logits, value);
        state.steps += 1;
        state.fired += fire.is_some() as u64;
        Ok(Verdict {
            health,
            logits,
            attention,
            regime,
            fire,
        })
    }
}

/// A monitor's running calibration (caller-owned; one per sequence).
#[derive(Debug, Clone, Default)]
pub struct MonitorState {
    entropy: Vec<f32>,
    varentropy: Vec<f32>,
    /// The firing signal's window (logit varentropy or key variance).
    signal: Vec<f32>,
    hyst: HysteresisState,
    /// Next slot of the ring once full.
    next: usize,
    sorted: std::cell::RefCell<Vec<f32>>,
    /// Steps observed and steps fired.
    pub steps: u64,
    pub fired: u64,
}

impl MonitorState {
    /// Steps in the window.
    pub fn len(&self) -> usize {
        self.entropy.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entropy.is_empty()
    }
    fn push(&mut self, window: usize, u: Uncertainty, signal: f32) {
        if self.entropy.len() < window {
            self.entropy.push(u.entropy);
            self.varentropy.push(u.varentropy);
            self.signal.push(signal);
        } else {
            let i = self.next % window.min(self.entropy.len());
            self.entropy[i] = u.entropy;
            self.varentropy[i] = u.varentropy;
            self.signal[i] = signal;
            self.next = i + 1;
        }
    }

    /// The fire quantile level the hysteresis controller holds now (`None` without one).
    pub fn hysteresis_level(&self, monitor: &Monitor) -> Option<f32> {
        monitor
            .hysteresis
            .as_ref()
            .map(|h| self.hyst.level(h, monitor.fire_quantile()))
    }
    /// The `q` quantile (nearest rank) of `xs`, through a reused buffer.
    fn quantile(&self, xs: &[f32], q: f32) -> f32 {
        let mut s = self.sorted.borrow_mut();
        s.clear();
        s.extend_from_slice(xs);
        let k = ((s.len() - 1) as f32 * q).round() as usize;
        *s.select_nth_unstable_by(k, f32::total_cmp).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn uncertainty_matches_the_direct_formulas() {
        let mut seed = 7;
        for n in [1usize, 2, 5, 100, 4096, 49152] {
            for scale in [0.1f32, 3.0, 40.0] {
                let x: Vec<f32> = (0..n).map(|_| lcg(&mut seed) * scale).collect();
                let u = logit_uncertainty(&x).unwrap();
                // Direct: normalise p, then H and Var[-log p] by definition.
                let m = x.iter().copied().fold(f32::MIN, f32::max) as f64;
                let w: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let p: Vec<f64> = w.iter().map(|v| v / z).collect();
                let h: f64 = p.iter().filter(|&&q| q > 0.0).map(|q| -q * q.ln()).sum();
                let v: f64 = p
                    .iter()
                    .filter(|&&q| q > 0.0)
                    .map(|q| q * (-q.ln() - h).powi(2))
                    .sum();
                assert!(
                    (u.entropy as f64 - h).abs() <= 1e-5 * h.max(1.0),
                    "{n} {scale}"
                );
                assert!(
                    (u.varentropy as f64 - v).abs() <= 1e-4 * v.max(1.0),
                    "{n} {scale}"
                );
            }
        }
        // Uniform: H = ln n, no variance.
        let u = logit_uncertainty(&[0.5; 64]).unwrap();
        assert!((u.entropy - 64f32.ln()).abs() < 1e-6 && u.varentropy < 1e-9);
        assert!(logit_uncertainty(&[]).is_err());
        assert!(logit_uncertainty(&[1.0, f32::NAN]).is_err());
        assert!(logit_uncertainty(&[1.0, f32::INFINITY]).is_err());
    }

    #[test]
    fn firing_rate_follows_sensitivity() {
        for s in [0.0f32, 0.5, 0.85, 1.0] {
            let mon = Monitor::new(s).unwrap();
            let mut st = MonitorState::default();
            let mut seed = 11;
            let n = 6000;
            for _ in 0..n {
                let sharp = 1.0 + 8.0 * (lcg(&mut seed) + 1.0);
                let x: Vec<f32> = (0..50).map(|_| lcg(&mut seed) * sharp).collect();
                let v = mon
                    .observe(
                        &mut st,
                        &StepSignals {
                            logits: &x,
                            heads: &[],
                            key_variance: None,
                        },
                    )
                    .unwrap();
                assert!((0.0..=1.0).contains(&v.health));
            }
            let rate = st.fired as f32 / n as f32;
            assert!(
                (rate - s / 10.0).abs() < 0.015,
                "sensitivity {s}: rate {rate}"
            );
        }
        assert!(Monitor::new(1.5).is_err());
        assert!(Monitor::new(0.5).unwrap().with_window(8, 16).is_err());
    }

    #[test]
    fn regimes_and_health_follow_the_distribution() {
        let mon = Monitor::new(0.85).unwrap().with_window(64, 8).unwrap();
        let mut st = MonitorState::default();
        let mut seed = 3;
        // A calm stream: near-uniform predictions, almost no varentropy.
        for _ in 0..64 {
            let x: Vec<f32> = (0..32).map(|_| lcg(&mut seed) * 0.1).collect();
            mon.observe(
                &mut st,
                &StepSignals {
                    logits: &x,
                    heads: &[],
                    key_variance: None,
                },
            )
            .unwrap();
        }
        let mut sure = vec![0f32; 32];
        sure[3] = 40.0;
        let v = mon
            .observe(
                &mut st,
                &StepSignals {
                    logits: &sure,
                    heads: &[],
                    key_variance: None,
                },
            )
            .unwrap();
        assert_eq!(v.regime, Some(Regime::Confident));
        assert!(v.health > 0.99 && v.fire.is_none());
        let flat = vec![0f32; 32];
        let v = mon
            .observe(
                &mut st,
                &StepSignals {
                    logits: &flat,
                    heads: &[],
                    key_variance: None,
                },
            )
            .unwrap();
        assert_eq!(v.regime, Some(Regime::Uncertain));
        assert!(v.health < 1e-6);
        // Two strong options among weak ones: high varentropy.
        let mut two = vec![-10f32; 32];
        two[0] = 5.0;
        two[1] = 5.0;
        for t in two.iter_mut().skip(2).take(8) {
            *t = 2.0;
        }
        let v = mon
            .observe(
                &mut st,
                &StepSignals {
                    logits: &two,
                    heads: &[],
                    key_variance: None,
                },
            )
            .unwrap();
        assert_eq!(v.regime, Some(Regime::Branching));
        assert!(v.fire.is_some(), "{v:?}");
        let heads = [
            HeadStats {
                entropy: 1.0,
                varentropy: 2.0,
                max_score: 0.0,
                log_z: 0.0,
            },
            HeadStats {
                entropy: 3.0,
                varentropy: 4.0,
                max_score: 0.0,
                log_z: 0.0,
            },
        ];
        let a = attention_uncertainty(&heads).unwrap();
        assert_eq!((a.entropy, a.varentropy), (2.0, 3.0));
        assert!(attention_uncertainty(&[]).is_none());
    }

    #[test]
    fn key_variance_signal_and_hysteresis() {
        let logits = [0.0f32, 1.0, 2.0];
        // The legacy signal: required when chosen, and it fires on its own outliers.
        let mon = Monitor::new(0.85)
            .unwrap()
            .with_window(64, 8)
            .unwrap()
            .with_signal(Signal::KeyVariance);
        let mut st = MonitorState::default();
        let step = |kv| StepSignals {
            logits: &logits,
            heads: &[],
            key_variance: kv,
        };
        assert!(mon.observe(&mut st, &step(None)).is_err());
        let mut seed = 5;
        let mut fired_on_spike = 0;
        for i in 0..400 {
            let spike = i % 50 == 49;
            let kv = if spike {
                10.0
            } else {
                1.0 + 0.1 * lcg(&mut seed)
            };
            let v = mon.observe(&mut st, &step(Some(kv))).unwrap();
            if spike && matches!(v.fire, Some(Reason::KeyVariance { .. })) {
                fired_on_spike += 1;
            }
        }
        assert!(fired_on_spike >= 6, "{fired_on_spike}");
        // Hysteresis: a rising varentropy trend lowers the fire level toward 0.5, calm raises it
        // back toward 0.95; never outside.
        let mon = Monitor::new(0.85)
            .unwrap()
            .with_signal(Signal::KeyVariance)
            .with_hysteresis(Hysteresis::default())
            .unwrap();
        let mut st = MonitorState::default();
        let mut levels = Vec::new();
        for i in 0..300 {
            let ramp = if (100..130).contains(&i) {
                (i - 100) as f32
            } else {
                0.0
            };
            let kv = 1.0 + 0.1 * lcg(&mut seed) + ramp;
            mon.observe(&mut st, &step(Some(kv))).unwrap();
            levels.push(st.hysteresis_level(&mon).unwrap());
        }
        assert!(levels.iter().all(|l| (0.5..=0.95).contains(l)));
        assert!(
            (levels[129] - 0.5).abs() < 1e-6,
            "the rise pulled it down: {}",
            levels[129]
        );
        assert!(levels[299] > 0.9, "calm lets it relax: {}", levels[299]);
        assert!(Monitor::new(0.5)
            .unwrap()
            .with_hysteresis(Hysteresis {
                min: 0.9,
                max: 0.5,
                ..Hysteresis::default()
            })
            .is_err());
    }
}
