//! One inference session on a server: the data path of one hop.
//!
//! A session arrives as a stream whose first frame is `Open`. The server checks it,
//! takes a slot in the session table, opens a stream to the next hop and passes `Open`
//! on, then answers `Opened` up. From then on the session's task reads `Forward`s from
//! the stream above, computes its span, and sends the output straight on: down to the
//! next hop, or (at the last hop) up the client's attach stream. It acknowledges each
//! step up with `Ack` once the output has left, and times the next hop's `Ack`s: a
//! next hop that breaks its stream or stays silent past its timeout (derived from its
//! announced time per token) is reported up as `HopFailed`, naming it. No lock and no
//! permit is held while waiting on another peer: the compute permit covers the span's
//! arithmetic only.
//!
//! The steps themselves (compute, send on, read back) are in [`super::steps`]. A hop
//! keeps nothing of what it sent on: a route that breaks is healed by its client, which
//! replays its inputs into a new one.

use super::steps::{Failure, compute, downstream_event, queued_report, send_down, send_output};
use super::{Server, batch};
use crate::net::stream::{self, FrameReader, FrameWriter};
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::limits::MAX_OPEN_WITHIN_MS;
use pollen_protocol::{
    ErrorCode, InferRequest, InferResponse, PeerIdBytes, ProtocolError, RouteHop, SessionBinding,
    SessionBudget, SessionId, check_report,
};
use pollen_shard::CacheLimits;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a hop whose send to the next failed waits for the next hop's report of why.
const CAUSE_WAIT: Duration = Duration::from_millis(500);
/// How long a new stream may take to send its first frame.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening the rest of a route may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long sending one frame may take before the peer counts as gone.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the last hop waits for its client's attach stream.
pub const ATTACH_WAIT: Duration = Duration::from_secs(10);
/// The fixed part of every acknowledgement timeout: scheduling, queueing, the network.
pub const ACK_BASE: Duration = Duration::from_secs(3);
/// Headroom over a hop's announced time per token.
pub const ACK_SLOWDOWN: u32 = 4;
/// Longest time per token believed from an announcement.
const MAX_STEP: Duration = Duration::from_secs(1);
/// A session idle this long may be evicted to make room for a new one.
pub const EVICT_AFTER_IDLE: Duration = Duration::from_secs(5);
/// How long a new session waits for an evicted one to give its memory back.
const EVICT_WAIT: Duration = Duration::from_secs(1);
/// How long sending a refusal may take (a peer refused for holding too much gets no more).
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Room in a session's frame cap for everything in a `Forward` but its hidden states.
pub(crate) const FRAME_OVERHEAD: usize = 64 * 1024;
/// Most bytes of one frame from the next hop. Only small frames travel back down a
/// session's stream (`Ack`, `Closed`, `HopFailed`, `Error`: at most an error message of
/// `MAX_ERROR_MESSAGE_LEN` bytes and a peer id); outputs go up the attach stream. A next
/// hop sending more is refused before its frame is read.
pub(crate) const DOWN_FRAME_MAX: usize = 16 * 1024;
/// Most frames from the next hop read ahead of the session.
pub(crate) const DOWN_DEPTH: usize = 4;
/// Most frames from the hop before read ahead of the session: one waits while another
/// computes (the next is read only once that one is taken). A frame may hold a whole prompt (up to the session's token cap of hidden
/// states, megabytes) and is not counted in the server's memory budget until its step
/// takes its share, so few are read ahead; a session's decode steps come one at a time
/// anyway (each waits for the output before it).
const UP_DEPTH: usize = 1;

/// How long a hop whose announced time per token is `step_us` may take to acknowledge a
/// step of `tokens` tokens: [`ACK_BASE`] plus [`ACK_SLOWDOWN`] times its announced pace.
pub fn ack_timeout(tokens: usize, step_us: u32) -> Duration {
    let per_token = Duration::from_micros(u64::from(step_us)).min(MAX_STEP);
    let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
    ACK_BASE + per_token.saturating_mul(ACK_SLOWDOWN.saturating_mul(tokens))
}

/// Time a hop keeps, out of what the hop before gives it, to send its answer up.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// The least time worth giving a next hop to open the rest of the route.
const LEAST_OPEN_WITHIN: Duration = Duration::from_secs(2);

/// When a hop must have answered an `Open` that arrived at `arrival` giving it
/// `within_ms` (the opener's wait, at most [`MAX_OPEN_WITHIN_MS`]): in time for the
/// answer to reach the opener while it waits.
fn answer_by(arrival: Instant, within_ms: u32) -> Instant {
    let within = Duration::from_millis(u64::from(within_ms.min(MAX_OPEN_WITHIN_MS)));
    arrival + within.saturating_sub(ANSWER_MARGIN)
}

/// What a hop that must answer by `answer_by` gives its next hop at `now`: the rest,
/// less the margin in which the next hop's answer (or this hop's failure naming it)
/// comes back. `None` when less than [`LEAST_OPEN_WITHIN`] would be left.
fn next_within(answer_by: Instant, now: Instant) -> Option<Duration> {
    let d = answer_by
        .saturating_duration_since(now)
        .checked_sub(ANSWER_MARGIN)?;
    (d >= LEAST_OPEN_WITHIN).then_some(d)
}

/// Most hops' worth of first-step time a session gets: the hop number is the opener's
/// claim, so it may not stretch how long an unused session holds its slot.
const FIRST_STEP_MAX_HOPS: u32 = 4;

/// How long a session at `hop` may wait for its first step: `per_hop` for itself and
/// each hop before it (each has its prefill to compute first), at most
/// [`FIRST_STEP_MAX_HOPS`] times.
fn first_step_wait(per_hop: Duration, hop: usize) -> Duration {
    let hops = u32::try_from(hop)
        .unwrap_or(u32::MAX)
        .saturating_add(1)
        .min(FIRST_STEP_MAX_HOPS);
    per_hop.saturating_mul(hops)
}

/// Writes one session's failure reports, signed as its hop `by` (see
/// [`pollen_protocol::report`]), and checks those the hops after it send up before
/// passing them on.
pub(super) struct Reports {
    secret: [u8; 32],
    binding: SessionBinding,
    route: Vec<RouteHop>,
    by: usize,
}

impl Reports {
    /// The reports of the session `open` asks for, written by `server`.
    fn new(server: &Server, open: &OpenRequest) -> Self {
        Self {
            secret: server.secret,
            binding: open.binding,
            route: open.route.clone(),
            by: open.hop,
        }
    }

    /// A report that hop `hop` (peer `peer`) failed at step `step`: this hop itself, or
    /// one of its neighbours.
    pub(super) fn fail(
        &self,
        step: u64,
        hop: usize,
        peer: &PeerId,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> InferResponse {
        crate::metrics::global().error(crate::metrics::Side::Server, code);
        self.binding.report(
            &self.secret,
            u32::try_from(self.by).unwrap_or(u32::MAX),
            step,
            u32::try_from(hop).unwrap_or(u32::MAX),
            PeerIdBytes(peer.to_bytes()),
            ProtocolError::new(code, message),
        )
    }

    /// A report that this hop refuses the input of step `step` (`code`, `message`): the
    /// hop before sent it, so the report names that hop (`from`, which opened this
    /// session); at the first hop, whose input is the client's own, it names this one.
    pub(super) fn refuse_input(
        &self,
        step: u64,
        me: &PeerId,
        from: &PeerId,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> InferResponse {
        match self.by.checked_sub(1) {
            Some(before) => self.fail(step, before, from, code, message),
            None => self.fail(step, self.by, me, code, message),
        }
    }

    /// A report that came up from `next` at step `step`: passed on as it is if it
    /// checks out (signed by a hop after this one, about itself or a neighbour, in this
    /// session), otherwise this hop's own report that `next` sent one that does not.
    pub(super) fn relay(&self, report: InferResponse, step: u64, next: &NextHop) -> InferResponse {
        let why = match check_report(&report, &self.binding, &self.route) {
            Ok(_) if report_by(&report) > self.by => return report,
            Ok(_) => "it was written by this hop or one before it".to_string(),
            Err(e) => e.to_string(),
        };
        self.fail(
            step,
            next.index,
            &next.peer,
            ErrorCode::BadRequest,
            format!("sent up a failure report that does not check out: {why}"),
        )
    }
}

#[cfg(feature = "fault-injection")]
impl Reports {
    /// A report in the name of the route's last hop that it failed at step `step`,
    /// signed with this hop's key: what a hop lying about another can send
    /// ([`crate::fault::Kind::Forge`]). `None` at the last hop.
    fn forged(&self, step: u64) -> Option<InferResponse> {
        let last = self.route.len().checked_sub(1)?;
        let peer = self.route.get(last)?.peer.clone();
        (last != self.by).then(|| {
            let last = u32::try_from(last).unwrap_or(u32::MAX);
            let error = ProtocolError::new(ErrorCode::Internal, "the last hop failed");
            self.binding
                .report(&self.secret, last, step, last, peer, error)
        })
    }
}

/// The place in the route of the hop that wrote `report`.
fn report_by(report: &InferResponse) -> usize {
    match report {
        InferResponse::HopFailed { by, .. } => *by as usize,
        _ => 0,
    }
}

/// Serves one inbound session stream from `peer` until it ends.
pub(super) async fn serve_stream(
    server: Arc<Server>,
    peer: PeerId,
    stream: libp2p::Stream,
    cancel: CancellationToken,
) {
    let (mut up_rx, mut up_tx) = stream::split(stream, peer, server.net.stats().clone());
    // One peer holds at most its share of the server's session streams.
    let Some(_slot) = server.table.stream(peer) else {
        let max = server.table.limits().streams_per_peer;
        server.table.warn("streams", || {
            format!(
                "refusing a session stream from {peer}: it has {max} open, the most one peer may"
            )
        });
        let e = ProtocolError::new(
            ErrorCode::Busy,
            format!(
                "peer {peer} has {max} session streams open on this server, the most one peer may"
            ),
        );
        let _ = up_tx.send(&InferResponse::Error(e), REFUSE_TIMEOUT).await;
        up_tx.close().await;
        return;
    };
    // Waiting for the first frame, among at most `WAITING_STREAMS` streams: a silent
    // one is dropped once that many newer ones wait.
    let waiting = server.table.wait_first();
    let first = tokio::select! {
        // An `Open` or an `Attach`, never hidden states: within the frame's overhead.
        first = up_rx.recv_max_within::<InferRequest>(
            pollen_protocol::limits::INFER_OVERHEAD_BYTES,
            FIRST_FRAME_TIMEOUT,
        ) => first,
        () = waiting.displaced() => {
            server.table.warn("silent-streams", || {
                format!(
                    "dropping a session stream from {peer}: no first frame yet, and {} newer streams wait for theirs",
                    super::sessions::WAITING_STREAMS
                )
            });
            return;
        }
    };
    drop(waiting);
    let first = match first {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!("session stream from {peer}: {e}");
            return;
        }
    };
    let binding = SessionBinding::of_open(&first);
    match (first, binding) {
        (
            InferRequest::Open {
                session,
                model_id,
                route,
                hop,
                budget,
                wire_dtype,
                compute,
                client,
            },
            Some(binding),
        ) => {
            let open = OpenRequest {
                session,
                model_id,
                route,
                hop: hop as usize,
                budget,
                wire_dtype,
                compute,
                client,
                binding,
            };
            run_session(server, up_rx, up_tx, open, cancel).await;
        }
        (InferRequest::Attach { session }, _) => {
            match server.table.attach(session, peer) {
                Ok(slot) => {
                    let ok = up_tx
                        .send(&InferResponse::Attached { session }, SEND_TIMEOUT)
                        .await;
                    if ok.is_ok() && slot.send(up_tx).await.is_err() {
                        tracing::debug!("session {session} ended before its client attached");
                    }
                }
                Err(e) => {
                    let code = match e {
                        super::sessions::TableError::Unknown(_) => ErrorCode::UnknownSession,
                        _ => ErrorCode::BadRequest,
                    };
                    let reply = InferResponse::Error(ProtocolError::new(code, e.to_string()));
                    let _ = up_tx.send(&reply, SEND_TIMEOUT).await;
                }
            }
            // The attach stream's reading half carries nothing more.
            drop(up_rx);
        }
        (other, _) => {
            let e = ProtocolError::new(
                ErrorCode::BadRequest,
                format!(
                    "a session stream starts with Open or Attach, not {}",
                    kind(&other)
                ),
            );
            let _ = up_tx.send(&InferResponse::Error(e), SEND_TIMEOUT).await;
        }
    }
}

fn kind(r: &InferRequest) -> &'static str {
    match r {
        InferRequest::Open { .. } => "Open",
        InferRequest::Forward { .. } => "Forward",
        InferRequest::Close { .. } => "Close",
        InferRequest::Attach { .. } => "Attach",
    }
}

struct OpenRequest {
    session: SessionId,
    model_id: pollen_protocol::ModelId,
    route: Vec<RouteHop>,
    hop: usize,
    budget: SessionBudget,
    wire_dtype: pollen_protocol::WireDType,
    compute: String,
    client: PeerIdBytes,
    /// What this session's failure reports are signed for.
    binding: SessionBinding,
}

/// The next hop of a route, parsed.
pub(super) struct NextHop {
    pub(super) index: usize,
    pub(super) peer: PeerId,
    pub(super) addrs: Vec<Multiaddr>,
    pub(super) step_us: u32,
}

fn parse_peer(p: &PeerIdBytes) -> Result<PeerId, String> {
    PeerId::from_bytes(&p.0).map_err(|e| format!("bad peer id in route: {e}"))
}

/// Checks an `Open` against this server: model, compute mode, span, who we are, who
/// sent it. The next hop, if any.
fn check_open(
    server: &Server,
    from: PeerId,
    open: &OpenRequest,
) -> Result<(PeerId, Option<NextHop>), ProtocolError> {
    let bad = |code, msg: String| ProtocolError::new(code, msg);
    if server.draining.load(Ordering::Relaxed) {
        return Err(bad(ErrorCode::Busy, "this server is shutting down".into()));
    }
    if open.model_id != server.model_id {
        return Err(bad(
            ErrorCode::UnknownModel,
            format!(
                "this server serves model {}, not {}",
                server.model_id, open.model_id
            ),
        ));
    }
    if open.compute != server.compute {
        return Err(bad(
            ErrorCode::ComputeMismatch,
            format!(
                "this server computes `{}`, the session asks for `{}`",
                server.compute, open.compute
            ),
        ));
    }
    let cap = server.cfg.max_session_tokens;
    if open.budget.max_tokens as usize > cap {
        return Err(bad(
            ErrorCode::OverBudget,
            format!(
                "{} this server holds at most {cap} tokens per session, and the session asks for {}: ask for fewer tokens",
                crate::client::check::SESSION_CAP,
                open.budget.max_tokens
            ),
        ));
    }
    let me = open
        .route
        .get(open.hop)
        .ok_or_else(|| bad(ErrorCode::BadRequest, "hop outside the route".into()))?;
    let range = server.span.range();
    if me.blocks.start() as usize != range.start || me.blocks.end() as usize != range.end {
        return Err(bad(
            ErrorCode::SpanMismatch,
            format!(
                "this server holds blocks {range}, the route asks for {}",
                me.blocks
            ),
        ));
    }
    if parse_peer(&me.peer).ok() != Some(server.me) {
        return Err(bad(
            ErrorCode::BadRequest,
            "the route names another peer at this hop".into(),
        ));
    }
    let client = parse_peer(&open.client).map_err(|e| bad(ErrorCode::BadRequest, e))?;
    // A session belongs to its opener: the client opens the first hop, and each later
    // hop is opened by the hop before it.
    let opener = match open.hop {
        0 => client,
        h => parse_peer(&open.route[h - 1].peer).map_err(|e| bad(ErrorCode::BadRequest, e))?,
    };
    if from != opener {
        return Err(bad(
            ErrorCode::BadRequest,
            format!("hop {} must be opened by {opener}, not {from}", open.hop),
        ));
    }
    // A hop that must open the rest of the route needs time for it: a shorter wait,
    // which only the opener chose, is refused unsigned (the opener names this hop),
    // never as this hop's own failure.
    let least = ANSWER_MARGIN * 2 + LEAST_OPEN_WITHIN;
    if open.route.len() > open.hop + 1 && u128::from(open.budget.open_within_ms) < least.as_millis()
    {
        return Err(bad(
            ErrorCode::Busy,
            format!(
                "the Open leaves this hop {} ms to open the rest of the route, less than {least:?}",
                open.budget.open_within_ms
            ),
        ));
    }
    let next = match open.route.get(open.hop + 1) {
        None => None,
        Some(h) => Some(NextHop {
            index: open.hop + 1,
            peer: parse_peer(&h.peer).map_err(|e| bad(ErrorCode::BadRequest, e))?,
            addrs: h.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            step_us: h.step_us,
        }),
    };
    Ok((client, next))
}

/// Opens the rest of the route at `next`: its stream halves and its free tokens, or the
/// failure to send up.
async fn open_next(
    server: &Server,
    open: &OpenRequest,
    next: &NextHop,
    answer_by: Instant,
    reports: &Reports,
) -> Result<(FrameReader, FrameWriter, u32), InferResponse> {
    let fail = |code, msg: String| reports.fail(0, next.index, &next.peer, code, msg);
    // The time this hop had for the rest of the route went to its own work (looking up
    // the next hop, making room): this hop answers for it.
    let Some(within) = next_within(answer_by, Instant::now()) else {
        return Err(reports.fail(
            0,
            open.hop,
            &server.me,
            ErrorCode::Busy,
            "this server had no time left to open the rest of the route",
        ));
    };
    // The next hop gets what is left when the Open is sent; the dial may take what the
    // next hop's least share leaves.
    let dial = within
        .saturating_sub(LEAST_OPEN_WITHIN)
        .clamp(Duration::from_millis(1), OPEN_TIMEOUT);
    let make = || {
        let within = next_within(answer_by, Instant::now())?;
        Some(InferRequest::Open {
            session: open.session,
            model_id: open.model_id,
            route: open.route.clone(),
            hop: u32::try_from(next.index).unwrap_or(u32::MAX),
            budget: SessionBudget {
                open_within_ms: u32::try_from(within.as_millis()).unwrap_or(u32::MAX),
                ..open.budget
            },
            wire_dtype: open.wire_dtype,
            compute: open.compute.clone(),
            client: open.client.clone(),
        })
    };
    // Dialing, sending and reading (and opening again a stream dropped unanswered) all
    // end by this hop's own deadline.
    let answer = tokio::time::timeout_at(
        answer_by,
        stream::open_with_reply_made::<_, InferResponse>(
            &server.net,
            next.peer,
            next.addrs.clone(),
            make,
            dial,
            within + ANSWER_MARGIN,
        ),
    )
    .await;
    let no_time = || {
        reports.fail(
            0,
            open.hop,
            &server.me,
            ErrorCode::Busy,
            "this server had no time left to open the rest of the route",
        )
    };
    let Ok(answer) = answer else {
        return Err(fail(
            ErrorCode::Timeout,
            format!("no answer to Open within {within:?}"),
        ));
    };
    if let Err(stream::OpenError::NoTime) = answer {
        // Dialing (again, after a stream dropped unanswered) took the next hop's share.
        return Err(no_time());
    }
    match answer {
        Ok((rx, tx, InferResponse::Opened { free_tokens, .. })) => Ok((rx, tx, free_tokens)),
        Ok((_, _, f @ InferResponse::HopFailed { .. })) => Err(reports.relay(f, 0, next)),
        Ok((_, _, InferResponse::Error(e))) => Err(fail(e.code, e.message)),
        Ok((_, _, other)) => Err(fail(
            ErrorCode::BadRequest,
            format!("answered Open with {other:?}"),
        )),
        Err(e @ stream::OpenError::Timeout(_)) => Err(fail(ErrorCode::Timeout, e.to_string())),
        Err(e) => Err(fail(ErrorCode::Unreachable, e.to_string())),
    }
}

/// Reads frames from `rx` into a queue of `depth` until the stream ends (the error is the
/// last item) or the queue's receiver is dropped; a frame is read only once the queue
/// has room for it, so at most `depth` are held.
fn pump<M: pollen_protocol::WireMessage + Send + 'static>(
    tasks: &mut JoinSet<()>,
    mut rx: FrameReader,
    depth: usize,
    max_bytes: usize,
    ended: Option<CancellationToken>,
) -> mpsc::Receiver<std::io::Result<M>> {
    let (tx, out) = mpsc::channel(depth);
    tasks.spawn(async move {
        loop {
            let Ok(room) = tx.reserve().await else {
                break;
            };
            let item = rx.recv_max::<M>(max_bytes).await;
            let end = item.is_err();
            if end && let Some(ended) = &ended {
                // Told at once, not when the session next reads: a step it is computing
                // may stop early.
                ended.cancel();
            }
            room.send(item);
            if end {
                break;
            }
        }
    });
    out
}

/// The downstream side of a session: the next hop's stream and the steps it has yet to
/// acknowledge.
pub(super) struct Downstream {
    pub(super) hop: NextHop,
    pub(super) tx: FrameWriter,
    pub(super) rx: mpsc::Receiver<std::io::Result<InferResponse>>,
    /// Steps sent and not yet acknowledged, with their deadlines.
    pub(super) waiting: VecDeque<(u64, Instant)>,
}

/// How a session ended, for the log.
enum End {
    Closed,
    UpstreamGone(String),
    Failed,
    Idle,
    NeverStepped,
    Evicted,
    Cancelled,
}

async fn run_session(
    server: Arc<Server>,
    up_rx: FrameReader,
    mut up_tx: FrameWriter,
    open: OpenRequest,
    cancel: CancellationToken,
) {
    let session = open.session;
    let from = up_rx.peer();
    // The hop before waits this long for the answer (the Open has just arrived): every
    // wait below ends in time for this hop's answer, or its failure naming the right
    // hop, to reach it while it still waits.
    let answer_by = answer_by(Instant::now(), open.budget.open_within_ms);
    let (client, next) = match check_open(&server, from, &open) {
        Ok(x) => x,
        // Nothing is signed for an Open that did not pass: its session, client and route
        // are only its sender's word, and a report signed for them could be carried up
        // a real session by a hop that is not this one's neighbour there. The hop before
        // (or the client) names this hop for the error itself.
        Err(e) => {
            let _ = up_tx.send(&InferResponse::Error(e), SEND_TIMEOUT).await;
            return;
        }
    };
    // From here on the session is the real one: its opener is the hop before in its
    // route (or its client), so a report signed for it can only travel up that route.
    let reports = Reports::new(&server, &open);
    let refuse = |e: ProtocolError| reports.fail(0, open.hop, &server.me, e.code, e.message);
    // The next hop must be a server: one with a valid announcement for this model that
    // covers its span, dialed only at that announcement's addresses.
    let next = match next {
        None => None,
        Some(mut hop) => {
            let want = super::announce::Wanted {
                peer: hop.peer,
                model: open.model_id,
                compute: &open.compute,
                blocks: open.route[hop.index].blocks,
            };
            // The lookup comes out of this hop's share; the next hop needs the rest.
            let lookup_by = answer_by
                .checked_sub(ANSWER_MARGIN + LEAST_OPEN_WITHIN)
                .unwrap_or(answer_by);
            let found =
                tokio::time::timeout_at(lookup_by, server.next_hops.addresses(&server.net, &want))
                    .await;
            let Ok(found) = found else {
                let e = ProtocolError::new(
                    ErrorCode::Busy,
                    "this server had no time left to look up the next hop",
                );
                let _ = up_tx.send(&refuse(e), SEND_TIMEOUT).await;
                return;
            };
            match found {
                Ok(addrs) => {
                    hop.addrs = addrs;
                    Some(hop)
                }
                Err(msg) => {
                    server.table.warn("next-hop", || {
                        format!("refusing session {session} from {from}: {msg}")
                    });
                    let fail = reports.fail(0, hop.index, &hop.peer, ErrorCode::BadRequest, msg);
                    let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                    return;
                }
            }
        }
    };
    // Making room (a slot below, memory further on) comes out of this hop's share of
    // the time to answer too (a hop with a next one keeps what opening it needs).
    let evict_by = if next.is_some() {
        answer_by
            .checked_sub(ANSWER_MARGIN + LEAST_OPEN_WITHIN)
            .unwrap_or(answer_by)
    } else {
        answer_by
    };
    let mut opened = server.table.open(session, client, from, next.is_none());
    // Every slot taken: the session idle longest (at least `EVICT_AFTER_IDLE`) makes
    // room, as for memory, so that sessions kept open without stepping cannot hold the
    // server; one eviction an open, its slot free once its task has ended.
    if matches!(opened, Err(super::sessions::TableError::Full { .. }))
        && Instant::now() < evict_by
        && server.table.evict_idlest(EVICT_AFTER_IDLE).is_some()
    {
        // Until the evicted session has told its client and ended (within the time
        // this hop has to answer).
        while server.table.free() == 0 && Instant::now() < evict_by {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        opened = server.table.open(session, client, from, next.is_none());
    }
    let mut reservation = match opened {
        Ok(r) => r,
        Err(e) => {
            // Full is this server's own state: a signed report. The other refusals are
            // of what the opener did (too many sessions, an id twice), so nothing is
            // signed: the hop before (or the client) names this hop for the error, and a
            // hostile opener gets no report of this server against itself to carry up.
            let answer = match e {
                super::sessions::TableError::Full { .. } => {
                    refuse(ProtocolError::new(ErrorCode::Busy, e.to_string()))
                }
                super::sessions::TableError::ClientFull { .. }
                | super::sessions::TableError::OpenerFull { .. } => {
                    server.table.warn("client-sessions", || {
                        format!("refusing session {session}: {e}")
                    });
                    InferResponse::Error(ProtocolError::new(ErrorCode::Busy, e.to_string()))
                }
                _ => InferResponse::Error(ProtocolError::new(ErrorCode::BadRequest, e.to_string())),
            };
            let _ = up_tx.send(&answer, SEND_TIMEOUT).await;
            return;
        }
    };
    let _open = crate::metrics::global().session(crate::metrics::Side::Server);
    let limits = CacheLimits {
        max_tokens: (open.budget.max_tokens as usize).min(server.cfg.max_session_tokens),
        ..CacheLimits::default()
    };
    // The most this session's cache may hold comes out of the server's KV budget now,
    // so that memory is promised before it is used, never overcommitted.
    let need = limits.max_tokens.saturating_mul(server.kv_per_token);
    let mut kv = server.kv_budget.try_take(need);
    // Full: make room by evicting idle sessions, the idlest first.
    while kv.is_none()
        && Instant::now() < evict_by
        && server.table.evict_idlest(EVICT_AFTER_IDLE).is_some()
    {
        let deadline = (Instant::now() + EVICT_WAIT).min(evict_by);
        while kv.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            kv = server.kv_budget.try_take(need);
        }
    }
    let Some(_kv) = kv else {
        let e = ProtocolError::new(
            ErrorCode::Busy,
            format!(
                "this server's KV budget is full ({} of {} MB promised; this session needs {} MB)",
                server.kv_budget.taken() / (1024 * 1024),
                server.kv_budget.max() / (1024 * 1024),
                need.div_ceil(1024 * 1024)
            ),
        );
        let _ = up_tx.send(&refuse(e), SEND_TIMEOUT).await;
        return;
    };
    let mut free = u32::try_from(limits.max_tokens).unwrap_or(u32::MAX);
    let mut tasks = JoinSet::new();
    let mut down = None;
    if let Some(hop) = next {
        match open_next(&server, &open, &hop, answer_by, &reports).await {
            // Every server holds what the session asks for or refuses, naming itself:
            // less is the next hop's lie (it would end the session unattributed).
            Ok((_, tx, next_free)) if next_free < free => {
                let msg = format!(
                    "answered Open with room for {next_free} tokens, fewer than the {free} asked"
                );
                let _ = up_tx
                    .send(
                        &reports.fail(0, hop.index, &hop.peer, ErrorCode::BadRequest, msg),
                        SEND_TIMEOUT,
                    )
                    .await;
                tx.close().await;
                return;
            }
            Ok((rx, tx, next_free)) => {
                free = free.min(next_free);
                down = Some(Downstream {
                    rx: pump(&mut tasks, rx, DOWN_DEPTH, DOWN_FRAME_MAX, None),
                    tx,
                    hop,
                    waiting: VecDeque::new(),
                });
            }
            Err(fail) => {
                let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                return;
            }
        }
    }
    #[cfg(feature = "fault-injection")]
    let free = crate::fault::room(free);
    if up_tx
        .send(
            &InferResponse::Opened {
                session,
                free_tokens: free,
            },
            SEND_TIMEOUT,
        )
        .await
        .is_err()
    {
        return;
    }
    // A frame longer than the session's token cap allows is refused before it is read.
    let frame_cap = limits
        .max_tokens
        .saturating_mul(server.span.config().hidden_size)
        .saturating_mul(4)
        .saturating_add(FRAME_OVERHEAD)
        .min(open.budget.max_message_bytes as usize);
    // Cancelled when the stream from the hop before ends (it left, or broke it).
    let upstream_gone = CancellationToken::new();
    let mut up = pump::<InferRequest>(
        &mut tasks,
        up_rx,
        UP_DEPTH,
        frame_cap,
        Some(upstream_gone.clone()),
    );
    let mut cache = Some(server.span.new_cache(limits));
    let mut pace = batch::Pace::new(&server.batch);
    let mut attach: Option<FrameWriter> = None;
    let idle = server.cfg.idle_timeout.min(Duration::from_millis(u64::from(
        open.budget.idle_timeout_ms,
    )));
    let me = server.me;
    let hop = open.hop;
    // A session that never steps is freed soon: each hop before this one has its first
    // step to compute before this one gets it.
    let first_step_wait = first_step_wait(server.table.limits().first_step_timeout, hop);
    let first_step_by = Instant::now() + first_step_wait;
    // Waiting for its first step (the hops before compute the prompt) is no idleness.
    reservation.touch_until(first_step_by);
    let mut stepped = false;
    // A client numbers its steps 1, 2, 3…, and a step refused anywhere ends the session
    // on every hop: any other number came from a hop that changed it (the client would
    // blame the last hop for the output's wrong number).
    let mut next_step: u64 = 1;
    let mut told_leaving = false;
    let end = loop {
        let ack_deadline = down
            .as_ref()
            .and_then(|d| d.waiting.front().map(|(_, t)| *t));
        tokio::select! {
            _ = cancel.cancelled() => break End::Cancelled,
            _ = tokio::time::sleep(if stepped {
                idle
            } else {
                first_step_by.saturating_duration_since(Instant::now()).min(idle)
            }) => {
                if stepped || Instant::now() < first_step_by {
                    break End::Idle;
                }
                let e = ProtocolError::new(
                    ErrorCode::Timeout,
                    format!("session {session} sent no step within {first_step_wait:?} of opening; freed"),
                );
                let _ = up_tx.send(&InferResponse::Error(e), REFUSE_TIMEOUT).await;
                break End::NeverStepped;
            }
            _ = reservation.evicted.cancelled() => {
                let e = ProtocolError::new(
                    ErrorCode::OverBudget,
                    format!(
                        "session {session} was evicted after being idle: this server needed its room for a new session"
                    ),
                );
                let _ = up_tx.send(&reports.fail(0, hop, &me, e.code, e.message), SEND_TIMEOUT).await;
                break End::Evicted;
            }
            _ = server.leaving.cancelled(), if !told_leaving => {
                // Not an error for the client: it moves the session to another route.
                told_leaving = true;
                let notice = reports.fail(0, hop, &me, ErrorCode::Busy, "this server is leaving");
                if up_tx.send(&notice, SEND_TIMEOUT).await.is_err() {
                    break End::UpstreamGone("cannot tell it we leave".into());
                }
            }
            w = reservation.attached.recv() => {
                if let Some(w) = w {
                    attach = Some(w);
                }
            }
            _ = async { tokio::time::sleep_until(ack_deadline.unwrap_or_else(Instant::now)).await },
                if ack_deadline.is_some() => {
                let Some(d) = down.as_mut() else { break End::Failed };
                // Acknowledgements already queued are not timeouts.
                let mut late = true;
                while let Ok(item) = d.rx.try_recv() {
                    if !downstream_event(d, item, &mut up_tx, &reports).await {
                        break;
                    }
                    late = d.waiting.front().is_some_and(|(_, t)| *t <= Instant::now());
                }
                if late && let Some((step, _)) = d.waiting.front().copied() {
                    let msg = format!(
                        "no acknowledgement of step {step} within {:?}",
                        ack_timeout(1, d.hop.step_us)
                    );
                    let fail = reports.fail(step, d.hop.index, &d.hop.peer, ErrorCode::Timeout, msg);
                    let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                    break End::Failed;
                }
            }
            item = async {
                match down.as_mut() {
                    Some(d) => d.rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(d) = down.as_mut() else { break End::Failed };
                let Some(item) = item else { break End::Failed };
                if !downstream_event(d, item, &mut up_tx, &reports).await {
                    break End::Failed;
                }
            }
            item = up.recv() => {
                let req = match item {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => break End::UpstreamGone(e.to_string()),
                    None => break End::UpstreamGone("stream ended".into()),
                };
                match req {
                    InferRequest::Forward { session: s, position, step, hidden, last_row_only } if s == session => {
                        reservation.touch();
                        stepped = true;
                        if step != next_step || !last_row_only {
                            let msg = if step != next_step {
                                format!("step {step} came where step {next_step} was due")
                            } else {
                                format!("step {step} asks for every row of its output; servers send the last row only")
                            };
                            let fail = reports.refuse_input(step, &me, &from, ErrorCode::BadRequest, msg);
                            let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                            break End::Failed;
                        }
                        next_step = step.saturating_add(1);
                        #[cfg(feature = "fault-injection")]
                        if crate::fault::forges()
                            && let Some(forged) = reports.forged(step)
                        {
                            let _ = up_tx.send(&forged, SEND_TIMEOUT).await;
                            break End::Failed;
                        }
                        // Against the session's token cap before anything is decoded.
                        let rows = hidden.shape().get(1).copied().unwrap_or(0) as usize;
                        if rows == 0 || (position as usize).saturating_add(rows) > limits.max_tokens {
                            pace.interrupted();
                            let msg = format!(
                                "a step of {rows} tokens at position {position} passes this session's cap of {} tokens",
                                limits.max_tokens
                            );
                            let fail = reports.refuse_input(step, &me, &from, ErrorCode::OverBudget, msg);
                            let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                            break End::Failed;
                        }
                        let _timer = crate::metrics::global().server_step(hop);
                        let Some(c) = cache.take() else { break End::Failed };
                        let tokens = hidden.shape().get(1).copied().unwrap_or(1) as usize;
                        let (c, result) = compute(&server, c, &hidden, position, &mut pace, &upstream_gone).await;
                        cache = c;
                        // Busy until now: a long prompt is no idle session to evict.
                        reservation.touch();
                        let out = match result {
                            Ok(out) => out,
                            // Nobody is left to tell (a prompt in parts stops so).
                            Err(_) if upstream_gone.is_cancelled() => {
                                break End::UpstreamGone("stream ended during a step".into())
                            }
                            // A step this hop refuses as malformed names the hop that sent it.
                            // A refused step ends the session: the client moves to a new one,
                            // and the hops after this one never see a gap in the steps.
                            Err(e) if e.code == ErrorCode::BadRequest => {
                                let fail = reports.refuse_input(step, &me, &from, e.code, e.message);
                                let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                                break End::Failed;
                            }
                            Err(e) => {
                                let fail = reports.fail(step, hop, &me, e.code, e.message);
                                let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                                break End::Failed;
                            }
                        };
                        server.steps.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::global().tokens_processed(tokens);
                        let sent = match down.as_mut() {
                            Some(d) => send_down(d, session, position, step, out, last_row_only, tokens, open.wire_dtype).await,
                            None => send_output(&mut attach, &mut reservation, session, position, step, &out, last_row_only, open.wire_dtype).await,
                        };
                        if let Err(fail) = sent {
                            let fail = match fail {
                                Failure::Next(code, msg) => match down.as_mut() {
                                    Some(d) => match queued_report(&mut d.rx, &d.hop, &reports, step, CAUSE_WAIT).await {
                                        Some(report) => report,
                                        None => reports.fail(step, d.hop.index, &d.hop.peer, code, msg),
                                    },
                                    None => reports.fail(step, hop, &me, code, msg),
                                },
                                Failure::Here(code, msg) => reports.fail(step, hop, &me, code, msg),
                            };
                            let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
                            break End::Failed;
                        }
                        if up_tx.send(&InferResponse::Ack { session, step }, SEND_TIMEOUT).await.is_err() {
                            break End::UpstreamGone("cannot acknowledge".into());
                        }
                        // Waiting on the next hop is no idleness: not before its answer is due.
                        if let Some(&(_, due)) = down.as_ref().and_then(|d| d.waiting.back()) {
                            reservation.touch_until(due);
                        }
                    }
                    InferRequest::Close { session: s } if s == session => break End::Closed,
                    other => {
                        let e = ProtocolError::new(
                            ErrorCode::BadRequest,
                            format!("{} on an open session stream of session {session}", kind(&other)),
                        );
                        let _ = up_tx.send(&reports.refuse_input(0, &me, &from, e.code, e.message), SEND_TIMEOUT).await;
                        break End::Failed;
                    }
                }
            }
        }
    };
    pace.leave(&server.batch);
    match &end {
        End::Closed => tracing::debug!("session {session} closed"),
        End::UpstreamGone(why) => tracing::info!("session {session}: the hop before left ({why})"),
        End::Failed => tracing::info!("session {session} ended after a failure"),
        End::Idle => tracing::info!("closing session {session} after {idle:?} idle"),
        End::NeverStepped => server.table.warn("never-stepped", || {
            format!("freed session {session}: no step within {first_step_wait:?} of opening")
        }),
        End::Evicted => tracing::info!("evicted idle session {session} to make room"),
        End::Cancelled => tracing::debug!("session {session} cancelled"),
    }
    // Pass the end on, so the rest of the chain frees its caches now.
    if let Some(mut d) = down {
        let _ =
            d.tx.send(&InferRequest::Close { session }, SEND_TIMEOUT)
                .await;
        d.tx.close().await;
    }
    if matches!(end, End::Closed) {
        let _ = up_tx
            .send(&InferResponse::Closed { session }, SEND_TIMEOUT)
            .await;
    }
    up_tx.close().await;
    if let Some(a) = attach {
        a.close().await;
    }
    drop(reservation);
    tasks.shutdown().await;
}

/// The binding of a session `session` of `client` over `route` (the rest of its `Open`
/// fixed), for tests of reports.
#[cfg(test)]
pub(crate) fn binding_for(
    session: SessionId,
    route: &[RouteHop],
    client: PeerIdBytes,
) -> SessionBinding {
    SessionBinding::of_open(&InferRequest::Open {
        session,
        model_id: pollen_protocol::ModelId::from_bytes([1; 32]),
        route: route.to_vec(),
        hop: 0,
        budget: SessionBudget {
            max_tokens: 64,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 1_000,
            open_within_ms: 10_000,
        },
        wire_dtype: pollen_protocol::WireDType::F32,
        compute: "fast/cpu".into(),
        client,
    })
    .unwrap_or_else(|| unreachable!("an Open"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ack_timeouts_follow_the_announced_pace() {
        assert_eq!(ack_timeout(1, 0), ACK_BASE);
        assert_eq!(ack_timeout(1, 10_000), ACK_BASE + Duration::from_millis(40));
        assert_eq!(
            ack_timeout(512, 10_000),
            ACK_BASE + Duration::from_millis(40 * 512)
        );
        // A hop cannot buy itself more than a second per token by announcing a slow pace.
        assert_eq!(ack_timeout(1, u32::MAX), ACK_BASE + 4 * MAX_STEP);
    }

    #[test]
    fn each_hop_answers_an_open_before_the_hop_before_gives_up() {
        let t0 = Instant::now();
        // A route of any length: each hop gives the next what it has left, less the
        // margin, so that the next hop's failure (naming the hop after it) comes back in
        // time; the opener's claim is capped.
        let mut arrival = t0;
        let mut deadline = answer_by(arrival, 80_000);
        assert_eq!(deadline - t0, Duration::from_secs(79));
        let mut hops = 1;
        // Each hop spends 7 s looking its next hop up and 3 s dialing; the Open then
        // takes 50 ms to arrive, and an answer as long to come back.
        let (work, transit) = (Duration::from_secs(10), Duration::from_millis(50));
        while let Some(next) = next_within(deadline, arrival + work) {
            let next_arrival = arrival + work + transit;
            let next_deadline = answer_by(next_arrival, next.as_millis() as u32);
            assert!(
                next_deadline + transit + ANSWER_MARGIN / 2 <= deadline,
                "hop {hops}"
            );
            (arrival, deadline) = (next_arrival, next_deadline);
            hops += 1;
        }
        // Each hop has 12 s less than the one before (its 10 s of work, a margin each
        // way and the transit): seven hops open before one has no time left.
        assert_eq!(hops, 7);
        // The claim is capped.
        assert_eq!(answer_by(t0, u32::MAX) - t0, Duration::from_secs(79));
        assert_eq!(
            next_within(t0 + Duration::from_secs(3), t0),
            Some(LEAST_OPEN_WITHIN)
        );
        assert_eq!(next_within(t0 + Duration::from_millis(2_999), t0), None);
    }

    #[test]
    fn the_first_step_wait_grows_with_the_hop_only_so_far() {
        let per_hop = Duration::from_secs(10);
        assert_eq!(first_step_wait(per_hop, 0), per_hop);
        assert_eq!(first_step_wait(per_hop, 2), 3 * per_hop);
        // A hop number named by the opener cannot hold a slot longer than this.
        assert_eq!(first_step_wait(per_hop, 3), 4 * per_hop);
        assert_eq!(first_step_wait(per_hop, 127), 4 * per_hop);
        assert_eq!(first_step_wait(per_hop, usize::MAX), 4 * per_hop);
    }

    /// Hop `i`'s secret and peer id, for routes of signed reports.
    fn key(i: usize) -> ([u8; 32], PeerId) {
        let secret = [u8::try_from(i).unwrap() + 1; 32];
        let peer = libp2p::identity::Keypair::ed25519_from_bytes(secret)
            .unwrap()
            .public()
            .to_peer_id();
        (secret, peer)
    }

    /// The binding of session `session` of client 9 over `route`.
    fn binding_of(session: u64, route: &[RouteHop]) -> SessionBinding {
        binding_for(SessionId(session), route, PeerIdBytes(key(9).1.to_bytes()))
    }

    /// Hop `by`'s reports on a route of three hops (blocks 0:10, 10:20, 20:30).
    fn reports_of(by: usize) -> Reports {
        let route: Vec<RouteHop> = (0..3)
            .map(|i| RouteHop {
                peer: PeerIdBytes(key(i).1.to_bytes()),
                blocks: pollen_protocol::BlockRange::new(i as u32 * 10, i as u32 * 10 + 10)
                    .unwrap(),
                addrs: vec![],
                step_us: 1_000,
            })
            .collect();
        Reports {
            secret: key(by).0,
            binding: binding_of(3, &route),
            route,
            by,
        }
    }

    /// Hop 1 of [`reports_of`]'s route, as the hop before it sees it.
    fn hop_one() -> NextHop {
        NextHop {
            index: 1,
            peer: key(1).1,
            addrs: vec![],
            step_us: 1_000,
        }
    }

    /// A hop passes on a report from below only if it checks out; otherwise it reports,
    /// in its own name, that the next hop sent one that does not.
    #[test]
    fn a_report_from_below_is_passed_on_only_if_it_checks_out() {
        let first = reports_of(0);
        let next = hop_one();
        let err = |m: &str| (ErrorCode::Internal, m.to_string());
        let check = |r: &InferResponse| check_report(r, &first.binding, &first.route);
        // Hop 2's own report, and its report that hop 1 sent it NaN.
        for (hop, (code, msg)) in [(2, err("it broke")), (1, err("NaN from the hop before"))] {
            let real = reports_of(2).fail(4, hop, &key(hop).1, code, msg);
            assert_eq!(first.relay(real.clone(), 4, &next), real);
        }
        // Hop 1 writes a report in hop 2's name (signed with its own key), sends up hop
        // 2's report from another session, or one about hop 0 in hop 0's name.
        let mut forged = reports_of(1);
        forged.by = 2;
        let forged = forged.fail(4, 2, &key(2).1, ErrorCode::Internal, "made up");
        let mut elsewhere = reports_of(2);
        elsewhere.binding = binding_of(4, &elsewhere.route);
        let elsewhere = elsewhere.fail(4, 2, &key(2).1, ErrorCode::Internal, "it broke");
        for bad in [forged, elsewhere] {
            assert!(check(&bad).is_err());
            let passed = first.relay(bad, 4, &next);
            let InferResponse::HopFailed { hop, by, error, .. } = &passed else {
                panic!("a report");
            };
            assert_eq!((*hop, *by, error.code), (1, 0, ErrorCode::BadRequest));
            assert!(
                error.message.contains("does not check out"),
                "{}",
                error.message
            );
            assert_eq!(check(&passed), Ok(pollen_protocol::Reported::HopAfter));
        }
        // A genuine report of this hop (or of one before it) cannot come from below.
        let mine = first.fail(4, 1, &key(1).1, ErrorCode::Internal, "from above");
        assert!(check(&mine).is_ok());
        let InferResponse::HopFailed { by, error, .. } = first.relay(mine, 4, &next) else {
            panic!("a report");
        };
        assert_eq!(by, 0);
        assert!(
            error
                .message
                .contains("written by this hop or one before it")
        );
    }

    /// A send to the next hop failed: the hop waits a moment for what the next hop sent
    /// up first. A report from below is passed on as `relay` passes it (a forged one
    /// becomes this hop's report about the next), the next hop's plain error becomes
    /// this hop's report naming it with its code, and silence or the stream's end give
    /// nothing (the caller reports the failed send).
    #[tokio::test(start_paused = true)]
    async fn a_failed_send_waits_briefly_for_the_next_hops_report() {
        use crate::serve::steps::queued_report;
        let first = reports_of(0);
        let next = hop_one();
        let wait = CAUSE_WAIT;
        let (tx, mut rx) = mpsc::channel(8);
        let about = |r: &InferResponse| match r {
            InferResponse::HopFailed { hop, by, error, .. } => (*hop, *by, error.code),
            other => panic!("a report, not {other:?}"),
        };
        // Hop 2's own report, after an acknowledgement: passed on as it is.
        let real = reports_of(2).fail(4, 2, &key(2).1, ErrorCode::OverBudget, "no room");
        tx.send(Ok(InferResponse::Ack {
            session: SessionId(3),
            step: 3,
        }))
        .await
        .unwrap();
        tx.send(Ok(real.clone())).await.unwrap();
        assert_eq!(
            queued_report(&mut rx, &next, &first, 4, wait).await,
            Some(real)
        );
        // A report in hop 2's name that hop 1 wrote: hop 1 is named, by hop 0.
        let mut forger = reports_of(1);
        forger.by = 2;
        let forged = forger.fail(4, 2, &key(2).1, ErrorCode::Internal, "made up");
        tx.send(Ok(forged)).await.unwrap();
        let got = queued_report(&mut rx, &next, &first, 4, wait)
            .await
            .unwrap();
        assert_eq!(about(&got), (1, 0, ErrorCode::BadRequest));
        // The next hop's plain error, in its own code, naming it.
        let busy = ProtocolError::new(ErrorCode::Busy, "no time left");
        tx.send(Ok(InferResponse::Error(busy))).await.unwrap();
        let got = queued_report(&mut rx, &next, &first, 4, wait)
            .await
            .unwrap();
        assert_eq!(about(&got), (1, 0, ErrorCode::Busy));
        assert_eq!(
            check_report(&got, &first.binding, &first.route),
            Ok(pollen_protocol::Reported::HopAfter)
        );
        // A report that arrives during the wait ends it then.
        let soon = tx.clone();
        let in_time = reports_of(2).fail(4, 2, &key(2).1, ErrorCode::Internal, "in time");
        let want = in_time.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait - Duration::from_millis(1)).await;
            soon.send(Ok(in_time)).await.unwrap();
        });
        let started = tokio::time::Instant::now();
        assert_eq!(
            queued_report(&mut rx, &next, &first, 4, wait).await,
            Some(want)
        );
        assert_eq!(started.elapsed(), wait - Duration::from_millis(1));
        // Silence: nothing, after the wait and no longer.
        let started = tokio::time::Instant::now();
        assert_eq!(queued_report(&mut rx, &next, &first, 4, wait).await, None);
        assert_eq!(started.elapsed(), wait);
        // The stream ends: nothing, at once.
        drop(tx);
        let started = tokio::time::Instant::now();
        assert_eq!(queued_report(&mut rx, &next, &first, 4, wait).await, None);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A hop that refuses its input names the hop before it; the first hop, whose input
    /// is the client's, names itself.
    #[test]
    fn a_refused_input_names_the_hop_that_sent_it() {
        use pollen_protocol::Reported::{HopBefore, Itself};
        for (by, named, about) in [(0, 0, Itself), (1, 0, HopBefore), (2, 1, HopBefore)] {
            let r = reports_of(by);
            let report = r.refuse_input(5, &key(by).1, &key(named).1, ErrorCode::BadRequest, "NaN");
            let InferResponse::HopFailed { hop, .. } = &report else {
                panic!("a report");
            };
            assert_eq!(*hop as usize, named);
            assert_eq!(check_report(&report, &r.binding, &r.route), Ok(about));
        }
    }

    #[test]
    fn the_largest_frame_a_next_hop_may_send_fits_its_cap() {
        use pollen_protocol::limits::{MAX_ERROR_MESSAGE_LEN, MAX_PEER_ID_BYTES};
        let error = ProtocolError::new(ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE_LEN / 2));
        let largest = [
            InferResponse::HopFailed {
                session: SessionId(u64::MAX),
                step: u64::MAX,
                hop: u32::MAX,
                peer: PeerIdBytes(vec![0xff; MAX_PEER_ID_BYTES]),
                error: error.clone(),
                by: u32::MAX,
                signature: [0xff; 64],
            },
            InferResponse::Error(error),
            InferResponse::Ack {
                session: SessionId(u64::MAX),
                step: u64::MAX,
            },
        ];
        for msg in &largest {
            msg.validate().unwrap();
            let len = pollen_protocol::codec::encoded_len(msg);
            assert!(len <= DOWN_FRAME_MAX, "{msg:?} takes {len} bytes");
        }
        const { assert!(DOWN_DEPTH <= 4) };
    }
}
