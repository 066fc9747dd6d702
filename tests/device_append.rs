//! `KvCache::append_device`: keys and values appended from device memory in one launch per batch.
//!
//! Against the host path on the same inputs: every page (hot, and warm after the demotions the
//! appends trigger) byte-identical to a cache filled with `append_rows` (f32 / f16 / bf16 input,
//! rotated and plain caches, batched decode steps and prefill chunks in one call), and attention
//! equal. Bad input fails the whole batch with a typed error naming the element and changes no
//! sequence: the pages already stored keep their bytes. The GPU tests skip without a device; the
//! CPU test (a typed `Unsupported`) runs everywhere.

mod common;
use kvtier::backend::cuda::CudaRows;
use kvtier::{CacheConfig, DeviceRows, Error, InputDtype, KvCache};

#[test]
fn cpu_caches_refuse_device_appends() {
    let cfg = CacheConfig::builder(1, 4, 2, 64).build().unwrap();
    let mut c = KvCache::new(cfg).unwrap();
    let s = c.add_sequence();
    let rows = DeviceRows::Cuda(CudaRows {
        keys: 0x1000,
        values: 0x2000,
        dtype: InputDtype::F32,
        stream: 0,
    });
    match c.append_device(0, &[(s, 1)], &rows) {
        Err(Error::Unsupported(_)) => {}
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(matches!(
        c.append_device(3, &[(s, 1)], &rows),
        Err(Error::LayerOutOfRange { .. })
    ));
    assert_eq!(c.page_table(s, 0).unwrap().len(), 0);
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::common::{oracle, Rng};
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
    use half::{bf16, f16};
    use kvtier::backend::cuda::{CudaDevice, CudaRows};
    use kvtier::backend::BackendStorage;
    use kvtier::{
        Bits, CacheConfig, Device, DeviceRows, Error, HotDtype, InputDtype, KvCache, PageBytes,
        Rotation, Rows, SeqId,
    };
    use std::sync::Arc;

    fn device() -> Option<CudaDevice> {
        match CudaDevice::new(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("SKIP: no CUDA device: {e}");
                None
            }
        }
    }

    /// Rows in device memory in one dtype, and the same values as host rows.
    enum Held {
        F32(CudaSlice<f32>, CudaSlice<f32>),
        U16(CudaSlice<u16>, CudaSlice<u16>),
    }

    struct Batch {
        k: Vec<f32>,
        v: Vec<f32>,
        dtype: InputDtype,
    }

    impl Batch {
        /// `k` / `v` rounded to `dtype` (so host and device rows hold the same values).
        fn new(k: Vec<f32>, v: Vec<f32>, dtype: InputDtype) -> Self {
            let r = |x: &[f32]| -> Vec<f32> {
                match dtype {
                    InputDtype::F32 => x.to_vec(),
                    InputDtype::F16 => x.iter().map(|&a| f16::from_f32(a).to_f32()).collect(),
                    InputDtype::BF16 => x.iter().map(|&a| bf16::from_f32(a).to_f32()).collect(),
                }
            };
            Batch {
                k: r(&k),
                v: r(&v),
                dtype,
            }
        }
        fn bits(&self, x: &[f32]) -> Vec<u16> {
            match self.dtype {
                InputDtype::F16 => x.iter().map(|&a| f16::from_f32(a).to_bits()).collect(),
                _ => x.iter().map(|&a| bf16::from_f32(a).to_bits()).collect(),
            }
        }
        fn upload(&self, st: &Arc<CudaStream>) -> Held {
            match self.dtype {
                InputDtype::F32 => Held::F32(
                    st.clone_htod(&self.k).unwrap(),
                    st.clone_htod(&self.v).unwrap(),
                ),
                _ => Held::U16(
                    st.clone_htod(&self.bits(&self.k)).unwrap(),
                    st.clone_htod(&self.bits(&self.v)).unwrap(),
                ),
            }
        }
        /// Appends the batch through the device path.
        fn device(
            &self,
            c: &mut KvCache,
            st: &Arc<CudaStream>,
            batch: &[(SeqId, usize)],
        ) -> kvtier::Result<()> {
            let held = self.upload(st);
            st.synchronize().unwrap();
            let (kp, vp) = match &held {
                Held::F32(k, v) => (k.device_ptr(st).0, v.device_ptr(st).0),
                Held::U16(k, v) => (k.device_ptr(st).0, v.device_ptr(st).0),
            };
            let rows = DeviceRows::Cuda(CudaRows {
                keys: kp,
                values: vp,
                dtype: self.dtype,
                stream: st.cu_stream() as u64,
            });
            c.append_device(0, batch, &rows)
        }
        /// The same rows through the host path, one sequence after another.
        fn host(&self, c: &mut KvCache, batch: &[(SeqId, usize)]) {
            let row = c.config().num_kv_heads * c.config().head_dim;
            let mut at = 0;
            for &(s, n) in batch {
                let (k, v) = (
                    &self.k[at * row..(at + n) * row],
                    &self.v[at * row..(at + n) * row],
                );
                let (kb, vb) = (self.bits(k), self.bits(v));
                let (k16, v16): (Vec<f16>, Vec<f16>) = (
                    kb.iter().map(|&b| f16::from_bits(b)).collect(),
                    vb.iter().map(|&b| f16::from_bits(b)).collect(),
                );
                let (kbf, vbf): (Vec<bf16>, Vec<bf16>) = (
                    kb.iter().map(|&b| bf16::from_bits(b)).collect(),
                    vb.iter().map(|&b| bf16::from_bits(b)).collect(),
                );
                let (rk, rv) = match self.dtype {
                    InputDtype::F32 => (Rows::F32(k), Rows::F32(v)),
                    InputDtype::F16 => (Rows::F16(&k16), Rows::F16(&v16)),
                    InputDtype::BF16 => (Rows::BF16(&kbf), Rows::BF16(&vbf)),
                };
                c.append_rows(s, 0, rk, rv).unwrap();
                at += n;
            }
        }
    }

    /// Every page of every sequence, as exported bytes.
    fn pages(c: &KvCache, seqs: &[SeqId]) -> Vec<Vec<PageBytes>> {
        seqs.iter()
            .map(|&s| {
                let st = c.layer_storage(0).unwrap();
                c.page_table(s, 0)
                    .unwrap()
                    .pages()
                    .iter()
                    .map(|e| st.export_page(e).unwrap())
                    .collect()
            })
            .collect()
    }

    fn configs() -> Vec<(&'static str, CacheConfig, InputDtype)> {
        vec![
            (
                "32/8/128 bf16 hot int4, f32 rows",
                CacheConfig::builder(1, 32, 8, 128)
                    .hot_dtype(HotDtype::BF16)
                    .hot_window(32)
                    .build()
                    .unwrap(),
                InputDtype::F32,
            ),
            (
                "9/3/64 f16 hot k4v2 rotated keys+values, f16 rows",
                CacheConfig::builder(1, 9, 3, 64)
                    .hot_window(32)
                    .v_bits(Bits::B2)
                    .rotation(Rotation::KeysValues)
                    .build()
                    .unwrap(),
                InputDtype::F16,
            ),
            (
                "8/2/64 f32 hot int8 rotated keys, 16-token pages, bf16 rows",
                CacheConfig::builder(1, 8, 2, 64)
                    .hot_dtype(HotDtype::F32)
                    .page_size(16)
                    .hot_window(16)
                    .k_bits(Bits::B8)
                    .v_bits(Bits::B8)
                    .rotation(Rotation::Keys)
                    .build()
                    .unwrap(),
                InputDtype::BF16,
            ),
        ]
    }

    #[test]
    fn device_appends_equal_host_appends() {
        let Some(dev) = device() else { return };
        let ctx = CudaContext::new(0).unwrap();
        let st = ctx.new_stream().unwrap();
        for (name, cfg, dtype) in configs() {
            let row = cfg.num_kv_heads * cfg.head_dim;
            let mut a = KvCache::with_device(cfg.clone(), Device::Cuda(dev.clone())).unwrap();
            let mut b = KvCache::with_device(cfg.clone(), Device::Cuda(dev.clone())).unwrap();
            let mut o = KvCache::with_device(oracle(&cfg), Device::Cpu).unwrap();
            let seqs: Vec<SeqId> = (0..3).map(|_| a.add_sequence()).collect();
            for _ in 0..3 {
                b.add_sequence();
                o.add_sequence();
            }
            let mut rng = Rng(0xA99E);
            // A prefill chunk for each sequence in one call, then batched decode steps (one token
            // each), then a second chunk for one sequence: page starts, partial pages, demotions.
            let mut steps: Vec<Vec<(SeqId, usize)>> =
                vec![vec![(seqs[0], 37), (seqs[1], 100), (seqs[2], 5)]];
            for _ in 0..40 {
                steps.push(seqs.iter().map(|&s| (s, 1)).collect());
            }
            steps.push(vec![(seqs[2], 70)]);
            for batch in &steps {
                let n: usize = batch.iter().map(|x| x.1).sum();
                let rows = Batch::new(rng.vec(n * row, 2.0), rng.vec(n * row, 1.0), dtype);
                rows.device(&mut a, &st, batch).unwrap();
                rows.host(&mut b, batch);
                rows.host(&mut o, batch);
            }
            let (pa, pb, po) = (pages(&a, &seqs), pages(&b, &seqs), pages(&o, &seqs));
            assert_eq!(
                pa, pb,
                "{name}: device-appended pages differ from host-appended"
            );
            assert_eq!(
                pa, po,
                "{name}: device-appended pages differ from the CPU's"
            );
            let (ma, mb) = (a.memory_report(), b.memory_report());
            assert_eq!(
                (ma.hot_pages, ma.warm_pages),
                (mb.hot_pages, mb.warm_pages),
                "{name}"
            );
            assert!(ma.warm_pages > 0, "{name}: no demotion was exercised");
            let q = rng.vec(3 * cfg.num_q_heads * cfg.head_dim, 1.0);
            let (xa, xb) = (
                a.attend(0, &seqs, &q).unwrap(),
                b.attend(0, &seqs, &q).unwrap(),
            );
            assert_eq!(xa.output, xb.output, "{name}");
            assert_eq!(xa.heads, xb.heads, "{name}");
            eprintln!(
                "{name}: {} pages equal",
                pa.iter().map(Vec::len).sum::<usize>()
            );
        }
    }

    #[test]
    fn bad_rows_fail_the_batch_and_change_nothing() {
        let Some(dev) = device() else { return };
        let ctx = CudaContext::new(0).unwrap();
        let st = ctx.new_stream().unwrap();
        for rotated in [false, true] {
            let cfg = CacheConfig::builder(1, 4, 2, 64)
                .page_size(16)
                .hot_window(16)
                .rotation(if rotated {
                    Rotation::KeysValues
                } else {
                    Rotation::None
                })
                .build()
                .unwrap();
            let row = 2 * 64;
            let mut c = KvCache::with_device(cfg.clone(), Device::Cuda(dev.clone())).unwrap();
            let seqs: Vec<SeqId> = (0..2).map(|_| c.add_sequence()).collect();
            let mut rng = Rng(5);
            let base = Batch::new(
                rng.vec(30 * row, 1.0),
                rng.vec(30 * row, 1.0),
                InputDtype::F32,
            );
            base.device(&mut c, &st, &[(seqs[0], 13), (seqs[1], 17)])
                .unwrap();
            let before = pages(&c, &seqs);
            let lens: Vec<usize> = seqs
                .iter()
                .map(|&s| c.page_table(s, 0).unwrap().len())
                .collect();
            let hot = c.memory_report().hot_pages;
            let batch = [(seqs[0], 2), (seqs[1], 5)];
            // Element 3 * row + 9 (row 3: the second sequence's first row).
            let at = 3 * row + 9;
            let mut cases: Vec<(Vec<f32>, Vec<f32>, &str)> = Vec::new();
            let good = || (rng_vec(7 * row, 11), rng_vec(7 * row, 12));
            let (mut k, v) = good();
            k[at] = 1e6; // beyond f16
            cases.push((k, v, "keys"));
            let (k, mut v) = good();
            v[at] = f32::NAN;
            cases.push((k, v, "values"));
            if rotated {
                // One head's channels at 60000 times the layer's signs: within f16, but the
                // rotation sums them into channel 0 (64 * 60000 / 8).
                let (mut k, v) = good();
                let signs = c.rotator().signs(0).to_vec();
                for (x, s) in k[3 * row..3 * row + 64].iter_mut().zip(&signs) {
                    *x = 60000.0 * s;
                }
                cases.push((k, v, "rotated keys"));
            }
            for (k, v, what) in cases {
                let b = Batch::new(k, v, InputDtype::F32);
                let err = b.device(&mut c, &st, &batch).unwrap_err();
                match (&err, what) {
                    (Error::OutOfRange { what: w, index, .. }, "keys") => {
                        assert_eq!((*w, *index), ("keys", at))
                    }
                    (Error::NonFinite { what: w, index }, "values") => {
                        assert_eq!((*w, *index), ("values", at))
                    }
                    (Error::OutOfRange { what: w, index, .. }, "rotated keys") => {
                        assert_eq!(*w, "rotated keys");
                        assert!((3 * row..3 * row + 64).contains(index));
                    }
                    _ => panic!("rotated {rotated} {what}: unexpected {err:?}"),
                }
                assert_eq!(pages(&c, &seqs), before, "{what}: stored pages changed");
                for (&s, &l) in seqs.iter().zip(&lens) {
                    assert_eq!(c.page_table(s, 0).unwrap().len(), l);
                }
                assert_eq!(c.memory_report().hot_pages, hot, "{what}: fresh pages kept");
            }
            // Bad batches refused before the device is touched.
            let ok = Batch::new(
                rng.vec(2 * row, 1.0),
                rng.vec(2 * row, 1.0),
                InputDtype::F32,
            );
            assert!(matches!(
                ok.device(&mut c, &st, &[(seqs[0], 1), (seqs[0], 1)]),
                Err(Error::DuplicateSequence(_))
            ));
            assert!(matches!(
                ok.device(&mut c, &st, &[(SeqId(999), 2)]),
                Err(Error::UnknownSequence(999))
            ));
            let null = DeviceRows::Cuda(CudaRows {
                keys: 0,
                values: 0,
                dtype: InputDtype::F32,
                stream: 0,
            });
            assert!(matches!(
                c.append_device(0, &[(seqs[0], 1)], &null),
                Err(Error::Shape { .. })
            ));
            assert_eq!(pages(&c, &seqs), before);
            // And a good batch still lands, equal to the host path.
            let mut h = KvCache::with_device(cfg.clone(), Device::Cuda(dev.clone())).unwrap();
            let hs: Vec<SeqId> = (0..2).map(|_| h.add_sequence()).collect();
            base.host(&mut h, &[(hs[0], 13), (hs[1], 17)]);
            let more = Batch::new(
                rng.vec(7 * row, 1.0),
                rng.vec(7 * row, 1.0),
                InputDtype::F32,
            );
            more.device(&mut c, &st, &batch).unwrap();
            more.host(&mut h, &[(hs[0], 2), (hs[1], 5)]);
            assert_eq!(pages(&c, &seqs), pages(&h, &hs), "rotated {rotated}");
        }
    }

    /// `kvtier_cache_append_device` (the C ABI) stores what `append_device` stores: a prefill
    /// chunk and batched decode steps through both, then equal attention; bad input gets a status.
    #[test]
    fn c_abi_device_appends_equal_rust() {
        use kvtier::ffi::status::kvtier_status;
        use kvtier::ffi::*;
        let Some(dev) = device() else { return };
        let ctx = CudaContext::new(0).unwrap();
        let st = ctx.new_stream().unwrap();
        let (qh, kvh, d) = (9, 3, 64);
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .hot_window(32)
            .build()
            .unwrap();
        let mut r = KvCache::with_device(cfg.clone(), Device::Cuda(dev)).unwrap();
        let (mut ccfg, mut c) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: out-pointers to locals; the handles are freed at the end.
        unsafe {
            assert_eq!(
                kvtier_config_new(1, qh, kvh, d, &mut ccfg),
                kvtier_status::Ok
            );
            assert_eq!(kvtier_config_set_hot_window(ccfg, 32), kvtier_status::Ok);
            assert_eq!(kvtier_cache_new_cuda(ccfg, 0, &mut c), kvtier_status::Ok);
            kvtier_config_free(ccfg);
        }
        let mut ids = [0u64; 2];
        for id in &mut ids {
            // SAFETY: `c` is live; `id` a writable local.
            assert_eq!(
                unsafe { kvtier_cache_sequence_add(c, id) },
                kvtier_status::Ok
            );
        }
        let seqs: Vec<SeqId> = (0..2).map(|_| r.add_sequence()).collect();
        let row = kvh * d;
        let mut steps: Vec<Vec<usize>> = vec![vec![50, 9]];
        steps.extend((0..40).map(|_| vec![1, 1]));
        for (i, counts) in steps.iter().enumerate() {
            let n: usize = counts.iter().sum();
            let b = Batch::new(
                rng_vec(n * row, 7 + i as u64),
                rng_vec(n * row, 99 + i as u64),
                InputDtype::F16,
            );
            let batch: Vec<(SeqId, usize)> =
                seqs.iter().copied().zip(counts.iter().copied()).collect();
            b.device(&mut r, &st, &batch).unwrap();
            let held = b.upload(&st);
            st.synchronize().unwrap();
            let Held::U16(k, v) = &held else {
                unreachable!()
            };
            let (kp, vp) = (k.device_ptr(&st).0, v.device_ptr(&st).0);
            // SAFETY: `c` is live; `ids` and `counts` hold 2 elements; `kp` / `vp` hold the
            // batch's rows of f16 on `st`.
            let s = unsafe {
                kvtier_cache_append_device(
                    c,
                    0,
                    ids.as_ptr(),
                    counts.as_ptr(),
                    2,
                    1,
                    kp,
                    vp,
                    st.cu_stream() as *mut _,
                )
            };
            assert_eq!(s, kvtier_status::Ok, "step {i}");
        }
        // Bad input: a NaN key fails the batch with a status and changes nothing.
        let mut bad = rng_vec(2 * row, 5);
        bad[row + 3] = f32::NAN;
        let b = Batch::new(bad, rng_vec(2 * row, 6), InputDtype::F16);
        let held = b.upload(&st);
        st.synchronize().unwrap();
        let Held::U16(k, v) = &held else {
            unreachable!()
        };
        let (kp, vp) = (k.device_ptr(&st).0, v.device_ptr(&st).0);
        let mut len = 0usize;
        // SAFETY: as above; `len` a writable local.
        unsafe {
            assert_eq!(
                kvtier_cache_append_device(
                    c,
                    0,
                    ids.as_ptr(),
                    [1usize, 1].as_ptr(),
                    2,
                    1,
                    kp,
                    vp,
                    st.cu_stream() as *mut _
                ),
                kvtier_status::NonFinite
            );
            assert_eq!(
                kvtier_cache_sequence_len(c, ids[1], 0, &mut len),
                kvtier_status::Ok
            );
        }
        assert_eq!(len, 9 + 40, "a failed batch changed a sequence");
        let q = rng_vec(2 * qh * d, 3);
        let want = r.attend(0, &seqs, &q).unwrap();
        let mut out = vec![0f32; q.len()];
        // SAFETY: `c` is live; the arrays hold their counts; no stats.
        let s = unsafe {
            kvtier_cache_attend(
                c,
                0,
                ids.as_ptr(),
                2,
                q.as_ptr(),
                q.len(),
                out.as_mut_ptr(),
                out.len(),
                std::ptr::null(),
            )
        };
        assert_eq!(s, kvtier_status::Ok);
        assert_eq!(out, want.output, "C-ABI device appends attend differently");
        // SAFETY: `c` is live and not used again.
        unsafe { kvtier_cache_free(c) };
    }

    fn rng_vec(n: usize, seed: u64) -> Vec<f32> {
        Rng(seed).vec(n, 1.0)
    }
}
