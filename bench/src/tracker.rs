//! Per-frame state of one lane: what is awaiting an answer, when to resend, and the latencies.
//!
//! # One frame's life
//! A frame is one first send of an event from a lane: a fresh event or a copy, each awaiting
//! its own final answer. It is matched to acks by `(player_id, seq)`, so a lane never has two
//! frames of one id outstanding at once (the lane draws another copy instead).
//! - ACCEPTED or DUPLICATE: stored; the frame is done.
//! - RETRY: resent after a short delay that doubles with each attempt.
//! - no answer within a timeout (also doubling per attempt): resent.
//! - REJECTED: done and counted; the protocol says not to resend it unchanged.
//! - an ack for an id the lane does not await (a late answer to a frame already done): ignored.
//!
//! Whatever is still awaiting when the run ends is lost.
//!
//! # Latencies
//! Both count from the frame's intended send time (see `schedule.rs`): first-attempt latency to
//! the first answer of any status, final latency to ACCEPTED or DUPLICATE. Only frames intended
//! after the warmup are recorded.
//!
//! # Memory and cost
//! Slots are reused through a free list and the id index is a pre-sized map, so the table
//! holds only frames still awaiting an answer. A timer is (due, slot, token); rearming a frame
//! bumps its token instead of searching for its old timer, and stale entries are dropped when
//! they come due, so the timers hold at most about one timeout's worth of sends. Every first
//! send arms the same timeout at a later send time, so those timers come due in the order they
//! were armed: they wait in a FIFO, two O(1) steps per frame. Only RETRY delays (jittered) and
//! resend timeouts go to a heap. This runs for every frame the generator sends, on a machine it
//! shares with the server it measures, so it is kept cheap: the id map hashes with
//! [`IdHasher`] rather than SipHash, since the ids are the generator's own, not an attacker's.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use hdrhistogram::Histogram;
use shardgate_client::resend::{mix, Schedule};
use shardgate_proto::frame::{Ack, EventId, Status};

use crate::events::Event;

/// First wait for an answer before resending; doubles per attempt up to [`BACKOFF_CAP_NS`].
/// 200 ms is far above a healthy answer (about a millisecond) and short enough that a dropped
/// datagram is retried well within the run's grace period.
pub const ANSWER_TIMEOUT_NS: u64 = 200_000_000;
/// Longest first wait after a RETRY answer; doubles per attempt. RETRY mostly means "a copy is
/// in flight" or "momentarily full", which clears within a Redis round trip or two. Each wait is
/// jittered down to half its length, so frames refused together do not all come back together.
pub const RETRY_DELAY_NS: u64 = 10_000_000;
/// No wait is longer than this, so a frame is still tried a few times in the grace period.
pub const BACKOFF_CAP_NS: u64 = 1_000_000_000;
/// Histograms cover 1 µs to 60 s with 3 significant digits, as the server's do.
const HISTOGRAM_HIGHEST_US: u64 = 60_000_000;
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;
/// Lost ids kept to print, so a loss can be looked up in Redis and the server's logs.
pub const LOST_SAMPLE_MAX: usize = 10;

/// What an ack did to the lane's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// ACCEPTED or DUPLICATE: the frame is done.
    Stored,
    /// RETRY: the frame will be resent.
    Retrying,
    /// REJECTED: the frame is done, not stored.
    Rejected,
    /// No outstanding frame of this lane has that id.
    Unmatched,
}

struct Slot {
    event: Event,
    intended_ns: u64,
    /// Sends so far, the first included.
    attempts: u32,
    answered: bool,
    /// Matches the one live timer entry of this slot; older entries are stale.
    timer_token: u32,
    occupied: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    due_ns: u64,
    slot: u32,
    token: u32,
}

/// First-attempt and final-resolution latencies in microseconds.
pub struct Latencies {
    pub first_us: Histogram<u64>,
    pub final_us: Histogram<u64>,
}

impl Latencies {
    pub fn new() -> Latencies {
        Latencies {
            first_us: new_histogram(),
            final_us: new_histogram(),
        }
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail; a failure would only drop samples.
        let _ = self.first_us.add(&other.first_us);
        let _ = self.final_us.add(&other.final_us);
    }
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies::new()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_HIGHEST_US, HISTOGRAM_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// What a lane's tracker knows once the run is over.
pub struct TrackerReport {
    pub latencies: Latencies,
    /// Ids answered ACCEPTED or DUPLICATE (a copy's id appears again).
    pub acked_ids: Vec<EventId>,
    /// Frames never answered ACCEPTED, DUPLICATE or REJECTED.
    pub lost: u64,
    pub lost_sample: Vec<EventId>,
}

/// A multiply-rotate hash (FxHash's step) of the id's two words: a few cycles instead of
/// SipHash's few dozen. Ids are the generator's own, so flooding resistance buys nothing.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl IdHasher {
    const MULTIPLIER: u64 = 0xF135_7AEA_2E62_A9C5;
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(Self::MULTIPLIER);
    }

    fn finish(&self) -> u64 {
        // The multiply leaves its best bits high; the table indexes with the low ones.
        self.0.rotate_left(26)
    }
}

pub struct Tracker {
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    by_id: HashMap<EventId, u32, BuildHasherDefault<IdHasher>>,
    /// First-attempt answer timeouts, in due order (see the module's notes).
    first_timeouts: VecDeque<Timer>,
    /// Every other timer.
    timers: BinaryHeap<Reverse<Timer>>,
    measure_from_ns: u64,
    latencies: Latencies,
    acked_ids: Vec<EventId>,
}

impl Tracker {
    /// `expected_outstanding` sizes the tables (they still grow if the server stalls);
    /// frames intended before `measure_from_ns` are not timed.
    pub fn new(expected_outstanding: usize, measure_from_ns: u64) -> Tracker {
        Tracker {
            slots: Vec::with_capacity(expected_outstanding),
            free_slots: Vec::with_capacity(expected_outstanding),
            by_id: HashMap::with_capacity_and_hasher(expected_outstanding, BuildHasherDefault::default()),
            first_timeouts: VecDeque::with_capacity(expected_outstanding),
            timers: BinaryHeap::new(),
            measure_from_ns,
            latencies: Latencies::new(),
            acked_ids: Vec::new(),
        }
    }

    /// True if a frame of this id awaits its answer on this lane.
    pub fn is_outstanding(&self, id: EventId) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn outstanding(&self) -> usize {
        self.by_id.len()
    }

    /// Records a first send made at `sent_ns`. Refuses (false) an id already outstanding.
    pub fn register(&mut self, event: Event, intended_ns: u64, sent_ns: u64) -> bool {
        if self.by_id.contains_key(&event.id) {
            return false;
        }
        let slot = Slot {
            event,
            intended_ns,
            attempts: 1,
            answered: false,
            timer_token: 0,
            occupied: true,
        };
        let index = match self.free_slots.pop() {
            Some(index) => {
                let reused = &mut self.slots[index as usize];
                debug_assert!(!reused.occupied);
                // Keep counting tokens across occupants: the previous one's timers stay stale.
                let token = reused.timer_token;
                *reused = Slot {
                    timer_token: token,
                    ..slot
                };
                index
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("outstanding frames are bounded by the plan")
            }
        };
        self.by_id.insert(event.id, index);
        self.arm_first_timeout(index, sent_ns.saturating_add(answer_timeout_ns(1)));
        true
    }

    /// Applies one answer received at `now_ns`.
    pub fn on_ack(&mut self, ack: Ack, now_ns: u64) -> Fate {
        let Some(&index) = self.by_id.get(&ack.id) else {
            return Fate::Unmatched;
        };
        let slot = &mut self.slots[index as usize];
        let measured = slot.intended_ns >= self.measure_from_ns;
        let latency_us = now_ns.saturating_sub(slot.intended_ns) / 1_000;
        if !slot.answered {
            slot.answered = true;
            if measured {
                self.latencies.first_us.saturating_record(latency_us.max(1));
            }
        }
        match ack.status {
            Status::Accepted | Status::Duplicate => {
                if measured {
                    self.latencies.final_us.saturating_record(latency_us.max(1));
                }
                self.acked_ids.push(ack.id);
                self.release(index);
                Fate::Stored
            }
            Status::Retry => {
                let attempts = slot.attempts;
                self.arm(index, now_ns.saturating_add(retry_delay_ns(ack.id, attempts)));
                Fate::Retrying
            }
            Status::Rejected => {
                self.release(index);
                Fate::Rejected
            }
        }
    }

    /// Moves every frame whose timer is due by `now_ns` into `resend` (at most `limit`), counts
    /// the attempt, and arms the timeout of that new attempt. The caller sends them.
    pub fn take_due(&mut self, now_ns: u64, limit: usize, resend: &mut Vec<Event>) {
        while resend.len() < limit {
            let Some(timer) = self.pop_due(now_ns) else {
                return;
            };
            let slot = &mut self.slots[timer.slot as usize];
            if !slot.occupied || slot.timer_token != timer.token {
                continue;
            }
            slot.attempts = slot.attempts.saturating_add(1);
            let (event, attempts) = (slot.event, slot.attempts);
            self.arm(timer.slot, now_ns.saturating_add(answer_timeout_ns(attempts)));
            resend.push(event);
        }
    }

    /// When the earliest timer is due, if any. It may be a stale entry: waking early is harmless.
    pub fn next_due_ns(&self) -> Option<u64> {
        let first = self.first_timeouts.front().map(|timer| timer.due_ns);
        let other = self.timers.peek().map(|Reverse(timer)| timer.due_ns);
        match (first, other) {
            (Some(first), Some(other)) => Some(first.min(other)),
            (first, other) => first.or(other),
        }
    }

    /// Removes and returns the earliest timer if it is due by `now_ns` (stale or not).
    fn pop_due(&mut self, now_ns: u64) -> Option<Timer> {
        let first = self.first_timeouts.front().copied();
        let other = self.timers.peek().map(|&Reverse(timer)| timer);
        match (first, other) {
            (Some(first), Some(other)) if other.due_ns < first.due_ns => (other.due_ns <= now_ns)
                .then(|| self.timers.pop())
                .flatten()
                .map(|Reverse(timer)| timer),
            (Some(first), _) => (first.due_ns <= now_ns)
                .then(|| self.first_timeouts.pop_front())
                .flatten(),
            (None, Some(other)) => (other.due_ns <= now_ns)
                .then(|| self.timers.pop())
                .flatten()
                .map(|Reverse(timer)| timer),
            (None, None) => None,
        }
    }

    pub fn finish(self) -> TrackerReport {
        let lost_sample = self.by_id.keys().take(LOST_SAMPLE_MAX).copied().collect();
        TrackerReport {
            latencies: self.latencies,
            acked_ids: self.acked_ids,
            lost: self.by_id.len() as u64,
            lost_sample,
        }
    }

    fn arm(&mut self, index: u32, due_ns: u64) {
        let timer = self.new_timer(index, due_ns);
        self.timers.push(Reverse(timer));
    }

    /// Arms a first send's timeout in the FIFO, or in the heap if it would break the FIFO's
    /// order (a caller registering out of time order).
    fn arm_first_timeout(&mut self, index: u32, due_ns: u64) {
        let timer = self.new_timer(index, due_ns);
        if self.first_timeouts.back().is_none_or(|last| last.due_ns <= due_ns) {
            self.first_timeouts.push_back(timer);
        } else {
            self.timers.push(Reverse(timer));
        }
    }

    /// A timer for the slot's next token, which makes its earlier timers stale.
    fn new_timer(&mut self, index: u32, due_ns: u64) -> Timer {
        let slot = &mut self.slots[index as usize];
        slot.timer_token = slot.timer_token.wrapping_add(1);
        Timer {
            due_ns,
            slot: index,
            token: slot.timer_token,
        }
    }

    fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.occupied = false;
        self.by_id.remove(&slot.event.id);
        self.free_slots.push(index);
    }
}

/// How long attempt `attempt` (1 = first send) waits for an answer: the shared resend
/// schedule (`shardgate_client::resend`) without jitter.
pub fn answer_timeout_ns(attempt: u32) -> u64 {
    ANSWER_SCHEDULE.base(attempt).as_nanos() as u64
}

/// How long to wait before resending after attempt `attempt` was answered RETRY: the shared
/// schedule with half of the wait as jitter, drawn from a hash of the id and attempt. A hash
/// rather than a random draw keeps the tracker deterministic, and ids are already spread
/// uniformly.
pub fn retry_delay_ns(id: EventId, attempt: u32) -> u64 {
    let spread = mix(id.player_id ^ id.seq.rotate_left(29) ^ u64::from(attempt).rotate_left(47));
    RETRY_SCHEDULE.delay(attempt, spread).as_nanos() as u64
}

const ANSWER_SCHEDULE: Schedule = Schedule::new(
    Duration::from_nanos(ANSWER_TIMEOUT_NS),
    Duration::from_nanos(BACKOFF_CAP_NS),
    0,
);
const RETRY_SCHEDULE: Schedule = Schedule::new(
    Duration::from_nanos(RETRY_DELAY_NS),
    Duration::from_nanos(BACKOFF_CAP_NS),
    50,
);

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn event(seq: u64) -> Event {
        Event {
            id: EventId { player_id: 1, seq },
            client_time_us: 0,
            action_type: 0,
        }
    }

    fn ack(status: Status, seq: u64) -> Ack {
        Ack {
            status,
            id: EventId { player_id: 1, seq },
        }
    }

    fn due(tracker: &mut Tracker, now_ns: u64) -> Vec<u64> {
        let mut resend = Vec::new();
        tracker.take_due(now_ns, usize::MAX, &mut resend);
        resend.iter().map(|event| event.id.seq).collect()
    }

    // ACCEPTED and DUPLICATE end a frame and time it; later acks of that id do nothing.
    #[test]
    fn accepted_and_duplicate_resolve() {
        let mut tracker = Tracker::new(4, 0);
        assert!(tracker.register(event(1), 0, 0));
        assert!(tracker.register(event(2), 0, 0));
        assert_eq!(tracker.on_ack(ack(Status::Accepted, 1), 3 * MS), Fate::Stored);
        assert_eq!(tracker.on_ack(ack(Status::Duplicate, 2), 4 * MS), Fate::Stored);
        assert_eq!(tracker.on_ack(ack(Status::Accepted, 1), 5 * MS), Fate::Unmatched);
        assert_eq!(tracker.outstanding(), 0);
        assert!(
            due(&mut tracker, 10_000 * MS).is_empty(),
            "resolved frames never resend"
        );
        let report = tracker.finish();
        assert_eq!(report.lost, 0);
        assert_eq!(report.latencies.first_us.len(), 2);
        assert_eq!(report.latencies.final_us.len(), 2);
        assert_eq!(report.acked_ids.len(), 2);
        assert!(report.latencies.first_us.max() >= 3_999);
    }

    // RETRY is a first answer but not a final one; the frame is resent after the retry delay,
    // and its final latency includes the retries.
    #[test]
    fn retry_resends_after_delay() {
        let mut tracker = Tracker::new(4, 0);
        tracker.register(event(1), 0, 0);
        let id = event(1).id;
        assert_eq!(tracker.on_ack(ack(Status::Retry, 1), MS), Fate::Retrying);
        assert!(due(&mut tracker, MS + retry_delay_ns(id, 1) - 1).is_empty());
        assert_eq!(due(&mut tracker, MS + retry_delay_ns(id, 1)), vec![1]);
        // The stale first-attempt timeout does not fire a second resend.
        assert!(due(&mut tracker, ANSWER_TIMEOUT_NS).is_empty());
        assert_eq!(tracker.on_ack(ack(Status::Retry, 1), 20 * MS), Fate::Retrying);
        assert!(due(&mut tracker, 20 * MS + retry_delay_ns(id, 2) - 1).is_empty());
        assert_eq!(due(&mut tracker, 20 * MS + retry_delay_ns(id, 2)), vec![1]);
        assert_eq!(tracker.on_ack(ack(Status::Accepted, 1), 50 * MS), Fate::Stored);
        let report = tracker.finish();
        assert_eq!(report.latencies.first_us.max(), 1_000);
        assert!(report.latencies.final_us.min() >= 49_000);
    }

    // Silence resends with a doubling timeout, capped; unanswered frames are lost at the end.
    #[test]
    fn timeouts_back_off_and_then_count_lost() {
        let mut tracker = Tracker::new(4, 0);
        tracker.register(event(1), 0, 0);
        let mut now_ns = 0;
        let mut resend_times = Vec::new();
        while now_ns < 4_000 * MS {
            now_ns += MS;
            if !due(&mut tracker, now_ns).is_empty() {
                resend_times.push(now_ns / MS);
            }
        }
        assert_eq!(resend_times, vec![200, 600, 1_400, 2_400, 3_400]);
        let report = tracker.finish();
        assert_eq!(report.lost, 1);
        assert_eq!(report.lost_sample, vec![EventId { player_id: 1, seq: 1 }]);
        assert_eq!(report.latencies.first_us.len(), 0);
    }

    // REJECTED ends the frame without a final latency and without resending.
    #[test]
    fn rejected_is_terminal() {
        let mut tracker = Tracker::new(4, 0);
        tracker.register(event(1), 0, 0);
        assert_eq!(tracker.on_ack(ack(Status::Rejected, 1), MS), Fate::Rejected);
        assert!(due(&mut tracker, 10_000 * MS).is_empty());
        let report = tracker.finish();
        assert_eq!(
            (
                report.lost,
                report.latencies.first_us.len(),
                report.latencies.final_us.len()
            ),
            (0, 1, 0)
        );
        assert!(report.acked_ids.is_empty());
    }

    // One id cannot be outstanding twice on a lane; once resolved it may be sent again (a copy),
    // and a reused slot does not inherit the old occupant's timer.
    #[test]
    fn one_outstanding_frame_per_id() {
        let mut tracker = Tracker::new(1, 0);
        assert!(tracker.register(event(1), 0, 0));
        assert!(!tracker.register(event(1), 0, 0));
        assert!(tracker.is_outstanding(event(1).id));
        tracker.on_ack(ack(Status::Accepted, 1), MS);
        assert!(tracker.register(event(2), 100 * MS, 100 * MS));
        assert!(
            due(&mut tracker, ANSWER_TIMEOUT_NS).is_empty(),
            "event 1's old timer is stale"
        );
        assert_eq!(due(&mut tracker, 100 * MS + ANSWER_TIMEOUT_NS), vec![2]);
        assert!(tracker.register(event(1), 200 * MS, 200 * MS));
    }

    // Warmup frames are tracked and resolved, but not timed.
    #[test]
    fn warmup_frames_are_not_timed() {
        let mut tracker = Tracker::new(4, 10 * MS);
        tracker.register(event(1), 9 * MS, 9 * MS);
        tracker.register(event(2), 10 * MS, 10 * MS);
        tracker.on_ack(ack(Status::Accepted, 1), 11 * MS);
        tracker.on_ack(ack(Status::Accepted, 2), 11 * MS);
        let report = tracker.finish();
        assert_eq!(report.latencies.first_us.len(), 1);
        assert_eq!(report.acked_ids.len(), 2);
    }

    // take_due honours its limit and leaves the rest for the next call.
    #[test]
    fn take_due_is_limited() {
        let mut tracker = Tracker::new(4, 0);
        for seq in 1..=3 {
            tracker.register(event(seq), 0, 0);
        }
        let mut resend = Vec::new();
        tracker.take_due(ANSWER_TIMEOUT_NS, 2, &mut resend);
        assert_eq!(resend.len(), 2);
        assert_eq!(due(&mut tracker, ANSWER_TIMEOUT_NS).len(), 1);
    }

    // Timers fire in due order across the FIFO and the heap, even for sends registered out of
    // time order.
    #[test]
    fn timers_fire_in_due_order() {
        let mut tracker = Tracker::new(4, 0);
        tracker.register(event(1), 0, 10 * MS);
        tracker.register(event(2), 0, 5 * MS);
        tracker.register(event(3), 0, 20 * MS);
        assert_eq!(tracker.on_ack(ack(Status::Retry, 3), 21 * MS), Fate::Retrying);
        assert_eq!(tracker.next_due_ns(), Some(21 * MS + retry_delay_ns(event(3).id, 1)));
        assert_eq!(due(&mut tracker, 100 * MS), vec![3]);
        assert_eq!(tracker.next_due_ns(), Some(5 * MS + ANSWER_TIMEOUT_NS));
        assert_eq!(due(&mut tracker, 10 * MS + ANSWER_TIMEOUT_NS), vec![2, 1]);
    }

    // The hash spreads consecutive seqs of one player over the low bits the table uses.
    #[test]
    fn id_hash_spreads_sequences() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IdHasher>::default();
        let mut buckets = std::collections::HashSet::new();
        for seq in 0..1_024 {
            buckets.insert(build.hash_one(EventId { player_id: 42, seq }) & 1_023);
        }
        assert!(buckets.len() > 600, "{} of 1024 buckets", buckets.len());
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        assert_eq!(answer_timeout_ns(1), 200 * MS);
        assert_eq!(answer_timeout_ns(2), 400 * MS);
        assert_eq!(answer_timeout_ns(4), BACKOFF_CAP_NS);
        assert_eq!(answer_timeout_ns(u32::MAX), BACKOFF_CAP_NS);
    }

    // RETRY waits are jittered within [half, whole] of the backoff, and do spread out.
    #[test]
    fn retry_delays_are_jittered() {
        let mut delays = std::collections::HashSet::new();
        for seq in 0..1_000 {
            let id = EventId { player_id: 7, seq };
            for attempt in 1..=10 {
                let (delay_ns, whole_ns) = (
                    retry_delay_ns(id, attempt),
                    RETRY_SCHEDULE.base(attempt).as_nanos() as u64,
                );
                assert!(
                    (whole_ns / 2..=whole_ns).contains(&delay_ns),
                    "{delay_ns} for attempt {attempt}"
                );
            }
            delays.insert(retry_delay_ns(id, 1) / 100_000);
        }
        assert!(delays.len() > 40, "only {} distinct delays", delays.len());
        assert!(retry_delay_ns(EventId { player_id: 1, seq: 1 }, 20) <= BACKOFF_CAP_NS);
    }
}
