//! API bench: `pollen api` against `pollen generate` on the same 3-server swarm on
//! 127.0.0.1 (a bootstrap node and servers of blocks 0:10, 10:20, 20:30 as separate
//! processes, 1 thread each), then 8 and 32 concurrent streaming clients.
//!
//! - Time to first token and decode tokens/s of one streamed chat answer through the API
//!   (measured by the HTTP client, from sending the request), against `pollen generate
//!   --stats` (its own prefill time and decode rate; the wall time from launch to the
//!   first byte it prints, which includes loading the model's ends and joining the
//!   swarm; and its decode rate as read from its stdout, measured the way the HTTP
//!   client measures the API's, one process away from the generation).
//! - With K clients each sending streamed requests one after another: requests
//!   completed, failures, aggregate tokens/s, and p50/p99 of TTFT and of whole-request
//!   latency.
//!
//! `cargo bench -p pollen-node --bench api [-- --quick]`
#![allow(clippy::unwrap_used, missing_docs)]

use pollen_node::mesh::{LocalMesh, Proc, THREE_SPANS};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PROMPT: &str = "Give me three tips for staying healthy.";

/// One streamed request as the client saw it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: Duration,
    total: Duration,
    tokens: u64,
    /// From the first content to the last.
    decode: Duration,
}

/// Sends one streamed chat request over HTTP/1.0 (the body ends when the connection
/// closes, so the events arrive unchunked) and times it.
fn stream_once(hostport: &str, model: &str, max_tokens: usize) -> Result<Sample, String> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}})
    .to_string();
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(hostport).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (mut first, mut last, mut tokens, mut done) = (None, None, 0, false);
    let mut scanned = 0;
    loop {
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let now = Instant::now();
        let text = String::from_utf8_lossy(&buf).into_owned();
        if scanned == 0 && !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
            if text.contains("\r\n\r\n") {
                return Err(text.lines().next().unwrap_or("").to_string());
            }
            continue;
        }
        while let Some(end) = text[scanned..].find("\n\n") {
            let event = &text[scanned..scanned + end];
            scanned += end + 2;
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            if v.get("error").is_some() {
                return Err(v["error"]["message"].to_string());
            }
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                first.get_or_insert(now);
                last = Some(now);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n;
            }
        }
    }
    let (Some(first), Some(last), true) = (first, last, done) else {
        return Err("the stream ended without text or [DONE]".into());
    };
    Ok(Sample {
        ttft: first - t0,
        total: t0.elapsed(),
        tokens,
        decode: last - first,
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `pollen generate` through the swarm: its in-process TTFT and decode tokens/s (from
/// --stats), the wall time from launch to its first printed byte, and its decode
/// tokens/s as read from its stdout (from the first printed text to the last: the same
/// client-side measure as the API's, one process away from the generation).
fn generate_once(exe: &Path, model: &Path, addr: &str, max_tokens: usize) -> (f64, f64, f64, f64) {
    let t0 = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "generate",
            "--threads",
            "1",
            "--no-mdns",
            "--bootstrap",
            addr,
            "--chat",
        ])
        .args([
            "--stats",
            "--max-tokens",
            &max_tokens.to_string(),
            "--prompt",
            PROMPT,
        ])
        .arg("--model")
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut chunk = [0u8; 4096];
    let (mut first, mut last) = (None, None);
    loop {
        let n = out.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        let now = Instant::now();
        // The final newline comes after the generation: not text.
        if chunk[..n].iter().any(|b| !b.is_ascii_whitespace()) || first.is_none() {
            first.get_or_insert(now);
            last = Some(now);
        }
    }
    let (first, last) = (first.unwrap(), last.unwrap());
    let launch_to_first = ms(first - t0);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // "prompt N tokens at A tokens/s; generated M tokens at B tokens/s (..)"
    let line = stderr
        .lines()
        .find(|l| l.starts_with("prompt "))
        .unwrap_or_else(|| panic!("no stats from generate: {stderr}"));
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|s| s.parse().ok())
        .collect();
    let (prompt, prefill_tps, generated, decode_tps) = (nums[0], nums[1], nums[2], nums[3]);
    let read_tps = (generated - 1.0).max(0.0) / (last - first).as_secs_f64().max(1e-9);
    (
        prompt / prefill_tps * 1000.0,
        decode_tps,
        launch_to_first,
        read_tps,
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (runs, tokens, reqs_per_client) = if quick { (2, 32, 1) } else { (5, 64, 2) };
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_pollen"));
    let model = pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap();
    let dir = std::env::temp_dir().join(format!("pollen-bench-api-{}", std::process::id()));
    // One API process is one client to the servers: let it hold every session the
    // load needs (servers allow 4 per client and 24 streams per peer by default).
    let sessions: &[&str] = &[
        "--max-sessions",
        "40",
        "--max-sessions-per-client",
        "40",
        "--max-streams-per-peer",
        "80",
    ];
    let mut mesh = LocalMesh::start(
        &exe,
        &model,
        &dir,
        "b",
        &THREE_SPANS,
        &[sessions, sessions, sessions],
    )
    .unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args([
        "api",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        "1",
        "--no-mdns",
    ])
    .args(["--bootstrap", &mesh.addr, "--max-concurrent", "40"])
    .arg("--model")
    .arg(&model);
    let api = Proc::spawn("api", &mut cmd).unwrap();
    let line = api
        .line_with("api http://", Duration::from_secs(120))
        .unwrap();
    let hostport = line.trim_start_matches("api http://").trim().to_string();
    let name = "SmolLM2-135M-Instruct.Q4_1";
    // Warm up both paths (routes measured, pages cached).
    stream_once(&hostport, name, 8).unwrap();
    generate_once(&exe, &model, &mesh.addr, 8);

    let (mut a_ttft, mut a_tps, mut g_ttft, mut g_tps, mut g_launch, mut g_read) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for _ in 0..runs {
        let s = stream_once(&hostport, name, tokens).unwrap();
        a_ttft.push(ms(s.ttft));
        a_tps.push(s.tokens.saturating_sub(1) as f64 / s.decode.as_secs_f64().max(1e-9));
        let (t, tps, launch, read) = generate_once(&exe, &model, &mesh.addr, tokens);
        g_ttft.push(t);
        g_tps.push(tps);
        g_launch.push(launch);
        g_read.push(read);
    }
    println!("\none client, {tokens}-token greedy chat answers, median of {runs}");
    println!("| path | TTFT (ms) | decode tokens/s |");
    println!("| --- | ---: | ---: |");
    println!(
        "| API, streamed (client-side, from the request) | {:.0} | {:.1} |",
        pct(&mut a_ttft, 0.5),
        pct(&mut a_tps, 0.5)
    );
    println!(
        "| pollen generate (its own prefill timer) | {:.0} | {:.1} |",
        pct(&mut g_ttft, 0.5),
        pct(&mut g_tps, 0.5)
    );
    println!(
        "| pollen generate, read from its stdout (launch to first byte) | {:.0} | {:.1} |",
        pct(&mut g_launch, 0.5),
        pct(&mut g_read, 0.5)
    );

    println!(
        "\nK concurrent streaming clients, each sending {reqs_per_client} requests of {tokens} tokens in a row"
    );
    println!(
        "| clients | completed | failed | wall (s) | tokens/s (all) | TTFT p50 / p99 (ms) | latency p50 / p99 (ms) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for k in [8usize, 32] {
        let t0 = Instant::now();
        let handles: Vec<_> = (0..k)
            .map(|_| {
                let hp = hostport.clone();
                std::thread::spawn(move || {
                    (0..reqs_per_client)
                        .map(|_| stream_once(&hp, name, tokens))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Result<Sample, String>> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let wall = t0.elapsed().as_secs_f64();
        let ok: Vec<Sample> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if let Some(e) = failed.first() {
            eprintln!("{} of {} failed, e.g.: {e}", failed.len(), results.len());
        }
        let mut ttft: Vec<f64> = ok.iter().map(|s| ms(s.ttft)).collect();
        let mut lat: Vec<f64> = ok.iter().map(|s| ms(s.total)).collect();
        let toks: u64 = ok.iter().map(|s| s.tokens).sum();
        if ok.is_empty() {
            println!("| {k} | 0 | {} | {wall:.1} | | | |", failed.len());
            continue;
        }
        println!(
            "| {k} | {} | {} | {wall:.1} | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} |",
            ok.len(),
            failed.len(),
            toks as f64 / wall,
            pct(&mut ttft, 0.5),
            pct(&mut ttft, 0.99),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
        );
    }
    drop(api);
    mesh.stop(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&dir);
}
