//! Block ranges: the engine's [`BlockRange`] (`usize`, what spans are loaded as) is the
//! node's one type; the wire's [`WireRange`] (`u32`, never empty) is converted here and
//! only here.

use pollen_protocol::{BlockRange as WireRange, BlockRangeError};
pub use pollen_shard::BlockRange;

/// `r` as it travels on the wire; fails for an empty range or one past `u32`.
pub fn to_wire(r: BlockRange) -> Result<WireRange, BlockRangeError> {
    let start = u32::try_from(r.start).unwrap_or(u32::MAX);
    let end = u32::try_from(r.end).unwrap_or(u32::MAX);
    WireRange::new(start, end)
}

/// A range received from a peer.
pub fn from_wire(r: WireRange) -> BlockRange {
    BlockRange {
        start: r.start() as usize,
        end: r.end() as usize,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let r = BlockRange { start: 10, end: 20 };
        assert_eq!(from_wire(to_wire(r).unwrap()), r);
        assert!(to_wire(BlockRange { start: 5, end: 5 }).is_err());
    }
}
