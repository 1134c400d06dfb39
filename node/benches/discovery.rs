//! Discovery at scale, in one process: a bootstrap node and N lightweight
//! servers (announcements only, no model) on 127.0.0.1, serving two models. Prints
//! the time until a new client sees all N through the bootstrap, the time until a
//! client that knows only one server's address finds its model's servers in the DHT
//! (provider records), and announcement and DHT messages per node per minute at
//! steady state.
//!
//! `cargo bench -p pollen-node --bench discovery [-- --nodes 200 --ttl 30 --window 60]`
#![allow(clippy::unwrap_used, missing_docs)]

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use pollen_node::net::{self, NetConfig, NetHandle, Role};
use pollen_protocol::{Announcement, BlockRange, ModelId, PeerIdBytes, SignedAnnouncement};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn start(role: Role, cancel: &CancellationToken) -> (NetHandle, Keypair) {
    let key = Keypair::generate_ed25519();
    let listen = if role == Role::Client {
        vec![]
    } else {
        vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
    };
    let (handle, _task) = net::start(
        NetConfig {
            keypair: key.clone(),
            listen,
            mdns: false,
            role,
            protocol_version: pollen_protocol::PROTOCOL_VERSION,
            ..NetConfig::new(role)
        },
        cancel.clone(),
    )
    .unwrap();
    (handle, key)
}

fn announce(key: &Keypair, i: u32, seq: u64, ttl_ms: u64) -> SignedAnnouncement {
    let now = pollen_node::clock::unix_ms();
    let start = (i * 3) % 30;
    let a = Announcement {
        peer: PeerIdBytes(key.public().to_peer_id().to_bytes()),
        model_id: ModelId::from_bytes([(i % 2) as u8; 32]),
        model_name: "scale".into(),
        num_blocks: 30,
        blocks: BlockRange::new(start, start + 3).unwrap(),
        throughput: 100.0,
        free_sessions: 8,
        free_cache_tokens: 16384,
        addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 10000 + i)],
        compute: "fast-vnni".into(),
        next_rtts: vec![],
        issued_at_ms: now,
        expires_at_ms: now + ttl_ms,
        seq,
    };
    SignedAnnouncement::sign(a, &net::identity::ed25519_secret(key).unwrap()).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = arg("--nodes", 200) as u32;
    let ttl = Duration::from_secs(arg("--ttl", 30));
    let window = Duration::from_secs(arg("--window", 60));
    let cancel = CancellationToken::new();
    let (boot, _) = start(Role::Bootstrap, &cancel).await;
    let boot_addr = boot
        .wait_listening(1, Duration::from_secs(5))
        .await
        .unwrap()[0]
        .clone()
        .with(Protocol::P2p(boot.peer_id()));

    let started = Instant::now();
    let mut servers = Vec::new();
    for i in 0..n {
        let (h, key) = start(Role::Server, &cancel).await;
        h.dial(boot_addr.clone()).await.unwrap();
        h.set_own_announcement(Some(announce(&key, i, 1, ttl.as_millis() as u64)))
            .await
            .unwrap();
        servers.push((h, key));
    }
    let joined = started.elapsed();
    eprintln!("{n} servers started in {joined:?}");
    // Servers renew at a third of the TTL, as `pollen serve` does.
    for (i, (h, key)) in servers.iter().enumerate() {
        let (h, key) = (h.clone(), key.clone());
        let ttl_ms = ttl.as_millis() as u64;
        tokio::spawn(async move {
            let mut seq = 1;
            let mut tick = tokio::time::interval(ttl / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                seq += 1;
                if h.set_own_announcement(Some(announce(&key, i as u32, seq, ttl_ms)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }

    // A new client: connect to the bootstrap, ask for the swarm.
    let t0 = Instant::now();
    let (client, _) = start(Role::Client, &cancel).await;
    client.dial(boot_addr.clone()).await.unwrap();
    let mut seen = 0;
    while t0.elapsed() < Duration::from_secs(30) {
        seen = client.gather(None).await.unwrap().len();
        if seen >= n as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let discovery = t0.elapsed();
    eprintln!("a new client saw {seen} through the bootstrap in {discovery:?}");

    // The DHT: clients that know only one server's address look up the providers of
    // model 0 (served by the even servers), with no bootstrap involved.
    let holders = n.div_ceil(2) as usize;
    let model = ModelId::from_bytes([0; 32]);
    let mut lookups = Vec::new();
    for trial in 0..5usize {
        let (entry, _) = &servers[(trial * 37 + 11) % servers.len()];
        let entry_addr = entry.listen_addrs().await.unwrap()[0]
            .clone()
            .with(Protocol::P2p(entry.peer_id()));
        let (c, _) = start(Role::Client, &cancel).await;
        let t = Instant::now();
        c.dial(entry_addr).await.unwrap();
        let mut found = Vec::new();
        while found.is_empty() && t.elapsed() < Duration::from_secs(10) {
            found = c.providers(model).await.unwrap();
            if found.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let took = t.elapsed();
        let reqs = c.stats().dht_lookup_requests.load(Ordering::Relaxed);
        let t = Instant::now();
        let book = c.gather(Some(model)).await.unwrap().len();
        eprintln!("DHT lookup {trial}: {} providers in {took:?}", found.len());
        lookups.push((took, found.len(), reqs, t.elapsed(), book));
    }

    // Steady state: count announcement and DHT messages over the window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<u64> = servers
        .iter()
        .map(|(h, _)| h.stats().announce_messages())
        .collect();
    let dht_in = |h: &NetHandle| h.stats().dht_requests_in.load(Ordering::Relaxed);
    let dht_before: u64 = servers.iter().map(|(h, _)| dht_in(h)).sum::<u64>() + dht_in(&boot);
    let boot_dht_before = dht_in(&boot);
    let boot_before = boot.stats().announce_messages();
    tokio::time::sleep(window).await;
    let dht_after: u64 = servers.iter().map(|(h, _)| dht_in(h)).sum::<u64>() + dht_in(&boot);
    let per_min = |d: u64| d as f64 * 60.0 / window.as_secs_f64();
    let server_rates: Vec<f64> = servers
        .iter()
        .zip(&before)
        .map(|((h, _), b)| per_min(h.stats().announce_messages() - b))
        .collect();
    let mean = server_rates.iter().sum::<f64>() / server_rates.len().max(1) as f64;
    let boot_rate = per_min(boot.stats().announce_messages() - boot_before);
    let book = boot.book(None).await.unwrap().len();

    println!(
        "discovery bench: {n} servers (announcements only), 1 bootstrap, TTL {ttl:?}, renew every {:?}",
        ttl / 3
    );
    println!();
    println!("| figure | value |");
    println!("| --- | --- |");
    println!(
        "| servers started and announced | {n} in {:.2} s |",
        joined.as_secs_f64()
    );
    println!(
        "| new client sees all {n} (connect + list) | {:.0} ms ({seen} seen) |",
        discovery.as_secs_f64() * 1000.0
    );
    println!("| announcement messages per server per minute | {mean:.1} |");
    println!("| announcement messages at the bootstrap per minute | {boot_rate:.1} |");
    println!("| announcements held by the bootstrap | {book} |");
    for (took, found, reqs, gather, seen) in &lookups {
        println!(
            "| DHT: client knowing one server finds model 0's servers | {:.0} ms, {found} of {holders} providers, {reqs} requests; gather (connect + list) {:.0} ms, {seen} announcements |",
            took.as_secs_f64() * 1000.0,
            gather.as_secs_f64() * 1000.0
        );
    }
    println!(
        "| DHT requests received per node per minute (provider republish every 60 s, routing) | {:.1} |",
        per_min(dht_after - dht_before) / (n as f64 + 1.0)
    );
    println!(
        "| DHT requests received at the bootstrap per minute | {:.1} |",
        per_min(dht_in(&boot) - boot_dht_before)
    );
    cancel.cancel();
}
