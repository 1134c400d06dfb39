//! Operations: a real 3-server mesh with `pollen serve --metrics`, one generation
//! through it, and each server's `/metrics` scraped over HTTP: sessions, tokens, step
//! latency samples (by hop) and bytes moved, and the text parses as OpenMetrics with the
//! reference parser (Python's `prometheus_client`). The generation runs with
//! `--log-format json`, and its log lines parse as JSON. Then the last server dies
//! mid-answer, and the hop before it counts the failure by its error code.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A server of `blocks` with `--metrics 127.0.0.1:0`; it, its metrics URL and its
/// `ready` line.
fn metered_server(bootstrap: &str, blocks: &str, key: &Path) -> (Proc, String, String) {
    let mut cmd = Command::new(pollen());
    cmd.args(["serve", "--threads", "1", "--blocks", blocks])
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .args(["--no-mdns", "--bootstrap", bootstrap])
        .arg("--model")
        .arg(model())
        .arg("--identity")
        .arg(key);
    let p = Proc::spawn(&format!("server {blocks}"), &mut cmd).unwrap();
    let url = p
        .line_with("metrics ", Duration::from_secs(60))
        .unwrap()
        .trim_start_matches("metrics ")
        .to_string();
    let ready = p
        .line_with("ready", pollen_node::mesh::READY_TIMEOUT)
        .unwrap();
    (p, url, ready)
}

/// `GET url` over a plain TCP socket: the content type and the body.
fn scrape(url: &str) -> (String, String) {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (hostport, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (ctype, body.to_string())
}

/// The value of the sample `name` (with its labels, as written), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Checks every line of an OpenMetrics text by the format's grammar: comments of the
/// known kinds, samples as `name{labels} value`, one `# EOF` at the end.
fn check_grammar(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    for l in &lines[..lines.len() - 1] {
        if let Some(c) = l.strip_prefix("# ") {
            let kind = c.split(' ').next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "bad comment {l:?}"
            );
            continue;
        }
        let (series, value) = l.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{l:?}");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {l:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{l:?}");
            for pair in series[name_end + 1..series.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "{l:?}"
                );
            }
        }
    }
}

/// Python's `prometheus_client` (the reference client library), installed with pip
/// into a folder of the cache on first use: its folder for PYTHONPATH.
fn prometheus_client_python() -> std::path::PathBuf {
    let dir = pollen_node::fetch::cache_dir().join("py-prometheus-client");
    let ok = |d: &Path| {
        Command::new("python3")
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .env("PYTHONPATH", d)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&dir) {
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--target"])
            .arg(&dir)
            .arg("prometheus_client==0.21.1")
            .status()
            .unwrap();
        assert!(status.success(), "pip could not install prometheus_client");
    }
    assert!(ok(&dir));
    dir
}

/// Parses `text` with `prometheus_client`'s strict OpenMetrics parser; the sample
/// names and values it read, one per line.
fn parse_with_reference(pythonpath: &Path, text: &str) -> String {
    let script = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        print(s.name, s.value)
"#;
    let out = output_with_input(
        Command::new("python3")
            .args(["-c", script])
            .env("PYTHONPATH", pythonpath),
        text,
    );
    assert!(
        out.status.success(),
        "prometheus_client rejected the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn servers_export_metrics_that_move_with_a_generation_and_logs_can_be_json() {
    let pythonpath = prometheus_client_python();
    let dir = temp_dir("metrics");
    let (_boot, addr) = bootstrap(&dir, false);
    let mut servers: Vec<_> = pollen_node::mesh::THREE_SPANS
        .iter()
        .enumerate()
        .map(|(i, blocks)| metered_server(&addr, blocks, &dir.join(format!("m{i}.key"))))
        .collect();

    for (_, url, _) in &servers {
        let (ctype, before) = scrape(url);
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        check_grammar(&before);
        assert_eq!(
            sample(&before, "pollen_sessions_total{side=\"server\"}"),
            None
        );
        // The bootstrap, at least, once dialed.
        wait_for(Duration::from_secs(10), || {
            sample(&scrape(url).1, "pollen_peers_connected").unwrap() >= 1.0
        })
        .expect("no peer connected");
    }

    // One generation through the mesh, its logs as JSON.
    let max_tokens = 12;
    let out = Command::new(pollen())
        .args([
            "--log-format",
            "json",
            "generate",
            "--no-mdns",
            "--bootstrap",
            &addr,
        ])
        .args(["--threads", "1", "--max-tokens", &max_tokens.to_string()])
        .args(["--prompt", "The history of the printing press begins"])
        .arg("--model")
        .arg(model())
        .env("RUST_LOG", "info")
        .env_remove("POLLEN_LOG")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let route = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("route: "))
        })
        .unwrap_or_else(|| panic!("no JSON `route:` event in {log}"));
    assert_eq!(route["level"], "INFO");
    assert!(route["target"].as_str().unwrap().starts_with("pollen_node"));
    assert!(route["timestamp"].is_string());

    for (hop, (_, url, _)) in servers.iter().enumerate() {
        // The session closes on every hop once the client has gone.
        let mut text = String::new();
        wait_for(Duration::from_secs(10), || {
            text = scrape(url).1;
            sample(&text, "pollen_sessions_open{side=\"server\"}") == Some(0.0)
        })
        .unwrap_or_else(|| panic!("hop {hop}: the session is still open\n{text}"));
        check_grammar(&text);
        let parsed = parse_with_reference(&pythonpath, &text);
        assert!(parsed.contains("pollen_sent_bytes_total "), "{parsed}");

        let s = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name}\n{text}"));
        assert_eq!(
            s("pollen_sessions_total{side=\"server\"}"),
            1.0,
            "hop {hop}"
        );
        let prompt = s("pollen_tokens_processed_total{phase=\"prompt\"}");
        let decode = s("pollen_tokens_processed_total{phase=\"decode\"}");
        assert!(prompt >= 5.0, "hop {hop}: {prompt} prompt tokens");
        // Every answer token but the last is fed back through every hop.
        assert_eq!(decode, f64::from(max_tokens - 1), "hop {hop}");
        // One step sample per Forward, at this server's hop of the route.
        let steps = s(&format!("pollen_step_seconds_count{{hop=\"{hop}\"}}"));
        assert_eq!(steps, 1.0 + decode, "hop {hop}");
        assert!(s(&format!("pollen_step_seconds_sum{{hop=\"{hop}\"}}")) > 0.0);
        // Hidden states in and out: at least one f32 row (576 floats) per step.
        let (sent, received) = (
            s("pollen_sent_bytes_total"),
            s("pollen_received_bytes_total"),
        );
        assert!(sent >= steps * 576.0 * 4.0, "hop {hop}: {sent} bytes sent");
        assert!(
            received >= steps * 576.0 * 4.0,
            "hop {hop}: {received} bytes received"
        );
        assert!(s("pollen_peers_connected") >= 2.0, "hop {hop}");
        // A clean generation reports no failure by any code.
        assert!(!text.contains("pollen_errors_total{"), "{text}");
    }

    // The last server dies mid-answer: the hop before it reports the failure up, and
    // counts it by its code.
    use std::io::Read;
    let mut client = Command::new(pollen())
        .args([
            "generate",
            "--no-mdns",
            "--bootstrap",
            &addr,
            "--route-wait",
            "1",
        ])
        .args(["--threads", "1", "--max-tokens", "1000"])
        .args([
            "--prompt",
            "Here is a list of one thousand numbers: 1, 2, 3,",
        ])
        .arg("--model")
        .arg(model())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    client
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    servers[2].0.kill9();
    let _ = client.wait();
    let url = &servers[1].1;
    let mut text = String::new();
    wait_for(Duration::from_secs(10), || {
        text = scrape(url).1;
        text.contains("pollen_errors_total{side=\"server\"")
    })
    .unwrap_or_else(|| panic!("the hop before the dead server counted no error:\n{text}"));
    let counted = |code: &str| {
        sample(
            &text,
            &format!("pollen_errors_total{{side=\"server\",code=\"{code}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(counted("unreachable") + counted("timeout") >= 1.0, "{text}");
    check_grammar(&text);
    parse_with_reference(&pythonpath, &text);
}

/// `pollen api` serves the same metrics at `/metrics` on its own port: a local chat
/// completion moves the client side's counters.
#[test]
fn the_api_serves_metrics_and_counts_its_generations() {
    use std::io::{Read, Write};
    let mut cmd = Command::new(pollen());
    cmd.args([
        "api",
        "--local",
        "--threads",
        "1",
        "--listen",
        "127.0.0.1:0",
    ])
    .arg("--model")
    .arg(model());
    let api = Proc::spawn("api", &mut cmd).unwrap();
    let base = api
        .line_with("api http://", Duration::from_secs(120))
        .unwrap()
        .trim_start_matches("api ")
        .to_string();
    let name = model().file_stem().unwrap().to_string_lossy().into_owned();
    let body = serde_json::json!({
        "model": name,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 6,
        "temperature": 0,
    })
    .to_string();
    let hostport = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let answer: serde_json::Value =
        serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap();
    let tokens = answer["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(tokens >= 1.0, "{answer}");

    let (ctype, text) = scrape(&format!("{base}/metrics"));
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    check_grammar(&text);
    assert_eq!(sample(&text, "pollen_tokens_generated_total"), Some(tokens));
    assert_eq!(
        sample(&text, "pollen_sessions_total{side=\"client\"}"),
        Some(1.0)
    );
    // The generation's task ends a moment after its answer went out.
    wait_for(Duration::from_secs(10), || {
        sample(
            &scrape(&format!("{base}/metrics")).1,
            "pollen_sessions_open{side=\"client\"}",
        ) == Some(0.0)
    })
    .expect("the generation still counts as open");
}
