//! The composed libp2p protocols of a node. (A module of its own because the
//! derive macro generates an undocumented event enum.)
#![allow(missing_docs)]

use super::{AnnounceCodec, HelloCodec};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{autonat, identify, kad, mdns, ping, relay, request_response};

/// The composed protocols of a Pollen node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Exchanges listen addresses and protocols with every peer.
    pub identify: identify::Behaviour,
    /// Keeps connections alive and measures round-trip times for routing.
    pub ping: ping::Behaviour,
    /// The DHT: peer routing across the swarm.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Finds peers on the local network (off with `--no-mdns`).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Relay v2 server for nodes behind NAT (bootstrap nodes only).
    pub relay: Toggle<relay::Behaviour>,
    /// AutoNAT: tells peers whether they are reachable (server on bootstrap nodes).
    pub autonat: Toggle<autonat::Behaviour>,
    /// The version handshake every connection starts with.
    pub hello: request_response::Behaviour<HelloCodec>,
    /// Publishing and listing signed announcements.
    pub announce: request_response::Behaviour<AnnounceCodec>,
    /// Session streams (`/pollen/infer/2`), opened and accepted through its `Control`
    /// outside the swarm task, so that no session waits on the event loop.
    pub stream: libp2p_stream::Behaviour,
}
