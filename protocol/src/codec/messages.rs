//! The body layout of every message and of the field types inside them (ids, ranges,
//! hidden states, errors), as [`Wire`] implementations built from the helpers in
//! `primitives`. Fields go on the wire in declaration order; see [`crate::codec`] for the
//! layouts in words.

use bincode::de::Decoder;
use bincode::enc::Encoder;
use bincode::enc::write::Writer;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};

use super::frame::sealed::Wire;
use super::primitives::{
    get_addrs, get_array, get_bytes, get_list, get_raw, get_string, get_tag, other, put_bytes,
    put_list, put_strings, put_tag, unknown_tag,
};
use crate::announce::{Announcement, PeerRtt, SignedAnnouncement};
use crate::error::{ErrorCode, ProtocolError};
use crate::hidden::{HiddenStates, WireDType};
use crate::limits::{
    MAX_AGENT_LEN, MAX_COMPUTE_LEN, MAX_ERROR_MESSAGE_LEN, MAX_HELLO_BYTES, MAX_HIDDEN_DIMS,
    MAX_LIST_ANNOUNCEMENTS, MAX_MODEL_NAME_LEN, MAX_PEER_ID_BYTES, MAX_PEER_RTTS, MAX_ROUTE_HOPS,
};
use crate::messages::{
    AnnounceRequest, AnnounceResponse, Hello, HelloReply, InferRequest, InferResponse, ListCursor,
    RouteHop, SessionBudget,
};
use crate::types::{BlockRange, ModelId, PeerIdBytes, Roles, SessionId};

impl Wire for ModelId {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        e.writer().write(self.as_bytes())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        get_array::<_, 32>(d).map(ModelId::from_bytes)
    }
}

impl Wire for SessionId {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        e.writer().write(&self.0.to_le_bytes())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        get_array::<_, 8>(d).map(|b| SessionId(u64::from_le_bytes(b)))
    }
}

impl Wire for BlockRange {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.start().encode(e)?;
        self.end().encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let start = u32::decode(d)?;
        let end = u32::decode(d)?;
        BlockRange::new(start, end).map_err(|e| other(e.to_string()))
    }
}

impl Wire for PeerIdBytes {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        put_bytes(e, &self.0)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        get_bytes(d, MAX_PEER_ID_BYTES, "peer id").map(PeerIdBytes)
    }
}

impl Wire for Roles {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.bits().encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        u8::decode(d).map(Roles::from_bits)
    }
}

impl Wire for WireDType {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        put_tag(e, self.tag())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let tag = get_tag(d)?;
        WireDType::from_tag(tag).ok_or_else(|| other(format!("unknown wire dtype tag {tag}")))
    }
}

impl Wire for HiddenStates {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.dtype().put(e)?;
        put_list(e, self.shape())?;
        put_bytes(e, self.data())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let dtype = WireDType::get(d)?;
        let shape: Vec<u32> = get_list(d, MAX_HIDDEN_DIMS, "hidden states shape")?;
        let expected =
            HiddenStates::byte_len_for(dtype, &shape).map_err(|e| other(e.to_string()))?;
        let claimed = u64::decode(d)?;
        if claimed != expected as u64 {
            return Err(other(format!(
                "hidden states claim {claimed} bytes but shape {shape:?} of {dtype} needs {expected}"
            )));
        }
        let data = get_raw(d, expected)?;
        HiddenStates::new(dtype, shape, data).map_err(|e| other(e.to_string()))
    }
}

impl Wire for ErrorCode {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.as_u16().encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        ErrorCode::try_from(u16::decode(d)?).map_err(|e| other(e.to_string()))
    }
}

impl Wire for ProtocolError {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.code.put(e)?;
        put_bytes(e, self.message.as_bytes())
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(ProtocolError {
            code: ErrorCode::get(d)?,
            message: get_string(d, MAX_ERROR_MESSAGE_LEN, "error message")?,
        })
    }
}

impl Wire for Hello {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.version.encode(e)?;
        match &self.model_id {
            None => put_tag(e, 0)?,
            Some(id) => {
                put_tag(e, 1)?;
                id.put(e)?;
            }
        }
        self.roles.put(e)?;
        put_bytes(e, self.agent.as_bytes())?;
        // Extensions: empty in this version.
        put_bytes(e, &[])
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        let version = u32::decode(d)?;
        let model_id = match get_tag(d)? {
            0 => None,
            1 => Some(ModelId::get(d)?),
            t => return Err(unknown_tag("model id option", t)),
        };
        let roles = Roles::get(d)?;
        let agent = get_string(d, MAX_AGENT_LEN, "agent")?;
        // Extensions from later versions are skipped (read, bounded, and dropped).
        let _extensions = get_bytes(d, MAX_HELLO_BYTES, "hello extensions")?;
        Ok(Hello {
            version,
            model_id,
            roles,
            agent,
        })
    }
}

impl Wire for HelloReply {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            HelloReply::Accept(h) => {
                put_tag(e, 0)?;
                h.put(e)
            }
            HelloReply::Refuse(err) => {
                put_tag(e, 1)?;
                err.put(e)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Hello::get(d).map(HelloReply::Accept),
            1 => ProtocolError::get(d).map(HelloReply::Refuse),
            t => Err(unknown_tag("hello reply", t)),
        }
    }
}

impl Wire for RouteHop {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.peer.put(e)?;
        self.blocks.put(e)?;
        put_strings(e, &self.addrs)?;
        self.step_us.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(RouteHop {
            peer: PeerIdBytes::get(d)?,
            blocks: BlockRange::get(d)?,
            addrs: get_addrs(d)?,
            step_us: u32::decode(d)?,
        })
    }
}

impl Wire for SessionBudget {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.max_tokens.encode(e)?;
        self.max_message_bytes.encode(e)?;
        self.idle_timeout_ms.encode(e)?;
        self.open_within_ms.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(SessionBudget {
            max_tokens: u32::decode(d)?,
            max_message_bytes: u32::decode(d)?,
            idle_timeout_ms: u32::decode(d)?,
            open_within_ms: u32::decode(d)?,
        })
    }
}

impl Wire for InferRequest {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            InferRequest::Open {
                session,
                model_id,
                route,
                hop,
                budget,
                wire_dtype,
                compute,
                client,
            } => {
                put_tag(e, 0)?;
                session.put(e)?;
                model_id.put(e)?;
                put_list(e, route)?;
                hop.encode(e)?;
                budget.put(e)?;
                wire_dtype.put(e)?;
                put_bytes(e, compute.as_bytes())?;
                client.put(e)
            }
            InferRequest::Forward {
                session,
                position,
                step,
                hidden,
                last_row_only,
            } => {
                put_tag(e, 1)?;
                session.put(e)?;
                position.encode(e)?;
                step.encode(e)?;
                hidden.put(e)?;
                last_row_only.encode(e)
            }
            InferRequest::Close { session } => {
                put_tag(e, 2)?;
                session.put(e)
            }
            InferRequest::Attach { session } => {
                put_tag(e, 3)?;
                session.put(e)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Ok(InferRequest::Open {
                session: SessionId::get(d)?,
                model_id: ModelId::get(d)?,
                route: get_list(d, MAX_ROUTE_HOPS, "route")?,
                hop: u32::decode(d)?,
                budget: SessionBudget::get(d)?,
                wire_dtype: WireDType::get(d)?,
                compute: get_string(d, MAX_COMPUTE_LEN, "compute mode")?,
                client: PeerIdBytes::get(d)?,
            }),
            1 => Ok(InferRequest::Forward {
                session: SessionId::get(d)?,
                position: u32::decode(d)?,
                step: u64::decode(d)?,
                hidden: HiddenStates::get(d)?,
                last_row_only: bool::decode(d)?,
            }),
            2 => Ok(InferRequest::Close {
                session: SessionId::get(d)?,
            }),
            3 => Ok(InferRequest::Attach {
                session: SessionId::get(d)?,
            }),
            t => Err(unknown_tag("infer request", t)),
        }
    }
}

impl Wire for InferResponse {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            InferResponse::Opened {
                session,
                free_tokens,
            } => {
                put_tag(e, 0)?;
                session.put(e)?;
                free_tokens.encode(e)
            }
            InferResponse::Output {
                session,
                step,
                position,
                hidden,
            } => {
                put_tag(e, 1)?;
                session.put(e)?;
                step.encode(e)?;
                position.encode(e)?;
                hidden.put(e)
            }
            InferResponse::Closed { session } => {
                put_tag(e, 2)?;
                session.put(e)
            }
            InferResponse::Error(err) => {
                put_tag(e, 3)?;
                err.put(e)
            }
            InferResponse::Ack { session, step } => {
                put_tag(e, 4)?;
                session.put(e)?;
                step.encode(e)
            }
            InferResponse::HopFailed {
                session,
                step,
                hop,
                peer,
                error,
                by,
                signature,
            } => {
                put_tag(e, 5)?;
                session.put(e)?;
                step.encode(e)?;
                hop.encode(e)?;
                peer.put(e)?;
                error.put(e)?;
                by.encode(e)?;
                e.writer().write(signature)
            }
            InferResponse::Attached { session } => {
                put_tag(e, 6)?;
                session.put(e)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Ok(InferResponse::Opened {
                session: SessionId::get(d)?,
                free_tokens: u32::decode(d)?,
            }),
            1 => Ok(InferResponse::Output {
                session: SessionId::get(d)?,
                step: u64::decode(d)?,
                position: u32::decode(d)?,
                hidden: HiddenStates::get(d)?,
            }),
            2 => Ok(InferResponse::Closed {
                session: SessionId::get(d)?,
            }),
            3 => ProtocolError::get(d).map(InferResponse::Error),
            4 => Ok(InferResponse::Ack {
                session: SessionId::get(d)?,
                step: u64::decode(d)?,
            }),
            5 => Ok(InferResponse::HopFailed {
                session: SessionId::get(d)?,
                step: u64::decode(d)?,
                hop: u32::decode(d)?,
                peer: PeerIdBytes::get(d)?,
                error: ProtocolError::get(d)?,
                by: u32::decode(d)?,
                signature: get_array(d)?,
            }),
            6 => Ok(InferResponse::Attached {
                session: SessionId::get(d)?,
            }),
            t => Err(unknown_tag("infer response", t)),
        }
    }
}

impl Wire for Announcement {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.peer.put(e)?;
        self.model_id.put(e)?;
        put_bytes(e, self.model_name.as_bytes())?;
        self.num_blocks.encode(e)?;
        self.blocks.put(e)?;
        self.throughput.encode(e)?;
        self.free_sessions.encode(e)?;
        self.free_cache_tokens.encode(e)?;
        put_strings(e, &self.addrs)?;
        put_bytes(e, self.compute.as_bytes())?;
        put_list(e, &self.next_rtts)?;
        self.issued_at_ms.encode(e)?;
        self.expires_at_ms.encode(e)?;
        self.seq.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(Announcement {
            peer: PeerIdBytes::get(d)?,
            model_id: ModelId::get(d)?,
            model_name: get_string(d, MAX_MODEL_NAME_LEN, "model name")?,
            num_blocks: u32::decode(d)?,
            blocks: BlockRange::get(d)?,
            throughput: f32::decode(d)?,
            free_sessions: u32::decode(d)?,
            free_cache_tokens: u32::decode(d)?,
            addrs: get_addrs(d)?,
            compute: get_string(d, MAX_COMPUTE_LEN, "compute mode")?,
            next_rtts: get_list(d, MAX_PEER_RTTS, "round-trip times")?,
            issued_at_ms: u64::decode(d)?,
            expires_at_ms: u64::decode(d)?,
            seq: u64::decode(d)?,
        })
    }
}

impl Wire for PeerRtt {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.peer.put(e)?;
        self.rtt_us.encode(e)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(PeerRtt {
            peer: PeerIdBytes::get(d)?,
            rtt_us: u32::decode(d)?,
        })
    }
}

impl Wire for SignedAnnouncement {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        self.announcement.put(e)?;
        e.writer().write(&self.public_key)?;
        e.writer().write(&self.signature)
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        Ok(SignedAnnouncement {
            announcement: Announcement::get(d)?,
            public_key: get_array(d)?,
            signature: get_array(d)?,
        })
    }
}

impl Wire for AnnounceRequest {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            AnnounceRequest::Get { model_id } => {
                put_tag(e, 0)?;
                model_id.put(e)
            }
            AnnounceRequest::Publish(a) => {
                put_tag(e, 1)?;
                a.put(e)
            }
            AnnounceRequest::List { model_id } => {
                put_tag(e, 2)?;
                put_model_filter(e, model_id)
            }
            AnnounceRequest::ListPage {
                model_id,
                order,
                after,
            } => {
                put_tag(e, 3)?;
                put_model_filter(e, model_id)?;
                e.writer().write(order)?;
                put_cursor(e, after)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => Ok(AnnounceRequest::Get {
                model_id: ModelId::get(d)?,
            }),
            1 => SignedAnnouncement::get(d).map(|a| AnnounceRequest::Publish(Box::new(a))),
            2 => {
                let model_id = match get_tag(d)? {
                    0 => None,
                    1 => Some(ModelId::get(d)?),
                    t => return Err(unknown_tag("model filter", t)),
                };
                Ok(AnnounceRequest::List { model_id })
            }
            3 => {
                let model_id = match get_tag(d)? {
                    0 => None,
                    1 => Some(ModelId::get(d)?),
                    t => return Err(unknown_tag("model filter", t)),
                };
                let order = get_array::<_, 16>(d)?;
                let after = get_cursor(d)?;
                Ok(AnnounceRequest::ListPage {
                    model_id,
                    order,
                    after,
                })
            }
            t => Err(unknown_tag("announce request", t)),
        }
    }
}

impl Wire for AnnounceResponse {
    fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
        match self {
            AnnounceResponse::Announcement(a) => {
                put_tag(e, 0)?;
                a.put(e)
            }
            AnnounceResponse::NotServing => put_tag(e, 1),
            AnnounceResponse::Accepted => put_tag(e, 2),
            AnnounceResponse::Refused(err) => {
                put_tag(e, 3)?;
                err.put(e)
            }
            AnnounceResponse::List(list) => {
                put_tag(e, 4)?;
                put_list(e, list)
            }
            AnnounceResponse::Page { list, next } => {
                put_tag(e, 5)?;
                put_list(e, list)?;
                put_cursor(e, next)
            }
        }
    }
    fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
        match get_tag(d)? {
            0 => SignedAnnouncement::get(d).map(|a| AnnounceResponse::Announcement(Box::new(a))),
            1 => Ok(AnnounceResponse::NotServing),
            2 => Ok(AnnounceResponse::Accepted),
            3 => ProtocolError::get(d).map(AnnounceResponse::Refused),
            4 => Ok(AnnounceResponse::List(get_list(
                d,
                MAX_LIST_ANNOUNCEMENTS,
                "announcement list",
            )?)),
            5 => {
                let list = get_list(d, MAX_LIST_ANNOUNCEMENTS, "announcement page")?;
                let next = get_cursor(d)?;
                Ok(AnnounceResponse::Page { list, next })
            }
            t => Err(unknown_tag("announce response", t)),
        }
    }
}

fn put_model_filter<E: Encoder>(e: &mut E, model_id: &Option<ModelId>) -> Result<(), EncodeError> {
    match model_id {
        None => put_tag(e, 0),
        Some(m) => {
            put_tag(e, 1)?;
            m.put(e)
        }
    }
}

/// A list cursor: a tag (0: none, 1: some), then model id, rank (u32), place (u64), peer
/// id.
fn put_cursor<E: Encoder>(e: &mut E, c: &Option<ListCursor>) -> Result<(), EncodeError> {
    match c {
        None => put_tag(e, 0),
        Some(c) => {
            put_tag(e, 1)?;
            c.model_id.put(e)?;
            c.rank.encode(e)?;
            c.place.encode(e)?;
            c.peer.put(e)
        }
    }
}

fn get_cursor<D: Decoder>(d: &mut D) -> Result<Option<ListCursor>, DecodeError> {
    match get_tag(d)? {
        0 => Ok(None),
        1 => Ok(Some(ListCursor {
            model_id: ModelId::get(d)?,
            rank: u32::decode(d)?,
            place: u64::decode(d)?,
            peer: PeerIdBytes::get(d)?,
        })),
        t => Err(unknown_tag("list cursor", t)),
    }
}
