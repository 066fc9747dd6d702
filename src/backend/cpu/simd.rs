//! Vector-friendly f32 loops for the CPU kernels.
//!
//! Written as fixed-width lane arrays so LLVM emits packed instructions; the `FMA` parameter picks
//! fused multiply-add, which is only correct to request inside a function compiled with the `fma`
//! target feature (otherwise `mul_add` is a slow libm call).

const LANES: usize = 16;

#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `Σ a[i] * b[i]`; lengths are equal multiples of 16 (head_dim is a multiple of 32).
#[inline(always)]
pub fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = fmadd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut s = 0.0;
    for v in acc {
        s += v;
    }
    s
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yc, xc) in y.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        for i in 0..LANES {
            yc[i] = fmadd::<FMA>(a, xc[i], yc[i]);
        }
    }
}

/// `y *= a`.
#[inline(always)]
pub fn scale(y: &mut [f32], a: f32) {
    for v in y {
        *v *= a;
    }
}

/// `Σ x`.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s: f32 = chunks.remainder().iter().sum();
    for v in acc {
        s += v;
    }
    s
}
