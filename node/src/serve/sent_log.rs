//! What a hop sent to the next one, kept (bounded) so that a replacement of the next hop
//! can be brought to the same state by replaying it.

use pollen_protocol::HiddenStates;
use std::collections::VecDeque;

/// The hidden states a hop sent to the next one, oldest first, kept so that a
/// replacement of the next hop can be brought to the same state by replaying them.
/// Bounded: past `max_bytes` the log gives up (and says so) rather than grow.
#[derive(Debug)]
pub struct SentLog {
    entries: VecDeque<(u32, HiddenStates)>,
    bytes: usize,
    max_bytes: usize,
    complete: bool,
}

impl SentLog {
    /// An empty log that holds at most `max_bytes` of hidden states.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_bytes,
            complete: true,
        }
    }

    /// Records hidden states sent at `position`.
    pub fn push(&mut self, position: u32, hidden: HiddenStates) {
        if !self.complete {
            return;
        }
        let n = hidden.data().len();
        if self.bytes + n > self.max_bytes {
            self.entries.clear();
            self.bytes = 0;
            self.complete = false;
            return;
        }
        self.bytes += n;
        self.entries.push_back((position, hidden));
    }

    /// Everything sent, in order, if all of it is still held.
    pub fn replay(&self) -> Option<impl Iterator<Item = &(u32, HiddenStates)>> {
        self.complete.then(|| self.entries.iter())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use pollen_protocol::WireDType;

    #[test]
    fn sent_log_keeps_everything_until_its_cap_then_gives_up() {
        let h = |n: u32| {
            HiddenStates::from_f32(&vec![0.5; n as usize * 4], vec![1, n, 4], WireDType::F32)
                .unwrap()
        };
        let mut log = SentLog::new(200);
        log.push(0, h(5)); // 80 bytes
        log.push(5, h(1)); // 16 bytes
        let positions: Vec<u32> = log.replay().unwrap().map(|(p, _)| *p).collect();
        assert_eq!(positions, vec![0, 5]);
        assert_eq!(log.bytes(), 96);
        log.push(6, h(7)); // 112 bytes: past the cap
        assert!(log.replay().is_none());
        assert_eq!(log.bytes(), 0);
        log.push(13, h(1));
        assert!(log.replay().is_none(), "a log with a hole stays unusable");
    }
}
