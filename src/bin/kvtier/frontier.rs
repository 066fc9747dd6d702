//! `kvtier frontier`: the false-elimination frontier on the real model: SmolLM2-135M decodes State of the Union text
//! through an int4 kvtier cache, and at every decode step of every layer each eliminator chooses
//! pages for the same query; the step is checked against exact attention over the whole cache
//! (`eliminate::check`): share of candidate (page, q head) pairs skipped, realised skipped softmax
//! mass, false eliminations (a skipped pair whose exact mass exceeded `--false-mass`, the GhostKV
//! seed's definition with the page as the unit). The model always continues with the exact output,
//! so every eliminator sees the same trajectory.
//!
//! Eliminators: the ε-bounded `Eliminator` (proven: realised mass <= ε), its two-level variant over
//! super-pages (`SuperPageEliminator`, proven too), the GhostKV seed's sketch rule
//! (`SketchEliminator`: sketched estimates plus a constant slack, no guarantee), Quest top-k pages (no
//! guarantee), and the **oracle**: the most pages any rule with the same ε guarantee could skip,
//! computed from the exact page masses (skip lightest first while every head's sum stays <= ε). The
//! gap between the ε-eliminator and the oracle is the looseness of the key bounds.
//!
//! ```text
//! kvtier frontier --lengths 2048,4096,8192 --steps 32 --out docs/frontier
//! ```

use clap::{Arg, ArgMatches, Command};
use kvtier::eliminate::{
    check, EliminationInput, EliminationScratch, Eliminator, QuestSelector, SketchEliminator,
    SuperPageEliminator,
};
use kvtier::model::corpus::{latest_with_tokens, load_speeches};
use kvtier::model::{ScoreOptions, Session};
use kvtier::{
    AttentionCache, AttentionShape, CacheConfig, HotDtype, KvTierAttention, MemoryReport, Tier,
};
use serde_json::{json, Value};

use crate::plot::{self, Axes, Scale, Series};
use crate::report::{assets, assets_arg, bar, get, list, load_model, AnyResult, Ctx, Report};

const EPS: [f32; 4] = [1e-4, 1e-3, 1e-2, 1e-1];
const QUEST: [usize; 5] = [64, 32, 16, 8, 4];
/// Super-pages of this many pages (the two-level ε eliminator).
const SUPER: usize = 4;
/// The GhostKV seed's sketch rule: dimension, seed, and the constant slacks (nats) tried at ε = 1e-3.
const SKETCH_DIM: usize = 16;
const SKETCH_SEED: u64 = 0x5eed;
const SKETCH_SLACK: [f32; 4] = [0.0, 1.0, 2.0, 4.0];

/// One eliminator setting and what it did, per layer.
#[derive(Debug, Clone)]
struct Point {
    family: &'static str,
    param: f64,
    /// Per layer: candidate pairs, skipped pairs, false eliminations, (head, step) samples,
    /// summed realised mass, max realised mass.
    cand: Vec<u64>,
    skipped: Vec<u64>,
    false_elim: Vec<u64>,
    samples: Vec<u64>,
    mass_sum: Vec<f64>,
    mass_max: Vec<f32>,
}

impl Point {
    fn new(family: &'static str, param: f64, layers: usize) -> Self {
        Point {
            family,
            param,
            cand: vec![0; layers],
            skipped: vec![0; layers],
            false_elim: vec![0; layers],
            samples: vec![0; layers],
            mass_sum: vec![0.0; layers],
            mass_max: vec![0.0; layers],
        }
    }
    fn label(&self) -> String {
        match self.family {
            "quest" => format!("top {} pages", self.param),
            "super" => format!("ε = {:.0e}, {SUPER}-page super-pages", self.param),
            "sketch" => format!("slack {} nats, m = {SKETCH_DIM}, ε = 1e-3", self.param),
            _ => format!("ε = {:.0e}", self.param),
        }
    }
    fn skip_rate(&self) -> f64 {
        self.skipped.iter().sum::<u64>() as f64 / self.cand.iter().sum::<u64>().max(1) as f64
    }
    fn false_rate(&self) -> f64 {
        self.false_elim.iter().sum::<u64>() as f64 / self.skipped.iter().sum::<u64>().max(1) as f64
    }
    fn mean_mass(&self) -> f64 {
        self.mass_sum.iter().sum::<f64>() / self.samples.iter().sum::<u64>().max(1) as f64
    }
    fn max_mass(&self) -> f32 {
        self.mass_max.iter().copied().fold(0.0, f32::max)
    }
    fn to_json(&self) -> Value {
        let per_layer: Vec<Value> = (0..self.cand.len())
            .map(|l| {
                json!({
                    "layer": l,
                    "skip_rate": self.skipped[l] as f64 / self.cand[l].max(1) as f64,
                    "false_elimination_rate": self.false_elim[l] as f64 / self.skipped[l].max(1) as f64,
                    "mean_realised_mass": self.mass_sum[l] / self.samples[l].max(1) as f64,
                    "max_realised_mass": self.mass_max[l],
                })
            })
            .collect();
        json!({
            "family": self.family, "param": self.param, "skip_rate": self.skip_rate(),
            "false_elimination_rate": self.false_rate(), "mean_realised_mass": self.mean_mass(),
            "max_realised_mass": self.max_mass(),
            "candidate_pairs": self.cand.iter().sum::<u64>(), "skipped_pairs": self.skipped.iter().sum::<u64>(),
            "per_layer": per_layer,
        })
    }
}

/// An [`AttentionCache`] that answers every decode step exactly and measures the eliminators on it.
struct Probe {
    inner: KvTierAttention,
    scratch: EliminationScratch,
    false_mass: f32,
    points: Vec<Point>,
    /// Over candidate (page, q head) pairs: `ub + ln n_p - page lse`, how far (in nats) the key
    /// bound overstates the page's exact mass (what the ε rule pays for looseness).
    slack: Vec<f32>,
}

impl Probe {
    fn measure(&mut self, layer: usize, q: &[f32]) -> kvtier::Result<Vec<f32>> {
        let seq = self.inner.seq();
        let cache = self.inner.kv_cache();
        let cfg = cache.config();
        let (qh, g) = (cfg.num_q_heads, cfg.group_size());
        let seqs = [seq];
        let input = EliminationInput {
            layer,
            seqs: &seqs,
            queries: q,
        };
        let exact = cache.attend(layer, &seqs, q)?;
        let fm = self.false_mass;
        let mut k = 0;
        for &eps in &EPS {
            let (att, _) = Eliminator::new(eps)?.attend(cache, &mut self.scratch, &input)?;
            let c = check(&exact, &att, fm)?;
            record(
                &mut self.points[k],
                layer,
                &c.realised_mass,
                c.skipped,
                c.false_eliminations,
            );
            k += 1;
        }
        // Candidates: bounded, not hot, not evicted pages, per q head (as the ε-eliminator sees them).
        let pages = self.scratch.bounds.pages(0).to_vec();
        let is_cand: Vec<bool> = pages
            .iter()
            .map(|p| p.bounded && !matches!(p.tier, Tier::Hot | Tier::Evicted))
            .collect();
        let cand = is_cand.iter().filter(|&&c| c).count() as u64 * qh as u64;
        for (i, p) in pages.iter().enumerate().filter(|(i, _)| is_cand[*i]) {
            let ub = self.scratch.bounds.ub(0, i);
            let lse = &exact.page_lse[0][i * qh..(i + 1) * qh];
            for (&u, &l) in ub.iter().zip(lse) {
                if l.is_finite() {
                    self.slack.push(u + (p.n_tokens as f32).ln() - l);
                }
            }
        }
        for p in &mut self.points[..k] {
            p.cand[layer] += cand;
        }
        for &n in &QUEST {
            let sel = QuestSelector { pages: n }.select(cache, &mut self.scratch, &input)?;
            let att = cache.attend_select(layer, &seqs, q, &sel)?;
            let c = check(&exact, &att, fm)?;
            let p = &mut self.points[k];
            record(p, layer, &c.realised_mass, c.skipped, c.false_eliminations);
            p.cand[layer] += cand;
            k += 1;
        }
        for &eps in &EPS {
            let e = SuperPageEliminator::new(eps, SUPER)?;
            let (att, _) = e.attend(cache, &mut self.scratch, &input)?;
            let c = check(&exact, &att, fm)?;
            let p = &mut self.points[k];
            record(p, layer, &c.realised_mass, c.skipped, c.false_eliminations);
            p.cand[layer] += cand;
            k += 1;
        }
        for &slack in &SKETCH_SLACK {
            let e = SketchEliminator::new(1e-3, SKETCH_DIM, SKETCH_SEED, slack, cfg.head_dim)?;
            let (att, _) = e.attend(cache, &mut self.scratch, &input)?;
            let c = check(&exact, &att, fm)?;
            let p = &mut self.points[k];
            record(p, layer, &c.realised_mass, c.skipped, c.false_eliminations);
            p.cand[layer] += cand;
            k += 1;
        }
        // Oracle: exact masses per (page, head); per kv head group, lightest (by group max) first.
        let lse = &exact.page_lse[0];
        let lz: Vec<f32> = exact.heads.iter().map(|h| h.log_z).collect();
        let mass = |pg: usize, h: usize| (lse[pg * qh + h] - lz[h]).exp();
        for &eps in &EPS {
            let mut realised = vec![0f32; qh];
            let (mut skipped, mut false_elim) = (0usize, 0usize);
            for kv in 0..qh / g {
                let heads = kv * g..(kv + 1) * g;
                let mut order: Vec<(f32, usize)> = (0..pages.len())
                    .filter(|&i| is_cand[i])
                    .map(|i| {
                        let m = heads.clone().map(|h| mass(i, h)).fold(0.0, f32::max);
                        (m, i)
                    })
                    .collect();
                order.sort_by(|a, b| a.0.total_cmp(&b.0));
                for (_, i) in order {
                    if heads.clone().any(|h| realised[h] + mass(i, h) > eps) {
                        break;
                    }
                    for h in heads.clone() {
                        let m = mass(i, h);
                        realised[h] += m;
                        skipped += 1;
                        false_elim += (m > fm) as usize;
                    }
                }
            }
            let p = &mut self.points[k];
            record(p, layer, &realised, skipped, false_elim);
            p.cand[layer] += cand;
            k += 1;
        }
        Ok(exact.output)
    }
}

fn record(p: &mut Point, layer: usize, realised: &[f32], skipped: usize, false_elim: usize) {
    p.skipped[layer] += skipped as u64;
    p.false_elim[layer] += false_elim as u64;
    p.samples[layer] += realised.len() as u64;
    p.mass_sum[layer] += realised.iter().map(|&m| m as f64).sum::<f64>();
    p.mass_max[layer] = realised.iter().copied().fold(p.mass_max[layer], f32::max);
}

impl AttentionCache for Probe {
    fn shape(&self) -> AttentionShape {
        self.inner.shape()
    }
    fn prefill(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> kvtier::Result<Vec<f32>> {
        self.inner.prefill(layer, q, k, v)
    }
    fn decode(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> kvtier::Result<Vec<f32>> {
        kvtier::protect::check_decode(&self.inner.shape(), layer, q, k, v)?;
        self.inner.append(layer, k, v)?;
        self.measure(layer, q)
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> kvtier::Result<()> {
        self.inner.append(layer, k, v)
    }
    fn reset(&mut self) -> kvtier::Result<()> {
        self.inner.reset()
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
}

pub fn command() -> Command {
    Command::new("frontier")
        .about(
            "eliminators on SmolLM2 decode steps: skip rate vs realised mass vs false elimination",
        )
        .arg(
            Arg::new("lengths")
                .long("lengths")
                .default_value("2048,4096,8192")
                .help("context lengths, comma-separated"),
        )
        .arg(
            Arg::new("steps")
                .long("steps")
                .default_value("32")
                .help("decode steps per length"),
        )
        .arg(
            Arg::new("false-mass")
                .long("false-mass")
                .default_value("0.01")
                .help("a skipped page whose exact mass exceeds this is a false elimination"),
        )
        .arg(assets_arg())
}

pub fn run(m: &ArgMatches, _ctx: &Ctx) -> AnyResult<Report> {
    let lengths: Vec<usize> = list(&get::<String>(m, "lengths")?, "lengths")?;
    let steps: usize = get(m, "steps")?;
    let false_mass: f32 = get(m, "false-mass")?;
    if lengths.is_empty() {
        return Err("--lengths: give at least one length".into());
    }
    let assets = assets(m)?;
    let model = load_model(&assets, true)?;
    let c = model.config().clone();
    let speeches = load_speeches(&assets.sotu())?;
    let mut runs = Vec::new();
    let mut all: Vec<(usize, Vec<Point>)> = Vec::new();
    let mut text = String::new();
    for &len in &lengths {
        if steps == 0 || steps >= len || len > c.context_length {
            return Err(format!(
                "length {len}: need 0 < steps < length <= {}",
                c.context_length
            )
            .into());
        }
        // The most recent speech with enough tokens.
        let (name, ids) = latest_with_tokens(&speeches, model.tokenizer(), len)?;
        // int4 K and V, 128-token hot window, 32-token pages: the `balanced` preset, f16 hot pages.
        let cfg = CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
            .hot_dtype(HotDtype::F16)
            .build()?;
        let mut points = Vec::new();
        for &e in &EPS {
            points.push(Point::new(
                "epsilon",
                format!("{e:e}").parse::<f64>()?,
                c.num_layers,
            ));
        }
        for &n in &QUEST {
            points.push(Point::new("quest", n as f64, c.num_layers));
        }
        for &e in &EPS {
            points.push(Point::new(
                "super",
                format!("{e:e}").parse::<f64>()?,
                c.num_layers,
            ));
        }
        for &sl in &SKETCH_SLACK {
            points.push(Point::new("sketch", sl as f64, c.num_layers));
        }
        for &e in &EPS {
            points.push(Point::new(
                "oracle",
                format!("{e:e}").parse::<f64>()?,
                c.num_layers,
            ));
        }
        let probe = Probe {
            inner: KvTierAttention::new(cfg)?,
            scratch: EliminationScratch::default(),
            false_mass,
            points,
            slack: Vec::new(),
        };
        let mut session = Session::new(model.clone(), probe, 0.0)?;
        let t0 = std::time::Instant::now();
        let pb = bar(steps as u64, format!("frontier L={len}"));
        let score = session.score_with_progress(
            &ids[..len],
            ScoreOptions::decode_tail(len - steps),
            |d, _| pb.set_position(d as u64),
        )?;
        pb.finish_and_clear();
        eprintln!(
            "[frontier] {name} L={len}: {steps} steps, PPL of the tail {:.3} ({:.0}s)",
            score.perplexity(),
            t0.elapsed().as_secs_f64()
        );
        let points = std::mem::take(&mut session.cache_mut().points);
        let mut slack = std::mem::take(&mut session.cache_mut().slack);
        slack.sort_by(f32::total_cmp);
        let q = |f: f64| {
            slack
                .get(((slack.len() as f64 - 1.0) * f) as usize)
                .copied()
                .unwrap_or(f32::NAN)
        };
        let (s10, s50, s90) = (q(0.1), q(0.5), q(0.9));
        text += &format!("\nL = {len} ({name}, {steps} decode steps x {} layers; false elimination: skipped pair with exact mass > {false_mass})\n\n", c.num_layers);
        text += &format!("Key-bound slack over {} candidate (page, head) pairs, ub + ln n - page lse (nats): p10 {s10:.1}, median {s50:.1}, p90 {s90:.1}\n\n", slack.len());
        text += "| eliminator | parameter | skipped (of candidate page x head pairs) | mean realised mass | max realised mass | false eliminations (of skipped) |\n|---|---|---:|---:|---:|---:|\n";
        for p in &points {
            text += &format!(
                "| {} | {} | {:.1}% | {:.2e} | {:.2e} | {:.2}% |\n",
                p.family,
                p.label(),
                100.0 * p.skip_rate(),
                p.mean_mass(),
                p.max_mass(),
                100.0 * p.false_rate()
            );
        }
        runs.push(json!({
            "speech": name, "tokens": len, "decode_steps": steps, "tail_ppl": score.perplexity(),
            "false_mass": false_mass,
            "bound_slack_nats": {"pairs": slack.len(), "p10": s10, "median": s50, "p90": s90},
            "points": points.iter().map(Point::to_json).collect::<Vec<_>>(),
        }));
        all.push((len, points));
    }
    let report = json!({"model": "SmolLM2-135M-Instruct Q4_1 (dense decode)", "cache": "balanced: int4 K/V, 32-token pages, 128-token f16 hot window", "runs": runs});
    let svg = plot_points(&all)?;
    Ok(Report::new(report, text).with_plot(
        "frontier.svg",
        "Pages skipped vs softmax mass lost",
        svg,
    ))
}

/// Skip rate (x) against mean realised mass (y, log) per eliminator family and length.
fn plot_points(all: &[(usize, Vec<Point>)]) -> AnyResult<String> {
    let mut series = Vec::new();
    for (len, points) in all {
        for fam in ["epsilon", "quest", "super", "sketch", "oracle"] {
            series.push(Series {
                label: format!("{fam} L={len}"),
                points: points
                    .iter()
                    .filter(|p| p.family == fam)
                    .map(|p| (p.skip_rate(), p.mean_mass().max(1e-9)))
                    .collect(),
            });
        }
    }
    plot::lines(
        &Axes {
            title: "SmolLM2-135M decode: pages skipped vs softmax mass lost",
            x: "share of candidate (page, q head) pairs skipped",
            y: "mean realised skipped mass",
            x_scale: Scale::Linear,
            y_scale: Scale::Log,
        },
        &series,
    )
}
