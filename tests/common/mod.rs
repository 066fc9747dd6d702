//! Shared test helpers: deterministic data and a naive f64 attention reference.
#![allow(dead_code)]

/// Deterministic pseudo-random f32 in [-1, 1) (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * amp).collect()
    }
}

/// Reference result: output `[qh, d]`, per head (entropy, varentropy, max score), per head per
/// token probabilities.
pub type Reference = (Vec<f32>, Vec<(f64, f64, f64)>, Vec<Vec<f64>>);

/// Reference attention of one query token over `len` tokens (`keys`/`values` `[len, kvh, d]`,
/// `q` `[qh, d]`). Returns (output `[qh, d]`, per head (entropy, varentropy, max score),
/// per head per token probabilities `[qh][len]`).
pub fn naive(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    len: usize,
    qh: usize,
    kvh: usize,
    d: usize,
) -> Reference {
    let g = qh / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; qh * d];
    let mut stats = Vec::new();
    let mut probs = Vec::new();
    for h in 0..qh {
        let kv = h / g;
        let s: Vec<f64> = (0..len)
            .map(|t| {
                (0..d)
                    .map(|c| q[h * d + c] as f64 * keys[(t * kvh + kv) * d + c] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
        let ent: f64 = -p
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p * p.ln())
            .sum::<f64>();
        let var: f64 = p
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| p * (-p.ln() - ent).powi(2))
            .sum();
        for c in 0..d {
            out[h * d + c] = (0..len)
                .map(|t| p[t] * values[(t * kvh + kv) * d + c] as f64)
                .sum::<f64>() as f32;
        }
        stats.push((ent, var, m));
        probs.push(p);
    }
    (out, stats, probs)
}

/// Largest |a - b| over two equally long slices.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The CPU oracle's config: the f32-score path (AVX2, or portable), never AVX-512's integer key
/// scores, whose bounded extra error is not what other backends are held to.
pub fn oracle(cfg: &kvtier::CacheConfig) -> kvtier::CacheConfig {
    let mut c = cfg.clone();
    c.cpu_kernel = if kvtier::CpuKernel::Avx2.available() {
        kvtier::CpuKernel::Avx2
    } else {
        kvtier::CpuKernel::Portable
    };
    c
}
