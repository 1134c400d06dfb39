//! Healing on a real swarm of processes: a server of the route that is killed
//! (first, middle or last hop, and during prefill), stopped (SIGSTOP) or asked to
//! leave (SIGTERM) costs a pause, never the answer: the client routes around it,
//! replays what it fed the route into the new one, and the text equals a local run.
//! With no server left for a span, the client stops with an error naming the blocks,
//! after printing what it had.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Each test runs a mesh of six servers: one test at a time, or 2 cores thrash.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const PROMPT: &str = "Here is a list of one thousand numbers: 1, 2, 3,";
const TOKENS: usize = 240;

/// A client run with its stdout and stderr read as they come.
struct Client {
    child: Child,
    out: mpsc::Receiver<Vec<u8>>,
    err: mpsc::Receiver<String>,
    stdout: Vec<u8>,
    stderr: Vec<String>,
}

impl Client {
    fn start(addr: &str, prompt: &str, max_tokens: usize, extra: &[&str]) -> Client {
        let mut child = Command::new(pollen())
            .args([
                "generate",
                "--no-mdns",
                "--threads",
                "1",
                "--bootstrap",
                addr,
            ])
            .args(["--max-tokens", &max_tokens.to_string(), "--prompt", prompt])
            .arg("--model")
            .arg(model())
            .args(extra)
            .env("POLLEN_LOG", "warn,pollen_node::client=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (otx, out) = mpsc::sync_channel(4096);
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || otx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let (etx, err) = mpsc::sync_channel(4096);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("client: {line}");
                if etx.send(line).is_err() {
                    break;
                }
            }
        });
        Client {
            child,
            out,
            err,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// The peers of the route the client logged, in order.
    fn route(&mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(line) = self.err.recv_timeout(Duration::from_millis(100)) {
                self.stderr.push(line.clone());
                if let Some(r) = line.split("route: ").nth(1) {
                    return r
                        .split(" -> ")
                        .map(|h| h.split('@').nth(1).unwrap().trim().to_string())
                        .collect();
                }
            }
        }
        panic!("the client logged no route: {:?}", self.stderr);
    }

    /// Waits until the client has printed at least `n` bytes.
    fn printed(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.stdout.len() < n {
            assert!(Instant::now() < deadline, "only {:?} printed", self.text());
            if let Ok(b) = self.out.recv_timeout(Duration::from_millis(50)) {
                self.stdout.extend(b);
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Waits for the client to exit: its status, all it printed, all it logged.
    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let status = self.child.wait().unwrap();
        while let Ok(b) = self.out.recv_timeout(Duration::from_millis(500)) {
            self.stdout.extend(b);
        }
        while let Ok(l) = self.err.recv_timeout(Duration::from_millis(200)) {
            self.stderr.push(l);
        }
        let text = self.text();
        (status, text, self.stderr.join("\n"))
    }
}

/// The servers of a mesh by peer id.
struct Servers {
    by_peer: HashMap<String, Proc>,
}

impl Servers {
    fn add(&mut self, (p, ready): (Proc, String)) {
        self.by_peer.insert(peer_of(&ready).to_string(), p);
    }

    fn get(&mut self, peer: &str) -> &mut Proc {
        self.by_peer.get_mut(peer).unwrap()
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn mesh(tag: &str, spares: bool) -> (Proc, String, Servers, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let (boot, addr) = bootstrap(&dir, false);
    let mut servers = Servers {
        by_peer: HashMap::new(),
    };
    let ttl = ["--announce-ttl", "6"];
    let copies = if spares { 2 } else { 1 };
    for copy in 0..copies {
        for (i, blocks) in pollen_node::mesh::THREE_SPANS.iter().enumerate() {
            let key = dir.join(format!("{tag}{copy}{i}.key"));
            servers.add(server(Some(&addr), blocks, &key, &ttl));
        }
    }
    (boot, addr, servers, dir)
}

/// A crash of each hop in turn (SIGKILL mid-answer), with a spare for each span, and
/// one during prefill: every answer equals the local one.
#[test]
fn a_killed_server_costs_a_pause_not_the_answer() {
    let _one = serial();
    local_answer_soon(PROMPT, false, TOKENS);
    let (_boot, addr, mut servers, _dir) = mesh("crash", true);
    let want = local_answer(PROMPT, false, TOKENS);
    assert!(want.len() > 150, "a long answer: {want:?}");
    for hop in [0, 1, 2] {
        let mut c = Client::start(&addr, PROMPT, TOKENS, &[]);
        let route = c.route();
        assert_eq!(route.len(), 3, "{route:?}");
        c.printed(40);
        let killed = Instant::now();
        servers.get(&route[hop]).kill9();
        let (status, text, log) = c.finish();
        assert!(status.success(), "hop {hop}: {log}");
        assert_eq!(text, want, "hop {hop} killed mid-answer");
        assert!(log.contains("routing around it"), "{log}");
        assert!(log.contains("healed in"), "{log}");
        eprintln!(
            "hop {hop} killed: the answer finished {:?} later",
            killed.elapsed()
        );
    }
    // Each span has one server left; a kill during prefill of a long prompt would leave
    // a span uncovered, so start a spare for the middle span first.
    let dir = temp_dir("crash-prefill");
    servers.add(server(
        Some(&addr),
        "10:20",
        &dir.join("spare.key"),
        &["--announce-ttl", "6"],
    ));
    let long = format!("{} {}", PROMPT, "4, 5, 6, 7, 8, 9, 10, ".repeat(60));
    let want = generate(None, &long, false, 16);
    let mut c = Client::start(&addr, &long, 16, &[]);
    let route = c.route();
    servers.get(&route[1]).kill9();
    let (status, text, log) = c.finish();
    assert!(status.success(), "{log}");
    assert_eq!(
        text, want,
        "middle hop killed at the start of a long prompt"
    );
}

/// A server stopped with SIGSTOP is detected by its timeout and routed around; after
/// SIGCONT its late replies change nothing.
#[test]
fn a_hung_server_is_detected_by_its_timeout() {
    let _one = serial();
    local_answer_soon(PROMPT, false, TOKENS);
    let (_boot, addr, mut servers, _dir) = mesh("hang", true);
    let want = local_answer(PROMPT, false, TOKENS);
    let mut c = Client::start(&addr, PROMPT, TOKENS, &[]);
    let route = c.route();
    c.printed(40);
    let hung = servers.get(&route[1]);
    signal(hung, "-STOP");
    let stopped = Instant::now();
    let (status, text, log) = c.finish();
    signal(servers.get(&route[1]), "-CONT");
    assert!(status.success(), "{log}");
    assert_eq!(text, want);
    assert!(
        log.contains("timeout"),
        "the hang was named a timeout: {log}"
    );
    assert!(log.contains(&route[1]), "the hung peer is named: {log}");
    eprintln!(
        "hung middle hop: answer finished {:?} after SIGSTOP",
        stopped.elapsed()
    );
}

/// SIGTERM on a server of the route half way through the answer: it asks its clients to
/// move, they replay into another route without an error, and it exits cleanly. The
/// replay sends some 120 inputs (a character a token here) before it waits for an
/// output, their outputs (280 KB in f32, over TCP and yamux) coming back meanwhile.
#[test]
fn a_leaving_server_hands_its_sessions_over() {
    let _one = serial();
    local_answer_soon(PROMPT, false, TOKENS);
    let (_boot, addr, mut servers, _dir) = mesh("leave", true);
    let want = local_answer(PROMPT, false, TOKENS);
    assert!(want.len() >= 230, "a long answer: {}", want.len());
    let mut c = Client::start(&addr, PROMPT, TOKENS, &[]);
    let route = c.route();
    c.printed(120);
    let leaving = servers.get(&route[2]);
    let status = leaving.terminate(Duration::from_secs(20));
    let (client, text, log) = c.finish();
    assert!(client.success(), "{log}");
    assert_eq!(text, want);
    assert!(log.contains("this server is leaving"), "{log}");
    assert!(
        status.is_some_and(|s| s.success()),
        "the leaving server exits 0 once its session moved: {status:?}"
    );
}

/// With no server left for a span, the client waits `--route-wait`, then stops with
/// an error naming the uncovered blocks; what it printed stays printed.
#[test]
fn no_replacement_is_a_clear_error_after_the_wait() {
    let _one = serial();
    let (_boot, addr, mut servers, _dir) = mesh("none", false);
    let mut c = Client::start(&addr, PROMPT, TOKENS, &["--route-wait", "2"]);
    let route = c.route();
    c.printed(40);
    servers.get(&route[1]).kill9();
    let (status, text, log) = c.finish();
    assert!(!status.success());
    assert!(text.len() >= 40, "the text so far was printed: {text:?}");
    assert!(log.contains("uncovered: 10:20"), "{log}");
}
