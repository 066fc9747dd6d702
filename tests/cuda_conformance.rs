//! CUDA backend against the CPU oracle: the same inputs through both, compared within stated
//! tolerances. Tests that need a GPU skip with a message when no device (or no libcuda) is
//! present; the compile tests need only libnvrtc and skip without it.
//!
//! Tolerances (data amplitude ~1, both backends in f32 with different summation orders):
//! - hot page bytes: identical; warm page bytes after demotion: identical (0 differing bytes);
//! - attention output: max |Δ| <= 2e-5; entropy, max score, log Z: |Δ| <= 1e-4;
//!   varentropy: |Δ| <= 1e-3 * (1 + V); page mass: |Δ| <= 1e-5 per page;
//! - prefill output: max |Δ| <= 2e-5.
#![cfg(feature = "cuda")]

mod common;
use common::Rng;
use kvtier::backend::cpu::CpuDevice;
use kvtier::backend::cuda::{compile_for_arch, compile_source, CudaDevice, CudaError, CudaStorage};
use kvtier::backend::{BackendDevice, BackendStorage, Device};
use kvtier::quant::{quantize_keys, quantize_values, WarmLayout};
use kvtier::tiers::{PageEntry, Tier};
use kvtier::{Attention, Bits, CacheConfig, Error, HotDtype, KvCache, SeqId};

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

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
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
        (
            "12/4/96 f16 k4v4",
            b(12, 4, 96).hot_window(32).build().unwrap(),
        ),
    ]
}

#[test]
fn kernels_compile_for_sm90() {
    if !nvrtc_present() {
        return;
    }
    for (name, cfg) in configs() {
        match compile_for_arch(&cfg, "sm_90") {
            Ok(ptx) => assert!(ptx.contains("kvt_decode"), "{name}"),
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
        let mut cpu = CpuDevice.storage(&cfg, 0).unwrap();
        let mut gpu: CudaStorage = dev.storage(&cfg, 0).unwrap();
        let mut rng = Rng(0x5eed + d as u64);
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
                assert_eq!(gpu.demote(sg, n).unwrap(), None, "{name}");
                assert_eq!(gpu.read_page(&e(sg)).unwrap(), hg, "{name}: hot page lost");
                continue;
            }
            let (rc, rg) = (cpu.demote(sc, n).unwrap(), gpu.demote(sg, n).unwrap());
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
                };
                let wg = PageEntry {
                    tier: Tier::Warm,
                    slot: ws,
                    n_tokens: n as u32,
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
    (out, stat, mass)
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
    use cudarc::driver::{CudaContext, DevicePtr};
    let Some(dev) = device() else { return };
    let cfg = CacheConfig::builder(1, 32, 8, 128)
        .hot_dtype(HotDtype::BF16)
        .build()
        .unwrap();
    let lens = [700usize, 1300];
    let g = fill(&cfg, Device::Cuda(dev.clone()), &lens, 21);
    let mut rng = Rng(8);
    let q = rng.vec(lens.len() * 32 * 128, 2.0);
    let want = g.cache.attend(0, &g.seqs, &q).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let user = ctx.new_stream().unwrap();
    for stream in [user.cu_stream() as u64, 0u64] {
        let qd = user.clone_htod(&q).unwrap();
        let od = user.alloc_zeros::<f32>(q.len()).unwrap();
        let (qp, _a) = qd.device_ptr(&user);
        let (op, _b) = od.device_ptr(&user);
        user.synchronize().unwrap();
        let bufs = kvtier::DeviceBuffers {
            queries: qp,
            output: op,
            stream,
        };
        let got = g.cache.attend_device(0, &g.seqs, bufs).unwrap();
        assert!(got.output.is_empty());
        drop((_a, _b));
        let out = user.clone_dtoh(&od).unwrap();
        assert!(
            max_abs(&out, &want.output) <= 1e-6,
            "stream {stream}: device output differs"
        );
        assert_eq!(got.heads, want.heads);
        assert_eq!(got.page_mass, want.page_mass);
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
        let mut c = KvCache::with_device(cfg.clone(), device).unwrap();
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
    let e = PageEntry {
        tier: Tier::Hot,
        slot: s,
        n_tokens: 32,
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
    let w = gpu.demote(s, 32).unwrap().expect("demotes");
    assert!(gpu.warm_bytes(w).is_ok());
}
