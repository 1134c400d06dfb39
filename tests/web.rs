//! The web page of `pollen api` in headless Chromium, driven through its DevTools
//! protocol on a real 3-server swarm, with a fourth server of another compute mode
//! (exact) on blocks 0:10: a question typed into the chat streams an answer equal to
//! the API's, the swarm bar shows every block covered once (by servers of the client's
//! mode: the exact one is listed, marked, and not counted), and turns red where a
//! stopped server's blocks are left bare for this client although the exact server
//! still holds them. The page requests nothing but its own origin.
//! A screenshot is kept in `target/tmp/web-chat.png`.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
#[path = "py/venv.rs"]
mod venv;

use common::*;
use pollen_node::mesh::{LocalMesh, THREE_SPANS};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const QUESTION: &str = "What is the capital of France? Answer briefly.";
const TOKENS: usize = 24;

fn chromium() -> String {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("this test needs Chromium (`apt-get install chromium`; .ci/run installs it)")
        .to_string()
}

/// `pollen api` on the swarm of bootstrap `boot`, with `extra` arguments; it and its
/// base URL.
fn api(boot: &str, extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(pollen());
    cmd.args(["api", "--listen", "127.0.0.1:0", "--threads", "1"])
        .args(["--no-mdns", "--bootstrap", boot, "--route-wait", "3"])
        .args(extra)
        .arg("--model")
        .arg(model());
    let p = Proc::spawn("api", &mut cmd).unwrap();
    let base = p
        .line_with("api http://", Duration::from_secs(120))
        .unwrap()
        .trim_start_matches("api ")
        .trim()
        .to_string();
    (p, base)
}

#[test]
fn the_page_streams_a_chat_answer_and_shows_the_swarm_change() {
    let browser = chromium();
    let py = venv::python();
    let dir = temp_dir("web");
    let ttl: &[&str] = &["--announce-ttl", "3"];
    let mut mesh = LocalMesh::start(
        &pollen(),
        &model(),
        &dir,
        "w",
        &THREE_SPANS,
        &[ttl, ttl, ttl],
    )
    .unwrap();
    // Another compute mode on blocks 0:10: listed, never counted for this client.
    let (_exact, _) = common::server(
        Some(&mesh.addr),
        "0:10",
        &dir.join("exact.key"),
        &["--weights", "exact", "--announce-ttl", "3"],
    );
    let seen = wait_for(Duration::from_secs(30), || {
        status(Some(&mesh.addr))["models"][0]["servers"]
            .as_array()
            .is_some_and(|s| s.len() == 4)
    });
    assert!(seen.is_some(), "the exact-mode server never showed");
    let (_api, base) = api(&mesh.addr, &[]);

    // What the API answers, to compare with the page.
    let models: Value = serde_json::from_str(&http_get(&base, "/v1/models")).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let body = json!({"model": name, "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": TOKENS, "temperature": 0});
    let ask = || -> Value {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "120",
                "-H",
                "Content-Type: application/json",
            ])
            .args([
                "-d",
                &body.to_string(),
                &format!("{base}/v1/chat/completions"),
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let api_answer = ask();
    let api_answer = api_answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!api_answer.trim().is_empty());

    let shot = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-chat.png");
    let _ = std::fs::remove_file(&shot);
    let mut page = Command::new(&py)
        .arg(venv::scripts().join("web_check.py"))
        .args([&browser, &format!("{base}/"), QUESTION, &TOKENS.to_string()])
        .arg(&shot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(page.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["errors"], json!([]), "{first}");
    assert_eq!(first["answer"].as_str().unwrap(), api_answer, "{first}");
    let partials = first["partials"].as_array().unwrap().len();
    assert!(
        partials >= 2,
        "the answer arrived in one piece, not streamed: {first}"
    );
    let bar: Vec<u64> = serde_json::from_value(first["bar"].clone()).unwrap();
    assert_eq!(bar, vec![1; 30], "{first}");

    // Behind a token, the page opened as `/?token=TOKEN` works the same: its script,
    // style and calls carry the token as the cookie the first answer set.
    const TOKEN: &str = "a-token-for-the-web-page";
    let (token_api, token_base) = api(&mesh.addr, &["--http-token", TOKEN]);
    let token_shot = dir.join("web-token.png");
    let out = Command::new(&py)
        .arg(venv::scripts().join("web_check.py"))
        .args([&browser, &format!("{token_base}/?token={TOKEN}"), QUESTION])
        .args([&TOKENS.to_string(), token_shot.to_str().unwrap(), "once"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_page: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(token_page["errors"], json!([]), "{token_page}");
    assert_eq!(
        token_page["answer"].as_str().unwrap(),
        api_answer,
        "{token_page}"
    );
    let bar: Vec<u64> = serde_json::from_value(token_page["bar"].clone()).unwrap();
    assert_eq!(bar, vec![1; 30], "{token_page}");
    drop(token_api);

    // Stop the server of blocks 0:10: its announcement lapses and the bar shows the gap.
    mesh.servers[0].0.kill9();
    writeln!(page.stdin.take().unwrap(), "stopped").unwrap();
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(page.wait().unwrap().success());
    let bar: Vec<u64> = serde_json::from_value(second["bar"].clone()).unwrap();
    let want: Vec<u64> = (0..30).map(|b| u64::from(b >= 10)).collect();
    assert_eq!(bar, want, "{second}");
    assert_eq!(second["rows"], 3, "{second}");
    assert_eq!(second["other_rows"], 1, "{second}");
    // The API says why it has no route: the exact server's blocks are of another mode.
    let refused = ask();
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    eprintln!("without a route: {message}");
    assert_eq!(refused["error"]["code"], "swarm_incomplete", "{refused}");
    assert!(
        message.contains("computing fast/cpu") && message.contains("uncovered: 0:10"),
        "{refused}"
    );
    assert!(
        message.contains("other compute modes") && message.contains("exact/cpu"),
        "{refused}"
    );
    let requested: Vec<String> = serde_json::from_value(second["requested"].clone()).unwrap();
    assert!(
        requested.iter().all(|u| u.starts_with(&base)),
        "the page fetched from elsewhere: {requested:?}"
    );
    assert!(requested.iter().any(|u| u.ends_with("/app.js")));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {}", shot.display());

    mesh.stop(Duration::from_secs(5));
}
