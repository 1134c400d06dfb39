//! What makes a message acceptable: [`MessageError`], and the length, count, peer id and
//! address checks that every message and announcement runs before it is sent or after it
//! is received. Depends on no message type, so that [`crate::messages`] and
//! [`crate::announce`] can both build on it without depending on each other for it.

use crate::error::{ErrorCode, ProtocolError};
use crate::limits::{MAX_ADDR_LEN, MAX_ADDRS, MAX_ERROR_MESSAGE_LEN, MAX_PEER_ID_BYTES};
use crate::types::{BlockRange, PeerIdBytes};

/// Why a message is not acceptable (too long, too many, inconsistent).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A string or byte field is longer than its limit.
    #[error("{what} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A list has more entries than its limit.
    #[error("{what} has {count} entries; the limit is {max}")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A peer id is empty or longer than [`MAX_PEER_ID_BYTES`].
    #[error("peer id of {len} bytes is not plausible (expected 1 to {MAX_PEER_ID_BYTES})")]
    BadPeerId {
        /// Its length.
        len: usize,
    },
    /// An `Open` names no server.
    #[error("route is empty")]
    EmptyRoute,
    /// An `Open`'s receiving hop is not in its route.
    #[error("hop {hop} is outside a route of {hops} hops")]
    HopOutOfRange {
        /// The hop index given.
        hop: u32,
        /// The route's length.
        hops: usize,
    },
    /// Consecutive hops of a route do not chain (one's end is not the next one's start).
    #[error("route does not chain: hop {index} ends at block {end}, hop {next} starts at block {start}", next = index + 1)]
    RouteGap {
        /// The index of the first of the two hops.
        index: usize,
        /// Where it ends.
        end: u32,
        /// Where the next one starts.
        start: u32,
    },
    /// A session budget field is out of its allowed range.
    #[error("session budget {what} = {value} is outside 1..={max}")]
    BadBudget {
        /// Which field.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The largest allowed value.
        max: u64,
    },
    /// A number in an announcement is not meaningful (negative or not finite throughput).
    #[error("{what} is {value}, which is not a finite non-negative number")]
    BadNumber {
        /// Which field.
        what: &'static str,
        /// The value given.
        value: f32,
    },
    /// An announcement's block range does not lie inside its model.
    #[error("block range {blocks} lies outside a model of {num_blocks} blocks")]
    RangeOutsideModel {
        /// The range announced.
        blocks: BlockRange,
        /// The model's block count.
        num_blocks: u32,
    },
}

impl From<&MessageError> for ProtocolError {
    /// How a server reports a request it refuses: a route gap is a span mismatch, a budget
    /// beyond limits is over budget, anything else a bad request.
    fn from(e: &MessageError) -> Self {
        let code = match e {
            MessageError::RouteGap { .. } | MessageError::RangeOutsideModel { .. } => {
                ErrorCode::SpanMismatch
            }
            MessageError::BadBudget { .. } => ErrorCode::OverBudget,
            _ => ErrorCode::BadRequest,
        };
        ProtocolError::new(code, e.to_string())
    }
}

pub(crate) fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), MessageError> {
    if len > max {
        Err(MessageError::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

pub(crate) fn check_count(
    what: &'static str,
    count: usize,
    max: usize,
) -> Result<(), MessageError> {
    if count > max {
        Err(MessageError::TooMany { what, count, max })
    } else {
        Ok(())
    }
}

pub(crate) fn check_peer(peer: &PeerIdBytes) -> Result<(), MessageError> {
    if peer.is_plausible() {
        Ok(())
    } else {
        Err(MessageError::BadPeerId { len: peer.0.len() })
    }
}

pub(crate) fn check_addrs(addrs: &[String]) -> Result<(), MessageError> {
    check_count("address list", addrs.len(), MAX_ADDRS)?;
    for a in addrs {
        check_len("address", a.len(), MAX_ADDR_LEN)?;
    }
    Ok(())
}

pub(crate) fn check_error(e: &ProtocolError) -> Result<(), MessageError> {
    check_len("error message", e.message.len(), MAX_ERROR_MESSAGE_LEN)
}

/// A peer-supplied string made safe to print to a terminal or a page: control characters
/// (escape sequences, carriage returns, bidirectional overrides and the like) are dropped,
/// and the rest kept. Use it on anything a peer chose (model names, agents) before
/// showing it.
pub fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(
                    c,
                    '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                )
        })
        .collect()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_characters_are_dropped() {
        assert_eq!(printable("SmolLM2-135M"), "SmolLM2-135M");
        assert_eq!(
            printable("evil\u{1b}[2J\u{1b}]0;x\u{7}\r\nname"),
            "evil[2J]0;xname"
        );
        assert_eq!(printable("a\u{202e}b\u{0}c"), "abc");
        assert_eq!(printable("é 模型"), "é 模型");
    }
}
