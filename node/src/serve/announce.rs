//! What a server says about itself: its speed, measured at start; its round-trip times
//! to the servers of the spans after its own, measured by ping; and the signed
//! announcement built from them, renewed at a third of its lifetime.

use super::Server;
use crate::clock::unix_ms;
use crate::net::NetHandle;
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::limits::{MAX_ADDRS, MAX_MODEL_NAME_LEN, MAX_PEER_RTTS};
use pollen_protocol::{
    Announcement, BlockRange, ModelId, PeerIdBytes, PeerRtt, VerifiedAnnouncement,
};
use pollen_shard::{BlockSpan, CacheLimits};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `name` cut to at most `max` bytes, at a character boundary.
pub fn cut_to_bytes(name: &str, max: usize) -> &str {
    let mut cut = name.len().min(max);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    &name[..cut]
}

/// Measures this span's decode speed (tokens/s through these blocks alone).
pub fn measure_throughput(span: &BlockSpan) -> f32 {
    let Ok(x) = candle_core::Tensor::zeros(
        (1, 1, span.config().hidden_size),
        candle_core::DType::F32,
        span.device(),
    ) else {
        return 0.0;
    };
    let mut cache = span.new_cache(CacheLimits::default());
    let _ = span.forward(&x, 0, &mut cache);
    let started = Instant::now();
    let steps = 8;
    for i in 1..=steps {
        if span.forward(&x, i, &mut cache).is_err() {
            return 0.0;
        }
    }
    steps as f32 / started.elapsed().as_secs_f32().max(1e-6)
}

impl Server {
    /// This server's announcement, valid for `ttl`.
    pub(super) fn announcement(
        &self,
        addrs: &[Multiaddr],
        next_rtts: Vec<PeerRtt>,
        ttl: Duration,
        seq: u64,
    ) -> Announcement {
        let now = unix_ms();
        let free_sessions = if self.draining.load(Ordering::Relaxed) {
            0
        } else {
            u32::try_from(self.table.free()).unwrap_or(u32::MAX)
        };
        let cfg = self.span.config();
        Announcement {
            peer: PeerIdBytes(self.me.to_bytes()),
            model_id: self.model_id,
            model_name: cut_to_bytes(&cfg.name, MAX_MODEL_NAME_LEN).to_string(),
            num_blocks: u32::try_from(cfg.num_blocks).unwrap_or(u32::MAX),
            blocks: self.wire_blocks,
            #[cfg(not(feature = "fault-injection"))]
            throughput: self.throughput,
            #[cfg(feature = "fault-injection")]
            throughput: crate::fault::claim(self.throughput),
            free_sessions,
            free_cache_tokens: u32::try_from(
                (free_sessions as usize).saturating_mul(self.cfg.max_session_tokens),
            )
            .unwrap_or(u32::MAX),
            addrs: addrs
                .iter()
                .take(MAX_ADDRS)
                .map(|a| a.to_string())
                .collect(),
            compute: self.compute.clone(),
            next_rtts,
            issued_at_ms: now,
            expires_at_ms: now + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            seq,
        }
    }
}

/// How long asking the bootstraps for announcements may take when an `Open` names a next
/// hop this server has no announcement of.
pub const NEXT_HOP_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A new look-up is made at most this often; meanwhile the book's answer stands.
pub const NEXT_HOP_LOOKUP_EVERY: Duration = Duration::from_secs(2);

/// Where a server learns that a next hop is a server: its book of verified announcements
/// (signature, expiry and replay checked on the way in), refreshed from the bootstraps
/// when a next hop is missing. Lookups run one at a time, at most every
/// [`NEXT_HOP_LOOKUP_EVERY`], each in a task of its own bounded by
/// [`NEXT_HOP_LOOKUP_TIMEOUT`]; every open that misses waits for one that started after
/// its miss (starting it when none runs and one is due, joining it otherwise), so opens
/// that miss together share one lookup and none is refused for another's turn. An open
/// that gives up (its session cancelled, or its own bound reached) leaves the lookup
/// running for the others.
#[derive(Debug, Default)]
pub struct NextHops {
    inner: Arc<Lookups>,
}

#[derive(Debug)]
struct Lookups {
    state: std::sync::Mutex<LookupState>,
    /// The id of the last lookup that ended (they run one at a time, ids rising).
    ended: tokio::sync::watch::Sender<u64>,
}

impl Default for Lookups {
    fn default() -> Self {
        Self {
            state: std::sync::Mutex::default(),
            ended: tokio::sync::watch::Sender::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct LookupState {
    /// Ids handed out so far.
    started: u64,
    /// When the last one started.
    last_start: Option<tokio::time::Instant>,
    /// The one running now: its id and start.
    running: Option<(u64, tokio::time::Instant)>,
}

/// What an open that missed does next.
enum Turn {
    /// Start a lookup (the guard ends it when the lookup's task drops it).
    Run(Running),
    /// Wait for the running lookup, of this id and start, to end.
    Join(u64, tokio::time::Instant),
    /// None runs and none is due for this long.
    Wait(Duration),
}

/// A lookup being run; it ends when this drops.
struct Running {
    lookups: Arc<Lookups>,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut l = self.lookups.state.lock().unwrap_or_else(|p| p.into_inner());
        l.running = None;
        drop(l);
        self.lookups.ended.send_modify(|e| *e = (*e).max(self.id));
    }
}

/// What a next hop must be: a server of this model, compute mode and span.
pub(crate) struct Wanted<'a> {
    pub peer: PeerId,
    pub model: ModelId,
    pub compute: &'a str,
    pub blocks: BlockRange,
}

impl NextHops {
    /// What an open that missed does now. The lock is held only for this, never through
    /// a lookup: a lookup of a bogus next hop may take its whole timeout.
    fn turn(&self) -> Turn {
        let mut l = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((id, start)) = l.running {
            return Turn::Join(id, start);
        }
        if let Some(since) = l.last_start.map(|t| t.elapsed())
            && since < NEXT_HOP_LOOKUP_EVERY
        {
            return Turn::Wait(NEXT_HOP_LOOKUP_EVERY - since);
        }
        let now = tokio::time::Instant::now();
        l.started += 1;
        let id = l.started;
        l.running = Some((id, now));
        l.last_start = Some(now);
        Turn::Run(Running {
            lookups: self.inner.clone(),
            id,
        })
    }

    /// Returns once a lookup that started at or after `since` has ended, starting
    /// `lookup` (in a task of its own, bounded by [`NEXT_HOP_LOOKUP_TIMEOUT`]) when it is
    /// this caller's turn, or once `found` says the book has what was missing (read when
    /// a lookup that was already running at `since` ends, and before waiting for the
    /// next turn: a lookup may have ended between the miss and now); at most
    /// [`NEXT_HOP_LOOKUP_EVERY`] + [`NEXT_HOP_LOOKUP_TIMEOUT`] in all. The bound cuts
    /// this caller's wait, never the lookup, which the others may be waiting for.
    async fn refresh<F, Found>(
        &self,
        since: tokio::time::Instant,
        lookup: impl FnOnce() -> F,
        found: impl Fn() -> Found,
    ) where
        F: std::future::Future + Send + 'static,
        Found: std::future::Future<Output = bool>,
    {
        let mut lookup = Some(lookup);
        let ended = |id: u64| {
            let mut ended = self.inner.ended.subscribe();
            // The sender lives in `self`: this ends when the lookup does.
            async move {
                let _ = ended.wait_for(|&e| e >= id).await;
            }
        };
        let wait = async {
            loop {
                match self.turn() {
                    Turn::Run(running) => {
                        let id = running.id;
                        if let Some(run) = lookup.take() {
                            let run = run();
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(NEXT_HOP_LOOKUP_TIMEOUT, run).await;
                                drop(running);
                            });
                        }
                        ended(id).await;
                        return;
                    }
                    Turn::Join(id, start) => {
                        ended(id).await;
                        // One that started before the miss may have found it anyway.
                        if start >= since || found().await {
                            return;
                        }
                    }
                    Turn::Wait(d) => {
                        // A lookup that ended since the miss may have found it.
                        if found().await {
                            return;
                        }
                        tokio::time::sleep(d).await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(NEXT_HOP_LOOKUP_EVERY + NEXT_HOP_LOOKUP_TIMEOUT, wait).await;
    }

    /// The addresses of `want.peer` from its valid announcement for `want.model` that
    /// covers `want.blocks` in the same compute mode; a clear reason when there is none.
    pub(crate) async fn addresses(
        &self,
        net: &NetHandle,
        want: &Wanted<'_>,
    ) -> Result<Vec<Multiaddr>, String> {
        let find = |book: &[VerifiedAnnouncement]| {
            book.iter()
                .filter(|a| PeerId::from_bytes(&a.peer.0).ok() == Some(want.peer))
                .find(|a| {
                    a.compute == want.compute
                        && a.blocks.start() <= want.blocks.start()
                        && a.blocks.end() >= want.blocks.end()
                })
                .cloned()
        };
        let mut found = find(&net.book(Some(want.model)).await.unwrap_or_default());
        if found.is_none() {
            // The bootstraps may know it (a server that has just started, say): wait
            // for a lookup that starts after this miss, which fills the book. A gather
            // stores each peer's answer as it comes, so what a gather cut short by its
            // timeout got (a hung server the DHT still names can hold it past the
            // bootstraps' answers) is in the book too.
            let since = tokio::time::Instant::now();
            let gather = net.clone();
            let model = want.model;
            self.refresh(
                since,
                move || async move { gather.gather(Some(model)).await },
                || async { find(&net.book(Some(want.model)).await.unwrap_or_default()).is_some() },
            )
            .await;
            found = find(&net.book(Some(want.model)).await.unwrap_or_default());
        }
        let Some(a) = found else {
            return Err(format!(
                "the next hop {} has no valid announcement for model {} serving blocks {} in \
                 compute mode `{}`: this server forwards only to servers",
                want.peer, want.model, want.blocks, want.compute
            ));
        };
        let addrs: Vec<Multiaddr> = a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
        if addrs.is_empty() {
            return Err(format!(
                "the next hop {} announces no address this server can dial",
                want.peer
            ));
        }
        Ok(addrs)
    }
}

/// Finds the servers whose spans start where this one ends (from the bootstraps' books),
/// connects to them so that ping measures them, and returns the round-trip times measured
/// so far, at most [`MAX_PEER_RTTS`].
pub(crate) async fn next_hop_rtts(net: &NetHandle, server: &Server) -> Vec<PeerRtt> {
    let Ok(book) = net.gather(Some(server.model_id)).await else {
        return Vec::new();
    };
    let end = server.wire_blocks.end();
    let next: Vec<(PeerId, Vec<Multiaddr>)> = book
        .iter()
        .filter(|a| a.blocks.start() == end && a.compute == server.compute)
        .filter_map(|a| {
            let peer = PeerId::from_bytes(&a.peer.0).ok()?;
            let addrs = a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
            Some((peer, addrs))
        })
        .take(MAX_PEER_RTTS)
        .collect();
    for (peer, addrs) in &next {
        let _ = net.add_addresses(*peer, addrs.clone(), true).await;
    }
    let peers = net.peers().await.unwrap_or_default();
    next.iter()
        .filter_map(|(peer, _)| {
            let rtt = peers.iter().find(|p| p.peer == *peer)?.rtt?;
            Some(PeerRtt {
                peer: PeerIdBytes(peer.to_bytes()),
                rtt_us: u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;
    use tokio::time::Instant;

    /// The lookups a test ran: when each started, and how many ran to their end.
    #[derive(Default)]
    struct Log {
        starts: std::sync::Mutex<Vec<Instant>>,
        finished: AtomicUsize,
    }

    /// A lookup that records when it started and takes `takes` (forever: `None`).
    fn lookup(
        log: &Arc<Log>,
        takes: Option<Duration>,
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + use<>
    {
        let log = log.clone();
        move || {
            log.starts.lock().unwrap().push(Instant::now());
            Box::pin(async move {
                match takes {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
                log.finished.fetch_add(1, Ordering::Relaxed);
            })
        }
    }

    /// A book that never has the hop.
    fn missing() -> impl Fn() -> std::future::Ready<bool> {
        || std::future::ready(false)
    }

    fn starts(log: &Log, t0: Instant) -> Vec<Duration> {
        log.starts.lock().unwrap().iter().map(|s| *s - t0).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn opens_that_miss_together_share_one_lookup() {
        let hops = Arc::new(NextHops::default());
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        let opens: Vec<_> = (0..3)
            .map(|_| {
                let (hops, look) = (hops.clone(), lookup(&log, Some(Duration::from_secs(1))));
                tokio::spawn(async move {
                    hops.refresh(Instant::now(), look, missing()).await;
                    Instant::now()
                })
            })
            .collect();
        for open in opens {
            // Each is answered when the one lookup ends, none refused or kept longer.
            assert_eq!(open.await.unwrap() - t0, Duration::from_secs(1));
        }
        assert_eq!(starts(&log, t0), [Duration::ZERO]);
        // The lock is free between lookups.
        assert!(hops.inner.state.try_lock().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_during_an_older_lookup_waits_for_one_started_after_it() {
        let hops = Arc::new(NextHops::default());
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        let first = {
            let (hops, look) = (hops.clone(), lookup(&log, Some(Duration::from_secs(1))));
            tokio::spawn(async move { hops.refresh(Instant::now(), look, missing()).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The first lookup may have asked before this hop announced itself, and did not
        // find it: this open waits for it, then for the next turn (2 s after the first
        // started), and starts the second lookup itself.
        hops.refresh(
            Instant::now(),
            lookup(&log, Some(Duration::from_secs(1))),
            missing(),
        )
        .await;
        assert_eq!(
            Instant::now() - t0,
            NEXT_HOP_LOOKUP_EVERY + Duration::from_secs(1)
        );
        first.await.unwrap();
        assert_eq!(
            starts(&log, t0),
            [Duration::ZERO, NEXT_HOP_LOOKUP_EVERY],
            "one lookup per interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_an_older_lookup_found_ends_the_wait() {
        let hops = Arc::new(NextHops::default());
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        let first = {
            let (hops, look) = (hops.clone(), lookup(&log, Some(Duration::from_secs(1))));
            tokio::spawn(async move { hops.refresh(Instant::now(), look, missing()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Found by the first lookup (the book is read once it ends): no second lookup.
        let checked = AtomicUsize::new(0);
        hops.refresh(
            Instant::now(),
            lookup(&log, Some(Duration::from_secs(1))),
            || {
                checked.fetch_add(1, Ordering::Relaxed);
                std::future::ready(true)
            },
        )
        .await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(1));
        assert_eq!(checked.load(Ordering::Relaxed), 1);
        first.await.unwrap();
        // A miss whose book was read just before that lookup ended finds no lookup
        // running and none due for another second: it reads the book before waiting.
        let since = Instant::now();
        hops.refresh(since, lookup(&log, Some(Duration::from_secs(1))), || {
            std::future::ready(true)
        })
        .await;
        assert_eq!(Instant::now(), since, "answered from the book at once");
        assert_eq!(starts(&log, t0), [Duration::ZERO]);
    }

    #[tokio::test(start_paused = true)]
    async fn hung_or_abandoned_lookups_hold_no_open_past_the_bound() {
        let hops = Arc::new(NextHops::default());
        let log = Arc::new(Log::default());
        let t0 = Instant::now();
        // A lookup that never ends is cut at its timeout.
        let first = {
            let (hops, look) = (hops.clone(), lookup(&log, None));
            tokio::spawn(async move {
                hops.refresh(Instant::now(), look, missing()).await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        // One that misses meanwhile waits for it, starts the next at once (2 s have
        // passed since the first started) and gives up at its bound, 7 s after its miss;
        // its lookup runs on to its end for whoever else waits for it.
        let since = Instant::now();
        hops.refresh(since, lookup(&log, Some(Duration::from_secs(4))), missing())
            .await;
        assert_eq!(first.await.unwrap() - t0, NEXT_HOP_LOOKUP_TIMEOUT);
        assert_eq!(
            Instant::now() - since,
            NEXT_HOP_LOOKUP_EVERY + NEXT_HOP_LOOKUP_TIMEOUT
        );
        assert_eq!(starts(&log, t0), [Duration::ZERO, NEXT_HOP_LOOKUP_TIMEOUT]);
        assert_eq!(log.finished.load(Ordering::Relaxed), 0);
        // A miss now joins that lookup and is answered when it ends, 4 s after it
        // started, though the open that started it has given up (here it found the hop).
        hops.refresh(Instant::now(), lookup(&log, None), || {
            std::future::ready(true)
        })
        .await;
        assert_eq!(
            Instant::now() - t0,
            NEXT_HOP_LOOKUP_TIMEOUT + Duration::from_secs(4)
        );
        assert_eq!(log.finished.load(Ordering::Relaxed), 1);
        // An open dropped in the middle of its lookup (its session cancelled) leaves the
        // lookup to end by itself: the next miss joins it (and it found the hop).
        tokio::time::sleep(NEXT_HOP_LOOKUP_EVERY).await;
        let dropped = {
            let (hops, look) = (hops.clone(), lookup(&log, Some(Duration::from_secs(1))));
            tokio::spawn(async move { hops.refresh(Instant::now(), look, missing()).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        dropped.abort();
        let _ = dropped.await;
        let t = Instant::now();
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        hops.refresh(
            t,
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
                std::future::ready(())
            },
            || std::future::ready(true),
        )
        .await;
        assert_eq!(ran.load(Ordering::Relaxed), 0, "joined, started none");
        assert_eq!(Instant::now() - t, Duration::from_millis(900));
        assert_eq!(log.finished.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn long_names_are_cut_by_bytes_at_a_character_boundary() {
        assert_eq!(cut_to_bytes("SmolLM2", 256), "SmolLM2");
        let long = "é".repeat(200); // 400 bytes
        let cut = cut_to_bytes(&long, MAX_MODEL_NAME_LEN);
        assert_eq!(cut.len(), 256);
        assert!(cut.chars().all(|c| c == 'é'));
        let odd = format!("a{}", "é".repeat(200));
        assert_eq!(cut_to_bytes(&odd, MAX_MODEL_NAME_LEN).len(), 255);
    }
}
