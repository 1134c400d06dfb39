//! The task that owns the swarm: it runs the version handshake, answers and sends
//! announcement requests, tracks connected peers and their round-trip times, and carries
//! out the handle's commands. Session streams bypass it (see [`super::stream`]).

use super::error::NetError;
use super::handle::{Command, NetStats, Path, PeerInfo};
use super::publish::Publisher;
use super::reach::{Reach, is_relayed};
use super::transport::KAD_PROTOCOL;
use super::{Behaviour, BehaviourEvent};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, kad, mdns, ping, relay};
use pollen_protocol::{AnnounceResponse, Hello, HelloReply, ModelId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most entries of our book that one gather may take from a bootstrap (or another peer
/// this node dialed by address or found on the LAN): two full list pages.
const GATHER_TRUSTED_SHARE: usize = 2 * pollen_protocol::limits::MAX_LIST_ANNOUNCEMENTS;
/// Most refused peers remembered.
const MAX_REFUSALS: usize = 256;
/// Most addresses taken from one identify message.
const MAX_IDENTIFY_ADDRS: usize = 16;
/// How often expired announcements are dropped (and relay reservations reconsidered).
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// The least time between two publications of our provider record that the
/// routing table's growth triggers.
const REPROVIDE_GAP: Duration = Duration::from_secs(1);
/// Most callers waiting for connections at once.
const MAX_CONNECT_WAITERS: usize = 1024;
/// Most DHT provider lookups in flight at once.
const MAX_PROVIDER_QUERIES: usize = 64;
/// Most providers one lookup collects.
const MAX_PROVIDERS: usize = 256;
/// How long a provider lookup that has found some providers may run: past it, the
/// lookup ends with what it found (the nodes nearest the key answer within a few
/// round trips; the rest is waiting on slow or unreachable peers) ...
const PROVIDERS_DEADLINE: Duration = Duration::from_secs(4);
/// ... and one that has found none yet (a new node's first lookup opens a connection
/// at each step).
pub(super) const PROVIDERS_EMPTY_DEADLINE: Duration = Duration::from_secs(10);
/// How often lookups past their deadline are ended.
const LOOKUP_CHECK: Duration = Duration::from_millis(250);

/// One connection to a peer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Link {
    relayed: bool,
    rtt: Option<Duration>,
}

/// Whether `addr` could be dialed from elsewhere (not loopback, unspecified or
/// link-local). Private ranges count: a LAN is somewhere too.
fn is_public(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    addr.iter().all(|p| match p {
        Protocol::Ip4(ip) => !(ip.is_loopback() || ip.is_unspecified() || ip.is_link_local()),
        Protocol::Ip6(ip) => !(ip.is_loopback() || ip.is_unspecified()),
        _ => true,
    })
}

/// The DHT key of a model's provider records: its id.
pub(super) fn model_key(model: &ModelId) -> kad::RecordKey {
    kad::RecordKey::new(model.as_bytes())
}

pub(super) struct EventLoop {
    pub(super) stats: Arc<NetStats>,
    pub(super) hello: Hello,
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) refused: HashMap<PeerId, String>,
    pub(super) pending_dials:
        HashMap<ConnectionId, (Multiaddr, oneshot::Sender<Result<PeerId, NetError>>)>,
    pub(super) pending_announce:
        HashMap<OutboundRequestId, oneshot::Sender<Result<AnnounceResponse, OutboundFailure>>>,
    pub(super) publisher: Publisher,
    pub(super) connected: HashMap<PeerId, Option<Duration>>,
    pub(super) agents: HashMap<PeerId, String>,
    pub(super) listen_addrs: Vec<Multiaddr>,
    pub(super) reach: Reach,
    pub(super) links: HashMap<PeerId, HashMap<ConnectionId, Link>>,
    /// Peers with a relayed connection whose hole punch has not ended yet.
    pub(super) punching: HashSet<PeerId>,
    pub(super) connect_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<Path, NetError>>>>,
    pub(super) provider_queries: HashMap<kad::QueryId, ProviderQuery>,
    /// The model whose provider record we publish.
    pub(super) providing: Option<ModelId>,
    /// Whether the last publication of that record reached no DHT node (it ran
    /// while the routing table was empty): it runs again when the routing table
    /// gains a peer, instead of at the next republish.
    pub(super) provide_unplaced: bool,
    /// Routing table entries when the record was last published, and when. A node
    /// that has just joined knows few peers, so the nodes it stored its record on
    /// may not be the ones nearest the key once it knows more: each time its
    /// routing table doubles it publishes again (a handful of times while it joins,
    /// not again once its table is stable), instead of waiting for the republish.
    pub(super) provided_at: (usize, Instant),
    /// The address each connection we dialed went to.
    pub(super) dialed_addrs: HashMap<ConnectionId, Multiaddr>,
}

/// A provider lookup in flight: the providers found so far, who waits for them, and
/// when it started (it ends by a deadline).
pub(super) struct ProviderQuery {
    found: Vec<PeerId>,
    reply: oneshot::Sender<Vec<PeerId>>,
    started: tokio::time::Instant,
}

impl EventLoop {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        let mut lookups = tokio::time::interval(LOOKUP_CHECK);
        lookups.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => {
                    self.publisher.book.prune();
                    self.reserve_relays();
                }
                _ = lookups.tick(), if !self.provider_queries.is_empty() => {
                    self.end_overdue_lookups();
                }
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
            }
        }
        tracing::debug!("network task stopped");
    }

    /// Ends the provider lookups past their deadline with what they found.
    fn end_overdue_lookups(&mut self) {
        let now = tokio::time::Instant::now();
        let overdue: Vec<kad::QueryId> = self
            .provider_queries
            .iter()
            .filter(|(_, q)| {
                let deadline = if q.found.is_empty() {
                    PROVIDERS_EMPTY_DEADLINE
                } else {
                    PROVIDERS_DEADLINE
                };
                q.started + deadline <= now
            })
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            self.end_lookup(id, None);
        }
    }

    /// Ends the provider lookup `id` (`requests`: what it sent, when known) and
    /// answers its caller.
    fn end_lookup(&mut self, id: kad::QueryId, requests: Option<u32>) {
        let Some(q) = self.provider_queries.remove(&id) else {
            return;
        };
        let kad = &mut self.swarm.behaviour_mut().kad;
        let sent = match kad.query_mut(&id) {
            Some(mut query) => {
                let sent = query.stats().num_requests();
                query.finish();
                sent
            }
            None => requests.unwrap_or_default(),
        };
        self.stats
            .dht_lookup_requests
            .fetch_add(u64::from(requests.unwrap_or(sent)), Ordering::Relaxed);
        let _ = q.reply.send(q.found);
    }

    /// The best path to `peer` (direct if any connection is), with its round-trip time.
    fn best_link(&self, peer: &PeerId) -> Option<(Path, Option<Duration>)> {
        let links = self.links.get(peer)?;
        let direct = links.values().find(|l| !l.relayed);
        let l = direct.or_else(|| links.values().next())?;
        let path = if l.relayed {
            Path::Relayed
        } else {
            Path::Direct
        };
        Some((path, l.rtt))
    }

    /// Listens through relays when this node is behind NAT and has too few slots.
    fn reserve_relays(&mut self) {
        for (relay, addr) in self.reach.to_reserve() {
            match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    tracing::info!("reserving a relay slot: listening on {addr}");
                    self.reach.reserving(relay, id);
                }
                Err(e) => {
                    tracing::warn!("cannot listen through relay {addr}: {e}");
                    self.reach.relay_gone(&relay);
                }
            }
        }
    }

    fn answer_connect_waiters(&mut self, peer: &PeerId, result: Result<Path, String>) {
        for w in self.connect_waiters.remove(peer).unwrap_or_default() {
            let _ = w.send(result.clone().map_err(|reason| NetError::Setup {
                what: format!("connecting to {peer}"),
                reason,
            }));
        }
    }

    /// Publishes (or stops publishing) the provider record of the model we serve.
    fn provide(&mut self, model: Option<ModelId>) {
        if self.providing == model {
            return;
        }
        let kad = &mut self.swarm.behaviour_mut().kad;
        if let Some(old) = self.providing.take() {
            kad.stop_providing(&model_key(&old));
        }
        if let Some(m) = model
            && self.publish_provider_record(m)
        {
            self.providing = Some(m);
        }
    }

    /// Entries in the DHT routing table.
    fn routing_entries(&mut self) -> usize {
        let kad = &mut self.swarm.behaviour_mut().kad;
        kad.kbuckets().map(|b| b.num_entries()).sum()
    }

    /// Runs a publication of `m`'s provider record (a walk to the nodes nearest
    /// the key, then a store on each), noting the routing table's size and the
    /// time; whether it could start.
    fn publish_provider_record(&mut self, m: ModelId) -> bool {
        self.provide_unplaced = false;
        self.provided_at = (self.routing_entries(), Instant::now());
        let kad = &mut self.swarm.behaviour_mut().kad;
        match kad.start_providing(model_key(&m)) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("cannot publish a provider record: {e}");
                false
            }
        }
    }

    /// Makes `peer` a publish target; a new one that is connected gets our announcement
    /// at once. Whether it is connected.
    fn make_entry(&mut self, peer: PeerId) -> bool {
        let connected = self.connected.contains_key(&peer);
        if self.publisher.add_target(peer)
            && connected
            && let Some(id) = self.publish_to(peer)
        {
            self.publisher.track(vec![id], None);
        }
        connected
    }

    fn count_lists(&self) {
        let bytes = self.publisher.list_bytes_in_flight() as u64;
        self.stats
            .list_bytes_in_flight
            .store(bytes, Ordering::Relaxed);
    }

    fn publish_to(&mut self, peer: PeerId) -> Option<OutboundRequestId> {
        let req = self.publisher.publish_request()?;
        self.stats.announce_out.fetch_add(1, Ordering::Relaxed);
        Some(self.swarm.behaviour_mut().announce.send_request(&peer, req))
    }

    /// How many entries of our book what we gather from `peer` may hold: a bootstrap
    /// (or other peer we dialed by address, or found on the LAN) two full pages, any
    /// other peer what one sender may hold.
    fn gather_share(&self, peer: &PeerId) -> usize {
        if self.publisher.is_target(peer) {
            GATHER_TRUSTED_SHARE
        } else {
            self.publisher.book.limits().per_sender
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, (addr, reply));
                    }
                    Err(source) => {
                        let _ = reply.send(Err(NetError::Dial {
                            addr,
                            source: Box::new(source),
                        }));
                    }
                }
            }
            Command::AddAddrs {
                peer,
                addrs,
                connect,
                done,
            } => {
                for a in addrs.iter().take(MAX_IDENTIFY_ADDRS) {
                    self.swarm.add_peer_address(peer, a.clone());
                }
                if connect && !self.connected.contains_key(&peer) {
                    let _ = self.swarm.dial(DialOpts::peer_id(peer).build());
                }
                let _ = done.send(());
            }
            Command::Announce {
                peer,
                request,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Ok(self.publisher.answer_local(&peer, request)));
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
            Command::GatherShare { peer, reply } => {
                let _ = reply.send(self.gather_share(&peer));
            }
            Command::StoreGathered {
                source,
                list,
                reply,
            } => {
                let share = self.gather_share(&source);
                let _ = reply.send(self.publisher.store_gathered(&source, list, share));
            }
            Command::SetOwn { announcement, done } => {
                if self.hello.roles != pollen_protocol::Roles::CLIENT {
                    self.provide(announcement.as_ref().map(|a| a.announcement.model_id));
                }
                let me = *self.swarm.local_peer_id();
                self.publisher.set_own(&me, announcement);
                let peers: Vec<PeerId> = self
                    .connected
                    .keys()
                    .filter(|p| self.publisher.is_target(p))
                    .copied()
                    .collect();
                let ids: Vec<OutboundRequestId> = peers
                    .into_iter()
                    .filter_map(|p| self.publish_to(p))
                    .collect();
                self.publisher.track(ids, done);
            }
            Command::Book { model, reply } => {
                let _ = reply.send(self.publisher.book.list(model.as_ref()));
            }
            Command::Peers { reply } => {
                let peers = self
                    .connected
                    .keys()
                    .map(|p| {
                        let (path, rtt) = self.best_link(p).unwrap_or((Path::Direct, None));
                        PeerInfo {
                            peer: *p,
                            rtt,
                            agent: self.agents.get(p).cloned(),
                            path,
                            entry: self.publisher.is_target(p),
                        }
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
            Command::Connect { peer, reply } => {
                if let Some((path, _)) = self.best_link(&peer) {
                    let _ = reply.send(Ok(path));
                    return;
                }
                let waiting: usize = self.connect_waiters.values().map(Vec::len).sum();
                if waiting >= MAX_CONNECT_WAITERS {
                    let _ = reply.send(Err(NetError::Setup {
                        what: format!("connecting to {peer}"),
                        reason: "too many connections being made".into(),
                    }));
                    return;
                }
                match self.swarm.dial(DialOpts::peer_id(peer).build()) {
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                        self.connect_waiters.entry(peer).or_default().push(reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Setup {
                            what: format!("connecting to {peer}"),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Command::PathOf { peer, reply } => {
                let path = self.best_link(&peer).map(|(p, _)| p);
                let _ = reply.send((path, self.punching.contains(&peer)));
            }
            Command::Block { peer, blocked } => {
                let gate = &mut self.swarm.behaviour_mut().blocked;
                if blocked {
                    tracing::info!("blocking peer {peer}");
                    gate.block_peer(peer);
                } else {
                    gate.unblock_peer(peer);
                }
            }
            Command::Allow {
                peer,
                allowed,
                reply,
            } => {
                let answer = match self.swarm.behaviour_mut().allowed.as_mut() {
                    Some(gate) => {
                        if allowed {
                            gate.allow_peer(peer);
                        } else {
                            gate.disallow_peer(peer);
                        }
                        true
                    }
                    None => false,
                };
                let _ = reply.send(answer);
            }
            Command::Providers { model, reply } => {
                if self.provider_queries.len() >= MAX_PROVIDER_QUERIES {
                    let _ = reply.send(Vec::new());
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(model_key(&model));
                self.provider_queries.insert(
                    id,
                    ProviderQuery {
                        found: Vec::new(),
                        reply,
                        started: tokio::time::Instant::now(),
                    },
                );
            }
            Command::Reachability { reply } => {
                let _ = reply.send(self.reach.status);
            }
            Command::MakeEntry { peer, reply } => {
                // Only a connected peer: one that is gone stays no target.
                let connected = self.connected.contains_key(&peer) && self.make_entry(peer);
                let _ = reply.send(connected);
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                // A bootstrap is a public entry point: its listen addresses are its
                // external ones (a relay hands them out in reservations).
                if self.hello.roles == pollen_protocol::Roles::BOOTSTRAP
                    && !is_relayed(&address)
                    && !address.iter().any(|p| {
                        matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
                    })
                {
                    self.swarm.add_external_address(address.clone());
                } else if super::transport::is_memory(&address) {
                    // Every node of the process can dial an in-process address: it is
                    // external, and goes into our provider records (AutoNAT confirms
                    // network addresses; it does not run on this transport).
                    self.swarm.add_external_address(address.clone());
                }
                self.listen_addrs.push(address);
            }
            SwarmEvent::ListenerClosed { listener_id, .. } => {
                self.reach.listener_closed(listener_id);
            }
            SwarmEvent::NewExternalAddrOfPeer { peer_id, address } => {
                // Addresses of providers found in the DHT, among others.
                self.swarm.add_peer_address(peer_id, address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                // A peer we dialed by address becomes an entry point, also when it was
                // connected already (it dialed us first): then it hears from us now.
                let mut new_target = false;
                if let Some((_, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                    new_target = self.publisher.add_target(peer_id);
                }
                let relayed = endpoint.is_relayed();
                self.links
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, Link { relayed, rtt: None });
                if relayed
                    && self
                        .best_link(&peer_id)
                        .is_some_and(|(p, _)| p == Path::Relayed)
                {
                    self.punching.insert(peer_id);
                }
                if let Some((path, _)) = self.best_link(&peer_id) {
                    self.answer_connect_waiters(&peer_id, Ok(path));
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                    if self.dialed_addrs.len() < MAX_CONNECT_WAITERS {
                        self.dialed_addrs.insert(connection_id, address.clone());
                    }
                }
                self.publisher
                    .book
                    .connected(peer_id, endpoint.get_remote_address());
                let fresh = self.connected.insert(peer_id, None).is_none();
                if fresh {
                    crate::metrics::global().peer_connected();
                }
                if fresh {
                    let hello = self.hello.clone();
                    self.swarm
                        .behaviour_mut()
                        .hello
                        .send_request(&peer_id, hello);
                }
                if (fresh || new_target)
                    && self.publisher.is_target(&peer_id)
                    && let Some(id) = self.publish_to(peer_id)
                {
                    self.publisher.track(vec![id], None);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.dialed_addrs.remove(&connection_id);
                if let Some(links) = self.links.get_mut(&peer_id) {
                    links.remove(&connection_id);
                }
                if num_established == 0 {
                    if self.connected.remove(&peer_id).is_some() {
                        crate::metrics::global().peer_disconnected();
                    }
                    self.agents.remove(&peer_id);
                    self.publisher.book.disconnected(&peer_id);
                    self.links.remove(&peer_id);
                    self.punching.remove(&peer_id);
                    self.reach.relay_gone(&peer_id);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
            } => {
                if let Some(p) = peer_id
                    && !self.links.contains_key(&p)
                {
                    self.answer_connect_waiters(&p, Err(error.to_string()));
                }
                if let Some((addr, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial {
                        addr,
                        source: Box::new(error),
                    }));
                }
            }
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            _ => {}
        }
    }

    fn refuse(&mut self, peer: PeerId, reason: String) {
        tracing::error!("peer {peer}: {reason}");
        // A peer we cannot talk to is no place to publish our announcement.
        self.publisher.remove_target(&peer);
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
                            self.refuse(peer, format!("we refused it: {}", e.message));
                        }
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .hello
                            .send_response(channel, reply);
                    }
                    request_response::Message::Response { response, .. } => {
                        if let Err(e) = response.into_result(&self.hello) {
                            self.refuse(peer, format!("it refused us: {}", e.message));
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                    }
                }
            }
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                self.agents.insert(peer_id, info.agent_version.clone());
                let runs_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                // A peer this node dialed by address (a bootstrap, or a peer given on the
                // command line) or found on the LAN is a trusted relay, reserved on first;
                // any other peer may claim the HOP protocol, so only a few of those, ones
                // this node dialed itself (servers it learned of), are kept, and none is
                // dialed because of the claim alone.
                let trusted = self.publisher.is_target(&peer_id);
                let dialed = self
                    .links
                    .get(&peer_id)
                    .and_then(|l| l.get(&connection_id))
                    .is_some_and(|l| !l.relayed);
                if runs_relay {
                    // The address we reached it on works from here; else its own
                    // public listen addresses, dialed directly to see.
                    match self.dialed_addrs.get(&connection_id).cloned() {
                        Some(addr) if dialed => {
                            self.reach.relay_found(peer_id, addr, trusted);
                            self.reserve_relays();
                        }
                        _ if trusted
                            && self.reach.wants_more()
                            && !self.reach.is_candidate(&peer_id) =>
                        {
                            let addrs: Vec<Multiaddr> = info
                                .listen_addrs
                                .iter()
                                .filter(|a| !is_relayed(a) && is_public(a))
                                .take(MAX_IDENTIFY_ADDRS)
                                .cloned()
                                .collect();
                            if !addrs.is_empty() {
                                let opts = DialOpts::peer_id(peer_id)
                                    .addresses(addrs)
                                    .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                                    .build();
                                let _ = self.swarm.dial(opts);
                            }
                        }
                        _ => {}
                    }
                }
                let speaks_kad = info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL);
                if speaks_kad {
                    for a in info.listen_addrs.into_iter().take(MAX_IDENTIFY_ADDRS) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                connection,
            }) => {
                if let Some(slot) = self.connected.get_mut(&peer) {
                    *slot = Some(rtt);
                }
                if let Some(l) = self
                    .links
                    .get_mut(&peer)
                    .and_then(|l| l.get_mut(&connection))
                {
                    l.rtt = Some(rtt);
                }
            }
            BehaviourEvent::AutonatClient(autonat::v2::client::Event {
                tested_addr,
                server,
                result,
                ..
            }) => {
                match &result {
                    Ok(()) => tracing::info!("{server} dialed us back on {tested_addr}"),
                    Err(e) => tracing::debug!("{server} could not dial us on {tested_addr}: {e}"),
                }
                self.reach.probed(result.is_ok());
                self.reserve_relays();
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            }) => {
                tracing::info!("reserved a relay slot on {relay_peer_id}");
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                self.punching.remove(&remote_peer_id);
                match result {
                    Ok(direct) => {
                        self.stats.hole_punch_ok.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("hole punched: a direct connection to {remote_peer_id}");
                        // Sessions use the direct connection from now on: close the
                        // relayed ones (libp2p-stream would pick either at random).
                        let relayed: Vec<ConnectionId> = self
                            .links
                            .get(&remote_peer_id)
                            .map(|l| {
                                l.iter()
                                    .filter(|(id, l)| l.relayed && **id != direct)
                                    .map(|(id, _)| *id)
                                    .collect()
                            })
                            .unwrap_or_default();
                        for id in relayed {
                            self.swarm.close_connection(id);
                        }
                    }
                    Err(e) => {
                        self.stats.hole_punch_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            "hole punch to {remote_peer_id} failed (staying relayed): {e}"
                        );
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(r),
                step,
                stats,
            }) => {
                let Some(q) = self.provider_queries.get_mut(&id) else {
                    return;
                };
                let mut fresh = Vec::new();
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r {
                    for p in providers {
                        if q.found.len() < MAX_PROVIDERS && !q.found.contains(&p) {
                            q.found.push(p);
                            fresh.push(p);
                        }
                    }
                }
                // Each node near the key answers with a random K of the providers it
                // holds (see [`super::dht`]): the lookup runs to its end, so that the
                // answers of all of them add up, unless it has all it may hold.
                let done = step.last || q.found.len() >= MAX_PROVIDERS;
                // Dial new providers now: the addresses that came with them live only
                // as long as the lookup (libp2p-kad keeps them in the query, and dials
                // later know only its routing table). At most MAX_PROVIDERS a lookup,
                // within the connection caps; the gather that asked waits for them.
                let me = *self.swarm.local_peer_id();
                for p in fresh {
                    if p != me && !self.connected.contains_key(&p) {
                        let _ = self.swarm.dial(DialOpts::peer_id(p).build());
                    }
                }
                if done {
                    self.end_lookup(id, Some(stats.num_requests()));
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(_) | kad::QueryResult::RepublishProvider(_),
                stats,
                step,
                ..
            }) if step.last && stats.num_successes() == 0 && self.providing.is_some() => {
                tracing::debug!("provider record reached no DHT node; again on the next peer");
                self.provide_unplaced = true;
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                is_new_peer: true, ..
            }) if self.providing.is_some() => {
                let (before, at) = self.provided_at;
                let grown =
                    self.routing_entries() >= 2 * before.max(1) && at.elapsed() >= REPROVIDE_GAP;
                if (self.provide_unplaced || grown)
                    && let Some(m) = self.providing
                {
                    self.publish_provider_record(m);
                }
            }
            BehaviourEvent::Kad(kad::Event::InboundRequest { request }) => {
                self.stats.dht_requests_in.fetch_add(1, Ordering::Relaxed);
                let kind = match request {
                    kad::InboundRequest::FindNode { .. } => Some(&self.stats.dht_find_node_in),
                    kad::InboundRequest::GetProvider { .. } => {
                        Some(&self.stats.dht_get_providers_in)
                    }
                    kad::InboundRequest::AddProvider { .. } => {
                        Some(&self.stats.dht_add_provider_in)
                    }
                    _ => None,
                };
                if let Some(k) = kind {
                    k.fetch_add(1, Ordering::Relaxed);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, _) in gone {
                    self.publisher.remove_target(&peer);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer == *self.swarm.local_peer_id() {
                        continue;
                    }
                    self.swarm.add_peer_address(peer, addr.clone());
                    if !self.make_entry(peer) {
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
                    request_id,
                    request,
                    channel,
                } => {
                    self.stats.announce_in.fetch_add(1, Ordering::Relaxed);
                    let answer = self.publisher.answer_request(&peer, request_id, request);
                    let sent = self
                        .swarm
                        .behaviour_mut()
                        .announce
                        .send_response(channel, answer);
                    if sent.is_err() {
                        self.publisher.answer_gone(request_id);
                    }
                    self.count_lists();
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    // A publish answered, accepted or refused, counts as acknowledged.
                    self.publisher.settled(request_id);
                    if let Some(reply) = self.pending_announce.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            BehaviourEvent::Announce(
                request_response::Event::ResponseSent { request_id, .. }
                | request_response::Event::InboundFailure { request_id, .. },
            ) => {
                self.publisher.answer_gone(request_id);
                self.count_lists();
            }
            BehaviourEvent::Announce(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                self.publisher.settled(request_id);
                if let Some(reply) = self.pending_announce.remove(&request_id) {
                    let _ = reply.send(Err(error));
                }
            }
            _ => {}
        }
    }
}
