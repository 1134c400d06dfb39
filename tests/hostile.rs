//! Hostile peers against a real swarm on 127.0.0.1: a bootstrap and three servers as
//! separate processes, and a hostile client built from Pollen's own crates in this
//! process. It floods the bootstrap with registrations of random model ids and with
//! sybil announcements for a real span, squats sessions, and asks a server to open a
//! route through a peer that is no server. None of it does harm: a new real server still
//! gets in, every real server is still listed, a real client still generates the local
//! text, and the server dials nothing the hostile client named.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "common/hostile.rs"]
mod attacker;
mod common;

use attacker::{announcement, client_node, nobody_after, open_through, wire_hop};
use common::*;
use libp2p::{Multiaddr, PeerId};
use pollen_node::client::{ClientError, SwarmSession, route};
use pollen_node::net::NetHandle;
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, ErrorCode, InferResponse, ModelId, PeerIdBytes,
    SignedAnnouncement, WireDType,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The default caps of a bootstrap's book (see `pollen bootstrap --help`).
const PER_SENDER: usize = 64;
const PUBLISH_BURST: usize = 32;

/// A sybil: an announcement from a fresh key whose name would clear a terminal.
fn sybil(model: ModelId, blocks: (u32, u32), compute: &str, num_blocks: u32) -> SignedAnnouncement {
    announcement(model, blocks, compute, num_blocks, "sybil\u{1b}[2J")
}

/// Publishes every announcement over the one connection `net` has to `boot`; how many
/// were accepted, and how many refused as busy.
async fn flood(
    net: &NetHandle,
    boot: PeerId,
    all: impl Iterator<Item = SignedAnnouncement>,
) -> (usize, usize) {
    let (mut accepted, mut busy) = (0, 0);
    for a in all {
        match net
            .announce(boot, AnnounceRequest::Publish(Box::new(a)))
            .await
            .unwrap()
        {
            AnnounceResponse::Accepted => accepted += 1,
            AnnounceResponse::Refused(e) if e.code == ErrorCode::Busy => busy += 1,
            other => panic!("a flood publish was answered {other:?}"),
        }
    }
    (accepted, busy)
}

/// Raw `GET /` from the bootstrap's HTTP side: its head and body.
fn page_with_headers(http: &str) -> (String, String) {
    use std::io::{Read, Write};
    let hostport = http.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn hostile_peers_do_no_harm() {
    let dir = temp_dir("hostile");
    let (boot, boot_addr) = bootstrap(&dir, true);
    let http = boot
        .line_with("http ", Duration::from_secs(10))
        .unwrap()
        .replacen("http ", "", 1);
    let quick = ["--first-step-timeout", "2"];
    let servers = three_servers(Some(&boot_addr), &dir, "s", [&quick, &quick, &quick]);
    wait_for(Duration::from_secs(15), || {
        coverage(&status(Some(&boot_addr))).is_some_and(|(gaps, n)| gaps.is_empty() && n == 3)
    })
    .expect("the three servers cover the model");
    let (prompt, chat) = PROMPTS[1];
    let local = generate(None, prompt, chat, 12);

    let model_path = model();
    let model_id = pollen_node::model::model_id(&model_path, &mut |_, _| {}).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let boot_multiaddr: Multiaddr = boot_addr.parse().unwrap();
    let (hostile, boot_peer) = rt.block_on(client_node(&boot_multiaddr, &cancel));
    let real = rt.block_on(hostile.gather(Some(model_id))).unwrap();
    assert_eq!(real.len(), 3, "{real:?}");
    let compute = real[0].compute.clone();
    let num_blocks = real[0].num_blocks;

    // Registration flood: random model ids from fresh keys, then sybils for the real
    // model's first span, all over one connection as fast as the bootstrap answers.
    let started = Instant::now();
    let (flood_ok, flood_busy) = rt.block_on(flood(
        &hostile,
        boot_peer,
        (0..2000).map(|_| {
            sybil(
                ModelId::from_bytes(rand::random()),
                (0, 10),
                &compute,
                num_blocks,
            )
        }),
    ));
    let (sybil_ok, sybil_busy) = rt.block_on(flood(
        &hostile,
        boot_peer,
        (0..1100).map(|_| sybil(model_id, (0, 10), &compute, num_blocks)),
    ));
    let took = started.elapsed();
    eprintln!(
        "flood: {flood_ok} of 2000 accepted, {flood_busy} busy; sybils: {sybil_ok} of 1100 \
         accepted, {sybil_busy} busy; {took:?}"
    );
    assert_eq!(flood_ok + flood_busy, 2000);
    assert_eq!(sybil_ok + sybil_busy, 1100);
    // The burst, then two a second for as long as the flood ran.
    let rate_allows = PUBLISH_BURST + 2 * took.as_secs() as usize + 2;
    assert!(
        flood_ok + sybil_ok <= rate_allows.min(PER_SENDER),
        "{flood_ok} + {sybil_ok}"
    );

    // A real new server still gets in, and every real server is listed.
    let (_s3, ready) = server(Some(&boot_addr), "0:10", &dir.join("s3.key"), &quick);
    let newcomer = peer_of(&ready).to_string();
    wait_for(Duration::from_secs(15), || {
        status(Some(&boot_addr))["models"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["servers"].as_array().cloned().unwrap_or_default())
            .any(|s| s["peer"] == newcomer.as_str())
    })
    .expect("a new server gets into the book after the flood");
    let listed = rt.block_on(hostile.gather(Some(model_id))).unwrap();
    for (_, ready) in &servers {
        let peer = PeerIdBytes(peer_of(ready).parse::<PeerId>().unwrap().to_bytes());
        assert!(
            listed.iter().any(|a| a.peer == peer),
            "{} is listed",
            peer_of(ready)
        );
    }

    // The page is safe to show: its headers, and no control character from a peer.
    let (head, body) = page_with_headers(&http);
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(head.contains("frame-ancestors 'none'"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(!body.contains('\u{1b}'));

    // A real client still generates the local text.
    let swarm = generate(Some(&boot_addr), prompt, chat, 12);
    assert_eq!(swarm, local, "swarm text after the flood");

    // Session squatting: the hostile client holds at most its share of each server,
    // and a real client still gets through meanwhile.
    let hidden = pollen_shard::ModelFile::open(&model_path)
        .unwrap()
        .config()
        .unwrap()
        .hidden_size;
    let hops = route(
        &listed
            .iter()
            .filter(|a| a.addrs.iter().all(|x| !x.ends_with("/tcp/1")))
            .cloned()
            .collect::<Vec<_>>(),
        model_id,
        num_blocks as usize,
        &compute,
        &HashMap::new(),
    )
    .unwrap();
    let open = || {
        SwarmSession::open(
            &hostile,
            model_id,
            &compute,
            &hops,
            16,
            hidden,
            WireDType::F32,
        )
    };
    let mut squatted = Vec::new();
    let refusal = rt.block_on(async {
        for _ in 0..16 {
            match open().await {
                Ok(s) => squatted.push(s),
                Err(e) => return e,
            }
        }
        panic!("16 sessions of one client were accepted");
    });
    match &refusal {
        ClientError::HopFailed(f) => {
            assert_eq!(f.code, ErrorCode::Busy, "{f:?}");
            assert!(f.message.contains("the most one client may"), "{f:?}");
        }
        other => panic!("squatting was refused with {other:?}"),
    }
    assert_eq!(squatted.len(), 8, "the default cap per client");
    let swarm = generate(Some(&boot_addr), prompt, chat, 12);
    assert_eq!(swarm, local, "swarm text while a client squats");
    // Sessions that never step are freed: 2 s a hop here, so within 6 s at the last.
    std::thread::sleep(Duration::from_secs(7));
    let again = rt.block_on(open());
    assert!(
        again.is_ok(),
        "squatted sessions were freed: {:?}",
        again.err()
    );
    drop(again);
    drop(squatted);

    // Servers as proxies: an Open naming as next hop a peer that is no server, at an
    // address the attacker chose, is refused, and nothing is dialed there.
    let (trap, trap_addr) = attacker::silent_listener();
    trap.set_nonblocking(true).unwrap();
    let first = &hops[0];
    let wire_first = wire_hop(first);
    let nobody = nobody_after(&wire_first, num_blocks, trap_addr);
    let answer = rt.block_on(open_through(
        &hostile,
        first,
        model_id,
        &compute,
        vec![wire_first, nobody.clone()],
    ));
    match answer {
        Ok(InferResponse::HopFailed {
            hop: 1,
            peer,
            error,
            ..
        }) => {
            assert_eq!(peer, nobody.peer);
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert!(error.message.contains("no valid announcement"), "{error}");
        }
        Ok(other) => panic!("an Open through a non-server was answered {other:?}"),
        Err(e) => panic!("an Open through a non-server: {e}"),
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the server dialed the address the hostile client named"
    );

    // Memory: a server whose --max-memory leaves room for two sessions' caches and a
    // short step refuses a long prefill with a clear error, and still runs short steps.
    let tokens_cap = 256usize;
    let span = pollen_shard::BlockSpan::load(
        &pollen_shard::ModelFile::open(&model_path).unwrap(),
        pollen_node::blocks::BlockRange { start: 20, end: 30 },
        &pollen_shard::LoadOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let kv = span.kv_bytes_per_token() * tokens_cap;
    let short = span.step_memory_bytes(1, 0);
    let room = 2 * kv + 2 * short;
    // Past the budget by a short step's worth at least: this process's estimates
    // count its own threads' scratch, which may be more than the server's.
    let long = (1..=tokens_cap)
        .find(|&n| span.step_memory_bytes(n, 0) + kv > room + short)
        .expect("some prefill passes the budget");
    let max_memory = (span.weight_bytes() + room).to_string();
    drop(span);
    let (_tight, ready) = server(
        Some(&boot_addr),
        "20:30",
        &dir.join("tight.key"),
        &[
            "--max-memory",
            &max_memory,
            "--max-session-tokens",
            &tokens_cap.to_string(),
            // Prompts whole: in parts, a prompt needs less at once (what it holds between
            // parts and one part's working memory).
            "--prompt-part-ms",
            "0",
        ],
    );
    let tight: PeerId = peer_of(&ready).parse().unwrap();
    let (limited_hops, client) = rt.block_on(async {
        let (client, _) = client_node(&boot_multiaddr, &cancel).await;
        let book = loop {
            let book = client.gather(Some(model_id)).await.unwrap();
            if book.iter().any(|a| a.peer.0 == tight.to_bytes()) {
                break book;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut limited = hops.clone();
        let last = book.iter().find(|a| a.peer.0 == tight.to_bytes()).unwrap();
        limited[2].peer = tight;
        limited[2].addrs = last.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        (limited, client)
    });
    let x = |n: usize| {
        candle_core::Tensor::zeros(
            (1, n, hidden),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let open_limited = || {
        SwarmSession::open(
            &client,
            model_id,
            &compute,
            &limited_hops,
            tokens_cap as u32,
            hidden,
            WireDType::F32,
        )
    };
    rt.block_on(async {
        let mut s = open_limited().await.unwrap();
        match s.step(&x(long), 0).await {
            Err(ClientError::HopFailed(f)) => {
                assert_eq!((f.hop, f.code), (2, ErrorCode::OverBudget), "{f:?}");
                assert!(f.message.contains("working memory"), "{f:?}");
            }
            other => panic!("a {long}-token prefill past the memory budget: {other:?}"),
        }
        s.close().await;
        let mut s = open_limited().await.unwrap();
        s.step(&x(1), 0).await.unwrap();
        s.close().await;
    });

    cancel.cancel();
    drop(rt);
    drop(servers);
    drop(boot);
    let _ = std::fs::remove_dir_all(&dir);
}
