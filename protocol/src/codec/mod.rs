//! Frames: the bytes of every message, and the only module that knows the body encoding
//! (bincode 2, standard config: little-endian, variable-length integers). Swapping the
//! encoding touches this module alone.
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
//!   booleans as one byte, a `HopFailed`'s signature as its raw 64 bytes.
//! - `SignedAnnouncement`: the announcement's fields in declaration order, then the 32-byte
//!   public key and 64-byte signature.
//!
//! Inside, one job per file: `frame` the length prefix, the frame entry points, their
//! errors and the sealed traits that make a type a message; `primitives` the length, byte,
//! string, list and tag helpers over bincode's encoder and decoder; `messages` the body
//! layout of every message and of the field types inside them.

mod frame;
mod messages;
mod primitives;

pub use frame::{
    CodecError, FRAME_HEADER_BYTES, WireMessage, check_frame_len, decode_body, decode_frame,
    encode_frame, encoded_len, read_frame,
};
