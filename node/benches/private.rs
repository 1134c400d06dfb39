//! Private-mesh bench.
//!
//! 1. Outsiders: a member node of a private mesh (swarm key and allowlist, real TCP on
//!    127.0.0.1, in this process) is dialled N times by each kind of outsider: a public
//!    node without the key, a node with another key, and a node with the key whose peer
//!    id is not on the allowlist; then, as a control, by a member. Counted on the
//!    member's side: connections its gate admitted (every established connection passes
//!    the gate; the keyless and wrong-key dialers' ids are on the allowlist, so only the
//!    key stops them). Outsiders must get 0.
//! 2. Decode speed: a public 3-server mesh (TCP and QUIC) and a private one (pnet on
//!    TCP, no QUIC) on the same host at once, `pollen generate --stats` alternating
//!    between them; the median decode tokens/s of each.
//!
//! `cargo bench -p pollen-node --bench private [-- --quick]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
use bench_args::median;
use futures::StreamExt;
use libp2p::swarm::{SwarmEvent, dial_opts::DialOpts};
use libp2p::{Multiaddr, PeerId, Swarm, identity::Keypair};
use pollen_node::mesh::{LocalMesh, THREE_SPANS};
use pollen_node::net::private::{
    self, Allowlist, GateStats, KeyRing, MeshConfig, SwarmKey, SwarmKeys,
};
use pollen_node::net::{self, NetConfig, Role};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

type Dialer = Swarm<libp2p::swarm::dummy::Behaviour>;

fn public_dialer(key: Keypair) -> Dialer {
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .unwrap()
        .build()
}

fn private_dialer(key: Keypair, swarm_key: SwarmKey) -> Dialer {
    let ring = Arc::new(KeyRing::fixed(SwarmKeys::single(swarm_key)));
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|k| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            Ok(private::tcp_transport(k, ring)?)
        })
        .unwrap()
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .unwrap()
        .build()
}

/// Dials `addr` `n` times, one connection at a time; returns how many the dialer saw
/// established. An established connection is kept until the member's gate has decided
/// on it (its counters move), then closed before the next try.
async fn dial_n(swarm: &mut Dialer, addr: &Multiaddr, n: usize, gate: &GateStats) -> usize {
    let decisions = || gate.admitted.load(Ordering::Relaxed) + gate.refused.load(Ordering::Relaxed);
    let mut established = 0;
    for _ in 0..n {
        swarm
            .dial(DialOpts::unknown_peer_id().address(addr.clone()).build())
            .unwrap();
        let before = decisions();
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        let mut open = None;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = tick.tick(), if open.is_some() => {
                    if decisions() > before
                        && let Some(c) = open
                    {
                        swarm.close_connection(c);
                    }
                }
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionEstablished { connection_id, .. } => {
                        established += 1;
                        open = Some(connection_id);
                    }
                    SwarmEvent::ConnectionClosed { connection_id, .. } if Some(connection_id) == open => break,
                    SwarmEvent::OutgoingConnectionError { .. } => break,
                    _ => {}
                }
            }
        }
    }
    established
}

fn outsiders(n: usize) -> Vec<(String, u64, u64, usize, f64)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let key = SwarmKey::generate();
        let other = SwarmKey::generate();
        let (nokey_id, wrong_id, member_id, stranger_id) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let peers: HashSet<PeerId> = [&nokey_id, &wrong_id, &member_id]
            .iter()
            .map(|k| k.public().to_peer_id())
            .collect();
        let mesh = MeshConfig {
            keys: Some(Arc::new(KeyRing::fixed(SwarmKeys::single(key)))),
            allow: Some(Allowlist {
                path: std::env::temp_dir().join("pollen-bench-private-allow.txt"),
                peers,
            }),
            ..MeshConfig::default()
        };
        let stats = mesh.gate_stats.clone();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (handle, task) = net::start(
            NetConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                mesh,
                ..NetConfig::new(Role::Server)
            },
            cancel.clone(),
        )
        .unwrap();
        let mut addr = None;
        for _ in 0..100 {
            if let Some(a) = handle.listen_addrs().await.unwrap().into_iter().next() {
                addr = Some(a);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let addr = addr.unwrap();
        let mut rows = Vec::new();
        let kinds: Vec<(&str, Dialer)> = vec![
            ("no key (public node)", public_dialer(nokey_id)),
            ("another swarm key", private_dialer(wrong_id, other)),
            (
                "key, not on the allowlist",
                private_dialer(stranger_id, key),
            ),
            ("member (control)", private_dialer(member_id, key)),
        ];
        for (name, mut dialer) in kinds {
            let before = (
                stats.admitted.load(Ordering::Relaxed),
                stats.refused.load(Ordering::Relaxed),
            );
            let t = Instant::now();
            let seen = dial_n(&mut dialer, &addr, n, &stats).await;
            let secs = t.elapsed().as_secs_f64();
            // Let the member finish any handshake still in flight before counting.
            tokio::time::sleep(Duration::from_millis(200)).await;
            rows.push((
                name.to_string(),
                stats.admitted.load(Ordering::Relaxed) - before.0,
                stats.refused.load(Ordering::Relaxed) - before.1,
                seen,
                secs,
            ));
        }
        cancel.cancel();
        let _ = task.await;
        rows
    })
}

/// Decode tokens/s of one `pollen generate --stats` through `addr`.
fn decode_speed(exe: &Path, model: &Path, addr: &str, key: Option<&Path>, tokens: usize) -> f64 {
    let mut cmd = Command::new(exe);
    cmd.env_remove(private::SWARM_KEY_ENV)
        .args([
            "generate",
            "--threads",
            "1",
            "--stats",
            "--no-mdns",
            "--bootstrap",
            addr,
        ])
        .args(["--max-tokens", &tokens.to_string()])
        .args(["--prompt", "The history of the printing press begins"])
        .arg("--model")
        .arg(model);
    if let Some(k) = key {
        cmd.arg("--swarm-key").arg(k);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {err}");
    let line = err
        .lines()
        .find(|l| l.contains("generated"))
        .unwrap_or_else(|| panic!("no stats line in {err}"));
    let after = line.split("generated").nth(1).unwrap();
    after
        .split(" at ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the speed in {line:?}"))
}

fn cpu_flags() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: HashSet<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    ["avx2", "avx512f", "avx512_vnni"]
        .iter()
        .filter(|f| flags.contains(*f))
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (tries, runs, tokens) = if quick { (200, 2, 32) } else { (1000, 5, 64) };
    println!("CPU flags: {}", cpu_flags());
    println!();
    println!(
        "Outsiders' connection attempts against a private mesh member ({tries} tries each, TCP on 127.0.0.1)"
    );
    println!(
        "| {:<28} | {:>8} | {:>8} | {:>15} | {:>10} |",
        "dialer", "admitted", "refused", "dialer saw open", "tries/s"
    );
    println!(
        "| {:-<28} | {:->8} | {:->8} | {:->15} | {:->10} |",
        "", "", "", "", ""
    );
    for (name, admitted, refused, seen, secs) in outsiders(tries) {
        println!(
            "| {name:<28} | {admitted:>8} | {refused:>8} | {seen:>15} | {:>10.0} |",
            tries as f64 / secs
        );
    }
    println!("(admitted counts connections the member's gate let through; outsiders must be 0,");
    println!(" the member control {tries}. \"dialer saw open\": a stranger with the key completes");
    println!(
        " its noise handshake before the member's gate closes the connection; no stream opens.)"
    );
    println!();

    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let root = std::env::temp_dir().join(format!("pollen-bench-private-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let key = root.join("swarm.key");
    private::write_new_key(&key, &SwarmKey::generate()).unwrap();
    let quic: &[&str] = &["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"];
    let mut public = LocalMesh::start(
        &exe,
        &model,
        &root.join("public"),
        "s",
        &THREE_SPANS,
        &[quic, quic, quic],
    )
    .unwrap();
    // The private mesh's processes read the key from the environment.
    // SAFETY: no thread of this process reads the environment while it changes; the
    // children started after it inherit it.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var(private::SWARM_KEY_ENV, &key);
    }
    let mut private_mesh =
        LocalMesh::start(&exe, &model, &root.join("private"), "s", &THREE_SPANS, &[]).unwrap();
    #[allow(unsafe_code)]
    unsafe {
        std::env::remove_var(private::SWARM_KEY_ENV);
    }
    // One warm-up each, then alternate.
    decode_speed(&exe, &model, &public.addr, None, 8);
    decode_speed(&exe, &model, &private_mesh.addr, Some(&key), 8);
    let (mut pubs, mut privs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        pubs.push(decode_speed(&exe, &model, &public.addr, None, tokens));
        privs.push(decode_speed(
            &exe,
            &model,
            &private_mesh.addr,
            Some(&key),
            tokens,
        ));
    }
    public.stop(Duration::from_secs(5));
    private_mesh.stop(Duration::from_secs(5));
    let (p, q) = (median(&mut pubs), median(&mut privs));
    println!(
        "Decode through 3 servers on 127.0.0.1 (1 thread each), {tokens} tokens, median of {runs}"
    );
    println!("| {:<36} | {:>13} |", "mesh", "decode tok/s");
    println!("| {:-<36} | {:->13} |", "", "");
    println!("| {:<36} | {p:>13.1} |", "public (TCP and QUIC, noise)");
    println!(
        "| {:<36} | {q:>13.1} |",
        "private (pnet under noise, TCP only)"
    );
    println!("private / public: {:.3}", q / p);
    let _ = std::fs::remove_dir_all(&root);
}
