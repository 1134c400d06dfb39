//! Distributed generation on a real 3-server swarm (spans 0:10, 10:20, 20:30,
//! separate processes, a bootstrap node): greedy text equals `--local` token
//! for token for chat and plain prompts, and eight clients at once each get
//! their own correct text. An answer the model ends at once says so on stderr.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;

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

/// A server's session limit is a clear error before any step runs: the server refuses
/// the session, naming itself and its limit.
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
    // The error the run ends with, not a warning on the way.
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.starts_with("error:")
            && last.contains(
                "over_budget: session cap: this server holds at most 40 tokens per session"
            ),
        "{err}"
    );
    // Within the limit it works.
    assert!(!generate(Some(&addr), "Hello there", false, 8).is_empty());
}

/// A client that goes away mid-answer, by Ctrl-C or SIGKILL, frees its session on
/// every server at once (its connection closes and each server's stream breaks): with
/// one session per server, the next client gets in at once, never told "busy", without
/// waiting for the idle timeout.
#[test]
fn a_client_that_goes_away_frees_its_session() {
    use std::io::Read;
    let dir = temp_dir("interrupt");
    let (_boot, addr) = bootstrap(&dir, false);
    let one = ["--max-sessions", "1"];
    let _servers = three_servers(Some(&addr), &dir, "i", [&one, &one, &one]);
    for (signal, code) in [("-INT", Some(130)), ("-KILL", None)] {
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
            .args([signal, &a.id().to_string()])
            .status();
        let status = a.wait().unwrap();
        assert_eq!(status.code(), code, "{signal} mid-answer");
        let next = std::process::Command::new(pollen())
            .args(["generate", "--no-mdns", "--bootstrap", &addr])
            .args(["--max-tokens", "8", "--prompt", "Hello there", "--model"])
            .arg(model())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&next.stderr);
        assert!(next.status.success(), "after {signal}: {log}");
        assert!(!next.stdout.is_empty());
        assert!(
            !log.contains("busy"),
            "after {signal} the servers were still full: {log}"
        );
    }
}

#[test]
fn an_empty_answer_says_why_and_points_at_chat() {
    // This chat model ends its turn at once on a bare question (greedy, so always).
    let out = std::process::Command::new(pollen())
        .args(["generate", "--local", "--threads", "1", "--max-tokens", "8"])
        .args(["--prompt", "What is the capital of France?"])
        .arg("--model")
        .arg(model())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "", "an answer after all: {stdout:?}");
    assert!(
        stderr.contains("ended its answer at once") && stderr.contains("add --chat"),
        "no hint on stderr: {stderr}"
    );
    // Wrapped in the template, the same question gets an answer and no hint.
    let out = std::process::Command::new(pollen())
        .args([
            "generate",
            "--local",
            "--chat",
            "--threads",
            "1",
            "--max-tokens",
            "8",
        ])
        .args(["--prompt", "What is the capital of France?"])
        .arg("--model")
        .arg(model())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("ended its answer at once"));
}

/// `--compute` routes through servers of another compute mode: a client whose own mode
/// (fast) no server computes is refused, with the servers' mode named and `--compute`
/// suggested; with `--compute` and that name it answers through them, warned that the
/// text need not equal local text (naming its own mode warns of nothing). A name that
/// cannot be one, or `--compute` with `--local`, is refused before anything loads.
#[test]
fn compute_routes_through_servers_of_another_mode() {
    let dir = temp_dir("compute");
    let (_boot, addr) = bootstrap(&dir, false);
    let exact = ["--weights", "exact"];
    let _servers = three_servers(Some(&addr), &dir, "c", [&exact, &exact, &exact]);
    let st = status(Some(&addr));
    let modes: std::collections::BTreeSet<String> = st["models"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["compute"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(modes.len(), 1, "{st}");
    let mode = modes.into_iter().next().unwrap();
    assert!(mode.starts_with("exact/"), "{mode}");

    let run = |extra: &[&str]| {
        std::process::Command::new(pollen())
            .args(["generate", "--threads", "1", "--max-tokens", "8"])
            .args(["--prompt", "Name a colour.", "--route-wait", "3"])
            .args(extra)
            .arg("--model")
            .arg(model())
            .output()
            .unwrap()
    };
    let swarm = ["--no-mdns", "--bootstrap", addr.as_str()];
    let refused = run(&swarm);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("other compute modes")
            && err.contains(&format!("{mode} × 3"))
            && err.contains("`--compute MODE`"),
        "{err}"
    );

    let routed = run(&[&swarm[..], &["--compute", &mode]].concat());
    let err = String::from_utf8_lossy(&routed.stderr);
    assert!(routed.status.success(), "{err}");
    let text = String::from_utf8_lossy(&routed.stdout);
    assert!(!text.trim().is_empty(), "{err}");
    assert!(
        err.contains(&format!("routing through servers computing {mode}"))
            && err.contains("need not equal local text"),
        "{err}"
    );

    // Naming the client's own mode changes nothing, and warns of nothing.
    let own = run(&[&swarm[..], &["--weights", "exact", "--compute", &mode]].concat());
    let err = String::from_utf8_lossy(&own.stderr);
    assert!(own.status.success(), "{err}");
    assert!(!err.contains("routing through servers computing"), "{err}");

    for (extra, says) in [
        (
            vec!["--compute", "exact/cpu\tx"],
            "is not in a compute mode's name",
        ),
        (
            vec!["--local", "--compute", "exact/cpu"],
            "cannot be used with",
        ),
    ] {
        let out = run(&extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{extra:?}: {err}"
        );
    }
}
