//! Distributed generation on a real 3-server swarm (spans 0:10, 10:20, 20:30,
//! separate processes, a bootstrap node): greedy text equals `--local` token
//! for token for chat and plain prompts, and eight clients at once each get
//! their own correct text.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;

const PROMPTS: [(&str, bool); 4] = [
    ("Give me three tips for staying healthy.", true),
    ("What is the capital of France? Answer briefly.", true),
    ("The history of the printing press begins", false),
    ("def fibonacci(n):", false),
];

#[test]
fn swarm_text_equals_local_text_and_eight_clients_share_the_servers() {
    let dir = temp_dir("gen");
    let (_boot, addr) = bootstrap(&dir, false);
    let _servers = three_servers(Some(&addr), &dir, "g", [&[], &[], &[]]);

    let mut local = Vec::new();
    for (prompt, chat) in PROMPTS {
        let want = generate(None, prompt, chat, 24);
        let got = generate(Some(&addr), prompt, chat, 24);
        assert!(!want.trim().is_empty());
        assert_eq!(got, want, "swarm vs local for {prompt:?}");
        local.push(want);
    }

    // Eight clients at once, two per prompt.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let (prompt, chat) = PROMPTS[i % PROMPTS.len()];
                (i, generate(Some(&addr), prompt, chat, 24))
            })
        })
        .collect();
    for h in handles {
        let (i, got) = h.join().unwrap();
        assert_eq!(got, local[i % PROMPTS.len()], "client {i}");
    }
}

/// A server's session limit is a clear error before any step runs.
#[test]
fn a_request_over_the_servers_session_limit_is_a_clear_error() {
    let dir = temp_dir("limits");
    let (_boot, addr) = bootstrap(&dir, false);
    let limit = ["--max-session-tokens", "40"];
    let _servers = three_servers(Some(&addr), &dir, "l", [&[], &limit, &[]]);
    let out = std::process::Command::new(pollen())
        .args([
            "generate",
            "--no-mdns",
            "--bootstrap",
            &addr,
            "--max-tokens",
            "64",
            "--prompt",
            "Hello there",
        ])
        .arg("--model")
        .arg(model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allow 40 tokens per session"), "{err}");
    // Within the limit it works.
    assert!(!generate(Some(&addr), "Hello there", false, 8).is_empty());
}

/// Ctrl-C on a client mid-answer frees its session on every server at once:
/// with one session per server, the next client gets in without waiting for
/// the idle timeout.
#[test]
fn an_interrupted_client_frees_its_session() {
    use std::io::Read;
    let dir = temp_dir("interrupt");
    let (_boot, addr) = bootstrap(&dir, false);
    let one = ["--max-sessions", "1"];
    let _servers = three_servers(Some(&addr), &dir, "i", [&one, &one, &one]);
    let mut a = std::process::Command::new(pollen())
        .args([
            "generate",
            "--no-mdns",
            "--bootstrap",
            &addr,
            "--max-tokens",
            "1500",
        ])
        .args([
            "--prompt",
            "Here is a list of one thousand numbers: 1, 2, 3,",
            "--model",
        ])
        .arg(model())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    a.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &a.id().to_string()])
        .status();
    let status = a.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted mid-answer");
    assert!(!generate(Some(&addr), "Hello there", false, 8).is_empty());
}
