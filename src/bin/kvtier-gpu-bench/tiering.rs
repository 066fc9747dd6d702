//! `--append`: device-side tiering per decode step. For each shape and batch size, one decode
//! step of a whole batch (one token per sequence; a page of every sequence leaves the hot window
//! every `page_size` steps) through `KvCache::append_device` (keys and values already on the
//! device) against what an engine does without it: copy the step's rows to the host, then
//! `append_decode`. Both caches are CUDA caches with the default config (archive on, so each
//! demoted page is also copied to the host archive), bf16 hot pages, int4 warm; a third column
//! is the device path with the archive off (no page leaves the device). Wall time per
//! step, averaged over one page cycle and synchronised on the context; median of `--iters`
//! cycles, the two paths interleaved cycle by cycle.
//!
//! Also the demotion alone, on the storage: `demote_many` of one full hot page per sequence (one
//! `kvt_quantize` launch) against `demote` page after page (one launch each), both followed by a
//! context synchronise.

use cudarc::driver::{CudaContext, DevicePtr};
use kvtier::backend::cuda::{CudaDevice, CudaRows};
use kvtier::backend::BackendStorage;
use kvtier::{
    CacheConfig, Device, DeviceRows, HotDtype, InputDtype, KvCache, Rows, Tier, WarmFormat,
};
use std::fmt::Write as _;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the table; returns JSON rows.
pub fn append_bench(dev: &CudaDevice, iters: usize, batches: &[usize]) -> String {
    let ctx = CudaContext::new(0).expect("context");
    let user = ctx.new_stream().expect("stream");
    let mut json = String::new();
    println!(
        "\n{:>9} {:>3} | {:>11} {:>11} {:>6} {:>11} | {:>11} {:>11} {:>6}",
        "shape",
        "B",
        "step dev us",
        "step host",
        "ratio",
        "no archive",
        "demote 1x",
        "demote Bx",
        "ratio"
    );
    for (qh, kvh, d) in [(32usize, 8usize, 128usize), (9, 3, 64)] {
        let cfg = CacheConfig::builder(1, qh, kvh, d)
            .hot_dtype(HotDtype::BF16)
            .build()
            .expect("config");
        let ps = cfg.page_size;
        let row = kvh * d;
        for &b in batches {
            let mut next = super::uniform();
            // Device path, host path, and the device path without the archive.
            let mut caches = [true, true, false].map(|archive| {
                let mut c = cfg.clone();
                c.archive = archive;
                KvCache::with_device(c, Device::Cuda(dev.clone())).expect("cache")
            });
            let seqs: Vec<_> = (0..b).map(|_| caches[0].add_sequence()).collect();
            let prompt: Vec<f32> = (0..256 * row).map(|_| next()).collect();
            for &s in &seqs {
                assert_eq!(caches[1].add_sequence(), s);
                assert_eq!(caches[2].add_sequence(), s);
                for c in &mut caches {
                    c.append(s, 0, &prompt, &prompt).expect("prompt");
                }
            }
            let (kh, vh): (Vec<f32>, Vec<f32>) = (
                (0..b * row).map(|_| next()).collect(),
                (0..b * row).map(|_| next()).collect(),
            );
            let (kd, vd) = (
                user.clone_htod(&kh).expect("upload"),
                user.clone_htod(&vh).expect("upload"),
            );
            user.synchronize().expect("sync");
            let rows = DeviceRows::Cuda(CudaRows {
                keys: kd.device_ptr(&user).0,
                values: vd.device_ptr(&user).0,
                dtype: InputDtype::F32,
                stream: user.cu_stream() as u64,
            });
            let batch: Vec<_> = seqs.iter().map(|&s| (s, 1)).collect();
            let (mut kb, mut vb) = (vec![0f32; b * row], vec![0f32; b * row]);
            let (mut t_dev, mut t_host, mut t_bare) = (Vec::new(), Vec::new(), Vec::new());
            for it in 0..=iters {
                let t = Instant::now();
                for _ in 0..ps {
                    caches[0]
                        .append_device(0, &batch, &rows)
                        .expect("append_device");
                }
                ctx.synchronize().expect("sync");
                let td = t.elapsed().as_secs_f64() * 1e6 / ps as f64;
                let t = Instant::now();
                for _ in 0..ps {
                    user.memcpy_dtoh(&kd, &mut kb).expect("dtoh");
                    user.memcpy_dtoh(&vd, &mut vb).expect("dtoh");
                    user.synchronize().expect("sync");
                    caches[1]
                        .append_decode(0, &seqs, Rows::F32(&kb), Rows::F32(&vb))
                        .expect("append_decode");
                }
                ctx.synchronize().expect("sync");
                let th = t.elapsed().as_secs_f64() * 1e6 / ps as f64;
                let t = Instant::now();
                for _ in 0..ps {
                    caches[2]
                        .append_device(0, &batch, &rows)
                        .expect("append_device");
                }
                ctx.synchronize().expect("sync");
                let tb = t.elapsed().as_secs_f64() * 1e6 / ps as f64;
                if it > 0 {
                    t_dev.push(td);
                    t_host.push(th);
                    t_bare.push(tb);
                }
            }
            let demoted = [0, 1, 2].map(|i| caches[i].counters().demotions);
            assert!(
                demoted[0] == demoted[1] && demoted[1] == demoted[2],
                "every path demotes the same pages: {demoted:?}"
            );

            // The demotion alone.
            let mut st = Device::Cuda(dev.clone()).storage(&cfg, 0).expect("storage");
            let fmt = WarmFormat::of(&cfg);
            let page: Vec<f32> = (0..ps * row).map(|_| next()).collect();
            let (mut t_one, mut t_many) = (Vec::new(), Vec::new());
            let mut out = Vec::new();
            for it in 0..=iters {
                for many in [false, true] {
                    let jobs: Vec<(u32, usize)> = (0..b)
                        .map(|_| {
                            let s = st.alloc_hot().expect("alloc");
                            st.write_hot(s, 0, &page, &page, ps).expect("write");
                            (s, ps)
                        })
                        .collect();
                    ctx.synchronize().expect("sync");
                    let t = Instant::now();
                    if many {
                        st.demote_many(&jobs, fmt, &mut out).expect("demote_many");
                    } else {
                        out.clear();
                        for &(s, n) in &jobs {
                            out.push(st.demote(s, n, fmt).expect("demote"));
                        }
                    }
                    ctx.synchronize().expect("sync");
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    for w in out.drain(..) {
                        st.free(Tier::Warm, w.expect("demoted"));
                    }
                    if it > 0 {
                        if many { &mut t_many } else { &mut t_one }.push(us);
                    }
                }
            }
            let (sd, sh, sb, d1, dn) = (
                median(t_dev),
                median(t_host),
                median(t_bare),
                median(t_one),
                median(t_many),
            );
            let shape = format!("{qh}/{kvh}/{d}");
            println!(
                "{shape:>9} {b:>3} | {sd:>11.1} {sh:>11.1} {:>6.2} {sb:>11.1} | {d1:>11.1} {dn:>11.1} {:>6.2}",
                sh / sd,
                d1 / dn
            );
            if !json.is_empty() {
                json.push(',');
            }
            let _ = write!(
                json,
                "{{\"shape\":\"{shape}\",\"batch\":{b},\"page_size\":{ps},\
                 \"step_device_us\":{sd:.2},\"step_host_us\":{sh:.2},\
                 \"step_device_no_archive_us\":{sb:.2},\
                 \"demote_one_by_one_us\":{d1:.2},\"demote_batched_us\":{dn:.2},\
                 \"demotions\":{}}}",
                demoted[0]
            );
        }
    }
    json
}
