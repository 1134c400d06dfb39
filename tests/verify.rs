//! Hostile servers on a real swarm of processes, seen from the client:
//! - a server that starts perturbing its outputs after a few steps (`--fault`, a flag
//!   only test builds have) is caught by spot checks: the client bans it, names it, and
//!   still prints the text of a local run;
//! - a server that sends NaN is a failure of that server, healed around, never an empty
//!   answer with exit status 0;
//! - a server that falsely accuses the hop before of sending NaN does not get it shut
//!   out: the two are only kept apart;
//! - a forged announcement (a fresh key claiming all 30 blocks at 1e9 tokens/s, with an
//!   address that never answers), published to the real bootstrap with the project's own
//!   crates, does not keep the client from the real 3-server chain.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "common/hostile.rs"]
mod attacker;
mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Each test runs a mesh of processes: one test at a time, or 2 cores thrash.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const PROMPT: &str = "What is the capital of France? Answer briefly.";
const TOKENS: usize = 20;

fn client(addr: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(pollen());
    cmd.args([
        "generate",
        "--no-mdns",
        "--threads",
        "1",
        "--bootstrap",
        addr,
    ])
    .args([
        "--chat",
        "--max-tokens",
        &TOKENS.to_string(),
        "--prompt",
        PROMPT,
    ])
    .arg("--model")
    .arg(model())
    .args(extra)
    .env("POLLEN_LOG", "warn,pollen_node::client=info");
    cmd
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A server that perturbs its outputs from its fourth step on sits among three servers
/// of blocks 10:20. With every step spot-checked, it is caught the first time it lies,
/// whether it serves the client's route (a third server sides with the second, and the
/// route heals around it) or is asked to check another (the third sides with the
/// route): either way it is banned by name, and the text equals a local run.
#[test]
fn a_server_that_perturbs_its_outputs_is_caught_and_banned() {
    let _one = serial();
    let want = local_answer(PROMPT, true, TOKENS);
    assert!(!want.trim().is_empty());
    let dir = temp_dir("verify-lie");
    let (_boot, addr) = bootstrap(&dir, false);
    let liar = server(
        Some(&addr),
        "10:20",
        &dir.join("liar.key"),
        &["--fault", "perturb:3"],
    );
    let _rest = [
        ("0:10", "a"),
        ("10:20", "b"),
        ("10:20", "c"),
        ("20:30", "d"),
    ]
    .map(|(blocks, k)| server(Some(&addr), blocks, &dir.join(format!("{k}.key")), &[]));
    let liar_peer = peer_of(&liar.1).to_string();

    let out = client(&addr, &["--verify", "1"]).output().unwrap();
    let (got, log) = text(&out);
    eprintln!("{log}");
    assert!(out.status.success(), "{log}");
    assert_eq!(got, want, "the text of a local run");
    assert!(
        log.contains(&format!("banned peer {liar_peer}")),
        "the client names the server it banned ({liar_peer}): {log}"
    );
    assert!(
        !log.lines()
            .filter(|l| l.contains("banned peer"))
            .any(|l| !l.contains(&liar_peer)),
        "only the liar is banned: {log}"
    );
}

/// Runs `cmd`, starting `then` once its stderr has a line containing `marker`; its
/// output.
fn run_then(mut cmd: Command, marker: &str, then: impl FnOnce()) -> (Output, bool) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::sync_channel(4096);
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.try_send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut seen = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) {
        if line.contains(marker) {
            seen = true;
            break;
        }
    }
    if seen {
        then();
    }
    let mut out = child.wait_with_output().unwrap();
    out.stderr = reader.join().unwrap().into_bytes();
    (out, seen)
}

/// Runs a client on the mesh at `addr` and, once it has chosen its route, starts a
/// second server of `blocks` (key in `dir`); the client's output, its text and its log.
fn with_a_spare(addr: &str, dir: &std::path::Path, blocks: &str) -> (Output, String, String) {
    with_a_spare_after(addr, dir, blocks, "route: ")
}

/// [`with_a_spare`], the spare started once the client logs `marker`.
fn with_a_spare_after(
    addr: &str,
    dir: &std::path::Path,
    blocks: &str,
    marker: &str,
) -> (Output, String, String) {
    let mut spare = None;
    let (out, routed) = run_then(client(addr, &["--verify", "0"]), marker, || {
        spare = Some(server(Some(addr), blocks, &dir.join("spare.key"), &[]));
    });
    let (got, log) = text(&out);
    eprintln!("{log}");
    assert!(routed, "the client did not log {marker:?}: {log}");
    (out, got, log)
}

/// The only server of blocks 10:20 answers NaN from its first step. The server after it
/// refuses the input and names it; the client bans it and heals onto a second server
/// of 10:20 that joins meanwhile: the text of a local run, never an empty answer.
#[test]
fn a_server_that_sends_nan_is_a_failure_never_an_empty_answer() {
    let _one = serial();
    let want = local_answer(PROMPT, true, TOKENS);
    let dir = temp_dir("verify-nan");
    let (_boot, addr) = bootstrap(&dir, false);
    let nan = server(
        Some(&addr),
        "10:20",
        &dir.join("nan.key"),
        &["--fault", "nan:0"],
    );
    let _ends = [("0:10", "a"), ("20:30", "d")]
        .map(|(blocks, k)| server(Some(&addr), blocks, &dir.join(format!("{k}.key")), &[]));
    let nan_peer = peer_of(&nan.1).to_string();
    // The spare joins once the client has chosen its route (through the NaN server).
    let (out, got, log) = with_a_spare(&addr, &dir, "10:20");
    assert!(
        !(out.status.success() && got.trim().is_empty()),
        "an empty answer with exit status 0: {log}"
    );
    assert!(out.status.success(), "{log}");
    assert_eq!(got, want);
    assert!(
        log.contains(&nan_peer) && log.contains("NaN or infinite"),
        "the NaN server ({nan_peer}) is named: {log}"
    );
}

/// A server of blocks 10:20 claims that the only server of 0:10 sent it NaN (the client
/// cannot check which of the two lies). Both are left out for a while, neither as a
/// liar, and the two are never chained again: the client heals onto the accused server
/// and a second server of 10:20 that joins meanwhile, and prints the text of a local
/// run. (Were the accused banned as a liar, no route would cover blocks 0:10.)
#[test]
fn a_false_accusation_does_not_shut_out_the_accused() {
    let _one = serial();
    let want = local_answer(PROMPT, true, TOKENS);
    let dir = temp_dir("verify-accuse");
    let (_boot, addr) = bootstrap(&dir, false);
    let accused = server(Some(&addr), "0:10", &dir.join("a.key"), &[]);
    let accuser = server(
        Some(&addr),
        "10:20",
        &dir.join("x.key"),
        &["--fault", "accuse:0"],
    );
    let _end = server(Some(&addr), "20:30", &dir.join("c.key"), &[]);
    let (accused, accuser) = (peer_of(&accused.1), peer_of(&accuser.1));
    let (out, got, log) = with_a_spare(&addr, &dir, "10:20");
    assert!(
        log.contains(&format!(
            "dispute: {accuser} says {accused} sent it a step it refuses"
        )) && log.contains("non-finite hidden states"),
        "the dispute is named: {log}"
    );
    assert!(out.status.success(), "{log}");
    assert_eq!(got, want);
}

/// A bootstrap and servers of 0:10, 10:20 and 20:30, the one of `blocks` (hop `hop` of
/// the route) lying with `--fault FAULT`; a client that starts a second server of
/// `blocks` once it logs `marker`. The client must blame the liar with a failure that
/// says `blamed_for`, never the last server, and heal onto the second server: the text
/// of a local run.
fn a_lying_server_is_blamed(blocks: &str, hop: usize, fault: &str, marker: &str, blamed_for: &str) {
    let _one = serial();
    let want = local_answer(PROMPT, true, TOKENS);
    let dir = temp_dir(&format!("verify-{}-{hop}", fault.replace(':', "-")));
    let (_boot, addr) = bootstrap(&dir, false);
    let liar = server(Some(&addr), blocks, &dir.join("l.key"), &["--fault", fault]);
    let _rest = ["0:10", "10:20", "20:30"]
        .into_iter()
        .filter(|b| *b != blocks)
        .enumerate()
        .map(|(i, b)| server(Some(&addr), b, &dir.join(format!("{i}.key")), &[]))
        .collect::<Vec<_>>();
    let liar = peer_of(&liar.1);
    let (out, got, log) = with_a_spare_after(&addr, &dir, blocks, marker);
    assert!(
        log.contains(&format!(
            "hop {hop} (blocks {blocks}, peer {liar}) failed: bad_request: {blamed_for}"
        )),
        "the liar ({liar}) is blamed: {log}"
    );
    assert!(
        !log.contains("hop 2 (blocks 20:30"),
        "the last server is not blamed: {log}"
    );
    assert!(out.status.success(), "{log}");
    assert_eq!(got, want);
}

/// The server of `blocks` sends up, at its third step, a report in the name of the last
/// server that the last server failed (signed with its own key: a hop cannot sign in
/// another's name). The report does not check out: the client (or, when the forger is
/// not the first, the hop before it, which sends up its own report instead) blames the
/// forger, never the last server.
fn a_report_in_another_servers_name_blames(blocks: &str, hop: usize) {
    let why = "sent up a failure report that does not check out";
    a_lying_server_is_blamed(blocks, hop, "forge:2", "route: ", why);
}

#[test]
fn a_report_in_another_servers_name_blames_the_first_server_that_sent_it() {
    a_report_in_another_servers_name_blames("0:10", 0);
}

#[test]
fn a_report_in_another_servers_name_blames_the_middle_server_that_sent_it() {
    a_report_in_another_servers_name_blames("10:20", 1);
}

/// The server of `blocks` answers every `Open` saying the session has room for no
/// tokens, which would end every generation through it as a request too long,
/// unattributed. Every server holds what a session asks for or refuses naming itself,
/// so the client (or the hop before it) blames it.
fn a_server_claiming_no_room_is_blamed(blocks: &str, hop: usize) {
    let why = "answered Open with room for 0 tokens";
    a_lying_server_is_blamed(blocks, hop, "noroom:0", "trying another route", why);
}

#[test]
fn a_first_server_claiming_no_room_is_blamed() {
    a_server_claiming_no_room_is_blamed("0:10", 0);
}

#[test]
fn a_middle_server_claiming_no_room_is_blamed() {
    a_server_claiming_no_room_is_blamed("10:20", 1);
}

/// An attacker's announcement: a fresh key claims all 30 blocks at 1e9 tokens/s, with
/// an address where a socket accepts connections and never speaks. Published to the
/// real bootstrap over a real libp2p node (this crate's own), kept alive while held.
struct Hijack {
    _net: pollen_node::net::NetHandle,
    _rt: tokio::runtime::Runtime,
    _silent: std::net::TcpListener,
    cancel: tokio_util::sync::CancellationToken,
    peer: String,
}

impl Drop for Hijack {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn hijack(bootstrap: &str) -> Hijack {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (silent, dead) = attacker::silent_listener();
    let cancel = tokio_util::sync::CancellationToken::new();
    let boot: libp2p::Multiaddr = bootstrap.parse().unwrap();
    let c = cancel.clone();
    let (net, me) = rt.block_on(async move {
        // A real server's announcement is the template: same model, same compute mode.
        let (net, me, model) = attacker::forge_claim(&boot, dead, c).await;
        // The bootstrap holds it and hands it to everyone who asks.
        let mut held = false;
        for _ in 0..40 {
            let book = net.gather(Some(model)).await.unwrap_or_default();
            if book
                .iter()
                .any(|v| v.announcement().peer.0 == me.to_bytes())
            {
                held = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(held, "the bootstrap took the forged announcement");
        // The node keeps running (announcing) on the runtime's worker while held.
        (net, me)
    });
    Hijack {
        _net: net,
        _rt: rt,
        _silent: silent,
        cancel,
        peer: me.to_string(),
    }
}

/// A forged claim of every block at 1e9 tokens/s does not keep the client from a
/// working 3-server chain.
#[test]
fn a_forged_announcement_does_not_hijack_the_route() {
    let _one = serial();
    let want = local_answer(PROMPT, true, TOKENS);
    let dir = temp_dir("verify-hijack");
    let (_boot, addr) = bootstrap(&dir, false);
    let _servers = three_servers(Some(&addr), &dir, "h", [&[], &[], &[]]);
    let attack = hijack(&addr);
    let status = status(Some(&addr));
    assert!(
        status.to_string().contains(&attack.peer),
        "the swarm lists the forged server: {status}"
    );
    let out = client(&addr, &[]).output().unwrap();
    let (got, log) = text(&out);
    eprintln!("{log}");
    assert!(out.status.success(), "{log}");
    assert_eq!(
        got, want,
        "the text of a local run, despite the forged server"
    );
}
