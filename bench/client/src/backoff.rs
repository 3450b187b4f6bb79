//! The resend schedule: exponential waits with a cap and jitter.
//!
//! Jitter only ever shortens a wait, so `backoff_max` stays a true bound on the gap between
//! copies. The random numbers need no quality beyond "differs between clients and between
//! events", so a splitmix64 seeded from std's per-process random hasher keys does, without a
//! dependency.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    jitter_percent: u32,
    rng_state: u64,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration, jitter_percent: u32) -> Backoff {
        Backoff {
            first,
            max,
            jitter_percent: jitter_percent.min(100),
            rng_state: RandomState::new().build_hasher().finish(),
        }
    }

    /// How long to wait for a final answer to the `attempt`-th copy (1-based) before the next:
    /// `first × 2^(attempt-1)` capped at `max`, less a random part of up to `jitter_percent` of
    /// it. Never zero while `first` is not.
    pub(crate) fn delay(&mut self, attempt: u32) -> Duration {
        // 2^31 × any valid first already exceeds any valid max; the cap keeps the shift in range.
        let doublings = attempt.saturating_sub(1).min(31);
        let base = self.first.saturating_mul(1u32 << doublings).min(self.max);
        let jitter_span_ns = base.as_nanos() * u128::from(self.jitter_percent) / 100;
        // A uniform fraction of the span in [0, 1): the random u64 read as a 64-bit fixed-point
        // fraction. Strictly below the span, so the result stays above zero.
        let cut_ns = (jitter_span_ns * u128::from(self.next_random())) >> 64;
        let cut = Duration::from_nanos(u64::try_from(cut_ns).unwrap_or(u64::MAX));
        base.saturating_sub(cut)
    }

    /// splitmix64.
    fn next_random(&mut self) -> u64 {
        self.rng_state = self.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.rng_state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    // Without jitter each wait doubles the last, up to the cap, and huge attempt counts saturate.
    #[test]
    fn waits_double_up_to_the_cap() {
        let mut backoff = Backoff::new(10 * MS, 75 * MS, 0);
        let waits: Vec<Duration> = (1..=6).map(|attempt| backoff.delay(attempt)).collect();
        assert_eq!(waits, [10 * MS, 20 * MS, 40 * MS, 75 * MS, 75 * MS, 75 * MS]);
        assert_eq!(backoff.delay(u32::MAX), 75 * MS);
        assert_eq!(backoff.delay(0), 10 * MS);
    }

    // Jitter cuts at most jitter_percent off a wait, never adds to it, and does vary.
    #[test]
    fn jitter_stays_within_its_share() {
        let mut backoff = Backoff::new(100 * MS, Duration::from_secs(1), 50);
        let waits: Vec<Duration> = (0..1000).map(|_| backoff.delay(1)).collect();
        assert!(waits.iter().all(|wait| (50 * MS..=100 * MS).contains(wait)));
        assert!(waits.iter().any(|wait| *wait < 60 * MS));
        assert!(waits.iter().any(|wait| *wait > 90 * MS));
    }

    // Full jitter still leaves a wait above zero, so a resend is never due at once.
    #[test]
    fn full_jitter_never_reaches_zero() {
        let mut backoff = Backoff::new(Duration::from_nanos(1), Duration::from_nanos(1), 100);
        assert!((0..1000).all(|_| !backoff.delay(1).is_zero()));
    }
}
