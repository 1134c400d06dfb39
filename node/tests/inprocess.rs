//! Node behaviour below the process level: whole swarms in one process, on libp2p's
//! in-process transport (every listen address is `/memory/0`, so no socket is opened),
//! with exact assertions on what each node holds and answers.
//!
//! Each test runs under a hard bound ([`BOUND`]), so a lost message fails the test
//! instead of hanging it.
//!
//! Time: the swarm tests run with tokio's clock paused (`start_paused`): every
//! duration is measured with `tokio::time::Instant`, the virtual clock, so "answered
//! within 1 s" means within 1 s of timers, not of a loaded machine. The expiry test
//! blocks the thread instead of sleeping, since the announcement book reads the wall
//! clock (`pollen_node::clock::unix_ms`, `SystemTime`), which virtual time does not
//! move. The session test runs on real time (see its comment).
#![allow(clippy::unwrap_used, missing_docs)]

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use pollen_node::net::{self, NetConfig, NetHandle, Role};
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, Announcement, BlockRange, ModelId, PeerIdBytes,
    SignedAnnouncement, VerifiedAnnouncement,
};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The longest any test may run before it counts as hung.
const BOUND: Duration = Duration::from_secs(30);
/// How long a node may take to report its listen address.
const LISTEN_WAIT: Duration = Duration::from_secs(5);
/// The model every announcement here is for.
const MODEL: ModelId = ModelId::from_bytes([7; 32]);

/// Runs `test` under [`BOUND`].
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(BOUND, test)
        .await
        .expect("the test hung past its bound");
}

/// A running node on the in-process transport.
struct Node {
    net: NetHandle,
    key: Keypair,
    /// Its listen address, with `/p2p/<id>`.
    addr: Multiaddr,
}

impl Node {
    async fn start(role: Role, version: u32, cancel: &CancellationToken) -> Node {
        let key = Keypair::generate_ed25519();
        let cfg = NetConfig {
            keypair: key.clone(),
            listen: vec!["/memory/0".parse().unwrap()],
            mdns: false,
            role,
            protocol_version: version,
            ..NetConfig::new(role)
        };
        assert!(net::transport::uses_memory(&cfg));
        let (net, _task) = net::start(cfg, cancel.clone()).unwrap();
        let addrs = net.wait_listening(1, LISTEN_WAIT).await.unwrap();
        assert_eq!(addrs.len(), 1, "one listen address: {addrs:?}");
        assert!(net::transport::is_memory(&addrs[0]), "{addrs:?}");
        let addr = addrs[0].clone().with(Protocol::P2p(net.peer_id()));
        Node { net, key, addr }
    }

    async fn current(role: Role, cancel: &CancellationToken) -> Node {
        Self::start(role, pollen_protocol::PROTOCOL_VERSION, cancel).await
    }

    fn peer(&self) -> PeerId {
        self.net.peer_id()
    }

    /// A signed announcement of blocks `[start, end)` of [`MODEL`], issued now.
    fn announce(&self, blocks: (u32, u32), ttl_ms: u64, seq: u64) -> SignedAnnouncement {
        let now = pollen_node::clock::unix_ms();
        let a = Announcement {
            peer: PeerIdBytes(self.peer().to_bytes()),
            model_id: MODEL,
            model_name: "test".into(),
            num_blocks: 30,
            blocks: BlockRange::new(blocks.0, blocks.1).unwrap(),
            throughput: 100.0,
            free_sessions: 4,
            free_cache_tokens: 8192,
            addrs: vec![self.addr.to_string()],
            compute: "fast-vnni".into(),
            next_rtts: vec![],
            issued_at_ms: now,
            expires_at_ms: now + ttl_ms,
            seq,
        };
        let secret = net::identity::ed25519_secret(&self.key).unwrap();
        SignedAnnouncement::sign(a, &secret).unwrap()
    }
}

fn signed(list: Vec<VerifiedAnnouncement>) -> Vec<SignedAnnouncement> {
    list.into_iter()
        .map(VerifiedAnnouncement::into_signed)
        .collect()
}

/// An `Open` of a session of at most 16 tokens at the first hop of `route`.
fn open_request(
    session: pollen_protocol::SessionId,
    model_id: ModelId,
    route: Vec<pollen_protocol::RouteHop>,
    compute: &str,
    client: PeerIdBytes,
) -> pollen_protocol::InferRequest {
    pollen_protocol::InferRequest::Open {
        session,
        model_id,
        route,
        hop: 0,
        budget: pollen_protocol::SessionBudget {
            max_tokens: 16,
            max_message_bytes: 1 << 20,
            idle_timeout_ms: 10_000,
            open_within_ms: 10_000,
        },
        wire_dtype: pollen_protocol::WireDType::F32,
        compute: compute.to_string(),
        client,
    }
}

#[tokio::test(start_paused = true)]
async fn a_published_announcement_is_listed_by_the_bootstrap_and_gathered_by_a_client() {
    bounded(async {
        let cancel = CancellationToken::new();
        let boot = Node::current(Role::Bootstrap, &cancel).await;
        let server = Node::current(Role::Server, &cancel).await;
        let client = Node::current(Role::Client, &cancel).await;

        assert_eq!(
            server.net.dial(boot.addr.clone()).await.unwrap(),
            boot.peer()
        );
        let own = server.announce((0, 10), 60_000, 1);
        let acked = server
            .net
            .set_own_announcement_and_wait(Some(own.clone()), Duration::from_secs(3))
            .await
            .unwrap();
        assert!(acked, "the bootstrap acknowledges the publish");
        assert_eq!(
            signed(boot.net.book(None).await.unwrap()),
            vec![own.clone()]
        );

        assert_eq!(
            client.net.dial(boot.addr.clone()).await.unwrap(),
            boot.peer()
        );
        let gathered = client.net.gather(Some(MODEL)).await.unwrap();
        assert_eq!(gathered.len(), 1, "{gathered:?}");
        let a = &gathered[0];
        assert_eq!(a.peer, PeerIdBytes(server.peer().to_bytes()));
        assert_eq!(a.model_id, MODEL);
        assert_eq!(a.blocks, BlockRange::new(0, 10).unwrap());
        assert_eq!(a.num_blocks, 30);
        assert_eq!(a.free_sessions, 4);
        assert_eq!(a.addrs, vec![server.addr.to_string()]);
        assert_eq!(a.compute, "fast-vnni");
        assert_eq!(a.seq, 1);
        assert_eq!(signed(gathered), vec![own.clone()], "passed on unchanged");
        // Another model's list is empty.
        let other = ModelId::from_bytes([8; 32]);
        assert!(client.net.gather(Some(other)).await.unwrap().is_empty());

        // One publish reached the bootstrap, then one list request per gather from the
        // client (one page each); the server sent exactly one message (a renewal costs
        // one per bootstrap).
        assert_eq!(boot.net.stats().announce_in.load(Ordering::Relaxed), 3);
        assert_eq!(server.net.stats().announce_out.load(Ordering::Relaxed), 1);
        // The client also found the server as a provider of the model in the DHT,
        // connected to it and asked it for its list: once in the first gather, and once
        // more in the second if still connected (one page each, never more).
        let peers: Vec<PeerId> = client
            .net
            .peers()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.peer)
            .collect();
        assert!(
            peers.contains(&server.peer()),
            "the client reached the server through the DHT: {peers:?}"
        );
        let asked = server.net.stats().announce_in.load(Ordering::Relaxed);
        assert!(
            (1..=2).contains(&asked),
            "the server answered {asked} list requests; one or two expected"
        );
        cancel.cancel();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_announcement_leaves_every_book_when_it_expires() {
    bounded(async {
        let cancel = CancellationToken::new();
        let boot = Node::current(Role::Bootstrap, &cancel).await;
        let server = Node::current(Role::Server, &cancel).await;
        let client = Node::current(Role::Client, &cancel).await;
        server.net.dial(boot.addr.clone()).await.unwrap();
        client.net.dial(boot.addr.clone()).await.unwrap();

        let brief = server.announce((0, 10), 1_000, 1);
        let expires = brief.announcement.expires_at_ms;
        assert!(
            server
                .net
                .set_own_announcement_and_wait(Some(brief.clone()), Duration::from_secs(3))
                .await
                .unwrap()
        );
        assert_eq!(
            signed(boot.net.book(None).await.unwrap()),
            vec![brief.clone()]
        );
        assert_eq!(signed(client.net.gather(None).await.unwrap()), vec![brief]);

        // The book's clock is the wall clock, which paused tokio time does not move:
        // block this thread (so no virtual time passes either) until it has expired.
        let left = expires.saturating_sub(pollen_node::clock::unix_ms());
        std::thread::sleep(Duration::from_millis(left + 50));
        assert!(pollen_node::clock::unix_ms() > expires);

        assert_eq!(boot.net.book(None).await.unwrap(), vec![]);
        assert_eq!(server.net.book(None).await.unwrap(), vec![]);
        assert_eq!(client.net.book(None).await.unwrap(), vec![]);
        assert_eq!(client.net.gather(None).await.unwrap(), vec![]);
        match client
            .net
            .announce(boot.peer(), AnnounceRequest::List { model_id: None })
            .await
            .unwrap()
        {
            AnnounceResponse::List(list) => assert_eq!(list, vec![]),
            other => panic!("a list request answered with {other:?}"),
        }
        cancel.cancel();
    })
    .await;
}

/// Both refusals a node may record, each labelled with who refused: the reason it gave
/// (its own version first) or the reason the peer gave it (the peer's version first).
fn version_refusals(ours: u32, theirs: u32) -> [String; 2] {
    [
        format!("we refused it: protocol version mismatch: we speak {ours}, peer speaks {theirs}"),
        format!("it refused us: protocol version mismatch: we speak {theirs}, peer speaks {ours}"),
    ]
}

#[tokio::test(start_paused = true)]
async fn nodes_of_different_versions_refuse_each_other_and_both_say_why() {
    bounded(async {
        let cancel = CancellationToken::new();
        let v = pollen_protocol::PROTOCOL_VERSION;
        let old = Node::start(Role::Bootstrap, v, &cancel).await;
        let new = Node::start(Role::Server, v + 1, &cancel).await;
        // The connection itself succeeds; the handshake on it is refused.
        assert_eq!(new.net.dial(old.addr.clone()).await.unwrap(), old.peer());

        let (on_old, on_new) = loop {
            let seen = (
                old.net.refusals().await.unwrap(),
                new.net.refusals().await.unwrap(),
            );
            if !seen.0.is_empty() && !seen.1.is_empty() {
                break seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(on_old.len(), 1, "{on_old:?}");
        assert_eq!(on_new.len(), 1, "{on_new:?}");
        assert_eq!(on_old[0].0, new.peer());
        assert_eq!(on_new[0].0, old.peer());
        assert!(
            version_refusals(v, v + 1).contains(&on_old[0].1),
            "{on_old:?}"
        );
        assert!(
            version_refusals(v + 1, v).contains(&on_new[0].1),
            "{on_new:?}"
        );

        // A refused peer is disconnected, and is neither listed nor published to.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && !(new.net.peers().await.unwrap().is_empty()
                && old.net.peers().await.unwrap().is_empty())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(new.net.peers().await.unwrap().is_empty());
        assert!(old.net.peers().await.unwrap().is_empty());
        cancel.cancel();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_goodbye_returns_as_soon_as_the_bootstrap_answers() {
    bounded(async {
        let cancel = CancellationToken::new();
        let boot = Node::current(Role::Bootstrap, &cancel).await;
        let server = Node::current(Role::Server, &cancel).await;
        server.net.dial(boot.addr.clone()).await.unwrap();
        let first = server.announce((0, 10), 60_000, 1);
        server
            .net
            .set_own_announcement(Some(first.clone()))
            .await
            .unwrap();

        // The goodbye, as a draining server sends it: no free session, short-lived.
        let mut goodbye = server.announce((0, 10), 2_000, 2).announcement;
        goodbye.free_sessions = 0;
        goodbye.free_cache_tokens = 0;
        let secret = net::identity::ed25519_secret(&server.key).unwrap();
        let goodbye = SignedAnnouncement::sign(goodbye, &secret).unwrap();

        let wait = Duration::from_secs(3);
        let started = Instant::now();
        let acked = server
            .net
            .set_own_announcement_and_wait(Some(goodbye.clone()), wait)
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            acked,
            "the bootstrap answered, so the wait says all answered"
        );
        assert!(
            took < Duration::from_secs(1),
            "took {took:?} of a {wait:?} wait"
        );
        assert_eq!(
            signed(boot.net.book(None).await.unwrap()),
            vec![goodbye.clone()]
        );

        // A refused publish is an answer too: sending the same goodbye again is a
        // replay the bootstrap refuses, and the wait still ends at once.
        let started = Instant::now();
        let acked = server
            .net
            .set_own_announcement_and_wait(Some(goodbye.clone()), wait)
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(acked, "a refusal is an answer");
        assert!(
            took < Duration::from_secs(1),
            "took {took:?} of a {wait:?} wait"
        );
        assert_eq!(signed(boot.net.book(None).await.unwrap()), vec![goodbye]);

        // Publishes: the first announcement, the goodbye and its replay.
        assert_eq!(boot.net.stats().announce_in.load(Ordering::Relaxed), 3);
        cancel.cancel();
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_goodbye_with_no_bootstrap_connected_returns_at_once() {
    bounded(async {
        let cancel = CancellationToken::new();
        let server = Node::current(Role::Server, &cancel).await;
        let started = Instant::now();
        let acked = server
            .net
            .set_own_announcement_and_wait(
                Some(server.announce((0, 10), 2_000, 1)),
                Duration::from_secs(3),
            )
            .await
            .unwrap();
        assert!(acked, "nobody to wait for");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(server.net.stats().announce_out.load(Ordering::Relaxed), 0);
        cancel.cancel();
    })
    .await;
}

/// A fresh folder for the keys of a test's servers, named after `name`.
fn keys_dir(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "{name}-{}-{}",
        std::process::id(),
        pollen_node::clock::unix_ms()
    ))
}

/// An in-process server of `blocks` that joins through `boot`: 2 sessions of at most 64
/// tokens, one of them per client, one compute slot, prompts in parts of 100 ms.
fn server_config(
    model: &std::path::Path,
    blocks: &str,
    load: &pollen_shard::LoadOptions,
    boot: &Node,
    identity: std::path::PathBuf,
) -> pollen_node::serve::ServeConfig {
    pollen_node::serve::ServeConfig {
        model: model.to_path_buf(),
        blocks: Some(blocks.to_string()),
        load: load.clone(),
        listen: vec!["/memory/0".parse().unwrap()],
        bootstrap: vec![boot.addr.clone()],
        identity,
        mdns: false,
        max_sessions: 2,
        max_session_tokens: 64,
        idle_timeout: Duration::from_secs(60),
        announce_ttl: Duration::from_secs(60),
        grace: Duration::from_secs(1),
        compute_slots: 1,
        prompt_part: Duration::from_millis(100),
        max_batch: pollen_node::serve::batch::DEFAULT_MAX_BATCH,
        max_cache_bytes: None,
        max_memory_bytes: None,
        num_blocks: None,
        rebalance_every: Duration::from_secs(60),
        peer_limits: pollen_node::serve::sessions::PeerLimits {
            sessions_per_client: 1,
            streams_per_peer: 8,
            first_step_timeout: Duration::from_secs(1),
        },
        net: Default::default(),
    }
}

/// What `net` gathers of `model` once it holds `servers` announcements (asked every
/// 50 ms).
async fn book_of(net: &NetHandle, model: ModelId, servers: usize) -> Vec<VerifiedAnnouncement> {
    loop {
        let book = net.gather(Some(model)).await.unwrap();
        if book.len() == servers {
            return book;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new session from `open` once a refused step has ended the client's last one: the
/// servers answer `busy` until that session's end has reached them (5 s at most here).
async fn reopen<F, Fut>(open: F) -> pollen_node::client::SwarmSession
where
    F: Fn() -> Fut,
    Fut: Future<
        Output = Result<pollen_node::client::SwarmSession, pollen_node::client::ClientError>,
    >,
{
    let refused_at = Instant::now();
    loop {
        match open().await {
            Ok(s) => return s,
            Err(pollen_node::client::ClientError::HopFailed(f))
                if f.code == pollen_protocol::ErrorCode::Busy
                    && refused_at.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopening after a refused step: {e}"),
        }
    }
}

/// The longest the session test may run: it loads the model three times (two spans
/// and the local reference) and measures each span's speed.
const SPAN_BOUND: Duration = Duration::from_secs(180);

/// A whole chain: two `serve::run` servers holding the two halves of the default model,
/// a bootstrap and a client, all on the in-process transport.
///
/// Real time, not paused: the servers load their spans and compute steps in
/// `spawn_blocking`, which paused time does not wait for; with the clock paused, the
/// runtime would look idle while a block computes and jump virtual time past every
/// step timeout. The bound is generous for that reason and still finite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_two_servers_matches_the_whole_model_and_a_full_server_is_busy() {
    use candle_core::{Device, Tensor};
    use pollen_node::blocks::BlockRange as Blocks;
    use pollen_node::client::error::HopFailure;
    use pollen_node::client::{ClientError, SwarmSession, route};
    use pollen_node::serve::{self, ServeConfig};
    use pollen_protocol::{ErrorCode, InferRequest, InferResponse, RouteHop, SessionId, WireDType};
    use pollen_shard::{BlockSpan, CacheLimits, LoadOptions, ModelFile};
    use std::collections::HashMap;

    let test = async {
        let model =
            pollen_node::fetch::ensure_default_model(&mut |line| eprintln!("{line}")).unwrap();
        let file = ModelFile::open(&model).unwrap();
        let config = file.config().unwrap();
        let (n, hidden) = (config.num_blocks, config.hidden_size);
        let half = n / 2;
        let model_id = pollen_node::model::model_id(&model, &mut |_, _| {}).unwrap();
        let load = LoadOptions::default();
        let compute = pollen_shard::compute_mode(&file, &load).unwrap();

        let cancel = CancellationToken::new();
        let boot = Node::current(Role::Bootstrap, &cancel).await;
        let keys = keys_dir("pollen-inprocess");
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let servers: Vec<_> = [(0, half), (half, n)]
            .into_iter()
            .map(|(start, end)| {
                let cfg = ServeConfig {
                    // Parts as small as they come: 32 rows, then 32 again.
                    prompt_part: Duration::from_nanos(1),
                    ..server_config(
                        &model,
                        &format!("{start}:{end}"),
                        &load,
                        &boot,
                        keys.join(format!("server-{start}.key")),
                    )
                };
                tokio::spawn(serve::run(cfg, stop.clone(), kill.clone()))
            })
            .collect();

        let client = Node::current(Role::Client, &cancel).await;
        client.net.dial(boot.addr.clone()).await.unwrap();
        let book = book_of(&client.net, model_id, 2).await;
        for a in &book {
            assert_eq!(a.model_id, model_id);
            assert_eq!(a.num_blocks as usize, n);
            assert_eq!(a.free_sessions, 2);
            assert_eq!(a.compute, compute);
        }
        let hops = route(&book, model_id, n, &compute, &HashMap::new()).unwrap();
        let spans: Vec<Blocks> = hops.iter().map(|h| h.blocks).collect();
        assert_eq!(
            spans,
            vec![
                Blocks {
                    start: 0,
                    end: half
                },
                Blocks {
                    start: half,
                    end: n
                }
            ]
        );

        let open = || {
            SwarmSession::open(
                &client.net,
                model_id,
                &compute,
                &hops,
                48,
                hidden,
                WireDType::F32,
            )
        };
        let mut session = open().await.unwrap();
        assert_eq!(session.route(), &hops[..]);

        // The same two tokens through the whole model in this process.
        let whole =
            BlockSpan::load(&file, Blocks { start: 0, end: n }, &load, &mut |_, _| {}).unwrap();
        let mut cache = whole.new_cache(CacheLimits::default());
        let xs: Vec<Tensor> = (0..2)
            .map(|t| {
                Tensor::arange(0f32, hidden as f32, &Device::Cpu)
                    .unwrap()
                    .affine(0.01, -2.0 + t as f64)
                    .unwrap()
                    .reshape((1, 1, hidden))
                    .unwrap()
            })
            .collect();
        for (pos, x) in xs.iter().enumerate() {
            let want = whole.forward(x, pos, &mut cache).unwrap();
            let got = session.step(x, pos).await.unwrap();
            assert_eq!(got.dims(), &[1, 1, hidden]);
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "step at position {pos}"
            );
        }

        // A step past the session's token cap is refused before it is decoded.
        let long = Tensor::zeros((1, 49, hidden), candle_core::DType::F32, &Device::Cpu).unwrap();
        match session.step(&long, 2).await {
            Err(ClientError::HopFailed(f)) => {
                assert_eq!((f.hop, f.code), (0, ErrorCode::OverBudget), "{f:?}");
                assert_eq!(
                    f.message,
                    "a step of 49 tokens at position 2 passes this session's cap of 48 tokens"
                );
            }
            other => panic!("a step past the token cap: {other:?}"),
        }
        // A refused step ends the session on every server: a new one is brought to
        // the same state (its slot is free once the old one's end has reached it).
        session.close().await;
        let mut session = reopen(open).await;
        for (pos, x) in xs.iter().enumerate() {
            session.step(x, pos).await.unwrap();
        }

        // A prompt of 40 rows, which each server computes in parts (32 rows, then 8),
        // other steps free to run between them: the same bits as the whole model
        // computing it at once.
        let prompt = Tensor::arange(0f32, (40 * hidden) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.0002, -1.5)
            .unwrap()
            .reshape((1, 40, hidden))
            .unwrap();
        let want = whole.forward(&prompt, 2, &mut cache).unwrap();
        let got = session.step(&prompt, 2).await.unwrap();
        let rows = got.dim(1).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.narrow(1, 40 - rows, rows)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            "a prompt computed in parts"
        );

        // A stranger can neither take the client's outputs nor open a route in its name.
        let stranger = Node::current(Role::Client, &cancel).await;
        let last = hops.last().unwrap();
        let (_, _, answer) = pollen_node::net::stream::open_with_reply::<_, InferResponse>(
            &stranger.net,
            last.peer,
            last.addrs.clone(),
            &InferRequest::Attach {
                session: session.id(),
            },
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        match answer {
            InferResponse::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest);
                assert!(e.message.contains("belongs to another client"), "{e}");
            }
            other => panic!("a stranger's attach was answered {other:?}"),
        }
        let wire_route: Vec<RouteHop> = hops
            .iter()
            .map(|h| RouteHop {
                peer: PeerIdBytes(h.peer.to_bytes()),
                blocks: pollen_node::blocks::to_wire(h.blocks).unwrap(),
                addrs: h.addrs.iter().map(|a| a.to_string()).collect(),
                step_us: h.step_us,
            })
            .collect();
        let in_its_name = open_request(
            SessionId(7),
            model_id,
            wire_route.clone(),
            &compute,
            PeerIdBytes(client.peer().to_bytes()),
        );
        let (_, _, answer) = pollen_node::net::stream::open_with_reply::<_, InferResponse>(
            &stranger.net,
            hops[0].peer,
            hops[0].addrs.clone(),
            &in_its_name,
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        // Refused unsigned: nothing is signed for an Open that does not pass its checks.
        match answer {
            InferResponse::Error(error) => {
                assert_eq!(error.code, ErrorCode::BadRequest);
                assert!(error.message.contains("must be opened by"), "{error}");
            }
            other => panic!("an open in another client's name was answered {other:?}"),
        }

        // Servers as proxies: an Open naming a peer that is no server as the next hop
        // is refused, and that peer is never dialed.
        let victim = Node::current(Role::Client, &cancel).await;
        let mut to_victim = wire_route.clone();
        to_victim[1].peer = PeerIdBytes(victim.peer().to_bytes());
        to_victim[1].addrs = vec![victim.addr.to_string()];
        let (_, _, answer) = pollen_node::net::stream::open_with_reply::<_, InferResponse>(
            &stranger.net,
            hops[0].peer,
            hops[0].addrs.clone(),
            &open_request(
                SessionId(8),
                model_id,
                to_victim,
                &compute,
                PeerIdBytes(stranger.peer().to_bytes()),
            ),
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        match answer {
            InferResponse::HopFailed {
                hop: 1,
                peer,
                error,
                ..
            } => {
                assert_eq!(peer.0, victim.peer().to_bytes());
                assert_eq!(error.code, ErrorCode::BadRequest);
                assert!(error.message.contains("no valid announcement"), "{error}");
            }
            other => panic!("an open through a non-server was answered {other:?}"),
        }
        let victims_peers = victim.net.peers().await.unwrap();
        assert!(
            victims_peers.iter().all(|p| p.peer != hops[0].peer),
            "the server dialed the peer an Open named: {victims_peers:?}"
        );

        // One client holds at most its share of a server: a second session of the same
        // client is refused by the first hop, though the server has room.
        match open().await {
            Err(ClientError::HopFailed(failure)) => assert_eq!(
                *failure,
                HopFailure {
                    hop: 0,
                    peer: hops[0].peer,
                    blocks: hops[0].blocks,
                    code: ErrorCode::Busy,
                    message: format!(
                        "client {} holds 1 sessions on this server already, the most one client may",
                        client.peer()
                    ),
                    reported_by: None,
                    blamed_by: None,
                }
            ),
            other => panic!("a second session of one client: {other:?}"),
        }
        // Session squatting: a session that never steps fills the last slot, and is
        // freed within its first-step timeout (1 s a hop here), so others get in again.
        // (The client's session steps first: a session idle 5 s would make room.)
        session.step(&xs[0], 42).await.unwrap();
        let squat = SwarmSession::open(
            &stranger.net,
            model_id,
            &compute,
            &hops,
            16,
            hidden,
            WireDType::F32,
        )
        .await
        .unwrap();
        let late = Node::current(Role::Client, &cancel).await;
        let open_late = || {
            SwarmSession::open(
                &late.net,
                model_id,
                &compute,
                &hops,
                16,
                hidden,
                WireDType::F32,
            )
        };
        match open_late().await {
            Err(ClientError::HopFailed(f)) => {
                assert_eq!(f.code, ErrorCode::Busy);
                assert_eq!(f.message, "this server is full (2 sessions)");
            }
            other => panic!("an open on full servers: {other:?}"),
        }
        let squatted = Instant::now();
        let mut late_session = None;
        while squatted.elapsed() < Duration::from_secs(6) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Ok(s) = open_late().await {
                late_session = Some(s);
                break;
            }
        }
        let freed_after = squatted.elapsed();
        let late_session = late_session.expect("the squatted slot was never freed");
        assert!(
            freed_after < Duration::from_secs(4),
            "freed after {freed_after:?}"
        );
        drop(squat);
        late_session.close().await;
        // Closing frees the slot on both servers.
        session.close().await;
        let again = open().await.unwrap();
        again.close().await;

        // A step numbered out of order, or one asking for every row of its output, is
        // refused as the hop before's doing (here the client's, at the first hop).
        let x = pollen_node::wire::to_wire(&xs[0], WireDType::F32).unwrap();
        for (node, session, step, last_row_only, why) in [
            (&stranger, 9, 0, true, "step 0 came where step 1 was due"),
            (&late, 10, 1, false, "asks for every row"),
        ] {
            let (mut rx, mut tx, opened) =
                pollen_node::net::stream::open_with_reply::<_, InferResponse>(
                    &node.net,
                    hops[0].peer,
                    hops[0].addrs.clone(),
                    &open_request(
                        SessionId(session),
                        model_id,
                        wire_route.clone(),
                        &compute,
                        PeerIdBytes(node.peer().to_bytes()),
                    ),
                    Duration::from_secs(10),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            assert!(matches!(opened, InferResponse::Opened { .. }), "{opened:?}");
            let step = InferRequest::Forward {
                session: SessionId(session),
                position: 0,
                step,
                hidden: x.clone(),
                last_row_only,
            };
            tx.send(&step, Duration::from_secs(10)).await.unwrap();
            match rx
                .recv_within::<InferResponse>(Duration::from_secs(10))
                .await
                .unwrap()
            {
                InferResponse::HopFailed {
                    hop: 0,
                    by: 0,
                    error,
                    ..
                } => {
                    assert_eq!(error.code, ErrorCode::BadRequest);
                    assert!(error.message.contains(why), "{error}");
                }
                other => panic!("a step out of order was answered {other:?}"),
            }
        }

        // Draining: each server's goodbye is acknowledged at once, so both stop well
        // before the goodbye's 3 s wait.
        let started = Instant::now();
        stop.cancel();
        for server in servers {
            server.await.unwrap().unwrap();
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "draining took {took:?}");
        let left = boot.net.book(Some(model_id)).await.unwrap();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().all(|a| a.free_sessions == 0), "{left:?}");
        cancel.cancel();
        let _ = std::fs::remove_dir_all(&keys);
    };
    tokio::time::timeout(SPAN_BOUND, test)
        .await
        .expect("the session test hung past its bound");
}

/// Steps take working memory only to compute, on an exact-mode server whose
/// `--max-memory` leaves room for two sessions' keys and values and one decode step's
/// working memory: a step at a position its session's cache does not hold is refused
/// as the sender's fault before it is given any (claiming position 1,000 of an empty
/// session would size a step of a thousand tokens' cache: `BadRequest`, not
/// `OverBudget`), and two sessions decoding at once, whose steps meet in the batch
/// queue but whose memory does not fit twice, both run to the end: a step waiting in
/// the queue holds none, and one its batch has no room for waits for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_take_memory_only_to_compute_and_a_wrong_position_takes_none() {
    use candle_core::{Device, Tensor};
    use pollen_node::client::{ClientError, SwarmSession, route};
    use pollen_node::serve::{self, ServeConfig};
    use pollen_protocol::{ErrorCode, WireDType};
    use pollen_shard::{BlockSpan, LoadOptions, ModelFile, WeightMode};
    use std::collections::HashMap;

    const TOKENS: usize = 1024;
    const STEPS: usize = 24;
    let test = async {
        let model =
            pollen_node::fetch::ensure_default_model(&mut |line| eprintln!("{line}")).unwrap();
        let file = ModelFile::open(&model).unwrap();
        let config = file.config().unwrap();
        let (n, hidden) = (config.num_blocks, config.hidden_size);
        let model_id = pollen_node::model::model_id(&model, &mut |_, _| {}).unwrap();
        let load = LoadOptions {
            device: Device::Cpu,
            mode: WeightMode::Exact,
        };
        let compute = pollen_shard::compute_mode(&file, &load).unwrap();
        // The server's budget: its weights, two sessions' keys and values, and room for
        // one decode step at position STEPS but not for two past STEPS / 2, nor for a
        // step at position 1,000.
        let span = BlockSpan::load(
            &file,
            pollen_shard::BlockRange { start: 0, end: n },
            &load,
            &mut |_, _| {},
        )
        .unwrap();
        let room = span.step_memory_bytes(1, STEPS);
        let budget = span.weight_bytes() + 2 * TOKENS * span.kv_bytes_per_token() + room;
        assert!(2 * span.step_memory_bytes(1, STEPS / 2) > room);
        assert!(span.step_memory_bytes(1, 1000) > room);
        drop(span);

        let cancel = CancellationToken::new();
        let boot = Node::current(Role::Bootstrap, &cancel).await;
        let keys = keys_dir("pollen-inprocess-position");
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let cfg = ServeConfig {
            max_session_tokens: TOKENS,
            max_memory_bytes: Some(budget as u64),
            ..server_config(
                &model,
                &format!("0:{n}"),
                &load,
                &boot,
                keys.join("server.key"),
            )
        };
        let server = tokio::spawn(serve::run(cfg, stop.clone(), kill.clone()));

        let client = Node::current(Role::Client, &cancel).await;
        let other = Node::current(Role::Client, &cancel).await;
        client.net.dial(boot.addr.clone()).await.unwrap();
        let book = book_of(&client.net, model_id, 1).await;
        let hops = route(&book, model_id, n, &compute, &HashMap::new()).unwrap();
        let open = || {
            SwarmSession::open(
                &client.net,
                model_id,
                &compute,
                &hops,
                TOKENS as u32,
                hidden,
                WireDType::F32,
            )
        };
        let x = Tensor::arange(0f32, hidden as f32, &Device::Cpu)
            .unwrap()
            .affine(0.01, -2.0)
            .unwrap()
            .reshape((1, 1, hidden))
            .unwrap();
        let mut session = open().await.unwrap();
        match session.step(&x, 1000).await {
            Err(ClientError::HopFailed(f)) => {
                assert_eq!((f.hop, f.code), (0, ErrorCode::BadRequest), "{f:?}");
                assert!(f.message.contains("position mismatch"), "{f:?}");
            }
            other => panic!("a step at position 1,000 of an empty session: {other:?}"),
        }
        session.close().await;
        // The refused session's slot frees; honest steps run within the same budget.
        let session = reopen(open).await;
        // Two sessions decode at once, their steps queued together.
        let second = SwarmSession::open(
            &other.net,
            model_id,
            &compute,
            &hops,
            TOKENS as u32,
            hidden,
            WireDType::F32,
        )
        .await
        .unwrap();
        let decode = |mut s: SwarmSession, x: Tensor| async move {
            for pos in 0..=STEPS {
                if let Err(e) = s.step(&x, pos).await {
                    panic!("a step at position {pos} beside another session's: {e}");
                }
            }
            s.close().await;
        };
        let y = x.affine(-1.0, 0.5).unwrap();
        tokio::join!(decode(session, x), decode(second, y));
        stop.cancel();
        server.await.unwrap().unwrap();
        cancel.cancel();
        let _ = std::fs::remove_dir_all(&keys);
    };
    tokio::time::timeout(SPAN_BOUND, test)
        .await
        .expect("the position test hung past its bound");
}

/// Peers that hold a server's slots without using them: two peers open as many
/// session streams as they may and never send a frame (each a slot of the server's
/// stream cap until its first-frame timeout, where new streams past the cap are
/// dropped), and a third opens both of the server's sessions and never steps. A
/// real client still opens a session and steps through it at once: the silent
/// streams that waited longest give way to its stream, and the idle sessions to its
/// session. A first frame longer than an `Open` can be is refused unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_and_idle_sessions_do_not_lock_a_client_out() {
    use candle_core::{Device, Tensor};
    use pollen_node::client::{SwarmSession, route};
    use pollen_node::serve::{self, ServeConfig};
    use pollen_protocol::WireDType;
    use pollen_shard::{LoadOptions, ModelFile};
    use std::collections::HashMap;

    let test = async {
        let model =
            pollen_node::fetch::ensure_default_model(&mut |line| eprintln!("{line}")).unwrap();
        let file = ModelFile::open(&model).unwrap();
        let config = file.config().unwrap();
        let (n, hidden) = (config.num_blocks, config.hidden_size);
        let model_id = pollen_node::model::model_id(&model, &mut |_, _| {}).unwrap();
        let load = LoadOptions::default();
        let compute = pollen_shard::compute_mode(&file, &load).unwrap();
        let cancel = CancellationToken::new();
        let boot = Node::current(Role::Bootstrap, &cancel).await;
        let keys = keys_dir("pollen-inprocess-silent");
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        // Two sessions (so 12 session streams at once), 8 streams a peer.
        let cfg = ServeConfig {
            idle_timeout: Duration::from_secs(600),
            ..server_config(
                &model,
                &format!("0:{n}"),
                &load,
                &boot,
                keys.join("server.key"),
            )
        };
        let server = tokio::spawn(serve::run(cfg, stop.clone(), kill.clone()));
        let client = Node::current(Role::Client, &cancel).await;
        client.net.dial(boot.addr.clone()).await.unwrap();
        let book = book_of(&client.net, model_id, 1).await;
        let hops = route(&book, model_id, n, &compute, &HashMap::new()).unwrap();
        let server_peer = hops[0].peer;
        macro_rules! open {
            ($net:expr) => {
                SwarmSession::open($net, model_id, &compute, &hops, 32, hidden, WireDType::F32)
            };
        }
        let x = Tensor::arange(0f32, hidden as f32, &Device::Cpu)
            .unwrap()
            .affine(0.01, -2.0)
            .unwrap()
            .reshape((1, 1, hidden))
            .unwrap();

        // Both sessions, each a step in and then idle (a client holds one here).
        let mut nodes = Vec::new();
        let mut idle = Vec::new();
        for _ in 0..2 {
            let node = Node::current(Role::Client, &cancel).await;
            let mut s = open!(&node.net).await.unwrap();
            s.step(&x, 0).await.unwrap();
            idle.push(s);
            nodes.push(node);
        }
        // Idle 5 s past the first-step window (1 s here), which counts as busy.
        tokio::time::sleep(Duration::from_millis(6500)).await;
        // As many silent streams as two peers may open.
        let mut silent = Vec::new();
        for _ in 0..2 {
            let node = Node::current(Role::Client, &cancel).await;
            for _ in 0..8 {
                let stream = node
                    .net
                    .open_session_stream(server_peer, hops[0].addrs.clone(), BOUND)
                    .await
                    .unwrap();
                silent.push(stream);
            }
            nodes.push(node);
        }
        // The real client, at once: its session opens and computes.
        let started = Instant::now();
        let mut session = open!(&client.net)
            .await
            .expect("a real client opens a session past silent streams and idle sessions");
        let out = session.step(&x, 0).await.unwrap();
        assert_eq!(out.dims(), &[1, 1, hidden]);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        session.close().await;
        // A first frame that claims more than an `Open` can hold is refused before
        // its body is read: the stream ends at once, not after the body's time.
        {
            use futures::{AsyncReadExt, AsyncWriteExt};
            let mut stream = nodes[2]
                .net
                .open_session_stream(server_peer, hops[0].addrs.clone(), BOUND)
                .await
                .unwrap();
            let claimed = 2u32 * 1024 * 1024;
            let mut frame = claimed.to_le_bytes().to_vec();
            frame.extend_from_slice(&[0u8; 1024]);
            // The server may close the stream before the part after the length is
            // written: that is the refusal.
            let _ = stream.write_all(&frame).await;
            let _ = stream.flush().await;
            let mut rest = Vec::new();
            let ended = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest))
                .await
                .expect("a first frame claiming 2 MiB is refused at once");
            assert!(ended.is_err() || rest.is_empty(), "{rest:?}");
        }
        drop((silent, idle, nodes));
        stop.cancel();
        server.await.unwrap().unwrap();
        cancel.cancel();
        let _ = std::fs::remove_dir_all(&keys);
    };
    tokio::time::timeout(SPAN_BOUND, test)
        .await
        .expect("the silent-stream test hung past its bound");
}
