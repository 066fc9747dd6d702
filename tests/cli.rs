//! The `kvtier` command line, run as a user runs it: every subcommand on small inputs, bad
//! arguments, missing assets and unwritable output directories (a clear message and a non-zero
//! exit), and the dashboard rendered by a real headless browser (Chromium) with a check that its
//! plots are drawn. Real-model subcommands skip with a message when the assets are absent; the
//! browser test skips without Chromium unless `KVTIER_REQUIRE_BROWSER=1` (CI sets it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kvtier");

fn kvtier(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run kvtier")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Runs, expects success, parses the `--json` report.
fn json_of(args: &[&str]) -> Value {
    let o = kvtier(args);
    assert!(o.status.success(), "kvtier {args:?} failed: {}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("kvtier {args:?}: stdout is not JSON ({e})"));
    assert_eq!(v["command"], args[0]);
    assert_eq!(v["kvtier_version"], env!("CARGO_PKG_VERSION"));
    v
}

/// Expects exit status `code` and a stderr that contains `needle`.
fn fails_with(args: &[&str], code: i32, needle: &str) {
    let o = kvtier(args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "kvtier {args:?}: {}",
        stderr(&o)
    );
    let e = stderr(&o);
    assert!(
        e.contains(needle),
        "kvtier {args:?}: stderr lacks `{needle}`:\n{e}"
    );
    assert!(!e.contains("panicked"), "kvtier {args:?} panicked:\n{e}");
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvtier-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assets_present() -> bool {
    let a = kvtier::model::corpus::Assets::locate();
    if !a.available() {
        eprintln!(
            "SKIP: real-model assets absent in {} (run scripts/fetch-assets.sh)",
            a.root.display()
        );
    }
    a.available()
}

#[test]
fn help_lists_every_subcommand() {
    let o = kvtier(&["--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    for sub in [
        "doctor",
        "bench",
        "simulate",
        "replay",
        "frontier",
        "eval",
        "protect",
        "share",
        "dashboard",
    ] {
        assert!(h.contains(sub), "help lacks {sub}:\n{h}");
    }
    // No subcommand: usage and a non-zero exit.
    assert_ne!(kvtier(&[]).status.code(), Some(0));
}

#[test]
fn bad_arguments_are_clear_errors() {
    fails_with(&["no-such-command"], 2, "unrecognized subcommand");
    fails_with(&["simulate", "--no-such-flag"], 2, "--no-such-flag");
    fails_with(
        &["simulate", "--prompt", "abc"],
        1,
        "--prompt: cannot parse `abc`",
    );
    fails_with(&["simulate", "--prompt", "0"], 1, "--prompt");
    fails_with(&["simulate", "--budgets", "150"], 1, "percent in (0, 100]");
    fails_with(
        &["simulate", "--policies", "nope"],
        1,
        "unknown policy `nope`",
    );
    fails_with(&["bench", "--shape", "3/2/64"], 1, "multiple of kv");
    fails_with(&["bench", "--formats", "int5"], 1, "int5");
    fails_with(&["bench", "--tokens", "0"], 1, "--tokens");
    fails_with(&["bench", "--cpu-paths", "sse9"], 1, "unknown path `sse9`");
    fails_with(
        &["replay", "--from", "/nonexistent/trace.bin"],
        1,
        "cannot open the trace",
    );
    fails_with(&["dashboard"], 2, "<DIR>");
}

#[test]
fn corrupted_trace_is_a_typed_error() {
    let d = tmp("badtrace");
    let p = d.join("t.bin");
    std::fs::write(&p, b"KVTTRACE garbage that is not a header").unwrap();
    fails_with(&["replay", "--from", p.to_str().unwrap()], 1, "trace");
}

#[test]
fn missing_assets_are_a_clear_error() {
    for sub in ["replay", "frontier", "eval", "protect"] {
        fails_with(
            &[sub, "--assets", "/nonexistent/kvtier-assets"],
            1,
            "real-model assets missing in /nonexistent/kvtier-assets",
        );
    }
}

/// Root ignores permission bits: drop every capability for the run (util-linux `setpriv`).
fn unprivileged(args: &[&str]) -> Option<Output> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some(kvtier(args));
    }
    let o = Command::new("setpriv")
        .args(["--bounding-set", "-all", "--inh-caps", "-all", "--"])
        .arg(BIN)
        .args(args)
        .output()
        .ok()?;
    if stderr(&o).contains("setpriv:") {
        return None;
    }
    Some(o)
}

#[test]
fn unwritable_output_directories_fail_before_the_run() {
    use std::os::unix::fs::PermissionsExt;
    // A path under a regular file can never be a directory, whoever runs.
    let d = tmp("notdir");
    let file = d.join("file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("out");
    fails_with(
        &["simulate", "--out", under.to_str().unwrap()],
        1,
        "cannot create output directory",
    );
    // A read-only directory.
    let ro = tmp("readonly");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    match unprivileged(&["simulate", "--prompt", "256", "--out", ro.to_str().unwrap()]) {
        Some(o) => {
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            assert!(stderr(&o).contains("is not writable"), "{}", stderr(&o));
            assert!(o.stdout.is_empty(), "the run went ahead");
        }
        None => eprintln!("SKIP: running as root without setpriv: cannot drop the capability"),
    }
    // The dashboard into a read-only directory.
    let reports = tmp("reports-ro");
    assert!(kvtier(&[
        "simulate",
        "--prompt",
        "256",
        "--steps",
        "4",
        "--out",
        reports.to_str().unwrap()
    ])
    .status
    .success());
    let html = ro.join("d.html");
    if let Some(o) = unprivileged(&[
        "dashboard",
        reports.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]) {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("not writable"), "{}", stderr(&o));
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn doctor_reports_what_it_checked() {
    let v = json_of(&["doctor", "--json"]);
    let checks = v["result"]["checks"].as_array().unwrap();
    let get = |w: &str| {
        checks
            .iter()
            .find(|c| c["what"] == w)
            .unwrap_or_else(|| panic!("no `{w}` line"))
    };
    assert_eq!(get("cpu")["ok"], true);
    let k = get("cpu kernel");
    assert_eq!(k["ok"], true, "{k}");
    assert!(["avx512", "avx2", "portable"].contains(&k["data"]["auto"].as_str().unwrap()));
    if !cfg!(feature = "cuda") {
        assert_eq!(get("cuda")["ok"], false);
        assert_eq!(get("cuda")["data"]["compiled"], false);
    }
    assert_eq!(
        get("metal")["ok"],
        false,
        "no Metal device on this (Linux) machine"
    );
    assert_eq!(get("disk tier dir")["ok"], true);
    // A directory that does not exist is reported as not writable.
    let v = json_of(&[
        "doctor",
        "--json",
        "--spill-dir",
        "/nonexistent/spill",
        "--assets",
        "/nonexistent/a",
    ]);
    let checks = v["result"]["checks"].as_array().unwrap();
    let disk = checks
        .iter()
        .find(|c| c["what"] == "disk tier dir")
        .unwrap();
    assert_eq!(disk["ok"], false);
    let assets = checks.iter().find(|c| c["what"] == "assets").unwrap();
    assert_eq!(assets["ok"], false);
    assert!(assets["detail"].as_str().unwrap().contains("fetch-assets"));
}

#[test]
fn simulate_json_rows_are_sane() {
    let v = json_of(&[
        "simulate",
        "--prompt",
        "512",
        "--steps",
        "8",
        "--policies",
        "recent,tiered",
        "--budgets",
        "25",
        "--json",
    ]);
    let rows = v["result"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let m = r["mass_retained"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-6).contains(&m), "{r}");
    }
    // `tiered` keeps every token (it demotes instead of evicting); `recent` evicts.
    assert_eq!(rows[1]["kept_ratio"].as_f64().unwrap(), 1.0);
    assert!(rows[0]["kept_ratio"].as_f64().unwrap() < 1.0);
}

#[test]
fn bench_measures_every_format() {
    let v = json_of(&[
        "bench",
        "--tokens",
        "512",
        "--shape",
        "8/2/64",
        "--formats",
        "f16,int4,int2",
        "--reps",
        "3",
        "--no-peer",
        "--json",
    ]);
    let rows = v["result"]["rows"].as_array().unwrap();
    // Per format: the call with every page result, with page masses only, and with none (same
    // cache).
    assert_eq!(rows.len(), 9);
    let bare: Vec<_> = rows
        .iter()
        .filter(|r| {
            r["backend"]
                .as_str()
                .unwrap()
                .ends_with("(no page results)")
        })
        .collect();
    assert_eq!(bare.len(), 3);
    let bytes = |f: &str| {
        rows.iter().find(|r| r["format"] == f).unwrap()["device_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(bytes("int4") < bytes("f16") && bytes("int2") < bytes("int4"));
    for r in rows {
        assert!(r["decode_ms"].as_f64().unwrap() > 0.0);
        assert!(r["speedup_vs_f16"].as_f64().is_some());
        assert!(r["speedup_vs_torch"].is_null(), "--no-peer");
    }
}

fn report_dir_with_plots(name: &str) -> PathBuf {
    let d = tmp(name);
    let out = d.to_str().unwrap();
    assert!(
        kvtier(&["simulate", "--prompt", "512", "--steps", "8", "--out", out])
            .status
            .success()
    );
    assert!(kvtier(&[
        "bench",
        "--tokens",
        "256",
        "--shape",
        "8/2/64",
        "--formats",
        "f16,int4",
        "--reps",
        "2",
        "--no-peer",
        "--out",
        out
    ])
    .status
    .success());
    assert!(kvtier(&["doctor", "--out", out]).status.success());
    d
}

#[test]
fn dashboard_is_self_contained() {
    let d = report_dir_with_plots("dash-html");
    let o = kvtier(&["dashboard", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(d.join("dashboard.html")).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        2,
        "the simulate and bench plots"
    );
    assert!(html.contains("kvtier doctor") && html.contains("kvtier bench"));
    for banned in [
        "<script",
        "<link",
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
    ] {
        assert!(
            !html.contains(banned),
            "the dashboard references `{banned}`"
        );
    }
    // An empty directory and a damaged report are clear errors.
    fails_with(
        &["dashboard", tmp("empty").to_str().unwrap()],
        1,
        "no reports",
    );
    let bad = tmp("badreport");
    std::fs::write(bad.join("x.json"), b"{ not json").unwrap();
    fails_with(&["dashboard", bad.to_str().unwrap()], 1, "not JSON");
}

fn chromium() -> Option<String> {
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .into_iter()
    .find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .map(str::to_string)
}

/// Counts pixels within 40 (per channel) of `rgb` in an RGB(A) PNG.
fn count_color(png_path: &Path, rgb: [u8; 3]) -> (usize, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    assert!(ch >= 3, "color type {:?}", info.color_type);
    let px = &buf[..info.buffer_size()];
    let n = px
        .chunks(ch)
        .filter(|p| (0..3).all(|i| (p[i] as i32 - rgb[i] as i32).abs() <= 40))
        .count();
    (n, px.len() / ch)
}

#[test]
fn dashboard_renders_in_a_headless_browser() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("KVTIER_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "KVTIER_REQUIRE_BROWSER=1 but no Chromium found"
        );
        eprintln!("SKIP: no Chromium (apt-get install chromium)");
        return;
    };
    let d = report_dir_with_plots("dash-browser");
    assert!(kvtier(&["dashboard", d.to_str().unwrap()]).status.success());
    let shot = d.join("shot.png");
    let url = format!("file://{}", d.join("dashboard.html").display());
    let profile = tmp("chromium-profile");
    let o = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1100,2600", &url])
        .output()
        .unwrap();
    assert!(shot.exists(), "no screenshot: {}", stderr(&o));
    // The first two series colours of the plots (plot::PALETTE) and the bars must be on screen:
    // an SVG that failed to render leaves the page white and grey.
    let (blue, total) = count_color(&shot, [31, 119, 180]);
    let (red, _) = count_color(&shot, [214, 39, 40]);
    eprintln!(
        "screenshot {}: {blue} blue and {red} red of {total} pixels",
        shot.display()
    );
    assert!(total >= 1100 * 2000, "screenshot too small: {total} pixels");
    assert!(
        blue > 2000,
        "the plots' first colour is missing ({blue} pixels)"
    );
    assert!(
        red > 500,
        "the plots' second colour is missing ({red} pixels)"
    );
}

// ---------------------------------------------------------------- real model

#[test]
fn eval_runs_on_the_real_model() {
    if !assets_present() {
        return;
    }
    fails_with(
        &[
            "eval",
            "--config",
            "k9v4",
            "--lengths",
            "256",
            "--tail",
            "8",
        ],
        1,
        "k9v4",
    );
    let d = tmp("eval");
    let v = json_of(&[
        "eval",
        "--config",
        "fp",
        "--config",
        "k2v2-w32",
        "--lengths",
        "256",
        "--tail",
        "8",
        "--speeches",
        "1",
        "--passkey-trials",
        "0",
        "--json",
        "--out",
        d.to_str().unwrap(),
    ]);
    let res = v["result"]["results"].as_array().unwrap();
    assert_eq!(res.len(), 2);
    let ppl = |i: usize| res[i]["perplexity"][0]["ppl"].as_f64().unwrap();
    assert!(ppl(0).is_finite() && ppl(0) > 1.0);
    assert!(
        res[1]["perplexity"][0]["device_bytes_per_token"]
            .as_f64()
            .unwrap()
            < res[0]["perplexity"][0]["device_bytes_per_token"]
                .as_f64()
                .unwrap()
    );
    assert!(d.join("eval.json").exists() && d.join("eval-ppl.svg").exists());
    // The Markdown table re-renders from the saved report alone.
    let o = kvtier(&["eval", "--render", d.join("eval.json").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| `k2v2-w32` | 2 | 2 | 32 |"));
}

#[test]
fn replay_and_frontier_run_on_the_real_model() {
    if !assets_present() {
        return;
    }
    let d = tmp("replay");
    let trace = d.join("t.bin");
    let v = json_of(&[
        "replay",
        "--prefill",
        "96",
        "--decode",
        "4",
        "--policies",
        "recent,tiered",
        "--budgets",
        "50",
        "--trace",
        trace.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(v["result"]["rows"].as_array().unwrap().len(), 2);
    // The saved trace replays without the model.
    let again = json_of(&[
        "replay",
        "--from",
        trace.to_str().unwrap(),
        "--policies",
        "recent",
        "--budgets",
        "50",
        "--json",
    ]);
    assert_eq!(again["result"]["rows"][0], v["result"]["rows"][0]);
    let f = json_of(&["frontier", "--lengths", "256", "--steps", "2", "--json"]);
    let points = f["result"]["runs"][0]["points"].as_array().unwrap();
    // The proven ε rule never loses more than ε of the mass.
    for p in points.iter().filter(|p| p["family"] == "epsilon") {
        assert!(
            p["max_realised_mass"].as_f64().unwrap() <= p["param"].as_f64().unwrap() * 1.0001,
            "{p}"
        );
    }
}

#[test]
fn protect_answers_with_memory_and_health() {
    if !assets_present() {
        return;
    }
    fails_with(&["protect", "--document", "sotu:1066"], 1, "no 1066 speech");
    fails_with(
        &["protect", "--document", "nonsense"],
        1,
        "expected sotu:<year>",
    );
    fails_with(&["protect", "--sensitivity", "7"], 1, "sensitivity");
    let v = json_of(&[
        "protect",
        "--question",
        "What is a cache?",
        "--max-tokens",
        "6",
        "--json",
    ]);
    let r = &v["result"];
    let n = r["generated_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&n), "{r}");
    assert_eq!(r["health"]["steps_judged"].as_u64().unwrap(), n);
    let mem = &r["memory"];
    assert!(mem["device_bytes"].as_u64().unwrap() > 0);
    assert!(mem["f16_equivalent_bytes"].as_u64().unwrap() > 0);
    // A document longer than the model's context is refused before any work.
    let d = tmp("longdoc");
    let long = d.join("long.txt");
    std::fs::write(&long, "word ".repeat(20_000)).unwrap();
    fails_with(&["protect", "--file", long.to_str().unwrap()], 1, "context");
}

#[test]
fn share_imports_a_published_prefix() {
    if !assets_present() {
        return;
    }
    fails_with(&["share", "--store", "ftp://x"], 1, "expected memory");
    fails_with(&["share", "--namespace", "a:b"], 1, "namespace");
    let d = tmp("share-dir");
    for store in ["memory".to_string(), format!("dir:{}", d.display())] {
        let v = json_of(&["share", "--store", &store, "--tokens", "200", "--json"]);
        let r = &v["result"];
        assert_eq!(
            r["publish"]["records"],
            6 * 30,
            "{store}: 6 full pages x 30 layers"
        );
        for run in r["imports"].as_array().unwrap() {
            // (200 - 1) / 32 = 6 pages imported; the last 8 tokens prefilled.
            assert_eq!(run["imported_tokens"], 192, "{store}: {run}");
            assert_eq!(run["computed_tokens"], 8);
            assert_eq!(run["corrupt_records"], 0);
            assert_eq!(run["same_next_token"], true, "{run}");
        }
    }
    // The directory store keeps its pages for the next process.
    let v = json_of(&[
        "share",
        "--store",
        &format!("dir:{}", d.display()),
        "--tokens",
        "200",
        "--json",
    ]);
    assert_eq!(v["result"]["stored_before"], 192);
    assert_eq!(v["result"]["publish"]["present"], 6 * 30);
}
