//! CPU decode attention: one query token over a 4K / 32K-token sequence in one layer, hot-only
//! (f16 pages) vs warm int4 vs warm int2. Throughput is the cache's device bytes (what one step
//! must read), so criterion's GB/s compares directly with the `bandwidth` bench.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvtier::{Bits, CacheConfig};

fn decode(c: &mut Criterion) {
    let shapes = [("llama3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)];
    let mut g = c.benchmark_group("decode");
    g.sample_size(20);
    for (shape, qh, kvh, d) in shapes {
        for tokens in [4096usize, 32768] {
            for (mode, b) in [
                ("f16", CacheConfig::builder(1, qh, kvh, d).full_precision()),
                ("int4", CacheConfig::builder(1, qh, kvh, d)),
                (
                    "int2",
                    CacheConfig::builder(1, qh, kvh, d)
                        .k_bits(Bits::B2)
                        .v_bits(Bits::B2),
                ),
            ] {
                let (cache, s, q) = common::filled(b, tokens);
                let bytes = cache.memory_report().device_bytes();
                g.throughput(Throughput::Bytes(bytes as u64));
                g.bench_with_input(
                    BenchmarkId::new(format!("{shape}/{mode}"), tokens),
                    &tokens,
                    |bch, _| bch.iter(|| cache.attend(0, &[s], &q).expect("attend")),
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
