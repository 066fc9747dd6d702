//! `kvtier simulate`: every retention policy (or the ones named) in the seeded simulator
//! (`kvtier::policy::sim`) at equal device memory, on a synthetic heavy-hitter stream with
//! SmolLM2's attention shape and the `balanced` preset (docs/policies.md).

use clap::{Arg, ArgMatches, Command};
use kvtier::policy::sim::{simulate, SimConfig};
use kvtier::policy::{by_name, Budget, NAMES};
use kvtier::CacheConfig;
use serde_json::json;

use crate::plot::{self, Axes, Scale, Series};
use crate::report::{bar, get, list, AnyResult, Ctx, Report};

pub fn command() -> Command {
    Command::new("simulate")
        .about("retention policies over the seeded attention simulator, at equal device memory")
        .arg(
            Arg::new("prompt")
                .long("prompt")
                .default_value("4096")
                .help("prompt tokens"),
        )
        .arg(
            Arg::new("steps")
                .long("steps")
                .default_value("64")
                .help("decode steps"),
        )
        .arg(Arg::new("seed").long("seed").default_value("1"))
        .arg(
            Arg::new("budgets")
                .long("budgets")
                .default_value("25,12.5")
                .help("device budgets, percent of the f16 cache, comma-separated"),
        )
        .arg(
            Arg::new("policies")
                .long("policies")
                .default_value("all")
                .help("policy names, comma-separated, or `all`"),
        )
}

/// `all` or a checked list of policy names.
pub fn policies(m: &ArgMatches) -> AnyResult<Vec<String>> {
    let s: String = get(m, "policies")?;
    if s == "all" {
        return Ok(NAMES.iter().map(|s| s.to_string()).collect());
    }
    let names: Vec<String> = list(&s, "policies")?;
    for n in &names {
        by_name(n).map_err(|_| {
            format!(
                "--policies: unknown policy `{n}` (known: {})",
                NAMES.join(", ")
            )
        })?;
    }
    Ok(names)
}

/// Budgets in percent, each in (0, 100].
pub fn budgets(m: &ArgMatches) -> AnyResult<Vec<f64>> {
    let b: Vec<f64> = list(&get::<String>(m, "budgets")?, "budgets")?;
    if b.is_empty() || b.iter().any(|&p| !(p > 0.0 && p <= 100.0)) {
        return Err("--budgets: each budget must be a percent in (0, 100]".into());
    }
    Ok(b)
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    let sim = SimConfig {
        prompt: get(m, "prompt")?,
        steps: get(m, "steps")?,
        seed: get(m, "seed")?,
        ..SimConfig::default()
    };
    if sim.prompt == 0 || sim.prompt > 1 << 20 {
        return Err("--prompt: need 1 to 1048576 tokens".into());
    }
    let names = policies(m)?;
    let pcts = budgets(m)?;
    // SmolLM2's attention shape, kvtier's balanced preset (int4 K/V, 128-token window, 4 sinks).
    let cfg = CacheConfig::balanced(1, 9, 3, 64)?;
    let f16 = (sim.prompt + sim.steps) * 2 * 3 * 64 * 2;
    let mut text = format!(
        "prompt {} tokens, {} decode steps, seed {}, heavy fraction {}, {} topics; 9/3/64, balanced preset\n\n\
         | policy | budget (of f16) | kept ratio | device bytes / f16 | heavy-hitter recall | sink recall | mass retained | output rel. error |\n\
         |---|---|---|---|---|---|---|---|\n",
        sim.prompt, sim.steps, sim.seed, sim.heavy_fraction, sim.topics
    );
    let pb = bar((pcts.len() * names.len()) as u64, "simulate");
    let mut rows = Vec::new();
    let mut series: Vec<Series> = names
        .iter()
        .map(|n| Series {
            label: n.clone(),
            points: Vec::new(),
        })
        .collect();
    for &pct in &pcts {
        for (ni, name) in names.iter().enumerate() {
            pb.set_message(format!("{name} @ {pct}%"));
            let budget = Budget::device_bytes((f16 as f64 * pct / 100.0) as usize);
            let r = simulate(&cfg, by_name(name)?.as_mut(), &budget, &sim)?;
            text += &format!(
                "| {name} | {pct:.1}% | {:.3} | {:.3} | {:.3} | {:.3} | {:.4} | {:.4} |\n",
                r.kept_ratio,
                r.device_bytes / r.f16_bytes,
                r.heavy_hitter_recall,
                r.sink_recall,
                r.mass_retained,
                r.output_error
            );
            series[ni].points.push((pct, r.mass_retained));
            rows.push(json!({
                "policy": name, "budget_percent_of_f16": pct, "kept_ratio": r.kept_ratio,
                "device_bytes": r.device_bytes, "f16_bytes": r.f16_bytes,
                "heavy_hitter_recall": r.heavy_hitter_recall, "sink_recall": r.sink_recall,
                "mass_retained": r.mass_retained, "output_error": r.output_error,
            }));
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let svg = plot::lines(
        &Axes {
            title: "Simulator: attention mass retained vs device budget",
            x: "device budget (% of the f16 cache)",
            y: "attention mass retained",
            x_scale: Scale::Linear,
            y_scale: Scale::Linear,
        },
        &series,
    )?;
    let json = json!({
        "sim": {"prompt": sim.prompt, "steps": sim.steps, "seed": sim.seed,
                "heavy_fraction": sim.heavy_fraction, "topics": sim.topics},
        "shape": "9 q heads / 3 kv heads / head_dim 64, balanced preset",
        "rows": rows,
    });
    Ok(Report::new(json, text).with_plot("simulate-mass.svg", "Simulator: mass retained", svg))
}
