//! End-to-end token-by-token decode of SmolLM2-135M (same GGUF, same process and threads):
//! candle-transformers' `quantized_llama` with its own KV cache against kvtier's example engine
//! with a kvtier cache (full precision, and the default int4 cache), at several context lengths.
//!
//! Each engine is prefilled to the context (chunks of 512), then rounds of `--steps` decode steps
//! (embedding through logits, as an engine runs them) are timed, the engines interleaved round by
//! round; every engine decodes the same corpus tokens, so their contexts stay equal. Reports the
//! median tokens/s per engine and kvtier's ratio to candle.
//!
//! candle's implementation stops at 4096 positions, so 4000 (plus the decoded steps) is the longest
//! context where both run.
//!
//! ```text
//! scripts/fetch-assets.sh
//! cargo run --release --features candle-peer --example e2e_decode -- --contexts 128,2048,4000
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::{Arg, Command};
use kvtier::model::corpus::{load_speeches, Assets};
use kvtier::model::{Llama, LoadOptions};
use kvtier::protect::{AttentionCache, KvTierAttention};
use kvtier::CacheConfig;

/// `candle_transformers::models::quantized_llama::MAX_SEQ_LEN` (private there).
const CANDLE_MAX_POS: usize = 4096;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

enum Engine {
    Candle(Box<ModelWeights>),
    Kvtier(Box<KvTierAttention>),
}

fn main() -> Res<()> {
    let m = Command::new("e2e_decode")
        .about("SmolLM2 decode: candle's quantized_llama vs kvtier caches")
        .arg(
            Arg::new("contexts")
                .long("contexts")
                .default_value("128,2048,4000"),
        )
        .arg(Arg::new("steps").long("steps").default_value("16"))
        .arg(Arg::new("rounds").long("rounds").default_value("5"))
        .get_matches();
    let contexts: Vec<usize> = m
        .get_one::<String>("contexts")
        .expect("default")
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let steps: usize = m.get_one::<String>("steps").expect("default").parse()?;
    let rounds: usize = m.get_one::<String>("rounds").expect("default").parse()?;
    let assets = Assets::locate();
    if !assets.available() {
        eprintln!("assets missing: run scripts/fetch-assets.sh");
        std::process::exit(2);
    }
    let model = Llama::load_with(
        assets.model(),
        LoadOptions {
            dense_prefill: true,
            dense_decode: false,
        },
    )?;
    // Corpus tokens: speeches concatenated until there are enough for the longest run.
    let need = contexts.iter().max().copied().unwrap_or(0) + steps * rounds + 1;
    let mut tokens = Vec::new();
    for s in load_speeches(&assets.sotu())?.iter().rev() {
        tokens.extend(model.tokenizer().encode(&s.text)?);
        if tokens.len() >= need {
            break;
        }
    }
    if tokens.len() < need {
        return Err(format!("corpus has {} tokens, need {need}", tokens.len()).into());
    }
    let shape = model.config().attention_shape();
    let c = |b: kvtier::CacheConfigBuilder| b.build();
    let base = || {
        CacheConfig::builder(
            shape.num_layers,
            shape.num_q_heads,
            shape.num_kv_heads,
            shape.head_dim,
        )
    };
    println!(
        "threads: {} (rayon global pool, shared by candle and kvtier)",
        rayon::current_num_threads()
    );
    println!(
        "| context | candle tok/s | kvtier fp tok/s | kvtier int4 tok/s | fp / candle | int4 / candle | fp / candle, rounds | int4 / candle, rounds |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &ctx in &contexts {
        // candle's quantized_llama precomputes RoPE for MAX_SEQ_LEN = 4096 positions and fails past
        // them, so the peer only exists up to there.
        if ctx + steps * rounds > CANDLE_MAX_POS {
            println!(
                "| {ctx} | n/a: candle's quantized_llama stops at {CANDLE_MAX_POS} positions | | | | | | |"
            );
            continue;
        }
        let mut engines = [
            (
                "candle",
                Engine::Candle({
                    let mut f = std::fs::File::open(assets.model())?;
                    let content = candle_core::quantized::gguf_file::Content::read(&mut f)?;
                    Box::new(ModelWeights::from_gguf(content, &mut f, &Device::Cpu)?)
                }),
            ),
            (
                "fp",
                Engine::Kvtier(Box::new(KvTierAttention::new(c(base().full_precision())?)?)),
            ),
            (
                "int4",
                Engine::Kvtier(Box::new(KvTierAttention::new(c(base())?)?)),
            ),
        ];
        for (_, e) in engines.iter_mut() {
            prefill(&model, e, &tokens[..ctx])?;
        }
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); engines.len()];
        let mut pos = ctx;
        for _ in 0..rounds {
            for (i, (_, e)) in engines.iter_mut().enumerate() {
                let t = Instant::now();
                for s in 0..steps {
                    step(&model, e, tokens[pos + s], pos + s)?;
                }
                times[i].push(steps as f64 / t.elapsed().as_secs_f64());
            }
            pos += steps;
        }
        let med: Vec<f64> = times.iter().map(|t| median(t)).collect();
        // Rounds are interleaved, so round i of every engine ran under the same machine load: the
        // spread of the paired ratios says how far one run's median can be trusted.
        let spread = |e: usize| {
            let (lo, hi) = (0..rounds)
                .map(|i| times[e][i] / times[0][i])
                .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
            format!("{lo:.2}-{hi:.2}x")
        };
        println!(
            "| {ctx} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x | {} | {} |",
            med[0],
            med[1],
            med[2],
            med[1] / med[0],
            med[2] / med[0],
            spread(1),
            spread(2)
        );
    }
    Ok(())
}

fn median(t: &[f64]) -> f64 {
    let mut t = t.to_vec();
    t.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    t[t.len() / 2]
}

fn prefill(model: &Llama, e: &mut Engine, toks: &[u32]) -> Res<()> {
    for (i, chunk) in toks.chunks(512).enumerate() {
        match e {
            Engine::Candle(w) => {
                let x = Tensor::new(chunk, &Device::Cpu)?.unsqueeze(0)?;
                w.forward(&x, i * 512)?;
            }
            Engine::Kvtier(a) => {
                let cache: &mut dyn AttentionCache = a.as_mut();
                model.prefill(chunk, i * 512, cache)?;
            }
        }
    }
    Ok(())
}

/// One decode step through logits on the host, as an engine samples from them.
fn step(model: &Llama, e: &mut Engine, tok: u32, pos: usize) -> Res<()> {
    let logits = match e {
        Engine::Candle(w) => {
            let x = Tensor::new(&[tok], &Device::Cpu)?.unsqueeze(0)?;
            w.forward(&x, pos)?
                .squeeze(0)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?
        }
        Engine::Kvtier(a) => {
            let cache: &mut dyn AttentionCache = a.as_mut();
            let h = model.decode(tok, pos, cache)?;
            model.logits(&h)?.remove(0)
        }
    };
    std::hint::black_box(logits);
    Ok(())
}
