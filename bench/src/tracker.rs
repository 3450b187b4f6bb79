//! Per-frame state of one lane: what is awaiting an answer, when to resend, and the latencies.
//!
//! # One frame's life
//! A frame is one first send of an event from a lane: a fresh event or a copy, each awaiting
//! its own final answer. It is matched to acks by `(player_id, seq)`, so a lane never has two
//! frames of one id outstanding at once (the lane draws another copy instead). What an answer
//! or a timeout means is the one resend loop's decision (`shardgate_client::resend::Outstanding`),
//! which the tracker drives with the bench's waits:
//! - ACCEPTED or DUPLICATE: stored; the frame is done.
//! - RETRY: resent after a short delay that doubles with each attempt.
//! - no answer within a timeout (also doubling per attempt): resent.
//! - REJECTED: done and counted; the protocol says not to resend it unchanged.
//! - an ack for an id the lane does not await (a late answer to a frame already done): ignored.
//!
//! Whatever is still awaiting when the run ends is lost, and so is a frame the lane's table had
//! no room for: the table is sized at the start (see `run.rs`) and never grows, so a server that
//! stalls for longer than the table covers makes the lane shed frames instead of growing memory
//! on a machine it shares with the server it measures.
//!
//! # Latencies
//! Both count from the frame's intended send time (see `schedule.rs`): first-attempt latency to
//! the first answer of any status, final latency to ACCEPTED or DUPLICATE. Only frames intended
//! after the warmup are recorded.
//!
//! # Cost
//! This runs for every frame the generator sends; the resend loop's table allocates nothing
//! after the start and costs O(1) per frame (its module doc says how), and the tracker adds only
//! the histograms. Every first send arms the same unjittered timeout at a later send time, so
//! those timers come due in the order they were armed and take the table's FIFO path.

use std::time::Duration;

use hdrhistogram::Histogram;
use shardgate_client::resend::{mix, Due, End, Limits, Outstanding, Refusal, Schedule, Verdict, Waits};
use shardgate_proto::frame::{Ack, EventId, Status};

use crate::events::Event;
use crate::stall_probe::SLOW_NS;

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

/// The tracker's payload of one outstanding frame in the resend loop's table.
#[derive(Clone, Copy)]
struct Frame {
    event: Event,
    /// Intended after the warmup: its latencies are recorded.
    measured: bool,
    /// Some answer came (its first-attempt latency is recorded).
    answered: bool,
}
/// First-attempt and final-resolution latencies in microseconds.
pub struct Latencies {
    pub first_us: Histogram<u64>,
    pub final_us: Histogram<u64>,
    /// First attempts slower than [`SLOW_NS`], by the millisecond of the run they were meant
    /// to be sent in; grows to the last such millisecond, at most [`SLOW_BY_MS_MAX`] long.
    pub slow_first_by_ms: Vec<u32>,
}

/// Milliseconds of run `slow_first_by_ms` covers: an hour, 14 MB at the most. A slow answer
/// later than that is still in the histograms, not in the by-millisecond count.
pub const SLOW_BY_MS_MAX: usize = 3_600_000;

impl Latencies {
    pub fn new() -> Latencies {
        Latencies {
            first_us: new_histogram(),
            final_us: new_histogram(),
            slow_first_by_ms: Vec::new(),
        }
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail; a failure would only drop samples.
        let _ = self.first_us.add(&other.first_us);
        let _ = self.final_us.add(&other.final_us);
        if self.slow_first_by_ms.len() < other.slow_first_by_ms.len() {
            self.slow_first_by_ms.resize(other.slow_first_by_ms.len(), 0);
        }
        for (total, count) in self.slow_first_by_ms.iter_mut().zip(&other.slow_first_by_ms) {
            *total += count;
        }
    }

    fn count_slow(&mut self, intended_ns: u64) {
        let ms = usize::try_from(intended_ns / 1_000_000).unwrap_or(usize::MAX);
        if ms >= SLOW_BY_MS_MAX {
            return;
        }
        if self.slow_first_by_ms.len() <= ms {
            self.slow_first_by_ms.resize(ms + 1, 0);
        }
        self.slow_first_by_ms[ms] += 1;
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
    /// Frames never answered ACCEPTED, DUPLICATE or REJECTED, shed ones included.
    pub lost: u64,
    pub lost_sample: Vec<EventId>,
}

pub struct Tracker {
    frames: Outstanding<Frame>,
    measure_from_ns: u64,
    latencies: Latencies,
    acked_ids: Vec<EventId>,
    /// Frames not sent because the table was full.
    shed: u64,
}

impl Tracker {
    /// `capacity` bounds the frames outstanding at once (see the module doc); frames intended
    /// before `measure_from_ns` are not timed.
    pub fn new(capacity: usize, measure_from_ns: u64) -> Tracker {
        let waits = Waits {
            answer: ANSWER_SCHEDULE,
            retry: RETRY_SCHEDULE,
        };
        Tracker {
            frames: Outstanding::new(capacity, waits, Limits::default()),
            measure_from_ns,
            latencies: Latencies::new(),
            acked_ids: Vec::new(),
            shed: 0,
        }
    }

    /// True if a frame of this id awaits its answer on this lane.
    pub fn is_outstanding(&self, id: EventId) -> bool {
        self.frames.contains(id)
    }

    pub fn outstanding(&self) -> usize {
        self.frames.len()
    }

    /// Records a first send made at `sent_ns`. Refuses an id already outstanding, and a frame
    /// the table has no room for (counted as shed, so lost); the caller then does not send it.
    pub fn register(&mut self, event: Event, intended_ns: u64, sent_ns: u64) -> Result<(), Refusal> {
        let frame = Frame {
            event,
            measured: intended_ns >= self.measure_from_ns,
            answered: false,
        };
        // The answer wait has no jitter: no draw.
        match self.frames.first_sent(event.id, frame, intended_ns, sent_ns, 0) {
            Ok(_) => Ok(()),
            Err((refusal, _)) => {
                self.shed += u64::from(matches!(refusal, Refusal::Full { .. }));
                Err(refusal)
            }
        }
    }

    /// Applies one answer received at `now_ns`.
    pub fn on_ack(&mut self, ack: Ack, now_ns: u64) -> Fate {
        // Only a RETRY wait is jittered; the lookup for its draw stays off the common path.
        let draw = match ack.status {
            Status::Retry => self
                .frames
                .get(ack.id)
                .map_or(0, |entry| retry_draw(ack.id, entry.attempts)),
            _ => 0,
        };
        match self.frames.answered(ack.id, ack.status, now_ns, draw) {
            Verdict::Unknown => Fate::Unmatched,
            Verdict::ResendAt { .. } => {
                if let Some(entry) = self.frames.get(ack.id) {
                    let (frame, latency_ns) = (entry.payload, now_ns.saturating_sub(entry.started_ns));
                    self.first_answer(frame, now_ns, latency_ns);
                }
                if let Some(frame) = self.frames.payload_mut(ack.id) {
                    frame.answered = true;
                }
                Fate::Retrying
            }
            Verdict::Ended(ending) => {
                self.first_answer(ending.payload, now_ns, ending.latency_ns);
                match ending.end {
                    End::Stored { .. } => {
                        if ending.payload.measured {
                            record_ns(&mut self.latencies.final_us, ending.latency_ns);
                        }
                        self.acked_ids.push(ack.id);
                        Fate::Stored
                    }
                    // The bench sets no limits, so nothing ends unconfirmed.
                    End::Rejected | End::Unconfirmed => Fate::Rejected,
                }
            }
        }
    }

    /// Moves every frame whose timer is due by `now_ns` into `resend` (at most `limit`); the
    /// resend loop has counted the attempt and armed its timeout. The caller sends them.
    pub fn take_due(&mut self, now_ns: u64, limit: usize, resend: &mut Vec<Event>) {
        while resend.len() < limit {
            // The answer wait has no jitter: no draw.
            match self.frames.pop_due(now_ns, 0) {
                None => return,
                Some(Due::Resend { id, .. }) => {
                    if let Some(entry) = self.frames.get(id) {
                        resend.push(entry.payload.event);
                    }
                }
                // The bench sets no limits, so nothing ends this way.
                Some(Due::Ended(_)) => {}
            }
        }
    }

    /// When the earliest timer is due, if any. It may be a stale entry: waking early is harmless.
    pub fn next_due_ns(&self) -> Option<u64> {
        self.frames.next_due_ns()
    }

    pub fn finish(self) -> TrackerReport {
        let lost_sample = self
            .frames
            .entries()
            .take(LOST_SAMPLE_MAX)
            .map(|entry| entry.id)
            .collect();
        TrackerReport {
            latencies: self.latencies,
            acked_ids: self.acked_ids,
            lost: self.frames.len() as u64 + self.shed,
            lost_sample,
        }
    }

    /// Records the first-attempt latency if this is the frame's first answer, and a slow one
    /// by the millisecond it was meant to be sent in (`run --stall-probe` sets them against stalls).
    fn first_answer(&mut self, frame: Frame, now_ns: u64, latency_ns: u64) {
        if frame.measured && !frame.answered {
            record_ns(&mut self.latencies.first_us, latency_ns);
            if latency_ns >= SLOW_NS {
                self.latencies.count_slow(now_ns.saturating_sub(latency_ns));
            }
        }
    }
}

fn record_ns(histogram: &mut Histogram<u64>, latency_ns: u64) {
    histogram.saturating_record((latency_ns / 1_000).max(1));
}

/// The draw for the jitter of the RETRY wait after attempt `attempt`: a hash of the id and
/// attempt. A hash rather than a random draw keeps the tracker deterministic, and ids are
/// already spread uniformly.
fn retry_draw(id: EventId, attempt: u32) -> u64 {
    mix(id.player_id ^ id.seq.rotate_left(29) ^ u64::from(attempt).rotate_left(47))
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

    /// How long attempt `attempt` (1 = first send) waits for an answer: the shared resend
    /// schedule (`shardgate_client::resend`) without jitter.
    fn answer_timeout_ns(attempt: u32) -> u64 {
        ANSWER_SCHEDULE.base(attempt).as_nanos() as u64
    }

    /// How long to wait before resending after attempt `attempt` was answered RETRY: the shared
    /// schedule with half of the wait as jitter, drawn from a hash of the id and attempt.
    fn retry_delay_ns(id: EventId, attempt: u32) -> u64 {
        RETRY_SCHEDULE.delay(attempt, retry_draw(id, attempt)).as_nanos() as u64
    }

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
        assert!(tracker.register(event(1), 0, 0).is_ok());
        assert!(tracker.register(event(2), 0, 0).is_ok());
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

    // A first answer of 5 ms or more is counted by the millisecond it was meant to be sent in;
    // faster ones, and lanes merged, keep their counts.
    #[test]
    fn slow_first_answers_are_counted_by_intended_millisecond() {
        let mut tracker = Tracker::new(4, 0);
        tracker.register(event(1), 7 * MS, 7 * MS).unwrap();
        tracker.register(event(2), 7 * MS + MS / 2, 8 * MS).unwrap();
        tracker.register(event(3), 9 * MS, 9 * MS).unwrap();
        assert_eq!(
            tracker.on_ack(ack(Status::Accepted, 1), 13 * MS),
            Fate::Stored,
            "6 ms: slow"
        );
        assert_eq!(
            tracker.on_ack(ack(Status::Retry, 2), 12 * MS + MS / 2),
            Fate::Retrying,
            "5 ms: slow"
        );
        assert_eq!(
            tracker.on_ack(ack(Status::Accepted, 3), 13 * MS),
            Fate::Stored,
            "4 ms: not slow"
        );
        let report = tracker.finish();
        assert_eq!(report.latencies.slow_first_by_ms, vec![0, 0, 0, 0, 0, 0, 0, 2]);
        let mut merged = Latencies::new();
        merged.merge(&report.latencies);
        merged.merge(&report.latencies);
        assert_eq!(merged.slow_first_by_ms[7], 4);
        assert_eq!(merged.slow_first_by_ms.len(), 8);
    }

    // RETRY is a first answer but not a final one; the frame is resent after the retry delay,
    // and its final latency includes the retries.
    #[test]
    fn retry_resends_after_delay() {
        let mut tracker = Tracker::new(4, 0);
        tracker.register(event(1), 0, 0).unwrap();
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
        tracker.register(event(1), 0, 0).unwrap();
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
        tracker.register(event(1), 0, 0).unwrap();
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
        let mut tracker = Tracker::new(2, 0);
        assert!(tracker.register(event(1), 0, 0).is_ok());
        assert!(tracker.register(event(1), 0, 0).is_err());
        assert!(tracker.is_outstanding(event(1).id));
        tracker.on_ack(ack(Status::Accepted, 1), MS);
        assert!(tracker.register(event(2), 100 * MS, 100 * MS).is_ok());
        assert!(
            due(&mut tracker, ANSWER_TIMEOUT_NS).is_empty(),
            "event 1's old timer is stale"
        );
        assert_eq!(due(&mut tracker, 100 * MS + ANSWER_TIMEOUT_NS), vec![2]);
        assert!(tracker.register(event(1), 200 * MS, 200 * MS).is_ok());
    }

    // A full table sheds a frame (refused, so not sent) and counts it lost; nothing grows.
    #[test]
    fn a_full_table_sheds_and_counts_lost() {
        let mut tracker = Tracker::new(2, 0);
        tracker.register(event(1), 0, 0).unwrap();
        tracker.register(event(2), 0, 0).unwrap();
        assert_eq!(tracker.register(event(3), 0, 0), Err(Refusal::Full { capacity: 2 }));
        assert!(!tracker.is_outstanding(event(3).id));
        assert_eq!(tracker.on_ack(ack(Status::Accepted, 1), MS), Fate::Stored);
        assert_eq!(tracker.on_ack(ack(Status::Accepted, 3), MS), Fate::Unmatched);
        assert_eq!(tracker.finish().lost, 2, "one shed, one never answered");
    }

    // Warmup frames are tracked and resolved, but not timed.
    #[test]
    fn warmup_frames_are_not_timed() {
        let mut tracker = Tracker::new(4, 10 * MS);
        tracker.register(event(1), 9 * MS, 9 * MS).unwrap();
        tracker.register(event(2), 10 * MS, 10 * MS).unwrap();
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
            tracker.register(event(seq), 0, 0).unwrap();
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
        tracker.register(event(1), 0, 10 * MS).unwrap();
        tracker.register(event(2), 0, 5 * MS).unwrap();
        tracker.register(event(3), 0, 20 * MS).unwrap();
        assert_eq!(tracker.on_ack(ack(Status::Retry, 3), 21 * MS), Fate::Retrying);
        assert_eq!(tracker.next_due_ns(), Some(21 * MS + retry_delay_ns(event(3).id, 1)));
        assert_eq!(due(&mut tracker, 100 * MS), vec![3]);
        assert_eq!(tracker.next_due_ns(), Some(5 * MS + ANSWER_TIMEOUT_NS));
        assert_eq!(due(&mut tracker, 10 * MS + ANSWER_TIMEOUT_NS), vec![2, 1]);
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
