//! Decode steps of several sessions computed as one batch.
//!
//! A one-token step does little arithmetic per weight: stepping sessions one at a time
//! reads every weight of the span once per session. When several sessions have a decode
//! step waiting, [`BlockSpan::forward_batch`] runs them in one pass over the weights,
//! each with its own KV cache, and gives each the same bytes as its own step.
//!
//! There is no batching task and no waiting for a batch to fill. A session's decode step
//! joins the server's [`Queue`] and waits for a compute permit like any other step;
//! whoever gets a permit first while its step is still queued takes it together with
//! whatever else is queued at that moment (at most [`MAX_BATCH_ENV`] steps), computes them,
//! and hands each its output. A step taken by another session's batch just waits for its
//! output. A lone client therefore waits for nothing more than before, while under load
//! the steps that queue up during one batch form the next.
//!
//! Everything else a step needs (its share of the memory budget, its input decoded and
//! checked) is done by the session itself before it queues, and what comes back (fault
//! injection, errors) is handled by the session as for a step of its own.

use super::Server;
use candle_core::Tensor;
use pollen_shard::{BlockSpan, LoadOptions, ShardError, SpanCache, WeightMode};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;

/// Environment variable capping how many decode steps one batch computes; `1` turns
/// batching off (each step computes alone, as without batching).
pub const MAX_BATCH_ENV: &str = "POLLEN_MAX_BATCH";

/// The most decode steps computed in one batch, unless [`MAX_BATCH_ENV`] says otherwise.
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Upper bound on [`MAX_BATCH_ENV`].
const MOST_BATCH: usize = 64;

/// What a computed step gives back: its cache (as the step left it) and its output.
pub(super) type StepResult = (SpanCache, Result<Tensor, ShardError>);

/// Why a queued step was not computed.
pub(super) enum NotRun {
    /// The server is stopping: the step was taken back, its cache unchanged.
    Stopping(SpanCache),
    /// The compute task failed (panicked), and the step's cache with it.
    Lost(String),
}

/// A queued decode step.
struct Job {
    id: u64,
    input: Tensor,
    position: usize,
    cache: SpanCache,
    reply: oneshot::Sender<StepResult>,
}

/// The decode steps waiting to be computed on one server.
pub(super) struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    next_id: AtomicU64,
    max: usize,
}

impl Queue {
    /// A queue batching up to [`MAX_BATCH_ENV`] (or [`DEFAULT_MAX_BATCH`]) steps, if
    /// spans loaded with `load` can batch at all: [`BlockSpan::forward_batch`] needs a
    /// fast weight mode on the CPU (exact mode keeps candle's order of operations).
    pub(super) fn new(load: &LoadOptions) -> Self {
        let max = if load.mode != WeightMode::Exact && load.device.is_cpu() {
            max_from_env(std::env::var(MAX_BATCH_ENV).ok().as_deref())
        } else {
            1
        };
        Self::with_max(max)
    }

    fn with_max(max: usize) -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            max: max.clamp(1, MOST_BATCH),
        }
    }

    /// Whether decode steps go through this queue.
    pub(super) fn batches(&self) -> bool {
        self.max > 1
    }

    fn push(&self, job: Job) {
        if let Ok(mut q) = self.jobs.lock() {
            q.push_back(job);
        }
    }

    /// The step `id` taken back out of the queue, if no batch has taken it.
    fn withdraw(&self, id: u64) -> Option<Job> {
        let mut q = self.jobs.lock().ok()?;
        let i = q.iter().position(|j| j.id == id)?;
        q.remove(i)
    }

    /// If step `id` is still queued: it and the steps queued before and after it, in
    /// order, at most [`Self::max`] in all. Empty if a batch already took it.
    fn take_batch(&self, id: u64) -> Vec<Job> {
        let Ok(mut q) = self.jobs.lock() else {
            return Vec::new();
        };
        let Some(mine) = q.iter().position(|j| j.id == id) else {
            return Vec::new();
        };
        let Some(own) = q.remove(mine) else {
            return Vec::new();
        };
        let mut batch = Vec::with_capacity(self.max.min(q.len() + 1));
        batch.push(own);
        while batch.len() < self.max {
            match q.pop_front() {
                Some(j) => batch.push(j),
                None => break,
            }
        }
        batch
    }
}

/// The batch cap `value` of [`MAX_BATCH_ENV`] asks for.
fn max_from_env(value: Option<&str>) -> usize {
    match value.map(str::trim) {
        None | Some("") => DEFAULT_MAX_BATCH,
        Some("off") => 1,
        Some(v) => match v.parse::<usize>() {
            Ok(n) => n.clamp(1, MOST_BATCH),
            Err(_) => {
                tracing::warn!(
                    "{MAX_BATCH_ENV}={v:?} is not a number; batching up to {DEFAULT_MAX_BATCH} steps"
                );
                DEFAULT_MAX_BATCH
            }
        },
    }
}

/// The answer `out` brings, or its loss.
async fn answer(out: oneshot::Receiver<StepResult>) -> Result<StepResult, NotRun> {
    out.await
        .map_err(|_| NotRun::Lost("the batch computing it failed".into()))
}

/// Computes a one-token step (`input` of shape `(1, 1, hidden)` at `position`) under a
/// compute permit, batched with whatever other decode steps are queued.
pub(super) async fn decode(
    server: &Server,
    input: Tensor,
    position: usize,
    cache: SpanCache,
) -> Result<StepResult, NotRun> {
    let queue = &server.batch;
    let id = queue.next_id.fetch_add(1, Ordering::Relaxed);
    let (reply, mut out) = oneshot::channel();
    queue.push(Job {
        id,
        input,
        position,
        cache,
        reply,
    });
    let permit = tokio::select! {
        biased;
        r = &mut out => return r.map_err(|_| NotRun::Lost("the batch computing it failed".into())),
        p = server.permits.acquire() => p,
    };
    let Ok(permit) = permit else {
        return match queue.withdraw(id) {
            Some(job) => Err(NotRun::Stopping(job.cache)),
            None => answer(out).await,
        };
    };
    let jobs = queue.take_batch(id);
    if jobs.is_empty() {
        // Another session's batch took this step: the permit goes to the next.
        drop(permit);
    } else {
        let span = server.span.clone();
        // A panic loses the batch's caches: their senders drop and each session ends.
        if let Err(e) = tokio::task::spawn_blocking(move || run(&span, jobs)).await {
            tracing::error!("a batched compute task failed: {e}");
        }
        drop(permit);
    }
    answer(out).await
}

/// Computes `jobs` (blocking) and answers each.
fn run(span: &BlockSpan, mut jobs: Vec<Job>) {
    crate::metrics::global().batch(jobs.len());
    if jobs.len() > 1 {
        let mut steps: Vec<(&Tensor, usize, &mut SpanCache)> = jobs
            .iter_mut()
            .map(|j| (&j.input, j.position, &mut j.cache))
            .collect();
        // A refused or failed batch changes no cache: its steps then run one by one,
        // so that each gets its own answer (a position mismatch is one session's fault).
        if let Ok(outs) = span.forward_batch(&mut steps) {
            drop(steps);
            for (job, out) in jobs.into_iter().zip(outs) {
                let _ = job.reply.send((job.cache, Ok(out)));
            }
            return;
        }
    }
    for mut job in jobs {
        let out = span.forward(&job.input, job.position, &mut job.cache);
        let _ = job.reply.send((job.cache, out));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_cap_comes_from_the_environment_within_bounds() {
        assert_eq!(max_from_env(None), DEFAULT_MAX_BATCH);
        assert_eq!(max_from_env(Some("")), DEFAULT_MAX_BATCH);
        assert_eq!(max_from_env(Some("off")), 1);
        assert_eq!(max_from_env(Some("1")), 1);
        assert_eq!(max_from_env(Some(" 8 ")), 8);
        assert_eq!(max_from_env(Some("0")), 1);
        assert_eq!(max_from_env(Some("100000")), MOST_BATCH);
        assert_eq!(max_from_env(Some("lots")), DEFAULT_MAX_BATCH);
    }
}
