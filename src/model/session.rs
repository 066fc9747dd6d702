//! One conversation (sequence) of a model over one KV cache.
//!
//! Owns: the token history and position counter of a sequence, prefill / decode stepping through
//! [`Llama`], greedy generation, and teacher-forced scoring (negative log-likelihood, perplexity) in
//! the "exact prefill of a first chunk, then decode token by token" form that lets a compressed
//! cache shape later predictions. Must never: touch the cache except through [`AttentionCache`], or
//! let its position counter drift from what the cache holds (every path that feeds tokens updates the
//! history, `reset` clears both, and a forward pass that fails after the cache took tokens clears
//! the sequence).

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::attention::{AttentionCache, KvRecord, Recorder};
use super::error::{ModelError, Result};
use super::llama::Llama;
use crate::MemoryReport;

/// Largest number of hidden rows turned into logits at once (bounds the `[rows, vocab]` buffer).
const LOGIT_ROWS_PER_CHUNK: usize = 256;

/// How generation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Stop at the tokenizer's stop tokens (end of turn / end of text).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            stop_at_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is not part of `tokens`).
    StopToken(u32),
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
}

/// The result of [`Session::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated text (special tokens removed).
    pub text: String,
    /// Generated token ids, without the stop token.
    pub tokens: Vec<u32>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Time spent in the prompt prefill (including the first token's logits).
    pub prefill_time: Duration,
    /// Time spent in decode steps.
    pub decode_time: Duration,
    /// Number of decode steps run (forward passes after the prefill).
    pub decode_steps: usize,
    /// Why it stopped.
    pub stop: StopReason,
}

impl Generation {
    /// Decode throughput: forward passes of one token per second.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(self.decode_steps, self.decode_time)
    }
    /// Prefill throughput: prompt tokens per second.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// How [`Session::score`] feeds a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreOptions {
    /// Tokens `[0, prefill)` go through one exact block prefill; the rest are decoded one by one,
    /// each attending over the cache as stored. At least 1.
    pub prefill: usize,
    /// Only the predictions of tokens at index `>= score_from` count (at least 1: token 0 has no
    /// prediction).
    pub score_from: usize,
}

impl ScoreOptions {
    /// Everything in one prefill, every prediction scored.
    pub fn all_prefill(n_tokens: usize) -> Self {
        Self {
            prefill: n_tokens.max(1),
            score_from: 1,
        }
    }
    /// Token by token (prefill of the first token only), every prediction scored.
    pub fn token_by_token() -> Self {
        Self {
            prefill: 1,
            score_from: 1,
        }
    }
    /// Exact prefill of `prefill` tokens, then decode and score only the tail.
    pub fn decode_tail(prefill: usize) -> Self {
        Self {
            prefill,
            score_from: prefill,
        }
    }
}

/// The result of [`Session::score`].
#[derive(Debug, Clone)]
pub struct Score {
    /// Negative log-likelihood (natural log) of each scored token, in order.
    pub nll: Vec<f32>,
    /// Index of the first scored token.
    pub score_from: usize,
    /// Time in the block prefill.
    pub prefill_time: Duration,
    /// Time in decode steps.
    pub decode_time: Duration,
    /// Number of decode steps.
    pub decode_steps: usize,
}

impl Score {
    /// Mean NLL per scored token.
    pub fn mean_nll(&self) -> f64 {
        if self.nll.is_empty() {
            return f64::NAN;
        }
        self.nll.iter().map(|&x| x as f64).sum::<f64>() / self.nll.len() as f64
    }
    /// Perplexity: `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
    /// Decode throughput in tokens per second.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(self.decode_steps, self.decode_time)
    }
}

/// An exact block prefill, captured once and replayable into sessions of the same model with any
/// cache configuration (see [`super::attention::Recorder`]).
#[derive(Debug, Clone)]
pub struct CapturedPrefill {
    /// The prefilled tokens (positions `0..tokens.len()`).
    pub tokens: Vec<u32>,
    /// Keys/values every layer stored.
    pub kv: KvRecord,
    /// Logits after the last token (the prediction of the next one).
    pub last_logits: Vec<f32>,
    /// Time the capture's prefill took.
    pub prefill_time: Duration,
}

/// `-log softmax(logits)[target]`, computed in f64.
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    m + z.ln() - logits[target as usize] as f64
}

/// Index of the largest logit (first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Validates a monitor sensitivity: finite and in `[0, 1]`.
pub fn check_sensitivity(sensitivity: f32) -> Result<f32> {
    Ok(crate::protect::check_sensitivity(sensitivity)?)
}

/// A model, a cache, and the sequence that lives in it.
#[derive(Debug)]
pub struct Session<C: AttentionCache> {
    model: Arc<Llama>,
    pub(super) cache: C,
    pub(super) history: Vec<u32>,
    sensitivity: f32,
    /// The monitor-and-heal loop run after every decode step, if any.
    healing: Option<crate::protect::Healing>,
}

impl<C: AttentionCache> Session<C> {
    /// Binds `model` and an empty `cache`. `sensitivity` (in `[0, 1]`) is stored for the monitor.
    pub fn new(model: Arc<Llama>, mut cache: C, sensitivity: f32) -> Result<Self> {
        let sensitivity = check_sensitivity(sensitivity)?;
        let want = model.config().attention_shape();
        if cache.shape() != want {
            return Err(ModelError::InvalidArgument {
                what: "cache",
                reason: format!(
                    "cache shape {:?} does not match the model's {want:?}",
                    cache.shape()
                ),
            });
        }
        cache.reset()?;
        Ok(Self {
            model,
            cache,
            history: Vec::new(),
            sensitivity,
            healing: None,
        })
    }

    /// The model.
    pub fn model(&self) -> &Arc<Llama> {
        &self.model
    }

    /// The cache.
    pub fn cache(&self) -> &C {
        &self.cache
    }

    /// The cache, mutably (for its own settings; feeding it tokens directly would desynchronise
    /// the session's history).
    pub fn cache_mut(&mut self) -> &mut C {
        &mut self.cache
    }

    /// The monitor sensitivity given at construction.
    pub fn sensitivity(&self) -> f32 {
        self.sensitivity
    }

    /// Tokens fed so far; the next token goes to position `history().len()`.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Bytes the cache holds, by tier.
    pub fn memory_report(&self) -> MemoryReport {
        self.cache.memory()
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.reset()?;
        self.history.clear();
        Ok(())
    }

    /// Block prefill of `tokens` after the history; returns the final hidden states `[n, hidden]`.
    pub fn prefill_hidden(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let before = self.cache.memory().tokens;
        match self
            .model
            .prefill(tokens, self.history.len(), &mut self.cache)
        {
            Ok(h) => {
                self.history.extend_from_slice(tokens);
                Ok(h)
            }
            Err(e) => Err(self.recover(before, e)),
        }
    }

    /// After a failed forward pass: if the cache already took some layers' tokens, history and
    /// cache no longer agree, so the sequence is cleared; if it took none (validation failed
    /// first), the session is untouched.
    fn recover(&mut self, tokens_before: usize, e: ModelError) -> ModelError {
        if self.cache.memory().tokens != tokens_before {
            // The original error is the one worth reporting; a failing reset leaves the cache as
            // it is and the next call will surface that.
            let _ = self.reset();
        }
        e
    }

    /// Block prefill of `tokens`; returns the logits after the last one.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let h = self.prefill_hidden(tokens)?;
        let last = h.narrow(0, tokens.len() - 1, 1)?;
        Ok(self.model.logits(&last)?.remove(0))
    }

    /// One decode step; returns the logits after `token`.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let before = self.cache.memory().tokens;
        let h = match self
            .model
            .decode(token, self.history.len(), &mut self.cache)
        {
            Ok(h) => h,
            Err(e) => return Err(self.recover(before, e)),
        };
        self.history.push(token);
        let logits = self.model.logits(&h)?.remove(0);
        if let Some(heal) = self.healing.as_mut() {
            heal.after_step(&mut self.cache, &logits)?;
        }
        Ok(logits)
    }

    /// Runs `healing` after every decode step (see [`crate::protect::Healing`]): the monitor
    /// judges each step's logits and attention, and when it fires the cache heals.
    pub fn with_healing(mut self, healing: crate::protect::Healing) -> Self {
        self.healing = Some(healing);
        self
    }

    /// The monitor-and-heal loop, if one runs.
    pub fn healing(&self) -> Option<&crate::protect::Healing> {
        self.healing.as_ref()
    }

    /// The loop, mutably (drain its events).
    pub fn healing_mut(&mut self) -> Option<&mut crate::protect::Healing> {
        self.healing.as_mut()
    }

    /// Greedy generation from `prompt` ids on a fresh sequence. `on_token` sees each new token.
    pub fn generate_tokens(
        &mut self,
        prompt: &[u32],
        opts: GenerateOptions,
        on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        self.reset()?;
        let t0 = Instant::now();
        let logits = self.prefill(prompt)?;
        let prefill_time = t0.elapsed();
        self.continue_greedy(logits, prompt.len(), prefill_time, opts, on_token)
    }

    /// Greedy generation after a replayed context: `captured` is replayed, `prompt` (e.g. a
    /// question) is block-prefilled on top of it — attending over the context *as the cache stores
    /// it* — and the answer is decoded.
    pub fn generate_after(
        &mut self,
        captured: &CapturedPrefill,
        prompt: &[u32],
        opts: GenerateOptions,
    ) -> Result<Generation> {
        self.replay(captured)?;
        let t0 = Instant::now();
        let logits = self.prefill(prompt)?;
        let prefill_time = t0.elapsed();
        self.continue_greedy(logits, prompt.len(), prefill_time, opts, |_| {})
    }

    /// Greedy decoding from `logits` (the prediction after the history).
    fn continue_greedy(
        &mut self,
        mut logits: Vec<f32>,
        prompt_tokens: usize,
        prefill_time: Duration,
        opts: GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        let ctx = self.model.config().context_length;
        let stops = self.model.tokenizer().stop_tokens().to_vec();
        let mut tokens = Vec::new();
        let mut decode_time = Duration::ZERO;
        let mut steps = 0;
        let stop = loop {
            if opts.max_new_tokens == 0 {
                break StopReason::MaxTokens;
            }
            let next = argmax(&logits);
            if opts.stop_at_eos && stops.contains(&next) {
                break StopReason::StopToken(next);
            }
            tokens.push(next);
            on_token(next);
            if tokens.len() >= opts.max_new_tokens {
                break StopReason::MaxTokens;
            }
            if self.history.len() >= ctx {
                break StopReason::ContextFull;
            }
            let t = Instant::now();
            logits = self.step(next)?;
            decode_time += t.elapsed();
            steps += 1;
        };
        let text = self.model.tokenizer().decode(&tokens, true)?;
        Ok(Generation {
            text,
            tokens,
            prompt_tokens,
            prefill_time,
            decode_time,
            decode_steps: steps,
            stop,
        })
    }

    /// Resets, block-prefills `tokens` and records what every layer stored.
    pub fn capture_prefill(&mut self, tokens: &[u32]) -> Result<CapturedPrefill> {
        self.reset()?;
        let t0 = Instant::now();
        let (hidden, kv) = {
            let mut rec = Recorder::new(&mut self.cache);
            let h = self.model.prefill(tokens, 0, &mut rec)?;
            (h, rec.into_record())
        };
        self.history.extend_from_slice(tokens);
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        let last_logits = self.model.logits(&last)?.remove(0);
        Ok(CapturedPrefill {
            tokens: tokens.to_vec(),
            kv,
            last_logits,
            prefill_time: t0.elapsed(),
        })
    }

    /// Resets and loads a captured prefill (the state `prefill(captured.tokens)` would leave);
    /// returns the logits after its last token.
    pub fn replay(&mut self, captured: &CapturedPrefill) -> Result<Vec<f32>> {
        let layers = self.model.config().num_layers;
        if captured.kv.keys.len() != layers || captured.tokens.is_empty() {
            return Err(ModelError::InvalidArgument {
                what: "captured prefill",
                reason: format!(
                    "{} layers / {} tokens; model has {layers} layers",
                    captured.kv.keys.len(),
                    captured.tokens.len()
                ),
            });
        }
        self.reset()?;
        for layer in 0..layers {
            self.cache
                .append(layer, &captured.kv.keys[layer], &captured.kv.values[layer])?;
        }
        self.history.extend_from_slice(&captured.tokens);
        Ok(captured.last_logits.clone())
    }

    /// Scores the tail of `tokens` after a captured prefill of its head: `tokens` must start with
    /// `captured.tokens` (length `P`); the predictions of `tokens[P..]` are scored, the first from
    /// the captured logits, the rest by decoding token by token over the cache as stored. Same
    /// numbers as `score(tokens, ScoreOptions::decode_tail(P))`.
    pub fn score_tail(&mut self, tokens: &[u32], captured: &CapturedPrefill) -> Result<Score> {
        self.score_tail_with_progress(tokens, captured, |_, _| {})
    }

    /// [`Session::score_tail`], calling `progress(done, total)` after each decode step.
    pub fn score_tail_with_progress(
        &mut self,
        tokens: &[u32],
        captured: &CapturedPrefill,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Score> {
        let p = captured.tokens.len();
        if tokens.len() <= p || tokens[..p] != captured.tokens[..] {
            return Err(ModelError::InvalidArgument {
                what: "tokens",
                reason: format!(
                    "must extend the {p} captured tokens (got {} tokens)",
                    tokens.len()
                ),
            });
        }
        let logits = self.replay(captured)?;
        let mut nll = vec![token_nll(&logits, tokens[p]) as f32];
        let t1 = Instant::now();
        let total = tokens.len() - 1 - p;
        for (done, i) in (p..tokens.len() - 1).enumerate() {
            let logits = self.step(tokens[i])?;
            nll.push(token_nll(&logits, tokens[i + 1]) as f32);
            progress(done + 1, total);
        }
        Ok(Score {
            nll,
            score_from: p,
            prefill_time: captured.prefill_time,
            decode_time: t1.elapsed(),
            decode_steps: total,
        })
    }

    /// Greedy answer to one user turn, rendered through the model's chat template.
    pub fn generate(&mut self, prompt: &str, opts: GenerateOptions) -> Result<Generation> {
        let ids = self.model.tokenizer().encode_user_prompt(prompt)?;
        self.generate_tokens(&ids, opts, |_| {})
    }

    /// Perplexity of `text` (tokenised without a chat template) on a fresh sequence, fed as `opts`
    /// says: e.g. [`ScoreOptions::decode_tail`] to let the cache's compression shape the scored
    /// predictions, [`ScoreOptions::all_prefill`] for one exact block. `opts.prefill` is capped at
    /// the text's token count.
    pub fn perplexity(&mut self, text: &str, opts: ScoreOptions) -> Result<f64> {
        let ids = self.model.tokenizer().encode(text)?;
        let opts = ScoreOptions {
            prefill: opts.prefill.min(ids.len()),
            ..opts
        };
        Ok(self.score(&ids, opts)?.perplexity())
    }

    /// Teacher-forced NLL of `tokens` on a fresh sequence (see [`ScoreOptions`]).
    pub fn score(&mut self, tokens: &[u32], opts: ScoreOptions) -> Result<Score> {
        self.score_with_progress(tokens, opts, |_, _| {})
    }

    /// [`Session::score`], calling `progress(done, total)` after each decode step.
    pub fn score_with_progress(
        &mut self,
        tokens: &[u32],
        opts: ScoreOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Score> {
        let n = tokens.len();
        let ScoreOptions {
            prefill,
            score_from,
        } = opts;
        if n < 2 || prefill == 0 || prefill > n || score_from == 0 || score_from >= n {
            return Err(ModelError::InvalidArgument {
                what: "score options",
                reason: format!("{n} tokens, prefill {prefill}, score_from {score_from}: need n >= 2, 1 <= prefill <= n, 1 <= score_from < n"),
            });
        }
        self.reset()?;
        let mut nll = Vec::with_capacity(n - score_from);

        let t0 = Instant::now();
        let hidden = self.prefill_hidden(&tokens[..prefill])?;
        // Row r of the prefill predicts token r + 1; keep rows whose target is scored.
        let first_row = score_from - 1;
        let last_row = (prefill - 1).min(n - 2);
        let mut r = first_row;
        while r <= last_row {
            let len = (last_row + 1 - r).min(LOGIT_ROWS_PER_CHUNK);
            for (i, row) in self
                .model
                .logits(&hidden.narrow(0, r, len)?)?
                .iter()
                .enumerate()
            {
                nll.push(token_nll(row, tokens[r + i + 1]) as f32);
            }
            r += len;
        }
        let prefill_time = t0.elapsed();

        let t1 = Instant::now();
        let total = (n - 1).saturating_sub(prefill);
        for (done, i) in (prefill..n - 1).enumerate() {
            let logits = self.step(tokens[i])?;
            if i + 1 >= score_from {
                nll.push(token_nll(&logits, tokens[i + 1]) as f32);
            }
            progress(done + 1, total);
        }
        Ok(Score {
            nll,
            score_from,
            prefill_time,
            decode_time: t1.elapsed(),
            decode_steps: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_matches_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((token_nll(&logits, 2) - (z - 3.0)).abs() < 1e-12);
        assert!((token_nll(&logits, 0) - (z - 1.0)).abs() < 1e-12);
        // Shift invariance (large logits must not overflow).
        let big = [1001.0f32, 1002.0, 1003.0];
        assert!((token_nll(&big, 2) - (z - 3.0)).abs() < 1e-6);
    }

    #[test]
    fn argmax_first_max() {
        assert_eq!(argmax(&[0.0, 5.0, 5.0, -1.0]), 1);
        assert_eq!(argmax(&[7.0]), 0);
    }

    #[test]
    fn sensitivity_range() {
        assert_eq!(check_sensitivity(0.85).unwrap(), 0.85);
        assert!(check_sensitivity(0.0).is_ok() && check_sensitivity(1.0).is_ok());
        for bad in [-0.01, 1.01, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                check_sensitivity(bad),
                Err(ModelError::Cache(crate::Error::InvalidConfig { .. }))
            ));
        }
    }

    #[test]
    fn score_mean_and_ppl() {
        let s = Score {
            nll: vec![1.0, 3.0],
            score_from: 1,
            prefill_time: Duration::ZERO,
            decode_time: Duration::from_secs(2),
            decode_steps: 4,
        };
        assert_eq!(s.mean_nll(), 2.0);
        assert!((s.perplexity() - 2f64.exp()).abs() < 1e-12);
        assert_eq!(s.decode_tokens_per_sec(), 2.0);
    }
}
