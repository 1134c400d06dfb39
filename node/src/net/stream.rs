//! Session streams: Pollen frames over one libp2p stream per session and hop, split
//! into a reader and a writer so that each side can run in its own task.
//!
//! Every read is a 4-byte length checked against the message type's limit before a
//! buffer is allocated, then exactly that many bytes (see [`super::codec`]); every read
//! and write is bounded in time by the caller.

use super::codec::{read_message, write_frame};
use super::handle::NetStats;
use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use pollen_protocol::WireMessage;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The reading half of a session stream.
pub struct FrameReader {
    io: ReadHalf<Stream>,
    peer: PeerId,
    stats: Arc<NetStats>,
}

/// The writing half of a session stream.
pub struct FrameWriter {
    io: WriteHalf<Stream>,
    peer: PeerId,
    stats: Arc<NetStats>,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameReader({})", self.peer)
    }
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameWriter({})", self.peer)
    }
}

/// Splits a session stream with `peer` into its two halves.
pub fn split(stream: Stream, peer: PeerId, stats: Arc<NetStats>) -> (FrameReader, FrameWriter) {
    let (r, w) = stream.split();
    (
        FrameReader {
            io: r,
            peer,
            stats: stats.clone(),
        },
        FrameWriter { io: w, peer, stats },
    )
}

fn timed_out(what: &str, after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: nothing within {after:?}"),
    )
}

impl FrameReader {
    /// The peer at the other end.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The next frame; `UnexpectedEof` when the peer closed the stream.
    pub async fn recv<M: WireMessage>(&mut self) -> io::Result<M> {
        let (msg, len) = read_message::<M, _>(&mut self.io).await?;
        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(len as u64 + 4, Ordering::Relaxed);
        crate::metrics::global().received(len as u64 + 4);
        Ok(msg)
    }

    /// The next frame, refused before its body is read when it is longer than `max`
    /// bytes (a session's cap, tighter than the message type's).
    pub async fn recv_max<M: WireMessage>(&mut self, max: usize) -> io::Result<M> {
        let (msg, len) = super::codec::read_message_max::<M, _>(&mut self.io, max).await?;
        self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_in
            .fetch_add(len as u64 + 4, Ordering::Relaxed);
        crate::metrics::global().received(len as u64 + 4);
        Ok(msg)
    }

    /// The next frame within `timeout`.
    pub async fn recv_within<M: WireMessage>(&mut self, timeout: Duration) -> io::Result<M> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| timed_out(M::NAME, timeout))?
    }

    /// The next frame within `timeout`, refused before its body is read when it is
    /// longer than `max`.
    pub async fn recv_max_within<M: WireMessage>(
        &mut self,
        max: usize,
        timeout: Duration,
    ) -> io::Result<M> {
        tokio::time::timeout(timeout, self.recv_max(max))
            .await
            .map_err(|_| timed_out(M::NAME, timeout))?
    }
}

impl FrameWriter {
    /// The peer at the other end.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// Sends one frame within `timeout` (a peer that stops reading cannot hold us).
    pub async fn send<M: WireMessage>(&mut self, msg: &M, timeout: Duration) -> io::Result<()> {
        let frame = pollen_protocol::encode_frame(msg)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let n = frame.len() as u64;
        tokio::time::timeout(timeout, write_frame(&mut self.io, Ok(frame)))
            .await
            .map_err(|_| timed_out(M::NAME, timeout))??;
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
        crate::metrics::global().sent(n);
        Ok(())
    }

    /// Closes our side of the stream (the peer reads end of stream), within 1 s.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.close()).await;
    }
}

/// How often a stream dropped unanswered is opened again.
const OPEN_ATTEMPTS: u32 = 4;
/// A stream that ended unanswered within this long of its first frame is opened again
/// (a peer whose inbound queue was full drops new streams at once); one that ended
/// later is the peer's answer, so that a peer cannot stretch the caller's wait by
/// closing each stream just before it times out.
const DROPPED_WITHIN: Duration = Duration::from_secs(1);

/// Whether a stream that ended unanswered `after` its first frame, on attempt
/// `attempt`, is opened again.
fn open_again(attempt: u32, after: Duration) -> bool {
    attempt < OPEN_ATTEMPTS && after < DROPPED_WITHIN
}

/// Why [`open_with_reply`] got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The stream could not be opened (the peer is unreachable).
    #[error(transparent)]
    Net(#[from] super::NetError),
    /// The peer did not answer in time.
    #[error("{0}")]
    Timeout(io::Error),
    /// The stream broke or ended before any answer, every time it was tried.
    #[error("{0}")]
    Broken(io::Error),
    /// The first frame could not be made once the stream was open (its sender had no
    /// time left to give the peer).
    #[error("no time left to send the first frame")]
    NoTime,
}

/// The longest answer to a stream's first frame: `Opened`, `Attached` or a refusal,
/// never hidden states (a longer one is refused before its body is read).
pub const REPLY_MAX: usize = 64 * 1024;

/// Opens a session stream to `peer`, sends `first` and reads the first answer (at most
/// [`REPLY_MAX`] bytes), within `timeout` for the answer. The inbound queue of libp2p-stream holds one stream: a
/// peer that gets several at the same instant drops the rest unanswered, so a stream
/// that ends before any answer is opened again (up to 4 times, with a short backoff).
pub async fn open_with_reply<Req, Resp>(
    net: &super::NetHandle,
    peer: PeerId,
    addrs: Vec<libp2p::Multiaddr>,
    first: &Req,
    open_timeout: Duration,
    timeout: Duration,
) -> Result<(FrameReader, FrameWriter, Resp), OpenError>
where
    Req: WireMessage + Clone,
    Resp: WireMessage,
{
    open_with_reply_made(
        net,
        peer,
        addrs,
        || Some(first.clone()),
        open_timeout,
        timeout,
    )
    .await
}

/// [`open_with_reply`] with the first frame made by `first` once the stream is open (for
/// a frame that says how long its sender will wait, counted from its sending); `None`
/// from `first` gives up with [`OpenError::NoTime`].
pub async fn open_with_reply_made<Req, Resp>(
    net: &super::NetHandle,
    peer: PeerId,
    addrs: Vec<libp2p::Multiaddr>,
    mut first: impl FnMut() -> Option<Req>,
    open_timeout: Duration,
    timeout: Duration,
) -> Result<(FrameReader, FrameWriter, Resp), OpenError>
where
    Req: WireMessage,
    Resp: WireMessage,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let stream = net
            .open_session_stream(peer, addrs.clone(), open_timeout)
            .await?;
        let (mut rx, mut tx) = split(stream, peer, net.stats().clone());
        let Some(first) = first() else {
            return Err(OpenError::NoTime);
        };
        let sent = tokio::time::Instant::now();
        let answer = match tx.send(&first, timeout).await {
            Ok(()) => rx.recv_max_within::<Resp>(REPLY_MAX, timeout).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(reply) => return Ok((rx, tx, reply)),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(OpenError::Timeout(e)),
            Err(e) if !open_again(attempt, sent.elapsed()) => return Err(OpenError::Broken(e)),
            Err(e) => {
                tracing::debug!("session stream to {peer} ended unanswered ({e}); opening again");
                let backoff = 20u64 << attempt;
                let jitter = rand::random::<u64>() % backoff.max(1);
                tokio::time::sleep(Duration::from_millis(backoff + jitter)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a stream dropped at once is opened again, and only a few times: a peer that
    /// closes each stream just before the caller's timeout gets one wait, not five.
    #[test]
    fn only_streams_dropped_at_once_are_opened_again() {
        let at_once = Duration::from_millis(5);
        assert!((1..OPEN_ATTEMPTS).all(|a| open_again(a, at_once)));
        assert!(!open_again(OPEN_ATTEMPTS, at_once));
        assert!(!open_again(1, DROPPED_WITHIN));
        assert!(!open_again(1, Duration::from_secs(79)));
    }
}
