//! Evaluation data: the State of the Union corpus and passkey-retrieval prompts.
//!
//! Owns: locating the fetched assets (`assets/` from `scripts/fetch-assets.sh`), reading the SOTU
//! speeches (`assets/sotu/<year>_<president>_<party>.txt`), and building passkey trials — a 5-digit
//! number hidden at a chosen depth of SOTU filler, asked for at the end through the chat template.
//! Must never: download data, or draw randomness from anywhere but the explicit seed it is given
//! (trials are reproducible bit for bit).

use std::path::{Path, PathBuf};

use super::error::{ModelError, Result};
use super::tokenizer::{ChatMessage, GgufTokenizer};

/// File name of the model inside the assets folder.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the fetched assets are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    /// The assets folder.
    pub root: PathBuf,
}

impl Assets {
    /// `$KVTIER_ASSETS` if set, else `<crate root>/assets` (the folder `scripts/fetch-assets.sh` fills).
    pub fn locate() -> Self {
        let root = std::env::var_os("KVTIER_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"));
        Self { root }
    }

    /// The SmolLM2 GGUF path.
    pub fn model(&self) -> PathBuf {
        self.root.join(MODEL_FILE)
    }

    /// The SOTU speeches folder.
    pub fn sotu(&self) -> PathBuf {
        self.root.join("sotu")
    }

    /// Whether both the model and the corpus are present.
    pub fn available(&self) -> bool {
        self.model().is_file() && self.sotu().is_dir()
    }
}

/// One State of the Union speech.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speech {
    /// Year of delivery.
    pub year: u32,
    /// File stem, e.g. `2021_joseph_r_biden_d`.
    pub name: String,
    /// Full text.
    pub text: String,
}

fn io_err(path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads every `<year>_*.txt` speech in `dir`, sorted by file name (so by year).
pub fn load_speeches(dir: &Path) -> Result<Vec<Speech>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("txt") {
            continue;
        }
        let Some(name) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let Some(year) = name.split('_').next().and_then(|y| y.parse::<u32>().ok()) else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        out.push(Speech { year, name, text });
    }
    if out.is_empty() {
        return Err(ModelError::InvalidArgument {
            what: "sotu dir",
            reason: format!("no <year>_*.txt speeches in {}", dir.display()),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The speech of `year` whose file name contains `who` (e.g. `2021`, `biden`).
pub fn find_speech(dir: &Path, year: u32, who: &str) -> Result<Speech> {
    let who = who.to_lowercase();
    load_speeches(dir)?
        .into_iter()
        .find(|s| s.year == year && s.name.contains(&who))
        .ok_or_else(|| ModelError::InvalidArgument {
            what: "speech",
            reason: format!("no {year} speech by `{who}` in {}", dir.display()),
        })
}

/// The most recent of `speeches` (as [`load_speeches`] orders them) with at least `len` tokens,
/// as its name and token ids; speeches are encoded lazily, newest first, until one is long enough.
pub fn latest_with_tokens(
    speeches: &[Speech],
    tokenizer: &GgufTokenizer,
    len: usize,
) -> Result<(String, Vec<u32>)> {
    for s in speeches.iter().rev() {
        let ids = tokenizer.encode(&s.text)?;
        if ids.len() >= len {
            return Ok((s.name.clone(), ids));
        }
    }
    Err(ModelError::InvalidArgument {
        what: "speech",
        reason: format!("no speech has {len} tokens"),
    })
}

/// A tiny deterministic generator (SplitMix64), so trials depend only on their seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: bias below 2^-64 * n, irrelevant here.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// One passkey-retrieval trial, tokenised in two chunks.
#[derive(Debug, Clone)]
pub struct PasskeyTrial {
    /// The hidden number (5 digits).
    pub passkey: u32,
    /// Requested depth of the needle in the filler, in `[0, 1]`.
    pub depth: f64,
    /// Chat header, instruction, filler with the needle: fed as one exact prefill.
    pub context: Vec<u32>,
    /// The question and the opening of the assistant turn: fed after the context, so it attends over
    /// the context as the cache stores it.
    pub question: Vec<u32>,
    /// Token index (in `context`) where the needle sentence starts.
    pub needle_token: usize,
}

impl PasskeyTrial {
    /// Total prompt tokens.
    pub fn len(&self) -> usize {
        self.context.len() + self.question.len()
    }
    /// Whether the prompt is empty (never, for a built trial).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether `answer` contains the passkey as a whole 5-digit number.
    pub fn is_correct(&self, answer: &str) -> bool {
        first_number(answer) == Some(self.passkey)
    }
}

/// The first run of ASCII digits in `s`, if it parses as a u32.
pub fn first_number(s: &str) -> Option<u32> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let digits: String = s[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

const PASSKEY_INTRO: &str =
    "There is an important pass key hidden inside a lot of irrelevant text. \
Find it and memorize it. I will quiz you about the pass key.";
const PASSKEY_QUESTION: &str = "What is the pass key?";
const PASSKEY_ANSWER_PREFIX: &str = "The pass key is";

/// Builds passkey trials over a fixed filler text.
#[derive(Debug, Clone)]
pub struct PasskeyBuilder {
    filler: Vec<u32>,
}

impl PasskeyBuilder {
    /// `filler` is tokenised once (concatenate several speeches for long contexts).
    pub fn new(tokenizer: &GgufTokenizer, filler: &str) -> Result<Self> {
        let filler = tokenizer.encode(filler)?;
        if filler.len() < 64 {
            return Err(ModelError::InvalidArgument {
                what: "filler",
                reason: format!("{} tokens; need at least 64", filler.len()),
            });
        }
        Ok(Self { filler })
    }

    /// Filler tokens available.
    pub fn filler_tokens(&self) -> usize {
        self.filler.len()
    }

    /// One trial of about `context_tokens` prompt tokens with the needle at `depth` of the filler.
    /// The passkey and the filler window are drawn from `rng`.
    pub fn trial(
        &self,
        tokenizer: &GgufTokenizer,
        context_tokens: usize,
        depth: f64,
        rng: &mut SplitMix64,
    ) -> Result<PasskeyTrial> {
        if !(0.0..=1.0).contains(&depth) {
            return Err(ModelError::InvalidArgument {
                what: "depth",
                reason: format!("{depth} not in [0, 1]"),
            });
        }
        let passkey = 10_000 + rng.below(90_000) as u32;
        let needle =
            format!(" The pass key is {passkey}. Remember it. {passkey} is the pass key. ");
        let needle_ids = tokenizer.encode(&needle)?;

        // Render the chat around a placeholder to learn the fixed overhead of the template.
        let template = tokenizer.chat_template().ok_or_else(|| {
            ModelError::Tokenizer("the GGUF has no chat template this crate can render".into())
        })?;
        // The template copies message content verbatim, so a NUL placeholder splits the render into
        // the part before the filler (header + instruction) and after it (question + answer
        // opening).
        let split = |content: String, generation: bool| -> Result<(String, String)> {
            let full = template.render(&[ChatMessage::user(content)], generation);
            let at = full.find('\u{0}').ok_or_else(|| {
                ModelError::Tokenizer("chat template dropped the message content".into())
            })?;
            Ok((full[..at].to_string(), full[at + 1..].to_string()))
        };
        let (head, _) = split(format!("{PASSKEY_INTRO}\n\n\u{0}"), false)?;
        let (_, tail) = split(format!("\u{0}\n\n{PASSKEY_QUESTION}"), true)?;
        let question = format!("{tail}{PASSKEY_ANSWER_PREFIX}");
        let head_ids = tokenizer.encode(&head)?;
        let question_ids = tokenizer.encode(&question)?;
        let overhead = head_ids.len() + needle_ids.len() + question_ids.len();
        let filler_len = context_tokens.checked_sub(overhead).filter(|&f| f >= 16).ok_or_else(|| {
            ModelError::InvalidArgument {
                what: "context_tokens",
                reason: format!("{context_tokens} leaves no room for filler (template + needle take {overhead})"),
            }
        })?;
        if filler_len > self.filler.len() {
            return Err(ModelError::InvalidArgument {
                what: "context_tokens",
                reason: format!(
                    "needs {filler_len} filler tokens, have {}",
                    self.filler.len()
                ),
            });
        }
        let start = rng.below((self.filler.len() - filler_len + 1) as u64) as usize;
        let window = &self.filler[start..start + filler_len];
        let cut = (depth * filler_len as f64).round() as usize;

        let mut context = head_ids;
        context.extend_from_slice(&window[..cut]);
        let needle_token = context.len();
        context.extend_from_slice(&needle_ids);
        context.extend_from_slice(&window[cut..]);
        Ok(PasskeyTrial {
            passkey,
            depth,
            context,
            question: question_ids,
            needle_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = SplitMix64::new(1);
        let xs: Vec<u64> = (0..1000).map(|_| r.below(10)).collect();
        assert!(xs.iter().all(|&x| x < 10));
        assert!((0..10).all(|d| xs.contains(&d)));
    }

    #[test]
    fn first_number_parses_first_digit_run() {
        assert_eq!(first_number(" 12345. Remember"), Some(12345));
        assert_eq!(first_number("is 123-45"), Some(123));
        assert_eq!(first_number("none"), None);
    }

    #[test]
    fn load_speeches_reads_and_sorts() {
        let dir = std::env::temp_dir().join(format!("kvtier-corpus-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("2021_joseph_r_biden_d.txt"), "b").unwrap();
        std::fs::write(dir.join("1790_george_washington_n.txt"), "a").unwrap();
        std::fs::write(dir.join("README.md"), "x").unwrap();
        let s = load_speeches(&dir).unwrap();
        assert_eq!(s.iter().map(|s| s.year).collect::<Vec<_>>(), [1790, 2021]);
        assert_eq!(find_speech(&dir, 2021, "Biden").unwrap().text, "b");
        assert!(find_speech(&dir, 2021, "lincoln").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
