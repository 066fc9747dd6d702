//! CPU decode attention: one query token over a 4K / 32K / (128K) token sequence in one layer,
//! hot-only (f16 pages) and warm int8 / int4 / int2, per CPU kernel path and thread count.
//! Throughput is the cache's device bytes (what one step must read), each beside a read of the same
//! bytes (`read/..`), so GB/s compares with the roofline for that working-set size.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvtier::{Bits, CacheConfig, CpuKernel, PageSelection, Rotation, Rows, Scratch};

/// The grid of issue 15: both shapes, f16 / int8 / int4 / int2, 1 and 2 threads, every CPU kernel
/// path this machine runs (portable excepted: it is the slow oracle), each beside a read of the
/// same number of bytes with the same threads (`read/<bytes>/t<n>`), so the table can report the
/// fraction of the read bandwidth for that working-set size. 4K and 32K tokens by default;
/// `KVTIER_BENCH_FULL=1` adds 128K (beyond L3 for every mode) — scripts/cpu-table.sh does that.
fn decode(c: &mut Criterion) {
    let full = std::env::var_os("KVTIER_BENCH_FULL").is_some();
    let shapes = [("llama3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)];
    let sizes: &[usize] = if full {
        &[4096, 32768, 131072]
    } else {
        &[4096, 32768]
    };
    let paths: Vec<CpuKernel> = CpuKernel::ALL
        .into_iter()
        .filter(|k| k.available() && *k != CpuKernel::Portable)
        .collect();
    let mut g = c.benchmark_group("decode");
    g.sample_size(10);
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.measurement_time(std::time::Duration::from_secs(2));
    for (shape, qh, kvh, d) in shapes {
        for &tokens in sizes {
            for (mode, kb, vb) in [
                ("f16", None, None),
                ("int8", Some(Bits::B8), Some(Bits::B8)),
                ("int4", Some(Bits::B4), Some(Bits::B4)),
                ("int2", Some(Bits::B2), Some(Bits::B2)),
            ] {
                for threads in [1usize, 2] {
                    let mut bytes = 0;
                    for &path in &paths {
                        let mut b = CacheConfig::builder(1, qh, kvh, d)
                            .threads(Some(threads))
                            .cpu_kernel(path);
                        b = match (kb, vb) {
                            (Some(k), Some(v)) => b.k_bits(k).v_bits(v),
                            _ => b.full_precision(),
                        };
                        let (cache, s, q) = common::filled(b, tokens);
                        bytes = cache.memory_report().device_bytes();
                        g.throughput(Throughput::Bytes(bytes as u64));
                        g.bench_with_input(
                            BenchmarkId::new(
                                format!("{shape}/{mode}/{}/t{threads}", path.name()),
                                tokens,
                            ),
                            &tokens,
                            |bch, _| bch.iter(|| cache.attend(0, &[s], &q).expect("attend")),
                        );
                    }
                    read_bench(&mut g, bytes, threads);
                }
            }
        }
    }
    g.finish();
}

/// The read roofline for `bytes` of working set on `threads` threads: sum a buffer of that size
/// (as `benches/bandwidth.rs`), in a pool of that size.
fn read_bench(
    g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    bytes: usize,
    threads: usize,
) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(format!("read/{bytes}/t{threads}"), |bch| {
        bch.iter(|| pool.install(|| common::read_sum(std::hint::black_box(&buf), 1 << 14)))
    });
}

/// Prefill over cached pages: 256 new tokens (causal among themselves) attending 32K cached int4
/// tokens, 2 threads, per CPU path; the cache is truncated back after each timed call.
fn prefill(c: &mut Criterion) {
    let mut g = c.benchmark_group("prefill");
    g.sample_size(10);
    let new = 256;
    for (shape, qh, kvh, d) in [("llama3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)] {
        for path in CpuKernel::ALL
            .into_iter()
            .filter(|k| k.available() && *k != CpuKernel::Portable)
        {
            let b = CacheConfig::builder(1, qh, kvh, d)
                .threads(Some(2))
                .cpu_kernel(path);
            let (mut cache, s, _) = common::filled(b, 32768);
            let mut rng = common::Rng(7);
            let mut rows = |n: usize| (0..n).map(|_| rng.f32()).collect::<Vec<f32>>();
            let (q, k, v) = (rows(new * qh * d), rows(new * kvh * d), rows(new * kvh * d));
            g.throughput(Throughput::Elements(new as u64));
            g.bench_function(format!("{shape}/int4/{}/32768+{new}", path.name()), |bch| {
                bch.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        let t = std::time::Instant::now();
                        std::hint::black_box(cache.prefill(s, 0, &q, &k, &v).expect("prefill"));
                        total += t.elapsed();
                        cache.truncate(s, 32768).expect("truncate");
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

/// Decode with and without the Hadamard rotation of keys and values (issue 13's speed goal: within
/// 5%): the rotated call also rotates the query and rotates the output back. int3 (its portable
/// unpack) beside int4 and int2. 4K tokens, both shapes.
fn rotation(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_rotation");
    g.sample_size(30);
    for (shape, qh, kvh, d) in [("llama3-8b", 32, 8, 128), ("smollm2", 9, 3, 64)] {
        for (mode, kb, vb) in [
            ("k4v2", Bits::B4, Bits::B2),
            ("k2v2", Bits::B2, Bits::B2),
            ("k3v3", Bits::B3, Bits::B3),
        ] {
            if mode == "k4v2" {
                // The per-step work rotation adds: the query forward, the output back (and one
                // token's key and value at append, the same size as one query head group).
                let r = kvtier::quant::Rotator::new(Rotation::KeysValues, 1, d, 1);
                let mut x = vec![0.5f32; qh * d];
                g.bench_function(format!("{shape}/rotate_q_and_output"), |bch| {
                    bch.iter(|| {
                        r.forward(0, &mut x);
                        r.inverse(0, &mut x);
                    })
                });
            }
            for rot in [Rotation::None, Rotation::KeysValues] {
                let b = CacheConfig::builder(1, qh, kvh, d)
                    .k_bits(kb)
                    .v_bits(vb)
                    .rotation(rot);
                let (cache, s, q) = common::filled(b, 4096);
                g.bench_with_input(
                    BenchmarkId::new(format!("{shape}/{mode}/{rot:?}"), 4096),
                    &4096,
                    |bch, _| bch.iter(|| cache.attend(0, &[s], &q).expect("attend")),
                );
            }
        }
    }
    g.finish();
}

/// Decode over every page vs over a 50% page selection (a different random half per kv head), the
/// cost an eliminator's selection saves. 32/8/128, 32K tokens, f16 hot-only and int4 warm.
fn selection(c: &mut Criterion) {
    let (qh, kvh, d, tokens) = (32, 8, 128, 32768);
    let mut g = c.benchmark_group("decode_selection");
    g.sample_size(20);
    for (mode, b) in [
        ("f16", CacheConfig::builder(1, qh, kvh, d).full_precision()),
        ("int4", CacheConfig::builder(1, qh, kvh, d)),
    ] {
        let (cache, s, q) = common::filled(b, tokens);
        let n_pages = cache.page_table(s, 0).expect("table").pages().len();
        let mut sel = PageSelection::none(1, kvh);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for kv in 0..kvh {
            let mut pages: Vec<u32> = (0..n_pages as u32).collect();
            // Fisher-Yates with a fixed xorshift: the same half every run.
            for i in (1..pages.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                pages.swap(i, (x % (i as u64 + 1)) as usize);
            }
            pages.truncate(n_pages / 2);
            sel.set(0, kv, pages).expect("selection");
        }
        let mut scratch = Scratch::default();
        g.bench_function(BenchmarkId::new(format!("{mode}/all"), tokens), |bch| {
            bch.iter(|| {
                cache
                    .attend_with(&mut scratch, 0, &[s], Rows::F32(&q), None)
                    .expect("attend")
            })
        });
        g.bench_function(BenchmarkId::new(format!("{mode}/half"), tokens), |bch| {
            bch.iter(|| {
                cache
                    .attend_with(&mut scratch, 0, &[s], Rows::F32(&q), Some(&sel))
                    .expect("attend")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode, prefill, selection, rotation);
criterion_main!(benches);
