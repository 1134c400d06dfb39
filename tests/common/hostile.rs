//! A hostile peer built from Pollen's own crates, for the hostile-peer tests and benches
//! (`tests/hostile.rs`, `tests/verify.rs`, `node/benches/{hostile,verify}.rs`, which
//! include this file with `#[path]`): a bare client node dialed into the bootstrap,
//! announcements signed by fresh keys, a forged claim of every block, and an `Open` that
//! names a peer that is no server as the next hop.
#![allow(dead_code, missing_docs, unreachable_pub, clippy::unwrap_used)]

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use pollen_node::client::Hop;
use pollen_node::net::{self, NetConfig, NetHandle, Role};
use pollen_protocol::{
    Announcement, BlockRange, InferRequest, InferResponse, ModelId, PeerIdBytes, RouteHop,
    SessionBudget, SessionId, SignedAnnouncement, WireDType,
};
use std::net::TcpListener;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A client node listening on 127.0.0.1, connected to the bootstrap at `boot`: its
/// handle and the bootstrap's peer id. It runs until `cancel`.
pub async fn client_node(boot: &Multiaddr, cancel: &CancellationToken) -> (NetHandle, PeerId) {
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        ..NetConfig::new(Role::Client)
    };
    let (net, _task) = net::start(cfg, cancel.clone()).unwrap();
    let boot_peer = net.dial(boot.clone()).await.unwrap();
    (net, boot_peer)
}

/// An announcement of `blocks` of `model` from a fresh key, named `name`, claiming 1e9
/// tokens/s and room for everyone at `127.0.0.1:1` for ten minutes.
pub fn announcement(
    model: ModelId,
    blocks: (u32, u32),
    compute: &str,
    num_blocks: u32,
    name: &str,
) -> SignedAnnouncement {
    let key = Keypair::generate_ed25519();
    let now = pollen_node::clock::unix_ms();
    let a = Announcement {
        peer: PeerIdBytes(key.public().to_peer_id().to_bytes()),
        model_id: model,
        model_name: name.into(),
        num_blocks,
        blocks: BlockRange::new(blocks.0, blocks.1).unwrap(),
        throughput: 1e9,
        free_sessions: 1000,
        free_cache_tokens: 1 << 30,
        addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
        compute: compute.into(),
        next_rtts: vec![],
        issued_at_ms: now,
        expires_at_ms: now + 600_000,
        seq: 1,
    };
    SignedAnnouncement::sign(a, &net::identity::ed25519_secret(&key).unwrap()).unwrap()
}

/// A socket on 127.0.0.1 that accepts connections and never speaks, and its address.
pub fn silent_listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("/ip4/127.0.0.1/tcp/{}", l.local_addr().unwrap().port());
    (l, addr)
}

/// A forged claim, signed by a fresh key: a real server's announcement (the first the
/// bootstrap at `boot` lists; same model, same compute mode) made to claim all 30
/// blocks at 1e9 tokens/s at `dead`, and published from a server node of its own until
/// `cancel`. The node, the forger's peer id and the model.
pub async fn forge_claim(
    boot: &Multiaddr,
    dead: String,
    cancel: CancellationToken,
) -> (NetHandle, PeerId, ModelId) {
    let secret: [u8; 32] = rand::random();
    let keypair = Keypair::ed25519_from_bytes(secret).unwrap();
    let me = keypair.public().to_peer_id();
    let cfg = NetConfig {
        keypair,
        ..NetConfig::new(Role::Server)
    };
    let (net, _task) = net::start(cfg, cancel).unwrap();
    net.dial_with_retry(boot, Duration::from_secs(15))
        .await
        .unwrap();
    let book = net.gather(None).await.unwrap();
    let mut a = book.first().expect("a real server").announcement().clone();
    let now = pollen_node::clock::unix_ms();
    let ttl = a.expires_at_ms - a.issued_at_ms;
    a.peer = PeerIdBytes(me.to_bytes());
    a.blocks = BlockRange::new(0, 30).unwrap();
    a.throughput = 1e9;
    a.addrs = vec![dead];
    a.next_rtts = Vec::new();
    (a.issued_at_ms, a.expires_at_ms, a.seq) = (now, now + ttl, 1);
    let model = a.model_id;
    let signed = SignedAnnouncement::sign(a, &secret).unwrap();
    net.set_own_announcement_and_wait(Some(signed), Duration::from_secs(10))
        .await
        .unwrap();
    (net, me, model)
}

/// `first` as a hop on the wire.
pub fn wire_hop(first: &Hop) -> RouteHop {
    RouteHop {
        peer: PeerIdBytes(first.peer.to_bytes()),
        blocks: pollen_node::blocks::to_wire(first.blocks).unwrap(),
        addrs: first.addrs.iter().map(|a| a.to_string()).collect(),
        step_us: first.step_us,
    }
}

/// A hop after `first` to the last block, by a random peer that is no server, at `addr`.
pub fn nobody_after(first: &RouteHop, num_blocks: u32, addr: String) -> RouteHop {
    RouteHop {
        peer: PeerIdBytes(PeerId::random().to_bytes()),
        blocks: BlockRange::new(first.blocks.end(), num_blocks).unwrap(),
        addrs: vec![addr],
        step_us: 1,
    }
}

/// Sends `client`'s `Open` of a 16-token session along `route` to the server of its first
/// hop, `first`; its answer.
pub async fn open_through(
    client: &NetHandle,
    first: &Hop,
    model: ModelId,
    compute: &str,
    route: Vec<RouteHop>,
) -> Result<InferResponse, String> {
    let request = InferRequest::Open {
        session: SessionId(rand::random()),
        model_id: model,
        route,
        hop: 0,
        budget: SessionBudget {
            max_tokens: 16,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 10_000,
            open_within_ms: 20_000,
        },
        wire_dtype: WireDType::F32,
        compute: compute.into(),
        client: PeerIdBytes(client.peer_id().to_bytes()),
    };
    net::stream::open_with_reply::<_, InferResponse>(
        client,
        first.peer,
        first.addrs.clone(),
        &request,
        Duration::from_secs(20),
        Duration::from_secs(20),
    )
    .await
    .map(|(_, _, answer)| answer)
    .map_err(|e| e.to_string())
}
