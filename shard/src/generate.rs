//! Generation: prompt in, text out, token by token.
//!
//! The loop is the same whether the blocks run in this process or across a
//! swarm: it only needs something that implements [`Blocks`].

use crate::chat::{Message, render_chatml};
use crate::llama::{BlockSpan, CacheLimits, ClientEnds, LoadOptions, SpanCache};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{PollenTokenizer, TextStream};
use crate::weights::ModelFile;
use crate::{Result, ShardError};
use candle_core::Tensor;
use std::path::Path;
use std::time::{Duration, Instant};

/// Runs hidden states through every block of the model, keeping its caches.
pub trait Blocks {
    /// Hidden states `(1, n, hidden)` at positions `pos..pos+n` in, the
    /// last block's output out.
    fn forward(&mut self, hidden: &Tensor, pos: usize) -> Result<Tensor>;
}

/// All blocks in this process, with one session's cache.
#[derive(Debug)]
pub struct LocalBlocks<'a> {
    span: &'a BlockSpan,
    cache: SpanCache,
}

impl<'a> LocalBlocks<'a> {
    /// A new session over `span`.
    pub fn new(span: &'a BlockSpan, limits: CacheLimits) -> Self {
        Self {
            cache: span.new_cache(limits),
            span,
        }
    }
}

impl Blocks for LocalBlocks<'_> {
    fn forward(&mut self, hidden: &Tensor, pos: usize) -> Result<Tensor> {
        self.span.forward(hidden, pos, &mut self.cache)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Stop when the text contains any of these (they are not printed).
    pub stop_strings: Vec<String>,
    /// Split the prompt into prefill chunks of at most this many tokens (0 = one chunk).
    pub prefill_chunk: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop_strings: Vec::new(),
            prefill_chunk: 0,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model ended its turn.
    EndOfTurn,
    /// `max_tokens` were generated.
    Length,
    /// A stop string appeared.
    StopString,
    /// The caller asked to stop.
    Cancelled,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Generated token ids (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why it ended.
    pub stop: StopReason,
    /// Time to run the prompt and pick the first token.
    pub prefill_time: Duration,
    /// Time of the decode steps after the first token.
    pub decode_time: Duration,
}

impl Generation {
    /// Decode steps per second.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }

    /// Prompt tokens per second.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
}

/// Holds back text that might be the start of a stop string.
struct StopFilter {
    stops: Vec<String>,
    pending: String,
}

impl StopFilter {
    /// Adds text; returns what is safe to print, and whether a stop string was hit.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(idx) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..idx].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Generates from `prompt` token ids. `on_text` gets each piece of text as it
/// is decided and returns `false` to stop early.
pub fn generate(
    ends: &ClientEnds,
    tok: &PollenTokenizer,
    blocks: &mut dyn Blocks,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(ShardError::BadInput("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut context: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut stream = TextStream::new();
    let mut filter = StopFilter {
        stops: params.stop_strings.clone(),
        pending: String::new(),
    };
    let mut text = String::new();
    let mut emit = |piece: &str, text: &mut String| -> bool {
        if piece.is_empty() {
            return true;
        }
        text.push_str(piece);
        on_text(piece)
    };

    let started = Instant::now();
    let chunk = if params.prefill_chunk == 0 {
        prompt.len()
    } else {
        params.prefill_chunk
    };
    let mut pos = 0;
    let mut last = None;
    for piece in prompt.chunks(chunk) {
        let hidden = ends.embed(piece)?;
        last = Some(blocks.forward(&hidden, pos)?);
        pos += piece.len();
    }
    let last = last.ok_or_else(|| ShardError::BadInput("the prompt is empty".into()))?;
    let logits = ends.logits(&last)?.to_vec1::<f32>()?;
    let mut next = sampler.sample(&logits, &context);
    let prefill_time = started.elapsed();
    let decode_started = Instant::now();
    let mut stop = StopReason::Length;
    while tokens.len() < params.max_tokens {
        if tok.stop_ids().contains(&next) {
            stop = StopReason::EndOfTurn;
            break;
        }
        tokens.push(next);
        context.push(next);
        if let Some(piece) = stream.push(tok, next)? {
            let (out, hit) = filter.push(&piece);
            if !emit(&out, &mut text) {
                stop = StopReason::Cancelled;
                break;
            }
            if hit {
                stop = StopReason::StopString;
                break;
            }
        }
        if tokens.len() >= params.max_tokens {
            break;
        }
        let hidden = ends.embed(&[next])?;
        let out = blocks.forward(&hidden, pos)?;
        pos += 1;
        let logits = ends.logits(&out)?.to_vec1::<f32>()?;
        next = sampler.sample(&logits, &context);
    }
    if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
        if let Some(piece) = stream.finish(tok)? {
            let (out, hit) = filter.push(&piece);
            emit(&out, &mut text);
            if hit {
                stop = StopReason::StopString;
            }
        }
        if stop != StopReason::StopString {
            let rest = filter.finish();
            emit(&rest, &mut text);
        }
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        text,
        stop,
        prefill_time,
        decode_time: decode_started.elapsed(),
    })
}

/// The whole model in one process: client ends, every block, tokenizer.
#[derive(Debug)]
pub struct LocalModel {
    /// Embeddings, final norm and head.
    pub ends: ClientEnds,
    /// Every block.
    pub span: BlockSpan,
    /// The tokenizer.
    pub tokenizer: PollenTokenizer,
}

impl LocalModel {
    /// Loads everything; `progress(done, total)` counts blocks.
    pub fn load(
        path: &Path,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let file = ModelFile::open(path)?;
        let cfg = file.config()?;
        let tokenizer = PollenTokenizer::from_model(&file)?;
        let ends = ClientEnds::load(&file, opts)?;
        let span = BlockSpan::load(&file, cfg.full_range(), opts, progress)?;
        Ok(Self {
            ends,
            span,
            tokenizer,
        })
    }

    /// Prompt ids for `text`, wrapped in the chat template when `chat` is set.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        prompt_ids(&self.tokenizer, text, chat)
    }

    /// Generates a completion of `prompt`.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let limits = CacheLimits {
            max_tokens: (prompt.len() + params.max_tokens).max(1),
            ..CacheLimits::default()
        };
        let mut blocks = LocalBlocks::new(&self.span, limits);
        generate(
            &self.ends,
            &self.tokenizer,
            &mut blocks,
            prompt,
            params,
            on_text,
        )
    }
}

/// Prompt ids for `text`, wrapped in ChatML when `chat` is set.
pub fn prompt_ids(tok: &PollenTokenizer, text: &str, chat: bool) -> Result<Vec<u32>> {
    let text = if chat {
        render_chatml(tok, &[Message::new("user", text)])
    } else {
        text.to_string()
    };
    tok.encode(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_filter_holds_back_prefixes_and_cuts_at_stop() {
        let mut f = StopFilter {
            stops: vec!["\n\nUser:".into()],
            pending: String::new(),
        };
        assert_eq!(f.push("Hello"), ("Hello".into(), false));
        assert_eq!(f.push(" there\n"), (" there".into(), false));
        assert_eq!(f.push("\nUs"), (String::new(), false));
        assert_eq!(f.push("er: hi"), (String::new(), true));
        let mut f = StopFilter {
            stops: vec!["END".into()],
            pending: String::new(),
        };
        assert_eq!(f.push("EN"), (String::new(), false));
        assert_eq!(f.push("ough"), ("ENough".into(), false));
        assert_eq!(f.finish(), "");
    }
}
