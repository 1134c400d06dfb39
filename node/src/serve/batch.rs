//! Decode steps of several sessions computed as one batch.
//!
//! A one-token step does little arithmetic per weight: stepping sessions one at a time
//! reads every weight of the span once per session. When several sessions have a decode
//! step waiting, [`BlockSpan::forward_batch`] runs them in one pass over the weights,
//! each with its own KV cache, and gives each the same bytes as its own step.
//!
//! There is no batching task. A session's decode step joins the server's [`Queue`] and
//! waits for a compute permit like any other step; whoever gets a permit first while its
//! step is still queued takes it together with whatever else is queued at that moment (at
//! most `--max-batch` steps), computes them, and hands each its output. A step taken by
//! another session's batch just waits for its output. Under load the steps that queue up
//! during one batch form the next.
//!
//! Left there, sessions settle into groups that take turns: the steps of the sessions
//! whose batch just ended come back while the next group computes, so eight clients of a
//! one-thread server run as two alternating batches of four, and a batch of four costs
//! much more than half a batch of eight. So each session keeps its [`Pace`]: how long
//! after its output its next step usually comes back (its client's or the next hops'
//! round trip). Before taking a batch, the permit holder waits for the sessions whose next
//! step is due within a short window: at most a quarter of a batch's compute time and
//! never more than [`MOST_WAIT`]. A session whose step is due later (a slow network, a
//! longer pipeline behind it, a person typing) is not waited for, and a lone client, with
//! nobody else due, waits for nothing. Nor is a session whose last step missed its
//! prediction by more than a window, until one hits again: uneven clients, hostile or
//! not, cost a batch at most one window now and then, never a window a step.
//!
//! A prompt step holds the permit while it computes, and a long one (thousands of
//! tokens) would hold every batched session's next token for its whole prefill. Where
//! splitting it keeps its bits ([`BlockSpan::splits_prompts_exactly`]), a prompt is
//! computed in parts ([`in_parts`]) of about `--prompt-part-ms` each (default
//! [`DEFAULT_PROMPT_PART`]), each under its own permit: the semaphore is first come,
//! first served, so a batch that queued during one part computes before the next, and
//! the others wait one part's compute, not the whole prompt's. (Whole, a 1,024-token
//! prompt took 5–6 s on one core of the default model's every block, past the 3 s in
//! which a client expects its decode step acknowledged: every session decoding beside
//! it failed over; see the prompt bench.)
//!
//! Everything else a step needs (its share of the memory budget, its input decoded and
//! checked) is done by the session itself before it queues, and what comes back (fault
//! injection, errors) is handled by the session as for a step of its own. A batch of one
//! computes on the worker of the session that took it while such steps are short
//! ([`crate::threads::ShortWork`]); larger batches on the blocking pool.

use super::Server;
use super::sessions::{Budget, BudgetGuard};
use crate::threads::TimeAverage;
use candle_core::Tensor;
use pollen_shard::{BlockSpan, ShardError, SpanCache};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Environment variable standing for `pollen serve --max-batch`: how many decode steps
/// one batch computes at most; `1` turns batching off (each step computes alone).
pub const MAX_BATCH_ENV: &str = "POLLEN_MAX_BATCH";

/// The most decode steps computed in one batch, unless `--max-batch` says otherwise.
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Upper bound on `--max-batch`.
pub const MOST_BATCH: usize = 64;

/// How long a prompt part computes, unless `--prompt-part-ms` says otherwise: a decode
/// step waits about this long at most for a prompt beside it. (Parts of 64 to 1,024 rows
/// prefilled at the same speed on the machines measured, so small parts cost little.)
pub const DEFAULT_PROMPT_PART: Duration = Duration::from_millis(100);

/// Rows of a prompt's first part, and the fewest of any part (a part pays a pass over
/// the weights, however few its rows); a prompt of at most this many rows is computed
/// whole.
const LEAST_PART_ROWS: usize = 32;

/// The most rows of one part, whatever the pace.
const MOST_PART_ROWS: usize = 4096;

/// The longest a permit holder waits for steps due soon before taking its batch.
pub const MOST_WAIT: Duration = Duration::from_millis(4);

/// Sessions whose next step is expected that a queue remembers; past this, new
/// expectations are dropped (they only cost a wait).
const MOST_DUE: usize = 4096;

/// From this many expectations on, each new one first drops those long overdue.
const PRUNE_AT: usize = 64;

/// What a computed step gives back: its cache (as the step left it) and its output.
pub(super) type StepResult = (SpanCache, Result<Tensor, ShardError>);

/// Why a queued step was not computed.
pub(super) enum NotRun {
    /// The server is stopping: the step was taken back, its cache unchanged.
    Stopping(SpanCache),
    /// The compute task failed (panicked), and the step's cache with it.
    Lost(String),
    /// A part of a prompt (of this many rows) found the memory budget without room for
    /// its working memory (this many bytes): the cache is as before the step.
    OverBudget(SpanCache, usize, usize),
    /// The hop before left between two parts of a prompt; the rest were not computed
    /// and the cache is as before the step.
    Gone(SpanCache),
}

/// A queued decode step.
pub(super) struct Job {
    id: u64,
    input: Tensor,
    position: usize,
    cache: SpanCache,
    /// The step's working memory in bytes, taken from the budget by the batch that
    /// computes it, under that batch's permit ([`Self::memory`]), and given back as it
    /// is answered: a step waiting in the queue holds none.
    need: usize,
    memory: Option<BudgetGuard>,
    reply: oneshot::Sender<Result<StepResult, NotRun>>,
}

/// When a session's next decode step is expected: how long after its last output the
/// one after usually came (a moving average), and when that output was.
///
/// A session whose last prediction missed (its step came more than a window early or
/// late) is not announced as due until one hits again, so a client whose steps come at
/// uneven times cannot make batches wait for steps that do not come.
#[derive(Debug)]
pub(super) struct Pace {
    key: u64,
    last_done: Option<Instant>,
    gap: Option<Duration>,
    /// Whether the last prediction hit (the first is given the benefit of the doubt).
    trusted: bool,
}

/// A gap longer than this (a person reading, a prompt in between) starts the average
/// afresh instead of joining it.
const LONGEST_GAP: Duration = Duration::from_secs(1);

impl Pace {
    /// A session's pace, nothing known yet.
    pub(super) fn new<J: Queued>(queue: &Queue<J>) -> Self {
        Self {
            key: queue.next_key.fetch_add(1, Ordering::Relaxed),
            last_done: None,
            gap: None,
            trusted: true,
        }
    }

    /// A step arrived at `now`, where a prediction counts as a hit within `window` of
    /// it: the gap since the last output joins the average.
    fn arrive(&mut self, now: Instant, window: Duration) {
        let Some(done) = self.last_done.take() else {
            return;
        };
        // The prediction made at `done`, announced or not.
        let predicted = self.gap.and_then(|g| done.checked_add(g));
        let gap = now.saturating_duration_since(done);
        if gap > LONGEST_GAP {
            // A pause, not a pace: start afresh.
            self.gap = None;
            self.trusted = true;
            return;
        }
        if let Some(p) = predicted {
            let off = if now > p { now - p } else { p - now };
            self.trusted = off <= window;
        }
        self.gap = Some(match self.gap {
            Some(old) => old.saturating_mul(3).saturating_add(gap) / 4,
            None => gap,
        });
    }

    /// A step's output came at `now`: when the next step is due, if a gap is known
    /// and the last prediction hit.
    fn done(&mut self, now: Instant) -> Option<Instant> {
        self.last_done = Some(now);
        now.checked_add(self.gap?).filter(|_| self.trusted)
    }

    /// A decode step for `queue` arrived now (before its checks: one refused then
    /// leaves no gap sample, as [`Self::interrupted`]).
    pub(super) fn arrived<J: Queued>(&mut self, queue: &Queue<J>) {
        self.arrive(Instant::now(), queue.window());
    }

    /// A step that is not a batched decode step (a prompt, or one refused before it
    /// reached the queue): the next gap would not be the session's usual one.
    pub(super) fn interrupted(&mut self) {
        self.last_done = None;
    }

    /// The session ends: its next step is due nowhere.
    pub(super) fn leave<J: Queued>(self, queue: &Queue<J>) {
        queue.forget(self.key);
    }
}

/// What a [`Queue`] holds: anything with an id ([`Job`]s on a server).
pub(super) trait Queued {
    fn id(&self) -> u64;
}

impl Queued for Job {
    fn id(&self) -> u64 {
        self.id
    }
}

/// What a queue's lock guards: the steps waiting, and when other sessions' next steps
/// are due (by [`Pace`] key; a session leaves its entry when its step arrives).
struct Waiting<J> {
    jobs: VecDeque<J>,
    due: HashMap<u64, Instant>,
}

/// The decode steps waiting to be computed on one server.
pub(super) struct Queue<J = Job> {
    state: Mutex<Waiting<J>>,
    /// Woken whenever a step joins or leaves the queue.
    changed: Notify,
    next_id: AtomicU64,
    next_key: AtomicU64,
    /// A batch's compute time, on average.
    compute: TimeAverage,
    max: usize,
}

impl Queue<Job> {
    /// A queue batching up to `max` steps (at least 1, at most [`MOST_BATCH`]) and no
    /// more than `rows`, the most [`BlockSpan::forward_batch`] takes while keeping each
    /// step's bits ([`BlockSpan::batch_rows`]: any on the CPU's packed kernels, four in
    /// exact mode on a CUDA GPU, 1 where it cannot batch).
    pub(super) fn new(rows: usize, max: usize) -> Self {
        Self::with_max(max.min(rows))
    }
}

impl<J: Queued> Queue<J> {
    fn with_max(max: usize) -> Self {
        Self {
            state: Mutex::new(Waiting {
                jobs: VecDeque::new(),
                due: HashMap::new(),
            }),
            changed: Notify::new(),
            next_id: AtomicU64::new(0),
            next_key: AtomicU64::new(0),
            compute: TimeAverage::default(),
            max: max.clamp(1, MOST_BATCH),
        }
    }

    /// Whether decode steps go through this queue.
    pub(super) fn batches(&self) -> bool {
        self.max > 1
    }

    /// Queues `job`, the step of the session with [`Pace`] key `key`.
    fn push(&self, job: J, key: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.due.remove(&key);
            s.jobs.push_back(job);
        }
        self.changed.notify_waiters();
    }

    /// Notes that the session with [`Pace`] key `key` will likely step again at `at`.
    fn expect(&self, key: u64, at: Instant) {
        let Ok(mut s) = self.state.lock() else { return };
        if s.due.len() >= PRUNE_AT {
            // Entries overdue by more than the longest window can never count again.
            if let Some(stale) = Instant::now().checked_sub(MOST_WAIT) {
                s.due.retain(|_, due| *due >= stale);
            }
            if s.due.len() >= MOST_DUE {
                return;
            }
        }
        s.due.insert(key, at);
    }

    /// Forgets when the session with [`Pace`] key `key` was due (it ended).
    fn forget(&self, key: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.due.remove(&key);
        }
    }

    /// How long a permit holder waits at most for steps due soon: a quarter of a batch's
    /// compute time, at most [`MOST_WAIT`].
    fn window(&self) -> Duration {
        Duration::from_nanos(self.compute.nanos() / 4).min(MOST_WAIT)
    }

    /// A batch took `took` to compute.
    fn computed(&self, took: Duration) {
        self.compute.add(took);
    }

    /// While step `id` is queued and the batch it would lead has room, waits for the
    /// steps due within [`Self::window`] from now (those overdue by more than that are
    /// not counted on), and no longer than the window.
    async fn gather(&self, id: u64) {
        self.wait_for_due(|s| s.jobs.len() < self.max && s.jobs.iter().any(|j| j.id() == id))
            .await;
    }

    /// Before a prompt's next part takes a permit ([`in_parts`]): while no decode step is
    /// queued but one is due within [`Self::window`] from now, waits for it (no longer
    /// than the window), so that the sessions decoding beside a prompt, whose next steps
    /// come back a round trip after their outputs, compute between every two of its
    /// parts and not every other.
    async fn make_way(&self) {
        self.wait_for_due(|s| s.jobs.is_empty()).await;
    }

    /// While `still(queue state)` holds and some step is due within [`Self::window`]
    /// from now (those overdue by more than that are not counted on), waits for the
    /// queue to change; no longer than the window.
    async fn wait_for_due(&self, still: impl Fn(&Waiting<J>) -> bool) {
        let window = self.window();
        if window.is_zero() {
            return;
        }
        let start = Instant::now();
        let (deadline, earliest) = (start + window, start.checked_sub(window));
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so that no change in between is missed.
            changed.as_mut().enable();
            {
                let Ok(s) = self.state.lock() else { return };
                let soon = s
                    .due
                    .values()
                    .any(|&at| at <= deadline && earliest.is_none_or(|e| at >= e));
                if !(soon && still(&s)) {
                    return;
                }
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The step `id` taken back out of the queue, if no batch has taken it.
    fn withdraw(&self, id: u64) -> Option<J> {
        let job = {
            let mut s = self.state.lock().ok()?;
            let i = s.jobs.iter().position(|j| j.id() == id)?;
            s.jobs.remove(i)
        };
        self.changed.notify_waiters();
        job
    }

    /// Waits for `answer` to come (its value) or for step `id` to be queued again
    /// (`None`): a batch that took it can put it back ([`Self::put_back`]).
    async fn answer_or_requeued<T>(
        &self,
        id: u64,
        answer: &mut oneshot::Receiver<T>,
    ) -> Option<Result<T, oneshot::error::RecvError>> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so that no change in between is missed.
            changed.as_mut().enable();
            let queued = self
                .state
                .lock()
                .is_ok_and(|s| s.jobs.iter().any(|j| j.id() == id));
            if queued {
                return None;
            }
            tokio::select! {
                biased;
                r = &mut *answer => return Some(r),
                _ = &mut changed => {}
            }
        }
    }

    /// Steps a batch took and could not compute (see [`take_memory`]) back at the head
    /// of the queue, in their order.
    fn put_back(&self, jobs: Vec<J>) {
        if jobs.is_empty() {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            for job in jobs.into_iter().rev() {
                s.jobs.push_front(job);
            }
        }
        self.changed.notify_waiters();
    }

    /// If step `id` is still queued: it and the steps queued before and after it, in
    /// order, at most [`Self::max`] in all. Empty if a batch already took it.
    fn take_batch(&self, id: u64) -> Vec<J> {
        let batch = {
            let Ok(mut s) = self.state.lock() else {
                return Vec::new();
            };
            let q = &mut s.jobs;
            let Some(own) = q
                .iter()
                .position(|j| j.id() == id)
                .and_then(|i| q.remove(i))
            else {
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
        };
        // Another permit holder gathering for a step taken here stops waiting.
        self.changed.notify_waiters();
        batch
    }
}

/// How a server computes long prompts in parts, each under its own compute permit, so
/// that other sessions' steps compute between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parts {
    /// Some rows at a time through every block ([`BlockSpan::splits_prompts_exactly`]),
    /// each part about this long.
    Rows(Duration),
    /// Every row through some blocks at a time ([`BlockSpan::splits_prompts_by_blocks`]:
    /// exact mode, candle's products), each part about this long.
    Blocks(Duration),
}

impl Parts {
    /// How `span` splits prompts into parts of about `part` (zero: it does not): by rows
    /// where that gives the same bits, else by blocks where it can, else not at all.
    pub(super) fn of(span: &BlockSpan, part: Duration) -> Option<Self> {
        if part.is_zero() {
            None
        } else if span.splits_prompts_exactly() {
            Some(Self::Rows(part))
        } else if span.splits_prompts_by_blocks() {
            Some(Self::Blocks(part))
        } else {
            None
        }
    }
}

impl Parts {
    /// Bytes a step of `rows` rows at `position` split as `self` holds from its first
    /// part to its end, parts or none running: by rows its input, its parts' outputs and
    /// their join (each part takes its own share of the rest); by blocks also the keys
    /// and values the blocks run so far wrote, the hidden states between blocks and the
    /// mask ([`BlockSpan::step_held_bytes`]; each part takes the rest of the step's
    /// figure).
    ///
    /// Less the input ([`input_bytes`]), which the step took before decoding it.
    fn held_bytes(&self, span: &BlockSpan, rows: usize, position: usize) -> usize {
        let input = input_bytes(span, rows);
        match self {
            Self::Rows(_) => input.saturating_mul(2),
            Self::Blocks(_) => span.step_held_bytes(rows, position).saturating_sub(input),
        }
    }
}

/// Bytes each part of a step of `rows` rows at `position` computed by blocks takes with
/// its permit: the step's figure less what the step holds throughout (its decoded input,
/// taken before the first part, and [`Parts::held_bytes`]), so that the three shares add
/// up to the step's whole figure ([`BlockSpan::step_memory_bytes`]).
fn block_part_bytes(span: &BlockSpan, rows: usize, position: usize) -> usize {
    span.step_memory_bytes(rows, position)
        .saturating_sub(span.step_held_bytes(rows, position))
}

/// Bytes of a step's input of `rows` rows, decoded (f32).
pub(super) fn input_bytes(span: &BlockSpan, rows: usize) -> usize {
    rows.saturating_mul(span.config().hidden_size)
        .saturating_mul(4)
}

/// Why the next part of a prompt does not run.
enum NoTurn {
    /// The hop before left: nobody waits for the rest.
    Gone,
    /// The server is stopping.
    Stopping,
    /// The budget had no room for this many bytes (the part's and what the prompt holds,
    /// which is given back by the time the refusal is read).
    OverBudget(usize),
}

impl NoTurn {
    /// The answer for a prompt of `rows` rows refused so, its cache put back.
    fn not_run(self, cache: SpanCache, rows: usize) -> NotRun {
        match self {
            Self::Gone => NotRun::Gone(cache),
            Self::Stopping => NotRun::Stopping(cache),
            Self::OverBudget(need) => NotRun::OverBudget(cache, rows, need),
        }
    }
}

/// A prompt part's turn: after the first part, the decode steps due go first
/// ([`Queue::make_way`]); then the compute permit, and from the memory budget the part's
/// `need` (with the first part also `whole`, what the prompt holds until its end:
/// [`Parts::held_bytes`], kept in `held`). No turn once the hop before has left.
async fn part_turn<'a>(
    server: &'a Server,
    first: bool,
    upstream_gone: &CancellationToken,
    held: &mut Option<BudgetGuard>,
    whole: usize,
    need: usize,
) -> Result<(tokio::sync::SemaphorePermit<'a>, BudgetGuard), NoTurn> {
    if !first {
        server.batch.make_way().await;
    }
    // Checked before and after the wait for the permit: a step queued behind others may
    // find its client gone by its turn.
    if upstream_gone.is_cancelled() {
        return Err(NoTurn::Gone);
    }
    let permit = server
        .permits
        .acquire()
        .await
        .map_err(|_| NoTurn::Stopping)?;
    if upstream_gone.is_cancelled() {
        return Err(NoTurn::Gone);
    }
    let too_much = || NoTurn::OverBudget(need.saturating_add(whole));
    if held.is_none() {
        *held = Some(server.kv_budget.try_take(whole).ok_or_else(too_much)?);
    }
    let memory = server.kv_budget.try_take(need).ok_or_else(too_much)?;
    Ok((permit, memory))
}

/// How a step of `rows` rows is split on a server splitting prompts as `parts`
/// ([`in_parts`]); `None`: the step is computed whole.
pub(super) fn parts_of(rows: usize, parts: Option<Parts>) -> Option<Parts> {
    parts.filter(|_| rows > LEAST_PART_ROWS)
}

/// Computes a prompt step (`input` of shape `(1, rows, hidden)` at `position`) in parts
/// ([`Parts`]), each under its own compute permit, with the decode steps due given their
/// turn between two parts ([`Queue::make_way`]). The output is the step's output, bit for
/// bit; a part that fails leaves the cache as it was before the first.
pub(super) async fn in_parts(
    server: &Server,
    input: Tensor,
    position: usize,
    cache: SpanCache,
    parts: Parts,
    upstream_gone: &CancellationToken,
) -> Result<StepResult, NotRun> {
    match parts {
        Parts::Rows(part) => in_rows(server, input, position, cache, part, upstream_gone).await,
        Parts::Blocks(part) => in_blocks(server, input, position, cache, part, upstream_gone).await,
    }
}

/// [`in_parts`] by rows: the first part of [`LEAST_PART_ROWS`] rows, each next as many
/// as the last one's pace computes in `part` (attention grows with the position, and
/// machines and models differ). The parts' outputs, joined, are the step's output, bit
/// for bit, whatever their sizes ([`BlockSpan::splits_prompts_exactly`]). Each part
/// takes its own working memory from the budget with its permit, so a prompt between
/// parts holds only its input and outputs ([`Parts::held_bytes`], taken with the first
/// part until the end).
async fn in_rows(
    server: &Server,
    input: Tensor,
    position: usize,
    mut cache: SpanCache,
    part: Duration,
    upstream_gone: &CancellationToken,
) -> Result<StepResult, NotRun> {
    let rows = input.dim(1).unwrap_or(0);
    let before = cache.len();
    let mut parts = Vec::new();
    let mut next = LEAST_PART_ROWS;
    let mut at = 0;
    let whole = Parts::Rows(part).held_bytes(&server.span, rows, position);
    let mut held = None;
    while at < rows {
        let n = next.min(rows - at);
        let need = server.span.step_memory_bytes(n, position + at);
        let turn = part_turn(server, at == 0, upstream_gone, &mut held, whole, need).await;
        let (permit, memory) = match turn {
            Ok(t) => t,
            Err(no) => {
                let _ = cache.truncate(before);
                return Err(no.not_run(cache, rows));
            }
        };
        let span = server.span.clone();
        let rows_here = input.narrow(1, at, n);
        let started = Instant::now();
        let (c, out) = tokio::task::spawn_blocking(move || {
            let out = rows_here
                .map_err(ShardError::from)
                .and_then(|x| span.forward(&x, position + at, &mut cache));
            (cache, out)
        })
        .await
        .map_err(|e| NotRun::Lost(e.to_string()))?;
        drop(memory);
        drop(permit);
        if out.is_ok() {
            crate::metrics::global().prompt_part("rows");
        }
        let per_row = started.elapsed().as_secs_f64() / n as f64;
        next = ((part.as_secs_f64() / per_row.max(1e-9)) as usize)
            .clamp(LEAST_PART_ROWS, MOST_PART_ROWS);
        cache = c;
        match out {
            Ok(o) => parts.push(o),
            Err(e) => {
                // The failed part left the cache as it was; the parts before it go too.
                return match cache.truncate(before) {
                    Ok(()) => Ok((cache, Err(e))),
                    Err(t) => Ok((cache, Err(t))),
                };
            }
        }
        at += n;
    }
    let out = Tensor::cat(&parts, 1).map_err(ShardError::from);
    if out.is_err() {
        let _ = cache.truncate(before);
    }
    Ok((cache, out))
}

/// [`in_parts`] by blocks: all rows through one block first, then through as many blocks
/// as the last part's pace computes in `part`. The blocks run the same operations as
/// whole ([`BlockSpan::splits_prompts_by_blocks`]), so the output has the same bits.
/// What lives from part to part (the keys and values written, the hidden states between
/// blocks: [`Parts::held_bytes`]) is taken from the memory budget with the first part's
/// permit, until the end; each part takes the rest of the step's figure with its own.
async fn in_blocks(
    server: &Server,
    input: Tensor,
    position: usize,
    mut cache: SpanCache,
    part: Duration,
    upstream_gone: &CancellationToken,
) -> Result<StepResult, NotRun> {
    let rows = input.dim(1).unwrap_or(0);
    let mut step = None;
    let mut next = 1;
    let whole = Parts::Blocks(part).held_bytes(&server.span, rows, position);
    // Every part runs all the rows: the same working memory each time.
    let need = block_part_bytes(&server.span, rows, position);
    let mut held = None;
    loop {
        let first = step.is_none();
        let turn = part_turn(server, first, upstream_gone, &mut held, whole, need).await;
        let (permit, memory) = match turn {
            Ok(t) => t,
            Err(no) => {
                if let Some(step) = step {
                    server.span.abandon_blocks(step, &mut cache);
                }
                return Err(no.not_run(cache, rows));
            }
        };
        let span = server.span.clone();
        let n = next;
        let started = Instant::now();
        let input = input.clone();
        let (c, s, out) = tokio::task::spawn_blocking(move || {
            // The first part begins the step (its mask is built here, off the runtime).
            let mut s = match step {
                Some(s) => s,
                None => match span.begin_in_blocks(&input, position, &cache) {
                    Ok(s) => s,
                    Err(e) => return (cache, None, Err(e)),
                },
            };
            let out = span.forward_blocks(&mut s, &mut cache, n);
            (cache, Some(s), out)
        })
        .await
        .map_err(|e| NotRun::Lost(e.to_string()))?;
        drop(memory);
        drop(permit);
        if out.is_ok() {
            crate::metrics::global().prompt_part("blocks");
        }
        let per_block = started.elapsed().as_secs_f64() / n as f64;
        next = ((part.as_secs_f64() / per_block.max(1e-9)) as usize).max(1);
        (cache, step) = (c, s);
        match out {
            Ok(Some(out)) => return Ok((cache, Ok(out))),
            Ok(None) => {}
            // The cache is back as before the step.
            Err(e) => return Ok((cache, Err(e))),
        }
    }
}

/// The answer `out` brings, or its loss.
async fn answer(out: oneshot::Receiver<Result<StepResult, NotRun>>) -> Result<StepResult, NotRun> {
    out.await
        .map_err(|_| NotRun::Lost("the batch computing it failed".into()))?
}

/// Computes a one-token step (`input` of shape `(1, 1, hidden)` at `position`, needing
/// `need` bytes of working memory) under a compute permit, batched with whatever other
/// decode steps are queued. The step's arrival is already in `pace`
/// ([`Pace::arrived`]); its output goes in here.
pub(super) async fn decode(
    server: &Server,
    input: Tensor,
    position: usize,
    cache: SpanCache,
    need: usize,
    pace: &mut Pace,
) -> Result<StepResult, NotRun> {
    let queue = &server.batch;
    let result = queued(server, input, position, cache, need, pace.key).await;
    match (&result, pace.done(Instant::now())) {
        (Ok(_), Some(at)) => queue.expect(pace.key, at),
        // A step not computed: the session is stopping or gone.
        (Err(_), _) => pace.interrupted(),
        (Ok(_), None) => {}
    }
    result
}

/// [`decode`] from the step's arrival to its output.
async fn queued(
    server: &Server,
    input: Tensor,
    position: usize,
    cache: SpanCache,
    need: usize,
    key: u64,
) -> Result<StepResult, NotRun> {
    let queue = &server.batch;
    let id = queue.next_id.fetch_add(1, Ordering::Relaxed);
    let (reply, mut out) = oneshot::channel();
    queue.push(
        Job {
            id,
            input,
            position,
            cache,
            need,
            memory: None,
            reply,
        },
        key,
    );
    loop {
        let permit = tokio::select! {
            biased;
            r = &mut out => return r.map_err(|_| NotRun::Lost("the batch computing it failed".into()))?,
            p = server.permits.acquire() => p,
        };
        let Ok(permit) = permit else {
            return match queue.withdraw(id) {
                Some(job) => Err(NotRun::Stopping(job.cache)),
                None => answer(out).await,
            };
        };
        let gathering = Instant::now();
        queue.gather(id).await;
        let jobs = queue.take_batch(id);
        if jobs.is_empty() {
            // Another session's batch took this step: the permit goes to the next, and
            // the answer comes from that batch, unless it puts the step back for want of
            // memory (with more than one compute slot, while this one gathered).
            drop(permit);
            match queue.answer_or_requeued(id, &mut out).await {
                Some(r) => {
                    return r.map_err(|_| NotRun::Lost("the batch computing it failed".into()))?;
                }
                None => continue,
            }
        }
        let Memory { fit, wait, refused } = take_memory(&server.kv_budget, jobs);
        for job in refused {
            let _ = job.reply.send(Err(NotRun::OverBudget(job.cache, 1, 0)));
        }
        // The batch's own step is its first: it either fits or is refused, so what goes
        // back is other sessions' steps, each led again by its own task.
        queue.put_back(wait);
        if !fit.is_empty() {
            crate::metrics::global().batch_wait(gathering.elapsed());
            let span = server.span.clone();
            let started = Instant::now();
            // A panic loses the batch's caches: their senders drop and each session ends.
            let lone = fit.len() == 1 && server.computes_alone();
            if let Err(e) = server.lone_steps.run(lone, move || run(&span, fit)).await {
                tracing::error!("a batched compute task failed: {e}");
            }
            queue.computed(started.elapsed());
        }
        drop(permit);
        break;
    }
    answer(out).await
}

/// A batch's steps sorted by the working memory the budget gives them.
struct Memory {
    /// Steps with their memory taken, to compute now.
    fit: Vec<Job>,
    /// Steps the budget has no room for beside those: back to the queue, first in
    /// line, for a batch once this one's memory is given back.
    wait: Vec<Job>,
    /// Steps the budget has no room for with nothing of this batch holding any (as a
    /// step alone would find it; with more than one compute slot, another batch may
    /// hold some, as it may for a step alone): refused.
    refused: Vec<Job>,
}

/// Takes each step's working memory from `budget`, in the batch's order (under the
/// batch's permit, so that steps waiting in the queue hold none).
fn take_memory(budget: &Arc<Budget>, jobs: Vec<Job>) -> Memory {
    let mut sorted = Memory {
        fit: Vec::new(),
        wait: Vec::new(),
        refused: Vec::new(),
    };
    for mut job in jobs {
        match budget.try_take(job.need) {
            Some(memory) => {
                job.memory = Some(memory);
                sorted.fit.push(job);
            }
            None if sorted.fit.is_empty() => sorted.refused.push(job),
            None => sorted.wait.push(job),
        }
    }
    sorted
}

/// Computes `jobs` (blocking) and answers each, its output on the CPU: on a GPU every
/// device operation of a step stays inside the compute task (see `steps::compute`).
/// The batch metric counts the steps each pass over the weights computed; so does what
/// it returns: how many of `jobs` computed in one pass (1 where they ran one by one).
fn run(span: &BlockSpan, mut jobs: Vec<Job>) -> usize {
    if jobs.len() > 1 {
        let mut steps: Vec<(&Tensor, usize, &mut SpanCache)> = jobs
            .iter_mut()
            .map(|j| (&j.input, j.position, &mut j.cache))
            .collect();
        // A step refused on its own (its position, its cache's limits) is answered
        // alone and the others still compute as one batch; a batch that fails as a whole
        // changes no cache, and its steps then run one by one, each for its own answer.
        match span.forward_batch(&mut steps) {
            Ok(outs) => {
                drop(steps);
                let computed = outs.iter().filter(|o| o.is_ok()).count();
                if computed > 0 {
                    crate::metrics::global().batch(computed);
                }
                let outs = if span.device().is_cpu() {
                    outs
                } else {
                    to_cpu_at_once(outs)
                };
                for (job, out) in jobs.into_iter().zip(outs) {
                    drop(job.memory);
                    let _ = job.reply.send(Ok((job.cache, out)));
                }
                return computed;
            }
            Err(e) => tracing::warn!(
                "a batch of {} decode steps failed, computing them one by one: {e}",
                jobs.len()
            ),
        }
    }
    for mut job in jobs {
        let out = span
            .forward(&job.input, job.position, &mut job.cache)
            .and_then(|t| Ok(t.to_device(&candle_core::Device::Cpu)?));
        if out.is_ok() {
            crate::metrics::global().batch(1);
        }
        drop(job.memory);
        let _ = job.reply.send(Ok((job.cache, out)));
    }
    1
}

/// A GPU batch's outputs on the CPU: they are rows of one tensor, so they come back in
/// one copy (each row alone would copy the whole batch).
fn to_cpu_at_once(outs: Vec<pollen_shard::Result<Tensor>>) -> Vec<pollen_shard::Result<Tensor>> {
    let rows: Vec<&Tensor> = outs.iter().filter_map(|o| o.as_ref().ok()).collect();
    let all = Tensor::cat(&rows, 1).and_then(|all| all.to_device(&candle_core::Device::Cpu));
    let mut row = 0;
    outs.into_iter()
        .map(|o| {
            o?;
            let out = match &all {
                Ok(all) => Ok(all.narrow(1, row, 1)?),
                Err(e) => Err(ShardError::Device(format!(
                    "a batch's outputs to the CPU: {e}"
                ))),
            };
            row += 1;
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use std::sync::Arc;

    impl Queued for u64 {
        fn id(&self) -> u64 {
            *self
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// How long `q.gather(id)` waited.
    async fn waited(q: &Queue<u64>, id: u64) -> Duration {
        let t = Instant::now();
        q.gather(id).await;
        t.elapsed()
    }

    /// A queue whose batches have taken four times `window` to compute.
    fn queue(window: Duration) -> Queue<u64> {
        let q = Queue::with_max(4);
        q.computed(window * 4);
        assert_eq!(q.window(), window);
        q
    }

    #[tokio::test(start_paused = true)]
    async fn with_nobody_due_the_batch_is_taken_at_once() {
        let q = queue(ms(2));
        q.push(1, 10);
        q.push(2, 20);
        assert_eq!(waited(&q, 1).await, Duration::ZERO);
        assert_eq!(q.take_batch(1), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_due_within_the_window_is_waited_for_until_it_comes() {
        let q = Arc::new(queue(ms(3)));
        q.expect(20, Instant::now() + ms(1));
        q.push(1, 10);
        let late = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(1)).await;
            late.push(2, 20);
        });
        // It came after 1 ms, and nobody else is due: no waiting to the window's end.
        assert_eq!(waited(&q, 1).await, ms(1));
        assert_eq!(q.take_batch(1), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_part_makes_way_for_decode_steps_due_and_only_for_them() {
        let made_way = |q: Arc<Queue<u64>>| async move {
            let t = Instant::now();
            q.make_way().await;
            t.elapsed()
        };
        // Nobody due: the next part goes at once.
        let q = Arc::new(queue(ms(3)));
        assert_eq!(made_way(q.clone()).await, Duration::ZERO);
        // A decode step due in 1 ms: the part waits until it has queued (its batch then
        // takes the permit first), not to the window's end.
        q.expect(20, Instant::now() + ms(1));
        let late = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(1)).await;
            late.push(2, 20);
        });
        assert_eq!(made_way(q.clone()).await, ms(1));
        // A step already queued: nothing to wait for.
        q.expect(30, Instant::now() + ms(1));
        assert_eq!(made_way(q.clone()).await, Duration::ZERO);
        assert_eq!(q.take_batch(2), vec![2]);
        // A step due that never comes costs the window, no more.
        assert_eq!(made_way(q.clone()).await, ms(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_does_not_come_costs_one_window_and_then_none() {
        let q = queue(ms(2));
        q.expect(20, Instant::now() + ms(1));
        q.push(1, 10);
        assert_eq!(waited(&q, 1).await, ms(2));
        assert_eq!(q.take_batch(1), vec![1]);
        // Overdue by more than a window now: the next batch does not wait for it.
        tokio::time::sleep(ms(2)).await;
        q.push(3, 30);
        assert_eq!(waited(&q, 3).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn steps_due_after_the_window_or_into_a_full_batch_are_not_waited_for() {
        let q = queue(ms(2));
        q.expect(20, Instant::now() + ms(3));
        q.push(1, 10);
        assert_eq!(waited(&q, 1).await, Duration::ZERO, "due after the window");
        q.expect(30, Instant::now());
        for (id, key) in [(2, 40), (3, 50), (4, 60)] {
            q.push(id, key);
        }
        assert_eq!(waited(&q, 1).await, Duration::ZERO, "the batch is full (4)");
        assert_eq!(q.take_batch(1), vec![1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn before_any_batch_has_computed_nobody_waits() {
        let q: Queue<u64> = Queue::with_max(4);
        assert_eq!(q.window(), Duration::ZERO);
        q.expect(20, Instant::now());
        q.push(1, 10);
        assert_eq!(waited(&q, 1).await, Duration::ZERO);
    }

    #[test]
    fn the_window_is_a_quarter_of_a_batch_and_at_most_most_wait() {
        let q: Queue<u64> = Queue::with_max(4);
        q.computed(ms(8));
        assert_eq!(q.window(), ms(2));
        q.computed(ms(8) * 5);
        // (8 · 3 + 40) / 4 = 16 ms a batch on average.
        assert_eq!(q.window(), ms(4));
        q.computed(ms(400));
        assert_eq!(q.window(), MOST_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pace_is_the_moving_average_of_the_gaps_after_its_outputs() {
        let q: Queue<u64> = Queue::with_max(4);
        let mut p = Pace::new(&q);
        // A wide window: every prediction here hits.
        let w = ms(10);
        let t0 = Instant::now();
        p.arrive(t0, w);
        assert_eq!(p.done(t0), None, "no gap known yet");
        p.arrive(t0 + ms(4), w);
        assert_eq!(p.done(t0 + ms(10)), Some(t0 + ms(14)));
        p.arrive(t0 + ms(18), w);
        // (4 · 3 + 8) / 4 = 5 ms.
        assert_eq!(p.done(t0 + ms(20)), Some(t0 + ms(25)));
        assert_ne!(Pace::new(&q).key, p.key);
        // A gap of more than LONGEST_GAP starts afresh; so does a step in between.
        p.arrive(t0 + ms(20) + LONGEST_GAP + ms(1), w);
        let t1 = Instant::now() + ms(3000);
        assert_eq!(p.done(t1), None);
        p.arrive(t1 + ms(3), w);
        assert_eq!(p.done(t1 + ms(5)), Some(t1 + ms(8)));
        p.interrupted();
        p.arrive(t1 + ms(100), w);
        assert_eq!(
            p.done(t1 + ms(101)),
            Some(t1 + ms(104)),
            "the 3 ms gap is kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_whose_step_missed_its_prediction_is_not_announced_until_one_hits() {
        let q: Queue<u64> = Queue::with_max(4);
        let mut p = Pace::new(&q);
        let w = ms(1);
        let t0 = Instant::now();
        p.arrive(t0, w);
        p.done(t0);
        p.arrive(t0 + ms(2), w);
        assert_eq!(p.done(t0 + ms(3)), Some(t0 + ms(5)));
        // Due at +5, comes at +20: a miss, so the next prediction is kept to itself.
        p.arrive(t0 + ms(20), w);
        let next = p.done(t0 + ms(21));
        assert_eq!(next, None, "a session that missed is not waited for");
        // (2 · 3 + 17) / 4 = 5.75 ms, due at 26.75; it comes at 27: a hit, trusted again.
        p.arrive(t0 + ms(27), w);
        assert!(p.done(t0 + ms(28)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_gatherer_whose_step_another_batch_took_stops_waiting() {
        let q = Arc::new(queue(ms(4)));
        q.expect(30, Instant::now() + ms(2));
        q.push(1, 10);
        q.push(2, 20);
        let other = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(1)).await;
            // Another permit holder takes step 2 and, with it, step 1.
            assert_eq!(other.take_batch(2), vec![2, 1]);
        });
        assert_eq!(waited(&q, 1).await, ms(1), "woken when its step was taken");
        assert!(q.take_batch(1).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_left_is_not_waited_for() {
        let q = queue(ms(2));
        let p = Pace::new(&q);
        let key = p.key;
        q.expect(key, Instant::now() + ms(1));
        p.leave(&q);
        q.push(1, 10);
        assert_eq!(waited(&q, 1).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn expectations_long_overdue_are_dropped_and_the_map_stays_bounded() {
        let q: Queue<u64> = Queue::with_max(4);
        let now = Instant::now();
        for key in 0..PRUNE_AT as u64 {
            q.expect(key, now);
        }
        tokio::time::sleep(MOST_WAIT + ms(1)).await;
        q.expect(1000, Instant::now());
        assert_eq!(
            q.state.lock().unwrap().due.len(),
            1,
            "the overdue ones went"
        );
        let now = Instant::now();
        for key in 0..2 * MOST_DUE as u64 {
            q.expect(key, now);
        }
        assert_eq!(q.state.lock().unwrap().due.len(), MOST_DUE);
    }

    #[test]
    fn batches_stay_within_the_flag_the_span_and_bounds() {
        assert_eq!(Queue::new(usize::MAX, 8).max, 8);
        assert_eq!(Queue::new(usize::MAX, 0).max, 1);
        assert_eq!(Queue::new(usize::MAX, 1000).max, MOST_BATCH);
        assert_eq!(Queue::new(4, 16).max, 4);
        assert_eq!(Queue::new(1, 8).max, 1);
        assert!(!Queue::new(1, 8).batches());
    }

    /// Blocks 0:2 of the default model in the fast mode.
    fn two_blocks() -> BlockSpan {
        let model = crate::fetch::ensure_default_model(&mut |_| {}).unwrap();
        let file = pollen_shard::ModelFile::open(&model).unwrap();
        let range = pollen_shard::BlockRange { start: 0, end: 2 };
        let load = pollen_shard::LoadOptions::default();
        BlockSpan::load(&file, range, &load, &mut |_, _| {}).unwrap()
    }

    /// Hidden states `(1, rows, hidden)`, a ramp that `seed` tilts.
    fn ramp(span: &BlockSpan, seed: usize, rows: usize) -> Tensor {
        let hidden = span.config().hidden_size;
        Tensor::arange(0f32, (rows * hidden) as f32, &candle_core::Device::Cpu)
            .unwrap()
            .affine(0.001 * (seed + 1) as f64, -1.0)
            .unwrap()
            .reshape((1, rows, hidden))
            .unwrap()
    }

    /// A queued decode step of a new session with a history of `past` tokens, needing
    /// `need` bytes of working memory, and the receiver of its answer.
    fn job(
        span: &BlockSpan,
        id: u64,
        past: usize,
        need: usize,
    ) -> (Job, oneshot::Receiver<Result<StepResult, NotRun>>) {
        let mut cache = span.new_cache(pollen_shard::CacheLimits::default());
        span.forward(&ramp(span, id as usize, past), 0, &mut cache)
            .unwrap();
        let (reply, rx) = oneshot::channel();
        let job = Job {
            id,
            input: ramp(span, 10 + id as usize, 1),
            position: cache.len(),
            cache,
            need,
            memory: None,
            reply,
        };
        (job, rx)
    }

    /// One session's step at a position its cache does not hold is refused alone, its
    /// cache unmoved: the other steps of its batch still compute in one pass, each with
    /// the bits of its own step alone, and each step's memory is given back as it is
    /// answered.
    #[test]
    fn a_step_refused_alone_leaves_its_batch_computing() {
        let span = two_blocks();
        let budget = Budget::new(30);
        let (mut jobs, replies): (Vec<Job>, Vec<_>) = [3, 9, 5]
            .into_iter()
            .enumerate()
            .map(|(i, past)| job(&span, i as u64, past, 10))
            .unzip();
        let alone: Vec<Vec<f32>> = jobs
            .iter()
            .map(|j| {
                let mut c = j.cache.clone();
                let out = span.forward(&j.input, c.len(), &mut c).unwrap();
                out.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        // The second session's step claims a position one past its cache.
        jobs[1].position += 1;
        let Memory { fit, wait, refused } = take_memory(&budget, jobs);
        assert_eq!((fit.len(), wait.len(), refused.len()), (3, 0, 0));
        assert_eq!(budget.taken(), 30);
        let computed = run(&span, fit);
        if span.batch_rows() >= 3 {
            assert_eq!(computed, 2, "the two good steps in one pass");
        }
        assert_eq!(
            budget.taken(),
            0,
            "each step's memory given back as it is answered"
        );
        let mut answers = replies
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().ok().unwrap());
        for (i, want) in [(0, 4), (1, 9), (2, 6)] {
            let (cache, out) = answers.next().unwrap();
            assert_eq!(cache.len(), want, "session {i}'s cache");
            match out {
                Ok(out) => {
                    assert_ne!(i, 1);
                    let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(got, alone[i], "session {i}'s bits");
                }
                Err(e) => {
                    assert_eq!(i, 1, "{e}");
                    assert!(
                        matches!(e, ShardError::PositionMismatch { cached: 9, got: 10 }),
                        "{e}"
                    );
                }
            }
        }
    }

    /// A batch takes its steps' working memory in order: those the budget has no room
    /// for beside the ones before them wait (back in the queue, first in line), and a
    /// step with no room even with nothing of its batch holding memory is refused.
    #[test]
    fn a_batch_takes_memory_in_order_and_leaves_what_does_not_fit_waiting() {
        let span = two_blocks();
        let budget = Budget::new(10);
        let jobs: Vec<Job> = [6, 3, 20, 3]
            .into_iter()
            .enumerate()
            .map(|(i, need)| job(&span, i as u64, 2, need).0)
            .collect();
        let Memory { fit, wait, refused } = take_memory(&budget, jobs);
        let ids = |jobs: &[Job]| jobs.iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            (ids(&fit), ids(&wait), ids(&refused)),
            (vec![0, 1], vec![2, 3], vec![])
        );
        assert_eq!(budget.taken(), 9);
        drop(fit);
        assert_eq!(budget.taken(), 0);
        // The next batch, led by the step that needs more than the whole budget: with
        // nothing of its batch holding memory it is refused, and the step after it fits.
        let Memory { fit, wait, refused } = take_memory(&budget, wait);
        assert_eq!(
            (ids(&fit), ids(&wait), ids(&refused)),
            (vec![3], vec![], vec![2])
        );
    }

    /// Outputs brought over in one copy keep their places around refused steps.
    #[test]
    fn outputs_in_one_copy_keep_their_places() {
        let row = |v: f32| Tensor::full(v, (1, 1, 4), &candle_core::Device::Cpu).unwrap();
        let outs = vec![
            Ok(row(1.0)),
            Err(ShardError::BadInput("refused".into())),
            Ok(row(3.0)),
        ];
        let got: Vec<Option<Vec<f32>>> = to_cpu_at_once(outs)
            .into_iter()
            .map(|o| o.ok().map(|t| t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        assert_eq!(got, vec![Some(vec![1.0; 4]), None, Some(vec![3.0; 4])]);
    }

    #[tokio::test(start_paused = true)]
    async fn steps_put_back_lead_the_next_batch_in_their_order() {
        let q = queue(ms(4));
        q.push(5, 50);
        q.push(6, 60);
        q.put_back(vec![1, 2]);
        assert_eq!(q.take_batch(2), vec![2, 1, 5, 6]);
    }

    /// A step another batch took waits for its answer, or, if that batch puts it back,
    /// learns so at once (to lead a batch again).
    #[tokio::test(start_paused = true)]
    async fn a_step_another_batch_took_waits_for_its_answer_or_its_return() {
        let q = Arc::new(queue(ms(4)));
        q.push(1, 10);
        assert_eq!(q.take_batch(1), vec![1]);
        let (tx, mut rx) = oneshot::channel::<u32>();
        let other = q.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(3)).await;
            other.put_back(vec![1]);
        });
        let t = Instant::now();
        assert!(q.answer_or_requeued(1, &mut rx).await.is_none());
        assert_eq!(t.elapsed(), ms(3), "back in the queue");
        assert_eq!(q.take_batch(1), vec![1]);
        tokio::spawn(async move {
            tokio::time::sleep(ms(2)).await;
            tx.send(7).unwrap();
        });
        assert_eq!(q.answer_or_requeued(1, &mut rx).await, Some(Ok(7)));
    }

    /// A prompt computed by blocks takes from the memory budget its decoded input, what it
    /// holds from part to part and each part's working memory: together the step's whole
    /// figure, not more (the input once), and each share something.
    #[test]
    fn a_prompt_by_blocks_takes_its_steps_figure_once() {
        let model = crate::fetch::ensure_default_model(&mut |_| {}).unwrap();
        let file = pollen_shard::ModelFile::open(&model).unwrap();
        let load = pollen_shard::LoadOptions {
            device: candle_core::Device::Cpu,
            mode: pollen_shard::WeightMode::Exact,
        };
        let range = pollen_shard::BlockRange { start: 0, end: 2 };
        let span = BlockSpan::load(&file, range, &load, &mut |_, _| {}).unwrap();
        assert!(span.splits_prompts_by_blocks());
        let parts = Parts::Blocks(ms(100));
        for (rows, position) in [(LEAST_PART_ROWS + 1, 0), (256, 0), (1000, 512)] {
            let input = input_bytes(&span, rows);
            let held = parts.held_bytes(&span, rows, position);
            let part = block_part_bytes(&span, rows, position);
            assert!(
                input > 0 && held > 0 && part > 0,
                "{rows} rows: {input} {held} {part}"
            );
            assert_eq!(
                input + held + part,
                span.step_memory_bytes(rows, position),
                "{rows} rows at {position}"
            );
        }
    }
}
