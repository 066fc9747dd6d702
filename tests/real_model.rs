//! Real-model tests: SmolLM2-135M-Instruct (GGUF Q4_1) through kvtier caches.
//!
//! Needs the assets of `scripts/fetch-assets.sh` (or `$KVTIER_ASSETS`); every test prints a clear
//! SKIPPED line and passes when they are absent, so `cargo test` works on a fresh checkout. CI
//! fetches the assets first. The texts are short (≤ 256 tokens) to keep the suite fast.

use std::sync::{Arc, OnceLock};

use kvtier::model::corpus::{find_speech, Assets};
use kvtier::model::{
    protect, protect_with, ExactAttention, GenerateOptions, Llama, LoadOptions, ModelError,
    ScoreOptions, Session,
};
use kvtier::{Bits, CacheConfig, HotDtype};

/// The model (default load options: decode on candle's quantised matmul) and the 2021 State of
/// the Union tokens, loaded once per test binary.
fn fixture() -> Option<&'static (Arc<Llama>, Vec<u32>)> {
    static FIXTURE: OnceLock<Option<(Arc<Llama>, Vec<u32>)>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| load(LoadOptions::default()))
        .as_ref()
}

/// The same with dense f32 decode: free of Q8_1 activation rounding, so cache configurations can
/// be compared without rounding noise (see `LoadOptions::dense_decode`).
fn dense_fixture() -> Option<&'static (Arc<Llama>, Vec<u32>)> {
    static FIXTURE: OnceLock<Option<(Arc<Llama>, Vec<u32>)>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            load(LoadOptions {
                dense_prefill: true,
                dense_decode: true,
            })
        })
        .as_ref()
}

fn load(opts: LoadOptions) -> Option<(Arc<Llama>, Vec<u32>)> {
    let assets = Assets::locate();
    if !assets.available() {
        return None;
    }
    let model = Arc::new(Llama::load_with(assets.model(), opts).expect("load model"));
    let speech = find_speech(&assets.sotu(), 2021, "biden").expect("2021 speech");
    let ids = model.tokenizer().encode(&speech.text).expect("encode");
    Some((model, ids))
}

macro_rules! require_assets {
    () => {
        require_assets!(fixture)
    };
    ($fixture:ident) => {
        match $fixture() {
            Some(f) => f,
            None => {
                eprintln!(
                    "SKIPPED: real-model assets not found in {} (run scripts/fetch-assets.sh or set KVTIER_ASSETS)",
                    Assets::locate().root.display()
                );
                return;
            }
        }
    };
}

fn fp_config(model: &Llama) -> CacheConfig {
    let c = model.config();
    CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
        .hot_dtype(HotDtype::F32)
        .full_precision()
        .build()
        .unwrap()
}

fn quant_config(model: &Llama, bits: Bits, hot_window: usize) -> CacheConfig {
    let c = model.config();
    CacheConfig::builder(c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim)
        .hot_dtype(HotDtype::F32)
        .k_bits(bits)
        .v_bits(bits)
        .hot_window(hot_window)
        .page_size(16)
        .build()
        .unwrap()
}

#[test]
fn hyperparameters_and_tokenizer_come_from_the_gguf() {
    let (model, ids) = require_assets!();
    let c = model.config();
    // SmolLM2-135M as published: these are facts of the pinned file, read from its metadata.
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_q_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (30, 576, 9, 3, 64)
    );
    assert_eq!(
        (c.vocab_size, c.context_length, c.rope_dim),
        (49152, 8192, 64)
    );
    assert_eq!(c.rope_base, 100_000.0);
    assert!(c.tied_embeddings);

    let tok = model.tokenizer();
    let text = "The State of the Union is strong: 1,234 jobs in 2021!";
    let enc = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&enc, false).unwrap(), text);
    // Digits are split one by one (the `smollm` pre-tokenizer).
    let digits = tok.encode("2021").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    // Chat markers are single special tokens.
    let chat = tok.encode_user_prompt("Hi").unwrap();
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(chat[0], im_start);
    assert_eq!(chat.iter().filter(|&&t| t == im_start).count(), 3); // system, user, assistant
    assert!(tok
        .stop_tokens()
        .contains(&tok.token_to_id("<|im_end|>").unwrap()));
    assert!(
        ids.len() > 10_000,
        "2021 SOTU tokenises to {} tokens",
        ids.len()
    );
}

#[test]
fn perplexity_of_a_short_sotu_passage_is_right_and_path_independent() {
    let (model, ids) = require_assets!();
    let text = &ids[..128];
    // Exact oracle, one block prefill (dense f32 GEMMs).
    let mut oracle = Session::new(
        model.clone(),
        ExactAttention::new(model.config().attention_shape()).unwrap(),
        0.5,
    )
    .unwrap();
    let block = oracle.score(text, ScoreOptions::all_prefill(128)).unwrap();
    // The text-level entry point gives the same number (the passage re-tokenises identically).
    let passage = model.tokenizer().decode(text, false).unwrap();
    assert_eq!(model.tokenizer().encode(&passage).unwrap(), text);
    let by_text = oracle
        .perplexity(&passage, ScoreOptions::all_prefill(usize::MAX))
        .unwrap();
    assert!((by_text / block.perplexity() - 1.0).abs() < 1e-9);
    // kvtier full precision, token by token (quantised matmuls, decode attention).
    let mut fp = protect_with(model.clone(), 0.5, fp_config(model)).unwrap();
    let steps = fp.score(text, ScoreOptions::token_by_token()).unwrap();
    assert_eq!(block.nll.len(), 127);
    assert_eq!(steps.nll.len(), 127);
    eprintln!(
        "ppl@128: block {:.4}, token-by-token kvtier fp {:.4}",
        block.perplexity(),
        steps.perplexity()
    );
    // A broken forward pass (e.g. half-split RoPE on GGUF weights) lands in the hundreds.
    for ppl in [block.perplexity(), steps.perplexity()] {
        assert!((22.0..32.0).contains(&ppl), "ppl {ppl}");
    }
    // Two very different numerical paths agree to well under 1%.
    let rel = (block.perplexity() / steps.perplexity() - 1.0).abs();
    assert!(rel < 0.01, "block vs token-by-token differ by {rel}");
    // The cache holds the 127 fed tokens in every layer, all hot.
    let mem = fp.memory_report();
    assert_eq!(mem.tokens, 127 * model.config().num_layers);
    assert_eq!(mem.warm_bytes, 0);
}

#[test]
fn greedy_chat_answer_is_coherent() {
    let (model, _) = require_assets!();
    let mut s = protect(model.clone(), 0.85).unwrap();
    assert_eq!(s.sensitivity(), 0.85);
    let g = s
        .generate(
            "What is the capital of France? Answer in one sentence.",
            GenerateOptions {
                max_new_tokens: 24,
                stop_at_eos: true,
            },
        )
        .unwrap();
    eprintln!("answer: {:?} ({:?})", g.text, g.stop);
    assert!(g.text.contains("Paris"), "answer: {:?}", g.text);
    assert!(matches!(g.stop, kvtier::model::StopReason::StopToken(_)));
    assert!(g.decode_steps + 1 >= g.tokens.len());
}

#[test]
fn sensitivity_is_validated() {
    let (model, _) = require_assets!();
    for bad in [-0.1f32, 1.5, f32::NAN] {
        assert!(matches!(
            protect(model.clone(), bad),
            Err(ModelError::Cache(kvtier::Error::InvalidConfig {
                field: "sensitivity",
                ..
            }))
        ));
    }
}

#[test]
fn quantised_cache_compresses_and_stays_close() {
    let (model, ids) = require_assets!(dense_fixture);
    let text = &ids[..224];
    let opts = ScoreOptions::decode_tail(128);
    let mut fp = protect_with(model.clone(), 0.5, fp_config(model)).unwrap();
    let base = fp.score(text, opts).unwrap();
    let fp_mem = fp.memory_report();

    let mut q8 = protect_with(model.clone(), 0.5, quant_config(model, Bits::B8, 32)).unwrap();
    let s8 = q8.score(text, opts).unwrap();
    let mut q2 = protect_with(model.clone(), 0.5, quant_config(model, Bits::B2, 32)).unwrap();
    let s2 = q2.score(text, opts).unwrap();
    let m8 = q8.memory_report();
    eprintln!(
        "ppl fp {:.4} int8 {:.4} int2 {:.4}; device bytes fp {} int8 {} int2 {}",
        base.perplexity(),
        s8.perplexity(),
        s2.perplexity(),
        fp_mem.device_bytes(),
        m8.device_bytes(),
        q2.memory_report().device_bytes()
    );
    // Warm pages exist and really save memory.
    assert!(m8.warm_bytes > 0 && m8.device_bytes() < fp_mem.device_bytes());
    assert!(q2.memory_report().device_bytes() < m8.device_bytes());
    // Per-token deviation from the full-precision predictions: int8 is near-lossless, int2 (with a
    // 32-token hot window) moves predictions measurably more. (Perplexity over ~100 tokens can move
    // either way; the deviation cannot.)
    let dev = |s: &kvtier::model::Score| {
        s.nll
            .iter()
            .zip(&base.nll)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / s.nll.len() as f64
    };
    let (d8, d2) = (dev(&s8), dev(&s2));
    eprintln!("mean |dNLL| vs fp: int8 {d8:.5}, int2 {d2:.5}");
    assert!(d8 < 0.01, "int8 deviates by {d8} nats/token");
    assert!(d2 > 2.0 * d8, "int2 {d2} vs int8 {d8}");
    assert!((s8.perplexity() / base.perplexity() - 1.0).abs() < 0.01);
}

#[test]
fn replayed_prefill_scores_like_a_real_prefill() {
    let (model, ids) = require_assets!(dense_fixture);
    let text = &ids[..160];
    let cfg = quant_config(model, Bits::B4, 32);
    let mut direct = protect_with(model.clone(), 0.5, cfg.clone()).unwrap();
    let a = direct.score(text, ScoreOptions::decode_tail(128)).unwrap();

    let mut oracle = Session::new(
        model.clone(),
        ExactAttention::new(model.config().attention_shape()).unwrap(),
        0.5,
    )
    .unwrap();
    let cap = oracle.capture_prefill(&text[..128]).unwrap();
    let mut replayed = protect_with(model.clone(), 0.5, cfg).unwrap();
    let b = replayed.score_tail(text, &cap).unwrap();
    assert_eq!(a.nll.len(), b.nll.len());
    assert_eq!(direct.memory_report(), replayed.memory_report());
    let rel = (a.perplexity() / b.perplexity() - 1.0).abs();
    eprintln!(
        "direct {:.5} replayed {:.5}",
        a.perplexity(),
        b.perplexity()
    );
    // Only float summation order differs (kvtier's prefill vs the oracle's GEMMs), and a few int4
    // codes may round the other way.
    assert!(rel < 1e-3, "replay changes ppl by {rel}");
    // A capture must match the text it is replayed under.
    assert!(replayed.score_tail(&ids[1..161], &cap).is_err());
}
