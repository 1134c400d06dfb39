//! One way to generate for the API and the terminal chat: a whole model in this process
//! (`--local`) or a long-lived [`SwarmClient`].
//!
//! [`Backend::start`] begins a generation and returns a [`GenStream`] of
//! [`GenEvent`]s through a bounded channel. Generations run concurrently, each with its
//! own session (its own KV cache locally, its own swarm session on every server of its
//! route). Dropping the stream, or cancelling the token given to `start`, stops the
//! generation: a swarm generation's session is dropped at once, which closes its streams,
//! and every server of the route frees it.

use crate::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use crate::client::{ClientConfig, ClientError, SwarmClient};
use pollen_protocol::{ErrorCode, ModelId};
use pollen_shard::generate::{GenerateParams, Generation};
use pollen_shard::{LoadOptions, LocalModel, ModelFile, PollenTokenizer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Pieces of text a generation's reader may have waiting; past them the text waits,
/// joined, in the generation's `Outbox` (the generation never pauses for its reader).
const EVENT_BUFFER: usize = 64;

/// How long a generation waits for a reader that takes nothing while its buffer is full
/// (a client that stopped reading a streamed answer, its TCP window shut) before it
/// ends and frees its slot and session.
pub const READER_STALL: Duration = Duration::from_secs(30);

/// Since when a generation's reader has left its buffer full, if it has: past
/// [`READER_STALL`] the generation gives up on it.
#[derive(Debug, Default)]
struct Stall(Option<std::time::Instant>);

impl Stall {
    /// Notes a send that found the buffer full (`full`) or went through; `false` once
    /// the reader has taken nothing for `within`.
    fn bearable(&mut self, full: bool, within: Duration) -> bool {
        if !full {
            self.0 = None;
            return true;
        }
        let since = *self.0.get_or_insert_with(std::time::Instant::now);
        since.elapsed() < within
    }
}

/// A generation's text on its way to the reader, without ever waiting for it: text the
/// buffer has no room for waits here (at most the answer's length) and goes first
/// next time, so a slow reader never slows the generation (which ends, and frees its
/// slot, at its own speed); a reader that takes nothing for [`READER_STALL`] ends it.
#[derive(Debug, Default)]
struct Outbox {
    pending: String,
    stall: Stall,
    gave_up: bool,
}

impl Outbox {
    /// Offers `text`; `false` (the generation is to stop) once the reader is gone or
    /// has taken nothing for [`READER_STALL`], or `cancel` fired.
    fn offer(
        &mut self,
        tx: &mpsc::Sender<GenEvent>,
        text: &str,
        cancel: &CancellationToken,
    ) -> bool {
        if tx.is_closed() || cancel.is_cancelled() {
            self.gave_up = true;
            return false;
        }
        self.pending.push_str(text);
        let go_on = match tx.try_send(GenEvent::Text(std::mem::take(&mut self.pending))) {
            Ok(()) => self.stall.bearable(false, READER_STALL),
            Err(mpsc::error::TrySendError::Full(GenEvent::Text(t))) => {
                self.pending = t;
                self.stall.bearable(true, READER_STALL)
            }
            Err(_) => false,
        };
        self.gave_up |= !go_on;
        go_on
    }
}

/// What went wrong, in the categories an API answers with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The prompt (with the tokens asked for) does not fit the model or the route.
    #[error("{0}")]
    PromptTooLong(String),
    /// The request itself is wrong (an empty prompt, a conversation the template refuses).
    #[error("{0}")]
    BadRequest(String),
    /// The swarm has no chain of servers covering every block (or cannot be reached).
    #[error("{0}")]
    NoBlocks(String),
    /// Too many generations at once, here or on the servers.
    #[error("{0}")]
    Busy(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<ClientError> for BackendError {
    fn from(e: ClientError) -> Self {
        let text = e.to_string();
        match &e {
            ClientError::NoRoute { .. } | ClientError::NoEntry(_) => Self::NoBlocks(text),
            // A server holds fewer tokens per session than the request needs.
            ClientError::HopFailed(f)
                if f.code == ErrorCode::OverBudget
                    && f.message.starts_with(crate::client::check::SESSION_CAP) =>
            {
                Self::PromptTooLong(text)
            }
            // Refused for want of memory or session room (the prompt was checked against
            // the model's context already): the servers are busy.
            ClientError::HopFailed(f)
                if matches!(f.code, ErrorCode::Busy | ErrorCode::OverBudget) =>
            {
                Self::Busy(text)
            }
            ClientError::Model(pollen_shard::ShardError::BadInput(_)) => Self::BadRequest(text),
            _ => Self::Other(text),
        }
    }
}

impl From<pollen_shard::ShardError> for BackendError {
    fn from(e: pollen_shard::ShardError) -> Self {
        match e {
            pollen_shard::ShardError::BadInput(m) => Self::BadRequest(m),
            e => Self::Other(e.to_string()),
        }
    }
}

impl From<ChatTemplateError> for BackendError {
    fn from(e: ChatTemplateError) -> Self {
        match e {
            ChatTemplateError::Refused(_) => Self::BadRequest(e.to_string()),
            e => Self::Other(e.to_string()),
        }
    }
}

/// What a generation sends, in order: text, then one `Done` or one `Error`.
#[derive(Debug)]
pub enum GenEvent {
    /// A piece of the answer.
    Text(String),
    /// The generation ended; its token counts, stop reason and timing.
    Done(Generation),
    /// It failed (possibly after some text).
    Error(BackendError),
}

/// The events of one generation. Dropping it cancels the generation.
#[derive(Debug)]
pub struct GenStream {
    rx: mpsc::Receiver<GenEvent>,
    _guard: tokio_util::sync::DropGuard,
}

impl GenStream {
    /// The next event; `None` once the generation has ended and everything was read.
    pub async fn recv(&mut self) -> Option<GenEvent> {
        self.rx.recv().await
    }

    /// Reads to the end: the whole text and the result.
    pub async fn collect(mut self) -> Result<Generation, BackendError> {
        while let Some(ev) = self.recv().await {
            match ev {
                GenEvent::Text(_) => {}
                GenEvent::Done(g) => return Ok(g),
                GenEvent::Error(e) => return Err(e),
            }
        }
        Err(BackendError::Other(
            "the generation ended without a result".into(),
        ))
    }
}

/// One generation slot of a [`Backend`], held from [`Backend::reserve`] until the
/// generation started in it ends (or until dropped unused).
#[derive(Debug)]
pub struct Slot(tokio::sync::OwnedSemaphorePermit);

enum Engine {
    Local(Arc<LocalModel>),
    Swarm(Arc<SwarmClient>),
}

/// A model to generate with, locally or through the swarm.
pub struct Backend {
    engine: Engine,
    tokenizer: PollenTokenizer,
    template: ChatTemplate,
    name: String,
    model_id: Option<ModelId>,
    max_seq_len: usize,
    num_blocks: usize,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    /// Bytes of prompt text being tokenized at once ([`TOKENIZING_BYTES`]).
    tokenizing: Arc<Semaphore>,
}

/// The most bytes of prompt text tokenized at once by one [`Backend`]: tokenizing takes
/// a few hundred bytes of memory a byte of text, so many long prompts at once could
/// take gigabytes (a prompt alone longer than this is tokenized alone).
pub const TOKENIZING_BYTES: usize = 256 * 1024;

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Backend({}, {})",
            self.name,
            if self.is_local() { "local" } else { "swarm" }
        )
    }
}

/// The model's short name: its file name without `.gguf`.
fn model_name(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    stem.strip_suffix(".gguf").unwrap_or(&stem).to_string()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Other(format!("a compute task failed: {e}")))?
}

/// The chat template of the model at `path`.
fn template_of(path: &Path, tok: &PollenTokenizer) -> Result<ChatTemplate, BackendError> {
    let file = ModelFile::open(path)?;
    Ok(ChatTemplate::from_model(&file, tok))
}

impl Backend {
    /// Loads the whole model at `path` into this process; at most `max_concurrent`
    /// generations at once.
    pub async fn local(
        path: PathBuf,
        opts: LoadOptions,
        max_concurrent: usize,
        progress: impl FnMut(usize, usize) + Send + 'static,
    ) -> Result<Self, BackendError> {
        let name = model_name(&path);
        let (model, template) = blocking(move || {
            let mut progress = progress;
            let model = LocalModel::load(&path, &opts, &mut progress)?;
            let template = template_of(&path, &model.tokenizer)?;
            Ok((model, template))
        })
        .await?;
        Ok(Self {
            tokenizer: model.tokenizer.clone(),
            max_seq_len: model.ends.config().max_seq_len,
            num_blocks: model.ends.config().num_blocks,
            engine: Engine::Local(Arc::new(model)),
            template,
            name,
            model_id: None,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            max_concurrent: max_concurrent.max(1),
            tokenizing: Arc::new(Semaphore::new(TOKENIZING_BYTES)),
        })
    }

    /// Joins the swarm with a client of `cfg`; at most `max_concurrent` generations at
    /// once.
    pub async fn swarm(cfg: ClientConfig, max_concurrent: usize) -> Result<Self, BackendError> {
        let name = model_name(&cfg.model);
        let path = cfg.model.clone();
        let client = SwarmClient::connect(cfg).await?;
        let tokenizer = client.model().tokenizer.clone();
        let tok = tokenizer.clone();
        let template = blocking(move || template_of(&path, &tok)).await?;
        Ok(Self {
            tokenizer,
            max_seq_len: client.model().ends.config().max_seq_len,
            num_blocks: client.model().ends.config().num_blocks,
            model_id: Some(client.model().model_id),
            engine: Engine::Swarm(Arc::new(client)),
            template,
            name,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            max_concurrent: max_concurrent.max(1),
            tokenizing: Arc::new(Semaphore::new(TOKENIZING_BYTES)),
        })
    }

    /// Whether every block runs in this process.
    pub fn is_local(&self) -> bool {
        matches!(self.engine, Engine::Local(_))
    }

    /// The model's name (its file name without the extension).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id servers announce the model under (swarm only).
    pub fn model_id(&self) -> Option<ModelId> {
        self.model_id
    }

    /// The swarm client (swarm only).
    pub fn swarm_client(&self) -> Option<&Arc<SwarmClient>> {
        match &self.engine {
            Engine::Swarm(c) => Some(c),
            Engine::Local(_) => None,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &PollenTokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The most tokens (prompt and answer) the model can attend to.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// How many blocks the model has.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Token ids of a conversation, its assistant turn opened. What the messages say is
    /// text: a control token's text in a message (`<|im_end|>`) is tokenized as its
    /// characters, so a message cannot end its turn or speak for another role.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, BackendError> {
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: self.tokenizer.escape_controls(&m.content).into_owned(),
            })
            .collect();
        let text = self.template.render(&escaped, true)?;
        self.check_length(text.len())?;
        Ok(self.tokenizer.encode_escaped(&text)?)
    }

    /// Token ids of plain text.
    pub fn text_prompt(&self, text: &str) -> Result<Vec<u32>, BackendError> {
        self.check_length(text.len())?;
        Ok(self.tokenizer.encode(text)?)
    }

    /// Refuses a prompt of `bytes` bytes that holds more tokens than the context,
    /// whatever its text, before it is tokenized: each token stands for at most
    /// [`PollenTokenizer::most_bytes_per_token`] bytes.
    fn check_length(&self, bytes: usize) -> Result<(), BackendError> {
        let most = self.tokenizer.most_bytes_per_token();
        if bytes > self.max_seq_len.saturating_mul(most) {
            return Err(BackendError::PromptTooLong(format!(
                "the prompt is {bytes} bytes, more than this model's context of {} tokens holds (a token is {most} bytes at most)",
                self.max_seq_len
            )));
        }
        Ok(())
    }

    /// Room to tokenize a prompt of about `bytes` bytes, within [`TOKENIZING_BYTES`]
    /// at once, held until dropped (waits for it; a longer prompt waits to run alone).
    /// `None` only were the room closed, which it never is.
    pub async fn tokenizing_room(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = u32::try_from(bytes.clamp(1, TOKENIZING_BYTES)).unwrap_or(u32::MAX);
        self.tokenizing.clone().acquire_many_owned(n).await.ok()
    }

    /// Checks that `prompt` leaves room in the model's context; returns how many tokens
    /// the answer may have (at most `max_tokens`, or all the room left when `None`).
    pub fn answer_budget(
        &self,
        prompt_len: usize,
        max_tokens: Option<usize>,
    ) -> Result<usize, BackendError> {
        if prompt_len == 0 {
            return Err(BackendError::BadRequest("the prompt is empty".into()));
        }
        let room = self.max_seq_len.saturating_sub(prompt_len);
        if room == 0 {
            return Err(BackendError::PromptTooLong(format!(
                "the prompt has {prompt_len} tokens; this model's context holds {}",
                self.max_seq_len
            )));
        }
        match max_tokens {
            Some(n) if n > room => Err(BackendError::PromptTooLong(format!(
                "this model's context holds {} tokens; the prompt has {prompt_len} and {n} more were asked for (at most {room} fit)",
                self.max_seq_len
            ))),
            Some(n) => Ok(n),
            None => Ok(room),
        }
    }

    /// How many tokens an answer whose length the caller left open may have after
    /// `prompt_len` tokens of prompt: all the room in the model's context, and through a
    /// swarm no more than a server holds per session by default
    /// ([`crate::serve::DEFAULT_MAX_SESSION_TOKENS`]; servers announce no other), so
    /// that a request that asks for no length is not refused for one it did not ask.
    pub fn open_answer_room(&self, prompt_len: usize) -> usize {
        let room = self.max_seq_len.saturating_sub(prompt_len);
        match self.engine {
            Engine::Swarm(_) => {
                let session = crate::serve::DEFAULT_MAX_SESSION_TOKENS.saturating_sub(prompt_len);
                // A prompt past the servers' default leaves the context's room: the
                // servers may hold more, and say so if they do not.
                if session == 0 {
                    room
                } else {
                    room.min(session)
                }
            }
            _ => room,
        }
    }

    /// Takes one of the `max_concurrent` generation slots; fails at once (with `Busy`)
    /// when every one is taken. A request takes its slot before any costly work on its
    /// prompt (rendering, tokenizing), so a flood of requests costs at most
    /// `max_concurrent` prompts' work at a time.
    pub fn reserve(&self) -> Result<Slot, BackendError> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            BackendError::Busy(match self.max_concurrent {
                1 => "1 generation is running, the most this endpoint allows; try again shortly"
                    .to_string(),
                n => format!(
                    "{n} generations are running, the most this endpoint allows; try again shortly"
                ),
            })
        })?;
        Ok(Slot(permit))
    }

    /// Starts generating from `prompt` token ids. Fails at once (with `Busy`) when
    /// `max_concurrent` generations are running. The generation stops when the returned
    /// stream is dropped or `cancel` fires.
    pub fn start(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        cancel: CancellationToken,
    ) -> Result<GenStream, BackendError> {
        self.answer_budget(prompt.len(), Some(params.max_tokens))?;
        let slot = self.reserve()?;
        self.start_in(slot, prompt, params, cancel)
    }

    /// [`Backend::start`] in a slot taken earlier with [`Backend::reserve`]; the slot is
    /// freed when the generation ends.
    pub fn start_in(
        &self,
        slot: Slot,
        prompt: Vec<u32>,
        params: GenerateParams,
        cancel: CancellationToken,
    ) -> Result<GenStream, BackendError> {
        self.answer_budget(prompt.len(), Some(params.max_tokens))?;
        let permit = slot.0;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let cancel = cancel.child_token();
        let guard = cancel.clone().drop_guard();
        match &self.engine {
            Engine::Local(model) => {
                let model = model.clone();
                tokio::spawn(async move {
                    let (sink, stop) = (tx.clone(), cancel.clone());
                    let work = tokio::task::spawn_blocking(move || {
                        let open = crate::metrics::global().session(crate::metrics::Side::Client);
                        // A reader that takes nothing for `READER_STALL` ends the
                        // generation, and gets no end as if the answer were whole.
                        let mut out = Outbox::default();
                        let result = model
                            .generate(&prompt, &params, &mut |text| out.offer(&sink, text, &stop));
                        drop((permit, open));
                        (out, result)
                    });
                    // The slot and the thread are free once the generation is: what is
                    // left waits for its reader on this task.
                    let Ok((out, result)) = work.await else {
                        return;
                    };
                    if out.gave_up {
                        return;
                    }
                    if let Ok(g) = &result {
                        crate::metrics::global().tokens_generated(g.tokens.len());
                    }
                    send_rest(&tx, out.pending, result.map_err(BackendError::from)).await;
                });
            }
            Engine::Swarm(client) => {
                let client = client.clone();
                tokio::spawn(async move {
                    swarm_generation(&client, &prompt, &params, &tx, &cancel, permit).await;
                });
            }
        }
        Ok(GenStream { rx, _guard: guard })
    }
}

/// Runs one swarm generation, sending its events to `tx`. The generation's future is
/// dropped (and with it the session, which closes its streams on every server) as soon
/// as the reader goes away or `cancel` fires, even in the middle of a step.
async fn swarm_generation(
    client: &SwarmClient,
    prompt: &[u32],
    params: &GenerateParams,
    tx: &mpsc::Sender<GenEvent>,
    cancel: &CancellationToken,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    // The sink is called from async code: it must not wait (nor need it: `Outbox`).
    let mut out = Outbox::default();
    let mut sink = |text: &str| out.offer(tx, text, cancel);
    let result = tokio::select! {
        r = client.generate(prompt, params, &mut sink) => Some(r),
        () = tx.closed() => None,
        () = cancel.cancelled() => None,
    };
    // The slot is free once the generation is: what is left to send waits for its
    // reader without it.
    drop(slot);
    let Some(result) = result else {
        tracing::debug!("generation cancelled; its session is closed");
        return;
    };
    if out.gave_up {
        // Its reader stalled: no end as if the answer were whole.
        tracing::debug!("generation given up: its reader took nothing for {READER_STALL:?}");
        return;
    }
    send_rest(tx, out.pending, result.map_err(BackendError::from)).await;
}

/// Sends what a generation that ended has left for its reader: the text its buffer had
/// no room for, then its end, each within [`READER_STALL`].
async fn send_rest(
    tx: &mpsc::Sender<GenEvent>,
    pending: String,
    result: Result<Generation, BackendError>,
) {
    if !pending.is_empty()
        && tx
            .send_timeout(GenEvent::Text(pending), READER_STALL)
            .await
            .is_err()
    {
        return;
    }
    let ev = match result {
        Ok(g) => GenEvent::Done(g),
        Err(e) => GenEvent::Error(e),
    };
    let _ = tx.send_timeout(ev, READER_STALL).await;
}

#[cfg(test)]
impl Backend {
    /// The default model in this process, fast mode, one generation at a time (tests).
    #[allow(clippy::unwrap_used)]
    pub(crate) async fn test_local() -> Self {
        let model = crate::fetch::ensure_default_model(&mut |_| {}).unwrap();
        let load = pollen_shard::LoadOptions {
            device: candle_core::Device::Cpu,
            mode: pollen_shard::WeightMode::Fast,
        };
        Self::local(model, load, 1, |_, _| {}).await.unwrap()
    }

    /// Waits until a slot is free, at most `within`; whether one was.
    pub(crate) async fn slot_freed(&self, within: Duration) -> bool {
        let freed = async {
            while self.reserve().is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(within, freed).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A prompt longer than any text of the context's length is refused before it is
    /// tokenized (tokenizing two million digits took 2.6 s and 780 MB); one within
    /// that length is tokenized and judged by its tokens; tokenizing takes its room
    /// among the prompts being tokenized, a long one all of it.
    #[tokio::test]
    async fn a_prompt_too_long_for_any_context_is_refused_untokenized() {
        let backend = Backend::test_local().await;
        let most = backend.tokenizer().most_bytes_per_token();
        let over = backend.max_seq_len() * most + 1;
        let started = std::time::Instant::now();
        match backend.text_prompt(&"1".repeat(over)) {
            Err(BackendError::PromptTooLong(m)) => {
                assert!(m.contains(&format!("the prompt is {over} bytes")), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let chat = [ChatMessage {
            role: "user".into(),
            content: "1".repeat(over),
        }];
        assert!(matches!(
            backend.chat_prompt(&chat),
            Err(BackendError::PromptTooLong(_))
        ));
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        // Within the length: tokenized, then refused by its tokens.
        let ids = backend.text_prompt(&"1".repeat(5000)).unwrap();
        assert_eq!(ids.len(), 5000);
        assert!(matches!(
            backend.answer_budget(ids.len(), None),
            Err(BackendError::PromptTooLong(_))
        ));
        let long = backend.tokenizing_room(10 * TOKENIZING_BYTES).await;
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            backend.tokenizing_room(1),
        );
        assert!(waiting.await.is_err(), "a long prompt is tokenized alone");
        drop(long);
        let a = backend.tokenizing_room(TOKENIZING_BYTES / 2).await;
        let b = backend.tokenizing_room(TOKENIZING_BYTES / 2).await;
        assert!(a.is_some() && b.is_some());
    }

    /// A reader that reads nothing until the end does not hold its slot: the local
    /// generation runs at its own speed past the event buffer (64 events, here 100
    /// tokens), its slot frees when it ends, and the reader then gets every piece of
    /// the answer and its end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_reads_late_does_not_hold_the_slot() {
        let backend = Backend::test_local().await;
        let prompt = backend.text_prompt("Once upon a time").unwrap();
        let params = GenerateParams {
            max_tokens: 100,
            stop_strings: Vec::new(),
            ..GenerateParams::default()
        };
        let mut stream = backend
            .start(prompt, params, CancellationToken::new())
            .unwrap();
        assert!(
            backend.slot_freed(Duration::from_secs(20)).await,
            "the slot is free once the generation ends, read or not"
        );
        let mut text = String::new();
        let mut pieces = 0;
        let done = loop {
            match stream.recv().await {
                Some(GenEvent::Text(t)) => {
                    text.push_str(&t);
                    pieces += 1;
                }
                Some(GenEvent::Done(g)) => break g,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(done.text, text);
        assert!(
            done.tokens.len() > EVENT_BUFFER,
            "{} tokens",
            done.tokens.len()
        );
        // The buffer's events, then the rest at once.
        assert_eq!(pieces, EVENT_BUFFER + 1);
    }

    /// A reader that stops taking events ends a generation after the stall limit; one
    /// that takes them, however late within it, does not.
    #[test]
    fn a_reader_that_takes_nothing_is_given_up_on() {
        let within = Duration::from_millis(60);
        let mut stall = Stall::default();
        assert!(stall.bearable(false, within));
        assert!(
            stall.bearable(true, within),
            "a full buffer is borne a while"
        );
        std::thread::sleep(within);
        assert!(!stall.bearable(true, within), "not past the limit");
        assert!(
            stall.bearable(false, within),
            "a send that goes through starts afresh"
        );
        assert!(stall.bearable(true, within));
    }

    #[test]
    fn client_errors_map_to_api_categories() {
        let id = ModelId::from_bytes([0; 32]);
        let no_route = ClientError::NoRoute {
            model: id,
            compute: "fast/cpu".into(),
            uncovered: Vec::new(),
            servers: 0,
            other_modes: Vec::new(),
            misaligned: false,
        };
        assert!(matches!(
            BackendError::from(no_route),
            BackendError::NoBlocks(_)
        ));
        let failure = |code, message: &str| {
            ClientError::HopFailed(Box::new(crate::client::HopFailure {
                hop: 0,
                peer: libp2p::PeerId::random(),
                blocks: crate::blocks::BlockRange { start: 0, end: 10 },
                code,
                message: message.into(),
                reported_by: None,
                blamed_by: None,
            }))
        };
        let cap = format!(
            "{} this server holds at most 10 tokens per session",
            crate::client::check::SESSION_CAP
        );
        assert!(matches!(
            BackendError::from(failure(ErrorCode::OverBudget, &cap)),
            BackendError::PromptTooLong(_)
        ));
        for (code, message) in [
            (ErrorCode::Busy, "full"),
            (ErrorCode::OverBudget, "no memory"),
            (ErrorCode::Busy, cap.as_str()),
        ] {
            assert!(matches!(
                BackendError::from(failure(code, message)),
                BackendError::Busy(_)
            ));
        }
        assert!(matches!(
            BackendError::from(ClientError::Task("x".into())),
            BackendError::Other(_)
        ));
    }
}
