//! Signed server announcements: what a server serves, signed with its libp2p ed25519
//! identity key so that the signature binds the announcement to its peer id; their
//! verification, and protection against replays of older announcements.
//!
//! A server signs with the 32-byte secret of its libp2p ed25519 identity key
//! ([`SignedAnnouncement::sign`]). A receiver calls [`SignedAnnouncement::verify`], which
//! checks that the announced peer id is the one of the signing key, the signature, the field
//! limits and the timestamps, and then passes the [`VerifiedAnnouncement`] through a
//! [`ReplayGuard`], which refuses anything not newer than what it last accepted from that
//! peer for that model.
//!
//! Its tests, which need only the public API, are in `tests/announce.rs`.

use std::collections::HashMap;
use std::ops::Deref;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::limits::{MAX_COMPUTE_LEN, MAX_MODEL_NAME_LEN, MAX_PEER_RTTS};
use crate::types::{BlockRange, ModelId, PeerIdBytes};
use crate::validate::{MessageError, check_addrs, check_count, check_len, check_peer};

/// The domain tag in front of the canonical bytes of every signed announcement, so that
/// an announcement signature can never be mistaken for a signature over anything else.
pub const ANNOUNCE_DOMAIN_TAG: &[u8] = b"pollen-announce-v2";

/// The libp2p peer id of an ed25519 public key, as raw bytes.
///
/// libp2p inlines keys of at most 42 bytes: the peer id is the identity multihash
/// (code `0x00`, length `0x24` = 36) of the protobuf-encoded public key (field 1, key type
/// `Ed25519` = 1: `0x08 0x01`; field 2, 32 bytes: `0x12 0x20`, then the key). So the bytes are
/// `[0x00, 0x24, 0x08, 0x01, 0x12, 0x20] ++ public_key`.
pub fn peer_id_bytes_for_ed25519(public_key: &[u8; 32]) -> PeerIdBytes {
    let mut bytes = Vec::with_capacity(38);
    bytes.extend_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
    bytes.extend_from_slice(public_key);
    PeerIdBytes(bytes)
}

/// A round-trip time a server measured to another server: the edge that activations
/// cross when the other serves the span after this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRtt {
    /// The other server.
    pub peer: PeerIdBytes,
    /// The measured round trip, in microseconds.
    pub rtt_us: u32,
}

/// What a server announces about itself for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    /// The server's peer id; must be the peer id of the signing key.
    pub peer: PeerIdBytes,
    /// The model served.
    pub model_id: ModelId,
    /// The model's display name, for humans (at most [`MAX_MODEL_NAME_LEN`] bytes).
    pub model_name: String,
    /// The model's number of blocks.
    pub num_blocks: u32,
    /// The blocks this server holds; lies inside `[0, num_blocks)`.
    pub blocks: BlockRange,
    /// Measured throughput through the whole span, in tokens per second.
    pub throughput: f32,
    /// How many more sessions the server would accept now.
    pub free_sessions: u32,
    /// How many more tokens its KV caches could hold now.
    pub free_cache_tokens: u32,
    /// Multiaddrs to reach it, at most [`crate::limits::MAX_ADDRS`].
    pub addrs: Vec<String>,
    /// How it computes: the weight arithmetic of its span (`exact`, `fast-vnni`, `q8_0`, …,
    /// at most [`MAX_COMPUTE_LEN`] bytes). Servers of different modes give different
    /// numbers, so a client routes only through servers of its own mode.
    pub compute: String,
    /// Round-trip times to servers of the spans that start where this one ends, at most
    /// [`MAX_PEER_RTTS`]: the edges a route through this server would cross.
    pub next_rtts: Vec<PeerRtt>,
    /// When it was issued, in milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// When it stops being valid, in milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// Sequence number, increasing with each announcement of the same issue time; breaks
    /// ties between announcements issued in the same millisecond.
    pub seq: u64,
}

impl Announcement {
    /// Checks the field limits: plausible peer id, name and address lengths, the block
    /// range inside the model, a finite non-negative throughput.
    pub fn validate(&self) -> Result<(), MessageError> {
        check_peer(&self.peer)?;
        check_len("model name", self.model_name.len(), MAX_MODEL_NAME_LEN)?;
        check_addrs(&self.addrs)?;
        check_len("compute mode", self.compute.len(), MAX_COMPUTE_LEN)?;
        check_count("round-trip times", self.next_rtts.len(), MAX_PEER_RTTS)?;
        for r in &self.next_rtts {
            check_peer(&r.peer)?;
        }
        check_count(
            "model blocks",
            self.num_blocks as usize,
            crate::limits::MAX_MANIFEST_BLOCKS,
        )?;
        if !self.blocks.fits_in(self.num_blocks) {
            return Err(MessageError::RangeOutsideModel {
                blocks: self.blocks,
                num_blocks: self.num_blocks,
            });
        }
        if !(self.throughput.is_finite() && self.throughput >= 0.0) {
            return Err(MessageError::BadNumber {
                what: "throughput",
                value: self.throughput,
            });
        }
        Ok(())
    }

    /// The canonical bytes of the announcement, independent of the wire codec.
    ///
    /// Layout (all integers little-endian; "bytes" means a u64 length then the bytes):
    /// peer id (bytes), model id (32), model name (bytes, UTF-8), `num_blocks` (u32),
    /// `blocks.start` (u32), `blocks.end` (u32), throughput (`f32::to_bits`, u32),
    /// `free_sessions` (u32), `free_cache_tokens` (u32), address count (u64) then each
    /// address (bytes), compute mode (bytes), round-trip count (u64) then each as peer id
    /// (bytes) and `rtt_us` (u32), `issued_at_ms` (u64), `expires_at_ms` (u64), `seq` (u64).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        }
        let mut out = Vec::with_capacity(256);
        bytes(&mut out, &self.peer.0);
        out.extend_from_slice(self.model_id.as_bytes());
        bytes(&mut out, self.model_name.as_bytes());
        for n in [
            self.num_blocks,
            self.blocks.start(),
            self.blocks.end(),
            self.throughput.to_bits(),
            self.free_sessions,
            self.free_cache_tokens,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(self.addrs.len() as u64).to_le_bytes());
        for a in &self.addrs {
            bytes(&mut out, a.as_bytes());
        }
        bytes(&mut out, self.compute.as_bytes());
        out.extend_from_slice(&(self.next_rtts.len() as u64).to_le_bytes());
        for r in &self.next_rtts {
            bytes(&mut out, &r.peer.0);
            out.extend_from_slice(&r.rtt_us.to_le_bytes());
        }
        for n in [self.issued_at_ms, self.expires_at_ms, self.seq] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// The bytes the signature covers: [`ANNOUNCE_DOMAIN_TAG`] then
    /// [`Announcement::canonical_bytes`].
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = ANNOUNCE_DOMAIN_TAG.to_vec();
        out.extend_from_slice(&self.canonical_bytes());
        out
    }
}

/// Why an announcement was not signed or not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AnnounceError {
    /// A field breaks a limit.
    #[error("invalid announcement: {0}")]
    Invalid(#[from] MessageError),
    /// The announcement names a peer other than the one of the key it carries.
    #[error("announcement claims peer {claimed} but carries the key of peer {from_key}")]
    PeerIdMismatch {
        /// The peer id in the announcement.
        claimed: PeerIdBytes,
        /// The peer id of the public key.
        from_key: PeerIdBytes,
    },
    /// Signing: the secret key is not the key of the announced peer.
    #[error("cannot sign an announcement for peer {announced} with the key of peer {from_key}")]
    WrongSigningKey {
        /// The peer id in the announcement.
        announced: PeerIdBytes,
        /// The peer id of the signing key.
        from_key: PeerIdBytes,
    },
    /// The public key is not a usable ed25519 key.
    #[error("announcement public key is not a valid ed25519 key")]
    BadPublicKey,
    /// The signature does not verify.
    #[error("announcement signature does not verify for peer {peer}")]
    BadSignature {
        /// The announcing peer.
        peer: PeerIdBytes,
    },
    /// Expires at or before it was issued.
    #[error(
        "announcement expires (at {expires_at_ms} ms) no later than it was issued (at {issued_at_ms} ms)"
    )]
    BadLifetime {
        /// When it was issued.
        issued_at_ms: u64,
        /// When it expires.
        expires_at_ms: u64,
    },
    /// Valid for longer than the policy allows.
    #[error("announcement is valid for {ttl_ms} ms; at most {max_ttl_ms} ms is allowed")]
    TtlTooLong {
        /// Its validity period.
        ttl_ms: u64,
        /// The policy's maximum.
        max_ttl_ms: u64,
    },
    /// Issued further in the future than clock skew explains.
    #[error(
        "announcement issued {ahead_ms} ms in the future (at {issued_at_ms} ms, now {now_ms} ms); clock skew of at most {max_clock_skew_ms} ms is allowed"
    )]
    FromTheFuture {
        /// When it claims to be issued.
        issued_at_ms: u64,
        /// Now.
        now_ms: u64,
        /// How far ahead.
        ahead_ms: u64,
        /// The policy's skew allowance.
        max_clock_skew_ms: u64,
    },
    /// Expired (beyond the clock skew allowance).
    #[error("announcement expired {ago_ms} ms ago (at {expires_at_ms} ms, now {now_ms} ms)")]
    Expired {
        /// When it expired.
        expires_at_ms: u64,
        /// Now.
        now_ms: u64,
        /// How long ago.
        ago_ms: u64,
    },
    /// Older than the latest announcement accepted from the same peer for the same model.
    #[error(
        "stale announcement from peer {peer} (issued at {issued_at_ms} ms, seq {seq}); already accepted one issued at {latest_issued_at_ms} ms, seq {latest_seq}"
    )]
    Stale {
        /// The announcing peer.
        peer: PeerIdBytes,
        /// The rejected one's issue time.
        issued_at_ms: u64,
        /// The rejected one's sequence number.
        seq: u64,
        /// The latest accepted one's issue time.
        latest_issued_at_ms: u64,
        /// The latest accepted one's sequence number.
        latest_seq: u64,
    },
    /// The same (issue time, sequence number) as the latest one accepted: a duplicate or a
    /// replay. Usually harmless to ignore.
    #[error("duplicate announcement from peer {peer} (issued at {issued_at_ms} ms, seq {seq})")]
    Duplicate {
        /// The announcing peer.
        peer: PeerIdBytes,
        /// Its issue time.
        issued_at_ms: u64,
        /// Its sequence number.
        seq: u64,
    },
}

/// How fresh an announcement must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessPolicy {
    /// How far clocks of two peers may disagree: an announcement may be issued this far in
    /// the future, and is still accepted this long after it expires.
    pub max_clock_skew_ms: u64,
    /// The longest validity period (`expires_at_ms - issued_at_ms`) accepted.
    pub max_ttl_ms: u64,
}

impl Default for FreshnessPolicy {
    /// 30 seconds of skew and a TTL of at most 10 minutes (servers re-announce every minute
    /// or so; a dead server drops out within minutes).
    fn default() -> Self {
        Self {
            max_clock_skew_ms: 30_000,
            max_ttl_ms: 10 * 60 * 1000,
        }
    }
}

/// An announcement with the signer's ed25519 public key and signature.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedAnnouncement {
    /// What is announced.
    pub announcement: Announcement,
    /// The signer's ed25519 public key; its peer id must be `announcement.peer`.
    pub public_key: [u8; 32],
    /// The ed25519 signature over [`Announcement::signing_bytes`].
    pub signature: [u8; 64],
}

impl SignedAnnouncement {
    /// Checks the announcement's field limits (not the signature: see
    /// [`SignedAnnouncement::verify`]).
    pub fn validate(&self) -> Result<(), MessageError> {
        self.announcement.validate()
    }

    /// Signs `announcement` with the 32-byte ed25519 secret key of the announcing peer's
    /// libp2p identity. Fails if the announcement breaks a limit or names another peer.
    pub fn sign(announcement: Announcement, secret_key: &[u8; 32]) -> Result<Self, AnnounceError> {
        announcement.validate()?;
        let key = SigningKey::from_bytes(secret_key);
        let public_key = key.verifying_key().to_bytes();
        let from_key = peer_id_bytes_for_ed25519(&public_key);
        if from_key != announcement.peer {
            return Err(AnnounceError::WrongSigningKey {
                announced: announcement.peer,
                from_key,
            });
        }
        let signature = key.sign(&announcement.signing_bytes()).to_bytes();
        Ok(Self {
            announcement,
            public_key,
            signature,
        })
    }

    /// Checks everything that can be checked without history, at time `now_ms`
    /// (milliseconds since the Unix epoch): field limits, that the peer id is the one of the
    /// public key, the signature (strict ed25519 verification, weak keys refused), that it
    /// expires after it is issued, within `policy.max_ttl_ms`, is not issued in the future
    /// nor expired (both beyond `policy.max_clock_skew_ms`). Pass the result through a
    /// [`ReplayGuard`] to refuse replays.
    pub fn verify(
        &self,
        now_ms: u64,
        policy: &FreshnessPolicy,
    ) -> Result<VerifiedAnnouncement, AnnounceError> {
        let a = &self.announcement;
        a.validate()?;
        let from_key = peer_id_bytes_for_ed25519(&self.public_key);
        if from_key != a.peer {
            return Err(AnnounceError::PeerIdMismatch {
                claimed: a.peer.clone(),
                from_key,
            });
        }
        let key =
            VerifyingKey::from_bytes(&self.public_key).map_err(|_| AnnounceError::BadPublicKey)?;
        if key.is_weak() {
            return Err(AnnounceError::BadPublicKey);
        }
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&a.signing_bytes(), &signature)
            .map_err(|_| AnnounceError::BadSignature {
                peer: a.peer.clone(),
            })?;

        if a.expires_at_ms <= a.issued_at_ms {
            return Err(AnnounceError::BadLifetime {
                issued_at_ms: a.issued_at_ms,
                expires_at_ms: a.expires_at_ms,
            });
        }
        let ttl_ms = a.expires_at_ms - a.issued_at_ms;
        if ttl_ms > policy.max_ttl_ms {
            return Err(AnnounceError::TtlTooLong {
                ttl_ms,
                max_ttl_ms: policy.max_ttl_ms,
            });
        }
        if a.issued_at_ms > now_ms.saturating_add(policy.max_clock_skew_ms) {
            return Err(AnnounceError::FromTheFuture {
                issued_at_ms: a.issued_at_ms,
                now_ms,
                ahead_ms: a.issued_at_ms - now_ms,
                max_clock_skew_ms: policy.max_clock_skew_ms,
            });
        }
        if a.expires_at_ms.saturating_add(policy.max_clock_skew_ms) <= now_ms {
            return Err(AnnounceError::Expired {
                expires_at_ms: a.expires_at_ms,
                now_ms,
                ago_ms: now_ms - a.expires_at_ms,
            });
        }
        Ok(VerifiedAnnouncement(self.clone()))
    }
}

/// A [`SignedAnnouncement`] that passed [`SignedAnnouncement::verify`]. Only `verify`
/// makes one, so holding one proves the checks ran.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedAnnouncement(SignedAnnouncement);

impl VerifiedAnnouncement {
    /// The announcement.
    pub fn announcement(&self) -> &Announcement {
        &self.0.announcement
    }

    /// The signed announcement (for passing on to other peers unchanged).
    pub fn signed(&self) -> &SignedAnnouncement {
        &self.0
    }

    /// Unwraps the signed announcement.
    pub fn into_signed(self) -> SignedAnnouncement {
        self.0
    }
}

impl Deref for VerifiedAnnouncement {
    type Target = Announcement;

    fn deref(&self) -> &Announcement {
        &self.0.announcement
    }
}

#[derive(Debug, Clone, Copy)]
struct Latest {
    issued_at_ms: u64,
    seq: u64,
    expires_at_ms: u64,
}

/// Remembers the latest announcement accepted per (peer, model) and refuses any that is not
/// strictly newer by (issue time, sequence number).
///
/// Bounded: it holds at most `capacity` entries; when full, accepting one for a new
/// (peer, model) first evicts the entry that expires soonest (a replay of an evicted entry's
/// announcement would be accepted again, but only until that announcement expires, which is
/// soon). Call [`ReplayGuard::prune`] now and then to drop expired entries.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    capacity: usize,
    latest: HashMap<(PeerIdBytes, ModelId), Latest>,
}

impl Default for ReplayGuard {
    /// Room for 4096 (peer, model) pairs, about half a megabyte.
    fn default() -> Self {
        Self::new(4096)
    }
}

impl ReplayGuard {
    /// A guard that remembers at most `capacity` (peer, model) pairs (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            latest: HashMap::with_capacity(capacity.min(1024)),
        }
    }

    /// Accepts `a` if it is newer than the latest accepted from its peer for its model,
    /// and records it; otherwise fails with [`AnnounceError::Stale`] or
    /// [`AnnounceError::Duplicate`]. The same as [`ReplayGuard::admit`] then
    /// [`ReplayGuard::record`].
    pub fn check(&mut self, a: &VerifiedAnnouncement) -> Result<(), AnnounceError> {
        self.admit(a)?;
        self.record(a);
        Ok(())
    }

    /// Whether `a` is newer than the latest recorded from its peer for its model, without
    /// recording it: a receiver that may still refuse `a` for other reasons (a full book, a
    /// cap on its sender) records it with [`ReplayGuard::record`] only once it is accepted,
    /// so that a refused announcement can be sent again later.
    pub fn admit(&self, a: &VerifiedAnnouncement) -> Result<(), AnnounceError> {
        let ann = a.announcement();
        let Some(old) = self.latest.get(&(ann.peer.clone(), ann.model_id)) else {
            return Ok(());
        };
        let (new_t, old_t) = ((ann.issued_at_ms, ann.seq), (old.issued_at_ms, old.seq));
        if new_t == old_t {
            return Err(AnnounceError::Duplicate {
                peer: ann.peer.clone(),
                issued_at_ms: ann.issued_at_ms,
                seq: ann.seq,
            });
        }
        if new_t < old_t {
            return Err(AnnounceError::Stale {
                peer: ann.peer.clone(),
                issued_at_ms: ann.issued_at_ms,
                seq: ann.seq,
                latest_issued_at_ms: old.issued_at_ms,
                latest_seq: old.seq,
            });
        }
        Ok(())
    }

    /// Records `a` as the latest accepted from its peer for its model (call after
    /// [`ReplayGuard::admit`] passed and the announcement was accepted).
    pub fn record(&mut self, a: &VerifiedAnnouncement) {
        let ann = a.announcement();
        let key = (ann.peer.clone(), ann.model_id);
        let new = Latest {
            issued_at_ms: ann.issued_at_ms,
            seq: ann.seq,
            expires_at_ms: ann.expires_at_ms,
        };
        if let Some(old) = self.latest.get_mut(&key) {
            if (new.issued_at_ms, new.seq) > (old.issued_at_ms, old.seq) {
                *old = new;
            }
            return;
        }
        if self.latest.len() >= self.capacity {
            let soonest = self
                .latest
                .iter()
                .min_by_key(|(_, l)| l.expires_at_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = soonest {
                self.latest.remove(&k);
            }
        }
        self.latest.insert(key, new);
    }

    /// Forgets entries whose announcements expired before `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        self.latest.retain(|_, l| l.expires_at_ms > now_ms);
    }

    /// How many (peer, model) pairs it remembers.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    /// Whether it remembers nothing.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}
