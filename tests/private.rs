//! Private meshes, as real processes on 127.0.0.1: outsiders without the swarm key, with
//! another key, or off the allowlist cannot connect, discover or generate; inside, the
//! answer is the local one; a key rotation under load loses no generation; a public
//! swarm and a private mesh with mDNS on do not see each other.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
#[path = "common/private_mesh.rs"]
mod private_mesh;

use common::*;
use private_mesh::{
    add_peer, assert_generates_nothing, assert_kept_out, assert_sees_nothing, mesh_init,
    refusals_of, stderr,
};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// A `pollen` command with no swarm key inherited from the environment.
fn pollen_cmd() -> Command {
    let mut c = Command::new(pollen());
    c.env_remove("POLLEN_SWARM_KEY");
    c
}

/// A private bootstrap on 127.0.0.1 with its page on loopback. Returns it, its
/// address and its page's URL.
fn private_bootstrap(dir: &Path, key: &Path, extra: &[&str]) -> (Proc, String, String) {
    let mut cmd = pollen_cmd();
    cmd.args(["bootstrap", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--http", "127.0.0.1:0", "--identity"])
        .arg(dir.join("bootstrap.key"))
        .arg("--swarm-key")
        .arg(key)
        .args(extra);
    let p = Proc::spawn("private bootstrap", &mut cmd).unwrap();
    let addr = p.line_with("/ip4/", Duration::from_secs(30)).unwrap();
    let http = p.line_with("http ", Duration::from_secs(30)).unwrap();
    (p, addr, http.trim_start_matches("http ").trim().to_string())
}

fn health(http: &str) -> serde_json::Value {
    serde_json::from_str(&http_get(http, "/health")).unwrap()
}

fn status_with(bootstrap: &str, key: Option<&Path>, extra: &[&str]) -> Output {
    let mut cmd = pollen_cmd();
    cmd.args([
        "status",
        "--json",
        "--no-mdns",
        "--wait",
        "0",
        "--bootstrap",
        bootstrap,
    ])
    .args(extra);
    if let Some(k) = key {
        cmd.arg("--swarm-key").arg(k);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn generate_with(bootstrap: &str, key: Option<&Path>, extra: &[&str]) -> Output {
    let (prompt, chat) = PROMPTS[1];
    let mut cmd = pollen_cmd();
    cmd.args([
        "generate",
        "--threads",
        "1",
        "--max-tokens",
        "24",
        "--route-wait",
        "5",
    ])
    .args(["--no-mdns", "--bootstrap", bootstrap, "--prompt", prompt])
    .arg("--model")
    .arg(model())
    .args(extra);
    if chat {
        cmd.arg("--chat");
    }
    if let Some(k) = key {
        cmd.arg("--swarm-key").arg(k);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn local_answer() -> String {
    let (prompt, chat) = PROMPTS[1];
    generate(None, prompt, chat, 24)
}

/// Copies a key file alone (without `FILE.previous`), mode 0600.
fn copy_key(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn private_mesh_keeps_outsiders_out_answers_like_local_and_rotates_under_load() {
    let dir = temp_dir("private-mesh");
    let (key, printed) = mesh_init(&dir);
    let k = key.display().to_string();
    for line in [
        format!("pollen serve --swarm-key {k} "),
        format!("pollen generate --swarm-key {k} "),
        format!("pollen status --swarm-key {k} "),
        format!("pollen-bootstrap --swarm-key {k} "),
    ] {
        assert!(
            printed.contains(&line),
            "`mesh init` should print {line:?}:\n{printed}"
        );
    }
    let other_dir = temp_dir("private-other");
    let (other_key, _) = mesh_init(&other_dir);
    let local = local_answer();

    let (_b, addr, http) = private_bootstrap(&dir, &key, &[]);
    let ks = ["--swarm-key", k.as_str()];
    let _servers = three_servers(Some(&addr), &dir, "s", [&ks, &ks, &ks]);
    assert!(
        wait_for(Duration::from_secs(30), || health(&http)["connected_peers"]
            == 3)
        .is_some()
    );

    // Outsiders, all at once: no key, another key; status and generate.
    let outsiders: Vec<(&str, Output)> = std::thread::scope(|s| {
        let jobs = [
            (
                "status without a key",
                s.spawn(|| status_with(&addr, None, &[])),
            ),
            (
                "status with another key",
                s.spawn(|| status_with(&addr, Some(&other_key), &[])),
            ),
            (
                "generate without a key",
                s.spawn(|| generate_with(&addr, None, &[])),
            ),
            (
                "generate with another key",
                s.spawn(|| generate_with(&addr, Some(&other_key), &[])),
            ),
            (
                "chat without a key",
                s.spawn(|| {
                    pollen_cmd()
                        .args(["chat", "--threads", "1", "--no-mdns", "--bootstrap", &addr])
                        .arg("--model")
                        .arg(model())
                        .stdin(Stdio::null())
                        .output()
                        .unwrap()
                }),
            ),
        ];
        jobs.into_iter()
            .map(|(n, j)| (n, j.join().unwrap()))
            .collect()
    });
    for (what, out) in &outsiders {
        assert_kept_out(what, out);
        // Not reaching the mesh is not blamed on the model file.
        assert!(!stderr(out).contains("loading"), "{what}: {}", stderr(out));
    }
    // A private bootstrap asked for its page on an open address without a token does
    // not start, and prints no address first (a script reads that as started).
    let out = pollen_cmd()
        .args(["bootstrap", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args([
            "--http",
            "0.0.0.0:0",
            "--swarm-key",
            k.as_str(),
            "--identity",
        ])
        .arg(dir.join("exposed.key"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("refusing to show a private mesh's page"),
        "{}",
        stderr(&out)
    );
    // Nor does a server asked for its metrics (which take no token) on an open
    // address, before it loads anything.
    let out = pollen_cmd()
        .args(["serve", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--blocks", "0:10", "--metrics", "0.0.0.0:0"])
        .args([
            "--swarm-key",
            k.as_str(),
            "--bootstrap",
            addr.as_str(),
            "--identity",
        ])
        .arg(dir.join("metrics.key"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to serve a private mesh's metrics on 0.0.0.0"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("loading"), "{}", stderr(&out));
    // Not one outsider's connection was accepted: the bootstrap still holds the three servers only.
    assert_eq!(health(&http)["connected_peers"], 3);
    // A page of another site re-pointed at the page's address (DNS rebinding) sends its
    // own name: refused.
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", "Host: evil.example"])
        .arg(format!("{}/health", http.trim_end_matches('/')))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");

    // Inside: status sees the three servers, and the answer is the local one.
    // (Servers announce shortly after they connect: retried.)
    let mut st = serde_json::Value::Null;
    let seen = wait_for(Duration::from_secs(30), || {
        let out = status_with(&addr, Some(&key), &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        st = serde_json::from_slice(&out.stdout).unwrap();
        coverage(&st) == Some((vec![], 3))
    });
    assert!(seen.is_some(), "{st}");
    let out = generate_with(&addr, Some(&key), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), local);

    // Rotation under load: generations run back to back while the key rotates.
    let old_copy = dir.join("old.key");
    copy_key(&key, &old_copy);
    let answers = std::thread::scope(|s| {
        let load = s.spawn(|| {
            (0..4)
                .map(|_| generate_with(&addr, Some(&key), &[]))
                .collect::<Vec<_>>()
        });
        std::thread::sleep(Duration::from_secs(2));
        let out = pollen_cmd()
            .args(["mesh", "rotate", "--overlap", "1h", "--swarm-key"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        load.join().unwrap()
    });
    for (i, out) in answers.iter().enumerate() {
        assert!(
            out.status.success(),
            "generation {i} during the rotation: {}",
            stderr(out)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            local,
            "generation {i}"
        );
    }
    // Running nodes have re-read the key files: during the overlap both keys enter.
    std::thread::sleep(Duration::from_millis(1500));
    let new_only = dir.join("new-only.key");
    copy_key(&key, &new_only);
    for (what, k) in [("the old key", &old_copy), ("the new key alone", &new_only)] {
        let out = generate_with(&addr, Some(k), &[]);
        assert!(
            out.status.success(),
            "{what} during the overlap: {}",
            stderr(&out)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), local, "{what}");
    }
    // Rotating again during the overlap is refused: it would retire the key before at
    // once for members that have not moved.
    let out = pollen_cmd()
        .args(["mesh", "rotate", "--overlap", "0", "--swarm-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("still accepted"), "{}", stderr(&out));
    // Forced, with no overlap: the key before is refused, the newest works.
    let out = pollen_cmd()
        .args(["mesh", "rotate", "--force", "--overlap", "0", "--swarm-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(1500));
    let out = status_with(&addr, Some(&new_only), &[]);
    assert!(!out.status.success(), "a retired key still enters");
    let out = generate_with(&addr, Some(&key), &[]);
    assert!(
        out.status.success(),
        "after the second rotation: {}",
        stderr(&out)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), local);
}

#[test]
fn allowlist_refuses_other_peers_and_drops_removed_ones() {
    let dir = temp_dir("private-allow");
    let (key, _) = mesh_init(&dir);
    let allow = dir.join("allow-peers.txt");
    let _boot_id = add_peer(&allow, &dir.join("bootstrap.key"));
    let server_id = add_peer(&allow, &dir.join("server.key"));
    let _client_id = add_peer(&allow, &dir.join("member.key"));
    // A peer with the key but not on the list.
    let stranger = dir.join("stranger.key");
    let stranger_id = add_peer(&dir.join("elsewhere.txt"), &stranger);

    let a = allow.display().to_string();
    let k = key.display().to_string();
    let log = dir.join("bootstrap.log");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(
            "exec \"$0\" bootstrap --no-mdns --listen /ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0 \
             --identity \"$1\" --swarm-key \"$2\" --allow-peers \"$3\" 2>\"$4\"",
        )
        .arg(pollen())
        .arg(dir.join("bootstrap.key"))
        .arg(&key)
        .arg(&allow)
        .arg(&log)
        .env_remove("POLLEN_SWARM_KEY")
        .env("POLLEN_LOG", "warn");
    let b = Proc::spawn("private bootstrap", &mut cmd).unwrap();
    let addr = b.line_with("/ip4/", Duration::from_secs(30)).unwrap();
    let http = b
        .line_with("http ", Duration::from_secs(30))
        .unwrap()
        .trim_start_matches("http ")
        .trim()
        .to_string();
    let (_server, ready) = server(
        Some(&addr),
        "0:30",
        &dir.join("server.key"),
        &["--swarm-key", &k, "--allow-peers", &a],
    );
    assert_eq!(peer_of(&ready), server_id);
    assert!(
        wait_for(Duration::from_secs(30), || health(&http)["connected_peers"]
            == 1)
        .is_some()
    );

    // The member on the list sees the server; the stranger, three times, sees nothing.
    let member = [
        "--client-identity".to_string(),
        dir.join("member.key").display().to_string(),
    ];
    let member: Vec<&str> = member.iter().map(String::as_str).collect();
    let mut st = serde_json::Value::Null;
    let seen = wait_for(Duration::from_secs(30), || {
        let out = status_with(&addr, Some(&key), &member);
        assert!(out.status.success(), "{}", stderr(&out));
        st = serde_json::from_slice(&out.stdout).unwrap();
        coverage(&st) == Some((vec![], 1))
    });
    assert!(seen.is_some(), "{st}");
    let s = stranger.display().to_string();
    let stranger_args = ["--client-identity", s.as_str()];
    for _ in 0..2 {
        let out = status_with(&addr, Some(&key), &stranger_args);
        assert_sees_nothing("the stranger", &out);
    }
    let out = generate_with(&addr, Some(&key), &stranger_args);
    assert_generates_nothing("the stranger", &out);
    // Each refused peer is logged once.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        refusals_of(&text, &stranger_id),
        1,
        "bootstrap log:\n{text}"
    );
    assert_eq!(health(&http)["connected_peers"], 1);

    // Removing the server from the bootstrap's list (and SIGHUP) drops it within seconds.
    let kept: String = std::fs::read_to_string(&allow)
        .unwrap()
        .lines()
        .filter(|l| !l.contains(&server_id))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&allow, kept).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &b.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let took = wait_for(Duration::from_secs(10), || {
        health(&http)["connected_peers"] == 0
    });
    assert!(took.is_some(), "the removed server is still connected");
    // And it stays out: its redials are refused.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(health(&http)["connected_peers"], 0);
}

#[test]
fn a_public_swarm_and_a_private_mesh_do_not_see_each_other_with_mdns() {
    let dir = temp_dir("private-mdns");
    let (key, _) = mesh_init(&dir);
    let k = key.display().to_string();
    let (_public, public_ready) = server(None, "0:30", &dir.join("public.key"), &[]);
    let (_private, private_ready) =
        server(None, "0:30", &dir.join("private.key"), &["--swarm-key", &k]);
    let (public_id, private_id) = (peer_of(&public_ready), peer_of(&private_ready));
    let peers = |key: Option<&Path>| -> Vec<String> {
        let mut cmd = pollen_cmd();
        cmd.args(["status", "--json", "--wait", "4"]);
        if let Some(k) = key {
            cmd.arg("--swarm-key").arg(k);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["models"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|m| m["servers"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s["peer"].as_str().map(String::from))
            .collect()
    };
    // Each side finds its own server by mDNS (retried: discovery needs a moment) ...
    let mut seen_private = Vec::new();
    assert!(
        wait_for(Duration::from_secs(30), || {
            seen_private = peers(Some(&key));
            seen_private.iter().any(|p| p == private_id)
        })
        .is_some(),
        "the private client did not find its own server by mDNS"
    );
    let mut seen_public = Vec::new();
    assert!(
        wait_for(Duration::from_secs(30), || {
            seen_public = peers(None);
            seen_public.iter().any(|p| p == public_id)
        })
        .is_some(),
        "the public client did not find the public server by mDNS"
    );
    // ... and never the other.
    assert!(
        !seen_private.iter().any(|p| p == public_id),
        "{seen_private:?}"
    );
    assert!(
        !seen_public.iter().any(|p| p == private_id),
        "{seen_public:?}"
    );
}
