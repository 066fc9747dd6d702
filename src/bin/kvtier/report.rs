//! What every subcommand shares: its [`Report`] (text for people, JSON for machines, SVG plots),
//! where it goes ([`Ctx`]: stdout, `--json`, `--out <dir>`), progress bars, argument parsing
//! helpers and the real-model assets.
//!
//! Must never: decide what a subcommand measures; a report carries only what its run computed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Arg, ArgMatches};
use indicatif::{ProgressBar, ProgressStyle};
use kvtier::model::corpus::Assets;
use kvtier::model::{Llama, LoadOptions};
use serde_json::{json, Value};

pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One SVG plot of a report, saved as `<out>/<file>`.
pub struct Plot {
    pub file: String,
    pub title: String,
    pub svg: String,
}

/// A subcommand's result.
pub struct Report {
    /// What `--json` prints and `--out` saves (under `result`).
    pub json: Value,
    /// What a person reads on stdout.
    pub text: String,
    pub plots: Vec<Plot>,
}

impl Report {
    pub fn new(json: Value, text: String) -> Self {
        Report {
            json,
            text,
            plots: Vec::new(),
        }
    }

    pub fn with_plot(mut self, file: &str, title: &str, svg: String) -> Self {
        self.plots.push(Plot {
            file: file.to_string(),
            title: title.to_string(),
            svg,
        });
        self
    }
}

/// Where a subcommand's report goes.
pub struct Ctx {
    pub command: String,
    pub json: bool,
    pub out: Option<PathBuf>,
    started: Instant,
}

impl Ctx {
    /// Reads `--json` and `--out`; an output directory is created and checked for writing now, so
    /// a long run cannot end in a failed write.
    pub fn from_matches(command: &str, m: &ArgMatches) -> AnyResult<Ctx> {
        let out = m.get_one::<String>("out").map(PathBuf::from);
        if let Some(dir) = &out {
            check_writable_dir(dir)?;
        }
        Ok(Ctx {
            command: command.to_string(),
            json: m.get_flag("json"),
            out,
            started: Instant::now(),
        })
    }

    /// Prints the report (text, or JSON with `--json`) and saves it under `--out`.
    pub fn emit(&self, r: &Report) -> AnyResult<()> {
        let files: Vec<&str> = r.plots.iter().map(|p| p.file.as_str()).collect();
        let titles: Vec<&str> = r.plots.iter().map(|p| p.title.as_str()).collect();
        let envelope = json!({
            "command": self.command,
            "kvtier_version": env!("CARGO_PKG_VERSION"),
            "commit": build_commit(),
            "args": std::env::args().skip(1).collect::<Vec<_>>(),
            "finished_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "elapsed_s": self.started.elapsed().as_secs_f64(),
            "plots": files,
            "plot_titles": titles,
            "result": r.json,
            "text": r.text,
        });
        if let Some(dir) = &self.out {
            let path = dir.join(format!("{}.json", self.command));
            write_file(
                &path,
                (serde_json::to_string_pretty(&envelope)? + "\n").as_bytes(),
            )?;
            for p in &r.plots {
                write_file(&dir.join(&p.file), p.svg.as_bytes())?;
            }
            eprintln!(
                "kvtier {}: report saved to {}{}",
                self.command,
                path.display(),
                if files.is_empty() {
                    String::new()
                } else {
                    format!(" (plots: {})", files.join(", "))
                }
            );
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&envelope)?);
        } else {
            print!("{}", r.text);
            if !r.text.ends_with('\n') {
                println!();
            }
        }
        Ok(())
    }
}

/// Creates `dir` if needed and proves a file can be written in it.
pub fn check_writable_dir(dir: &Path) -> AnyResult<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create output directory {}: {e}", dir.display()))?;
    let probe = dir.join(format!(".kvtier-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| format!("output directory {} is not writable: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn write_file(path: &Path, bytes: &[u8]) -> AnyResult<()> {
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}

/// The commit the binary was built from, when it runs from its source tree (`git` present);
/// `-dirty` when the tree has uncommitted changes. `None` otherwise: never guessed.
pub fn build_commit() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short=7", "HEAD"])?;
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

/// A progress bar on stderr (drawn only on a terminal).
pub fn bar(len: u64, msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:<28} [{bar:32.cyan/blue}] {pos}/{len} {elapsed_precise} (eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.into());
    pb
}

/// A spinner on stderr for a step of unknown length (drawn only on a terminal).
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed_precise}").expect("static template"),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// The `--assets` argument of the real-model subcommands.
pub fn assets_arg() -> Arg {
    Arg::new("assets")
        .long("assets")
        .value_name("DIR")
        .help("real-model assets folder (default: $KVTIER_ASSETS or <crate>/assets)")
}

/// The assets `--assets` names (or the default place), or a clear error when they are missing.
pub fn assets(m: &ArgMatches) -> AnyResult<Assets> {
    let assets = match m.get_one::<String>("assets") {
        Some(p) => Assets { root: p.into() },
        None => Assets::locate(),
    };
    if !assets.available() {
        return Err(format!(
            "real-model assets missing in {} (need {} and {}; run scripts/fetch-assets.sh)",
            assets.root.display(),
            assets.model().display(),
            assets.sotu().display()
        )
        .into());
    }
    Ok(assets)
}

/// SmolLM2 from the assets, behind a spinner: prefill through dequantised f32 weights (no Q8_1
/// rounding of the activations), decode through the quantised matmuls unless `dense_decode`.
pub fn load_model(assets: &Assets, dense_decode: bool) -> AnyResult<std::sync::Arc<Llama>> {
    let sp = spinner("loading SmolLM2-135M");
    let model = Llama::load_with(
        assets.model(),
        LoadOptions {
            dense_prefill: true,
            dense_decode,
        },
    )?;
    sp.finish_and_clear();
    Ok(std::sync::Arc::new(model))
}

/// A parsed argument value, with the argument named in the error.
pub fn get<T: std::str::FromStr>(m: &ArgMatches, name: &str) -> AnyResult<T> {
    let s = m
        .get_one::<String>(name)
        .ok_or_else(|| format!("--{name} missing"))?;
    s.parse::<T>()
        .map_err(|_| format!("--{name}: cannot parse `{s}`").into())
}

/// A comma-separated list argument.
pub fn list<T: std::str::FromStr>(s: &str, what: &str) -> AnyResult<Vec<T>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| format!("--{what}: cannot parse `{x}`").into())
        })
        .collect()
}
