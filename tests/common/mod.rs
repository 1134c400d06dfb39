//! Helpers for tests that run Pollen's binaries as real processes on 127.0.0.1.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    missing_docs,
    unreachable_pub
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use pollen_node::mesh::{Proc, peer_of};

/// Chat and plain prompts whose swarm text is checked against local text.
pub const PROMPTS: [(&str, bool); 4] = [
    ("Give me three tips for staying healthy.", true),
    ("What is the capital of France? Answer briefly.", true),
    ("The history of the printing press begins", false),
    ("def fibonacci(n):", false),
];

/// The `pollen` binary Cargo built for these tests.
pub fn pollen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pollen"))
}

/// The default model, fetched if absent.
pub fn model() -> PathBuf {
    pollen_node::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap()
}

/// A fresh folder for one test's keys.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("pollen-it-{tag}-{}-{nonce}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A bootstrap node on 127.0.0.1; returns it and its dialable address.
pub fn bootstrap(dir: &Path, http: bool) -> (Proc, String) {
    pollen_node::mesh::bootstrap(&pollen(), dir, http).unwrap()
}

/// A server of `blocks`; returns it and its `ready` line.
pub fn server(bootstrap: Option<&str>, blocks: &str, key: &Path, extra: &[&str]) -> (Proc, String) {
    pollen_node::mesh::server(&pollen(), &model(), bootstrap, blocks, key, extra).unwrap()
}

/// Runs `cmd` with `input` on its stdin (closed after), its stdout and stderr captured.
pub fn output_with_input(cmd: &mut Command, input: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `pollen status --json` through `bootstrap` (or mDNS when `None`).
pub fn status(bootstrap: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(pollen());
    cmd.args(["status", "--json"]);
    match bootstrap {
        Some(b) => cmd.args(["--no-mdns", "--bootstrap", b, "--wait", "0"]),
        None => cmd.args(["--wait", "3"]),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `f` until it returns true or `timeout` passes; the time it took.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// The uncovered ranges of the only model in a status, and its server count.
pub fn coverage(status: &serde_json::Value) -> Option<(Vec<(u64, u64)>, usize)> {
    let m = status["models"].as_array()?.first()?;
    let gaps = m["uncovered"]
        .as_array()?
        .iter()
        .map(|g| (g[0].as_u64().unwrap(), g[1].as_u64().unwrap()))
        .collect();
    Some((gaps, m["servers"].as_array()?.len()))
}

/// `pollen generate` through the swarm or locally; its stdout.
pub fn generate(bootstrap: Option<&str>, prompt: &str, chat: bool, max_tokens: usize) -> String {
    generate_with(bootstrap, prompt, chat, max_tokens, &[])
}

/// The local answer (`pollen generate --local`) to `prompt`: computed once per test
/// binary for each prompt, chat flag and length, and shared by the tests that compare a
/// swarm's answer with it (a local run is deterministic). Callers that want it later can
/// start it early with [`local_answer_soon`].
pub fn local_answer(prompt: &str, chat: bool, max_tokens: usize) -> String {
    type Key = (String, bool, usize);
    static ANSWERS: std::sync::Mutex<BTreeMap<Key, Arc<OnceLock<String>>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let cell = ANSWERS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((prompt.to_string(), chat, max_tokens))
        .or_default()
        .clone();
    // A second caller of the same answer waits for the first one's run.
    cell.get_or_init(|| generate(None, prompt, chat, max_tokens))
        .clone()
}

/// Starts [`local_answer`] in a thread, so that it computes while the caller starts its
/// servers; the caller's own `local_answer` then waits for it.
pub fn local_answer_soon(prompt: &'static str, chat: bool, max_tokens: usize) {
    std::thread::spawn(move || local_answer(prompt, chat, max_tokens));
}

/// [`generate`] with `extra` arguments (e.g. `--weights exact`).
pub fn generate_with(
    bootstrap: Option<&str>,
    prompt: &str,
    chat: bool,
    max_tokens: usize,
    extra: &[&str],
) -> String {
    let mut cmd = Command::new(pollen());
    cmd.args([
        "generate",
        "--threads",
        "1",
        "--max-tokens",
        &max_tokens.to_string(),
        "--prompt",
        prompt,
    ])
    .args(extra)
    .arg("--model")
    .arg(model());
    if chat {
        cmd.arg("--chat");
    }
    match bootstrap {
        Some(b) => cmd.args(["--no-mdns", "--bootstrap", b]),
        None => cmd.arg("--local"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "generate ({bootstrap:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A plain HTTP/1.1 GET over a TCP socket; the body.
pub fn http_get(base: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let hostport = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// `GET url` (`http://host:port/path`) over a TCP socket: the body.
pub fn http_get_url(url: &str) -> String {
    let rest = url.trim_start_matches("http://");
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    http_get(&format!("http://{hostport}"), &format!("/{path}"))
}

/// The value of the Prometheus sample `name` in `text` (exactly that name, no
/// labels), if present.
pub fn metric_sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The page at `url` as headless Chromium renders it (its DOM), or `None`
/// when no Chromium is installed (`.ci/run` installs it).
pub fn browser_dom(url: &str) -> Option<String> {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })?;
    let profile = temp_dir("chromium");
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .ok()?;
    let _ = std::fs::remove_dir_all(&profile);
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The three servers of the test mesh (blocks 0:10, 10:20, 20:30), each with
/// its own key in `dir` and its own extra arguments; they are ready on return.
pub fn three_servers(
    bootstrap: Option<&str>,
    dir: &Path,
    tag: &str,
    extra: [&[&str]; 3],
) -> Vec<(Proc, String)> {
    pollen_node::mesh::THREE_SPANS
        .iter()
        .zip(extra)
        .enumerate()
        .map(|(i, (blocks, extra))| {
            server(bootstrap, blocks, &dir.join(format!("{tag}{i}.key")), extra)
        })
        .collect()
}
