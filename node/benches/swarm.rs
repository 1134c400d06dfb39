//! Swarm bench: decode (128 tokens) and prefill (512-token prompt) speed of the
//! whole model in this process against a 3-server swarm on 127.0.0.1
//! (a bootstrap node and servers of blocks 0:10, 10:20, 20:30 as separate
//! processes, 1 thread each), and the per-hop overhead: median step time
//! through the swarm minus the compute time of the spans, over the hops.
//!
//! Local and f32 swarm decode alternate for `--rounds` rounds (default 3; the
//! servers stay up, idle while this process decodes locally), so that both see
//! the same machine; the table gives medians and each round's ratio is printed.
//! f16 and bf16 hidden states then run once each, fed the f32 tokens.
//! Each server's `/metrics` gives its own time per decode step (a step's
//! arrival to its output sent on), so the step splits into the servers' time,
//! the client's ends and what is left: the transfers between processes. The CPU time
//! of every process a decode step (Linux's `/proc/<pid>/task/*/schedstat`) against this
//! process's alone tells more work from more waiting.
//! Last, `pollen generate --stats` through the same servers and with `--local`
//! alternate for `--rounds` rounds: the ratio as a user would time it.
//!
//! `cargo bench -p pollen-node --bench swarm [-- --quick --rounds N --prompt N]`
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../../tests/common/bench_args.rs"]
mod bench_args;
#[path = "../../tests/common/mod.rs"]
mod common;
use bench_args::{arg, cpu_seconds, median};
use candle_core::Tensor;
use pollen_node::client::{ClientConfig, SwarmClient};
use pollen_node::mesh::{LocalMesh, THREE_SPANS};
use pollen_protocol::WireDType;
use pollen_shard::{
    BlockRange, BlockSpan, CacheLimits, ClientEnds, LoadOptions, ModelFile, PollenTokenizer,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The prompt of the `pollen generate` rounds.
const USER_PROMPT: &str = "Once upon a time";

fn greedy(logits: &Tensor) -> u32 {
    logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

fn prompt_ids(tok: &PollenTokenizer, n: usize) -> Vec<u32> {
    let text = "Pollen runs open language models across volunteers' machines, so that no single entity holds the model. ";
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tok.encode(text).unwrap());
    }
    ids.truncate(n);
    ids
}

fn main() {
    // One thread for this process's kernels, as each server gets.
    // SAFETY: first thing in main, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (decode_n, prefill_n) = if quick { (32, 128) } else { (128, 512) };
    // `--prompt N`: decode after an N-token prompt instead (a short one, as a chat's
    // first answer, leaves less attention per token, so the hops weigh more).
    let prefill_n = arg("--prompt", prefill_n).max(1);
    let rounds = arg("--rounds", 3).max(1);
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let m = model.display().to_string();
    let opts = LoadOptions::default();
    let file = ModelFile::open(&model).unwrap();
    let tok = PollenTokenizer::from_model(&file).unwrap();
    let ends = ClientEnds::load(&file, &opts).unwrap();
    let prefill_ids = prompt_ids(&tok, prefill_n);

    // Local: every block in this process; also each span alone, for compute times.
    let spans: Vec<BlockSpan> = [(0, 10), (10, 20), (20, 30)]
        .iter()
        .map(|&(a, b)| {
            BlockSpan::load(
                &file,
                BlockRange { start: a, end: b },
                &opts,
                &mut |_, _| {},
            )
            .unwrap()
        })
        .collect();
    let run_local = |spans: &[BlockSpan]| {
        let mut caches: Vec<_> = spans
            .iter()
            .map(|s| s.new_cache(CacheLimits::default()))
            .collect();
        let t = Instant::now();
        let mut h = ends.embed(&prefill_ids).unwrap();
        for (s, c) in spans.iter().zip(caches.iter_mut()) {
            h = s.forward(&h, 0, c).unwrap();
        }
        let mut next = greedy(&ends.logits(&h).unwrap());
        let prefill = t.elapsed().as_secs_f64();
        let mut steps = Vec::new();
        let mut tokens = vec![next];
        let mut span_times = vec![Vec::new(); spans.len()];
        let cpu_before = cpu_seconds(std::process::id());
        for i in 0..decode_n {
            let t = Instant::now();
            let mut h = ends.embed(&[next]).unwrap();
            for (k, (s, c)) in spans.iter().zip(caches.iter_mut()).enumerate() {
                let ts = Instant::now();
                h = s.forward(&h, prefill_n + i, c).unwrap();
                span_times[k].push(ts.elapsed().as_secs_f64());
            }
            next = greedy(&ends.logits(&h).unwrap());
            tokens.push(next);
            steps.push(t.elapsed().as_secs_f64());
        }
        let cpu = cpu_seconds(std::process::id())
            .zip(cpu_before)
            .map(|(a, b)| (a - b) / decode_n as f64);
        let total: f64 = steps.iter().sum();
        let span_med: f64 = span_times.iter_mut().map(|v| median(v)).sum();
        let span_means: Vec<f64> = span_times
            .iter()
            .map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64)
            .collect();
        (
            prefill,
            total,
            median(&mut steps),
            span_med,
            tokens,
            span_means,
            cpu,
        )
    };

    // The swarm.
    let dir = std::env::temp_dir().join(format!("pollen-bench-{}", std::process::id()));
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let with_metrics: &[&str] = &["--metrics", "127.0.0.1:0"];
    let mut mesh =
        LocalMesh::start(&exe, &model, &dir, "s", &THREE_SPANS, &[with_metrics; 3]).unwrap();
    let addr = mesh.addr.clone();
    let metrics: Vec<String> = mesh
        .servers
        .iter()
        .map(|(p, _)| p.metrics_url().unwrap())
        .collect();
    // The servers' processes, then this one (the client's): CPU seconds so far of each.
    let mut pids: Vec<u32> = mesh.servers.iter().map(|(p, _)| p.child.id()).collect();
    pids.push(std::process::id());
    let cpu_now = || -> Option<Vec<f64>> { pids.iter().map(|&p| cpu_seconds(p)).collect() };
    // Each server's step time so far (sum, count), from its `/metrics`; server `i` is
    // hop `i` of the route.
    let server_steps = || -> Vec<(f64, f64)> {
        metrics
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let text = common::http_get_url(url);
                let sample = |what: &str| {
                    common::metric_sample(
                        &text,
                        &format!("pollen_step_seconds_{what}{{hop=\"{i}\"}}"),
                    )
                    .unwrap_or(0.0)
                };
                (sample("sum"), sample("count"))
            })
            .collect()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let run_swarm = |dtype: WireDType, forced: Option<&Vec<u32>>| {
        rt.block_on(async {
            let client = SwarmClient::connect(ClientConfig {
                model: model.clone(),
                load: opts.clone(),
                bootstrap: vec![addr.parse().unwrap()],
                listen: vec![],
                mdns: false,
                wire_dtype: dtype,
                route_wait: Duration::from_secs(20),
                // Spot checks off: this bench measures the data path alone.
                verify: 0.0,
                compute: None,
            })
            .await
            .unwrap();
            let hops = client.discover_route().await.unwrap();
            let budget = (prefill_n + decode_n + 8) as u32;
            let mut s = client.open_session(&hops, budget).await.unwrap();
            let stats = client.net().stats().clone();
            let before = (
                stats.bytes_out.load(Ordering::Relaxed),
                stats.bytes_in.load(Ordering::Relaxed),
            );
            let t = Instant::now();
            let h = s.step(&ends.embed(&prefill_ids).unwrap(), 0).await.unwrap();
            let l = ends.logits(&h).unwrap();
            let mut next = greedy(&l);
            let prefill = t.elapsed().as_secs_f64();
            let bytes = (
                stats.bytes_out.load(Ordering::Relaxed) - before.0,
                stats.bytes_in.load(Ordering::Relaxed) - before.1,
            );
            let mut tokens = vec![next];
            let mut logits = vec![l.to_vec1::<f32>().unwrap()];
            let mut steps = Vec::new();
            let before = server_steps();
            let cpu_before = cpu_now();
            for i in 0..decode_n {
                if let Some(f) = forced {
                    next = f[i];
                }
                let t = Instant::now();
                let x: Tensor = ends.embed(&[next]).unwrap();
                let h = s.step(&x, prefill_n + i).await.unwrap();
                let l = ends.logits(&h).unwrap();
                next = greedy(&l);
                steps.push(t.elapsed().as_secs_f64());
                tokens.push(next);
                logits.push(l.to_vec1::<f32>().unwrap());
            }
            // CPU seconds a decode step, each server's process and then the client's.
            let cpu: Option<Vec<f64>> = cpu_now().zip(cpu_before).map(|(a, b)| {
                a.iter()
                    .zip(&b)
                    .map(|(a, b)| (a - b) / decode_n as f64)
                    .collect()
            });
            // Each server's mean time per decode step, Forward arrived to output sent on.
            let server_means: Vec<f64> = server_steps()
                .iter()
                .zip(&before)
                .map(|(a, b)| (a.0 - b.0) / (a.1 - b.1).max(1.0))
                .collect();
            s.close().await;
            client.shutdown().await;
            let total: f64 = steps.iter().sum();
            (
                prefill,
                total,
                median(&mut steps),
                tokens,
                logits,
                bytes,
                server_means,
                cpu,
            )
        })
    };
    // Local and f32 swarm decode, alternating.
    let mut local_runs = Vec::new();
    let mut swarm_runs = Vec::new();
    for round in 0..rounds {
        let l = run_local(&spans);
        let w = run_swarm(WireDType::F32, None);
        assert_eq!(
            w.3, l.4,
            "greedy tokens through the swarm (f32) must equal local"
        );
        eprintln!(
            "round {}: local {:.1} tok/s, swarm {:.1} tok/s",
            round + 1,
            decode_n as f64 / l.1,
            decode_n as f64 / w.1
        );
        local_runs.push(l);
        swarm_runs.push(w);
    }
    let med = |mut v: Vec<f64>| median(&mut v);
    let l_prefill = med(local_runs.iter().map(|r| r.0).collect());
    let l_total = med(local_runs.iter().map(|r| r.1).collect());
    let l_step = med(local_runs.iter().map(|r| r.2).collect());
    let span_compute = med(local_runs.iter().map(|r| r.3).collect());
    let local_tokens = local_runs[0].4.clone();
    let round_ratios: Vec<f64> = local_runs
        .iter()
        .zip(&swarm_runs)
        .map(|(l, w)| l.1 / w.1)
        .collect();
    let mut rows = vec![(
        WireDType::F32,
        med(swarm_runs.iter().map(|r| r.0).collect()),
        med(swarm_runs.iter().map(|r| r.1).collect()),
        med(swarm_runs.iter().map(|r| r.2).collect()),
    )];
    let prefill_bytes = swarm_runs.last().map(|r| r.5);
    let reference = (swarm_runs[0].3.clone(), swarm_runs[0].4.clone());
    let mut divergence = Vec::new();
    // f16 and bf16 are fed f32's tokens (teacher forcing) so that their logits
    // can be compared step by step.
    for dtype in [WireDType::F16, WireDType::BF16] {
        let (prefill, total, step, tokens, logits, ..) = run_swarm(dtype, Some(&reference.0));
        let worst = reference
            .1
            .iter()
            .zip(&logits)
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        let agree = reference
            .0
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count();
        divergence.push((dtype, worst, agree, reference.0.len()));
        rows.push((dtype, prefill, total, step));
    }
    println!(
        "swarm bench: {m}, prefill {prefill_n} tokens, decode {decode_n} tokens, 1 thread per process, {rounds} rounds (medians)"
    );
    println!();
    println!("| setup | prefill tok/s | decode tok/s | median step ms | vs local decode |");
    println!("| --- | --- | --- | --- | --- |");
    let local_tps = decode_n as f64 / l_total;
    println!(
        "| local (one process) | {:.1} | {:.1} | {:.2} | 1.00x |",
        prefill_n as f64 / l_prefill,
        local_tps,
        l_step * 1e3
    );
    for (dtype, prefill, total, step) in &rows {
        let tps = decode_n as f64 / total;
        println!(
            "| 3-server swarm, {dtype:?} hidden states | {:.1} | {:.1} | {:.2} | {:.2}x |",
            prefill_n as f64 / prefill,
            tps,
            step * 1e3,
            tps / local_tps
        );
    }
    println!();
    println!(
        "f32 swarm / local decode, round by round: {} (median {:.2}x)",
        round_ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", "),
        med(round_ratios)
    );
    println!();
    let ends_time = l_step - span_compute;
    for (dtype, _, _, step) in &rows {
        let overhead = step - span_compute - ends_time;
        println!(
            "per-hop overhead ({dtype:?}): ({:.3} ms swarm step - {:.3} ms span compute - {:.3} ms client ends) / 3 hops = {:.3} ms",
            step * 1e3,
            span_compute * 1e3,
            ends_time * 1e3,
            overhead * 1e3 / 3.0
        );
    }
    // Where a swarm step's time goes, from the servers' own clocks (means per decode
    // step within each round, then medians over rounds).
    let hops = THREE_SPANS.len();
    let per_hop = |pick: &dyn Fn(usize, usize) -> f64| -> Vec<f64> {
        (0..hops)
            .map(|h| med((0..rounds).map(|r| pick(r, h)).collect()))
            .collect()
    };
    let at_servers = per_hop(&|r, h| swarm_runs[r].6[h]);
    let computed_here = per_hop(&|r, h| local_runs[r].5[h]);
    let ends_mean = med(local_runs
        .iter()
        .map(|l| l.1 / decode_n as f64 - l.5.iter().sum::<f64>())
        .collect());
    let between = med(local_runs
        .iter()
        .zip(&swarm_runs)
        .map(|(l, w)| {
            w.1 / decode_n as f64
                - w.6.iter().sum::<f64>()
                - (l.1 / decode_n as f64 - l.5.iter().sum::<f64>())
        })
        .collect());
    let ms = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.3}", x * 1e3))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "f32 step by the servers' clocks (means, median of rounds): each server from a step's \
         arrival to its output sent on {} ms (the same spans in this process: {} ms); client \
         ends {:.3} ms; the rest, {:.3} ms, is the {} transfers between processes ({:.3} ms each)",
        ms(&at_servers),
        ms(&computed_here),
        ends_mean * 1e3,
        between * 1e3,
        hops + 1,
        between * 1e3 / (hops + 1) as f64
    );
    // More work or more waiting: the CPU time of every process a decode step against
    // this process's alone when it computes every span (`/proc/<pid>/task/*/schedstat`).
    let cpu_rounds: Option<Vec<(&Vec<f64>, f64)>> = local_runs
        .iter()
        .zip(&swarm_runs)
        .map(|(l, w)| Some((w.7.as_ref()?, l.6?)))
        .collect();
    if let Some(c) = cpu_rounds {
        let each: Vec<f64> = (0..=hops)
            .map(|i| med(c.iter().map(|(w, _)| w[i]).collect()))
            .collect();
        let swarm_cpu = med(c.iter().map(|(w, _)| w.iter().sum()).collect());
        let local_cpu = med(c.iter().map(|(_, l)| *l).collect());
        let extra_wall = med(local_runs
            .iter()
            .zip(&swarm_runs)
            .map(|(l, w)| (w.1 - l.1) / decode_n as f64)
            .collect());
        println!(
            "f32 CPU a decode step (medians of rounds): {:.3} ms in all the swarm's processes \
             (servers {} ms, client {:.3} ms) against {:.3} ms in this process alone ({:.2}x); \
             a swarm step takes {:.3} ms more wall time and {:.3} ms more CPU than a local one \
             (a step's work in several processes runs partly side by side on the cores)",
            swarm_cpu * 1e3,
            ms(&each[..hops]),
            each[hops] * 1e3,
            local_cpu * 1e3,
            swarm_cpu / local_cpu,
            extra_wall * 1e3,
            (swarm_cpu - local_cpu) * 1e3,
        );
    }
    println!();
    println!(
        "f32 hidden states: greedy tokens through the swarm equal local ({} tokens)",
        local_tokens.len()
    );
    println!();
    println!(
        "| wire dtype | max abs logit diff vs f32 (same tokens) | greedy tokens equal before first difference |"
    );
    println!("| --- | --- | --- |");
    for (dtype, worst, agree, n) in divergence {
        println!("| {dtype:?} | {worst:.4} | {agree} of {n} |");
    }
    if let Some((out, back)) = prefill_bytes {
        // Each server sends the whole prefill on to the next; only the last row comes back.
        let hops = THREE_SPANS.len() as u64;
        println!();
        println!(
            "bytes on the wire for the {prefill_n}-token f32 prefill: client sent {out}, received {back}; \
             the chain carried {} in all ({hops} hops of {out} plus the answer)",
            out * hops + back
        );
    }
    // As a user times it: `pollen generate --stats` through the same servers against
    // `--local`, alternating. Its local side is one span of every block and the client's
    // own sampling loop, a little faster than this bench's three spans in turn; and its
    // prompt is short, so there is less attention per token for the hops to hide in.
    let generate = |through: Option<&str>| -> (f64, String) {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args([
            "generate",
            "--threads",
            "1",
            "--stats",
            "--prompt",
            USER_PROMPT,
        ])
        .args(["--max-tokens", &decode_n.to_string(), "--model"])
        .arg(&model);
        match through {
            Some(a) => cmd.args(["--no-mdns", "--bootstrap", a, "--verify", "0"]),
            None => cmd.arg("--local"),
        };
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pollen generate failed: {err}");
        // "prompt 4 tokens at … tokens/s; generated 128 tokens at 105.0 tokens/s (Length)"
        let tps = err
            .lines()
            .find_map(|l| l.split("generated ").nth(1))
            .and_then(|r| r.split(" tokens at ").nth(1))
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no decode rate in: {err}"));
        (tps, String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (mut user_local, mut user_swarm, mut user_ratios, mut servers_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (l, local_text) = generate(None);
        let before = server_steps();
        let (w, swarm_text) = generate(Some(&addr));
        let after = server_steps();
        assert_eq!(
            swarm_text, local_text,
            "pollen generate: swarm text equals local"
        );
        servers_ms.push(
            after
                .iter()
                .zip(&before)
                .map(|(a, b)| (a.0 - b.0) / (a.1 - b.1).max(1.0))
                .sum::<f64>()
                * 1e3,
        );
        user_ratios.push(w / l);
        user_local.push(l);
        user_swarm.push(w);
    }
    println!();
    println!(
        "as a user times it, `pollen generate --stats --max-tokens {decode_n} --threads 1` \
         (prompt {USER_PROMPT:?}; through the swarm with --verify 0), alternating: local {:.1} \
         tok/s, swarm {:.1} tok/s (medians), swarm / local round by round {} (median {:.2}x); \
         the servers' own step times sum to {:.2} ms a token; the same text both ways",
        median(&mut user_local),
        median(&mut user_swarm),
        user_ratios
            .iter()
            .map(|r| format!("{r:.2}x"))
            .collect::<Vec<_>>()
            .join(", "),
        median(&mut user_ratios.clone()),
        median(&mut servers_ms),
    );
    // An idle server's polite stop: SIGTERM to exit (withdrawal acknowledged, no session).
    std::thread::sleep(Duration::from_secs(1));
    let (server, _) = &mut mesh.servers[0];
    let t = Instant::now();
    let status = server.terminate(Duration::from_secs(30));
    println!();
    println!(
        "idle server, SIGTERM to exit: {:.0} ms ({status:?})",
        t.elapsed().as_secs_f64() * 1e3
    );
    mesh.stop(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}
