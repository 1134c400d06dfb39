//! Hostile-server bench, from the client's side: how fast spot checks catch a server
//! that lies, what they cost, and what a forged route claim costs a legitimate client.
//!
//! A bootstrap, servers of 0:10 and 20:30, and three honest servers of 10:20 on
//! 127.0.0.1, 1 thread each (`pollen serve --fault` exists in bench builds only).
//! - Detection: a fourth 10:20 server corrupts every step (`perturb:0`), then one step
//!   in a hundred (`perturb:0:100`). Each trial is a fresh client (no bans, nothing
//!   measured) generating on a route pinned through the liar, with spot checks at
//!   p = 0.05: detected or not within the answer, and at which step.
//! - Overhead: decode time per token on the honest mesh with p = 0 and p = 0.05.
//! - Hijack: a fresh key announces blocks 0:30 at 1e9 tokens/s with an address that
//!   accepts connections and never speaks; fresh clients generate before and after it.
//!
//! `cargo bench -p pollen-node --bench verify [-- --trials 10 --tokens 128]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/hostile.rs"]
mod attacker;
#[path = "../../tests/common/bench_args.rs"]
mod bench_args;

use bench_args::{arg, median};
use pollen_node::client::{ClientConfig, SwarmClient};
use pollen_node::mesh::{self, Proc};
use pollen_node::net::NetHandle;
use pollen_protocol::WireDType;
use pollen_shard::generate::GenerateParams;
use pollen_shard::{LoadOptions, SamplingParams};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PROMPT: &str = "Here is a list of one thousand numbers: 1, 2, 3,";

struct Bench {
    rt: tokio::runtime::Runtime,
    exe: PathBuf,
    model: PathBuf,
    dir: PathBuf,
    addr: String,
    prompt: Vec<u32>,
    params: GenerateParams,
    started: usize,
}

impl Bench {
    fn server(&mut self, span: &str, extra: &[&str]) -> (Proc, String) {
        self.started += 1;
        let key = self.dir.join(format!("s{}.key", self.started));
        let (p, ready) =
            mesh::server(&self.exe, &self.model, Some(&self.addr), span, &key, extra).unwrap();
        let peer = mesh::peer_of(&ready).to_string();
        (p, peer)
    }

    fn client(&self, verify: f64) -> SwarmClient {
        self.rt
            .block_on(SwarmClient::connect(ClientConfig {
                model: self.model.clone(),
                load: LoadOptions::default(),
                bootstrap: vec![self.addr.parse().unwrap()],
                listen: vec![],
                mdns: false,
                wire_dtype: WireDType::F32,
                route_wait: Duration::from_secs(30),
                verify,
                compute: None,
            }))
            .unwrap()
    }

    /// One generation: the decode time per token, the time to the first token, and
    /// whether it succeeded.
    fn generate(&self, c: &SwarmClient, pin: Option<&str>) -> (f64, f64, bool) {
        let start = Instant::now();
        let mut first = None;
        let result = self.rt.block_on(async {
            let mut on_text = |_: &str| {
                first.get_or_insert_with(|| start.elapsed());
                true
            };
            match pin {
                None => c.generate(&self.prompt, &self.params, &mut on_text).await,
                Some(peer) => {
                    let route = pinned(c, peer).await;
                    c.generate_on(route, &self.prompt, &self.params, &mut on_text)
                        .await
                }
            }
        });
        let first = first.map_or(f64::NAN, |d| d.as_secs_f64());
        match result {
            Ok(g) => (1.0 / g.decode_tokens_per_sec(), first, true),
            Err(e) => {
                eprintln!("generation failed: {e}");
                (f64::NAN, first, false)
            }
        }
    }
}

/// The client's route, with blocks 10:20 served by `peer`.
async fn pinned(c: &SwarmClient, peer: &str) -> Vec<pollen_node::client::Hop> {
    let mut route = c.discover_route().await.unwrap();
    let book = c
        .net()
        .gather(Some(c.model().model_id))
        .await
        .unwrap_or_default();
    let a = book
        .iter()
        .find(|a| {
            libp2p::PeerId::from_bytes(&a.announcement().peer.0)
                .is_ok_and(|p| p.to_string() == peer)
        })
        .expect("the liar's announcement");
    let hop = route
        .iter_mut()
        .find(|h| h.blocks.start == 10 && h.blocks.end == 20)
        .expect("a 10:20 hop");
    hop.peer = peer.parse().unwrap();
    hop.addrs = a.addrs.iter().filter_map(|s| s.parse().ok()).collect();
    route
}

/// A forged announcement of blocks 0:30 at 1e9 tokens/s from a fresh key, with an
/// address that accepts connections and never speaks, published to the bootstrap.
fn hijack(rt: &tokio::runtime::Runtime, bootstrap: &str) -> (NetHandle, std::net::TcpListener) {
    let (silent, dead) = attacker::silent_listener();
    let boot: libp2p::Multiaddr = bootstrap.parse().unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (net, _, _) = rt.block_on(attacker::forge_claim(&boot, dead, cancel));
    (net, silent)
}

fn main() {
    let trials = arg("--trials", 10);
    let tokens = arg("--tokens", 128);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let dir = std::env::temp_dir().join(format!("pollen-verify-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_boot, addr) = mesh::bootstrap(&exe, &dir, false).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tokenizer =
        pollen_shard::PollenTokenizer::from_model(&pollen_shard::ModelFile::open(&model).unwrap())
            .unwrap();
    let mut b = Bench {
        rt,
        exe,
        model: model.clone(),
        dir: dir.clone(),
        addr,
        prompt: tokenizer.encode(PROMPT).unwrap(),
        params: GenerateParams {
            max_tokens: tokens,
            sampling: SamplingParams::default(),
            ..GenerateParams::default()
        },
        started: 0,
    };
    let mut servers: Vec<Proc> = Vec::new();
    for span in ["0:10", "10:20", "10:20", "10:20", "20:30"] {
        servers.push(b.server(span, &[]).0);
    }

    // Detection.
    let mut detection = Vec::new();
    for (name, fault) in [
        ("every step", "perturb:0"),
        ("1 in 100 steps", "perturb:0:100"),
    ] {
        let (mut liar, peer) = b.server("10:20", &["--fault", fault]);
        let (mut caught, mut at) = (0, Vec::new());
        for t in 0..trials {
            let c = b.client(0.05);
            let _ = b.generate(&c, Some(&peer));
            let s = c.verify_stats();
            if let Some(step) = s.first_ban_step {
                caught += 1;
                at.push(step as f64);
            }
            eprintln!("{name} {t}: {s:?}");
            b.rt.block_on(c.shutdown());
        }
        liar.kill9();
        detection.push((name, caught, median(&mut at), at.len()));
    }

    // Overhead.
    let mut overhead = Vec::new();
    for p in [0.0, 0.05] {
        let mut per_token = Vec::new();
        let mut checks = 0;
        for _ in 0..trials.div_ceil(2) {
            let c = b.client(p);
            let (t, _, ok) = b.generate(&c, None);
            if ok {
                per_token.push(t);
            }
            checks += c.verify_stats().checks;
            b.rt.block_on(c.shutdown());
        }
        overhead.push((p, median(&mut per_token), checks, per_token.len()));
    }

    // Hijack.
    let mut hijacks = Vec::new();
    for forged in [false, true] {
        let _attack = forged.then(|| hijack(&b.rt, &b.addr));
        let (mut ok, mut first) = (0, Vec::new());
        for _ in 0..trials.div_ceil(2) {
            let c = b.client(0.0);
            let (_, f, success) = b.generate(&c, None);
            if success {
                ok += 1;
                first.push(f);
            }
            b.rt.block_on(c.shutdown());
        }
        hijacks.push((forged, ok, trials.div_ceil(2), median(&mut first)));
    }

    println!(
        "verify bench: {}, {tokens} tokens, prompt {:?}, 1 thread per server",
        model.display(),
        PROMPT
    );
    println!();
    println!("| liar (blocks 10:20, on the route) | trials | detected | median step of the ban |");
    println!("| --- | --- | --- | --- |");
    for (name, caught, at, _) in &detection {
        println!("| corrupts {name} | {trials} | {caught} | {at:.0} |");
    }
    println!();
    let base = overhead[0].1;
    println!("| spot checks | decode ms/token (median) | checks run | overhead |");
    println!("| --- | --- | --- | --- |");
    for (p, t, checks, _) in &overhead {
        println!(
            "| p = {p} | {:.1} | {checks} | {:+.0}% |",
            t * 1e3,
            (t / base - 1.0) * 100.0
        );
    }
    println!();
    println!("| forged 0:30 claim | answers | median time to first token ms |");
    println!("| --- | --- | --- |");
    for (forged, ok, n, first) in &hijacks {
        let what = if *forged { "published" } else { "none" };
        println!("| {what} | {ok} of {n} | {:.0} |", first * 1e3);
    }
    for mut p in servers {
        p.kill9();
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
