//! Helpers for tests that run Pollen's binaries as real processes on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used, missing_docs, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `pollen` binary Cargo built for these tests.
pub fn pollen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pollen"))
}

/// The default model, fetched if absent.
pub fn model() -> PathBuf {
    pollen_shard::fetch::ensure_default_model(&mut |l| eprintln!("{l}")).unwrap()
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

/// A child process whose stdout lines arrive on a channel; killed on drop.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            name: name.into(),
        }
    }

    /// The first stdout line starting with `prefix`, within `timeout`.
    pub fn line_with(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?} ({e})",
                    self.name
                ),
            }
        }
    }

    /// SIGKILL, like a machine that dies.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bootstrap node on 127.0.0.1; returns it and its dialable address.
pub fn bootstrap(dir: &Path, http: bool) -> (Proc, String) {
    let mut cmd = Command::new(pollen());
    cmd.args([
        "bootstrap",
        "--no-mdns",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--identity",
    ])
    .arg(dir.join("bootstrap.key"));
    if http {
        cmd.args(["--http", "127.0.0.1:0"]);
    }
    let p = Proc::spawn("bootstrap", &mut cmd);
    let addr = p.line_with("/ip4/", Duration::from_secs(30));
    (p, addr)
}

/// A server of `blocks`; returns it and its `ready` line.
pub fn server(bootstrap: Option<&str>, blocks: &str, key: &Path, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(pollen());
    cmd.args([
        "serve",
        "--threads",
        "1",
        "--blocks",
        blocks,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ])
    .arg("--model")
    .arg(model())
    .arg("--identity")
    .arg(key)
    .args(extra);
    if let Some(b) = bootstrap {
        cmd.args(["--no-mdns", "--bootstrap", b]);
    }
    let p = Proc::spawn(&format!("server {blocks}"), &mut cmd);
    let ready = p.line_with("ready", Duration::from_secs(120));
    (p, ready)
}

/// The peer id in a server's `ready` line.
pub fn peer_of(ready: &str) -> String {
    ready.split_whitespace().nth(2).unwrap().to_string()
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
    ["0:10", "10:20", "20:30"]
        .iter()
        .zip(extra)
        .enumerate()
        .map(|(i, (blocks, extra))| {
            server(bootstrap, blocks, &dir.join(format!("{tag}{i}.key")), extra)
        })
        .collect()
}
