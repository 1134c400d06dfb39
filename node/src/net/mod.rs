//! The libp2p side of a node.
//!
//! One task owns the [`libp2p::Swarm`] and runs its event loop ([`event_loop`]); the
//! rest of the program holds a cloneable [`NetHandle`] that sends it commands with
//! `oneshot` replies (the shape of rust-libp2p's file-sharing example). Session streams
//! (`/pollen/infer/2`) are opened and accepted through libp2p-stream's `Control`, which
//! the handle carries, so inference traffic never queues behind the event loop.
//!
//! Rooms: [`transport`] builds the swarm, [`behaviour`] composes the protocols,
//! [`handle`] is the command side, [`event_loop`] the task, [`publish`] the
//! announcement policy, [`book`] the verified announcements, [`stream`] the framed
//! session streams, [`codec`] the request-response frames, [`identity`] the key file.

mod behaviour;
pub mod book;
pub mod codec;
pub mod error;
mod event_loop;
pub mod handle;
pub mod identity;
pub mod publish;
pub mod stream;
pub mod transport;

pub use behaviour::{Behaviour, BehaviourEvent};
pub use error::{NetError, NetResult};
pub use handle::{NetHandle, NetStats, PeerInfo};

use codec::FrameCodec;
use event_loop::EventLoop;
use libp2p::{Multiaddr, identity::Keypair};
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
}

impl NetConfig {
    /// A configuration for `role` with a fresh identity, no listen address and no mDNS.
    pub fn new(role: Role) -> Self {
        Self {
            keypair: Keypair::generate_ed25519(),
            listen: Vec::new(),
            mdns: false,
            role,
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
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
    };
    let task = tokio::spawn(event_loop.run(cancel));
    Ok((handle, task))
}
