//! libp2p's pre-shared-key layer (pnet) with one or two keys, and the transport of a
//! private node.

use super::{HANDSHAKE_TIMEOUT, KeyRing, MULTISTREAM_HEADER, NONCE_LEN, SwarmKey, WRITE_CHUNK};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade;
use libp2p::identity::Keypair;
use libp2p::{PeerId, noise, tcp, yamux};
use salsa20::XSalsa20;
use salsa20::cipher::{KeyIvInit, StreamCipher};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// How often a stream checks that its key is still in force.
const KEY_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn key_retired() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "this connection's swarm key was retired (a rotation's overlap ended)",
    )
}

fn key_refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the peer does not hold this mesh's swarm key (pre-shared key mismatch)",
    )
}

/// Runs libp2p's pnet handshake on `socket` with the keys in force now: sends a random
/// nonce, reads the peer's, and returns the encrypted stream. Which key the peer uses
/// is learnt from its first 20 bytes (see the module's notes).
pub async fn handshake<S>(mut socket: S, keys: Arc<KeyRing>) -> io::Result<PnetStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut local_nonce = [0u8; NONCE_LEN];
    rand::fill(&mut local_nonce);
    socket.write_all(&local_nonce).await?;
    socket.flush().await?;
    let mut remote_nonce = [0u8; NONCE_LEN];
    socket.read_exact(&mut remote_nonce).await?;
    Ok(PnetStream {
        inner: socket,
        keys: keys.active(),
        ring: keys,
        checked: std::time::Instant::now(),
        local_nonce,
        remote_nonce,
        read: ReadState::Detecting {
            buf: [0; MULTISTREAM_HEADER.len()],
            filled: 0,
        },
        write: None,
        pending: Vec::new(),
        pending_at: 0,
    })
}

enum ReadState {
    /// Collecting the peer's first encrypted bytes.
    Detecting {
        buf: [u8; MULTISTREAM_HEADER.len()],
        filled: usize,
    },
    /// Key found; `plain[at..]` is still to be handed out.
    Ready {
        key: usize,
        cipher: XSalsa20,
        plain: [u8; MULTISTREAM_HEADER.len()],
        at: usize,
    },
}

/// A socket under libp2p's pnet encryption (XSalsa20, one nonce per direction). It
/// fails once the key it runs on is no longer in force (checked at most every
/// [`KEY_CHECK_EVERY`] as it is used): a connection made with a rotated-out key during
/// the overlap does not outlive it, so a member rotated out cannot stay in by keeping
/// its connections busy.
pub struct PnetStream<S> {
    inner: S,
    keys: Vec<SwarmKey>,
    /// The node's keys as they change, and when the stream's key was last found in force.
    ring: Arc<KeyRing>,
    checked: std::time::Instant,
    local_nonce: [u8; NONCE_LEN],
    remote_nonce: [u8; NONCE_LEN],
    read: ReadState,
    /// The write cipher and the index of its key, made at the first write.
    write: Option<(usize, XSalsa20)>,
    /// Encrypted bytes not yet taken by `inner` (at most one chunk).
    pending: Vec<u8>,
    pending_at: usize,
}

impl<S> PnetStream<S> {
    /// Index (into the keys in force) of the key the peer was found to use.
    fn read_key(&self) -> Option<usize> {
        match self.read {
            ReadState::Ready { key, .. } => Some(key),
            ReadState::Detecting { .. } => None,
        }
    }

    /// Fails once the key this stream runs on has left the keys in force.
    fn still_keyed(&mut self) -> io::Result<()> {
        if self.checked.elapsed() < KEY_CHECK_EVERY {
            return Ok(());
        }
        self.checked = std::time::Instant::now();
        let used = self.write.as_ref().map(|(k, _)| *k).or(self.read_key());
        match used.and_then(|i| self.keys.get(i)) {
            Some(key) if !self.ring.active().contains(key) => Err(key_retired()),
            _ => Ok(()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> PnetStream<S> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_at < self.pending.len() {
            let n = match Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.pending_at..])
            {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            self.pending_at += n;
        }
        self.pending.clear();
        self.pending_at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PnetStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.still_keyed()?;
        loop {
            match &mut this.read {
                ReadState::Detecting { buf: head, filled } => {
                    let n = match Pin::new(&mut this.inner).poll_read(cx, &mut head[*filled..]) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    };
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    *filled += n;
                    if *filled < head.len() {
                        continue;
                    }
                    let head = *head;
                    let found = this.keys.iter().enumerate().find_map(|(i, k)| {
                        let mut cipher = XSalsa20::new(&k.0.into(), &this.remote_nonce.into());
                        let mut plain = head;
                        cipher.apply_keystream(&mut plain);
                        (&plain == MULTISTREAM_HEADER).then_some((i, cipher, plain))
                    });
                    let Some((key, cipher, plain)) = found else {
                        return Poll::Ready(Err(key_refused()));
                    };
                    if matches!(this.write, Some((w, _)) if w != key) {
                        return Poll::Ready(Err(key_refused()));
                    }
                    this.read = ReadState::Ready {
                        key,
                        cipher,
                        plain,
                        at: 0,
                    };
                }
                ReadState::Ready {
                    cipher, plain, at, ..
                } => {
                    if *at < plain.len() {
                        let n = buf.len().min(plain.len() - *at);
                        buf[..n].copy_from_slice(&plain[*at..*at + n]);
                        *at += n;
                        return Poll::Ready(Ok(n));
                    }
                    let n = match Pin::new(&mut this.inner).poll_read(cx, buf) {
                        Poll::Ready(Ok(n)) => n,
                        other => return other,
                    };
                    cipher.apply_keystream(&mut buf[..n]);
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PnetStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.still_keyed()?;
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if this.write.is_none() {
            // The listener writes only after it has read the dialer's first bytes, so
            // it answers with the dialer's key; a dialer starts with the first key.
            let key = this.read_key().unwrap_or(0);
            let k = this.keys.get(key).copied().unwrap_or(this.keys[0]);
            this.write = Some((key, XSalsa20::new(&k.0.into(), &this.local_nonce.into())));
        }
        let Some((_, cipher)) = this.write.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::Other.into()));
        };
        let n = buf.len().min(WRITE_CHUNK);
        this.pending.extend_from_slice(&buf[..n]);
        cipher.apply_keystream(&mut this.pending);
        // Start sending now; what the socket does not take yet goes at the next call.
        if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_close(cx),
            other => other,
        }
    }
}

/// Upgrades any raw transport (TCP, or the in-process one in tests) the way a private
/// node does: pnet with `keys`, then noise and yamux.
pub fn secure<T>(
    raw: T,
    keypair: &Keypair,
    keys: Arc<KeyRing>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = noise::Config::new(keypair)?;
    Ok(raw
        .and_then(move |socket, _| handshake(socket, keys))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .timeout(HANDSHAKE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// The transport of a private node on the network: TCP, pnet, noise, yamux; no QUIC.
pub fn tcp_transport(
    keypair: &Keypair,
    keys: Arc<KeyRing>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    secure(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)),
        keypair,
        keys,
    )
}
