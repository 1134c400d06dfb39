//! The announcements a node has verified: who serves which blocks of which
//! model, until when. Bounded; expired entries are dropped.

use libp2p::PeerId;
use pollen_protocol::{
    FreshnessPolicy, ModelId, PeerIdBytes, ReplayGuard, SignedAnnouncement, VerifiedAnnouncement,
};
use std::collections::HashMap;

/// Most announcements a node keeps (1,000 servers × a few models fit).
pub const MAX_BOOK_ENTRIES: usize = 16_384;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
    pub fn insert(&mut self, signed: SignedAnnouncement) -> Result<(), String> {
        let now = now_ms();
        let verified = signed
            .verify(now, &self.policy)
            .map_err(|e| e.to_string())?;
        self.replay.check(&verified).map_err(|e| e.to_string())?;
        let key = (verified.peer.clone(), verified.model_id);
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_BOOK_ENTRIES {
            self.prune();
            if self.entries.len() >= MAX_BOOK_ENTRIES {
                return Err("announcement book is full".into());
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
