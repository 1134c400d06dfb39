//! The client role: find the servers of a model, route a chain over them, and generate
//! through it with only the model's ends (embeddings, final norm, head, tokenizer) in
//! this process.
//!
//! [`SwarmClient`] connects once and serves many generations, concurrently, from async
//! code: the math of each step (embedding, head, sampling) runs in blocking tasks, the
//! network I/O in between is async, and nothing blocks on a runtime.
//!
//! Rooms: [`route`] picks the chain, [`session`] runs one session along it, [`error`]
//! says what went wrong and where.

pub mod check;
pub mod error;
pub mod route;
pub mod session;
pub mod speed;
pub mod verify;

pub use error::{ClientError, HopFailure};
pub use route::{Hop, route};
pub use session::SwarmSession;
pub use verify::{DEFAULT_VERIFY, VerifyStats};

use crate::net::{self, NetConfig, NetHandle, Role};
use crate::threads::ShortWork;
use candle_core::Tensor;
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::{ErrorCode, ModelId, VerifiedAnnouncement, WireDType};
use pollen_shard::generate::{GenerateParams, Generation, Generator, Step};
use pollen_shard::{ClientEnds, LoadOptions, ModelFile, PollenTokenizer};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a client tries each bootstrap before giving up on it.
const BOOTSTRAP_PATIENCE: Duration = Duration::from_secs(15);
/// How long the client waits for ping to measure candidate first and last hops.
const MEASURE_WAIT: Duration = Duration::from_millis(400);
/// Most candidate first (and last) hops measured.
const MEASURE_CANDIDATES: usize = 8;
/// The round trip counted for a candidate first or last hop that did not answer a ping
/// within [`MEASURE_WAIT`]: a server that announces an address nobody answers on is not
/// believed to be close.
const UNANSWERED_RTT: Duration = Duration::from_secs(1);
/// Most new routes tried for one step before the client gives up.
const MAX_HEALS_PER_STEP: usize = 8;
/// How long a server that failed is left out of routes; doubled with each further
/// failure, up to [`MAX_BAN`].
const FIRST_BAN: Duration = Duration::from_secs(30);
/// The longest ban.
const MAX_BAN: Duration = Duration::from_secs(600);
/// How long a busy server is left out of routes.
const BUSY_BAN: Duration = Duration::from_secs(3);
/// Most servers remembered as banned (and most disputes remembered).
const MAX_BANS: usize = 1024;
/// A server whose connection broke is forgiven by a new announcement only for its
/// first failures this many: one that keeps "crashing" (closing its streams) is not.
const MOST_FORGIVEN: u32 = 2;

/// The ban after `strikes` failures (from 1): [`FIRST_BAN`] doubling up to [`MAX_BAN`].
fn grown_ban(strikes: u32) -> Duration {
    FIRST_BAN
        .saturating_mul(1 << strikes.saturating_sub(1).min(5))
        .min(MAX_BAN)
}

/// Removes the entry that ends soonest when `map` is full and has no `key`: room for a
/// new one, at the cost of the ban closest to its end anyway.
fn make_room<K: Eq + std::hash::Hash + Clone, V>(
    map: &mut HashMap<K, V>,
    key: &K,
    until: impl Fn(&V) -> Instant,
) {
    if map.len() >= MAX_BANS && !map.contains_key(key) {
        let soonest = map
            .iter()
            .min_by_key(|(_, v)| until(v))
            .map(|(k, _)| k.clone());
        if let Some(k) = soonest {
            map.remove(&k);
        }
    }
}

/// Servers left out of routes for a while: those that failed (longer each time) and
/// those that were busy (briefly). A server whose connection broke (it crashed) is
/// forgiven as soon as it announces itself again after the failure: it restarted.
#[derive(Debug, Default)]
struct Bans {
    /// Until when, how many failures, since when (Unix ms), and whether the last one was
    /// a broken connection (forgiven by a newer announcement, the first few times).
    until: HashMap<PeerId, (Instant, u32, u64, bool)>,
    /// Servers caught with a wrong output, until when: never used while banned, even
    /// when no other route exists.
    lied: HashMap<PeerId, Instant>,
    /// Pairs of servers (a hop, the next) kept apart.
    apart: HashMap<(PeerId, PeerId), Apart>,
}

/// How long a pair of servers is kept apart: on routes while others exist (`soft`: a
/// hop said the next failed it), and on every route (`hard`: a dispute); how many times
/// either happened (one count: a pair with a history of reports gets longer disputes,
/// and the other way round).
#[derive(Debug, Clone, Copy)]
struct Apart {
    soft: Instant,
    hard: Instant,
    times: u32,
}

impl Apart {
    fn until(&self) -> Instant {
        self.soft.max(self.hard)
    }
}

impl Bans {
    /// Bans `peer` as [`Self::ban`] does, and leaves it out even of last-resort routes.
    fn ban_liar(&mut self, peer: PeerId) {
        self.ban(peer, false, false);
        if let Some((t, ..)) = self.until.get(&peer) {
            let t = *t;
            self.lied.retain(|_, u| *u > Instant::now());
            make_room(&mut self.lied, &peer, |u| *u);
            self.lied.insert(peer, t);
        }
    }

    /// The next hop `reporter` says that `accused`, the hop before it, sent it wrong
    /// hidden states. One of the two is at fault, and the client cannot tell which (a
    /// hostile hop could accuse an honest one, or send it NaN to have it accuse): both
    /// get the first ban and no strike, however often and by whomever disputes are
    /// raised (fresh keys on either side cannot grow an honest server's ban), neither
    /// counts as a liar, and the two are not chained again for a ban of the pair's own
    /// that grows with each dispute between them. A real fault is routed around.
    fn dispute(&mut self, accused: PeerId, reporter: PeerId) {
        let now = Instant::now();
        self.until.retain(|_, (t, ..)| *t > now);
        for peer in [reporter, accused] {
            make_room(&mut self.until, &peer, |(t, ..)| *t);
            // An existing ban only grows; its strikes and its cause stay.
            let (t, ..) =
                self.until
                    .entry(peer)
                    .or_insert((now, 0, crate::clock::unix_ms(), false));
            *t = (*t).max(now + FIRST_BAN);
        }
        self.keep_apart(accused, reporter, true);
    }

    /// `first` is not chained right before `second` for a while that grows each time
    /// the pair is kept apart: one said the other failed it (while other routes exist),
    /// or sent it a bad step (`hard`: on every route). Either time only grows.
    fn keep_apart(&mut self, first: PeerId, second: PeerId, hard: bool) {
        let now = Instant::now();
        self.apart.retain(|_, a| a.until() > now);
        let pair = (first, second);
        make_room(&mut self.apart, &pair, Apart::until);
        let banned_until = self.until.get(&second).map(|(t, ..)| *t);
        let a = self.apart.entry(pair).or_insert(Apart {
            soft: now,
            hard: now,
            times: 0,
        });
        a.times += 1;
        if hard {
            a.hard = a.hard.max(now + grown_ban(a.times));
        } else {
            // Past the other's ban, or the same hop could report it again as soon as
            // that ended.
            let soft = (now + grown_ban(a.times + 2)).max(banned_until.unwrap_or(now) + FIRST_BAN);
            a.soft = a.soft.max(soft);
        }
    }

    /// Leaves out the server failure `f` names: a dispute, a liar (the client's own
    /// finding) or an ordinary failure.
    fn judge(&mut self, f: &HopFailure) {
        if let Some(reporter) = f.reported_by {
            tracing::warn!(
                "dispute: {reporter} says {} sent it a step it refuses ({}); both are left out a while and never chained again",
                f.peer,
                f.message
            );
            self.dispute(f.peer, reporter);
        } else if f.message.starts_with(check::WRONG_OUTPUT) {
            self.ban_liar(f.peer);
        } else {
            self.ban(f.peer, busy_only(f.code), f.code == ErrorCode::Unreachable);
            // The hop before's word, whatever it says (a refusal for room and a broken
            // connection too): it is not chained before this one again soon where
            // another route exists, so that it cannot report the same server over and
            // over. One that reports a second server after it while still kept apart
            // from another it reported sits out itself, briefly and with no strike (an
            // honest hop may meet two failing neighbours): a hostile hop cannot blame
            // each server after it in turn, staying on every route while they are left
            // out.
            if let Some(reporter) = f.blamed_by {
                let now = Instant::now();
                let blamed_before = self
                    .apart
                    .iter()
                    .any(|(&(a, b), apart)| a == reporter && b != f.peer && apart.soft > now);
                self.keep_apart(reporter, f.peer, false);
                if blamed_before {
                    self.ban(reporter, true, false);
                }
            }
        }
    }

    /// Pairs of servers that must not be next to each other on a route (the first
    /// before the second): on a last-resort route (`hard_only`) those in a dispute, on
    /// a preferred one all.
    fn kept_apart(&self, hard_only: bool) -> std::collections::HashSet<(PeerId, PeerId)> {
        let now = Instant::now();
        self.apart
            .iter()
            .filter(|(_, a)| a.hard > now || (!hard_only && a.soft > now))
            .map(|(pair, _)| *pair)
            .collect()
    }

    /// Whether `peer` was caught with a wrong output and is still banned.
    fn is_liar(&self, peer: &PeerId) -> bool {
        self.lied.get(peer).is_some_and(|t| *t > Instant::now())
    }

    fn ban(&mut self, peer: PeerId, busy: bool, crashed: bool) {
        let now = Instant::now();
        self.until.retain(|_, (t, ..)| *t > now);
        make_room(&mut self.until, &peer, |(t, ..)| *t);
        let since = crate::clock::unix_ms();
        let (t, strikes, at, crashed_last) =
            self.until.entry(peer).or_insert((now, 0, since, true));
        let wait = if busy {
            BUSY_BAN
        } else {
            *strikes += 1;
            grown_ban(*strikes)
        };
        *t = (*t).max(now + wait);
        *at = since;
        // The last failure decides: a broken connection is forgiven by a new announcement
        // (the first few times, see `is_banned`).
        *crashed_last = crashed;
    }

    /// Whether `peer` went away (its connection broke) and has not announced itself
    /// since `issued_at_ms` shows.
    fn is_gone(&self, peer: &PeerId, issued_at_ms: u64) -> bool {
        match self.until.get(peer) {
            Some((t, _, since, crashed)) if *t > Instant::now() => {
                *crashed && issued_at_ms <= *since
            }
            _ => false,
        }
    }

    /// Whether `peer` is left out; `issued_at_ms` is when its latest announcement was
    /// issued, if one is at hand.
    fn is_banned(&self, peer: &PeerId, issued_at_ms: Option<u64>) -> bool {
        match self.until.get(peer) {
            Some((t, strikes, since, crashed)) if *t > Instant::now() => {
                let forgivable = *crashed && *strikes <= MOST_FORGIVEN;
                !(forgivable && issued_at_ms.is_some_and(|i| i > *since))
            }
            _ => false,
        }
    }
}

/// How a client connects and computes.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The model file (its ends are loaded; its manifest gives the id asked for).
    pub model: PathBuf,
    /// Device and weight mode of the ends, which also decide the compute mode asked for.
    pub load: LoadOptions,
    /// Bootstrap peers to join through.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to listen on: none for an ordinary client (it only dials out);
    /// `/memory/0` joins an in-process swarm.
    pub listen: Vec<Multiaddr>,
    /// Find peers on the LAN with mDNS.
    pub mdns: bool,
    /// Hidden states on the wire.
    pub wire_dtype: WireDType,
    /// How long to wait for servers that cover every block.
    pub route_wait: Duration,
    /// Probability that a step is spot-checked on a second server of one of the route's
    /// spans ([`DEFAULT_VERIFY`]; 0 turns spot checks off).
    pub verify: f64,
    /// Route through servers of this compute mode instead of the one the ends' device
    /// and weights give (`None`, the usual): a CPU client can then use GPU servers, but
    /// its text need not equal local text ([`parse_compute`] checks a name).
    pub compute: Option<String>,
}

/// Checks a compute mode's name as `--compute` takes it: 1 to
/// [`pollen_protocol::limits::MAX_COMPUTE_LEN`] bytes of ASCII letters, digits and
/// `.`, `_`, `/`, `-` (every name Pollen makes is of these).
pub fn parse_compute(name: &str) -> Result<String, String> {
    let max = pollen_protocol::limits::MAX_COMPUTE_LEN;
    if name.is_empty() || name.len() > max {
        return Err(format!(
            "a compute mode's name has 1 to {max} bytes (`pollen status` lists the servers' modes)"
        ));
    }
    if let Some(c) = name.chars().find(|c| !crate::status::is_mode_char(*c)) {
        return Err(format!(
            "`{}` is not in a compute mode's name (letters, digits, `.`, `_`, `/`, `-`)",
            c.escape_default()
        ));
    }
    Ok(name.to_string())
}

/// The parts of the model a client holds.
#[derive(Debug)]
pub struct ClientModel {
    /// Embeddings, final norm and head.
    pub ends: ClientEnds,
    /// The tokenizer.
    pub tokenizer: PollenTokenizer,
    /// The model id servers announce.
    pub model_id: ModelId,
    /// The compute mode every server of a route must run.
    pub compute: String,
}

impl ClientModel {
    /// Loads the ends and the id of the model at `path` (blocking). `compute` names the
    /// servers' mode to route through; `None` takes the one `opts` compute.
    pub fn load(
        path: &std::path::Path,
        opts: &LoadOptions,
        compute: Option<&str>,
    ) -> Result<Self, ClientError> {
        let file = ModelFile::open(path)?;
        let own = pollen_shard::compute_mode(&file, opts);
        let compute = match compute {
            // The blocks never run here: this device's own mode may not even exist.
            Some(name) => {
                if own.ok().as_deref() != Some(name) {
                    tracing::warn!(
                        "routing through servers computing {name}, not this device's own \
                         mode: the text need not equal local text"
                    );
                }
                name.to_string()
            }
            None => own?,
        };
        Ok(Self {
            tokenizer: PollenTokenizer::from_model(&file)?,
            ends: ClientEnds::load(&file, opts)?,
            model_id: crate::model::model_id(path, &mut |_, _| {})?,
            compute,
        })
    }
}

/// A client connected to the swarm: many generations, one connection.
pub struct SwarmClient {
    net: NetHandle,
    model: Arc<ClientModel>,
    cfg: ClientConfig,
    bans: std::sync::Mutex<Bans>,
    route_in_use: std::sync::Mutex<Option<Vec<Hop>>>,
    /// What this client measured of servers' speed.
    speeds: std::sync::Mutex<speed::Speeds>,
    /// The announcements of the latest route search (spot checks pick second servers
    /// from it).
    book: std::sync::Mutex<(Vec<VerifiedAnnouncement>, Option<Instant>)>,
    verify_stats: std::sync::Mutex<VerifyStats>,
    /// Where the head and sampling of a token run on the CPU: on the generation's own
    /// worker while they take a few milliseconds ([`ShortWork`]).
    heads: ShortWork,
    cancel: CancellationToken,
    net_task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for SwarmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwarmClient({})", self.net.peer_id())
    }
}

/// Whether a server's failure with `code` means only that it has no room now (busy, or
/// out of memory or session room): a short ban and no strike, and the client tries
/// another server.
fn busy_only(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Busy | ErrorCode::OverBudget)
}

/// Notes a refusal for want of room (`over_budget`) in `refused`, the servers that
/// refused so in one open or heal; whether this server had refused already: then no
/// other server was found for the request, and the client stops (a server out of room
/// is tried elsewhere, not eight times over).
fn refused_again(e: &ClientError, refused: &mut std::collections::HashSet<PeerId>) -> bool {
    match e {
        ClientError::HopFailed(f) if f.code == ErrorCode::OverBudget => !refused.insert(f.peer),
        _ => false,
    }
}

/// Before the `attempt`-th try of a new route: none for the first two (a failed route
/// is left at once for the next best), then 100 ms doubling up to 3.2 s, so that a
/// server that has just joined has time to become known to the others.
async fn retry_pause(attempt: usize) {
    if attempt >= 2 {
        let ms = 100u64 << (attempt - 2).min(5);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// A route as `0:10@peer -> 10:20@peer -> ...`, for logs.
fn describe(route: &[Hop]) -> String {
    route
        .iter()
        .map(|h| format!("{}@{}", h.blocks, h.peer))
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// Starts a client node and dials `bootstrap`; fails if none answers (with mDNS off).
pub async fn connect(
    bootstrap: &[Multiaddr],
    mdns: bool,
    cancel: CancellationToken,
) -> Result<(NetHandle, tokio::task::JoinHandle<()>), ClientError> {
    connect_listening(bootstrap, Vec::new(), mdns, cancel).await
}

/// Like [`connect`], listening on `listen` too.
pub async fn connect_listening(
    bootstrap: &[Multiaddr],
    listen: Vec<Multiaddr>,
    mdns: bool,
    cancel: CancellationToken,
) -> Result<(NetHandle, tokio::task::JoinHandle<()>), ClientError> {
    if bootstrap.is_empty() && !mdns {
        return Err(ClientError::NoEntry(
            "no way to find the swarm: give --bootstrap ADDR or allow mDNS".into(),
        ));
    }
    let cfg = NetConfig {
        mdns,
        listen,
        ..NetConfig::new(Role::Client)
    };
    let (handle, task) = net::start(cfg, cancel)?;
    let dials = bootstrap
        .iter()
        .map(|a| handle.dial_with_retry(a, BOOTSTRAP_PATIENCE));
    let results = futures::future::join_all(dials).await;
    if !bootstrap.is_empty() && results.iter().all(|r| r.is_err()) {
        // One address, and another peer answered it: that is the whole story (the
        // private-mesh hint that follows an unreachable swarm would mislead).
        let mut results = results;
        if let [Err(net::NetError::WrongPeer { .. })] = &results[..]
            && let Some(Err(e)) = results.pop()
        {
            return Err(ClientError::Net(e));
        }
        let errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        return Err(ClientError::NoEntry(format!(
            "cannot reach any bootstrap peer:\n  {}",
            errors.join("\n  ")
        )));
    }
    Ok((handle, task))
}

impl SwarmClient {
    /// Loads the model's ends and joins the swarm.
    pub async fn connect(cfg: ClientConfig) -> Result<Self, ClientError> {
        let compute = match &cfg.compute {
            Some(name) => Some(parse_compute(name).map_err(|e| {
                ClientError::Model(pollen_shard::ShardError::BadInput(format!(
                    "the compute mode to route through: {e}"
                )))
            })?),
            None => None,
        };
        let (path, opts) = (cfg.model.clone(), cfg.load.clone());
        let model = tokio::task::spawn_blocking(move || {
            ClientModel::load(&path, &opts, compute.as_deref())
        })
        .await
        .map_err(|e| ClientError::Task(e.to_string()))??;
        let cancel = CancellationToken::new();
        let (net, net_task) =
            connect_listening(&cfg.bootstrap, cfg.listen.clone(), cfg.mdns, cancel.clone()).await?;
        Ok(Self {
            net,
            model: Arc::new(model),
            cfg,
            bans: std::sync::Mutex::new(Bans::default()),
            route_in_use: std::sync::Mutex::new(None),
            speeds: std::sync::Mutex::new(speed::Speeds::default()),
            book: std::sync::Mutex::new((Vec::new(), None)),
            verify_stats: std::sync::Mutex::new(VerifyStats::default()),
            heads: ShortWork::default(),
            cancel,
            net_task,
        })
    }

    /// The network handle.
    pub fn net(&self) -> &NetHandle {
        &self.net
    }

    /// The model's ends, tokenizer and id.
    pub fn model(&self) -> &Arc<ClientModel> {
        &self.model
    }

    /// Gathers announcements until a route covers every block, or `route_wait` passes.
    pub async fn discover_route(&self) -> Result<Vec<Hop>, ClientError> {
        let m = &self.model;
        let num_blocks = m.ends.config().num_blocks;
        let deadline = Instant::now() + self.cfg.route_wait;
        loop {
            let mut book = self
                .net
                .gather_skipping(Some(m.model_id), |p| self.banned(p))
                .await?;
            book.retain(|a| PeerId::from_bytes(&a.peer.0).is_ok());
            let peer = |a: &VerifiedAnnouncement| PeerId::from_bytes(&a.peer.0).ok();
            // Banned servers are avoided; but a server that was only busy, slow or
            // wrong once is better than no route at all. Servers that went away (and
            // have not announced themselves since) are never used.
            let preferred: Vec<VerifiedAnnouncement> = book
                .iter()
                .filter(|a| peer(a).is_some_and(|p| !self.banned_since(&p, Some(a.issued_at_ms))))
                .cloned()
                .collect();
            let alive: Vec<VerifiedAnnouncement> = book
                .iter()
                .filter(|a| peer(a).is_some_and(|p| !self.gone(&p, a.issued_at_ms)))
                .cloned()
                .collect();
            let rtts = self.measure_ends(&preferred, num_blocks).await;
            let speeds = self
                .speeds
                .lock()
                .map(|s| s.all().clone())
                .unwrap_or_default();
            let (apart, hard) = (self.kept_apart(false), self.kept_apart(true));
            // Servers not banned, kept apart as they should be; then chained even where
            // one said the other failed it; only then banned ones (never in a dispute).
            let found = route::route_apart(
                &preferred, m.model_id, num_blocks, &m.compute, &rtts, &speeds, &apart,
            )
            .or_else(|_| {
                route::route_apart(
                    &preferred, m.model_id, num_blocks, &m.compute, &rtts, &speeds, &hard,
                )
            })
            .or_else(|_| {
                route::route_apart(
                    &alive, m.model_id, num_blocks, &m.compute, &rtts, &speeds, &hard,
                )
            });
            if let Ok(mut b) = self.book.lock() {
                *b = (book, Some(Instant::now()));
            }
            match found {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => {
                    // Say so when only a dispute stands in the way: the error itself
                    // reads as spans that do not line up.
                    let none = std::collections::HashSet::new();
                    let disputed = route::route_apart(
                        &alive, m.model_id, num_blocks, &m.compute, &rtts, &speeds, &none,
                    );
                    if let (Ok(r), false) = (&disputed, hard.is_empty()) {
                        tracing::warn!(
                            "the only route, {}, chains servers in a dispute (one said the other sent it a step it refuses)",
                            describe(r)
                        );
                    }
                    return Err(e);
                }
                Err(_) => {
                    // With jitter, so that clients that lost the same server do not
                    // all come back at the same instant.
                    let jitter = rand::random::<u64>() % 300;
                    tokio::time::sleep(Duration::from_millis(200 + jitter)).await;
                }
            }
        }
    }

    /// Round trips to the candidate first and last hops, where there is a choice: they
    /// are dialed, and ping measures them.
    async fn measure_ends(
        &self,
        book: &[VerifiedAnnouncement],
        num_blocks: usize,
    ) -> HashMap<PeerId, Duration> {
        let ends = |first: bool| -> Vec<(PeerId, Vec<Multiaddr>)> {
            book.iter()
                .filter(|a| a.compute == self.model.compute && a.free_sessions > 0)
                .filter(|a| {
                    if first {
                        a.blocks.start() == 0
                    } else {
                        a.blocks.end() as usize == num_blocks
                    }
                })
                .filter_map(|a| {
                    let p = PeerId::from_bytes(&a.peer.0).ok()?;
                    Some((p, a.addrs.iter().filter_map(|s| s.parse().ok()).collect()))
                })
                .take(MEASURE_CANDIDATES)
                .collect()
        };
        let mut candidates = Vec::new();
        for first in [true, false] {
            let c = ends(first);
            if c.len() > 1 {
                candidates.extend(c);
            }
        }
        let measured = |peers: &[crate::net::PeerInfo]| -> HashMap<PeerId, Duration> {
            peers
                .iter()
                .filter_map(|p| Some((p.peer, p.rtt?)))
                .collect()
        };
        if candidates.is_empty() {
            return measured(&self.net.peers().await.unwrap_or_default());
        }
        for (peer, addrs) in &candidates {
            let _ = self.net.add_addresses(*peer, addrs.clone(), true).await;
        }
        let deadline = Instant::now() + MEASURE_WAIT;
        loop {
            let mut rtts = measured(&self.net.peers().await.unwrap_or_default());
            if candidates.iter().all(|(p, _)| rtts.contains_key(p)) {
                return rtts;
            }
            if Instant::now() >= deadline {
                for (p, _) in &candidates {
                    rtts.entry(*p).or_insert(UNANSWERED_RTT);
                }
                return rtts;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Opens a session of at most `max_tokens` tokens along `route`.
    pub async fn open_session(
        &self,
        route: &[Hop],
        max_tokens: u32,
    ) -> Result<SwarmSession, ClientError> {
        let m = &self.model;
        SwarmSession::open(
            &self.net,
            m.model_id,
            &m.compute,
            route,
            max_tokens,
            m.ends.config().hidden_size,
            self.cfg.wire_dtype,
        )
        .await
    }

    /// The route of the session opened (or healed) most recently.
    pub fn route_in_use(&self) -> Option<Vec<Hop>> {
        self.route_in_use.lock().ok().and_then(|r| r.clone())
    }

    fn set_route_in_use(&self, route: &[Hop]) {
        if let Ok(mut r) = self.route_in_use.lock() {
            *r = Some(route.to_vec());
        }
    }

    fn banned(&self, peer: &PeerId) -> bool {
        self.banned_since(peer, None)
    }

    /// Whether `peer`'s connection broke (it crashed or left) and it has not announced
    /// itself since.
    fn gone(&self, peer: &PeerId, issued_at_ms: u64) -> bool {
        self.bans
            .lock()
            .map(|b| b.is_gone(peer, issued_at_ms) || b.is_liar(peer))
            .unwrap_or(false)
    }

    /// Pairs of servers kept apart: never the first right before the second (on a
    /// last-resort route, with `hard_only`, only those in a dispute).
    fn kept_apart(&self, hard_only: bool) -> std::collections::HashSet<(PeerId, PeerId)> {
        self.bans
            .lock()
            .map(|b| b.kept_apart(hard_only))
            .unwrap_or_default()
    }

    fn banned_since(&self, peer: &PeerId, issued_at_ms: Option<u64>) -> bool {
        self.bans
            .lock()
            .map(|b| b.is_banned(peer, issued_at_ms) || b.is_liar(peer))
            .unwrap_or(false)
    }

    /// Leaves the server a failure names out of routes for a while. Whether the failure
    /// is one a new route can heal: every failure of a named server is. Its code is the
    /// server's own word, so no code lets it end the generation unpunished (a server
    /// chosen for the speed it claims could otherwise refuse every session with a code
    /// that only stops the client).
    fn blame(&self, e: &ClientError) -> bool {
        crate::metrics::global().client_error(e);
        let Some(f) = (match e {
            ClientError::HopFailed(f) => Some(f),
            _ => None,
        }) else {
            return matches!(e, ClientError::Protocol { .. } | ClientError::Net(_));
        };
        if let Ok(mut b) = self.bans.lock() {
            b.judge(f);
        }
        true
    }

    /// A new session, of at most `budget` tokens, on a route around the servers that
    /// failed, brought to the state of the old one by replaying `inputs` (in their
    /// original chunks); the output of the last input. Gives up after
    /// [`MAX_HEALS_PER_STEP`] routes, or when no route covers every block within
    /// `route_wait`.
    async fn heal(
        &self,
        failure: ClientError,
        inputs: &[(usize, Vec<u32>)],
        budget: u32,
    ) -> Result<(SwarmSession, Tensor), ClientError> {
        let started = Instant::now();
        let mut failure = failure;
        let mut refused = std::collections::HashSet::new();
        for attempt in 0..MAX_HEALS_PER_STEP {
            if !self.blame(&failure) || refused_again(&failure, &mut refused) {
                return Err(failure);
            }
            retry_pause(attempt).await;
            tracing::warn!("{failure}; routing around it");
            let route = self.discover_route().await?;
            let mut session = match self.open_session(&route, budget).await {
                Ok(s) => s,
                Err(e) => {
                    failure = e;
                    continue;
                }
            };
            let hidden = inputs
                .iter()
                .map(|(pos, ids)| Ok((self.model.ends.embed(ids)?, *pos)))
                .collect::<Result<Vec<_>, ClientError>>()?;
            match session.replay(&hidden).await {
                Ok(out) => {
                    self.set_route_in_use(&route);
                    tracing::warn!(
                        "healed in {:?}: replayed {} inputs through {}",
                        started.elapsed(),
                        inputs.len(),
                        describe(&route)
                    );
                    return Ok((session, out));
                }
                Err(e) => failure = e,
            }
        }
        Err(failure)
    }

    /// Generates from `prompt` token ids through the swarm. `on_text` gets each piece of
    /// text as it is decided and returns `false` to stop early.
    ///
    /// When a server of the route fails (it dies, hangs, leaves or is busy), the client
    /// routes around it and replays what it had fed the route so far, in the same
    /// chunks, into the new one: the text is the same as without the failure.
    pub async fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, ClientError> {
        self.generate_from(None, prompt, params, on_text).await
    }

    /// Like [`Self::generate`], starting on `route` (a route pinned by the caller, for
    /// example one through a server under test) rather than the cheapest one; a failure
    /// heals as usual, onto routes of the client's choice.
    pub async fn generate_on(
        &self,
        route: Vec<Hop>,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, ClientError> {
        self.generate_from(Some(route), prompt, params, on_text)
            .await
    }

    async fn generate_from(
        &self,
        mut first: Option<Vec<Hop>>,
        prompt: &[u32],
        params: &GenerateParams,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, ClientError> {
        let _open = crate::metrics::global().session(crate::metrics::Side::Client);
        // The last token sampled is never fed back: the prompt and the answer fit.
        let budget = u32::try_from(prompt.len() + params.max_tokens).unwrap_or(u32::MAX);
        let mut session = None;
        let mut failure = None;
        let mut refused = std::collections::HashSet::new();
        // A route that fails to open is left out, and the next best tried at once.
        for attempt in 0..MAX_HEALS_PER_STEP {
            retry_pause(attempt).await;
            let route = match first.take() {
                Some(r) => r,
                None => self.discover_route().await?,
            };
            match self.open_session(&route, budget).await {
                Ok(s) => {
                    tracing::info!("route: {}", describe(&route));
                    self.set_route_in_use(&route);
                    session = Some(s);
                    break;
                }
                Err(e) => {
                    if !self.blame(&e) || refused_again(&e, &mut refused) {
                        return Err(e);
                    }
                    tracing::warn!("{e}; trying another route");
                    failure = Some(e);
                }
            }
        }
        let Some(mut session) = session else {
            return Err(failure.unwrap_or_else(|| ClientError::NoEntry("no route".into())));
        };
        let result = self
            .run(&mut session, prompt, params, budget, on_text)
            .await;
        session.close().await;
        crate::metrics::global().generation(&result);
        result
    }

    /// The generation loop over an open session, healing it when a hop fails.
    async fn run(
        &self,
        session: &mut SwarmSession,
        prompt: &[u32],
        params: &GenerateParams,
        budget: u32,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, ClientError> {
        let mut generator = Generator::new(prompt, params)?;
        // The second session spot checks run on (dropping it closes its streams).
        let mut shadow: Option<verify::Shadow> = None;
        loop {
            // An inner prompt chunk's output only fills the caches: no head to time.
            let inner = generator.input_is_inner_chunk();
            // Embedding one token is a row lookup: cheap enough to do here.
            let Some((input, pos)) = generator.next_input(&self.model.ends)? else {
                break;
            };
            let mut out = match session.step(&input, pos).await {
                Ok(out) => {
                    if let (Some((ack, total)), Ok(mut s)) =
                        (session.last_timing(), self.speeds.lock())
                    {
                        s.record_step(session.route(), ack, total);
                    }
                    out
                }
                Err(e) => {
                    let (healed, out) = self.heal(e, generator.inputs(), budget).await?;
                    let broken = std::mem::replace(session, healed);
                    // Dropping the old session closes its streams: whatever is left of
                    // the old route frees it at once.
                    drop(broken);
                    out
                }
            };
            self.count(|s| s.steps += 1);
            if self.cfg.verify > 0.0 && rand::random::<f64>() < self.cfg.verify {
                let route = session.route().to_vec();
                let verdict = self
                    .spot_check(&route, generator.inputs(), &out, budget, &mut shadow)
                    .await;
                if let verify::Verdict::Wrong(e) = verdict {
                    let (healed, healed_out) = self.heal(e, generator.inputs(), budget).await?;
                    drop(std::mem::replace(session, healed));
                    out = healed_out;
                }
            }
            // The head and sampling are real work: on this worker only while they are
            // short, and a GPU's on the blocking pool (an inner chunk's feed, which
            // computes nothing, stays out of the average).
            let model = self.model.clone();
            let head = move || {
                let step = generator.feed(&model.ends, &model.tokenizer, &out);
                (generator, step)
            };
            let cpu = self.model.ends.device().is_cpu();
            let (g, step) = self
                .heads
                .run(cpu && !inner, head)
                .await
                .map_err(ClientError::Task)?;
            generator = g;
            match step? {
                Step::Text(t) => {
                    if !t.is_empty() && !on_text(&t) {
                        generator.cancel();
                    }
                }
                Step::Done(t, _) => {
                    if !t.is_empty() {
                        on_text(&t);
                    }
                }
            }
        }
        if let Some(s) = shadow {
            s.close().await;
        }
        Ok(generator.finish())
    }

    /// Leaves the swarm: stops the network task and waits for it.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.net_task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--compute` takes every name Pollen makes and refuses others clearly.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn compute_names_are_checked() {
        for name in [
            "fast/cpu",
            "exact/cpu-kc1024-libma64120",
            "exact/cuda-sm90-132-3f0a1c",
        ] {
            assert_eq!(parse_compute(name).as_deref(), Ok(name));
        }
        let max = pollen_protocol::limits::MAX_COMPUTE_LEN;
        assert!(parse_compute(&"a".repeat(max)).is_ok());
        for bad in [String::new(), "a".repeat(max + 1)] {
            let e = parse_compute(&bad).unwrap_err();
            assert!(e.contains(&format!("1 to {max} bytes")), "{e}");
        }
        let e = parse_compute("fast/cpu\u{1b}[2J").unwrap_err();
        assert!(e.contains("\\u{1b}"), "{e}");
        assert!(parse_compute("fast cpu").is_err());
    }

    #[test]
    fn bans_grow_and_a_restarted_server_is_forgiven() {
        let mut b = Bans::default();
        let (crashed, hung, busy) = (PeerId::random(), PeerId::random(), PeerId::random());
        b.ban(crashed, false, true);
        b.ban(hung, false, false);
        b.ban(busy, true, false);
        let old = crate::clock::unix_ms().saturating_sub(60_000);
        let fresh = crate::clock::unix_ms() + 1_000;
        for p in [&crashed, &hung, &busy] {
            assert!(b.is_banned(p, None));
            assert!(
                b.is_banned(p, Some(old)),
                "an announcement from before the failure"
            );
        }
        // Announcing again after the failure: a crashed (restarted) server comes back,
        // a hung one does not.
        assert!(!b.is_banned(&crashed, Some(fresh)));
        assert!(b.is_banned(&hung, Some(fresh)));
        // Each further failure doubles the ban.
        let first = b.until[&hung].0;
        b.ban(hung, false, false);
        assert!(b.until[&hung].0 > first + Duration::from_secs(29));
        assert_eq!(b.until[&hung].1, 2);
        // A server that keeps breaking its connections is forgiven only at first.
        let flaky = PeerId::random();
        for n in 1..=MOST_FORGIVEN + 1 {
            b.ban(flaky, false, true);
            let later = crate::clock::unix_ms() + 1_000;
            assert_eq!(
                b.is_banned(&flaky, Some(later)),
                n > MOST_FORGIVEN,
                "failure {n}"
            );
        }
    }

    /// A hop's report that the hop before sent it wrong hidden states bans both, as a
    /// failure, neither as a liar, and keeps the two apart.
    #[test]
    fn a_dispute_bans_both_and_keeps_them_apart() {
        let mut b = Bans::default();
        let (accused, reporter) = (PeerId::random(), PeerId::random());
        b.dispute(accused, reporter);
        for p in [&accused, &reporter] {
            assert!(b.is_banned(p, None));
            assert!(!b.is_liar(p), "a report is not the client's own finding");
        }
        for hard_only in [false, true] {
            assert_eq!(
                b.kept_apart(hard_only),
                std::collections::HashSet::from([(accused, reporter)])
            );
        }
        // Disputes again and again, with fresh keys on either side: neither honest
        // server's ban grows, the pair's time apart does.
        let first = b.apart[&(accused, reporter)].hard;
        for _ in 0..5 {
            b.dispute(accused, PeerId::random());
            b.dispute(PeerId::random(), reporter);
            b.dispute(accused, reporter);
        }
        for p in [&accused, &reporter] {
            assert_eq!(b.until[p].1, 0, "no strikes for a dispute");
            assert!(b.until[p].0 <= Instant::now() + FIRST_BAN);
        }
        assert!(b.apart[&(accused, reporter)].hard > first + FIRST_BAN * 10);
        // A dispute never shortens a longer ban, nor changes why it was given: a server
        // whose connection broke stays gone until it announces itself again.
        let gone = PeerId::random();
        for _ in 0..3 {
            b.ban(gone, false, true);
        }
        let until = b.until[&gone].0;
        b.dispute(gone, PeerId::random());
        assert_eq!(b.until[&gone].0, until);
        assert!(b.is_gone(&gone, 0));
    }

    /// A failure of `peer`, the hop with blocks 10:20, with `code`, reported by the hop
    /// before where `blamed_by` is some.
    fn report_about_blocks_10_20(
        peer: PeerId,
        code: ErrorCode,
        blamed_by: Option<PeerId>,
    ) -> HopFailure {
        HopFailure {
            hop: 1,
            peer,
            blocks: crate::blocks::BlockRange { start: 10, end: 20 },
            code,
            message: "x".into(),
            reported_by: None,
            blamed_by,
        }
    }

    /// A hop's report that the hop after it failed bans that hop and keeps the two
    /// apart on preferred routes, for longer than the ban (the reporter cannot report it
    /// again and again), a broken connection and a refusal for room too.
    #[test]
    fn a_report_about_the_next_hop_keeps_the_pair_apart() {
        let mut b = Bans::default();
        let failure = report_about_blocks_10_20;
        let (before, hung, crashed, own) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let (full, before_crashed, before_full) =
            (PeerId::random(), PeerId::random(), PeerId::random());
        b.judge(&failure(hung, ErrorCode::Timeout, Some(before)));
        b.judge(&failure(
            crashed,
            ErrorCode::Unreachable,
            Some(before_crashed),
        ));
        b.judge(&failure(full, ErrorCode::OverBudget, Some(before_full)));
        b.judge(&failure(own, ErrorCode::Internal, None));
        for p in [&hung, &crashed, &own, &full] {
            assert!(b.is_banned(p, None));
            assert!(!b.is_liar(p));
        }
        for r in [&before, &before_crashed, &before_full] {
            assert!(
                !b.is_banned(r, None),
                "a reporter is not banned for a report"
            );
        }
        assert_eq!(
            b.kept_apart(false),
            std::collections::HashSet::from([
                (before, hung),
                (before_crashed, crashed),
                (before_full, full)
            ])
        );
        // Not on a last-resort route: a hung server comes back there as before.
        assert!(b.kept_apart(true).is_empty());
        assert!(b.apart[&(before, hung)].soft >= b.until[&hung].0 + FIRST_BAN);
        // A server with a long ban from elsewhere: the pair outlasts it.
        for _ in 0..5 {
            b.ban(hung, false, false);
        }
        b.judge(&failure(hung, ErrorCode::Timeout, Some(before)));
        let soft = b.apart[&(before, hung)].soft;
        assert!(soft >= b.until[&hung].0 + FIRST_BAN);
        // A dispute between the two later keeps them apart on every route, for the
        // dispute's own time, not the long soft one; the soft time stays.
        b.dispute(before, hung);
        assert!(b.kept_apart(true).contains(&(before, hung)));
        let a = b.apart[&(before, hung)];
        assert_eq!(a.soft, soft);
        assert!(a.hard <= Instant::now() + grown_ban(a.times));
        assert!(a.hard < soft);
        assert!(!b.is_banned(&crashed, Some(crate::clock::unix_ms() + 1_000)));
    }

    /// A hop that reports one server after it and then another while kept apart from
    /// the first sits out itself, briefly and with no strike, whatever the reports
    /// said. The same server reported again costs the reporter nothing more.
    #[test]
    fn a_hop_reporting_server_after_server_sits_out_itself() {
        let mut b = Bans::default();
        let failure = |peer, code, by| report_about_blocks_10_20(peer, code, Some(by));
        let (hostile, honest) = (PeerId::random(), PeerId::random());
        let victims: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        b.judge(&failure(victims[0], ErrorCode::Busy, hostile));
        assert!(!b.is_banned(&hostile, None));
        assert!(b.kept_apart(false).contains(&(hostile, victims[0])));
        b.judge(&failure(victims[1], ErrorCode::Busy, hostile));
        assert!(b.is_banned(&hostile, None));
        let (until, strikes, ..) = b.until[&hostile];
        assert_eq!(strikes, 0);
        assert!(until <= Instant::now() + BUSY_BAN);
        assert!(b.kept_apart(false).contains(&(hostile, victims[1])));
        b.judge(&failure(victims[2], ErrorCode::Unreachable, hostile));
        let (until, strikes, ..) = b.until[&hostile];
        assert_eq!(strikes, 0);
        assert!(until <= Instant::now() + BUSY_BAN);
        assert!(b.kept_apart(false).contains(&(hostile, victims[2])));
        // One server reported twice by the same hop: a pair kept apart, no more.
        b.judge(&failure(victims[0], ErrorCode::Timeout, honest));
        b.judge(&failure(victims[0], ErrorCode::Timeout, honest));
        assert!(!b.is_banned(&honest, None));
    }

    #[test]
    fn a_server_refusing_for_room_again_ends_the_tries() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let failure = |peer, code| {
            ClientError::HopFailed(Box::new(HopFailure {
                hop: 0,
                peer,
                blocks: crate::blocks::BlockRange { start: 0, end: 10 },
                code,
                message: "x".into(),
                reported_by: None,
                blamed_by: None,
            }))
        };
        let mut refused = std::collections::HashSet::new();
        assert!(!refused_again(&failure(a, ErrorCode::Busy), &mut refused));
        assert!(!refused_again(
            &failure(a, ErrorCode::OverBudget),
            &mut refused
        ));
        assert!(!refused_again(
            &failure(b, ErrorCode::OverBudget),
            &mut refused
        ));
        assert!(!refused_again(
            &failure(a, ErrorCode::Timeout),
            &mut refused
        ));
        assert!(refused_again(
            &failure(b, ErrorCode::OverBudget),
            &mut refused
        ));
    }

    #[test]
    fn only_a_server_without_room_gets_the_short_ban() {
        assert!(busy_only(ErrorCode::Busy) && busy_only(ErrorCode::OverBudget));
        for c in [
            ErrorCode::VersionMismatch,
            ErrorCode::Timeout,
            ErrorCode::BadRequest,
            ErrorCode::Unreachable,
        ] {
            assert!(!busy_only(c), "{c:?}");
        }
    }

    /// A full ban table makes room by dropping the ban that ends soonest: a new failure
    /// (a liar's included) is never let off for lack of room.
    #[test]
    fn a_full_ban_table_drops_the_ban_that_ends_soonest() {
        let mut b = Bans::default();
        let busy = PeerId::random();
        b.ban(busy, true, false);
        for _ in 1..MAX_BANS {
            b.ban(PeerId::random(), false, false);
        }
        assert_eq!(b.until.len(), MAX_BANS);
        let liar = PeerId::random();
        b.ban_liar(liar);
        assert_eq!(b.until.len(), MAX_BANS);
        assert!(b.is_liar(&liar) && b.is_banned(&liar, None));
        assert!(!b.is_banned(&busy, None), "the 3 s ban made room");
    }
}
