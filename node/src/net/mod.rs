//! The libp2p side of a node.
//!
//! One task owns the [`Swarm`] and runs its event loop; the rest of the
//! program holds a cloneable [`NetHandle`] that sends it commands with
//! `oneshot` replies (the shape of rust-libp2p's file-sharing example).
//! Inbound inference requests come out of [`Net::inbound`], a bounded queue;
//! when it is full the loop answers `busy` at once instead of queueing more.

mod behaviour;
pub mod book;
pub mod codec;
pub mod identity;

use anyhow::{Context, Result, anyhow};
pub use behaviour::{Behaviour, BehaviourEvent};
use book::{AnnouncementBook, now_ms};
use codec::FrameCodec;
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, identify, identity::Keypair, kad, mdns,
    noise, ping, relay, tcp, yamux,
};
use pollen_protocol::{
    ANNOUNCE_PROTOCOL, AnnounceRequest, AnnounceResponse, ErrorCode, HELLO_PROTOCOL, Hello,
    HelloReply, INFER_PROTOCOL, InferRequest, InferResponse, ModelId, ProtocolError, Roles,
    SignedAnnouncement, VerifiedAnnouncement,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Frames of the inference protocol.
pub type InferCodec = FrameCodec<InferRequest, InferResponse>;
/// Frames of the announcement protocol.
pub type AnnounceCodec = FrameCodec<AnnounceRequest, AnnounceResponse>;
/// Frames of the version handshake.
pub type HelloCodec = FrameCodec<Hello, HelloReply>;

/// Identify's protocol name for Pollen nodes.
pub const IDENTIFY_PROTOCOL: &str = "/pollen/id/1";
/// Kademlia's protocol name for the Pollen DHT.
pub const KAD_PROTOCOL: &str = "/pollen/kad/1";
/// Depth of the inbound inference queue before the node answers `busy`.
pub const INBOUND_QUEUE: usize = 256;

/// What a node is, which decides its DHT mode and extra services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Asks for text; DHT client mode.
    Client,
    /// Serves blocks; DHT server mode.
    Server,
    /// Entry point: DHT server, relay and AutoNAT server.
    Bootstrap,
}

/// Everything the network layer needs to start.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The node's identity.
    pub keypair: Keypair,
    /// Addresses to listen on (none for a pure client).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers to dial (with `/p2p/<id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// The node's role.
    pub role: Role,
    /// Longest wait for an inference answer (a prefill on a slow CPU takes seconds).
    pub infer_timeout: Duration,
    /// The protocol version this node speaks ([`pollen_protocol::PROTOCOL_VERSION`]; tests change it).
    pub protocol_version: u32,
}

/// An inference request that arrived from a peer.
#[derive(Debug)]
pub struct InboundInfer {
    /// Who sent it.
    pub peer: PeerId,
    /// The request.
    pub request: InferRequest,
    /// Where the answer goes (through [`NetHandle::respond`]).
    pub channel: ResponseChannel<InferResponse>,
}

/// A connected peer.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its id.
    pub peer: PeerId,
    /// Last measured round-trip time.
    pub rtt: Option<Duration>,
    /// Agent string from identify.
    pub agent: Option<String>,
}

enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, String>>,
    },
    Announce {
        peer: PeerId,
        request: AnnounceRequest,
        reply: oneshot::Sender<Result<AnnounceResponse, String>>,
    },
    Infer {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: InferRequest,
        reply: oneshot::Sender<Result<InferResponse, String>>,
    },
    Respond {
        channel: ResponseChannel<InferResponse>,
        response: InferResponse,
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
}

/// Message counters of one node, for measuring what discovery costs.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Announcement requests received.
    pub announce_in: AtomicU64,
    /// Announcement requests sent.
    pub announce_out: AtomicU64,
    /// Inference requests received.
    pub infer_in: AtomicU64,
    /// Inference requests sent.
    pub infer_out: AtomicU64,
}

impl NetStats {
    /// Announcement messages sent and received so far.
    pub fn announce_messages(&self) -> u64 {
        self.announce_in.load(Ordering::Relaxed) + self.announce_out.load(Ordering::Relaxed)
    }
}

/// A cloneable handle to the task that owns the swarm.
#[derive(Clone, Debug)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    stats: Arc<NetStats>,
}

/// A started network: its handle and its inbound inference queue.
#[derive(Debug)]
pub struct Net {
    /// Commands go here.
    pub handle: NetHandle,
    /// Inference requests from peers.
    pub inbound: mpsc::Receiver<InboundInfer>,
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl NetHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// This node's message counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
        timeout: Duration,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| anyhow!("the network task has stopped"))?;
        tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| anyhow!("no answer within {timeout:?}"))?
            .map_err(|_| anyhow!("the network task has stopped"))
    }

    /// Dials `addr` once; the peer id on success.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId> {
        let a = addr.clone();
        self.call(|reply| Command::Dial { addr: a, reply }, COMMAND_TIMEOUT)
            .await?
            .map_err(|e| anyhow!("cannot reach {addr}: {e}"))
    }

    /// Dials `addr`, retrying with exponential backoff for up to `patience`.
    pub async fn dial_with_retry(&self, addr: &Multiaddr, patience: Duration) -> Result<PeerId> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut delay = Duration::from_millis(200);
        loop {
            match self.dial(addr.clone()).await {
                Ok(p) => return Ok(p),
                Err(e) if tokio::time::Instant::now() + delay >= deadline => {
                    return Err(
                        e.context(format!("gave up on bootstrap {addr} after {patience:?}"))
                    );
                }
                Err(e) => {
                    tracing::warn!("{e:#}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Sends an announcement request to `peer`.
    pub async fn announce(
        &self,
        peer: PeerId,
        request: AnnounceRequest,
    ) -> Result<AnnounceResponse> {
        self.call(
            |reply| Command::Announce {
                peer,
                request,
                reply,
            },
            COMMAND_TIMEOUT,
        )
        .await
        .map_err(|e| anyhow!("announce request to {peer}: {e}"))?
        .map_err(|e| anyhow!("announce request to {peer}: {e}"))
    }

    /// Sends an inference request to `peer` (dialing `addrs` if needed).
    pub async fn infer(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: InferRequest,
        timeout: Duration,
    ) -> Result<InferResponse> {
        self.call(
            |reply| Command::Infer {
                peer,
                addrs,
                request,
                reply,
            },
            timeout + Duration::from_secs(5),
        )
        .await
        .map_err(|e| anyhow!("inference request to {peer}: {e}"))?
        .map_err(|e| anyhow!("inference request to {peer}: {e}"))
    }

    /// Answers an inbound inference request.
    pub async fn respond(&self, channel: ResponseChannel<InferResponse>, response: InferResponse) {
        let _ = self.tx.send(Command::Respond { channel, response }).await;
    }

    /// Sets (or withdraws) this node's own announcement and publishes it to every connected peer.
    pub async fn set_own_announcement(
        &self,
        announcement: Option<SignedAnnouncement>,
    ) -> Result<()> {
        self.tx
            .send(Command::SetOwn {
                announcement,
                done: None,
            })
            .await
            .map_err(|_| anyhow!("the network task has stopped"))
    }

    /// Like [`Self::set_own_announcement`], then waits (at most `timeout`) until
    /// every publish target has answered: used to withdraw before exiting.
    pub async fn set_own_announcement_and_wait(
        &self,
        announcement: Option<SignedAnnouncement>,
        timeout: Duration,
    ) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::SetOwn {
                announcement,
                done: Some(tx),
            })
            .await
            .map_err(|_| anyhow!("the network task has stopped"))?;
        let _ = tokio::time::timeout(timeout, rx).await;
        Ok(())
    }

    /// The verified announcements this node holds.
    pub async fn book(&self, model: Option<ModelId>) -> Result<Vec<VerifiedAnnouncement>> {
        self.call(|reply| Command::Book { model, reply }, COMMAND_TIMEOUT)
            .await
    }

    /// Connected peers with their round-trip times.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.call(|reply| Command::Peers { reply }, COMMAND_TIMEOUT)
            .await
    }

    /// Addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.call(|reply| Command::ListenAddrs { reply }, COMMAND_TIMEOUT)
            .await
    }

    /// Peers refused (or refusing us) at the version handshake, with the reason.
    pub async fn refusals(&self) -> Result<Vec<(PeerId, String)>> {
        self.call(|reply| Command::Refusals { reply }, COMMAND_TIMEOUT)
            .await
    }

    /// Waits until the node listens on at least `count` addresses (or `timeout` passes).
    pub async fn wait_listening(&self, count: usize, timeout: Duration) -> Result<Vec<Multiaddr>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let addrs = self.listen_addrs().await?;
            if addrs.len() >= count || tokio::time::Instant::now() >= deadline {
                return Ok(addrs);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks every connected peer for its announcements (of `model` or all),
    /// stores the valid ones and returns the node's whole book.
    pub async fn gather(&self, model: Option<ModelId>) -> Result<Vec<VerifiedAnnouncement>> {
        let peers = self.peers().await?;
        let asks = peers.iter().map(|p| {
            let h = self.clone();
            let peer = p.peer;
            async move {
                (
                    peer,
                    h.announce(peer, AnnounceRequest::List { model_id: model })
                        .await,
                )
            }
        });
        for (peer, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(AnnounceResponse::List(list)) => {
                    for signed in list {
                        let _ = self
                            .announce_local(signed)
                            .await
                            .map_err(|e| tracing::debug!("from {peer}: {e}"));
                    }
                }
                Ok(other) => tracing::debug!("{peer} answered a list request with {other:?}"),
                Err(e) => tracing::debug!("{e:#}"),
            }
        }
        self.book(model).await
    }

    async fn announce_local(&self, signed: SignedAnnouncement) -> Result<()> {
        let me = self.peer_id;
        match self
            .announce(me, AnnounceRequest::Publish(Box::new(signed)))
            .await?
        {
            AnnounceResponse::Accepted => Ok(()),
            AnnounceResponse::Refused(e) => Err(anyhow!("{}", e.message)),
            other => Err(anyhow!("unexpected answer {other:?}")),
        }
    }
}

/// Builds the swarm and starts its task; stops when `cancel` fires.
pub async fn start(cfg: NetConfig, cancel: CancellationToken) -> Result<Net> {
    let peer_id = cfg.keypair.public().to_peer_id();
    let role = cfg.role;
    let use_mdns = cfg.mdns;
    let infer_timeout = cfg.infer_timeout;
    let hello = Hello {
        version: cfg.protocol_version,
        model_id: None,
        roles: match cfg.role {
            Role::Client => Roles::CLIENT,
            Role::Server => Roles::SERVER,
            Role::Bootstrap => Roles::BOOTSTRAP,
        },
        agent: format!("pollen/{}", env!("CARGO_PKG_VERSION")),
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .context("building the TCP transport")?
        .with_quic()
        .with_dns()
        .context("building the DNS resolver")?
        .with_behaviour(|key| {
            let local = key.public().to_peer_id();
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("pollen/{}", env!("CARGO_PKG_VERSION"))),
            );
            let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            let mut kad =
                kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_cfg);
            kad.set_mode(Some(match role {
                Role::Client => kad::Mode::Client,
                Role::Server | Role::Bootstrap => kad::Mode::Server,
            }));
            let mdns = if use_mdns {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };
            let relay = (role == Role::Bootstrap)
                .then(|| relay::Behaviour::new(local, relay::Config::default()));
            let autonat = (role == Role::Bootstrap).then(|| {
                autonat::Behaviour::new(
                    local,
                    autonat::Config {
                        only_global_ips: false,
                        ..Default::default()
                    },
                )
            });
            let rr = |timeout: Duration, streams: usize| {
                request_response::Config::default()
                    .with_request_timeout(timeout)
                    .with_max_concurrent_streams(streams)
            };
            Ok(Behaviour {
                identify,
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                kad,
                mdns: mdns.into(),
                relay: relay.into(),
                autonat: autonat.into(),
                hello: request_response::Behaviour::new(
                    [(StreamProtocol::new(HELLO_PROTOCOL), ProtocolSupport::Full)],
                    rr(Duration::from_secs(10), 4),
                ),
                announce: request_response::Behaviour::new(
                    [(
                        StreamProtocol::new(ANNOUNCE_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    rr(Duration::from_secs(20), 32),
                ),
                infer: request_response::Behaviour::new(
                    [(StreamProtocol::new(INFER_PROTOCOL), ProtocolSupport::Full)],
                    rr(infer_timeout, 32),
                ),
            })
        })
        .map_err(|e| anyhow!("building the node's protocols: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
    }
    let (tx, rx) = mpsc::channel(1024);
    let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
    let stats = Arc::new(NetStats::default());
    let handle = NetHandle {
        tx,
        peer_id,
        stats: stats.clone(),
    };
    let event_loop = EventLoop {
        stats,
        hello,
        refused: HashMap::new(),
        swarm,
        commands: rx,
        inbound: inbound_tx,
        pending_dials: HashMap::new(),
        pending_announce: HashMap::new(),
        pending_infer: HashMap::new(),
        book: AnnouncementBook::default(),
        own: None,
        connected: HashMap::new(),
        agents: HashMap::new(),
        listen_addrs: Vec::new(),
        publish_targets: HashSet::new(),
        publish_waiters: Vec::new(),
    };
    tokio::spawn(event_loop.run(cancel));
    Ok(Net { handle, inbound })
}

/// Most refused peers remembered.
const MAX_REFUSALS: usize = 256;

struct EventLoop {
    stats: Arc<NetStats>,
    hello: Hello,
    refused: HashMap<PeerId, String>,
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<InboundInfer>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, String>>>,
    pending_announce: HashMap<OutboundRequestId, oneshot::Sender<Result<AnnounceResponse, String>>>,
    pending_infer: HashMap<OutboundRequestId, oneshot::Sender<Result<InferResponse, String>>>,
    book: AnnouncementBook,
    own: Option<SignedAnnouncement>,
    connected: HashMap<PeerId, Option<Duration>>,
    agents: HashMap<PeerId, String>,
    listen_addrs: Vec<Multiaddr>,
    /// Peers this node publishes its announcement to: the bootstraps it
    /// dialed and the LAN peers mDNS found. Everyone else asks with `List`,
    /// so a renewal costs one message per bootstrap, not one per connection.
    publish_targets: HashSet<PeerId>,
    publish_waiters: Vec<(HashSet<OutboundRequestId>, oneshot::Sender<()>)>,
}

impl EventLoop {
    async fn run(mut self, cancel: CancellationToken) {
        let mut prune = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => self.book.prune(),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
            }
        }
        tracing::debug!("network task stopped");
    }

    fn publish_to(&mut self, peer: PeerId) -> Option<OutboundRequestId> {
        let own = self.own.as_ref()?;
        let req = AnnounceRequest::Publish(Box::new(own.clone()));
        self.stats.announce_out.fetch_add(1, Ordering::Relaxed);
        Some(self.swarm.behaviour_mut().announce.send_request(&peer, req))
    }

    /// A publish was answered or failed: wake whoever waits for its batch.
    fn publish_settled(&mut self, id: OutboundRequestId) {
        for (ids, _) in &mut self.publish_waiters {
            ids.remove(&id);
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.publish_waiters)
            .into_iter()
            .partition(|(ids, _)| ids.is_empty());
        self.publish_waiters = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                let opts = DialOpts::unknown_peer_id().address(addr).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Command::Announce {
                peer,
                request,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Ok(self.answer_announce(peer, request)));
                } else {
                    self.stats.announce_out.fetch_add(1, Ordering::Relaxed);
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .announce
                        .send_request(&peer, request);
                    self.pending_announce.insert(id, reply);
                }
            }
            Command::Infer {
                peer,
                addrs,
                request,
                reply,
            } => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a);
                }
                self.stats.infer_out.fetch_add(1, Ordering::Relaxed);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .infer
                    .send_request(&peer, request);
                self.pending_infer.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .infer
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("an inference answer found its requester gone");
                }
            }
            Command::SetOwn { announcement, done } => {
                match &announcement {
                    Some(a) => {
                        if let Err(e) = self.book.insert(a.clone()) {
                            tracing::warn!("own announcement refused by our own book: {e}");
                        }
                    }
                    None => {
                        let me = *self.swarm.local_peer_id();
                        self.book.remove_peer(&me);
                    }
                }
                self.own = announcement;
                let peers: Vec<PeerId> = self
                    .connected
                    .keys()
                    .filter(|p| self.publish_targets.contains(p))
                    .copied()
                    .collect();
                let ids: HashSet<OutboundRequestId> = peers
                    .into_iter()
                    .filter_map(|p| self.publish_to(p))
                    .collect();
                if let Some(done) = done {
                    if ids.is_empty() {
                        let _ = done.send(());
                    } else if self.publish_waiters.len() < 16 {
                        self.publish_waiters.push((ids, done));
                    }
                }
            }
            Command::Book { model, reply } => {
                let _ = reply.send(self.book.list(model.as_ref()));
            }
            Command::Peers { reply } => {
                let peers = self
                    .connected
                    .iter()
                    .map(|(p, rtt)| PeerInfo {
                        peer: *p,
                        rtt: *rtt,
                        agent: self.agents.get(p).cloned(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Refusals { reply } => {
                let _ = reply.send(self.refused.iter().map(|(p, r)| (*p, r.clone())).collect());
            }
        }
    }

    fn answer_announce(&mut self, peer: PeerId, request: AnnounceRequest) -> AnnounceResponse {
        match request {
            AnnounceRequest::Get { model_id } => match &self.own {
                Some(own) if own.announcement.model_id == model_id => {
                    AnnounceResponse::Announcement(Box::new(own.clone()))
                }
                _ => AnnounceResponse::NotServing,
            },
            AnnounceRequest::Publish(signed) => match self.book.insert(*signed) {
                Ok(()) => AnnounceResponse::Accepted,
                Err(e) => {
                    if !e.contains("duplicate") && !e.contains("older") && !e.contains("stale") {
                        tracing::warn!("ignored an announcement from {peer}: {e}");
                    } else {
                        tracing::debug!("ignored an announcement from {peer}: {e}");
                    }
                    AnnounceResponse::Refused(ProtocolError::new(ErrorCode::BadRequest, e))
                }
            },
            AnnounceRequest::List { model_id } => {
                // One pass: stop before the answer would outgrow its frame limit.
                let budget = pollen_protocol::limits::MAX_ANNOUNCE_RESPONSE_BYTES - 64;
                let mut used = 0;
                let list: Vec<SignedAnnouncement> = self
                    .book
                    .list(model_id.as_ref())
                    .into_iter()
                    .take(pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS)
                    .map(VerifiedAnnouncement::into_signed)
                    .take_while(|a| {
                        used += pollen_protocol::encoded_len(a);
                        used <= budget
                    })
                    .collect();
                AnnounceResponse::List(list)
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                    self.publish_targets.insert(peer_id);
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                }
                let fresh = self.connected.insert(peer_id, None).is_none();
                if fresh {
                    let hello = self.hello.clone();
                    self.swarm
                        .behaviour_mut()
                        .hello
                        .send_request(&peer_id, hello);
                }
                if fresh && self.publish_targets.contains(&peer_id) {
                    self.publish_to(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.agents.remove(&peer_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            _ => {}
        }
    }

    fn refuse(&mut self, peer: PeerId, reason: String) {
        tracing::error!("peer {peer}: {reason}");
        if self.refused.len() < MAX_REFUSALS || self.refused.contains_key(&peer) {
            self.refused.insert(peer, reason);
        }
    }

    fn behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Hello(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let reply = HelloReply::answer(&self.hello, &request);
                        if let HelloReply::Refuse(e) = &reply {
                            self.refuse(peer, format!("refused: {}", e.message));
                        }
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .hello
                            .send_response(channel, reply);
                    }
                    request_response::Message::Response { response, .. } => {
                        if let Err(e) = response.into_result(&self.hello) {
                            self.refuse(peer, format!("refused: {}", e.message));
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                    }
                }
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let speaks_kad = info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL);
                if speaks_kad {
                    for a in info.listen_addrs.into_iter().take(16) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                if let Some(slot) = self.connected.get_mut(&peer) {
                    *slot = Some(rtt);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, _) in gone {
                    self.publish_targets.remove(&peer);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer == *self.swarm.local_peer_id() {
                        continue;
                    }
                    self.swarm.add_peer_address(peer, addr.clone());
                    let new_target = self.publish_targets.insert(peer);
                    if self.connected.contains_key(&peer) {
                        if new_target {
                            self.publish_to(peer);
                        }
                    } else {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            BehaviourEvent::Announce(request_response::Event::Message {
                peer, message, ..
            }) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    self.stats.announce_in.fetch_add(1, Ordering::Relaxed);
                    let answer = self.answer_announce(peer, request);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .announce
                        .send_response(channel, answer);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_announce.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            BehaviourEvent::Announce(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_announce.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
                self.publish_settled(request_id);
            }
            BehaviourEvent::Infer(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        self.stats.infer_in.fetch_add(1, Ordering::Relaxed);
                        if let Some(reason) = self.refused.get(&peer) {
                            let e = ProtocolError::new(ErrorCode::VersionMismatch, reason.clone());
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .infer
                                .send_response(channel, InferResponse::Error(e));
                            return;
                        }
                        let job = InboundInfer {
                            peer,
                            request,
                            channel,
                        };
                        if let Err(
                            mpsc::error::TrySendError::Full(job)
                            | mpsc::error::TrySendError::Closed(job),
                        ) = self.inbound.try_send(job)
                        {
                            let busy = InferResponse::Error(ProtocolError::new(
                                ErrorCode::Busy,
                                "this server is not taking inference requests now".to_string(),
                            ));
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .infer
                                .send_response(job.channel, busy);
                        }
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        if let Some(reply) = self.pending_infer.remove(&request_id) {
                            let _ = reply.send(Ok(response));
                        }
                    }
                }
            }
            BehaviourEvent::Infer(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_infer.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            BehaviourEvent::Infer(request_response::Event::InboundFailure {
                peer, error, ..
            }) => {
                tracing::debug!("inference request from {peer} failed: {error}");
            }
            _ => {}
        }
    }
}

/// `now` in milliseconds, for announcements.
pub fn unix_ms() -> u64 {
    now_ms()
}
