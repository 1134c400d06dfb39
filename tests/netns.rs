//! Pollen across an emulated internet: hosts in Linux network namespaces, NAT routers
//! with nftables masquerade, documentation address ranges only (see
//! `tests/common/netns.rs`). Skipped, with the reason, where namespaces cannot be made.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
#[path = "common/netns.rs"]
mod netns;

use common::*;
use netns::{Host, Nat, NatKind, Net, bootstrap_on, internet, server_on, status_on, text};
use std::path::Path;
use std::time::Duration;

#[test]
fn a_server_on_another_host_is_seen_through_the_bootstrap() {
    let Some(mut net) = internet() else { return };
    let dir = temp_dir("netns-simple");
    let boot_host = net.public_host("boot").unwrap();
    let server_host = net.public_host("srv").unwrap();
    let (_boot, addr) = bootstrap_on(&boot_host, &dir, &[]);
    assert!(addr.starts_with("/ip4/198.51.100."), "{addr}");
    let (_s, ready) = server_on(
        &server_host,
        &addr,
        "0:30",
        &dir.join("s.key"),
        &["--announce-ttl", "6"],
    );
    let seen = wait_for(Duration::from_secs(15), || {
        coverage(&status_on(&boot_host, &addr)).is_some_and(|(gaps, n)| gaps.is_empty() && n == 1)
    });
    assert!(
        seen.is_some(),
        "the server on another host covers every block"
    );
    let status = status_on(&boot_host, &addr);
    let s = &status["models"][0]["servers"][0];
    assert_eq!(s["peer"], peer_of(&ready));
    assert!(
        s["addrs"].to_string().contains(&server_host.ip),
        "announced on its own host's address: {s}"
    );
}

/// The (least, mean) round trip of `count` pings from `from` to `to`, in ms.
fn ping_ms(from: &Host, to: &Host, count: u32) -> (f64, f64) {
    let out = from
        .command("ping")
        .args([
            "-n",
            "-q",
            "-i",
            "0.2",
            "-W",
            "2",
            "-c",
            &count.to_string(),
            &to.ip,
        ])
        .output()
        .expect("ping (apt-get install iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 20.1/20.4/20.9/0.3 ms"
    let v: Vec<f64> = text
        .lines()
        .find_map(|l| l.split(" = ").nth(1))
        .map(|v| v.split('/').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    match v[..] {
        [min, avg, ..] => (min, avg),
        _ => panic!("no round trip in ping's output: {text}"),
    }
}

/// The emulated delay holds: with `ms` one way, a ping's round trip is about 2 × `ms`
/// (netem, or the NFQUEUE delayer where the kernel has no netem), and it goes when the
/// delay is set back to 0.
#[test]
fn delay_between_hosts_is_what_was_set() {
    let Some(mut net) = internet() else { return };
    let a = net.public_host("a").unwrap();
    let mut nat = net.nat("nat", "192.0.2", NatKind::Cone).unwrap();
    let b = net.private_host(&mut nat, "b").unwrap();
    if which("ping").is_none() {
        eprintln!("skipped: ping is not installed (apt-get install iputils-ping)");
        return;
    }
    if let Err(why) = net.can_delay() {
        eprintln!("skipped: {why}");
        return;
    }
    let (base, _) = ping_ms(&b, &a, 3);
    for ms in [10u32, 20] {
        net.set_delay(ms).unwrap();
        let (least, mean) = ping_ms(&b, &a, 5);
        let want = f64::from(2 * ms);
        eprintln!(
            "one-way delay {ms} ms: ping round trip {least:.1} ms least, {mean:.1} ms mean (without delay {base:.2} ms)"
        );
        // Never early; and the quickest of five (the one least slowed by a loaded
        // machine) close to what was set.
        assert!(
            least >= want && least < want + 10.0,
            "{ms} ms one way gives a round trip of {least} ms at least, not about {want}"
        );
    }
    net.set_delay(0).unwrap();
    let (least, _) = ping_ms(&b, &a, 3);
    assert!(least < 5.0, "the delay is gone: {least} ms");
}

/// Whether `program` is on PATH.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// `pollen generate` on `host` through `entry` (greedy, 1 thread); its stdout.
fn generate_on(host: &Host, entry: &str, prompt: &str, max_tokens: usize) -> String {
    let out = host
        .command(pollen())
        .args([
            "generate",
            "--threads",
            "1",
            "--no-mdns",
            "--bootstrap",
            entry,
        ])
        .args(["--max-tokens", &max_tokens.to_string(), "--prompt", prompt])
        .args(["--route-wait", "60", "--model"])
        .arg(model())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate on {} through {entry} failed: {}",
        host.ip,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// How each server of `status` is reached, by peer id.
fn reach_of(status: &serde_json::Value) -> Vec<(String, String)> {
    status["models"][0]["servers"]
        .as_array()
        .map(|servers| {
            servers
                .iter()
                .map(|s| {
                    (
                        s["peer"].as_str().unwrap_or("").to_string(),
                        s["reach"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every server behind a NAT announces a relayed address.
fn announces_relayed(status: &serde_json::Value, peers: &[&str]) -> bool {
    let Some(servers) = status["models"][0]["servers"].as_array() else {
        return false;
    };
    peers.iter().all(|p| {
        servers
            .iter()
            .any(|s| s["peer"] == *p && s["addrs"].to_string().contains("/p2p-circuit"))
    })
}

/// The swarm of cases (a)–(d): a bootstrap and server 0:10 (started with `--relay`) on
/// the public segment; server 10:20 behind NAT A (192.0.2.0/24) and server 20:30 behind
/// NAT B (203.0.113.0/24). The client host is on the public segment, or, with
/// `client_behind_a`, on NAT A's segment next to server 10:20.
struct World {
    boot: Option<Proc>,
    servers: Vec<(Proc, String)>,
    addr: String,
    client: Host,
    _nats: Vec<Nat>,
    // Last: the namespaces go after every process in them.
    net: Net,
}

fn world(kind: NatKind, tag: &str, client_behind_a: bool) -> Option<World> {
    let mut net = internet()?;
    let dir = temp_dir(tag);
    let boot_host = net.public_host("boot").unwrap();
    let pub_host = net.public_host("s0").unwrap();
    let mut nat_a = net.nat("nata", "192.0.2", kind).unwrap();
    let mut nat_b = net.nat("natb", "203.0.113", kind).unwrap();
    let a = net.private_host(&mut nat_a, "s1").unwrap();
    let b = net.private_host(&mut nat_b, "s2").unwrap();
    let client = if client_behind_a {
        net.private_host(&mut nat_a, "cli").unwrap()
    } else {
        net.public_host("cli").unwrap()
    };
    let (boot, addr) = bootstrap_on(&boot_host, &dir, &[]);
    let ttl = ["--announce-ttl", "6"];
    let relay = ["--announce-ttl", "6", "--relay"];
    let servers = vec![
        server_on(&pub_host, &addr, "0:10", &dir.join("s0.key"), &relay),
        server_on(&a, &addr, "10:20", &dir.join("s1.key"), &ttl),
        server_on(&b, &addr, "20:30", &dir.join("s2.key"), &ttl),
    ];
    Some(World {
        boot: Some(boot),
        servers,
        addr,
        client,
        _nats: vec![nat_a, nat_b],
        net,
    })
}

impl World {
    fn peer(&self, i: usize) -> &str {
        peer_of(&self.servers[i].1)
    }

    /// Waits until every block is covered and the servers behind NAT announce relayed
    /// addresses; the time it took.
    fn wait_ready(&self) -> Duration {
        let behind = [self.peer(1), self.peer(2)];
        let took = wait_for(Duration::from_secs(60), || {
            let st = status_on(&self.client, &self.addr);
            coverage(&st).is_some_and(|(gaps, n)| gaps.is_empty() && n == 3)
                && announces_relayed(&st, &behind)
        });
        took.expect("full coverage, with relayed addresses for the servers behind NAT, within 60 s")
    }
}

const PROMPT: &str = "The history of the printing press begins";
const TOKENS: usize = 16;

/// (a) two servers behind two different NATs serve the middle and last spans, hole
/// punching makes their links direct, and the answer equals `--local`; (d) the same
/// with 1% loss and 10, then 20 ms of one-way delay between hosts; (c) with the
/// bootstrap killed, a new client that knows only a server's address joins and gets
/// the same answer.
#[test]
fn servers_behind_two_nats_serve_directly_and_survive_the_bootstrap() {
    let local = text(&local_answer(PROMPT, false, TOKENS)).to_string();
    let Some(mut w) = world(NatKind::Cone, "netns-cone", false) else {
        return;
    };
    let took = w.wait_ready();
    eprintln!("servers behind NAT announced relayed addresses {took:?} after start");

    let t0 = std::time::Instant::now();
    let out = generate_on(&w.client, &w.addr, PROMPT, TOKENS);
    eprintln!("(a) answered in {:?}", t0.elapsed());
    assert_eq!(text(&out), local, "(a) through two NATs");
    // A hole punch through a cone NAT fails now and then (31 of 40 tries succeed in
    // the nat bench: the simultaneous open races), so each server must be reached
    // directly in one of a few fresh probes, not necessarily the first.
    let mut best: Vec<(String, String)> = Vec::new();
    for _ in 0..5 {
        let reach = reach_of(&status_on(&w.client, &w.addr));
        eprintln!("reach: {reach:?}");
        assert_eq!(reach.len(), 3, "every server is probed: {reach:?}");
        for (peer, how) in reach {
            match best.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, seen)) if seen.as_str() != "direct" => *seen = how,
                Some(_) => {}
                None => best.push((peer, how)),
            }
        }
        if best
            .iter()
            .all(|(p, how)| p == w.peer(0) || how == "direct")
        {
            break;
        }
    }
    for (peer, how) in &best {
        let want = if peer == w.peer(0) {
            "public"
        } else {
            "direct"
        };
        assert_eq!(how, want, "{peer} is reached {how}, not {want}: {best:?}");
    }

    // (d) 1% loss, and 10 then 20 ms of one-way delay between hosts (netem, or the
    // NFQUEUE delayer where the kernel has no netem).
    w.net.set_loss(1).unwrap();
    match w.net.can_delay() {
        Ok(()) => {
            for ms in [10, 20] {
                w.net.set_delay(ms).unwrap();
                let t0 = std::time::Instant::now();
                let out = generate_on(&w.client, &w.addr, PROMPT, TOKENS);
                eprintln!(
                    "(d) {ms} ms one way, 1% loss: answered in {:?}",
                    t0.elapsed()
                );
                assert_eq!(text(&out), local, "(d) with {ms} ms of delay and 1% loss");
            }
        }
        Err(why) => {
            eprintln!("(d) without delay: {why}");
            let out = generate_on(&w.client, &w.addr, PROMPT, TOKENS);
            assert_eq!(text(&out), local, "(d) with 1% loss");
        }
    }
    w.net.set_loss(0).unwrap();
    w.net.set_delay(0).unwrap();

    // (c) the bootstrap dies; a new client knows only the public server's address.
    w.boot.take().unwrap().kill9();
    let s0 = w.servers[0]
        .0
        .line_with("listening /ip4/198.51.100.", Duration::from_secs(5))
        .unwrap()
        .replacen("listening ", "", 1);
    let out = generate_on(&w.client, &s0, PROMPT, TOKENS);
    assert_eq!(
        text(&out),
        local,
        "(c) with the bootstrap gone, through a server"
    );
}

/// (b) both NATs give every flow a random port, so hole punching between them cannot
/// work: the hop from server 10:20 to server 20:30 goes through the relay, and so does
/// the client, which sits behind NAT A, to server 20:30; the answer is still the local
/// one. (A client on the public segment could be reached directly by a NAT'd server
/// dialling out to it, whatever the NAT, so the client is behind NAT A here.)
#[test]
fn servers_behind_symmetric_nats_serve_through_the_relay() {
    let local = text(&local_answer(PROMPT, false, TOKENS)).to_string();
    let Some(w) = world(NatKind::Symmetric, "netns-sym", true) else {
        return;
    };
    let took = w.wait_ready();
    eprintln!("servers behind NAT announced relayed addresses {took:?} after start");
    let out = generate_on(&w.client, &w.addr, PROMPT, TOKENS);
    assert_eq!(text(&out), local, "(b) through the relay");
    let reach = reach_of(&status_on(&w.client, &w.addr));
    eprintln!("reach: {reach:?}");
    assert_eq!(reach.len(), 3, "every server is probed: {reach:?}");
    for (peer, how) in &reach {
        if peer == w.peer(1) {
            // Server 10:20 shares the client's segment: without mDNS the client knows
            // only its relayed address, and a hole punch may or may not find the LAN.
            assert!(
                how == "relayed" || how == "direct",
                "{peer} is reached {how}: {reach:?}"
            );
            continue;
        }
        let want = if peer == w.peer(0) {
            "public"
        } else {
            "relayed"
        };
        assert_eq!(how, want, "{peer} is reached {how}, not {want}: {reach:?}");
    }
}
