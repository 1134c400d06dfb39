//! The session table of a server: which sessions are open, who opened each, and where
//! an attach stream for a session is handed to the task that runs it.
//!
//! A session's entry lives exactly as long as its [`Reservation`]: the task that runs the
//! session holds it, and dropping it (the session ended, however) frees the slot.

use libp2p::PeerId;
use pollen_protocol::SessionId;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why the table refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// Every slot is taken.
    #[error("this server is full ({max} sessions)")]
    Full {
        /// The table's capacity.
        max: usize,
    },
    /// The client holds its most sessions here already.
    #[error("client {client} holds {max} sessions on this server already, the most one client may")]
    ClientFull {
        /// The client.
        client: PeerId,
        /// The cap per client.
        max: usize,
    },
    /// The peer that opened the session (the hop before this one) holds its most
    /// sessions here already.
    #[error("peer {opener} opened {max} sessions on this server already, the most one peer may")]
    OpenerFull {
        /// The opening peer.
        opener: PeerId,
        /// The cap per opener (the cap per client).
        max: usize,
    },
    /// A session of that id is open already.
    #[error("session {0} is already open")]
    Duplicate(SessionId),
    /// No session of that id is open.
    #[error("no open session {0}")]
    Unknown(SessionId),
    /// The session ends at another server: attach there.
    #[error("session {0} does not end at this server")]
    NotLastHop(SessionId),
    /// Only the client that opened a session may attach to it.
    #[error("session {session} belongs to another client, not {peer}")]
    NotOwner {
        /// The session.
        session: SessionId,
        /// Who tried.
        peer: PeerId,
    },
}

struct Entry<A> {
    client: PeerId,
    /// Who opened the session here: the client at the first hop, the hop before at a
    /// later one.
    opener: PeerId,
    last_hop: bool,
    attach: mpsc::Sender<A>,
    /// When the session last did something.
    active: Instant,
    /// Fired to evict the session.
    evict: CancellationToken,
}

/// The caps per peer of a server: what one client or one connected peer may hold, well
/// below the server's own caps, so that no one peer can take a server out of every route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Most sessions open for one client (`--max-sessions-per-client`); past the first
    /// hop the opening peer is held to twice this
    /// ([`PeerLimits::sessions_per_opener`]).
    pub sessions_per_client: usize,
    /// Most session streams open from one connected peer at once (`--max-streams-per-peer`):
    /// a server before this one carries one per session it routes here, plus the
    /// attach streams of its clients.
    pub streams_per_peer: usize,
    /// How long a session may stay open without a first step (`--first-step-timeout`),
    /// per hop before this one (each has its prefill to compute first), for at most four
    /// hops.
    pub first_step_timeout: Duration,
}

impl PeerLimits {
    /// Most sessions one peer may open here past the first hop: twice the share of a
    /// client, since a server before this one carries several clients' sessions, each
    /// held to its share there, so that one client squatting its share there still
    /// leaves room for the others' sessions here.
    pub fn sessions_per_opener(&self) -> usize {
        self.sessions_per_client.saturating_mul(2)
    }
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            sessions_per_client: 8,
            streams_per_peer: 24,
            first_step_timeout: Duration::from_secs(10),
        }
    }
}

/// Most session streams that wait for their first frame at once: past it the one that
/// has waited longest is dropped. Silent streams cost their opener nothing, so a cap on
/// them alone would let a few peers hold every stream slot; dropping the oldest
/// instead leaves a stream whose first frame comes at once (every honest one: the
/// frame follows the stream's opening) room to arrive.
pub const WAITING_STREAMS: usize = 8;

/// Open sessions, at most `max`; `A` is what an attach hands to the session (a stream's
/// writer in the server).
pub struct SessionTable<A> {
    entries: Mutex<HashMap<SessionId, Entry<A>>>,
    max: usize,
    limits: PeerLimits,
    streams: Mutex<HashMap<PeerId, usize>>,
    /// Streams waiting for their first frame, oldest first: a number each, and what
    /// drops it.
    waiting: Mutex<(u64, VecDeque<(u64, CancellationToken)>)>,
    log: Mutex<crate::net::book::RateLimitedLog>,
}

/// A stream's place among those waiting for their first frame
/// ([`SessionTable::wait_first`]), given back on drop.
pub struct Waiting<A> {
    id: u64,
    dropped: CancellationToken,
    table: Arc<SessionTable<A>>,
}

impl<A> Waiting<A> {
    /// Fires when [`WAITING_STREAMS`] newer streams wait: this one is to be dropped.
    pub async fn displaced(&self) {
        self.dropped.cancelled().await
    }
}

impl<A> Drop for Waiting<A> {
    fn drop(&mut self) {
        let mut w = self
            .table
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        w.1.retain(|(id, _)| *id != self.id);
    }
}

/// A session stream's place in its peer's count, given back on drop.
pub struct StreamGuard<A> {
    peer: PeerId,
    table: Arc<SessionTable<A>>,
}

impl<A> Drop for StreamGuard<A> {
    fn drop(&mut self) {
        let mut streams = self
            .table
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = streams.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.peer);
            }
        }
    }
}

impl<A> std::fmt::Debug for SessionTable<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionTable({} of {})", self.len(), self.max)
    }
}

/// A session's slot in the table, freed on drop.
pub struct Reservation<A> {
    id: SessionId,
    table: Arc<SessionTable<A>>,
    /// Attach streams for this session arrive here.
    pub attached: mpsc::Receiver<A>,
    /// Fires when the server evicts this session to make room.
    pub evicted: CancellationToken,
}

impl<A> Reservation<A> {
    /// Marks the session active now (it is evicted last among idle ones).
    pub fn touch(&self) {
        if let Some(e) = self.table.lock().get_mut(&self.id) {
            e.active = e.active.max(Instant::now());
        }
    }

    /// Marks the session busy until `until` (waiting on another peer as part of its
    /// work: its first step, a next hop's answer): it is not idle before then.
    pub fn touch_until(&self, until: Instant) {
        if let Some(e) = self.table.lock().get_mut(&self.id) {
            e.active = e.active.max(until);
        }
    }
}

impl<A> std::fmt::Debug for Reservation<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({})", self.id)
    }
}

impl<A> Drop for Reservation<A> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl<A> SessionTable<A> {
    /// A table of at most `max` sessions, with the default caps per peer.
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_limits(max, PeerLimits::default())
    }

    /// A table of at most `max` sessions, and `limits` per peer.
    pub fn with_limits(max: usize, limits: PeerLimits) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            max,
            limits,
            streams: Mutex::new(HashMap::new()),
            waiting: Mutex::new((0, VecDeque::new())),
            log: Mutex::new(Default::default()),
        })
    }

    /// Logs a refusal of kind `kind` at most every ten seconds (a flood of them would
    /// otherwise fill the log).
    pub fn warn(&self, kind: &'static str, message: impl FnOnce() -> String) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .warn(kind, message);
    }

    /// The caps per peer.
    pub fn limits(&self) -> &PeerLimits {
        &self.limits
    }

    /// Counts a new session stream from `peer`; `None` when it has
    /// [`PeerLimits::streams_per_peer`] open already.
    pub fn stream(self: &Arc<Self>, peer: PeerId) -> Option<StreamGuard<A>> {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let n = streams.entry(peer).or_insert(0);
        if *n >= self.limits.streams_per_peer {
            return None;
        }
        *n += 1;
        Some(StreamGuard {
            peer,
            table: self.clone(),
        })
    }

    /// Counts a new stream among those waiting for their first frame; past
    /// [`WAITING_STREAMS`] the one that has waited longest is displaced.
    pub fn wait_first(self: &Arc<Self>) -> Waiting<A> {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        w.0 += 1;
        let id = w.0;
        while w.1.len() >= WAITING_STREAMS {
            if let Some((_, dropped)) = w.1.pop_front() {
                dropped.cancel();
            }
        }
        let dropped = CancellationToken::new();
        w.1.push_back((id, dropped.clone()));
        Waiting {
            id,
            dropped,
            table: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry<A>>> {
        // A panic while holding the lock cannot leave the map inconsistent (every
        // operation is one insert or remove), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Free slots.
    pub fn free(&self) -> usize {
        self.max.saturating_sub(self.len())
    }

    /// Takes a slot for session `id` of `client`, opened here by `opener` (the client
    /// itself at the first hop, the hop before at a later one); `last_hop` when the
    /// session's outputs leave from this server (so its client attaches here).
    ///
    /// The client is held to [`PeerLimits::sessions_per_client`]. Past the first hop the
    /// client is only a name the opener gives, so the opener is held too, to
    /// [`PeerLimits::sessions_per_opener`]: made-up client ids get it no further, and
    /// naming a victim fills at most that much of the table.
    pub fn open(
        self: &Arc<Self>,
        id: SessionId,
        client: PeerId,
        opener: PeerId,
        last_hop: bool,
    ) -> Result<Reservation<A>, TableError> {
        let mut entries = self.lock();
        if entries.contains_key(&id) {
            return Err(TableError::Duplicate(id));
        }
        let held = entries.values().filter(|e| e.client == client).count();
        if held >= self.limits.sessions_per_client {
            return Err(TableError::ClientFull {
                client,
                max: self.limits.sessions_per_client,
            });
        }
        if opener != client {
            let max = self.limits.sessions_per_opener();
            let opened = entries.values().filter(|e| e.opener == opener).count();
            if opened >= max {
                return Err(TableError::OpenerFull { opener, max });
            }
        }
        // Last: `Full` means the session would be taken but for room (a full table
        // makes room for it by evicting; one refused for its peer's share must not).
        if entries.len() >= self.max {
            return Err(TableError::Full { max: self.max });
        }
        let (tx, rx) = mpsc::channel(1);
        let evicted = CancellationToken::new();
        entries.insert(
            id,
            Entry {
                client,
                opener,
                last_hop,
                attach: tx,
                active: Instant::now(),
                evict: evicted.clone(),
            },
        );
        Ok(Reservation {
            id,
            table: self.clone(),
            attached: rx,
            evicted,
        })
    }

    /// Evicts the session idle the longest, if one has been idle at least `min_idle`
    /// and is not being evicted already; how long it had been idle.
    pub fn evict_idlest(&self, min_idle: Duration) -> Option<Duration> {
        let entries = self.lock();
        let (_, e) = entries
            .iter()
            .filter(|(_, e)| !e.evict.is_cancelled() && e.active.elapsed() >= min_idle)
            .min_by_key(|(_, e)| e.active)?;
        e.evict.cancel();
        Some(e.active.elapsed())
    }

    /// Where `peer` hands its attach stream for session `id`: only the session's own
    /// client, and only at its last hop.
    pub fn attach(&self, id: SessionId, peer: PeerId) -> Result<mpsc::Sender<A>, TableError> {
        let entries = self.lock();
        let e = entries.get(&id).ok_or(TableError::Unknown(id))?;
        if !e.last_hop {
            return Err(TableError::NotLastHop(id));
        }
        if e.client != peer {
            return Err(TableError::NotOwner { session: id, peer });
        }
        Ok(e.attach.clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_are_capped_and_freed_on_drop() {
        let t = SessionTable::<u8>::new(2);
        let client = PeerId::random();
        let a = t.open(SessionId(1), client, client, true).unwrap();
        let b = t.open(SessionId(2), client, client, false).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.free(), 0);
        assert_eq!(
            t.open(SessionId(3), client, client, true).unwrap_err(),
            TableError::Full { max: 2 }
        );
        drop(a);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.open(SessionId(2), client, client, true).unwrap_err(),
            TableError::Duplicate(SessionId(2))
        );
        let _c = t.open(SessionId(3), client, client, true).unwrap();
        drop(b);
        assert_eq!(t.len(), 1);
    }

    #[tokio::test]
    async fn only_the_owner_attaches_and_only_at_the_last_hop() {
        let t = SessionTable::<u8>::new(4);
        let owner = PeerId::random();
        let stranger = PeerId::random();
        let mut last = t.open(SessionId(7), owner, owner, true).unwrap();
        let _middle = t.open(SessionId(8), owner, owner, false).unwrap();
        assert_eq!(
            t.attach(SessionId(7), stranger).unwrap_err(),
            TableError::NotOwner {
                session: SessionId(7),
                peer: stranger
            }
        );
        assert_eq!(
            t.attach(SessionId(8), owner).unwrap_err(),
            TableError::NotLastHop(SessionId(8))
        );
        assert_eq!(
            t.attach(SessionId(9), owner).unwrap_err(),
            TableError::Unknown(SessionId(9))
        );
        t.attach(SessionId(7), owner)
            .unwrap()
            .send(42)
            .await
            .unwrap();
        assert_eq!(last.attached.recv().await, Some(42));
        drop(last);
        assert_eq!(
            t.attach(SessionId(7), owner).unwrap_err(),
            TableError::Unknown(SessionId(7))
        );
    }

    #[test]
    fn one_client_holds_at_most_its_share_and_one_peer_its_streams() {
        let limits = PeerLimits {
            sessions_per_client: 2,
            streams_per_peer: 3,
            ..PeerLimits::default()
        };
        let t = SessionTable::<u8>::with_limits(16, limits);
        let (squatter, honest) = (PeerId::random(), PeerId::random());
        let _a = t.open(SessionId(1), squatter, squatter, true).unwrap();
        let b = t.open(SessionId(2), squatter, squatter, true).unwrap();
        assert_eq!(
            t.open(SessionId(3), squatter, squatter, true).unwrap_err(),
            TableError::ClientFull {
                client: squatter,
                max: 2
            }
        );
        // Another client still gets in, and the squatter again once one ends.
        let _c = t.open(SessionId(4), honest, honest, true).unwrap();
        drop(b);
        let _d = t.open(SessionId(5), squatter, squatter, true).unwrap();
        let streams: Vec<_> = (0..3).map(|_| t.stream(squatter).unwrap()).collect();
        assert!(t.stream(squatter).is_none());
        assert!(t.stream(honest).is_some());
        drop(streams);
        assert!(t.stream(squatter).is_some());
    }

    #[test]
    fn a_later_hop_caps_its_opener_as_well_as_the_named_client() {
        let limits = PeerLimits {
            sessions_per_client: 2,
            ..PeerLimits::default()
        };
        let t = SessionTable::<u8>::with_limits(16, limits);
        let (hop_before, victim) = (PeerId::random(), PeerId::random());
        // An opener cannot dodge its cap by naming a fresh client for each session...
        let made_up: Vec<_> = (0..4)
            .map(|i| {
                t.open(SessionId(i), PeerId::random(), hop_before, false)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            t.open(SessionId(9), PeerId::random(), hop_before, false)
                .unwrap_err(),
            TableError::OpenerFull {
                opener: hop_before,
                max: 4
            }
        );
        // Naming a victim counts against the victim's share, but no further than the
        // opener's own cap.
        drop(made_up);
        let squat: Vec<_> = (0..2)
            .map(|i| {
                t.open(SessionId(10 + i), victim, hop_before, false)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            t.open(SessionId(12), victim, victim, true).unwrap_err(),
            TableError::ClientFull {
                client: victim,
                max: 2
            }
        );
        // One client at its share through a server before this one leaves that server
        // room for other clients' sessions here.
        let _other = t
            .open(SessionId(13), PeerId::random(), hop_before, false)
            .unwrap();
        drop(squat);
        let _own = t.open(SessionId(14), victim, victim, true).unwrap();
    }

    /// Streams waiting for their first frame: past [`WAITING_STREAMS`] the one that has
    /// waited longest is displaced, and one that got its frame leaves the queue.
    #[tokio::test]
    async fn the_stream_that_waited_longest_gives_way() {
        let t = SessionTable::<u8>::new(4);
        let mut silent: Vec<_> = (0..WAITING_STREAMS).map(|_| t.wait_first()).collect();
        // One got its first frame: no other is displaced by the next.
        drop(silent.remove(3));
        let newer = t.wait_first();
        assert!(silent.iter().all(|w| !w.dropped.is_cancelled()));
        // The queue is full again: the next displaces the oldest, then the one after it.
        let honest = t.wait_first();
        assert!(silent[0].dropped.is_cancelled());
        tokio::time::timeout(Duration::from_secs(1), silent[0].displaced())
            .await
            .unwrap();
        assert!(!silent[1].dropped.is_cancelled());
        let _another = t.wait_first();
        assert!(silent[1].dropped.is_cancelled());
        assert!(!newer.dropped.is_cancelled() && !honest.dropped.is_cancelled());
        assert!(t.waiting.lock().unwrap().1.len() <= WAITING_STREAMS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_idle_longest_is_evicted_first() {
        let t = SessionTable::<u8>::new(4);
        let client = PeerId::random();
        let a = t.open(SessionId(1), client, client, true).unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let b = t.open(SessionId(2), client, client, true).unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        a.touch();
        // b has been idle 10 s, a 0 s.
        assert_eq!(t.evict_idlest(Duration::from_secs(30)), None);
        assert_eq!(
            t.evict_idlest(Duration::from_secs(5)),
            Some(Duration::from_secs(10))
        );
        assert!(b.evicted.is_cancelled() && !a.evicted.is_cancelled());
        // b is being evicted already; a is not idle long enough.
        assert_eq!(t.evict_idlest(Duration::from_secs(5)), None);
        // A session busy waiting on another peer is not idle until that wait is due.
        let c = t.open(SessionId(3), client, client, true).unwrap();
        c.touch_until(Instant::now() + Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            t.evict_idlest(Duration::from_secs(5)),
            Some(Duration::from_secs(10))
        );
        assert!(a.evicted.is_cancelled() && !c.evicted.is_cancelled());
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(
            t.evict_idlest(Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        assert!(c.evicted.is_cancelled());
    }
}

/// A byte budget shared by every session of a server (their KV caches), taken at open
/// for the most a session may hold and given back when it ends.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    taken: std::sync::atomic::AtomicUsize,
}

/// Bytes taken from a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct BudgetGuard {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        self.budget
            .taken
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Budget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            taken: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The budget in bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes taken now.
    pub fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes `bytes`, or `None` when that would pass the budget.
    pub fn try_take(self: &Arc<Self>, bytes: usize) -> Option<BudgetGuard> {
        use std::sync::atomic::Ordering;
        let mut now = self.taken.load(Ordering::Acquire);
        loop {
            let next = now.checked_add(bytes).filter(|n| *n <= self.max)?;
            match self
                .taken
                .compare_exchange(now, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(BudgetGuard {
                        budget: self.clone(),
                        bytes,
                    });
                }
                Err(seen) => now = seen,
            }
        }
    }
}

#[cfg(test)]
mod budget_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn takes_up_to_the_budget_and_gives_back_on_drop() {
        let b = Budget::new(100);
        let x = b.try_take(60).unwrap();
        assert!(b.try_take(41).is_none());
        let y = b.try_take(40).unwrap();
        assert_eq!(b.taken(), 100);
        assert!(b.try_take(1).is_none());
        drop(x);
        assert_eq!(b.taken(), 40);
        assert!(b.try_take(usize::MAX).is_none(), "no overflow");
        drop(y);
        assert_eq!(b.taken(), 0);
    }
}

/// The server's one memory budget, for the KV caches and the in-flight activations of
/// every session, in bytes.
///
/// With `--max-memory` it is what the weights leave of it. Otherwise it is the KV budget
/// (`--max-cache-mb`, or enough for every session's full cache) plus room for
/// `compute_slots` steps of a full prompt (`step_bytes`), so that activations are
/// budgeted too without shrinking what the KV flag promises.
pub fn memory_budget(
    max_memory: Option<u64>,
    weight_bytes: usize,
    kv_bytes: usize,
    step_bytes: usize,
    compute_slots: usize,
) -> usize {
    match max_memory {
        Some(m) => usize::try_from(m)
            .unwrap_or(usize::MAX)
            .saturating_sub(weight_bytes),
        None => kv_bytes.saturating_add(step_bytes.saturating_mul(compute_slots.max(1))),
    }
}

#[cfg(test)]
mod memory_tests {
    use super::memory_budget;

    #[test]
    fn the_budget_is_what_the_weights_leave_or_the_caches_and_steps() {
        assert_eq!(memory_budget(Some(1000), 300, 5, 7, 2), 700);
        assert_eq!(memory_budget(Some(100), 300, 5, 7, 2), 0);
        assert_eq!(memory_budget(None, 300, 500, 70, 2), 640);
        assert_eq!(memory_budget(None, 0, usize::MAX, 70, 2), usize::MAX);
    }
}

/// Command-line value parsers for the caps, range-checked so that a typo is a clear error
/// at start, not a server that refuses everything or holds a squatter for days.
pub mod cli {
    use std::time::Duration;

    fn in_range(s: &str, what: &str, lo: u64, hi: u64) -> Result<u64, String> {
        let v: u64 = s
            .trim()
            .parse()
            .map_err(|e| format!("{what}: `{s}` is not a whole number ({e})"))?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(format!("{what} must be within {lo}..={hi}, not {v}"))
        }
    }

    /// A count of at least 1 and at most 65,536 (sessions, streams).
    pub fn count(s: &str) -> Result<usize, String> {
        in_range(s, "the count", 1, 65_536).map(|v| v as usize)
    }

    /// A number of tokens to generate: 1..=32,768.
    pub fn max_tokens(s: &str) -> Result<usize, String> {
        in_range(s, "--max-tokens", 1, 32_768).map(|v| v as usize)
    }

    /// Tokens a conversation may take: 1..=1,048,576 (capped at the model's context
    /// anyway).
    pub fn context_tokens(s: &str) -> Result<usize, String> {
        in_range(s, "--context-tokens", 1, 1 << 20).map(|v| v as usize)
    }

    /// An idle timeout in seconds: 1..=600 (the protocol's longest).
    pub fn idle_timeout(s: &str) -> Result<u64, String> {
        let max = u64::from(pollen_protocol::limits::MAX_IDLE_TIMEOUT_MS) / 1000;
        in_range(s, "--idle-timeout", 1, max)
    }

    /// Seconds a session may stay open without a first step: 1..=600.
    pub fn first_step_timeout(s: &str) -> Result<Duration, String> {
        in_range(s, "--first-step-timeout", 1, 600).map(Duration::from_secs)
    }

    /// The most decode steps one batch computes: 1 (no batching) ..= 64.
    pub fn max_batch(s: &str) -> Result<usize, String> {
        let most = crate::serve::batch::MOST_BATCH as u64;
        in_range(s, "--max-batch", 1, most).map(|v| v as usize)
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use super::*;

        #[test]
        fn values_outside_their_range_are_refused_with_the_range() {
            assert_eq!(count("4").unwrap(), 4);
            assert_eq!(
                count("0").unwrap_err(),
                "the count must be within 1..=65536, not 0"
            );
            assert!(max_tokens("99999999999").is_err());
            assert!(max_tokens("-1").is_err());
            assert_eq!(idle_timeout("600").unwrap(), 600);
            assert_eq!(
                idle_timeout("601").unwrap_err(),
                "--idle-timeout must be within 1..=600, not 601"
            );
            assert_eq!(first_step_timeout("3").unwrap(), Duration::from_secs(3));
            assert_eq!(max_batch(" 8 ").unwrap(), 8);
            assert_eq!(max_batch("1").unwrap(), 1);
            assert_eq!(
                max_batch("0").unwrap_err(),
                "--max-batch must be within 1..=64, not 0"
            );
            assert!(max_batch("65").is_err());
            assert!(max_batch("off").is_err());
        }
    }
}
