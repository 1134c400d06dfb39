//! Errors that one peer reports to another, with stable numeric codes.
//!
//! These are *wire* errors: a server sends a [`ProtocolError`] in an
//! [`crate::InferResponse::Error`] or a [`crate::HelloReply::Refuse`]. Local failures of
//! this crate's functions have their own enums ([`crate::CodecError`],
//! [`crate::AnnounceError`], …).

use std::fmt;

use crate::limits::MAX_ERROR_MESSAGE_LEN;

/// What kind of failure a peer reports. The numeric values are part of the protocol and
/// never change meaning; new codes may be added in later versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u16)]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    VersionMismatch = 1,
    /// The peer does not serve (or know) the requested model.
    UnknownModel = 2,
    /// The requested blocks are not the span this server holds, or a route does not chain.
    SpanMismatch = 3,
    /// A session budget (tokens, message size) was exceeded, or the budget asked is too big.
    OverBudget = 4,
    /// No such session (never opened, closed, or expired after its idle timeout).
    UnknownSession = 5,
    /// The server has no free capacity right now; try another or later.
    Busy = 6,
    /// The request is malformed or out of order.
    BadRequest = 7,
    /// The server failed for its own reasons.
    Internal = 8,
    /// A wait timed out (for example on the next server of a route).
    Timeout = 9,
    /// The peer could not be reached, or its connection broke mid-session.
    Unreachable = 10,
    /// The peers compute with different weight arithmetic (see
    /// [`crate::Announcement::compute`]), so their results would differ.
    ComputeMismatch = 11,
}

/// A numeric error code that this version does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0}")]
pub struct UnknownErrorCode(pub u16);

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::VersionMismatch,
        ErrorCode::UnknownModel,
        ErrorCode::SpanMismatch,
        ErrorCode::OverBudget,
        ErrorCode::UnknownSession,
        ErrorCode::Busy,
        ErrorCode::BadRequest,
        ErrorCode::Internal,
        ErrorCode::Timeout,
        ErrorCode::Unreachable,
        ErrorCode::ComputeMismatch,
    ];

    /// The stable numeric value that travels on the wire.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// A short snake-case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::SpanMismatch => "span_mismatch",
            ErrorCode::OverBudget => "over_budget",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::Busy => "busy",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Internal => "internal",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::ComputeMismatch => "compute_mismatch",
        }
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = UnknownErrorCode;

    fn try_from(code: u16) -> Result<Self, Self::Error> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_u16() == code)
            .ok_or(UnknownErrorCode(code))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error one peer reports to another: a stable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened, for a human; at most [`MAX_ERROR_MESSAGE_LEN`] bytes on the wire.
    pub message: String,
}

impl ProtocolError {
    /// An error with `code` and `message`; a message longer than
    /// [`MAX_ERROR_MESSAGE_LEN`] bytes is cut (at a character boundary) so that it can be
    /// sent.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut cut = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }

    /// The refusal two peers of different protocol versions exchange:
    /// "protocol version mismatch: we speak 1, peer speaks 2".
    pub fn version_mismatch(ours: u32, theirs: u32) -> Self {
        Self::new(
            ErrorCode::VersionMismatch,
            format!("protocol version mismatch: we speak {ours}, peer speaks {theirs}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let numbers: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.as_u16()).collect();
        assert_eq!(numbers, (1..=11).collect::<Vec<u16>>());
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::try_from(c.as_u16()), Ok(c));
        }
        assert_eq!(ErrorCode::try_from(0), Err(UnknownErrorCode(0)));
        assert_eq!(
            ErrorCode::try_from(42).map_err(|e| e.to_string()),
            Err("unknown error code 42".to_owned())
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let e = ProtocolError::new(ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE_LEN));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE_LEN);
        assert!(e.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn version_mismatch_message() {
        assert_eq!(
            ProtocolError::version_mismatch(1, 2).to_string(),
            "version_mismatch: protocol version mismatch: we speak 1, peer speaks 2"
        );
    }
}
