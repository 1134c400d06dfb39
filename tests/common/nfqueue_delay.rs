//! Packet delay without `sch_netem`: a thread per host namespace holds every packet the
//! host sends in an NFQUEUE and accepts it `ms` later.
//!
//! The thread enters the host's network namespace (a thread's own: `setns` changes only
//! the calling thread), binds queue [`QUEUE`] over netlink (`NETLINK_NETFILTER`,
//! metadata only, at most [`MAX_HELD`] packets held: the kernel drops beyond that, as
//! netem does past its limit), and then an iptables rule (`OUTPUT -o DEV -j NFQUEUE
//! --queue-bypass`) sends the host's outgoing packets there. Packets are released in
//! the order they came, each once `ms` has passed since it was seen, with a batch
//! verdict that accepts every packet up to an id, so a delay never reorders a flow.
//! Queue numbers are per namespace. [`Delayer::stop`] (also on drop) deletes the rule,
//! accepts whatever is still held and ends the thread.
#![allow(dead_code, missing_docs, unreachable_pub)]

use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The queue number (queues are per network namespace, so one number serves all).
pub const QUEUE: u16 = 0;
/// Most packets held at once per host; the kernel drops past this.
pub const MAX_HELD: u32 = 8192;
/// Longest a thread waits without looking at its stop flag.
const TICK: Duration = Duration::from_millis(20);
/// Longest wait for the kernel's answer to a configuration message.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

// linux/netfilter/nfnetlink.h, nfnetlink_queue.h, netlink.h
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_GSO: u32 = 1 << 2;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;
const AF_UNSPEC: u8 = 0;

/// One host's delay: its thread and its iptables rule.
#[derive(Debug)]
pub struct Delayer {
    ns: String,
    dev: String,
    ms: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    rule: bool,
}

/// `iptables` (in `ns`) with `args`, or why it failed.
fn iptables(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w", "5"])
        .args(args)
        .output()
        .map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {}: {} (the iptables package, and a kernel with NFQUEUE)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn rule_args<'a>(op: &'a str, dev: &'a str, queue: &'a str) -> [&'a str; 9] {
    [
        op,
        "OUTPUT",
        "-o",
        dev,
        "-j",
        "NFQUEUE",
        "--queue-num",
        queue,
        "--queue-bypass",
    ]
}

impl Delayer {
    /// Starts delaying what namespace `ns` sends on `dev` by `ms`; returns once the
    /// queue is bound and the rule is in place, or why it could not be.
    pub fn start(ns: &str, dev: &str, ms: u32) -> Result<Delayer, String> {
        let ms = Arc::new(AtomicU32::new(ms));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let thread = {
            let (ns, ms, stop) = (ns.to_string(), ms.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("delay {ns}"))
                .spawn(move || match Queue::open(&ns) {
                    Ok(q) => {
                        let _ = ready_tx.send(Ok(()));
                        q.run(&ms, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .map_err(|e| format!("delay thread: {e}"))?
        };
        let mut d = Delayer {
            ns: ns.into(),
            dev: dev.into(),
            ms,
            stop,
            thread: Some(thread),
            rule: false,
        };
        match ready_rx.recv_timeout(ANSWER_TIMEOUT * 2) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(format!("the delay thread of {ns} did not start")),
        }
        let queue = QUEUE.to_string();
        iptables(ns, &rule_args("-A", dev, &queue))?;
        d.rule = true;
        Ok(d)
    }

    /// The namespace this delays.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Changes the delay of packets seen from now on.
    pub fn set(&self, ms: u32) {
        self.ms.store(ms, Ordering::Relaxed);
    }

    /// Deletes the rule, accepts every held packet and ends the thread.
    pub fn stop(&mut self) {
        if self.rule {
            let queue = QUEUE.to_string();
            if let Err(e) = iptables(&self.ns, &rule_args("-D", &self.dev, &queue)) {
                eprintln!("delay teardown: {e}");
            }
            self.rule = false;
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A bound queue in the thread's namespace.
struct Queue {
    fd: OwnedFd,
    seq: u32,
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

impl Queue {
    /// Enters `ns` (this thread only), binds [`QUEUE`] in metadata-copy mode.
    fn open(ns: &str) -> Result<Queue, String> {
        let file = std::fs::File::open(format!("/run/netns/{ns}"))
            .map_err(|e| format!("namespace {ns}: {e}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {ns}: {e}"))?;
        let fd = nix::sys::socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| format!("netfilter netlink socket: {e}"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("netlink bind: {e}"))?;
        // Room for the metadata of every packet the kernel may hold.
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
        let mut q = Queue { fd, seq: 0 };
        let mut cmd = vec![NFQNL_CFG_CMD_BIND, 0];
        cmd.extend_from_slice(&0u16.to_be_bytes());
        q.configure(&[(NFQA_CFG_CMD, cmd)])
            .map_err(|e| format!("binding NFQUEUE {QUEUE} in {ns}: {e}"))?;
        let mut params = 0u32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_META);
        q.configure(&[
            (NFQA_CFG_PARAMS, params),
            (NFQA_CFG_QUEUE_MAXLEN, MAX_HELD.to_be_bytes().to_vec()),
            (NFQA_CFG_MASK, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
            (NFQA_CFG_FLAGS, NFQA_CFG_F_GSO.to_be_bytes().to_vec()),
        ])
        .map_err(|e| format!("configuring NFQUEUE {QUEUE} in {ns}: {e}"))?;
        Ok(q)
    }

    /// A queue message of `kind` with `attrs`.
    fn message(&mut self, kind: u16, flags: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&[0; 4]); // length, below
        m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.push(AF_UNSPEC);
        m.push(0); // NFNETLINK_V0
        m.extend_from_slice(&QUEUE.to_be_bytes());
        for (k, p) in attrs {
            put_attr(&mut m, *k, p);
        }
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    /// Sends a configuration message and waits for the kernel's acknowledgement.
    fn configure(&mut self, attrs: &[(u16, Vec<u8>)]) -> Result<(), String> {
        let m = self.message(NFQNL_MSG_CONFIG, NLM_F_ACK, attrs);
        let seq = self.seq;
        send(self.fd.as_raw_fd(), &m, MsgFlags::empty()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut buf = vec![0u8; 8192];
        while Instant::now() < deadline {
            self.timeout(deadline.saturating_duration_since(Instant::now()));
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.to_string()),
            };
            for (kind, mseq, body) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR && mseq == seq {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(-1);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(nix::errno::Errno::from_raw(-code).to_string())
                    };
                }
            }
        }
        Err("no answer from the kernel".into())
    }

    fn timeout(&self, d: Duration) {
        let us = d.as_micros().clamp(1, TICK.as_micros()) as i64;
        let _ = setsockopt(
            &self.fd,
            sockopt::ReceiveTimeout,
            &TimeVal::microseconds(us),
        );
    }

    /// Accepts every held packet with an id up to `id`.
    fn accept_up_to(&mut self, id: u32) {
        let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        let m = self.message(NFQNL_MSG_VERDICT_BATCH, 0, &[(NFQA_VERDICT_HDR, hdr)]);
        if let Err(e) = send(self.fd.as_raw_fd(), &m, MsgFlags::empty()) {
            eprintln!("delay verdict: {e}");
        }
    }

    /// Holds each packet until `ms` after it was seen, in order, until `stop`.
    fn run(mut self, ms: &AtomicU32, stop: &AtomicBool) {
        // (packet id, when to release it); ids rise in the order packets were queued.
        let mut held: VecDeque<(u32, Instant)> = VecDeque::new();
        let mut buf = vec![0u8; 64 * 1024];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut last = None;
            while let Some(&(id, at)) = held.front() {
                if at > now && held.len() < MAX_HELD as usize {
                    break;
                }
                last = Some(id);
                held.pop_front();
            }
            if let Some(id) = last {
                self.accept_up_to(id);
            }
            // poll(2) sleeps on a high-resolution timer (SO_RCVTIMEO counts jiffies):
            // whole milliseconds, rounded up, so a packet is never released early.
            let wait = held
                .front()
                .map_or(TICK, |&(_, at)| at.saturating_duration_since(now))
                .min(TICK);
            let wait_ms = wait.as_micros().div_ceil(1000) as u16;
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, wait_ms), Ok(n) if n > 0) {
                continue;
            }
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                // Nothing after all, or ENOBUFS: a packet whose message was lost is
                // released with the next batch verdict after it.
                Err(_) => continue,
            };
            let seen = Instant::now();
            let delay = Duration::from_millis(u64::from(ms.load(Ordering::Relaxed)));
            for (kind, _, body) in messages(&buf[..n]) {
                if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    continue;
                }
                if let Some(id) = packet_id(body) {
                    held.push_back((id, seen + delay));
                }
            }
        }
        // The rule is gone: accept what is held and what the kernel queued since.
        let mut last = held.back().map(|&(id, _)| id);
        while let Ok(n) = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            for (kind, _, body) in messages(&buf[..n]) {
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    last = packet_id(body).or(last);
                }
            }
        }
        if let Some(id) = last {
            self.accept_up_to(id);
        }
        let mut cmd = vec![NFQNL_CFG_CMD_UNBIND, 0];
        cmd.extend_from_slice(&0u16.to_be_bytes());
        let _ = self.configure(&[(NFQA_CFG_CMD, cmd)]);
    }
}

/// The netlink messages in `buf`: (type, sequence number, body after the header).
fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() >= at + NLMSG_HDRLEN {
        let h = &buf[at..at + NLMSG_HDRLEN];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        out.push((kind, seq, &buf[at + NLMSG_HDRLEN..at + len]));
        at += len.next_multiple_of(4);
    }
    out
}

/// The packet id in a queue packet message's body (nfgenmsg, then attributes).
fn packet_id(body: &[u8]) -> Option<u32> {
    let mut at = NFGEN_HDRLEN;
    while body.len() >= at + 4 {
        let len = u16::from_ne_bytes([body[at], body[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]) & 0x3fff;
        if len < 4 || at + len > body.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            let p = &body[at + 4..at + 8];
            return Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
        }
        at += len.next_multiple_of(4);
    }
    None
}
