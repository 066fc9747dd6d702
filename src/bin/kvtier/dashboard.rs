//! `kvtier dashboard <dir>`: one self-contained HTML page (no network: SVG inline, no scripts, no
//! external fonts or styles) from the reports `--out <dir>` saved there: every `<command>.json`, its
//! plots, and its text table rebuilt from the JSON's rows.
//!
//! Must never: show a number that is not in a saved report.

use std::path::{Path, PathBuf};

use clap::{Arg, ArgMatches, Command};
use serde_json::Value;

use crate::report::{check_writable_dir, write_file, AnyResult};

pub fn command() -> Command {
    Command::new("dashboard")
        .about("gather the reports saved with --out <dir> into one self-contained HTML page")
        .arg(
            Arg::new("dir")
                .required(true)
                .value_name("DIR")
                .help("the --out directory of earlier runs"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(clap::ArgAction::SetTrue)
                .help("print {\"html\": <path>, \"reports\": [...]} on stdout instead of the path"),
        )
        .arg(
            Arg::new("html")
                .long("html")
                .value_name("FILE")
                .help("where the page goes (default: <DIR>/dashboard.html)"),
        )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A report's text (Markdown tables and plain lines, as the subcommand printed it) as HTML:
/// runs of `|` lines become tables, everything else preformatted text.
fn text_html(text: &str) -> String {
    let mut h = String::new();
    let mut pre = String::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let flush_pre = |h: &mut String, pre: &mut String| {
        if !pre.trim().is_empty() {
            *h += &format!("<pre>{}</pre>", esc(pre.trim_end()));
        }
        pre.clear();
    };
    let flush_table = |h: &mut String, rows: &mut Vec<Vec<String>>| {
        if rows.is_empty() {
            return;
        }
        *h += "<table>";
        for (i, r) in rows.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            *h += "<tr>";
            for c in r {
                *h += &format!("<{tag}>{}</{tag}>", esc(c.trim().trim_matches('`')));
            }
            *h += "</tr>";
        }
        *h += "</table>";
        rows.clear();
    };
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('|') && t.ends_with('|') && t.len() > 1 {
            flush_pre(&mut h, &mut pre);
            let cells: Vec<String> = t[1..t.len() - 1].split('|').map(str::to_string).collect();
            // The header separator row (|---|---:|).
            if cells
                .iter()
                .all(|c| c.trim().chars().all(|ch| ch == '-' || ch == ':'))
            {
                continue;
            }
            rows.push(cells);
        } else {
            flush_table(&mut h, &mut rows);
            pre.push_str(line);
            pre.push('\n');
        }
    }
    flush_table(&mut h, &mut rows);
    flush_pre(&mut h, &mut pre);
    h
}

fn section(dir: &Path, path: &Path) -> AnyResult<String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let cmd = r["command"]
        .as_str()
        .ok_or_else(|| format!("{}: not a kvtier report (no `command`)", path.display()))?;
    let mut h = format!(
        "<section id=\"{0}\"><h2>kvtier {0}</h2><p class=\"meta\">kvtier {1}, commit {2}, {3:.1} s; args: <code>{4}</code></p>",
        esc(cmd),
        esc(r["kvtier_version"].as_str().unwrap_or("?")),
        esc(r["commit"].as_str().unwrap_or("unknown")),
        r["elapsed_s"].as_f64().unwrap_or(f64::NAN),
        esc(&r["args"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")).unwrap_or_default()),
    );
    for (i, f) in r["plots"].as_array().into_iter().flatten().enumerate() {
        let f = f.as_str().unwrap_or_default();
        // Plot names come from the report; only plain file names next to it are read.
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(format!(
                "{}: plot name `{f}` is not a plain file name",
                path.display()
            )
            .into());
        }
        let svg = std::fs::read_to_string(dir.join(f)).map_err(|e| format!("plot {f}: {e}"))?;
        let title = r["plot_titles"][i].as_str().unwrap_or(f);
        h += &format!(
            "<figure class=\"plot\" data-plot=\"{}\">{}<figcaption>{}</figcaption></figure>",
            esc(f),
            strip_prolog(&svg),
            esc(title)
        );
    }
    h += &text_html(r["text"].as_str().unwrap_or(""));
    if let Some(a) = r["result"]["answer"].as_str() {
        h += &format!("<h3>answer</h3><blockquote>{}</blockquote>", esc(a));
    }
    Ok(h + "</section>")
}

/// An SVG file's XML prolog is not allowed inside HTML.
fn strip_prolog(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

pub fn run(m: &ArgMatches) -> AnyResult<()> {
    let dir = PathBuf::from(m.get_one::<String>("dir").expect("required"));
    let mut reports: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
        .collect();
    reports.sort();
    if reports.is_empty() {
        return Err(format!(
            "no reports (*.json) in {}: run subcommands with --out {} first",
            dir.display(),
            dir.display()
        )
        .into());
    }
    let mut body = String::new();
    let mut nav = String::new();
    for p in &reports {
        body += &section(&dir, p)?;
        let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        nav += &format!("<a href=\"#{0}\">{0}</a> ", esc(name));
    }
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>kvtier dashboard</title>\
         <style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #bbb;padding:2px 6px}}\
         th{{background:#eee}}.meta{{color:#666;font-size:12px}}figure{{margin:1em 0}}\
         li.ok b{{color:#2a7}}li.no b{{color:#b33}}section{{border-top:2px solid #ddd;margin-top:2em}}</style></head>\
         <body><h1>kvtier dashboard</h1><p>{} reports from <code>{}</code>: {nav}</p>{body}</body></html>\n",
        reports.len(),
        esc(&dir.display().to_string())
    );
    let out = m
        .get_one::<String>("html")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("dashboard.html"));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_writable_dir(parent)?;
    }
    write_file(&out, html.as_bytes())?;
    eprintln!(
        "kvtier dashboard: {} reports -> {}",
        reports.len(),
        out.display()
    );
    println!("{}", out.display());
    Ok(())
}
