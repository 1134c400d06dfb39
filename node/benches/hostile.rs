//! Hostile-peer bench: for each attack on the swarm, the attacker's work and what a
//! legitimate peer sees meanwhile (success rate, latency), against the same measure with
//! no attacker.
//!
//! A bootstrap and three servers (0:10, 10:20, 20:30) of the default model on 127.0.0.1,
//! 1 thread each (the release `pollen` binary), and in this process a hostile client
//! built from Pollen's crates and a legitimate one. Attacks, in turn:
//! - session squatting: the hostile client opens sessions and never steps; a legitimate
//!   client opens a session through all three servers and runs one token (`--trials`
//!   times);
//! - servers as proxies: `Open`s naming a non-server next hop at an address the attacker
//!   chose; counted: refusals, and connections that reached that address;
//! - registration flood and sybils: 2,000 announcements with random model ids, then 1,100
//!   sybils for blocks 0:10, over one connection; a legitimate server publishes its
//!   announcement and a legitimate client gathers the model's announcements
//!   (`--trials` times each): accepted, and every real server listed.
//!
//! `cargo bench -p pollen-node --bench hostile [-- --trials 20]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/hostile.rs"]
mod attacker;
#[path = "../../tests/common/bench_args.rs"]
mod bench_args;

use attacker::{announcement, client_node as node, nobody_after, open_through, wire_hop};
use bench_args::{arg, median};
use candle_core::{Device, Tensor};
use libp2p::Multiaddr;
use pollen_node::client::{SwarmSession, route};
use pollen_node::mesh::{self, THREE_SPANS};
use pollen_node::net::NetHandle;
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, InferResponse, ModelId, VerifiedAnnouncement, WireDType,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The median of `v` in milliseconds (NaN when empty).
fn median_ms(v: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    median(&mut ms)
}

struct Row {
    attack: &'static str,
    work: String,
    legit: &'static str,
    ok: (usize, usize),
    median_ms: f64,
    base_ms: f64,
}

/// A legitimate client: open a session through `hops`, run one token, close; its time.
async fn one_token(
    net: &NetHandle,
    model: ModelId,
    compute: &str,
    hops: &[pollen_node::client::Hop],
    hidden: usize,
) -> Option<Duration> {
    let started = Instant::now();
    let mut s = SwarmSession::open(net, model, compute, hops, 16, hidden, WireDType::F32)
        .await
        .ok()?;
    let x = Tensor::zeros((1, 1, hidden), candle_core::DType::F32, &Device::Cpu).ok()?;
    s.step(&x, 0).await.ok()?;
    s.close().await;
    Some(started.elapsed())
}

async fn tokens(
    net: &NetHandle,
    model: ModelId,
    compute: &str,
    hops: &[pollen_node::client::Hop],
    hidden: usize,
    trials: usize,
) -> ((usize, usize), f64) {
    let mut times = Vec::new();
    for _ in 0..trials {
        if let Some(t) = one_token(net, model, compute, hops, hidden).await {
            times.push(t);
        }
    }
    ((times.len(), trials), median_ms(&times))
}

/// A legitimate server publishes a fresh announcement for a new span: accepted or not.
async fn publishes(
    boot: &Multiaddr,
    model: ModelId,
    compute: &str,
    num_blocks: u32,
    trials: usize,
    cancel: &CancellationToken,
) -> ((usize, usize), f64) {
    let mut times = Vec::new();
    for _ in 0..trials {
        let (net, boot_peer) = node(boot, cancel).await;
        let a = announcement(model, (10, 20), compute, num_blocks, "x");
        let started = Instant::now();
        let answer = net
            .announce(boot_peer, AnnounceRequest::Publish(Box::new(a)))
            .await;
        if matches!(answer, Ok(AnnounceResponse::Accepted)) {
            times.push(started.elapsed());
        }
    }
    ((times.len(), trials), median_ms(&times))
}

/// A legitimate client gathers the model's announcements: every real server listed?
async fn lists(
    boot: &Multiaddr,
    model: ModelId,
    real: &[VerifiedAnnouncement],
    trials: usize,
    cancel: &CancellationToken,
) -> ((usize, usize), f64) {
    let mut times = Vec::new();
    for _ in 0..trials {
        let (net, _) = node(boot, cancel).await;
        let started = Instant::now();
        let book = net.gather(Some(model)).await.unwrap_or_default();
        let took = started.elapsed();
        if real.iter().all(|r| book.iter().any(|a| a.peer == r.peer)) {
            times.push(took);
        }
    }
    ((times.len(), trials), median_ms(&times))
}

fn main() {
    let trials = arg("--trials", 20);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let model_path = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let model = pollen_node::model::model_id(&model_path, &mut |_, _| {}).unwrap();
    let hidden = pollen_shard::ModelFile::open(&model_path)
        .unwrap()
        .config()
        .unwrap()
        .hidden_size;
    let dir = std::env::temp_dir().join(format!("pollen-bench-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_boot, boot_addr) = mesh::bootstrap(&exe, &dir, false).unwrap();
    let quick = ["--first-step-timeout", "2"];
    let _servers: Vec<_> = THREE_SPANS
        .iter()
        .enumerate()
        .map(|(i, span)| {
            let key = dir.join(format!("s{i}.key"));
            mesh::server(&exe, &model_path, Some(&boot_addr), span, &key, &quick).unwrap()
        })
        .collect();
    let boot: Multiaddr = boot_addr.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let mut rows = Vec::new();
    rt.block_on(async {
        let (legit, _) = node(&boot, &cancel).await;
        let real = loop {
            let b = legit.gather(Some(model)).await.unwrap();
            if b.len() == 3 {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let compute = real[0].compute.clone();
        let num_blocks = real[0].num_blocks;
        let hops = route(
            &real,
            model,
            num_blocks as usize,
            &compute,
            &HashMap::new(),
        )
        .unwrap();
        let _ = one_token(&legit, model, &compute, &hops, hidden).await; // warm-up
        let (_, base_token) = tokens(&legit, model, &compute, &hops, hidden, trials).await;

        // Session squatting.
        let (hostile, boot_peer) = node(&boot, &cancel).await;
        let started = Instant::now();
        let mut squat = Vec::new();
        let mut refused = 0;
        for _ in 0..16 {
            match SwarmSession::open(&hostile, model, &compute, &hops, 16, hidden, WireDType::F32)
                .await
            {
                Ok(s) => squat.push(s),
                Err(_) => refused += 1,
            }
        }
        let squat_took = started.elapsed();
        let (ok, ms) = tokens(&legit, model, &compute, &hops, hidden, trials).await;
        rows.push(Row {
            attack: "session squatting",
            work: format!(
                "16 Opens, {} held, {refused} refused busy, {:.0} ms",
                squat.len(),
                squat_took.as_secs_f64() * 1e3
            ),
            legit: "open + 1 token",
            ok,
            median_ms: ms,
            base_ms: base_token,
        });
        drop(squat);

        // Servers as proxies.
        let (trap, trap_addr) = attacker::silent_listener();
        trap.set_nonblocking(true).unwrap();
        let first = &hops[0];
        let wire_first = wire_hop(first);
        let mut proxy_refused = 0;
        let mut refusal_times = Vec::new();
        for _ in 0..trials {
            let nobody = nobody_after(&wire_first, num_blocks, trap_addr.clone());
            let started = Instant::now();
            let route = vec![wire_first.clone(), nobody];
            let answer = open_through(&hostile, first, model, &compute, route).await;
            if let Ok(InferResponse::HopFailed { hop: 1, .. }) = answer {
                proxy_refused += 1;
                refusal_times.push(started.elapsed());
            }
        }
        let mut dialed = 0;
        while trap.accept().is_ok() {
            dialed += 1;
        }
        let (ok, ms) = tokens(&legit, model, &compute, &hops, hidden, trials).await;
        rows.push(Row {
            attack: "servers as proxies",
            work: format!(
                "{trials} Opens via a non-server: {proxy_refused} refused in {:.1} ms, {dialed} dials",
                median_ms(&refusal_times)
            ),
            legit: "open + 1 token",
            ok,
            median_ms: ms,
            base_ms: base_token,
        });

        // Registration flood, then sybils, over one connection.
        let (_, base_pub) = publishes(&boot, model, &compute, num_blocks, trials, &cancel).await;
        let (_, base_list) = lists(&boot, model, &real, trials, &cancel).await;
        let flood = |n: usize, sybil: bool| {
            let hostile = hostile.clone();
            let compute = compute.clone();
            async move {
                let started = Instant::now();
                let mut accepted = 0;
                for _ in 0..n {
                    let m = if sybil {
                        model
                    } else {
                        ModelId::from_bytes(rand::random())
                    };
                    let a = announcement(m, (0, 10), &compute, num_blocks, "x");
                    if let Ok(AnnounceResponse::Accepted) = hostile
                        .announce(boot_peer, AnnounceRequest::Publish(Box::new(a)))
                        .await
                    {
                        accepted += 1;
                    }
                }
                (accepted, started.elapsed())
            }
        };
        let (accepted, took) = flood(2000, false).await;
        let (ok, ms) = publishes(&boot, model, &compute, num_blocks, trials, &cancel).await;
        rows.push(Row {
            attack: "registration flood",
            work: format!(
                "2,000 random model ids, one connection, {:.1} s: {accepted} held",
                took.as_secs_f64()
            ),
            legit: "new server publishes",
            ok,
            median_ms: ms,
            base_ms: base_pub,
        });
        let (accepted, took) = flood(1100, true).await;
        let (ok, ms) = lists(&boot, model, &real, trials, &cancel).await;
        rows.push(Row {
            attack: "sybils for 0:10",
            work: format!(
                "1,100 fresh keys, one connection, {:.1} s: {accepted} held",
                took.as_secs_f64()
            ),
            legit: "gather lists every server",
            ok,
            median_ms: ms,
            base_ms: base_list,
        });
    });
    cancel.cancel();
    drop(rt);

    println!(
        "\nHostile peers against a bootstrap and three servers on 127.0.0.1 ({trials} trials each)\n"
    );
    println!("| attack | attacker's work | legitimate peer | success | median ms (no attack) |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} | {}/{} | {:.1} ({:.1}) |",
            r.attack, r.work, r.legit, r.ok.0, r.ok.1, r.median_ms, r.base_ms
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
