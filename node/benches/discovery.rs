//! Discovery at scale, in one process: a bootstrap node and N lightweight
//! servers (announcements only, no model) serving M models (one by default), all on libp2p's
//! in-process transport (`/memory/N` addresses: the real swarms, noise and yamux, no
//! sockets, so hundreds of nodes fit in one process's file descriptors) and one tokio
//! runtime. Prints the time until a new client sees 95% and all of the N through the
//! bootstrap, announcement and DHT messages per node per minute at steady state, with
//! the bootstrap's share, and then, with the bootstrap stopped, the time until a
//! client that knows only one server's address sees 95% of its model's servers
//! through the DHT (provider records, then asking each server for its signed
//! announcement), with the messages that took.
//!
//! `cargo bench -p pollen-node --bench discovery [-- --nodes 200 --models 1 --ttl 30 --settle 60 --window 60 --trials 3]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
#[path = "../../tests/common/memory_net.rs"]
mod memory_net;
use bench_args::arg;
use memory_net::{announce, start};

use pollen_node::net::{NetHandle, Role};
use pollen_protocol::ModelId;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The model of server `i` when `models` models share the servers round robin.
fn model_of(i: u32, models: u32) -> ModelId {
    ModelId::from_bytes([(i % models) as u8; 32])
}

/// How many of `n` make 95% (rounded up).
fn share95(n: usize) -> usize {
    (n * 95).div_ceil(100)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = arg("--nodes", 200) as u32;
    let models = arg("--models", 1).max(1) as u32;
    let trials = arg("--trials", 3);
    let ttl = Duration::from_secs(arg("--ttl", 30) as u64);
    let window = Duration::from_secs(arg("--window", 60) as u64);
    // Time for the joins' first DHT walks (libp2p-kad bootstraps a node whose routing
    // table is short of 20 peers: a lookup of its own id and of a random key in each
    // farther bucket) to end before the window opens.
    let settle = Duration::from_secs(arg("--settle", 60) as u64);
    let cancel = CancellationToken::new();
    let boot_cancel = CancellationToken::new();
    let (boot, _, boot_addr) = start(Role::Bootstrap, &boot_cancel).await;

    // Servers join in batches of 20 at once, and each renews at a third of the TTL
    // from the moment it announced, as `pollen serve` does.
    let started = Instant::now();
    let ttl_ms = ttl.as_millis() as u64;
    let mut servers = Vec::new();
    for batch in (0..n).collect::<Vec<_>>().chunks(20) {
        let joins = batch.iter().map(|&i| {
            let (cancel, boot_addr) = (cancel.clone(), boot_addr.clone());
            async move {
                let (h, key, addr) = start(Role::Server, &cancel).await;
                h.dial(boot_addr).await.unwrap();
                let addr = addr.to_string();
                h.set_own_announcement(Some(announce(
                    &key,
                    model_of(i, models),
                    "scale",
                    ((i / models) * 3) % 30,
                    &addr,
                    1,
                    ttl_ms,
                )))
                .await
                .unwrap();
                let (renew, entry) = (h.clone(), addr.clone());
                tokio::spawn(async move {
                    let mut seq = 1;
                    let mut tick = tokio::time::interval(ttl / 3);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        seq += 1;
                        let a = announce(
                            &key,
                            model_of(i, models),
                            "scale",
                            ((i / models) * 3) % 30,
                            &addr,
                            seq,
                            ttl_ms,
                        );
                        if renew.set_own_announcement(Some(a)).await.is_err() {
                            break;
                        }
                    }
                });
                (h, entry)
            }
        });
        servers.extend(futures::future::join_all(joins).await);
    }
    let joined = started.elapsed();
    eprintln!("{n} servers started in {joined:?}");
    // Every joiner's first DHT walk, hundreds of requests in this one process, ends
    // before anything is timed: what follows is a swarm in its steady state.
    tokio::time::sleep(settle).await;

    // A new client: connect to the bootstrap, ask for the swarm.
    let (client, _, _) = start(Role::Client, &cancel).await;
    let t0 = Instant::now();
    client.dial(boot_addr.clone()).await.unwrap();
    let mut seen = 0;
    let mut boot95 = None;
    while t0.elapsed() < Duration::from_secs(30) {
        seen = client.gather(None).await.unwrap().len();
        if boot95.is_none() && seen >= share95(n as usize) {
            boot95 = Some(t0.elapsed());
        }
        if seen >= n as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let discovery = t0.elapsed();
    eprintln!("a new client saw {seen} through the bootstrap in {discovery:?} (95% in {boot95:?})");

    // Steady state: count announcement and DHT messages over the window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<u64> = servers
        .iter()
        .map(|(h, _)| h.stats().announce_messages())
        .collect();
    let dht_in = |h: &NetHandle| h.stats().dht_requests_in.load(Ordering::Relaxed);
    // Received DHT requests by kind: nearest nodes, provider lookups, provider records.
    let kinds = |h: &NetHandle| {
        let s = h.stats();
        [
            s.dht_find_node_in.load(Ordering::Relaxed),
            s.dht_get_providers_in.load(Ordering::Relaxed),
            s.dht_add_provider_in.load(Ordering::Relaxed),
        ]
    };
    let all_kinds = || {
        servers
            .iter()
            .map(|(h, _)| h)
            .chain([&boot])
            .map(kinds)
            .fold([0u64; 3], |a, k| [a[0] + k[0], a[1] + k[1], a[2] + k[2]])
    };
    let kinds_before = all_kinds();
    let dht_before: u64 = servers.iter().map(|(h, _)| dht_in(h)).sum::<u64>() + dht_in(&boot);
    let boot_dht_before = dht_in(&boot);
    let boot_before = boot.stats().announce_messages();
    tokio::time::sleep(window).await;
    let dht_after: u64 = servers.iter().map(|(h, _)| dht_in(h)).sum::<u64>() + dht_in(&boot);
    let kinds_after = all_kinds();
    let per_min = |d: u64| d as f64 * 60.0 / window.as_secs_f64();
    let server_rates: Vec<f64> = servers
        .iter()
        .zip(&before)
        .map(|((h, _), b)| per_min(h.stats().announce_messages() - b))
        .collect();
    let mean = server_rates.iter().sum::<f64>() / server_rates.len().max(1) as f64;
    let boot_rate = per_min(boot.stats().announce_messages() - boot_before);
    let book = boot.book(None).await.unwrap().len();

    // The DHT, after the window (so that every server has republished its provider
    // record with a full routing table). The bootstrap stops first, so no book of
    // its helps: clients that know only one server's address look up the providers
    // of model 0 and ask each for its signed announcement.
    let boot_dht_per_min = per_min(dht_in(&boot) - boot_dht_before);
    boot_cancel.cancel();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let holders = (0..n).filter(|i| i % models == 0).count();
    let model = ModelId::from_bytes([0; 32]);
    let want = share95(holders);
    let mut lookups = Vec::new();
    for trial in 0..trials {
        let (_, entry_addr) = &servers[(trial * 37 + 11) % servers.len()];
        let client_cancel = CancellationToken::new();
        let (c, _, _) = start(Role::Client, &client_cancel).await;
        let t = Instant::now();
        c.dial(entry_addr.parse().unwrap()).await.unwrap();
        // One lookup alone: how many providers one DHT query returns.
        let first = c.providers(model).await.unwrap().len();
        let lookup = t.elapsed();
        let first_reqs = c.stats().dht_lookup_requests.load(Ordering::Relaxed);
        // Then as a client routes: look up, connect to the providers, ask each for
        // its announcement, until it holds announcements of 95% of the model's servers.
        let g = Instant::now();
        let mut seen = 0;
        let mut rounds = 0;
        while g.elapsed() < Duration::from_secs(30) {
            rounds += 1;
            seen = c.gather(Some(model)).await.unwrap().len();
            if seen >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = g.elapsed();
        let dht_reqs = c.stats().dht_lookup_requests.load(Ordering::Relaxed) - first_reqs;
        let lists = c.stats().announce_out.load(Ordering::Relaxed);
        let conns = c.peers().await.unwrap().len();
        client_cancel.cancel();
        eprintln!(
            "DHT client {trial}: one lookup {first} providers in {lookup:?} ({first_reqs} requests); \
             gather saw {seen} of {holders} in {took:?} ({rounds} rounds, {dht_reqs} DHT requests, \
             {lists} list requests, {conns} connections)"
        );
        lookups.push(Trial {
            lookup,
            first,
            first_reqs,
            took,
            seen,
            rounds,
            dht_reqs,
            lists,
            conns,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    println!(
        "discovery bench: {n} servers (announcements only) of {models} model(s), 1 bootstrap, TTL {ttl:?}, renew every {:?}",
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
        "| bootstrap route: new client sees 95% of {n} (connect + list) | {} |",
        boot95.map_or("not reached in 30 s".to_string(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        ))
    );
    println!(
        "| bootstrap route: new client sees all {n} | {:.0} ms ({seen} seen) |",
        discovery.as_secs_f64() * 1000.0
    );
    println!("| announcement messages per server per minute | {mean:.1} |");
    println!("| announcement messages at the bootstrap per minute | {boot_rate:.1} |");
    println!("| announcements held by the bootstrap | {book} |");
    println!(
        "| DHT requests received per node per minute (provider republish every 60 s, routing) | {:.1} |",
        per_min(dht_after - dht_before) / (n as f64 + 1.0)
    );
    let kind_rate = |i: usize| per_min(kinds_after[i] - kinds_before[i]) / (n as f64 + 1.0);
    println!(
        "| of which nearest-node / provider lookup / provider record requests | {:.1} / {:.1} / {:.1} |",
        kind_rate(0),
        kind_rate(1),
        kind_rate(2)
    );
    println!("| DHT requests received at the bootstrap per minute | {boot_dht_per_min:.1} |");
    for (i, t) in lookups.iter().enumerate() {
        println!(
            "| DHT route {i} (bootstrap stopped; client knows one server): one lookup | {} of {holders} providers in {:.0} ms, {} DHT requests |",
            t.first,
            t.lookup.as_secs_f64() * 1000.0,
            t.first_reqs
        );
        println!(
            "| DHT route {i}: gather (lookup, connect, list) until 95% ({want}) of {holders} | {}{:.0} ms, {} seen, {} rounds |",
            if t.seen >= want {
                ""
            } else {
                "not reached, gave up after "
            },
            t.took.as_secs_f64() * 1000.0,
            t.seen,
            t.rounds
        );
        println!(
            "| DHT route {i}: the client's messages | {} DHT + {} list requests over {} connections |",
            t.dht_reqs, t.lists, t.conns
        );
    }
    cancel.cancel();
}

/// One DHT-route client's figures.
struct Trial {
    lookup: Duration,
    first: usize,
    first_reqs: u64,
    took: Duration,
    seen: usize,
    rounds: usize,
    dht_reqs: u64,
    lists: u64,
    conns: usize,
}
