//! The client's random draws for the resend loop's jitter (`resend::Schedule::delay`). They need
//! no quality beyond "differs between clients and between events", so a splitmix64 seeded from
//! std's per-process random hasher keys does, without a dependency.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use crate::resend::mix;

pub(crate) struct Draws {
    state: u64,
}

impl Draws {
    pub(crate) fn new() -> Draws {
        Draws {
            state: RandomState::new().build_hasher().finish(),
        }
    }

    /// splitmix64.
    pub(crate) fn next_draw(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resend::Schedule;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    // The client's draws do vary, and spread a jittered wait over its share.
    #[test]
    fn draws_vary_within_the_share() {
        let (mut draws, schedule) = (Draws::new(), Schedule::new(100 * MS, Duration::from_secs(1), 50));
        let waits: Vec<Duration> = (0..1000).map(|_| schedule.delay(1, draws.next_draw())).collect();
        assert!(waits.iter().all(|wait| (50 * MS..=100 * MS).contains(wait)));
        assert!(waits.iter().any(|wait| *wait < 60 * MS));
        assert!(waits.iter().any(|wait| *wait > 90 * MS));
    }
}
