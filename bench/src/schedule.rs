//! When each frame is meant to leave: the open-loop schedule and the run's clock.
//!
//! The schedule is fixed before the run starts and never looks at answers: send `i` (one
//! datagram or write of `frames_per_send` frames) is due at `start + i × frames_per_send / rate`,
//! and lane `i % lanes` sends it. A lane that falls behind sends late rather than skipping, and
//! every latency counts from the intended time, so a stalled server shows up as latency instead
//! of as a quietly lower rate (the coordinated-omission correction of wrk2).
//!
//! All times inside a run are nanoseconds since the run's start, as `u64`: cheap to store per
//! frame and totally ordered, which the retry timers need.

use std::time::{Duration, Instant};

use crate::plan::{Plan, GRACE};

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

    /// Sleeps until `due_ns` or for at most `longest`, whichever comes first. Parking (not
    /// sleeping) lets a receiver wake the sender early when it schedules a resend.
    pub fn park_until(&self, due_ns: u64, longest: Duration) {
        let now_ns = self.now_ns();
        if due_ns <= now_ns {
            return;
        }
        let wait = Duration::from_nanos(due_ns - now_ns).min(longest);
        std::thread::park_timeout(wait);
    }
}

/// The fixed timetable of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    rate_per_sec: u64,
    frames_per_send: u64,
    lanes: u64,
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

    /// The first send of `lane`; the lane's next is always `lanes` further.
    pub fn first_send_of(&self, lane: usize) -> u64 {
        lane as u64
    }

    pub fn next_send_of_lane(&self, send_index: u64) -> u64 {
        send_index.saturating_add(self.lanes)
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

    // Lanes interleave: together they take every send exactly once.
    #[test]
    fn lanes_partition_the_sends() {
        let schedule = Schedule::new(&Plan::new(input()).unwrap());
        let mut taken = vec![0u8; schedule.sends_total as usize];
        for lane in 0..4 {
            let mut send = schedule.first_send_of(lane);
            while schedule.is_scheduled(send) {
                taken[send as usize] += 1;
                send = schedule.next_send_of_lane(send);
            }
        }
        assert!(taken.iter().all(|&count| count == 1));
    }
}
