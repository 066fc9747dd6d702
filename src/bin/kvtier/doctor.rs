//! `kvtier doctor`: what this machine and this build offer, each line found out now.
//!
//! CPU features and the kernel path `Auto` resolves to (and a real decode through it); CUDA (driver,
//! device, compute capability, NVRTC, a real decode on the device checked against the CPU) when
//! compiled in; Metal; the real-model assets; whether the disk-tier directory takes a file; whether
//! torch (the bench peer) imports. Must never: report a capability it did not just exercise.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Arg, ArgMatches, Command};
use kvtier::backend::cpu::CpuKernel;
use kvtier::model::corpus::{load_speeches, Assets};
use kvtier::{CacheConfig, KvCache};
use serde_json::{json, Value};

use crate::report::{AnyResult, Ctx, Report};

pub fn command() -> Command {
    Command::new("doctor")
        .about("what is available here: CPU kernel path, CUDA, Metal, assets, disk-tier directory, torch")
        .arg(
            Arg::new("spill-dir")
                .long("spill-dir")
                .value_name("DIR")
                .help("the disk-tier directory to check (default: the system temp directory)"),
        )
        .arg(crate::report::assets_arg())
}

/// A checked line: its name, whether it holds, and what was found.
struct Line {
    what: &'static str,
    ok: bool,
    detail: String,
    data: Value,
}

fn line(what: &'static str, ok: bool, detail: impl Into<String>, data: Value) -> Line {
    Line {
        what,
        ok,
        detail: detail.into(),
        data,
    }
}

/// Deterministic pseudo-random rows in [-1, 1].
fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut r = kvtier::model::corpus::SplitMix64::new(seed);
    (0..n)
        .map(|_| (r.below(2001) as f32 - 1000.0) / 1000.0)
        .collect()
}

/// A small balanced-preset cache (9/3/64, 300 tokens: sinks, warm int4 pages, hot window) filled
/// with the same rows on `device`, and one decode attention over it.
fn decode_once(device: kvtier::Device) -> AnyResult<(Vec<f32>, f64)> {
    let cfg = CacheConfig::balanced(1, 9, 3, 64)?;
    let mut cache = KvCache::with_device(cfg, device)?;
    let seq = cache.add_sequence();
    let n = 300;
    cache.append(seq, 0, &rows(n * 3 * 64, 1), &rows(n * 3 * 64, 2))?;
    let q = rows(9 * 64, 3);
    let t0 = Instant::now();
    let att = cache.attend(0, &[seq], &q)?;
    Ok((att.output, t0.elapsed().as_secs_f64() * 1e3))
}

/// The CPU features the kernels care about. AMX is read from /proc/cpuinfo (its runtime
/// detection macro is unstable).
#[cfg(target_arch = "x86_64")]
fn cpu_features() -> Vec<(&'static str, bool)> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let amx = flags
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "amx_tile"));
    vec![
        ("avx2", is_x86_feature_detected!("avx2")),
        ("fma", is_x86_feature_detected!("fma")),
        ("f16c", is_x86_feature_detected!("f16c")),
        ("avx512f", is_x86_feature_detected!("avx512f")),
        ("avx512bw", is_x86_feature_detected!("avx512bw")),
        ("avx512dq", is_x86_feature_detected!("avx512dq")),
        ("avx512vl", is_x86_feature_detected!("avx512vl")),
        ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
        ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
        ("avx512fp16", is_x86_feature_detected!("avx512fp16")),
        ("amx-tile", amx),
    ]
}

#[cfg(target_arch = "aarch64")]
fn cpu_features() -> Vec<(&'static str, bool)> {
    vec![("neon", std::arch::is_aarch64_feature_detected!("neon"))]
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_features() -> Vec<(&'static str, bool)> {
    Vec::new()
}

fn cpu_lines() -> Vec<Line> {
    let mut out = Vec::new();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let feats = cpu_features();
    let have: Vec<&str> = feats.iter().filter(|f| f.1).map(|f| f.0).collect();
    let lacking: Vec<&str> = feats.iter().filter(|f| !f.1).map(|f| f.0).collect();
    out.push(line(
        "cpu",
        true,
        format!(
            "{model}, {threads} threads; has {}{}",
            if have.is_empty() { "-".to_string() } else { have.join(" ") },
            if lacking.is_empty() {
                String::new()
            } else {
                format!("; lacks {}", lacking.join(" "))
            }
        ),
        json!({"model": model, "threads": threads,
               "features": feats.iter().map(|(n, b)| (n.to_string(), json!(b))).collect::<serde_json::Map<_, _>>()}),
    ));
    let paths: Vec<Value> = CpuKernel::ALL
        .iter()
        .map(|k| json!({"path": k.name(), "available": k.available()}))
        .collect();
    let env = std::env::var("KVTIER_CPU_KERNEL").ok();
    match CpuKernel::Auto.resolve() {
        Ok(k) => {
            let run = decode_once(kvtier::Device::Cpu);
            let (ok, detail) = match &run {
                Ok((o, ms)) if o.iter().all(|x| x.is_finite()) => (
                    true,
                    format!("one decode over 300 int4/hot tokens: {ms:.2} ms"),
                ),
                Ok(_) => (false, "decode produced non-finite output".to_string()),
                Err(e) => (false, format!("decode failed: {e}")),
            };
            out.push(line(
                "cpu kernel",
                ok,
                format!(
                    "`auto` runs the {} path{}; {detail}",
                    k.name(),
                    env.as_ref()
                        .map_or(String::new(), |e| format!(" (KVTIER_CPU_KERNEL={e})"))
                ),
                json!({"auto": k.name(), "env": env, "paths": paths, "decode_ok": ok}),
            ));
        }
        Err(e) => out.push(line(
            "cpu kernel",
            false,
            format!("`auto` does not resolve: {e}"),
            json!({"auto": null, "env": env, "paths": paths, "error": e.to_string()}),
        )),
    }
    out
}

#[cfg(feature = "cuda")]
fn cuda_lines() -> Vec<Line> {
    use kvtier::backend::cuda::{compile_source, CudaDevice};
    let mut out = Vec::new();
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            out.push(line(
                "cuda",
                false,
                format!("compiled in; no device: {e}"),
                json!({"compiled": true, "device": null, "error": e.to_string()}),
            ));
            return out;
        }
    };
    let (maj, min) = dev.compute_capability();
    out.push(line(
        "cuda",
        true,
        format!("{} (sm_{maj}{min}, {} SMs)", dev.name(), dev.sm_count()),
        json!({"compiled": true, "device": dev.name(), "compute_capability": [maj, min], "sms": dev.sm_count()}),
    ));
    let arch = format!("sm_{maj}{min}");
    match compile_source("extern \"C\" __global__ void k() {}", &arch) {
        Ok(()) => out.push(line(
            "nvrtc",
            true,
            format!("compiles for {arch}"),
            json!({"ok": true, "arch": arch}),
        )),
        Err(e) => {
            out.push(line(
                "nvrtc",
                false,
                format!("cannot compile for {arch}: {e}"),
                json!({"ok": false, "error": e.to_string()}),
            ));
            return out;
        }
    }
    let check = (|| -> AnyResult<(f32, f64)> {
        let (g, ms) = decode_once(kvtier::Device::Cuda(dev.clone()))?;
        let (c, _) = decode_once(kvtier::Device::Cpu)?;
        let err = g
            .iter()
            .zip(&c)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        Ok((err, ms))
    })();
    out.push(match check {
        // The conformance suite's f32-path tolerance for int4 pages.
        Ok((err, ms)) => line(
            "cuda decode",
            err < 2e-3,
            format!("one decode on the device: {ms:.2} ms (first call: includes kernel compilation); max |gpu - cpu| {err:.2e}"),
            json!({"ok": err < 2e-3, "max_abs_vs_cpu": err, "ms": ms}),
        ),
        Err(e) => line("cuda decode", false, format!("failed: {e}"), json!({"ok": false, "error": e.to_string()})),
    });
    out
}

#[cfg(not(feature = "cuda"))]
fn cuda_lines() -> Vec<Line> {
    vec![line(
        "cuda",
        false,
        "not compiled in (build with --features cli,cuda)",
        json!({"compiled": false}),
    )]
}

fn metal_line() -> Line {
    let compiled = cfg!(feature = "metal");
    let mac = cfg!(target_vendor = "apple");
    // Creating the device compiles the kernels: a real check of the MSL on this machine.
    let dev = kvtier::backend::metal::MetalDevice::new();
    let detail = match (&dev, compiled, mac) {
        (Ok(d), _, _) => format!("{}: kernels compiled", d.name()),
        (Err(e), true, true) => format!("compiled in, but no device: {e}"),
        (Err(_), true, false) => {
            "compiled in, not a macOS build: Metal cannot run here (the metal-emu feature runs its kernels on the CPU, for tests)".into()
        }
        (Err(_), false, _) => "not compiled in (build on macOS with --features cli,metal)".into(),
    };
    line(
        "metal",
        dev.is_ok(),
        detail,
        json!({"compiled": compiled, "macos": mac, "device": dev.as_ref().ok().map(|d| d.name().to_string())}),
    )
}

fn asset_line(m: &ArgMatches) -> Line {
    let assets = match m.get_one::<String>("assets") {
        Some(p) => Assets { root: p.into() },
        None => Assets::locate(),
    };
    let model = assets.model();
    let size = std::fs::metadata(&model).map(|md| md.len()).ok();
    let speeches = load_speeches(&assets.sotu()).map(|s| s.len()).ok();
    let ok = size.is_some() && speeches.is_some_and(|n| n > 0);
    line(
        "assets",
        ok,
        if ok {
            format!(
                "{} ({:.1} MB), {} State of the Union speeches in {}",
                model.display(),
                size.unwrap_or(0) as f64 / 1e6,
                speeches.unwrap_or(0),
                assets.sotu().display()
            )
        } else {
            format!(
                "missing in {}: model {}, corpus {} (run scripts/fetch-assets.sh)",
                assets.root.display(),
                if size.is_some() { "present" } else { "absent" },
                if speeches.is_some() {
                    "present"
                } else {
                    "absent"
                }
            )
        },
        json!({"root": assets.root, "model_bytes": size, "speeches": speeches}),
    )
}

fn spill_line(m: &ArgMatches) -> Line {
    let dir: PathBuf = m
        .get_one::<String>("spill-dir")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let probe = dir.join(format!(".kvtier-doctor-{}", std::process::id()));
    let res = std::fs::write(&probe, [0u8; 4096]).and_then(|_| std::fs::read(&probe));
    let _ = std::fs::remove_file(&probe);
    match res {
        Ok(b) if b.len() == 4096 => line(
            "disk tier dir",
            true,
            format!("{}: a 4 KiB page file written and read back", dir.display()),
            json!({"dir": dir, "writable": true}),
        ),
        Ok(_) => line(
            "disk tier dir",
            false,
            format!("{}: short read back", dir.display()),
            json!({"dir": dir, "writable": false}),
        ),
        Err(e) => line(
            "disk tier dir",
            false,
            format!("{}: not writable: {e}", dir.display()),
            json!({"dir": dir, "writable": false, "error": e.to_string()}),
        ),
    }
}

fn torch_line() -> Line {
    match crate::bench::torch_version() {
        Some(v) => line(
            "torch",
            true,
            format!("torch {v} imports (bench peer)"),
            json!({"version": v}),
        ),
        None => line(
            "torch",
            false,
            "python3 cannot import torch: bench runs without a peer ratio",
            json!({"version": null}),
        ),
    }
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    let mut lines = cpu_lines();
    lines.extend(cuda_lines());
    lines.push(metal_line());
    lines.push(asset_line(m));
    lines.push(spill_line(m));
    lines.push(torch_line());
    let mut text = format!(
        "kvtier {}{}\n",
        env!("CARGO_PKG_VERSION"),
        crate::report::build_commit().map_or(String::new(), |c| format!(" ({c})"))
    );
    for l in &lines {
        text += &format!(
            "  [{}] {:<14} {}\n",
            if l.ok { " ok " } else { " -- " },
            l.what,
            l.detail
        );
    }
    let json = json!({
        "checks": lines.iter().map(|l| json!({"what": l.what, "ok": l.ok, "detail": l.detail, "data": l.data})).collect::<Vec<_>>(),
    });
    Ok(Report::new(json, text))
}
