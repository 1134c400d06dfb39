//! The messages peers exchange: the version handshake, inference sessions and announcement
//! requests, and each message's `validate`, built on the checks in `validate.rs` (whose
//! [`MessageError`] is re-exported here).
//!
//! Every message here is a [`crate::WireMessage`]: [`crate::encode_frame`] validates it
//! before encoding and [`crate::decode_frame`] after decoding, so a node never sends what a
//! peer would refuse and never hands on what it should have refused.

use crate::PROTOCOL_VERSION;
use crate::announce::SignedAnnouncement;
use crate::error::{ErrorCode, ProtocolError};
use crate::hidden::{HiddenStates, WireDType};
use crate::limits::{
    MAX_AGENT_LEN, MAX_COMPUTE_LEN, MAX_IDLE_TIMEOUT_MS, MAX_INFER_REQUEST_BYTES,
    MAX_OPEN_WITHIN_MS, MAX_ROUTE_HOPS,
};
use crate::types::{BlockRange, ModelId, PeerIdBytes, Roles, SessionId};
use crate::validate::{check_addrs, check_count, check_error, check_len, check_peer};

// Defined in `validate` (which `announce` shares); its public path stays here.
pub use crate::validate::MessageError;

/// The first message on a [`crate::HELLO_PROTOCOL`] stream, sent by the side that opens
/// it; the other side answers with a [`HelloReply`].
///
/// Its wire layout is frozen across protocol versions (later versions may only add data
/// in a trailing extension blob that older peers skip), so peers of any two versions can
/// decode each other's hello and refuse with a clear error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The model the sender serves or wants, if it is tied to one (bootstrap nodes are not).
    pub model_id: Option<ModelId>,
    /// What the sender does in the swarm.
    pub roles: Roles,
    /// Free-form software name and version, for logs (at most [`MAX_AGENT_LEN`] bytes).
    pub agent: String,
}

impl Hello {
    /// A hello for this crate's [`PROTOCOL_VERSION`].
    pub fn new(model_id: Option<ModelId>, roles: Roles, agent: impl Into<String>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            model_id,
            roles,
            agent: agent.into(),
        }
    }

    /// Checks the field limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        check_len("agent", self.agent.len(), MAX_AGENT_LEN)
    }
}

/// Whether a peer that sent `remote` may talk to us, who sent (or would send) `local`.
///
/// Both sides run it: the answering side before it replies (and refuses with the error),
/// the opening side on the reply's hello (see [`HelloReply::into_result`]). Fails with
/// [`ErrorCode::VersionMismatch`] ("protocol version mismatch: we speak 1, peer speaks 2")
/// when versions differ, and [`ErrorCode::UnknownModel`] when both name a model and the
/// models differ.
pub fn negotiate(local: &Hello, remote: &Hello) -> Result<(), ProtocolError> {
    if local.version != remote.version {
        return Err(ProtocolError::version_mismatch(
            local.version,
            remote.version,
        ));
    }
    if let (Some(ours), Some(theirs)) = (&local.model_id, &remote.model_id)
        && ours != theirs
    {
        return Err(ProtocolError::new(
            ErrorCode::UnknownModel,
            format!("model mismatch: we have model {ours}, peer has model {theirs}"),
        ));
    }
    Ok(())
}

/// The answer to a [`Hello`]. Its layout is frozen like the hello's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloReply {
    /// The peer accepts and introduces itself.
    Accept(Hello),
    /// The peer refuses, saying why (for example a version mismatch).
    Refuse(ProtocolError),
}

impl HelloReply {
    /// The answering side's reply to `remote`, given its own hello `local`: accept with
    /// `local`, or refuse with the error of [`negotiate`].
    pub fn answer(local: &Hello, remote: &Hello) -> Self {
        match negotiate(local, remote) {
            Ok(()) => HelloReply::Accept(local.clone()),
            Err(e) => HelloReply::Refuse(e),
        }
    }

    /// The opening side's view of the reply, given its own hello `local`: the peer's hello
    /// if both sides agree, or the error (the peer's refusal, or our own objection to the
    /// peer's hello).
    pub fn into_result(self, local: &Hello) -> Result<Hello, ProtocolError> {
        match self {
            HelloReply::Accept(remote) => negotiate(local, &remote).map(|()| remote),
            HelloReply::Refuse(e) => Err(e),
        }
    }

    /// Checks the field limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            HelloReply::Accept(h) => h.validate(),
            HelloReply::Refuse(e) => check_error(e),
        }
    }
}

/// One server of an inference route: who it is, which blocks it runs, where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHop {
    /// The server's peer id.
    pub peer: PeerIdBytes,
    /// The blocks it runs for this session.
    pub blocks: BlockRange,
    /// Multiaddrs to reach it (the previous hop dials it), at most
    /// [`crate::limits::MAX_ADDRS`].
    pub addrs: Vec<String>,
    /// Its announced time per token over its span (one over its throughput), in
    /// microseconds: the hop before it derives from it how long to wait for its
    /// [`InferResponse::Ack`].
    pub step_us: u32,
}

impl RouteHop {
    fn validate(&self) -> Result<(), MessageError> {
        check_peer(&self.peer)?;
        check_addrs(&self.addrs)
    }
}

/// What a session may consume on a server; the server refuses with
/// [`ErrorCode::OverBudget`] past it and frees the session after the idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionBudget {
    /// Most tokens (prompt and generated) the session's KV cache may hold.
    pub max_tokens: u32,
    /// Largest frame body the session may send, in bytes (at most
    /// [`MAX_INFER_REQUEST_BYTES`]).
    pub max_message_bytes: u32,
    /// How long the server keeps an idle session, in milliseconds (at most
    /// [`MAX_IDLE_TIMEOUT_MS`]).
    pub idle_timeout_ms: u32,
    /// How long the opener waits for the answer to this `Open`, in milliseconds from its
    /// sending (at most [`MAX_OPEN_WITHIN_MS`]): the hop answers within it, and gives
    /// the next hop less, so that a failure deep in the route reaches the client naming
    /// the hop that failed.
    pub open_within_ms: u32,
}

impl SessionBudget {
    /// Checks that every field is non-zero and within the protocol limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        let fields = [
            (
                "max_tokens",
                u64::from(self.max_tokens),
                u64::from(u32::MAX),
            ),
            (
                "max_message_bytes",
                u64::from(self.max_message_bytes),
                MAX_INFER_REQUEST_BYTES as u64,
            ),
            (
                "idle_timeout_ms",
                u64::from(self.idle_timeout_ms),
                u64::from(MAX_IDLE_TIMEOUT_MS),
            ),
            (
                "open_within_ms",
                u64::from(self.open_within_ms),
                u64::from(MAX_OPEN_WITHIN_MS),
            ),
        ];
        for (what, value, max) in fields {
            if value == 0 || value > max {
                return Err(MessageError::BadBudget { what, value, max });
            }
        }
        Ok(())
    }
}

/// What travels down a session stream on [`crate::INFER_PROTOCOL`]: from the client to the
/// route's first server, and from each server to the next.
///
/// A session's data path: the client opens a stream to `route[0]` and sends `Open`; each
/// server opens a stream to the next hop and passes `Open` on; the client then opens a
/// second stream straight to the last hop and sends `Attach`. Each `Forward` goes down
/// the chain (every server sends its output straight to the next), and the last server
/// sends the `Output` up the attach stream to the client. Nothing travels back along the
/// chain but small [`InferResponse::Ack`]s and failures, so no server waits on another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InferRequest {
    /// Opens a session on the receiving server (`route[hop]`), which opens the rest of the
    /// route (`route[hop + 1..]`) itself and forwards activations to the next hop.
    Open {
        /// The session's id, chosen by the client.
        session: SessionId,
        /// The model, which the server must serve.
        model_id: ModelId,
        /// Every server of the session, in order; consecutive hops' blocks chain.
        route: Vec<RouteHop>,
        /// The index in `route` of the server receiving this request.
        hop: u32,
        /// What the session may consume.
        budget: SessionBudget,
        /// The dtype of hidden states on this session.
        wire_dtype: WireDType,
        /// The compute mode every server of the route must run (see
        /// [`crate::Announcement::compute`]).
        compute: String,
        /// The client that opened the session: the only peer that may `Attach` to it. The
        /// first server checks it against the stream's remote peer.
        client: PeerIdBytes,
    },
    /// Runs hidden states through the server's span: a prefill chunk or one decode step.
    Forward {
        /// The session.
        session: SessionId,
        /// The position of the first token of `hidden` in the sequence.
        position: u32,
        /// The client's step counter, echoed in the [`InferResponse::Output`]: 1 for a
        /// session's first step, one more for each after it (servers refuse any other;
        /// a refused step ends the session on every hop).
        step: u64,
        /// The input hidden states, `[batch, tokens, hidden]`.
        hidden: HiddenStates,
        /// The last server returns only the last token's row (all a client needs to pick
        /// the next token), not every row of a prefill chunk. Servers require it: a step
        /// without it is refused (a hop that cleared it on the way would have the last
        /// hop send an output too large for the client's cap).
        last_row_only: bool,
    },
    /// Ends the session and frees its cache (passed on down the chain). The session's
    /// stream ending ends it too, closed for writing alone included: a server then stops
    /// a prompt it computes in parts at the next part, and answers nothing more.
    Close {
        /// The session.
        session: SessionId,
    },
    /// On a stream from the client to the last server of a route: send this session's
    /// outputs up this stream.
    Attach {
        /// The session.
        session: SessionId,
    },
}

impl InferRequest {
    /// The session this request belongs to.
    pub fn session(&self) -> SessionId {
        match self {
            InferRequest::Open { session, .. }
            | InferRequest::Forward { session, .. }
            | InferRequest::Close { session }
            | InferRequest::Attach { session } => *session,
        }
    }

    /// Checks limits and consistency: a non-empty, chaining route of at most
    /// [`MAX_ROUTE_HOPS`] hops that contains `hop`, plausible peer ids and addresses, and a
    /// valid budget. (Hidden states are valid by construction.)
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            InferRequest::Open {
                route,
                hop,
                budget,
                compute,
                client,
                ..
            } => {
                if route.is_empty() {
                    return Err(MessageError::EmptyRoute);
                }
                check_count("route", route.len(), MAX_ROUTE_HOPS)?;
                if usize::try_from(*hop).map_or(true, |h| h >= route.len()) {
                    return Err(MessageError::HopOutOfRange {
                        hop: *hop,
                        hops: route.len(),
                    });
                }
                for h in route {
                    h.validate()?;
                }
                for (index, pair) in route.windows(2).enumerate() {
                    let (end, start) = (pair[0].blocks.end(), pair[1].blocks.start());
                    if end != start {
                        return Err(MessageError::RouteGap { index, end, start });
                    }
                }
                check_len("compute mode", compute.len(), MAX_COMPUTE_LEN)?;
                check_peer(client)?;
                budget.validate()
            }
            InferRequest::Forward { .. }
            | InferRequest::Close { .. }
            | InferRequest::Attach { .. } => Ok(()),
        }
    }
}

/// What travels up a session stream on [`crate::INFER_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InferResponse {
    /// The session is open along the rest of the route.
    Opened {
        /// The session.
        session: SessionId,
        /// How many more tokens the server's cache (and every later server's) could take.
        free_tokens: u32,
    },
    /// The output hidden states of a [`InferRequest::Forward`] (from the last server of the
    /// route, up the attach stream: the input to the model's final norm and head).
    Output {
        /// The session.
        session: SessionId,
        /// The request's step counter.
        step: u64,
        /// The position of the first token of `hidden`.
        position: u32,
        /// The output hidden states: every row of the input, or only the last one when
        /// the request asked for `last_row_only`.
        hidden: HiddenStates,
    },
    /// The session is closed and its cache freed.
    Closed {
        /// The session.
        session: SessionId,
    },
    /// The request failed at the server at the far end of this stream.
    Error(ProtocolError),
    /// The server at the far end of this stream computed step `step` and handed its output
    /// on. The sender of a `Forward` times each step by these.
    Ack {
        /// The session.
        session: SessionId,
        /// The step done.
        step: u64,
    },
    /// A server of the route failed: so says hop `by`, about itself, the hop after it (which
    /// it could not reach, which went silent or sent something wrong) or the hop before it
    /// (which sent it a step it refuses). Signed by hop `by` ([`crate::report`]) and passed
    /// up the chain unchanged to the client, so that the client knows which hop to route
    /// around, and that no hop on the way can change it or write one in another's name.
    HopFailed {
        /// The session.
        session: SessionId,
        /// The step in flight when it failed (0 while opening).
        step: u64,
        /// The index of the failed hop in the route.
        hop: u32,
        /// Its peer id.
        peer: PeerIdBytes,
        /// What went wrong.
        error: ProtocolError,
        /// The index in the route of the hop that wrote and signed this report.
        by: u32,
        /// Hop `by`'s ed25519 signature ([`crate::report::SessionBinding::report`]).
        signature: [u8; crate::report::REPORT_SIGNATURE_LEN],
    },
    /// The attach stream is accepted: outputs of the session will come up it.
    Attached {
        /// The session.
        session: SessionId,
    },
}

impl InferResponse {
    /// The session this response belongs to (`None` for an error).
    pub fn session(&self) -> Option<SessionId> {
        match self {
            InferResponse::Opened { session, .. }
            | InferResponse::Output { session, .. }
            | InferResponse::Closed { session }
            | InferResponse::Ack { session, .. }
            | InferResponse::HopFailed { session, .. }
            | InferResponse::Attached { session } => Some(*session),
            InferResponse::Error(_) => None,
        }
    }

    /// Checks the field limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            InferResponse::Error(e) => check_error(e),
            InferResponse::HopFailed { peer, error, .. } => {
                check_peer(peer)?;
                check_error(error)
            }
            _ => Ok(()),
        }
    }
}

/// A request on [`crate::ANNOUNCE_PROTOCOL`]: how announcements spread.
///
/// Servers push their signed announcement to the peers they know (bootstraps
/// first) with `Publish`; anyone asks a peer for what it knows with `List`, or
/// for the peer's own announcement with `Get`. Receivers verify every
/// announcement themselves: a relayed list is a hint, not a proof.
#[derive(Debug, Clone, PartialEq)]
pub enum AnnounceRequest {
    /// The receiver's own current announcement for a model.
    Get {
        /// The model asked about.
        model_id: ModelId,
    },
    /// Store this announcement until it expires.
    Publish(Box<SignedAnnouncement>),
    /// Every unexpired announcement the receiver holds, for one model or all (at most
    /// [`crate::limits::MAX_LIST_ANNOUNCEMENTS`]: a book that holds more answers
    /// [`AnnounceRequest::ListPage`] in pages).
    List {
        /// Only this model, or every model when `None`.
        model_id: Option<ModelId>,
    },
    /// One page of the announcements the receiver holds, in the list order that `order`
    /// keys (see [`ListCursor`]), starting after `after`; answered with
    /// [`AnnounceResponse::Page`].
    ListPage {
        /// Only this model, or every model when `None`.
        model_id: Option<ModelId>,
        /// The asker's own random key of the order, the same for every page of one
        /// reading: no announcer can know where its entries will come in the list.
        order: [u8; 16],
        /// Where the previous page ended (`None` for the first page).
        after: Option<ListCursor>,
    },
}

/// A place in a book's list order: the (model id, rank, place, peer id) of the last
/// announcement of a page. A book lists each model's announcements by rank first: an
/// announcement's rank is how many announcements that reached the book from the same
/// address (or, with none, the same sender) come before it in place order, so that one
/// address's many entries cannot come before other addresses' first ones; then by
/// place, a hash of the peer id keyed by the asker's `order`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListCursor {
    /// The model.
    pub model_id: ModelId,
    /// The announcement's rank among its address's.
    pub rank: u32,
    /// Its place in the asker's order.
    pub place: u64,
    /// The announcing peer.
    pub peer: PeerIdBytes,
}

impl AnnounceRequest {
    /// Checks the field limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            AnnounceRequest::Publish(a) => a.announcement.validate(),
            AnnounceRequest::ListPage { after: Some(c), .. } => check_peer(&c.peer),
            _ => Ok(()),
        }
    }
}

/// The answer to an [`AnnounceRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum AnnounceResponse {
    /// The peer's current signed announcement for the model (verify it before use).
    Announcement(Box<SignedAnnouncement>),
    /// The peer does not serve that model.
    NotServing,
    /// A published announcement was verified and stored.
    Accepted,
    /// A published announcement was refused (bad signature, expired, replayed...).
    Refused(ProtocolError),
    /// Announcements the peer holds, at most [`crate::limits::MAX_LIST_ANNOUNCEMENTS`].
    List(Vec<SignedAnnouncement>),
    /// One page of the announcements the peer holds, at most
    /// [`crate::limits::MAX_LIST_ANNOUNCEMENTS`], and where the next page starts (`None`
    /// after the last page).
    Page {
        /// The announcements of this page, in list order.
        list: Vec<SignedAnnouncement>,
        /// Ask for the page after this cursor next.
        next: Option<ListCursor>,
    },
}

impl AnnounceResponse {
    /// Checks the field limits.
    pub fn validate(&self) -> Result<(), MessageError> {
        match self {
            AnnounceResponse::Announcement(a) => a.announcement.validate(),
            AnnounceResponse::Refused(e) => check_error(e),
            AnnounceResponse::List(list) | AnnounceResponse::Page { list, next: None } => {
                if list.len() > crate::limits::MAX_LIST_ANNOUNCEMENTS {
                    return Err(MessageError::TooMany {
                        what: "announcements",
                        count: list.len(),
                        max: crate::limits::MAX_LIST_ANNOUNCEMENTS,
                    });
                }
                list.iter().try_for_each(|a| a.announcement.validate())
            }
            AnnounceResponse::Page {
                list,
                next: Some(c),
            } => {
                check_peer(&c.peer)?;
                AnnounceResponse::List(list.clone()).validate()
            }
            AnnounceResponse::NotServing | AnnounceResponse::Accepted => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::limits::MAX_ADDRS;

    fn hello(version: u32, model: u8) -> Hello {
        Hello {
            version,
            model_id: Some(ModelId::from_bytes([model; 32])),
            roles: Roles::SERVER,
            agent: "test".into(),
        }
    }

    #[test]
    fn different_versions_refuse_each_other_on_both_sides() {
        let v1 = hello(1, 7);
        let v2 = hello(2, 7);
        // The answering side (v2) refuses v1's hello.
        let reply = HelloReply::answer(&v2, &v1);
        let HelloReply::Refuse(err) = &reply else {
            panic!("expected a refusal, got {reply:?}");
        };
        assert_eq!(err.code, ErrorCode::VersionMismatch);
        assert_eq!(
            err.message,
            "protocol version mismatch: we speak 2, peer speaks 1"
        );
        // The opening side (v1) gets the refusal as its error.
        assert_eq!(
            reply.into_result(&v1).unwrap_err().code,
            ErrorCode::VersionMismatch
        );
        // Had the answering side wrongly accepted, the opening side still refuses.
        let err = HelloReply::Accept(v2.clone()).into_result(&v1).unwrap_err();
        assert_eq!(
            err.message,
            "protocol version mismatch: we speak 1, peer speaks 2"
        );
    }

    #[test]
    fn same_version_accepts() {
        let a = hello(PROTOCOL_VERSION, 1);
        let b = Hello::new(None, Roles::BOOTSTRAP, "boot");
        let reply = HelloReply::answer(&b, &a);
        assert_eq!(reply.into_result(&a).unwrap(), b);
        let c = hello(PROTOCOL_VERSION, 2);
        assert_eq!(negotiate(&a, &c).unwrap_err().code, ErrorCode::UnknownModel);
    }

    fn hop(start: u32, end: u32) -> RouteHop {
        RouteHop {
            peer: PeerIdBytes(vec![1; 38]),
            blocks: BlockRange::new(start, end).unwrap(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            step_us: 10_000,
        }
    }

    fn open(route: Vec<RouteHop>, hop: u32) -> InferRequest {
        InferRequest::Open {
            session: SessionId(9),
            model_id: ModelId::from_bytes([0; 32]),
            route,
            hop,
            budget: SessionBudget {
                max_tokens: 2048,
                max_message_bytes: 1 << 20,
                idle_timeout_ms: 30_000,
                open_within_ms: 20_000,
            },
            wire_dtype: WireDType::F32,
            compute: "fast-vnni".into(),
            client: PeerIdBytes(vec![2; 38]),
        }
    }

    #[test]
    fn open_validation() {
        assert!(open(vec![hop(0, 10), hop(10, 30)], 1).validate().is_ok());
        assert_eq!(open(vec![], 0).validate(), Err(MessageError::EmptyRoute));
        assert!(matches!(
            open(vec![hop(0, 10)], 1).validate(),
            Err(MessageError::HopOutOfRange { hop: 1, hops: 1 })
        ));
        let gap = open(vec![hop(0, 10), hop(11, 30)], 0)
            .validate()
            .unwrap_err();
        assert_eq!(
            gap.to_string(),
            "route does not chain: hop 0 ends at block 10, hop 1 starts at block 11"
        );
        assert_eq!(ProtocolError::from(&gap).code, ErrorCode::SpanMismatch);
        let mut bad = hop(0, 30);
        bad.addrs = vec!["x".into(); MAX_ADDRS + 1];
        assert!(matches!(
            open(vec![bad], 0).validate(),
            Err(MessageError::TooMany { .. })
        ));
        let mut bad = hop(0, 30);
        bad.peer = PeerIdBytes(vec![]);
        assert!(matches!(
            open(vec![bad], 0).validate(),
            Err(MessageError::BadPeerId { len: 0 })
        ));
        let InferRequest::Open { budget, .. } = open(vec![hop(0, 1)], 0) else {
            unreachable!()
        };
        let zero = SessionBudget {
            max_tokens: 0,
            ..budget
        };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "session budget max_tokens = 0 is outside 1..=4294967295"
        );
        let long = SessionBudget {
            idle_timeout_ms: MAX_IDLE_TIMEOUT_MS + 1,
            ..budget
        };
        assert!(long.validate().is_err());
        let patient = SessionBudget {
            open_within_ms: MAX_OPEN_WITHIN_MS + 1,
            ..budget
        };
        assert_eq!(
            patient.validate().unwrap_err().to_string(),
            "session budget open_within_ms = 80001 is outside 1..=80000"
        );
        let hasty = SessionBudget {
            open_within_ms: 0,
            ..budget
        };
        assert!(hasty.validate().is_err());
    }
}
