//! Nodes on libp2p's in-process transport (`/memory/N`: real swarms, noise and
//! yamux, no sockets) and the announcements of model-less servers, for the DHT
//! test and the discovery bench (`node/tests/dht.rs`, `node/benches/discovery.rs`
//! include this file with `#[path]`).
#![allow(dead_code, missing_docs, unreachable_pub, clippy::unwrap_used)]

use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use pollen_node::net::{self, NetConfig, NetHandle, Role};
use pollen_protocol::{Announcement, BlockRange, ModelId, PeerIdBytes, SignedAnnouncement};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A node on the in-process transport (clients listen too, on `/memory/0`, so that
/// they are built on it and can dial the others) and its listen address with `/p2p`.
pub async fn start(role: Role, cancel: &CancellationToken) -> (NetHandle, Keypair, Multiaddr) {
    let key = Keypair::generate_ed25519();
    let (handle, _task) = net::start(
        NetConfig {
            keypair: key.clone(),
            listen: vec!["/memory/0".parse().unwrap()],
            ..NetConfig::new(role)
        },
        cancel.clone(),
    )
    .unwrap();
    let addr = handle
        .wait_listening(1, Duration::from_secs(5))
        .await
        .unwrap()
        .first()
        .expect("the node listens")
        .clone()
        .with(Protocol::P2p(handle.peer_id()));
    (handle, key, addr)
}

/// The signed announcement of a server of `model` named `name`, holding blocks
/// `start..start + 3` of 30, reachable at `addr`, valid for `ttl_ms`.
pub fn announce(
    key: &Keypair,
    model: ModelId,
    name: &str,
    start: u32,
    addr: &str,
    seq: u64,
    ttl_ms: u64,
) -> SignedAnnouncement {
    let now = pollen_node::clock::unix_ms();
    let a = Announcement {
        peer: PeerIdBytes(key.public().to_peer_id().to_bytes()),
        model_id: model,
        model_name: name.into(),
        num_blocks: 30,
        blocks: BlockRange::new(start, start + 3).unwrap(),
        throughput: 100.0,
        free_sessions: 8,
        free_cache_tokens: 16384,
        addrs: vec![addr.to_string()],
        compute: "fast-vnni".into(),
        next_rtts: vec![],
        issued_at_ms: now,
        expires_at_ms: now + ttl_ms,
        seq,
    };
    SignedAnnouncement::sign(a, &net::identity::ed25519_secret(key).unwrap()).unwrap()
}
