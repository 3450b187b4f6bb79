//! The client's draw of the shared resend schedule (`resend::Schedule`): exponential waits
//! with a cap and jitter. The random numbers need no quality beyond "differs between clients and between
//! events", so a splitmix64 seeded from std's per-process random hasher keys does, without a
//! dependency.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::resend::{mix, Schedule};

pub(crate) struct Backoff {
    schedule: Schedule,
    rng_state: u64,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration, jitter_percent: u32) -> Backoff {
        Backoff {
            schedule: Schedule::new(first, max, jitter_percent.min(100)),
            rng_state: RandomState::new().build_hasher().finish(),
        }
    }

    /// How long to wait for a final answer to the `attempt`-th copy (1-based) before the next
    /// (`resend::Schedule`). Never zero while `first` is not.
    pub(crate) fn delay(&mut self, attempt: u32) -> Duration {
        let random = self.next_random();
        self.schedule.delay(attempt, random)
    }

    /// splitmix64.
    fn next_random(&mut self) -> u64 {
        self.rng_state = self.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.rng_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    // The client's draws do vary, and stay within the schedule's jitter share.
    #[test]
    fn draws_vary_within_the_share() {
        let mut backoff = Backoff::new(100 * MS, Duration::from_secs(1), 50);
        let waits: Vec<Duration> = (0..1000).map(|_| backoff.delay(1)).collect();
        assert!(waits.iter().all(|wait| (50 * MS..=100 * MS).contains(wait)));
        assert!(waits.iter().any(|wait| *wait < 60 * MS));
        assert!(waits.iter().any(|wait| *wait > 90 * MS));
    }
}
