//! Frames: the bytes of every message, and the only module that knows the body encoding
//! (bincode 2, standard config: little-endian, variable-length integers). Swapping the
//! encoding touches this file alone.
//!
//! A frame is `[u32 little-endian body length][body]`. A reader takes the 4-byte prefix,
//! checks it against the message's maximum with [`check_frame_len`] *before* reading or
//! allocating anything, reads exactly that many bytes (capped, for example with
//! [`std::io::Read::take`]) and decodes them with [`decode_body`]. [`read_frame`] does all of
//! this over a [`std::io::Read`]; an async reader in another crate does the same steps
//! itself.
//!
//! Inside a body, every length (string, list, hidden-state blob) is checked against its
//! field's limit from [`crate::limits`] before anything is allocated, and bincode itself
//! decodes under a byte limit equal to the message maximum, so no claimed length (not even
//! 2^64 − 1) allocates past it. A body must be consumed exactly: trailing bytes are an
//! error. A decoded message is validated ([`crate::MessageError`]) before it is returned,
//! and [`encode_frame`] validates before it encodes, so a node never sends what its peer
//! would refuse.
//!
//! Body layouts (enum variants as a one-byte tag; `bytes` and lists as a varint count
//! then the items; ids, keys and signatures as raw fixed-size bytes):
//!
//! - `Hello`: version, model id option (tag 0/1, then 32 bytes), roles (u8), agent,
//!   extensions (bytes, empty in version 1 and ignored: later versions append fields
//!   there so that every version can decode every hello).
//! - `HelloReply`: 0 `Accept(Hello)` / 1 `Refuse(ProtocolError)`; `ProtocolError` is a
//!   u16 code and a message.
//! - `HiddenStates`: dtype tag (u8), shape (list of u32, 1 to 4), then the data as one
//!   blob whose length must equal what the shape and dtype need.
//! - `InferRequest`: 0 `Open` / 1 `Forward` / 2 `Close` / 3 `Attach`; `InferResponse`:
//!   0 `Opened` / 1 `Output` / 2 `Closed` / 3 `Error` / 4 `Ack` / 5 `HopFailed` /
//!   6 `Attached`; fields in declaration order, session ids as 8 little-endian bytes,
//!   booleans as one byte.
//! - `SignedAnnouncement`: the announcement's fields in declaration order, then the 32-byte
//!   public key and 64-byte signature.

use std::io::Read;

use bincode::config;
use bincode::de::Decoder;
use bincode::de::read::Reader;
use bincode::enc::write::{SizeWriter, Writer};
use bincode::enc::{Encoder, EncoderImpl};
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};

use crate::announce::{Announcement, PeerRtt, SignedAnnouncement};
use crate::error::{ErrorCode, ProtocolError};
use crate::hidden::{HiddenStates, WireDType};
use crate::limits::{
    MAX_ADDR_LEN, MAX_ADDRS, MAX_AGENT_LEN, MAX_ANNOUNCE_REQUEST_BYTES,
    MAX_ANNOUNCE_RESPONSE_BYTES, MAX_ANNOUNCEMENT_BYTES, MAX_COMPUTE_LEN, MAX_ERROR_MESSAGE_LEN,
    MAX_HELLO_BYTES, MAX_HIDDEN_DIMS, MAX_INFER_REQUEST_BYTES, MAX_INFER_RESPONSE_BYTES,
    MAX_LIST_ANNOUNCEMENTS, MAX_MODEL_NAME_LEN, MAX_PEER_ID_BYTES, MAX_PEER_RTTS, MAX_ROUTE_HOPS,
};
use crate::messages::{
    AnnounceRequest, AnnounceResponse, Hello, HelloReply, InferRequest, InferResponse,
    MessageError, RouteHop, SessionBudget,
};
use crate::types::{BlockRange, ModelId, PeerIdBytes, Roles, SessionId};

/// Bytes of the length prefix in front of every frame body.
pub const FRAME_HEADER_BYTES: usize = 4;

/// How much [`read_frame`] reserves up front; it grows the buffer as bytes actually arrive,
/// so a length prefix alone never makes it allocate the full claimed size.
const INITIAL_READ_CAPACITY: usize = 64 * 1024;

/// Why a frame could not be encoded, read or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The length prefix (or the body to encode) exceeds the maximum.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The claimed or actual body length.
        len: u64,
        /// The maximum that applied.
        max: usize,
    },
    /// The stream or buffer ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {actual}")]
    Truncated {
        /// Bytes the frame needs (prefix included).
        expected: usize,
        /// Bytes that were there.
        actual: usize,
    },
    /// The stream ended cleanly before a new frame began.
    #[error("stream ended before the next frame")]
    Eof,
    /// Bytes are left over after the message (inside the body, or after the frame).
    #[error("{message}: {extra} unexpected bytes after the message")]
    TrailingBytes {
        /// The message type.
        message: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// The body claims more bytes than the message's maximum.
    #[error("malformed {message}: claims more than the limit of {max} bytes")]
    LimitExceeded {
        /// The message type.
        message: &'static str,
        /// The maximum.
        max: usize,
    },
    /// The body is not a valid encoding of the message.
    #[error("malformed {message}: {reason}")]
    Malformed {
        /// The message type.
        message: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The message decoded (or was to be encoded) but breaks a limit or is inconsistent.
    #[error("invalid {message}: {source}")]
    Invalid {
        /// The message type.
        message: &'static str,
        /// What is wrong.
        source: MessageError,
    },
    /// The encoder failed (not expected to happen for any valid message).
    #[error("cannot encode {message}: {reason}")]
    Encode {
        /// The message type.
        message: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Reading from the stream failed.
    #[error("reading a frame failed: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The error a server reports to the peer that sent the bad frame.
    pub fn to_protocol_error(&self) -> ProtocolError {
        let code = match self {
            CodecError::FrameTooLarge { .. } | CodecError::LimitExceeded { .. } => {
                ErrorCode::OverBudget
            }
            CodecError::Invalid { source, .. } => return ProtocolError::from(source),
            CodecError::Io(_) | CodecError::Encode { .. } => ErrorCode::Internal,
            _ => ErrorCode::BadRequest,
        };
        ProtocolError::new(code, self.to_string())
    }
}

/// A message that travels as one frame: one of [`Hello`], [`HelloReply`],
/// [`InferRequest`], [`InferResponse`], [`SignedAnnouncement`], [`AnnounceRequest`],
/// [`AnnounceResponse`]. Sealed: the set is this crate's to define.
pub trait WireMessage: sealed::Message {
    /// The message's name, for errors and logs.
    const NAME: &'static str;
    /// The largest body (bytes after the length prefix) accepted for this message.
    const MAX_BYTES: usize;
}

/// The bincode configuration; decoding adds a byte limit per message.
const CONFIG: config::Configuration = config::standard();

/// Encodes `msg` as one frame: the 4-byte little-endian body length, then the body.
/// Validates the message first and refuses a body over [`WireMessage::MAX_BYTES`].
pub fn encode_frame<M: WireMessage>(msg: &M) -> Result<Vec<u8>, CodecError> {
    msg.check().map_err(|source| CodecError::Invalid {
        message: M::NAME,
        source,
    })?;
    let body_len = body_len(msg);
    if body_len > M::MAX_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: body_len as u64,
            max: M::MAX_BYTES,
        });
    }
    let prefix = u32::try_from(body_len).map_err(|_| CodecError::FrameTooLarge {
        len: body_len as u64,
        max: M::MAX_BYTES,
    })?;
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body_len);
    out.extend_from_slice(&prefix.to_le_bytes());
    let mut enc = EncoderImpl::new(VecSink(&mut out), CONFIG);
    msg.put(&mut enc).map_err(|e| CodecError::Encode {
        message: M::NAME,
        reason: format!("{e:?}"),
    })?;
    debug_assert_eq!(out.len(), FRAME_HEADER_BYTES + body_len);
    Ok(out)
}

/// The exact length of the frame [`encode_frame`] produces for `msg` (prefix included),
/// computed without encoding the payload bytes.
pub fn encoded_len<M: WireMessage>(msg: &M) -> usize {
    FRAME_HEADER_BYTES + body_len(msg)
}

fn body_len<M: sealed::Wire>(msg: &M) -> usize {
    let mut enc = EncoderImpl::new(SizeWriter::default(), CONFIG);
    // Writing to a `SizeWriter` cannot fail, and no `put` fails of its own accord.
    let _ = msg.put(&mut enc);
    enc.into_writer().bytes_written
}

/// Checks a frame's length prefix against `max` (normally [`WireMessage::MAX_BYTES`], or
/// less, such as a session's budget) and returns the body length to read. Call it before
/// reading or allocating the body.
pub fn check_frame_len(len_prefix: u32, max: usize) -> Result<usize, CodecError> {
    match usize::try_from(len_prefix) {
        Ok(len) if len <= max => Ok(len),
        _ => Err(CodecError::FrameTooLarge {
            len: u64::from(len_prefix),
            max,
        }),
    }
}

/// Decodes exactly one frame (prefix and body, nothing after) holding an `M`.
pub fn decode_frame<M: WireMessage>(frame: &[u8]) -> Result<M, CodecError> {
    let Some((prefix, body)) = frame.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(CodecError::Truncated {
            expected: FRAME_HEADER_BYTES,
            actual: frame.len(),
        });
    };
    let len = check_frame_len(u32::from_le_bytes(*prefix), M::MAX_BYTES)?;
    if body.len() < len {
        return Err(CodecError::Truncated {
            expected: FRAME_HEADER_BYTES + len,
            actual: frame.len(),
        });
    }
    if body.len() > len {
        return Err(CodecError::TrailingBytes {
            message: M::NAME,
            extra: body.len() - len,
        });
    }
    decode_body(body)
}

/// Decodes a frame body (the bytes after the length prefix) holding an `M`: for readers that
/// took the prefix and the body apart themselves.
pub fn decode_body<M: WireMessage>(body: &[u8]) -> Result<M, CodecError> {
    if body.len() > M::MAX_BYTES {
        return Err(CodecError::FrameTooLarge {
            len: body.len() as u64,
            max: M::MAX_BYTES,
        });
    }
    let (msg, used) = M::decode_limited(body).map_err(|e| decode_error::<M>(e))?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes {
            message: M::NAME,
            extra: body.len() - used,
        });
    }
    msg.check().map_err(|source| CodecError::Invalid {
        message: M::NAME,
        source,
    })?;
    Ok(msg)
}

/// Reads one frame holding an `M` from `reader`: the prefix, checked against the smaller
/// of `max` and [`WireMessage::MAX_BYTES`], then exactly that many bytes through
/// [`Read::take`], growing the buffer only as bytes arrive. Fails with [`CodecError::Eof`]
/// if the stream ends cleanly before the frame.
pub fn read_frame<M: WireMessage, R: Read>(mut reader: R, max: usize) -> Result<M, CodecError> {
    let max = max.min(M::MAX_BYTES);
    let mut prefix = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < FRAME_HEADER_BYTES {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Err(CodecError::Eof),
            Ok(0) => {
                return Err(CodecError::Truncated {
                    expected: FRAME_HEADER_BYTES,
                    actual: got,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_frame_len(u32::from_le_bytes(prefix), max)?;
    let mut body = Vec::with_capacity(len.min(INITIAL_READ_CAPACITY));
    reader.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(CodecError::Truncated {
            expected: FRAME_HEADER_BYTES + len,
            actual: FRAME_HEADER_BYTES + body.len(),
        });
    }
    decode_body(&body)
}

fn decode_error<M: WireMessage>(e: DecodeError) -> CodecError {
    let reason = match e {
        DecodeError::LimitExceeded => {
            return CodecError::LimitExceeded {
                message: M::NAME,
                max: M::MAX_BYTES,
            };
        }
        DecodeError::OtherString(s) => s,
        DecodeError::Other(s) => s.to_owned(),
        DecodeError::UnexpectedEnd { additional } => {
            format!("body ends early (at least {additional} more bytes needed)")
        }
        DecodeError::Utf8 { inner } => format!("invalid UTF-8 in a string: {inner}"),
        other => format!("{other:?}"),
    };
    CodecError::Malformed {
        message: M::NAME,
        reason,
    }
}

/// The sealed traits behind [`WireMessage`]: how each type is put on and taken off the
/// wire. Private, so that bincode stays an implementation detail of this module.
#[allow(unreachable_pub)] // sealed-trait pattern: public in name, unreachable in fact
mod sealed {
    use super::*;

    /// A type with a wire encoding.
    pub trait Wire: Sized {
        /// Writes `self`.
        fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError>;
        /// Reads a value, checking every length before allocating.
        fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError>;
    }

    /// A type that travels as a whole frame.
    pub trait Message: Wire {
        /// Decodes a body under the message's byte limit; returns the bytes used.
        fn decode_limited(body: &[u8]) -> Result<(Self, usize), DecodeError>;
        /// Validates a message (before sending, after receiving).
        fn check(&self) -> Result<(), MessageError>;
    }
}

use sealed::Wire;

/// Adapts a [`Wire`] type to bincode's decoding.
struct FromWire<T>(T);

impl<Ctx, T: Wire> Decode<Ctx> for FromWire<T> {
    fn decode<D: Decoder<Context = Ctx>>(d: &mut D) -> Result<Self, DecodeError> {
        T::get(d).map(FromWire)
    }
}

/// A bincode writer appending to a `Vec`.
struct VecSink<'a>(&'a mut Vec<u8>);

impl Writer for VecSink<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

macro_rules! wire_message {
    ($t:ty, $name:literal, $max:path) => {
        impl WireMessage for $t {
            const NAME: &'static str = $name;
            const MAX_BYTES: usize = $max;
        }

        impl sealed::Message for $t {
            fn decode_limited(body: &[u8]) -> Result<(Self, usize), DecodeError> {
                bincode::decode_from_slice::<FromWire<$t>, _>(body, CONFIG.with_limit::<{ $max }>())
                    .map(|(m, used)| (m.0, used))
            }

            fn check(&self) -> Result<(), MessageError> {
                self.validate()
            }
        }
    };
}

wire_message!(Hello, "hello", MAX_HELLO_BYTES);
wire_message!(HelloReply, "hello reply", MAX_HELLO_BYTES);
wire_message!(InferRequest, "infer request", MAX_INFER_REQUEST_BYTES);
wire_message!(InferResponse, "infer response", MAX_INFER_RESPONSE_BYTES);
wire_message!(
    SignedAnnouncement,
    "signed announcement",
    MAX_ANNOUNCEMENT_BYTES
);
wire_message!(
    AnnounceRequest,
    "announce request",
    MAX_ANNOUNCE_REQUEST_BYTES
);
wire_message!(
    AnnounceResponse,
    "announce response",
    MAX_ANNOUNCE_RESPONSE_BYTES
);

// ---- Helpers: lengths, bytes, strings, lists, tags ----

fn other(msg: String) -> DecodeError {
    DecodeError::OtherString(msg)
}

fn put_len<E: Encoder>(e: &mut E, n: usize) -> Result<(), EncodeError> {
    (n as u64).encode(e)
}

/// Reads a varint length and checks it against `max` before anything is allocated.
fn get_len<D: Decoder>(d: &mut D, max: usize, what: &str) -> Result<usize, DecodeError> {
    let n = u64::decode(d)?;
    match usize::try_from(n) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(other(format!(
            "{what} claims length {n}; the limit is {max}"
        ))),
    }
}

/// Reads `n` raw bytes, allocating only as much as the input actually holds: one copy
/// when the input is a slice, chunks otherwise.
fn get_raw<D: Decoder>(d: &mut D, n: usize) -> Result<Vec<u8>, DecodeError> {
    d.claim_bytes_read(n)?;
    if let Some(bytes) = d.reader().peek_read(n) {
        let v = bytes.to_vec();
        d.reader().consume(n);
        return Ok(v);
    }
    const CHUNK: usize = 64 * 1024;
    let mut v = Vec::with_capacity(n.min(CHUNK));
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        let start = v.len();
        v.resize(start + k, 0);
        d.reader().read(&mut v[start..])?;
        left -= k;
    }
    Ok(v)
}

fn get_array<D: Decoder, const N: usize>(d: &mut D) -> Result<[u8; N], DecodeError> {
    d.claim_bytes_read(N)?;
    let mut out = [0u8; N];
    d.reader().read(&mut out)?;
    Ok(out)
}

fn put_bytes<E: Encoder>(e: &mut E, bytes: &[u8]) -> Result<(), EncodeError> {
    put_len(e, bytes.len())?;
    e.writer().write(bytes)
}

fn get_bytes<D: Decoder>(d: &mut D, max: usize, what: &str) -> Result<Vec<u8>, DecodeError> {
    let n = get_len(d, max, what)?;
    get_raw(d, n)
}

fn get_string<D: Decoder>(d: &mut D, max: usize, what: &str) -> Result<String, DecodeError> {
    String::from_utf8(get_bytes(d, max, what)?).map_err(|e| DecodeError::Utf8 {
        inner: e.utf8_error(),
    })
}

fn put_strings<E: Encoder>(e: &mut E, strings: &[String]) -> Result<(), EncodeError> {
    put_len(e, strings.len())?;
    for s in strings {
        put_bytes(e, s.as_bytes())?;
    }
    Ok(())
}

fn get_addrs<D: Decoder>(d: &mut D) -> Result<Vec<String>, DecodeError> {
    let n = get_len(d, MAX_ADDRS, "address list")?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(get_string(d, MAX_ADDR_LEN, "address")?);
    }
    Ok(v)
}

fn put_list<E: Encoder, T: Wire>(e: &mut E, items: &[T]) -> Result<(), EncodeError> {
    put_len(e, items.len())?;
    items.iter().try_for_each(|t| t.put(e))
}

fn get_list<D: Decoder, T: Wire>(d: &mut D, max: usize, what: &str) -> Result<Vec<T>, DecodeError> {
    let n = get_len(d, max, what)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(T::get(d)?);
    }
    Ok(v)
}

fn put_tag<E: Encoder>(e: &mut E, tag: u8) -> Result<(), EncodeError> {
    tag.encode(e)
}

fn get_tag<D: Decoder>(d: &mut D) -> Result<u8, DecodeError> {
    u8::decode(d)
}

fn unknown_tag(what: &str, tag: u8) -> DecodeError {
    other(format!("unknown {what} variant tag {tag}"))
}

// ---- Wire encodings of the domain types ----

macro_rules! wire_via_bincode {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
                self.encode(e)
            }
            fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
                <$t>::decode(d)
            }
        }
    )*};
}

wire_via_bincode!(u32);

impl Wire for ModelId {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        e.writer().write(self.as_bytes())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        get_array::<_, 32>(d).map(ModelId::from_bytes)
    }
}

impl Wire for SessionId {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        e.writer().write(&self.0.to_le_bytes())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        get_array::<_, 8>(d).map(|b| SessionId(u64::from_le_bytes(b)))
    }
}

impl Wire for BlockRange {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.start().encode(e)?;
        self.end().encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let start = u32::decode(d)?;
        let end = u32::decode(d)?;
        BlockRange::new(start, end).map_err(|e| other(e.to_string()))
    }
}

impl Wire for PeerIdBytes {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        put_bytes(e, &self.0)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        get_bytes(d, MAX_PEER_ID_BYTES, "peer id").map(PeerIdBytes)
    }
}

impl Wire for Roles {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.bits().encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        u8::decode(d).map(Roles::from_bits)
    }
}

impl Wire for WireDType {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        put_tag(e, self.tag())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let tag = get_tag(d)?;
        WireDType::from_tag(tag).ok_or_else(|| other(format!("unknown wire dtype tag {tag}")))
    }
}

impl Wire for HiddenStates {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.dtype().put(e)?;
        put_list(e, self.shape())?;
        put_bytes(e, self.data())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let dtype = WireDType::get(d)?;
        let shape: Vec<u32> = get_list(d, MAX_HIDDEN_DIMS, "hidden states shape")?;
        let expected =
            HiddenStates::byte_len_for(dtype, &shape).map_err(|e| other(e.to_string()))?;
        let claimed = u64::decode(d)?;
        if claimed != expected as u64 {
            return Err(other(format!(
                "hidden states claim {claimed} bytes but shape {shape:?} of {dtype} needs {expected}"
            )));
        }
        let data = get_raw(d, expected)?;
        HiddenStates::new(dtype, shape, data).map_err(|e| other(e.to_string()))
    }
}

impl Wire for ErrorCode {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.as_u16().encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        ErrorCode::try_from(u16::decode(d)?).map_err(|e| other(e.to_string()))
    }
}

impl Wire for ProtocolError {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.code.put(e)?;
        put_bytes(e, self.message.as_bytes())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(ProtocolError {
            code: ErrorCode::get(d)?,
            message: get_string(d, MAX_ERROR_MESSAGE_LEN, "error message")?,
        })
    }
}

impl Wire for Hello {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.version.encode(e)?;
        match &self.model_id {
            None => put_tag(e, 0)?,
            Some(id) => {
                put_tag(e, 1)?;
                id.put(e)?;
            }
        }
        self.roles.put(e)?;
        put_bytes(e, self.agent.as_bytes())?;
        // Extensions: empty in this version.
        put_bytes(e, &[])
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let version = u32::decode(d)?;
        let model_id = match get_tag(d)? {
            0 => None,
            1 => Some(ModelId::get(d)?),
            t => return Err(unknown_tag("model id option", t)),
        };
        let roles = Roles::get(d)?;
        let agent = get_string(d, MAX_AGENT_LEN, "agent")?;
        // Extensions from later versions are skipped (read, bounded, and dropped).
        let _extensions = get_bytes(d, MAX_HELLO_BYTES, "hello extensions")?;
        Ok(Hello {
            version,
            model_id,
            roles,
            agent,
        })
    }
}

impl Wire for HelloReply {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            HelloReply::Accept(h) => {
                put_tag(e, 0)?;
                h.put(e)
            }
            HelloReply::Refuse(err) => {
                put_tag(e, 1)?;
                err.put(e)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Hello::get(d).map(HelloReply::Accept),
            1 => ProtocolError::get(d).map(HelloReply::Refuse),
            t => Err(unknown_tag("hello reply", t)),
        }
    }
}

impl Wire for RouteHop {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.peer.put(e)?;
        self.blocks.put(e)?;
        put_strings(e, &self.addrs)?;
        self.step_us.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(RouteHop {
            peer: PeerIdBytes::get(d)?,
            blocks: BlockRange::get(d)?,
            addrs: get_addrs(d)?,
            step_us: u32::decode(d)?,
        })
    }
}

impl Wire for SessionBudget {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.max_tokens.encode(e)?;
        self.max_message_bytes.encode(e)?;
        self.idle_timeout_ms.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(SessionBudget {
            max_tokens: u32::decode(d)?,
            max_message_bytes: u32::decode(d)?,
            idle_timeout_ms: u32::decode(d)?,
        })
    }
}

impl Wire for InferRequest {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            InferRequest::Open {
                session,
                model_id,
                route,
                hop,
                budget,
                wire_dtype,
                compute,
                client,
            } => {
                put_tag(e, 0)?;
                session.put(e)?;
                model_id.put(e)?;
                put_list(e, route)?;
                hop.encode(e)?;
                budget.put(e)?;
                wire_dtype.put(e)?;
                put_bytes(e, compute.as_bytes())?;
                client.put(e)
            }
            InferRequest::Forward {
                session,
                position,
                step,
                hidden,
                last_row_only,
            } => {
                put_tag(e, 1)?;
                session.put(e)?;
                position.encode(e)?;
                step.encode(e)?;
                hidden.put(e)?;
                last_row_only.encode(e)
            }
            InferRequest::Close { session } => {
                put_tag(e, 2)?;
                session.put(e)
            }
            InferRequest::Attach { session } => {
                put_tag(e, 3)?;
                session.put(e)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Ok(InferRequest::Open {
                session: SessionId::get(d)?,
                model_id: ModelId::get(d)?,
                route: get_list(d, MAX_ROUTE_HOPS, "route")?,
                hop: u32::decode(d)?,
                budget: SessionBudget::get(d)?,
                wire_dtype: WireDType::get(d)?,
                compute: get_string(d, MAX_COMPUTE_LEN, "compute mode")?,
                client: PeerIdBytes::get(d)?,
            }),
            1 => Ok(InferRequest::Forward {
                session: SessionId::get(d)?,
                position: u32::decode(d)?,
                step: u64::decode(d)?,
                hidden: HiddenStates::get(d)?,
                last_row_only: bool::decode(d)?,
            }),
            2 => Ok(InferRequest::Close {
                session: SessionId::get(d)?,
            }),
            3 => Ok(InferRequest::Attach {
                session: SessionId::get(d)?,
            }),
            t => Err(unknown_tag("infer request", t)),
        }
    }
}

impl Wire for InferResponse {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            InferResponse::Opened {
                session,
                free_tokens,
            } => {
                put_tag(e, 0)?;
                session.put(e)?;
                free_tokens.encode(e)
            }
            InferResponse::Output {
                session,
                step,
                position,
                hidden,
            } => {
                put_tag(e, 1)?;
                session.put(e)?;
                step.encode(e)?;
                position.encode(e)?;
                hidden.put(e)
            }
            InferResponse::Closed { session } => {
                put_tag(e, 2)?;
                session.put(e)
            }
            InferResponse::Error(err) => {
                put_tag(e, 3)?;
                err.put(e)
            }
            InferResponse::Ack { session, step } => {
                put_tag(e, 4)?;
                session.put(e)?;
                step.encode(e)
            }
            InferResponse::HopFailed {
                session,
                step,
                hop,
                peer,
                error,
            } => {
                put_tag(e, 5)?;
                session.put(e)?;
                step.encode(e)?;
                hop.encode(e)?;
                peer.put(e)?;
                error.put(e)
            }
            InferResponse::Attached { session } => {
                put_tag(e, 6)?;
                session.put(e)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Ok(InferResponse::Opened {
                session: SessionId::get(d)?,
                free_tokens: u32::decode(d)?,
            }),
            1 => Ok(InferResponse::Output {
                session: SessionId::get(d)?,
                step: u64::decode(d)?,
                position: u32::decode(d)?,
                hidden: HiddenStates::get(d)?,
            }),
            2 => Ok(InferResponse::Closed {
                session: SessionId::get(d)?,
            }),
            3 => ProtocolError::get(d).map(InferResponse::Error),
            4 => Ok(InferResponse::Ack {
                session: SessionId::get(d)?,
                step: u64::decode(d)?,
            }),
            5 => Ok(InferResponse::HopFailed {
                session: SessionId::get(d)?,
                step: u64::decode(d)?,
                hop: u32::decode(d)?,
                peer: PeerIdBytes::get(d)?,
                error: ProtocolError::get(d)?,
            }),
            6 => Ok(InferResponse::Attached {
                session: SessionId::get(d)?,
            }),
            t => Err(unknown_tag("infer response", t)),
        }
    }
}

impl Wire for Announcement {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.peer.put(e)?;
        self.model_id.put(e)?;
        put_bytes(e, self.model_name.as_bytes())?;
        self.num_blocks.encode(e)?;
        self.blocks.put(e)?;
        self.throughput.encode(e)?;
        self.free_sessions.encode(e)?;
        self.free_cache_tokens.encode(e)?;
        put_strings(e, &self.addrs)?;
        put_bytes(e, self.compute.as_bytes())?;
        put_list(e, &self.next_rtts)?;
        self.issued_at_ms.encode(e)?;
        self.expires_at_ms.encode(e)?;
        self.seq.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(Announcement {
            peer: PeerIdBytes::get(d)?,
            model_id: ModelId::get(d)?,
            model_name: get_string(d, MAX_MODEL_NAME_LEN, "model name")?,
            num_blocks: u32::decode(d)?,
            blocks: BlockRange::get(d)?,
            throughput: f32::decode(d)?,
            free_sessions: u32::decode(d)?,
            free_cache_tokens: u32::decode(d)?,
            addrs: get_addrs(d)?,
            compute: get_string(d, MAX_COMPUTE_LEN, "compute mode")?,
            next_rtts: get_list(d, MAX_PEER_RTTS, "round-trip times")?,
            issued_at_ms: u64::decode(d)?,
            expires_at_ms: u64::decode(d)?,
            seq: u64::decode(d)?,
        })
    }
}

impl Wire for PeerRtt {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.peer.put(e)?;
        self.rtt_us.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(PeerRtt {
            peer: PeerIdBytes::get(d)?,
            rtt_us: u32::decode(d)?,
        })
    }
}

impl Wire for SignedAnnouncement {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.announcement.put(e)?;
        e.writer().write(&self.public_key)?;
        e.writer().write(&self.signature)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(SignedAnnouncement {
            announcement: Announcement::get(d)?,
            public_key: get_array(d)?,
            signature: get_array(d)?,
        })
    }
}

impl Wire for AnnounceRequest {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            AnnounceRequest::Get { model_id } => {
                put_tag(e, 0)?;
                model_id.put(e)
            }
            AnnounceRequest::Publish(a) => {
                put_tag(e, 1)?;
                a.put(e)
            }
            AnnounceRequest::List { model_id } => {
                put_tag(e, 2)?;
                match model_id {
                    None => put_tag(e, 0),
                    Some(m) => {
                        put_tag(e, 1)?;
                        m.put(e)
                    }
                }
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Ok(AnnounceRequest::Get {
                model_id: ModelId::get(d)?,
            }),
            1 => SignedAnnouncement::get(d).map(|a| AnnounceRequest::Publish(Box::new(a))),
            2 => {
                let model_id = match get_tag(d)? {
                    0 => None,
                    1 => Some(ModelId::get(d)?),
                    t => return Err(unknown_tag("model filter", t)),
                };
                Ok(AnnounceRequest::List { model_id })
            }
            t => Err(unknown_tag("announce request", t)),
        }
    }
}

impl Wire for AnnounceResponse {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            AnnounceResponse::Announcement(a) => {
                put_tag(e, 0)?;
                a.put(e)
            }
            AnnounceResponse::NotServing => put_tag(e, 1),
            AnnounceResponse::Accepted => put_tag(e, 2),
            AnnounceResponse::Refused(err) => {
                put_tag(e, 3)?;
                err.put(e)
            }
            AnnounceResponse::List(list) => {
                put_tag(e, 4)?;
                put_list(e, list)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => SignedAnnouncement::get(d).map(|a| AnnounceResponse::Announcement(Box::new(a))),
            1 => Ok(AnnounceResponse::NotServing),
            2 => Ok(AnnounceResponse::Accepted),
            3 => ProtocolError::get(d).map(AnnounceResponse::Refused),
            4 => Ok(AnnounceResponse::List(get_list(
                d,
                MAX_LIST_ANNOUNCEMENTS,
                "announcement list",
            )?)),
            t => Err(unknown_tag("announce response", t)),
        }
    }
}
