//! The request-response codec: Pollen frames over libp2p streams.
//!
//! This is the only place in the node where bytes from a peer are read. Every
//! read is a 4-byte length, checked against the message type's limit before a
//! buffer is allocated, then exactly that many bytes, into a buffer that grows with
//! what came and ends at that length.

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
    let body = read_body(io, len).await?;
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

/// What a frame's body is read in before room for all of it is taken.
const FIRST_PART: usize = 64 * 1024;

/// A frame body of `len` bytes (fewer where the stream ends first): its first
/// [`FIRST_PART`] bytes, then room doubled each time what came fills it, up to `len`
/// exactly. A peer that claims a long frame and stalls holds at most twice what it
/// sent; a whole frame ends in a buffer of its own length, not the twice of one grown
/// past it.
async fn read_body<T: AsyncRead + Unpin + Send>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len.min(FIRST_PART)];
    let mut got = fill(io, &mut body).await?;
    while got == body.len() && body.len() < len {
        let next = body.len().saturating_mul(2).min(len);
        body.reserve_exact(next - body.len());
        body.resize(next, 0);
        got += fill(io, &mut body[got..]).await?;
    }
    body.truncate(got);
    Ok(body)
}

/// Reads into all of `buf`, or until the stream ends; how many bytes came.
async fn fill<T: AsyncRead + Unpin + Send>(io: &mut T, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match io.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures::io::Cursor;

    /// A body is read into a buffer of its own length, however long; a stream that
    /// ends early gives what came, in a buffer at most twice that (and the first part).
    #[tokio::test]
    async fn a_body_takes_its_length_and_no_more() {
        for len in [0, 1, FIRST_PART - 1, FIRST_PART, FIRST_PART + 1, 3 << 20] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut io = Cursor::new(bytes.clone());
            let body = read_body(&mut io, len).await.unwrap();
            assert_eq!(body, bytes);
            assert_eq!(body.capacity(), len);
            // Cut short: what came, in no bigger a buffer.
            let cut = len / 2;
            let mut io = Cursor::new(bytes[..cut].to_vec());
            let body = read_body(&mut io, len).await.unwrap();
            assert_eq!(body, bytes[..cut]);
            assert!(body.capacity() <= len && body.capacity() <= (2 * cut).max(FIRST_PART));
        }
    }

    /// A frame claiming more than its cap is refused before its body is read; one cut
    /// short is an error that says so; a whole one decodes.
    #[tokio::test]
    async fn frames_are_capped_checked_and_whole() {
        let msg = pollen_protocol::InferResponse::Ack {
            session: pollen_protocol::SessionId(3),
            step: 7,
        };
        let frame = encode_frame(&msg).unwrap();
        let mut io = Cursor::new(frame.clone());
        let (got, len) = read_message::<pollen_protocol::InferResponse, _>(&mut io)
            .await
            .unwrap();
        assert!(matches!(
            got,
            pollen_protocol::InferResponse::Ack { step: 7, .. }
        ));
        assert_eq!(len + 4, frame.len());
        let mut io = Cursor::new(frame[..frame.len() - 1].to_vec());
        let e = read_message::<pollen_protocol::InferResponse, _>(&mut io)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let mut claim = (2u32 << 20).to_le_bytes().to_vec();
        claim.extend_from_slice(&[0; 16]);
        let mut io = Cursor::new(claim);
        let e = read_message_max::<pollen_protocol::InferResponse, _>(&mut io, 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(io.position(), 4, "nothing past the length was read");
    }
}
