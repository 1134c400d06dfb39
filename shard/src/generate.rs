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

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EndOfTurn => "the model ended its turn",
            Self::Length => "the token limit was reached",
            Self::StopString => "a stop string appeared",
            Self::Cancelled => "cancelled",
        })
    }
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
#[derive(Debug)]
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

/// What one [`Generator::feed`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Text to show now (may be empty while a multi-byte character or a possible stop
    /// string is held back); generation goes on with [`Generator::next_input`].
    Text(String),
    /// Generation ended; the last text to show and why it ended.
    Done(String, StopReason),
}

/// Generation one step at a time: sync math only, so that the caller decides how the
/// blocks run (in this process, or across a swarm with async I/O in between).
///
/// Loop: [`Generator::next_input`] gives the hidden states to run through every block and
/// their position; the blocks' output goes to [`Generator::feed`], which samples the next
/// token and returns its text. [`Generator::finish`] gives the result. The generator holds
/// no reference to the model's ends or tokenizer; they are passed to each call, so it can
/// move between threads.
#[derive(Debug)]
pub struct Generator {
    prompt: Vec<u32>,
    chunk: usize,
    fed_prompt: usize,
    params: GenerateParams,
    sampler: Sampler,
    context: Vec<u32>,
    tokens: Vec<u32>,
    stream: TextStream,
    filter: StopFilter,
    text: String,
    pos: usize,
    next: Option<u32>,
    /// Every input handed out so far: its position and token ids.
    inputs: Vec<(usize, Vec<u32>)>,
    stop: Option<StopReason>,
    started: Instant,
    prefill_time: Option<Duration>,
    decode_started: Option<Instant>,
}

impl Generator {
    /// A generation of `prompt` token ids with `params`.
    pub fn new(prompt: &[u32], params: &GenerateParams) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ShardError::BadInput("the prompt is empty".into()));
        }
        let chunk = if params.prefill_chunk == 0 {
            prompt.len()
        } else {
            params.prefill_chunk
        };
        Ok(Self {
            prompt: prompt.to_vec(),
            chunk,
            fed_prompt: 0,
            params: params.clone(),
            sampler: Sampler::new(params.sampling.clone()),
            context: prompt.to_vec(),
            tokens: Vec::new(),
            stream: TextStream::new(),
            filter: StopFilter {
                stops: params.stop_strings.clone(),
                pending: String::new(),
            },
            text: String::new(),
            pos: 0,
            next: None,
            inputs: Vec::new(),
            stop: None,
            started: Instant::now(),
            prefill_time: None,
            decode_started: None,
        })
    }

    /// Whether the output of the next input is only a prompt chunk whose logits are not
    /// needed (every prefill chunk but the last).
    pub fn input_is_inner_chunk(&self) -> bool {
        self.fed_prompt + self.chunk < self.prompt.len()
    }

    /// The hidden states `(1, n, hidden)` to run through every block next, and the
    /// position of their first token; `None` once generation has ended.
    pub fn next_input(&mut self, ends: &ClientEnds) -> Result<Option<(Tensor, usize)>> {
        if self.stop.is_some() {
            return Ok(None);
        }
        if self.fed_prompt < self.prompt.len() {
            let end = (self.fed_prompt + self.chunk).min(self.prompt.len());
            let ids = &self.prompt[self.fed_prompt..end];
            let hidden = ends.embed(ids)?;
            let pos = self.pos;
            self.inputs.push((pos, ids.to_vec()));
            self.pos = end;
            self.fed_prompt = end;
            return Ok(Some((hidden, pos)));
        }
        let Some(next) = self.next else {
            return Err(ShardError::BadInput(
                "next_input called twice without feed".into(),
            ));
        };
        let pos = self.pos;
        self.pos += 1;
        self.inputs.push((pos, vec![next]));
        Ok(Some((ends.embed(&[next])?, pos)))
    }

    /// Takes the blocks' output for the last input (every row, or only the last row: the
    /// head reads the last), samples the next token and returns its text.
    pub fn feed(
        &mut self,
        ends: &ClientEnds,
        tok: &PollenTokenizer,
        output: &Tensor,
    ) -> Result<Step> {
        if let Some(stop) = self.stop {
            return Ok(Step::Done(String::new(), stop));
        }
        if self.fed_prompt < self.prompt.len() {
            // An inner prefill chunk: its output only filled the caches.
            return Ok(Step::Text(String::new()));
        }
        let logits = ends.logits(output)?.to_vec1::<f32>()?;
        if logits.iter().any(|x| !x.is_finite()) {
            return Err(ShardError::Pipeline(
                "the blocks returned hidden states that give non-finite logits".into(),
            ));
        }
        let next = self.sampler.sample(&logits, &self.context);
        if self.prefill_time.is_none() {
            self.prefill_time = Some(self.started.elapsed());
            self.decode_started = Some(Instant::now());
        }
        if self.tokens.len() >= self.params.max_tokens {
            return self.end_with(tok, StopReason::Length);
        }
        if tok.stop_ids().contains(&next) {
            return self.end_with(tok, StopReason::EndOfTurn);
        }
        self.tokens.push(next);
        self.context.push(next);
        self.next = Some(next);
        let mut out = String::new();
        if let Some(piece) = self.stream.push(tok, next)? {
            let (safe, hit) = self.filter.push(&piece);
            out = safe;
            self.text.push_str(&out);
            if hit {
                self.stop = Some(StopReason::StopString);
                return Ok(Step::Done(out, StopReason::StopString));
            }
        }
        if self.tokens.len() >= self.params.max_tokens
            && let Step::Done(rest, stop) = self.end_with(tok, StopReason::Length)?
        {
            out.push_str(&rest);
            return Ok(Step::Done(out, stop));
        }
        Ok(Step::Text(out))
    }

    /// Every input handed out by [`Generator::next_input`] so far, in order: its position
    /// and token ids. Running them again, in these same chunks, through fresh blocks
    /// brings those blocks to the state the original ones had, bit for bit (same shapes,
    /// same positions, same arithmetic): the replay that heals a broken route.
    pub fn inputs(&self) -> &[(usize, Vec<u32>)] {
        &self.inputs
    }

    /// Ends the generation early (the caller stopped reading); the held-back text is
    /// dropped.
    pub fn cancel(&mut self) {
        if self.stop.is_none() {
            self.stop = Some(StopReason::Cancelled);
        }
    }

    /// Ends with `stop`, flushing the text held back by the decoder and the stop filter.
    fn end_with(&mut self, tok: &PollenTokenizer, mut stop: StopReason) -> Result<Step> {
        let mut out = String::new();
        if let Some(piece) = self.stream.finish(tok)? {
            let (safe, hit) = self.filter.push(&piece);
            out.push_str(&safe);
            if hit {
                stop = StopReason::StopString;
            }
        }
        if stop != StopReason::StopString {
            out.push_str(&self.filter.finish());
        }
        self.text.push_str(&out);
        self.stop = Some(stop);
        Ok(Step::Done(out, stop))
    }

    /// The result so far (complete once a [`Step::Done`] was returned).
    pub fn finish(&self) -> Generation {
        let prefill_time = self.prefill_time.unwrap_or_else(|| self.started.elapsed());
        Generation {
            prompt_tokens: self.prompt.len(),
            tokens: self.tokens.clone(),
            text: self.text.clone(),
            stop: self.stop.unwrap_or(StopReason::Cancelled),
            prefill_time,
            decode_time: self.decode_started.map(|t| t.elapsed()).unwrap_or_default(),
        }
    }
}

/// Generates from `prompt` token ids with every block behind `blocks`. `on_text` gets
/// each piece of text as it is decided and returns `false` to stop early.
pub fn generate(
    ends: &ClientEnds,
    tok: &PollenTokenizer,
    blocks: &mut dyn Blocks,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<Generation> {
    let mut g = Generator::new(prompt, params)?;
    while let Some((hidden, pos)) = g.next_input(ends)? {
        let out = blocks.forward(&hidden, pos)?;
        match g.feed(ends, tok, &out)? {
            Step::Text(t) => {
                if !t.is_empty() && !on_text(&t) {
                    g.cancel();
                }
            }
            Step::Done(t, _) => {
                if !t.is_empty() {
                    on_text(&t);
                }
            }
        }
    }
    Ok(g.finish())
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

/// Prompt ids for `text`, wrapped in ChatML when `chat` is set (a user message: the
/// control tokens it writes stay text, see [`PollenTokenizer::escape_controls`]).
pub fn prompt_ids(tok: &PollenTokenizer, text: &str, chat: bool) -> Result<Vec<u32>> {
    if !chat {
        return tok.encode(text);
    }
    let message = Message::new("user", &tok.escape_controls(text));
    tok.encode_escaped(&render_chatml(tok, &[message]))
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
