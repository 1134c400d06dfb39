//! The task that owns the swarm: it runs the version handshake, answers and sends
//! announcement requests, tracks connected peers and their round-trip times, and carries
//! out the handle's commands. Session streams bypass it (see [`super::stream`]).

use super::error::NetError;
use super::handle::{Command, NetStats, PeerInfo};
use super::publish::Publisher;
use super::transport::KAD_PROTOCOL;
use super::{Behaviour, BehaviourEvent};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns, ping};
use pollen_protocol::{AnnounceResponse, Hello, HelloReply};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most refused peers remembered.
const MAX_REFUSALS: usize = 256;
/// Most addresses taken from one identify message.
const MAX_IDENTIFY_ADDRS: usize = 16;
/// How often expired announcements are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

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
}

impl EventLoop {
    pub(super) async fn run(mut self, cancel: CancellationToken) {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = prune.tick() => self.publisher.book.prune(),
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
        let req = self.publisher.publish_request()?;
        self.stats.announce_out.fetch_add(1, Ordering::Relaxed);
        Some(self.swarm.behaviour_mut().announce.send_request(&peer, req))
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
                    let _ = reply.send(Ok(self.publisher.answer(&peer, request)));
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
            Command::SetOwn { announcement, done } => {
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
                if let Some((_, reply)) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                    self.publisher.add_target(peer_id);
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                }
                self.publisher
                    .book
                    .connected(peer_id, endpoint.get_remote_address());
                let fresh = self.connected.insert(peer_id, None).is_none();
                if fresh {
                    let hello = self.hello.clone();
                    self.swarm
                        .behaviour_mut()
                        .hello
                        .send_request(&peer_id, hello);
                }
                if fresh
                    && self.publisher.is_target(&peer_id)
                    && let Some(id) = self.publish_to(peer_id)
                {
                    self.publisher.track(vec![id], None);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connected.remove(&peer_id);
                self.agents.remove(&peer_id);
                self.publisher.book.disconnected(&peer_id);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
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
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.agents.insert(peer_id, info.agent_version.clone());
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
                ..
            }) => {
                if let Some(slot) = self.connected.get_mut(&peer) {
                    *slot = Some(rtt);
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
                    let new_target = self.publisher.add_target(peer);
                    if self.connected.contains_key(&peer) {
                        if new_target && let Some(id) = self.publish_to(peer) {
                            self.publisher.track(vec![id], None);
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
                    let answer = self.publisher.answer(&peer, request);
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
                    // A publish answered, accepted or refused, counts as acknowledged.
                    self.publisher.settled(request_id);
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
                self.publisher.settled(request_id);
                if let Some(reply) = self.pending_announce.remove(&request_id) {
                    let _ = reply.send(Err(error));
                }
            }
            _ => {}
        }
    }
}
