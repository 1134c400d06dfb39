//! The OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions`, answered whole or streamed as server-sent events.
//!
//! Every request body is checked here before anything runs; errors come back in
//! OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status
//! codes its clients expect.

use super::ApiState;
use crate::backend::{BackendError, GenEvent, GenStream, Slot};
use crate::chat_template::ChatMessage;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use pollen_shard::SamplingParams;
use pollen_shard::generate::{GenerateParams, Generation, StopReason};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Longest stop string, in bytes.
const MAX_STOP_LEN: usize = 256;
/// Most messages in one conversation.
const MAX_MESSAGES: usize = 1024;
/// Answer length when a chat request does not say (the room left in the context, up to
/// this).
pub const DEFAULT_CHAT_TOKENS: usize = 512;
/// Answer length when a completion request does not say (OpenAI's default).
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        let message = e.to_string();
        let (status, kind, code) = match e {
            BackendError::PromptTooLong(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            BackendError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            BackendError::NoBlocks(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("swarm_incomplete"),
            ),
            BackendError::Busy(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("busy"),
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        Self {
            status,
            kind,
            code,
            param: None,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: text, or a list of parts of which text parts are read.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What chat and completion requests share. Fields OpenAI has and Pollen does not use
/// (penalties, `user`, ...) are accepted and ignored; features it does not have
/// (`logprobs`, `top_logprobs`, `echo`, `tools`, `functions`) are refused when asked for.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Features Pollen does not have, refused when asked for (an answer without them
    /// would pass for one with them).
    #[serde(flatten)]
    unsupported: Unsupported,
}

/// Request fields of features Pollen does not have.
#[derive(Debug, Default, Deserialize)]
struct Unsupported {
    /// `true` (chat) or a count (completions).
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    functions: Option<Vec<serde_json::Value>>,
}

impl Unsupported {
    /// The first feature asked for, if any (`false`, `0`, `null` and empty lists ask
    /// for none).
    fn asked(&self) -> Option<&'static str> {
        let on = |v: &serde_json::Value| match v {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
            serde_json::Value::Null => false,
            _ => true,
        };
        if self.logprobs.as_ref().is_some_and(on) {
            Some("logprobs")
        } else if self.top_logprobs.is_some_and(|n| n > 0) {
            Some("top_logprobs")
        } else if self.echo == Some(true) {
            Some("echo")
        } else if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            Some("tools")
        } else if self.functions.as_ref().is_some_and(|f| !f.is_empty()) {
            Some("functions")
        } else {
            None
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<InMessage>,
}

/// A completion's `prompt`: a string, or a list holding one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: Prompt,
}

/// Chat or plain completion: what the answer's JSON looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// The answer's fixed fields.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
}

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .method_not_allowed_fallback(wrong_method)
        .fallback(not_found)
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("not_found"),
        param: None,
        message: "no such endpoint; Pollen serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions".into(),
    }
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "invalid_request_error",
        code: Some("method_not_allowed"),
        param: None,
        message: format!(
            "{method} {}: Pollen serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions",
            uri.path()
        ),
    }
}

fn model_json(state: &ApiState) -> Value {
    json!({
        "id": state.backend.name(),
        "object": "model",
        "created": 0,
        "owned_by": if state.backend.is_local() { "pollen-local" } else { "pollen-swarm" },
    })
}

async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_json(&state)]}))
}

/// The most a request body may hold (axum's default limit for a body read whole).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// How long a request body may take to arrive whole, from its head: the connection's
/// listener times heads and idle connections, not bodies, and a client that sends a
/// head and then part of its body, or none, would otherwise hold its connection and
/// the part for ever.
pub const BODY_TIME: Duration = Duration::from_secs(30);

/// The request's body, whole: at most [`BODY_LIMIT`] bytes (413 past it), within
/// [`BODY_TIME`] (408 past it).
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    let error = |status, code, message: String| ApiError {
        status,
        kind: "invalid_request_error",
        code: Some(code),
        param: None,
        message,
    };
    let whole = async {
        let mut chunks = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("the request body could not be read: {e}"), None)
            })?;
            if bytes.len() + chunk.len() > BODY_LIMIT {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!("the request body is longer than {BODY_LIMIT} bytes"),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    match tokio::time::timeout(BODY_TIME, whole).await {
        Ok(read) => read,
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                BODY_TIME.as_secs()
            ),
        )),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}"), None))
}

/// Checks the model name: the backend's name or, for a swarm, its model id.
fn check_model(state: &ApiState, model: &str) -> Result<(), ApiError> {
    let b = &state.backend;
    if model == b.name() || b.model_id().is_some_and(|id| id.to_string() == model) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("model_not_found"),
        param: Some("model"),
        message: format!(
            "the model `{model}` does not exist here; this endpoint serves `{}`",
            b.name()
        ),
    })
}

/// Generation parameters from the request; `default_tokens` when it gives no limit.
fn params(
    state: &ApiState,
    c: &Common,
    prompt_len: usize,
    default_tokens: usize,
) -> Result<GenerateParams, ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported", Some("n")));
    }
    if let Some(field) = c.unsupported.asked() {
        return Err(ApiError::bad_request(
            format!("`{field}` is not supported by this server"),
            Some(field),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(
            "top_p must be greater than 0 and at most 1",
            Some("top_p"),
        ));
    }
    let stops = match &c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > MAX_STOPS || stops.iter().any(|s| s.len() > MAX_STOP_LEN) {
        return Err(ApiError::bad_request(
            format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_LEN} bytes"),
            Some("stop"),
        ));
    }
    let asked = c.max_completion_tokens.or(c.max_tokens);
    if asked == Some(0) {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let asked = asked.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let room = state.backend.answer_budget(prompt_len, None)?;
    let max_tokens = match asked {
        Some(n) => state.backend.answer_budget(prompt_len, Some(n))?,
        None => default_tokens
            .min(room)
            .min(state.backend.open_answer_room(prompt_len)),
    };
    Ok(GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature,
            top_p,
            seed: c.seed.unwrap_or_else(rand::random),
            ..SamplingParams::default()
        },
        stop_strings: stops.into_iter().filter(|s| !s.is_empty()).collect(),
        prefill_chunk: 0,
    })
}

fn meta(state: &ApiState, kind: Kind, c: &Common) -> Meta {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    Meta {
        id: format!("{prefix}-{:024x}", rand::random::<u128>() >> 32),
        created: crate::clock::unix_ms() / 1000,
        model: state.backend.name().to_string(),
        kind,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    }
}

fn messages(input: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() || input.len() > MAX_MESSAGES {
        return Err(ApiError::bad_request(
            format!("messages must hold 1 to {MAX_MESSAGES} messages"),
            Some("messages"),
        ));
    }
    input
        .into_iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer" | "tool"
            ) {
                return Err(ApiError::bad_request(
                    format!("unknown role `{}`", m.role),
                    Some("messages"),
                ));
            }
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::bad_request(
                                format!(
                                    "content parts of type `{}` are not supported (text only)",
                                    p.kind
                                ),
                                Some("messages"),
                            ));
                        }
                        text.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    text
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// A POST body must say it is JSON: a cross-site page may send `text/plain` (or a form)
/// without a CORS preflight, but not `application/json`.
fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        kind: "invalid_request_error",
        code: Some("unsupported_media_type"),
        param: None,
        message: format!(
            "the request body must be JSON with `Content-Type: application/json` (got `{ct}`)"
        ),
    })
}

/// Runs `f` (rendering or tokenizing a prompt of up to the body limit) off the async
/// runtime, in `slot`: the task holds the slot until it ends, so a client that hangs up
/// while its prompt is tokenized frees the slot only when that work is done, and a flood
/// of such requests costs at most one prompt's work per slot; prompts of `bytes` are
/// tokenized at most [`crate::backend::TOKENIZING_BYTES`] at once (a prompt too long
/// for the context is refused before: `Backend::text_prompt`).
async fn off_runtime<T: Send + 'static>(
    backend: &crate::backend::Backend,
    slot: Slot,
    bytes: usize,
    f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<(Slot, T), ApiError> {
    // Room for a prompt of `bytes` among those tokenized at once, held until its
    // work ends.
    let room = backend.tokenizing_room(bytes).await;
    let (slot, out) = tokio::task::spawn_blocking(move || {
        let out = f();
        drop(room);
        (slot, out)
    })
    .await
    .map_err(|e| ApiError::from(BackendError::Other(format!("a prompt task failed: {e}"))))?;
    Ok((slot, out?))
}

async fn chat(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let req: ChatRequest = parse(&read_body(body).await?)?;
    check_model(&state, &req.common.model)?;
    let msgs = messages(req.messages)?;
    // The slot first: rendering and tokenizing a long conversation is the costly part.
    let slot = state.backend.reserve()?;
    let st = state.clone();
    let bytes = msgs.iter().map(|m| m.role.len() + m.content.len()).sum();
    let (slot, prompt) = off_runtime(&state.backend, slot, bytes, move || {
        st.backend.chat_prompt(&msgs)
    })
    .await?;
    let p = params(&state, &req.common, prompt.len(), DEFAULT_CHAT_TOKENS)?;
    let meta = meta(&state, Kind::Chat, &req.common);
    run(&state, slot, meta, prompt, p, req.common.stream).await
}

async fn completions(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let req: CompletionRequest = parse(&read_body(body).await?)?;
    check_model(&state, &req.common.model)?;
    let text = match req.prompt {
        Prompt::One(t) => t,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(_) => {
            return Err(ApiError::bad_request(
                "only one prompt per request is supported",
                Some("prompt"),
            ));
        }
    };
    let slot = state.backend.reserve()?;
    let st = state.clone();
    let bytes = text.len();
    let (slot, prompt) = off_runtime(&state.backend, slot, bytes, move || {
        st.backend.text_prompt(&text)
    })
    .await?;
    let p = params(&state, &req.common, prompt.len(), DEFAULT_COMPLETION_TOKENS)?;
    let meta = meta(&state, Kind::Completion, &req.common);
    run(&state, slot, meta, prompt, p, req.common.stream).await
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Length => "length",
        _ => "stop",
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens.len(),
        "total_tokens": g.prompt_tokens + g.tokens.len(),
    })
}

/// Starts the generation and answers: whole, or as a stream that begins once the first
/// event is in (so that a request the swarm cannot serve still gets its status code).
async fn run(
    state: &ApiState,
    slot: Slot,
    meta: Meta,
    prompt: Vec<u32>,
    params: GenerateParams,
    stream: bool,
) -> Result<Response, ApiError> {
    let mut gen_stream =
        state
            .backend
            .start_in(slot, prompt, params, state.shutdown.child_token())?;
    let first = gen_stream.recv().await;
    let first = match first {
        Some(GenEvent::Error(e)) => return Err(e.into()),
        Some(ev) => ev,
        None => {
            return Err(BackendError::Other("the generation ended without a result".into()).into());
        }
    };
    if stream {
        return Ok(sse(meta, first, gen_stream).into_response());
    }
    let mut text = String::new();
    let mut ev = Some(first);
    let g = loop {
        match ev {
            Some(GenEvent::Text(t)) => text.push_str(&t),
            Some(GenEvent::Done(g)) => break g,
            Some(GenEvent::Error(e)) => return Err(e.into()),
            None => {
                return Err(
                    BackendError::Other("the generation ended without a result".into()).into(),
                );
            }
        }
        ev = gen_stream.recv().await;
    };
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish_reason(g.stop),
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish_reason(g.stop),
        }),
    };
    Ok(Json(json!({
        "id": meta.id,
        "object": match meta.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage(&g),
    }))
    .into_response())
}

impl Meta {
    /// One chunk of a stream; `text` is the new text, `finish` the finish reason on the
    /// last one.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match (first, text) {
                    (true, t) => json!({"role": "assistant", "content": t.unwrap_or("")}),
                    (false, Some(t)) => json!({"content": t}),
                    (false, None) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let mut v = json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage_chunk(&self, g: &Generation) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(g),
        })
    }
}

/// Where a stream is.
enum Phase {
    /// The first event, not sent yet.
    First(GenEvent),
    /// Text is flowing.
    Running,
    /// The usage chunk is due.
    Usage(Generation),
    /// `[DONE]` is due.
    Done,
    /// Nothing more.
    Ended,
}

/// The generation as server-sent events: chunks, an optional usage chunk, `[DONE]`.
/// When the client goes away, the response body is dropped, and with it the generation's
/// stream, which cancels the generation and frees its sessions.
fn sse(meta: Meta, first: GenEvent, gen_stream: GenStream) -> impl IntoResponse {
    let state = (meta, Phase::First(first), gen_stream, true);
    let events = futures::stream::unfold(state, |(meta, phase, mut rx, mut first)| async move {
        let data = |v: Value| Event::default().data(v.to_string());
        let ev = match phase {
            Phase::First(ev) => Some(ev),
            Phase::Running => rx.recv().await,
            Phase::Usage(g) => {
                let e = data(meta.usage_chunk(&g));
                return Some((
                    Ok::<_, std::convert::Infallible>(e),
                    (meta, Phase::Done, rx, first),
                ));
            }
            Phase::Done => {
                let e = Event::default().data("[DONE]");
                return Some((Ok(e), (meta, Phase::Ended, rx, first)));
            }
            Phase::Ended => return None,
        };
        let (event, next) = match ev {
            Some(GenEvent::Text(t)) => {
                let e = data(meta.chunk(Some(&t), None, first));
                (e, Phase::Running)
            }
            Some(GenEvent::Done(g)) => {
                let e = data(meta.chunk(None, Some(finish_reason(g.stop)), first));
                let next = if meta.include_usage {
                    Phase::Usage(g)
                } else {
                    Phase::Done
                };
                (e, next)
            }
            Some(GenEvent::Error(e)) => {
                tracing::warn!("a streamed generation failed: {e}");
                (data(ApiError::from(e).body()), Phase::Done)
            }
            None => (
                data(
                    ApiError::from(BackendError::Other(
                        "the generation ended without a result".into(),
                    ))
                    .body(),
                ),
                Phase::Done,
            ),
        };
        first = false;
        Some((Ok(event), (meta, next, rx, first)))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::Backend;

    /// A body that never ends is answered 408 after [`BODY_TIME`]; one past the limit
    /// 413, read no further than the limit; one in pieces, whole.
    #[tokio::test(start_paused = true)]
    async fn a_body_must_arrive_whole_in_time_and_within_the_limit() {
        let started = tokio::time::Instant::now();
        let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"{\"model\""));
        let never = futures::stream::iter([first]).chain(futures::stream::pending());
        let e = read_body(Body::from_stream(never)).await.unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), BODY_TIME);
        let pieces =
            (0..=BODY_LIMIT / 4096).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 4096])));
        let e = read_body(Body::from_stream(futures::stream::iter(pieces)))
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let pieces =
            [b"{\"a\":".as_slice(), b" 1}"].map(|p| Ok::<_, std::io::Error>(Bytes::from(p)));
        let whole = read_body(Body::from_stream(futures::stream::iter(pieces)))
            .await
            .unwrap();
        assert_eq!(&whole[..], b"{\"a\": 1}");
    }

    /// A client that hangs up while its prompt is tokenized does not free its slot before
    /// that work ends: hanging up in a loop cannot start more prompts' work than there
    /// are slots.
    #[tokio::test]
    async fn a_prompt_being_tokenized_keeps_its_slot_after_its_client_left() {
        let backend = Arc::new(Backend::test_local().await);
        let (go, wait) = std::sync::mpsc::sync_channel::<()>(1);
        let b = backend.clone();
        let work = async move {
            off_runtime(&b, b.reserve().unwrap(), 1, move || {
                wait.recv().ok();
                Ok(())
            })
            .await
        };
        let request = tokio::spawn(work);
        tokio::time::sleep(Duration::from_millis(50)).await;
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        assert!(
            backend.reserve().is_err(),
            "the slot is the work's until it ends"
        );
        go.send(()).unwrap();
        assert!(
            backend.slot_freed(Duration::from_secs(10)).await,
            "the slot is free once the work ended"
        );
    }
}
