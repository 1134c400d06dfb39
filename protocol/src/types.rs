//! Small domain types shared by every message: model ids, block ranges, peer ids, roles
//! and session ids.

use std::fmt;
use std::str::FromStr;

use crate::hex;
use crate::limits::MAX_PEER_ID_BYTES;

/// The id of a model: the blake3 hash of its manifest's canonical bytes
/// (see [`crate::Manifest::id`]).
///
/// Displayed and parsed as 64 lowercase hex digits (parsing also accepts uppercase).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId([u8; 32]);

impl ModelId {
    /// Wraps a 32-byte hash.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 hash bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 32 hash bytes, by value.
    pub const fn to_bytes(self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex::write(f, &self.0)
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ModelId(")?;
        hex::write(f, &self.0)?;
        f.write_str(")")
    }
}

/// A string that is not 64 hex digits was given as a model id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model id {input:?}: expected 64 hex digits")]
pub struct ModelIdParseError {
    /// The rejected input, truncated to 80 characters.
    pub input: String,
}

impl FromStr for ModelId {
    type Err = ModelIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode32(s).map(Self).ok_or_else(|| ModelIdParseError {
            input: s.chars().take(80).collect(),
        })
    }
}

impl serde::Serialize for ModelId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ModelId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A half-open range `[start, end)` of transformer block indices, never empty.
///
/// The fields are private so that every `BlockRange` in memory satisfies `start < end`;
/// build one with [`BlockRange::new`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRange {
    start: u32,
    end: u32,
}

/// A block range that is empty or reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid block range [{start}, {end}): start must be below end")]
pub struct BlockRangeError {
    /// The rejected start.
    pub start: u32,
    /// The rejected end.
    pub end: u32,
}

impl BlockRange {
    /// The blocks `start..end`; fails unless `start < end`.
    pub const fn new(start: u32, end: u32) -> Result<Self, BlockRangeError> {
        if start < end {
            Ok(Self { start, end })
        } else {
            Err(BlockRangeError { start, end })
        }
    }

    /// The first block in the range.
    pub const fn start(&self) -> u32 {
        self.start
    }

    /// One past the last block in the range.
    pub const fn end(&self) -> u32 {
        self.end
    }

    /// The number of blocks (at least 1).
    pub const fn len(&self) -> u32 {
        self.end - self.start
    }

    /// Always `false`: a `BlockRange` holds at least one block. Present for clippy's
    /// `len_without_is_empty`.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Whether block `block` lies in the range.
    pub const fn contains(&self, block: u32) -> bool {
        self.start <= block && block < self.end
    }

    /// Whether the range lies inside a model of `num_blocks` blocks.
    pub const fn fits_in(&self, num_blocks: u32) -> bool {
        self.end <= num_blocks
    }

    /// As a standard range, for iteration.
    pub const fn as_range(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

impl fmt::Debug for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockRange[{}, {})", self.start, self.end)
    }
}

impl TryFrom<std::ops::Range<u32>> for BlockRange {
    type Error = BlockRangeError;

    fn try_from(r: std::ops::Range<u32>) -> Result<Self, Self::Error> {
        Self::new(r.start, r.end)
    }
}

/// A libp2p peer id as its raw multihash bytes (`PeerId::to_bytes()`).
///
/// The protocol crate does not depend on libp2p; the node converts with
/// `PeerId::from_bytes(&p.0)` (which can fail: the bytes come from the network).
/// For an ed25519 key, see [`crate::peer_id_bytes_for_ed25519`]. Decoding caps the length
/// at [`MAX_PEER_ID_BYTES`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerIdBytes(pub Vec<u8>);

impl PeerIdBytes {
    /// Whether the length is plausible for a peer id: non-empty and at most
    /// [`MAX_PEER_ID_BYTES`].
    pub fn is_plausible(&self) -> bool {
        !self.0.is_empty() && self.0.len() <= MAX_PEER_ID_BYTES
    }
}

impl fmt::Debug for PeerIdBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerIdBytes(")?;
        hex::write(f, &self.0)?;
        f.write_str(")")
    }
}

impl fmt::Display for PeerIdBytes {
    /// Hex of the multihash bytes (the node prints the base58 form via libp2p instead).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex::write(f, &self.0)
    }
}

/// What a peer does in the swarm, as a set of flags.
///
/// Unknown bits received from a peer are kept (and ignored by [`Roles::contains`] checks
/// for known roles), so a newer peer's extra roles do not make its hello undecodable.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Roles(u8);

impl Roles {
    /// No role.
    pub const NONE: Roles = Roles(0);
    /// Runs generations: holds the model's ends and drives sessions through servers.
    pub const CLIENT: Roles = Roles(1);
    /// Hosts a span of blocks and serves inference sessions.
    pub const SERVER: Roles = Roles(1 << 1);
    /// A stable entry point (and relay) into the swarm.
    pub const BOOTSTRAP: Roles = Roles(1 << 2);

    /// The raw flag bits (as they travel on the wire).
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Roles from raw bits, keeping unknown bits.
    pub const fn from_bits(bits: u8) -> Self {
        Self(bits)
    }

    /// Whether every role in `other` is in `self`.
    pub const fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two role sets.
    #[must_use]
    pub const fn with(self, other: Roles) -> Roles {
        Roles(self.0 | other.0)
    }
}

impl std::ops::BitOr for Roles {
    type Output = Roles;

    fn bitor(self, rhs: Roles) -> Roles {
        self.with(rhs)
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names = Vec::new();
        for (flag, name) in [
            (Roles::CLIENT, "client"),
            (Roles::SERVER, "server"),
            (Roles::BOOTSTRAP, "bootstrap"),
        ] {
            if self.contains(flag) {
                names.push(name.to_owned());
            }
        }
        let unknown = self.0 & !0b111;
        if unknown != 0 {
            names.push(format!("unknown({unknown:#04x})"));
        }
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

/// The id of an inference session, chosen at random by the client.
///
/// Servers key sessions by (client peer, session id), so ids need only be unique per client.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({:016x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn model_id_hex_round_trip() {
        let id = ModelId::from_bytes(std::array::from_fn(|i| i as u8));
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s.parse::<ModelId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<ModelId>().unwrap(), id);
        assert!("abc".parse::<ModelId>().is_err());
        assert!("g".repeat(64).parse::<ModelId>().is_err());
        // A multi-byte character must not confuse the length check.
        assert!(format!("é{}", "0".repeat(62)).parse::<ModelId>().is_err());
    }

    #[test]
    fn block_range_rejects_empty_and_reversed() {
        assert!(BlockRange::new(3, 3).is_err());
        assert!(BlockRange::new(4, 3).is_err());
        let r = BlockRange::new(0, 30).unwrap();
        assert_eq!(r.len(), 30);
        assert!(r.contains(29) && !r.contains(30));
        assert!(r.fits_in(30) && !r.fits_in(29));
        assert_eq!(
            BlockRange::new(5, 2).unwrap_err().to_string(),
            "invalid block range [5, 2): start must be below end"
        );
    }

    #[test]
    fn roles_display() {
        assert_eq!((Roles::CLIENT | Roles::SERVER).to_string(), "client+server");
        assert_eq!(Roles::NONE.to_string(), "none");
        assert_eq!(Roles::from_bits(0x0a).to_string(), "server+unknown(0x08)");
        assert!(Roles::from_bits(0xff).contains(Roles::BOOTSTRAP));
    }
}
