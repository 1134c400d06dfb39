//! The announcements a node has verified: who serves which blocks of which
//! model, until when. Bounded in all, and per peer: an announcing peer holds at most a few
//! entries, and so does each peer and each IP address that sends them, whose publishes
//! are also rate-limited by a token bucket. So a flood of random model ids or of sybil
//! keys from one host fills its own share, never the book, and real servers still get in.
//! Expired entries are dropped.

use crate::clock::unix_ms as now_ms;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use pollen_protocol::{
    AnnounceError, ErrorCode, FreshnessPolicy, ListCursor, ModelId, PeerIdBytes, ReplayGuard,
    SignedAnnouncement, VerifiedAnnouncement,
};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Most announcements a node keeps (1,000 servers × a few models fit).
pub const MAX_BOOK_ENTRIES: usize = 16_384;

/// Most rate buckets (peers and IP addresses) remembered; full ones are forgotten first.
const MAX_BUCKETS: usize = 8192;

/// List requests (pages) one peer may send at once: a whole gather of a full book
/// (16 pages) twice over.
pub const LIST_BURST: u32 = 32;
/// List requests a second one peer may send, sustained.
pub const LIST_PER_S: f64 = 2.0;
/// List requests the peers of one IP address's share (relayed peers: one share in all)
/// may send at once: a page of a full book costs a bootstrap's event loop a few
/// milliseconds, and peer ids cost nothing.
pub const LIST_IP_BURST: u32 = 64;
/// List requests a second the peers of one address's share may send, sustained.
pub const LIST_IP_PER_S: f64 = 8.0;

/// How often a refusal of the same kind is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The caps of a book. The defaults are far above what a swarm of 1,000 servers needs:
/// a server announces one or two models, renews every ten seconds or so, and rarely
/// shares an IP address with more than a few others.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BookLimits {
    /// Most entries in all.
    pub max_entries: usize,
    /// Most entries one announcing peer holds (one per model it serves).
    pub per_peer: usize,
    /// Most entries that arrived from one connected peer (its own, or relayed).
    pub per_sender: usize,
    /// Most entries that arrived from one IP address (peers behind one NAT share it).
    pub per_ip: usize,
    /// Publishes one peer may send at once, then `publish_per_s` a second.
    pub publish_burst: u32,
    /// Publishes a second one peer may send, sustained.
    pub publish_per_s: f64,
    /// Publishes one IP address may send at once, then `ip_publish_per_s` a second.
    pub ip_publish_burst: u32,
    /// Publishes a second one IP address may send, sustained.
    pub ip_publish_per_s: f64,
}

impl Default for BookLimits {
    fn default() -> Self {
        Self {
            max_entries: MAX_BOOK_ENTRIES,
            per_peer: 16,
            per_sender: 64,
            per_ip: 256,
            publish_burst: 32,
            publish_per_s: 2.0,
            ip_publish_burst: 256,
            ip_publish_per_s: 16.0,
        }
    }
}

static PROCESS_LIMITS: OnceLock<BookLimits> = OnceLock::new();

/// Sets the limits of every book this process makes from now on (the bootstrap's and
/// server's command-line flags); the first call wins. Returns whether it was set.
pub fn set_process_limits(limits: BookLimits) -> bool {
    PROCESS_LIMITS.set(limits).is_ok()
}

/// Which cap refused an announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cap {
    /// Entries of one announcing peer.
    Peer,
    /// Entries sent by one connected peer.
    Sender,
    /// Entries sent from one IP address.
    Ip,
    /// Publishes a second from one peer.
    PeerRate,
    /// Publishes a second from one IP address.
    IpRate,
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cap::Peer => "announcements held for one peer",
            Cap::Sender => "announcements held from one sending peer",
            Cap::Ip => "announcements held from one IP address",
            Cap::PeerRate => "publishes a second from one peer",
            Cap::IpRate => "publishes a second from one IP address",
        })
    }
}

/// Why the book refused an announcement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BookError {
    /// The announcement failed verification, or is not newer than the one held.
    #[error(transparent)]
    Refused(#[from] AnnounceError),
    /// The book holds its most unexpired announcements.
    #[error("announcement book is full ({0} entries)")]
    Full(usize),
    /// The sender has no connection this node keeps count of (its table of
    /// connections is full, or the connection closed): refused, since no cap could
    /// apply to it.
    #[error("busy: this node is tracking its most connections; try again later")]
    UntrackedSender,
    /// A cap per peer or per IP address is reached.
    #[error("busy: at most {limit} {cap}; try again later")]
    Capped {
        /// Which cap.
        cap: Cap,
        /// Its value.
        limit: f64,
    },
}

impl BookError {
    /// Whether this is the ordinary echo of an announcement already held (a renewal seen
    /// twice, through two peers), or a cap refusal (logged by the book at a rate limit):
    /// not worth a warning each.
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            BookError::Refused(AnnounceError::Duplicate { .. } | AnnounceError::Stale { .. })
                | BookError::Capped { .. }
                | BookError::UntrackedSender
        )
    }

    /// The wire code to answer with: `Busy` for a full book or a cap, `BadRequest` for an
    /// announcement that is wrong.
    pub fn code(&self) -> ErrorCode {
        match self {
            BookError::Refused(_) => ErrorCode::BadRequest,
            BookError::Full(_) | BookError::Capped { .. } | BookError::UntrackedSender => {
                ErrorCode::Busy
            }
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, burst: u32, per_s: f64) -> bool {
        let burst = f64::from(burst);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_s).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now: Instant, burst: u32, per_s: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + elapsed * per_s >= f64::from(burst)
    }
}

/// Takes a token from `key`'s bucket, keeping at most [`MAX_BUCKETS`] buckets.
fn take<K: Hash + Eq + Copy>(
    buckets: &mut HashMap<K, Bucket>,
    key: K,
    burst: u32,
    per_s: f64,
) -> bool {
    let now = Instant::now();
    if !buckets.contains_key(&key) && buckets.len() >= MAX_BUCKETS {
        buckets.retain(|_, b| !b.is_full(now, burst, per_s));
        if buckets.len() >= MAX_BUCKETS {
            return false;
        }
    }
    buckets
        .entry(key)
        .or_insert(Bucket {
            tokens: f64::from(burst),
            at: now,
        })
        .take(now, burst, per_s)
}

/// Logs refusals of one kind at most once per [`LOG_EVERY`], with how many were not
/// logged in between.
#[derive(Debug, Default)]
pub struct RateLimitedLog {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RateLimitedLog {
    /// Logs `message` under `kind` as a warning unless one of that kind was logged less
    /// than ten seconds ago (then it is counted, and the count shown with the next one).
    pub fn warn(&mut self, kind: &'static str, message: impl FnOnce() -> String) {
        let now = Instant::now();
        match self.last.get_mut(kind) {
            Some((at, quiet)) if now.duration_since(*at) < LOG_EVERY => *quiet += 1,
            Some((at, quiet)) => {
                tracing::warn!("{} ({} more like it not shown)", message(), quiet);
                *at = now;
                *quiet = 0;
            }
            None => {
                tracing::warn!("{}", message());
                self.last.insert(kind, (now, 0));
            }
        }
    }
}

/// An entry and where it came from.
#[derive(Debug, Clone)]
struct Entry {
    ann: VerifiedAnnouncement,
    /// A hash of the model id and the peer id: what a list's order keys
    /// ([`AnnouncementBook::page`]).
    digest: [u8; 32],
    /// A hash of the model id and where the entry came from (its IP address's share, or
    /// its sender, or with neither the announcing peer): entries of the same group rank
    /// among each other in a list.
    group: u64,
    sender: Option<PeerId>,
    ip: Option<IpAddr>,
}

/// Where an announcement came from, for its rank in lists ([`Entry::group`]).
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// Published over a connection: its sender and the connection's address share
    /// (`None`: a relayed connection).
    Published(PeerId, Option<IpAddr>),
    /// Gathered from this peer's list.
    Gathered(PeerId),
    /// Put in by this node itself.
    Own,
}

/// [`Entry::group`]: the model and where the announcement came from: its address's site
/// ([`site_of`]), every relayed sender together, the peer a list was gathered from, or
/// (put in by this node) the announcing peer.
fn group_of(a: &VerifiedAnnouncement, origin: Origin) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(a.model_id.as_bytes());
    match origin {
        Origin::Published(_, Some(ip)) => match site_of(ip) {
            IpAddr::V4(ip) => h.update(&[4]).update(&ip.octets()),
            IpAddr::V6(ip) => h.update(&[6]).update(&ip.octets()),
        },
        Origin::Published(_, None) => h.update(&[2]),
        Origin::Gathered(s) => h.update(&[1]).update(&s.to_bytes()),
        Origin::Own => h.update(&[0]).update(&a.peer.0),
    };
    let mut g = [0u8; 8];
    g.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(g)
}

/// What ranks in lists and list requests count against ([`Entry::group`],
/// [`AnnouncementBook::take_list`]): an IPv4 address itself, an IPv6 address's /48 (a
/// site's usual allocation: its 65,536 /64s, each a share of the book's caps, are one
/// site here).
fn site_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 80) - 1),
            )),
        },
    }
}

/// What a multiaddr's caps per address count against, if it has an IP address: see
/// [`share_of`].
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(share_of(IpAddr::V4(ip))),
        Protocol::Ip6(ip) => Some(share_of(IpAddr::V6(ip))),
        _ => None,
    })
}

/// What caps per address count `ip` against: an IPv4 address itself (an IPv4-mapped
/// IPv6 one as IPv4); a global IPv6 address's /64, which one site is usually given
/// whole (so that its 2^64 addresses are one share, not 2^64: hosts that share a /64
/// share its caps); a link-local, unique-local or loopback IPv6 address itself (all of
/// a network's link-local addresses are in one /64).
pub fn share_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let local = v6.is_loopback()
                || v6.is_unicast_link_local()
                || (v6.segments()[0] & 0xfe00) == 0xfc00;
            if local {
                return ip;
            }
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
    }
}

fn bump<K: Hash + Eq>(counts: &mut HashMap<K, usize>, key: K, up: bool) {
    if up {
        *counts.entry(key).or_insert(0) += 1;
    } else if let Some(n) = counts.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// Verified announcements by (peer, model).
#[derive(Debug)]
pub struct AnnouncementBook {
    entries: HashMap<(PeerIdBytes, ModelId), Entry>,
    replay: ReplayGuard,
    policy: FreshnessPolicy,
    limits: BookLimits,
    /// The IP address of each connected peer (none on the memory transport).
    conns: HashMap<PeerId, Option<IpAddr>>,
    per_peer: HashMap<PeerIdBytes, usize>,
    per_sender: HashMap<PeerId, usize>,
    per_ip: HashMap<IpAddr, usize>,
    peer_rate: HashMap<PeerId, Bucket>,
    ip_rate: HashMap<IpAddr, Bucket>,
    list_rate: HashMap<PeerId, Bucket>,
    /// List requests by address share (`None`: every relayed peer).
    list_ip_rate: HashMap<Option<IpAddr>, Bucket>,
    log: RateLimitedLog,
}

impl Default for AnnouncementBook {
    fn default() -> Self {
        Self::with_limits(PROCESS_LIMITS.get().copied().unwrap_or_default())
    }
}

impl AnnouncementBook {
    /// An empty book with these caps.
    pub fn with_limits(limits: BookLimits) -> Self {
        Self {
            entries: HashMap::new(),
            replay: ReplayGuard::new(limits.max_entries),
            policy: FreshnessPolicy::default(),
            limits,
            conns: HashMap::new(),
            per_peer: HashMap::new(),
            per_sender: HashMap::new(),
            per_ip: HashMap::new(),
            peer_rate: HashMap::new(),
            ip_rate: HashMap::new(),
            list_rate: HashMap::new(),
            list_ip_rate: HashMap::new(),
            log: RateLimitedLog::default(),
        }
    }

    /// The caps of this book.
    pub fn limits(&self) -> &BookLimits {
        &self.limits
    }

    /// A connection to `peer` at `addr` is up: announcements it sends count against it
    /// and against the address's IP.
    pub fn connected(&mut self, peer: PeerId, addr: &Multiaddr) {
        // Twice the most connections a node keeps (see `net::ConnectionCaps`), so that
        // every connected peer is known; past that a new peer is not tracked, and what it
        // sends is refused (see `insert_from`).
        if self.conns.len() < 2 * MAX_BUCKETS || self.conns.contains_key(&peer) {
            self.conns.insert(peer, ip_of(addr));
        }
    }

    /// The IP address `peer` is connected from, where known.
    pub fn ip_of_peer(&self, peer: &PeerId) -> Option<IpAddr> {
        self.conns.get(peer).copied().flatten()
    }

    /// Every connection to `peer` is closed (what it sent stays until it expires).
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.conns.remove(peer);
    }

    /// Verifies `signed` and keeps it, as this node's own (its own announcement, or one
    /// it gathered itself from a list): no cap per sender applies.
    pub fn insert(&mut self, signed: SignedAnnouncement) -> Result<(), BookError> {
        self.insert_entry(signed, Origin::Own)
    }

    /// Verifies `signed`, published by the connected peer `from`, and keeps it within the
    /// caps of `from` and of its IP address; a clear reason when refused. A sender the
    /// book has no connection for (its table of connections was full when `from`
    /// connected, or the connection is gone) is refused: uncounted, it would skip every
    /// cap. This node's own announcements go through [`Self::insert`].
    pub fn insert_from(
        &mut self,
        from: &PeerId,
        signed: SignedAnnouncement,
    ) -> Result<(), BookError> {
        let Some(ip) = self.conns.get(from).copied() else {
            return Err(BookError::UntrackedSender);
        };
        let l = self.limits;
        let refused = if !take(&mut self.peer_rate, *from, l.publish_burst, l.publish_per_s) {
            Some((Cap::PeerRate, l.publish_per_s))
        } else if let Some(ip) = ip
            && !take(
                &mut self.ip_rate,
                ip,
                l.ip_publish_burst,
                l.ip_publish_per_s,
            )
        {
            Some((Cap::IpRate, l.ip_publish_per_s))
        } else {
            None
        };
        if let Some((cap, limit)) = refused {
            self.log.warn("rate", || {
                format!("refusing announcements from {from}: more than {limit} {cap}")
            });
            return Err(BookError::Capped { cap, limit });
        }
        self.insert_entry(signed, Origin::Published(*from, ip))
    }

    /// Verifies `signed`, which this node gathered itself from `source`'s list, and keeps
    /// it counted against `source`, which may hold at most `share` entries of this book
    /// (so that one peer answering with pages of valid sybils fills its share, never
    /// the book). No rate or IP cap applies: this node asked.
    pub fn insert_gathered(
        &mut self,
        source: &PeerId,
        signed: SignedAnnouncement,
        share: usize,
    ) -> Result<(), BookError> {
        self.insert_capped(signed, Origin::Gathered(*source), share)
    }

    /// Takes a token from `peer`'s bucket of list requests ([`LIST_BURST`], then
    /// [`LIST_PER_S`] a second) and from its address's ([`LIST_IP_BURST`], then
    /// [`LIST_IP_PER_S`]; an IPv6 /48's peers share one, as do relayed peers and peers
    /// of no known connection: [`site_of`]); whether both had one.
    pub fn take_list(&mut self, peer: &PeerId) -> bool {
        let ip = self.conns.get(peer).copied().flatten().map(site_of);
        take(&mut self.list_rate, *peer, LIST_BURST, LIST_PER_S)
            && take(&mut self.list_ip_rate, ip, LIST_IP_BURST, LIST_IP_PER_S)
    }

    fn capped(&mut self, cap: Cap, limit: usize, who: String) -> BookError {
        self.log.warn("cap", || {
            format!("refusing an announcement from {who}: it holds {limit} {cap} already")
        });
        BookError::Capped {
            cap,
            limit: limit as f64,
        }
    }

    fn insert_entry(
        &mut self,
        signed: SignedAnnouncement,
        origin: Origin,
    ) -> Result<(), BookError> {
        let per_sender = self.limits.per_sender;
        self.insert_capped(signed, origin, per_sender)
    }

    fn insert_capped(
        &mut self,
        signed: SignedAnnouncement,
        origin: Origin,
        per_sender: usize,
    ) -> Result<(), BookError> {
        let (sender, ip) = match origin {
            Origin::Published(s, ip) => (Some(s), ip),
            Origin::Gathered(s) => (Some(s), None),
            Origin::Own => (None, None),
        };
        let now = now_ms();
        // The caps first, on the key the announcement claims: a refusal costs no
        // signature check (a hostile page of entries past its sender's share is cheap to
        // refuse); a claim that lies about its key fails the check below all the same.
        let key = (
            signed.announcement.peer.clone(),
            signed.announcement.model_id,
        );
        let old = self.entries.get(&key).map(|e| (e.sender, e.ip));
        let l = self.limits;
        if old.is_none() && self.per_peer.get(&key.0).copied().unwrap_or(0) >= l.per_peer {
            return Err(self.capped(Cap::Peer, l.per_peer, key.0.to_string()));
        }
        if let Some(s) = sender
            && old.is_none_or(|(os, _)| os != Some(s))
            && self.per_sender.get(&s).copied().unwrap_or(0) >= per_sender
        {
            return Err(self.capped(Cap::Sender, per_sender, s.to_string()));
        }
        if let Some(i) = ip
            && old.is_none_or(|(_, oi)| oi != Some(i))
            && self.per_ip.get(&i).copied().unwrap_or(0) >= l.per_ip
        {
            return Err(self.capped(Cap::Ip, l.per_ip, i.to_string()));
        }
        let verified = signed.verify(now, &self.policy)?;
        // Recorded by the replay guard only once accepted, below.
        if let Err(e) = self.replay.admit(&verified) {
            // The server's own copy of what another peer forwarded first: the entry
            // moves to the server's sender and address (its rank in lists among its
            // own group's, not the forwarder's).
            if let Origin::Published(s, ip) = origin
                && s.to_bytes() == verified.peer.0
                && old.is_some_and(|o| o != (sender, ip))
                && self
                    .entries
                    .get(&key)
                    .is_some_and(|e| e.ann.seq == verified.seq)
            {
                self.rehome(&key, origin);
                return Ok(());
            }
            return Err(e.into());
        }
        // Pruning scans the book: only for an announcement that passed its check.
        if old.is_none() && self.entries.len() >= l.max_entries {
            self.prune();
            if self.entries.len() >= l.max_entries && !self.evict_for(ip) {
                self.log.warn("full", || {
                    format!("announcement book is full ({} entries)", l.max_entries)
                });
                return Err(BookError::Full(l.max_entries));
            }
        }
        self.replay.record(&verified);
        self.remove_key(&key);
        bump(&mut self.per_peer, key.0.clone(), true);
        if let Some(s) = sender {
            bump(&mut self.per_sender, s, true);
        }
        if let Some(i) = ip {
            bump(&mut self.per_ip, i, true);
        }
        self.entries.insert(
            key,
            Entry {
                digest: blake3::hash(
                    &[verified.model_id.as_bytes(), &verified.peer.0[..]].concat(),
                )
                .into(),
                group: group_of(&verified, origin),
                ann: verified,
                sender,
                ip,
            },
        );
        Ok(())
    }

    /// Moves the entry of `key` to `origin`'s sender and address, its counts with it.
    fn rehome(&mut self, key: &(PeerIdBytes, ModelId), origin: Origin) {
        let Origin::Published(s, ip) = origin else {
            return;
        };
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let (old_sender, old_ip) = (e.sender.replace(s), std::mem::replace(&mut e.ip, ip));
        e.group = group_of(&e.ann, origin);
        if let Some(o) = old_sender {
            bump(&mut self.per_sender, o, false);
        }
        if let Some(o) = old_ip {
            bump(&mut self.per_ip, o, false);
        }
        bump(&mut self.per_sender, s, true);
        if let Some(i) = ip {
            bump(&mut self.per_ip, i, true);
        }
    }

    /// Makes room in a full book for a new entry from address `ip`: drops the entry
    /// nearest its expiry of the address holding the most, where that holds at least
    /// two more than `ip` does. Addresses that flood the book fill it, but an entry from
    /// another address still gets in, and floods only displace each other (an address
    /// at the top can never push out one below it, nor two at the top each other).
    /// Entries with no address (this node's own, gathered ones) make no room. Whether
    /// an entry was dropped.
    fn evict_for(&mut self, ip: Option<IpAddr>) -> bool {
        let Some(ip) = ip else {
            return false;
        };
        let mine = self.per_ip.get(&ip).copied().unwrap_or(0);
        let Some((&top, &most)) = self.per_ip.iter().max_by_key(|(_, n)| **n) else {
            return false;
        };
        if most < mine.saturating_add(2) {
            return false;
        }
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.ip == Some(top))
            .min_by_key(|(_, e)| e.ann.expires_at_ms)
            .map(|(k, _)| k.clone());
        let Some(victim) = victim else {
            return false;
        };
        self.remove_key(&victim);
        self.log.warn("evict", || {
            format!(
                "announcement book is full: dropped one of {most} entries from {top} for one from {ip}"
            )
        });
        true
    }

    fn forget_counts(&mut self, key: &(PeerIdBytes, ModelId), e: &Entry) {
        bump(&mut self.per_peer, key.0.clone(), false);
        if let Some(s) = e.sender {
            bump(&mut self.per_sender, s, false);
        }
        if let Some(i) = e.ip {
            bump(&mut self.per_ip, i, false);
        }
    }

    fn remove_key(&mut self, key: &(PeerIdBytes, ModelId)) {
        if let Some(e) = self.entries.remove(key) {
            self.forget_counts(key, &e);
        }
    }

    fn remove_where(&mut self, gone: impl Fn(&(PeerIdBytes, ModelId), &Entry) -> bool) {
        let keys: Vec<_> = self
            .entries
            .iter()
            .filter(|(k, e)| gone(k, e))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.remove_key(&k);
        }
    }

    /// Drops expired announcements.
    pub fn prune(&mut self) {
        let now = now_ms();
        self.remove_where(|_, e| e.ann.expires_at_ms <= now);
        self.replay.prune(now);
        let l = self.limits;
        let at = Instant::now();
        self.peer_rate
            .retain(|_, b| !b.is_full(at, l.publish_burst, l.publish_per_s));
        self.ip_rate
            .retain(|_, b| !b.is_full(at, l.ip_publish_burst, l.ip_publish_per_s));
        self.list_rate
            .retain(|_, b| !b.is_full(at, LIST_BURST, LIST_PER_S));
        self.list_ip_rate
            .retain(|_, b| !b.is_full(at, LIST_IP_BURST, LIST_IP_PER_S));
    }

    /// Drops every announcement of `peer` (it said goodbye).
    pub fn remove_peer(&mut self, peer: &PeerId) {
        let bytes = PeerIdBytes(peer.to_bytes());
        self.remove_where(|(p, _), _| *p == bytes);
    }

    /// Unexpired announcements, of one model or all.
    pub fn list(&self, model: Option<&ModelId>) -> Vec<VerifiedAnnouncement> {
        let now = now_ms();
        let mut out: Vec<_> = self
            .entries
            .values()
            .map(|e| &e.ann)
            .filter(|a| a.expires_at_ms > now)
            .filter(|a| model.is_none_or(|m| a.model_id == *m))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            (a.model_id.as_bytes(), a.blocks.start(), &a.peer.0).cmp(&(
                b.model_id.as_bytes(),
                b.blocks.start(),
                &b.peer.0,
            ))
        });
        out
    }

    /// One page of the book's list in the order `order` keys ([`ListCursor`]: by model,
    /// then by rank among the announcements that came from the same address, or the same
    /// sender where there is none, then by place, a hash of the peer id keyed by
    /// `order`): the announcements after `after`, as many as fit `fits` (called with
    /// each in turn; at most [`pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS`]), and
    /// the cursor of the next page when more remain. However many announcements one
    /// address brings, every other address's first comes before its second, and none
    /// can choose its keys to come early: the asker's key is its own.
    pub fn page(
        &self,
        model: Option<&ModelId>,
        order: &[u8; 16],
        after: Option<&ListCursor>,
        mut fits: impl FnMut(&SignedAnnouncement) -> bool,
    ) -> (Vec<SignedAnnouncement>, Option<ListCursor>) {
        let now = now_ms();
        let key = blake3::derive_key("pollen book list order 2026-12-05", order);
        // References only: the page is cloned, never the book.
        let mut all: Vec<(u64, u64, &VerifiedAnnouncement)> = self
            .entries
            .values()
            .filter(|e| e.ann.expires_at_ms > now)
            .filter(|e| model.is_none_or(|m| e.ann.model_id == *m))
            // A model before the cursor's has no entry left to list (and its ranks are
            // its own).
            .filter(|e| after.is_none_or(|c| e.ann.model_id.as_bytes() >= c.model_id.as_bytes()))
            .map(|e| {
                let mut place = [0u8; 8];
                place.copy_from_slice(&blake3::keyed_hash(&key, &e.digest).as_bytes()[..8]);
                (e.group, u64::from_le_bytes(place), &e.ann)
            })
            .collect();
        // Ranks in place order within each group; an announcement's place in the list
        // is (model, rank, place, peer).
        all.sort_unstable_by(|a, b| (a.0, a.1, &a.2.peer.0).cmp(&(b.0, b.1, &b.2.peer.0)));
        type Key<'a> = (&'a [u8; 32], u32, u64, &'a [u8]);
        let after: Option<Key<'_>> =
            after.map(|c| (c.model_id.as_bytes(), c.rank, c.place, c.peer.0.as_slice()));
        let mut ranked: Vec<(Key<'_>, &VerifiedAnnouncement)> = Vec::with_capacity(all.len());
        let (mut rank, mut last) = (0u32, None);
        for (group, place, a) in &all {
            rank = if last == Some(*group) {
                rank.saturating_add(1)
            } else {
                0
            };
            last = Some(*group);
            let at = (a.model_id.as_bytes(), rank, *place, a.peer.0.as_slice());
            if after.is_none_or(|k| at > k) {
                ranked.push((at, a));
            }
        }
        // The smallest `MAX_LIST_ANNOUNCEMENTS + 1` past the cursor are picked in linear
        // time, then sorted.
        let max = pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS;
        if ranked.len() > max + 1 {
            ranked.select_nth_unstable_by(max, |a, b| a.0.cmp(&b.0));
            ranked.truncate(max + 1);
        }
        ranked.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut rest = ranked.into_iter().peekable();
        let mut page = Vec::new();
        let mut last = None;
        while let Some((_, a)) = rest.peek() {
            if page.len() >= max || !fits(a.signed()) {
                break;
            }
            if let Some(((_, rank, place, _), a)) = rest.next() {
                page.push(a.clone().into_signed());
                last = Some(ListCursor {
                    model_id: a.model_id,
                    rank,
                    place,
                    peer: a.peer.clone(),
                });
            }
        }
        let next = match (rest.peek(), last) {
            (Some(_), Some(last)) => Some(last),
            _ => None,
        };
        (page, next)
    }

    /// The unexpired announcement of `peer` for `model`, if held.
    pub fn get(&self, peer: &PeerId, model: &ModelId) -> Option<VerifiedAnnouncement> {
        let e = self.entries.get(&(PeerIdBytes(peer.to_bytes()), *model))?;
        (e.ann.expires_at_ms > now_ms()).then(|| e.ann.clone())
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use libp2p::identity::Keypair;
    use pollen_protocol::{Announcement, BlockRange};

    fn signed(key: &Keypair, model: u8, blocks: (u32, u32), seq: u64) -> SignedAnnouncement {
        let now = now_ms();
        let a = Announcement {
            peer: PeerIdBytes(key.public().to_peer_id().to_bytes()),
            model_id: ModelId::from_bytes([model; 32]),
            model_name: "test".into(),
            num_blocks: 30,
            blocks: BlockRange::new(blocks.0, blocks.1).unwrap(),
            throughput: 1e9,
            free_sessions: 4,
            free_cache_tokens: 8192,
            addrs: vec![],
            compute: "fast".into(),
            next_rtts: vec![],
            issued_at_ms: now,
            expires_at_ms: now + 60_000,
            seq,
        };
        let secret = crate::net::identity::ed25519_secret(key).unwrap();
        SignedAnnouncement::sign(a, &secret).unwrap()
    }

    fn connect(book: &mut AnnouncementBook, ip: &str) -> PeerId {
        let peer = PeerId::random();
        book.connected(peer, &format!("/ip4/{ip}/tcp/4001").parse().unwrap());
        peer
    }

    /// Registration flood: random model ids from one key over one connection.
    #[test]
    fn a_flood_of_model_ids_fills_only_its_own_share() {
        let limits = BookLimits {
            publish_burst: 100_000,
            ip_publish_burst: 100_000,
            ..BookLimits::default()
        };
        let mut book = AnnouncementBook::with_limits(limits);
        let attacker = connect(&mut book, "192.0.2.66");
        let key = Keypair::generate_ed25519();
        let accepted = (0..200u32)
            .filter(|i| {
                book.insert_from(&attacker, signed(&key, (*i % 250) as u8, (0, 10), 1))
                    .is_ok()
            })
            .count();
        assert_eq!(accepted, limits.per_peer);
        let err = book
            .insert_from(&attacker, signed(&key, 251, (0, 10), 1))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Busy);
        assert!(err.to_string().contains("for one peer"), "{err}");
        // A real server still gets in, and is listed.
        let server = connect(&mut book, "198.51.100.7");
        let real = Keypair::generate_ed25519();
        book.insert_from(&server, signed(&real, 1, (0, 30), 1))
            .unwrap();
        let listed = book.list(Some(&ModelId::from_bytes([1; 32])));
        assert!(
            listed
                .iter()
                .any(|a| a.peer == PeerIdBytes(real.public().to_peer_id().to_bytes()))
        );
    }

    /// Sybil announcements: fresh keys for one span, over one connection and then over
    /// many from one IP address.
    /// A book filled by a few addresses still takes servers from other addresses: each
    /// displaces an entry of the address holding the most, and the flooding addresses
    /// cannot displace those servers, nor each other.
    #[test]
    fn a_full_book_makes_room_for_other_addresses_not_for_its_floods() {
        let limits = BookLimits {
            max_entries: 64,
            per_ip: 32,
            per_sender: 64,
            publish_burst: 100_000,
            ip_publish_burst: 100_000,
            ..BookLimits::default()
        };
        let mut book = AnnouncementBook::with_limits(limits);
        let (a, b) = (
            connect(&mut book, "192.0.2.1"),
            connect(&mut book, "192.0.2.2"),
        );
        for from in [&a, &b] {
            for _ in 0..32 {
                let key = Keypair::generate_ed25519();
                book.insert_from(from, signed(&key, 1, (0, 10), 1)).unwrap();
            }
        }
        assert_eq!(book.len(), 64);
        // Real servers from their own addresses get in, one entry of a flood out each.
        let mut real = Vec::new();
        for i in 0..8 {
            let conn = connect(&mut book, &format!("198.51.100.{i}"));
            let key = Keypair::generate_ed25519();
            book.insert_from(&conn, signed(&key, 1, (10, 20), 1))
                .unwrap();
            real.push(key);
        }
        assert_eq!(book.len(), 64);
        // A flooding address with room under its own cap cannot take a place back:
        // the other flood holds at most one more.
        for from in [&a, &b] {
            let key = Keypair::generate_ed25519();
            assert!(matches!(
                book.insert_from(from, signed(&key, 1, (0, 10), 1)),
                Err(BookError::Full(64))
            ));
        }
        let listed = book.list(Some(&ModelId::from_bytes([1; 32])));
        for key in &real {
            let peer = PeerIdBytes(key.public().to_peer_id().to_bytes());
            assert!(
                listed.iter().any(|v| v.peer == peer),
                "a real server was pushed out"
            );
        }
        // Entries with no address (gathered) make no room.
        let key = Keypair::generate_ed25519();
        assert!(matches!(
            book.insert(signed(&key, 1, (0, 10), 1)),
            Err(BookError::Full(64))
        ));
    }

    #[test]
    fn an_ipv6_slash_64_is_one_share() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(share_of(a), share_of(b));
        assert_ne!(share_of(a), share_of(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(share_of(v4), v4);
        assert_eq!(share_of("::ffff:192.0.2.7".parse().unwrap()), v4);
        // Local networks' addresses are their own shares.
        for local in ["fe80::1", "fe80::2", "fd00::1", "::1"] {
            let ip: IpAddr = local.parse().unwrap();
            assert_eq!(share_of(ip), ip, "{local}");
        }
        let addr: Multiaddr = "/ip6/2001:db8:1:2::9/tcp/1".parse().unwrap();
        assert_eq!(ip_of(&addr), Some(share_of(a)));
    }

    #[test]
    fn sybils_from_one_sender_or_one_ip_cannot_crowd_out_real_servers() {
        let limits = BookLimits {
            publish_burst: 100_000,
            ip_publish_burst: 100_000,
            ..BookLimits::default()
        };
        let mut book = AnnouncementBook::with_limits(limits);
        let one = connect(&mut book, "192.0.2.66");
        let accepted = (0..1100)
            .filter(|_| {
                let key = Keypair::generate_ed25519();
                book.insert_from(&one, signed(&key, 1, (0, 10), 1)).is_ok()
            })
            .count();
        assert_eq!(accepted, limits.per_sender);
        // Past its share a sender is refused before any signature is checked: a forged
        // entry is refused as capped, not as badly signed.
        let mut forged = signed(&Keypair::generate_ed25519(), 1, (0, 10), 1);
        forged.signature[0] ^= 1;
        assert!(matches!(
            book.insert_from(&one, forged.clone()),
            Err(BookError::Capped { .. })
        ));
        // Within a share it is checked, and refused as such.
        let fresh = connect(&mut book, "198.51.100.200");
        assert!(matches!(
            book.insert_from(&fresh, forged),
            Err(BookError::Refused(AnnounceError::BadSignature { .. }))
        ));
        // Many connections from the same address: the IP's share.
        let mut from_ip = accepted;
        for _ in 0..40 {
            let conn = connect(&mut book, "192.0.2.66");
            for _ in 0..limits.per_sender {
                let key = Keypair::generate_ed25519();
                if book.insert_from(&conn, signed(&key, 1, (0, 10), 1)).is_ok() {
                    from_ip += 1;
                }
            }
        }
        assert_eq!(from_ip, limits.per_ip);
        assert!(book.len() <= limits.per_ip);
        // Real servers of the same span, from their own addresses, all get in and fit
        // in one list answer.
        for i in 0..100u8 {
            let conn = connect(&mut book, &format!("198.51.100.{i}"));
            book.insert_from(&conn, signed(&Keypair::generate_ed25519(), 1, (0, 10), 1))
                .unwrap();
        }
        let listed = book.list(Some(&ModelId::from_bytes([1; 32])));
        assert_eq!(listed.len(), limits.per_ip + 100);
        assert!(listed.len() <= pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS);
    }

    #[test]
    fn publishes_are_rate_limited_per_peer_and_renewals_still_fit() {
        let mut book = AnnouncementBook::default();
        let peer = connect(&mut book, "192.0.2.1");
        let key = Keypair::generate_ed25519();
        let limits = *book.limits();
        let mut ok = 0;
        let mut busy = 0;
        for seq in 1..=(limits.publish_burst as u64 + 10) {
            match book.insert_from(&peer, signed(&key, 1, (0, 10), seq)) {
                Ok(()) => ok += 1,
                Err(BookError::Capped {
                    cap: Cap::PeerRate, ..
                }) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, busy), (limits.publish_burst as usize, 10));
        // Another peer is not slowed by it.
        let other = connect(&mut book, "192.0.2.2");
        book.insert_from(&other, signed(&Keypair::generate_ed25519(), 1, (0, 10), 1))
            .unwrap();
    }

    #[test]
    fn a_sender_past_the_connection_table_is_refused_not_uncapped() {
        let mut book = AnnouncementBook::default();
        for i in 0..2 * MAX_BUCKETS {
            let [a, b] = u16::try_from(i).unwrap().to_be_bytes();
            connect(&mut book, &format!("10.0.{a}.{b}"));
        }
        let late = connect(&mut book, "192.0.2.9");
        let err = book
            .insert_from(&late, signed(&Keypair::generate_ed25519(), 1, (0, 10), 1))
            .unwrap_err();
        assert!(matches!(err, BookError::UntrackedSender), "{err}");
        assert_eq!(err.code(), ErrorCode::Busy);
        assert!(book.is_empty());
        // Nor is a sender whose connection closed before its request was answered.
        let mut fresh = AnnouncementBook::default();
        let gone = connect(&mut fresh, "198.51.100.1");
        fresh.disconnected(&gone);
        assert!(
            fresh
                .insert_from(&gone, signed(&Keypair::generate_ed25519(), 1, (0, 10), 1))
                .is_err()
        );
        // A tracked sender still gets in once a slot frees.
        let first = *book.conns.keys().next().unwrap();
        book.disconnected(&first);
        let now = connect(&mut book, "192.0.2.10");
        book.insert_from(&now, signed(&Keypair::generate_ed25519(), 1, (0, 10), 1))
            .unwrap();
    }

    #[test]
    fn a_refused_announcement_is_not_recorded_as_seen() {
        let limits = BookLimits {
            per_sender: 1,
            ..BookLimits::default()
        };
        let mut book = AnnouncementBook::with_limits(limits);
        let squatter = connect(&mut book, "192.0.2.1");
        book.insert_from(
            &squatter,
            signed(&Keypair::generate_ed25519(), 1, (0, 10), 1),
        )
        .unwrap();
        // Refused for the relay's cap...
        let key = Keypair::generate_ed25519();
        let a = signed(&key, 1, (10, 20), 1);
        assert!(book.insert_from(&squatter, a.clone()).is_err());
        // ...the same announcement is accepted later from its own server, not taken
        // for a replay.
        let own = connect(&mut book, "198.51.100.1");
        book.insert_from(&own, a).unwrap();
    }

    /// A server's own copy of an announcement another peer delivered first moves the
    /// entry to the server's sender and address (and so its rank group); another
    /// copy from anyone else is still a replay.
    #[test]
    fn a_server_s_own_copy_takes_back_what_a_forwarder_delivered_first() {
        let mut book = AnnouncementBook::default();
        let fwd = connect(&mut book, "192.0.2.7");
        let key = Keypair::generate_ed25519();
        let a = signed(&key, 1, (0, 10), 1);
        book.insert_from(&fwd, a.clone()).unwrap();
        assert_eq!(book.per_sender.get(&fwd), Some(&1));
        let own = key.public().to_peer_id();
        book.connected(own, &"/ip4/198.51.100.7/tcp/1".parse().unwrap());
        book.insert_from(&own, a.clone()).unwrap();
        assert_eq!(book.len(), 1);
        assert_eq!(book.per_sender.get(&fwd), None);
        assert_eq!(book.per_sender.get(&own), Some(&1));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(book.per_ip.get(&ip("192.0.2.7")), None);
        assert_eq!(book.per_ip.get(&ip("198.51.100.7")), Some(&1));
        assert!(book.insert_from(&fwd, a.clone()).is_err());
        assert!(
            book.insert_from(&own, a).is_err(),
            "a second own copy is a replay"
        );
    }

    #[test]
    fn a_book_longer_than_a_list_answer_is_read_in_pages() {
        let limits = BookLimits {
            per_sender: 100_000,
            per_ip: 100_000,
            publish_burst: 100_000,
            ip_publish_burst: 100_000,
            ..BookLimits::default()
        };
        let mut book = AnnouncementBook::with_limits(limits);
        let n = pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS + 300;
        for _ in 0..n {
            let key = Keypair::generate_ed25519();
            book.insert(signed(&key, 1, (0, 10), 1)).unwrap();
        }
        let model = ModelId::from_bytes([1; 32]);
        let order = [3; 16];
        let (first, next) = book.page(Some(&model), &order, None, |_| true);
        assert_eq!(first.len(), pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS);
        let next = next.unwrap();
        let (second, end) = book.page(Some(&model), &order, Some(&next), |_| true);
        assert_eq!((second.len(), end), (300, None));
        let all: Vec<_> = first.into_iter().chain(second).collect();
        let peers: std::collections::HashSet<_> =
            all.iter().map(|a| a.announcement.peer.clone()).collect();
        assert_eq!(peers.len(), n);
        // A size limit ends a page early; the next one picks up where it stopped.
        let mut left = 10;
        let (small, next) = book.page(Some(&model), &order, None, |_| {
            left -= 1;
            left >= 0
        });
        assert_eq!(small.len(), 10);
        let (after, _) = book.page(Some(&model), &order, next.as_ref(), |_| true);
        assert_eq!(after[0], all[10]);
    }

    /// Two list pages (all a gather reads from a bootstrap) of fakes, sent from eight
    /// addresses at their cap, and again from 2,048 IPv6 /64s of one /48, all announced
    /// at the first block, hide no server that published from an address of its own:
    /// each group's first announcement comes before any group's second. And the asker's
    /// key orders the rest: two keys, two orders.
    #[test]
    fn one_address_s_many_announcements_cannot_push_others_out_of_a_list() {
        let max = pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS;
        let per_ip = BookLimits::default().per_ip;
        let v4 = (0..8 * per_ip)
            .map(|i| format!("/ip4/198.51.100.{}/tcp/1", i / per_ip))
            .collect::<Vec<_>>();
        let v6 = (0..2 * max)
            .map(|i| format!("/ip6/2001:db8:7:{i:x}::1/tcp/1"))
            .collect::<Vec<_>>();
        for fakes in [v4, v6] {
            let mut book = AnnouncementBook::with_limits(BookLimits {
                publish_burst: 100_000,
                ip_publish_burst: 100_000,
                ..BookLimits::default()
            });
            for addr in &fakes {
                let key = Keypair::generate_ed25519();
                let sender = key.public().to_peer_id();
                book.connected(sender, &addr.parse().unwrap());
                book.insert_from(&sender, signed(&key, 1, (0, 30), 1))
                    .unwrap();
            }
            let mut honest = std::collections::HashSet::new();
            for h in 0..3u8 {
                let key = Keypair::generate_ed25519();
                let sender = key.public().to_peer_id();
                book.connected(
                    sender,
                    &format!("/ip4/203.0.113.{h}/tcp/1").parse().unwrap(),
                );
                let blocks = (10 * u32::from(h), 10 * u32::from(h) + 10);
                book.insert_from(&sender, signed(&key, 1, blocks, 1))
                    .unwrap();
                honest.insert(PeerIdBytes(sender.to_bytes()));
            }
            let model = ModelId::from_bytes([1; 32]);
            assert!(fakes.len() >= 2 * max, "the fakes alone fill two pages");
            let read = |order: &[u8; 16]| {
                let (first, next) = book.page(Some(&model), order, None, |_| true);
                let (second, _) = book.page(Some(&model), order, next.as_ref(), |_| true);
                first
                    .into_iter()
                    .chain(second)
                    .map(|a| a.announcement.peer)
                    .collect::<Vec<_>>()
            };
            let (a, b) = (read(&[1; 16]), read(&[2; 16]));
            assert_eq!(a.len(), 2 * max);
            for peers in [&a, &b] {
                let first: std::collections::HashSet<_> = peers[..11].iter().cloned().collect();
                assert!(honest.is_subset(&first), "every group's first entry leads");
            }
            assert_ne!(a, b, "another key, another order");
        }
    }

    /// Pages through groups of many ranks and two models list every announcement once,
    /// in order; a cursor past the end lists none.
    #[test]
    fn pages_across_ranks_and_models_list_each_announcement_once() {
        let mut book = AnnouncementBook::with_limits(BookLimits {
            publish_burst: 100_000,
            ip_publish_burst: 100_000,
            ..BookLimits::default()
        });
        let mut all = std::collections::HashSet::new();
        for i in 0..1_500u32 {
            let key = Keypair::generate_ed25519();
            let sender = key.public().to_peer_id();
            let addr = format!("/ip4/198.51.100.{}/tcp/1", i % 7);
            book.connected(sender, &addr.parse().unwrap());
            let model = 1 + (i % 2) as u8;
            book.insert_from(&sender, signed(&key, model, (0, 30), 1))
                .unwrap();
            all.insert((PeerIdBytes(sender.to_bytes()), model));
        }
        let order = [9; 16];
        let mut seen = std::collections::HashSet::new();
        let mut after = None;
        let mut last = None;
        loop {
            let (page, next) = book.page(None, &order, after.as_ref(), |_| true);
            for a in &page {
                let m = a.announcement.model_id.as_bytes()[0];
                assert!(
                    seen.insert((a.announcement.peer.clone(), m)),
                    "listed twice"
                );
            }
            if let (Some(prev), Some(n)) = (&last, &next) {
                assert!(n > prev, "cursors only move on");
            }
            last = next.clone();
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, all);
        let end = ListCursor {
            model_id: ModelId::from_bytes([0xff; 32]),
            rank: u32::MAX,
            place: u64::MAX,
            peer: PeerIdBytes(vec![0xff; 38]),
        };
        assert_eq!(
            book.page(None, &order, Some(&end), |_| true),
            (vec![], None)
        );
    }

    #[test]
    fn counts_follow_renewals_and_removals() {
        let mut book = AnnouncementBook::with_limits(BookLimits {
            per_sender: 2,
            ..BookLimits::default()
        });
        let p = connect(&mut book, "192.0.2.1");
        let key = Keypair::generate_ed25519();
        for seq in 1..=5 {
            book.insert_from(&p, signed(&key, 1, (0, 10), seq)).unwrap();
        }
        assert_eq!(book.len(), 1);
        book.insert_from(&p, signed(&key, 2, (0, 10), 1)).unwrap();
        assert!(book.insert_from(&p, signed(&key, 3, (0, 10), 1)).is_err());
        book.remove_peer(&key.public().to_peer_id());
        assert!(book.is_empty());
        book.insert_from(&p, signed(&key, 3, (0, 10), 2)).unwrap();
    }

    /// A peer answering a gather with many validly signed sybils fills only the share
    /// it was given, and keeps it filled across gathers; another source still gets in.
    #[test]
    fn gathered_sybils_fill_only_their_sources_share() {
        let mut book = AnnouncementBook::default();
        let hostile = PeerId::random();
        let stored = (0..300)
            .filter(|_| {
                let sybil = Keypair::generate_ed25519();
                book.insert_gathered(&hostile, signed(&sybil, 1, (0, 10), 1), 64)
                    .is_ok()
            })
            .count();
        assert_eq!(stored, 64);
        assert_eq!(book.len(), 64);
        // A later gather from the same source adds nothing new...
        let sybil = Keypair::generate_ed25519();
        let err = book
            .insert_gathered(&hostile, signed(&sybil, 1, (0, 10), 1), 64)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Busy);
        // ...while an honest source's announcements, and renewals, are stored.
        let honest = PeerId::random();
        let server = Keypair::generate_ed25519();
        book.insert_gathered(&honest, signed(&server, 1, (10, 20), 1), 64)
            .unwrap();
        book.insert_gathered(&honest, signed(&server, 1, (10, 20), 2), 64)
            .unwrap();
        assert_eq!(book.len(), 65);
    }

    #[test]
    fn list_requests_are_rate_limited_per_peer_and_per_address() {
        let mut book = AnnouncementBook::default();
        let greedy = PeerId::random();
        let granted = (0..100).filter(|_| book.take_list(&greedy)).count();
        assert_eq!(granted, LIST_BURST as usize);
        // Another peer is not held up by the first one's empty bucket.
        assert!(book.take_list(&PeerId::random()));
        // Fresh peer ids of one address share its bucket...
        let addr: Multiaddr = "/ip4/198.51.100.9/tcp/1".parse().unwrap();
        let mut granted = 0;
        for _ in 0..20 {
            let sybil = PeerId::random();
            book.connected(sybil, &addr);
            granted += (0..LIST_BURST).filter(|_| book.take_list(&sybil)).count();
        }
        assert_eq!(granted, LIST_IP_BURST as usize);
        // So do peers of one IPv6 /48, each from a /64 of its own.
        let mut granted = 0;
        for i in 0..20 {
            let sybil = PeerId::random();
            book.connected(
                sybil,
                &format!("/ip6/2001:db8:5:{i:x}::1/tcp/1").parse().unwrap(),
            );
            granted += (0..LIST_BURST).filter(|_| book.take_list(&sybil)).count();
        }
        assert_eq!(granted, LIST_IP_BURST as usize);
        // ...and another address has its own.
        let other = PeerId::random();
        book.connected(other, &"/ip4/203.0.113.9/tcp/1".parse().unwrap());
        assert!(book.take_list(&other));
    }
}
