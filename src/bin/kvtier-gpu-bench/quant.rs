//! `--quant`: what the quantisation-quality options cost at decode on the GPU, through the cache
//! (`KvCache::attend_device`, device queries and output): int4 with and without the Hadamard
//! rotation of keys and values (the queries rotated on the device, the output rotated back), and
//! int3 (k3v3) and int4 with 4 key outlier channels, which run on the CUDA-core path, against int4
//! on tensor cores. Wall time per call (the call synchronises), median of `--iters` after warm-up,
//! L2 not flushed; the variants of one row are interleaved call by call.

use cudarc::driver::{CudaContext, DevicePtr};
use kvtier::backend::cuda::{CudaBuffers, CudaDevice};
use kvtier::{
    Bits, CacheConfig, Device, DeviceBuffers, HotDtype, InputDtype, KvCache, Rotation, Scratch,
    SeqId,
};
use std::fmt::Write as _;
use std::time::Instant;

struct Variant {
    name: &'static str,
    cache: KvCache,
    seqs: Vec<SeqId>,
}

fn filled(dev: &CudaDevice, cfg: CacheConfig, batch: usize, len: usize) -> (KvCache, Vec<SeqId>) {
    let mut cache = KvCache::with_device(cfg, Device::Cuda(dev.clone())).expect("cache");
    let row = cache.config().num_kv_heads * cache.config().head_dim;
    let mut next = super::uniform();
    let chunk = 1024;
    let (mut k, mut v) = (vec![0f32; chunk * row], vec![0f32; chunk * row]);
    let mut seqs = Vec::with_capacity(batch);
    for _ in 0..batch {
        let s = cache.add_sequence();
        let mut at = 0;
        while at < len {
            let n = chunk.min(len - at);
            for (i, (kx, vx)) in k[..n * row].iter_mut().zip(&mut v[..n * row]).enumerate() {
                *kx = if (i % row).is_multiple_of(37) {
                    8.0
                } else {
                    1.0
                } * next();
                *vx = next();
            }
            cache
                .append(s, 0, &k[..n * row], &v[..n * row])
                .expect("append");
            at += n;
        }
        seqs.push(s);
    }
    (cache, seqs)
}

/// Runs the table; returns JSON rows.
pub fn quant_bench(dev: &CudaDevice, iters: usize, batches: &[usize], seqs: &[usize]) -> String {
    let ctx = CudaContext::new(0).expect("context");
    let user = ctx.new_stream().expect("stream");
    let mut json = String::new();
    println!(
        "\n{:>12} {:>2} {:>7} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
        "shape",
        "B",
        "S",
        "int4 ms",
        "rkv ms",
        "k3v3 ms",
        "o4 ms",
        "rkv/int4",
        "k3v3/int4",
        "o4/int4"
    );
    for (q, kv, d) in [(32usize, 8usize, 128usize), (9, 3, 64)] {
        for &b in batches {
            for &s in seqs {
                let base = || {
                    CacheConfig::builder(1, q, kv, d)
                        .hot_dtype(HotDtype::BF16)
                        .max_seq_len(s + 1)
                };
                let cfgs: [(&'static str, CacheConfig); 4] = [
                    ("int4", base().build().expect("cfg")),
                    (
                        "int4-rkv",
                        base().rotation(Rotation::KeysValues).build().expect("cfg"),
                    ),
                    (
                        "k3v3",
                        base()
                            .k_bits(Bits::B3)
                            .v_bits(Bits::B3)
                            .build()
                            .expect("cfg"),
                    ),
                    ("int4-o4", base().key_outliers(4).build().expect("cfg")),
                ];
                let variants: Vec<Variant> = cfgs
                    .into_iter()
                    .map(|(name, cfg)| {
                        let (cache, seqs) = filled(dev, cfg, b, s);
                        Variant { name, cache, seqs }
                    })
                    .collect();
                let n = b * q * d;
                let qh: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                let qd = user.clone_htod(&qh).expect("htod");
                let od = user.alloc_zeros::<f32>(n).expect("alloc");
                let (qp, _qg) = qd.device_ptr(&user);
                let (op, _og) = od.device_ptr(&user);
                let bufs = DeviceBuffers::Cuda(CudaBuffers {
                    queries: qp,
                    query_dtype: InputDtype::F32,
                    output: op,
                    stream: user.cu_stream() as u64,
                });
                let mut scratch: Vec<Scratch> =
                    variants.iter().map(|_| Scratch::default()).collect();
                let mut times = vec![Vec::with_capacity(iters); variants.len()];
                for it in 0..iters + 5 {
                    for (i, v) in variants.iter().enumerate() {
                        let t = Instant::now();
                        v.cache
                            .attend_device_with(&mut scratch[i], 0, &v.seqs, &bufs, None)
                            .expect("attend_device");
                        if it >= 5 {
                            times[i].push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                }
                let med: Vec<f64> = times
                    .into_iter()
                    .map(|mut t| {
                        t.sort_by(|a, b| a.total_cmp(b));
                        t[t.len() / 2]
                    })
                    .collect();
                println!(
                    "{:>12} {:>2} {:>7} | {:>9.4} {:>9.4} {:>9.4} {:>9.4} | {:>9.3} {:>9.3} {:>9.3}",
                    format!("{q}/{kv}/{d}"),
                    b,
                    s,
                    med[0],
                    med[1],
                    med[2],
                    med[3],
                    med[1] / med[0],
                    med[2] / med[0],
                    med[3] / med[0]
                );
                for (v, m) in variants.iter().zip(&med) {
                    if !json.is_empty() {
                        json.push(',');
                    }
                    let _ = write!(
                        json,
                        "{{\"shape\":\"{q}/{kv}/{d}\",\"batch\":{b},\"seq\":{s},\"mode\":\"{}\",\"ms\":{m:.5},\"x_int4\":{:.4}}}",
                        v.name,
                        m / med[0]
                    );
                }
            }
        }
    }
    json
}
