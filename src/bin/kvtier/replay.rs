//! `kvtier replay`: retention policies over a captured attention trace (`kvtier::policy::trace`).
//!
//! Without `--from`, captures the trace first: SmolLM2-135M over the 2021 State of the Union speech
//! through an exact full-precision cache (so every page's mass is recorded), then replays each
//! policy over it at the given budgets: of the tokens for eviction policies, of the f16 device bytes
//! for the tiering ones (`tiered`, `tiered_int2`, `anchor`). docs/policies.md.

use std::sync::Arc;

use clap::{Arg, ArgMatches, Command};
use kvtier::model::corpus::find_speech;
use kvtier::model::{Llama, ScoreOptions, Session};
use kvtier::policy::trace::{read_trace, replay};
use kvtier::policy::{by_name, Budget};
use kvtier::{CacheConfig, HotDtype, KvTierAttention};
use serde_json::json;

use crate::plot::{self, Axes, Scale, Series};
use crate::report::{assets, assets_arg, bar, get, spinner, AnyResult, Ctx, Report};
use crate::simulate::{budgets, policies};

pub fn command() -> Command {
    Command::new("replay")
        .about("retention policies over a captured real-model attention trace")
        .arg(
            Arg::new("prefill")
                .long("prefill")
                .default_value("1024")
                .help("exact prefill tokens of the captured run"),
        )
        .arg(
            Arg::new("decode")
                .long("decode")
                .default_value("256")
                .help("decode steps traced"),
        )
        .arg(
            Arg::new("trace")
                .long("trace")
                .default_value("target/kvtier-trace-sotu2021.bin")
                .help("where the captured trace is written"),
        )
        .arg(
            Arg::new("from")
                .long("from")
                .value_name("FILE")
                .help("replay this saved trace instead of capturing one (no model needed)"),
        )
        .arg(
            Arg::new("budgets")
                .long("budgets")
                .default_value("25,12.5")
                .help("budgets, percent, comma-separated"),
        )
        .arg(
            Arg::new("policies")
                .long("policies")
                .default_value("all")
                .help("policy names, comma-separated, or `all`"),
        )
        .arg(assets_arg())
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    let names = policies(m)?;
    let pcts = budgets(m)?;
    let mut captured = serde_json::Value::Null;
    let path = match m.get_one::<String>("from") {
        Some(p) => p.clone(),
        None => {
            let prefill: usize = get(m, "prefill")?;
            let decode: usize = get(m, "decode")?;
            if prefill == 0 || decode == 0 {
                return Err("--prefill and --decode must be at least 1".into());
            }
            let path: String = get(m, "trace")?;
            let assets = assets(m)?;
            let sp = spinner("loading SmolLM2-135M");
            let model = Arc::new(Llama::load(assets.model())?);
            let speech = find_speech(&assets.sotu(), 2021, "biden")?;
            let ids = model.tokenizer().encode(&speech.text)?;
            let n = (prefill + decode).min(ids.len());
            if n <= prefill {
                return Err(
                    format!("the speech has {} tokens: fewer than --prefill", ids.len()).into(),
                );
            }
            let c = model.config().clone();
            let cfg = CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
                .hot_dtype(HotDtype::F32)
                .full_precision()
                .build()?;
            let file = std::fs::File::create(&path)
                .map_err(|e| format!("cannot create the trace file {path}: {e}"))?;
            let cache = KvTierAttention::new(cfg)?
                .with_trace(Box::new(std::io::BufWriter::new(file)), false)?;
            let mut session = Session::new(model, cache, 0.85)?;
            sp.finish_and_clear();
            let pb = bar((n - prefill) as u64, "capturing trace");
            let score = session.score_with_progress(
                &ids[..n],
                ScoreOptions::decode_tail(prefill),
                |d, _| pb.set_position(d as u64),
            )?;
            pb.finish_and_clear();
            session.cache_mut().finish_trace()?;
            captured = json!({"speech": speech.name, "prefill": prefill, "decode_steps": n - prefill,
                              "tail_ppl": score.perplexity()});
            path
        }
    };
    let file =
        std::fs::File::open(&path).map_err(|e| format!("cannot open the trace {path}: {e}"))?;
    let (header, steps) = read_trace(std::io::BufReader::new(file))?;
    let n = steps.iter().map(|s| s.len as usize).max().unwrap_or(0);
    if n == 0 {
        return Err(format!("trace {path} has no decode steps").into());
    }
    let mut text = format!(
        "trace {path}: {} layers, {} records, {} tokens at the last step\n\n\
         | policy | budget | kept ratio | heavy-hitter recall | mass retained | pages demoted / step |\n\
         |---|---|---|---|---|---|\n",
        header.num_layers,
        steps.len(),
        n
    );
    let ps = header.page_size as usize;
    let f16_page = 2 * header.num_kv_heads as usize * ps * header.head_dim as usize * 2;
    let pb = bar((pcts.len() * names.len()) as u64, "replay");
    let mut rows = Vec::new();
    let mut series: Vec<Series> = names
        .iter()
        .map(|n| Series {
            label: n.clone(),
            points: Vec::new(),
        })
        .collect();
    for &pct in &pcts {
        let frac = pct / 100.0;
        for (ni, name) in names.iter().enumerate() {
            pb.set_message(format!("{name} @ {pct}%"));
            let budget = match name.as_str() {
                "tiered" | "tiered_int2" | "anchor" => {
                    Budget::device_bytes(((n.div_ceil(ps) * f16_page) as f64 * frac) as usize)
                }
                _ => Budget::tokens((n as f64 * frac) as usize),
            };
            let r = replay(&header, &steps, by_name(name)?.as_mut(), &budget)?;
            text += &format!(
                "| {name} | {pct:.1}% | {:.3} | {:.3} | {:.4} | {:.2} |\n",
                r.kept_ratio, r.heavy_hitter_recall, r.mass_retained, r.demoted_pages
            );
            series[ni].points.push((pct, r.mass_retained));
            rows.push(json!({"policy": name, "budget_percent": pct, "kept_ratio": r.kept_ratio,
                             "heavy_hitter_recall": r.heavy_hitter_recall,
                             "mass_retained": r.mass_retained, "demoted_pages_per_step": r.demoted_pages}));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let svg = plot::lines(
        &Axes {
            title: "Trace replay: attention mass retained vs budget",
            x: "budget (% of tokens, or of f16 bytes for tiering policies)",
            y: "attention mass retained",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
        },
        &series,
    )?;
    let json = json!({"trace": path, "captured": captured, "layers": header.num_layers,
                      "records": steps.len(), "tokens": n, "rows": rows});
    Ok(Report::new(json, text).with_plot("replay-mass.svg", "Trace replay: mass retained", svg))
}
