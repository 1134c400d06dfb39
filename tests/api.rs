//! `pollen api` on a real 3-server swarm, driven by real clients: the official `openai`
//! Python package (chat and completions, whole and streamed; greedy text equal to
//! `pollen generate --local`), `curl -N` for the raw server-sent events, and the error
//! statuses. A client that hangs up mid-stream frees its session on every server, and a
//! swarm that lacks blocks answers 503. `--local` serves the same text. A private mesh's
//! API refuses an open address without a token, and with one answers 401 without it;
//! bodies that are not JSON get 415 and foreign host names (DNS rebinding) 403. A
//! request head that never ends is cut off after the head limit.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
#[path = "py/venv.rs"]
mod venv;

use common::*;
use pollen_node::chat_template::{ChatMessage, ChatTemplate, TemplateSource};
use pollen_node::mesh::{LocalMesh, THREE_SPANS};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

/// Tokens per answer: enough to tell answers apart, short enough to be quick.
const TOKENS: usize = 24;
/// The servers' default session limit.
const MAX_SESSIONS: u64 = 16;

/// Starts `pollen api` on a free port with `extra` arguments; it and its base URL.
pub fn start_api(extra: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(pollen());
    cmd.args(["api", "--listen", "127.0.0.1:0", "--threads", "1"])
        .arg("--model")
        .arg(model())
        .args(extra);
    let p = Proc::spawn("api", &mut cmd).unwrap();
    let line = p
        .line_with("api http://", Duration::from_secs(120))
        .unwrap();
    let base = line.trim_start_matches("api ").trim().to_string();
    (p, base)
}

/// `curl` with `args`; its stdout.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// POSTs `body` to `base/path` with curl; the status code and the body.
fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    let out = curl(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        "-w",
        "\n%{http_code}",
        &format!("{base}{path}"),
    ]);
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// What `pollen generate --local` prints, without the newline it adds.
fn local_text(prompt: &str, chat: bool) -> String {
    let out = generate(None, prompt, chat, TOKENS);
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

/// Free sessions per server, as the swarm's announcements say.
fn free_sessions(addr: &str) -> Vec<u64> {
    let st = status(Some(addr));
    st["models"][0]["servers"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|s| s["free_sessions"].as_u64().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The model's own template gives the same token ids as `pollen generate --chat`.
#[test]
fn chat_template_gives_the_ids_of_generate_chat() {
    let file = pollen_shard::ModelFile::open(&model()).unwrap();
    let tok = pollen_shard::PollenTokenizer::from_model(&file).unwrap();
    let t = ChatTemplate::from_model(&file, &tok);
    assert_eq!(t.source(), TemplateSource::Model);
    for (prompt, _) in PROMPTS {
        let text = t.render(&[ChatMessage::new("user", prompt)], true).unwrap();
        assert_eq!(
            tok.encode(&text).unwrap(),
            pollen_shard::generate::prompt_ids(&tok, prompt, true).unwrap(),
            "{prompt:?}"
        );
    }
    // A system message replaces the template's default one.
    let text = t
        .render(
            &[
                ChatMessage::new("system", "Be terse."),
                ChatMessage::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert!(text.starts_with("<|im_start|>system\nBe terse.<|im_end|>"));
    assert!(!text.contains("SmolLM"));
}

#[test]
fn openai_clients_and_curl_on_a_real_swarm() {
    let py = venv::python();
    let dir = temp_dir("api");
    let ttl: &[&str] = &["--announce-ttl", "3"];
    let mut mesh = LocalMesh::start(
        &pollen(),
        &model(),
        &dir,
        "a",
        &THREE_SPANS,
        &[ttl, ttl, ttl],
    )
    .unwrap();
    let (_api, base) = start_api(&[
        "--no-mdns",
        "--bootstrap",
        &mesh.addr,
        "--max-concurrent",
        "2",
        "--route-wait",
        "3",
    ]);
    let prompts: Vec<(String, bool)> = PROMPTS.iter().map(|(p, c)| (p.to_string(), *c)).collect();
    let want: Vec<String> = prompts.iter().map(|(p, c)| local_text(p, *c)).collect();

    // /v1/models names the model every request must give.
    let models: Value = serde_json::from_str(&curl(&[&format!("{base}/v1/models")])).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(name, "SmolLM2-135M-Instruct.Q4_1");

    // The official client: chat and completions, whole and streamed.
    let out = Command::new(&py)
        .arg(venv::scripts().join("openai_client.py"))
        .args([&base, &name, &TOKENS.to_string()])
        .arg(serde_json::to_string(&prompts).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["models"], json!([name]));
    for (case, want) in got["cases"].as_array().unwrap().iter().zip(&want) {
        assert!(!want.trim().is_empty());
        for mode in ["whole", "stream"] {
            let c = &case[mode];
            assert_eq!(c["text"].as_str().unwrap(), want, "{mode} {case}");
            let n = c["completion_tokens"].as_u64().unwrap();
            assert!(n > 0 && n <= TOKENS as u64, "{case}");
            assert!(
                ["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()),
                "{case}"
            );
        }
        assert_eq!(
            case["whole"]["completion_tokens"],
            case["stream"]["completion_tokens"]
        );
    }
    let errors = &got["errors"];
    assert_eq!(errors["unknown_model"], 404, "{errors}");
    assert_eq!(errors["too_long"], 400, "{errors}");
    assert_eq!(errors["n_2"], 400, "{errors}");
    assert_eq!(errors["busy"], 429, "{errors}");

    // The raw stream with curl -N: `data: {json}` events, then `data: [DONE]`.
    let body = json!({
        "model": name,
        "messages": [{"role": "user", "content": prompts[0].0}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let raw = curl(&[
        "-N",
        "-H",
        "Content-Type: application/json",
        "-d",
        &body.to_string(),
        &format!("{base}/v1/chat/completions"),
    ]);
    let events: Vec<&str> = raw
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{raw}");
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{raw}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want[0]);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{raw}");
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));

    // Errors in OpenAI's shape.
    let (code, body) = post(&base, "/v1/chat/completions", "{not json");
    assert_eq!(code, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid")
    );
    let (code, body) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": name, "messages": [], "max_tokens": 2}).to_string(),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": name, "prompt": "hi", "max_tokens": 100_000}).to_string(),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("context_length_exceeded"), "{body}");
    // A wrong method on an endpoint answers in OpenAI's shape too.
    let (code, body) = curl_code(&[&format!("{base}/v1/chat/completions")]);
    assert_eq!(code, 405, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "method_not_allowed", "{body}");
    // Features Pollen does not have are refused, not silently left out.
    for (field, value) in [
        ("logprobs", json!(true)),
        ("echo", json!(true)),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
    ] {
        let mut req = json!({"model": name, "prompt": "hi", "max_tokens": 2});
        req[field] = value;
        let (code, body) = post(&base, "/v1/completions", &req.to_string());
        assert_eq!(code, 400, "{field}: {body}");
        assert!(body.contains(&format!("\"param\":\"{field}\"")), "{body}");
    }
    // Asking for none of them is fine.
    let (code, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": name, "prompt": "hi", "max_tokens": 2, "logprobs": null,
            "echo": false, "tools": []})
        .to_string(),
    );
    assert_eq!(code, 200, "{body}");
    // A long prompt and no max_tokens: the open answer fits what the servers hold per
    // session (it was 512 more, refused by every server as over its session cap).
    let long = " a".repeat(1990);
    let (code, body) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": long}],
            "temperature": 0})
        .to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let usage = &serde_json::from_str::<serde_json::Value>(&body).unwrap()["usage"];
    let total = usage["total_tokens"].as_u64().unwrap();
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() > 1900 && total <= 2048,
        "{usage}"
    );

    // The page's headers.
    let head = curl(&["-D", "-", "-o", "/dev/null", &format!("{base}/")]).to_lowercase();
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(head.contains("frame-ancestors 'none'"), "{head}");
    assert!(head.contains("content-security-policy:"), "{head}");

    // A client that hangs up mid-stream frees its session on every server.
    let hostport = base.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(hostport).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = json!({"model": name, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 1500,
        "temperature": 0, "stream": true})
    .to_string();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data: ").count() < 3 {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        wait_for(Duration::from_secs(20), || {
            let f = free_sessions(&mesh.addr);
            f.len() == 3 && f.iter().all(|&f| f < MAX_SESSIONS)
        })
        .is_some(),
        "the stream's session never showed on every server"
    );
    drop(sock);
    let freed = wait_for(Duration::from_secs(20), || {
        let f = free_sessions(&mesh.addr);
        f.len() == 3 && f.iter().all(|&f| f == MAX_SESSIONS)
    });
    assert!(
        freed.is_some(),
        "sessions left open after the client hung up: {:?}",
        free_sessions(&mesh.addr)
    );
    eprintln!("every server freed the session {freed:?} after the client hung up");

    // `--local` serves the same text through the same API.
    let (_local, local_base) = start_api(&["--local"]);
    let (code, body) = post(
        &local_base,
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": prompts[1].0}],
            "max_tokens": TOKENS, "temperature": 0})
        .to_string(),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], want[1].as_str());

    // A swarm that lacks blocks: 503.
    mesh.servers[1].0.kill9();
    let (code, body) = post(
        &base,
        "/v1/completions",
        &json!({"model": name, "prompt": "Hello", "max_tokens": 4}).to_string(),
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("swarm_incomplete"), "{body}");
    mesh.stop(Duration::from_secs(5));
}

/// `curl` with `args`; the status code and the body.
fn curl_code(args: &[&str]) -> (u16, String) {
    let mut all = args.to_vec();
    all.extend(["-w", "\n%{http_code}"]);
    let out = curl(&all);
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

#[test]
fn private_mesh_api_needs_loopback_or_token_and_refuses_cross_site_requests() {
    let dir = temp_dir("api-private");
    let out = Command::new(pollen())
        .args(["mesh", "init", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::path::absolute(dir.join("swarm.key")).unwrap();
    let key = key.to_str().unwrap();

    // An open address without a token: refused before anything loads.
    let out = Command::new(pollen())
        .env_remove("POLLEN_HTTP_TOKEN")
        .args([
            "api",
            "--local",
            "--swarm-key",
            key,
            "--listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refusing"), "{err}");

    // With a token: 401 without it on every route, answers with it.
    const TOKEN: &str = "s3cret-token-for-the-test";
    let (_api, base) = start_api(&[
        "--local",
        "--swarm-key",
        key,
        "--http-token",
        TOKEN,
        "--allow-host",
        "MyBox.test",
    ]);
    let auth = format!("Authorization: Bearer {TOKEN}");
    for path in ["/v1/models", "/api/swarm", "/", "/metrics"] {
        let (code, body) = curl_code(&[&format!("{base}{path}")]);
        assert_eq!(code, 401, "{path}: {body}");
        let (code, body) = curl_code(&[
            "-H",
            "Authorization: Bearer wrong-token-wrong-token",
            &format!("{base}{path}"),
        ]);
        assert_eq!(code, 401, "{path}: {body}");
        // The API's paths in OpenAI's error shape, which its clients read.
        if path.starts_with("/v1/") {
            let e: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(e["error"]["code"], "invalid_api_key", "{body}");
        }
    }
    // The page opened with the token in its query: its answer sets the token as a
    // cookie, which the browser's next requests (style, script, data) carry; a query
    // token is percent-decoded, a wrong cookie is refused.
    let jar = dir.join("cookies");
    let jar = jar.to_str().unwrap();
    let head = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-c",
        jar,
        &format!("{base}/?token={TOKEN}"),
    ]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let set = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie set: {head}"));
    // Named after the token's hash (pages on other ports of the host keep theirs).
    let (name, rest) = set.split_once('=').unwrap();
    assert!(name.starts_with("pollen_token_"), "{set}");
    assert!(
        rest.starts_with(&format!("{TOKEN}; "))
            && set.ends_with("; Path=/; HttpOnly; SameSite=Strict"),
        "{set}"
    );
    let cookies = std::fs::read_to_string(jar).unwrap();
    assert!(
        cookies.contains("#HttpOnly_") && cookies.contains(name),
        "{cookies}"
    );
    for path in ["/app.js", "/style.css", "/api/swarm", "/v1/models"] {
        let (code, body) = curl_code(&["-b", jar, &format!("{base}{path}")]);
        assert_eq!(code, 200, "{path} with the cookie: {body}");
    }
    let encoded = TOKEN.replace('-', "%2D");
    let (code, body) = curl_code(&[&format!("{base}/v1/models?token={encoded}")]);
    assert_eq!(code, 200, "{body}");
    let wrong = format!("Cookie: {name}=wrong-token-wrong-token");
    let (code, body) = curl_code(&["-H", &wrong, &format!("{base}/v1/models")]);
    assert_eq!(code, 401, "{body}");
    // No cookie for a request that did not bring the token in its query.
    let head = curl(&[
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        &auth,
        &format!("{base}/"),
    ]);
    assert!(!head.contains("set-cookie"), "{head}");

    let (code, body) = curl_code(&["-H", &auth, &format!("{base}/v1/models")]);
    assert_eq!(code, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let ask = json!({"model": name, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2, "temperature": 0})
    .to_string();
    let url = format!("{base}/v1/chat/completions");
    let (code, body) = curl_code(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-d",
        &ask,
        &url,
    ]);
    assert_eq!(code, 200, "{body}");

    // A cross-site "simple request" (text/plain, no preflight): 415 in OpenAI's shape.
    for ct in [
        "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
    ] {
        let (code, body) = curl_code(&["-H", &auth, "-H", ct, "-d", &ask, &url]);
        assert_eq!(code, 415, "{ct}: {body}");
        let err: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{body}");
    }
    let (code, body) = curl_code(&[
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json; charset=utf-8",
        "-d",
        "{not json",
        &url,
    ]);
    assert_eq!(code, 400, "{body}");

    // A rebinding page's own host name on the loopback listener: 403, on every route.
    let port = base.rsplit(':').next().unwrap();
    for host in [
        format!("Host: evil.example:{port}"),
        "Host: localhost.evil.example".into(),
    ] {
        let (code, body) = curl_code(&[
            "-H",
            &auth,
            "-H",
            &host,
            "-H",
            "Content-Type: application/json",
            "-d",
            &ask,
            &url,
        ]);
        assert_eq!(code, 403, "{host}: {body}");
        assert!(body.contains("host_not_allowed"), "{body}");
        let (code, body) = curl_code(&["-H", &auth, "-H", &host, &format!("{base}/api/swarm")]);
        assert_eq!(code, 403, "{host}: {body}");
    }
    let (code, body) = curl_code(&[
        "-H",
        &auth,
        "-H",
        &format!("Host: localhost:{port}"),
        &format!("{base}/v1/models"),
    ]);
    assert_eq!(code, 200, "{body}");
    // A name given with --allow-host (any case) is answered.
    let (code, body) = curl_code(&[
        "-H",
        &auth,
        "-H",
        &format!("Host: mybox.TEST:{port}"),
        &format!("{base}/v1/models"),
    ]);
    assert_eq!(code, 200, "{body}");
}

/// A client that sends a request's head a piece at a time and never ends it is cut off
/// after the head limit (the token, if any, is checked only once a head has arrived),
/// and others are answered meanwhile.
#[test]
fn a_head_that_never_ends_is_cut_off() {
    use pollen_node::http_listener::Limits;
    let (_api, base) = start_api(&["--local"]);
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    let (code, body) = curl_code(&[&format!("{base}/v1/models")]);
    assert_eq!(code, 200, "{body}");
    let limit = Limits::default().head;
    slow.set_read_timeout(Some(limit * 2)).unwrap();
    let mut got = Vec::new();
    // Another header line now and then does not buy it time.
    let _ = slow.write_all(b"X-Slow: 1\r\n");
    let end = slow.read_to_end(&mut got);
    let waited = started.elapsed();
    assert!(
        end.is_ok() || matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "closed by the server, not timed out here: {end:?} after {waited:?}"
    );
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert!(
        waited >= limit - Duration::from_secs(1) && waited < limit + Duration::from_secs(10),
        "{waited:?}"
    );
}

/// Past its address's share of connections, a real client (curl, which sends its
/// request at once) reads a 429 that says why, not a reset connection; once one of
/// the address's connections closes, the next is served.
#[test]
fn a_client_past_its_addresses_share_reads_a_429() {
    use pollen_node::http_listener::Limits;
    let (_api, base) = start_api(&["--local"]);
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut held: Vec<std::net::TcpStream> = (0..Limits::default().per_ip)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // The listener has accepted them all once one more is refused.
    let mut body = String::new();
    let refused = wait_for(Duration::from_secs(20), || {
        let (code, b) = curl_code(&[&format!("{base}/v1/models")]);
        body = b;
        code == 429
    });
    assert!(refused.is_some(), "never refused past the share: {body}");
    assert_eq!(body.trim(), "too many connections open from this address");
    drop(held.pop());
    let served = wait_for(Duration::from_secs(20), || {
        curl_code(&[&format!("{base}/v1/models")]).0 == 200
    });
    assert!(served.is_some(), "a share given back is never reused");
}
