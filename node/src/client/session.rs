//! A client's session along a route: one stream to the first server (steps go down it,
//! acknowledgements and failures come up) and one to the last server (outputs come up).
//!
//! Each step is timed twice: the first server must acknowledge it within its timeout
//! (derived from its announced pace), and the output must arrive within the sum of every
//! hop's timeout. Servers time the hops after them the same way, so a hang is reported
//! by the hop before the one that hangs, naming it.

use super::error::ClientError;
use super::route::Hop;
use crate::net::NetHandle;
use crate::net::stream::{self, FrameReader, FrameWriter};
use crate::serve::session::{
    DOWN_DEPTH, DOWN_FRAME_MAX, FRAME_OVERHEAD, OPEN_TIMEOUT, SEND_TIMEOUT, ack_timeout,
};
use crate::wire::{from_wire, to_wire};
use candle_core::{Device, Tensor};
use libp2p::PeerId;
use pollen_protocol::{
    ErrorCode, InferRequest, InferResponse, ModelId, PeerIdBytes, Reported, RouteHop,
    SessionBinding, SessionBudget, SessionId, WireDType, check_report,
};
use std::io;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long a broken attach stream waits for the report of the failure that caused it.
const CAUSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// How long a client keeps its session on a server between steps.
const IDLE_TIMEOUT_MS: u32 = 120_000;
/// How long reaching a route's first or last server may take: a server that announces
/// an address nobody answers on costs this, not the whole open timeout, before the
/// client tries another route.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An open session along a route.
pub struct SwarmSession {
    session: SessionId,
    route: Vec<Hop>,
    /// What the servers' failure reports are checked against.
    reports: Reports,
    hidden_size: usize,
    wire_dtype: WireDType,
    first: FrameWriter,
    ups: mpsc::Receiver<io::Result<InferResponse>>,
    outputs: mpsc::Receiver<io::Result<InferResponse>>,
    tasks: JoinSet<()>,
    step: u64,
    free_tokens: u32,
    /// The last one-token step: until the first hop acknowledged it, until its output.
    timing: Option<(std::time::Duration, std::time::Duration)>,
    /// When the first hop acknowledged the step being waited for.
    acked_at: Option<Instant>,
    /// An output read while its step was still being sent (the send's last flush can end
    /// after the chain has answered), for [`Self::await_output`].
    early: Option<io::Result<InferResponse>>,
}

impl std::fmt::Debug for SwarmSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SwarmSession({}, {} hops)",
            self.session,
            self.route.len()
        )
    }
}

/// A session's route as its `Open` gave it, and the binding its servers sign their
/// failure reports with ([`pollen_protocol::report`]).
#[derive(Debug, Clone)]
struct Reports {
    binding: SessionBinding,
    wire: Vec<RouteHop>,
}

/// The output kept by [`SwarmSession::send_forward`], if any, else the next one read.
async fn next_output(
    early: &mut Option<io::Result<InferResponse>>,
    outputs: &mut mpsc::Receiver<io::Result<InferResponse>>,
) -> Option<io::Result<InferResponse>> {
    match early.take() {
        Some(item) => Some(item),
        None => outputs.recv().await,
    }
}

/// How long `tokens` tokens may take through `route`.
fn route_timeout(route: &[Hop], tokens: usize) -> std::time::Duration {
    route.iter().map(|h| ack_timeout(tokens, h.step_us)).sum()
}

/// How long a replay of `inputs` inputs holding `tokens` tokens may take on `route`.
fn replay_timeout(route: &[Hop], tokens: usize, inputs: usize) -> std::time::Duration {
    let waits = u32::try_from(inputs.saturating_mul(route.len())).unwrap_or(u32::MAX);
    route_timeout(route, tokens).saturating_add(REPLAY_INPUT_WAIT.saturating_mul(waits))
}

/// What a replay may take per input and hop, besides the route's time for its tokens:
/// a frame's trip and a step's scheduling.
const REPLAY_INPUT_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Most bytes of a frame up the attach stream: an output of one row of f32 and room.
fn output_frame_max(hidden_size: usize) -> usize {
    hidden_size.saturating_mul(4).saturating_add(FRAME_OVERHEAD)
}

/// Reads `rx`'s frames ahead of the session, at most [`DOWN_DEPTH`] of them, each at
/// most `max` bytes (refused before its body is read).
fn pump(
    tasks: &mut JoinSet<()>,
    mut rx: FrameReader,
    max: usize,
) -> mpsc::Receiver<io::Result<InferResponse>> {
    let (tx, out) = mpsc::channel(DOWN_DEPTH);
    tasks.spawn(async move {
        loop {
            let item = rx.recv_max::<InferResponse>(max).await;
            let end = item.is_err();
            if tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    out
}

impl SwarmSession {
    /// A failure of hop `hop` of this route.
    fn hop_failed(&self, hop: usize, code: ErrorCode, message: impl Into<String>) -> ClientError {
        hop_error(&self.route, hop, code, message.into())
    }

    /// Opens a session for `model` along `route`: at most `max_tokens` tokens, hidden
    /// states as `wire_dtype`, every server computing as `compute`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        net: &NetHandle,
        model: ModelId,
        compute: &str,
        route: &[Hop],
        max_tokens: u32,
        hidden_size: usize,
        wire_dtype: WireDType,
    ) -> Result<Self, ClientError> {
        let (first, last) = match (route.first(), route.last()) {
            (Some(f), Some(l)) => (f.clone(), l.clone()),
            _ => {
                return Err(ClientError::Protocol {
                    peer: net.peer_id(),
                    message: "empty route".into(),
                });
            }
        };
        let wire_route = route
            .iter()
            .map(|h| {
                Ok(RouteHop {
                    peer: PeerIdBytes(h.peer.to_bytes()),
                    blocks: crate::blocks::to_wire(h.blocks).map_err(|e| {
                        ClientError::Protocol {
                            peer: h.peer,
                            message: e.to_string(),
                        }
                    })?,
                    addrs: h.addrs.iter().take(16).map(|a| a.to_string()).collect(),
                    step_us: h.step_us,
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let session = SessionId(rand::random());
        let wire = wire_route.clone();
        let last_index = route.len() - 1;
        let fail = |hop: usize, code, msg: String| hop_error(route, hop, code, msg);
        // Every hop opens the next before answering: allow for each, as long as a hop
        // may be given (the first hop gives the next less, and so on down the route).
        let open_wait = (OPEN_TIMEOUT * u32::try_from(route.len()).unwrap_or(1)).min(
            std::time::Duration::from_millis(u64::from(
                pollen_protocol::limits::MAX_OPEN_WITHIN_MS,
            )),
        );
        let open = InferRequest::Open {
            session,
            model_id: model,
            route: wire_route,
            hop: 0,
            budget: SessionBudget {
                max_tokens,
                max_message_bytes: pollen_protocol::limits::MAX_INFER_REQUEST_BYTES as u32,
                idle_timeout_ms: IDLE_TIMEOUT_MS,
                open_within_ms: u32::try_from(open_wait.as_millis()).unwrap_or(u32::MAX),
            },
            wire_dtype,
            compute: compute.to_string(),
            client: PeerIdBytes(net.peer_id().to_bytes()),
        };
        let Some(binding) = SessionBinding::of_open(&open) else {
            return Err(ClientError::Protocol {
                peer: first.peer,
                message: "not an Open".into(),
            });
        };
        let reports = Reports { binding, wire };
        let opened = stream::open_with_reply::<_, InferResponse>(
            net,
            first.peer,
            first.addrs.clone(),
            &open,
            CONNECT_TIMEOUT,
            open_wait,
        )
        .await;
        let (rx, tx, free_tokens) = match opened {
            Ok((rx, tx, InferResponse::Opened { free_tokens, .. })) => (rx, tx, free_tokens),
            Ok((_, _, f @ InferResponse::HopFailed { .. })) => {
                return Err(named_failure(route, &reports, 0, &f));
            }
            Ok((_, _, InferResponse::Error(e))) => return Err(fail(0, e.code, e.message)),
            Ok((_, _, other)) => {
                return Err(fail(
                    0,
                    ErrorCode::BadRequest,
                    format!("answered Open with {other:?}"),
                ));
            }
            Err(e @ stream::OpenError::Timeout(_)) => {
                return Err(fail(0, ErrorCode::Timeout, e.to_string()));
            }
            Err(e) => return Err(fail(0, ErrorCode::Unreachable, e.to_string())),
        };
        // Every server holds what the session asks for or refuses, naming itself: less
        // is the first hop's lie (it would end the generation unattributed).
        if free_tokens < max_tokens {
            tx.close().await;
            return Err(fail(
                0,
                ErrorCode::BadRequest,
                format!(
                    "answered Open with room for {free_tokens} tokens, fewer than the {max_tokens} asked"
                ),
            ));
        }
        // The outputs come straight from the last server, on a stream we open to it.
        let attached = stream::open_with_reply::<_, InferResponse>(
            net,
            last.peer,
            last.addrs.clone(),
            &InferRequest::Attach { session },
            CONNECT_TIMEOUT,
            OPEN_TIMEOUT,
        )
        .await;
        let (out_rx, out_tx) = match attached {
            Ok((r, w, InferResponse::Attached { .. })) => (r, w),
            Ok((_, _, InferResponse::Error(e))) => return Err(fail(last_index, e.code, e.message)),
            Ok((_, _, other)) => {
                return Err(fail(
                    last_index,
                    ErrorCode::BadRequest,
                    format!("answered Attach with {other:?}"),
                ));
            }
            Err(e @ stream::OpenError::Timeout(_)) => {
                return Err(fail(last_index, ErrorCode::Timeout, e.to_string()));
            }
            Err(e) => return Err(fail(last_index, ErrorCode::Unreachable, e.to_string())),
        };
        // The attach stream's writing half stays open (dropping it would end the stream).
        let mut tasks = JoinSet::new();
        // Up the first hop's stream come only small frames (acknowledgements, reports);
        // up the attach stream outputs of one row.
        let ups = pump(&mut tasks, rx, DOWN_FRAME_MAX);
        let outputs = pump(&mut tasks, out_rx, output_frame_max(hidden_size));
        tasks.spawn(async move {
            std::future::pending::<()>().await;
            drop(out_tx);
        });
        Ok(Self {
            session,
            route: route.to_vec(),
            reports,
            hidden_size,
            wire_dtype,
            first: tx,
            ups,
            outputs,
            tasks,
            step: 0,
            free_tokens,
            timing: None,
            acked_at: None,
            early: None,
        })
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.session
    }

    /// The route.
    pub fn route(&self) -> &[Hop] {
        &self.route
    }

    /// Tokens the route's servers can hold for this session.
    pub fn free_tokens(&self) -> u32 {
        self.free_tokens
    }

    /// Runs `hidden` `(1, n, hidden)` at positions `pos..pos+n` through every block;
    /// the last row of the output, `(1, 1, hidden)`.
    pub async fn step(&mut self, hidden: &Tensor, pos: usize) -> Result<Tensor, ClientError> {
        let _timer = crate::metrics::global().route_step();
        let started = Instant::now();
        self.timing = None;
        let (step, want, tokens) = self.send_forward(hidden, pos).await?;
        let first = ack_timeout(tokens, self.route[0].step_us);
        let total = self.route_timeout(tokens);
        let out = self.await_output(step, want, first, total).await?;
        if tokens == 1 {
            let done = started.elapsed();
            let ack = self.acked_at.map_or(done, |t| t.duration_since(started));
            self.timing = Some((ack, done));
        }
        Ok(out)
    }

    /// How long the last step took, if it was one token: until the first hop
    /// acknowledged it, and until its output arrived.
    pub fn last_timing(&self) -> Option<(std::time::Duration, std::time::Duration)> {
        self.timing
    }

    /// Runs `inputs` (hidden states and their positions) through every block one after
    /// the other, without waiting between them, so the hops work on them as a pipeline;
    /// the last row of the last one's output. This is how a new route is brought to the
    /// state of a broken one: the same inputs, in the same chunks.
    ///
    /// The whole replay, its sending included, has one deadline: the route's time for
    /// all its tokens at once (the hops work on them as a pipeline) and
    /// [`REPLAY_INPUT_WAIT`] per input and hop, so that a hop that never answers costs
    /// one such wait, not one acknowledgement timeout per input and hop.
    pub async fn replay(&mut self, inputs: &[(Tensor, usize)]) -> Result<Tensor, ClientError> {
        let started = Instant::now();
        let tokens: usize = inputs.iter().map(|(h, _)| h.dim(1).unwrap_or(1)).sum();
        let total = replay_timeout(&self.route, tokens, inputs.len());
        let deadline = started + total;
        let mut last = None;
        let mut tokens_sent = 0;
        for (hidden, pos) in inputs {
            let sent = tokio::time::timeout_at(deadline, self.send_forward(hidden, *pos)).await;
            let Ok(sent) = sent else {
                return Err(self.hop_failed(0, ErrorCode::Timeout, format!(
                    "took no more of the replay ({tokens_sent} of {tokens} tokens sent within {total:?})"
                )));
            };
            let (step, want, tokens) = sent?;
            tokens_sent += tokens;
            last = Some((step, want));
        }
        let Some((step, want)) = last else {
            return Err(ClientError::Protocol {
                peer: self.route[0].peer,
                message: "nothing to replay".into(),
            });
        };
        // The first hop acknowledges the last input after computing every one before it.
        let first = ack_timeout(tokens_sent, self.route[0].step_us);
        let left = deadline.saturating_duration_since(Instant::now());
        self.await_output(step, want, first.min(left), left).await
    }

    /// How long `tokens` tokens may take through the whole route.
    fn route_timeout(&self, tokens: usize) -> std::time::Duration {
        route_timeout(&self.route, tokens)
    }

    /// Sends one `Forward` down the route: its step, the position of its last row, and
    /// its token count.
    async fn send_forward(
        &mut self,
        hidden: &Tensor,
        pos: usize,
    ) -> Result<(u64, u32, usize), ClientError> {
        self.step += 1;
        let step = self.step;
        let tokens = hidden.dim(1).map_err(crate::wire::WireError::from)?;
        let position = u32::try_from(pos).map_err(|_| ClientError::Protocol {
            peer: self.route[0].peer,
            message: format!("position {pos} does not fit the protocol"),
        })?;
        let req = InferRequest::Forward {
            session: self.session,
            position,
            step,
            hidden: to_wire(hidden, self.wire_dtype)?,
            last_row_only: true,
        };
        // While the frame goes out, listen up the chain: a hop that failed stops reading
        // its stream, and its report (not our blocked write) names the hop to blame.
        // Outputs of earlier steps are read and dropped meanwhile: a replay sends many
        // inputs before it waits for the last output, and outputs left unread would in
        // the end fill the attach stream's window and stop the last hop, and the chain.
        let sent: Result<(), String> = {
            let (first, ups, outputs, early, route, reports) = (
                &mut self.first,
                &mut self.ups,
                &mut self.outputs,
                &mut self.early,
                &self.route,
                &self.reports,
            );
            let mut attached = true;
            let send = first.send(&req, SEND_TIMEOUT);
            tokio::pin!(send);
            loop {
                tokio::select! {
                    biased;
                    r = &mut send => break r.map_err(|e| e.to_string()),
                    item = outputs.recv(), if attached => match item {
                        Some(Ok(InferResponse::Output { step: s, .. })) if s < step => {}
                        // Anything else is for `await_output` to judge, which reads on from it.
                        Some(other) => {
                            *early = Some(other);
                            attached = false;
                        }
                        // A broken attach stream is looked into when the output is awaited
                        // (the report of the hop that failed may still be on its way).
                        None => attached = false,
                    },
                    item = ups.recv() => match item {
                        Some(Ok(f @ InferResponse::HopFailed { .. })) => {
                            return Err(named_failure(route, reports, 0, &f));
                        }
                        Some(Ok(_)) => {} // an acknowledgement of an earlier step
                        Some(Err(e)) => {
                            return Err(hop_error(route, 0, ErrorCode::Unreachable, format!("its stream broke: {e}")));
                        }
                        None => return Err(hop_error(route, 0, ErrorCode::Unreachable, "its stream ended".into())),
                    },
                }
            }
        };
        if let Err(e) = sent {
            // A hop that refused a step ends the session, and the chain above it closes:
            // the report it sent first, if it comes, names the hop to blame, not the
            // stream that broke under this send.
            let own = self.hop_failed(0, ErrorCode::Unreachable, e);
            return Err(self.upstream_cause(own).await);
        }
        let want = position + u32::try_from(tokens).unwrap_or(1).saturating_sub(1);
        Ok((step, want, tokens))
    }

    /// Waits for the output of `step` (its last row at `want_position`): the first hop
    /// must acknowledge it within `first_timeout`, the output arrive within `total`.
    async fn await_output(
        &mut self,
        step: u64,
        want_position: u32,
        first_timeout: std::time::Duration,
        total: std::time::Duration,
    ) -> Result<Tensor, ClientError> {
        let now = Instant::now();
        self.acked_at = None;
        let mut ack_deadline = Some(now + first_timeout);
        let out_deadline = now + total;
        let last = self.route.len() - 1;
        loop {
            tokio::select! {
                item = self.ups.recv() => match item {
                    Some(Ok(InferResponse::Ack { step: s, .. })) => {
                        if s >= step && ack_deadline.is_some() {
                            ack_deadline = None;
                            self.acked_at = Some(Instant::now());
                        }
                    }
                    Some(Ok(f @ InferResponse::HopFailed { .. })) => {
                        return Err(named_failure(&self.route, &self.reports, 0, &f));
                    }
                    Some(Ok(InferResponse::Error(e))) => return Err(self.hop_failed(0, e.code, e.message)),
                    Some(Ok(other)) => {
                        return Err(self.hop_failed(0, ErrorCode::BadRequest, format!("sent {other:?} up the session stream")));
                    }
                    Some(Err(e)) => return Err(self.hop_failed(0, ErrorCode::Unreachable, format!("its stream broke: {e}"))),
                    None => return Err(self.hop_failed(0, ErrorCode::Unreachable, "its stream ended")),
                },
                item = next_output(&mut self.early, &mut self.outputs) => match item {
                    Some(Ok(InferResponse::Output { session, step: s, position: p, hidden: out })) => {
                        if s < step {
                            continue; // an answer to an earlier step (a replay's, or a late one)
                        }
                        if session != self.session || s != step || p != want_position {
                            return Err(self.hop_failed(last, ErrorCode::BadRequest, format!(
                                "answered session {session} step {s} at {p}, but we asked for session {} step {step} at {want_position}",
                                self.session
                            )));
                        }
                        let out = from_wire(&out, self.hidden_size, &Device::Cpu)
                            .map_err(|e| self.hop_failed(last, ErrorCode::BadRequest, e.to_string()))?;
                        // Its shape and every value: a NaN would end the text silently.
                        if let Err(e) = super::check::hidden(&out, 1, self.hidden_size) {
                            return Err(self.hop_failed(last, ErrorCode::BadRequest, format!(
                                "{} its output of step {step}: {e}", super::check::WRONG_OUTPUT
                            )));
                        }
                        return Ok(out);
                    }
                    Some(Ok(f @ InferResponse::HopFailed { .. })) => {
                        return Err(named_failure(&self.route, &self.reports, last, &f));
                    }
                    Some(Ok(InferResponse::Error(e))) => return Err(self.hop_failed(last, e.code, e.message)),
                    Some(Ok(other)) => {
                        return Err(self.hop_failed(last, ErrorCode::BadRequest, format!("sent {other:?} up the attach stream")));
                    }
                    Some(Err(e)) => {
                        let own = self.hop_failed(last, ErrorCode::Unreachable, format!("its attach stream broke: {e}"));
                        return Err(self.upstream_cause(own).await);
                    }
                    None => {
                        let own = self.hop_failed(last, ErrorCode::Unreachable, "its attach stream ended");
                        return Err(self.upstream_cause(own).await);
                    }
                },
                _ = async { tokio::time::sleep_until(ack_deadline.unwrap_or(out_deadline)).await }, if ack_deadline.is_some() => {
                    return Err(self.hop_failed(0, ErrorCode::Timeout, format!("no acknowledgement of step {step} within {first_timeout:?}")));
                }
                _ = tokio::time::sleep_until(out_deadline) => {
                    return Err(self.hop_failed(last, ErrorCode::Timeout, format!("no output of step {step} within {total:?}")));
                }
            }
        }
    }

    /// A stream of the session broke (the attach stream, or the first hop's under a
    /// send): when a hop fails, the chain closes behind it and above it, so a stream may
    /// break before the report of the real failure arrives. Waits briefly for that
    /// report (or for the first hop's own stream to end) and blames the hop it names;
    /// otherwise `own`.
    async fn upstream_cause(&mut self, own: ClientError) -> ClientError {
        cause_from_first_hop(&mut self.ups, &self.route, &self.reports, own, CAUSE_WAIT).await
    }

    /// Closes the session on every server (the first passes it on) and waits, briefly,
    /// for the acknowledgement.
    pub async fn close(mut self) {
        let close = InferRequest::Close {
            session: self.session,
        };
        if self.first.send(&close, SEND_TIMEOUT).await.is_ok() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                while let Some(Ok(r)) = self.ups.recv().await {
                    if matches!(r, InferResponse::Closed { .. }) {
                        break;
                    }
                }
            })
            .await;
        }
        self.first.close().await;
        self.tasks.shutdown().await;
    }
}

/// What the first hop's stream says within `wait` after another stream of the session
/// broke ([`SwarmSession::upstream_cause`]): the failure a report names, the first hop's
/// own stream breaking or ending, or else `own`. Acknowledgements and other frames on
/// the way are skipped.
async fn cause_from_first_hop(
    ups: &mut mpsc::Receiver<io::Result<InferResponse>>,
    route: &[Hop],
    reports: &Reports,
    own: ClientError,
    wait: std::time::Duration,
) -> ClientError {
    let found = tokio::time::timeout(wait, async {
        loop {
            match ups.recv().await {
                Some(Ok(f @ InferResponse::HopFailed { .. })) => {
                    return named_failure(route, reports, 0, &f);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return hop_error(
                        route,
                        0,
                        ErrorCode::Unreachable,
                        format!("its stream broke: {e}"),
                    );
                }
                None => {
                    return hop_error(route, 0, ErrorCode::Unreachable, "its stream ended".into());
                }
            }
        }
    });
    found.await.unwrap_or(own)
}

/// A failure of hop `hop` of `route`.
fn hop_error(route: &[Hop], hop: usize, code: ErrorCode, message: String) -> ClientError {
    // Much of a message comes from peers: no terminal control sequences reach the user.
    let message = pollen_protocol::printable(&message);
    match route.get(hop) {
        Some(h) => ClientError::HopFailed(Box::new(super::error::HopFailure {
            hop,
            peer: h.peer,
            blocks: h.blocks,
            code,
            message,
            reported_by: None,
            blamed_by: None,
        })),
        None => ClientError::Protocol {
            peer: route.first().map(|h| h.peer).unwrap_or(PeerId::random()),
            message: format!(
                "hop {hop} outside a route of {} hops: {message}",
                route.len()
            ),
        },
    }
}

/// A failure report (`report`, a `HopFailed`) that came up the stream of hop `deliverer`,
/// checked against the session ([`check_report`]): written and signed by a hop of the
/// route, about itself or a neighbour. A report that does not check out is the
/// deliverer's failure: an honest hop passes on only reports that do (see
/// `serve::session::Reports::relay`), so a hop cannot get another banned by a report in
/// its name.
fn named_failure(
    route: &[Hop],
    reports: &Reports,
    deliverer: usize,
    report: &InferResponse,
) -> ClientError {
    let InferResponse::HopFailed { hop, error, by, .. } = report else {
        return hop_error(
            route,
            deliverer,
            ErrorCode::BadRequest,
            format!("sent {report:?} as a failure report"),
        );
    };
    let (hop, by) = (*hop as usize, *by as usize);
    // Cleaned before any look at it: an invisible character before a prefix would
    // otherwise pass the checks below and be removed only later.
    let message = pollen_protocol::printable(&error.message);
    let checked = match check_report(report, &reports.binding, &reports.wire) {
        Err(e) => Err(e.to_string()),
        // Reports come up a stream from its far end and the hops after it: the last
        // hop's attach stream carries only its own.
        Ok(_) if by < deliverer => Err(format!("it was written by hop {by}, before this one")),
        Ok(about) => Ok(about),
    };
    match checked {
        Err(e) => hop_error(
            route,
            deliverer,
            ErrorCode::BadRequest,
            format!("sent up a failure report that does not check out ({e}): {message}"),
        ),
        // A hop that refuses the step the hop before sent it blames that hop. Which of
        // the two is lying the client cannot tell: a dispute (see `SwarmClient::blame`),
        // never a wrong output of the client's own finding.
        Ok(Reported::HopBefore) => {
            let reporter = route[by].peer;
            let mut e = hop_error(
                route,
                hop,
                ErrorCode::BadRequest,
                format!("the next hop ({reporter}) reports {message}"),
            );
            if let ClientError::HopFailed(f) = &mut e {
                f.reported_by = Some(reporter);
            }
            e
        }
        // Only the client's own findings are marked as wrong outputs.
        Ok(about @ (Reported::Itself | Reported::HopAfter)) => {
            let message = match message.strip_prefix(super::check::WRONG_OUTPUT) {
                Some(rest) => format!("reported{rest}"),
                None => message,
            };
            let mut e = hop_error(route, hop, error.code, message);
            if let (ClientError::HopFailed(f), Reported::HopAfter) = (&mut e, about) {
                f.blamed_by = Some(route[by].peer);
            }
            e
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::blocks::BlockRange;
    use std::time::Duration;

    fn route(n: usize) -> Vec<Hop> {
        (0..n)
            .map(|i| Hop {
                peer: PeerId::random(),
                blocks: BlockRange {
                    start: i * 10,
                    end: i * 10 + 10,
                },
                addrs: vec![],
                step_us: 1_000,
            })
            .collect()
    }

    /// Hop `i`'s ed25519 secret.
    fn secret(i: usize) -> [u8; 32] {
        [u8::try_from(i).unwrap() + 1; 32]
    }

    /// A route of `n` hops with known keys, and what its reports are checked against.
    fn signed_route(n: usize) -> (Vec<Hop>, Reports) {
        let mut r = route(n);
        for (i, h) in r.iter_mut().enumerate() {
            h.peer = libp2p::identity::Keypair::ed25519_from_bytes(secret(i))
                .unwrap()
                .public()
                .to_peer_id();
        }
        let wire: Vec<RouteHop> = r
            .iter()
            .map(|h| RouteHop {
                peer: PeerIdBytes(h.peer.to_bytes()),
                blocks: crate::blocks::to_wire(h.blocks).unwrap(),
                addrs: vec![],
                step_us: h.step_us,
            })
            .collect();
        let client = PeerIdBytes(PeerId::random().to_bytes());
        let binding = crate::serve::session::binding_for(SessionId(11), &wire, client);
        (r, Reports { binding, wire })
    }

    /// A report signed with hop `signer`'s key, claiming hop `by` wrote it, about hop
    /// `hop`.
    fn report(reports: &Reports, signer: usize, by: u32, hop: u32, message: &str) -> InferResponse {
        reports.binding.report(
            &secret(signer),
            by,
            7,
            hop,
            reports.wire[hop as usize].peer.clone(),
            pollen_protocol::ProtocolError::new(ErrorCode::BadRequest, message),
        )
    }

    /// After a stream broke under a send (or the attach stream), the client waits a
    /// moment for what the first hop's stream says: a report that arrives in time names
    /// the hop to blame (a forged one, the first hop), the first hop's stream ending
    /// names it, and silence or a report too late leaves the failure it had.
    #[tokio::test(start_paused = true)]
    async fn a_broken_stream_waits_briefly_for_the_report_that_names_the_cause() {
        let (r, reports) = signed_route(3);
        let wait = CAUSE_WAIT;
        let own = || {
            hop_error(
                &r,
                2,
                ErrorCode::Unreachable,
                "its attach stream ended".into(),
            )
        };
        let failure = |e: ClientError| match e {
            ClientError::HopFailed(f) => (f.hop, f.code, f.message),
            other => panic!("a hop failure, not {other}"),
        };
        let (tx, mut ups) = mpsc::channel(8);
        // Hop 1 refused the step and says so, after an acknowledgement: hop 1 is named.
        let refusal = reports.binding.report(
            &secret(1),
            1,
            7,
            1,
            reports.wire[1].peer.clone(),
            pollen_protocol::ProtocolError::new(ErrorCode::OverBudget, "no room"),
        );
        tx.send(Ok(InferResponse::Ack {
            session: SessionId(11),
            step: 6,
        }))
        .await
        .unwrap();
        tx.send(Ok(refusal)).await.unwrap();
        let (hop, code, _) =
            failure(cause_from_first_hop(&mut ups, &r, &reports, own(), wait).await);
        assert_eq!((hop, code), (1, ErrorCode::OverBudget));
        // A report in hop 2's name written by hop 0 is hop 0's failure.
        tx.send(Ok(report(&reports, 0, 2, 2, "made up")))
            .await
            .unwrap();
        let (hop, _, message) =
            failure(cause_from_first_hop(&mut ups, &r, &reports, own(), wait).await);
        assert_eq!(hop, 0);
        assert!(message.contains("does not check out"), "{message}");
        // A report that arrives during the wait ends it then.
        let soon = tx.clone();
        let in_time = report(&reports, 1, 1, 1, "in time");
        tokio::spawn(async move {
            tokio::time::sleep(wait - Duration::from_millis(1)).await;
            soon.send(Ok(in_time)).await.unwrap();
        });
        let started = tokio::time::Instant::now();
        let (hop, _, message) =
            failure(cause_from_first_hop(&mut ups, &r, &reports, own(), wait).await);
        assert_eq!(hop, 1);
        assert!(message.contains("in time"), "{message}");
        assert_eq!(started.elapsed(), wait - Duration::from_millis(1));
        // Nothing within the wait: the failure it had; a report after it is not waited for.
        let late = tx.clone();
        let later = report(&reports, 1, 1, 1, "too late");
        tokio::spawn(async move {
            tokio::time::sleep(wait + Duration::from_millis(1)).await;
            late.send(Ok(later)).await.unwrap();
        });
        let started = tokio::time::Instant::now();
        let (hop, code, message) =
            failure(cause_from_first_hop(&mut ups, &r, &reports, own(), wait).await);
        assert_eq!((hop, code), (2, ErrorCode::Unreachable));
        assert!(message.contains("attach stream ended"), "{message}");
        assert_eq!(started.elapsed(), wait);
        // The first hop's stream ends: the first hop.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _too_late = ups.try_recv().unwrap();
        drop(tx);
        let (hop, code, message) =
            failure(cause_from_first_hop(&mut ups, &r, &reports, own(), wait).await);
        assert_eq!((hop, code), (0, ErrorCode::Unreachable));
        assert!(message.contains("its stream ended"), "{message}");
    }

    /// A hop reporting that the hop before sent it a step it refuses (non-finite input)
    /// names that hop in a dispute (itself as the reporter), never as the client's own
    /// finding of a wrong output; peers' text reaches the user without terminal control
    /// sequences.
    #[test]
    fn a_hops_report_about_the_hop_before_is_a_dispute() {
        let (r, reports) = signed_route(3);
        let message = format!(
            "{}: NaN or infinite \u{1b}[2J\u{1b}]0;owned\u{7}",
            super::super::check::NON_FINITE_INPUT
        );
        let ClientError::HopFailed(f) =
            named_failure(&r, &reports, 0, &report(&reports, 2, 2, 1, &message))
        else {
            panic!("a hop failure");
        };
        assert_eq!(
            (f.hop, f.peer, f.reported_by),
            (1, r[1].peer, Some(r[2].peer))
        );
        assert!(!f.message.starts_with(super::super::check::WRONG_OUTPUT));
        assert!(f.message.contains("NaN or infinite"), "{}", f.message);
        assert!(!f.message.chars().any(char::is_control), "{:?}", f.message);
        // A hop cannot pass off its own failure as the client's finding either.
        let own = format!("\u{200e}{} made up", super::super::check::WRONG_OUTPUT);
        let ClientError::HopFailed(f) =
            named_failure(&r, &reports, 0, &report(&reports, 1, 1, 1, &own))
        else {
            panic!("a hop failure");
        };
        assert_eq!((f.hop, f.reported_by), (1, None));
        assert!(!f.message.starts_with(super::super::check::WRONG_OUTPUT));
        // A report about the hop after the writer names that hop.
        let ClientError::HopFailed(f) =
            named_failure(&r, &reports, 0, &report(&reports, 0, 0, 1, "silent"))
        else {
            panic!("a hop failure");
        };
        assert_eq!(
            (f.hop, f.reported_by, f.blamed_by),
            (1, None, Some(r[0].peer))
        );
    }

    /// The first hop (or the last, up the attach stream) cannot get another hop banned
    /// by a report in its name: a report that does not check out is a failure of the hop
    /// whose stream it came up.
    #[test]
    fn a_report_that_does_not_check_out_is_the_deliverers_failure() {
        let (r, reports) = signed_route(3);
        let cases = [
            // The first hop signs a report in the last hop's name.
            (0, report(&reports, 0, 2, 2, "made up")),
            // The first hop reports, in its own name, about a hop not next to it.
            (0, report(&reports, 0, 0, 2, "made up")),
            // The last hop claims a report of the hop before it, up the attach stream.
            (2, report(&reports, 2, 1, 0, "made up")),
            // Up the attach stream, a genuine report of another hop (the last hop's own
            // are the only ones that come that way).
            (2, report(&reports, 1, 1, 1, "obtained somehow")),
        ];
        for (deliverer, forged) in cases {
            let ClientError::HopFailed(f) = named_failure(&r, &reports, deliverer, &forged) else {
                panic!("a hop failure");
            };
            assert_eq!(
                (f.hop, f.peer, f.code, f.reported_by),
                (deliverer, r[deliverer].peer, ErrorCode::BadRequest, None)
            );
            assert!(f.message.contains("does not check out"), "{}", f.message);
        }
        // A real report of another session, sent up again.
        let (_, elsewhere) = signed_route(3);
        let old = report(&elsewhere, 2, 2, 2, "it broke");
        let ClientError::HopFailed(f) = named_failure(&r, &reports, 0, &old) else {
            panic!("a hop failure");
        };
        assert_eq!(f.hop, 0);
    }

    /// A replay's deadline grows with its tokens and inputs, not with an acknowledgement
    /// timeout per input and hop: a silent hop on a healed route after a long answer
    /// costs minutes at most, not hours.
    #[test]
    fn a_replay_has_one_deadline() {
        let r = route(2);
        let one = replay_timeout(&r, 1, 1);
        assert!(one >= 2 * crate::serve::session::ACK_BASE, "{one:?}");
        // A 200-token prompt, then 1,000 tokens decoded one by one.
        let long = replay_timeout(&r, 1_200, 1_001);
        let per_input: std::time::Duration = (0..1_001).map(|_| route_timeout(&r, 1)).sum();
        assert!(long >= route_timeout(&r, 1_200), "{long:?}");
        assert!(long < std::time::Duration::from_secs(200), "{long:?}");
        assert!(
            per_input > std::time::Duration::from_secs(6_000),
            "{per_input:?}"
        );
    }

    /// The caps on frames read ahead from the route hold the largest honest frames: an
    /// output of one row of f32 for a wide model, and any report.
    #[test]
    fn the_frame_caps_hold_honest_frames() {
        let hidden = 8192;
        let out = InferResponse::Output {
            session: SessionId(u64::MAX),
            step: u64::MAX,
            position: u32::MAX,
            hidden: to_wire(
                &Tensor::zeros((1, 1, hidden), candle_core::DType::F32, &Device::Cpu).unwrap(),
                WireDType::F32,
            )
            .unwrap(),
        };
        let len = pollen_protocol::codec::encoded_len(&out);
        assert!(len <= output_frame_max(hidden), "{len}");
        assert!(output_frame_max(hidden) < 1 << 20);
    }
}
