//! The announcements a node has verified: who serves which blocks of which
//! model, until when. Bounded; expired entries are dropped.

use crate::clock::unix_ms as now_ms;
use libp2p::PeerId;
use pollen_protocol::{
    AnnounceError, FreshnessPolicy, ModelId, PeerIdBytes, ReplayGuard, SignedAnnouncement,
    VerifiedAnnouncement,
};
use std::collections::HashMap;

/// Most announcements a node keeps (1,000 servers × a few models fit).
pub const MAX_BOOK_ENTRIES: usize = 16_384;

/// Why the book refused an announcement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BookError {
    /// The announcement failed verification, or is not newer than the one held.
    #[error(transparent)]
    Refused(#[from] AnnounceError),
    /// The book holds [`MAX_BOOK_ENTRIES`] unexpired announcements.
    #[error("announcement book is full ({MAX_BOOK_ENTRIES} entries)")]
    Full,
}

impl BookError {
    /// Whether this is the ordinary echo of an announcement already held (a renewal seen
    /// twice, through two peers): not worth a warning.
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            BookError::Refused(AnnounceError::Duplicate { .. } | AnnounceError::Stale { .. })
        )
    }
}

/// Verified announcements by (peer, model).
#[derive(Debug)]
pub struct AnnouncementBook {
    entries: HashMap<(PeerIdBytes, ModelId), VerifiedAnnouncement>,
    replay: ReplayGuard,
    policy: FreshnessPolicy,
}

impl Default for AnnouncementBook {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            replay: ReplayGuard::new(MAX_BOOK_ENTRIES),
            policy: FreshnessPolicy::default(),
        }
    }
}

impl AnnouncementBook {
    /// Verifies `signed` and keeps it; a clear reason when refused.
    pub fn insert(&mut self, signed: SignedAnnouncement) -> Result<(), BookError> {
        let now = now_ms();
        let verified = signed.verify(now, &self.policy)?;
        self.replay.check(&verified)?;
        let key = (verified.peer.clone(), verified.model_id);
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_BOOK_ENTRIES {
            self.prune();
            if self.entries.len() >= MAX_BOOK_ENTRIES {
                return Err(BookError::Full);
            }
        }
        self.entries.insert(key, verified);
        Ok(())
    }

    /// Drops expired announcements.
    pub fn prune(&mut self) {
        let now = now_ms();
        self.entries.retain(|_, a| a.expires_at_ms > now);
        self.replay.prune(now);
    }

    /// Drops every announcement of `peer` (it said goodbye).
    pub fn remove_peer(&mut self, peer: &PeerId) {
        let bytes = PeerIdBytes(peer.to_bytes());
        self.entries.retain(|(p, _), _| *p != bytes);
    }

    /// Unexpired announcements, of one model or all.
    pub fn list(&self, model: Option<&ModelId>) -> Vec<VerifiedAnnouncement> {
        let now = now_ms();
        let mut out: Vec<_> = self
            .entries
            .values()
            .filter(|a| a.expires_at_ms > now)
            .filter(|a| model.is_none_or(|m| a.model_id == *m))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            (a.model_id.as_bytes(), a.blocks.start(), &a.peer.0).cmp(&(
                b.model_id.as_bytes(),
                b.blocks.start(),
                &b.peer.0,
            ))
        });
        out
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
