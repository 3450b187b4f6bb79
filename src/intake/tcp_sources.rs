//! How many TCP connections each source (`source.rs`) holds on one shard, so
//! that one host cannot take every connection slot.
//!
//! A fixed open-addressing table (linear probing, deletion by backward shift,
//! so no tombstones pile up), allocated when the shard starts with twice as
//! many slots as the shard may hold connections: since every connection's
//! source is in it at most once, it is never more than half full, probes stay
//! short, and it never grows. The shard's accept loop is its only user.

use crate::intake::source::{SourceHasher, SourceKey};

pub struct TcpSources {
    sources: Box<[SourceKey]>,
    /// Connections per slot's source; 0 marks a free slot.
    counts: Box<[u32]>,
    slot_mask: usize,
    hasher: SourceHasher,
    per_source_max: u32,
}

impl TcpSources {
    /// Room for the sources of `connections_max` connections, each source
    /// allowed `per_source_max` of them.
    pub fn new(connections_max: usize, per_source_max: usize) -> TcpSources {
        let slots = (connections_max.max(1) * 2).next_power_of_two();
        TcpSources {
            sources: vec![SourceKey::default(); slots].into_boxed_slice(),
            counts: vec![0; slots].into_boxed_slice(),
            slot_mask: slots - 1,
            hasher: SourceHasher::default(),
            per_source_max: u32::try_from(per_source_max).unwrap_or(u32::MAX),
        }
    }

    /// Counts one more connection from `source`, unless it already holds its
    /// maximum (or, which the caller's cap on connections rules out, the
    /// table is full): then false, and nothing changes.
    pub fn try_open(&mut self, source: SourceKey) -> bool {
        let Some(slot) = self.find(source) else {
            return false;
        };
        if self.counts[slot] >= self.per_source_max {
            return false;
        }
        self.sources[slot] = source;
        self.counts[slot] += 1;
        true
    }

    /// Forgets one connection of `source`.
    pub fn close(&mut self, source: SourceKey) {
        let Some(slot) = self.find(source) else {
            return;
        };
        if self.counts[slot] == 0 {
            debug_assert!(false, "closed a connection that was never opened");
            return;
        }
        self.counts[slot] -= 1;
        if self.counts[slot] == 0 {
            self.shift_back(slot);
        }
    }

    #[cfg(test)]
    /// Connections `source` holds now.
    pub fn open_connections(&self, source: SourceKey) -> u32 {
        self.find(source).map(|slot| self.counts[slot]).unwrap_or(0)
    }

    fn home(&self, source: SourceKey) -> usize {
        self.hasher.hash(source) as usize & self.slot_mask
    }

    /// The slot holding `source`, or the free slot where it would go; `None`
    /// only if every slot is taken by other sources.
    fn find(&self, source: SourceKey) -> Option<usize> {
        let mut slot = self.home(source);
        for _ in 0..self.counts.len() {
            if self.counts[slot] == 0 || self.sources[slot] == source {
                return Some(slot);
            }
            slot = (slot + 1) & self.slot_mask;
        }
        None
    }

    /// Refills the hole at `hole` from the probe run after it, so that every
    /// source stays reachable from its home slot without tombstones.
    fn shift_back(&mut self, mut hole: usize) {
        let mut slot = (hole + 1) & self.slot_mask;
        while self.counts[slot] != 0 {
            let home = self.home(self.sources[slot]);
            // The entry may move back to the hole only if the hole lies on
            // its probe path, i.e. between its home and where it is now.
            let distance_to_home = slot.wrapping_sub(home) & self.slot_mask;
            let distance_to_hole = slot.wrapping_sub(hole) & self.slot_mask;
            if distance_to_home >= distance_to_hole {
                self.sources[hole] = self.sources[slot];
                self.counts[hole] = self.counts[slot];
                self.counts[slot] = 0;
                hole = slot;
            }
            slot = (slot + 1) & self.slot_mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn source(n: u8) -> SourceKey {
        SourceKey::of(std::net::Ipv4Addr::new(10, 0, 0, n).into())
    }

    /// A source gets its maximum and no more; closing one lets it open one again.
    #[test]
    fn per_source_cap() {
        let mut sources = TcpSources::new(16, 3);
        assert!((0..3).all(|_| sources.try_open(source(1))));
        assert!(!sources.try_open(source(1)));
        assert!(sources.try_open(source(2)));
        sources.close(source(1));
        assert_eq!(sources.open_connections(source(1)), 2);
        assert!(sources.try_open(source(1)));
        assert!(!sources.try_open(source(1)));
    }

    proptest! {
        // Failures print the minimal failing case; nothing is persisted to files beside the source.
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Against a plain map, over any sequence of opens and closes of up to `connections_max` connections: the
        /// same counts, the same refusals, and the table never needs more room than it was given.
        #[test]
        fn counts_like_a_map(operations in proptest::collection::vec((any::<bool>(), 0u8..40), 1..600)) {
            let connections_max = 32;
            let per_source_max = 4;
            let mut sources = TcpSources::new(connections_max, per_source_max);
            let mut model: HashMap<u8, u32> = HashMap::new();
            let mut open = 0;
            for (opening, n) in operations {
                if opening {
                    if open == connections_max {
                        continue;
                    }
                    let held = model.entry(n).or_default();
                    let allowed = *held < per_source_max as u32;
                    prop_assert_eq!(sources.try_open(source(n)), allowed);
                    if allowed {
                        *held += 1;
                        open += 1;
                    }
                } else if model.get(&n).copied().unwrap_or(0) > 0 {
                    sources.close(source(n));
                    *model.get_mut(&n).unwrap() -= 1;
                    open -= 1;
                }
                for (&m, &count) in &model {
                    prop_assert_eq!(sources.open_connections(source(m)), count);
                }
            }
        }
    }
}
