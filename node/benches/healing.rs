//! Healing bench: the stall a failure costs a client, per kind of failure.
//!
//! A bootstrap and two servers per span (0:10, 10:20, 20:30) on 127.0.0.1, 1 thread
//! each. A client generates a long answer; after 24 tokens, one server of its route
//! (the first, middle and last hop in turn) is killed (SIGKILL), stopped (SIGSTOP) or
//! asked to leave (SIGTERM). The stall is the longest wait for a token from that signal
//! on, against the median gap between tokens before it. Every answer is checked against
//! the uninterrupted one. After each trial a fresh server replaces the one that went.
//!
//! `cargo bench -p pollen-node --bench healing [-- --trials 20]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
use bench_args::{arg, median};
use pollen_node::client::{ClientConfig, SwarmClient};
use pollen_node::mesh::{self, Proc, THREE_SPANS};
use pollen_protocol::WireDType;
use pollen_shard::generate::GenerateParams;
use pollen_shard::{LoadOptions, SamplingParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROMPT: &str = "Here is a list of one thousand numbers: 1, 2, 3,";
const TOKENS: usize = 96;
const KILL_AFTER: usize = 24;

struct Mesh {
    exe: PathBuf,
    model: PathBuf,
    dir: PathBuf,
    addr: String,
    /// Servers by peer id, with their span.
    servers: HashMap<String, (Proc, &'static str)>,
    started: usize,
}

impl Mesh {
    fn add(&mut self, span: &'static str) {
        self.started += 1;
        let key = self.dir.join(format!("s{}.key", self.started));
        let (p, ready) = mesh::server(
            &self.exe,
            &self.model,
            Some(&self.addr),
            span,
            &key,
            &["--announce-ttl", "6", "--grace", "10"],
        )
        .unwrap();
        self.servers
            .insert(mesh::peer_of(&ready).to_string(), (p, span));
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Crash,
    Hang,
    Leave,
}

fn signal(p: &Proc, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status();
}

fn main() {
    let trials = arg("--trials", 20);
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let dir = std::env::temp_dir().join(format!("pollen-heal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_boot, addr) = mesh::bootstrap(&exe, &dir, false).unwrap();
    let mut m = Mesh {
        exe,
        model: model.clone(),
        dir: dir.clone(),
        addr: addr.clone(),
        servers: HashMap::new(),
        started: 0,
    };
    for _ in 0..2 {
        for span in THREE_SPANS {
            m.add(span);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(SwarmClient::connect(ClientConfig {
            model: model.clone(),
            load: LoadOptions::default(),
            bootstrap: vec![addr.parse().unwrap()],
            listen: vec![],
            mdns: false,
            wire_dtype: WireDType::F32,
            route_wait: Duration::from_secs(30),
            // Spot checks off: this bench measures the data path alone.
            verify: 0.0,
            compute: None,
        }))
        .unwrap();
    let client = Arc::new(client);
    let tok = &client.model().tokenizer;
    let prompt = tok.encode(PROMPT).unwrap();
    let params = GenerateParams {
        max_tokens: TOKENS,
        sampling: SamplingParams::default(),
        ..GenerateParams::default()
    };
    let want = rt
        .block_on(client.generate(&prompt, &params, &mut |_| true))
        .unwrap()
        .text;
    let mut results: Vec<(Kind, Vec<f64>, Vec<f64>)> = Vec::new();
    for kind in [Kind::Crash, Kind::Hang, Kind::Leave] {
        let (mut stalls, mut gaps) = (Vec::new(), Vec::new());
        for t in 0..trials {
            let times = Arc::new(Mutex::new(Vec::<Instant>::new()));
            let (c, p, pr, ts) = (
                client.clone(),
                prompt.clone(),
                params.clone(),
                times.clone(),
            );
            let task = rt.spawn(async move {
                c.generate(&p, &pr, &mut |_| {
                    ts.lock().unwrap().push(Instant::now());
                    true
                })
                .await
            });
            while times.lock().unwrap().len() < KILL_AFTER {
                std::thread::sleep(Duration::from_millis(2));
            }
            let route = client.route_in_use().unwrap();
            let victim = route[t % route.len()].peer.to_string();
            let (proc_, span) = m.servers.get_mut(&victim).unwrap();
            let span = *span;
            let at = Instant::now();
            match kind {
                Kind::Crash => proc_.kill9(),
                Kind::Hang => signal(proc_, "-STOP"),
                Kind::Leave => signal(proc_, "-TERM"),
            }
            let text = rt.block_on(task).unwrap().unwrap().text;
            assert_eq!(text, want, "{kind:?} trial {t}: the answer changed");
            let times = times.lock().unwrap().clone();
            let before: Vec<f64> = times
                .windows(2)
                .filter(|w| w[1] < at)
                .map(|w| (w[1] - w[0]).as_secs_f64())
                .collect();
            gaps.push(median(&mut before.clone()));
            // The stall: the longest wait for a token from the signal on.
            let mut last = at;
            let mut stall = Duration::ZERO;
            for t in times.iter().filter(|t| **t > at) {
                stall = stall.max(*t - last);
                last = *t;
            }
            stalls.push(stall.as_secs_f64());
            // Replace the server that went, and let its announcement reach the bootstrap.
            let (mut gone, _) = m.servers.remove(&victim).unwrap();
            if kind == Kind::Leave {
                let _ = gone.wait_for(Duration::from_secs(15));
            }
            gone.kill9();
            m.add(span);
            eprintln!(
                "{kind:?} {t}: hop {} ({span}) stall {:.0} ms",
                t % route.len(),
                stalls.last().unwrap() * 1e3
            );
        }
        results.push((kind, stalls, gaps));
    }
    println!(
        "healing bench: {}, {trials} trials per kind, 2 servers per span, 1 thread each",
        model.display()
    );
    println!();
    println!(
        "| failure | stall median ms | stall max ms | token gap before, median ms | answers equal |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (kind, mut stalls, mut gaps) in results {
        let max = stalls.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {kind:?} | {:.0} | {:.0} | {:.1} | {} of {} |",
            median(&mut stalls) * 1e3,
            max * 1e3,
            median(&mut gaps) * 1e3,
            stalls.len(),
            stalls.len()
        );
    }
    let client = Arc::try_unwrap(client).ok();
    if let Some(c) = client {
        rt.block_on(c.shutdown());
    }
    for (_, (mut p, _)) in m.servers.drain() {
        p.kill9();
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
