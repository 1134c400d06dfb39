//! The composed libp2p protocols of a node. (A module of its own because the
//! derive macro generates an undocumented event enum.)
#![allow(missing_docs)]

use super::{AnnounceCodec, HelloCodec};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, identify, kad, mdns, ping, relay,
    request_response,
};

/// The composed protocols of a Pollen node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Caps on connections: per peer and in total, established and pending. First, so
    /// that a connection beyond a cap is refused before any other protocol sees it.
    pub limits: connection_limits::Behaviour,
    /// The cap on incoming connections from one IP address.
    pub per_ip: super::ip_cap::IpCap,
    /// Peers refused at the connection gate ([`super::NetHandle::block_peer`]).
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// When set, only these peers may connect ([`super::NetHandle::allow_peer`]): the
    /// allowlist of a private mesh.
    /// The gate is [`super::private::MeshGate`]: it logs each refused peer once and
    /// reloads the `--allow-peers` file.
    pub allowed: Toggle<super::private::MeshGate>,
    /// Exchanges listen addresses and protocols with every peer.
    pub identify: identify::Behaviour,
    /// Keeps connections alive and measures round-trip times for routing.
    pub ping: ping::Behaviour,
    /// The DHT: peer routing, and provider records under each served model's id.
    pub kad: kad::Behaviour<super::dht::ProviderStore>,
    /// Finds peers on the local network (off with `--no-mdns`).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Relay v2 server for nodes behind NAT (bootstraps, and servers with `--relay`).
    pub relay: Toggle<relay::Behaviour>,
    /// AutoNAT v1 server (bootstrap nodes), for nodes of earlier versions.
    pub autonat: Toggle<autonat::Behaviour>,
    /// The version handshake every connection starts with.
    pub hello: request_response::Behaviour<HelloCodec>,
    /// Publishing and listing signed announcements.
    pub announce: request_response::Behaviour<AnnounceCodec>,
    /// Session streams (`/pollen/infer/6`), opened and accepted through its `Control`
    /// outside the swarm task, so that no session waits on the event loop.
    pub stream: libp2p_stream::Behaviour,
    /// Relay v2 client: reserves a slot on a relay when this node is not reachable,
    /// and dials peers through relays (off on the in-process transport).
    pub relay_client: Toggle<relay::client::Behaviour>,
    /// Hole punching: upgrades a relayed connection to a direct one (DCUtR).
    pub dcutr: Toggle<dcutr::Behaviour>,
    /// AutoNAT v2 client: asks peers to dial our candidate addresses back, so the node
    /// learns whether it is publicly reachable (servers and bootstraps).
    pub autonat_client: Toggle<autonat::v2::client::Behaviour>,
    /// AutoNAT v2 server: dials other nodes' candidate addresses back for them.
    pub autonat_server: Toggle<autonat::v2::server::Behaviour>,
}
