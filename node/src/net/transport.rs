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
    Multiaddr, StreamProtocol, Swarm, allow_block_list, autonat, connection_limits, dcutr,
    identify, kad, mdns, noise, ping, relay, tcp, yamux,
};
use pollen_protocol::{ANNOUNCE_PROTOCOL, HELLO_PROTOCOL};
use std::time::Duration;

/// Identify's protocol name for Pollen nodes.
pub const IDENTIFY_PROTOCOL: &str = "/pollen/id/1";
/// Kademlia's protocol name for the Pollen DHT.
pub const KAD_PROTOCOL: &str = "/pollen/kad/1";
/// How long a connection with no open stream is kept.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
/// Provider records of a served model live this long without being republished ...
const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(180);
/// ... and are republished this often, so a server that leaves drops out of the DHT
/// within minutes while one that stays never does.
const PROVIDER_REPUBLISH: Duration = Duration::from_secs(60);
/// Most providers of one model each DHT node keeps (libp2p's default is 20); it
/// answers each lookup with a random 20 of them ([`super::dht`]).
const MAX_PROVIDERS_PER_MODEL: usize = 512;
/// Most bytes of one DHT message. libp2p's 16 KiB default is too small for an answer
/// that carries 20 providers and 20 closer peers with several addresses each (QUIC,
/// TCP, relayed; about 400 bytes a peer), which then fails to decode and is lost.
const MAX_DHT_MESSAGE: usize = 64 * 1024;
/// DHT requests a lookup keeps in flight (libp2p's default is 3): a lookup's hops
/// take one round trip each either way, and more at once reach the nodes nearest the
/// key sooner, when a young routing table points the first steps the wrong way.
const DHT_PARALLELISM: usize = 6;

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
    let cfg2 = cfg.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| -> Result<_, BoxError> {
            Ok(MemoryTransport::default()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| setup("building the in-process transport", e))?
        .with_behaviour(|key| behaviour(key, &cfg2, false, None))
        .map_err(|e| setup("building the node's protocols", e))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

/// The swarm on TCP with noise and yamux, QUIC and DNS.
fn build_on_network(cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    if let Some(keys) = cfg.mesh.keys.clone() {
        return build_private(cfg, keys);
    }
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
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup("building the relay client", e))?
        .with_behaviour(|key, relay_client| behaviour(key, cfg, use_mdns, Some(relay_client)))
        .map_err(|e| setup("building the node's protocols", e))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

/// A private mesh's swarm ([`super::private`]): TCP under the swarm key (pnet), then
/// noise and yamux, and DNS and the relay client as on the public network; no QUIC,
/// which cannot carry a pre-shared key.
fn build_private(
    cfg: &NetConfig,
    keys: std::sync::Arc<super::private::KeyRing>,
) -> Result<Swarm<Behaviour>, NetError> {
    let use_mdns = cfg.mdns;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_other_transport(|key| -> Result<_, BoxError> {
            Ok(super::private::tcp_transport(key, keys)?)
        })
        .map_err(|e| setup("building the private mesh's TCP transport", e))?
        .with_dns()
        .map_err(|e| setup("building the DNS resolver", e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup("building the relay client", e))?
        .with_behaviour(|key, relay_client| behaviour(key, cfg, use_mdns, Some(relay_client)))
        .map_err(|e| setup("building the node's protocols", e))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

fn swarm_config(c: SwarmConfig) -> SwarmConfig {
    c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
}

/// The relay server's limits: libp2p's defaults (16 circuits of 128 KiB for 2 minutes)
/// suit signalling, not inference sessions that run through a relay when hole punching
/// fails. Circuits stay capped per peer.
fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: 1024,
        max_reservations_per_peer: 4,
        max_circuits: 256,
        max_circuits_per_peer: 16,
        max_circuit_duration: Duration::from_secs(60 * 60),
        max_circuit_bytes: 1 << 30,
        ..relay::Config::default()
    }
}

/// The composed protocols of a node with `cfg`'s role and caps; `relay_client` is
/// `None` on the in-process transport.
fn behaviour(
    key: &Keypair,
    cfg: &NetConfig,
    use_mdns: bool,
    relay_client: Option<relay::client::Behaviour>,
) -> Result<Behaviour, BoxError> {
    let role = cfg.role;
    let local = key.public().to_peer_id();
    let agent = format!("pollen/{}", env!("CARGO_PKG_VERSION"));
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public()).with_agent_version(agent),
    );
    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(Duration::from_secs(30));
    kad_cfg.set_provider_record_ttl(Some(PROVIDER_RECORD_TTL));
    kad_cfg.set_provider_publication_interval(Some(PROVIDER_REPUBLISH));
    kad_cfg.set_max_packet_size(MAX_DHT_MESSAGE);
    kad_cfg.set_parallelism(
        std::num::NonZeroUsize::new(DHT_PARALLELISM).ok_or("DHT parallelism is zero")?,
    );
    let store = super::dht::ProviderStore::new(
        local,
        kad::store::MemoryStoreConfig {
            max_providers_per_key: MAX_PROVIDERS_PER_MODEL,
            ..Default::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(local, store, kad_cfg);
    kad.set_mode(Some(match role {
        Role::Client => kad::Mode::Client,
        Role::Server | Role::Bootstrap => kad::Mode::Server,
    }));
    let mdns = if use_mdns {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
    } else {
        None
    };
    let relay = (role == Role::Bootstrap || cfg.relay)
        .then(|| relay::Behaviour::new(local, relay_config()));
    let on_network = relay_client.is_some();
    let listens = role != Role::Client;
    let autonat_client = (on_network && listens).then(autonat::v2::client::Behaviour::default);
    let autonat_server = (on_network && listens).then(autonat::v2::server::Behaviour::default);
    let dcutr = on_network.then(|| dcutr::Behaviour::new(local));
    let allowed = cfg.mesh.gate(cfg.allow_peers.as_deref());
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
        limits: connection_limits::Behaviour::new(cfg.caps.limits()),
        per_ip: super::ip_cap::IpCap::new(cfg.caps.max_connections_per_ip),
        blocked: allow_block_list::Behaviour::default(),
        allowed: allowed.into(),
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
        relay_client: relay_client.into(),
        dcutr: dcutr.into(),
        autonat_client: autonat_client.into(),
        autonat_server: autonat_server.into(),
    })
}
