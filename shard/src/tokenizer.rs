//! The tokenizer: from a GGUF file's own metadata, or `tokenizer.json`.
//!
//! candle's own GGUF tokenizer does not know the `smollm` pre-tokenizer and
//! falls back to a byte-level one that adds a prefix space, which breaks
//! ChatML (`<|im_start|>system` gains a `Ġ`). SmolLM2's `tokenizer.json` splits
//! digits one by one and then applies byte-level BPE without a prefix space;
//! this file builds exactly that.

use crate::weights::ModelFile;
use crate::{Result, ShardError};
use aho_corasick::{AhoCorasick, MatchKind};
use candle_core::quantized::gguf_file;
use std::borrow::Cow;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the model's special tokens and chat template.
#[derive(Debug, Clone)]
pub struct PollenTokenizer {
    inner: Tokenizer,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
    controls: Controls,
    /// The most bytes of text one token stands for, at most ([`Self::most_bytes_per_token`]).
    most_bytes: usize,
}

/// Starts a mark left in a message's text by [`PollenTokenizer::escape_controls`]
/// (a private-use character).
const MARK: char = '\u{E000}';
/// After [`MARK`]: the character [`MARK`] itself, as the message wrote it.
const MARK_ITSELF: char = '\u{E001}';
/// After [`MARK`]: control token `i` (in [`Controls::as_text`]) is `FIRST_CONTROL + i`.
const FIRST_CONTROL: u32 = 0xE100;
/// How many control tokens the private-use characters after [`FIRST_CONTROL`] can name.
const MOST_CONTROLS: usize = 0xF8FF - 0xE100 + 1;

/// The control tokens (`<|im_start|>`, `<|im_end|>`: those that structure a prompt; type 3
/// in GGUF, `special` in `tokenizer.json`), so that their texts written inside a message
/// can be kept as plain text. User-defined tokens (GGUF type 4, such as `<think>` or a
/// tool-call marker) are what a message may carry, and stay matched.
#[derive(Debug, Clone)]
struct Controls {
    /// Finds the control tokens' texts, then [`MARK`] (the last pattern), leftmost
    /// longest.
    finder: AhoCorasick,
    /// Each control token's text tokenized as plain text, in the finder's order.
    as_text: Vec<Vec<u32>>,
}

impl Controls {
    /// The control tokens `texts` of `inner`.
    fn new(inner: &mut Tokenizer, texts: Vec<String>) -> Result<Self> {
        let mut texts: Vec<String> = texts
            .into_iter()
            .filter(|t| !t.is_empty() && !t.contains(MARK))
            .collect();
        texts.sort();
        texts.dedup();
        texts.truncate(MOST_CONTROLS);
        inner.set_encode_special_tokens(true);
        let as_text = texts
            .iter()
            .map(|t| {
                inner
                    .encode(t.as_str(), false)
                    .map(|e| e.get_ids().to_vec())
            })
            .collect::<std::result::Result<Vec<_>, _>>();
        inner.set_encode_special_tokens(false);
        let as_text = as_text.map_err(tok_err)?;
        texts.push(MARK.to_string());
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(tok_err)?;
        Ok(Self { finder, as_text })
    }
}

fn tok_err(e: impl std::fmt::Display) -> ShardError {
    ShardError::Tokenizer(e.to_string())
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| ShardError::Tokenizer(format!("GGUF metadata key `{key}` is missing")))
}

fn string_array(v: &gguf_file::Value, key: &str) -> Result<Vec<String>> {
    v.to_vec()
        .map_err(|_| ShardError::Tokenizer(format!("`{key}` is not an array")))?
        .iter()
        .map(|s| {
            s.to_string()
                .cloned()
                .map_err(|_| ShardError::Tokenizer(format!("`{key}` holds a non-string")))
        })
        .collect()
}

fn as_u32(v: &gguf_file::Value) -> Option<u32> {
    use gguf_file::Value as V;
    match v {
        V::U8(x) => Some(u32::from(*x)),
        V::I8(x) => u32::try_from(*x).ok(),
        V::U16(x) => Some(u32::from(*x)),
        V::I16(x) => u32::try_from(*x).ok(),
        V::U32(x) => Some(*x),
        V::I32(x) => u32::try_from(*x).ok(),
        V::U64(x) => u32::try_from(*x).ok(),
        V::I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        // SmolLM2's tokenizer.json: digits one by one, then GPT-2 byte level.
        "smollm" | "smollm2" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => {
            let split = Split::new(
                SplitPattern::Regex(REGEX_LLAMA3.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        _ => byte_level.into(),
    })
}

impl PollenTokenizer {
    /// The tokenizer of an opened model.
    pub fn from_model(file: &ModelFile) -> Result<Self> {
        if let Some(ct) = file.gguf_content() {
            return Self::from_gguf(ct);
        }
        let path = file
            .tokenizer_json_path()
            .ok_or_else(|| ShardError::Tokenizer("the model has no tokenizer".into()))?;
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| ShardError::Tokenizer(format!("{}: {e}", path.display())))?;
        let template = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("chat_template")?.as_str().map(str::to_string));
        let controls = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        // No bound on the text a token stands for: a tokenizer.json's added tokens may
        // strip whitespace around them, its normalizer delete text, its unknown token
        // stand for a run of anything.
        Self::with_inner(inner, template, controls, false)
    }

    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let model = meta(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(tok_err)?
            .to_ascii_lowercase();
        if model != "gpt2" {
            return Err(ShardError::Tokenizer(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = string_array(meta(ct, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let merges = string_array(meta(ct, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ShardError::Tokenizer(format!("bad merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "gpt2".into());
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let mut controls = Vec::new();
        if let Some(types) = ct
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
        {
            controls = types
                .iter()
                .enumerate()
                .filter(|(_, t)| as_u32(t) == Some(3))
                .filter_map(|(i, _)| tokens.get(i).cloned())
                .collect();
            let specials: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, t)| matches!(as_u32(t), Some(3) | Some(4)))
                .filter_map(|(i, _)| tokens.get(i))
                .map(|t| AddedToken::from(t.clone(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(tok_err)?;
        }
        let template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let mut tok = Self::with_inner(inner, template, controls, true)?;
        if let Some(eos) = ct
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(as_u32)
            && !tok.stop_ids.contains(&eos)
        {
            tok.stop_ids.push(eos);
        }
        Ok(tok)
    }

    /// `bounded`: the byte-level BPE built here from GGUF metadata, whose tokens stand
    /// for at most their own text ([`Self::most_bytes_per_token`]).
    fn with_inner(
        mut inner: Tokenizer,
        chat_template: Option<String>,
        controls: Vec<String>,
        bounded: bool,
    ) -> Result<Self> {
        let stop_ids = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"]
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .collect();
        let controls = Controls::new(&mut inner, controls)?;
        // A byte-level token's text in the vocabulary is at least as long in bytes as
        // the text it stands for (each byte spelt with one character of one or two
        // bytes); an added token is its own text. (A control token a message wrote
        // stands for its mark: two characters, eight bytes at most.)
        let longest = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(8);
        let most_bytes = if bounded && inner.get_normalizer().is_none() {
            longest
        } else {
            usize::MAX
        };
        Ok(Self {
            inner,
            most_bytes,
            stop_ids,
            chat_template,
            controls,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`)
    /// become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The most bytes of text one token of this tokenizer stands for: a text of `n`
    /// bytes has at least `n / most_bytes_per_token()` tokens, so one too long for a
    /// context can be refused before it is tokenized (tokenizing takes a few hundred
    /// bytes of memory a byte of text). `usize::MAX` where no bound is known (a model's
    /// own tokenizer.json).
    pub fn most_bytes_per_token(&self) -> usize {
        self.most_bytes
    }

    /// `text` (a message of a conversation) with the control tokens' texts it holds
    /// (`<|im_end|>`) marked, so that [`Self::encode_escaped`] keeps them plain text:
    /// a message cannot end its turn or open another. Rendered through a chat template,
    /// the marks go wherever the message goes.
    pub fn escape_controls<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let finder = &self.controls.finder;
        if !finder.is_match(text) {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len() + 8);
        finder.replace_all_with(text, &mut out, |m, _, dst| {
            let i = m.pattern().as_usize();
            let named = u32::try_from(i)
                .ok()
                .filter(|_| i < self.controls.as_text.len())
                .and_then(|i| char::from_u32(FIRST_CONTROL + i));
            dst.push(MARK);
            dst.push(named.unwrap_or(MARK_ITSELF));
            true
        });
        Cow::Owned(out)
    }

    /// Token ids of `text` (a prompt rendered from messages that went through
    /// [`Self::escape_controls`]): control tokens written by the template become their
    /// ids, those the messages wrote become the ids of their characters.
    pub fn encode_escaped(&self, text: &str) -> Result<Vec<u32>> {
        if !text.contains(MARK) {
            return self.encode(text);
        }
        let mut ids = Vec::new();
        let mut plain = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != MARK {
                plain.push(c);
                continue;
            }
            let next = chars.peek().copied();
            let control = next
                .and_then(|n| u32::from(n).checked_sub(FIRST_CONTROL))
                .and_then(|i| self.controls.as_text.get(usize::try_from(i).ok()?));
            if let Some(as_text) = control {
                chars.next();
                if !plain.is_empty() {
                    ids.extend(self.encode(&plain)?);
                    plain.clear();
                }
                ids.extend_from_slice(as_text);
            } else {
                if next == Some(MARK_ITSELF) {
                    chars.next();
                }
                // A mark the template wrote itself stays text.
                plain.push(MARK);
            }
        }
        if !plain.is_empty() {
            ids.extend(self.encode(&plain)?);
        }
        Ok(ids)
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokens that end a generation (end of turn, end of text).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The chat template the model file carries, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns generated ids into text as they come, holding back incomplete UTF-8.
#[derive(Debug, Default, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    prev_index: usize,
    current_index: usize,
}

impl TextStream {
    /// A stream with nothing decoded yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes, if any.
    pub fn push(&mut self, tok: &PollenTokenizer, id: u32) -> Result<Option<String>> {
        let prev_text = tok.decode(&self.ids[self.prev_index..self.current_index])?;
        self.ids.push(id);
        let text = tok.decode(&self.ids[self.prev_index..])?;
        if text.len() > prev_text.len() && !text.ends_with('\u{fffd}') {
            let new = text.get(prev_text.len()..).unwrap_or_default().to_string();
            self.prev_index = self.current_index;
            self.current_index = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end.
    pub fn finish(&mut self, tok: &PollenTokenizer) -> Result<Option<String>> {
        let prev_text = tok.decode(&self.ids[self.prev_index..self.current_index])?;
        let text = tok.decode(&self.ids[self.prev_index..])?;
        self.prev_index = self.ids.len();
        self.current_index = self.ids.len();
        Ok((text.len() > prev_text.len())
            .then(|| text.get(prev_text.len()..).unwrap_or_default().to_string()))
    }
}
