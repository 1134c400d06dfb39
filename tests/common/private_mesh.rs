//! Private-mesh helpers shared by `tests/private.rs` (processes on 127.0.0.1) and
//! `tests/private_hosts.rs` (hosts in network namespaces), which include this file with
//! `#[path]` next to `mod common`: making swarm keys and allowlists with `pollen mesh`, and the checks that an
//! outsider got nothing.
#![allow(dead_code, missing_docs, unreachable_pub, clippy::unwrap_used)]

use crate::common::pollen;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A process's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A process's stdout as text.
fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `pollen mesh init --out dir`: the key file (absolute) and the printed lines.
pub fn mesh_init(dir: &Path) -> (PathBuf, String) {
    let out = Command::new(pollen())
        .args(["mesh", "init", "--out"])
        .arg(dir)
        .env_remove("POLLEN_SWARM_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    (std::path::absolute(dir.join("swarm.key")).unwrap(), text)
}

/// `pollen mesh add-peer`: makes (if absent) the identity `identity` and appends its
/// peer id to `allow`; the id.
pub fn add_peer(allow: &Path, identity: &Path) -> String {
    let out = Command::new(pollen())
        .args(["mesh", "add-peer", "--allow-peers"])
        .arg(allow)
        .arg("--identity")
        .arg(identity)
        .env_remove("POLLEN_SWARM_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// An outsider without the swarm key (or with another one) ran `pollen status` or
/// `pollen generate` (`what`): it failed, said why, and printed nothing.
pub fn assert_kept_out(what: &str, out: &Output) {
    let err = stderr(out);
    assert!(!out.status.success(), "{what} succeeded: {}", stdout(out));
    assert!(
        err.contains("cannot reach any bootstrap peer"),
        "{what}: {err}"
    );
    assert!(err.contains("swarm key"), "{what} should say why: {err}");
    assert!(out.stdout.is_empty(), "{what} printed {:?}", stdout(out));
}

/// `pollen status --json` run by a peer with the key but off the allowlist (`who`)
/// failed or listed no model.
pub fn assert_sees_nothing(who: &str, out: &Output) {
    let models = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["models"].as_array().map(Vec::len))
        .unwrap_or(0);
    assert!(
        !out.status.success() || models == 0,
        "{who} saw the mesh: {}",
        stdout(out)
    );
    // And is told why it may see nothing.
    assert!(stderr(out).contains("allowlist"), "{who}: {}", stderr(out));
}

/// `pollen generate` run by a peer off the allowlist (`who`) failed.
pub fn assert_generates_nothing(who: &str, out: &Output) {
    assert!(!out.status.success(), "{who} generated: {}", stdout(out));
    assert!(stderr(out).contains("allowlist"), "{who}: {}", stderr(out));
}

/// How many lines of a member's log say it refused `peer` for not being on the
/// allowlist.
pub fn refusals_of(log: &str, peer: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("not on the allowlist") && l.contains(peer))
        .count()
}
