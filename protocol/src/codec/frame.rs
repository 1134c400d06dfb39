//! The frame: a 4-byte little-endian length prefix and a body. The entry points that encode,
//! check, decode and read frames, the errors they return, and the sealed traits that make a
//! type a [`WireMessage`], with each message's name and maximum body.

use std::io::Read;

use bincode::Decode;
use bincode::config;
use bincode::de::Decoder;
use bincode::enc::EncoderImpl;
use bincode::enc::write::{SizeWriter, Writer};
use bincode::error::{DecodeError, EncodeError};

use crate::announce::SignedAnnouncement;
use crate::error::{ErrorCode, ProtocolError};
use crate::limits::{
    MAX_ANNOUNCE_REQUEST_BYTES, MAX_ANNOUNCE_RESPONSE_BYTES, MAX_ANNOUNCEMENT_BYTES,
    MAX_HELLO_BYTES, MAX_INFER_REQUEST_BYTES, MAX_INFER_RESPONSE_BYTES,
};
use crate::messages::{
    AnnounceRequest, AnnounceResponse, Hello, HelloReply, InferRequest, InferResponse, MessageError,
};

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
/// wire. Private to [`crate::codec`], so that bincode stays an implementation detail of it.
#[allow(unreachable_pub)] // sealed-trait pattern: public in name, unreachable in fact
pub(super) mod sealed {
    use bincode::de::Decoder;
    use bincode::enc::Encoder;
    use bincode::error::{DecodeError, EncodeError};

    use crate::validate::MessageError;

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
