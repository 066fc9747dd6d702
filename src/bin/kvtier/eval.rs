//! `kvtier eval`: perplexity over long State of the Union speeches and passkey retrieval, for
//! any set of kvtier cache configurations, with JSON (and optionally Markdown) output.
//!
//! Perplexity at length L: the first `L - tail` tokens of a speech go through one exact block
//! prefill; the last `tail` tokens are decoded one by one, each prediction attending over the cache
//! *as stored* (warm pages quantised), so the compressed cache shapes every scored prediction.
//!
//! Passkey: a 5-digit number is hidden at a depth of SOTU filler; the context (chat header,
//! instruction, filler with the needle) is one exact prefill, then the question and the opening of
//! the answer are prefilled on top of the stored cache and the answer is decoded greedily.
//!
//! The exact prefill of a context is the same for every configuration (attention inside one prefill
//! is exact), so it is computed once and its keys/values are replayed into each configuration's
//! cache (`Session::replay`), which leaves the state a prefill in that configuration would have left.
//!
//! ```text
//! kvtier eval --config fp --config k4v4-w128 --lengths 4096 --tail 1024 \
//!     --speeches 2 --passkey-trials 20 --report results.json
//! kvtier eval --k-bits 4 --v-bits 2 --hot-window 64 --page-size 32
//! ```
//! Config spec: `fp` (everything hot and exact) or `k<bits>v<bits>[-w<hot window>][-p<page size>]
//! [-s<sink tokens>][-g<value group>][-e<n>][-o<n>][-rk|-rkv]`, bits in {8, 4, 3, 2}; `-e<n>` keeps the first
//! and last `n` layers at int4 keys and values, `-o<n>` keeps `n` key outlier channels per page
//! exact (f16), `-rk` rotates keys (and queries), `-rkv` keys and values.

use std::io::Write;
use std::time::Instant;

use clap::{Arg, ArgAction, ArgMatches, Command};
use indicatif::ProgressBar;
use kvtier::model::corpus::{load_speeches, PasskeyBuilder, SplitMix64};
use kvtier::model::{
    protect_with, CapturedPrefill, ExactAttention, GenerateOptions, Llama, ModelError, Session,
};
use kvtier::{Bits, CacheConfig, HotDtype};
use serde_json::{json, Value};

use crate::plot::{self, Axes, Scale, Series};
use crate::report::{assets, assets_arg, bar, get, list, load_model, AnyResult, Ctx, Report};

/// A named cache configuration from the command line.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    full_precision: bool,
    k_bits: u32,
    v_bits: u32,
    hot_window: usize,
    page_size: usize,
    sinks: usize,
    group: usize,
    /// Rotation before storage (`-rk` keys, `-rkv` keys and values).
    rotation: kvtier::Rotation,
    /// First and last `edges` layers at int4 keys and values (`-e<n>`).
    edges: usize,
    /// Key outlier channels kept exact per page and kv head (`-o<n>`).
    outliers: usize,
    /// Value ranges fitted to the least squared error (`-f`).
    value_fit: bool,
    /// A retention policy run after every decode step, and its device budget as a fraction of the
    /// sequence's f16 bytes (`<config>@<policy>:<percent>`).
    policy: Option<(String, f64)>,
    /// Query-time page choice (`<config>~eps:<ε>` or `<config>~quest:<pages>`).
    choice: kvtier::PageChoice,
    /// The monitor and healing after every decode step, healing at most this many pages per
    /// layer (`<config>~heal:<pages>`; sensitivity 0.85, release after 32 calm steps).
    heal: Option<usize>,
}

impl Spec {
    fn parse(full: &str, defaults: &Spec) -> AnyResult<Spec> {
        let (s, policy) = match full.split_once('@') {
            Some((cfg, pol)) => {
                let (name, pct) = pol.split_once(':').ok_or_else(|| {
                    format!("config `{full}`: expected `@<policy>:<percent of f16>`")
                })?;
                kvtier::policy::by_name(name)?;
                let pct: f64 = pct
                    .parse()
                    .map_err(|_| format!("config `{full}`: bad percent `{pct}`"))?;
                (cfg, Some((name.to_string(), pct / 100.0)))
            }
            None => (full, None),
        };
        let (s, choice) = match s.split_once('~') {
            Some((cfg, ch)) => {
                let (kind, val) = ch.split_once(':').ok_or_else(|| {
                    format!("config `{full}`: expected `~eps:<epsilon>` or `~quest:<pages>`")
                })?;
                let mut heal = None;
                let choice = match kind {
                    "heal" => {
                        heal = Some(val.parse().map_err(|_| {
                            format!("config `{full}`: bad healing page count `{val}`")
                        })?);
                        kvtier::PageChoice::All
                    }
                    "eps" => kvtier::PageChoice::Eliminate(kvtier::eliminate::Eliminator::new(
                        val.parse()
                            .map_err(|_| format!("config `{full}`: bad epsilon `{val}`"))?,
                    )?),
                    "quest" => kvtier::PageChoice::Quest(kvtier::eliminate::QuestSelector {
                        pages: val
                            .parse()
                            .map_err(|_| format!("config `{full}`: bad page count `{val}`"))?,
                    }),
                    other => return Err(format!("config `{full}`: unknown `~{other}`").into()),
                };
                (cfg, (choice, heal))
            }
            None => (s, (kvtier::PageChoice::All, None)),
        };
        let (choice, heal) = choice;
        let mut spec = defaults.clone();
        spec.name = full.to_string();
        spec.policy = policy;
        spec.choice = choice;
        spec.heal = heal;
        if s == "fp" {
            spec.full_precision = true;
            return Ok(spec);
        }
        spec.full_precision = false;
        let mut parts = s.split('-');
        let kv = parts.next().unwrap_or_default();
        let (k, v) = kv
            .strip_prefix('k')
            .and_then(|r| r.split_once('v'))
            .ok_or_else(|| {
                format!("config `{s}`: expected `fp` or `k<bits>v<bits>[-w..][-p..][-s..][-g..]`")
            })?;
        spec.k_bits = k
            .parse()
            .map_err(|_| format!("config `{s}`: bad key bits `{k}`"))?;
        spec.v_bits = v
            .parse()
            .map_err(|_| format!("config `{s}`: bad value bits `{v}`"))?;
        for p in parts {
            match p {
                "rk" => {
                    spec.rotation = kvtier::Rotation::Keys;
                    continue;
                }
                "rkv" => {
                    spec.rotation = kvtier::Rotation::KeysValues;
                    continue;
                }
                "f" => {
                    spec.value_fit = true;
                    continue;
                }
                _ => {}
            }
            let (key, num) = p.split_at(1.min(p.len()));
            let num: usize = num
                .parse()
                .map_err(|_| format!("config `{s}`: bad field `{p}`"))?;
            match key {
                "w" => spec.hot_window = num,
                "p" => spec.page_size = num,
                "s" => spec.sinks = num,
                "g" => spec.group = num,
                "e" => spec.edges = num,
                "o" => spec.outliers = num,
                _ => {
                    return Err(format!(
                        "config `{s}`: unknown field `{p}` (w, p, s, g, e, o, f, rk, rkv)"
                    )
                    .into())
                }
            }
        }
        Ok(spec)
    }

    fn build(&self, model: &Llama, hot: HotDtype) -> AnyResult<CacheConfig> {
        let c = model.config();
        let b = CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
            .hot_dtype(hot)
            .page_size(self.page_size)
            .sink_tokens(self.sinks)
            .hot_window(self.hot_window)
            .value_group(self.group)
            .rotation(self.rotation)
            .key_outliers(self.outliers)
            .value_fit(self.value_fit)
            .k_bits(Bits::from_bits(self.k_bits)?)
            .v_bits(Bits::from_bits(self.v_bits)?)
            .edge_layers(self.edges, Bits::B4, Bits::B4);
        let b = if self.full_precision {
            b.full_precision()
        } else {
            b
        };
        Ok(b.build()?)
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name, "full_precision": self.full_precision,
            "k_bits": self.k_bits, "v_bits": self.v_bits, "hot_window": self.hot_window,
            "page_size": self.page_size, "sink_tokens": self.sinks, "value_group": self.group,
            "rotation": format!("{:?}", self.rotation), "edge_layers_int4": self.edges,
            "key_outliers": self.outliers, "value_fit": self.value_fit,
            "policy": self.policy.as_ref().map(|(n, f)| json!({"name": n, "f16_fraction": f})),
            "heal_pages_per_layer": self.heal,
        })
    }
}

pub fn command() -> Command {
    let num = |name: &'static str, default: &'static str, help: &'static str| {
        Arg::new(name).long(name).default_value(default).help(help)
    };
    Command::new("eval")
        .about("kvtier real-model evaluation: SOTU perplexity and passkey retrieval")
        .arg(Arg::new("config").long("config").action(ArgAction::Append).help(
            "cache config spec, repeatable: fp | k<bits>v<bits>[-w<hot>][-p<page>][-s<sinks>][-g<group>][-rk|-rkv (rotate keys, or keys and values)][-e<n> (first and last n layers at int4)][-o<n> (n key outlier channels per page kept exact)][-f (value ranges fitted to the least squared error)], bits in {8, 4, 3, 2}, optionally ~eps:<epsilon> (query-time elimination with skipped mass <= epsilon), ~quest:<pages> (Quest-style top pages by bound) or ~heal:<pages> (the monitor at sensitivity 0.85 and healing of at most that many pages per layer after every decode step), and @<policy>:<percent> (a retention policy run after each decode step, its device budget that percent of the f16 bytes)",
        ))
        .arg(num("k-bits", "4", "key bits (8, 4, 3, 2) when no --config is given"))
        .arg(num("v-bits", "4", "value bits (8, 4, 3, 2) when no --config is given"))
        .arg(num("hot-window", "128", "recent tokens kept exact (default for specs)"))
        .arg(num("page-size", "32", "tokens per page (default for specs)"))
        .arg(num("sinks", "4", "attention-sink tokens kept exact (default for specs)"))
        .arg(num("value-group", "32", "value quantisation group (default for specs)"))
        .arg(Arg::new("full-precision").long("full-precision").action(ArgAction::SetTrue).help(
            "with no --config: evaluate the full-precision cache instead of k/v bits",
        ))
        .arg(num("hot-dtype", "f16", "element type of hot pages: f32, f16, bf16"))
        .arg(Arg::new("dense-decode").long("dense-decode").action(ArgAction::SetTrue).help(
            "decode with dequantised f32 weights instead of candle's quantised matmul (no Q8_1 \
             activation rounding: cache effects are not buried in rounding noise)",
        ))
        .arg(num("lengths", "4096", "perplexity context lengths, comma-separated (0 or empty: skip)"))
        .arg(num("tail", "1024", "tokens decoded and scored at the end of each length"))
        .arg(num("speeches", "2", "speeches per length (the most recent ones long enough)"))
        .arg(num("speech-offset", "0", "skip this many of those speeches (to split a run)"))
        .arg(num("passkey-trials", "20", "passkey trials per depth (0: skip)"))
        .arg(num("passkey-depths", "0,0.25,0.5,0.75,1", "needle depths in [0, 1]"))
        .arg(num("passkey-context", "1024", "passkey prompt tokens"))
        .arg(num("seed", "2024", "passkey seed"))
        .arg(assets_arg())
        .arg(Arg::new("report").long("report").value_name("FILE").help("write the eval report (JSON) here"))
        .arg(Arg::new("markdown").long("markdown").help("also write a Markdown table here"))
        .arg(Arg::new("render").long("render").help(
            "only re-render the Markdown table (--markdown, default stdout) from this saved JSON report",
        ))
}

/// A log line on stderr that does not tear the progress bar.
fn log(pb: &ProgressBar, msg: impl AsRef<str>) {
    pb.suspend(|| eprintln!("[eval] {}", msg.as_ref()));
}

/// Perplexity results of one configuration at one length.
#[derive(Default, Clone)]
struct PplAcc {
    nll_sum: f64,
    count: usize,
    decode_secs: f64,
    decode_steps: usize,
    device_bytes_per_token: Vec<f64>,
    runs: Vec<Value>,
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    if let Some(path) = m.get_one::<String>("render") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--render {path}: {e}"))?;
        let saved: Value =
            serde_json::from_str(&text).map_err(|e| format!("--render {path}: not JSON: {e}"))?;
        // A `kvtier eval --report` file, or a `--out` report that wraps it under `result`.
        let report = if saved.get("result").is_some() {
            saved["result"].clone()
        } else {
            saved
        };
        let mut md = Vec::new();
        write_markdown(&mut md, &report)?;
        if let Some(p) = m.get_one::<String>("markdown") {
            std::fs::write(p, &md).map_err(|e| format!("--markdown {p}: {e}"))?;
        }
        let svg = plot_report(&report)?;
        return Ok(Report::new(report, String::from_utf8(md)?).with_plot(
            "eval-ppl.svg",
            "Perplexity ratio vs device bytes per token",
            svg,
        ));
    }
    let assets = assets(m)?;
    let hot = match get::<String>(m, "hot-dtype")?.as_str() {
        "f32" => HotDtype::F32,
        "f16" => HotDtype::F16,
        "bf16" => HotDtype::BF16,
        other => return Err(format!("--hot-dtype: `{other}` (f32, f16, bf16)").into()),
    };
    let defaults = Spec {
        name: String::new(),
        full_precision: m.get_flag("full-precision"),
        k_bits: get(m, "k-bits")?,
        v_bits: get(m, "v-bits")?,
        hot_window: get(m, "hot-window")?,
        page_size: get(m, "page-size")?,
        sinks: get(m, "sinks")?,
        group: get(m, "value-group")?,
        rotation: kvtier::Rotation::None,
        edges: 0,
        outliers: 0,
        value_fit: false,
        policy: None,
        choice: kvtier::PageChoice::All,
        heal: None,
    };
    let specs: Vec<Spec> = match m.get_many::<String>("config") {
        Some(v) => v
            .map(|s| Spec::parse(s, &defaults))
            .collect::<AnyResult<_>>()?,
        None => {
            let mut d = defaults.clone();
            d.name = if d.full_precision {
                "fp".into()
            } else {
                format!(
                    "k{}v{}-w{}-p{}-s{}-g{}",
                    d.k_bits, d.v_bits, d.hot_window, d.page_size, d.sinks, d.group
                )
            };
            vec![d]
        }
    };
    let lengths: Vec<usize> = list(&get::<String>(m, "lengths")?, "lengths")?;
    let tail: usize = get(m, "tail")?;
    let n_speeches: usize = get(m, "speeches")?;
    let speech_offset: usize = get(m, "speech-offset")?;
    let trials: usize = get(m, "passkey-trials")?;
    let depths: Vec<f64> = list(&get::<String>(m, "passkey-depths")?, "passkey-depths")?;
    let pk_context: usize = get(m, "passkey-context")?;
    let seed: u64 = get(m, "seed")?;

    let started = Instant::now();
    let dense_decode = m.get_flag("dense-decode");
    let model = load_model(&assets, dense_decode)?;
    let mc = model.config().clone();
    // Validate every config before spending time.
    let configs: Vec<CacheConfig> = specs
        .iter()
        .map(|s| {
            s.build(&model, hot)
                .map_err(|e| format!("config `{}`: {e}", s.name).into())
        })
        .collect::<AnyResult<_>>()?;
    let ppl_steps: usize = lengths.iter().filter(|&&l| l > 0).count() * n_speeches * tail;
    let pk_steps = if depths.is_empty() {
        0
    } else {
        trials * depths.len()
    };
    let pb = bar(((ppl_steps + pk_steps) * specs.len()) as u64, "eval");
    log(
        &pb,
        format!(
            "model loaded ({} layers); {} configs: {}",
            mc.num_layers,
            specs.len(),
            specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let speeches = load_speeches(&assets.sotu())?;
    let tok = model.tokenizer();
    // Most recent speeches first.
    let mut encoded = Vec::new();
    for s in speeches.iter().rev() {
        encoded.push((s.name.clone(), tok.encode(&s.text)?));
    }
    let mut oracle = Session::new(
        model.clone(),
        ExactAttention::new(mc.attention_shape())?,
        0.0,
    )?;
    let mut sessions: Vec<_> = configs
        .iter()
        .zip(&specs)
        .map(|(c, s)| {
            let sess = match (&s.policy, s.choice) {
                (None, kvtier::PageChoice::All) => protect_with(model.clone(), 0.0, c.clone()),
                (policy, choice) => {
                    let mut a = kvtier::KvTierAttention::new(c.clone())?.with_page_choice(choice);
                    if let Some((name, frac)) = policy {
                        a = a.with_policy(
                            kvtier::policy::by_name(name)?,
                            kvtier::policy::Budget::f16_fraction(*frac),
                        );
                    }
                    Session::new(model.clone(), a, 0.0)
                }
            }?;
            Ok(match s.heal {
                None => sess,
                Some(pages) => sess.with_healing(kvtier::protect::Healing::new(
                    kvtier::monitor::Monitor::new(0.85)?,
                    kvtier::monitor::Healer {
                        pages_per_layer: pages,
                        hold: 32,
                        max_pages_per_layer: pages,
                    },
                )),
            })
        })
        .collect::<Result<_, ModelError>>()?;

    // ---------------------------------------------------------------- perplexity
    let mut ppl: Vec<Vec<PplAcc>> = vec![vec![PplAcc::default(); lengths.len()]; specs.len()];
    for (li, &len) in lengths.iter().enumerate() {
        if len == 0 {
            continue;
        }
        if tail == 0 || tail >= len || len > mc.context_length {
            return Err(format!(
                "length {len}: need 0 < tail ({tail}) < length <= context ({})",
                mc.context_length
            )
            .into());
        }
        let chosen: Vec<_> = encoded
            .iter()
            .filter(|(_, ids)| ids.len() >= len)
            .skip(speech_offset)
            .take(n_speeches)
            .collect();
        if chosen.len() < n_speeches {
            return Err(format!("only {} speeches have {len} tokens", chosen.len()).into());
        }
        for (name, ids) in chosen {
            let ids = &ids[..len];
            let t0 = Instant::now();
            let cap: CapturedPrefill = oracle.capture_prefill(&ids[..len - tail])?;
            pb.set_message(format!("L={len} exact prefill"));
            log(
                &pb,
                format!(
                    "L={len} {name}: exact prefill of {} tokens in {:.1}s",
                    len - tail,
                    t0.elapsed().as_secs_f64()
                ),
            );
            for (ci, sess) in sessions.iter_mut().enumerate() {
                let t1 = Instant::now();
                pb.set_message(format!("L={len} {}", specs[ci].name));
                let base = pb.position();
                let score = sess.score_tail_with_progress(ids, &cap, |done, _| {
                    pb.set_position(base + done as u64)
                })?;
                pb.set_position(base + tail as u64);
                let mem = sess.memory_report();
                let per_token =
                    mem.device_bytes() as f64 / (mem.tokens as f64 / mc.num_layers as f64);
                let acc = &mut ppl[ci][li];
                acc.nll_sum += score.nll.iter().map(|&x| x as f64).sum::<f64>();
                acc.count += score.nll.len();
                acc.decode_secs += score.decode_time.as_secs_f64();
                acc.decode_steps += score.decode_steps;
                acc.device_bytes_per_token.push(per_token);
                acc.runs.push(json!({
                    "speech": name, "tokens": len, "prefill": len - tail, "scored": score.nll.len(),
                    "ppl": score.perplexity(), "mean_nll": score.mean_nll(),
                    "decode_tok_per_s": score.decode_tokens_per_sec(),
                    "memory": {
                        "hot_bytes": mem.hot_bytes, "warm_bytes": mem.warm_bytes, "cold_bytes": mem.cold_bytes, "archive_bytes": mem.archive_bytes, "evicted_tokens": mem.evicted_tokens / mc.num_layers,
                        "metadata_bytes": mem.metadata_bytes, "f16_equivalent_bytes": mem.f16_equivalent_bytes,
                        "device_bytes": mem.device_bytes(), "tokens_per_layer": mem.tokens / mc.num_layers,
                        "device_bytes_per_token": per_token,
                    },
                }));
                log(
                    &pb,
                    format!(
                        "  {:<14} ppl {:>8.4}  {:>6.1} tok/s  {:>7.0} B/token  ({:.0}s)",
                        specs[ci].name,
                        score.perplexity(),
                        score.decode_tokens_per_sec(),
                        per_token,
                        t1.elapsed().as_secs_f64()
                    ),
                );
            }
        }
    }

    // ---------------------------------------------------------------- passkey
    let mut pk_hits: Vec<Vec<usize>> = vec![vec![0; depths.len()]; specs.len()];
    let mut pk_runs: Vec<Vec<Value>> = vec![Vec::new(); specs.len()];
    if trials > 0 && !depths.is_empty() {
        let filler: String = speeches
            .iter()
            .rev()
            .take(8)
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let builder = PasskeyBuilder::new(tok, &filler)?;
        let mut rng = SplitMix64::new(seed);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            stop_at_eos: true,
        };
        for (di, &depth) in depths.iter().enumerate() {
            let t0 = Instant::now();
            pb.set_message(format!("passkey depth {depth}"));
            for _ in 0..trials {
                let trial = builder.trial(tok, pk_context, depth, &mut rng)?;
                let cap = oracle.capture_prefill(&trial.context)?;
                for (ci, sess) in sessions.iter_mut().enumerate() {
                    let g = sess.generate_after(&cap, &trial.question, opts)?;
                    let ok = trial.is_correct(&g.text);
                    pk_hits[ci][di] += ok as usize;
                    pk_runs[ci].push(json!({"depth": depth, "passkey": trial.passkey, "answer": g.text, "correct": ok}));
                    pb.inc(1);
                }
            }
            log(
                &pb,
                format!(
                    "passkey depth {depth}: {} ({:.0}s)",
                    specs
                        .iter()
                        .zip(&pk_hits)
                        .map(|(s, h)| format!("{} {}/{trials}", s.name, h[di]))
                        .collect::<Vec<_>>()
                        .join(", "),
                    t0.elapsed().as_secs_f64()
                ),
            );
        }
    }

    // ---------------------------------------------------------------- report
    let baseline: Vec<f64> = (0..lengths.len())
        .map(|li| ppl[0][li].nll_sum / ppl[0][li].count.max(1) as f64)
        .collect();
    let mut results = Vec::new();
    for (ci, spec) in specs.iter().enumerate() {
        let per_len: Vec<Value> = lengths
            .iter()
            .enumerate()
            .filter(|(_, &l)| l > 0)
            .map(|(li, &len)| {
                let a = &ppl[ci][li];
                let mean = a.nll_sum / a.count.max(1) as f64;
                let bpt = a.device_bytes_per_token.iter().sum::<f64>()
                    / a.device_bytes_per_token.len().max(1) as f64;
                json!({
                    "tokens": len, "tail": tail, "scored": a.count, "ppl": mean.exp(),
                    "ppl_ratio_vs_first": (mean - baseline[li]).exp(),
                    "device_bytes_per_token": bpt,
                    "decode_tok_per_s": a.decode_steps as f64 / a.decode_secs.max(1e-9),
                    "runs": a.runs,
                })
            })
            .collect();
        let total_trials = trials * depths.len();
        let hits: usize = pk_hits[ci].iter().sum();
        let (cand, skipped) = sessions[ci].cache().elimination_totals();
        let (judged, fired) = sessions[ci].healing().map_or((0, 0), |h| h.counts());
        // The monitor-and-heal loop's own time (its ring of the last 4096 steps) against the
        // decode time of the perplexity runs, which include it.
        let mut loop_ns: Vec<u32> = sessions[ci]
            .healing()
            .map_or(Vec::new(), |h| h.timings_ns().to_vec());
        loop_ns.sort_unstable();
        let q = |p: f64| {
            loop_ns
                .get(((loop_ns.len() as f64 - 1.0) * p).round() as usize)
                .copied()
        };
        let ppl_steps: usize = ppl[ci].iter().map(|a| a.decode_steps).sum();
        let ppl_secs: f64 = ppl[ci].iter().map(|a| a.decode_secs).sum();
        let loop_mean_s = if loop_ns.is_empty() {
            0.0
        } else {
            loop_ns.iter().map(|&x| x as f64).sum::<f64>() / loop_ns.len() as f64 * 1e-9
        };
        let step_s = ppl_secs / ppl_steps.max(1) as f64;
        results.push(json!({
            "healing": {"steps_judged": judged, "fired": fired,
                        "fired_per_1k": if judged > 0 { 1000.0 * fired as f64 / judged as f64 } else { 0.0 },
                        "loop_ns_median": q(0.5), "loop_ns_p99": q(0.99),
                        "loop_ns_mean": loop_mean_s * 1e9,
                        "loop_share_of_decode_step": if step_s > 0.0 { loop_mean_s / step_s } else { 0.0 }},
            "config": spec.to_json(),
            "page_choice": format!("{:?}", spec.choice),
            "pages_skipped_fraction": if cand > 0 { skipped as f64 / cand as f64 } else { 0.0 },
            "perplexity": per_len,
            "passkey": {
                "context_tokens": pk_context, "trials_per_depth": trials,
                "accuracy": if total_trials > 0 { hits as f64 / total_trials as f64 } else { f64::NAN },
                "by_depth": depths.iter().zip(&pk_hits[ci]).map(|(d, h)| json!({"depth": d, "correct": h, "trials": trials})).collect::<Vec<_>>(),
                "trials": pk_runs[ci],
            },
        }));
    }
    let report = json!({
        "model": assets.model().file_name().map(|s| s.to_string_lossy().to_string()),
        "hot_dtype": format!("{hot:?}"),
        "decode_weights": if dense_decode { "dense f32 (dequantised)" } else { "quantised (QMatMul)" },
        "ppl_setup": {"lengths": lengths, "tail": tail, "speeches": n_speeches, "speech_offset": speech_offset},
        "elapsed_s": started.elapsed().as_secs_f64(),
        "results": results,
    });
    pb.finish_and_clear();
    if let Some(p) = m.get_one::<String>("report") {
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")
            .map_err(|e| format!("--report {p}: {e}"))?;
    }
    let mut md = Vec::new();
    write_markdown(&mut md, &report)?;
    if let Some(p) = m.get_one::<String>("markdown") {
        std::fs::write(p, &md).map_err(|e| format!("--markdown {p}: {e}"))?;
    }
    log(
        &pb,
        format!("done in {:.0}s", started.elapsed().as_secs_f64()),
    );
    let svg = plot_report(&report)?;
    Ok(Report::new(report, String::from_utf8(md)?).with_plot(
        "eval-ppl.svg",
        "Perplexity ratio vs device bytes per token",
        svg,
    ))
}

/// Per config (one series each), PPL ratio against device bytes per token, one point per length;
/// passkey accuracy has no place on this plot (it is in the table).
fn plot_report(report: &Value) -> AnyResult<String> {
    let series: Vec<Series> = report["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Series {
            label: r["config"]["name"].as_str().unwrap_or("?").to_string(),
            points: r["perplexity"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p["device_bytes_per_token"].as_f64()?,
                        p["ppl_ratio_vs_first"].as_f64()?,
                    ))
                })
                .collect(),
        })
        .collect();
    plot::lines(
        &Axes {
            title: "SmolLM2-135M: perplexity ratio (vs the first config) by device bytes per token",
            x: "device bytes per token (all layers)",
            y: "PPL ratio",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
        },
        &series,
    )
}

/// Renders the report's results as a Markdown table (from the JSON alone, so `--render` can
/// redo it from a saved report).
fn write_markdown(f: &mut impl Write, report: &Value) -> AnyResult<()> {
    let results = report["results"]
        .as_array()
        .ok_or("report has no `results`")?;
    let first = results.first().ok_or("report has no results")?;
    let lengths: Vec<u64> = first["perplexity"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["tokens"].as_u64()).collect())
        .unwrap_or_default();
    let depths: Vec<String> = first["passkey"]["by_depth"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["depth"].as_f64())
        .map(|d| format!("{:.0}", d * 100.0))
        .collect();
    let pk_trials = first["passkey"]["trials_per_depth"].as_u64().unwrap_or(0);
    write!(f, "| config | K bits | V bits | hot window |")?;
    for l in &lengths {
        write!(f, " PPL @{l} | PPL ratio @{l} | device B/token @{l} |")?;
    }
    writeln!(
        f,
        " passkey (correct of {pk_trials} at depth {} %) | pages skipped | healing fired / 1K steps | monitor + healing per step (mean; share of the decode step) |",
        depths.join("/")
    )?;
    write!(f, "|---|---|---|---|")?;
    for _ in &lengths {
        write!(f, "---:|---:|---:|")?;
    }
    writeln!(f, "---|---:|---:|---:|")?;
    for r in results {
        let c = &r["config"];
        let name = c["name"].as_str().unwrap_or("?");
        let num = |k: &str| c[k].as_u64().map_or("?".to_string(), |x| x.to_string());
        let (kb, vb, w) = if c["full_precision"].as_bool().unwrap_or(false) {
            ("-".to_string(), "-".to_string(), "all".to_string())
        } else {
            (num("k_bits"), num("v_bits"), num("hot_window"))
        };
        write!(f, "| `{name}` | {kb} | {vb} | {w} |")?;
        for p in r["perplexity"].as_array().into_iter().flatten() {
            write!(
                f,
                " {:.3} | {:.4} | {:.0} |",
                p["ppl"].as_f64().unwrap_or(f64::NAN),
                p["ppl_ratio_vs_first"].as_f64().unwrap_or(f64::NAN),
                p["device_bytes_per_token"].as_f64().unwrap_or(f64::NAN)
            )?;
        }
        let pk = &r["passkey"];
        match pk["accuracy"].as_f64() {
            Some(a) => {
                let per: Vec<String> = pk["by_depth"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| format!("{}", d["correct"].as_u64().unwrap_or(0)))
                    .collect();
                write!(f, " {:.0}% ({}) |", a * 100.0, per.join("/"))?
            }
            None => write!(f, " - |")?,
        }
        // Share of the candidate pages (per kv head, over every decode step) a page choice
        // (`~eps`, `~quest`) left out.
        match r["pages_skipped_fraction"].as_f64() {
            Some(x) if r["page_choice"].as_str() != Some("All") => {
                write!(f, " {:.1}% |", x * 100.0)?
            }
            _ => write!(f, " - |")?,
        }
        let h = &r["healing"];
        match h["steps_judged"].as_u64() {
            Some(n) if n > 0 => writeln!(
                f,
                " {:.0} | {:.0} µs; {:.1}% |",
                h["fired_per_1k"].as_f64().unwrap_or(f64::NAN),
                h["loop_ns_mean"].as_f64().unwrap_or(f64::NAN) / 1e3,
                100.0 * h["loop_share_of_decode_step"].as_f64().unwrap_or(f64::NAN)
            )?,
            _ => writeln!(f, " - | - |")?,
        }
    }
    Ok(())
}
