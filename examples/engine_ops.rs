//! What the engine operations cost on a SmolLM2-shaped sequence: 30 layers, 9 q / 3 kv heads,
//! d64, the `balanced` preset (int4 pages, f16 hot window of 128, archive on), `tokens` tokens
//! (default 32768) of deterministic pseudo-random keys and values.
//!
//!   cargo run --release --example engine_ops -- [tokens] [dir] [reps]
//!
//! Times are medians over `reps` (default 5) runs of each operation on fresh state (a fork made
//! for the purpose, removed afterwards); bytes are from `memory_report` before and after, and the
//! saved file's size. `dir` (default: the temp directory) receives the saved files, removed at
//! the end. Prints a Markdown table.

use kvtier::{CacheConfig, KvCache, MemoryReport, SeqId};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mib(b: i64) -> String {
    format!("{:+.2} MiB", b as f64 / (1 << 20) as f64)
}

fn delta(a: &MemoryReport, b: &MemoryReport) -> (i64, i64) {
    (
        b.device_bytes() as i64 - a.device_bytes() as i64,
        b.host_bytes() as i64 - a.host_bytes() as i64,
    )
}

fn main() -> kvtier::Result<()> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(32768);
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let (layers, kvh, d) = (30, 3, 64);
    let cfg = CacheConfig {
        max_seq_len: tokens + 1024,
        ..CacheConfig::balanced(layers, 9, kvh, d)?
    };
    let mut c = KvCache::new(cfg)?;
    let row = kvh * d;
    let chunk = 1024;
    let kv: Vec<f32> = (0..chunk * row)
        .map(|i| ((i * 2_654_435_761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let s = c.add_sequence();
    let t = Instant::now();
    let mut done = 0;
    while done < tokens {
        let n = chunk.min(tokens - done);
        for l in 0..layers {
            c.append(s, l, &kv[..n * row], &kv[..n * row])?;
        }
        done += n;
    }
    let build = t.elapsed().as_secs_f64();
    let base = c.memory_report();
    println!(
        "sequence: {tokens} tokens x {layers} layers, 9/3/64, balanced preset; built in {build:.1} s"
    );
    println!("memory: {base}\n");
    println!("| operation | time (median of {reps}) | device bytes | host bytes | notes |");
    println!("|---|---:|---:|---:|---|");
    let one = &kv[..row];

    // fork
    let (mut times, mut note) = (Vec::new(), String::new());
    let mut dd = (0, 0);
    for _ in 0..reps {
        let t = Instant::now();
        let f = c.fork(s)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let r = c.memory_report();
        dd = delta(&base, &r);
        note = format!("{} pages shared", r.shared_pages);
        c.remove_sequence(f)?;
    }
    println!(
        "| fork | {:.3} ms | {} | {} | {note} |",
        median(times),
        mib(dd.0),
        mib(dd.1)
    );

    // decode append on a fork vs the source (one token, every layer)
    let f = c.fork(s)?;
    let mut tf = Vec::new();
    let mut ts = Vec::new();
    for _ in 0..reps {
        for (seq, v) in [(f, &mut tf), (s, &mut ts)] {
            let t = Instant::now();
            for l in 0..layers {
                c.append(seq, l, one, one)?;
            }
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "| append 1 token x {layers} layers, fork / source | {:.3} / {:.3} ms | | | shared pages demote once for both |",
        median(tf),
        median(ts)
    );
    c.remove_sequence(f)?;
    c.truncate(s, tokens)?;

    // truncate: a rejected draft (100 tokens) and a deep rollback into shared warm pages
    for (name, cut) in [
        ("truncate -100 tokens (fork)", tokens.saturating_sub(100)),
        ("truncate to half (fork, CoW)", tokens / 2 + 5),
    ] {
        let mut times = Vec::new();
        let mut note = String::new();
        let mut dd = (0, 0);
        for _ in 0..reps {
            let f = c.fork(s)?;
            let before = c.memory_report();
            let t = Instant::now();
            let tr = c.truncate(f, cut)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            dd = delta(&before, &c.memory_report());
            note = format!(
                "{} tokens dropped, {} boundary pages restored exactly",
                tr.tokens, tr.restored_exact
            );
            c.remove_sequence(f)?;
        }
        println!(
            "| {name} | {:.3} ms | {} | {} | {note} |",
            median(times),
            mib(dd.0),
            mib(dd.1)
        );
    }

    // reorder two beams onto the source
    let mut times = Vec::new();
    for _ in 0..reps {
        let b = c.fork(s)?;
        let t = Instant::now();
        c.reorder(&[s, b], &[0, 0])?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        c.remove_sequence(b)?;
    }
    println!(
        "| reorder 2 beams [0, 0] | {:.3} ms | | | a fork and a swap |",
        median(times)
    );

    // save / restore, with and without the archive
    for archive in [false, true] {
        let path = dir.join(format!(
            "kvtier-engine-ops-{}-{archive}.kvts",
            std::process::id()
        ));
        let mut ts = Vec::new();
        let mut bytes = 0;
        for _ in 0..reps {
            let t = Instant::now();
            bytes = c.save_sequence(s, &path, archive)?.bytes;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut tr = Vec::new();
        let mut dd = (0, 0);
        let mut restored = SeqId(0);
        for _ in 0..reps {
            let before = c.memory_report();
            let t = Instant::now();
            restored = c.restore_sequence(&path)?;
            tr.push(t.elapsed().as_secs_f64() * 1e3);
            dd = delta(&before, &c.memory_report());
            c.remove_sequence(restored)?;
        }
        let _ = restored;
        let (ms, mr) = (median(ts), median(tr));
        let what = if archive {
            "with archive"
        } else {
            "no archive"
        };
        println!(
            "| save ({what}) | {ms:.1} ms | | | {:.1} MiB file, {:.2} GB/s incl. fsync |",
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / ms / 1e6
        );
        println!(
            "| restore ({what}) | {mr:.1} ms | {} | {} | {:.2} GB/s |",
            mib(dd.0),
            mib(dd.1),
            bytes as f64 / mr / 1e6
        );
        std::fs::remove_file(&path).ok();
    }

    // remove
    let mut times = Vec::new();
    for _ in 0..reps {
        let f = c.fork(s)?;
        c.append(f, 0, one, one)?;
        let t = Instant::now();
        c.remove_sequence(f)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "| remove a fork | {:.3} ms | | | frees its private pages only |",
        median(times)
    );
    let t = Instant::now();
    let before = c.memory_report();
    c.remove_sequence(s)?;
    let gone = t.elapsed().as_secs_f64() * 1e3;
    let (dv, dh) = delta(&before, &c.memory_report());
    println!(
        "| remove the sequence | {gone:.3} ms | {} | {} | |",
        mib(dv),
        mib(dh)
    );
    Ok(())
}
