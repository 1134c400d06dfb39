//! Announcements over real in-process swarms on 127.0.0.1: a verified one is
//! listed; unsigned, forged, expired and replayed ones are refused and never
//! listed.
#![allow(clippy::unwrap_used, missing_docs)]

use libp2p::identity::Keypair;
use pollen_node::net::{self, NetConfig, NetHandle, Role};
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, Announcement, BlockRange, ModelId, PeerIdBytes,
    SignedAnnouncement,
};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn node(role: Role, cancel: &CancellationToken) -> (NetHandle, Keypair) {
    node_of_version(role, cancel, pollen_protocol::PROTOCOL_VERSION).await
}

async fn node_of_version(
    role: Role,
    cancel: &CancellationToken,
    version: u32,
) -> (NetHandle, Keypair) {
    node_with(role, cancel, |cfg| cfg.protocol_version = version)
}

/// A node of `role` on 127.0.0.1, its configuration changed by `tune` first.
fn node_with(
    role: Role,
    cancel: &CancellationToken,
    tune: impl FnOnce(&mut NetConfig),
) -> (NetHandle, Keypair) {
    let key = Keypair::generate_ed25519();
    let mut cfg = NetConfig {
        keypair: key.clone(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        role,
        ..NetConfig::new(role)
    };
    tune(&mut cfg);
    let (handle, _task) = net::start(cfg, cancel.clone()).unwrap();
    (handle, key)
}

fn announcement(
    key: &Keypair,
    blocks: (u32, u32),
    issued: u64,
    ttl: u64,
    seq: u64,
) -> Announcement {
    Announcement {
        peer: PeerIdBytes(key.public().to_peer_id().to_bytes()),
        model_id: ModelId::from_bytes([7; 32]),
        model_name: "test".into(),
        num_blocks: 30,
        blocks: BlockRange::new(blocks.0, blocks.1).unwrap(),
        throughput: 100.0,
        free_sessions: 4,
        free_cache_tokens: 8192,
        addrs: vec![],
        compute: "fast-vnni".into(),
        next_rtts: vec![],
        issued_at_ms: issued,
        expires_at_ms: issued + ttl,
        seq,
    }
}

fn sign(key: &Keypair, a: Announcement) -> SignedAnnouncement {
    SignedAnnouncement::sign(a, &net::identity::ed25519_secret(key).unwrap()).unwrap()
}

async fn publish(from: &NetHandle, to: libp2p::PeerId, s: SignedAnnouncement) -> AnnounceResponse {
    from.announce(to, AnnounceRequest::Publish(Box::new(s)))
        .await
        .unwrap()
}

#[tokio::test]
async fn only_verified_fresh_announcements_are_listed() {
    let cancel = CancellationToken::new();
    let (boot, _) = node(Role::Bootstrap, &cancel).await;
    let (server, key) = node(Role::Server, &cancel).await;
    let addr = boot
        .wait_listening(1, Duration::from_secs(5))
        .await
        .unwrap()[0]
        .clone();
    let boot_id = server
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(boot.peer_id())))
        .await
        .unwrap();
    let now = pollen_node::clock::unix_ms();

    // A good one.
    let good = sign(&key, announcement(&key, (0, 10), now, 30_000, 1));
    assert_eq!(
        publish(&server, boot_id, good.clone()).await,
        AnnounceResponse::Accepted
    );

    // Forged: a field changed after signing.
    let mut forged = sign(&key, announcement(&key, (10, 20), now + 1, 30_000, 2));
    forged.announcement.blocks = BlockRange::new(0, 30).unwrap();
    assert!(matches!(
        publish(&server, boot_id, forged).await,
        AnnounceResponse::Refused(_)
    ));

    // Unsigned: an all-zero signature.
    let mut unsigned = sign(&key, announcement(&key, (10, 20), now + 2, 30_000, 3));
    unsigned.signature = [0; 64];
    assert!(matches!(
        publish(&server, boot_id, unsigned).await,
        AnnounceResponse::Refused(_)
    ));

    // Someone else's peer id under our key.
    let other = Keypair::generate_ed25519();
    let mut theirs = sign(&other, announcement(&other, (10, 20), now + 3, 30_000, 4));
    theirs.public_key = good.public_key;
    assert!(matches!(
        publish(&server, boot_id, theirs).await,
        AnnounceResponse::Refused(_)
    ));

    // Expired long ago.
    let old = sign(&key, announcement(&key, (10, 20), now - 600_000, 60_000, 5));
    assert!(matches!(
        publish(&server, boot_id, old).await,
        AnnounceResponse::Refused(_)
    ));

    // A replay of the good one.
    assert!(matches!(
        publish(&server, boot_id, good).await,
        AnnounceResponse::Refused(_)
    ));

    match server
        .announce(boot_id, AnnounceRequest::List { model_id: None })
        .await
        .unwrap()
    {
        AnnounceResponse::List(list) => {
            assert_eq!(list.len(), 1, "only the good announcement is listed");
            assert_eq!(list[0].announcement.blocks, BlockRange::new(0, 10).unwrap());
        }
        other => panic!("unexpected {other:?}"),
    }

    // A short-lived one disappears when it expires.
    let brief = sign(&key, announcement(&key, (0, 10), now + 10, 1_000, 6));
    assert_eq!(
        publish(&server, boot_id, brief).await,
        AnnounceResponse::Accepted
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(
        boot.book(None).await.unwrap().is_empty(),
        "expired entries are not listed"
    );
    cancel.cancel();
}

#[tokio::test]
async fn nodes_of_different_protocol_versions_refuse_each_other_on_both_sides() {
    let cancel = CancellationToken::new();
    let (old, _) = node(Role::Server, &cancel).await;
    let (new, _) =
        node_of_version(Role::Server, &cancel, pollen_protocol::PROTOCOL_VERSION + 1).await;
    let addr = old.wait_listening(1, Duration::from_secs(5)).await.unwrap()[0].clone();
    new.dial(addr.with(libp2p::multiaddr::Protocol::P2p(old.peer_id())))
        .await
        .unwrap();
    let mut seen = (Vec::new(), Vec::new());
    for _ in 0..100 {
        seen = (old.refusals().await.unwrap(), new.refusals().await.unwrap());
        if !seen.0.is_empty() && !seen.1.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (on_old, on_new) = seen;
    assert_eq!(on_old.len(), 1, "the old node refuses the new one");
    assert_eq!(on_new.len(), 1, "the new node learns it was refused");
    for (_, reason) in on_old.iter().chain(&on_new) {
        assert!(reason.contains("protocol version mismatch"), "{reason}");
    }
    assert_eq!(on_old[0].0, new.peer_id());
    assert_eq!(on_new[0].0, old.peer_id());
    cancel.cancel();
}

/// List answers count as bytes in flight while they are sent, and no longer once they
/// are: concurrent lists of a book with bulky entries are all answered, and the
/// bootstrap's count returns to zero (a count that did not would in time refuse every
/// list as busy).
#[tokio::test]
async fn list_answers_in_flight_are_counted_until_sent() {
    let cancel = CancellationToken::new();
    let (boot, _) = node(Role::Bootstrap, &cancel).await;
    let (client, _) = node(Role::Client, &cancel).await;
    let addr = boot
        .wait_listening(1, Duration::from_secs(5))
        .await
        .unwrap()[0]
        .clone();
    let boot_id = client
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(boot.peer_id())))
        .await
        .unwrap();
    let now = pollen_node::clock::unix_ms();
    for i in 0..32u16 {
        let key = Keypair::generate_ed25519();
        let mut a = announcement(&key, (0, 10), now, 60_000, 1);
        a.addrs = (0..8)
            .map(|j| format!("/dns4/host-{i}-{j}.example.org/tcp/4001"))
            .collect();
        assert_eq!(
            publish(&client, boot_id, sign(&key, a)).await,
            AnnounceResponse::Accepted
        );
    }
    let lists = (0..16).map(|_| client.announce(boot_id, AnnounceRequest::List { model_id: None }));
    for answer in futures::future::join_all(lists).await {
        match answer.unwrap() {
            AnnounceResponse::List(list) => assert_eq!(list.len(), 32),
            other => panic!("a list was answered {other:?}"),
        }
    }
    let in_flight = || {
        boot.stats()
            .list_bytes_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight(), 0, "list answers sent are no longer counted");
    cancel.cancel();
}

/// A bootstrap takes at most `--max-connections-per-ip` incoming connections from one
/// address (peer ids cost nothing, so the caps per peer and in total let one host take
/// every slot); one closing frees its place.
#[tokio::test]
async fn incoming_connections_from_one_address_are_capped() {
    let cancel = CancellationToken::new();
    let (boot, _) = node_with(Role::Bootstrap, &cancel, |cfg| {
        cfg.caps.max_connections_per_ip = 2;
    });
    let addr = boot
        .wait_listening(1, Duration::from_secs(5))
        .await
        .unwrap()[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(boot.peer_id()));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let own = cancel.child_token();
        let (c, _) = node(Role::Client, &own).await;
        c.dial(addr.clone()).await.unwrap();
        clients.push((c, own));
    }
    let (third, _) = node(Role::Client, &cancel).await;
    assert!(
        third.dial(addr.clone()).await.is_err(),
        "a third connection from 127.0.0.1"
    );
    // One of the two goes: a new one gets in.
    let (_, first) = clients.remove(0);
    first.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if third.dial(addr.clone()).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed connection frees its place"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
}
