//! This machine's memory read bandwidth, the roofline for decode attention: sum a buffer with all
//! rayon threads. Two sizes: 1 GiB (DRAM) and 32 MiB (close to a 32K-token int4 layer, which on a
//! machine with a large L3 is cache resident when benchmarked in a loop).

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(20);
    for (name, bytes) in [("dram_1GiB", 1usize << 30), ("l3_32MiB", 32 << 20)] {
        let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new("read", name), &buf, |b, buf| {
            b.iter(|| common::read_sum(std::hint::black_box(buf), 1 << 16))
        });
    }
    g.finish();
}

/// FMA instruction rate on registers only, 256-bit vs 512-bit (x86-64 with AVX-512F): whether this
/// core issues a zmm FMA as fast as a ymm one (Intel cores with two 512-bit ports) or at half the
/// rate (Zen 4, which splits 512-bit operations). Throughput counts FMA instructions.
fn fma_rate(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("fma")
        {
            eprintln!("fma_rate: skipped (no AVX-512F/FMA here)");
            return;
        }
        const N: usize = 1 << 20;
        #[target_feature(enable = "avx2,fma")]
        unsafe fn ymm(n: usize) -> f32 {
            let mut a = [_mm256_set1_ps(1.0); 10];
            let (b, k) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            for _ in 0..n {
                for x in a.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, b, k);
                }
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(
                out.as_mut_ptr(),
                a.iter()
                    .fold(_mm256_setzero_ps(), |s, x| _mm256_add_ps(s, *x)),
            );
            out.iter().sum()
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn zmm(n: usize) -> f32 {
            let mut a = [_mm512_set1_ps(1.0); 10];
            let (b, k) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..n {
                for x in a.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, b, k);
                }
            }
            _mm512_reduce_add_ps(
                a.iter()
                    .fold(_mm512_setzero_ps(), |s, x| _mm512_add_ps(s, *x)),
            )
        }
        let mut g = c.benchmark_group("fma_rate");
        g.sample_size(10);
        g.throughput(Throughput::Elements((10 * N) as u64));
        // SAFETY: avx512f and fma (which implies the AVX2 FMA form) were detected above.
        g.bench_function("ymm", |b| {
            b.iter(|| unsafe { ymm(std::hint::black_box(N)) })
        });
        // SAFETY: as above.
        g.bench_function("zmm", |b| {
            b.iter(|| unsafe { zmm(std::hint::black_box(N)) })
        });
        g.finish();
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
}

criterion_group!(benches, bandwidth, fma_rate);
criterion_main!(benches);
