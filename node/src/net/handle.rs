//! The cloneable handle through which the rest of the node talks to the task that owns
//! the swarm: commands with `oneshot` replies, each bounded by a timeout.

use super::error::{NetError, NetResult};
use futures::StreamExt;
use libp2p::request_response::OutboundFailure;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, INFER_PROTOCOL, ModelId, SignedAnnouncement,
    VerifiedAnnouncement,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a command to the swarm task may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one peer may take to answer a `List` while gathering: a peer that hangs
/// must not hold up discovery (or a server's renewal) for the request timeout.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most pages of announcements read from one peer in a gather; in practice a peer's
/// share of our book ([`super::event_loop`] decides it) ends the reading first.
const MAX_LIST_PAGES: usize = 16;
/// How long one peer may take for all its pages in a gather: a peer answering each page
/// just within [`GATHER_TIMEOUT`] holds a gather up this long, not 16 times that.
const LIST_TIMEOUT: Duration = Duration::from_secs(4);
/// Times a list page refused as busy is asked again (after 250 ms, then 500 ms, then
/// 1 s), within [`LIST_TIMEOUT`].
const LIST_BUSY_RETRIES: u32 = 3;
/// How long a whole gather may take: every provider has its own bounds (connecting,
/// [`LIST_TIMEOUT`]), but a few hundred slow ones asked [`PEERS_ASKED_AT_ONCE`] at a time
/// would add theirs up. What was gathered by then is in the book.
const GATHER_TOTAL: Duration = Duration::from_secs(15);
/// Most bytes of announcements one gather stores, from all peers together.
const MAX_GATHER_BYTES: usize = 16 * 1024 * 1024;

/// How long a session open waits for hole punching to turn a relayed connection into
/// a direct one before it runs through the relay.
const HOLE_PUNCH_GRACE: Duration = Duration::from_secs(3);
/// How long the answer to a DHT lookup of a model's providers may take: the lookup's
/// own deadline (it then answers with what it found), and a margin.
const PROVIDERS_TIMEOUT: Duration =
    Duration::from_secs(super::event_loop::PROVIDERS_EMPTY_DEADLINE.as_secs() + 2);
/// Most providers found in the DHT that one gather connects to and asks (a model's
/// servers, in a swarm of thousands; a lookup collects at most 256).
const MAX_PROVIDERS_ASKED: usize = 256;
/// Most peers a gather connects to or asks at once.
const PEERS_ASKED_AT_ONCE: usize = 64;
/// How long a gather waits for a connection to a provider found in the DHT.
const PROVIDER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How this node reaches a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A direct connection (the peer is public, or hole punching succeeded).
    Direct,
    /// Only through a relay: every byte takes an extra hop.
    Relayed,
}

/// Whether this node can be dialed from the internet, as AutoNAT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Not known yet (or this node does not listen).
    Unknown,
    /// A peer dialed one of our addresses back.
    Public,
    /// Dial-backs failed: this node is behind NAT and reserves relay slots.
    Private,
}

/// A connected peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its id.
    pub peer: PeerId,
    /// Last measured round-trip time on the connection in use (through the relay when
    /// relayed, so routing counts a relayed hop's extra latency).
    pub rtt: Option<Duration>,
    /// Agent string from identify.
    pub agent: Option<String>,
    /// Direct or relayed.
    pub path: Path,
    /// An entry point: a peer this node dialed by address (a bootstrap) or found by
    /// mDNS, which it publishes to and gathers from.
    pub entry: bool,
}

/// What the swarm task is asked to do.
pub(super) enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<NetResult<PeerId>>,
    },
    /// Learn addresses of `peer`, and dial it when `connect` is set.
    AddAddrs {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        connect: bool,
        done: oneshot::Sender<()>,
    },
    Announce {
        peer: PeerId,
        request: AnnounceRequest,
        reply: oneshot::Sender<Result<AnnounceResponse, OutboundFailure>>,
    },
    /// How many entries of our book a gather may take from `peer`.
    GatherShare {
        peer: PeerId,
        reply: oneshot::Sender<usize>,
    },
    /// Announcements gathered from `source`'s list, to store within its share.
    StoreGathered {
        source: PeerId,
        list: Vec<SignedAnnouncement>,
        reply: oneshot::Sender<usize>,
    },
    SetOwn {
        announcement: Option<SignedAnnouncement>,
        /// Answered once every publish target has acknowledged (or failed).
        done: Option<oneshot::Sender<()>>,
    },
    Book {
        model: Option<ModelId>,
        reply: oneshot::Sender<Vec<VerifiedAnnouncement>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Refusals {
        reply: oneshot::Sender<Vec<(PeerId, String)>>,
    },
    /// Connect to `peer` (by the addresses known for it) unless connected.
    Connect {
        peer: PeerId,
        reply: oneshot::Sender<NetResult<Path>>,
    },
    /// The best path to `peer`, and whether a hole punch is still under way.
    PathOf {
        peer: PeerId,
        reply: oneshot::Sender<(Option<Path>, bool)>,
    },
    /// Add `peer` to (or take it off) the block list; blocking disconnects it.
    Block { peer: PeerId, blocked: bool },
    /// Add `peer` to (or take it off) the allowlist, where there is one.
    Allow {
        peer: PeerId,
        allowed: bool,
        reply: oneshot::Sender<bool>,
    },
    /// Look up the providers of `model` in the DHT.
    Providers {
        model: ModelId,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Reachability {
        reply: oneshot::Sender<Reachability>,
    },
    MakeEntry {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
}

/// Message counters of one node, for measuring what discovery and sessions cost.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Announcement requests received.
    pub announce_in: AtomicU64,
    /// Announcement requests sent.
    pub announce_out: AtomicU64,
    /// Session frames received.
    pub frames_in: AtomicU64,
    /// Session frames sent.
    pub frames_out: AtomicU64,
    /// Bytes of session frames received (length prefixes included).
    pub bytes_in: AtomicU64,
    /// Bytes of session frames sent (length prefixes included).
    pub bytes_out: AtomicU64,
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punch_ok: AtomicU64,
    /// Hole punches that failed (the connection stays relayed).
    pub hole_punch_failed: AtomicU64,
    /// DHT requests this node's provider lookups sent.
    pub dht_lookup_requests: AtomicU64,
    /// DHT requests received (lookups, provider records, routing).
    pub dht_requests_in: AtomicU64,
    /// Of those, requests for the nodes nearest a key (routing, bootstrap and the
    /// first phase of publishing a provider record).
    pub dht_find_node_in: AtomicU64,
    /// Of those, provider lookups.
    pub dht_get_providers_in: AtomicU64,
    /// Of those, provider records stored.
    pub dht_add_provider_in: AtomicU64,
    /// Bytes of list answers being sent now (refused as busy past
    /// [`super::publish::LIST_BYTES_IN_FLIGHT`], or two pages to one IP address).
    pub list_bytes_in_flight: AtomicU64,
}

impl NetStats {
    /// Announcement messages sent and received so far.
    pub fn announce_messages(&self) -> u64 {
        self.announce_in.load(Ordering::Relaxed) + self.announce_out.load(Ordering::Relaxed)
    }
}

/// A cloneable handle to the task that owns the swarm.
#[derive(Clone)]
pub struct NetHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) peer_id: PeerId,
    pub(super) stats: Arc<NetStats>,
    pub(super) control: libp2p_stream::Control,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl NetHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// This node's message counters.
    pub fn stats(&self) -> &Arc<NetStats> {
        &self.stats
    }

    async fn send(&self, cmd: Command) -> NetResult<()> {
        self.tx.send(cmd).await.map_err(|_| NetError::Stopped)
    }

    async fn call<T>(
        &self,
        what: &str,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
        timeout: Duration,
    ) -> NetResult<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| NetError::Timeout {
                what: what.to_string(),
                after: timeout,
            })?
            .map_err(|_| NetError::Stopped)
    }

    /// Dials `addr` once; the peer id on success.
    pub async fn dial(&self, addr: Multiaddr) -> NetResult<PeerId> {
        let what = format!("dialing {addr}");
        self.call(
            &what,
            |reply| Command::Dial { addr, reply },
            COMMAND_TIMEOUT,
        )
        .await?
    }

    /// Dials `addr`, retrying with exponential backoff for up to `patience`.
    pub async fn dial_with_retry(&self, addr: &Multiaddr, patience: Duration) -> NetResult<PeerId> {
        let started = tokio::time::Instant::now();
        let deadline = started + patience;
        let mut delay = Duration::from_millis(200);
        loop {
            let e = match self.dial(addr.clone()).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            // Another peer answers there: asking again would meet it again.
            if let NetError::Dial { source, .. } = &e
                && let libp2p::swarm::DialError::WrongPeerId { obtained, .. } = source.as_ref()
            {
                return Err(NetError::WrongPeer {
                    addr: addr.clone(),
                    answered: *obtained,
                });
            }
            if tokio::time::Instant::now() + delay >= deadline {
                // How long it was tried (the next wait would have passed the patience),
                // in tenths of a second.
                let tried = Duration::from_millis(started.elapsed().as_millis() as u64 / 100 * 100);
                return Err(NetError::GaveUp {
                    addr: addr.clone(),
                    tried,
                    last: Box::new(e),
                });
            }
            tracing::warn!("{e}; retrying in {delay:?}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Remembers `addrs` for `peer`; dials it too when `connect` is set (so that ping
    /// measures its round-trip time).
    pub async fn add_addresses(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        connect: bool,
    ) -> NetResult<()> {
        self.call(
            "adding addresses",
            |done| Command::AddAddrs {
                peer,
                addrs,
                connect,
                done,
            },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Opens a session stream (`/pollen/infer/6`) to `peer`, dialing `addrs` if not
    /// connected, within `timeout`.
    pub async fn open_session_stream(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        timeout: Duration,
    ) -> NetResult<libp2p::Stream> {
        // The stream behaviour dials by peer id; the addresses must be known first.
        if !addrs.is_empty() {
            self.add_addresses(peer, addrs, false).await?;
        }
        // Connect first: where the only way in is a relay, hole punching gets a moment
        // to make a direct connection (the relayed one is then closed), so the session
        // runs direct wherever the NATs allow.
        let start = tokio::time::Instant::now();
        if let Ok(Ok(Path::Relayed)) = tokio::time::timeout(timeout, self.connect(peer)).await {
            let grace = start + HOLE_PUNCH_GRACE.min(timeout / 2);
            while tokio::time::Instant::now() < grace {
                match self.path(peer).await? {
                    (Some(Path::Relayed), true) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
        let timeout = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        let mut control = self.control.clone();
        tokio::time::timeout(
            timeout,
            control.open_stream(peer, StreamProtocol::new(INFER_PROTOCOL)),
        )
        .await
        .map_err(|_| NetError::Timeout {
            what: format!("opening a session stream to {peer}"),
            after: timeout,
        })?
        .map_err(|source| NetError::OpenStream { peer, source })
    }

    /// Inbound session streams; only one caller may accept them.
    pub fn accept_session_streams(&self) -> NetResult<libp2p_stream::IncomingStreams> {
        self.control
            .clone()
            .accept(StreamProtocol::new(INFER_PROTOCOL))
            .map_err(|e| NetError::Setup {
                what: "accepting session streams".into(),
                reason: e.to_string(),
            })
    }

    /// Sends an announcement request to `peer` (answered locally when `peer` is us).
    pub async fn announce(
        &self,
        peer: PeerId,
        request: AnnounceRequest,
    ) -> NetResult<AnnounceResponse> {
        self.call(
            &format!("announce request to {peer}"),
            |reply| Command::Announce {
                peer,
                request,
                reply,
            },
            COMMAND_TIMEOUT,
        )
        .await?
        .map_err(|source| NetError::Request {
            protocol: "announce",
            peer,
            source,
        })
    }

    /// Sets (or withdraws) this node's own announcement and publishes it to its targets.
    pub async fn set_own_announcement(
        &self,
        announcement: Option<SignedAnnouncement>,
    ) -> NetResult<()> {
        self.send(Command::SetOwn {
            announcement,
            done: None,
        })
        .await
    }

    /// Like [`Self::set_own_announcement`], then waits (at most `timeout`) until every
    /// connected publish target has answered: a server withdraws before exiting by
    /// publishing a short-lived goodbye this way. Whether all answered. (`None` only
    /// forgets our announcement here: nothing is sent, and peers keep it until it
    /// expires.)
    pub async fn set_own_announcement_and_wait(
        &self,
        announcement: Option<SignedAnnouncement>,
        timeout: Duration,
    ) -> NetResult<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::SetOwn {
            announcement,
            done: Some(tx),
        })
        .await?;
        Ok(matches!(
            tokio::time::timeout(timeout, rx).await,
            Ok(Ok(()))
        ))
    }

    /// The verified announcements this node holds.
    pub async fn book(&self, model: Option<ModelId>) -> NetResult<Vec<VerifiedAnnouncement>> {
        self.call(
            "reading the book",
            |reply| Command::Book { model, reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Connected peers with their round-trip times.
    pub async fn peers(&self) -> NetResult<Vec<PeerInfo>> {
        self.call(
            "listing peers",
            |reply| Command::Peers { reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Addresses this node listens on.
    pub async fn listen_addrs(&self) -> NetResult<Vec<Multiaddr>> {
        self.call(
            "listing addresses",
            |reply| Command::ListenAddrs { reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Peers refused (or refusing us) at the version handshake, with the reason.
    pub async fn refusals(&self) -> NetResult<Vec<(PeerId, String)>> {
        self.call(
            "listing refusals",
            |reply| Command::Refusals { reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Connects to `peer` by the addresses known for it, unless connected; the path.
    pub async fn connect(&self, peer: PeerId) -> NetResult<Path> {
        self.call(
            &format!("connecting to {peer}"),
            |reply| Command::Connect { peer, reply },
            COMMAND_TIMEOUT,
        )
        .await?
    }

    /// The best path to `peer` (`None` when not connected), and whether hole punching
    /// on a relayed connection to it is still under way.
    pub async fn path(&self, peer: PeerId) -> NetResult<(Option<Path>, bool)> {
        self.call(
            "reading a path",
            |reply| Command::PathOf { peer, reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Refuses every connection from and to `peer` (and closes those open), until
    /// [`Self::unblock_peer`].
    pub async fn block_peer(&self, peer: PeerId) -> NetResult<()> {
        self.send(Command::Block {
            peer,
            blocked: true,
        })
        .await
    }

    /// Takes `peer` off the block list.
    pub async fn unblock_peer(&self, peer: PeerId) -> NetResult<()> {
        self.send(Command::Block {
            peer,
            blocked: false,
        })
        .await
    }

    /// Allows `peer` to connect, where the node has an allowlist
    /// ([`super::NetConfig::allow_peers`]); `false` when it has none (everyone may).
    pub async fn allow_peer(&self, peer: PeerId) -> NetResult<bool> {
        self.call(
            "allowing a peer",
            |reply| Command::Allow {
                peer,
                allowed: true,
                reply,
            },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Takes `peer` off the allowlist (and disconnects it); `false` without one.
    pub async fn disallow_peer(&self, peer: PeerId) -> NetResult<bool> {
        self.call(
            "disallowing a peer",
            |reply| Command::Allow {
                peer,
                allowed: false,
                reply,
            },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// The servers of `model` the DHT knows (provider records): what one lookup
    /// found by its deadline, at most 256; empty when it found none.
    pub async fn providers(&self, model: ModelId) -> NetResult<Vec<PeerId>> {
        match self
            .call(
                "looking up providers",
                |reply| Command::Providers { model, reply },
                PROVIDERS_TIMEOUT,
            )
            .await
        {
            Ok(p) => Ok(p),
            Err(NetError::Timeout { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether this node is publicly reachable, as AutoNAT found.
    pub async fn reachability(&self) -> NetResult<Reachability> {
        self.call(
            "reading reachability",
            |reply| Command::Reachability { reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Makes connected `peer` an entry point (one this node publishes its announcement
    /// to, at once, and gathers from) without dialing it: a bootstrap that dialed us
    /// first. Whether `peer` is connected.
    pub async fn make_entry(&self, peer: PeerId) -> NetResult<bool> {
        self.call(
            "making an entry point",
            |reply| Command::MakeEntry { peer, reply },
            COMMAND_TIMEOUT,
        )
        .await
    }

    /// Waits until the node listens on at least `count` addresses (or `timeout` passes).
    pub async fn wait_listening(
        &self,
        count: usize,
        timeout: Duration,
    ) -> NetResult<Vec<Multiaddr>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let addrs = self.listen_addrs().await?;
            if addrs.len() >= count || tokio::time::Instant::now() >= deadline {
                return Ok(addrs);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks peers for their announcements (of `model` or all): for a model, the entry
    /// points (bootstraps, mDNS peers) and the servers of it that the DHT's provider
    /// records name, connecting to them (at most 256); every connected peer when no
    /// model is given or the DHT names none. Stores the valid ones (each checked
    /// against its signature, within each peer's share) and returns the node's whole
    /// book.
    pub async fn gather(&self, model: Option<ModelId>) -> NetResult<Vec<VerifiedAnnouncement>> {
        self.gather_skipping(model, |_| false).await
    }

    /// Like [`Self::gather`], without asking the peers `skip` names (banned ones, say,
    /// which may not answer at all).
    pub async fn gather_skipping(
        &self,
        model: Option<ModelId>,
        skip: impl Fn(&PeerId) -> bool,
    ) -> NetResult<Vec<VerifiedAnnouncement>> {
        // Whom to ask: for one model, the entry points (bootstraps, mDNS peers) and the
        // servers of the model the DHT knows (found from any peer we know), connected
        // to on the way; every connected peer only when the DHT names none (a swarm
        // too young for provider records, or no model given). Asking every connected
        // peer does not scale: a lookup leaves a node connected to many.
        let connected_peers: Vec<PeerInfo> = self
            .peers()
            .await?
            .into_iter()
            .filter(|p| !skip(&p.peer))
            .collect();
        let found = match model {
            Some(m) => self.providers(m).await.unwrap_or_default(),
            None => Vec::new(),
        };
        let mut peers: Vec<PeerId> = connected_peers
            .iter()
            .filter(|p| found.is_empty() || p.entry || found.contains(&p.peer))
            .map(|p| p.peer)
            .collect();
        let connected = peers.len();
        let fresh: Vec<PeerId> = found
            .into_iter()
            .filter(|p| *p != self.peer_id && !skip(p) && !peers.contains(p))
            .take(MAX_PROVIDERS_ASKED)
            .collect();
        peers.extend(fresh);
        // Each peer fills at most its share of our book (a bootstrap a page or two, any
        // other peer what one sender may hold), and all of them at most
        // MAX_GATHER_BYTES: one peer answering with pages of validly signed sybils
        // cannot fill the book. Each provider is connected to and asked in one go, so
        // a slow one holds up only itself.
        let budget = std::sync::atomic::AtomicUsize::new(MAX_GATHER_BYTES);
        let asks: Vec<_> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let peer = *p;
                let budget = &budget;
                async move {
                    if i >= connected {
                        tokio::time::timeout(PROVIDER_CONNECT_TIMEOUT, self.connect(peer))
                            .await
                            .unwrap_or_else(|_| {
                                Err(NetError::Timeout {
                                    what: format!("connecting to provider {peer}"),
                                    after: PROVIDER_CONNECT_TIMEOUT,
                                })
                            })?;
                    }
                    let share = self
                        .call(
                            "asking a gather share",
                            |reply| Command::GatherShare { peer, reply },
                            COMMAND_TIMEOUT,
                        )
                        .await?;
                    let list = self.list_pages(peer, model, share).await?;
                    let list = within_budget(list, budget);
                    let stored = self
                        .call(
                            "storing gathered announcements",
                            |reply| Command::StoreGathered {
                                source: peer,
                                list,
                                reply,
                            },
                            COMMAND_TIMEOUT,
                        )
                        .await;
                    stored.map(|n| (peer, n))
                }
            })
            .collect();
        let results = ask_within(asks, PEERS_ASKED_AT_ONCE, GATHER_TOTAL).await;
        for r in results {
            match r {
                Ok((peer, n)) => tracing::debug!("gathered {n} new announcements from {peer}"),
                Err(e) => tracing::debug!("gathering: {e}"),
            }
        }
        self.book(model).await
    }

    /// The announcements `peer` holds (of `model` or all), at most `share` of them, read
    /// in pages of at most [`pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS`], at most
    /// [`MAX_LIST_PAGES`] pages, each within [`GATHER_TIMEOUT`] and all within
    /// [`LIST_TIMEOUT`]; as one list. An answer that is not a page (a refusal), an empty
    /// page or the end of that time ends it with what was read.
    async fn list_pages(
        &self,
        peer: PeerId,
        model: Option<ModelId>,
        share: usize,
    ) -> NetResult<Vec<SignedAnnouncement>> {
        // One key of the list's order for all its pages, drawn here: no announcer knows
        // where its entries come.
        let order: [u8; 16] = rand::random();
        read_pages(peer, share, |after| {
            self.announce(
                peer,
                AnnounceRequest::ListPage {
                    model_id: model,
                    order,
                    after,
                },
            )
        })
        .await
    }
}

/// Runs `asks`, at most `at_once` at a time, until every one has ended or `total` has
/// passed; the outputs of those that ended (the rest are dropped).
async fn ask_within<F: std::future::Future>(
    asks: Vec<F>,
    at_once: usize,
    total: Duration,
) -> Vec<F::Output> {
    let deadline = tokio::time::Instant::now() + total;
    let mut running = futures::stream::iter(asks).buffer_unordered(at_once);
    let mut done = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, running.next()).await {
            Ok(Some(out)) => done.push(out),
            Ok(None) => break,
            Err(_) => {
                tracing::debug!("gathering: stopped waiting for providers after {total:?}");
                break;
            }
        }
    }
    done
}

/// [`NetHandle::list_pages`] with `ask` asking `peer` for the page after a cursor.
async fn read_pages<F, Fut>(
    peer: PeerId,
    share: usize,
    mut ask: F,
) -> NetResult<Vec<SignedAnnouncement>>
where
    F: FnMut(Option<pollen_protocol::ListCursor>) -> Fut,
    Fut: std::future::Future<Output = NetResult<AnnounceResponse>>,
{
    let mut all = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut after = None;
    let deadline = tokio::time::Instant::now() + LIST_TIMEOUT;
    // A page refused as busy (the peer's list answers in flight are at their cap) is
    // asked again after a pause, within the deadline.
    let mut busy = 0u32;
    let mut page = 0;
    while page < MAX_LIST_PAGES {
        if all.len() >= share {
            break;
        }
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(GATHER_TIMEOUT);
        if wait.is_zero() && page > 0 {
            break;
        }
        let ask = ask(after.clone());
        let answer = match tokio::time::timeout(wait, ask).await {
            Ok(Ok(answer)) => answer,
            // A failed page after some: what was read counts.
            Ok(Err(_)) if page > 0 => break,
            Ok(Err(e)) => return Err(e),
            // Out of time after some pages: what was read counts.
            Err(_) if page > 0 => break,
            Err(_) => {
                return Err(NetError::Timeout {
                    what: format!("list request to {peer}"),
                    after: wait,
                });
            }
        };
        if let AnnounceResponse::Refused(e) = &answer
            && e.code == pollen_protocol::ErrorCode::Busy
            && busy < LIST_BUSY_RETRIES
        {
            let pause = Duration::from_millis(250 << busy);
            busy += 1;
            if tokio::time::Instant::now() + pause < deadline {
                tracing::debug!("{peer} is busy answering lists; asking again in {pause:?}");
                tokio::time::sleep(pause).await;
                continue;
            }
        }
        page += 1;
        match answer {
            AnnounceResponse::Page { list, next } => {
                if list.is_empty() {
                    break;
                }
                // An announcement listed again (its rank moved between pages) takes no
                // second place in the share.
                all.extend(list.into_iter().filter(|a| {
                    seen.insert((a.announcement.peer.clone(), a.announcement.model_id))
                }));
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            AnnounceResponse::List(list) => {
                all.extend(list);
                break;
            }
            other => {
                tracing::debug!("{peer} answered a list request with {other:?}");
                break;
            }
        }
    }
    all.truncate(share);
    Ok(all)
}

/// The head of `list` that fits what is left of `budget` (bytes), taken from it.
fn within_budget(
    mut list: Vec<SignedAnnouncement>,
    budget: &std::sync::atomic::AtomicUsize,
) -> Vec<SignedAnnouncement> {
    let mut keep = 0;
    for a in &list {
        let len = pollen_protocol::encoded_len(a);
        let took = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            left.checked_sub(len)
        });
        if took.is_err() {
            break;
        }
        keep += 1;
    }
    list.truncate(keep);
    list
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pollen_protocol::{Announcement, BlockRange, ListCursor, PeerIdBytes};

    fn signed(n: u8) -> SignedAnnouncement {
        let key = [n; 32];
        let peer = pollen_protocol::peer_id_bytes_for_ed25519(
            &ed25519_dalek::SigningKey::from_bytes(&key)
                .verifying_key()
                .to_bytes(),
        );
        let now = crate::clock::unix_ms();
        let a = Announcement {
            peer,
            model_id: ModelId::from_bytes([7; 32]),
            model_name: "m".into(),
            num_blocks: 30,
            blocks: BlockRange::new(0, 30).unwrap(),
            throughput: 1.0,
            free_sessions: 1,
            free_cache_tokens: 1000,
            addrs: vec![],
            compute: "exact/cpu".into(),
            next_rtts: vec![],
            issued_at_ms: now,
            expires_at_ms: now + 30_000,
            seq: 1,
        };
        SignedAnnouncement::sign(a, &key).unwrap()
    }

    fn cursor() -> ListCursor {
        ListCursor {
            model_id: ModelId::from_bytes([7; 32]),
            rank: 0,
            place: 0,
            peer: PeerIdBytes(vec![1; 38]),
        }
    }

    /// A peer that answers every page just within the page timeout, always with more to
    /// come, holds a gather up [`LIST_TIMEOUT`] at most, and what it sent counts; an
    /// empty page ends the reading at once.
    #[tokio::test(start_paused = true)]
    async fn a_slow_or_empty_lister_holds_a_gather_up_a_bounded_time() {
        let peer = PeerId::random();
        let start = tokio::time::Instant::now();
        let mut asked = 0;
        let list = read_pages(peer, 1_000, |_| {
            asked += 1;
            let n = asked;
            async move {
                tokio::time::sleep(GATHER_TIMEOUT - Duration::from_millis(100)).await;
                Ok(AnnounceResponse::Page {
                    list: vec![signed(n)],
                    next: Some(cursor()),
                })
            }
        })
        .await
        .unwrap();
        assert!(start.elapsed() <= LIST_TIMEOUT, "{:?}", start.elapsed());
        assert_eq!(
            (asked, list.len()),
            (3, 2),
            "two pages read, the third cut off"
        );

        let start = tokio::time::Instant::now();
        let mut asked = 0;
        let list = read_pages(peer, 1_000, |_| {
            asked += 1;
            async {
                Ok(AnnounceResponse::Page {
                    list: vec![],
                    next: Some(cursor()),
                })
            }
        })
        .await
        .unwrap();
        assert_eq!((asked, list.len()), (1, 0));
        assert_eq!(start.elapsed(), Duration::ZERO);

        // A first page that never comes is a timeout.
        let never = read_pages(peer, 1_000, |_| std::future::pending()).await;
        assert!(matches!(never, Err(NetError::Timeout { .. })), "{never:?}");
    }

    /// An announcement listed on two pages (its rank moved between them) fills one
    /// place of the share.
    #[tokio::test(start_paused = true)]
    async fn an_announcement_listed_twice_counts_once() {
        let mut asked = 0;
        let list = read_pages(PeerId::random(), 3, |_| {
            asked += 1;
            let answer = if asked == 1 {
                AnnounceResponse::Page {
                    list: vec![signed(1), signed(2)],
                    next: Some(cursor()),
                }
            } else {
                AnnounceResponse::Page {
                    list: vec![signed(2), signed(3)],
                    next: None,
                }
            };
            async move { Ok(answer) }
        })
        .await
        .unwrap();
        let peers: std::collections::HashSet<_> =
            list.iter().map(|a| a.announcement.peer.clone()).collect();
        assert_eq!((list.len(), peers.len()), (3, 3));
    }

    /// A page refused as busy is asked again, for the same cursor, after a pause, and
    /// the list reads on; a peer busy for good ends the list within its time.
    #[tokio::test(start_paused = true)]
    async fn a_busy_lister_is_asked_again() {
        let peer = PeerId::random();
        let busy = || {
            AnnounceResponse::Refused(pollen_protocol::ProtocolError::new(
                pollen_protocol::ErrorCode::Busy,
                "busy",
            ))
        };
        let mut asked = Vec::new();
        let list = read_pages(peer, 1_000, |after| {
            asked.push(after.clone());
            let n = asked.len();
            let answer = match n {
                1 => AnnounceResponse::Page {
                    list: vec![signed(1)],
                    next: Some(cursor()),
                },
                2 | 3 => busy(),
                _ => AnnounceResponse::Page {
                    list: vec![signed(2)],
                    next: None,
                },
            };
            async move { Ok(answer) }
        })
        .await
        .unwrap();
        assert_eq!(list.len(), 2, "both pages read");
        assert_eq!(asked.len(), 4);
        assert!(asked[1..].iter().all(|c| c.as_ref() == Some(&cursor())));

        let start = tokio::time::Instant::now();
        let mut tries = 0;
        let list = read_pages(peer, 1_000, |_| {
            tries += 1;
            let answer = busy();
            async move { Ok(answer) }
        })
        .await
        .unwrap();
        assert!(list.is_empty());
        assert_eq!(tries, 1 + LIST_BUSY_RETRIES as usize);
        assert!(start.elapsed() <= LIST_TIMEOUT, "{:?}", start.elapsed());
    }

    /// A gather stops waiting for providers after its total time, keeping what those
    /// that answered gave, however many slow ones there are.
    #[tokio::test(start_paused = true)]
    async fn a_gather_ends_on_time_however_many_providers_are_slow() {
        let start = tokio::time::Instant::now();
        let asks: Vec<_> = [1u64, 100, 2, 100, 100, 3]
            .into_iter()
            .map(|s| async move {
                tokio::time::sleep(Duration::from_secs(s)).await;
                s
            })
            .collect();
        let mut got = ask_within(asks, 2, Duration::from_secs(10)).await;
        got.sort_unstable();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // Two at a time: 1 and 100 start, 2 after 1, then 100 after 2 ends (at 3 s):
        // the two slow ones hold both places until the deadline.
        assert_eq!(got, vec![1, 2]);
        let all: Vec<_> = (1..=5u64)
            .map(|s| async move {
                tokio::time::sleep(Duration::from_secs(s)).await;
                s
            })
            .collect();
        assert_eq!(ask_within(all, 64, Duration::from_secs(10)).await.len(), 5);
    }
}
