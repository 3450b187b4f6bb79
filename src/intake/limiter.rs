//! The per-source UDP rate limit: a token bucket per source (`source.rs`),
//! kept in a fixed table allocated when the shard starts.
//!
//! Each bucket holds up to `burst` tokens and gains `rate` tokens a second; a
//! frame takes one, and a frame that finds none is limited (the UDP path
//! drops it unanswered, see docs/design.md, "Abuse limits"). A bucket is
//! stored as one number, its *theoretical arrival time* (GCRA, the form of a
//! token bucket that ATM and most rate limiters use): the time at which the
//! bucket would be full again. Taking a token moves it one interval
//! (`1 s / rate`) later; a frame is refused when it lies more than
//! `burst - 1` intervals ahead of now. That is exactly a token bucket, with
//! no refill step, no division and no float per frame. The interval is
//! rounded up to whole nanoseconds, so a source never gets more than its rate.
//!
//! The table is set-associative: a source hashes (with a random seed) to a
//! set of `UDP_SOURCE_TABLE_WAYS` entries. A new source takes the entry of its
//! set whose bucket is the fullest (the smallest arrival time). A bucket that
//! is full is exactly a new one, so reusing it loses nothing; only when a set
//! holds more sources than ways that all sent within the last `burst / rate`
//! seconds does a source lose its state, and then it starts again with a full
//! bucket: an eviction can only ever give a source more, never refuse a
//! source that kept to its rate. Nothing here allocates after `new`.

use std::time::Instant;

use crate::intake::source::{SourceHasher, SourceKey};
use crate::limits::UDP_SOURCE_TABLE_WAYS;

const NANOS_PER_SEC: u64 = 1_000_000_000;

#[derive(Clone, Copy, Default)]
struct Entry {
    source: SourceKey,
    /// Nanoseconds after `epoch` at which this bucket is full again; at or
    /// before now it is full. An unused entry (0) is a full bucket too, so it
    /// needs no separate "empty" mark.
    full_at_ns: u64,
}

/// One shard's token buckets. Single-threaded: only its shard's UDP receive
/// loop uses it.
pub struct SourceLimiter {
    entries: Box<[Entry]>,
    set_mask: usize,
    hasher: SourceHasher,
    interval_ns: u64,
    tolerance_ns: u64,
    epoch: Instant,
    /// The entry of the last source looked up: the frames of one datagram
    /// come from one source, so most lookups need no hash.
    last_index: Option<usize>,
}

impl SourceLimiter {
    /// A table of at least `entries` buckets (rounded up to a power of two
    /// sets), each refilling `frames_per_sec` tokens a second up to
    /// `burst_frames`. `config.rs` keeps the arguments within `limits.rs`.
    pub fn new(entries: usize, frames_per_sec: u64, burst_frames: u64) -> SourceLimiter {
        let sets = entries.div_ceil(UDP_SOURCE_TABLE_WAYS).max(1).next_power_of_two();
        let frames_per_sec = frames_per_sec.max(1);
        let interval_ns = NANOS_PER_SEC.div_ceil(frames_per_sec);
        SourceLimiter {
            entries: vec![Entry::default(); sets * UDP_SOURCE_TABLE_WAYS].into_boxed_slice(),
            set_mask: sets - 1,
            hasher: SourceHasher::default(),
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(burst_frames.max(1) - 1),
            epoch: Instant::now(),
            last_index: None,
        }
    }

    /// Takes a token from `source`'s bucket at `now`: true if it had one.
    #[inline]
    pub fn admit(&mut self, source: SourceKey, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let index = self.entry_of(source);
        let entry = &mut self.entries[index];
        let full_at_ns = entry.full_at_ns.max(now_ns);
        if full_at_ns - now_ns > self.tolerance_ns {
            return false;
        }
        entry.full_at_ns = full_at_ns + self.interval_ns;
        true
    }

    /// Buckets the table holds: fixed for its life.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    fn entry_of(&mut self, source: SourceKey) -> usize {
        if let Some(index) = self.last_index {
            if self.entries[index].source == source {
                return index;
            }
        }
        let first = (self.hasher.hash(source) as usize & self.set_mask) * UDP_SOURCE_TABLE_WAYS;
        let set = &self.entries[first..first + UDP_SOURCE_TABLE_WAYS];
        let index = match set.iter().position(|entry| entry.source == source) {
            Some(way) => first + way,
            None => {
                let (way, _) = set
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, entry)| entry.full_at_ns)
                    .unwrap_or((0, &set[0]));
                self.entries[first + way] = Entry { source, full_at_ns: 0 };
                first + way
            }
        };
        self.last_index = Some(index);
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn source(n: u32) -> SourceKey {
        SourceKey::of(std::net::Ipv4Addr::from(n).into())
    }

    /// A source gets exactly its burst at once, then one frame per interval, and a full bucket again after a pause.
    #[test]
    fn burst_then_rate() {
        let mut limiter = SourceLimiter::new(64, 1_000, 10);
        let start = Instant::now();
        let admitted = (0..100).filter(|_| limiter.admit(source(1), start)).count();
        assert_eq!(admitted, 10);
        // 1000/s is one token per ms.
        assert!(!limiter.admit(source(1), start + Duration::from_micros(999)));
        assert!(limiter.admit(source(1), start + Duration::from_millis(1)));
        assert!(!limiter.admit(source(1), start + Duration::from_millis(1)));
        let later = start + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| limiter.admit(source(1), later)).count(), 10);
        // Another source has its own bucket.
        assert_eq!((0..100).filter(|_| limiter.admit(source(2), start)).count(), 10);
    }

    /// The table never grows: more sources than entries only recycle entries, and the newest source is served.
    #[test]
    fn fixed_capacity_under_many_sources() {
        let mut limiter = SourceLimiter::new(64, 100, 5);
        let capacity = limiter.capacity();
        assert_eq!(capacity, 64);
        let now = Instant::now();
        for n in 0..100_000 {
            assert!(limiter.admit(source(n), now), "a new source has a full bucket");
        }
        assert_eq!(limiter.capacity(), capacity);
    }

    /// A full set gives a new source the entry of its fullest bucket, not that of a source that is being limited.
    #[test]
    fn eviction_takes_the_fullest_bucket() {
        let ways = UDP_SOURCE_TABLE_WAYS;
        // One set: every source shares it.
        let mut limiter = SourceLimiter::new(ways, 1, 2);
        let start = Instant::now();
        // The flooder empties its bucket; the others take one token each.
        let flooder = source(1_000);
        while limiter.admit(flooder, start) {}
        for n in 0..ways as u32 - 1 {
            assert!(limiter.admit(source(n), start));
        }
        // A newcomer evicts one of the light sources, never the flooder, which stays limited.
        assert!(limiter.admit(source(2_000), start));
        assert!(!limiter.admit(flooder, start));
    }

    /// A reference token bucket per source, with no table: what the limiter must decide while no set overflows.
    struct Model {
        interval_ns: u64,
        tolerance_ns: u64,
        full_at_ns: HashMap<u32, u64>,
    }

    impl Model {
        fn admit(&mut self, source: u32, now_ns: u64) -> bool {
            let full_at = self.full_at_ns.entry(source).or_insert(0);
            let start = (*full_at).max(now_ns);
            if start - now_ns > self.tolerance_ns {
                return false;
            }
            *full_at = start + self.interval_ns;
            true
        }
    }

    proptest! {
        // Failures print the minimal failing case; nothing is persisted to files beside the source.
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// With no more sources than ways (so no set can overflow), every decision is exactly an independent
        /// token bucket per source: other sources' traffic never changes one source's answers.
        #[test]
        fn sources_are_isolated(
            rate in 1u64..100_000,
            burst in 1u64..50,
            arrivals in proptest::collection::vec((0u32..UDP_SOURCE_TABLE_WAYS as u32, 0u64..2_000_000), 1..400),
        ) {
            let mut limiter = SourceLimiter::new(1024, rate, burst);
            let epoch = limiter.epoch;
            let interval_ns = NANOS_PER_SEC.div_ceil(rate);
            let mut model = Model { interval_ns, tolerance_ns: interval_ns * (burst - 1), full_at_ns: HashMap::new() };
            let mut now_ns = 0u64;
            for (who, gap_ns) in arrivals {
                now_ns += gap_ns;
                let now = epoch + Duration::from_nanos(now_ns);
                prop_assert_eq!(limiter.admit(source(who), now), model.admit(who, now_ns));
            }
        }

        /// Whatever one source sends, it never gets more than `burst + elapsed × rate` frames admitted in any
        /// stretch of time, and a source that keeps to its rate is never refused.
        #[test]
        fn never_more_than_the_share(
            rate in 1u64..1_000_000,
            burst in 1u64..100,
            gaps_ns in proptest::collection::vec(0u64..3_000_000, 1..300),
        ) {
            let mut limiter = SourceLimiter::new(64, rate, burst);
            let epoch = limiter.epoch;
            let mut now_ns = 0u64;
            let mut admitted_at = Vec::new();
            for gap_ns in gaps_ns {
                now_ns += gap_ns;
                if limiter.admit(source(7), epoch + Duration::from_nanos(now_ns)) {
                    admitted_at.push(now_ns);
                }
            }
            for (first, &from) in admitted_at.iter().enumerate() {
                for (last, &to) in admitted_at.iter().enumerate().skip(first) {
                    let count = (last - first + 1) as u128;
                    let share = burst as u128 + (to - from) as u128 * rate as u128 / NANOS_PER_SEC as u128;
                    prop_assert!(count <= share, "{} frames in {} ns at {}/s burst {}", count, to - from, rate, burst);
                }
            }
            // At exactly one frame per interval, nothing is refused.
            let mut steady = SourceLimiter::new(64, rate, burst);
            let interval_ns = NANOS_PER_SEC.div_ceil(rate);
            for step in 0..200u64 {
                prop_assert!(steady.admit(source(8), steady.epoch + Duration::from_nanos(step * interval_ns)));
            }
        }
    }
}
