//! Prompt bench: what one long prompt costs the sessions decoding beside it on a
//! one-thread server of every block, with prompts computed in parts (`--prompt-part-ms`,
//! default 100) and whole (`--prompt-part-ms 0`), two servers side by side.
//!
//! In each case four sessions decode (each after an 8-token prompt) while a fifth,
//! once they are under way, sends a prompt of `--prompt` tokens (default 1,024); the
//! decoders go on until it is done and 32 tokens past. Reported: the decoders' longest
//! wait between two tokens while the prompt computed, their median one, the long prompt's time to its output, and
//! how many decoders had a step fail (a step not acknowledged within the client's
//! timeout: a real client would leave the server for another).
//! The cases alternate over `--rounds` rounds (default 3); the table gives medians and
//! checks that both servers gave the long prompt the same bits. With `--exact` the
//! servers and the client run `--weights exact` (candle's products: prompts split by
//! blocks, not rows).
//!
//! `cargo bench -p pollen-node --bench prompt [-- --rounds N --prompt TOKENS --exact]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
#[path = "../../tests/common/mod.rs"]
mod common;
use bench_args::{arg, cpu_line, median};
use candle_core::Tensor;
use libp2p::PeerId;
use pollen_node::client::route::{Hop, route};
use pollen_node::client::{ClientConfig, SwarmClient};
use pollen_node::mesh::{Proc, peer_of};
use pollen_protocol::WireDType;
use pollen_shard::{LoadOptions, ModelFile, PollenTokenizer, WeightMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const DECODERS: usize = 4;
const SHORT: usize = 8;
/// Tokens each decoder takes after the long prompt's output.
const AFTER: usize = 32;

/// A server of every block, one thread, prompts in parts of about `ms` (0: whole); it
/// and its peer id.
fn server(
    exe: &Path,
    model: &Path,
    boot: &str,
    key: &Path,
    ms: u128,
    weights: &str,
) -> (Proc, PeerId) {
    let ms = ms.to_string();
    let (p, ready) = pollen_node::mesh::server(
        exe,
        model,
        Some(boot),
        "0:30",
        key,
        &[
            "--prompt-part-ms",
            &ms,
            "--metrics",
            "127.0.0.1:0",
            "--weights",
            weights,
        ],
    )
    .unwrap();
    let peer = peer_of(&ready).parse().unwrap();
    (p, peer)
}

/// Waits (at most 60 s) until the server whose metrics are at `url` holds no session:
/// the sessions of a case whose steps failed end on the server only after the step it
/// was computing, and the next case's sessions count against the same client's cap.
fn until_idle(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = common::http_get_url(url);
        let open = common::metric_sample(&text, "pollen_sessions_open{side=\"server\"}");
        if open.unwrap_or(0.0) == 0.0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The one-hop route through `peer`, from its announcement (its pace sets the client's
/// step timeouts, as for any client).
async fn hop_of(client: &SwarmClient, model: &Path, peer: PeerId, load: &LoadOptions) -> Hop {
    let id = pollen_node::model::model_id(model, &mut |_, _| {}).unwrap();
    let compute = pollen_node::model::compute_mode(model, load).unwrap();
    loop {
        let book = client.net().gather(Some(id)).await.unwrap();
        let mine: Vec<_> = book
            .into_iter()
            .filter(|a| PeerId::from_bytes(&a.peer.0).ok() == Some(peer))
            .collect();
        if let Ok(mut hops) = route(&mine, id, 30, &compute, &HashMap::new()) {
            return hops.remove(0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The byte image of a tensor, to compare outputs exactly.
fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// One case on `hop`: the decoders' gaps between tokens (seconds) while the long prompt
/// computed, how many decoders
/// met a failed step (a step timed out: its client would leave the server), the long
/// prompt's time to its output and its output's bytes.
async fn case(
    client: &Arc<SwarmClient>,
    hop: &Hop,
    ids: &Arc<Vec<u32>>,
    long: usize,
) -> (Vec<f64>, usize, f64, Vec<u8>) {
    let barrier = Arc::new(tokio::sync::Barrier::new(DECODERS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let mut decoders = Vec::new();
    for i in 0..DECODERS {
        let (client, hop, ids, barrier, done) = (
            client.clone(),
            hop.clone(),
            ids.clone(),
            barrier.clone(),
            done.clone(),
        );
        decoders.push(tokio::spawn(async move {
            let ends = &client.model().ends;
            let budget = 2048usize;
            let own: Vec<u32> = ids
                .iter()
                .cycle()
                .skip(i * 7)
                .take(budget)
                .copied()
                .collect();
            let mut s = client
                .open_session(std::slice::from_ref(&hop), budget as u32)
                .await
                .unwrap();
            s.step(&ends.embed(&own[..SHORT]).unwrap(), 0)
                .await
                .unwrap();
            barrier.wait().await;
            let mut gaps = Vec::new();
            let mut last = Instant::now();
            let mut after = 0;
            let mut pos = SHORT;
            while after < AFTER && pos < budget {
                let h = ends.embed(&[own[pos]]).unwrap();
                if let Err(e) = s.step(&h, pos).await {
                    // A client would give up on this server here (and heal elsewhere);
                    // the wait until it did counts as a gap.
                    gaps.push((Instant::now(), last.elapsed().as_secs_f64()));
                    eprintln!("a decoder's step failed: {e}");
                    s.close().await;
                    return (gaps, true);
                }
                pos += 1;
                let now = Instant::now();
                gaps.push((now, now.duration_since(last).as_secs_f64()));
                last = now;
                if done.load(Ordering::Relaxed) {
                    after += 1;
                }
            }
            s.close().await;
            (gaps, false)
        }));
    }
    let ends = &client.model().ends;
    let mut s = client
        .open_session(std::slice::from_ref(hop), (long + 8) as u32)
        .await
        .unwrap();
    let prompt = ends
        .embed(&ids.iter().cycle().take(long).copied().collect::<Vec<_>>())
        .unwrap();
    barrier.wait().await;
    // The decoders under way first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let out = s.step(&prompt, 0).await.unwrap();
    let prefill = t.elapsed().as_secs_f64();
    let end = Instant::now();
    done.store(true, Ordering::Relaxed);
    s.close().await;
    // The gaps that ended while the prompt computed (or, for a step that failed, when
    // it failed: its wait began then).
    let mut gaps = Vec::new();
    let mut failed = 0;
    for d in decoders {
        let (g, f) = d.await.unwrap();
        gaps.extend(
            g.into_iter()
                .filter(|(at, _)| *at >= t && (*at <= end || f))
                .map(|(_, gap)| gap),
        );
        failed += usize::from(f);
    }
    (gaps, failed, prefill, bytes(&out))
}

fn main() {
    let rounds = arg("--rounds", 3).max(1);
    let long = arg("--prompt", 1024).clamp(SHORT + 1, 2000);
    let weights = if std::env::args().any(|a| a == "--exact") {
        "exact"
    } else {
        "fast"
    };
    let load = LoadOptions {
        mode: WeightMode::parse(weights).unwrap(),
        ..LoadOptions::default()
    };
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let file = ModelFile::open(&model).unwrap();
    let tok = PollenTokenizer::from_model(&file).unwrap();
    let text = "Pollen runs open language models across volunteers' machines, so that no single entity holds the model. Each server holds a span of blocks and computes it for every client that asks. ";
    let ids = Arc::new(tok.encode(text).unwrap());

    let dir = std::env::temp_dir().join(format!("pollen-bench-prompt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let (_boot, boot) = pollen_node::mesh::bootstrap(&exe, &dir, false).unwrap();
    let ms = pollen_node::serve::batch::DEFAULT_PROMPT_PART.as_millis();
    let (parts, parts_peer) = server(&exe, &model, &boot, &dir.join("parts.key"), ms, weights);
    let (whole, whole_peer) = server(&exe, &model, &boot, &dir.join("whole.key"), 0, weights);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        Arc::new(
            SwarmClient::connect(ClientConfig {
                model: model.clone(),
                load: load.clone(),
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
    let (parts_hop, whole_hop) = rt.block_on(async {
        (
            hop_of(&client, &model, parts_peer, &load).await,
            hop_of(&client, &model, whole_peer, &load).await,
        )
    });
    println!("CPU: {}", cpu_line());
    println!(
        "weights {weights}, kernel: {}; one server of blocks 0:30 per case, 1 thread; \
         {DECODERS} sessions decoding, one {long}-token prompt among them; {rounds} rounds, \
         the cases alternating",
        pollen_shard::kernels::active_path()
    );
    // Per case: longest gap, median gap (ms), prompt time (s), decoders failed.
    let mut results: [Vec<(f64, f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut outputs: [Option<Vec<u8>>; 2] = [None, None];
    let mut same = true;
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for c in order {
            let hop = if c == 0 { &parts_hop } else { &whole_hop };
            until_idle(&if c == 0 { &parts } else { &whole }.metrics_url().unwrap());
            let (mut gaps, failed, prefill, out) = rt.block_on(case(&client, hop, &ids, long));
            let longest = gaps.iter().copied().fold(0.0, f64::max);
            let mid = median(&mut gaps);
            eprintln!(
                "round {} {}: longest gap {:.0} ms, median {:.1} ms, prompt {:.2} s, {failed} of {DECODERS} decoders failed",
                r + 1,
                if c == 0 { "parts" } else { "whole" },
                longest * 1e3,
                mid * 1e3,
                prefill
            );
            results[c].push((longest * 1e3, mid * 1e3, prefill, failed as f64));
            match &outputs[c] {
                Some(o) => same &= *o == out,
                None => outputs[c] = Some(out),
            }
        }
    }
    same &= outputs[0] == outputs[1];
    println!();
    println!(
        "| prompts | decoders' longest gap, ms | decoders' median gap, ms | {long}-token prompt, s | decoders whose step failed (all rounds) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (c, name) in [format!("in parts of about {ms} ms"), "whole".to_string()]
        .iter()
        .enumerate()
    {
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = results[c].iter().map(f).collect();
            median(&mut v)
        };
        let failed: f64 = results[c].iter().map(|x| x.3).sum();
        println!(
            "| {name} | {:.0} | {:.1} | {:.2} | {failed} of {} |",
            col(|x| x.0),
            col(|x| x.1),
            col(|x| x.2),
            DECODERS * rounds
        );
    }
    println!();
    println!(
        "the long prompt's output, parts vs whole and round to round: {}",
        if same { "the same bits" } else { "DIFFERENT" }
    );
    rt.block_on(async {
        if let Ok(c) = Arc::try_unwrap(client) {
            c.shutdown().await;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}
