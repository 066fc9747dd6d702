//! This machine's memory read bandwidth, the roofline for decode attention: sum a buffer with all
//! rayon threads. Two sizes: 1 GiB (DRAM) and 32 MiB (close to a 32K-token int4 layer, which on a
//! machine with a large L3 is cache resident when benchmarked in a loop).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;

fn read_sum(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0u64; 8];
            for w in c.chunks_exact(8) {
                for i in 0..8 {
                    acc[i] = acc[i].wrapping_add(w[i]);
                }
            }
            acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
        })
        .reduce(|| 0, u64::wrapping_add)
}

fn bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(20);
    for (name, bytes) in [("dram_1GiB", 1usize << 30), ("l3_32MiB", 32 << 20)] {
        let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new("read", name), &buf, |b, buf| {
            b.iter(|| read_sum(std::hint::black_box(buf)))
        });
    }
    g.finish();
}

criterion_group!(benches, bandwidth);
criterion_main!(benches);
