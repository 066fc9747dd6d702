//! Decode and prefill attention against a naive f64 reference.

mod common;
use common::{naive, Rng};
use kvtier::{Bits, CacheConfig, HotDtype, KvCache, Rotation};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn hot_only_matches_reference_gqa_mqa_mha() {
    for &(qh, kvh, d) in &[(8, 2, 64), (4, 1, 32), (4, 4, 128), (9, 3, 64)] {
        let cfg = CacheConfig::builder(2, qh, kvh, d)
            .hot_dtype(HotDtype::F32)
            .full_precision()
            .build()
            .unwrap();
        let mut cache = KvCache::new(cfg).unwrap();
        let mut rng = Rng(qh as u64 * 31 + d as u64);
        let lens = [1usize, 31, 32, 33, 200, 517];
        let mut seqs = Vec::new();
        let mut data = Vec::new();
        for &len in &lens {
            let s = cache.add_sequence();
            let k = rng.vec(len * kvh * d, 2.0);
            let v = rng.vec(len * kvh * d, 1.0);
            // append in uneven chunks to cross page boundaries
            let mut at = 0;
            while at < len {
                let n = (len - at).min(1 + (at * 7) % 45);
                let r = kvh * d;
                cache
                    .append(s, 1, &k[at * r..(at + n) * r], &v[at * r..(at + n) * r])
                    .unwrap();
                at += n;
            }
            seqs.push(s);
            data.push((k, v));
        }
        let q = rng.vec(lens.len() * qh * d, 3.0);
        let att = cache.attend(1, &seqs, &q).unwrap();
        for (i, &len) in lens.iter().enumerate() {
            let (k, v) = &data[i];
            let (want, stats, probs) =
                naive(&q[i * qh * d..(i + 1) * qh * d], k, v, len, qh, kvh, d);
            let err = max_abs_diff(att.output_of(i), &want);
            assert!(err < 1e-5, "shape {qh}/{kvh}/{d} len {len}: max err {err}");
            for (h, st) in att.heads_of(i).iter().enumerate() {
                assert!(
                    (st.entropy as f64 - stats[h].0).abs() < 1e-4,
                    "entropy {} vs {}",
                    st.entropy,
                    stats[h].0
                );
                assert!(
                    (st.varentropy as f64 - stats[h].1).abs() < 1e-3 * (1.0 + stats[h].1),
                    "varentropy {} vs {}",
                    st.varentropy,
                    stats[h].1
                );
                assert!((st.max_score as f64 - stats[h].2).abs() < 1e-4);
            }
            // page masses: mean over heads of the per-page probability sums
            let pm = &att.page_mass[i];
            assert_eq!(pm.len(), len.div_ceil(32));
            for (p, &m) in pm.iter().enumerate() {
                let want: f64 = (0..qh)
                    .map(|h| {
                        probs[h][p * 32..((p + 1) * 32).min(len)]
                            .iter()
                            .sum::<f64>()
                    })
                    .sum::<f64>()
                    / qh as f64;
                assert!((m as f64 - want).abs() < 1e-5, "page {p}: {m} vs {want}");
            }
            assert!((pm.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        }
    }
}

#[test]
fn f16_and_bf16_hot_pages_match_reference_on_rounded_data() {
    for dtype in [HotDtype::F16, HotDtype::BF16] {
        let (qh, kvh, d, len) = (8, 2, 64, 300);
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .hot_dtype(dtype)
            .full_precision()
            .build()
            .unwrap();
        let mut cache = KvCache::new(cfg).unwrap();
        let mut rng = Rng(7);
        let s = cache.add_sequence();
        cache
            .append(
                s,
                0,
                &rng.vec(len * kvh * d, 2.0),
                &rng.vec(len * kvh * d, 1.0),
            )
            .unwrap();
        let (k, v) = cache.read_tokens(s, 0).unwrap();
        let q = rng.vec(qh * d, 2.0);
        let att = cache.attend(0, &[s], &q).unwrap();
        let (want, _, _) = naive(&q, &k, &v, len, qh, kvh, d);
        assert!(max_abs_diff(&att.output, &want) < 1e-5);
    }
}

/// Quantised pages: the kernel, which reads codes directly, must equal the reference run on the
/// dequantised tokens; and the error against exact data must stay within the bound implied by the
/// quantisation error (|Δs_t| <= scale Σ|q||Δk| ⇒ softmax weights move by at most a factor e^{±2ε}).
#[test]
fn warm_pages_within_quantisation_bound() {
    use Rotation::{Keys as Rk, KeysValues as Rkv, None as R0};
    for (kb, vb, rot, outliers, fit) in [
        (Bits::B8, Bits::B8, R0, 0, false),
        (Bits::B4, Bits::B4, R0, 0, false),
        (Bits::B4, Bits::B2, R0, 0, false),
        (Bits::B2, Bits::B2, R0, 0, false),
        (Bits::B3, Bits::B3, R0, 0, false),
        (Bits::B4, Bits::B3, R0, 0, false),
        (Bits::B3, Bits::B8, R0, 0, false),
        (Bits::B2, Bits::B2, Rkv, 0, false),
        (Bits::B3, Bits::B3, Rk, 0, false),
        (Bits::B4, Bits::B2, Rkv, 0, false),
        (Bits::B2, Bits::B2, R0, 4, false),
        (Bits::B4, Bits::B4, R0, 8, false),
        (Bits::B3, Bits::B2, Rkv, 2, false),
        (Bits::B4, Bits::B2, Rkv, 0, true),
        (Bits::B2, Bits::B2, R0, 0, true),
        (Bits::B3, Bits::B3, Rk, 2, true),
    ] {
        let (qh, kvh, d, len) = (8, 2, 128, 1000);
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .hot_dtype(HotDtype::F32)
            .rotation(rot)
            .key_outliers(outliers)
            .value_fit(fit)
            .k_bits(kb)
            .v_bits(vb)
            .hot_window(64)
            .sink_tokens(4)
            .build()
            .unwrap();
        let mut cache = KvCache::new(cfg).unwrap();
        let mut rng = Rng(kb as u64 * 10 + vb as u64);
        let s = cache.add_sequence();
        let mut k = rng.vec(len * kvh * d, 1.0);
        // Two wide channels, as real keys have: what outlier channels are for.
        for (i, x) in k.iter_mut().enumerate() {
            if matches!(i % d, 3 | 77) {
                *x *= 6.0;
            }
        }
        let v = rng.vec(len * kvh * d, 1.0);
        for t in 0..len {
            let r = kvh * d;
            cache
                .append(s, 0, &k[t * r..(t + 1) * r], &v[t * r..(t + 1) * r])
                .unwrap();
        }
        let rep = cache.memory_report();
        assert!(rep.warm_pages > 25, "{rep}");
        let (kq, vq) = cache.read_tokens(s, 0).unwrap();
        if outliers >= 2 && rot == R0 {
            // The wide channels are the page's outliers: kept to f16 precision.
            for (i, (a, b)) in k.iter().zip(&kq).enumerate() {
                if matches!(i % d, 3 | 77) {
                    assert!(
                        (a - b).abs() <= 6.0 * 1e-3,
                        "outlier channel {i}: {a} vs {b}"
                    );
                }
            }
        }
        let q = rng.vec(qh * d, 1.0);
        let att = cache.attend(0, &[s], &q).unwrap();

        let (on_dequant, _, _) = naive(&q, &kq, &vq, len, qh, kvh, d);
        let fused_err = max_abs_diff(&att.output, &on_dequant);
        assert!(
            fused_err < 2e-5,
            "{kb:?}/{vb:?}/{rot:?}/o{outliers}/fit {fit}: fused kernel vs dequantised reference {fused_err}"
        );

        let (exact, _, _) = naive(&q, &k, &v, len, qh, kvh, d);
        let scale = 1.0 / (d as f32).sqrt();
        let g = qh / kvh;
        let mut eps = 0f32;
        for h in 0..qh {
            let kv = h / g;
            for t in 0..len {
                let e: f32 = (0..d)
                    .map(|c| {
                        q[h * d + c].abs()
                            * (k[(t * kvh + kv) * d + c] - kq[(t * kvh + kv) * d + c]).abs()
                    })
                    .sum();
                eps = eps.max(e * scale);
            }
        }
        let vmax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
        let dv = max_abs_diff(&v, &vq);
        let bound = ((2.0 * eps).exp() - 1.0) * vmax + dv + 1e-5;
        let err = max_abs_diff(&att.output, &exact);
        assert!(
            err <= bound,
            "{kb:?}/{vb:?}/{rot:?}/o{outliers}/fit {fit}: error {err} > bound {bound}"
        );
        eprintln!("{kb:?}/{vb:?}/{rot:?}/o{outliers}/fit {fit}: error vs exact {err:.2e}, bound {bound:.2e}");
    }
}

/// A rotated cache is invisible to its user: exact pages attend to the same output as an unrotated
/// cache (up to f32 rounding of the rotation), `read_tokens` gives the input back, prefill agrees,
/// and a rotation that would push a value past the hot dtype's range is refused with nothing stored.
#[test]
fn rotation_is_transparent() {
    let (qh, kvh, d, len) = (6, 2, 96, 300);
    for rot in [Rotation::Keys, Rotation::KeysValues] {
        let mk = |rot| {
            let cfg = CacheConfig::builder(1, qh, kvh, d)
                .hot_dtype(HotDtype::F32)
                .rotation(rot)
                .full_precision()
                .build()
                .unwrap();
            KvCache::new(cfg).unwrap()
        };
        let (mut a, mut b) = (mk(Rotation::None), mk(rot));
        let mut rng = Rng(5);
        let (k, v) = (rng.vec(len * kvh * d, 1.5), rng.vec(len * kvh * d, 1.0));
        let q = rng.vec(qh * d, 1.0);
        let (sa, sb) = (a.add_sequence(), b.add_sequence());
        a.append(sa, 0, &k, &v).unwrap();
        b.append(sb, 0, &k, &v).unwrap();
        let (oa, ob) = (
            a.attend(0, &[sa], &q).unwrap(),
            b.attend(0, &[sb], &q).unwrap(),
        );
        assert!(max_abs_diff(&oa.output, &ob.output) < 1e-5, "{rot:?}");
        assert!((oa.heads[0].entropy - ob.heads[0].entropy).abs() < 1e-4);
        let (kb, vb) = b.read_tokens(sb, 0).unwrap();
        assert!(max_abs_diff(&kb, &k) < 1e-5 && max_abs_diff(&vb, &v) < 1e-5);
        let (pq, pk, pv) = (
            rng.vec(qh * d, 1.0),
            rng.vec(kvh * d, 1.0),
            rng.vec(kvh * d, 1.0),
        );
        let pa = a.prefill(sa, 0, &pq, &pk, &pv).unwrap();
        let pb = b.prefill(sb, 0, &pq, &pk, &pv).unwrap();
        assert!(max_abs_diff(&pa, &pb) < 1e-5, "{rot:?} prefill");
    }
    // f16 hot pages: a vector whose rotation exceeds 65504 is refused, the cache unchanged.
    let cfg = CacheConfig::builder(1, 2, 1, 64)
        .rotation(Rotation::Keys)
        .build()
        .unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let big = vec![60000.0f32; 64];
    let err = c.append(s, 0, &big, &[0.0; 64]).unwrap_err();
    assert!(matches!(err, kvtier::Error::OutOfRange { .. }), "{err}");
    assert_eq!(c.seq_len(s, 0).unwrap(), 0);
}

#[test]
fn prefill_is_causal_and_matches_decode() {
    let (qh, kvh, d) = (6, 2, 64);
    let cfg = CacheConfig::builder(1, qh, kvh, d)
        .hot_dtype(HotDtype::F32)
        .hot_window(32)
        .k_bits(Bits::B8)
        .v_bits(Bits::B8)
        .build()
        .unwrap();
    let mut rng = Rng(99);
    let (n0, n1) = (150, 70);
    let r = kvh * d;
    let k = rng.vec((n0 + n1) * r, 1.0);
    let v = rng.vec((n0 + n1) * r, 1.0);
    let q = rng.vec((n0 + n1) * qh * d, 1.0);

    // A: chunked prefill of two chunks.
    let mut a = KvCache::new(cfg.clone()).unwrap();
    let sa = a.add_sequence();
    let out0 = a
        .prefill(sa, 0, &q[..n0 * qh * d], &k[..n0 * r], &v[..n0 * r])
        .unwrap();
    let out1 = a
        .prefill(sa, 0, &q[n0 * qh * d..], &k[n0 * r..], &v[n0 * r..])
        .unwrap();
    // B: first chunk prefilled, then token by token decode.
    let mut b = KvCache::new(cfg).unwrap();
    let sb = b.add_sequence();
    b.prefill(sb, 0, &q[..n0 * qh * d], &k[..n0 * r], &v[..n0 * r])
        .unwrap();
    // The first chunk sees only exact data: compare with the reference, causally.
    for t in [0, 1, 77, n0 - 1] {
        let (want, _, _) = naive(&q[t * qh * d..(t + 1) * qh * d], &k, &v, t + 1, qh, kvh, d);
        assert!(
            max_abs_diff(&out0[t * qh * d..(t + 1) * qh * d], &want) < 1e-5,
            "token {t}"
        );
    }
    // Second chunk: token i of chunk 1 attends to the stored cache plus new tokens <= i. Decoding
    // it one token at a time after appending it must give the same result, except where appending
    // demoted pages that chunked prefill still read exactly; with an int8 warm tier the two agree
    // closely, and both agree exactly on the first token.
    for i in 0..n1 {
        let t = n0 + i;
        b.append(sb, 0, &k[t * r..(t + 1) * r], &v[t * r..(t + 1) * r])
            .unwrap();
        let att = b
            .attend(0, &[sb], &q[t * qh * d..(t + 1) * qh * d])
            .unwrap();
        let err = max_abs_diff(&att.output, &out1[i * qh * d..(i + 1) * qh * d]);
        let tol = if i == 0 { 1e-5 } else { 5e-3 };
        assert!(err < tol, "token {i}: {err}");
    }
    assert_eq!(a.seq_len(sa, 0).unwrap(), n0 + n1);
}

/// A cache's own pool (`threads`): the kernels run on exactly that many threads, and results are
/// bit-identical whatever the count (work items do not depend on it).
#[test]
fn own_thread_pool_gives_identical_results() {
    let mut rng = Rng(77);
    let (qh, kvh, d, len) = (8, 2, 64, 700);
    let (k, v) = (rng.vec(len * kvh * d, 1.0), rng.vec(len * kvh * d, 1.0));
    let (pq, pk, pv) = (
        rng.vec(20 * qh * d, 1.0),
        rng.vec(20 * kvh * d, 1.0),
        rng.vec(20 * kvh * d, 1.0),
    );
    let q = rng.vec(qh * d, 1.0);
    let mut outs = Vec::new();
    for threads in [None, Some(1), Some(3)] {
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .threads(threads)
            .build()
            .unwrap();
        let mut c = KvCache::new(cfg).unwrap();
        if let Some(n) = threads {
            assert_eq!(c.threads(), n);
        }
        let s = c.add_sequence();
        c.append(s, 0, &k, &v).unwrap();
        let p = c.prefill(s, 0, &pq, &pk, &pv).unwrap();
        outs.push((c.attend(0, &[s], &q).unwrap().output, p));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    for bad in [0, CacheConfig::MAX_THREADS + 1] {
        assert!(CacheConfig::builder(1, qh, kvh, d)
            .threads(Some(bad))
            .build()
            .is_err());
    }
}
