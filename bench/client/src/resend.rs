//! The resend schedule every shardgate sender follows: this crate's [`Client`](crate::Client),
//! the bench's load generator, the end-to-end tests' delivery loop and the chaos soak.
//!
//! A copy that got RETRY, or no final answer in time, is sent again after
//! `first × 2^(attempt − 1)`, capped at `max`, less a jitter of up to `jitter_percent` of that
//! wait. Jitter only ever shortens a wait, so `max` stays a true bound on the gap between
//! copies, and a jittered wait is never zero while `first` is not, so a resend is never due at
//! once. The schedule is pure: the caller supplies the random draw, so a deterministic sender
//! (the bench hashes the event id) and a seeded one (the tests) give the same shape.

use std::time::Duration;

/// See the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub first: Duration,
    pub max: Duration,
    /// At most 100.
    pub jitter_percent: u32,
}

impl Schedule {
    pub const fn new(first: Duration, max: Duration, jitter_percent: u32) -> Schedule {
        assert!(jitter_percent <= 100, "jitter is a share of the wait");
        Schedule {
            first,
            max,
            jitter_percent,
        }
    }

    /// The wait after attempt `attempt` (1 = the first copy), before jitter.
    pub fn base(&self, attempt: u32) -> Duration {
        // 2^31 × any useful first already exceeds any useful max; the cap keeps the shift in range.
        let doublings = attempt.saturating_sub(1).min(31);
        self.first.saturating_mul(1u32 << doublings).min(self.max)
    }

    /// The wait after attempt `attempt`, jittered by `random` (any u64, read as a fraction of
    /// the jitter span).
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let base = self.base(attempt);
        let jitter_span_ns = base.as_nanos() * u128::from(self.jitter_percent) / 100;
        // A uniform fraction of the span in [0, 1): the u64 read as a 64-bit fixed-point
        // fraction. Strictly below the span, so the result stays above zero.
        let cut_ns = (jitter_span_ns * u128::from(random)) >> 64;
        base.saturating_sub(Duration::from_nanos(u64::try_from(cut_ns).unwrap_or(u64::MAX)))
    }
}

/// splitmix64's finalizer: spreads every bit of `seed` over all 64, so that a caller's draw for
/// `Schedule::delay` (which reads the high bits) can be a counter or a hash of an event id.
pub fn mix(seed: u64) -> u64 {
    let mut mixed = seed;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mixed ^ (mixed >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    // Without jitter each wait doubles the last, up to the cap, and huge attempt counts saturate.
    #[test]
    fn waits_double_up_to_the_cap() {
        let schedule = Schedule::new(10 * MS, 75 * MS, 0);
        let waits: Vec<Duration> = (1..=6).map(|attempt| schedule.delay(attempt, u64::MAX)).collect();
        assert_eq!(waits, [10 * MS, 20 * MS, 40 * MS, 75 * MS, 75 * MS, 75 * MS]);
        assert_eq!(schedule.base(u32::MAX), 75 * MS);
        assert_eq!(schedule.base(0), 10 * MS);
    }

    // Jitter cuts at most its share off a wait, never adds to it, and spans its share.
    #[test]
    fn jitter_stays_within_its_share() {
        let schedule = Schedule::new(100 * MS, Duration::from_secs(1), 50);
        assert_eq!(schedule.delay(1, 0), 100 * MS);
        let deepest = schedule.delay(1, u64::MAX);
        assert!(deepest > 50 * MS && deepest < 51 * MS, "{deepest:?}");
        for random in [1, u64::MAX / 3, u64::MAX / 2, u64::MAX - 1] {
            assert!((50 * MS..=100 * MS).contains(&schedule.delay(1, random)));
        }
    }

    // Full jitter still leaves a wait above zero, so a resend is never due at once.
    #[test]
    fn full_jitter_never_reaches_zero() {
        let schedule = Schedule::new(Duration::from_nanos(1), Duration::from_nanos(1), 100);
        assert!(!schedule.delay(1, u64::MAX).is_zero());
        let schedule = Schedule::new(MS, MS, 100);
        assert!(!schedule.delay(1, u64::MAX).is_zero());
    }
}
