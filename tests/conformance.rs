//! Backend conformance, written once and run on every compiled backend (`test_device!`, as
//! candle's `test_device!` does): each body takes a [`Device`] and checks it against the CPU
//! oracle (the f32-score path) and a naive f64 reference on the same inputs.
//!
//! - CPU: always.
//! - CUDA (`--features cuda`): when a device is present (skips with a message otherwise).
//! - Metal: on macOS with `--features metal`, the GPU; with `--features metal-emu` (any host, as in
//!   CI) the emulator, which runs the same Metal storage code and the same `.metal` kernels
//!   compiled as C++ on the CPU.
//!
//! Tolerances (data amplitude ~1, f32 with different summation orders): hot and warm page bytes
//! identical to the CPU's (demotion included); attention output max |Δ| <= 2e-5 and entropy,
//! max score, log Z |Δ| <= 1e-4, varentropy |Δ| <= 1e-3 (1 + V), page masses |Δ| <= 1e-5 against
//! the CPU; against the f64 reference over the dequantised pages, output max |Δ| <= 1e-4.

mod common;
use common::{max_abs, naive, oracle, Rng};
use kvtier::backend::cpu::CpuDevice;
use kvtier::backend::{BackendDevice, BackendStorage, Device};
use kvtier::quant::{quantize_keys, quantize_values, WarmLayout};
use kvtier::{
    Attention, Bits, CacheConfig, HotDtype, KvCache, PageEntry, PageRef, PageResults,
    PageSelection, Rows, Scratch, SeqId, Tier, WarmFormat,
};

/// `test_device!(body, cpu_name, cuda_name, metal_name)`: one `#[test]` per compiled backend.
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident, $metal:ident) => {
        #[test]
        fn $cpu() {
            $body(&Device::Cpu);
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            match kvtier::backend::cuda::CudaDevice::new(0) {
                Ok(d) => $body(&Device::Cuda(d)),
                Err(e) => eprintln!("skipping {}: no CUDA device ({e})", stringify!($cuda)),
            }
        }

        #[cfg(any(feature = "metal", feature = "metal-emu"))]
        #[test]
        fn $metal() {
            match metal_device() {
                Some(d) => $body(&Device::Metal(d)),
                None => eprintln!("skipping {}: no Metal device", stringify!($metal)),
            }
        }
    };
}

/// The Metal device: the GPU where there is one (macOS, `metal`), else the emulator
/// (`metal-emu`).
#[cfg(any(feature = "metal", feature = "metal-emu"))]
fn metal_device() -> Option<kvtier::backend::metal::MetalDevice> {
    use kvtier::backend::metal::MetalDevice;
    match MetalDevice::new() {
        Ok(d) => Some(d),
        #[cfg(feature = "metal-emu")]
        Err(_) => Some(MetalDevice::emulated()),
        #[cfg(not(feature = "metal-emu"))]
        Err(e) => {
            eprintln!("no Metal device: {e}");
            None
        }
    }
}

fn configs() -> Vec<(&'static str, CacheConfig)> {
    let b = |q, kv, d| CacheConfig::builder(1, q, kv, d);
    vec![
        (
            "9/3/64 f16 k4v2",
            b(9, 3, 64).v_bits(Bits::B2).hot_window(32).build().unwrap(),
        ),
        (
            "8/2/128 bf16 k2v2",
            b(8, 2, 128)
                .hot_dtype(HotDtype::BF16)
                .k_bits(Bits::B2)
                .v_bits(Bits::B2)
                .hot_window(32)
                .build()
                .unwrap(),
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
            "4/4/32 bf16 k3v3 ps16",
            b(4, 4, 32)
                .hot_dtype(HotDtype::BF16)
                .k_bits(Bits::B3)
                .v_bits(Bits::B3)
                .page_size(16)
                .hot_window(16)
                .build()
                .unwrap(),
        ),
    ]
}

fn storage_cfg(dev: &Device, cfg: &CacheConfig) -> CacheConfig {
    if matches!(dev, Device::Cpu) {
        oracle(cfg)
    } else {
        cfg.clone()
    }
}

/// Hot pages as written, and demotion: outcome and warm bytes identical to the CPU's reference
/// quantiser (repeated values, tiny steps, constant channels, a short page, f16 overflow, f16
/// subnormals), read
/// back identical; export from one backend and import into the other keeps every byte.
fn page_bytes_match_cpu(dev: &Device) {
    for (name, cfg) in configs() {
        let layout = WarmLayout::of(&cfg);
        let (kvh, d, ps) = (cfg.num_kv_heads, cfg.head_dim, cfg.page_size);
        let mut cpu = CpuDevice.storage(&oracle(&cfg), 0).unwrap();
        let mut st = dev.storage(&storage_cfg(dev, &cfg), 0).unwrap();
        let mut rng = Rng(0x5eed + d as u64);
        let format = WarmFormat::of(&cfg);
        let mut demoted = 0;
        for case in 0..8 {
            let n = if case == 3 { ps - 5 } else { ps };
            let mut k = rng.vec(n * kvh * d, 2.0);
            let mut v = rng.vec(n * kvh * d, 1.0);
            match case {
                1 => k.iter_mut().step_by(7).for_each(|x| *x = 0.25),
                2 => v.iter_mut().for_each(|x| *x *= 1e-3),
                4 => k.iter_mut().for_each(|x| *x *= 3_000.0),
                5 => v[3] = 70_000.0, // beyond f16: the page stays hot
                6 => (0..n).for_each(|t| (0..kvh).for_each(|h| k[(t * kvh + h) * d] = -1.5)),
                // f16 subnormals (below 6.1e-5): exact conversions, not flushed ones.
                7 => k.iter_mut().chain(v.iter_mut()).for_each(|x| *x *= 2e-5),
                _ => {}
            }
            let (sc, sd) = (cpu.alloc_hot().unwrap(), st.alloc_hot().unwrap());
            cpu.write_hot(sc, 0, &k, &v, n).unwrap();
            st.write_hot(sd, 0, &k, &v, n).unwrap();
            let e = |tier, slot| PageEntry {
                tier,
                slot,
                n_tokens: n as u32,
                format,
            };
            let hc = cpu.read_page(&e(Tier::Hot, sc)).unwrap();
            assert_eq!(
                hc,
                st.read_page(&e(Tier::Hot, sd)).unwrap(),
                "{name} case {case}: hot page"
            );
            assert_eq!(
                cpu.export_page(&e(Tier::Hot, sc)).unwrap(),
                st.export_page(&e(Tier::Hot, sd)).unwrap(),
                "{name} case {case}: hot bytes"
            );
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
            let rc = cpu.demote(sc, n, format).unwrap();
            let rd = st.demote(sd, n, format).unwrap();
            assert_eq!(rc.is_some(), ok, "{name} case {case}: CPU outcome");
            assert_eq!(rd.is_some(), ok, "{name} case {case}: demotion outcome");
            let Some(wd) = rd else {
                assert_eq!(
                    st.read_page(&e(Tier::Hot, sd)).unwrap(),
                    hc,
                    "{name}: a refused demotion lost the hot page"
                );
                continue;
            };
            demoted += 1;
            let got = st.export_page(&e(Tier::Warm, wd)).unwrap();
            let nd = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(got.data.len(), want.len(), "{name}: warm page length");
            assert_eq!(nd, 0, "{name} case {case}: {nd} warm bytes differ");
            let wc = e(Tier::Warm, rc.unwrap());
            assert_eq!(
                cpu.read_page(&wc).unwrap(),
                st.read_page(&e(Tier::Warm, wd)).unwrap(),
                "{name} case {case}: dequantised read-back"
            );
            // Across backends in both directions.
            let back = st.import_page(&cpu.export_page(&wc).unwrap()).unwrap();
            assert_eq!(st.export_page(&e(Tier::Warm, back)).unwrap(), got);
            let there = cpu.import_page(&got).unwrap();
            assert_eq!(cpu.export_page(&e(Tier::Warm, there)).unwrap(), got);
            let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
            let (mut lo2, mut hi2) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
            cpu.warm_key_bounds(&wc, &mut lo, &mut hi).unwrap();
            st.warm_key_bounds(&e(Tier::Warm, wd), &mut lo2, &mut hi2)
                .unwrap();
            assert_eq!((&lo, &hi), (&lo2, &hi2), "{name}: key bounds");
            let (mut ve, mut ve2) = (vec![0f32; kvh], vec![0f32; kvh]);
            cpu.warm_value_error(&wc, &mut ve).unwrap();
            st.warm_value_error(&e(Tier::Warm, wd), &mut ve2).unwrap();
            assert_eq!(ve, ve2, "{name}: value error bounds");
            // A hot page has no warm parameters: a typed error, not a read of the wrong slot.
            assert!(st
                .warm_key_bounds(&e(Tier::Hot, sd), &mut lo, &mut hi)
                .is_err());
        }
        assert!(demoted >= 4, "{name}: only {demoted} demotions ran");
    }
}
test_device!(
    page_bytes_match_cpu,
    page_bytes_match_cpu_on_cpu,
    page_bytes_match_cpu_on_cuda,
    page_bytes_match_cpu_on_metal
);

/// Demotion of a batch (`demote_many`: one launch on CUDA) equals demoting each page alone on the
/// CPU: the same outcome per page (a page beyond f16 in the middle of the batch stays hot while the
/// others demote) and the same warm bytes.
fn batched_demotion_matches_cpu(dev: &Device) {
    for (name, cfg) in configs() {
        let (kvh, d, ps) = (cfg.num_kv_heads, cfg.head_dim, cfg.page_size);
        let mut cpu = CpuDevice.storage(&oracle(&cfg), 0).unwrap();
        let mut st = dev.storage(&storage_cfg(dev, &cfg), 0).unwrap();
        let mut rng = Rng(0xba7c + d as u64);
        let format = WarmFormat::of(&cfg);
        let (mut jobs, mut cpu_slots, mut hot) = (Vec::new(), Vec::new(), Vec::new());
        for case in 0..6 {
            let n = if case == 2 { ps - 3 } else { ps };
            let k = rng.vec(n * kvh * d, 2.0);
            let mut v = rng.vec(n * kvh * d, 1.0);
            if case == 3 {
                v[5] = -1e6; // a minimum beyond f16: this page stays hot, the rest demote
            }
            let (sc, sd) = (cpu.alloc_hot().unwrap(), st.alloc_hot().unwrap());
            cpu.write_hot(sc, 0, &k, &v, n).unwrap();
            st.write_hot(sd, 0, &k, &v, n).unwrap();
            jobs.push((sd, n));
            cpu_slots.push((sc, n));
            let e = PageEntry {
                tier: Tier::Hot,
                slot: sd,
                n_tokens: n as u32,
                format,
            };
            hot.push(st.export_page(&e).unwrap());
        }
        // A batched export (one synchronisation on CUDA) equals exporting page by page.
        let entries: Vec<PageEntry> = jobs
            .iter()
            .map(|&(slot, n)| PageEntry {
                tier: Tier::Hot,
                slot,
                n_tokens: n as u32,
                format,
            })
            .collect();
        assert_eq!(
            st.export_pages(&entries).unwrap(),
            hot,
            "{name}: batched export"
        );
        let mut out = vec![Some(u32::MAX)]; // cleared by the call
        st.demote_many(&jobs, format, &mut out).unwrap();
        assert_eq!(out.len(), jobs.len(), "{name}: one result per page");
        for (i, (&(sc, n), &(sd, _))) in cpu_slots.iter().zip(&jobs).enumerate() {
            let e = |tier, slot| PageEntry {
                tier,
                slot,
                n_tokens: n as u32,
                format,
            };
            let want = cpu.demote(sc, n, format).unwrap();
            assert_eq!(out[i].is_some(), want.is_some(), "{name} page {i}: outcome");
            match (out[i], want) {
                (Some(wd), Some(wc)) => assert_eq!(
                    st.export_page(&e(Tier::Warm, wd)).unwrap(),
                    cpu.export_page(&e(Tier::Warm, wc)).unwrap(),
                    "{name} page {i}: warm bytes"
                ),
                _ => assert_eq!(
                    st.export_page(&e(Tier::Hot, sd)).unwrap(),
                    hot[i],
                    "{name} page {i}: a refused demotion changed the hot page"
                ),
            }
        }
        assert_eq!(
            out.iter().filter(|o| o.is_none()).count(),
            1,
            "{name}: only the page beyond f16 stays hot"
        );
        let warm: Vec<PageEntry> = jobs
            .iter()
            .zip(&out)
            .filter_map(|(&(_, n), o)| {
                o.map(|slot| PageEntry {
                    tier: Tier::Warm,
                    slot,
                    n_tokens: n as u32,
                    format,
                })
            })
            .collect();
        let one: Vec<_> = warm.iter().map(|e| st.export_page(e).unwrap()).collect();
        assert_eq!(
            st.export_pages(&warm).unwrap(),
            one,
            "{name}: batched warm export"
        );
        let freed = PageEntry {
            tier: Tier::Warm,
            slot: u32::MAX,
            n_tokens: 1,
            format,
        };
        assert!(
            st.export_pages(&[warm[0], freed]).is_err(),
            "{name}: an export naming a slot that is not allocated is an error"
        );
    }
}
test_device!(
    batched_demotion_matches_cpu,
    batched_demotion_matches_cpu_on_cpu,
    batched_demotion_matches_cpu_on_cuda,
    batched_demotion_matches_cpu_on_metal
);

/// A batched export larger than one synchronisation's chunk (CUDA copies 8 MiB per chunk):
/// 80 hot pages of 128 KiB, every page equal to its own export.
fn large_batched_export_matches(dev: &Device) {
    let cfg = CacheConfig::builder(1, 32, 8, 128)
        .hot_dtype(HotDtype::BF16)
        .build()
        .unwrap();
    let (kvh, d, ps) = (cfg.num_kv_heads, cfg.head_dim, cfg.page_size);
    let mut st = dev.storage(&storage_cfg(dev, &cfg), 0).unwrap();
    let mut rng = Rng(0xe4);
    let format = WarmFormat::of(&cfg);
    let entries: Vec<PageEntry> = (0..80)
        .map(|i| {
            let n = if i % 7 == 3 { ps - 1 } else { ps };
            let slot = st.alloc_hot().unwrap();
            let (k, v) = (rng.vec(n * kvh * d, 1.0), rng.vec(n * kvh * d, 1.0));
            st.write_hot(slot, 0, &k, &v, n).unwrap();
            PageEntry {
                tier: Tier::Hot,
                slot,
                n_tokens: n as u32,
                format,
            }
        })
        .collect();
    let one: Vec<_> = entries.iter().map(|e| st.export_page(e).unwrap()).collect();
    assert!(one.iter().map(|p| p.data.len()).sum::<usize>() > 8 << 20);
    assert_eq!(st.export_pages(&entries).unwrap(), one);
}
test_device!(
    large_batched_export_matches,
    large_batched_export_matches_on_cpu,
    large_batched_export_matches_on_cuda,
    large_batched_export_matches_on_metal
);

struct Filled {
    cache: KvCache,
    seqs: Vec<SeqId>,
}

/// A cache on `device` holding sequences of `lens` tokens (appended in uneven chunks, so pages
/// demote as they leave the hot window).
fn fill(cfg: &CacheConfig, device: Device, lens: &[usize], seed: u64) -> Filled {
    let (kvh, d) = (cfg.num_kv_heads, cfg.head_dim);
    let mut rng = Rng(seed);
    let data: Vec<_> = lens
        .iter()
        .map(|&len| (rng.vec(len * kvh * d, 2.0), rng.vec(len * kvh * d, 1.0)))
        .collect();
    fill_from(cfg, device, &data)
}

/// A cache on `device` holding one sequence per `(keys, values)` (`[tokens][kv_heads][head_dim]`
/// each), appended as [`fill`] does.
fn fill_from(cfg: &CacheConfig, device: Device, data: &[(Vec<f32>, Vec<f32>)]) -> Filled {
    let mut cache = KvCache::with_device(cfg.clone(), device).unwrap();
    let (kvh, d) = (cfg.num_kv_heads, cfg.head_dim);
    let mut seqs = Vec::new();
    for (k, v) in data {
        let s = cache.add_sequence();
        let r = kvh * d;
        let len = k.len() / r;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(1 + (at * 7 + 13) % 50);
            cache
                .append(s, 0, &k[at * r..(at + n) * r], &v[at * r..(at + n) * r])
                .unwrap();
            at += n;
        }
        seqs.push(s);
    }
    Filled { cache, seqs }
}

fn compare(name: &str, a: &Attention, b: &Attention) {
    let out = max_abs(&a.output, &b.output);
    assert!(out <= 2e-5, "{name}: output max |diff| {out}");
    for (x, y) in a.heads.iter().zip(&b.heads) {
        let ok = (x.entropy - y.entropy).abs() <= 1e-4
            && (x.varentropy - y.varentropy).abs() <= 1e-3 * (1.0 + x.varentropy.abs())
            && (x.max_score == y.max_score || (x.max_score - y.max_score).abs() <= 1e-4)
            && (x.log_z == y.log_z || (x.log_z - y.log_z).abs() <= 1e-4);
        assert!(ok, "{name}: stats {x:?} vs {y:?}");
    }
    assert_eq!(a.page_mass.len(), b.page_mass.len(), "{name}");
    for (x, y) in a.page_mass.iter().zip(&b.page_mass) {
        assert!(max_abs(x, y) <= 1e-5, "{name}: page mass");
    }
    for (x, y) in a.kv_mass.iter().zip(&b.kv_mass) {
        assert!(max_abs(x, y) <= 1e-5, "{name}: kv mass");
    }
    for (x, y) in a.page_lse.iter().zip(&b.page_lse) {
        assert_eq!(x.len(), y.len(), "{name}: page lse length");
        for (p, q) in x.iter().zip(y) {
            assert!(
                p == q || (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                "{name}: page lse {p} vs {q}"
            );
        }
    }
}

/// Batched decode over hot and warm pages against the CPU oracle and against the f64 reference
/// over each page as stored (read back dequantised); every page-results mode; a random page
/// selection against the CPU over the same selection.
fn attention_matches_cpu(dev: &Device) {
    for (name, cfg) in configs() {
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        let lens = [1, 37, 300, 129];
        let ours = fill(&storage_cfg(dev, &cfg), dev.clone(), &lens, 7);
        let cpu = fill(&oracle(&cfg), Device::Cpu, &lens, 7);
        let mut rng = Rng(99);
        let q = rng.vec(lens.len() * qh * d, 1.0);
        let want = cpu.cache.attend(0, &cpu.seqs, &q).unwrap();
        let got = ours.cache.attend(0, &ours.seqs, &q).unwrap();
        compare(name, &want, &got);
        // The f64 reference over the pages as stored.
        for (i, &s) in ours.seqs.iter().enumerate() {
            let (ks, vs) = ours.cache.read_tokens(s, 0).unwrap();
            let len = ours.cache.page_table(s, 0).unwrap().len();
            let (out, stats, _) =
                naive(&q[i * qh * d..(i + 1) * qh * d], &ks, &vs, len, qh, kvh, d);
            let err = max_abs(&out, got.output_of(i));
            assert!(err <= 1e-4, "{name} seq {i}: output vs f64 reference {err}");
            for (h, st) in stats.iter().enumerate() {
                let e = (st.0 - got.heads_of(i)[h].entropy as f64).abs();
                assert!(e <= 1e-3, "{name} seq {i} head {h}: entropy off by {e}");
            }
        }
        for what in [PageResults::Masses, PageResults::None] {
            let mut sc = Scratch::with_page_results(what);
            let a = ours
                .cache
                .attend_with(&mut sc, 0, &ours.seqs, Rows::F32(&q), None)
                .unwrap();
            assert!(max_abs(&a.output, &got.output) <= 1e-6, "{name} {what:?}");
            assert_eq!(a.page_lse.is_empty(), !what.lse(), "{name} {what:?}");
            assert_eq!(a.has_page_results(), what.masses(), "{name} {what:?}");
        }
        // A random selection: every other page, and the last page always.
        let n_pages: Vec<usize> = ours
            .seqs
            .iter()
            .map(|&s| ours.cache.page_table(s, 0).unwrap().pages().len())
            .collect();
        let mut sel = PageSelection::none(lens.len(), kvh);
        for (i, &n) in n_pages.iter().enumerate() {
            for kv in 0..kvh {
                let keep = (0..n as u32)
                    .filter(|p| (p + kv as u32 + i as u32).is_multiple_of(2) || *p + 1 == n as u32);
                sel.set(i, kv, keep).unwrap();
            }
        }
        let mut s1 = Scratch::default();
        let mut s2 = Scratch::default();
        let want = cpu
            .cache
            .attend_with(&mut s1, 0, &cpu.seqs, Rows::F32(&q), Some(&sel))
            .unwrap();
        let got = ours
            .cache
            .attend_with(&mut s2, 0, &ours.seqs, Rows::F32(&q), Some(&sel))
            .unwrap();
        compare(&format!("{name} selected"), &want, &got);
    }
}
test_device!(
    attention_matches_cpu,
    attention_matches_cpu_on_cpu,
    attention_matches_cpu_on_cuda,
    attention_matches_cpu_on_metal
);

/// Query-time elimination and certified attention read each warm page's key bounds and value
/// error bounds from the backend: on every backend they equal the CPU's, so the same pages are
/// skipped or read exactly, and the eliminated attention matches the CPU's.
fn elimination_and_certification_match_cpu(dev: &Device) {
    use kvtier::eliminate::{EliminationInput, EliminationScratch, Eliminator};
    use kvtier::monitor::Certifier;
    for (name, cfg) in configs() {
        let (qh, d) = (cfg.num_q_heads, cfg.head_dim);
        let (kvh, ps) = (cfg.num_kv_heads, cfg.page_size);
        let lens = [700usize, 260];
        // Every key near a level c (uniform in [-1, 1]) shared by the channels of its page and kv
        // head, and queries in [0.5, 1.5]: page scores near c·Σq/√d, apart by several nats, with
        // tight boxes (noise 0.1), so that ε-bounded elimination has pages to skip.
        let mut rng = Rng(11);
        let data: Vec<_> = lens
            .iter()
            .map(|&len| {
                let levels = rng.vec(len.div_ceil(ps) * kvh, 1.0);
                let noise = rng.vec(len * kvh * d, 0.1);
                let k = (0..len * kvh * d)
                    .map(|i| {
                        let (t, h) = (i / (kvh * d), (i / d) % kvh);
                        levels[(t / ps) * kvh + h] + noise[i]
                    })
                    .collect();
                (k, rng.vec(len * kvh * d, 1.0))
            })
            .collect();
        let ours = fill_from(&storage_cfg(dev, &cfg), dev.clone(), &data);
        let cpu = fill_from(&oracle(&cfg), Device::Cpu, &data);
        let q: Vec<f32> = Rng(5)
            .vec(lens.len() * qh * d, 0.5)
            .iter()
            .map(|x| x + 1.0)
            .collect();
        let input = |c: &Filled| (c.seqs.clone(), q.clone());
        let mut skipped = 0;
        for eps in [1e-3f32, 1e-2, 0.1] {
            let e = Eliminator::new(eps).unwrap();
            let run = |c: &Filled| {
                let (seqs, queries) = input(c);
                e.attend(
                    &c.cache,
                    &mut EliminationScratch::default(),
                    &EliminationInput {
                        layer: 0,
                        seqs: &seqs,
                        queries: &queries,
                    },
                )
                .unwrap()
            };
            let (want, wr) = run(&cpu);
            let (got, gr) = run(&ours);
            assert_eq!(wr.candidates, gr.candidates, "{name} eps {eps}: candidates");
            assert!(wr.candidates > 0, "{name}: no warm candidates");
            assert_eq!(
                wr.skipped_pages, gr.skipped_pages,
                "{name} eps {eps}: skipped"
            );
            assert!(
                max_abs(&wr.mass_bound, &gr.mass_bound) <= 1e-5,
                "{name}: mass bound"
            );
            assert!(
                gr.mass_bound.iter().all(|&m| m <= eps),
                "{name}: bound above eps"
            );
            compare(&format!("{name} eliminated eps {eps}"), &want, &got);
            skipped += gr.skipped_pages;
        }
        assert!(
            skipped > 0,
            "{name}: no page was ever skipped: the test checks nothing"
        );
        // Every page's bounds equal the CPU's, also after a page went hot and came back (its
        // host copy of the bounds on a device backend must not outlive the bytes it was read
        // from); on device backends the copy is held and counted as metadata.
        let mut ours = ours;
        let mut cpu = cpu;
        let before = ours.cache.memory_report().metadata_bytes;
        let all_bounds = |c: &Filled| {
            let mut v = Vec::new();
            for &s in &c.seqs {
                for p in 0..c.cache.page_table(s, 0).unwrap().pages().len() {
                    let (mut lo, mut hi) = (vec![0f32; kvh * d], vec![0f32; kvh * d]);
                    let b = c.cache.page_key_bounds(s, 0, p, &mut lo, &mut hi).unwrap();
                    let mut ve = vec![0f32; kvh];
                    c.cache.page_value_error(s, 0, p, &mut ve).unwrap();
                    v.push((b, lo, hi, ve));
                }
            }
            v
        };
        assert_eq!(all_bounds(&cpu), all_bounds(&ours), "{name}: page bounds");
        let held = ours.cache.memory_report().metadata_bytes;
        if !matches!(dev, Device::Cpu) {
            assert!(
                held > before,
                "{name}: no host copy of device bounds counted"
            );
        }
        let fmt = WarmFormat::of(&cfg);
        for c in [&mut ours, &mut cpu] {
            let p = PageRef {
                seq: c.seqs[0],
                layer: 0,
                page: 3,
            };
            assert_eq!(
                c.cache.page_table(p.seq, 0).unwrap().pages()[3].tier,
                Tier::Warm
            );
            c.cache.promote(p).unwrap();
            c.cache.demote(p, fmt).unwrap();
        }
        assert_eq!(
            all_bounds(&cpu),
            all_bounds(&ours),
            "{name}: bounds after a move"
        );
        let after = ours.cache.memory_report().metadata_bytes;
        assert!(
            after <= held + 64,
            "{name}: copies pile up ({held} -> {after})"
        );
        // Certified attention: the pages whose bounds exceed the tolerance are the same.
        let cert = Certifier::new(0.05)
            .unwrap()
            .with_value_tolerance(0.02)
            .unwrap();
        for i in 0..lens.len() {
            let qi = &q[i * qh * d..(i + 1) * qh * d];
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let wa = cert
                .uncertain_pages(&cpu.cache, 0, cpu.seqs[i], qi, &mut a)
                .unwrap();
            let wb = cert
                .uncertain_pages(&ours.cache, 0, ours.seqs[i], qi, &mut b)
                .unwrap();
            assert_eq!(a, b, "{name} seq {i}: uncertain pages");
            assert_eq!(wa, wb, "{name} seq {i}: largest score bound");
        }
    }
}
test_device!(
    elimination_and_certification_match_cpu,
    elimination_and_certification_match_cpu_on_cpu,
    elimination_and_certification_match_cpu_on_cuda,
    elimination_and_certification_match_cpu_on_metal
);

/// Chunked prefill (cached pages on the device, the causal block on the host) against the CPU.
fn prefill_matches_cpu(dev: &Device) {
    for (name, cfg) in configs() {
        let (qh, kvh, d) = (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim);
        let mut ours = fill(&storage_cfg(dev, &cfg), dev.clone(), &[70], 3);
        let mut cpu = fill(&oracle(&cfg), Device::Cpu, &[70], 3);
        let mut rng = Rng(5);
        let n = 9;
        let (q, k, v) = (
            rng.vec(n * qh * d, 1.0),
            rng.vec(n * kvh * d, 2.0),
            rng.vec(n * kvh * d, 1.0),
        );
        let a = cpu.cache.prefill(cpu.seqs[0], 0, &q, &k, &v).unwrap();
        let b = ours.cache.prefill(ours.seqs[0], 0, &q, &k, &v).unwrap();
        let err = max_abs(&a, &b);
        assert!(err <= 2e-5, "{name}: prefill max |diff| {err}");
    }
}
test_device!(
    prefill_matches_cpu,
    prefill_matches_cpu_on_cpu,
    prefill_matches_cpu_on_cuda,
    prefill_matches_cpu_on_metal
);

/// Queries and output in Metal buffers (f32, f16, bf16 queries) equal the host call's result.
#[cfg(feature = "metal-emu")]
#[test]
fn metal_attend_device_matches_attend() {
    use kvtier::backend::metal::{MetalBuffers, MetalDevice};
    use kvtier::backend::DeviceBuffers;
    use kvtier::InputDtype;
    let dev = metal_device().unwrap_or_else(MetalDevice::emulated);
    let (_, cfg) = configs().remove(0);
    let (qh, d) = (cfg.num_q_heads, cfg.head_dim);
    let ours = fill(&cfg, Device::Metal(dev.clone()), &[40, 200], 11);
    let mut rng = Rng(4);
    let q = rng.vec(2 * qh * d, 1.0);
    for dtype in [InputDtype::F32, InputDtype::F16, InputDtype::BF16] {
        // The same rounded values on the host.
        let (bytes, qr): (Vec<u8>, Vec<f32>) = match dtype {
            InputDtype::F32 => (bytemuck_f32(&q), q.clone()),
            InputDtype::F16 => {
                let h: Vec<half::f16> = q.iter().map(|&x| half::f16::from_f32(x)).collect();
                (
                    h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    h.iter().map(|x| x.to_f32()).collect(),
                )
            }
            InputDtype::BF16 => {
                let h: Vec<half::bf16> = q.iter().map(|&x| half::bf16::from_f32(x)).collect();
                (
                    h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    h.iter().map(|x| x.to_f32()).collect(),
                )
            }
        };
        let want = ours.cache.attend(0, &ours.seqs, &qr).unwrap();
        let mut qb = dev.buffer(bytes.len()).unwrap();
        qb.write(0, &bytes).unwrap();
        let ob = dev.buffer(2 * qh * d * 4).unwrap();
        let bufs = DeviceBuffers::Metal(MetalBuffers {
            queries: qb.handle(),
            query_dtype: dtype,
            output: ob.handle(),
            queries_offset: 0,
            output_offset: 0,
        });
        let got = ours.cache.attend_device(0, &ours.seqs, bufs).unwrap();
        assert!(got.output.is_empty());
        let out: Vec<f32> = ob
            .bytes(0, 2 * qh * d * 4)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(max_abs(&out, &want.output) <= 1e-6, "{dtype:?} output");
        assert_eq!(got.heads, want.heads, "{dtype:?} statistics");
        assert_eq!(got.page_mass, want.page_mass, "{dtype:?} masses");
    }
    // Queries and output at offsets inside larger buffers.
    let want = ours.cache.attend(0, &ours.seqs, &q).unwrap();
    let mut qb = dev.buffer(64 + q.len() * 4).unwrap();
    qb.write(64, &bytemuck_f32(&q)).unwrap();
    let ob = dev.buffer(32 + q.len() * 4).unwrap();
    let bufs = DeviceBuffers::Metal(MetalBuffers {
        queries: qb.handle(),
        query_dtype: InputDtype::F32,
        output: ob.handle(),
        queries_offset: 64,
        output_offset: 32,
    });
    let got = ours.cache.attend_device(0, &ours.seqs, bufs).unwrap();
    let out: Vec<f32> = ob
        .bytes(32, q.len() * 4)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(max_abs(&out, &want.output) <= 1e-6, "output at an offset");
    assert_eq!(got.heads, want.heads);
    assert!(
        ob.bytes(0, 32).unwrap().iter().all(|&b| b == 0),
        "bytes before the offset kept"
    );
    // Buffers too small for the batch (or misaligned offsets) are refused before anything runs.
    let misaligned = DeviceBuffers::Metal(MetalBuffers {
        queries_offset: 2,
        ..match bufs {
            DeviceBuffers::Metal(b) => b,
            _ => unreachable!(),
        }
    });
    assert!(ours.cache.attend_device(0, &ours.seqs, misaligned).is_err());
    let small = dev.buffer(16).unwrap();
    let bufs = DeviceBuffers::Metal(MetalBuffers {
        queries: small.handle(),
        query_dtype: InputDtype::F32,
        output: small.handle(),
        queries_offset: 0,
        output_offset: 0,
    });
    assert!(ours.cache.attend_device(0, &ours.seqs, bufs).is_err());
}

#[cfg(feature = "metal-emu")]
fn bytemuck_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}
