//! A real swarm on 127.0.0.1: a bootstrap node and three servers as separate
//! processes. Coverage appears, a killed server's span goes uncovered, and a
//! restarted server keeps its peer id; servers without a bootstrap find each
//! other by mDNS; an unreachable bootstrap, an address naming another peer and a bad
//! start are clear errors.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn bootstrap_and_three_servers_cover_expire_and_return() {
    let dir = temp_dir("swarm");
    let (boot, addr) = bootstrap(&dir, true);
    let http = boot
        .line_with("http ", Duration::from_secs(10))
        .unwrap()
        .replacen("http ", "", 1);
    let ttl = ["--announce-ttl", "6"];
    let (mut s0, _) = server(Some(&addr), "0:10", &dir.join("s0.key"), &ttl);
    let (mut s1, ready1) = server(Some(&addr), "10:20", &dir.join("s1.key"), &ttl);
    let (_s2, _) = server(Some(&addr), "20:30", &dir.join("s2.key"), &ttl);

    let took = wait_for(Duration::from_secs(10), || {
        coverage(&status(Some(&addr))).is_some_and(|(gaps, n)| gaps.is_empty() && n == 3)
    });
    let took = took.expect("full coverage within 10 s of the last server being ready");
    eprintln!("full coverage seen {took:?} after the last server was ready");
    // Servers on 127.0.0.1 announce loopback addresses only: reached as `local`.
    let st = status(Some(&addr));
    let servers = st["models"][0]["servers"].as_array().unwrap();
    assert!(servers.iter().all(|s| s["reach"] == "local"), "{st}");
    // `--model` takes the model's file as well as its id, and shows that model only.
    let by_file = std::process::Command::new(pollen())
        .args(["status", "--json", "--no-reach", "--no-mdns", "--wait", "0"])
        .args(["--bootstrap", &addr, "--model"])
        .arg(model())
        .output()
        .unwrap();
    assert!(by_file.status.success(), "{by_file:?}");
    let by_file: serde_json::Value = serde_json::from_slice(&by_file.stdout).unwrap();
    assert_eq!(coverage(&by_file), Some((vec![], 3)), "{by_file}");
    let id = by_file["models"][0]["id"].as_str().unwrap().to_string();
    let by_id = std::process::Command::new(pollen())
        .args(["status", "--json", "--no-reach", "--no-mdns", "--wait", "0"])
        .args(["--bootstrap", &addr, "--model", &id])
        .output()
        .unwrap();
    let by_id: serde_json::Value = serde_json::from_slice(&by_id.stdout).unwrap();
    assert_eq!(by_id["models"][0]["id"], by_file["models"][0]["id"]);

    // The bootstrap's own view over HTTP: /health as JSON, and the HTML page.
    let health: serde_json::Value = serde_json::from_str(&http_get(&http, "/health")).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(coverage(&health), Some((vec![], 3)));
    let page = http_get(&http, "/");
    assert!(
        page.contains("Pollen swarm") && page.contains(peer_of(&ready1)),
        "{page}"
    );
    assert!(!page.contains("Uncovered"));

    s1.kill9();
    let took = wait_for(Duration::from_secs(20), || {
        coverage(&status(Some(&addr))).is_some_and(|(gaps, _)| gaps == vec![(10, 20)])
    });
    let took =
        took.expect("the killed server's span shows as uncovered within its announcement's expiry");
    eprintln!("blocks 10:20 uncovered {took:?} after kill -9 (announcement TTL 6 s)");
    assert!(http_get(&http, "/").contains("Uncovered blocks: 10:20"));
    // The same page in a real browser: the gap is drawn in red, the live servers listed.
    match browser_dom(&http) {
        Some(dom) => {
            assert!(dom.contains("<h1>Pollen swarm</h1>"), "{dom}");
            assert!(dom.contains("Uncovered blocks: 10:20"), "{dom}");
            assert_eq!(
                dom.matches("class=\"gap\"").count(),
                10,
                "ten red cells for blocks 10..20"
            );
            assert!(
                !dom.contains(peer_of(&ready1)),
                "the dead server is not listed"
            );
        }
        None => eprintln!("no Chromium here: the status page was checked over HTTP only"),
    }

    let (_s1b, ready1b) = server(Some(&addr), "10:20", &dir.join("s1.key"), &ttl);
    assert_eq!(
        peer_of(&ready1),
        peer_of(&ready1b),
        "same key file, same peer id"
    );
    let took = wait_for(Duration::from_secs(10), || {
        coverage(&status(Some(&addr))).is_some_and(|(gaps, n)| gaps.is_empty() && n == 3)
    });
    assert!(took.is_some(), "covered again after the restart");

    // SIGTERM: the server withdraws its announcement and exits 0.
    let status_code = s0.terminate(Duration::from_secs(15));
    assert!(
        status_code.is_some_and(|s| s.success()),
        "a drained server exits 0: {status_code:?}"
    );
    let took = wait_for(Duration::from_secs(5), || {
        coverage(&status(Some(&addr))).is_some_and(|(gaps, _)| gaps == vec![(0, 10)])
    });
    assert!(
        took.is_some(),
        "a stopped server's span is gone within seconds, not a TTL"
    );
}

/// mDNS multicasts on every non-loopback interface, so the tests that use it run in a
/// private network namespace (`unshare -n`) whose only link is a veth pair: no packet
/// leaves the machine. Whether the caller is inside it (and runs its body); outside,
/// this runs test `name` in a fresh one and checks that it passed, or, without root or
/// `unshare`, says it is skipped.
fn inside_private_netns(name: &str) -> bool {
    if std::env::var_os("POLLEN_IN_NETNS").is_some() {
        return true;
    }
    let _ = model(); // fetch outside the namespace, which has no network
    let setup = "ip link set lo up && ip link add v0 type veth peer name v1 \
        && ip addr add 10.200.0.1/24 dev v0 && ip link set v0 up && ip link set v1 up \
        && ip route add 224.0.0.0/4 dev v0";
    let probe = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", setup])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot make a private network namespace (needs root, unshare and ip)");
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "{setup} && exec {} --exact {name} --nocapture",
        exe.display()
    );
    let status = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .env("POLLEN_IN_NETNS", "1")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{name} failed inside its network namespace"
    );
    false
}

#[test]
fn three_servers_without_bootstrap_find_each_other_by_mdns() {
    if !inside_private_netns("three_servers_without_bootstrap_find_each_other_by_mdns") {
        return;
    }
    let dir = temp_dir("mdns");
    let any = ["--listen", "/ip4/0.0.0.0/tcp/0"];
    let _servers = three_servers(None, &dir, "m", [&any, &any, &any]);
    let took = wait_for(Duration::from_secs(30), || {
        coverage(&status(None)).is_some_and(|(gaps, n)| gaps.is_empty() && n >= 3)
    });
    assert!(took.is_some(), "mDNS discovery shows all three spans");
    eprintln!("mDNS: full coverage seen after {took:?}");
}

/// A bootstrap and servers on one network, mDNS on as by default: the bootstrap finds
/// the servers by mDNS and connects to them before they dial it, and it still holds
/// their announcements at once (a server published only to peers it dialed or found
/// itself, and skipped a bootstrap already connected: the bootstrap's list stayed
/// empty, and a client through it found no server).
#[test]
fn a_bootstrap_that_finds_servers_by_mdns_holds_their_announcements() {
    if !inside_private_netns("a_bootstrap_that_finds_servers_by_mdns_holds_their_announcements") {
        return;
    }
    let dir = temp_dir("mdns-bootstrap");
    let mut cmd = std::process::Command::new(pollen());
    cmd.args([
        "bootstrap",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--identity",
    ])
    .arg(dir.join("bootstrap.key"));
    let boot = pollen_node::mesh::Proc::spawn("bootstrap", &mut cmd).unwrap();
    let addr = boot.line_with("/ip4/", Duration::from_secs(30)).unwrap();
    let servers: Vec<_> = ["0:15", "15:30"]
        .iter()
        .map(|blocks| {
            let mut cmd = std::process::Command::new(pollen());
            cmd.args(["serve", "--threads", "1", "--blocks", blocks])
                .args(["--listen", "/ip4/0.0.0.0/tcp/0", "--bootstrap", &addr])
                .arg("--model")
                .arg(model())
                .arg("--identity")
                .arg(dir.join(format!("{}.key", blocks.replace(':', "-"))));
            pollen_node::mesh::Proc::spawn(&format!("server {blocks}"), &mut cmd).unwrap()
        })
        .collect();
    for s in &servers {
        s.line_with("ready", pollen_node::mesh::READY_TIMEOUT)
            .unwrap();
    }
    // Through the bootstrap alone (no mDNS on this client): both spans, soon.
    let took = wait_for(Duration::from_secs(5), || {
        coverage(&status(Some(&addr))).is_some_and(|(gaps, n)| gaps.is_empty() && n == 2)
    });
    assert!(
        took.is_some(),
        "the bootstrap lists both servers: {}",
        status(Some(&addr))
    );
    eprintln!("both servers listed by the bootstrap {took:?} after ready");
}

#[test]
fn unreachable_bootstrap_is_a_clear_error() {
    let addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDXv1U1YU278upnNXMeoWMmzCsN275mvUurr2DZaoHH75";
    let started = std::time::Instant::now();
    let out = std::process::Command::new(pollen())
        .args(["status", "--no-mdns", "--bootstrap", addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(addr), "the error names the address: {err}");
    assert!(err.contains("gave up"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// A bootstrap address whose /p2p/ part names another peer fails at once and says who
/// answered (it used to retry for 15 s, then hint at a private mesh's swarm key), and a
/// log on a pipe carries no terminal colour codes.
#[test]
fn a_bootstrap_address_naming_another_peer_fails_at_once() {
    let dir = temp_dir("wrong-peer");
    let (_boot, addr) = bootstrap(&dir, false);
    let (at, real) = addr.split_once("/p2p/").unwrap();
    let other = "12D3KooWDXv1U1YU278upnNXMeoWMmzCsN275mvUurr2DZaoHH75";
    assert_ne!(real, other);
    let wrong = format!("{at}/p2p/{other}");
    let started = Instant::now();
    let out = std::process::Command::new(pollen())
        .args(["status", "--no-mdns", "--bootstrap", &wrong])
        .env("POLLEN_LOG", "info")
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{wrong} answered as peer {real}")),
        "the error names the peer that answered: {err}"
    );
    assert!(!err.contains("swarm-key"), "no private-mesh hint: {err}");
    assert!(!err.contains("retrying"), "no retries: {err}");
    assert!(!err.contains('\x1b'), "colour codes on a pipe: {err}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A failed start names each cause once, and a bad span says which spans are valid.
#[test]
fn start_errors_name_each_cause_once() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(pollen())
            .args(["serve", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let model = model();
    let model = model.to_str().unwrap();
    let err = run(&["--model", model, "--blocks", "10:5"]);
    assert_eq!(
        err.matches("block span 10:5 is invalid").count(),
        1,
        "{err}"
    );
    assert!(err.contains("0 ≤ START < END ≤ 30"), "{err}");
    let missing = temp_dir("missing-model").join("absent.gguf");
    let err = run(&["--model", missing.to_str().unwrap(), "--blocks", "0:5"]);
    assert_eq!(err.matches("absent.gguf").count(), 1, "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

/// SIGTERM stops a node whose stderr is gone (a closed pipe, as under `pollen … 2>&1 |
/// head`): the notice of the stop cannot be written, and the stop goes on (writing it
/// with `eprintln!` panicked the signal task, and the node then ignored every SIGTERM).
#[test]
fn sigterm_stops_a_node_whose_stderr_is_closed() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = temp_dir("closed-stderr");
    let mut child = std::process::Command::new(pollen())
        .args(["bootstrap", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .arg("--identity")
        .arg(dir.join("bootstrap.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::sync_channel(64);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Up: its address is out.
    let up = Instant::now();
    while !lines
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .contains("/ip4/")
    {
        assert!(up.elapsed() < Duration::from_secs(30), "no address");
    }
    drop(child.stderr.take());
    let sent = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success());
    let (status, _) = ends_within(child, Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "a SIGTERM with stderr closed: {status:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second node on a TCP port another one listens on is refused at start (libp2p's
/// listeners share ports that allow it, so it used to start and answer in turns with the
/// first: clients then met the wrong peer id one time in two).
#[test]
fn a_second_node_on_a_taken_port_is_refused() {
    let dir = temp_dir("taken-port");
    let (_first, addr) = bootstrap(&dir, false);
    let listen = addr.split("/p2p/").next().unwrap().to_string();
    let second = std::process::Command::new(pollen())
        .args(["bootstrap", "--no-mdns", "--listen", &listen, "--identity"])
        .arg(dir.join("second.key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (exited, err) = ends_within(second, Duration::from_secs(10));
    assert!(
        exited.is_some_and(|s| !s.success()),
        "a second node on {listen}: {exited:?} {err}"
    );
    assert!(
        err.contains(&format!("cannot listen on {listen}")) && err.contains("in use"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second node with the key file of one that runs is refused at start: with one peer
/// id the swarm would see one of them (two servers on the default
/// `$POLLEN_CACHE_DIR/identity.key` used to start, and one's blocks went missing).
#[test]
fn a_second_node_with_a_running_nodes_key_is_refused() {
    let dir = temp_dir("held-key");
    let (mut first, _) = bootstrap(&dir, false);
    let second = || {
        std::process::Command::new(pollen())
            .args(["bootstrap", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .arg("--identity")
            .arg(dir.join("bootstrap.key"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (exited, err) = ends_within(second(), Duration::from_secs(10));
    assert!(
        exited.is_some_and(|s| !s.success()),
        "a second node with the key: {exited:?} {err}"
    );
    assert!(
        err.contains("bootstrap.key is the identity of another Pollen node"),
        "{err}"
    );
    // Once the first has stopped, the key is free again.
    assert!(first.terminate(Duration::from_secs(15)).is_some());
    let mut again = second();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        again.try_wait().unwrap().is_none(),
        "the key was not let go"
    );
    let _ = again.kill();
    let _ = again.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// How `child` ended within `limit` (`None`: it was still running, and is killed) and
/// what it wrote to its stderr (piped).
fn ends_within(
    mut child: std::process::Child,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}
