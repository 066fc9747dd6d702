//! The disk tier at 128K tokens: a SmolLM2-shaped cache (9 q / 3 kv heads, d64, int4 pages) whose
//! cold pages and archive live mostly on disk under a host-RAM budget of 10% of their size. Per
//! decode step (attention in every layer, one query per layer): time with and without prefetch,
//! record bytes read from disk, against the read bandwidth of the same disk measured in the same
//! run (a fio-like sequential 1 MiB and random 4 KiB `pread` pass over a file of the same size).
//! The page cache is dropped for every file before each timed pass (fsync + POSIX_FADV_DONTNEED),
//! so reads come from the device. Attention is checked bit-identical to the all-in-RAM cache.
//!
//!   cargo bench --bench disk [-- --tokens N --layers L --steps S --dir PATH]
//!
//! Defaults: 131072 tokens, 4 layers (the per-layer work is the same in all 30), 8 steps, the
//! system temp directory. Prints a table (medians) and writes nothing else.

use kvtier::{CacheConfig, KvCache, PageRef, SeqId, SpillConfig, Tier};
#[cfg(target_os = "linux")]
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    tokens: usize,
    layers: usize,
    steps: usize,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        tokens: 131072,
        layers: 4,
        steps: 8,
        dir: std::env::temp_dir(),
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--tokens" => a.tokens = val.parse().expect("--tokens N"),
            "--layers" => a.layers = val.parse().expect("--layers L"),
            "--steps" => a.steps = val.parse().expect("--steps S"),
            "--dir" => a.dir = PathBuf::from(val),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Writes dirty pages of `path` to the device and drops the file from the page cache (Linux;
/// macOS has no per-file drop, so there the reads may come from the page cache).
fn drop_cache(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.sync_all();
        #[cfg(target_os = "linux")]
        // SAFETY: a valid open descriptor; POSIX_FADV_DONTNEED only drops clean cached pages.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Sequential (1 MiB) and random (4 KiB) read bandwidth of a fresh file of `bytes`, GB/s.
fn disk_bandwidth(dir: &Path, bytes: usize) -> (f64, f64) {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!("kvtier-disk-bench-{}.probe", std::process::id()));
    {
        let mut f = std::fs::File::create(&path).expect("probe file");
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let block: Vec<u8> = (0..1 << 20).map(|_| xorshift(&mut x) as u8).collect();
        for _ in 0..bytes.div_ceil(1 << 20) {
            f.write_all(&block).expect("probe write");
        }
    }
    let f = std::fs::File::open(&path).expect("probe open");
    let len = f.metadata().expect("len").len() as usize;
    drop_cache(&path);
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < len {
        f.read_exact_at(&mut buf, off as u64).expect("seq read");
        off += 1 << 20;
    }
    let seq = len as f64 / t.elapsed().as_secs_f64() / 1e9;
    drop_cache(&path);
    let n = (len / 4096).min(16384);
    let mut x = 12345u64;
    let t = Instant::now();
    for _ in 0..n {
        let o = (xorshift(&mut x) as usize % (len / 4096)) * 4096;
        f.read_exact_at(&mut buf[..4096], o as u64)
            .expect("rand read");
    }
    let rnd = (n * 4096) as f64 / t.elapsed().as_secs_f64() / 1e9;
    drop(f);
    let _ = std::fs::remove_file(&path);
    (seq, rnd)
}

fn build(a: &Args, spill: Option<SpillConfig>) -> (KvCache, SeqId) {
    let cfg = CacheConfig::builder(a.layers, 9, 3, 64)
        .spill(spill)
        .max_seq_len(a.tokens + 1)
        .build()
        .expect("config");
    let mut c = KvCache::new(cfg).expect("cache");
    let s = c.add_sequence();
    let row = 3 * 64;
    let chunk = 4096;
    let mut x = 0x1234_5678u64;
    let mut k = vec![0f32; chunk * row];
    let mut v = vec![0f32; chunk * row];
    for layer in 0..a.layers {
        let mut at = 0;
        while at < a.tokens {
            let n = chunk.min(a.tokens - at);
            for (kx, vx) in k[..n * row].iter_mut().zip(&mut v[..n * row]) {
                *kx = (xorshift(&mut x) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                *vx = (xorshift(&mut x) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            }
            c.append(s, layer, &k[..n * row], &v[..n * row])
                .expect("append");
            at += n;
        }
        let n = c.page_table(s, layer).expect("table").pages().len();
        for page in 0..n {
            let p = PageRef {
                seq: s,
                layer,
                page,
            };
            if c.page(p).expect("page").tier == Tier::Warm {
                c.to_cold(p).expect("to_cold");
            }
        }
    }
    (c, s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let a = args();
    let q: Vec<f32> = (0..9 * 64)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let t = Instant::now();
    let (ram, s) = build(&a, None);
    let rep = ram.memory_report();
    let host = rep.cold_bytes + rep.archive_bytes;
    println!(
        "cache: {} layers x {} tokens, 9/3/64 int4; cold {:.1} MiB + archive {:.1} MiB in RAM ({:.1} s)",
        a.layers,
        a.tokens,
        rep.cold_bytes as f64 / 1048576.0,
        rep.archive_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let want: Vec<Vec<f32>> = (0..a.layers)
        .map(|l| ram.attend(l, &[s], &q).expect("attend").output)
        .collect();
    let mut t_ram = Vec::new();
    for _ in 0..a.steps {
        let t = Instant::now();
        for l in 0..a.layers {
            ram.attend(l, &[s], &q).expect("attend");
        }
        t_ram.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(ram);
    let (seq_bw, rnd_bw) = disk_bandwidth(&a.dir, host.clamp(64 << 20, 1 << 30));
    println!("disk read bandwidth (same directory): sequential 1 MiB {seq_bw:.2} GB/s, random 4 KiB {rnd_bw:.3} GB/s");
    println!(
        "\n{:>12} | {:>9} {:>9} | {:>12} {:>10} | {:>8} {:>8} {:>8} | {:>9}",
        "mode", "step ms", "x RAM", "disk MB/step", "GB/s", "hits", "waited", "sync", "wait ms"
    );
    println!(
        "{:>12} | {:>9.2} {:>9.2} | {:>12} {:>10} | {:>8} {:>8} {:>8} | {:>9}",
        "all RAM",
        median(t_ram.clone()),
        1.0,
        "-",
        "-",
        "-",
        "-",
        "-",
        "-"
    );
    // sync: no read-ahead. prefetch: the next-layer heuristic only (layer 0 is read on demand).
    // prefetch+ask: also every layer requested at the start of the step (an engine that knows
    // the step's layers, or an eliminator's survivors).
    for (name, prefetch, ask) in [
        ("sync", false, false),
        ("prefetch", true, false),
        ("prefetch+ask", true, true),
    ] {
        let dir = a
            .dir
            .join(format!("kvtier-disk-bench-{}-{name}", std::process::id()));
        let sp = SpillConfig {
            prefetch,
            ..SpillConfig::new(&dir, host / 10)
        };
        let (c, s) = build(&a, Some(sp));
        let r = c.memory_report();
        assert!(r.cold_bytes + r.archive_bytes <= host / 10);
        let mut times = Vec::new();
        let mut waits = Vec::new();
        let mut io = kvtier::cold::DiskStep::default();
        for step in 0..a.steps {
            for f in c.spill_files() {
                drop_cache(&f);
            }
            let t = Instant::now();
            if ask {
                for l in 0..a.layers {
                    c.prefetch(l, &[s], None).expect("prefetch");
                }
            }
            let mut step_io = kvtier::cold::DiskStep::default();
            for (l, w) in want.iter().enumerate() {
                let got = c.attend(l, &[s], &q).expect("attend");
                if step == 0 {
                    assert_eq!(
                        &got.output, w,
                        "layer {l}: spilled attention differs from RAM"
                    );
                }
                // What this layer's call read from disk and waited for (`Attention::disk`).
                step_io.add(&got.disk);
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
            waits.push(step_io.wait_ns as f64 / 1e6);
            io.add(&step_io);
        }
        let step = median(times);
        let mb = io.bytes as f64 / a.steps as f64 / 1e6;
        let per = |n: u32| n as f64 / a.steps as f64;
        println!(
            "{:>12} | {:>9.2} {:>9.2} | {:>12.1} {:>10.2} | {:>8.0} {:>8.0} {:>8.0} | {:>9.2}",
            name,
            step,
            step / median(t_ram.clone()),
            mb,
            mb / 1e3 / (step / 1e3),
            per(io.hits),
            per(io.waited),
            per(io.sync_reads),
            median(waits)
        );
        drop(c);
        assert!(!dir.exists(), "spill files removed");
    }
    println!("\nattention over spilled pages: bit-identical to the all-RAM cache in every layer");
}
