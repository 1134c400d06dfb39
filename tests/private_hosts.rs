//! A private mesh across an emulated internet (see `tests/common/netns.rs`): a bootstrap
//! and three servers on hosts of their own, one server behind a symmetric NAT reached
//! through a member's relay. Inside, the answer is the local one; outsiders without the
//! swarm key, with another key, or off the allowlist fail with a clear error and no
//! member accepts a connection from them. Skipped, with the reason, where namespaces
//! cannot be made.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/private_mesh.rs"]
mod private_mesh;

use common::*;
use netns::{Host, NatKind, internet, text};
use private_mesh::{
    add_peer, assert_generates_nothing, assert_kept_out, assert_sees_nothing, refusals_of, stderr,
};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

const PROMPT: &str = "The history of the printing press begins";
const TOKENS: usize = 16;
/// Members log every established connection (libp2p) and every refusal (Pollen).
const LOG: &str = "warn,libp2p_swarm=debug,quinn_udp=error,libp2p_autonat=error,libp2p_kad=error";

/// `pollen mesh init --out dir`: the key file.
fn mesh_init(dir: &Path) -> PathBuf {
    private_mesh::mesh_init(dir).0
}

/// A member process on `host`: `pollen ARGS` with its stderr (logs) in `log`.
fn member(host: &Host, name: &str, args: &[String], log: &Path) -> Proc {
    let mut cmd = host.command("sh");
    cmd.arg("-c")
        .arg("log=\"$1\"; shift; exec \"$0\" \"$@\" 2>\"$log\"")
        .arg(pollen())
        .arg(log)
        .args(args)
        .env_remove("POLLEN_SWARM_KEY")
        .env("POLLEN_LOG", LOG)
        .env("RUST_LOG", LOG);
    Proc::spawn(&format!("{name} on {}", host.ip), &mut cmd).unwrap()
}

/// `pollen status --json` on `host` through `entry`, with `key` and `identity`.
fn status_on(host: &Host, entry: &str, key: Option<&Path>, identity: &Path) -> Output {
    let mut cmd = host.command(pollen());
    cmd.args(["status", "--json", "--no-mdns", "--wait", "0"])
        .args(["--bootstrap", entry, "--client-identity"])
        .arg(identity)
        .env_remove("POLLEN_SWARM_KEY");
    if let Some(k) = key {
        cmd.arg("--swarm-key").arg(k);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// `pollen generate` (greedy, 1 thread) on `host` through `entry`.
fn generate_on(
    host: &Host,
    entry: &str,
    key: Option<&Path>,
    identity: &Path,
    route_wait: u32,
) -> Output {
    let mut cmd = host.command(pollen());
    cmd.args([
        "generate",
        "--threads",
        "1",
        "--no-mdns",
        "--bootstrap",
        entry,
    ])
    .args(["--max-tokens", &TOKENS.to_string(), "--prompt", PROMPT])
    .args(["--route-wait", &route_wait.to_string(), "--client-identity"])
    .arg(identity)
    .arg("--model")
    .arg(model())
    .env_remove("POLLEN_SWARM_KEY");
    if let Some(k) = key {
        cmd.arg("--swarm-key").arg(k);
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// The server of `status` with peer id `peer`.
fn server_of<'a>(status: &'a serde_json::Value, peer: &str) -> Option<&'a serde_json::Value> {
    status["models"][0]["servers"]
        .as_array()?
        .iter()
        .find(|s| s["peer"] == peer)
}

#[test]
fn private_mesh_on_separate_hosts_keeps_outsiders_out_and_answers_like_local() {
    let Some(mut net) = internet() else { return };
    local_answer_soon(PROMPT, false, TOKENS);
    let dir = temp_dir("private-hosts");
    let key = mesh_init(&dir);
    let other_dir = temp_dir("private-hosts-other");
    let other_key = mesh_init(&other_dir);

    // Members on the allowlist; outsiders' identities are made elsewhere.
    let allow = dir.join("allow-peers.txt");
    let id = |name: &str| dir.join(format!("{name}.key"));
    let boot_id = add_peer(&allow, &id("boot"));
    let server_ids: Vec<String> = ["s0", "s1", "s2"]
        .iter()
        .map(|s| add_peer(&allow, &id(s)))
        .collect();
    add_peer(&allow, &id("client"));
    let elsewhere = dir.join("elsewhere.txt");
    let outsider_ids: Vec<String> = ["nokey", "otherkey", "stranger"]
        .iter()
        .map(|s| add_peer(&elsewhere, &id(s)))
        .collect();

    let boot_host = net.public_host("boot").unwrap();
    let hosts: Vec<Host> = ["s0", "s1"]
        .iter()
        .map(|n| net.public_host(n).unwrap())
        .collect();
    let mut nat = net.nat("nat", "192.0.2", NatKind::Symmetric).unwrap();
    let behind = net.private_host(&mut nat, "s2").unwrap();
    let client = net.public_host("cli").unwrap();
    let nokey = net.public_host("nokey").unwrap();
    let otherkey = net.public_host("other").unwrap();
    let stranger = net.public_host("strange").unwrap();

    let s = |p: &Path| p.display().to_string();
    let private = |identity: &str| -> Vec<String> {
        vec![
            "--no-mdns".into(),
            "--identity".into(),
            s(&id(identity)),
            "--swarm-key".into(),
            s(&key),
            "--allow-peers".into(),
            s(&allow),
        ]
    };
    let log = |name: &str| dir.join(format!("{name}.log"));
    let mut args: Vec<String> = vec!["bootstrap".into(), "--listen".into(), boot_host.tcp()];
    args.extend(private("boot"));
    let boot = member(&boot_host, "private bootstrap", &args, &log("boot"));
    let addr = boot.line_with("/ip4/", Duration::from_secs(30)).unwrap();
    assert!(addr.starts_with("/ip4/198.51.100."), "{addr}");
    assert!(addr.ends_with(&boot_id), "{addr}");

    // Server 0:10 (public, the relay), 10:20 (public), 20:30 (behind the symmetric NAT).
    let spans = pollen_node::mesh::THREE_SPANS;
    let server_hosts = [&hosts[0], &hosts[1], &behind];
    let servers: Vec<Proc> = (0..3)
        .map(|i| {
            let name = format!("s{i}");
            let mut args: Vec<String> = ["serve", "--threads", "1", "--blocks", spans[i]]
                .map(String::from)
                .into();
            args.extend([
                "--listen".into(),
                server_hosts[i].tcp(),
                "--bootstrap".into(),
                addr.clone(),
                "--model".into(),
                s(&model()),
                "--announce-ttl".into(),
                "6".into(),
            ]);
            if i == 0 {
                args.push("--relay".into());
            }
            args.extend(private(&name));
            member(
                server_hosts[i],
                &format!("server {}", spans[i]),
                &args,
                &log(&name),
            )
        })
        .collect();
    for (p, want) in servers.iter().zip(&server_ids) {
        let ready = p
            .line_with("ready", pollen_node::mesh::READY_TIMEOUT)
            .unwrap();
        assert_eq!(peer_of(&ready), want);
    }
    let s0_addr = servers[0]
        .line_with("listening /ip4/198.51.100.", Duration::from_secs(5))
        .unwrap()
        .replacen("listening ", "", 1);

    // (a) Inside: every block covered, the server behind the NAT on a relayed address,
    // and the answer from a client on its own host is the local one.
    let mut st = serde_json::Value::Null;
    let took = wait_for(Duration::from_secs(60), || {
        let out = status_on(&client, &addr, Some(&key), &id("client"));
        assert!(out.status.success(), "member status: {}", stderr(&out));
        st = serde_json::from_slice(&out.stdout).unwrap();
        coverage(&st) == Some((vec![], 3))
            && server_of(&st, &server_ids[2])
                .is_some_and(|s| s["addrs"].to_string().contains("/p2p-circuit"))
    });
    assert!(
        took.is_some(),
        "full coverage with a relayed address behind the NAT: {st}"
    );
    eprintln!("mesh ready {took:?} after the servers");
    let local = local_answer(PROMPT, false, TOKENS);
    let local = text(&local);
    let out = generate_on(&client, &addr, Some(&key), &id("client"), 60);
    assert!(out.status.success(), "member generate: {}", stderr(&out));
    assert_eq!(
        text(&String::from_utf8_lossy(&out.stdout)),
        local,
        "(a) the private mesh's answer"
    );
    let st: serde_json::Value =
        serde_json::from_slice(&status_on(&client, &addr, Some(&key), &id("client")).stdout)
            .unwrap();
    let reach = server_of(&st, &server_ids[2]).map(|s| s["reach"].clone());
    assert_eq!(
        reach,
        Some(serde_json::json!("relayed")),
        "the server behind the symmetric NAT is reached over the member's relay: {st}"
    );

    // (b) Outsiders without the key and with another key, at the bootstrap and at a
    // server: status and generate fail, and say why.
    let no_key: Option<&Path> = None;
    let outsiders = [
        ("without a key", &nokey, no_key, id("nokey")),
        (
            "with another key",
            &otherkey,
            Some(other_key.as_path()),
            id("otherkey"),
        ),
    ];
    let boot_addr = addr.as_str();
    let results: Vec<(String, Output)> = std::thread::scope(|sc| {
        let mut jobs = Vec::new();
        for (what, host, k, ident) in &outsiders {
            for entry in [&addr, &s0_addr] {
                jobs.push((
                    format!("status {what} through {entry}"),
                    sc.spawn(move || status_on(host, entry, *k, ident)),
                ));
            }
            jobs.push((
                format!("generate {what}"),
                sc.spawn(move || generate_on(host, boot_addr, *k, ident, 5)),
            ));
        }
        jobs.into_iter()
            .map(|(n, j)| (n, j.join().unwrap()))
            .collect()
    });
    for (what, out) in &results {
        assert_kept_out(what, out);
    }

    // (c) A peer with the key but not on the allowlist sees nothing and generates nothing.
    for entry in [&addr, &s0_addr] {
        let out = status_on(&stranger, entry, Some(&key), &id("stranger"));
        assert_sees_nothing(&format!("the stranger (through {entry})"), &out);
    }
    let out = generate_on(&stranger, &addr, Some(&key), &id("stranger"), 5);
    assert_generates_nothing("the stranger", &out);

    // The members' logs: no connection from an outsider was ever established; the
    // members' own were (so the log does record them); the stranger was refused.
    let logs: Vec<(String, String)> = ["boot", "s0", "s1", "s2"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read_to_string(log(n)).unwrap()))
        .collect();
    let established = |text: &str, peer: &str| {
        text.lines()
            .filter(|l| l.contains("Connection established") && l.contains(peer))
            .count()
    };
    for (name, text) in &logs {
        for (outsider, peer) in ["no key", "another key", "not allowed"]
            .iter()
            .zip(&outsider_ids)
        {
            assert_eq!(
                established(text, peer),
                0,
                "{name} accepted a connection from the outsider with {outsider} ({peer})"
            );
        }
    }
    let boot_log = &logs[0].1;
    for sid in &server_ids {
        assert!(
            established(boot_log, sid) > 0,
            "the bootstrap's log records its members' connections:\n{boot_log}"
        );
    }
    assert!(
        boot_log
            .lines()
            .any(|l| l.contains("Incoming connection failed")),
        "the outsiders' attempts reached the bootstrap and failed:\n{boot_log}"
    );
    // The stranger tried the bootstrap and server 0:10: each refused it, and said so once.
    for (name, text) in &logs[..2] {
        let refused = refusals_of(text, &outsider_ids[2]);
        assert_eq!(refused, 1, "{name} refuses the stranger and logs it once");
    }
}
