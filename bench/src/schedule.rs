//! When each frame is meant to leave: the open-loop schedule and the run's clock.
//!
//! The schedule is fixed before the run starts and never looks at answers: send `i` (one
//! datagram or write of `frames_per_send` frames) is due at `start + i × frames_per_send / rate`.
//! Lanes take turns in runs of about one slice's sends (`turn`): lane `(i / turn) % lanes` sends
//! it, so each lane gets an even share, and a pass's sends for one lane are consecutive and can
//! leave in one segmented message (see `udp.rs`). A generator that falls behind sends late rather than skipping,
//! and every latency counts from the intended time, so a stalled server shows up as latency
//! instead of as a quietly lower rate (the coordinated-omission correction of wrk2). The engine
//! sends in time slices (see `engine.rs`), so a send leaves up to one slice after its intended
//! time; that wait is counted as latency too, never hidden.
//!
//! All times inside a run are nanoseconds since the run's start, as `u64`: cheap to store per
//! frame and totally ordered, which the retry timers need.

use std::time::{Duration, Instant};

use crate::plan::{Plan, GRACE};
use crate::udp::SEGMENTS_PER_MESSAGE_MAX;

/// The run's time origin.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn starting_at(start: Instant) -> Clock {
        Clock { start }
    }

    /// Nanoseconds since the start; 0 before it.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sleeps until the start (returns at once if it has passed). `now_ns` reads 0 until then,
    /// so `sleep_until(0)` would not wait.
    pub fn sleep_until_start(&self) {
        std::thread::sleep(self.start.saturating_duration_since(Instant::now()));
    }

    /// Sleeps until `due_ns` (returns at once if it has passed).
    pub fn sleep_until(&self, due_ns: u64) {
        let now_ns = self.now_ns();
        if due_ns > now_ns {
            std::thread::sleep(Duration::from_nanos(due_ns - now_ns));
        }
    }
}

/// The fixed timetable of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    rate_per_sec: u64,
    frames_per_send: u64,
    lanes: u64,
    /// Consecutive sends one lane makes before the next lane's turn.
    turn: u64,
    /// Shortest time between the engine's passes.
    pub slice_ns: u64,
    /// Sends whose intended time is before `duration_ns`.
    pub sends_total: u64,
    /// No scheduled send starts at or after this.
    pub duration_ns: u64,
    /// Frames intended before this are sent but not timed.
    pub warmup_ns: u64,
    /// Everything stops here: the last resends and answers must have happened by then.
    pub end_ns: u64,
}

impl Schedule {
    pub fn new(plan: &Plan) -> Schedule {
        let frames_per_send = plan.frames_per_send as u64;
        let numerator = plan.duration.as_nanos() * u128::from(plan.rate_per_sec);
        let denominator = 1_000_000_000u128 * u128::from(frames_per_send);
        let duration_ns = nanos(plan.duration);
        Schedule {
            rate_per_sec: plan.rate_per_sec,
            frames_per_send,
            lanes: plan.lanes as u64,
            turn: turn_sends(plan.rate_per_sec, frames_per_send, nanos(plan.slice)),
            slice_ns: nanos(plan.slice),
            sends_total: u64::try_from(numerator.div_ceil(denominator)).unwrap_or(u64::MAX),
            duration_ns,
            warmup_ns: nanos(plan.warmup),
            end_ns: duration_ns.saturating_add(nanos(GRACE)),
        }
    }

    /// Intended time of send `send_index`.
    pub fn intended_ns(&self, send_index: u64) -> u64 {
        let nanos =
            u128::from(send_index) * u128::from(self.frames_per_send) * 1_000_000_000 / u128::from(self.rate_per_sec);
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// The lane that makes send `send_index`: the lanes take turns of `turn` sends, so each
    /// gets an even share.
    pub fn lane_of(&self, send_index: u64) -> usize {
        // Below `lanes`, which is a usize.
        ((send_index / self.turn) % self.lanes) as usize
    }

    /// True if `send_index` is a scheduled send (not past the end of the timetable).
    pub fn is_scheduled(&self, send_index: u64) -> bool {
        send_index < self.sends_total
    }

    /// Frames the timetable holds: what the offered rate promises.
    pub fn frames_total(&self) -> u64 {
        self.sends_total.saturating_mul(self.frames_per_send)
    }
}

/// Sends per lane turn: about the sends due in one slice, so a pass mostly feeds one lane, but
/// at least 1 and no more than one segmented message holds.
fn turn_sends(rate_per_sec: u64, frames_per_send: u64, slice_ns: u64) -> u64 {
    let sends_per_slice = u128::from(rate_per_sec) * u128::from(slice_ns) / u128::from(frames_per_send.max(1));
    let turn = (sends_per_slice + 500_000_000) / 1_000_000_000;
    u64::try_from(turn)
        .unwrap_or(u64::MAX)
        .clamp(1, SEGMENTS_PER_MESSAGE_MAX as u64)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::input;
    use crate::plan::PlanInput;

    // The timetable holds rate × duration frames, the last one due before the end.
    #[test]
    fn covers_exactly_the_run() {
        let schedule = Schedule::new(&Plan::new(input()).unwrap());
        assert_eq!(schedule.sends_total, 10_000);
        assert_eq!(schedule.intended_ns(0), 0);
        assert_eq!(schedule.intended_ns(1), 1_000_000);
        assert!(schedule.intended_ns(schedule.sends_total - 1) < schedule.duration_ns);
        assert_eq!(schedule.warmup_ns, 2_000_000_000);
        assert_eq!(schedule.end_ns, 12_000_000_000);
    }

    // Several frames per send: fewer sends, each due later, same frame count (rounded up).
    #[test]
    fn batches_frames_per_send() {
        let schedule = Schedule::new(
            &Plan::new(PlanInput {
                frames_per_datagram: 3,
                ..input()
            })
            .unwrap(),
        );
        assert_eq!(schedule.sends_total, 3_334);
        assert_eq!(schedule.intended_ns(1), 3_000_000);
        assert_eq!(schedule.frames_total(), 10_002);
    }

    // Lanes take turns: each gets an even share of the sends, in runs of a slice's worth.
    #[test]
    fn lanes_share_the_sends_evenly() {
        let schedule = Schedule::new(&Plan::new(input()).unwrap());
        assert_eq!(schedule.turn, 1);
        let mut taken = [0u64; 4];
        for send in 0..schedule.sends_total {
            taken[schedule.lane_of(send)] += 1;
        }
        assert_eq!(taken, [2_500; 4]);

        let fast = Schedule::new(
            &Plan::new(PlanInput {
                rate_per_sec: 50_000,
                ..input()
            })
            .unwrap(),
        );
        assert_eq!(fast.turn, 10);
        let lanes: Vec<usize> = [0, 9, 10, 39, 40].iter().map(|&send| fast.lane_of(send)).collect();
        assert_eq!(lanes, vec![0, 0, 1, 3, 0]);
    }

    #[test]
    fn turns_are_bounded() {
        assert_eq!(turn_sends(1, 1, 200_000), 1);
        assert_eq!(turn_sends(1_000_000, 1, 200_000), 64);
        assert_eq!(turn_sends(50_000, 5, 200_000), 2);
        assert_eq!(turn_sends(50_000, 1, 1_000_000), 50);
        assert_eq!(turn_sends(u64::MAX, 0, u64::MAX), 64);
    }
}
