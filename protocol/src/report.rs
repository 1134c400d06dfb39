//! Signed failure reports.
//!
//! A server signs every [`InferResponse::HopFailed`] it writes with its identity key (the
//! ed25519 key of its peer id), bound to the session (its id, its client and its whole
//! route: [`SessionBinding`]) and to the writer's own place in the route (`by`). The hops
//! that pass a report up the chain and the client check the signature against the peer id
//! at that place. So no hop can change a report on its way up, nor write one in another
//! hop's name, nor replay one from another session: what a hop can still say is something
//! about itself or about one of its two neighbours ([`check_report`]), and the client,
//! which cannot tell who is right when one hop accuses another, judges by that.
//!
//! Signatures are not on the hot path: a report ends a session.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{
    BlockRange, InferRequest, InferResponse, PeerIdBytes, ProtocolError, RouteHop, SessionId,
};

/// The byte length of a report's signature.
pub const REPORT_SIGNATURE_LEN: usize = 64;

/// What separates report signatures from every other use of a server's key.
const REPORT_DOMAIN: &[u8] = b"pollen/hop-failed/v1\0";

/// What every failure report of one session is bound to: the session's id and a digest
/// of everything its client's `Open` asked for (client, model, route with each hop's peer
/// id and blocks, budget, wire dtype, compute mode), except `open_within_ms`, which each
/// hop changes. The client computes it from the `Open` it sent, each server from the one
/// it received: a hop that changed the `Open` on its way cannot have a hop after it sign
/// a report that counts in the client's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionBinding {
    session: SessionId,
    digest: [u8; 32],
}

impl SessionBinding {
    /// The binding of the session `open` opens (`None` for any other request).
    pub fn of_open(open: &InferRequest) -> Option<Self> {
        let InferRequest::Open {
            session,
            model_id,
            route,
            hop: _,
            budget,
            wire_dtype,
            compute,
            client,
        } = open
        else {
            return None;
        };
        let mut h = blake3::Hasher::new();
        h.update(REPORT_DOMAIN);
        h.update(&session.0.to_le_bytes());
        put_bytes(&mut h, &client.0);
        h.update(model_id.as_bytes());
        h.update(&(route.len() as u64).to_le_bytes());
        for hop in route {
            put_bytes(&mut h, &hop.peer.0);
            put_blocks(&mut h, hop.blocks);
        }
        for n in [
            budget.max_tokens,
            budget.max_message_bytes,
            budget.idle_timeout_ms,
        ] {
            h.update(&n.to_le_bytes());
        }
        h.update(&[wire_dtype.tag()]);
        put_bytes(&mut h, compute.as_bytes());
        Some(Self {
            session: *session,
            digest: *h.finalize().as_bytes(),
        })
    }

    /// The session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// A report, signed with the 32-byte ed25519 secret key `secret` (of the peer at hop
    /// `by` of the route, its writer): hop `hop` (peer `peer`) failed at step `step` with
    /// `error`.
    pub fn report(
        &self,
        secret: &[u8; 32],
        by: u32,
        step: u64,
        hop: u32,
        peer: PeerIdBytes,
        error: ProtocolError,
    ) -> InferResponse {
        let bytes = self.signing_bytes(by, step, hop, &peer, &error);
        InferResponse::HopFailed {
            session: self.session,
            step,
            hop,
            peer,
            error,
            by,
            signature: SigningKey::from_bytes(secret).sign(&bytes).to_bytes(),
        }
    }

    /// What a report's signature covers.
    fn signing_bytes(
        &self,
        by: u32,
        step: u64,
        hop: u32,
        peer: &PeerIdBytes,
        error: &ProtocolError,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + peer.0.len() + error.message.len());
        out.extend_from_slice(REPORT_DOMAIN);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&by.to_le_bytes());
        out.extend_from_slice(&step.to_le_bytes());
        out.extend_from_slice(&hop.to_le_bytes());
        out.extend_from_slice(&(peer.0.len() as u64).to_le_bytes());
        out.extend_from_slice(&peer.0);
        out.extend_from_slice(&error.code.as_u16().to_le_bytes());
        out.extend_from_slice(&(error.message.len() as u64).to_le_bytes());
        out.extend_from_slice(error.message.as_bytes());
        out
    }
}

fn put_bytes(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn put_blocks(h: &mut blake3::Hasher, blocks: BlockRange) {
    h.update(&blocks.start().to_le_bytes());
    h.update(&blocks.end().to_le_bytes());
}

/// Who a report that passed [`check_report`] speaks about, from its writer's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// The writer reports its own failure.
    Itself,
    /// The writer says the hop before it sent it a step it refuses: one hop's word
    /// against another's.
    HopBefore,
    /// The writer says the hop after it failed (could not be reached, went silent, sent
    /// something wrong).
    HopAfter,
}

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not a `HopFailed`.
    #[error("not a failure report")]
    NotAReport,
    /// It belongs to another session.
    #[error("the report is for session {got}, not {want}")]
    OtherSession {
        /// The report's session.
        got: SessionId,
        /// This session.
        want: SessionId,
    },
    /// It names hops outside the route, or a hop that is not the writer or one of its
    /// neighbours, or a peer other than the route's at that hop.
    #[error("the report of hop {by} about hop {hop} does not fit a route of {hops} hops")]
    BadPlace {
        /// The writer's place.
        by: u32,
        /// The hop it names.
        hop: u32,
        /// The route's length.
        hops: usize,
    },
    /// The writer's peer id holds no ed25519 key.
    #[error("hop {by}'s peer id holds no ed25519 key")]
    NoKey {
        /// The writer's place.
        by: u32,
    },
    /// The signature is not hop `by`'s over this report in this session.
    #[error("the report is not signed by hop {by}")]
    BadSignature {
        /// The claimed writer's place.
        by: u32,
    },
}

/// Checks `report` against the session's binding and route: it is a `HopFailed` of this
/// session, written by a hop of the route (`by`) about itself or a neighbour, naming the
/// route's peer at that hop, and signed by the writer (strict ed25519, weak keys refused).
/// Returns what the report speaks about.
pub fn check_report(
    report: &InferResponse,
    binding: &SessionBinding,
    route: &[RouteHop],
) -> Result<Reported, ReportError> {
    let InferResponse::HopFailed {
        session,
        step,
        hop,
        peer,
        error,
        by,
        signature,
    } = report
    else {
        return Err(ReportError::NotAReport);
    };
    if *session != binding.session {
        return Err(ReportError::OtherSession {
            got: *session,
            want: binding.session,
        });
    }
    let bad_place = || ReportError::BadPlace {
        by: *by,
        hop: *hop,
        hops: route.len(),
    };
    let (Some(writer), Some(named)) = (route.get(*by as usize), route.get(*hop as usize)) else {
        return Err(bad_place());
    };
    let about = match i64::from(*hop) - i64::from(*by) {
        0 => Reported::Itself,
        -1 => Reported::HopBefore,
        1 => Reported::HopAfter,
        _ => return Err(bad_place()),
    };
    if named.peer != *peer {
        return Err(bad_place());
    }
    let key = ed25519_key_of_peer(&writer.peer).ok_or(ReportError::NoKey { by: *by })?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| ReportError::NoKey { by: *by })?;
    if key.is_weak() {
        return Err(ReportError::NoKey { by: *by });
    }
    let bytes = binding.signing_bytes(*by, *step, *hop, peer, error);
    key.verify_strict(&bytes, &Signature::from_bytes(signature))
        .map_err(|_| ReportError::BadSignature { by: *by })?;
    Ok(about)
}

/// The ed25519 public key inside a peer id made from one ([`crate::peer_id_bytes_for_ed25519`]);
/// `None` for any other peer id.
pub fn ed25519_key_of_peer(peer: &PeerIdBytes) -> Option<[u8; 32]> {
    let key = peer
        .0
        .strip_prefix(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20][..])?;
    key.try_into().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{ErrorCode, ModelId, SessionBudget, WireDType, peer_id_bytes_for_ed25519};

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn peer(n: u8) -> PeerIdBytes {
        peer_id_bytes_for_ed25519(&SigningKey::from_bytes(&key(n)).verifying_key().to_bytes())
    }

    fn route() -> Vec<RouteHop> {
        (0..3u8)
            .map(|i| RouteHop {
                peer: peer(i + 1),
                blocks: BlockRange::new(u32::from(i) * 10, u32::from(i) * 10 + 10).unwrap(),
                addrs: vec![],
                step_us: 1,
            })
            .collect()
    }

    fn open(session: u64, client: PeerIdBytes, route: &[RouteHop]) -> InferRequest {
        InferRequest::Open {
            session: SessionId(session),
            model_id: ModelId::from_bytes([5; 32]),
            route: route.to_vec(),
            hop: 0,
            budget: SessionBudget {
                max_tokens: 64,
                max_message_bytes: 1 << 20,
                idle_timeout_ms: 1_000,
                open_within_ms: 20_000,
            },
            wire_dtype: WireDType::F32,
            compute: "fast/cpu".into(),
            client,
        }
    }

    fn bind(open: &InferRequest) -> SessionBinding {
        SessionBinding::of_open(open).unwrap()
    }

    fn binding(route: &[RouteHop]) -> SessionBinding {
        bind(&open(7, peer(9), route))
    }

    fn err() -> ProtocolError {
        ProtocolError::new(ErrorCode::Internal, "it broke")
    }

    #[test]
    fn a_key_comes_back_out_of_its_peer_id() {
        let k = SigningKey::from_bytes(&key(3)).verifying_key().to_bytes();
        assert_eq!(ed25519_key_of_peer(&peer_id_bytes_for_ed25519(&k)), Some(k));
        assert_eq!(ed25519_key_of_peer(&PeerIdBytes(vec![0; 38])), None);
        let mut short = peer(3);
        short.0.pop();
        assert_eq!(ed25519_key_of_peer(&short), None);
    }

    #[test]
    fn a_hop_reports_about_itself_and_its_neighbours_only() {
        let r = route();
        let b = binding(&r);
        let k = key(2); // hop 1's
        let report = |hop: u32| b.report(&k, 1, 4, hop, r[hop as usize].peer.clone(), err());
        assert_eq!(check_report(&report(1), &b, &r), Ok(Reported::Itself));
        assert_eq!(check_report(&report(0), &b, &r), Ok(Reported::HopBefore));
        assert_eq!(check_report(&report(2), &b, &r), Ok(Reported::HopAfter));
        // Hop 0 cannot report about hop 2.
        let far = b.report(&key(1), 0, 4, 2, r[2].peer.clone(), err());
        assert!(matches!(
            check_report(&far, &b, &r),
            Err(ReportError::BadPlace { .. })
        ));
        // Nor name another peer at a hop, nor a hop outside the route.
        let wrong_peer = b.report(&k, 1, 4, 2, peer(8), err());
        assert!(check_report(&wrong_peer, &b, &r).is_err());
        let outside = b.report(&k, 3, 4, 3, r[2].peer.clone(), err());
        assert!(check_report(&outside, &b, &r).is_err());
    }

    #[test]
    fn a_report_written_or_changed_by_another_hop_does_not_verify() {
        let r = route();
        let b = binding(&r);
        // Hop 0 writes a report in hop 2's name.
        let forged = b.report(&key(1), 2, 4, 2, r[2].peer.clone(), err());
        assert_eq!(
            check_report(&forged, &b, &r),
            Err(ReportError::BadSignature { by: 2 })
        );
        // Every field of a real one, changed on the way.
        let real = b.report(&key(3), 2, 4, 2, r[2].peer.clone(), err());
        assert_eq!(check_report(&real, &b, &r), Ok(Reported::Itself));
        let InferResponse::HopFailed {
            session,
            step,
            hop,
            peer,
            error,
            by,
            signature,
        } = real
        else {
            unreachable!()
        };
        let with = |f: &dyn Fn(&mut InferResponse)| {
            let mut m = InferResponse::HopFailed {
                session,
                step,
                hop,
                peer: peer.clone(),
                error: error.clone(),
                by,
                signature,
            };
            f(&mut m);
            check_report(&m, &b, &r)
        };
        let changes: [&dyn Fn(&mut InferResponse); 4] = [
            &|m| {
                if let InferResponse::HopFailed { step, .. } = m {
                    *step += 1;
                }
            },
            &|m| {
                if let InferResponse::HopFailed { error, .. } = m {
                    error.code = ErrorCode::Busy;
                }
            },
            &|m| {
                if let InferResponse::HopFailed { error, .. } = m {
                    error.message.push('!');
                }
            },
            &|m| {
                if let InferResponse::HopFailed { signature, .. } = m {
                    signature[0] ^= 1;
                }
            },
        ];
        for change in changes {
            assert_eq!(with(change), Err(ReportError::BadSignature { by: 2 }));
        }
        // Moved to hop 1's place (it names hop 2, its next hop): not hop 1's signature.
        assert_eq!(
            with(&|m| {
                if let InferResponse::HopFailed { by, .. } = m {
                    *by = 1;
                }
            }),
            Err(ReportError::BadSignature { by: 1 })
        );
    }

    #[test]
    fn a_report_from_another_session_or_route_does_not_verify() {
        let r = route();
        let b = binding(&r);
        let real = b.report(&key(3), 2, 4, 2, r[2].peer.clone(), err());
        // Same session id, another client.
        let other_client = bind(&open(7, peer(8), &r));
        assert!(check_report(&real, &other_client, &r).is_err());
        // Same session id and client, the hops before on other peers.
        let mut other_route = r.clone();
        other_route[1].peer = peer(8);
        let other = bind(&open(7, peer(9), &other_route));
        assert!(check_report(&real, &other, &other_route).is_err());
        // The same route, asked for more tokens or another compute mode on the way (a hop
        // changing the Open it passes on); only the open's time and hop may change.
        let mut more = open(7, peer(9), &r);
        let mut other_mode = more.clone();
        let mut passed_on = more.clone();
        if let InferRequest::Open { budget, .. } = &mut more {
            budget.max_tokens += 1;
        }
        if let InferRequest::Open { compute, .. } = &mut other_mode {
            compute.push('!');
        }
        if let InferRequest::Open { budget, hop, .. } = &mut passed_on {
            budget.open_within_ms -= 1_000;
            *hop = 2;
        }
        assert!(check_report(&real, &bind(&more), &r).is_err());
        assert!(check_report(&real, &bind(&other_mode), &r).is_err());
        assert!(check_report(&real, &bind(&passed_on), &r).is_ok());
        assert_eq!(
            SessionBinding::of_open(&InferRequest::Close {
                session: SessionId(7)
            }),
            None
        );
        // Another session.
        let later = bind(&open(8, peer(9), &r));
        assert!(matches!(
            check_report(&real, &later, &r),
            Err(ReportError::OtherSession { .. })
        ));
        assert_eq!(
            check_report(
                &InferResponse::Closed {
                    session: SessionId(7)
                },
                &b,
                &r
            ),
            Err(ReportError::NotAReport)
        );
    }
}
