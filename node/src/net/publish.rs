//! Announcement policy: this node's own announcement, the peers it is pushed to, the
//! waiters for a withdrawal's acknowledgements, and the answers to announcement
//! requests from the book of verified announcements.

use super::book::AnnouncementBook;
use libp2p::PeerId;
use libp2p::request_response::{InboundRequestId, OutboundRequestId};
use pollen_protocol::{
    AnnounceRequest, AnnounceResponse, ErrorCode, ListCursor, ModelId, ProtocolError,
    SignedAnnouncement,
};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use tokio::sync::oneshot;

/// Most withdrawals waited on at once.
const MAX_WAITERS: usize = 16;

/// Most bytes of list answers being sent at once, to all peers. A peer that asks and
/// never reads holds each answer until its request times out, so the rate of list
/// requests alone (per peer id, which costs nothing to make) does not bound the memory
/// they hold.
pub const LIST_BYTES_IN_FLIGHT: usize = 256 << 20;
/// Most bytes of list answers being sent at once to one IP address (see
/// [`super::book::share_of`]), or to all peers without one (relayed) together: two full
/// pages.
pub const LIST_BYTES_PER_IP: usize = 2 * pollen_protocol::limits::MAX_ANNOUNCE_RESPONSE_BYTES;

/// List answers being sent (by request id `K`): each one's size and address, and the
/// sums.
#[derive(Debug)]
struct ListsInFlight<K> {
    each: HashMap<K, (Option<IpAddr>, usize)>,
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
    /// The caps: in all, and per IP address.
    cap: (usize, usize),
}

impl<K> Default for ListsInFlight<K> {
    fn default() -> Self {
        Self {
            each: HashMap::new(),
            per_ip: HashMap::new(),
            total: 0,
            cap: (LIST_BYTES_IN_FLIGHT, LIST_BYTES_PER_IP),
        }
    }
}

impl<K: std::hash::Hash + Eq> ListsInFlight<K> {
    fn used(&self, ip: Option<IpAddr>) -> (usize, usize) {
        let at_ip = self.per_ip.get(&share(ip)).copied().unwrap_or(0);
        (self.total, at_ip)
    }

    /// Whether an answer of `bytes` more to `ip` fits.
    fn fits(&self, ip: Option<IpAddr>, bytes: usize) -> bool {
        let (total, at_ip) = self.used(ip);
        total.saturating_add(bytes) <= self.cap.0 && at_ip.saturating_add(bytes) <= self.cap.1
    }

    fn add(&mut self, id: K, ip: Option<IpAddr>, bytes: usize) {
        self.total += bytes;
        *self.per_ip.entry(share(ip)).or_default() += bytes;
        self.each.insert(id, (ip, bytes));
    }

    fn done(&mut self, id: K) {
        let Some((ip, bytes)) = self.each.remove(&id) else {
            return;
        };
        self.total = self.total.saturating_sub(bytes);
        let key = share(ip);
        if let Some(n) = self.per_ip.get_mut(&key) {
            *n = n.saturating_sub(bytes);
            if *n == 0 {
                self.per_ip.remove(&key);
            }
        }
    }
}

/// The share an answer to `ip` counts against: peers without an IP address (relayed,
/// or on the in-process transport) share one.
fn share(ip: Option<IpAddr>) -> IpAddr {
    ip.unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
}

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
    /// List answers being sent.
    lists: ListsInFlight<InboundRequestId>,
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
            AnnounceRequest::ListPage {
                model_id,
                order,
                after,
            } => self.page(model_id, &order, after).0,
            AnnounceRequest::List { model_id } => self.first_page(model_id).0,
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

    /// The answer to request `id` from `peer`: a list answer counts against the bytes
    /// of list answers in flight (in all and to `peer`'s IP address) until
    /// [`Self::answer_gone`], and is refused as busy where it does not fit.
    pub fn answer_request(
        &mut self,
        peer: &PeerId,
        id: InboundRequestId,
        request: AnnounceRequest,
    ) -> AnnounceResponse {
        let list = matches!(
            request,
            AnnounceRequest::ListPage { .. } | AnnounceRequest::List { .. }
        );
        if !list {
            return self.answer(peer, request);
        }
        let ip = self.book.ip_of_peer(peer);
        // Full already: refused before the answer is built.
        if !self.lists.fits(ip, 1) {
            return Self::lists_busy(peer);
        }
        let (answer, bytes) = self.answer_sized(peer, request);
        if !self.lists.fits(ip, bytes) {
            return Self::lists_busy(peer);
        }
        self.lists.add(id, ip, bytes);
        answer
    }

    /// The answer to request `id` was sent, or failed (or was never sent).
    pub fn answer_gone(&mut self, id: InboundRequestId) {
        self.lists.done(id);
    }

    /// Bytes of list answers being sent.
    pub fn list_bytes_in_flight(&self) -> usize {
        self.lists.total
    }

    fn lists_busy(peer: &PeerId) -> AnnounceResponse {
        tracing::debug!("refused a list request from {peer}: list answers still in flight");
        AnnounceResponse::Refused(ProtocolError::new(
            ErrorCode::Busy,
            "busy: earlier list answers are still being sent; try again later".to_string(),
        ))
    }

    /// The answer to an announcement request from `peer`.
    pub fn answer(&mut self, peer: &PeerId, request: AnnounceRequest) -> AnnounceResponse {
        self.answer_sized(peer, request).0
    }

    /// [`Self::answer`], and the encoded bytes of the announcements it lists.
    fn answer_sized(
        &mut self,
        peer: &PeerId,
        request: AnnounceRequest,
    ) -> (AnnounceResponse, usize) {
        let answer = match request {
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
            AnnounceRequest::ListPage {
                model_id,
                order,
                after,
            } => return self.page(model_id, &order, after),
            AnnounceRequest::List { model_id } => return self.first_page(model_id),
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
        };
        (answer, 0)
    }

    /// The answer to a `ListPage` request, and its announcements' bytes.
    fn page(
        &self,
        model_id: Option<ModelId>,
        order: &[u8; 16],
        after: Option<ListCursor>,
    ) -> (AnnounceResponse, usize) {
        let budget = pollen_protocol::limits::MAX_ANNOUNCE_RESPONSE_BYTES - 128;
        let (list, next, used) = self.within(model_id, order, after, budget);
        (AnnounceResponse::Page { list, next }, used)
    }

    /// The answer to a `List` request, and its announcements' bytes.
    fn first_page(&self, model_id: Option<ModelId>) -> (AnnounceResponse, usize) {
        // The first page: stop before the answer would outgrow its frame limit. The asker
        // gives no key of the order: this node draws one.
        let budget = pollen_protocol::limits::MAX_ANNOUNCE_RESPONSE_BYTES - 64;
        let (list, _, used) = self.within(model_id, &rand::random(), None, budget);
        (AnnounceResponse::List(list), used)
    }

    /// The page of the book after `after` whose announcements take at most `budget`
    /// bytes encoded, where the next page starts, and those bytes.
    fn within(
        &self,
        model_id: Option<ModelId>,
        order: &[u8; 16],
        after: Option<ListCursor>,
        budget: usize,
    ) -> (Vec<SignedAnnouncement>, Option<ListCursor>, usize) {
        let mut used = 0;
        let (list, next) = self
            .book
            .page(model_id.as_ref(), order, after.as_ref(), |a| {
                let with = used + pollen_protocol::encoded_len(a);
                let fits = with <= budget;
                if fits {
                    used = with;
                }
                fits
            });
        (list, next, used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// List answers count against their IP's share and the total until they are gone;
    /// another address keeps its own share.
    #[test]
    fn list_answers_in_flight_are_capped_per_address_and_in_all() {
        let mut lists = ListsInFlight::<u64> {
            cap: (10, 4),
            ..ListsInFlight::default()
        };
        let a: Option<IpAddr> = "192.0.2.1".parse().ok();
        let b: Option<IpAddr> = "198.51.100.1".parse().ok();
        assert!(lists.fits(a, 4));
        lists.add(1, a, 3);
        assert!(lists.fits(a, 1) && !lists.fits(a, 2), "a's share is 4");
        assert!(lists.fits(b, 4), "b has its own share");
        lists.add(2, b, 4);
        lists.add(3, None, 3);
        assert!(
            !lists.fits(None, 2),
            "peers without an address share one share"
        );
        assert!(!lists.fits("203.0.113.9".parse().ok(), 1), "10 in all");
        lists.done(1);
        assert!(lists.fits(a, 3) && lists.fits(None, 1));
        lists.done(1); // twice: no effect
        assert_eq!(lists.total, 7);
        lists.done(2);
        lists.done(3);
        assert_eq!(lists.total, 0);
        assert!(lists.per_ip.is_empty() && lists.each.is_empty());
    }
}
