//! Quantisation throughput: one page (32 tokens x 8 kv heads x d128) of f32 keys and values into
//! the packed warm format, per bit width, with min/max value ranges and with fitted ones
//! (`value_fit`). Throughput counts the f32 input bytes.

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
    for (bits, fit) in [
        (Bits::B8, false),
        (Bits::B4, false),
        (Bits::B2, false),
        (Bits::B4, true),
        (Bits::B2, true),
    ] {
        let layout = WarmLayout::new(ps, d, bits, bits, 32).with_value_fit(fit);
        let mut block = vec![0u8; layout.head_bytes];
        let name = if fit { "page_k+v_fit" } else { "page_k+v" };
        g.bench_with_input(BenchmarkId::new(name, bits.bits()), &bits, |b, _| {
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
