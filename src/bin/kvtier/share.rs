//! `kvtier share`: prefix sharing measured on the real model. Time to first token for a prompt of
//! `--tokens` State of the Union tokens computed here, against the same prompt imported from the
//! store by a node that never saw it (a new store connection: cold) and again (warm); bytes moved;
//! page put / get throughput; and, on Redis, `redis-benchmark` against the same server in the same
//! run. The logits after the imported prefix are compared with the computed ones.

use std::sync::Arc;
use std::time::Instant;

use clap::{Arg, ArgMatches, Command};
use kvtier::cold::store::{ColdStore, DirStore, MemoryStore};
use kvtier::model::corpus::{latest_with_tokens, load_speeches};
use kvtier::model::{argmax, protect};
use kvtier::prefix::{Fingerprint, PrefixStore};
use serde_json::{json, Value};

use crate::report::{assets, assets_arg, get, load_model, spinner, AnyResult, Ctx, Report};

pub fn command() -> Command {
    Command::new("share")
        .about("prefix sharing on the real model: time to first token computed vs imported from a page store")
        .arg(
            Arg::new("store")
                .long("store")
                .default_value("memory")
                .help("memory | dir:<path> | redis://[user:pass@]host:port[/db] | rediss://... (feature redis)"),
        )
        .arg(Arg::new("tokens").long("tokens").default_value("4096").help("prompt tokens (a State of the Union speech)"))
        .arg(Arg::new("namespace").long("namespace").default_value("bench").help("key namespace"))
        .arg(assets_arg())
}

/// A store, and the `host:port` of a Redis one without credentials (for redis-benchmark).
type Opened = (Arc<dyn ColdStore>, Option<(String, u16)>);

/// The store a `--store` spec names, and the `host:port` of a Redis one.
fn open_store(spec: &str) -> AnyResult<Opened> {
    if spec == "memory" {
        return Ok((Arc::new(MemoryStore::new(8 << 30)), None));
    }
    if let Some(path) = spec.strip_prefix("dir:") {
        return Ok((Arc::new(DirStore::new(path)?), None));
    }
    if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        return open_redis(spec);
    }
    Err(format!("--store `{spec}`: expected memory, dir:<path> or redis://host:port").into())
}

#[cfg(feature = "redis")]
fn open_redis(url: &str) -> AnyResult<Opened> {
    use kvtier::cold::redis::{RedisOptions, RedisStore};
    let store = RedisStore::connect(
        url,
        RedisOptions {
            io_timeout: std::time::Duration::from_secs(10),
            ..RedisOptions::default()
        },
    )?;
    // host:port for redis-benchmark, only from a URL without credentials.
    let hp = url
        .strip_prefix("redis://")
        .filter(|r| !r.contains('@'))
        .and_then(|r| r.split('/').next())
        .and_then(|hp| hp.rsplit_once(':'))
        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)));
    Ok((Arc::new(store), hp))
}

#[cfg(not(feature = "redis"))]
fn open_redis(_: &str) -> AnyResult<Opened> {
    Err(
        "this kvtier was built without the `redis` feature (cargo build --features cli,redis)"
            .into(),
    )
}

/// `redis-benchmark` SET / GET requests per second with values of `bytes`, pipelined 16 deep.
fn redis_benchmark(host: &str, port: u16, bytes: usize) -> Option<Value> {
    let o = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-n",
            "2000",
        ])
        .args(["-d", &bytes.to_string(), "-P", "16", "-r", "1000", "--csv"])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split(',').map(|c| c.trim_matches('"')).collect();
        if let (Some(name), Some(rps)) = (
            cells.first(),
            cells.get(1).and_then(|r| r.parse::<f64>().ok()),
        ) {
            out.insert(name.to_lowercase(), json!(rps));
        }
    }
    Some(json!({"value_bytes": bytes, "pipeline": 16, "requests_per_s": out}))
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    let spec: String = get(m, "store")?;
    let n: usize = get(m, "tokens")?;
    let ns: String = get(m, "namespace")?;
    let assets = assets(m)?;
    let (store, redis_hp) = open_store(&spec)?;
    let model = load_model(&assets, false)?;
    let sp = spinner("fingerprinting the weights");
    let fp = Fingerprint::of_file(&assets.model())?;
    sp.finish_and_clear();
    if n < 2 || n > model.config().context_length {
        return Err(format!("--tokens: need 2 to {}", model.config().context_length).into());
    }
    let speeches = load_speeches(&assets.sotu())?;
    let (speech, ids) = latest_with_tokens(&speeches, model.tokenizer(), n)?;
    let prompt = &ids[..n];

    // 1. Computed here: the whole prompt prefilled.
    let px = PrefixStore::new(store.clone(), &ns, fp)?;
    let mut a = protect(model.clone(), 0.0)?;
    let sp = spinner(format!("prefill of {n} tokens (computed)"));
    let t0 = Instant::now();
    let computed_logits = a.prefill(prompt)?;
    let ttft_computed = t0.elapsed().as_secs_f64();
    sp.finish_and_clear();
    let cfg = a.cache().kv_cache().config().clone();
    let before = px.lookup(&cfg, prompt)?;
    let t1 = Instant::now();
    let published = px.publish(a.cache().kv_cache(), a.cache().seq(), prompt)?;
    let put_s = t1.elapsed().as_secs_f64();

    // 2. Another node: a new connection, a new session; then the same node again.
    // (Host memory is one process's: the second node shares the same store object.)
    let store2 = if spec == "memory" {
        store.clone()
    } else {
        open_store(&spec)?.0
    };
    let px2 = PrefixStore::new(store2, &ns, fp)?;
    let mut b = protect(model.clone(), 0.0)?;
    let mut runs = Vec::new();
    let mut text = String::new();
    for label in ["cold", "warm"] {
        let t = Instant::now();
        let r = b.prefill_shared(prompt, &px2)?;
        let ttft = t.elapsed().as_secs_f64();
        if let Some(e) = &r.store_error {
            return Err(format!("the store failed during the {label} import: {e}").into());
        }
        let diff = max_abs(&r.logits, &computed_logits);
        let same_top = argmax(&r.logits) == argmax(&computed_logits);
        runs.push(json!({
            "run": label, "ttft_s": ttft, "import_s": r.import_time.as_secs_f64(),
            "prefill_rest_s": r.prefill_time.as_secs_f64(), "imported_tokens": r.imported.tokens,
            "computed_tokens": r.computed, "bytes_read": r.imported.bytes,
            "corrupt_records": r.imported.corrupt,
            "fetch_s": r.imported.fetch_time.as_secs_f64(),
            "get_mb_per_s": r.imported.bytes as f64 / r.imported.fetch_time.as_secs_f64().max(1e-9) / 1e6,
            "get_records_per_s": (r.imported.pages * cfg.num_layers) as f64 / r.imported.fetch_time.as_secs_f64().max(1e-9),
            "logits_max_abs_diff_vs_computed": diff, "same_next_token": same_top,
        }));
        text += &format!(
            "| imported ({label}) | {ttft:.3} | {:.1}x | {} + {} | {:.1} MB read in {:.3} s ({:.0} records/s) | {diff:.3} | {} |\n",
            ttft_computed / ttft,
            r.imported.tokens,
            r.computed,
            r.imported.bytes as f64 / 1e6,
            r.imported.fetch_time.as_secs_f64(),
            (r.imported.pages * cfg.num_layers) as f64 / r.imported.fetch_time.as_secs_f64().max(1e-9),
            if same_top { "yes" } else { "no" }
        );
    }
    px2.flush()?;
    let bench = redis_hp.and_then(|(h, p)| {
        let rec = published.bytes / published.written.max(1);
        redis_benchmark(&h, p, rec)
    });
    let head = format!(
        "store: {}; prompt: {n} tokens of {speech}; SmolLM2-135M, default cache (balanced), CPU\n\
         already stored before this run: {before} tokens\n\
         published: {} records ({:.1} MB) in {put_s:.3} s ({:.1} MB/s, {:.0} records/s; {} already present)\n{}\n\
         | prefill | time to first token (s) | vs computed | tokens imported + computed | moved | max abs logit diff vs computed | same next token |\n\
         |---|---:|---:|---:|---:|---:|---|\n\
         | computed | {ttft_computed:.3} | 1.0x | 0 + {n} | - | 0 | yes |\n",
        store.describe(),
        published.written,
        published.bytes as f64 / 1e6,
        published.bytes as f64 / put_s.max(1e-9) / 1e6,
        published.written as f64 / put_s.max(1e-9),
        published.present,
        match &bench {
            Some(b) => format!(
                "redis-benchmark on the same server, {} B values, pipeline 16: {}",
                b["value_bytes"],
                b["requests_per_s"]
            ),
            None => "redis-benchmark: not run (not a credential-free redis:// store, or not installed)".into(),
        },
    );
    let json = json!({
        "store": store.describe(), "tokens": n, "speech": speech, "stored_before": before,
        "ttft_computed_s": ttft_computed,
        "publish": {"records": published.written, "present": published.present, "bytes": published.bytes,
                    "seconds": put_s, "not_exact": published.not_exact},
        "imports": runs, "redis_benchmark": bench,
    });
    Ok(Report::new(json, head + &text))
}
