//! The seed's (ASH-KV's) two monitor ideas, as options: the key-variance signal and the
//! hysteresis controller of the firing threshold.
//!
//! Owns: [`key_variance`] (the variance of recent keys, the seed's uncertainty proxy),
//! [`Hysteresis`] (the controller's constants) and [`HysteresisState`] (its running state). Must
//! never: touch the cache; like the rest of the monitor it reads numbers and returns numbers.
//!
//! **Hysteresis** as kvtier implements it: the fire quantile level `q` (the monitor fires on a step
//! whose signal is above the `q` quantile of its window) starts at `1 - sensitivity / 10`, clamped
//! to `[min, max]`. After each step, when the mean signal of the last `last` steps is above the
//! mean of the `window`-step window by more than two standard errors (uncertainty is rising, not
//! just noisy) `q` drops by `down` (fire more readily, fast), otherwise it rises by `up` (relax,
//! slowly); it stays in `[min, max]`. The seed's
//! constants are the defaults: window 50, last 5, +0.01 / -0.05, clamp 0.5..0.95. Trouble is
//! judged on the signal's trend, not on the monitor's own firings, so the controller cannot feed
//! itself into permanent firing.

use crate::error::{Error, Result};
use std::collections::VecDeque;

/// Mean over channels of the variance across tokens of `keys` (`[tokens][head_dim]`, any number of
/// heads folded into tokens): the seed's signal, the spread of the last layer's recent keys. 0 for
/// fewer than two tokens; an error for a length that is not a multiple of `head_dim` or a
/// non-finite key.
pub fn key_variance(keys: &[f32], head_dim: usize) -> Result<f32> {
    if head_dim == 0 || !keys.len().is_multiple_of(head_dim) {
        return Err(Error::shape(
            "keys",
            format!("a multiple of head_dim {head_dim}"),
            keys.len(),
        ));
    }
    if let Some(index) = keys.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            what: "keys",
            index,
        });
    }
    let n = keys.len() / head_dim;
    if n < 2 {
        return Ok(0.0);
    }
    let mut total = 0f64;
    for c in 0..head_dim {
        let (mut s, mut s2) = (0f64, 0f64);
        for t in 0..n {
            let x = keys[t * head_dim + c] as f64;
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        total += (s2 / n as f64 - mean * mean).max(0.0);
    }
    Ok((total / head_dim as f64) as f32)
}

/// The hysteresis controller's constants (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hysteresis {
    pub window: usize,
    pub last: usize,
    pub up: f32,
    pub down: f32,
    pub min: f32,
    pub max: f32,
}

impl Default for Hysteresis {
    /// The seed's: window 50, last 5, +0.01 / -0.05, clamp 0.5..0.95.
    fn default() -> Self {
        Hysteresis {
            window: 50,
            last: 5,
            up: 0.01,
            down: 0.05,
            min: 0.5,
            max: 0.95,
        }
    }
}

impl Hysteresis {
    /// Checks the constants: `1 <= last <= window <= 2^20`, steps in `[0, 1]`,
    /// `0 <= min <= max <= 1`.
    pub fn validate(&self) -> Result<()> {
        let ok = self.last >= 1
            && self.last <= self.window
            && self.window <= 1 << 20
            && (0.0..=1.0).contains(&self.up)
            && (0.0..=1.0).contains(&self.down)
            && (0.0..=1.0).contains(&self.min)
            && self.min <= self.max
            && self.max <= 1.0;
        if ok {
            Ok(())
        } else {
            Err(Error::config("hysteresis", format!("{self:?}")))
        }
    }
}

/// The controller's running state: the signal's window and the current quantile level.
#[derive(Debug, Clone, Default)]
pub struct HysteresisState {
    signal: VecDeque<f32>,
    level: Option<f32>,
}

impl HysteresisState {
    /// The current fire quantile level (`start` clamped before the first update).
    pub fn level(&self, h: &Hysteresis, start: f32) -> f32 {
        self.level.unwrap_or(start).clamp(h.min, h.max)
    }

    /// Records one step's signal and moves the level.
    pub fn update(&mut self, h: &Hysteresis, start: f32, signal: f32) {
        if self.signal.len() == h.window {
            self.signal.pop_front();
        }
        self.signal.push_back(signal);
        let level = self.level(h, start);
        let n = self.signal.len();
        // Rising: the last steps' mean is above the window's by more than two standard errors of
        // a mean of `last` samples (a one-sided z-test at ~2.5%), so noise alone rarely counts.
        let rising = n > h.last && {
            let all: Vec<f64> = self.signal.iter().map(|&x| x as f64).collect();
            let mean = all.iter().sum::<f64>() / n as f64;
            let var = all.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
            let recent = all[n - h.last..].iter().sum::<f64>() / h.last as f64;
            recent > mean + 2.0 * (var / h.last as f64).sqrt() + 1e-12 * mean.abs()
        };
        let next = if rising { level - h.down } else { level + h.up };
        self.level = Some(next.clamp(h.min, h.max));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_variance_matches_the_definition() {
        // Two channels: [0, 2, 4] (variance 8/3) and a constant (0).
        let keys = [0.0, 1.0, 2.0, 1.0, 4.0, 1.0];
        let v = key_variance(&keys, 2).unwrap();
        assert!((v - (8.0 / 3.0) / 2.0).abs() < 1e-6, "{v}");
        assert_eq!(key_variance(&keys[..2], 2).unwrap(), 0.0);
        assert!(key_variance(&keys[..3], 2).is_err());
        assert!(key_variance(&[1.0, f32::NAN], 1).is_err());
    }

    #[test]
    fn attacks_fast_relaxes_slowly_and_stays_clamped() {
        let h = Hysteresis::default();
        h.validate().unwrap();
        let mut s = HysteresisState::default();
        let start = 0.915;
        for _ in 0..50 {
            s.update(&h, start, 1.0);
        }
        // Flat signal: relaxes by +0.01 per step up to the clamp.
        assert!((s.level(&h, start) - 0.95).abs() < 1e-6);
        // A rising signal: -0.05 per step, down to 0.5 and no further.
        for i in 0..20 {
            s.update(&h, start, 2.0 + i as f32);
        }
        assert!((s.level(&h, start) - 0.5).abs() < 1e-6);
        // Calm again: back up slowly.
        for _ in 0..60 {
            s.update(&h, start, 0.1);
        }
        let l = s.level(&h, start);
        assert!(l > 0.5 && l <= 0.95, "{l}");
        assert!(Hysteresis {
            last: 0,
            ..Hysteresis::default()
        }
        .validate()
        .is_err());
    }
}
