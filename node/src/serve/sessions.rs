//! The session table of a server: which sessions are open, who opened each, and where
//! an attach stream for a session is handed to the task that runs it.
//!
//! A session's entry lives exactly as long as its [`Reservation`]: the task that runs the
//! session holds it, and dropping it (the session ended, however) frees the slot.

use libp2p::PeerId;
use pollen_protocol::SessionId;
use std::collections::HashMap;
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
    last_hop: bool,
    attach: mpsc::Sender<A>,
    /// When the session last did something.
    active: Instant,
    /// Fired to evict the session.
    evict: CancellationToken,
}

/// Open sessions, at most `max`; `A` is what an attach hands to the session (a stream's
/// writer in the server).
pub struct SessionTable<A> {
    entries: Mutex<HashMap<SessionId, Entry<A>>>,
    max: usize,
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
            e.active = Instant::now();
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
    /// A table of at most `max` sessions.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            max,
        })
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

    /// Takes a slot for session `id` opened by `client`; `last_hop` when the session's
    /// outputs leave from this server (so its client attaches here).
    pub fn open(
        self: &Arc<Self>,
        id: SessionId,
        client: PeerId,
        last_hop: bool,
    ) -> Result<Reservation<A>, TableError> {
        let mut entries = self.lock();
        if entries.contains_key(&id) {
            return Err(TableError::Duplicate(id));
        }
        if entries.len() >= self.max {
            return Err(TableError::Full { max: self.max });
        }
        let (tx, rx) = mpsc::channel(1);
        let evicted = CancellationToken::new();
        entries.insert(
            id,
            Entry {
                client,
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
        let a = t.open(SessionId(1), client, true).unwrap();
        let b = t.open(SessionId(2), client, false).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.free(), 0);
        assert_eq!(
            t.open(SessionId(3), client, true).unwrap_err(),
            TableError::Full { max: 2 }
        );
        drop(a);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.open(SessionId(2), client, true).unwrap_err(),
            TableError::Duplicate(SessionId(2))
        );
        let _c = t.open(SessionId(3), client, true).unwrap();
        drop(b);
        assert_eq!(t.len(), 1);
    }

    #[tokio::test]
    async fn only_the_owner_attaches_and_only_at_the_last_hop() {
        let t = SessionTable::<u8>::new(4);
        let owner = PeerId::random();
        let stranger = PeerId::random();
        let mut last = t.open(SessionId(7), owner, true).unwrap();
        let _middle = t.open(SessionId(8), owner, false).unwrap();
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

    #[tokio::test(start_paused = true)]
    async fn the_session_idle_longest_is_evicted_first() {
        let t = SessionTable::<u8>::new(4);
        let client = PeerId::random();
        let a = t.open(SessionId(1), client, true).unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        let b = t.open(SessionId(2), client, true).unwrap();
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
