//! Builds a node's swarm: transports (TCP with noise and yamux, QUIC, DNS) and the
//! composed protocols, configured for the node's role.
//!
//! A node whose every listen address is `/memory/N` is built on libp2p's in-process
//! [`MemoryTransport`] instead (with the same noise and yamux upgrades and no mDNS):
//! no socket is opened, so tests can run whole swarms in one process, under paused
//! tokio time, without real I/O racing the virtual clock.

use super::error::NetError;
use super::{Behaviour, NetConfig, Role};
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::{MemoryTransport, Transport};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::Config as SwarmConfig;
use libp2p::{
    Multiaddr, StreamProtocol, Swarm, autonat, identify, kad, mdns, noise, ping, relay, tcp, yamux,
};
use pollen_protocol::{ANNOUNCE_PROTOCOL, HELLO_PROTOCOL};
use std::time::Duration;

/// Identify's protocol name for Pollen nodes.
pub const IDENTIFY_PROTOCOL: &str = "/pollen/id/1";
/// Kademlia's protocol name for the Pollen DHT.
pub const KAD_PROTOCOL: &str = "/pollen/kad/1";
/// How long a connection with no open stream is kept.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn setup(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Setup {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// Whether `addr` is an in-process address (`/memory/N`, nothing else).
pub fn is_memory(addr: &Multiaddr) -> bool {
    let mut parts = addr.iter();
    matches!(
        (parts.next(), parts.next()),
        (Some(Protocol::Memory(_)), None)
    )
}

/// Whether `cfg` asks for the in-process transport: it listens, and only on `/memory/N`.
pub fn uses_memory(cfg: &NetConfig) -> bool {
    !cfg.listen.is_empty() && cfg.listen.iter().all(is_memory)
}

/// The swarm of a node with `cfg`'s identity and role, not yet listening: on the
/// in-process transport when [`uses_memory`], on TCP, QUIC and DNS otherwise.
pub fn build(cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    if uses_memory(cfg) {
        build_in_memory(cfg)
    } else {
        build_on_network(cfg)
    }
}

/// The swarm on libp2p's in-process transport, upgraded like TCP (noise, yamux).
/// mDNS stays off: it needs a UDP socket and could find nothing dialable here.
fn build_in_memory(cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let role = cfg.role;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| -> Result<_, BoxError> {
            Ok(MemoryTransport::default()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| setup("building the in-process transport", e))?
        .with_behaviour(|key| behaviour(key, role, false))
        .map_err(|e| setup("building the node's protocols", e))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

/// The swarm on TCP with noise and yamux, QUIC and DNS.
fn build_on_network(cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let role = cfg.role;
    let use_mdns = cfg.mdns;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup("building the TCP transport", e))?
        .with_quic()
        .with_dns()
        .map_err(|e| setup("building the DNS resolver", e))?
        .with_behaviour(|key| behaviour(key, role, use_mdns))
        .map_err(|e| setup("building the node's protocols", e))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

fn swarm_config(c: SwarmConfig) -> SwarmConfig {
    c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
}

/// The composed protocols of a node with identity `key` and `role`.
fn behaviour(key: &Keypair, role: Role, use_mdns: bool) -> Result<Behaviour, BoxError> {
    let local = key.public().to_peer_id();
    let agent = format!("pollen/{}", env!("CARGO_PKG_VERSION"));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public()).with_agent_version(agent),
    );
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(30));
    let mut kad = kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_cfg);
    kad.set_mode(Some(match role {
        Role::Client => kad::Mode::Client,
        Role::Server | Role::Bootstrap => kad::Mode::Server,
    }));
    let mdns = if use_mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
    } else {
        None
    };
    let relay =
        (role == Role::Bootstrap).then(|| relay::Behaviour::new(local, relay::Config::default()));
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
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
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
        stream: libp2p_stream::Behaviour::new(),
    })
}
