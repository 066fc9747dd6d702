//! The healing loop's page moves on the SmolLM2 shape (30 layers, 9 q / 3 kv heads, d64, f16
//! hot pages, k2v2 warm pages, 2048 tokens): one firing (4 pages per layer promoted exactly from
//! the archive) and their release (back to k2v2), the cost `kvtier eval ~heal:4` times per firing.

use criterion::{criterion_group, criterion_main, Criterion};
use kvtier::monitor::Healer;
use kvtier::protect::{heal_sequence, release_sequence};
use kvtier::{Bits, CacheConfig, HotDtype, KvCache};

fn heal(c: &mut Criterion) {
    let (layers, qh, kvh, d, n) = (30, 9, 3, 64, 2048);
    let cfg = CacheConfig::builder(layers, qh, kvh, d)
        .hot_dtype(HotDtype::F16)
        .k_bits(Bits::B2)
        .v_bits(Bits::B2)
        .build()
        .unwrap();
    let mut cache = KvCache::new(cfg).unwrap();
    let seq = cache.add_sequence();
    let mut s = 0x2545_f491u32;
    let kv: Vec<f32> = (0..n * kvh * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect();
    for l in 0..layers {
        cache.append(seq, l, &kv, &kv).unwrap();
    }
    let healer = Healer::default();
    let mut healed = Vec::new();
    c.bench_function("heal/promote_and_release_4_pages_x30_layers", |b| {
        b.iter(|| {
            let (p, _) = heal_sequence(&mut cache, seq, &healer, &mut healed).unwrap();
            assert_eq!(p, 4 * layers);
            assert_eq!(
                release_sequence(&mut cache, seq, &healer, &mut healed).unwrap(),
                4 * layers
            );
        })
    });
}

criterion_group!(benches, heal);
criterion_main!(benches);
