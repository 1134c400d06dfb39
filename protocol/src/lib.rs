//! What crosses the wire between Pollen peers: message types, the frame codec and its size
//! limits, model manifests (whose blake3 hash is the model id) and signed server
//! announcements.
//!
//! This crate is the contract that the swarm, server and client code in `pollen-node`
//! builds on. It is pure data and pure functions: it knows nothing of libp2p, tokio or
//! candle, performs no network I/O of its own (only [`codec::read_frame`] over any
//! [`std::io::Read`]), and does no tensor math beyond converting hidden states between
//! f32 and the wire dtypes. Peer ids travel as raw bytes ([`PeerIdBytes`]), so the crate
//! does not depend on libp2p's types either.
//!
//! Layout, from the bytes up:
//!
//! - [`limits`]: every size limit, with the reasoning behind each number.
//! - [`codec`]: length-prefixed frames, the only place that knows the body encoding.
//! - `validate`: [`MessageError`] and the field checks that messages and announcements share.
//! - [`messages`]: handshake, inference session and error messages.
//! - [`hidden`]: hidden states as raw little-endian bytes with a shape and a dtype.
//! - [`manifest`]: the model manifest and its canonical bytes.
//! - [`announce`]: signed announcements, their verification and replay protection.
//! - [`report`]: signed failure reports and who they may speak about.
//!
//! Nothing decoded from a peer is trusted: every length is checked before allocation,
//! every frame is capped by a per-message maximum, and every decoded message is validated
//! before it is handed out.

pub mod announce;
pub mod codec;
pub mod error;
pub mod hidden;
pub mod limits;
pub mod manifest;
pub mod messages;
pub mod report;

mod hex;
mod types;
mod validate;

pub use announce::{
    AnnounceError, Announcement, FreshnessPolicy, PeerRtt, ReplayGuard, SignedAnnouncement,
    VerifiedAnnouncement, peer_id_bytes_for_ed25519,
};
pub use codec::{
    CodecError, FRAME_HEADER_BYTES, WireMessage, check_frame_len, decode_body, decode_frame,
    encode_frame, encoded_len, read_frame,
};
pub use error::{ErrorCode, ProtocolError, UnknownErrorCode};
pub use hidden::{HiddenError, HiddenStates, WireDType};
pub use manifest::{ArchConfig, Manifest, ManifestError};
pub use messages::{
    AnnounceRequest, AnnounceResponse, Hello, HelloReply, InferRequest, InferResponse, ListCursor,
    MessageError, RouteHop, SessionBudget, negotiate,
};
pub use report::{
    REPORT_SIGNATURE_LEN, ReportError, Reported, SessionBinding, check_report, ed25519_key_of_peer,
};
pub use types::{
    BlockRange, BlockRangeError, ModelId, ModelIdParseError, PeerIdBytes, Roles, SessionId,
};
pub use validate::printable;

/// The version of the Pollen wire protocol this crate speaks.
///
/// Two peers talk only if their versions are equal; [`negotiate`] checks it during the
/// [`Hello`] exchange. Bump it whenever any message layout or meaning changes.
pub const PROTOCOL_VERSION: u32 = 9;

/// The libp2p protocol name of the version handshake.
///
/// Its `/1` is the version of the *handshake frame layout*, which is frozen: every future
/// protocol version keeps [`Hello`] and [`HelloReply`] decodable by older peers, so that two
/// nodes of different [`PROTOCOL_VERSION`]s can still tell each other why they refuse, instead
/// of failing protocol selection with no explanation.
pub const HELLO_PROTOCOL: &str = "/pollen/hello/1";

/// The libp2p protocol name of inference session streams: [`InferRequest`]s down,
/// [`InferResponse`]s up, one stream per session and hop (see [`InferRequest`]).
///
/// Its version is [`PROTOCOL_VERSION`].
pub const INFER_PROTOCOL: &str = "/pollen/infer/9";

/// The libp2p protocol name for asking a peer directly for its current signed announcement
/// ([`AnnounceRequest`] / [`AnnounceResponse`]).
///
/// Its version is [`PROTOCOL_VERSION`].
pub const ANNOUNCE_PROTOCOL: &str = "/pollen/announce/9";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_carry_the_version() {
        let v = format!("/{PROTOCOL_VERSION}");
        assert!(INFER_PROTOCOL.ends_with(&v));
        assert!(ANNOUNCE_PROTOCOL.ends_with(&v));
        assert!(HELLO_PROTOCOL.starts_with("/pollen/hello/"));
    }
}
