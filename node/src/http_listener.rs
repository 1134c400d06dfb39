//! The TCP listener of Pollen's HTTP servers (the API and its page, a bootstrap's page,
//! `/metrics`), with the limits axum's own leaves out.
//!
//! A token, when one is required, is checked only once a request's head has arrived,
//! and axum serves connections without hyper's timer, so without limits here a client
//! could open connections until the process runs out of file descriptors (and with
//! them the swarm client's sockets), or keep each open for ever by sending a request's
//! head a byte at a time. So: at most [`Limits::connections`] connections at once
//! (past it, accepting waits), at most [`Limits::per_ip`] from one address (past it, a
//! new one is answered 429 and closed: see [`refuse`]), a request head must arrive whole within
//! [`Limits::head`] of its first byte (or of the connection's start), a connection
//! idle between requests is closed after [`Limits::idle`], and so is one whose client
//! reads nothing of what is written to it for as long (a client that sends requests and
//! never reads the answers would otherwise hold its connection for ever: hyper stops
//! reading while an answer waits to be written). Once a head has arrived, reading is
//! not timed here: a body is the handlers' business (the API's: `openai::BODY_TIME`), and
//! so is a long answer computed before its first byte is written.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How long a stopping HTTP server waits for its connections to finish their answers
/// (a client that reads nothing would hold a graceful shutdown for ever).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one IP address.
    pub per_ip: usize,
    /// How long a request head may take to arrive, from its first byte (a new
    /// connection's first head: from the connection's start).
    pub head: Duration,
    /// How long a connection may wait, after an answer, for the next request's first
    /// byte; and how long a write may wait for the client to read.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 512,
            per_ip: 64,
            head: Duration::from_secs(20),
            idle: Duration::from_secs(60),
        }
    }
}

/// A TCP listener for `axum::serve` that keeps to [`Limits`]. ([`guarded`] also sets
/// `TCP_NODELAY`: a streamed answer is one small write per token, and with Nagle's
/// algorithm each would wait for the client's late acknowledgement of the one before.)
#[derive(Debug)]
pub struct GuardedListener {
    inner: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Refusals being answered (see [`refuse`]).
    refusals: Arc<Semaphore>,
}

impl GuardedListener {
    /// `inner` under `limits`.
    pub fn new(inner: TcpListener, limits: Limits) -> Self {
        Self {
            inner,
            limits,
            slots: Arc::new(Semaphore::new(limits.connections.max(1))),
            per_ip: Arc::default(),
            refusals: Arc::new(Semaphore::new(REFUSALS)),
        }
    }

    /// Counts a connection from `ip`, unless it has its share open already.
    fn admit(&self, ip: IpAddr) -> Option<IpShare> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.per_ip.max(1) {
            return None;
        }
        *n += 1;
        Some(IpShare {
            ip,
            map: self.per_ip.clone(),
        })
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // The semaphore is never closed.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                continue;
            };
            let (tcp, addr) = match self.inner.accept().await {
                Ok(t) => t,
                Err(e) => {
                    // As axum's own listener: connection errors are the client's,
                    // others (out of descriptors) pass with time.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::warn!("accepting an HTTP connection: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            };
            let Some(share) = self.admit(crate::net::book::share_of(addr.ip())) else {
                match self.refusals.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(refuse(tcp, permit));
                    }
                    // Too many refusals at once: said where the socket takes it at once
                    // (a new socket's buffer is empty), never waited for, and lost if
                    // the request had arrived (the close then resets the connection).
                    Err(_) => {
                        let _ = tcp.try_write(TOO_MANY);
                    }
                }
                tracing::debug!(
                    "closed an HTTP connection from {}: it has {} open",
                    addr.ip(),
                    self.limits.per_ip
                );
                continue;
            };
            let io = Guarded::new(tcp, self.limits, Some((slot, share)));
            return (io, addr);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The answer to a connection past its address's share, before it is closed.
const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n\
content-length: 45\r\nconnection: close\r\n\r\ntoo many connections open from this address\r\n";

/// Refusals answered at once, across all addresses; past them a refused connection
/// gets [`TOO_MANY`] only where its socket takes it at once, and is closed.
const REFUSALS: usize = 16;
/// How long one refusal may hold its socket, all told.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// How much of a refused client's request is read and thrown away.
const REFUSAL_READ: usize = 64 * 1024;

/// Answers a connection past its address's share with [`TOO_MANY`], so that the client
/// reads it: closing a socket with a request still unread in it resets the connection,
/// and a reset loses an answer the client has not read yet (every HTTP client sends
/// its request before reading). So the answer is written, the socket's sending side
/// shut, and what the client sends read and thrown away until it closes, within
/// [`REFUSAL_TIME`] and [`REFUSAL_READ`] bytes.
async fn refuse(mut tcp: TcpStream, _permit: OwnedSemaphorePermit) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        tcp.write_all(TOO_MANY).await?;
        tcp.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < REFUSAL_READ {
            match tcp.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        io::Result::Ok(())
    })
    .await;
}

/// One connection's place in its address's count.
#[derive(Debug)]
pub struct IpShare {
    ip: IpAddr,
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpShare {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Where a connection is in its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head (or waiting for a new connection's first): it must end
    /// by the deadline.
    Head,
    /// A head has arrived: its body and answer are the handlers' business.
    Served,
    /// An answer was written and nothing read since: the next request must begin by
    /// the deadline.
    Idle,
}

/// Finds where a request head ends, a byte at a time, by hyper's rule: at its first
/// empty line after some text, an empty line being a bare `\n` or `\r\n` (a second
/// `\r` makes the line not empty: hyper would go on waiting for more); empty lines
/// before the request line are skipped, as parsers skip them, so they end nothing.
#[derive(Debug, Default)]
struct HeadScan {
    /// Some text of the head was read.
    text: bool,
    /// The line being read has text.
    line: bool,
    /// The line being read so far is one `\r`.
    cr: bool,
}

impl HeadScan {
    /// Reads `b`; whether it ends the head.
    fn ends_with(&mut self, b: u8) -> bool {
        match b {
            b'\n' if self.text && !self.line => true,
            b'\n' => {
                self.line = false;
                self.cr = false;
                false
            }
            b'\r' if self.line => false,
            b'\r' if !self.cr => {
                self.cr = true;
                false
            }
            _ => {
                self.text = true;
                self.line = true;
                false
            }
        }
    }
}

/// An accepted connection under [`Limits`]. Reads fail with `TimedOut` past the
/// deadline of its phase; a head ends at its first empty line ([`HeadScan`]).
#[derive(Debug)]
pub struct Guarded<T> {
    io: T,
    limits: Limits,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Where the head being read is, to find its end across reads.
    scan: HeadScan,
    /// Since the first write that could not go on (the client reads nothing): the
    /// connection fails past [`Limits::idle`] of it; reset by any write that goes on.
    write_stall: Option<Pin<Box<Sleep>>>,
    _held: Option<(OwnedSemaphorePermit, IpShare)>,
}

impl<T> Guarded<T> {
    /// `io`, its first head due within `limits.head`; `held` is released with it.
    pub fn new(io: T, limits: Limits, held: Option<(OwnedSemaphorePermit, IpShare)>) -> Self {
        Self {
            io,
            limits,
            phase: Phase::Head,
            deadline: Box::pin(tokio::time::sleep(limits.head)),
            scan: HeadScan::default(),
            write_stall: None,
            _held: held,
        }
    }

    /// The connection itself.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn due_in(&mut self, d: Duration) {
        self.deadline.as_mut().reset(Instant::now() + d);
    }

    /// Takes note of `bytes` just read.
    fn took(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            // The next request's first byte: its head is due.
            self.phase = Phase::Head;
            self.scan = HeadScan::default();
            let head = self.limits.head;
            self.due_in(head);
        }
        if self.phase == Phase::Head && bytes.iter().any(|&b| self.scan.ends_with(b)) {
            self.phase = Phase::Served;
        }
    }

    /// Takes note of `bytes` written: an answer, so the connection idles after it; not
    /// an interim `100 Continue`, after which the request's body comes.
    fn wrote(&mut self, bytes: &[u8]) {
        if bytes.starts_with(b"HTTP/1.1 100 ") {
            return;
        }
        if self.phase != Phase::Head {
            self.phase = Phase::Idle;
            let idle = self.limits.idle;
            self.due_in(idle);
        }
    }

    /// Whether the phase's deadline has passed (registering `cx` for it otherwise).
    fn late(&mut self, cx: &mut Context<'_>) -> bool {
        self.phase != Phase::Served && self.deadline.as_mut().poll(cx).is_ready()
    }

    /// What a write (or flush) that `r` answered comes to: one that cannot go on fails
    /// with `TimedOut` once writes have not gone on for [`Limits::idle`] (registering
    /// `cx` for it until then); one that went on resets that time.
    fn written<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.write_stall = None;
            return r;
        }
        let idle = self.limits.idle;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing of its answer in time",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.took(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.late(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                match this.phase {
                    Phase::Head => "a request head did not arrive in time",
                    _ => "idle after an answer",
                },
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.wrote(buf);
        }
        this.written(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            this.wrote(first);
        }
        this.written(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.written(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Sets `TCP_NODELAY` on an accepted connection.
fn no_delay(io: &mut Guarded<TcpStream>) {
    if let Err(e) = io.get_ref().set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY on an HTTP connection: {e}");
    }
}

/// What [`guarded`] gives: axum's tap over the listener (through which axum's
/// `ConnectInfo<SocketAddr>` reaches handlers).
pub type Served = axum::serve::TapIo<GuardedListener, fn(&mut Guarded<TcpStream>)>;

/// `listener` under `limits`, with `TCP_NODELAY` on every connection.
pub fn guarded_with(listener: TcpListener, limits: Limits) -> Served {
    axum::serve::ListenerExt::tap_io(
        GuardedListener::new(listener, limits),
        no_delay as fn(&mut _),
    )
}

/// `listener` under the default [`Limits`], with `TCP_NODELAY` on every connection.
pub fn guarded(listener: TcpListener) -> Served {
    guarded_with(listener, Limits::default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            connections: 4,
            per_ip: 2,
            head: Duration::from_secs(20),
            idle: Duration::from_secs(60),
        }
    }

    /// The server's end of a connection under `limits()`, and the client's.
    fn pair() -> (Guarded<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(1 << 16);
        (Guarded::new(server, limits(), None), client)
    }

    async fn read_some(g: &mut Guarded<tokio::io::DuplexStream>) -> io::Result<usize> {
        let mut buf = [0u8; 256];
        g.read(&mut buf).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_sent_a_byte_at_a_time_is_cut_off() {
        let (mut server, mut client) = pair();
        let started = Instant::now();
        let trickle = async move {
            for b in b"GET / HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        let reader = async {
            loop {
                if let Err(e) = read_some(&mut server).await {
                    return e;
                }
            }
        };
        let e = tokio::select! {
            e = reader => e,
            () = trickle => unreachable!("the client writes until refused"),
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), limits().head);
    }

    #[tokio::test(start_paused = true)]
    async fn once_a_head_arrives_nothing_is_timed_until_the_answer() {
        let (mut server, mut client) = pair();
        client
            .write_all(b"POST /v1/x HTTP/1.1\r\nHost: x\r\n\r\n{}")
            .await
            .unwrap();
        assert!(read_some(&mut server).await.unwrap() > 0);
        // An answer computed for ten minutes before its first byte: not cut.
        let waited = tokio::time::timeout(Duration::from_secs(600), read_some(&mut server)).await;
        assert!(waited.is_err(), "the read is still pending: {waited:?}");
        // Answered: idle from then on, closed after `idle` without a next request.
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let t = Instant::now();
        let e = read_some(&mut server).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), limits().idle);
    }

    /// A client that reads nothing of its answers: writes that cannot go on fail after
    /// `idle` (the reading side is not polled then: hyper waits for the write), and
    /// a client that reads, however slowly, resets that time with each read.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_is_cut_off() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut server = Guarded::new(server, limits(), None);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_some(&mut server).await.unwrap() > 0);
        // Reading 16 bytes every 50 s: slow, never stalled for `idle`.
        let answer = vec![b'x'; 1024];
        let slow = async {
            let mut buf = [0u8; 16];
            let mut got = 0;
            while got < answer.len() {
                tokio::time::sleep(Duration::from_secs(50)).await;
                got += client.read(&mut buf).await.unwrap();
            }
            client
        };
        let (written, mut client) = tokio::join!(server.write_all(&answer), slow);
        written.unwrap();
        // Then nothing is read: the next answer's write fails `idle` after it stops.
        let t = Instant::now();
        let e = server.write_all(&answer).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), limits().idle);
        let mut buf = [0u8; 64];
        assert_eq!(client.read(&mut buf).await.unwrap(), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn a_next_request_begun_in_time_gets_its_own_head_deadline() {
        let (mut server, mut client) = pair();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_some(&mut server).await.unwrap();
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        tokio::time::sleep(limits().idle - Duration::from_secs(1)).await;
        client.write_all(b"GET /a").await.unwrap();
        read_some(&mut server).await.unwrap();
        let t = Instant::now();
        let e = read_some(&mut server).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), limits().head);
        // A head split across reads still ends where its empty line is.
        let (mut server, mut client) = pair();
        for part in [&b"GET / HTTP/1.1\r\n"[..], b"\r", b"\n"] {
            client.write_all(part).await.unwrap();
            read_some(&mut server).await.unwrap();
        }
        let waited = tokio::time::timeout(Duration::from_secs(600), read_some(&mut server)).await;
        assert!(waited.is_err(), "served, not timed: {waited:?}");
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line_after_some_text() {
        let ends = |bytes: &[u8]| {
            let mut scan = HeadScan::default();
            bytes.iter().position(|&b| scan.ends_with(b))
        };
        assert_eq!(ends(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(26));
        assert_eq!(ends(b"GET / HTTP/1.1\nHost: x\n\nbody"), Some(23));
        assert_eq!(ends(b"GET / HTTP/1.1\r\n\n"), Some(16));
        // Empty lines before the request line end nothing (a parser skips them).
        assert_eq!(ends(b"\r\n\r\n\n\r\n"), None);
        assert_eq!(ends(b"\r\n\r\nGET / HTTP/1.1\r\n"), None);
        assert_eq!(ends(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Some(21));
        assert_eq!(ends(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        // Not an empty line for hyper either: it would wait for more.
        assert_eq!(ends(b"GET / HTTP/1.1\r\n\r\r\n"), None);
        assert_eq!(ends(b"GET / HTTP/1.1\r\n\r\r\n\r\n"), Some(20));
    }

    #[tokio::test(start_paused = true)]
    async fn empty_lines_first_do_not_stop_the_head_clock() {
        let (mut server, mut client) = pair();
        client.write_all(b"\r\n\r\n").await.unwrap();
        read_some(&mut server).await.unwrap();
        let t = Instant::now();
        let e = read_some(&mut server).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t.elapsed(), limits().head);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_after_100_continue_is_not_a_head() {
        let (mut server, mut client) = pair();
        client
            .write_all(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        read_some(&mut server).await.unwrap();
        server
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        client.write_all(b"{\"a\": 1}").await.unwrap();
        read_some(&mut server).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(600), read_some(&mut server)).await;
        assert!(waited.is_err(), "served, not timed: {waited:?}");
    }

    /// A listener under `limits()` with its address's share (2) taken: its address,
    /// it, and the two connections (client and server ends).
    async fn full_listener() -> (SocketAddr, Served, Vec<(TcpStream, Guarded<TcpStream>)>) {
        use axum::serve::Listener;
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = guarded_with(tcp, limits());
        let mut open = Vec::new();
        for _ in 0..2 {
            let client = TcpStream::connect(addr).await.unwrap();
            let (io, _) = listener.accept().await;
            assert!(io.get_ref().nodelay().unwrap());
            open.push((client, io));
        }
        (addr, listener, open)
    }

    #[tokio::test]
    async fn connections_are_capped_in_all_and_per_address() {
        use axum::serve::Listener;
        let (addr, mut listener, mut open) = full_listener().await;
        // A third from the same address is closed at once; accepting goes on.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "nothing else to accept");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, TOO_MANY, "a 429, then closed");
        let (head, body) = std::str::from_utf8(TOO_MANY)
            .unwrap()
            .split_once("\r\n\r\n")
            .unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        // One closed, one more comes in.
        drop(open.pop());
        let _fourth = TcpStream::connect(addr).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(accepted.is_ok(), "its share was given back");
        // In all: past `connections`, accepting waits.
        let all = guarded_with(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            Limits {
                connections: 1,
                per_ip: 8,
                ..limits()
            },
        );
        let addr = all.local_addr().unwrap();
        let mut all = all;
        let _a = TcpStream::connect(addr).await.unwrap();
        let first = all.accept().await;
        let _b = TcpStream::connect(addr).await.unwrap();
        let second = tokio::time::timeout(Duration::from_millis(300), all.accept()).await;
        assert!(second.is_err(), "waits while one is open");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), all.accept()).await;
        assert!(second.is_ok());
    }

    #[tokio::test]
    async fn a_refused_client_that_sent_its_request_still_reads_the_429() {
        use axum::serve::Listener;
        let (addr, mut listener, _open) = full_listener().await;
        // As every HTTP client does: the request goes out before any answer is read, so
        // it lies unread in the server's socket when the refusal is written.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "nothing else to accept");
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "the connection ends cleanly, not reset: {read:?}"
        );
        assert_eq!(answer, TOO_MANY);
    }
}
