//! Every size limit of the wire protocol, and why each number is what it is.
//!
//! Two layers hold: each frame's length prefix is checked against its message's maximum
//! (the `MAX_*_BYTES` below) before its body is read, and inside a body every length
//! (strings, lists, the hidden-state blob) is checked against its field's maximum before
//! anything is allocated. A limit is broken with a clear error, never a panic or a large
//! allocation.

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Largest peer id, in bytes. An ed25519 libp2p peer id (identity multihash of the
/// protobuf-encoded key) is 38 bytes, a sha256 one 34; libp2p inlines keys up to 42 bytes.
pub const MAX_PEER_ID_BYTES: usize = 64;

/// Longest multiaddr string. Real ones (`/ip6/…/udp/…/quic-v1/p2p/…/p2p-circuit/p2p/…`,
/// relayed with two peer ids) stay well under 200 bytes.
pub const MAX_ADDR_LEN: usize = 256;

/// Most addresses per peer, in an announcement or a route hop. A node rarely listens on
/// more than a handful (IPv4/IPv6 × TCP/QUIC, plus a relayed address or two).
pub const MAX_ADDRS: usize = 16;

/// Longest agent string in a hello (`pollen/0.1.0 (linux x86_64)` and the like).
pub const MAX_AGENT_LEN: usize = 256;

/// Longest human-readable message in a [`crate::ProtocolError`].
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// Longest display name of a model in an announcement (a file or repository name).
pub const MAX_MODEL_NAME_LEN: usize = 256;

/// Longest name of a compute mode in an announcement or a session (`fast/cpu`,
/// `q8_0/cpu-vnni`, `exact/cpu-aarch64-i8mm-kc1024-libm1a2b3c`, …): short identifiers,
/// compared for equality only. 48 since names carry the C library's mathematics where
/// it is not glibc's (32 before: older nodes refuse longer names, which never equal
/// theirs).
pub const MAX_COMPUTE_LEN: usize = 48;

/// Most measured round-trip times to next-span servers in one announcement. A server
/// measures the few servers whose spans start where its own ends; 16 is plenty.
pub const MAX_PEER_RTTS: usize = 16;

/// Longest architecture name in a manifest (`llama`, `qwen2`, …).
pub const MAX_ARCHITECTURE_LEN: usize = 64;

/// Most transformer blocks a manifest may list. The largest open models have about 130.
pub const MAX_MANIFEST_BLOCKS: usize = 1024;

/// Most hops in an inference route: one block per server for a 128-block model. Real
/// routes have a handful of hops.
pub const MAX_ROUTE_HOPS: usize = 128;

/// Most dimensions of a hidden-state tensor (`[batch, tokens, hidden]` needs 3).
pub const MAX_HIDDEN_DIMS: usize = 4;

/// Largest hidden-state payload in bytes: a 4096-token f32 prefill of hidden size 4096
/// (4096 × 4096 × 4 = 64 MiB). Longer prompts are sent in several chunks.
pub const MAX_HIDDEN_BYTES: usize = 64 * MIB;

/// Largest [`crate::Hello`] (and [`crate::HelloReply`]) body. A hello is about 300 bytes
/// (version, model id, roles, an agent of at most [`MAX_AGENT_LEN`]); a refusal about
/// [`MAX_ERROR_MESSAGE_LEN`]. 4 KiB leaves room for fields later versions append.
pub const MAX_HELLO_BYTES: usize = 4 * KIB;

/// Largest [`crate::SignedAnnouncement`] body. The worst case within the field limits is
/// about 4.7 KiB ([`MAX_ADDRS`] × [`MAX_ADDR_LEN`] dominates); 16 KiB leaves headroom and
/// stays far under Kademlia's default record limit of 65 KiB.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 16 * KIB;

/// Largest [`crate::AnnounceRequest`] body: a tag and one signed announcement.
pub const MAX_ANNOUNCE_REQUEST_BYTES: usize = MAX_ANNOUNCEMENT_BYTES + 16;

/// Most announcements in one [`crate::AnnounceResponse::List`]: a model served by 1,000
/// servers in spans of a tenth of its blocks has ~100 announcements per tenth; 1,024
/// covers a whole model's swarm at that size in one answer.
pub const MAX_LIST_ANNOUNCEMENTS: usize = 1024;

/// Largest [`crate::AnnounceResponse`] body. A typical announcement is 200–400 bytes
/// (one or two addresses), so 1,024 of them fit in well under 1 MiB; 4 MiB bounds a list
/// of fatter ones. Senders trim a list to fit.
pub const MAX_ANNOUNCE_RESPONSE_BYTES: usize = 4 * MIB;

/// Headroom above [`MAX_HIDDEN_BYTES`] for everything in an inference frame that is not
/// the hidden-state blob. The largest such part is an `Open` with [`MAX_ROUTE_HOPS`] hops of
/// [`MAX_ADDRS`] addresses each: 128 × (66 + 16 × 258) ≈ 537 KiB.
pub const INFER_OVERHEAD_BYTES: usize = MIB;

/// Largest [`crate::InferRequest`] body: one maximal hidden-state payload plus
/// [`INFER_OVERHEAD_BYTES`] (65 MiB).
pub const MAX_INFER_REQUEST_BYTES: usize = MAX_HIDDEN_BYTES + INFER_OVERHEAD_BYTES;

/// Largest [`crate::InferResponse`] body: like a request, one maximal hidden-state payload
/// plus headroom.
pub const MAX_INFER_RESPONSE_BYTES: usize = MAX_HIDDEN_BYTES + INFER_OVERHEAD_BYTES;

/// Largest body of any frame: the largest of the per-message maxima. A reader that does not
/// yet know which message comes next may use it; one that knows should use the message's
/// own maximum ([`crate::WireMessage::MAX_BYTES`]).
pub const MAX_FRAME_BYTES: usize = MAX_INFER_REQUEST_BYTES;

/// Longest idle timeout a client may ask a server to keep a session for (10 minutes).
pub const MAX_IDLE_TIMEOUT_MS: u32 = 10 * 60 * 1000;

/// Longest time an opener may give a hop to answer its `Open` (80 s): the hop holds a
/// session slot and a KV promise while it opens the rest of the route.
pub const MAX_OPEN_WITHIN_MS: u32 = 80 * 1000;

// The length prefix is a u32, so every maximum must fit in one.
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_INFER_RESPONSE_BYTES <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_ANNOUNCE_RESPONSE_BYTES <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_HELLO_BYTES <= MAX_FRAME_BYTES);
