//! What gets sent: fresh events with per-player sequence numbers, and copies of recent ones.
//!
//! # Ids
//! Players are `1..=players`, picked uniformly. Each player has its own counter, so its seqs
//! rise by one per fresh event, starting just above `seq_base`. The base is the run's start in
//! unix microseconds: a later run against the same prefix (whose dedup markers live for the
//! server's window, 10 minutes by default) never reuses an id, so its fresh events are not
//! answered DUPLICATE because of an earlier run. Because every seq between the base and a
//! player's final counter was sent, the set of ids a run sent is just the counters, which is
//! what verification uses instead of a set of millions of ids.
//!
//! # Copies
//! A copy resends an event that was already sent, byte for byte, as a client retrying on
//! another path would. It is drawn from a ring of the most recent fresh events, preferring one
//! first sent by another lane: lanes are distinct sockets or connections, which the kernel
//! spreads over the server's shards, so copies exercise cross-shard dedup and copies that
//! arrive while the original is still being written. With several targets the lanes take them
//! in turn, so another lane is often another server: the copy then meets no cache that saw the
//! original, only Redis's marker, as when a client fails over to another address.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rand::Rng;
use shardgate_proto::frame::{encode_action, ActionFields, EventId};

/// Fresh events a copy may be drawn from: at 20k frames/s about the last 200 ms, the window in
/// which an original is often still in flight on the server.
pub const RECENT_EVENTS: usize = 4_096;
/// Random draws from the ring before giving up on finding a usable copy.
const COPY_DRAWS_MAX: usize = 8;
/// action_type values used: a few, like a game's move/attack/loot kinds.
const ACTION_TYPES: u16 = 16;

/// One event as first sent; a copy or resend re-encodes exactly these fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub id: EventId,
    pub client_time_us: u64,
    pub action_type: u16,
}

#[derive(Clone, Copy)]
struct RecentEvent {
    event: Event,
    lane: usize,
}

/// Hands out fresh events and copies to every lane.
pub struct EventSource {
    seq_base: u64,
    /// Fresh events sent per player; index `player_id - 1`.
    sent_per_player: Box<[AtomicU64]>,
    recent: Mutex<Recent>,
}

struct Recent {
    events: Vec<RecentEvent>,
    next_slot: usize,
}

impl EventSource {
    pub fn new(players: u64, seq_base: u64) -> EventSource {
        let players = usize::try_from(players).expect("players is bounded by the plan");
        EventSource {
            seq_base,
            sent_per_player: (0..players).map(|_| AtomicU64::new(0)).collect(),
            recent: Mutex::new(Recent {
                events: Vec::with_capacity(RECENT_EVENTS),
                next_slot: 0,
            }),
        }
    }

    /// A new event for a random player, remembered as a candidate for copies.
    pub fn fresh(&self, rng: &mut impl Rng, lane: usize, client_time_us: u64) -> Event {
        let player_index = rng.gen_range(0..self.sent_per_player.len());
        let sent_before = self.sent_per_player[player_index].fetch_add(1, Ordering::Relaxed);
        let event = Event {
            id: EventId {
                player_id: player_index as u64 + 1,
                seq: self.seq_base + sent_before + 1,
            },
            client_time_us,
            action_type: rng.gen_range(0..ACTION_TYPES),
        };
        self.recent().remember(RecentEvent { event, lane });
        event
    }

    /// A recent event to send again from `lane`, preferring one another lane sent first.
    /// `usable` refuses ids the lane cannot take right now (one it still awaits an answer
    /// for: two copies of one id on one lane could not be told apart by their acks).
    pub fn copy(&self, rng: &mut impl Rng, lane: usize, usable: impl Fn(EventId) -> bool) -> Option<Event> {
        let mut drawn = [None; COPY_DRAWS_MAX];
        {
            let recent = self.recent();
            if recent.events.is_empty() {
                return None;
            }
            for slot in &mut drawn {
                *slot = Some(recent.events[rng.gen_range(0..recent.events.len())]);
            }
        }
        let candidates = drawn.iter().flatten().filter(|recent| usable(recent.event.id));
        let mut fallback = None;
        for candidate in candidates {
            if candidate.lane != lane {
                return Some(candidate.event);
            }
            fallback.get_or_insert(candidate.event);
        }
        fallback
    }

    /// Fresh events sent per player, index `player_id - 1`: with `seq_base`, the exact set of
    /// ids this run sent.
    pub fn sent_per_player(&self) -> Vec<u64> {
        self.sent_per_player
            .iter()
            .map(|sent| sent.load(Ordering::Relaxed))
            .collect()
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // A panicking lane cannot leave the ring inconsistent: every write is one slot store.
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Recent {
    fn remember(&mut self, recent: RecentEvent) {
        if self.events.len() < RECENT_EVENTS {
            self.events.push(recent);
        } else {
            self.events[self.next_slot] = recent;
        }
        self.next_slot = (self.next_slot + 1) % RECENT_EVENTS;
    }
}

/// Encodes `event` with a payload of `payload_bytes` derived from its id, so every send of one
/// event (original, copy, resend) is the same bytes without storing payloads.
pub fn encode(event: &Event, payload_bytes: usize, payload_scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    fill_payload(event.id, payload_bytes, payload_scratch);
    encode_action(
        &ActionFields {
            id: event.id,
            client_time_us: event.client_time_us,
            action_type: event.action_type,
            payload: payload_scratch,
        },
        out,
    );
}

fn fill_payload(id: EventId, payload_bytes: usize, payload: &mut Vec<u8>) {
    let pattern = (id.player_id.rotate_left(32) ^ id.seq).to_le_bytes();
    // Whole 8-byte copies rather than a byte iterator: this runs for every frame sent.
    payload.resize(payload_bytes, 0);
    for chunk in payload.chunks_mut(pattern.len()) {
        chunk.copy_from_slice(&pattern[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use shardgate_proto::frame::parse;

    // Each player's seqs rise by one from the base, and the counters say exactly what was sent.
    #[test]
    fn fresh_ids_are_per_player_sequences() {
        let source = EventSource::new(3, 1_000);
        let mut rng = StdRng::seed_from_u64(7);
        let mut last_seq = [1_000u64; 3];
        for _ in 0..300 {
            let event = source.fresh(&mut rng, 0, 5);
            let player = event.id.player_id as usize;
            assert!((1..=3).contains(&player));
            assert_eq!(event.id.seq, last_seq[player - 1] + 1);
            last_seq[player - 1] = event.id.seq;
        }
        let sent = source.sent_per_player();
        assert_eq!(sent.iter().sum::<u64>(), 300);
        for player in 0..3 {
            assert_eq!(1_000 + sent[player], last_seq[player]);
        }
    }

    // Copies come from another lane when one is there, never an unusable id, and none before
    // anything was sent.
    #[test]
    fn copies_prefer_other_lanes() {
        let source = EventSource::new(1_000, 0);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(source.copy(&mut rng, 0, |_| true), None);
        let own = source.fresh(&mut rng, 0, 0);
        assert_eq!(source.copy(&mut rng, 0, |_| true), Some(own));
        assert_eq!(source.copy(&mut rng, 0, |id| id != own.id), None);
        let other = source.fresh(&mut rng, 1, 0);
        for _ in 0..20 {
            assert_eq!(source.copy(&mut rng, 0, |_| true), Some(other));
        }
    }

    // The ring keeps only the most recent events.
    #[test]
    fn ring_is_bounded() {
        let source = EventSource::new(10, 0);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..RECENT_EVENTS * 2 + 5 {
            source.fresh(&mut rng, 0, 0);
        }
        assert_eq!(source.recent().events.len(), RECENT_EVENTS);
    }

    // The payload repeats the id's 8-byte pattern, cut at any length.
    #[test]
    fn payload_repeats_the_pattern() {
        let id = EventId {
            player_id: 0,
            seq: 0x0807_0605_0403_0201,
        };
        let mut payload = vec![9; 3];
        fill_payload(id, 11, &mut payload);
        assert_eq!(payload, [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]);
        fill_payload(id, 0, &mut payload);
        assert!(payload.is_empty());
    }

    // Every encoding of one event is identical and parses back to its fields.
    #[test]
    fn encoding_is_stable() {
        let event = Event {
            id: EventId { player_id: 9, seq: 77 },
            client_time_us: 123,
            action_type: 4,
        };
        let (mut scratch, mut first, mut second) = (Vec::new(), Vec::new(), Vec::new());
        encode(&event, 64, &mut scratch, &mut first);
        encode(&event, 64, &mut scratch, &mut second);
        assert_eq!(first, second);
        let action = parse(&first).unwrap();
        assert_eq!(action.id, event.id);
        assert_eq!(action.client_time_us, 123);
        assert_eq!(action.action_type, 4);
        assert_eq!(action.payload.len(), 64);
    }
}
