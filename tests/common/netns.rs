//! An emulated internet for multi-host tests, built from Linux network namespaces.
//!
//! A [`Net`] is one test's internet: a hub namespace holding the bridge of the public
//! segment 198.51.100.0/24, public hosts on it, and NAT routers (nftables masquerade)
//! with private segments behind them (192.0.2.0/24, 203.0.113.0/24). Each host is a
//! namespace of its own; [`Host::command`] runs a program inside it. Only documentation
//! ranges are used, nothing is connected to the machine's own namespace, and no host has
//! a route off the emulated segments, so no packet leaves the machine.
//!
//! Names are unique per process and per `Net`, so tests run in parallel; everything is
//! deleted when the `Net` is dropped (also while a panic unwinds). Start processes after
//! the `Net` so they are dropped (killed) before it. Namespaces left by a killed test
//! process are removed by the next `Net::new`.
//!
//! Delay uses the kernel's `sch_netem` qdisc where it has one, and otherwise holds each
//! host's outgoing packets in an NFQUEUE in userspace (`nfqueue_delay.rs`; needs
//! iptables and a kernel with NFQUEUE: [`Net::can_delay`]). Loss is made with nftables
//! (`numgen random`), which every kernel with nftables has.
#![allow(dead_code, missing_docs, unreachable_pub, clippy::unwrap_used)]

#[path = "nfqueue_delay.rs"]
mod nfqueue_delay;

use nfqueue_delay::Delayer;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);
const PREFIX: &str = "pln";

/// How a NAT router treats traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Masquerade keeping source ports where it can (endpoint-independent mapping,
    /// endpoint-dependent filtering, like most home routers): hole punching works.
    Cone,
    /// Masquerade with a random source port for every new flow, so the port a peer
    /// learned through the relay is never the one a new flow uses: unsolicited TCP and
    /// UDP from new endpoints is dropped and hole punching cannot succeed.
    Symmetric,
}

/// A host: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: String,
    /// The host's interface (for netem).
    dev: String,
}

impl Host {
    /// `program` run inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        // Dial-backs and dials to private addresses fail by design here: keep their
        // warnings out of the test's output.
        if std::env::var_os("RUST_LOG").is_none() {
            c.env(
                "RUST_LOG",
                "warn,quinn_udp=error,libp2p_autonat=error,libp2p_kad=error",
            );
        }
        c
    }

    /// A TCP listen address on this host's address.
    pub fn tcp(&self) -> String {
        format!("/ip4/{}/tcp/0", self.ip)
    }

    /// A QUIC listen address on this host's address.
    pub fn quic(&self) -> String {
        format!("/ip4/{}/udp/0/quic-v1", self.ip)
    }
}

/// A NAT router and the private segment behind it.
#[derive(Debug, Clone)]
pub struct Nat {
    pub router: Host,
    /// First three octets of the private segment, e.g. `192.0.2`.
    pub subnet: String,
    hosts: usize,
}

/// One test's emulated internet; torn down on drop.
#[derive(Debug)]
pub struct Net {
    id: String,
    namespaces: Vec<String>,
    hub: String,
    public_hosts: usize,
    hosts: Vec<Host>,
    /// Where the kernel has no netem: the userspace delay of each host, by namespace.
    delayers: Mutex<Vec<Delayer>>,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

fn nft(ns: &str, script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("nft: no stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| format!("nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes namespaces left by test processes that no longer run.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

impl Net {
    /// A new, empty internet, or why one cannot be made here (not root, no
    /// CAP_NET_ADMIN, no `ip` or `nft`): callers skip with that message.
    pub fn new() -> Result<Net, String> {
        remove_stale();
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{id}hub");
        run(&["ip", "netns", "add", &hub]).map_err(|e| {
            format!("cannot make a network namespace (needs root or CAP_NET_ADMIN): {e}")
        })?;
        let net = Net {
            id,
            namespaces: vec![hub.clone()],
            hub: hub.clone(),
            public_hosts: 0,
            hosts: Vec::new(),
            delayers: Mutex::new(Vec::new()),
        };
        run(&["nft", "--version"])
            .map_err(|e| format!("nftables is not installed (apt-get install nftables): {e}"))?;
        in_ns(&hub, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&hub, &["ip", "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// Whether the kernel can delay packets with `tc netem`; why not otherwise.
    fn has_netem(&self) -> Result<(), String> {
        let probe = self.hosts.first().ok_or("no host to probe netem on")?;
        in_ns(
            &probe.ns,
            &[
                "tc", "qdisc", "add", "dev", &probe.dev, "root", "netem", "delay", "0ms",
            ],
        )
        .map_err(|e| format!("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): {e}"))?;
        in_ns(
            &probe.ns,
            &["tc", "qdisc", "del", "dev", &probe.dev, "root"],
        )
    }

    /// Whether packets can be delayed here (netem, or else the NFQUEUE delayer); why
    /// not otherwise.
    pub fn can_delay(&self) -> Result<(), String> {
        if !self.delayers.lock().unwrap().is_empty() {
            return Ok(());
        }
        let Err(no_netem) = self.has_netem() else {
            return Ok(());
        };
        let probe = self.hosts.first().ok_or("no host to probe delay on")?;
        Delayer::start(&probe.ns, &probe.dev, 0)
            .map(drop)
            .map_err(|e| format!("{no_netem}; and no NFQUEUE delay either: {e}"))
    }

    fn namespace(&mut self, name: &str) -> Result<String, String> {
        let ns = format!("{}{name}", self.id);
        run(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Joins `ns` to the public bridge through a veth pair; its public address.
    fn plug_public(&mut self, ns: &str, dev: &str) -> Result<String, String> {
        self.public_hosts += 1;
        let n = self.public_hosts + 1;
        let ip = format!("198.51.100.{n}");
        let hub_end = format!("p{n}");
        run(&[
            "ip", "-n", &self.hub, "link", "add", &hub_end, "type", "veth", "peer", "name", dev,
            "netns", ns,
        ])?;
        in_ns(&self.hub, &["ip", "link", "set", &hub_end, "master", "br0"])?;
        in_ns(&self.hub, &["ip", "link", "set", &hub_end, "up"])?;
        in_ns(ns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", dev])?;
        in_ns(ns, &["ip", "link", "set", dev, "up"])?;
        Ok(ip)
    }

    /// A host on the public segment.
    pub fn public_host(&mut self, name: &str) -> Result<Host, String> {
        let ns = self.namespace(name)?;
        let ip = self.plug_public(&ns, "eth0")?;
        let h = Host {
            ns,
            ip,
            dev: "eth0".into(),
        };
        self.hosts.push(h.clone());
        Ok(h)
    }

    /// A NAT router on the public segment with the private segment `subnet.0/24` (e.g.
    /// `192.0.2`) behind it.
    pub fn nat(&mut self, name: &str, subnet: &str, kind: NatKind) -> Result<Nat, String> {
        let ns = self.namespace(name)?;
        let ip = self.plug_public(&ns, "wan")?;
        in_ns(&ns, &["ip", "link", "add", "lan", "type", "bridge"])?;
        in_ns(
            &ns,
            &["ip", "addr", "add", &format!("{subnet}.1/24"), "dev", "lan"],
        )?;
        in_ns(&ns, &["ip", "link", "set", "lan", "up"])?;
        in_ns(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let masquerade = match kind {
            NatKind::Cone => "masquerade",
            NatKind::Symmetric => "masquerade fully-random",
        };
        // Inbound: only replies to flows the inside started; nothing unsolicited is
        // forwarded, and the router itself answers nothing on its public side.
        nft(
            &ns,
            &format!(
                "table ip pollen_nat {{\n\
                 chain nat_post {{ type nat hook postrouting priority 100; policy accept;\n\
                   oifname \"wan\" ip saddr {subnet}.0/24 {masquerade}\n }}\n\
                 chain filter_fwd {{ type filter hook forward priority 0; policy drop;\n\
                   ct state established,related accept\n\
                   iifname \"lan\" oifname \"wan\" accept\n }}\n\
                 chain filter_in {{ type filter hook input priority 0; policy accept;\n\
                   iifname \"wan\" ct state established,related accept\n\
                   iifname \"wan\" drop\n }}\n}}\n"
            ),
        )?;
        Ok(Nat {
            router: Host {
                ns,
                ip,
                dev: "wan".into(),
            },
            subnet: subnet.into(),
            hosts: 1,
        })
    }

    /// A host behind `nat`, with the router as its default gateway.
    pub fn private_host(&mut self, nat: &mut Nat, name: &str) -> Result<Host, String> {
        let ns = self.namespace(name)?;
        nat.hosts += 1;
        let ip = format!("{}.{}", nat.subnet, nat.hosts);
        let lan_end = format!("h{}", nat.hosts);
        run(&[
            "ip",
            "-n",
            &nat.router.ns,
            "link",
            "add",
            &lan_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        in_ns(
            &nat.router.ns,
            &["ip", "link", "set", &lan_end, "master", "lan"],
        )?;
        in_ns(&nat.router.ns, &["ip", "link", "set", &lan_end, "up"])?;
        in_ns(
            &ns,
            &["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("{}.1", nat.subnet),
            ],
        )?;
        let h = Host {
            ns,
            ip,
            dev: "eth0".into(),
        };
        self.hosts.push(h.clone());
        Ok(h)
    }

    /// Delays every packet each host sends by `ms` (so `ms` one way between any two
    /// hosts, a hop through a relay twice that), with netem or else the NFQUEUE delayer
    /// ([`Self::can_delay`]). Hosts made later are not delayed; 0 removes the delay.
    pub fn set_delay(&self, ms: u32) -> Result<(), String> {
        let mut delayers = self.delayers.lock().unwrap();
        if !delayers.is_empty() || self.has_netem().is_err() {
            if ms == 0 {
                delayers.clear();
                return Ok(());
            }
            for h in &self.hosts {
                match delayers.iter().find(|d| d.ns() == h.ns) {
                    Some(d) => d.set(ms),
                    None => delayers.push(Delayer::start(&h.ns, &h.dev, ms)?),
                }
            }
            return Ok(());
        }
        for h in &self.hosts {
            let _ = in_ns(&h.ns, &["tc", "qdisc", "del", "dev", &h.dev, "root"]);
            if ms > 0 {
                in_ns(
                    &h.ns,
                    &[
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        &h.dev,
                        "root",
                        "netem",
                        "delay",
                        &format!("{ms}ms"),
                        "limit",
                        "100000",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Drops `percent` of the packets each host sends, at random (nftables).
    pub fn set_loss(&self, percent: u32) -> Result<(), String> {
        for h in &self.hosts {
            let _ = nft(&h.ns, "delete table inet pollen_loss\n");
            if percent > 0 {
                nft(
                    &h.ns,
                    &format!(
                        "table inet pollen_loss {{\n chain loss_out {{ type filter hook output priority 0;\n\
                         oifname \"{}\" numgen random mod 100 < {percent} drop\n }}\n}}\n",
                        h.dev
                    ),
                )?;
            }
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // The delay threads hold sockets in the namespaces: end them first.
        if let Ok(mut d) = self.delayers.lock() {
            d.clear();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("netns teardown: {e}");
            }
        }
    }
}

/// The internet of a test, or `None` (after saying why) where it cannot be made.
pub fn internet() -> Option<Net> {
    match Net::new() {
        Ok(n) => Some(n),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// A bootstrap on `host` (its key in `dir`, named after the host); it and its
/// dialable address.
pub fn bootstrap_on(
    host: &Host,
    dir: &std::path::Path,
    extra: &[&str],
) -> (crate::common::Proc, String) {
    let mut cmd = host.command(crate::common::pollen());
    cmd.args(["bootstrap", "--no-mdns", "--listen", &host.tcp()])
        .args(["--listen", &host.quic(), "--identity"])
        .arg(dir.join(format!("{}.key", host.ns)))
        .args(extra);
    let p = crate::common::Proc::spawn("bootstrap", &mut cmd).unwrap();
    let addr = p
        .line_with("/ip4/", std::time::Duration::from_secs(30))
        .unwrap();
    (p, addr)
}

/// A server of `blocks` on `host` with the identity `key`, joined through
/// `bootstrap`; it and its `ready` line.
pub fn server_on(
    host: &Host,
    bootstrap: &str,
    blocks: &str,
    key: &std::path::Path,
    extra: &[&str],
) -> (crate::common::Proc, String) {
    let mut cmd = host.command(crate::common::pollen());
    cmd.args(["serve", "--threads", "1", "--no-mdns", "--blocks", blocks])
        .args(["--listen", &host.tcp(), "--listen", &host.quic()])
        .args(["--bootstrap", bootstrap, "--model"])
        .arg(crate::common::model())
        .arg("--identity")
        .arg(key)
        .args(extra);
    let p =
        crate::common::Proc::spawn(&format!("server {blocks} on {}", host.ip), &mut cmd).unwrap();
    let ready = p
        .line_with("ready", pollen_node::mesh::READY_TIMEOUT)
        .unwrap();
    (p, ready)
}

/// `pollen status --json` run on `host` through `entry`, or why it failed.
pub fn try_status_on(host: &Host, entry: &str) -> Result<serde_json::Value, String> {
    let out = host
        .command(crate::common::pollen())
        .args(["status", "--json", "--no-mdns", "--bootstrap", entry])
        .args(["--wait", "0"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// [`try_status_on`], which must succeed.
pub fn status_on(host: &Host, entry: &str) -> serde_json::Value {
    try_status_on(host, entry).unwrap()
}

/// The generated text (the first line of `generate`'s output: stats follow).
pub fn text(out: &str) -> &str {
    out.lines().next().unwrap_or("")
}
