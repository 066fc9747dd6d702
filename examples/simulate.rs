//! Every retention policy in the seeded simulator at equal device memory (25% and 12.5% of the f16
//! cache), on a synthetic heavy-hitter stream; prints a markdown table (docs/policies.md).
//!
//! `cargo run --release --example simulate -- [prompt_tokens] [steps] [seed]`

use kvtier::policy::sim::{simulate, SimConfig};
use kvtier::policy::{by_name, Budget, NAMES};
use kvtier::CacheConfig;

fn main() -> Result<(), kvtier::Error> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sim = SimConfig {
        prompt: args.first().copied().unwrap_or(4096),
        steps: args.get(1).copied().unwrap_or(64),
        seed: args.get(2).copied().unwrap_or(1) as u64,
        ..SimConfig::default()
    };
    // SmolLM2's attention shape, kvtier's balanced preset (int4 K/V, 128-token window, 4 sinks).
    let cfg = CacheConfig::balanced(1, 9, 3, 64)?;
    let f16 = (sim.prompt + sim.steps) * 2 * 3 * 64 * 2;
    println!(
        "prompt {} tokens, {} decode steps, seed {}, heavy fraction {}, {} topics; 9/3/64, balanced preset\n",
        sim.prompt, sim.steps, sim.seed, sim.heavy_fraction, sim.topics
    );
    println!("| policy | budget (of f16) | kept ratio | device bytes / f16 | heavy-hitter recall | sink recall | mass retained | output rel. error |");
    println!("|---|---|---|---|---|---|---|---|");
    for frac in [0.25, 0.125] {
        for name in NAMES {
            let budget = Budget::device_bytes((f16 as f64 * frac) as usize);
            let r = simulate(&cfg, by_name(name)?.as_mut(), &budget, &sim)?;
            println!(
                "| {name} | {:.1}% | {:.3} | {:.3} | {:.3} | {:.3} | {:.4} | {:.4} |",
                frac * 100.0,
                r.kept_ratio,
                r.device_bytes / r.f16_bytes,
                r.heavy_hitter_recall,
                r.sink_recall,
                r.mass_retained,
                r.output_error
            );
        }
    }
    Ok(())
}
