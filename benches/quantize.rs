//! Quantisation throughput: one page (32 tokens x 8 kv heads x d128) of f32 keys and values into
//! the packed warm format, per bit width. Throughput counts the f32 input bytes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvtier::quant::{quantize_keys, quantize_values, WarmLayout};
use kvtier::Bits;

fn quantize(c: &mut Criterion) {
    let (ps, kvh, d) = (32, 8, 128);
    let data: Vec<f32> = (0..ps * d)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut g = c.benchmark_group("quantize");
    g.throughput(Throughput::Bytes((2 * ps * kvh * d * 4) as u64));
    for bits in [Bits::B8, Bits::B4, Bits::B2] {
        let layout = WarmLayout::new(ps, d, bits, bits, 32);
        let mut block = vec![0u8; layout.head_bytes];
        g.bench_with_input(BenchmarkId::new("page_k+v", bits.bits()), &bits, |b, _| {
            b.iter(|| {
                for _ in 0..kvh {
                    assert!(quantize_keys(&data, ps, &layout, &mut block));
                    assert!(quantize_values(&data, ps, &layout, &mut block));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, quantize);
criterion_main!(benches);
