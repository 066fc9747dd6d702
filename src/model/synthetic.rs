//! Tests on a tiny synthetic Llama GGUF written on the fly (no assets needed).
//!
//! Owns: building a 2-layer random-weight Llama GGUF with a byte-level BPE vocabulary and a ChatML
//! template through candle's GGUF writer, and checking loading, metadata validation, tokenisation
//! and prefill/decode consistency against it. Must never: depend on downloaded files.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::corpus::SplitMix64;
use super::{
    protect_with, AttentionCache, AttentionShape, ExactAttention, Llama, LoadOptions, ModelError,
    ScoreOptions, Session,
};
use crate::{CacheConfig, HotDtype};

const LAYERS: usize = 2;
const HIDDEN: usize = 64;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 32;
const FFN: usize = 128;

/// What to break in the synthetic file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Good,
    Untied,
    WrongArch,
    MissingTensor,
    WrongShape,
}

fn random(shape: &[usize], rng: &mut SplitMix64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.below(20_001) as f32 / 10_000.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn q8(t: &Tensor) -> QTensor {
    QTensor::quantize(t, GgmlDType::Q8_0).unwrap()
}

fn f32q(t: &Tensor) -> QTensor {
    QTensor::quantize(t, GgmlDType::F32).unwrap()
}

/// Writes the synthetic GGUF to a fresh temp file and returns its path.
fn write_gguf(variant: Variant, tag: &str) -> PathBuf {
    let mut rng = SplitMix64::new(42);
    // Vocabulary: the 256 byte-level characters, one merged token, two chat markers.
    let mut tokens: Vec<String> = {
        let mut chars: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        chars.sort_unstable();
        chars.into_iter().map(String::from).collect()
    };
    tokens.push("ab".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let vocab = tokens.len();
    let mut types = vec![1u32; vocab];
    types[vocab - 2] = 3;
    types[vocab - 1] = 3;

    let s = |x: &str| Value::String(x.to_string());
    let arch = if variant == Variant::WrongArch {
        "gpt2"
    } else {
        "llama"
    };
    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
                    message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s(arch)),
        ("llama.block_count", Value::U32(LAYERS as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", Value::U32(KV_HEADS as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(vec![s("a b")])),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::U32).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(vocab as u32 - 1)),
        ("tokenizer.chat_template", s(template)),
    ];

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push((
        "token_embd.weight".into(),
        q8(&random(&[vocab, HIDDEN], &mut rng, 1.0)),
    ));
    let (q_dim, kv_dim) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    for i in 0..LAYERS {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        let ones = Tensor::ones(HIDDEN, candle_core::DType::F32, &Device::Cpu).unwrap();
        tensors.push((n("attn_norm"), f32q(&ones)));
        tensors.push((n("ffn_norm"), f32q(&ones)));
        let q_rows = if variant == Variant::WrongShape {
            q_dim + 32
        } else {
            q_dim
        };
        tensors.push((n("attn_q"), q8(&random(&[q_rows, HIDDEN], &mut rng, 0.3))));
        tensors.push((n("attn_k"), q8(&random(&[kv_dim, HIDDEN], &mut rng, 0.3))));
        tensors.push((n("attn_v"), q8(&random(&[kv_dim, HIDDEN], &mut rng, 0.3))));
        tensors.push((
            n("attn_output"),
            q8(&random(&[HIDDEN, q_dim], &mut rng, 0.1)),
        ));
        tensors.push((n("ffn_gate"), q8(&random(&[FFN, HIDDEN], &mut rng, 0.2))));
        tensors.push((n("ffn_up"), q8(&random(&[FFN, HIDDEN], &mut rng, 0.2))));
        if !(variant == Variant::MissingTensor && i == 1) {
            tensors.push((n("ffn_down"), q8(&random(&[HIDDEN, FFN], &mut rng, 0.1))));
        }
    }
    let ones = Tensor::ones(HIDDEN, candle_core::DType::F32, &Device::Cpu).unwrap();
    tensors.push(("output_norm.weight".into(), f32q(&ones)));
    if variant == Variant::Untied {
        tensors.push((
            "output.weight".into(),
            q8(&random(&[vocab, HIDDEN], &mut rng, 1.0)),
        ));
    }

    let path = std::env::temp_dir().join(format!(
        "kvtier-synthetic-{tag}-{}.gguf",
        std::process::id()
    ));
    let mut f = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}

fn load(variant: Variant, tag: &str, opts: LoadOptions) -> Result<Llama, ModelError> {
    let path = write_gguf(variant, tag);
    let model = Llama::load_with(&path, opts);
    std::fs::remove_file(&path).unwrap();
    model
}

const DENSE: LoadOptions = LoadOptions {
    dense_prefill: true,
    dense_decode: true,
};

#[test]
fn reads_hyperparameters_with_defaults() {
    let m = load(Variant::Good, "hp", LoadOptions::default()).unwrap();
    let c = m.config();
    assert_eq!(
        (c.num_layers, c.hidden_size, c.num_q_heads, c.num_kv_heads),
        (LAYERS, HIDDEN, HEADS, KV_HEADS)
    );
    // head_dim = hidden / heads, rope_dim defaults to head_dim.
    assert_eq!(
        (c.head_dim, c.rope_dim, c.ffn_size, c.context_length),
        (HEAD_DIM, HEAD_DIM, FFN, 256)
    );
    assert_eq!(c.vocab_size, 259);
    assert!(c.tied_embeddings);
    let untied = load(Variant::Untied, "untied", LoadOptions::default()).unwrap();
    assert!(!untied.config().tied_embeddings);
}

#[test]
fn rejects_bad_files() {
    let opts = LoadOptions::default();
    assert!(
        matches!(load(Variant::WrongArch, "arch", opts), Err(ModelError::UnsupportedArchitecture(a)) if a == "gpt2")
    );
    assert!(
        matches!(load(Variant::MissingTensor, "missing", opts), Err(ModelError::MissingTensor(t)) if t == "blk.1.ffn_down.weight")
    );
    assert!(
        matches!(load(Variant::WrongShape, "shape", opts), Err(ModelError::TensorShape { name, .. }) if name == "blk.0.attn_q.weight")
    );
    let missing_file = Llama::load(std::env::temp_dir().join("kvtier-no-such-file.gguf"));
    assert!(matches!(missing_file, Err(ModelError::Io { .. })));
}

#[test]
fn tokenizer_merges_and_special_tokens() {
    let m = load(Variant::Good, "tok", LoadOptions::default()).unwrap();
    let t = m.tokenizer();
    let ab = t.token_to_id("ab").unwrap();
    assert_eq!(t.encode("ab").unwrap(), vec![ab]);
    assert_eq!(t.encode("ba").unwrap().len(), 2);
    let ids = t.encode_user_prompt("ab").unwrap();
    assert_eq!(ids[0], t.token_to_id("<|im_start|>").unwrap());
    assert_eq!(t.decode(&ids, true).unwrap(), "user\nab\nassistant\n");
    assert_eq!(t.stop_tokens(), &[t.token_to_id("<|im_end|>").unwrap()]);
    assert!(matches!(
        t.decode(&[9999], false),
        Err(ModelError::TokenOutOfRange { id: 9999, .. })
    ));
}

fn text(n: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(7);
    (0..n).map(|_| rng.below(256) as u32).collect()
}

#[test]
fn prefill_and_decode_agree_at_every_position() {
    // With dense weights in both paths, prefill and token-by-token decode differ only in float
    // summation order: RoPE offsets, causal masking and cache bookkeeping must line up exactly.
    let m = Arc::new(load(Variant::Good, "agree", DENSE).unwrap());
    let ids = text(70);
    let shape = m.config().attention_shape();
    let mut a = Session::new(m.clone(), ExactAttention::new(shape).unwrap(), 0.5).unwrap();
    let block = a.score(&ids, ScoreOptions::all_prefill(ids.len())).unwrap();
    let mut b = Session::new(m.clone(), ExactAttention::new(shape).unwrap(), 0.5).unwrap();
    let steps = b.score(&ids, ScoreOptions::token_by_token()).unwrap();
    // Two chunks of prefill (the second attends over the first as cached).
    let mut c = Session::new(m.clone(), ExactAttention::new(shape).unwrap(), 0.5).unwrap();
    c.prefill(&ids[..30]).unwrap();
    let tail = c.prefill_hidden(&ids[30..]).unwrap();
    let tail_logits = m.logits(&tail).unwrap();
    let mut d = Session::new(m.clone(), ExactAttention::new(shape).unwrap(), 0.5).unwrap();
    let whole = d.prefill_hidden(&ids).unwrap();
    let whole_logits = m.logits(&whole.narrow(0, 30, 40).unwrap()).unwrap();
    for (x, y) in block.nll.iter().zip(&steps.nll) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    for (r1, r2) in tail_logits.iter().zip(&whole_logits) {
        for (x, y) in r1.iter().zip(r2) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
    // And through a full-precision kvtier cache.
    let cfg = CacheConfig::builder(LAYERS, HEADS, KV_HEADS, HEAD_DIM)
        .hot_dtype(HotDtype::F32)
        .full_precision()
        .build()
        .unwrap();
    let mut k = protect_with(m.clone(), 0.5, cfg).unwrap();
    let kv = k.score(&ids, ScoreOptions::token_by_token()).unwrap();
    for (x, y) in kv.nll.iter().zip(&steps.nll) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    assert_eq!(k.history(), &ids[..69]);
}

#[test]
fn context_and_token_limits_are_enforced() {
    let m = Arc::new(load(Variant::Good, "limits", LoadOptions::default()).unwrap());
    let shape = m.config().attention_shape();
    let mut s = Session::new(m.clone(), ExactAttention::new(shape).unwrap(), 0.5).unwrap();
    assert!(matches!(
        s.prefill(&[5000]),
        Err(ModelError::TokenOutOfRange { id: 5000, .. })
    ));
    assert!(matches!(
        s.prefill(&text(257)),
        Err(ModelError::ContextOverflow { .. })
    ));
    assert!(
        s.history().is_empty(),
        "a failed prefill must not advance the history"
    );
    // A cache shaped for another model is refused.
    let other = super::AttentionShape {
        num_layers: 3,
        ..shape
    };
    assert!(Session::new(m, ExactAttention::new(other).unwrap(), 0.5).is_err());
}

/// Exact attention that fails its next call at `fail_layer` once armed.
struct Flaky {
    inner: ExactAttention,
    fail_layer: Option<usize>,
}

impl Flaky {
    fn check(&mut self, layer: usize) -> crate::Result<()> {
        if self.fail_layer == Some(layer) {
            self.fail_layer = None;
            return Err(crate::Error::Unsupported(
                "injected failure (flaky test cache)",
            ));
        }
        Ok(())
    }
}

impl AttentionCache for Flaky {
    fn shape(&self) -> AttentionShape {
        self.inner.shape()
    }
    fn prefill(&mut self, l: usize, q: &[f32], k: &[f32], v: &[f32]) -> crate::Result<Vec<f32>> {
        self.check(l)?;
        self.inner.prefill(l, q, k, v)
    }
    fn decode(&mut self, l: usize, q: &[f32], k: &[f32], v: &[f32]) -> crate::Result<Vec<f32>> {
        self.check(l)?;
        self.inner.decode(l, q, k, v)
    }
    fn append(&mut self, l: usize, k: &[f32], v: &[f32]) -> crate::Result<()> {
        self.inner.append(l, k, v)
    }
    fn reset(&mut self) -> crate::Result<()> {
        self.inner.reset()
    }
    fn memory(&self) -> crate::MemoryReport {
        self.inner.memory()
    }
}

#[test]
fn a_forward_pass_failing_midway_clears_the_sequence() {
    let m = Arc::new(load(Variant::Good, "flaky", LoadOptions::default()).unwrap());
    let shape = m.config().attention_shape();
    let cache = Flaky {
        inner: ExactAttention::new(shape).unwrap(),
        fail_layer: None,
    };
    let mut s = Session::new(m, cache, 0.5).unwrap();
    s.prefill(&text(10)).unwrap();
    // Layer 0 of the step stores its token, layer 1 fails: cache and history would disagree.
    s.cache_mut().fail_layer = Some(1);
    assert!(s.step(3).is_err());
    assert!(s.history().is_empty());
    assert_eq!(s.memory_report().tokens, 0);
    // Failing at layer 0 stores nothing: the session keeps its state.
    s.prefill(&text(10)).unwrap();
    s.cache_mut().fail_layer = Some(0);
    assert!(s.step(3).is_err());
    assert_eq!(s.history().len(), 10);
    assert_eq!(s.memory_report().tokens, 10 * LAYERS);
    s.step(3).unwrap();
    assert_eq!(s.history().len(), 11);
}
