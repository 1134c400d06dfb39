//! The request-response codec: Pollen frames over libp2p streams.
//!
//! This is the only place in the node where bytes from a peer are read. Every
//! read is a 4-byte length, checked against the message type's limit before a
//! buffer is allocated, then exactly that many bytes through `take`.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use pollen_protocol::{WireMessage, check_frame_len, decode_body, encode_frame};
use std::io;
use std::marker::PhantomData;

/// Frames of request type `Req` and response type `Resp`.
#[derive(Debug)]
pub struct FrameCodec<Req, Resp> {
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Default for FrameCodec<Req, Resp> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for FrameCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Reads one frame of `M`: its message and its body length.
pub(crate) async fn read_message<M: WireMessage, T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<(M, usize)> {
    read_message_max(io, M::MAX_BYTES).await
}

/// Like [`read_message`], with a tighter limit than the message type's (a session's own
/// cap): a longer frame is refused before its body is read.
pub(crate) async fn read_message_max<M: WireMessage, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<(M, usize)> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = check_frame_len(u32::from_le_bytes(len), max.min(M::MAX_BYTES))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    io.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{} frame ended after {} of {len} bytes",
                M::NAME,
                body.len()
            ),
        ));
    }
    let msg = decode_body::<M>(&body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok((msg, len))
}

fn encode<M: WireMessage>(msg: &M) -> io::Result<Vec<u8>> {
    encode_frame(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// Writes one encoded frame and flushes.
pub(crate) async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    frame: io::Result<Vec<u8>>,
) -> io::Result<()> {
    io.write_all(&frame?).await?;
    io.flush().await
}

impl<Req, Resp> libp2p::request_response::Codec for FrameCodec<Req, Resp>
where
    Req: WireMessage + Send + 'static,
    Resp: WireMessage + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await.map(|(m, _)| m)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await.map(|(m, _)| m)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, encode(&req)).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, encode(&res)).await
    }
}
