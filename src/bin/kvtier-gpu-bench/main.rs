//! GPU decode-attention benchmark: bf16 hot-only vs int4 vs int2 warm pages on the CUDA backend,
//! for 32 q / 8 kv heads d128 and the SmolLM2 shape 9 / 3 / 64, batch 1 and 8, contexts 8K / 32K /
//! 128K. Each timing flushes L2 (256 MiB written) and launches the fused decode once; medians of
//! `--iters` launches. Prints milliseconds, GB/s of the bytes actually read (page bytes, page
//! table, queries), the fraction of a measured read-bandwidth ceiling, and ratios against
//! `torch_decode.py`'s JSON (`--torch` for the big shape, `--torch-small` for 9/3/64) when given.
//!
//!
//! `--selection` runs the page-selection comparison instead: decode attention over all pages vs
//! over a 50% page selection (a different random half of the pages per kv head), 32 q / 8 kv
//! heads, d128, 32K tokens, int4 warm pages with bf16 and with f16 hot pages; prints both times
//! and their ratio.
//!
//! `--quant` times the quantisation-quality options through the cache instead (`quant.rs`);
//! `--append` the device-side tiering of a decode step (`tiering.rs`).
//!
//! `--eliminate` times query-time elimination against the full decode through the cache
//! (`eliminate.rs`).
//!
//! Run with `--help` for the flags.

mod eliminate;
mod quant;
mod tiering;

use kvtier::backend::cuda::{CudaDevice, CudaStorage, CudaTuning};
use kvtier::backend::{BackendDevice, BackendStorage};
use kvtier::{Bits, CacheConfig, HotDtype, PageEntry, PageSelection, Tier, WarmFormat};
use std::collections::HashMap;
use std::fmt::Write as _;

const USAGE: &str = "\
usage: kvtier-gpu-bench [--json OUT] [--torch T.json] [--torch-small T.json] [--iters N]
                        [--quick] [--sweep] [--selection] [--quant] [--append] [--eliminate] [--ab]
                        [--batches B,..]
                        [--only-mode M] [--only-batch B]
                        [--only-seq S] [--only-dim D] [--page-size P]

  --json OUT          also write the rows as JSON to OUT
  --torch T.json      torch_decode.py results for 32/8/128 (adds x-flash / x-int4_deq ratios)
  --torch-small T     torch_decode.py results for 9/3/64
  --iters N           timed launches per row (median reported; default 50)
  --quick             batch 1, 8K tokens only
  --sweep             also time other launch shapes (warps, CTAs per SM, stages) at B1 S128K
                      and B8 S32K
  --selection         instead of the table: decode over all pages vs over a 50% page selection
                      (random half of the pages per kv head), 32/8/128, 32K tokens (--only-seq
                      overrides), batch 1 (--only-batch overrides), int4 warm pages, bf16 and f16
                      hot pages; prints both times and the ratio selected / all
  --quant             instead of the table: attend_device through the cache for int4, int4 with
                      the rotation of keys and values, k3v3 and int4 with 4 key outlier channels
                      (--batches, --seqs; default 1,8 x 8192,32768), times and ratios to int4
  --append            instead of the table: one decode step's append of a batch (--batches)
                      from device rows (append_device) vs rows copied to the host and
                      append_decode, and demote_many vs demote page by page, both shapes
  --eliminate         instead of the table: Eliminator::attend (eps 1e-3, 1e-2) vs the full
                      decode through a CUDA cache, 32/8/128, B1, int4, synthetic keys of three
                      page-score spreads (--seqs; default 32768,131072), times and skip rates
  --only-mode M       bf16 | int8 | int4 | int2 | k4v2, or a comma list (table only)
  --batches B,..      batch sizes of the table (default 1,8)
  --seqs S,..         context lengths of the table (default 8192,32768,131072)
  --ab                also time each mode on the CUDA-core path (tensor cores off), same run
  --only-batch B      one batch size
  --only-seq S        one context length
  --only-dim D        128 | 64 (table only)
  --page-size P       tokens per page of the table's caches (default 32)
  -h, --help          this text
";

struct Args {
    json: Option<String>,
    torch: Option<String>,
    torch_small: Option<String>,
    iters: usize,
    quick: bool,
    sweep: bool,
    selection: bool,
    quant: bool,
    append: bool,
    eliminate: bool,
    only_mode: Option<String>,
    only_batch: Option<usize>,
    only_seq: Option<usize>,
    only_dim: Option<usize>,
    page_size: usize,
    ab: bool,
    batches: Vec<usize>,
    seqs: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        json: None,
        torch: None,
        torch_small: None,
        iters: 50,
        quick: false,
        sweep: false,
        selection: false,
        quant: false,
        append: false,
        eliminate: false,
        only_mode: None,
        only_batch: None,
        only_seq: None,
        only_dim: None,
        page_size: 32,
        ab: false,
        batches: vec![1, 8],
        seqs: vec![8192, 32768, 131072],
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = |i: usize| v.get(i + 1).cloned();
        match v[i].as_str() {
            "--json" => a.json = next(i),
            "--torch" => a.torch = next(i),
            "--torch-small" => a.torch_small = next(i),
            "--only-mode" => a.only_mode = next(i),
            "--only-batch" => a.only_batch = next(i).and_then(|s| s.parse().ok()),
            "--only-seq" => a.only_seq = next(i).and_then(|s| s.parse().ok()),
            "--only-dim" => a.only_dim = next(i).and_then(|s| s.parse().ok()),
            "--page-size" => a.page_size = next(i).and_then(|s| s.parse().ok()).unwrap_or(32),
            "--iters" => a.iters = next(i).and_then(|s| s.parse().ok()).unwrap_or(50),
            "--batches" => {
                a.batches = next(i)
                    .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
                    .unwrap_or_default()
            }
            "--seqs" => {
                a.seqs = next(i)
                    .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
                    .unwrap_or_default()
            }
            "--ab" => {
                a.ab = true;
                i += 1;
                continue;
            }
            "--quick" => {
                a.quick = true;
                i += 1;
                continue;
            }
            "--sweep" => {
                a.sweep = true;
                i += 1;
                continue;
            }
            "--selection" => {
                a.selection = true;
                i += 1;
                continue;
            }
            "--quant" => {
                a.quant = true;
                i += 1;
                continue;
            }
            "--append" => {
                a.append = true;
                i += 1;
                continue;
            }
            "--eliminate" => {
                a.eliminate = true;
                i += 1;
                continue;
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("unknown argument {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    a
}

/// Writes `json` to `path` when one was given, then prints the run's total time.
fn finish(path: &Option<String>, json: &str, t_all: std::time::Instant) {
    if let Some(p) = path {
        if let Err(e) = std::fs::write(p, json) {
            eprintln!("cannot write {p}: {e}");
        }
    }
    println!("total {:.1} s", t_all.elapsed().as_secs_f64());
}

/// The benches' seeded xorshift source of values uniform in [-1, 1).
pub(crate) fn uniform() -> impl FnMut() -> f32 {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Minimal extraction of (batch, seq) -> (sdpa_flash_ms, int4_deq_ms) from torch_decode.py JSON.
fn torch_rows(path: &Option<String>) -> HashMap<(usize, usize), (f64, f64)> {
    let mut m = HashMap::new();
    let Some(p) = path else { return m };
    let Ok(s) = std::fs::read_to_string(p) else {
        eprintln!("cannot read {p}");
        return m;
    };
    let num = |obj: &str, key: &str| -> Option<f64> {
        let at = obj.find(&format!("\"{key}\""))?;
        let rest = &obj[at + key.len() + 2..];
        let rest = rest[rest.find(':')? + 1..].trim_start();
        let end = rest.find([',', '}', '\n']).unwrap_or(rest.len());
        rest[..end].trim().parse().ok()
    };
    for obj in s.split('{').skip(1) {
        if let (Some(b), Some(q), Some(f), Some(d)) = (
            num(obj, "batch"),
            num(obj, "seq"),
            num(obj, "sdpa_flash_ms"),
            num(obj, "int4_deq_ms"),
        ) {
            m.insert((b as usize, q as usize), (f, d));
        }
    }
    m
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Bf16,
    Int8,
    Int4,
    Int2,
    K4v2,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bf16 => "bf16",
            Mode::Int8 => "int8",
            Mode::Int4 => "int4",
            Mode::Int2 => "int2",
            Mode::K4v2 => "k4v2",
        }
    }
    fn config(self, q: usize, kv: usize, d: usize, page_size: usize) -> CacheConfig {
        let b = CacheConfig::builder(1, q, kv, d)
            .hot_dtype(HotDtype::BF16)
            .page_size(page_size)
            .sink_tokens(4)
            .hot_window(128);
        match self {
            Mode::Bf16 => b.full_precision().build(),
            Mode::Int8 => b.k_bits(Bits::B8).v_bits(Bits::B8).build(),
            Mode::Int4 => b.k_bits(Bits::B4).v_bits(Bits::B4).build(),
            Mode::Int2 => b.k_bits(Bits::B2).v_bits(Bits::B2).build(),
            Mode::K4v2 => b.k_bits(Bits::B4).v_bits(Bits::B2).build(),
        }
        .expect("valid bench config")
    }
}

struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// 61 pages' worth of keys (amplitude 2) and values (amplitude 1), `[ps, kv, d]` each.
fn page_pool(rng: &mut Rng, kv: usize, d: usize, ps: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..61)
        .map(|_| {
            let n = ps * kv * d;
            (
                (0..n).map(|_| rng.f32() * 2.0).collect(),
                (0..n).map(|_| rng.f32()).collect(),
            )
        })
        .collect()
}

/// The cache's demotion rule: page `index` of a sequence of `len` tokens is full, holds no sink
/// token, and every token in it is older than the hot window.
fn demotable(index: usize, page_size: usize, len: usize, sinks: usize, window: usize) -> bool {
    let start = index * page_size;
    let end = start + page_size;
    end <= len && start >= sinks && end + window <= len
}

struct Filled {
    st: CudaStorage,
    seqs: Vec<Vec<PageEntry>>,
    bytes_read: f64,
}

fn fill(
    dev: &CudaDevice,
    cfg: &CacheConfig,
    batch: usize,
    seq: usize,
    pool: &[(Vec<f32>, Vec<f32>)],
) -> kvtier::Result<Filled> {
    let mut st: CudaStorage = dev.storage(cfg, 0)?;
    let ps = cfg.page_size;
    let pages = seq.div_ceil(ps);
    if cfg.warm_enabled {
        st.reserve(batch * 8, batch * pages)?;
    } else {
        st.reserve(batch * pages, 0)?;
    }
    let layout = kvtier::quant::WarmLayout::of(cfg);
    let format = WarmFormat::of(cfg);
    let (kvh, d) = (cfg.num_kv_heads, cfg.head_dim);
    let mut bytes = 0f64;
    let mut seqs = Vec::new();
    for b in 0..batch {
        let mut entries = Vec::with_capacity(pages);
        for i in 0..pages {
            let n = ps.min(seq - i * ps);
            let (k, v) = &pool[(i * 7 + b * 13) % pool.len()];
            let slot = st.alloc_hot()?;
            st.write_hot(slot, 0, &k[..n * kvh * d], &v[..n * kvh * d], n)?;
            let mut e = PageEntry {
                tier: Tier::Hot,
                slot,
                n_tokens: n as u32,
                format,
            };
            if cfg.warm_enabled && demotable(i, ps, seq, cfg.sink_tokens, cfg.hot_window) {
                if let Some(w) = st.demote(slot, n, format)? {
                    e = PageEntry {
                        tier: Tier::Warm,
                        slot: w,
                        n_tokens: n as u32,
                        format,
                    };
                }
            }
            bytes += page_read_bytes(cfg, &layout, &e);
            entries.push(e);
        }
        seqs.push(entries);
    }
    bytes += (batch * cfg.num_q_heads * d * 4) as f64;
    Ok(Filled {
        st,
        seqs,
        bytes_read: bytes,
    })
}

/// Device bytes decode reads for one kv head of one page.
fn head_read_bytes(cfg: &CacheConfig, layout: &kvtier::quant::WarmLayout, e: &PageEntry) -> f64 {
    match e.tier {
        Tier::Warm => layout.head_bytes as f64,
        _ => (2 * e.n_tokens as usize * cfg.head_dim * cfg.hot_dtype.size()) as f64,
    }
}

/// Device bytes decode reads for one page (all kv heads) plus its page-table entry.
fn page_read_bytes(cfg: &CacheConfig, layout: &kvtier::quant::WarmLayout, e: &PageEntry) -> f64 {
    cfg.num_kv_heads as f64 * head_read_bytes(cfg, layout, e) + 8.0
}

fn median(mut v: Vec<f32>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2] as f64
}

fn main() {
    let a = args();
    let dev = match CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIP: no CUDA device: {e}");
            return;
        }
    };
    let t_all = std::time::Instant::now();
    let torch_big = torch_rows(&a.torch);
    let torch_small = torch_rows(&a.torch_small);
    let shapes: &[(usize, usize, usize)] = &[(32, 8, 128), (9, 3, 64)];
    let batches: Vec<usize> = if a.quick { vec![1] } else { a.batches.clone() };
    let seqs: Vec<usize> = if a.quick { vec![8192] } else { a.seqs.clone() };
    let modes = [Mode::Bf16, Mode::Int8, Mode::Int4, Mode::Int2, Mode::K4v2];

    // Read-bandwidth ceiling, through a probe kernel in the same module family.
    let probe_cfg = Mode::Int4.config(32, 8, 128, 32);
    let probe: CudaStorage = dev.storage(&probe_cfg, 0).expect("storage");
    let read_bw = probe.read_bandwidth_probe(4 << 30, 10).expect("probe");
    drop(probe);
    println!(
        "device {} sm_{}{} {} SMs; read-bandwidth probe {:.0} GB/s",
        dev.name(),
        dev.compute_capability().0,
        dev.compute_capability().1,
        dev.sm_count(),
        read_bw
    );

    if a.eliminate {
        let seqs: Vec<usize> = if a.seqs == [8192, 32768, 131072] {
            vec![32768, 131072]
        } else {
            a.seqs.clone()
        };
        let rows = eliminate::eliminate_bench(&dev, a.iters, &seqs);
        let json = format!(
            "{{\"device\":\"{}\",\"eliminate_rows\":[{rows}]}}\n",
            dev.name()
        );
        finish(&a.json, &json, t_all);
        return;
    }
    if a.append {
        let rows = tiering::append_bench(&dev, a.iters, &a.batches);
        let json = format!(
            "{{\"device\":\"{}\",\"append_rows\":[{rows}]}}\n",
            dev.name()
        );
        finish(&a.json, &json, t_all);
        return;
    }
    if a.quant {
        let seqs: Vec<usize> = a.seqs.iter().copied().filter(|&s| s <= 32768).collect();
        let rows = quant::quant_bench(&dev, a.iters, &a.batches, &seqs);
        let json = format!(
            "{{\"device\":\"{}\",\"quant_rows\":[{rows}]}}\n",
            dev.name()
        );
        finish(&a.json, &json, t_all);
        return;
    }
    if a.selection {
        let rows = selection_bench(&dev, &a, read_bw);
        let json = format!(
            "{{\"device\":\"{}\",\"read_probe_GBps\":{read_bw:.1},\"selection_rows\":[{rows}]}}\n",
            dev.name()
        );
        finish(&a.json, &json, t_all);
        return;
    }

    let mut rows = Vec::new();
    let mut json = String::new();
    let _ = write!(
        json,
        "{{\"device\":\"{}\",\"read_probe_GBps\":{read_bw:.1},\"rows\":[",
        dev.name()
    );
    for &(q, kv, d) in shapes {
        if a.only_dim.is_some_and(|x| x != d) {
            continue;
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pool = page_pool(&mut rng, kv, d, a.page_size);
        let torch = if d == 128 { &torch_big } else { &torch_small };
        for &b in &batches {
            for &s in &seqs {
                for mode in modes {
                    if a.only_mode
                        .as_deref()
                        .is_some_and(|m| !m.split(',').any(|x| x == mode.name()))
                        || a.only_batch.is_some_and(|x| x != b)
                        || a.only_seq.is_some_and(|x| x != s)
                    {
                        continue;
                    }
                    let cfg = mode.config(q, kv, d, a.page_size);
                    let t0 = std::time::Instant::now();
                    let mut f = match fill(&dev, &cfg, b, s, &pool) {
                        Ok(f) => f,
                        Err(e) => {
                            eprintln!("{q}/{kv}/{d} B{b} S{s} {}: setup failed: {e}", mode.name());
                            continue;
                        }
                    };
                    let fill_s = t0.elapsed().as_secs_f64();
                    let lists: Vec<&[PageEntry]> = f.seqs.iter().map(|v| v.as_slice()).collect();
                    let mut plan = f.st.plan_pages(&lists, None).expect("plan");
                    let qv: Vec<f32> = (0..b * q * d).map(|_| rng.f32()).collect();
                    let att = f.st.attend_plan(&mut plan, &qv).expect("attend");
                    let mass: f32 = att
                        .page_mass
                        .iter()
                        .map(|m| m.iter().sum::<f32>())
                        .sum::<f32>()
                        / b as f32;
                    let finite = att.output.iter().all(|x| x.is_finite());
                    let mut tunings = vec![dev.tuning()];
                    if a.ab {
                        tunings.push(CudaTuning {
                            cuda_cores: true,
                            ..CudaTuning::default()
                        });
                    }
                    if a.sweep && ((b == 1 && s == 131072) || (b == 8 && s == 32768)) {
                        let shapes: &[(u32, u32, u32)] = if mode == Mode::Bf16 {
                            &[(16, 1, 0), (8, 2, 0), (4, 3, 0), (4, 2, 0)]
                        } else {
                            &[(8, 1, 2), (8, 2, 2), (8, 1, 3), (16, 1, 3), (4, 4, 2)]
                        };
                        for &(warps, min_blocks, stages) in shapes {
                            let t = CudaTuning {
                                warps,
                                channels_per_lane: 8,
                                min_blocks,
                                stages,
                                cuda_cores: false,
                            };
                            tunings.push(t);
                        }
                    }
                    for (ti, t) in tunings.iter().enumerate() {
                        if ti > 0 && f.st.retune(*t, &cfg).is_err() {
                            continue;
                        }
                        let mut plan = f.st.plan_pages(&lists, None).expect("plan");
                        let _ = f.st.attend_plan(&mut plan, &qv).expect("attend");
                        let _ = f.st.time_decode(&plan, 5, 256 << 20).expect("warmup");
                        let times = f.st.time_decode(&plan, a.iters, 256 << 20).expect("time");
                        let ms = median(times);
                        let gbps = f.bytes_read / (ms * 1e-3) / 1e9;
                        let (regs, bps, w, cpl, gs) = f.st.decode_kernel_info();
                        let (flash, deq) =
                            torch.get(&(b, s)).copied().unwrap_or((f64::NAN, f64::NAN));
                        let tag = if ti == 0 {
                            String::new()
                        } else if t.cuda_cores && t.warps == 0 {
                            " [cuda cores]".to_string()
                        } else {
                            format!(" [w{} m{} s{}]", t.warps, t.min_blocks, t.stages)
                        };
                        let line = format!(
                            "{q:>2}/{kv}/{d:<3} B{b} S{s:<6} {:<4}{tag:<14} {ms:>8.4} ms {gbps:>7.0} GB/s {:>5.1}% | x flash {:>5.2} x int4_deq {:>5.2} | items {} regs {regs} ctas/sm {bps} w{w} cpl{cpl} gs{gs} | mass {mass:.4} {} fill {fill_s:.1}s",
                            mode.name(),
                            100.0 * gbps / read_bw,
                            flash / ms,
                            deq / ms,
                            plan.n_items(),
                            if finite { "ok" } else { "NONFINITE" },
                        );
                        println!("{line}");
                        let _ = write!(
                            json,
                            "{}{{\"variant\":\"{}\",\"path\":\"{}\",\"q_heads\":{q},\"kv_heads\":{kv},\"dim\":{d},\"batch\":{b},\"seq\":{s},\"mode\":\"{}\",\"warps\":{},\"cpl\":{},\"min_blocks\":{},\"ms\":{ms:.5},\"GBps\":{gbps:.1},\"bytes_read\":{:.0},\"pct_read_bw\":{:.2},\"x_sdpa_flash\":{:.3},\"x_int4_deq\":{:.3},\"regs\":{regs},\"ctas_per_sm\":{bps},\"items\":{},\"mass_sum\":{mass:.5}}}",
                            if rows.is_empty() { "" } else { "," },
                            if ti == 0 {
                                "default".to_string()
                            } else if t.cuda_cores && t.warps == 0 {
                                "cuda_cores".to_string()
                            } else {
                                format!("w{} m{} s{}", t.warps, t.min_blocks, t.stages)
                            },
                            if f.st.decode_uses_tensor_cores() { "tensor" } else { "cuda" },
                            mode.name(),
                            t.warps,
                            t.channels_per_lane,
                            t.min_blocks,
                            f.bytes_read,
                            100.0 * gbps / read_bw,
                            flash / ms,
                            deq / ms,
                            plan.n_items(),
                        );
                        rows.push(line);
                    }
                }
            }
        }
    }
    json.push_str("]}\n");
    if let Some(p) = &a.json {
        if let Err(e) = std::fs::write(p, &json) {
            eprintln!("cannot write {p}: {e}");
        }
    }
    println!("total {:.1} s", t_all.elapsed().as_secs_f64());
}

/// `--selection`: decode over every page vs over a random half of the pages per kv head, int4
/// warm pages, bf16 and f16 hot pages. Prints one line per hot dtype; returns the JSON rows.
fn selection_bench(dev: &CudaDevice, a: &Args, read_bw: f64) -> String {
    let (q, kv, d) = (32, 8, 128);
    let seq = a.only_seq.unwrap_or(32768);
    let batch = a.only_batch.unwrap_or(1);
    let mut rng = Rng(0x51ec_7ed5_eed5_1234);
    let pool = page_pool(&mut rng, kv, d, 32);
    let mut json = String::new();
    for hot in [HotDtype::BF16, HotDtype::F16] {
        let cfg = CacheConfig::builder(1, q, kv, d)
            .hot_dtype(hot)
            .page_size(32)
            .sink_tokens(4)
            .hot_window(128)
            .k_bits(Bits::B4)
            .v_bits(Bits::B4)
            .build()
            .expect("valid bench config");
        let layout = kvtier::quant::WarmLayout::of(&cfg);
        let f = match fill(dev, &cfg, batch, seq, &pool) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("selection {hot:?} B{batch} S{seq}: setup failed: {e}");
                continue;
            }
        };
        let lists: Vec<&[PageEntry]> = f.seqs.iter().map(|v| v.as_slice()).collect();
        // A different random half of the pages for each kv head of each sequence.
        let mut sel = PageSelection::none(batch, kv);
        let mut sel_bytes = (batch * q * d * 4) as f64;
        for (b, l) in lists.iter().enumerate() {
            for h in 0..kv {
                let mut idx: Vec<u32> = (0..l.len() as u32).collect();
                let k = l.len() / 2;
                for i in 0..k {
                    let j = i + (rng.u64() % (l.len() - i) as u64) as usize;
                    idx.swap(i, j);
                }
                idx.truncate(k);
                for &p in &idx {
                    sel_bytes += head_read_bytes(&cfg, &layout, &l[p as usize]) + 8.0;
                }
                sel.set(b, h, idx).expect("selection in range");
            }
        }
        let qv: Vec<f32> = (0..batch * q * d).map(|_| rng.f32()).collect();
        let mut plan_all = f.st.plan_pages(&lists, None).expect("plan");
        let mut plan_sel = f.st.plan_pages(&lists, Some(&sel)).expect("plan");
        let att_all = f.st.attend_plan(&mut plan_all, &qv).expect("attend");
        let att_sel = f.st.attend_plan(&mut plan_sel, &qv).expect("attend");
        let mass = |att: &kvtier::Attention| {
            att.page_mass
                .iter()
                .map(|m| m.iter().sum::<f32>())
                .sum::<f32>()
                / batch as f32
        };
        let finite = att_all.is_finite() && att_sel.is_finite();
        let _ = f.st.time_decode(&plan_all, 5, 256 << 20).expect("warmup");
        let _ = f.st.time_decode(&plan_sel, 5, 256 << 20).expect("warmup");
        // Alternate the two in rounds so that clock drift hits both alike.
        let (mut t_all, mut t_sel) = (Vec::new(), Vec::new());
        let rounds = 5;
        for _ in 0..rounds {
            let n = a.iters.div_ceil(rounds).max(1);
            t_all.extend(f.st.time_decode(&plan_all, n, 256 << 20).expect("time"));
            t_sel.extend(f.st.time_decode(&plan_sel, n, 256 << 20).expect("time"));
        }
        let (ms_all, ms_sel) = (median(t_all), median(t_sel));
        let gb_all = f.bytes_read / (ms_all * 1e-3) / 1e9;
        let gb_sel = sel_bytes / (ms_sel * 1e-3) / 1e9;
        let ratio = ms_sel / ms_all;
        let hot_name = match hot {
            HotDtype::BF16 => "bf16",
            HotDtype::F16 => "f16",
            HotDtype::F32 => "f32",
        };
        println!(
            "selection 32/8/128 B{batch} S{seq} int4 hot {hot_name:<4} | all pages {ms_all:>8.4} ms {gb_all:>6.0} GB/s ({:.1}%) items {} | 50% selection {ms_sel:>8.4} ms {gb_sel:>6.0} GB/s items {} | ratio {ratio:.3} | mass {:.4} / {:.4} {}",
            100.0 * gb_all / read_bw,
            plan_all.n_items(),
            plan_sel.n_items(),
            mass(&att_all),
            mass(&att_sel),
            if finite { "ok" } else { "NONFINITE" },
        );
        let _ = write!(
            json,
            "{}{{\"q_heads\":{q},\"kv_heads\":{kv},\"dim\":{d},\"batch\":{batch},\"seq\":{seq},\"warm\":\"int4\",\"hot\":\"{hot_name}\",\"ms_all\":{ms_all:.5},\"ms_selected\":{ms_sel:.5},\"ratio\":{ratio:.4},\"GBps_all\":{gb_all:.1},\"GBps_selected\":{gb_sel:.1},\"items_all\":{},\"items_selected\":{}}}",
            if json.is_empty() { "" } else { "," },
            plan_all.n_items(),
            plan_sel.n_items(),
        );
    }
    json
}
