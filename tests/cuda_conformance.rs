//! CUDA backend against the CPU oracle: the same inputs through both, compared within stated
//! tolerances. Tests that need a GPU skip with a message when no device (or no libcuda) is
//! present; the compile tests need only libnvrtc and skip without it.
//!
//! Tolerances (data amplitude ~1, both backends in f32 with different summation orders):
//! - hot page bytes: identical; warm page bytes after demotion: identical (0 differing bytes);
//! - attention output: max |Δ| <= 2e-5; entropy, max score, log Z: |Δ| <= 1e-4;
//!   varentropy: |Δ| <= 1e-3 * (1 + V); page mass: |Δ| <= 1e-5 per page;
//! - prefill output: max |Δ| <= 2e-5;
//! - attention over a page selection: the same bounds against the CPU over the same selection and
//!   against attention over a table holding only the selected pages; per-page lse |Δ| <=
//!   1e-4 * (1 + |lse|), `-inf` exactly where a page was not attended;
//! - exported page bytes: identical between backends, in both directions;
//! - attend_device with f16 / bf16 queries: max |Δ| <= 1e-6 against f32 queries holding the same
//!   (rounded) values, statistics and masses identical; with a rotated cache (queries and output
//!   rotated on the device) max |Δ| <= 1e-6 against host queries rotated on the CPU.
//! - 3-bit codes and key outlier channels: warm bytes identical, attention within the bounds above.
#![cfg(feature = "cuda")]

mod common;
use common::{max_abs, oracle, Rng};
use kvtier::backend::cpu::CpuDevice;
use kvtier::backend::cuda::{
    compile_for_arch, compile_source, CudaBuffers, CudaDevice, CudaError, CudaStorage,
};
use kvtier::backend::metal::MetalBuffers;
use kvtier::backend::{AttendInput, BackendDevice, BackendStorage, Device, DeviceBuffers};
use kvtier::quant::{quantize_keys, quantize_values, WarmLayout};
use kvtier::{
    Attention, Bits, CacheConfig, Error, HotDtype, InputDtype, KvCache, PageBytes, PageEntry,
    PageResults, PageSelection, PageTable, Rotation, Rows, Scratch, SeqId, Tier, WarmFormat,
};

fn device() -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => {
            eprintln!(
                "cuda device: {} (sm_{}{}, {} SMs)",
                d.name(),
                d.compute_capability().0,
                d.compute_capability().1,
                d.sm_count()
            );
            Some(d)
        }
        Err(e) => {
            eprintln!("SKIP: no CUDA device: {e}");
            None
        }
    }
}

fn nvrtc_present() -> bool {
    match compile_source("extern \"C\" __global__ void k() {}", "sm_90") {
        Ok(()) => true,
        Err(e) => {
            eprintln!("SKIP: NVRTC unavailable: {e}");
            false
        }
    }
}

#[test]
fn missing_device_is_a_typed_error() {
    match CudaDevice::new(4096) {
        Err(Error::Cuda(CudaError::NoDevice(msg))) => eprintln!("no device 4096: {msg}"),
        other => panic!("expected Error::Cuda(NoDevice), got {other:?}"),
    }
    if CudaDevice::new(0).is_err() {
        match CudaDevice::new(0) {
            Err(Error::Cuda(CudaError::NoDevice(_))) => {}
            other => panic!("expected NoDevice for ordinal 0 without a GPU, got {other:?}"),
        }
    }
}

#[test]
fn nvrtc_failure_carries_the_log() {
    match compile_source("this is not CUDA;", "sm_90") {
        Err(Error::Cuda(CudaError::Compile { log, .. })) => {
            assert!(!log.is_empty());
            eprintln!("compile error log: {}", log.lines().next().unwrap_or(""));
        }
        other => panic!("expected Error::Cuda(Compile), got {other:?}"),
    }
}

fn configs() -> Vec<(&'static str, CacheConfig)> {
    let b = |q, kv, d| CacheConfig::builder(1, q, kv, d);
    vec![
        (
            "32/8/128 bf16 k4v4",
            b(32, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .hot_window(64)
                .build()
                .unwrap(),
        ),
        (
            "32/8/128 bf16 k2v2",
            b(32, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .k_bits(Bits::B2)
                .v_bits(Bits::B2)
                .hot_window(64)
                .build()
                .unwrap(),
        ),
        (
            "9/3/64 f16 k4v2",
            b(9, 3, 64).v_bits(Bits::B2).hot_window(32).build().unwrap(),
        ),
        (
            "8/1/64 f32 k8v8 g64",
            b(8, 1, 64)
                .hot_dtype(HotDtype::F32)
                .k_bits(Bits::B8)
                .v_bits(Bits::B8)
                .value_group(64)
                .hot_window(32)
                .build()
                .unwrap(),
        ),
        (
            "4/4/32 bf16 k8v4 ps16",
            b(4, 4, 32)
                .hot_dtype(HotDtype::BF16)
                .k_bits(Bits::B8)
                .page_size(16)
                .hot_window(16)
                .build()
                .unwrap(),
        ),
        (
            "16/2/256 bf16 k4v8 ps64",
            b(16, 2, 256)
                .hot_dtype(HotDtype::BF16)
                .v_bits(Bits::B8)
                .page_size(64)
                .hot_window(64)
                .build()
                .unwrap(),
        ),
        (
            "32/8/128 bf16 full",
            b(32, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .full_precision()
                .build()
                .unwrap(),
        ),
        // Hot-only bf16 on tensor cores (decode_hmma.cuh): head_dim 64 with 3 heads per kv head and
        // 16-token pages (partial last pages), one head per kv head with rotated keys and values.
        (
            "9/3/64 bf16 full ps16",
            b(9, 3, 64)
                .hot_dtype(HotDtype::BF16)
                .page_size(16)
                .full_precision()
                .build()
                .unwrap(),
        ),
        (
            "8/8/128 bf16 full ps48 rkv",
            b(8, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .page_size(48)
                .rotation(Rotation::KeysValues)
                .full_precision()
                .build()
                .unwrap(),
        ),
        (
            "12/4/96 f16 k4v4",
            b(12, 4, 96).hot_window(32).build().unwrap(),
        ),
        // Tensor-core path (decode_mma.cuh): 8-bit codes, 16/48/64-token pages, one and two heads
        // per kv head, head_dim 64 with one key word per lane.
        (
            "32/8/128 f16 k8v8 ps16",
            b(32, 8, 128)
                .k_bits(Bits::B8)
                .v_bits(Bits::B8)
                .page_size(16)
                .hot_window(16)
                .build()
                .unwrap(),
        ),
        (
            "16/8/64 bf16 k2v8 ps64",
            b(16, 8, 64)
                .hot_dtype(HotDtype::BF16)
                .k_bits(Bits::B2)
                .v_bits(Bits::B8)
                .page_size(64)
                .hot_window(64)
                .build()
                .unwrap(),
        ),
        (
            "32/8/128 bf16 k4v4 ps64",
            b(32, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .page_size(64)
                .hot_window(64)
                .build()
                .unwrap(),
        ),
        (
            "8/8/128 f16 k8v2 ps48",
            b(8, 8, 128)
                .k_bits(Bits::B8)
                .v_bits(Bits::B2)
                .page_size(48)
                .hot_window(48)
                .build()
                .unwrap(),
        ),
        // 3-bit codes, key outlier channels and the rotation (CUDA-core path).
        (
            "9/3/64 f16 k3v3 rkv",
            b(9, 3, 64)
                .k_bits(Bits::B3)
                .v_bits(Bits::B3)
                .rotation(Rotation::KeysValues)
                .hot_window(32)
                .build()
                .unwrap(),
        ),
        (
            "32/8/128 bf16 k3v2 o4",
            b(32, 8, 128)
                .hot_dtype(HotDtype::BF16)
                .k_bits(Bits::B3)
                .v_bits(Bits::B2)
                .key_outliers(4)
                .hot_window(64)
                .build()
                .unwrap(),
        ),
        (
            "8/2/128 f16 k4v3 o2 rk",
            b(8, 2, 128)
                .v_bits(Bits::B3)
                .key_outliers(2)
                .rotation(Rotation::Keys)
                .hot_window(32)
                .build()
                .unwrap(),
        ),
        (
            "16/8/64 f32 k2v4 o8 ps16",
            b(16, 8, 64)
                .hot_dtype(HotDtype::F32)
                .k_bits(Bits::B2)
                .key_outliers(8)
                .page_size(16)
                .hot_window(16)
                .build()
                .unwrap(),
        ),
    ]
}

/// Which configs decode on tensor cores: warm pages of the bench shapes and the MMA configs
/// above, and the hot pages of hot-only bf16 configs, must; shapes outside the fragment mappings
/// must fall back to the CUDA-core path.
#[test]
fn tensor_core_path_covers_the_bench_shapes() {
    let Some(dev) = device() else { return };
    for (name, cfg) in configs() {
        let hot_mma = !cfg.warm_enabled
            && cfg.hot_dtype == HotDtype::BF16
            && cfg.group_size() <= 4
            && matches!(cfg.head_dim, 64 | 128)
            && cfg.page_size % 16 == 0;
        let want = hot_mma
            || cfg.warm_enabled
                && cfg.k_bits != Bits::B3
                && cfg.v_bits != Bits::B3
                && cfg.key_outliers == 0
                && cfg.group_size() <= 4
                && matches!(cfg.head_dim, 64 | 128)
                && cfg.page_size % 16 == 0
                && cfg.page_size <= 64
                && cfg.value_group == 32;
        let st = dev.storage(&cfg, 0).unwrap();
        assert_eq!(st.decode_uses_tensor_cores(), want, "{name}");
    }
    for (kb, vb) in [
        (Bits::B4, Bits::B4),
        (Bits::B2, Bits::B2),
        (Bits::B8, Bits::B8),
        (Bits::B4, Bits::B2),
    ] {
        for (q, kv, d) in [(32, 8, 128), (9, 3, 64)] {
            let cfg = CacheConfig::builder(1, q, kv, d)
                .hot_dtype(HotDtype::BF16)
                .k_bits(kb)
                .v_bits(vb)
                .build()
                .unwrap();
            assert!(
                dev.storage(&cfg, 0).unwrap().decode_uses_tensor_cores(),
                "{q}/{kv}/{d} {kb:?}{vb:?}"
            );
        }
    }
}

#[test]
fn kernels_compile_for_sm90() {
    if !nvrtc_present() {
        return;
    }
    // KVTIER_PTX_DIR=dir also writes each module's PTX there (scripts/ptxas-report.sh assembles
    // them with ptxas for the register / spill report, no GPU needed).
    let dir = std::env::var_os("KVTIER_PTX_DIR");
    for (name, cfg) in configs() {
        match compile_for_arch(&cfg, "sm_90") {
            Ok(ptx) => {
                assert!(ptx.contains("kvt_decode"), "{name}");
                if let Some(d) = &dir {
                    let file: String = name
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    std::fs::write(std::path::Path::new(d).join(format!("{file}.ptx")), ptx)
                        .unwrap();
                    let src = kvtier::backend::cuda::module_source(&cfg).unwrap();
                    std::fs::write(std::path::Path::new(d).join(format!("{file}.cu")), src)
                        .unwrap();
                }
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
}

/// Writes the same pages to a CPU and a CUDA storage, demotes them, and compares bytes.
#[test]
fn page_bytes_match_cpu() {
    let Some(dev) = device() else { return };
    for (name, cfg) in configs() {
        let layout = WarmLayout::of(&cfg);
        let (kvh, d, ps) = (cfg.num_kv_heads, cfg.head_dim, cfg.page_size);
        let mut cpu = CpuDevice.storage(&oracle(&cfg), 0).unwrap();
        let mut gpu: CudaStorage = dev.storage(&cfg, 0).unwrap();
        let mut rng = Rng(0x5eed + d as u64);
        let format = WarmFormat::of(&cfg);
        let mut diff_bytes = 0usize;
        let mut demoted = 0usize;
        for case in 0..8 {
            let n = if case == 3 { ps - 5 } else { ps };
            let mut k = rng.vec(n * kvh * d, 2.0);
            let mut v = rng.vec(n * kvh * d, 1.0);
            match case {
                1 => k.iter_mut().step_by(7).for_each(|x| *x = 0.25), // repeated values
                2 => v.iter_mut().for_each(|x| *x *= 1e-3),           // tiny steps
                4 => k.iter_mut().for_each(|x| *x *= 30_000.0),       // beyond the no-check bound
                5 => v[3] = 70_000.0,                                 // f16 overflow: stays hot
                6 => {
                    // constant channel: step 0
                    for t in 0..n {
                        for h in 0..kvh {
                            k[(t * kvh + h) * d] = -1.5;
                        }
                    }
                }
                _ => {}
            }
            let (sc, sg) = (cpu.alloc_hot().unwrap(), gpu.alloc_hot().unwrap());
            cpu.write_hot(sc, 0, &k, &v, n).unwrap();
            gpu.write_hot(sg, 0, &k, &v, n).unwrap();
            let e = |slot| PageEntry {
                tier: Tier::Hot,
                slot,
                n_tokens: n as u32,
                format,
            };
            let (hc, hg) = (
                cpu.read_page(&e(sc)).unwrap(),
                gpu.read_page(&e(sg)).unwrap(),
            );
            assert_eq!(hc, hg, "{name} case {case}: hot page differs");
            // Expected warm bytes from the CPU's hot values through the reference quantiser.
            let mut want = vec![0u8; layout.head_bytes * kvh];
            let mut ok = true;
            for h in 0..kvh {
                let blk = &mut want[h * layout.head_bytes..(h + 1) * layout.head_bytes];
                let (kk, vv) = (
                    &hc.0[h * n * d..(h + 1) * n * d],
                    &hc.1[h * n * d..(h + 1) * n * d],
                );
                ok &= quantize_keys(kk, n, &layout, blk) && quantize_values(vv, n, &layout, blk);
            }
            if !cfg.warm_enabled {
                // The CUDA storage has no warm pool without a warm tier: it keeps the page hot.
                assert_eq!(gpu.demote(sg, n, format).unwrap(), None, "{name}");
                assert_eq!(gpu.read_page(&e(sg)).unwrap(), hg, "{name}: hot page lost");
                continue;
            }
            let (rc, rg) = (
                cpu.demote(sc, n, format).unwrap(),
                gpu.demote(sg, n, format).unwrap(),
            );
            assert_eq!(rc.is_some(), ok, "{name} case {case}");
            assert_eq!(
                rg.is_some(),
                ok,
                "{name} case {case}: CUDA demotion outcome differs"
            );
            if let Some(ws) = rg {
                demoted += 1;
                let got = gpu.warm_bytes(ws).unwrap();
                let nd = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                if nd > 0 {
                    let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    eprintln!(
                        "{name} case {case}: {nd} bytes differ, first at {first} (block offset {}): got {} want {}",
                        first % layout.head_bytes, got[first], want[first]
                    );
                }
                diff_bytes += nd;
                let wc = PageEntry {
                    tier: Tier::Warm,
                    slot: rc.unwrap(),
                    n_tokens: n as u32,
                    format,
                };
                let wg = PageEntry {
                    tier: Tier::Warm,
                    slot: ws,
                    n_tokens: n as u32,
                    format,
                };
                assert_eq!(cpu.read_page(&wc).unwrap(), gpu.read_page(&wg).unwrap());
            } else {
                assert_eq!(gpu.read_page(&e(sg)).unwrap(), hg, "{name}: hot page lost");
            }
        }
        eprintln!("{name}: {demoted} pages demoted, {diff_bytes} warm bytes differ");
        assert_eq!(diff_bytes, 0, "{name}: warm bytes differ from the CPU's");
    }
}

struct Filled {
    cache: KvCache,
    seqs: Vec<SeqId>,
}

fn fill(cfg: &CacheConfig, device: Device, lens: &[usize], seed: u64) -> Filled {
    let cfg = &if matches!(device, Device::Cpu) {
        oracle(cfg)
    } else {
        cfg.clone()
    };
    let mut cache = KvCache::with_device(cfg.clone(), device).unwrap();
    let (kvh, d) = (cfg.num_kv_heads, cfg.head_dim);
    let mut rng = Rng(seed);
    let mut seqs = Vec::new();
    for &len in lens {
        let s = cache.add_sequence();
        let k = rng.vec(len * kvh * d, 2.0);
        let v = rng.vec(len * kvh * d, 1.0);
        let r = kvh * d;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(1 + (at * 7 + 13) % 300);
            cache
                .append(s, 0, &k[at * r..(at + n) * r], &v[at * r..(at + n) * r])
                .unwrap();
            at += n;
        }
        seqs.push(s);
    }
    Filled { cache, seqs }
}

fn compare(name: &str, a: &Attention, b: &Attention) -> (f32, f32, f32) {
    let out = max_abs(&a.output, &b.output);
    assert!(out <= 2e-5, "{name}: output max |diff| {out}");
    let mut stat = 0f32;
    for (x, y) in a.heads.iter().zip(&b.heads) {
        let de = (x.entropy - y.entropy).abs();
        let dv = (x.varentropy - y.varentropy).abs() / (1.0 + x.varentropy.abs());
        let dm = if x.max_score == y.max_score {
            0.0
        } else {
            (x.max_score - y.max_score).abs()
        };
        let dz = if x.log_z == y.log_z {
            0.0
        } else {
            (x.log_z - y.log_z).abs()
        };
        assert!(
            de <= 1e-4 && dv <= 1e-3 && dm <= 1e-4 && dz <= 1e-4,
            "{name}: stats {x:?} vs {y:?}"
        );
        stat = stat.max(de).max(dm).max(dz);
    }
    let mut mass = 0f32;
    assert_eq!(a.page_mass.len(), b.page_mass.len());
    for (x, y) in a.page_mass.iter().zip(&b.page_mass) {
        mass = mass.max(max_abs(x, y));
    }
    assert!(mass <= 1e-5, "{name}: page mass max |diff| {mass}");
    assert_eq!(a.kv_mass.len(), b.kv_mass.len());
    let mut kvm = 0f32;
    for (x, y) in a.kv_mass.iter().zip(&b.kv_mass) {
        assert_eq!(x.len(), y.len(), "{name}: kv mass lengths");
        kvm = kvm.max(max_abs(x, y));
    }
    assert!(kvm <= 1e-5, "{name}: kv mass max |diff| {kvm}");
    (out, stat, mass)
}

/// `attend_device_async`: queued without a host wait, the step's result (read by `finish_device`)
/// equals the waited-for call's although the cache appends and demotes right after queuing (those
/// writes are ordered after the step, so the kernel never sees a reused slot); back-to-back steps
/// need no finish; `finish_device` with nothing pending is `Stale`; selected cold pages are
/// refused before anything is queued; a scratch without page results finishes without them.
#[test]
fn attend_device_async_equals_the_waited_call_and_orders_later_writes_after_it() {
    use cudarc::driver::{CudaContext, DevicePtr};
    let Some(dev) = device() else { return };
    for (name, cfg) in configs().into_iter().take(3) {
        let lens = [300usize, 1500];
        let mut g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 51);
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut rng = Rng(52);
        let q = rng.vec(lens.len() * qh * d, 2.0);
        let ctx = CudaContext::new(0).unwrap();
        let user = ctx.new_stream().unwrap();
        let qd = user.clone_htod(&q).unwrap();
        let od = user.alloc_zeros::<f32>(q.len()).unwrap();
        let (qp, _a) = qd.device_ptr(&user);
        let (op, _b) = od.device_ptr(&user);
        user.synchronize().unwrap();
        let bufs = DeviceBuffers::Cuda(CudaBuffers {
            queries: qp,
            query_dtype: InputDtype::F32,
            output: op,
            stream: user.cu_stream() as u64,
        });
        let want = g
            .cache
            .attend_device_with(&mut Scratch::default(), 0, &g.seqs, &bufs, None)
            .unwrap();
        let want_out = user.clone_dtoh(&od).unwrap();
        let mut scratch = Scratch::default();
        assert!(matches!(
            g.cache.finish_device(&mut scratch, 0),
            Err(Error::Stale(_))
        ));
        // Back-to-back steps, no finish in between.
        for _ in 0..3 {
            g.cache
                .attend_device_async(&mut scratch, 0, &g.seqs, &bufs, None)
                .unwrap();
        }
        // Enough appends to demote pages and reuse their hot slots, queued right after the step.
        for &s in &g.seqs {
            let (k, v) = (rng.vec(200 * kvh * d, 2.0), rng.vec(200 * kvh * d, 1.0));
            g.cache.append(s, 0, &k, &v).unwrap();
        }
        let got = g.cache.finish_device(&mut scratch, 0).unwrap();
        assert!(got.output.is_empty());
        assert_eq!(got.heads, want.heads, "{name}");
        assert_eq!(got.page_lse, want.page_lse, "{name}");
        assert_eq!(got.kv_mass, want.kv_mass, "{name}");
        assert_eq!(got.page_mass, want.page_mass, "{name}");
        assert_eq!(user.clone_dtoh(&od).unwrap(), want_out, "{name}");
        assert!(matches!(
            g.cache.finish_device(&mut scratch, 0),
            Err(Error::Stale(_))
        ));
        // Without page results.
        scratch.set_page_results(PageResults::None);
        g.cache
            .attend_device_async(&mut scratch, 0, &g.seqs, &bufs, None)
            .unwrap();
        let now = g
            .cache
            .attend_device_with(&mut Scratch::default(), 0, &g.seqs, &bufs, None)
            .unwrap();
        let bare = g.cache.finish_device(&mut scratch, 0).unwrap();
        assert_eq!(bare.heads, now.heads, "{name}");
        assert!(!bare.has_page_results());
        // A selected cold page is refused before anything is queued.
        let first = kvtier::PageRef {
            seq: g.seqs[1],
            layer: 0,
            page: 2,
        };
        g.cache.to_cold(first).unwrap();
        assert!(matches!(
            g.cache
                .attend_device_async(&mut scratch, 0, &g.seqs, &bufs, None),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            g.cache.finish_device(&mut scratch, 0),
            Err(Error::Stale(_))
        ));
        // Left out of the selection, it is fine.
        let n: Vec<usize> = g
            .seqs
            .iter()
            .map(|s| g.cache.page_table(*s, 0).unwrap().pages().len())
            .collect();
        let mut sel = PageSelection::all(&n, kvh);
        sel.remove(1, 2);
        g.cache
            .attend_device_async(&mut scratch, 0, &g.seqs, &bufs, Some(&sel))
            .unwrap();
        let sel_att = g.cache.finish_device(&mut scratch, 0).unwrap();
        assert!(sel_att.heads.iter().all(|h| h.log_z.is_finite()));
        drop((_a, _b));
    }
}

/// The device's page-mass fold (`mass.cu`) against the host's (`Attention::finish_masses`) on the
/// device's own page lse, with and without a selection, on the host and device-buffer paths; and a
/// scratch without page results: the same output and statistics, no per-page vectors, `observe`
/// refuses the result, and the same scratch switched back gives the full result again.
#[test]
fn page_masses_fold_on_device_and_page_results_can_be_skipped() {
    use cudarc::driver::{CudaContext, DevicePtr};
    let Some(dev) = device() else { return };
    for (name, cfg) in configs().into_iter().take(4) {
        let lens = [1usize, 40, 700, 2100];
        let mut g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 41);
        let (qh, d) = (cfg.num_q_heads, cfg.head_dim);
        let mut rng = Rng(43);
        let q = rng.vec(lens.len() * qh * d, 2.0);
        let sel = random_selection(&g, &cfg, &mut rng, false);
        let ctx = CudaContext::new(0).unwrap();
        let user = ctx.new_stream().unwrap();
        let qd = user.clone_htod(&q).unwrap();
        let od = user.alloc_zeros::<f32>(q.len()).unwrap();
        let (qp, _a) = qd.device_ptr(&user);
        let (op, _b) = od.device_ptr(&user);
        user.synchronize().unwrap();
        let bufs = DeviceBuffers::Cuda(CudaBuffers {
            queries: qp,
            query_dtype: InputDtype::F32,
            output: op,
            stream: user.cu_stream() as u64,
        });
        let mut scratch = Scratch::default();
        for selection in [None, Some(&sel)] {
            let full = g
                .cache
                .attend_with(&mut scratch, 0, &g.seqs, Rows::F32(&q), selection)
                .unwrap();
            assert!(full.has_page_results());
            let mut host = full.clone();
            host.finish_masses();
            let (mut dm, mut dp) = (0f32, 0f32);
            for (x, y) in full.kv_mass.iter().zip(&host.kv_mass) {
                dm = dm.max(max_abs(x, y));
            }
            for (x, y) in full.page_mass.iter().zip(&host.page_mass) {
                dp = dp.max(max_abs(x, y));
            }
            eprintln!(
                "{name} selection {}: device vs host fold: kv mass {dm:.1e}, page mass {dp:.1e}",
                selection.is_some()
            );
            assert!(dm <= 1e-6 && dp <= 1e-6, "{name}: {dm} {dp}");
            let dev_full = g
                .cache
                .attend_device_with(&mut scratch, 0, &g.seqs, &bufs, selection)
                .unwrap();
            assert_eq!(dev_full.kv_mass, full.kv_mass, "{name}");
            assert_eq!(dev_full.page_lse, full.page_lse, "{name}");
            // Page masses only: the same masses, no lse, on both paths.
            scratch.set_page_results(PageResults::Masses);
            let masses = g
                .cache
                .attend_with(&mut scratch, 0, &g.seqs, Rows::F32(&q), selection)
                .unwrap();
            let dev_masses = g
                .cache
                .attend_device_with(&mut scratch, 0, &g.seqs, &bufs, selection)
                .unwrap();
            for m in [&masses, &dev_masses] {
                assert_eq!(m.heads, full.heads, "{name}");
                assert_eq!(m.kv_mass, full.kv_mass, "{name}");
                assert_eq!(m.page_mass, full.page_mass, "{name}");
                assert!(m.page_lse.is_empty() && m.has_page_results(), "{name}");
            }
            assert_eq!(masses.output, full.output, "{name}");
            scratch.set_page_results(PageResults::None);
            let bare = g
                .cache
                .attend_with(&mut scratch, 0, &g.seqs, Rows::F32(&q), selection)
                .unwrap();
            assert_eq!(bare.output, full.output, "{name}");
            assert_eq!(bare.heads, full.heads, "{name}");
            assert!(
                bare.page_lse.is_empty() && bare.page_mass.is_empty() && bare.kv_mass.is_empty()
            );
            assert!(!bare.has_page_results());
            let dev_bare = g
                .cache
                .attend_device_with(&mut scratch, 0, &g.seqs, &bufs, selection)
                .unwrap();
            assert_eq!(dev_bare.heads, full.heads, "{name}");
            assert!(dev_bare.page_lse.is_empty() && dev_bare.kv_mass.is_empty());
            assert!(matches!(
                g.cache.observe(0, &g.seqs, &bare),
                Err(kvtier::Error::Stale(_))
            ));
            scratch.set_page_results(PageResults::All);
            let again = g
                .cache
                .attend_with(&mut scratch, 0, &g.seqs, Rows::F32(&q), selection)
                .unwrap();
            assert_eq!(again, full, "{name}");
        }
        drop((_a, _b));
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(dev) = device() else { return };
    let lens = [1usize, 31, 33, 200, 1000, 3100, 0];
    for (name, cfg) in configs() {
        let c = fill(&cfg, Device::Cpu, &lens, 11);
        let g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 11);
        assert_eq!(
            c.cache.memory_report().warm_pages,
            g.cache.memory_report().warm_pages
        );
        for s in 0..lens.len() {
            assert_eq!(
                c.cache.page_table(c.seqs[s], 0).unwrap().pages(),
                g.cache.page_table(g.seqs[s], 0).unwrap().pages(),
                "{name}: page tables diverged"
            );
        }
        let mut rng = Rng(99);
        let q = rng.vec(lens.len() * cfg.num_q_heads * cfg.head_dim, 2.0);
        let a = c.cache.attend(0, &c.seqs, &q).unwrap();
        let b = g.cache.attend(0, &g.seqs, &q).unwrap();
        let (o, s, m) = compare(name, &a, &b);
        // Repeat (the combine's counters must have been reset) and a sub-batch.
        let b2 = g.cache.attend(0, &g.seqs, &q).unwrap();
        assert_eq!(b.output, b2.output, "{name}: second launch differs");
        let sub = [g.seqs[4], g.seqs[1]];
        let qd = cfg.num_q_heads * cfg.head_dim;
        let qs: Vec<f32> = [&q[4 * qd..5 * qd], &q[qd..2 * qd]].concat();
        let a3 = c.cache.attend(0, &[c.seqs[4], c.seqs[1]], &qs).unwrap();
        compare(name, &a3, &g.cache.attend(0, &sub, &qs).unwrap());
        eprintln!(
            "{name}: output {o:.2e}, stats {s:.2e}, page mass {m:.2e}; {}",
            g.cache.memory_report()
        );
    }
}

#[test]
fn long_context_int4_and_int2_match_cpu() {
    let Some(dev) = device() else { return };
    for vb in [Bits::B4, Bits::B2] {
        let cfg = CacheConfig::builder(1, 32, 8, 128)
            .hot_dtype(HotDtype::BF16)
            .k_bits(vb)
            .v_bits(vb)
            .build()
            .unwrap();
        let lens = [33_000usize, 9_000];
        let c = fill(&cfg, Device::Cpu, &lens, 5);
        let g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 5);
        let mut rng = Rng(3);
        let q = rng.vec(lens.len() * 32 * 128, 3.0);
        let (o, s, m) = compare(
            "long",
            &c.cache.attend(0, &c.seqs, &q).unwrap(),
            &g.cache.attend(0, &g.seqs, &q).unwrap(),
        );
        eprintln!("long context {vb:?}: output {o:.2e}, stats {s:.2e}, mass {m:.2e}");
    }
}

#[test]
fn attend_device_matches_attend() {
    let Some(dev) = device() else { return };
    // Plain, and rotated (queries rotated on the device into the plan's buffer, the output back in
    // place): the same bits as the host path, which rotates on the CPU.
    for rot in [Rotation::None, Rotation::KeysValues, Rotation::Keys] {
        let cfg = CacheConfig::builder(1, 32, 8, 128)
            .hot_dtype(HotDtype::BF16)
            .rotation(rot)
            .build()
            .unwrap();
        attend_device_case(&dev, &cfg);
    }
}

fn attend_device_case(dev: &CudaDevice, cfg: &CacheConfig) {
    use cudarc::driver::{CudaContext, DevicePtr};
    let lens = [700usize, 1300];
    let g = fill(cfg, Device::Cuda(dev.clone()), &lens, 21);
    let mut rng = Rng(8);
    let q = rng.vec(lens.len() * 32 * 128, 2.0);
    let want = g.cache.attend(0, &g.seqs, &q).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let user = ctx.new_stream().unwrap();
    let mut scratch = Scratch::default();
    for stream in [user.cu_stream() as u64, 0u64] {
        let qd = user.clone_htod(&q).unwrap();
        let od = user.alloc_zeros::<f32>(q.len()).unwrap();
        let (qp, _a) = qd.device_ptr(&user);
        let (op, _b) = od.device_ptr(&user);
        user.synchronize().unwrap();
        let bufs = DeviceBuffers::Cuda(CudaBuffers {
            queries: qp,
            query_dtype: InputDtype::F32,
            output: op,
            stream,
        });
        let got = g
            .cache
            .attend_device_with(&mut scratch, 0, &g.seqs, &bufs, None)
            .unwrap();
        assert!(got.output.is_empty());
        drop((_a, _b));
        let out = user.clone_dtoh(&od).unwrap();
        assert!(
            max_abs(&out, &want.output) <= 1e-6,
            "{:?} stream {stream}: device output differs",
            cfg.rotation
        );
        // The caller's queries are left as they were.
        assert_eq!(user.clone_dtoh(&qd).unwrap(), q);
        assert_eq!(got.heads, want.heads);
        assert_eq!(got.page_mass, want.page_mass);
        assert_eq!(got.page_lse, want.page_lse);
    }
}

/// f16 and bf16 device queries: converted on the device into the plan's f32 buffer, so the result
/// equals f32 queries holding the same (rounded) values, with and without a page selection.
#[test]
fn attend_device_f16_and_bf16_queries_match_f32() {
    use cudarc::driver::{CudaContext, DevicePtr};
    use half::{bf16, f16};
    let Some(dev) = device() else { return };
    let cfg = CacheConfig::builder(1, 32, 8, 128)
        .hot_dtype(HotDtype::BF16)
        .build()
        .unwrap();
    let lens = [900usize, 2000, 40];
    let g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 31);
    let mut rng = Rng(12);
    let q = rng.vec(lens.len() * 32 * 128, 2.0);
    let sel = random_selection(&g, &cfg, &mut rng, false);
    let ctx = CudaContext::new(0).unwrap();
    let user = ctx.new_stream().unwrap();
    let mut scratch = Scratch::default();
    for dtype in [InputDtype::F16, InputDtype::BF16] {
        let (bits, rounded): (Vec<u16>, Vec<f32>) = match dtype {
            InputDtype::F16 => q
                .iter()
                .map(|&x| {
                    let h = f16::from_f32(x);
                    (h.to_bits(), h.to_f32())
                })
                .unzip(),
            _ => q
                .iter()
                .map(|&x| {
                    let h = bf16::from_f32(x);
                    (h.to_bits(), h.to_f32())
                })
                .unzip(),
        };
        for selection in [None, Some(&sel)] {
            let want = g
                .cache
                .attend_with(
                    &mut Scratch::default(),
                    0,
                    &g.seqs,
                    Rows::F32(&rounded),
                    selection,
                )
                .unwrap();
            let qd = user.clone_htod(&bits).unwrap();
            let od = user.alloc_zeros::<f32>(q.len()).unwrap();
            let (qp, _a) = qd.device_ptr(&user);
            let (op, _b) = od.device_ptr(&user);
            user.synchronize().unwrap();
            let bufs = DeviceBuffers::Cuda(CudaBuffers {
                queries: qp,
                query_dtype: dtype,
                output: op,
                stream: user.cu_stream() as u64,
            });
            let got = g
                .cache
                .attend_device_with(&mut scratch, 0, &g.seqs, &bufs, selection)
                .unwrap();
            drop((_a, _b));
            let out = user.clone_dtoh(&od).unwrap();
            let d = max_abs(&out, &want.output);
            eprintln!(
                "{dtype:?} queries, selection {}: output {d:.2e}",
                selection.is_some()
            );
            assert!(d <= 1e-6, "{dtype:?}: device output differs by {d}");
            assert_eq!(got.heads, want.heads, "{dtype:?}");
            assert_eq!(got.page_mass, want.page_mass, "{dtype:?}");
            assert_eq!(got.page_lse, want.page_lse, "{dtype:?}");
        }
    }
    // Bad buffers are the caller's fault: typed errors, nothing launched.
    let st = g.cache.layer_storage(0).unwrap();
    let tables: Vec<&PageTable> = g
        .seqs
        .iter()
        .map(|s| g.cache.page_table(*s, 0).unwrap())
        .collect();
    let input = AttendInput {
        tables: &tables,
        queries: &[],
        selection: None,
        rotation: None,
    };
    let null = DeviceBuffers::Cuda(CudaBuffers {
        queries: 0,
        query_dtype: InputDtype::F16,
        output: 0,
        stream: 0,
    });
    match st.attend_device(&mut scratch, &input, &null) {
        Err(Error::Shape { what, .. }) => assert_eq!(what, "device buffers"),
        other => panic!("expected Error::Shape for null device buffers, got {other:?}"),
    }
    let metal = DeviceBuffers::Metal(MetalBuffers {
        queries: 1,
        query_dtype: InputDtype::F32,
        output: 1,
        queries_offset: 0,
        output_offset: 0,
    });
    match st.attend_device(&mut scratch, &input, &metal) {
        Err(Error::Unsupported(_)) => {}
        other => panic!("expected Error::Unsupported for Metal buffers, got {other:?}"),
    }
}

/// For each sequence of `f` (and each kv head unless `same_for_all_heads`), a random half of its
/// pages (at least one page of a non-empty sequence).
fn random_selection(
    f: &Filled,
    cfg: &CacheConfig,
    rng: &mut Rng,
    same_for_all_heads: bool,
) -> PageSelection {
    let kvh = cfg.num_kv_heads;
    let mut sel = PageSelection::none(f.seqs.len(), kvh);
    for (i, s) in f.seqs.iter().enumerate() {
        let np = f.cache.page_table(*s, 0).unwrap().pages().len();
        let mut pick = || {
            let mut idx: Vec<u32> = (0..np as u32).collect();
            let k = np.div_ceil(2);
            for j in 0..k {
                let r = j + (rng.next_u64() % (np - j) as u64) as usize;
                idx.swap(j, r);
            }
            idx.truncate(k);
            idx
        };
        if same_for_all_heads {
            let keep = pick();
            sel.set_all_heads(i, &keep).unwrap();
        } else {
            for kv in 0..kvh {
                let keep = pick();
                sel.set(i, kv, keep).unwrap();
            }
        }
    }
    sel
}

/// Per-page lse of two results: `-inf` in the same places, close elsewhere.
fn compare_lse(name: &str, a: &Attention, b: &Attention) {
    assert_eq!(a.page_lse.len(), b.page_lse.len(), "{name}");
    for (i, (x, y)) in a.page_lse.iter().zip(&b.page_lse).enumerate() {
        assert_eq!(x.len(), y.len(), "{name}: sequence {i}");
        for (j, (&u, &v)) in x.iter().zip(y).enumerate() {
            if u == f32::NEG_INFINITY || v == f32::NEG_INFINITY {
                assert_eq!(
                    u, v,
                    "{name}: sequence {i} lse entry {j} attended on one side only"
                );
            } else {
                assert!(
                    (u - v).abs() <= 1e-4 * (1.0 + u.abs()),
                    "{name}: sequence {i} lse entry {j}: {u} vs {v}"
                );
            }
        }
    }
}

/// `att` over tables of only the pages `keep[i]` of each sequence, re-indexed to the full tables
/// (`n_pages[i]` pages): unselected pages get mass 0 and lse `-inf`.
fn expand(att: &Attention, keep: &[Vec<u32>], n_pages: &[usize]) -> Attention {
    let (qh, kvh) = (att.num_q_heads, att.num_kv_heads);
    let mut out = att.clone();
    for (i, k) in keep.iter().enumerate() {
        let mut mass = vec![0.0; n_pages[i]];
        let mut kv_mass = vec![0.0; n_pages[i] * kvh];
        let mut lse = vec![f32::NEG_INFINITY; n_pages[i] * qh];
        for (j, &p) in k.iter().enumerate() {
            let p = p as usize;
            mass[p] = att.page_mass[i][j];
            kv_mass[p * kvh..(p + 1) * kvh]
                .copy_from_slice(&att.kv_mass[i][j * kvh..(j + 1) * kvh]);
            lse[p * qh..(p + 1) * qh].copy_from_slice(&att.page_lse[i][j * qh..(j + 1) * qh]);
        }
        out.page_mass[i] = mass;
        out.kv_mass[i] = kv_mass;
        out.page_lse[i] = lse;
    }
    out
}

/// Attention over a page selection: CUDA equals CPU over the same selection (a different random
/// half per kv head, and one half for all heads), and equals attention over tables holding only the
/// selected pages; unselected pages are never attended (nor validated: they may be cold or
/// evicted); one scratch serves selected, unselected and different batches in turn.
#[test]
fn selection_matches_cpu_and_subtables() {
    let Some(dev) = device() else { return };
    let lens = [1000usize, 3100, 33, 1, 0];
    for (name, cfg) in configs() {
        let c = fill(&cfg, Device::Cpu, &lens, 17);
        let g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 17);
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut rng = Rng(5 + d as u64);
        let q = rng.vec(lens.len() * qh * d, 2.0);
        let (mut sc, mut sg) = (Scratch::default(), Scratch::default());
        let att = |f: &Filled, s: &mut Scratch, sel: Option<&PageSelection>| {
            f.cache
                .attend_with(s, 0, &f.seqs, Rows::F32(&q), sel)
                .unwrap()
        };

        // A different random half per kv head.
        let sel = random_selection(&g, &cfg, &mut rng, false);
        let (a, b) = (att(&c, &mut sc, Some(&sel)), att(&g, &mut sg, Some(&sel)));
        let (o, sd, m) = compare(&format!("{name} per-head half"), &a, &b);
        compare_lse(&format!("{name} per-head half"), &a, &b);
        for (i, s) in g.seqs.iter().enumerate() {
            let np = g.cache.page_table(*s, 0).unwrap().pages().len();
            for kv in 0..kvh {
                for p in 0..np {
                    let chosen = sel.pages(i, kv).contains(&(p as u32));
                    assert_eq!(
                        b.attended(i, p, kv),
                        chosen,
                        "{name}: seq {i} kv {kv} page {p}"
                    );
                }
                // Each q head's masses over its kv head's selected pages sum to 1.
                if !sel.pages(i, kv).is_empty() {
                    let kvm = b.kv_page_mass(i);
                    let sum: f32 = (0..np).map(|p| kvm[p * kvh + kv]).sum();
                    assert!((sum - 1.0).abs() <= 1e-4, "{name}: kv {kv} mass sum {sum}");
                }
            }
        }

        // The same scratch without a selection, then on a sub-batch.
        let full = att(&g, &mut sg, None);
        compare(
            &format!("{name} after selection"),
            &att(&c, &mut sc, None),
            &full,
        );
        let sub = [g.seqs[1], g.seqs[0]];
        let qs: Vec<f32> = [&q[qh * d..2 * qh * d], &q[..qh * d]].concat();
        let gsub = g
            .cache
            .attend_with(&mut sg, 0, &sub, Rows::F32(&qs), None)
            .unwrap();
        let csub = c
            .cache
            .attend_with(&mut sc, 0, &[c.seqs[1], c.seqs[0]], Rows::F32(&qs), None)
            .unwrap();
        compare(&format!("{name} sub-batch"), &csub, &gsub);

        // One half for all heads: equals attention over tables of only those pages.
        let sel = random_selection(&g, &cfg, &mut rng, true);
        let (a, b) = (att(&c, &mut sc, Some(&sel)), att(&g, &mut sg, Some(&sel)));
        compare(&format!("{name} shared half"), &a, &b);
        let keep: Vec<Vec<u32>> = (0..lens.len()).map(|i| sel.pages(i, 0).to_vec()).collect();
        let n_pages: Vec<usize> = g
            .seqs
            .iter()
            .map(|s| g.cache.page_table(*s, 0).unwrap().pages().len())
            .collect();
        for (label, f) in [("cuda", &g), ("cpu", &c)] {
            let subs: Vec<PageTable> = f
                .seqs
                .iter()
                .zip(&keep)
                .map(|(s, k)| {
                    let pages = f.cache.page_table(*s, 0).unwrap().pages();
                    PageTable::from_pages(k.iter().map(|&p| pages[p as usize]).collect())
                })
                .collect();
            let refs: Vec<&PageTable> = subs.iter().collect();
            let st = f.cache.layer_storage(0).unwrap();
            // A storage attends in the cache's key basis (rotated queries, rotated output).
            let qk = f.cache.queries_in_key_basis(0, &q).into_owned();
            let mut only = st
                .attend(
                    &mut Scratch::default(),
                    &AttendInput {
                        tables: &refs,
                        queries: &qk,
                        selection: None,
                        rotation: None,
                    },
                )
                .unwrap();
            if cfg.rotation.values() {
                f.cache.rotator().inverse(0, &mut only.output);
            }
            let only = expand(&only, &keep, &n_pages);
            compare(&format!("{name} subtables ({label})"), &only, &b);
            compare_lse(&format!("{name} subtables ({label})"), &only, &b);
        }

        // Unselected entries are never looked at: cold / evicted / bogus slots may sit there.
        let tabs: Vec<PageTable> = g
            .seqs
            .iter()
            .map(|s| {
                let mut pages = g.cache.page_table(*s, 0).unwrap().pages().to_vec();
                pages.push(PageEntry {
                    tier: Tier::Evicted,
                    slot: 123_456,
                    n_tokens: cfg.page_size as u32,
                    format: WarmFormat::of(&cfg),
                });
                pages.push(PageEntry {
                    tier: Tier::Cold,
                    slot: 7,
                    n_tokens: cfg.page_size as u32,
                    format: WarmFormat::of(&cfg),
                });
                PageTable::from_pages(pages)
            })
            .collect();
        let refs: Vec<&PageTable> = tabs.iter().collect();
        let st = g.cache.layer_storage(0).unwrap();
        let q = g.cache.queries_in_key_basis(0, &q).into_owned();
        let mut with_extra = st
            .attend(
                &mut sg,
                &AttendInput {
                    tables: &refs,
                    queries: &q,
                    selection: Some(&sel),
                    rotation: None,
                },
            )
            .unwrap();
        if cfg.rotation.values() {
            g.cache.rotator().inverse(0, &mut with_extra.output);
        }
        assert_eq!(
            with_extra.output, b.output,
            "{name}: unselected extra pages changed the result"
        );
        assert_eq!(with_extra.heads, b.heads, "{name}");
        let mut bad = sel.clone();
        bad.set(0, 0, [n_pages[0] as u32]).unwrap();
        match st.attend(
            &mut sg,
            &AttendInput {
                tables: &refs,
                queries: &q,
                selection: Some(&bad),
                rotation: None,
            },
        ) {
            Err(Error::Internal(_)) => {}
            other => panic!("{name}: selecting an evicted page must fail, got {other:?}"),
        }
        // A selection of the wrong batch shape is the caller's error.
        match st.attend(
            &mut sg,
            &AttendInput {
                tables: &refs[..2],
                queries: &q[..2 * qh * d],
                selection: Some(&sel),
                rotation: None,
            },
        ) {
            Err(Error::Shape { .. }) => {}
            other => panic!("{name}: mismatched selection must fail, got {other:?}"),
        }
        eprintln!("{name}: per-head half vs CPU: output {o:.2e}, stats {sd:.2e}, mass {m:.2e}");
    }
}

/// Pages exported by the CPU import into CUDA (and back) byte for byte; CUDA-written pages export
/// exactly like CPU-written ones; imported pages attend and demote like the originals; bad page
/// bytes are typed errors.
#[test]
fn export_import_is_byte_identical() {
    let Some(dev) = device() else { return };
    for (name, cfg) in configs() {
        let (kvh, d, ps) = (cfg.num_kv_heads, cfg.head_dim, cfg.page_size);
        let format = WarmFormat::of(&cfg);
        let mut cpu = CpuDevice.storage(&oracle(&cfg), 0).unwrap();
        let mut cpu2 = CpuDevice.storage(&oracle(&cfg), 0).unwrap();
        let mut gpu: CudaStorage = dev.storage(&cfg, 0).unwrap();
        let mut rng = Rng(0xe4 + d as u64);
        let (mut cpu_entries, mut gpu_entries) = (Vec::new(), Vec::new());
        let (mut hot, mut warm) = (0, 0);
        for case in 0..6 {
            let n = [ps, ps - 3, 1, ps, ps, ps - 1][case];
            let k = rng.vec(n * kvh * d, 2.0);
            let v = rng.vec(n * kvh * d, 1.0);
            let (sc, sg) = (cpu.alloc_hot().unwrap(), gpu.alloc_hot().unwrap());
            cpu.write_hot(sc, 0, &k, &v, n).unwrap();
            gpu.write_hot(sg, 0, &k, &v, n).unwrap();
            let hot_entry = |slot| PageEntry {
                tier: Tier::Hot,
                slot,
                n_tokens: n as u32,
                format,
            };
            // Written on each backend, the hot page exports identically (zeros past n_tokens).
            let (pc, pg) = (
                cpu.export_page(&hot_entry(sc)).unwrap(),
                gpu.export_page(&hot_entry(sg)).unwrap(),
            );
            assert_eq!(pc, pg, "{name} case {case}: hot export differs");
            let mut entry = hot_entry(sc);
            if case % 2 == 0 && cfg.warm_enabled {
                if let Some(w) = cpu.demote(sc, n, format).unwrap() {
                    entry = PageEntry {
                        tier: Tier::Warm,
                        slot: w,
                        ..entry
                    };
                }
            }
            let pb = cpu.export_page(&entry).unwrap();
            let gs = gpu.import_page(&pb).unwrap();
            let ge = PageEntry { slot: gs, ..entry };
            let back = gpu.export_page(&ge).unwrap();
            assert_eq!(
                back, pb,
                "{name} case {case}: CPU -> CUDA changed the bytes"
            );
            assert_eq!(
                gpu.read_page(&ge).unwrap(),
                cpu.read_page(&entry).unwrap(),
                "{name} case {case}"
            );
            let cs2 = cpu2.import_page(&back).unwrap();
            let again = cpu2.export_page(&PageEntry { slot: cs2, ..entry }).unwrap();
            assert_eq!(
                again, pb,
                "{name} case {case}: CUDA -> CPU changed the bytes"
            );
            match entry.tier {
                Tier::Warm => warm += 1,
                _ => hot += 1,
            }
            cpu_entries.push(entry);
            gpu_entries.push(ge);
        }
        // Attention over the imported pages equals the CPU's over the originals.
        let (tc, tg) = (
            PageTable::from_pages(cpu_entries.clone()),
            PageTable::from_pages(gpu_entries.clone()),
        );
        let q = rng.vec(cfg.num_q_heads * d, 2.0);
        let input = |t| AttendInput {
            tables: std::slice::from_ref(t),
            queries: &q,
            selection: None,
            rotation: None,
        };
        let (a, b) = (
            cpu.attend(&mut Scratch::default(), &input(&&tc)).unwrap(),
            gpu.attend(&mut Scratch::default(), &input(&&tg)).unwrap(),
        );
        compare(&format!("{name} imported"), &a, &b);

        // An imported hot page keeps its largest |value|: a page beyond f16 range must stay hot
        // on demotion exactly as on the CPU (f16 hot pages cannot hold such values at all).
        if cfg.warm_enabled && cfg.hot_dtype != HotDtype::F16 {
            let mut v = rng.vec(ps * kvh * d, 1.0);
            // Beyond what f16 minimums and steps can span at any width (step > 65504).
            v[3] = 3.0e7;
            let k = rng.vec(ps * kvh * d, 62_000.0); // above the no-check bound, within f16
            let sc = cpu.alloc_hot().unwrap();
            cpu.write_hot(sc, 0, &k, &v, ps).unwrap();
            let e = PageEntry {
                tier: Tier::Hot,
                slot: sc,
                n_tokens: ps as u32,
                format,
            };
            let gs = gpu.import_page(&cpu.export_page(&e).unwrap()).unwrap();
            assert_eq!(
                gpu.demote(gs, ps, format).unwrap(),
                None,
                "{name}: demoted past f16"
            );
            assert_eq!(cpu.demote(sc, ps, format).unwrap(), None, "{name}");
            // Large but representable values demote identically (the flag is read back).
            v[3] = 0.5;
            let sc = cpu.alloc_hot().unwrap();
            cpu.write_hot(sc, 0, &k, &v, ps).unwrap();
            let e = PageEntry { slot: sc, ..e };
            let gs = gpu.import_page(&cpu.export_page(&e).unwrap()).unwrap();
            let (wc, wg) = (
                cpu.demote(sc, ps, format).unwrap().expect("cpu demotes"),
                gpu.demote(gs, ps, format).unwrap().expect("cuda demotes"),
            );
            let w = |slot| PageEntry {
                tier: Tier::Warm,
                slot,
                ..e
            };
            assert_eq!(
                cpu.export_page(&w(wc)).unwrap(),
                gpu.export_page(&w(wg)).unwrap(),
                "{name}: demotion of an imported page differs"
            );
        }

        // Bad page bytes.
        let good = cpu.export_page(&cpu_entries[1]).unwrap();
        let mut short = good.clone();
        short.data.pop();
        assert!(
            matches!(gpu.import_page(&short), Err(Error::Shape { .. })),
            "{name}: short page"
        );
        let mut long = good.clone();
        long.n_tokens = ps as u32 + 1;
        assert!(
            matches!(gpu.import_page(&long), Err(Error::Shape { .. })),
            "{name}: too many tokens"
        );
        let cold = PageBytes {
            tier: Tier::Cold,
            ..good.clone()
        };
        assert!(
            gpu.import_page(&cold).is_err(),
            "{name}: cold page imported"
        );
        if let Some(we) = cpu_entries.iter().find(|e| e.tier == Tier::Warm) {
            let other = if cfg.k_bits == Bits::B2 {
                Bits::B8
            } else {
                Bits::B2
            };
            let w = cpu.export_page(we).unwrap();
            let fmt2 = PageBytes {
                format: WarmFormat::uniform(other),
                ..w
            };
            assert!(
                matches!(gpu.import_page(&fmt2), Err(Error::Unsupported(_))),
                "{name}: warm page of another format"
            );
            assert!(!gpu.supports_format(WarmFormat::uniform(other)));
            assert!(gpu.supports_format(format));
        }
        eprintln!("{name}: {hot} hot and {warm} warm pages round-tripped");
    }
}

#[test]
fn prefill_matches_cpu() {
    let Some(dev) = device() else { return };
    let cfg = CacheConfig::builder(1, 8, 2, 64)
        .hot_dtype(HotDtype::F32)
        .hot_window(32)
        .k_bits(Bits::B8)
        .v_bits(Bits::B8)
        .build()
        .unwrap();
    let (n0, n1) = (150usize, 70usize);
    let mut rng = Rng(77);
    let (r, qd) = (2 * 64, 8 * 64);
    let k = rng.vec((n0 + n1) * r, 1.0);
    let v = rng.vec((n0 + n1) * r, 1.0);
    let q = rng.vec((n0 + n1) * qd, 1.0);
    let mut outs = Vec::new();
    for device in [Device::Cpu, Device::Cuda(dev.clone())] {
        let c_cfg = if matches!(device, Device::Cpu) {
            oracle(&cfg)
        } else {
            cfg.clone()
        };
        let mut c = KvCache::with_device(c_cfg, device).unwrap();
        let s = c.add_sequence();
        let o0 = c
            .prefill(s, 0, &q[..n0 * qd], &k[..n0 * r], &v[..n0 * r])
            .unwrap();
        let o1 = c
            .prefill(s, 0, &q[n0 * qd..], &k[n0 * r..], &v[n0 * r..])
            .unwrap();
        outs.push((o0, o1));
    }
    let (d0, d1) = (
        max_abs(&outs[0].0, &outs[1].0),
        max_abs(&outs[0].1, &outs[1].1),
    );
    eprintln!("prefill: chunk 0 {d0:.2e}, chunk 1 {d1:.2e}");
    assert!(d0 <= 2e-5 && d1 <= 2e-5);
}

#[test]
fn out_of_memory_loses_nothing() {
    let Some(dev) = device() else { return };
    let cfg = CacheConfig::builder(1, 8, 2, 64)
        .hot_dtype(HotDtype::BF16)
        .build()
        .unwrap();
    let mut gpu: CudaStorage = dev.storage(&cfg, 0).unwrap();
    let mut rng = Rng(1);
    let (k, v) = (rng.vec(32 * 2 * 64, 1.0), rng.vec(32 * 2 * 64, 1.0));
    let s = gpu.alloc_hot().unwrap();
    gpu.write_hot(s, 0, &k, &v, 32).unwrap();
    let format = WarmFormat::of(&cfg);
    let e = PageEntry {
        tier: Tier::Hot,
        slot: s,
        n_tokens: 32,
        format,
    };
    let before = gpu.read_page(&e).unwrap();
    // 2^40 hot pages of 16 KiB: far beyond any device.
    match gpu.reserve(1 << 40, 0) {
        Err(Error::Cuda(CudaError::OutOfMemory { bytes })) => {
            eprintln!("OOM as expected ({bytes} bytes)")
        }
        other => panic!("expected Error::Cuda(OutOfMemory), got {other:?}"),
    }
    assert_eq!(gpu.read_page(&e).unwrap(), before);
    let w = gpu.demote(s, 32, format).unwrap().expect("demotes");
    assert!(gpu.warm_bytes(w).is_ok());
}

/// The C calls of queued steps on a CUDA cache: `kvtier_cache_attend_device_async` then
/// `kvtier_cache_finish_device` give the statistics, page masses and output of
/// `kvtier_cache_attend_device`; finishing twice is `STALE`; a step handle without page results
/// gives head statistics and refuses page masses with `INVALID_ARGUMENT`.
#[test]
fn c_abi_queued_steps_match_the_waited_call() {
    use cudarc::driver::{CudaContext, DevicePtr};
    use kvtier::ffi::*;
    use std::ptr::null_mut;
    let Some(_dev) = device() else { return };
    let (qh, kvh, d, len) = (8usize, 2usize, 64usize, 700usize);
    // SAFETY (whole test): every pointer passed below is a live handle made here or a buffer of
    // the stated length; device addresses are allocations of the context's stream.
    unsafe {
        let mut cfg = null_mut();
        assert_eq!(
            kvtier_config_new(1, qh, kvh, d, &mut cfg),
            kvtier_status::Ok
        );
        let mut cache = null_mut();
        assert_eq!(kvtier_cache_new_cuda(cfg, 0, &mut cache), kvtier_status::Ok);
        kvtier_config_free(cfg);
        let mut seq = 0u64;
        assert_eq!(
            kvtier_cache_sequence_add(cache, &mut seq),
            kvtier_status::Ok
        );
        let mut rng = Rng(61);
        let (k, v) = (rng.vec(len * kvh * d, 2.0), rng.vec(len * kvh * d, 1.0));
        assert_eq!(
            kvtier_cache_append(cache, seq, 0, k.as_ptr(), k.len(), v.as_ptr(), v.len()),
            kvtier_status::Ok
        );
        let mut pages = 0usize;
        assert_eq!(
            kvtier_cache_sequence_pages(cache, seq, 0, &mut pages),
            kvtier_status::Ok
        );
        let q = rng.vec(qh * d, 2.0);
        let ctx = CudaContext::new(0).unwrap();
        let user = ctx.new_stream().unwrap();
        let qd = user.clone_htod(&q).unwrap();
        let od = user.alloc_zeros::<f32>(q.len()).unwrap();
        let (qp, _a) = qd.device_ptr(&user);
        let (op, _b) = od.device_ptr(&user);
        user.synchronize().unwrap();
        let stream = user.cu_stream() as *mut std::ffi::c_void;
        let run = |f: &mut dyn FnMut(*const kvtier_attention_stats) -> kvtier_status| {
            let mut heads = vec![kvtier_head_stats::default(); qh];
            let mut mass = vec![0f32; pages];
            let mut offs = vec![0usize; 2];
            let stats = kvtier_attention_stats {
                heads: heads.as_mut_ptr(),
                heads_len: qh,
                page_mass: mass.as_mut_ptr(),
                page_mass_len: pages,
                page_offsets: offs.as_mut_ptr(),
                page_offsets_len: 2,
            };
            let st = f(&stats);
            (st, heads, mass, offs)
        };
        let (st, want_heads, want_mass, want_offs) =
            run(&mut |s| kvtier_cache_attend_device(cache, 0, &seq, 1, qp, op, stream, s));
        assert_eq!(st, kvtier_status::Ok);
        let want_out = user.clone_dtoh(&od).unwrap();
        let mut step = null_mut();
        assert_eq!(kvtier_step_new(true, &mut step), kvtier_status::Ok);
        assert_eq!(
            kvtier_cache_attend_device_async(cache, step, 0, &seq, 1, qp, op, stream),
            kvtier_status::Ok
        );
        let (st, heads, mass, offs) = run(&mut |s| kvtier_cache_finish_device(cache, step, 0, s));
        assert_eq!(st, kvtier_status::Ok);
        assert_eq!(
            (heads, mass, offs),
            (want_heads.clone(), want_mass, want_offs)
        );
        assert_eq!(user.clone_dtoh(&od).unwrap(), want_out);
        assert_eq!(
            kvtier_cache_finish_device(cache, step, 0, std::ptr::null()),
            kvtier_status::Stale
        );
        kvtier_step_free(step);
        // Without page results: heads only; page masses refused.
        let mut bare = null_mut();
        assert_eq!(kvtier_step_new(false, &mut bare), kvtier_status::Ok);
        for ask_pages in [true, false] {
            assert_eq!(
                kvtier_cache_attend_device_async(cache, bare, 0, &seq, 1, qp, op, stream),
                kvtier_status::Ok
            );
            if ask_pages {
                let (st, ..) = run(&mut |s| kvtier_cache_finish_device(cache, bare, 0, s));
                assert_eq!(st, kvtier_status::InvalidArgument);
            } else {
                let mut heads = vec![kvtier_head_stats::default(); qh];
                let stats = kvtier_attention_stats {
                    heads: heads.as_mut_ptr(),
                    heads_len: qh,
                    page_mass: null_mut(),
                    page_mass_len: 0,
                    page_offsets: null_mut(),
                    page_offsets_len: 0,
                };
                assert_eq!(
                    kvtier_cache_finish_device(cache, bare, 0, &stats),
                    kvtier_status::Ok
                );
                assert_eq!(heads, want_heads);
            }
        }
        kvtier_step_free(bare);
        drop((_a, _b));
        kvtier_cache_free(cache);
    }
}
