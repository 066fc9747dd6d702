//! Every bad input returns a typed error, never a panic, and leaves the cache as it was.

#[cfg(feature = "candle")]
use candle_core::{DType, Device, Tensor};
use kvtier::{CacheConfig, Error, KvCache, SeqId, TierBudgets};

fn cache() -> (KvCache, SeqId) {
    let cfg = CacheConfig::builder(2, 4, 2, 32).build().unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let kv = vec![0.5f32; 40 * 2 * 32];
    c.append(s, 0, &kv, &kv).unwrap();
    (c, s)
}

fn snapshot(c: &KvCache, s: SeqId) -> (usize, Vec<f32>, kvtier::MemoryReport) {
    (
        c.seq_len(s, 0).unwrap(),
        c.read_tokens(s, 0).unwrap().0,
        c.memory_report(),
    )
}

#[test]
fn shapes_ids_layers_values() {
    let (mut c, s) = cache();
    let before = snapshot(&c, s);
    let row = 2 * 32;
    let ok = vec![0.1f32; row];
    assert!(matches!(
        c.append(s, 0, &ok[..row - 1], &ok[..row - 1]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        c.append(s, 0, &ok, &[0.1; 128]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        c.append(s, 2, &ok, &ok),
        Err(Error::LayerOutOfRange {
            layer: 2,
            num_layers: 2
        })
    ));
    assert!(matches!(
        c.append(SeqId(77), 0, &ok, &ok),
        Err(Error::UnknownSequence(77))
    ));
    let mut nan = ok.clone();
    nan[5] = f32::NAN;
    assert!(matches!(
        c.append(s, 0, &nan, &ok),
        Err(Error::NonFinite { index: 5, .. })
    ));
    let mut inf = ok.clone();
    inf[0] = f32::INFINITY;
    assert!(matches!(
        c.append(s, 0, &ok, &inf),
        Err(Error::NonFinite { .. })
    ));
    let q = vec![0.1f32; 4 * 32];
    assert!(matches!(
        c.attend(0, &[s], &q[..100]),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        c.attend(0, &[s, s], &[q.clone(), q.clone()].concat()),
        Err(Error::DuplicateSequence(_))
    ));
    assert!(matches!(
        c.attend(5, &[s], &q),
        Err(Error::LayerOutOfRange { .. })
    ));
    assert!(matches!(
        c.attend(0, &[SeqId(9)], &q),
        Err(Error::UnknownSequence(9))
    ));
    assert!(matches!(
        c.prefill(s, 0, &q, &ok, &[ok.clone(), ok.clone()].concat()),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        c.attend_device(
            0,
            &[s],
            kvtier::DeviceBuffers::Cuda(kvtier::backend::cuda::CudaBuffers {
                queries: 0,
                query_dtype: kvtier::InputDtype::F32,
                output: 0,
                stream: 0
            })
        ),
        Err(Error::Unsupported(_))
    ));
    assert!(c.reset_sequence(SeqId(1234)).is_err());
    assert!(c.page_table(s, 9).is_err());
    assert_eq!(snapshot(&c, s), before);

    // removed ids stay invalid; new ids are fresh
    c.remove_sequence(s).unwrap();
    assert!(matches!(
        c.append(s, 0, &ok, &ok),
        Err(Error::UnknownSequence(_))
    ));
    assert!(matches!(
        c.remove_sequence(s),
        Err(Error::UnknownSequence(_))
    ));
    assert_ne!(c.add_sequence(), s);
    // empty attention over an empty sequence is defined: zero output
    let e = c.add_sequence();
    let att = c.attend(0, &[e], &q).unwrap();
    assert!(att.output.iter().all(|&x| x == 0.0));
}

#[cfg(feature = "candle")]
#[test]
fn tensor_dtypes_and_shapes() {
    let (mut c, s) = cache();
    let before = snapshot(&c, s);
    let dev = Device::Cpu;
    let good = Tensor::ones((3, 2, 32), DType::F16, &dev).unwrap();
    let bad_dtype = Tensor::ones((3, 2, 32), DType::U8, &dev).unwrap();
    let bad_shape = Tensor::ones((3, 4, 16), DType::F32, &dev).unwrap();
    assert!(matches!(
        c.append_tensors(s, 0, &bad_dtype, &good),
        Err(Error::DType { .. })
    ));
    assert!(matches!(
        c.append_tensors(s, 0, &good, &bad_shape),
        Err(Error::Shape { .. })
    ));
    let q64 = Tensor::ones((1, 4, 32), DType::F64, &dev).unwrap();
    assert!(matches!(
        c.attend_tensor(0, &[s], &q64),
        Err(Error::DType { .. })
    ));
    assert_eq!(snapshot(&c, s), before);
    c.append_tensors(s, 0, &good, &good).unwrap();
    assert_eq!(c.seq_len(s, 0).unwrap(), 43);
    let q = Tensor::ones((1, 4, 32), DType::BF16, &dev).unwrap();
    let (out, att) = c.attend_tensor(0, &[s], &q).unwrap();
    assert_eq!(out.dims(), &[1, 4, 32]);
    assert_eq!(att.heads.len(), 4);
}

#[test]
fn limits_and_budgets() {
    let cfg = CacheConfig::builder(1, 4, 2, 32)
        .max_seq_len(100)
        .build()
        .unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let kv = vec![0.1f32; 90 * 64];
    c.append(s, 0, &kv, &kv).unwrap();
    assert!(matches!(
        c.append(s, 0, &kv[..20 * 64], &kv[..20 * 64]),
        Err(Error::SequenceTooLong { requested: 110, .. })
    ));
    assert_eq!(c.seq_len(s, 0).unwrap(), 90);

    // hot budget of 2 pages (f16, 2 heads x 32 tokens x 32 dims x 2 (K,V) x 2 bytes = 8 KiB each)
    let budget = 2 * 8192;
    let cfg = CacheConfig::builder(1, 4, 2, 32)
        .full_precision()
        .budgets(TierBudgets {
            hot_bytes: Some(budget),
            ..Default::default()
        })
        .build()
        .unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    c.append(s, 0, &kv[..64 * 64], &kv[..64 * 64]).unwrap();
    assert!(matches!(
        c.append(s, 0, &kv[..64], &kv[..64]),
        Err(Error::BudgetExceeded { .. })
    ));
    assert_eq!(c.seq_len(s, 0).unwrap(), 64);
    assert!(c.memory_report().hot_bytes <= budget);

    // a page whose values exceed f16 range stays hot and exact
    let cfg = CacheConfig::builder(1, 4, 2, 32)
        .hot_dtype(kvtier::HotDtype::F32)
        .hot_window(0)
        .sink_tokens(0)
        .build()
        .unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let mut big = vec![0.1f32; 32 * 64];
    big[7] = 1.0e6;
    c.append(s, 0, &big, &big).unwrap();
    assert_eq!(
        c.page_table(s, 0).unwrap().pages()[0].tier,
        kvtier::Tier::Hot
    );
    assert_eq!(c.counters().demotions_skipped, 1);
    assert_eq!(c.read_tokens(s, 0).unwrap().0, big);
}
