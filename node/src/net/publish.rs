//! Announcement policy: this node's own announcement, the peers it is pushed to, the
//! waiters for a withdrawal's acknowledgements, and the answers to announcement
//! requests from the book of verified announcements.

use super::book::AnnouncementBook;
use libp2p::PeerId;
use libp2p::request_response::OutboundRequestId;
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, ErrorCode, ListCursor, ModelId, ProtocolError,
    SignedAnnouncement,
};
use std::collections::{HashMap, HashSet};
use tokio::sync::oneshot;

/// Most withdrawals waited on at once.
const MAX_WAITERS: usize = 16;

/// The announcement side of a node.
#[derive(Debug, Default)]
pub struct Publisher {
    /// Verified announcements this node holds.
    pub book: AnnouncementBook,
    own: Option<SignedAnnouncement>,
    /// Peers this node publishes its announcement to: the bootstraps it dialed and the
    /// LAN peers mDNS found. Everyone else asks with `List`, so a renewal costs one
    /// message per bootstrap, not one per connection.
    targets: HashSet<PeerId>,
    /// Publishes in flight, each with the waiter (if any) of its batch.
    in_flight: HashMap<OutboundRequestId, usize>,
    waiters: HashMap<usize, (usize, oneshot::Sender<()>)>,
    next_waiter: usize,
}

impl Publisher {
    /// Sets (or withdraws, with `None`) this node's own announcement, as peer `me`.
    pub fn set_own(&mut self, me: &PeerId, announcement: Option<SignedAnnouncement>) {
        match &announcement {
            Some(a) => {
                if let Err(e) = self.book.insert(a.clone()) {
                    tracing::warn!("own announcement refused by our own book: {e}");
                }
            }
            None => self.book.remove_peer(me),
        }
        self.own = announcement;
    }

    /// The request that publishes our announcement, if we have one.
    pub fn publish_request(&self) -> Option<AnnounceRequest> {
        self.own
            .as_ref()
            .map(|own| AnnounceRequest::Publish(Box::new(own.clone())))
    }

    /// Makes `peer` a publish target; whether it is new.
    pub fn add_target(&mut self, peer: PeerId) -> bool {
        self.targets.insert(peer)
    }

    /// Stops publishing to `peer`.
    pub fn remove_target(&mut self, peer: &PeerId) {
        self.targets.remove(peer);
    }

    /// Whether `peer` is a publish target.
    pub fn is_target(&self, peer: &PeerId) -> bool {
        self.targets.contains(peer)
    }

    /// Records publishes sent as one batch; `done` fires when all have settled
    /// (answered or failed). With no publish in the batch (no publish target is
    /// connected) it fires at once; with too many batches waited on already it is
    /// dropped unanswered.
    pub fn track(&mut self, ids: Vec<OutboundRequestId>, done: Option<oneshot::Sender<()>>) {
        let Some(done) = done else {
            for id in ids {
                self.in_flight.insert(id, usize::MAX);
            }
            return;
        };
        if ids.is_empty() {
            let _ = done.send(());
            return;
        }
        if self.waiters.len() >= MAX_WAITERS {
            // Dropped unanswered: the waiter learns that nobody confirmed.
            drop(done);
            return;
        }
        let w = self.next_waiter;
        self.next_waiter = self.next_waiter.wrapping_add(1);
        self.waiters.insert(w, (ids.len(), done));
        for id in ids {
            self.in_flight.insert(id, w);
        }
    }

    /// A publish was answered (accepted or refused) or failed: wake whoever waits for
    /// its batch once the batch is complete.
    pub fn settled(&mut self, id: OutboundRequestId) {
        let Some(w) = self.in_flight.remove(&id) else {
            return;
        };
        let complete = match self.waiters.get_mut(&w) {
            Some((left, _)) => {
                *left = left.saturating_sub(1);
                *left == 0
            }
            None => false,
        };
        if complete && let Some((_, done)) = self.waiters.remove(&w) {
            let _ = done.send(());
        }
    }

    /// Whether `id` is one of our publishes.
    pub fn is_publish(&self, id: &OutboundRequestId) -> bool {
        self.in_flight.contains_key(id)
    }

    /// The answer to an announcement request from this node itself: what it gathered
    /// from a list goes into its book without a sender's caps (it has no connection to
    /// count them against; the signature and freshness checks still apply).
    pub fn answer_local(&mut self, me: &PeerId, request: AnnounceRequest) -> AnnounceResponse {
        match request {
            AnnounceRequest::Publish(signed) => match self.book.insert(*signed) {
                Ok(()) => AnnounceResponse::Accepted,
                Err(e) => {
                    tracing::debug!("ignored a gathered announcement: {e}");
                    AnnounceResponse::Refused(ProtocolError::new(e.code(), e.to_string()))
                }
            },
            // This node's own list requests are not rate-limited.
            AnnounceRequest::ListPage { model_id, after } => self.page(model_id, after),
            AnnounceRequest::List { model_id } => self.first_page(model_id),
            other => self.answer(me, other),
        }
    }

    /// Stores what this node gathered from `source`'s list, counted against `source`
    /// with at most `share` entries held from it; how many were stored.
    pub fn store_gathered(
        &mut self,
        source: &PeerId,
        list: Vec<SignedAnnouncement>,
        share: usize,
    ) -> usize {
        let mut stored = 0;
        for signed in list {
            match self.book.insert_gathered(source, signed, share) {
                Ok(()) => stored += 1,
                Err(e) => tracing::debug!("ignored an announcement gathered from {source}: {e}"),
            }
        }
        stored
    }

    /// The answer to an announcement request from `peer`.
    pub fn answer(&mut self, peer: &PeerId, request: AnnounceRequest) -> AnnounceResponse {
        match request {
            AnnounceRequest::Get { model_id } => match &self.own {
                Some(own) if own.announcement.model_id == model_id => {
                    AnnounceResponse::Announcement(Box::new(own.clone()))
                }
                _ => AnnounceResponse::NotServing,
            },
            AnnounceRequest::Publish(signed) => match self.book.insert_from(peer, *signed) {
                Ok(()) => AnnounceResponse::Accepted,
                Err(e) => {
                    if e.is_routine() {
                        tracing::debug!("ignored an announcement from {peer}: {e}");
                    } else {
                        tracing::warn!("ignored an announcement from {peer}: {e}");
                    }
                    AnnounceResponse::Refused(ProtocolError::new(e.code(), e.to_string()))
                }
            },
            AnnounceRequest::ListPage { .. } | AnnounceRequest::List { .. }
                if !self.book.take_list(peer) =>
            {
                tracing::debug!("refused a list request from {peer}: too many a second");
                AnnounceResponse::Refused(ProtocolError::new(
                    ErrorCode::Busy,
                    format!(
                        "busy: at most {} list requests a second from one peer; try again later",
                        super::book::LIST_PER_S
                    ),
                ))
            }
            AnnounceRequest::ListPage { model_id, after } => self.page(model_id, after),
            AnnounceRequest::List { model_id } => self.first_page(model_id),
        }
    }

    /// The answer to a `ListPage` request.
    fn page(&self, model_id: Option<ModelId>, after: Option<ListCursor>) -> AnnounceResponse {
        let budget = pollen_protocol::limits::MAX_ANNOUNCE_RESPONSE_BYTES - 128;
        let mut used = 0;
        let (list, next) = self.book.page(model_id.as_ref(), after.as_ref(), |a| {
            used += pollen_protocol::encoded_len(a);
            used <= budget
        });
        AnnounceResponse::Page { list, next }
    }

    /// The answer to a `List` request.
    fn first_page(&self, model_id: Option<ModelId>) -> AnnounceResponse {
        // The first page: stop before the answer would outgrow its frame limit.
        let budget = pollen_protocol::limits::MAX_ANNOUNCE_RESPONSE_BYTES - 64;
        let mut used = 0;
        let (list, _) = self.book.page(model_id.as_ref(), None, |a| {
            used += pollen_protocol::encoded_len(a);
            used <= budget
        });
        AnnounceResponse::List(list)
    }
}
