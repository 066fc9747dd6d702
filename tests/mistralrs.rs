//! The mistral.rs adapter driven as an engine drives `CompressedKVCache`: prefill (the engine runs
//! its own attention over the returned K/V) then decode steps (kvtier's fused attention), GQA
//! 9 q / 3 kv heads, f16 and f32 tensors, batch 2; checked against kvtier's own API and, with a
//! full-precision config, against plain attention over the original tokens.

mod common;
use candle_core::{DType, Device, Tensor};
use common::Rng;
use kvtier::adapter::mistralrs::MistralRsCache;
use kvtier::{CacheConfig, KvCache};
use mistralrs_kv_cache::{AttendConfig, CompressedKVCache, DecodeOutput};

const QH: usize = 9;
const KVH: usize = 3;
const D: usize = 64;

/// `[b, heads, n, d]` of deterministic values, and the same values as `[b][n][heads][d]` rows.
fn tensor(rng: &mut Rng, b: usize, heads: usize, n: usize, dtype: DType) -> (Tensor, Vec<f32>) {
    let x = rng.vec(b * heads * n * D, 1.0);
    let t = Tensor::from_vec(x, (b, heads, n, D), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let rows = t
        .to_dtype(DType::F32)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (t, rows)
}

fn cfg(warm: bool) -> CacheConfig {
    let b = CacheConfig::builder(2, QH, KVH, D).hot_window(32);
    if warm { b } else { b.full_precision() }.build().unwrap()
}

fn fused(o: DecodeOutput) -> Tensor {
    match o {
        DecodeOutput::Fused(t) => t,
        DecodeOutput::Dequantized(_) => panic!("kvtier computes decode attention itself"),
    }
}

#[test]
fn prefill_then_decode_as_an_engine_does() {
    let (b, prompt, steps) = (2, 150, 20);
    let mut rng = Rng(42);
    let adapter = MistralRsCache::new(cfg(true)).unwrap();
    let mut direct = KvCache::new(cfg(true)).unwrap();
    let seqs = [direct.add_sequence(), direct.add_sequence()];
    let row = prompt * KVH * D;
    let attn = AttendConfig {
        softmax_scale: 1.0 / (D as f32).sqrt(),
        n_kv_groups: QH / KVH,
    };
    for layer in 0..2 {
        let (k, kr) = tensor(&mut rng, b, KVH, prompt, DType::F16);
        let (v, vr) = tensor(&mut rng, b, KVH, prompt, DType::F16);
        let (q, _) = tensor(&mut rng, b, QH, prompt, DType::F16);
        let out = adapter.prefill(layer, &k, &v, &q).unwrap();
        assert_eq!(out.k.dims(), &[b, KVH, prompt, D]);
        assert_eq!(out.k.dtype(), DType::F16);
        assert!(out.logit_bias.is_none());
        for (i, s) in seqs.iter().enumerate() {
            direct
                .append(
                    *s,
                    layer,
                    &kr[i * row..(i + 1) * row],
                    &vr[i * row..(i + 1) * row],
                )
                .unwrap();
            // What the engine attends over is what the cache holds (hot exact, warm dequantised).
            let (dk, _) = direct.read_tokens(*s, layer).unwrap();
            let got = out
                .k
                .get(i)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want: Vec<f32> = dk
                .iter()
                .map(|x| half::f16::from_f32(*x).to_f32())
                .collect();
            assert_eq!(got, want, "layer {layer} row {i}");
        }
    }
    assert_eq!(adapter.seq_len(0), prompt);
    for _ in 0..steps {
        for layer in 0..2 {
            let (k, kr) = tensor(&mut rng, b, KVH, 1, DType::F32);
            let (v, vr) = tensor(&mut rng, b, KVH, 1, DType::F32);
            let (q, qr) = tensor(&mut rng, b, QH, 1, DType::F32);
            let got = fused(adapter.decode(layer, &k, &v, &q, &attn).unwrap());
            assert_eq!(got.dims(), &[b, QH, 1, D]);
            direct
                .append_decode(layer, &seqs, kr[..].into(), vr[..].into())
                .unwrap();
            let want = direct.attend(layer, &seqs, &qr).unwrap().output;
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
    }
    assert_eq!(adapter.seq_len(1), prompt + steps);
    let mem = adapter.memory_usage();
    assert_eq!(mem, direct.memory_report().total());
    adapter.reset().unwrap();
    assert_eq!(adapter.seq_len(0), 0);
}

#[test]
fn full_precision_decode_is_plain_attention() {
    let n = 70;
    let mut rng = Rng(7);
    let adapter = MistralRsCache::new(cfg(false)).unwrap();
    let (k, kr) = tensor(&mut rng, 1, KVH, n, DType::F32);
    let (v, vr) = tensor(&mut rng, 1, KVH, n, DType::F32);
    let (q, _) = tensor(&mut rng, 1, QH, n, DType::F32);
    adapter.prefill(0, &k, &v, &q).unwrap();
    let (k1, k1r) = tensor(&mut rng, 1, KVH, 1, DType::F32);
    let (v1, v1r) = tensor(&mut rng, 1, KVH, 1, DType::F32);
    let (q1, q1r) = tensor(&mut rng, 1, QH, 1, DType::F32);
    // An engine scale other than the cache's is honoured.
    let scale = 0.07f32;
    let attn = AttendConfig {
        softmax_scale: scale,
        n_kv_groups: QH / KVH,
    };
    let got = fused(adapter.decode(0, &k1, &v1, &q1, &attn).unwrap())
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let keys: Vec<f32> = kr
        .iter()
        .chain(&k1r)
        .map(|x| half::f16::from_f32(*x).to_f32())
        .collect();
    let vals: Vec<f32> = vr
        .iter()
        .chain(&v1r)
        .map(|x| half::f16::from_f32(*x).to_f32())
        .collect();
    let g = QH / KVH;
    for h in 0..QH {
        let kv = h / g;
        let s: Vec<f64> = (0..=n)
            .map(|t| {
                (0..D)
                    .map(|c| q1r[h * D + c] as f64 * keys[(t * KVH + kv) * D + c] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for c in 0..D {
            let want: f64 = (0..=n)
                .map(|t| (s[t] - m).exp() / z * vals[(t * KVH + kv) * D + c] as f64)
                .sum();
            assert!(
                (got[h * D + c] as f64 - want).abs() < 1e-4,
                "head {h} channel {c}: {} vs {want}",
                got[h * D + c]
            );
        }
    }
}

#[test]
fn bad_shapes_and_groupings_are_errors() {
    let mut rng = Rng(9);
    let adapter = MistralRsCache::new(cfg(true)).unwrap();
    let (k, _) = tensor(&mut rng, 1, KVH, 4, DType::F32);
    let (q, _) = tensor(&mut rng, 1, QH, 4, DType::F32);
    let (wrong, _) = tensor(&mut rng, 1, KVH + 1, 4, DType::F32);
    assert!(adapter.prefill(0, &wrong, &wrong, &q).is_err());
    assert!(adapter
        .prefill(0, &k.to_dtype(DType::U8).unwrap(), &k, &q)
        .is_err());
    assert!(
        adapter.prefill(5, &k, &k, &q).is_err(),
        "layer out of range"
    );
    adapter.prefill(0, &k, &k, &q).unwrap();
    let (k2, _) = tensor(&mut rng, 2, KVH, 4, DType::F32);
    assert!(adapter.prefill(0, &k2, &k2, &q).is_err(), "batch changed");
    let (k1, _) = tensor(&mut rng, 1, KVH, 1, DType::F32);
    let (q1, _) = tensor(&mut rng, 1, QH, 1, DType::F32);
    let bad = AttendConfig {
        softmax_scale: 0.125,
        n_kv_groups: 2,
    };
    assert!(adapter.decode(0, &k1, &k1, &q1, &bad).is_err());
    let nan = AttendConfig {
        softmax_scale: f32::NAN,
        n_kv_groups: QH / KVH,
    };
    assert!(adapter.decode(0, &k1, &k1, &q1, &nan).is_err());
    assert_eq!(adapter.seq_len(0), 4, "failed calls stored nothing");
}
