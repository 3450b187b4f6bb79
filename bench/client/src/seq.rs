//! A source of seqs that does not repeat across restarts.
//!
//! The server stores each `(player_id, seq)` once, so a seq reused for a different event of the
//! same player is silently lost (answered DUPLICATE). A counter kept only in memory would restart
//! at the same value after a crash; one saved to disk would need a write per event. Starting at
//! the Unix time in microseconds needs neither: the clock has moved on by the next start.

use crate::unix_time_us;

/// Hands out seqs that strictly increase, starting at the Unix time in microseconds when it was
/// made.
///
/// A seq it hands out is never handed out again, by it or by a counter made later (after a
/// restart, say), while two things hold:
/// - on average, fewer than one seq per microsecond (1M per second) is taken from it over its
///   life; a counter that ran ahead of the clock could meet the next one's start;
/// - the clock does not go back between one counter and the next (NTP steps, a wrong RTC).
///
/// One counter may serve all of a process's players, since a seq only has to be unique per
/// player; the rate bound then covers all of them together. A counter per player raises it to
/// 1M per second per player. Reaching `u64::MAX` would take half a million years of seqs, so
/// [`SeqCounter::next_seq`] does not handle it.
#[derive(Debug)]
pub struct SeqCounter {
    next: u64,
}

impl SeqCounter {
    /// A counter whose first seq is the current Unix time in microseconds.
    pub fn new() -> SeqCounter {
        SeqCounter { next: unix_time_us() }
    }

    /// The next seq: one above the last.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next;
        self.next = self.next.saturating_add(1);
        seq
    }
}

impl Default for SeqCounter {
    fn default() -> SeqCounter {
        SeqCounter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The first seq is the clock's reading at creation, in microseconds.
    #[test]
    fn starts_at_the_clock() {
        let before = unix_time_us();
        let first = SeqCounter::new().next_seq();
        let after = unix_time_us();
        assert!((before..=after).contains(&first), "{before} {first} {after}");
    }
}
