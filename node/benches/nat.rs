//! Pollen across NATs, on the emulated internet of `tests/common/netns.rs` (needs root
//! and nftables; says why and exits otherwise). A bootstrap and server 0:10 (`--relay`)
//! on the public segment; servers 10:20 and 20:30 behind two NATs. Prints a table:
//!
//! - decode tokens/s and time to first token of the 3-server route, direct (cone NATs,
//!   hole punched, the client on the public segment) and relayed (symmetric NATs, the
//!   client behind NAT A as in tests/netns.rs (b): a NAT'd server can always dial a
//!   public client directly), at 0, 10 and 20 ms one-way delay (netem, or the NFQUEUE
//!   delayer where the kernel has no netem; iptables needed), next to the floor of
//!   (hops + 1) × delay per token;
//! - the time from a server's start behind NAT until a new client reaches it directly;
//! - hole-punch success over 20 tries (20 fresh clients, each to both NATed servers).
//!
//! `cargo bench -p pollen-node --bench nat [-- --tokens 32 --runs 3 --tries 20]`
#![allow(clippy::unwrap_used, missing_docs, dead_code)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/netns.rs"]
mod netns;

use bench_args::arg;
use common::*;
use netns::{Host, Nat, NatKind, Net, bootstrap_on, server_on, try_status_on};
use std::path::Path;
use std::time::{Duration, Instant};

/// The bench's servers announce every 2 s (a third of this TTL), so that a client soon
/// sees what changed.
const TTL: [&str; 2] = ["--announce-ttl", "6"];

/// `pollen status --json` on `host`; empty where it failed (the bench retries).
fn status_on(host: &Host, entry: &str) -> serde_json::Value {
    try_status_on(host, entry).unwrap_or_default()
}

fn reach(status: &serde_json::Value, peer: &str) -> String {
    status["models"][0]["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["peer"] == peer))
        .and_then(|s| s["reach"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Decode tokens/s and time to first token (ms) of one `generate --stats`.
fn generate_on(host: &Host, entry: &str, tokens: usize) -> Option<(f64, f64)> {
    let out = host
        .command(pollen())
        .args(["generate", "--threads", "1", "--no-mdns", "--stats"])
        .args(["--bootstrap", entry, "--max-tokens", &tokens.to_string()])
        .args([
            "--prompt",
            "The history of the printing press begins",
            "--model",
        ])
        .arg(model())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // "prompt P tokens at X tokens/s; generated N tokens at Y tokens/s (...)"
    let line = err.lines().find(|l| l.starts_with("prompt "))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let prompt: f64 = w.get(1)?.parse().ok()?;
    let prefill: f64 = w.get(4)?.parse().ok()?;
    let decode: f64 = w.get(10)?.parse().ok()?;
    Some((decode, prompt / prefill * 1000.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct World {
    servers: Vec<(Proc, String)>,
    boot: Proc,
    addr: String,
    client: Host,
    nat_a: Nat,
    net: Net,
}

fn world(kind: NatKind, dir: &Path, client_behind_a: bool) -> Option<World> {
    let mut net = match Net::new() {
        Ok(n) => n,
        Err(why) => {
            println!("skipped: {why}");
            return None;
        }
    };
    let boot_host = net.public_host("boot").unwrap();
    let s0 = net.public_host("s0").unwrap();
    let mut nat_a = net.nat("nata", "192.0.2", kind).unwrap();
    let mut nat_b = net.nat("natb", "203.0.113", kind).unwrap();
    let a = net.private_host(&mut nat_a, "s1").unwrap();
    let b = net.private_host(&mut nat_b, "s2").unwrap();
    let client = if client_behind_a {
        net.private_host(&mut nat_a, "cli").unwrap()
    } else {
        net.public_host("cli").unwrap()
    };
    let (boot, addr) = bootstrap_on(&boot_host, dir, &[]);
    let servers = vec![
        server_on(
            &s0,
            &addr,
            "0:10",
            &dir.join("s0.key"),
            &["--relay", TTL[0], TTL[1]],
        ),
        server_on(&a, &addr, "10:20", &dir.join("s1.key"), &TTL),
        server_on(&b, &addr, "20:30", &dir.join("s2.key"), &TTL),
    ];
    let w = World {
        servers,
        boot,
        addr,
        client,
        nat_a,
        net,
    };
    let behind = [peer_of(&w.servers[1].1), peer_of(&w.servers[2].1)];
    let want = if kind == NatKind::Cone {
        "direct"
    } else {
        "relayed"
    };
    let ok = wait_for(Duration::from_secs(90), || {
        let st = status_on(&w.client, &w.addr);
        // Next to the client on NAT A's segment, server 10:20 may be found directly.
        reach(&st, behind[1]) == want
            && (reach(&st, behind[0]) == want
                || client_behind_a && !reach(&st, behind[0]).is_empty())
    });
    if ok.is_none() {
        println!("the swarm behind {kind:?} NATs did not form within 90 s");
        return None;
    }
    Some(w)
}

fn main() {
    let tokens = arg("--tokens", 32);
    let runs = arg("--runs", 3);
    let tries = arg("--tries", 20);
    let _ = model();
    let dir = temp_dir("nat-bench");
    println!(
        "NAT bench: 3-server route (0:10 public, 10:20 and 20:30 behind two NATs), {tokens} tokens, median of {runs}"
    );
    println!();
    println!(
        "| route | one-way delay | decode tokens/s | ms per token | time to first token | floor per token ((hops+1) x delay) | runs that answered |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut extra = Vec::new();
    for kind in [NatKind::Cone, NatKind::Symmetric] {
        let relayed = kind == NatKind::Symmetric;
        let Some(mut w) = world(kind, &dir.join(format!("{kind:?}")), relayed) else {
            return;
        };
        let label = if relayed {
            "relayed (symmetric NATs, client behind NAT A)"
        } else {
            "direct (cone NATs, hole punched)"
        };
        // 3 hops: client->s0->s1->s2, and the token back to the client. A relayed link
        // crosses the relay, one more one-way delay each, which the floor leaves out.
        let floor = 4;
        for delay in [0u32, 10, 20] {
            if delay > 0
                && let Err(why) = w.net.can_delay().and_then(|()| w.net.set_delay(delay))
            {
                println!("| {label} | {delay} ms | not measured: {why} | | | | |");
                continue;
            }
            let got: Vec<(f64, f64)> = (0..runs)
                .filter_map(|_| generate_on(&w.client, &w.addr, tokens))
                .collect();
            let decode = median(got.iter().map(|g| g.0).collect());
            let ttft = median(got.iter().map(|g| g.1).collect());
            println!(
                "| {label} | {delay} ms | {decode:.1} | {:.0} ms | {ttft:.0} ms | {} ms | {} of {runs} |",
                1000.0 / decode,
                floor * delay,
                got.len()
            );
        }
        let _ = w.net.set_delay(0);
        if kind == NatKind::Cone {
            // A new server behind NAT A: from its start to a new client reaching it
            // directly.
            let t0 = Instant::now();
            let mut nat_a = w.nat_a.clone();
            let host = w.net.private_host(&mut nat_a, "s3").unwrap();
            let (s3, ready) = server_on(&host, &w.addr, "20:30", &dir.join("s3.key"), &TTL);
            let loaded = t0.elapsed();
            let peer = peer_of(&ready).to_string();
            let direct = wait_for(Duration::from_secs(90), || {
                reach(&status_on(&w.client, &w.addr), &peer) == "direct"
            });
            extra.push(format!(
                "| start behind NAT to reached directly by a new client | {} (ready after {:.1} s) |",
                direct
                    .map(|d| format!("{:.1} s", (loaded + d).as_secs_f64()))
                    .unwrap_or_else(|| "not within 90 s".into()),
                loaded.as_secs_f64()
            ));
            drop(s3);
            // Hole punching: fresh clients, each to both servers behind NAT.
            let behind = [peer_of(&w.servers[1].1), peer_of(&w.servers[2].1)];
            // Each client on a host (an address) of its own, as real clients are: the
            // relay limits circuits per source address.
            let mut labels: std::collections::BTreeMap<String, usize> = Default::default();
            for i in 0..tries {
                let host = w.net.public_host(&format!("c{i}")).unwrap();
                let st = status_on(&host, &w.addr);
                for p in behind {
                    *labels.entry(reach(&st, p)).or_default() += 1;
                }
            }
            let ok = labels.get("direct").copied().unwrap_or(0);
            extra.push(format!(
                "| hole punches that gave a direct connection | {ok} of {} ({tries} fresh clients, each on its own address, x 2 servers behind cone NATs; all outcomes {labels:?}) |",
                tries * 2
            ));
        }
        drop(w.servers);
        drop(w.boot);
    }
    println!();
    println!("| figure | value |");
    println!("| --- | --- |");
    for l in extra {
        println!("{l}");
    }
}
