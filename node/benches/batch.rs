//! Batching bench: aggregate decode tokens/s of 1, 2, 4 and 8 concurrent clients
//! against one real server holding every block (`0:30`, its own process, `--threads`
//! threads, default 1), with the server's batching of decode steps on and off.
//!
//! A bootstrap and two servers run on 127.0.0.1: one batching (the default) and one with
//! `--max-batch 1` (each step alone). Every round pins its sessions to one of them,
//! the two alternating, so that both see the same machine. Each client is a session of
//! this process's swarm client: it sends a short prompt (one multi-token step), then
//! `--tokens` decode steps of one token each, fed from a fixed text (teacher forcing, so
//! the client spends no time on its head and the server's throughput is what is
//! measured). Aggregate tokens/s counts every client's decode steps, from the moment all
//! prompts are done to the last output. Each round runs every client count, so the
//! ratios are taken within a round: "vs 1 client" is the median over rounds of the
//! round's figure against that round's one-client mean of both servers (the same code
//! for one client), and "on / off" the median of the rounds' ratios; tok/s columns are
//! medians. Each session's last output is compared, byte for byte, between the two
//! servers.
//!
//! `nice -n 10 cargo bench -p pollen-node --bench batch [-- --tokens N --rounds N --threads N]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
#[path = "../../tests/common/mod.rs"]
mod common;
use bench_args::{arg, cpu_line, median};
use candle_core::Tensor;
use pollen_node::client::route::Hop;
use pollen_node::client::{ClientConfig, SwarmClient};
use pollen_node::mesh::{Proc, peer_of};
use pollen_node::serve::batch::MAX_BATCH_ENV;
use pollen_protocol::WireDType;
use pollen_shard::{BlockRange, ModelFile, PollenTokenizer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: [usize; 4] = [1, 2, 4, 8];
const PROMPT: usize = 8;

/// A server of every block, one thread, batching up to `max_batch` decode steps
/// (`None`: the default); it and its hop.
fn server(
    threads: usize,
    exe: &Path,
    model: &Path,
    boot: &str,
    key: &Path,
    max_batch: Option<&str>,
) -> (Proc, Hop, String, String) {
    let mut cmd = Command::new(exe);
    cmd.args([
        "serve",
        "--threads",
        &threads.to_string(),
        "--blocks",
        "0:30",
    ])
    .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
    .args(["--no-mdns", "--bootstrap", boot])
    .args(["--max-sessions-per-client", "16"])
    .args(["--metrics", "127.0.0.1:0"])
    .arg("--model")
    .arg(model)
    .arg("--identity")
    .arg(key);
    cmd.env_remove(MAX_BATCH_ENV);
    if let Some(v) = max_batch {
        cmd.args(["--max-batch", v]);
    }
    let p = Proc::spawn(&format!("server batch={max_batch:?}"), &mut cmd).unwrap();
    let metrics = p
        .line_with("metrics ", Duration::from_secs(60))
        .unwrap()
        .trim_start_matches("metrics ")
        .trim()
        .to_string();
    let ready = p
        .line_with("ready", pollen_node::mesh::READY_TIMEOUT)
        .unwrap();
    let listening = p.line_with("listening", Duration::from_secs(10)).unwrap();
    let addr = listening
        .trim_start_matches("listening ")
        .trim()
        .to_string();
    let hop = Hop {
        peer: peer_of(&ready).parse().unwrap(),
        blocks: BlockRange::new(0, 30, 30).unwrap(),
        addrs: vec![addr.parse().unwrap()],
        step_us: 0,
    };
    (p, hop, ready, metrics)
}

/// Batches and decode steps a server has computed so far, from its `/metrics`.
fn batches(url: &str) -> (f64, f64, f64) {
    let text = common::http_get_url(url);
    let sample = |name| common::metric_sample(&text, name).unwrap_or(0.0);
    (
        sample("pollen_batch_steps_count"),
        sample("pollen_batch_steps_sum"),
        sample("pollen_batch_wait_seconds_sum"),
    )
}

/// `n` sessions at once along `route`, each a prompt then `tokens` decode steps;
/// aggregate decode tokens/s and each session's last output.
async fn round(
    client: &Arc<SwarmClient>,
    route: &[Hop],
    ids: &Arc<Vec<u32>>,
    n: usize,
    tokens: usize,
) -> (f64, Vec<Vec<u8>>) {
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, route, ids, barrier) =
            (client.clone(), route.to_vec(), ids.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let ends = &client.model().ends;
            // Each session its own text: the fixed one, shifted.
            let own: Vec<u32> = ids
                .iter()
                .cycle()
                .skip(i * 7)
                .take(PROMPT + tokens)
                .copied()
                .collect();
            let mut s = client
                .open_session(&route, (PROMPT + tokens + 8) as u32)
                .await
                .unwrap();
            let prompt = ends.embed(&own[..PROMPT]).unwrap();
            s.step(&prompt, 0).await.unwrap();
            barrier.wait().await;
            let mut last = None;
            for (k, &t) in own[PROMPT..].iter().enumerate() {
                let h = ends.embed(&[t]).unwrap();
                last = Some(s.step(&h, PROMPT + k).await.unwrap());
            }
            s.close().await;
            let last: Tensor = last.unwrap();
            let bytes: Vec<u8> = last
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (Instant::now(), bytes)
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut end = start;
    let mut outs = Vec::new();
    for t in tasks {
        let (done, bytes) = t.await.unwrap();
        end = end.max(done);
        outs.push(bytes);
    }
    let secs = end.duration_since(start).as_secs_f64();
    ((n * tokens) as f64 / secs, outs)
}

fn main() {
    let tokens = arg("--tokens", 64);
    let rounds = arg("--rounds", 3).max(1);
    let threads = arg("--threads", 1);
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let file = ModelFile::open(&model).unwrap();
    let tok = PollenTokenizer::from_model(&file).unwrap();
    let text = "Pollen runs open language models across volunteers' machines, so that no single entity holds the model. Each server holds a span of blocks and computes it for every client that asks. ";
    let ids = Arc::new(tok.encode(text).unwrap());

    let dir = std::env::temp_dir().join(format!("pollen-bench-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let (_boot, boot) = pollen_node::mesh::bootstrap(&exe, &dir, false).unwrap();
    let (_on, on_hop, ready, on_metrics) =
        server(threads, &exe, &model, &boot, &dir.join("on.key"), None);
    let (_off, off_hop, _, _) = server(
        threads,
        &exe,
        &model,
        &boot,
        &dir.join("off.key"),
        Some("1"),
    );
    let compute = ready
        .split_whitespace()
        .skip_while(|w| *w != "compute")
        .nth(1)
        .unwrap_or("?")
        .to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        Arc::new(
            SwarmClient::connect(ClientConfig {
                model: model.clone(),
                load: pollen_shard::LoadOptions::default(),
                bootstrap: vec![boot.parse().unwrap()],
                listen: vec![],
                mdns: false,
                wire_dtype: WireDType::F32,
                route_wait: Duration::from_secs(20),
                // Spot checks off: only the two servers under test are asked.
                verify: 0.0,
                compute: None,
            })
            .await
            .unwrap(),
        )
    });

    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("CPU: {}", cpu_line());
    println!("load average at start: {}", load());
    println!(
        "kernel: {} (server compute mode `{compute}`), server: blocks 0:30, {threads} thread(s); {tokens} decode tokens a client after a {PROMPT}-token prompt; {rounds} rounds, each of every client count, on and off interleaved; ratios are medians of the rounds' own ratios",
        pollen_shard::kernels::active_path()
    );
    // Rounds outermost: each round runs every client count, batching on and off
    // (alternating which goes first), so that a round's 8 clients are compared with
    // the same round's one client, minutes apart at most, on a machine whose speed
    // may drift over a run. One client runs the same code on both servers: both of a
    // round's one-client figures make its base.
    let k = CLIENTS.len();
    let (mut on, mut off) = (vec![Vec::new(); k], vec![Vec::new(); k]);
    let mut same = vec![true; k];
    // The batching server's batches, steps and waiting, per client count.
    let mut counted = vec![(0.0, 0.0, 0.0); k];
    for r in 0..rounds {
        for (c, &n) in CLIENTS.iter().enumerate() {
            let order = if (r + c) % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            let mut outs = [Vec::new(), Vec::new()];
            for batched in order {
                let hop = if batched { &on_hop } else { &off_hop };
                let before = batches(&on_metrics);
                let (tps, o) =
                    rt.block_on(round(&client, std::slice::from_ref(hop), &ids, n, tokens));
                if batched {
                    let after = batches(&on_metrics);
                    let t = &mut counted[c];
                    t.0 += after.0 - before.0;
                    t.1 += after.1 - before.1;
                    t.2 += after.2 - before.2;
                    on[c].push(tps);
                    outs[0] = o;
                } else {
                    off[c].push(tps);
                    outs[1] = o;
                }
            }
            same[c] &= outs[0] == outs[1];
        }
        let base = (on[0][r] + off[0][r]) / 2.0;
        eprintln!(
            "round {}: one client {:.1} / {:.1} tok/s (on / off); 8 clients on {:.1} tok/s = {:.2}x",
            r + 1,
            on[0][r],
            off[0][r],
            on[k - 1][r],
            on[k - 1][r] / base
        );
    }
    // Each round's ratio to its own one-client base; the table gives their medians.
    let bases: Vec<f64> = (0..rounds).map(|r| (on[0][r] + off[0][r]) / 2.0).collect();
    let ratio = |v: &[f64]| {
        let mut per: Vec<f64> = v.iter().zip(&bases).map(|(x, b)| x / b).collect();
        median(&mut per)
    };
    println!();
    println!(
        "| clients | batching on, tok/s | batching off, tok/s | on / off | on vs 1 client (both servers) | off vs 1 client | mean batch (on) | mean wait (on), µs | outputs equal |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (c, &n) in CLIENTS.iter().enumerate() {
        let (vs_on, vs_off) = (ratio(&on[c]), ratio(&off[c]));
        let mut per: Vec<f64> = on[c].iter().zip(&off[c]).map(|(a, b)| a / b).collect();
        let on_off = median(&mut per);
        let (batches, steps, wait) = counted[c];
        let mean_batch = steps / f64::max(batches, 1.0);
        let mean_wait_us = wait * 1e6 / f64::max(batches, 1.0);
        println!(
            "| {n} | {:.1} | {:.1} | {on_off:.2}x | {vs_on:.2}x | {vs_off:.2}x | {mean_batch:.1} | {mean_wait_us:.0} | {} |",
            median(&mut on[c].clone()),
            median(&mut off[c].clone()),
            if same[c] { "yes" } else { "NO" }
        );
    }
    println!("load average at the end: {}", load());
    rt.block_on(async {
        if let Ok(c) = Arc::try_unwrap(client) {
            c.shutdown().await;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
