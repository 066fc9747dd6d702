//! `kvtier protect`: chat with SmolLM2-135M-Instruct through `protect(model, sensitivity)`, on the
//! CPU. The answer streams as it is generated; the monitor's verdict per token (`--show-health`) and
//! every healing event are printed as they happen; at the end, memory per tier against a plain f16
//! cache of the same tokens, prefill and decode speed, and the health summary.
//!
//! `--document sotu:<year>[:<who>]` (or `--file <path>`) puts a whole document before the question,
//! so the cache really holds thousands of tokens in its tiers.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Arg, ArgAction, ArgMatches, Command};
use kvtier::model::corpus::find_speech;
use kvtier::model::{argmax, protect};
use kvtier::monitor::{Healer, Monitor};
use kvtier::protect::Healing;
use serde_json::json;

use crate::report::{assets, assets_arg, get, load_model, spinner, AnyResult, Ctx, Report};

pub fn command() -> Command {
    Command::new("protect")
        .about("chat with SmolLM2-135M through protect(): streamed answer, health, healing, memory per tier")
        .arg(
            Arg::new("question")
                .long("question")
                .alias("prompt")
                .default_value("Write a short paragraph about why the sky is blue.")
                .help("the user's message (after the document, if one is given)"),
        )
        .arg(
            Arg::new("document")
                .long("document")
                .value_name("sotu:YEAR[:WHO]")
                .help("a State of the Union speech from the corpus, placed before the question"),
        )
        .arg(
            Arg::new("file")
                .long("file")
                .value_name("PATH")
                .conflicts_with("document")
                .help("a text file placed before the question"),
        )
        .arg(Arg::new("max-tokens").long("max-tokens").default_value("200").help("most tokens generated"))
        .arg(
            Arg::new("sensitivity")
                .long("sensitivity")
                .default_value("0.85")
                .help("protect()'s sensitivity in [0, 1]: how readily the monitor fires"),
        )
        .arg(
            Arg::new("heal-pages")
                .long("heal-pages")
                .default_value("4")
                .help("pages per layer promoted exactly when the monitor fires (0: monitor only)"),
        )
        .arg(
            Arg::new("show-health")
                .long("show-health")
                .action(ArgAction::SetTrue)
                .help("print each generated token's health as [0.83]"),
        )
        .arg(assets_arg())
}

/// The document's text and a name for it.
fn document(m: &ArgMatches, sotu: &std::path::Path) -> AnyResult<Option<(String, String)>> {
    if let Some(p) = m.get_one::<String>("file") {
        let text = std::fs::read_to_string(p).map_err(|e| format!("--file {p}: {e}"))?;
        return Ok(Some((p.clone(), text)));
    }
    let Some(spec) = m.get_one::<String>("document") else {
        return Ok(None);
    };
    let mut parts = spec.split(':');
    let (kind, year, who) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
    let year: u32 = match (kind, year.and_then(|y| y.parse().ok())) {
        (Some("sotu"), Some(y)) => y,
        _ => {
            return Err(format!(
                "--document `{spec}`: expected sotu:<year>[:<who>], e.g. sotu:2012"
            )
            .into())
        }
    };
    let s = find_speech(sotu, year, who)?;
    Ok(Some((s.name, s.text)))
}

pub fn run(m: &ArgMatches, ctx: &Ctx) -> AnyResult<Report> {
    let question: String = get(m, "question")?;
    let max_new: usize = get(m, "max-tokens")?;
    let sensitivity: f32 = get(m, "sensitivity")?;
    let heal_pages: usize = get(m, "heal-pages")?;
    let assets = assets(m)?;
    let doc = document(m, &assets.sotu())?;

    let model = load_model(&assets, false)?;
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    let monitor = Monitor::new(sensitivity)?;
    let healer = Healer {
        pages_per_layer: heal_pages,
        max_pages_per_layer: heal_pages,
        ..Healer::default()
    };
    let healing = Healing::new(monitor, healer).with_callback(move |e| {
        eprintln!(
            "\n[heal] step {}: {:?}, health {:.3}: {} pages promoted exactly (device bytes net +{})",
            e.step, e.reason, e.health, e.promoted_pages, e.promoted_bytes
        );
        if let Ok(mut v) = ev.lock() {
            v.push(json!({"step": e.step, "reason": format!("{:?}", e.reason), "health": e.health,
                          "promoted_pages": e.promoted_pages, "promoted_bytes": e.promoted_bytes}));
        }
    });
    // The one call: kvtier's default cache (balanced preset, hot-window rule) for this model.
    let mut session = protect(model.clone(), sensitivity)?.with_healing(healing);
    let tok = model.tokenizer().clone();
    let user = match &doc {
        Some((_, text)) => format!("{}\n\n{question}", text.trim()),
        None => question.clone(),
    };
    let ids = tok.encode_user_prompt(&user)?;
    let ctx_len = model.config().context_length;
    if ids.len() + max_new > ctx_len {
        return Err(format!(
            "the prompt is {} tokens; with --max-tokens {max_new} that exceeds the model's {ctx_len}-token context",
            ids.len()
        )
        .into());
    }
    // Streamed text goes to stdout unless --json owns it.
    let stream = !ctx.json;
    let mut out = std::io::stdout();
    if stream {
        match &doc {
            Some((name, _)) => println!(
                "user: [{name}: {} prompt tokens]\n{question}\nassistant:",
                ids.len()
            ),
            None => println!("user: {question}\nassistant:"),
        }
    }
    let sp = spinner(format!("prefill of {} tokens", ids.len()));
    let t0 = Instant::now();
    let mut logits = session.prefill(&ids)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    sp.finish_and_clear();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut healths = Vec::new();
    let t1 = Instant::now();
    let mut stop = "max_tokens";
    for _ in 0..max_new {
        let next = argmax(&logits);
        if tok.stop_tokens().contains(&next) {
            stop = "eos";
            break;
        }
        generated.push(next);
        // Decoding all so far keeps multi-byte characters whole.
        if let Ok(text) = tok.decode(&generated, true) {
            if stream && text.len() > printed && text.is_char_boundary(printed) {
                let _ = write!(out, "{}", &text[printed..]);
                printed = text.len();
            }
        }
        logits = session.step(next)?;
        if let Some(v) = session.healing().and_then(|h| h.last()) {
            healths.push(v.health);
            if stream && m.get_flag("show-health") {
                let _ = write!(out, "[{:.2}]", v.health);
            }
        }
        let _ = out.flush();
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let answer = tok.decode(&generated, true)?;
    if stream {
        println!();
    }

    let mem = session.memory_report();
    let seq_len = session.history().len();
    let layers = model.config().num_layers;
    let (judged, fired) = session.healing().map_or((0, 0), |h| h.counts());
    let mean_health = healths.iter().map(|&h| h as f64).sum::<f64>() / healths.len().max(1) as f64;
    let min_health = healths.iter().copied().fold(f32::INFINITY, f32::min);
    let decode_tok_s = generated.len() as f64 / decode_s.max(1e-9);
    let mut text = format!(
        "\nprompt {} tokens, prefill {:.2} s ({:.0} tok/s); generated {} tokens at {:.1} tok/s (stop: {stop})\n\
         health: {judged} steps judged, mean {mean_health:.3}, min {}; healing fired {fired} times\n\
         cache: {seq_len} tokens x {layers} layers, default config (balanced: int4 K/V warm, 128-token hot window, 4 sinks)\n",
        ids.len(),
        prefill_s,
        ids.len() as f64 / prefill_s.max(1e-9),
        generated.len(),
        decode_tok_s,
        if healths.is_empty() { "-".to_string() } else { format!("{min_health:.3}") },
    );
    for (tier, bytes) in [
        ("hot", mem.hot_bytes),
        ("warm", mem.warm_bytes),
        ("cold", mem.cold_bytes),
        ("metadata", mem.metadata_bytes),
    ] {
        text += &format!(
            "  {tier:<10} {bytes:>11} bytes  ({:>6.0} bytes/token)\n",
            bytes as f64 / seq_len.max(1) as f64
        );
    }
    text += &format!(
        "  {:<10} {:>11} bytes  ({:>6.0} bytes/token) vs a plain f16 cache {} bytes: {:.2}x smaller\n  \
         {:<10} {:>11} bytes  (host RAM: the lossless archive healing promotes from)\n",
        "device",
        mem.device_bytes(),
        mem.device_bytes() as f64 / seq_len.max(1) as f64,
        mem.f16_equivalent_bytes,
        mem.compression(),
        "archive",
        mem.archive_bytes
    );
    let events = events.lock().map(|v| v.clone()).unwrap_or_default();
    let json = json!({
        "document": doc.as_ref().map(|d| &d.0), "question": question, "answer": answer,
        "prompt_tokens": ids.len(), "generated_tokens": generated.len(), "stop": stop,
        "prefill_s": prefill_s, "decode_tokens_per_s": decode_tok_s,
        "sensitivity": sensitivity,
        "health": {"steps_judged": judged, "fired": fired, "mean": mean_health,
                   "min": if healths.is_empty() { None } else { Some(min_health) }, "per_token": healths},
        "heal_events": events,
        "memory": {"tokens_per_layer": seq_len, "layers": layers, "hot_bytes": mem.hot_bytes,
                   "warm_bytes": mem.warm_bytes, "cold_bytes": mem.cold_bytes,
                   "metadata_bytes": mem.metadata_bytes, "archive_bytes": mem.archive_bytes,
                   "device_bytes": mem.device_bytes(), "f16_equivalent_bytes": mem.f16_equivalent_bytes,
                   "compression_vs_f16": mem.compression()},
    });
    if !stream {
        text = format!("{answer}\n{text}");
    }
    Ok(Report::new(json, text))
}
