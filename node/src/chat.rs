//! `pollen chat`: a conversation in the terminal, locally or through the swarm.
//!
//! Each turn renders the whole conversation with the model's chat template
//! ([`crate::chat_template`]) and streams the answer through a [`Backend`] as it is
//! generated. The conversation is kept within a token budget: when the prompt and the
//! longest answer would not fit, the oldest turns are dropped (and the user is told).
//!
//! Keys: Enter sends; Ctrl-C while an answer streams stops it and keeps what was said;
//! Ctrl-C at the prompt clears the line, and a second one at an empty prompt leaves, as
//! does Ctrl-D or `/quit`. `/reset` starts a new conversation.

use crate::backend::{Backend, BackendError, GenEvent};
use crate::backend_args::BackendArgs;
use crate::chat_template::ChatMessage;
use pollen_shard::SamplingParams;
use pollen_shard::generate::GenerateParams;
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most tokens in one answer unless `--max-tokens` says otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// `pollen chat [--bootstrap MULTIADDR]... [--local] [--max-tokens N] ...`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// The model, and where and how its blocks run.
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Seconds an answer waits for servers covering every block.
    #[arg(long, default_value_t = 20)]
    pub route_wait: u64,
    /// How answers are generated.
    #[command(flatten)]
    pub opts: ChatOptions,
}

/// Loads the model (or joins the swarm), then chats until the user leaves.
pub async fn run_cli(args: ChatArgs) -> anyhow::Result<()> {
    let prepared = args.backend.prepare()?;
    let backend = args
        .backend
        .open(prepared, Duration::from_secs(args.route_wait), 1)
        .await?;
    run(&backend, args.opts).await
}

/// How a conversation is generated (the `pollen chat` flags other than model and swarm).
#[derive(Debug, Clone, clap::Args)]
pub struct ChatOptions {
    /// Most tokens in one answer.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS, value_parser = crate::serve::sessions::cli::max_tokens)]
    pub max_tokens: usize,
    /// Tokens the whole conversation (prompt and answer) may take; the oldest turns are
    /// dropped to stay within it. Capped at the model's context; the swarm's servers
    /// hold 2048 tokens per session unless they allow more.
    #[arg(long, default_value_t = crate::serve::DEFAULT_MAX_SESSION_TOKENS, value_parser = crate::serve::sessions::cli::context_tokens)]
    pub context_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = off).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Penalty on recently generated tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed of the first answer (each later answer uses the next).
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// A system prompt (default: the model's chat template decides).
    #[arg(long)]
    pub system: Option<String>,
}

impl ChatOptions {
    fn params(&self, turn: u64, max_tokens: usize) -> GenerateParams {
        GenerateParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed.wrapping_add(turn),
                ..SamplingParams::default()
            },
            stop_strings: Vec::new(),
            prefill_chunk: 0,
        }
    }
}

/// A conversation: an optional system prompt and the turns so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    system: Option<String>,
    /// (question, answer), oldest first.
    turns: Vec<(String, String)>,
}

/// Why a question cannot be asked.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// Even alone, the question and the answer's room exceed the budget.
    #[error(
        "this question takes {prompt} tokens, and with room for a {answer}-token answer that is more than the {budget} tokens a conversation may take (--context-tokens)"
    )]
    TooLong {
        /// Tokens of the prompt with no earlier turn.
        prompt: usize,
        /// Room kept for the answer.
        answer: usize,
        /// The budget.
        budget: usize,
    },
    /// The template or the tokenizer failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl Conversation {
    /// An empty conversation with this system prompt.
    pub fn new(system: Option<String>) -> Self {
        Self {
            system,
            turns: Vec::new(),
        }
    }

    /// The turns so far, oldest first.
    pub fn turns(&self) -> &[(String, String)] {
        &self.turns
    }

    /// Forgets every turn (the system prompt stays).
    pub fn reset(&mut self) {
        self.turns.clear();
    }

    /// Records a finished (or stopped) answer to `question`.
    pub fn push(&mut self, question: String, answer: String) {
        self.turns.push((question, answer));
    }

    /// The messages of the conversation with `question` as the last one.
    pub fn messages(&self, question: &str) -> Vec<ChatMessage> {
        let mut m = Vec::with_capacity(self.turns.len() * 2 + 2);
        if let Some(s) = &self.system {
            m.push(ChatMessage::new("system", s));
        }
        for (q, a) in &self.turns {
            m.push(ChatMessage::new("user", q));
            m.push(ChatMessage::new("assistant", a));
        }
        m.push(ChatMessage::new("user", question));
        m
    }

    /// The prompt for `question`, dropping the oldest turns until it and `answer` more
    /// tokens fit in `budget`; `encode` renders messages to token ids. The prompt and how
    /// many turns were dropped.
    pub fn fit(
        &mut self,
        question: &str,
        answer: usize,
        budget: usize,
        encode: impl Fn(&[ChatMessage]) -> Result<Vec<u32>, BackendError>,
    ) -> Result<(Vec<u32>, usize), FitError> {
        // Drop as few turns as possible: find the first turn to keep by bisection, since
        // the prompt shrinks as more old turns go.
        let fits = |conv: &Conversation| -> Result<(Vec<u32>, bool), BackendError> {
            let ids = encode(&conv.messages(question))?;
            let ok = ids.len().saturating_add(answer) <= budget;
            Ok((ids, ok))
        };
        let (ids, ok) = fits(self)?;
        if ok {
            return Ok((ids, 0));
        }
        let trimmed = |keep_from: usize| Conversation {
            system: self.system.clone(),
            turns: self.turns[keep_from..].to_vec(),
        };
        let (alone, ok) = fits(&trimmed(self.turns.len()))?;
        if !ok {
            return Err(FitError::TooLong {
                prompt: alone.len(),
                answer,
                budget,
            });
        }
        // Invariant: dropping `hi` turns fits, dropping `lo` does not.
        let (mut lo, mut hi, mut best) = (0, self.turns.len(), alone);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let (ids, ok) = fits(&trimmed(mid))?;
            if ok {
                hi = mid;
                best = ids;
            } else {
                lo = mid;
            }
        }
        self.turns.drain(..hi);
        Ok((best, hi))
    }
}

/// What the user typed.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Ask(String),
    Reset,
    Quit,
    Help,
    Unknown(String),
    Empty,
}

fn parse_input(line: &str) -> Input {
    let t = line.trim();
    match t {
        "" => Input::Empty,
        "/quit" | "/exit" => Input::Quit,
        "/reset" | "/clear" => Input::Reset,
        "/help" | "/?" => Input::Help,
        c if c.starts_with('/') && !c.contains(char::is_whitespace) => {
            Input::Unknown(c.to_string())
        }
        _ => Input::Ask(t.to_string()),
    }
}

const HELP: &str = "Type a question and press Enter. Ctrl-C stops an answer; /reset starts a new conversation; /quit, Ctrl-D or Ctrl-C twice at an empty prompt leaves.";

/// How one answer ended.
enum Answer {
    Done(String),
    Stopped(String),
    Failed(String, BackendError),
}

/// Streams the answer to `prompt` to stdout until it ends or Ctrl-C.
async fn answer(
    backend: &Backend,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> Result<Answer, BackendError> {
    let cancel = CancellationToken::new();
    let mut stream = backend.start(prompt, params, cancel.clone())?;
    let mut text = String::new();
    let mut out = std::io::stdout();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            ev = stream.recv() => match ev {
                Some(GenEvent::Text(t)) => {
                    text.push_str(&t);
                    let _ = out.write_all(t.as_bytes()).and_then(|()| out.flush());
                }
                Some(GenEvent::Done(_)) => return Ok(Answer::Done(text)),
                Some(GenEvent::Error(e)) => return Ok(Answer::Failed(text, e)),
                None => return Ok(Answer::Failed(text, BackendError::Other("the generation ended without a result".into()))),
            },
            _ = &mut ctrl_c => {
                cancel.cancel();
                return Ok(Answer::Stopped(text));
            }
        }
    }
}

/// Ctrl-C at the prompt: clears a typed line; at an empty line, interrupts.
struct ClearOrInterrupt;

impl rustyline::ConditionalEventHandler for ClearOrInterrupt {
    fn handle(
        &self,
        _: &rustyline::Event,
        _: rustyline::RepeatCount,
        _: bool,
        ctx: &rustyline::EventContext,
    ) -> Option<rustyline::Cmd> {
        (!ctx.line().is_empty()).then_some(rustyline::Cmd::Kill(rustyline::Movement::WholeLine))
    }
}

/// Reads one line with the editor on a blocking thread.
async fn read_line(
    mut editor: rustyline::DefaultEditor,
    prompt: &'static str,
) -> anyhow::Result<(rustyline::DefaultEditor, rustyline::Result<String>)> {
    Ok(tokio::task::spawn_blocking(move || {
        let r = editor.readline(prompt);
        (editor, r)
    })
    .await?)
}

/// Runs the conversation until the user leaves.
pub async fn run(backend: &Backend, opts: ChatOptions) -> anyhow::Result<()> {
    let budget = opts.context_tokens.min(backend.max_seq_len()).max(1);
    if opts.max_tokens >= budget {
        anyhow::bail!(
            "--max-tokens {} leaves no room for a question in {budget} tokens of context: \
             give less (the default is {DEFAULT_MAX_TOKENS})",
            opts.max_tokens
        );
    }
    let max_tokens = opts.max_tokens.max(1);
    let mut editor = rustyline::DefaultEditor::new()?;
    editor.bind_sequence(
        rustyline::KeyEvent::ctrl('C'),
        rustyline::EventHandler::Conditional(Box::new(ClearOrInterrupt)),
    );
    let mut conv = Conversation::new(opts.system.clone());
    let mode = if backend.is_local() {
        "local"
    } else {
        "through the swarm"
    };
    println!(
        "pollen chat: {} ({mode}), {budget} tokens of context. {HELP}",
        backend.name()
    );
    let mut turn = 0u64;
    let mut interrupted = false;
    // Questions asked and answers that failed: a conversation read from a pipe or a
    // file whose answers failed ends with an error (a script sees it).
    let (mut asked, mut failed) = (0usize, 0usize);
    loop {
        let (ed, line) = read_line(editor, "> ").await?;
        editor = ed;
        use rustyline::error::ReadlineError;
        let line = match line {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => {
                // Ctrl-C at an empty prompt (a typed line is only cleared): the second
                // in a row, or the first after stopping an answer, leaves.
                if interrupted {
                    break;
                }
                interrupted = true;
                println!("(Ctrl-C again, Ctrl-D or /quit to leave)");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        interrupted = false;
        let question = match parse_input(&line) {
            Input::Empty => continue,
            Input::Quit => break,
            Input::Help => {
                println!("{HELP}");
                continue;
            }
            Input::Reset => {
                conv.reset();
                println!("(a new conversation)");
                continue;
            }
            Input::Unknown(c) => {
                println!("unknown command {c}; {HELP}");
                continue;
            }
            Input::Ask(q) => q,
        };
        let _ = editor.add_history_entry(question.as_str());
        asked += 1;
        let (prompt, dropped) =
            match conv.fit(&question, max_tokens, budget, |m| backend.chat_prompt(m)) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("error: {e}");
                    failed += 1;
                    continue;
                }
            };
        match dropped {
            0 => {}
            1 => eprintln!("(the oldest turn was dropped to fit {budget} tokens)"),
            n => eprintln!("(the {n} oldest turns were dropped to fit {budget} tokens)"),
        }
        let params = opts.params(turn, max_tokens);
        turn += 1;
        match answer(backend, prompt, params).await {
            Ok(Answer::Done(text)) => {
                println!();
                conv.push(question, text);
            }
            Ok(Answer::Stopped(text)) => {
                println!("\n(stopped; Ctrl-C again to leave)");
                conv.push(question, text);
                interrupted = true;
                continue;
            }
            Ok(Answer::Failed(text, e)) => {
                if !text.is_empty() {
                    println!();
                }
                eprintln!("error: {e}");
                failed += 1;
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    use std::io::IsTerminal;
    if failed > 0 && !std::io::stdin().is_terminal() {
        anyhow::bail!("{failed} of {asked} questions got no answer");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A token per character of every message, plus 4 a message: enough to test fitting.
    fn encode(m: &[ChatMessage]) -> Result<Vec<u32>, BackendError> {
        let n: usize = m.iter().map(|m| m.content.len() + 4).sum();
        Ok(vec![0; n])
    }

    fn conv(turns: usize) -> Conversation {
        let mut c = Conversation::new(Some("sys".into()));
        for i in 0..turns {
            c.push(format!("q{i:03}"), format!("answer {i:03}"));
        }
        c
    }

    #[test]
    fn a_conversation_that_fits_is_kept_whole() {
        let mut c = conv(3);
        let (ids, dropped) = c.fit("hello", 10, 1000, encode).unwrap();
        assert_eq!(dropped, 0);
        // sys(3+4) + 3 × (q(4+4) + a(10+4)) + hello(5+4)
        assert_eq!(ids.len(), 7 + 3 * 22 + 9);
        assert_eq!(c.turns().len(), 3);
        let m = c.messages("hello");
        assert_eq!(m.first().unwrap().role, "system");
        assert_eq!(m.last().unwrap().content, "hello");
        assert_eq!(m.len(), 1 + 6 + 1);
    }

    #[test]
    fn the_oldest_turns_go_first_and_no_more_than_needed() {
        let mut c = conv(10);
        // Whole: 7 + 220 + 9 = 236; each turn is 22. Budget 236 - 1 + room 0 drops one.
        let (ids, dropped) = c.fit("hello", 0, 235, encode).unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(ids.len(), 236 - 22);
        assert_eq!(c.turns().first().unwrap().0, "q001");
        // Room for a 100-token answer: 7 + 9 + 22 k + 100 <= 200 keeps k = 3.
        let (ids, dropped) = c.fit("hello", 100, 200, encode).unwrap();
        assert_eq!(dropped, 6);
        assert_eq!(c.turns().len(), 3);
        assert_eq!(c.turns().first().unwrap().0, "q007");
        assert!(ids.len() + 100 <= 200);
    }

    #[test]
    fn a_question_too_long_alone_is_refused_and_loses_nothing() {
        let mut c = conv(2);
        let long = "x".repeat(500);
        let e = c.fit(&long, 10, 100, encode).unwrap_err();
        assert!(matches!(e, FitError::TooLong { budget: 100, .. }), "{e}");
        assert_eq!(c.turns().len(), 2);
        c.reset();
        assert!(c.turns().is_empty());
        assert_eq!(c.messages("a").len(), 2, "the system prompt stays");
    }

    #[test]
    fn commands_are_recognised() {
        assert_eq!(parse_input("  /quit "), Input::Quit);
        assert_eq!(parse_input("/reset"), Input::Reset);
        assert_eq!(parse_input("/help"), Input::Help);
        assert_eq!(parse_input(""), Input::Empty);
        assert_eq!(parse_input("/nope"), Input::Unknown("/nope".into()));
        // A path or a sentence starting with a slash is a question.
        assert_eq!(
            parse_input("/usr/bin is where?"),
            Input::Ask("/usr/bin is where?".into())
        );
        assert_eq!(parse_input(" hi there "), Input::Ask("hi there".into()));
    }
}
