//! Thread settings for candle's CPU kernels, and where short blocking work runs
//! ([`ShortWork`]).
//!
//! candle asks for its thread count on every quantized matmul; without
//! `RAYON_NUM_THREADS` it works the count out from the CPU topology each time,
//! and idle rayon workers spin. Two busy processes that each take every core
//! collapse to a few tokens per second. Pollen therefore always sets the
//! count explicitly, once, before any thread pool starts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sets candle's and rayon's thread counts for this process. Must be called
/// at the very start of `main`, before any other thread exists.
#[allow(unsafe_code)]
pub fn configure(threads: usize) {
    let n = threads.max(1).to_string();
    // SAFETY: called first thing in `main`, while the process has one thread,
    // so no other thread can read the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &n);
        std::env::set_var("CANDLE_NUM_THREADS", &n);
    }
}

/// Where short blocking work (a decode step of a small span, the client's output head)
/// runs: on the calling tokio worker when work of its kind is known to take a few
/// milliseconds, otherwise on the blocking pool.
///
/// The pool costs two thread hand-offs (to its thread and back), each the wake-up of a
/// sleeping thread. A decode step of the default model's ten blocks computes in about
/// 2 ms, and on a busy two-core machine the hand-offs cost a server about half a
/// millisecond more a step (the swarm bench in the README). Work longer than
/// [`WORKER_MOST`] on average goes to the pool, where two hand-offs are little against it
/// and the worker is not held from the network; and only one piece of work in the whole
/// process runs on a worker at a time (however many servers and clients it holds), so
/// that the runtime's other worker (there are two) always serves the rest. A runtime of
/// one thread never computes on it.
#[derive(Debug, Default)]
pub struct ShortWork {
    /// How long this kind of work took.
    average: TimeAverage,
}

/// A moving average of durations, in nanoseconds (0: none yet): each new one moves it a
/// quarter of the way.
#[derive(Debug, Default)]
pub(crate) struct TimeAverage(AtomicU64);

impl TimeAverage {
    /// The average in nanoseconds; 0 before the first.
    pub(crate) fn nanos(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Adds `took`: the average moves a quarter of the way to it (the first is taken whole).
    pub(crate) fn add(&self, took: Duration) {
        let new = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let old = self.nanos();
        let avg = if old == 0 {
            new
        } else {
            (old / 4).saturating_mul(3).saturating_add(new / 4)
        };
        self.0.store(avg.max(1), Ordering::Relaxed);
    }
}

/// Whether a piece of short work, of any kind, is running on a tokio worker now.
static ON_WORKER: AtomicBool = AtomicBool::new(false);

/// The longest a kind of work may take on average to run on a tokio worker.
pub const WORKER_MOST: Duration = Duration::from_millis(8);

/// Work running on a tokio worker; dropping it lets the next.
struct OnWorker<'a>(&'a AtomicBool);

impl Drop for OnWorker<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ShortWork {
    /// Runs `f`: where it is `of_kind` (work this average is about), on this worker if
    /// [`Self::claim`] allows it, else on the blocking pool; its time then joins the
    /// average. Work not of the kind (a batch, a prompt, a GPU's work) always goes to the
    /// pool. A panic in `f` comes back as an error either way.
    pub async fn run<T: Send + 'static>(
        &self,
        of_kind: bool,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        if !of_kind {
            return tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| e.to_string());
        }
        // Tasks this one woke (its last writes) run first: while it computes, a task
        // in this worker's next-task slot could not be taken by the other worker.
        tokio::task::yield_now().await;
        let started = Instant::now();
        let out = match self.claim() {
            Some(_worker) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
                    p.downcast_ref::<&str>()
                        .map(|m| (*m).to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "the computation panicked".into())
                })
            }
            None => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| e.to_string()),
        };
        self.average.add(started.elapsed());
        out
    }

    /// Leave to run one piece of work on the calling thread: only once this kind of work
    /// is known to take under [`WORKER_MOST`] on average, only one in the process at a
    /// time, and never on a runtime of one thread.
    fn claim(&self) -> Option<OnWorker<'static>> {
        let average = self.average.nanos();
        if average == 0 || u128::from(average) > WORKER_MOST.as_nanos() {
            return None;
        }
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if !matches!(flavor, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) {
            return None;
        }
        ON_WORKER
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| OnWorker(&ON_WORKER))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Whether `work.run` ran its closure on the calling thread.
    async fn ran_here(work: &ShortWork) -> bool {
        let here = std::thread::current().id();
        work.run(true, move || std::thread::current().id() == here)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_work_known_to_be_short_runs_on_the_worker_and_one_at_a_time() {
        let work = ShortWork::default();
        assert!(!ran_here(&work).await, "nothing known yet: the pool");
        assert!(work.average.nanos() > 0, "now known");
        // Each run moves the average by what it took, which a loaded machine can make
        // long: set it short before each check that needs it so.
        let short = |work: &ShortWork| work.average.0.store(1_000_000, Ordering::Relaxed);
        short(&work);
        assert!(ran_here(&work).await, "short: this worker");
        short(&work);
        {
            let _held = work.claim().unwrap();
            assert!(work.claim().is_none());
            assert!(!ran_here(&work).await, "other work on a worker: the pool");
            // Work of another kind (another server or client in this process) too.
            let other = ShortWork::default();
            short(&other);
            assert!(
                !ran_here(&other).await,
                "another kind's work on a worker: the pool"
            );
        }
        short(&work);
        assert!(ran_here(&work).await, "let go: this worker again");
        short(&work);
        let here = std::thread::current().id();
        let elsewhere = work.run(false, move || std::thread::current().id() != here);
        assert!(elsewhere.await.unwrap(), "not of the kind: the pool");
        // A panic comes back as an error, and the worker is let go.
        short(&work);
        let e = work.run(true, || -> u32 { panic!("boom") }).await;
        assert_eq!(e.unwrap_err(), "boom");
        assert!(!ON_WORKER.load(Ordering::Acquire));
        // Slow work moves the average past the bound: the pool again, where a panic
        // comes back as an error too.
        short(&work);
        work.average.add(WORKER_MOST * 8);
        assert!(!ran_here(&work).await, "{work:?}");
        let e = work
            .run(true, || -> u32 { panic!("{}", String::from("boom")) })
            .await;
        assert!(e.unwrap_err().contains("boom"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_runtime_of_one_thread_never_computes_on_it() {
        let work = ShortWork::default();
        work.average.0.store(1_000_000, Ordering::Relaxed);
        assert!(!ran_here(&work).await);
    }
}
