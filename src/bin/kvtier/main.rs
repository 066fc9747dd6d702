//! `kvtier`: the command line over the library (feature `cli`).
//!
//! Owns: argument parsing (clap), one [`report::Report`] per subcommand printed as text or JSON and
//! optionally saved with its SVG plots under `--out`, progress bars, and the exit status (0 on
//! success, 1 on an error, 2 on bad arguments). Must never: measure anything the library does not
//! do on its own code path, or print a number it did not compute in this run.
//!
//! ```text
//! kvtier doctor
//! kvtier bench --tokens 4096,32768
//! kvtier simulate --prompt 4096 --steps 64
//! kvtier replay --prefill 1024 --decode 256
//! kvtier frontier --lengths 2048 --steps 16
//! kvtier eval --config fp --config k4v4 --lengths 2048 --tail 256 --passkey-trials 0
//! kvtier protect --document sotu:2002 --question "Summarise the speech."
//! kvtier share --store redis://127.0.0.1:6379 --tokens 4096
//! kvtier dashboard report/
//! ```
//! Every subcommand takes `--json` (the report as JSON on stdout) and `--out <dir>` (the report as
//! `<dir>/<command>.json` plus its plots as SVG; `kvtier dashboard <dir>` gathers them into one HTML
//! page).

mod bench;
mod dashboard;
mod doctor;
mod eval;
mod frontier;
mod plot;
mod protect;
mod replay;
mod report;
mod share;
mod simulate;

use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};
use report::{AnyResult, Ctx, Report};

fn common(cmd: Command) -> Command {
    cmd.arg(
        Arg::new("json")
            .long("json")
            .action(ArgAction::SetTrue)
            .help("print the report as JSON on stdout (progress and logs stay on stderr)"),
    )
    .arg(
        Arg::new("out")
            .long("out")
            .value_name("DIR")
            .help("also save the report (<DIR>/<command>.json) and its plots (SVG) in DIR"),
    )
}

fn cli() -> Command {
    Command::new("kvtier")
        .version(env!("CARGO_PKG_VERSION"))
        .about("kvtier: a tiered, quantised KV cache - diagnostics, benchmarks and real-model runs")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(common(doctor::command()))
        .subcommand(common(bench::command()))
        .subcommand(common(simulate::command()))
        .subcommand(common(replay::command()))
        .subcommand(common(frontier::command()))
        .subcommand(common(eval::command()))
        .subcommand(common(protect::command()))
        .subcommand(common(share::command()))
        .subcommand(dashboard::command())
}

fn run() -> AnyResult<()> {
    let m = cli().get_matches();
    let (name, sub) = m.subcommand().ok_or("no subcommand")?;
    if name == "dashboard" {
        return dashboard::run(sub);
    }
    let ctx = Ctx::from_matches(name, sub)?;
    let report: Report = match name {
        "doctor" => doctor::run(sub, &ctx)?,
        "bench" => bench::run(sub, &ctx)?,
        "simulate" => simulate::run(sub, &ctx)?,
        "replay" => replay::run(sub, &ctx)?,
        "frontier" => frontier::run(sub, &ctx)?,
        "eval" => eval::run(sub, &ctx)?,
        "protect" => protect::run(sub, &ctx)?,
        "share" => share::run(sub, &ctx)?,
        other => return Err(format!("unknown subcommand `{other}`").into()),
    };
    ctx.emit(&report)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("kvtier: error: {e}");
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!("\n  caused by: {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
