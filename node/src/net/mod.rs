//! The libp2p side of a node.
//!
//! One task owns the [`libp2p::Swarm`] and runs its event loop ([`event_loop`]); the
//! rest of the program holds a cloneable [`NetHandle`] that sends it commands with
//! `oneshot` replies (the shape of rust-libp2p's file-sharing example). Session streams
//! (`/pollen/infer/6`) are opened and accepted through libp2p-stream's `Control`, which
//! the handle carries, so inference traffic never queues behind the event loop.
//!
//! Rooms: [`transport`] builds the swarm, [`behaviour`] composes the protocols,
//! [`handle`] is the command side, [`event_loop`] the task, [`publish`] the
//! announcement policy, [`book`] the verified announcements, [`dht`] the DHT's
//! record store, [`stream`] the framed session streams, [`codec`] the
//! request-response frames, [`identity`] the key file.

mod behaviour;
pub mod book;
pub mod codec;
pub mod dht;
pub mod error;
mod event_loop;
pub mod handle;
pub mod identity;
pub mod ip_cap;
pub mod private;
pub mod publish;
mod reach;
pub mod stream;
pub mod transport;

pub use behaviour::{Behaviour, BehaviourEvent};
pub use error::{NetError, NetResult};
pub use handle::{NetHandle, NetStats, Path, PeerInfo, Reachability};

use codec::FrameCodec;
use event_loop::EventLoop;
use libp2p::{Multiaddr, PeerId, identity::Keypair};
use pollen_protocol::{AnnounceRequest, AnnounceResponse, Hello, HelloReply, Roles};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Frames of the announcement protocol.
pub type AnnounceCodec = FrameCodec<AnnounceRequest, AnnounceResponse>;
/// Frames of the version handshake.
pub type HelloCodec = FrameCodec<Hello, HelloReply>;

/// Depth of the command queue to the swarm task.
const COMMAND_QUEUE: usize = 1024;

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
    /// Addresses to listen on (none for a pure client). When there are some and all are
    /// `/memory/N`, the node runs on the in-process transport ([`transport::uses_memory`]).
    pub listen: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// The node's role.
    pub role: Role,
    /// The protocol version this node speaks ([`pollen_protocol::PROTOCOL_VERSION`]; tests change it).
    pub protocol_version: u32,
    /// Caps on connections.
    pub caps: ConnectionCaps,
    /// Run a relay v2 server for nodes behind NAT (always on for bootstraps).
    pub relay: bool,
    /// When set, only these peers may connect (a private mesh's allowlist; more can be
    /// allowed later with [`NetHandle::allow_peer`]).
    pub allow_peers: Option<Vec<PeerId>>,
    /// A private mesh's swarm key and allowlist file ([`private::MeshConfig`]);
    /// [`NetConfig::new`] takes this process's ([`private::process_mesh`]: public unless
    /// the binary installed `--swarm-key` or `--allow-peers`).
    pub mesh: private::MeshConfig,
}

/// A server's network settings from its command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct NetOptions {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub caps: ConnectionCaps,
    /// Run a relay for nodes behind NAT (as every bootstrap does): use it on a server
    /// with a public address, so that the swarm keeps relays when bootstraps are gone.
    #[arg(long)]
    pub relay: bool,
}

/// Caps on a node's connections, enforced by libp2p's connection-limits behaviour
/// before any protocol runs. The defaults are far above what a swarm of a thousand
/// servers needs (a node connects to the servers of its routes, a bootstrap to every
/// server), so only a flood reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ConnectionCaps {
    /// Most connections established at once, in and out together.
    #[arg(long, default_value_t = ConnectionCaps::DEFAULT.max_connections)]
    pub max_connections: u32,
    /// Most connections established with one peer (a relayed and a direct one, TCP and
    /// QUIC, both directions).
    #[arg(long, default_value_t = ConnectionCaps::DEFAULT.max_connections_per_peer)]
    pub max_connections_per_peer: u32,
    /// Most incoming connections from one IP address (in their handshake or
    /// established; relayed ones are not counted).
    #[arg(long, default_value_t = ConnectionCaps::DEFAULT.max_connections_per_ip,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,
    /// Most incoming connections still in their handshake at once.
    #[arg(long, default_value_t = ConnectionCaps::DEFAULT.max_pending_incoming)]
    pub max_pending_incoming: u32,
    /// Most outgoing dials in progress at once.
    #[arg(long, default_value_t = ConnectionCaps::DEFAULT.max_pending_outgoing)]
    pub max_pending_outgoing: u32,
}

impl ConnectionCaps {
    /// The defaults: 8,192 connections, 8 per peer, 256 incoming from one IP address,
    /// 256 pending each way.
    pub const DEFAULT: ConnectionCaps = ConnectionCaps {
        max_connections: 8192,
        max_connections_per_peer: 8,
        max_connections_per_ip: 256,
        max_pending_incoming: 256,
        max_pending_outgoing: 256,
    };

    /// libp2p's limits for these caps.
    pub fn limits(&self) -> libp2p::connection_limits::ConnectionLimits {
        libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established(Some(self.max_connections))
            .with_max_established_per_peer(Some(self.max_connections_per_peer))
            .with_max_pending_incoming(Some(self.max_pending_incoming))
            .with_max_pending_outgoing(Some(self.max_pending_outgoing))
    }
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl NetConfig {
    /// A configuration for `role` with a fresh identity (or this process's
    /// `--client-identity`), this process's mesh, no listen address and no mDNS.
    pub fn new(role: Role) -> Self {
        let mesh = private::process_mesh();
        Self {
            keypair: mesh
                .identity
                .clone()
                .unwrap_or_else(Keypair::generate_ed25519),
            listen: Vec::new(),
            mdns: false,
            role,
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
            caps: ConnectionCaps::DEFAULT,
            relay: false,
            allow_peers: None,
            mesh,
        }
    }
}

/// Builds the swarm, starts listening and spawns its task, which stops when `cancel`
/// fires (or every handle is dropped); the task's handle is returned for the caller's
/// shutdown to await.
pub fn start(
    cfg: NetConfig,
    cancel: CancellationToken,
) -> NetResult<(NetHandle, tokio::task::JoinHandle<()>)> {
    let peer_id = cfg.keypair.public().to_peer_id();
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
    if cfg.mesh.is_private() {
        private::check_tcp_only(&cfg.listen).map_err(|e| NetError::Setup {
            what: "a private mesh's listen addresses".into(),
            reason: e.to_string(),
        })?;
        if transport::uses_memory(&cfg) {
            return Err(NetError::Setup {
                what: "a private mesh on the in-process transport".into(),
                reason: "the swarm key runs on TCP only".into(),
            });
        }
    }
    for addr in &cfg.listen {
        port_free(addr).map_err(|e| NetError::Setup {
            what: format!("cannot listen on {addr}"),
            reason: e.to_string(),
        })?;
    }
    let mut swarm = transport::build(&cfg)?;
    for addr in &cfg.listen {
        swarm.listen_on(addr.clone()).map_err(|e| NetError::Setup {
            what: format!("cannot listen on {addr}"),
            reason: e.to_string(),
        })?;
    }
    let control = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let stats = Arc::new(NetStats::default());
    let handle = NetHandle {
        tx,
        peer_id,
        stats: stats.clone(),
        control,
    };
    let event_loop = EventLoop {
        stats,
        hello,
        swarm,
        commands: rx,
        refused: HashMap::new(),
        pending_dials: HashMap::new(),
        pending_announce: HashMap::new(),
        publisher: publish::Publisher::default(),
        connected: HashMap::new(),
        agents: HashMap::new(),
        listen_addrs: Vec::new(),
        reach: reach::Reach::new(cfg.role, !cfg.listen.is_empty()),
        links: HashMap::new(),
        punching: std::collections::HashSet::new(),
        connect_waiters: HashMap::new(),
        provider_queries: HashMap::new(),
        providing: None,
        provide_unplaced: false,
        provided_at: (0, std::time::Instant::now()),
        dialed_addrs: HashMap::new(),
    };
    let task = tokio::spawn(event_loop.run(cancel));
    Ok((handle, task))
}

/// Whether a TCP listen address's port is free, where it names one: libp2p's TCP
/// listeners share their port with any other socket that allows it (they reuse ports to
/// dial from them), so a second node on a taken port would start and then answer in
/// turns with the first. A plain bind, which shares with nobody, finds the port taken.
fn port_free(addr: &Multiaddr) -> std::io::Result<()> {
    use libp2p::multiaddr::Protocol;
    let mut it = addr.iter();
    let ip: std::net::IpAddr = match it.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    match it.next() {
        Some(Protocol::Tcp(port)) if port != 0 => std::net::TcpListener::bind((ip, port)).map(drop),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod port_tests {
    #![allow(clippy::unwrap_used)]
    use super::port_free;

    #[test]
    fn a_taken_tcp_port_is_found_and_other_addresses_pass() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let addr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        let e = port_free(&addr).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        drop(taken);
        port_free(&addr).unwrap();
        for free in [
            "/ip4/127.0.0.1/tcp/0",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "/memory/0",
        ] {
            port_free(&free.parse().unwrap()).unwrap();
        }
    }
}
