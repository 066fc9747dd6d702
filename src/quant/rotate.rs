//! Seeded orthogonal rotation of keys, queries and (optionally) values before quantisation.
//!
//! Owns: [`Rotation`] (which vectors are rotated), [`Rotator`] (the per-layer sign vectors and the
//! transform). The transform of one head vector `x` (length `head_dim`) is block-diagonal: each
//! block of `b` channels (`b` the largest power of two dividing `head_dim`, so 64 or 128 for real
//! models and at least 32 by the config's invariants) becomes `H_b · diag(s) · x / sqrt(b)`, with
//! `H_b` the Walsh-Hadamard matrix and `s` a ±1 vector drawn per layer from the seed. That matrix
//! `R` is orthogonal (`Rᵀ R = I`), so `(R q)·(R k) = q·k`: scores are unchanged in exact
//! arithmetic, while an outlier channel's energy is spread over the whole block, so per-channel
//! and per-group ranges shrink and quantisation steps with them (QuaRot, llama.cpp's K-cache
//! rotation). Values rotated the same way give a rotated output `R o`, undone with `Rᵀ`.
//!
//! The cache applies it (keys and values at append, queries before attention, `Rᵀ` on the output),
//! so every backend stores and attends rotated vectors with its unchanged kernels and engines see
//! model-space vectors only. Must never: change the meaning of a stored page after the fact (the
//! sign vectors depend only on the seed and the layer, so exported pages stay valid for any cache
//! with the same config).

use crate::error::{Error, Result};

/// Which vectors a cache rotates before storing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Rotation {
    /// Nothing is rotated.
    #[default]
    None,
    /// Keys (and so queries) are rotated; values are stored as given.
    Keys,
    /// Keys, queries and values are rotated; the attention output is rotated back.
    KeysValues,
}

impl Rotation {
    /// True when keys (and queries) are rotated.
    pub const fn keys(self) -> bool {
        !matches!(self, Rotation::None)
    }
    /// True when values (and the output) are rotated.
    pub const fn values(self) -> bool {
        matches!(self, Rotation::KeysValues)
    }
    /// Parses `none`, `keys` or `kv`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" | "off" => Ok(Rotation::None),
            "keys" | "k" => Ok(Rotation::Keys),
            "kv" | "keys-values" => Ok(Rotation::KeysValues),
            other => Err(Error::config(
                "rotation",
                format!("`{other}` is not one of none, keys, kv"),
            )),
        }
    }
}

/// The rotation of one cache: a sign vector per layer, and the block size.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotator {
    head_dim: usize,
    block: usize,
    /// `[num_layers][head_dim]` of ±1.
    signs: Vec<f32>,
    mode: Rotation,
}

/// The largest power of two dividing `d` (the Hadamard block size).
pub fn block_size(d: usize) -> usize {
    1 << d.trailing_zeros()
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// In-place fast Walsh-Hadamard transform of a power-of-two length slice (unnormalised).
#[inline]
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            let (a, b) = x[i..i + 2 * h].split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*u, *v);
                *u = p + q;
                *v = p - q;
            }
        }
        h *= 2;
    }
}

impl Rotator {
    /// The rotation of a cache with `num_layers` layers of `head_dim` channels, from `seed`.
    pub fn new(mode: Rotation, num_layers: usize, head_dim: usize, seed: u64) -> Self {
        let mut signs = Vec::with_capacity(if mode.keys() {
            num_layers * head_dim
        } else {
            0
        });
        if mode.keys() {
            for layer in 0..num_layers {
                let mut st = seed ^ (layer as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
                let mut bits = 0u64;
                for c in 0..head_dim {
                    if c % 64 == 0 {
                        bits = splitmix(&mut st);
                    }
                    signs.push(if (bits >> (c % 64)) & 1 == 1 {
                        -1.0
                    } else {
                        1.0
                    });
                }
            }
        }
        Rotator {
            head_dim,
            block: block_size(head_dim),
            signs,
            mode,
        }
    }

    /// Which vectors are rotated.
    pub fn mode(&self) -> Rotation {
        self.mode
    }

    /// The Hadamard block size.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The ±1 sign vector of `layer` (`head_dim` entries; empty when nothing is rotated).
    pub fn signs(&self, layer: usize) -> &[f32] {
        let d = self.head_dim;
        self.signs.get(layer * d..(layer + 1) * d).unwrap_or(&[])
    }

    /// `1 / sqrt(block)`, the transform's normalisation.
    pub fn norm(&self) -> f32 {
        1.0 / (self.block as f32).sqrt()
    }

    /// `x ← R x` for every head vector in `x` (a multiple of `head_dim` long).
    pub fn forward(&self, layer: usize, x: &mut [f32]) {
        forward_with(self.signs(layer), self.norm(), self.head_dim, x);
    }

    /// `x ← Rᵀ x` for every head vector in `x`.
    pub fn inverse(&self, layer: usize, x: &mut [f32]) {
        inverse_with(self.signs(layer), self.norm(), self.head_dim, x);
    }
}

/// [`Rotator::forward`] from a layer's `signs` and `norm` (as [`crate::backend::DeviceRotation`]
/// carries them); empty `signs`: no rotation.
pub(crate) fn forward_with(signs: &[f32], norm: f32, head_dim: usize, x: &mut [f32]) {
    if signs.is_empty() {
        return;
    }
    let block = block_size(head_dim);
    for row in x.chunks_exact_mut(head_dim) {
        for (v, &sg) in row.iter_mut().zip(signs) {
            *v *= sg;
        }
        for blk in row.chunks_exact_mut(block) {
            fwht(blk);
            for v in blk.iter_mut() {
                *v *= norm;
            }
        }
    }
}

/// [`Rotator::inverse`] from a layer's `signs` and `norm`.
pub(crate) fn inverse_with(signs: &[f32], norm: f32, head_dim: usize, x: &mut [f32]) {
    if signs.is_empty() {
        return;
    }
    let block = block_size(head_dim);
    for row in x.chunks_exact_mut(head_dim) {
        for blk in row.chunks_exact_mut(block) {
            fwht(blk);
        }
        for (v, &sg) in row.iter_mut().zip(signs) {
            *v *= sg * norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| (splitmix(&mut s) >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    #[test]
    fn orthogonal_and_score_preserving() {
        for d in [32, 64, 96, 128, 160] {
            let r = Rotator::new(Rotation::KeysValues, 3, d, 7);
            assert_eq!(r.block(), block_size(d));
            let q = pseudo(2 * d, 1);
            let k = pseudo(2 * d, 2);
            let (mut rq, mut rk) = (q.clone(), k.clone());
            r.forward(2, &mut rq);
            r.forward(2, &mut rk);
            for h in 0..2 {
                let dot = |a: &[f32], b: &[f32]| -> f32 {
                    a[h * d..(h + 1) * d]
                        .iter()
                        .zip(&b[h * d..(h + 1) * d])
                        .map(|(x, y)| x * y)
                        .sum()
                };
                assert!((dot(&q, &k) - dot(&rq, &rk)).abs() < 1e-4 * d as f32);
                assert!((dot(&q, &q) - dot(&rq, &rq)).abs() < 1e-4 * d as f32);
            }
            r.inverse(2, &mut rq);
            for (a, b) in q.iter().zip(&rq) {
                assert!((a - b).abs() < 1e-5, "d {d}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn spreads_an_outlier_and_layers_differ() {
        let r = Rotator::new(Rotation::Keys, 2, 64, 1);
        let mut x = vec![0.0; 64];
        x[5] = 8.0;
        r.forward(0, &mut x);
        assert!(x.iter().all(|v| (v.abs() - 1.0).abs() < 1e-6));
        assert_ne!(r.signs(0), r.signs(1));
        let none = Rotator::new(Rotation::None, 2, 64, 1);
        let mut y = vec![3.0; 64];
        none.forward(1, &mut y);
        assert!(y.iter().all(|&v| v == 3.0));
        assert_eq!(Rotation::parse("kv").unwrap(), Rotation::KeysValues);
        assert!(Rotation::parse("x").is_err());
    }
}
