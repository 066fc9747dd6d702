//! Tokenizer and chat template built from GGUF metadata.
//!
//! Owns: turning the `tokenizer.ggml.*` metadata of a GGUF file (vocabulary, merges, token types,
//! pre-tokenizer name, special token ids, chat template) into a byte-level BPE tokenizer (the
//! `tokenizers` crate), and rendering ChatML prompts the way the file's template does. Must never:
//! read a `tokenizer.json` or any file beyond the GGUF, hard-code a vocabulary or a system prompt
//! (both come from the metadata), or silently fall back to a different pre-tokenizer than the one the
//! file names.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::error::{ModelError, Result};
use super::gguf::{get_string_array, get_u32_opt, metadata_str};

/// GGUF token type of a control token (`<|im_start|>` and friends), see llama.cpp `llama_token_type`.
const TOKEN_TYPE_CONTROL: u32 = 3;
/// GGUF token type of a user-defined token.
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A `user` turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
    /// A `system` turn.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    /// An `assistant` turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// The chat format of a model, as read from `tokenizer.chat_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n` turns, generation prompt `<|im_start|>assistant\n`.
    /// `default_system` is the system turn the template inserts when the first message is not a system
    /// message (SmolLM2 has one), taken verbatim from the template text.
    ChatMl { default_system: Option<String> },
}

impl ChatTemplate {
    /// Detects the template from the raw Jinja text; `None` when the format is not one we render.
    pub fn detect(template: &str) -> Option<Self> {
        const START: &str = "<|im_start|>";
        if !template.contains(START) || !template.contains("<|im_end|>") {
            return None;
        }
        // A literal default system turn looks like `'<|im_start|>system\n...<|im_end|>`, with no
        // Jinja expression inside (the per-message turn is built with `+ message['content'] +`).
        let marker = "<|im_start|>system\n";
        let default_system = template.find(marker).and_then(|at| {
            let rest = &template[at + marker.len()..];
            let end = rest.find("<|im_end|>")?;
            let text = &rest[..end];
            let is_literal = !text.contains('\'') && !text.contains("{{") && !text.contains('+');
            (is_literal && !text.is_empty()).then(|| text.to_string())
        });
        Some(ChatTemplate::ChatMl { default_system })
    }

    /// Renders `messages` and, if `add_generation_prompt`, opens the assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        match self {
            ChatTemplate::ChatMl { default_system } => {
                let mut out = String::new();
                let first_is_system = messages.first().is_some_and(|m| m.role == "system");
                if let (Some(sys), false) = (default_system, first_is_system) {
                    out.push_str("<|im_start|>system\n");
                    out.push_str(sys);
                    out.push_str("<|im_end|>\n");
                }
                for m in messages {
                    out.push_str("<|im_start|>");
                    out.push_str(&m.role);
                    out.push('\n');
                    out.push_str(&m.content);
                    out.push_str("<|im_end|>\n");
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
                out
            }
        }
    }
}

/// A byte-level BPE tokenizer read from GGUF metadata, with the model's chat template and stop tokens.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    stop_tokens: Vec<u32>,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("stop_tokens", &self.stop_tokens)
            .field("chat", &self.chat)
            .finish()
    }
}

/// The pre-tokenizer a GGUF `tokenizer.ggml.pre` name stands for.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    // GPT-2 byte level: its own regex splits words, then bytes map to printable characters.
    let byte_level = ByteLevel::new(false, true, true);
    match pre {
        // Hugging Face `tokenizer.json` of SmolLM / StarCoder: individual digits, then GPT-2 byte level.
        "smollm" | "starcoder" | "refact" => Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ]))),
        "gpt2" | "default" => Ok(PreTokenizerWrapper::ByteLevel(byte_level)),
        other => Err(ModelError::BadMetadata {
            key: "tokenizer.ggml.pre".into(),
            reason: format!("pre-tokenizer `{other}` is not supported (supported: smollm, starcoder, refact, gpt2)"),
        }),
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from the `tokenizer.*` metadata of `content`.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let model = metadata_str(content, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.model".into(),
                reason: format!(
                    "tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
                ),
            });
        }
        let tokens = get_string_array(content, "tokenizer.ggml.tokens")?;
        let merges_raw = get_string_array(content, "tokenizer.ggml.merges")?;
        let mut merges = Vec::with_capacity(merges_raw.len());
        for m in &merges_raw {
            let (a, b) = m.split_once(' ').ok_or_else(|| ModelError::BadMetadata {
                key: "tokenizer.ggml.merges".into(),
                reason: format!("merge `{m}` has no space separator"),
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(ModelError::BadMetadata {
                key: "tokenizer.ggml.tokens".into(),
                reason: format!("{} tokens but only {} distinct", tokens.len(), vocab.len()),
            });
        }
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges);
        if let Some(unk) = get_u32_opt(content, "tokenizer.ggml.unknown_token_id")? {
            let tok = tokens
                .get(unk as usize)
                .ok_or(ModelError::TokenOutOfRange {
                    id: unk,
                    vocab: tokens.len(),
                })?;
            builder = builder.unk_token(tok.clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let mut inner = Tokenizer::new(bpe);
        let pre = match content.metadata.get("tokenizer.ggml.pre") {
            Some(v) => v
                .to_string()
                .map_err(|e| ModelError::BadMetadata {
                    key: "tokenizer.ggml.pre".into(),
                    reason: e.to_string(),
                })?
                .clone(),
            None => "gpt2".to_string(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control and user-defined tokens are matched whole in input text (`<|im_start|>` is one token).
        let mut specials = Vec::new();
        if let Some(Value::Array(types)) = content.metadata.get("tokenizer.ggml.token_type") {
            if types.len() != tokens.len() {
                return Err(ModelError::BadMetadata {
                    key: "tokenizer.ggml.token_type".into(),
                    reason: format!("{} entries for {} tokens", types.len(), tokens.len()),
                });
            }
            for (tok, ty) in tokens.iter().zip(types) {
                let ty = super::gguf::value_u32(ty, "tokenizer.ggml.token_type")?;
                if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                    specials.push(AddedToken::from(tok.clone(), true));
                }
            }
        }
        let bos = get_u32_opt(content, "tokenizer.ggml.bos_token_id")?;
        let eos = get_u32_opt(content, "tokenizer.ggml.eos_token_id")?;
        for id in [bos, eos].into_iter().flatten() {
            let tok = tokens.get(id as usize).ok_or(ModelError::TokenOutOfRange {
                id,
                vocab: tokens.len(),
            })?;
            if !specials.iter().any(|s| &s.content == tok) {
                specials.push(AddedToken::from(tok.clone(), true));
            }
        }
        inner.add_special_tokens(specials)?;

        let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().map_err(|e| ModelError::BadMetadata {
                key: "tokenizer.ggml.add_bos_token".into(),
                reason: e.to_string(),
            })?,
            None => false,
        };
        if add_bos && bos.is_none() {
            return Err(ModelError::MissingMetadata(
                "tokenizer.ggml.bos_token_id".into(),
            ));
        }

        let chat = match content.metadata.get("tokenizer.chat_template") {
            Some(v) => {
                ChatTemplate::detect(v.to_string().map_err(|e| ModelError::BadMetadata {
                    key: "tokenizer.chat_template".into(),
                    reason: e.to_string(),
                })?)
            }
            None => None,
        };

        // Generation stops at the end-of-sequence token and at the end of a chat turn.
        let mut stop_tokens: Vec<u32> = eos.into_iter().collect();
        for name in ["<|im_end|>", "<|endoftext|>"] {
            if let Some(id) = inner.token_to_id(name) {
                if !stop_tokens.contains(&id) {
                    stop_tokens.push(id);
                }
            }
        }

        Ok(Self {
            inner,
            vocab_size: tokens.len(),
            bos,
            eos,
            add_bos,
            stop_tokens,
            chat,
        })
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Beginning-of-sequence token id, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token id, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens at which generation stops.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop_tokens
    }

    /// The chat template, if the GGUF carries one this module renders.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Encodes raw text. Prepends BOS when the GGUF asks for it (`tokenizer.ggml.add_bos_token`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            // Checked in `from_gguf`: add_bos implies a BOS id.
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Encodes a chat through the model's template, opening the assistant turn.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self.chat.as_ref().ok_or_else(|| {
            ModelError::Tokenizer("the GGUF has no chat template this crate can render".into())
        })?;
        self.encode(&template.render(messages, true))
    }

    /// Encodes one user turn through the chat template.
    pub fn encode_user_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode_chat(&[ChatMessage::user(prompt)])
    }

    /// Decodes ids to text; special tokens are dropped when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: self.vocab_size,
            });
        }
        Ok(self.inner.decode(ids, skip_special)?)
    }

    /// The token id of a vocabulary entry, if present.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_detects_default_system_turn() {
        let t = ChatTemplate::detect(SMOL_TEMPLATE).expect("chatml");
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: Some(
                    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
                )
            }
        );
        let s = t.render(&[ChatMessage::user("Hi")], true);
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chatml_explicit_system_replaces_default() {
        let t = ChatTemplate::detect(SMOL_TEMPLATE).unwrap();
        let s = t.render(
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
            false,
        );
        assert_eq!(
            s,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_without_default_system() {
        let tpl = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        let t = ChatTemplate::detect(tpl).unwrap();
        assert_eq!(
            t,
            ChatTemplate::ChatMl {
                default_system: None
            }
        );
        assert_eq!(
            t.render(&[ChatMessage::user("x")], true),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn non_chatml_template_is_not_detected() {
        assert!(
            ChatTemplate::detect("{{ bos_token }}[INST] {{ message['content'] }} [/INST]")
                .is_none()
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        assert!(matches!(
            pre_tokenizer_for("qwen2"),
            Err(ModelError::BadMetadata { .. })
        ));
        assert!(pre_tokenizer_for("smollm").is_ok());
    }
}
