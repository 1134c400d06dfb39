//! The steps of a session's data path: computing the span under a compute permit,
//! sending its output on (down to the next hop, or up the client's attach stream), and
//! reading what the next hop says back.

use super::Server;
use super::batch::{self, NotRun};
use super::session::{ATTACH_WAIT, Downstream, NextHop, Reports, SEND_TIMEOUT, ack_timeout};
use super::sessions::Reservation;
use crate::net::stream::FrameWriter;
use crate::wire::{check_shape, from_wire, last_row, to_wire};
use pollen_protocol::{
    ErrorCode, HiddenStates, InferRequest, InferResponse, ProtocolError, SessionId, WireDType,
};
use pollen_shard::{ShardError, SpanCache};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Handles one frame from the next hop; `false` when the session cannot go on.
pub(super) async fn downstream_event(
    d: &mut Downstream,
    item: std::io::Result<InferResponse>,
    up_tx: &mut FrameWriter,
    reports: &Reports,
) -> bool {
    let step = d.waiting.front().map(|(s, _)| *s).unwrap_or(0);
    let fail = match item {
        Ok(InferResponse::Ack { step: acked, .. }) => {
            while d.waiting.front().is_some_and(|(s, _)| *s <= acked) {
                d.waiting.pop_front();
            }
            return true;
        }
        Ok(InferResponse::Closed { .. }) => return true,
        Ok(f @ InferResponse::HopFailed { .. }) => reports.relay(f, step, &d.hop),
        Ok(InferResponse::Error(e)) => {
            reports.fail(step, d.hop.index, &d.hop.peer, e.code, e.message)
        }
        Ok(other) => reports.fail(
            step,
            d.hop.index,
            &d.hop.peer,
            ErrorCode::BadRequest,
            format!("sent {other:?} on a session stream"),
        ),
        Err(e) => reports.fail(
            step,
            d.hop.index,
            &d.hop.peer,
            ErrorCode::Unreachable,
            format!("its stream broke: {e}"),
        ),
    };
    let _ = up_tx.send(&fail, SEND_TIMEOUT).await;
    false
}

/// The report the next hop sent up before its stream broke, if it comes within
/// `wait`: a hop that refuses a step ends its session and drops its stream, so a send
/// to it may fail before its report, which names the hop to blame, has been read.
pub(super) async fn queued_report(
    rx: &mut mpsc::Receiver<std::io::Result<InferResponse>>,
    next: &NextHop,
    reports: &Reports,
    step: u64,
    wait: std::time::Duration,
) -> Option<InferResponse> {
    let found = tokio::time::timeout(wait, async {
        loop {
            match rx.recv().await {
                Some(Ok(f @ InferResponse::HopFailed { .. })) => {
                    return Some(reports.relay(f, step, next));
                }
                // Its own error, in its own words and code (as `downstream_event`).
                Some(Ok(InferResponse::Error(e))) => {
                    return Some(reports.fail(step, next.index, &next.peer, e.code, e.message));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await;
    found.ok().flatten()
}

/// A failure at this hop or at the next.
pub(super) enum Failure {
    /// This hop failed.
    Here(ErrorCode, String),
    /// The next hop failed.
    Next(ErrorCode, String),
}

/// A step of `rows` tokens needing `need` bytes of working memory that the memory budget
/// has no room for.
fn over_budget(server: &Server, rows: usize, need: usize) -> ProtocolError {
    let mb = |b: usize| b.div_ceil(1024 * 1024);
    let budget = &server.kv_budget;
    ProtocolError::new(
        ErrorCode::OverBudget,
        format!(
            "a step of {rows} tokens needs {} MB of working memory; this server's \
             memory budget has {} of {} MB free",
            mb(need),
            mb(budget.max().saturating_sub(budget.taken())),
            mb(budget.max())
        ),
    )
}

/// Runs the span over `hidden` at `position` under a compute permit. Gives back the cache
/// (`None` if it was lost with a panicked compute task). A one-token step is computed
/// together with the other sessions' decode steps waiting at the same time
/// ([`super::batch`]); its output is the same.
pub(super) async fn compute(
    server: &Server,
    cache: SpanCache,
    hidden: &HiddenStates,
    position: u32,
    pace: &mut batch::Pace,
    upstream_gone: &tokio_util::sync::CancellationToken,
) -> (
    Option<SpanCache>,
    Result<candle_core::Tensor, ProtocolError>,
) {
    // The step's shape, then the step against its session's cache, before anything
    // else: a malformed shape, a position the cache does not hold or a step past the
    // session's limits is refused before it is given memory (which its rows and its
    // position would size), a compute permit or a place in a batch.
    let rows = match check_shape(hidden, server.span.config().hidden_size) {
        Ok(rows) => rows,
        Err(e) => {
            return (
                Some(cache),
                Err(ProtocolError::new(ErrorCode::BadRequest, e.to_string())),
            );
        }
    };
    if let Err(e) = server.span.check_step(&cache, position as usize, rows) {
        return (
            Some(cache),
            Err(ProtocolError::new(code_of(&e), e.to_string())),
        );
    }
    // A long prompt takes a permit per part (see `batch::in_parts`).
    let parts = batch::parts_of(rows, server.prompt_parts);
    // The step's activations come out of the server's one memory budget (with the KV
    // caches), taken before its input is decoded, given back when it is done. A prompt
    // in parts takes here its decoded input's share, and the rest with its parts' permits
    // (see `batch::in_parts`); a decode step (its input one row) takes it in its batch.
    let need = match parts {
        None => server.span.step_memory_bytes(rows, position as usize),
        Some(_) => batch::input_bytes(&server.span, rows),
    };
    // A batched step takes its permit and its memory in the batch; any other takes a
    // permit first: steps waiting their turn hold no working memory.
    let batched = rows == 1 && server.batch.batches();
    // The next decode step's gap is the session's usual one only after a decode step
    // that went through the batch queue.
    if batched {
        pace.arrived(&server.batch);
    } else {
        pace.interrupted();
    }
    let _permit = if batched || parts.is_some() {
        None
    } else {
        match server.permits.acquire().await {
            Ok(p) => Some(p),
            Err(_) => {
                return (
                    Some(cache),
                    Err(ProtocolError::new(ErrorCode::Busy, "server stopping")),
                );
            }
        }
    };
    let memory = if batched {
        None
    } else {
        match server.kv_budget.try_take(need) {
            Some(m) => Some(m),
            None => return (Some(cache), Err(over_budget(server, rows, need))),
        }
    };
    // On a GPU every device operation stays inside the compute task, under its one
    // permit: the input is decoded and checked on the CPU, and the output comes back
    // to the CPU before the task ends. (Concurrent sessions whose tensors were made and
    // read on the GPU from other threads got garbage on an H200.)
    let input = match from_wire(
        hidden,
        server.span.config().hidden_size,
        &candle_core::Device::Cpu,
    ) {
        Ok(t) => t,
        Err(e) => {
            return (
                Some(cache),
                Err(ProtocolError::new(ErrorCode::BadRequest, e.to_string())),
            );
        }
    };
    #[cfg(feature = "fault-injection")]
    let input = crate::fault::received(input);
    // NaN or infinities from the hop before: reported as such (the client, which cannot
    // tell which of the two is at fault, treats the report as a dispute).
    if let Err(e) = crate::client::check::hidden(&input, 0, server.span.config().hidden_size) {
        let msg = format!("{}: {e}", crate::client::check::NON_FINITE_INPUT);
        return (
            Some(cache),
            Err(ProtocolError::new(ErrorCode::BadRequest, msg)),
        );
    }
    // A decode step through the batch queue, or a prompt in parts (the two never meet:
    // one row against more than the least part).
    let joined = if batched || parts.is_some() {
        let position = position as usize;
        let run = match parts {
            Some(part) => {
                batch::in_parts(server, input, position, cache, part, upstream_gone).await
            }
            None => batch::decode(server, input, position, cache, need, pace).await,
        };
        match run {
            Ok(r) => Ok(r),
            Err(NotRun::Lost(e)) => Err(e),
            Err(NotRun::Stopping(cache)) => {
                return (
                    Some(cache),
                    Err(ProtocolError::new(ErrorCode::Busy, "server stopping")),
                );
            }
            Err(NotRun::Gone(cache)) => {
                return (
                    Some(cache),
                    Err(ProtocolError::new(ErrorCode::Busy, "the hop before left")),
                );
            }
            Err(NotRun::OverBudget(cache, rows, part)) => {
                // What the step needed in all, against what is free once it gave it back.
                drop(memory);
                let need = need.saturating_add(part);
                return (Some(cache), Err(over_budget(server, rows, need)));
            }
        }
    } else {
        let span = server.span.clone();
        let mut cache = cache;
        let step = move || {
            let out = span
                .forward(&input, position as usize, &mut cache)
                .and_then(|o| Ok(o.to_device(&candle_core::Device::Cpu)?));
            (cache, out)
        };
        // A GPU's work stays on the blocking pool, as does any prompt.
        let lone = rows == 1 && server.computes_alone();
        server.lone_steps.run(lone, step).await
    };
    match joined {
        Err(e) => (
            None,
            Err(ProtocolError::new(
                ErrorCode::Internal,
                format!("compute task failed: {e}"),
            )),
        ),
        // The span leaves the cache as it was when a step fails.
        #[cfg(feature = "fault-injection")]
        Ok((cache, Ok(out))) => (Some(cache), Ok(crate::fault::apply(out))),
        #[cfg(not(feature = "fault-injection"))]
        Ok((cache, Ok(out))) => (Some(cache), Ok(out)),
        Ok((cache, Err(e))) => (
            Some(cache),
            Err(ProtocolError::new(code_of(&e), e.to_string())),
        ),
    }
}

/// The code a step's refusal by the engine goes back with: a step past its session's
/// limits is over budget, one at a position its cache does not hold is the sender's
/// fault, anything else this server's.
fn code_of(e: &ShardError) -> ErrorCode {
    match e {
        ShardError::CacheFull { .. } => ErrorCode::OverBudget,
        ShardError::PositionMismatch { .. } => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn send_down(
    d: &mut Downstream,
    session: SessionId,
    position: u32,
    step: u64,
    out: candle_core::Tensor,
    last_row_only: bool,
    tokens: usize,
    dtype: WireDType,
) -> Result<(), Failure> {
    let hidden =
        to_wire(&out, dtype).map_err(|e| Failure::Here(ErrorCode::Internal, e.to_string()))?;
    let msg = InferRequest::Forward {
        session,
        position,
        step,
        hidden,
        last_row_only,
    };
    d.tx.send(&msg, SEND_TIMEOUT)
        .await
        .map_err(|e| Failure::Next(ErrorCode::Unreachable, format!("sending step {step}: {e}")))?;
    d.waiting
        .push_back((step, Instant::now() + ack_timeout(tokens, d.hop.step_us)));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn send_output(
    attach: &mut Option<FrameWriter>,
    reservation: &mut Reservation<FrameWriter>,
    session: SessionId,
    position: u32,
    step: u64,
    out: &candle_core::Tensor,
    last_row_only: bool,
    dtype: WireDType,
) -> Result<(), Failure> {
    if attach.is_none() {
        match tokio::time::timeout(ATTACH_WAIT, reservation.attached.recv()).await {
            Ok(Some(w)) => *attach = Some(w),
            _ => {
                return Err(Failure::Here(
                    ErrorCode::BadRequest,
                    format!("the client did not attach within {ATTACH_WAIT:?}"),
                ));
            }
        }
    }
    let (rows, position) = if last_row_only {
        let n = u32::try_from(out.dim(1).unwrap_or(1)).unwrap_or(1);
        (last_row(out), position + n.saturating_sub(1))
    } else {
        (Ok(out.clone()), position)
    };
    let hidden = rows
        .and_then(|r| to_wire(&r, dtype))
        .map_err(|e| Failure::Here(ErrorCode::Internal, e.to_string()))?;
    let msg = InferResponse::Output {
        session,
        step,
        position,
        hidden,
    };
    let Some(w) = attach.as_mut() else {
        return Err(Failure::Here(
            ErrorCode::Internal,
            "no attach stream".into(),
        ));
    };
    w.send(&msg, SEND_TIMEOUT).await.map_err(|e| {
        Failure::Here(
            ErrorCode::Unreachable,
            format!("the client's attach stream broke: {e}"),
        )
    })
}
