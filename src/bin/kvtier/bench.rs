//! `kvtier bench`: decode attention and quantisation on every backend this build and machine
//! offer, through the cache's public calls (`KvCache::append`, `KvCache::attend`), with the
//! uncompressed f16 cache and, where python3 imports torch, torch's own decode attention
//! (`scripts/torch_peer.py`) measured in the same run as peers.
//!
//! Reports medians of `--reps` timed calls after warm-up calls. Ratios are against peers of the
//! same run only. Must never: time anything but the library's own code path, or assert a speed.

use std::time::Instant;

use clap::{Arg, ArgMatches, Command};
use kvtier::backend::cpu::CpuKernel;
use kvtier::{Bits, CacheConfig, Device, HotDtype, KvCache, PageResults, Rows, Scratch};
use serde_json::{json, Value};

use crate::plot;
use crate::report::{bar, get, list, AnyResult, Ctx, Report};

pub fn command() -> Command {
    Command::new("bench")
        .about("decode and quantise on every available backend, with the f16 cache and torch as peers")
        .arg(
            Arg::new("tokens")
                .long("tokens")
                .default_value("4096,32768")
                .help("context lengths, comma-separated"),
        )
        .arg(
            Arg::new("shape")
                .long("shape")
                .default_value("32/8/128")
                .help("q heads / kv heads / head_dim of the one layer measured"),
        )
        .arg(
            Arg::new("formats")
                .long("formats")
                .default_value("f16,int8,int4,int2")
                .help("cache formats: f16 (hot only, uncompressed), int8, int4, int3, int2 (warm K and V)"),
        )
        .arg(Arg::new("reps").long("reps").default_value("15").help("timed calls per point (median)"))
        .arg(
            Arg::new("cpu-paths")
                .long("cpu-paths")
                .default_value("auto")
                .help("CPU kernel paths: `auto`, `all` (every path this CPU runs) or a list (avx512,avx2,portable)"),
        )
        .arg(
            Arg::new("no-peer")
                .long("no-peer")
                .action(clap::ArgAction::SetTrue)
                .help("do not run the torch peer even if torch imports"),
        )
}

/// torch's version if python3 imports it.
pub fn torch_version() -> Option<String> {
    let o = std::process::Command::new("python3")
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The backends to measure: CPU at each requested kernel path, plus CUDA device 0 when compiled
/// in and present.
fn backends(m: &ArgMatches) -> AnyResult<Vec<(String, Device, CpuKernel)>> {
    let spec: String = get(m, "cpu-paths")?;
    let paths: Vec<CpuKernel> = match spec.as_str() {
        "auto" => vec![CpuKernel::Auto.resolve()?],
        "all" => CpuKernel::ALL
            .into_iter()
            .filter(|k| k.available())
            .collect(),
        s => list::<String>(s, "cpu-paths")?
            .iter()
            .map(|n| {
                let k = CpuKernel::from_name(n)
                    .ok_or_else(|| format!("--cpu-paths: unknown path `{n}`"))?;
                k.resolve().map_err(|e| format!("--cpu-paths: {e}").into())
            })
            .collect::<AnyResult<_>>()?,
    };
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out: Vec<(String, Device, CpuKernel)> = paths
        .into_iter()
        .map(|k| (format!("cpu/{}", k.name()), Device::Cpu, k))
        .collect();
    #[cfg(feature = "cuda")]
    match kvtier::backend::cuda::CudaDevice::new(0) {
        Ok(d) => out.push((
            format!("cuda/{}", d.name()),
            Device::Cuda(d),
            CpuKernel::Auto,
        )),
        Err(e) => eprintln!("kvtier bench: no CUDA device ({e}); CPU only"),
    }
    Ok(out)
}

fn shape(m: &ArgMatches) -> AnyResult<(usize, usize, usize)> {
    let s: String = get(m, "shape")?;
    let v: Vec<usize> = s
        .split('/')
        .map(|x| {
            x.trim()
                .parse()
                .map_err(|_| format!("--shape: cannot parse `{s}` (q/kv/d)"))
        })
        .collect::<Result<_, _>>()?;
    match v[..] {
        [q, kv, d] if q > 0 && kv > 0 && d > 0 && q % kv == 0 && d <= 512 => Ok((q, kv, d)),
        _ => Err(format!("--shape `{s}`: need q/kv/d with q a multiple of kv and d <= 512").into()),
    }
}

fn config(
    fmt: &str,
    q: usize,
    kv: usize,
    d: usize,
    path: CpuKernel,
    tokens: usize,
) -> AnyResult<CacheConfig> {
    let b = CacheConfig::builder(1, q, kv, d)
        .hot_dtype(HotDtype::F16)
        .archive(false)
        .cpu_kernel(path)
        .max_seq_len(tokens.max(1 << 16));
    let b = match fmt {
        "f16" => b.full_precision(),
        f => {
            let bits: u32 = f
                .strip_prefix("int")
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| {
                    format!("--formats: unknown format `{f}` (f16, int8, int4, int3, int2)")
                })?;
            let bits = Bits::from_bits(bits).map_err(|e| format!("--formats `{f}`: {e}"))?;
            b.k_bits(bits).v_bits(bits)
        }
    };
    Ok(b.build()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic rows in [-1, 1] (a cheap LCG: the values only need to be varied).
fn fill_rows(buf: &mut [f32], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for x in buf {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    }
}

struct Point {
    backend: String,
    format: String,
    tokens: usize,
    decode_ms: f64,
    append_tok_s: f64,
    device_bytes: usize,
}

fn measure(
    dev: &Device,
    path: CpuKernel,
    fmt: &str,
    tokens: usize,
    (q, kv, d): (usize, usize, usize),
    reps: usize,
) -> AnyResult<Timing> {
    let mut cache = KvCache::with_device(config(fmt, q, kv, d, path, tokens)?, dev.clone())?;
    let seq = cache.add_sequence();
    let chunk = 1024;
    let mut k = vec![0f32; chunk * kv * d];
    let mut v = vec![0f32; chunk * kv * d];
    let mut appended = 0;
    let mut append_s = 0.0;
    while appended < tokens {
        let n = chunk.min(tokens - appended);
        fill_rows(&mut k[..n * kv * d], appended as u64 * 2 + 1);
        fill_rows(&mut v[..n * kv * d], appended as u64 * 2 + 2);
        let t0 = Instant::now();
        cache.append(seq, 0, &k[..n * kv * d], &v[..n * kv * d])?;
        append_s += t0.elapsed().as_secs_f64();
        appended += n;
    }
    let mut qv = vec![0f32; q * d];
    fill_rows(&mut qv, 77);
    // The engine's call: a reused scratch, queries and output on the host; with every per-page
    // result, with page masses only, and with none (interleaved).
    let mut scratches = modes();
    let mut host = |s: &mut Scratch| -> AnyResult<f64> {
        let t0 = Instant::now();
        let att = cache.attend_with(s, 0, &[seq], Rows::F32(&qv), None)?;
        std::hint::black_box(&att.output);
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let host_ms = interleaved(reps, &mut scratches, &mut host)?;
    let device = device_resident(&cache, seq, &qv, reps)?;
    Ok(Timing {
        host_ms,
        device_ms: device,
        append_tok_s: tokens as f64 / append_s.max(1e-12),
        device_bytes: cache.memory_report().device_bytes(),
    })
}

/// The per-page results the bench measures, with the words their rows carry.
const MODES: [(PageResults, &str); 3] = [
    (PageResults::All, ""),
    (PageResults::Masses, "page masses only"),
    (PageResults::None, "no page results"),
];

fn modes() -> [Scratch; 3] {
    MODES.map(|(m, _)| Scratch::with_page_results(m))
}

/// Medians of `reps` calls of `f` with each scratch, the calls alternating (after 3 warm-up calls
/// each).
fn interleaved<const N: usize>(
    reps: usize,
    scratches: &mut [Scratch; N],
    f: &mut dyn FnMut(&mut Scratch) -> AnyResult<f64>,
) -> AnyResult<[f64; N]> {
    let mut t: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(reps));
    for i in 0..reps + 3 {
        for (s, ts) in scratches.iter_mut().zip(&mut t) {
            let ms = f(s)?;
            if i >= 3 {
                ts.push(ms);
            }
        }
    }
    Ok(t.map(median))
}

/// What one point measured.
struct Timing {
    /// Per [`MODES`] entry.
    host_ms: [f64; 3],
    /// CUDA only: `attend_device_with`, queries and output already in device memory (per
    /// [`MODES`] entry), and the mean per step of `attend_device_async` steps (no page results)
    /// queued back to back.
    device_ms: Option<([f64; 3], f64)>,
    append_tok_s: f64,
    device_bytes: usize,
}

/// On a CUDA cache: medians of `attend_device_with` with the queries and output in device memory
/// (what an engine on the GPU calls; no host copies of q or the output), with and without the
/// per-page results.
#[cfg(feature = "cuda")]
fn device_resident(
    cache: &KvCache,
    seq: kvtier::SeqId,
    qv: &[f32],
    reps: usize,
) -> AnyResult<Option<([f64; 3], f64)>> {
    use cudarc::driver::{CudaContext, DevicePtr};
    use kvtier::backend::cuda::CudaBuffers;
    use kvtier::{DeviceBuffers, DeviceLocation, InputDtype};
    let DeviceLocation::Cuda { ordinal } = cache.device().location() else {
        return Ok(None);
    };
    let drv = |e: cudarc::driver::DriverError| format!("CUDA driver: {e:?}");
    let ctx = CudaContext::new(ordinal).map_err(drv)?;
    let stream = ctx.new_stream().map_err(drv)?;
    let qd = stream.clone_htod(qv).map_err(drv)?;
    let od = stream.alloc_zeros::<f32>(qv.len()).map_err(drv)?;
    let (qp, _qg) = qd.device_ptr(&stream);
    let (op, _og) = od.device_ptr(&stream);
    let bufs = DeviceBuffers::Cuda(CudaBuffers {
        queries: qp,
        query_dtype: InputDtype::F32,
        output: op,
        stream: stream.cu_stream() as u64,
    });
    let mut scratches = modes();
    let mut one = |s: &mut Scratch| -> AnyResult<f64> {
        let t0 = Instant::now();
        let att = cache.attend_device_with(s, 0, &[seq], &bufs, None)?;
        std::hint::black_box(&att.heads);
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let waited = interleaved(reps, &mut scratches, &mut one)?;
    // Steps queued back to back with `attend_device_async` (no host wait per step, no page
    // results), one stream synchronisation at the end: the mean time per step.
    let mut s = Scratch::without_page_results();
    let mut queued = |n: usize| -> AnyResult<f64> {
        let t0 = Instant::now();
        for _ in 0..n {
            cache.attend_device_async(&mut s, 0, &[seq], &bufs, None)?;
        }
        stream.synchronize().map_err(drv)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3 / n as f64)
    };
    queued(3)?;
    let asynchronous = queued(reps)?;
    Ok(Some((waited, asynchronous)))
}

#[cfg(not(feature = "cuda"))]
fn device_resident(
    _: &KvCache,
    _: kvtier::SeqId,
    _: &[f32],
    _: usize,
) -> AnyResult<Option<([f64; 3], f64)>> {
    Ok(None)
}

/// torch's decode at the same shapes (None when torch does not import or the script fails).
fn torch_peer(
    device: &str,
    (q, kv, d): (usize, usize, usize),
    tokens: &[usize],
    reps: usize,
) -> Option<Value> {
    // The script in the current tree (a checkout's root), else the one in the tree the binary
    // was built from.
    let here = std::path::PathBuf::from("scripts/torch_peer.py");
    let script = if here.exists() {
        here
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/torch_peer.py")
    };
    let toks: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let o = std::process::Command::new("python3")
        .arg(&script)
        .args([
            "--device",
            device,
            "--q-heads",
            &q.to_string(),
            "--kv-heads",
            &kv.to_string(),
        ])
        .args([
            "--dim",
            &d.to_string(),
            "--tokens",
            &toks.join(","),
            "--iters",
            &reps.to_string(),
        ])
        .output()
        .ok()?;
    if !o.status.success() {
        eprintln!(
            "kvtier bench: torch peer failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    let tokens: Vec<usize> = list(&get::<String>(m, "tokens")?, "tokens")?;
    if tokens.is_empty() || tokens.iter().any(|&t| t == 0 || t > 1 << 20) {
        return Err("--tokens: each length must be 1 to 1048576".into());
    }
    let formats: Vec<String> = list(&get::<String>(m, "formats")?, "formats")?;
    let reps: usize = get(m, "reps")?;
    if reps == 0 || reps > 10_000 {
        return Err("--reps: need 1 to 10000".into());
    }
    let shape = shape(m)?;
    // Check every format before any long fill.
    for f in &formats {
        config(f, shape.0, shape.1, shape.2, CpuKernel::Portable, 1)?;
    }
    let backends = backends(m)?;
    let total = (backends.len() * formats.len() * tokens.len()) as u64;
    let pb = bar(total, "bench");
    let mut points = Vec::new();
    for &n in &tokens {
        for (name, dev, path) in &backends {
            for f in &formats {
                pb.set_message(format!("{name} {f} {n}"));
                let t = measure(dev, *path, f, n, shape, reps)?;
                let mut rows: Vec<(String, f64)> = MODES
                    .iter()
                    .zip(t.host_ms)
                    .map(|((_, w), ms)| match *w {
                        "" => (name.clone(), ms),
                        w => (format!("{name} ({w})"), ms),
                    })
                    .collect();
                if let Some((waited, queued)) = t.device_ms {
                    for ((_, w), ms) in MODES.iter().zip(waited) {
                        let sep = if w.is_empty() { "" } else { ", " };
                        rows.push((format!("{name} (device q/out{sep}{w})"), ms));
                    }
                    rows.push((format!("{name} (device q/out, async steps)"), queued));
                }
                for (backend, ms) in rows {
                    points.push(Point {
                        backend,
                        format: f.clone(),
                        tokens: n,
                        decode_ms: ms,
                        append_tok_s: t.append_tok_s,
                        device_bytes: t.device_bytes,
                    });
                }
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    // One torch peer per kind of device measured (its rows are compared with that peer only).
    let kinds: Vec<&str> = ["cpu", "cuda"]
        .into_iter()
        .filter(|k| backends.iter().any(|b| b.0.starts_with(k)))
        .collect();
    let torch: Vec<(&str, Value)> = if m.get_flag("no-peer") || torch_version().is_none() {
        Vec::new()
    } else {
        kinds
            .iter()
            .filter_map(|k| torch_peer(k, shape, &tokens, reps).map(|v| (*k, v)))
            .collect()
    };
    // Rows of queued steps compare with torch's calls queued the same way.
    let torch_ms = |backend: &str, n: usize| -> Option<f64> {
        let (_, t) = torch.iter().find(|(k, _)| backend.starts_with(k))?;
        let key = if backend.ends_with("async steps)") {
            "queued_ms"
        } else {
            "ms"
        };
        t["rows"]
            .as_array()?
            .iter()
            .find(|r| r["tokens"].as_u64() == Some(n as u64))?[key]
            .as_f64()
    };
    let (q, kv, d) = shape;
    let mut text = format!(
        "one layer, {q} q heads / {kv} kv heads / head_dim {d}, batch 1; median of {reps} decode calls\n\
         peer: {}\n\n\
         | backend | format | tokens | decode ms | GB/s of cache read | speedup vs f16 cache | speedup vs torch | append+quantise tok/s | device bytes / token |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        if torch.is_empty() {
            "torch not importable (or --no-peer): no torch ratio".to_string()
        } else {
            torch
                .iter()
                .map(|(k, t)| format!("{k}: {}", t["peer"].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("; ")
        }
    );
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for p in &points {
        let f16 = points
            .iter()
            .find(|o| o.backend == p.backend && o.tokens == p.tokens && o.format == "f16")
            .map(|o| o.decode_ms / p.decode_ms);
        let vs_torch = torch_ms(&p.backend, p.tokens).map(|t| t / p.decode_ms);
        let gbs = p.device_bytes as f64 / (p.decode_ms * 1e-3) / 1e9;
        let fmt_ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
        text += &format!(
            "| {} | {} | {} | {:.3} | {:.1} | {} | {} | {:.0} | {:.1} |\n",
            p.backend,
            p.format,
            p.tokens,
            p.decode_ms,
            gbs,
            fmt_ratio(f16),
            fmt_ratio(vs_torch),
            p.append_tok_s,
            p.device_bytes as f64 / p.tokens as f64
        );
        let group = formats.iter().position(|f| *f == p.format).unwrap_or(0);
        bars.push((
            format!("{} {} {}K", p.backend, p.format, p.tokens / 1024),
            gbs,
            group,
        ));
        rows.push(json!({
            "backend": p.backend, "format": p.format, "tokens": p.tokens, "decode_ms": p.decode_ms,
            "read_gb_per_s": gbs, "speedup_vs_f16": f16, "speedup_vs_torch": vs_torch,
            "append_tokens_per_s": p.append_tok_s, "device_bytes": p.device_bytes,
        }));
    }
    for (kind, _) in &torch {
        for n in &tokens {
            if let Some(ms) = torch_ms(kind, *n) {
                let dtype = if *kind == "cpu" { "f32" } else { "bf16" };
                text += &format!(
                    "| torch/{kind} | {dtype} | {n} | {ms:.3} | - | - | 1.00x | - | - |\n"
                );
            }
            let queued = torch_ms(&format!("{kind} (async steps)"), *n);
            if let (Some(ms), "cuda") = (queued, *kind) {
                text += &format!(
                    "| torch/cuda (queued calls) | bf16 | {n} | {ms:.3} | - | - | 1.00x | - | - |\n"
                );
            }
        }
    }
    let svg = plot::bars(
        &format!("kvtier decode, one layer {q}/{kv}/{d}: cache bytes read per second"),
        "GB/s (device bytes of the cache / decode time)",
        &bars,
    )?;
    let json = json!({"shape": {"q_heads": q, "kv_heads": kv, "head_dim": d}, "reps": reps,
                      "rows": rows,
                      "torch": torch.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<serde_json::Map<_, _>>()});
    Ok(Report::new(json, text).with_plot(
        "bench-decode.svg",
        "Decode: cache bytes read per second",
        svg,
    ))
}
