//! The engine: one thread that drives every lane in time slices.
//!
//! # Why one thread and slices
//! The generator shares a 2-core machine with the server and Redis, so its CPU per frame is
//! taken straight from what it measures. A thread per lane waking once per frame cost about
//! 35-45 µs of CPU per frame, mostly context switches. Here one thread wakes at most once per
//! slice (`--slice`) and per pass:
//! 1. reads every reply waiting on any lane (a readiness check, then batched reads), and
//!    applies the acks with the time the kernel *received* them, not the time this thread got
//!    to them, so reading late does not add latency;
//! 2. encodes every scheduled send now due, and every resend whose timer passed;
//! 3. hands them to the kernel in one batched call per lane (`sendmmsg` for UDP).
//!
//! # What the slice costs, and buys
//! A send leaves at the first pass at or after its intended time, so up to one slice (plus the
//! sleep's overshoot) late. Latency still counts from the intended time (wrk2's correction), so
//! that wait is included in every figure, never hidden: a slice adds about half its length on
//! average to the first-attempt latency. When sends are farther apart than a slice, each leaves
//! on time. In exchange, every wake-up (and every wake-up of the server a send causes) is shared
//! by a slice's frames. On this project's 2-core VM (nested virtualisation, where a context
//! switch is dear) one wake-up of the engine costs about 25 µs of CPU, and a send call that
//! wakes the server several µs more, so the slice sets much of the generator's CPU per frame:
//! at 50k frames/s of one frame per datagram, 200 µs slices cost about 5.6 µs per frame, 500 µs
//! (the default) about 3-3.9, 1 ms about 2.2-2.8.
//!
//! # Bounds
//! One pass sends at most [`SENDS_PER_PASS_MAX`] scheduled sends and as many resends, and no
//! more than [`PASS_BYTES_MAX`] of each; a generator that fell behind (descheduled, or stopped
//! in a debugger) catches up over several passes without sleeping, reading replies between
//! them, instead of building one huge batch.

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::lane::{Lane, Scratch, Shared};
use crate::live::Counters;
use crate::schedule::{Clock, Schedule};
use crate::sys;

/// Longest sleep when nothing is due, so replies and the end of the run are still seen.
const IDLE_WAKE_NS: u64 = 2_000_000;
/// Sooner wake-up while a TCP lane holds bytes its socket would not take yet.
const PENDING_WAKE_NS: u64 = 500_000;
/// Scheduled sends (and, separately, resends) one pass may make before it must read again...
const SENDS_PER_PASS_MAX: usize = 4_096;
/// ...and the bytes they may hold, which bounds the transports' per-pass buffers.
const PASS_BYTES_MAX: usize = 8 << 20;
/// How far past its due time a sleep may end (the kernel's default is 50 µs).
const TIMER_SLACK: std::time::Duration = std::time::Duration::from_micros(5);

/// How the lanes' bytes move. The engine calls, per pass: `receive`, then `queue` per send,
/// then `flush`.
pub trait Wire {
    /// Reads every reply waiting (bounded per pass) and hands each to `deliver(lane, bytes,
    /// arrived_realtime_ns)`, which returns how many leading bytes it used (whole acks).
    fn receive(&mut self, counters: &Counters, deliver: impl FnMut(usize, &[u8], Option<i128>) -> usize);

    /// Queues one datagram (UDP) or write (TCP) of whole frames for `lane`. If it cannot be
    /// queued it is counted in `send_errors`; its frames time out and are resent.
    fn queue(&mut self, lane: usize, bytes: &[u8], counters: &Counters);

    /// Hands what was queued to the kernel, and looks after broken connections.
    fn flush(&mut self, counters: &Counters, now_ns: u64);

    /// True while bytes are held back by backpressure.
    fn has_pending(&self) -> bool;
}

/// Runs the schedule on `lanes` through `wire` until every frame is answered after the
/// schedule ended, or the run's end (schedule plus grace) is reached.
pub fn drive(shared: &Shared<'_>, clock: &Clock, schedule: &Schedule, lanes: &mut [Lane], wire: &mut impl Wire) {
    sys::set_timer_slack(TIMER_SLACK);
    let counters = shared.counters;
    let mut rng = StdRng::from_entropy();
    let mut scratch = Scratch::new(shared.plan);
    let mut next_send = 0u64;
    clock.sleep_until_start();
    let sends_per_pass_max = sends_per_pass_max(shared.plan.frames_per_send * shared.plan.frame_bytes());
    loop {
        let pass_start_ns = clock.now_ns();

        // Replies first: they free ids for copies and arm RETRY resends.
        let realtime_offset_ns = sys::realtime_now_ns() - i128::from(clock.now_ns());
        wire.receive(counters, |lane, bytes, arrived_realtime_ns| {
            let arrived_ns = arrival_ns(arrived_realtime_ns, realtime_offset_ns, clock.now_ns());
            match lanes.get_mut(lane) {
                Some(lane) => lane.absorb_acks(counters, bytes, arrived_ns),
                None => bytes.len(),
            }
        });

        let now_ns = clock.now_ns();
        // Sends due before the end still go if the pass that finds them comes within two slices
        // of it (a pass can only be a slice late); a generator further behind stops, and its
        // shortfall shows as `sent` below `scheduled`.
        let sends_close_ns = schedule.duration_ns.saturating_add(schedule.slice_ns.saturating_mul(2));
        let schedule_open = |send: u64| now_ns < sends_close_ns && schedule.is_scheduled(send);
        let mut budget_left = true;
        let mut sends = 0;
        // Behind schedule: every due send goes, none is skipped (open loop).
        while schedule_open(next_send) && schedule.intended_ns(next_send) <= now_ns {
            if sends == sends_per_pass_max {
                budget_left = false;
                break;
            }
            let lane = &mut lanes[schedule.lane_of(next_send)];
            lane.fill_scheduled(shared, &mut rng, schedule.intended_ns(next_send), now_ns, &mut scratch);
            wire.queue(lane.index, &scratch.bytes, counters);
            next_send += 1;
            sends += 1;
        }
        let mut resends = 0;
        for lane in lanes.iter_mut() {
            while resends < sends_per_pass_max && lane.fill_resends(shared, now_ns, &mut scratch) {
                wire.queue(lane.index, &scratch.bytes, counters);
                resends += 1;
            }
        }
        budget_left &= resends < sends_per_pass_max;
        wire.flush(counters, now_ns);

        if now_ns >= schedule.end_ns {
            break;
        }
        let scheduled_left = schedule_open(next_send);
        if !scheduled_left && lanes.iter().all(|lane| lane.tracker.outstanding() == 0) {
            break;
        }
        if !budget_left {
            continue;
        }
        let mut wake_ns = pass_start_ns.saturating_add(IDLE_WAKE_NS);
        if scheduled_left {
            wake_ns = wake_ns.min(schedule.intended_ns(next_send));
        }
        for lane in lanes.iter() {
            // May be a stale timer: waking early is harmless.
            if let Some(due_ns) = lane.tracker.next_due_ns() {
                wake_ns = wake_ns.min(due_ns);
            }
        }
        if wire.has_pending() {
            wake_ns = wake_ns.min(pass_start_ns.saturating_add(PENDING_WAKE_NS));
        }
        wake_ns = wake_ns
            .max(pass_start_ns.saturating_add(schedule.slice_ns))
            .min(schedule.end_ns);
        clock.sleep_until(wake_ns);
    }
}

/// Sends one pass may make for sends of `send_bytes`.
fn sends_per_pass_max(send_bytes: usize) -> usize {
    (PASS_BYTES_MAX / send_bytes.max(1)).clamp(1, SENDS_PER_PASS_MAX)
}

/// A reply's arrival on the run's clock: its kernel timestamp moved by `realtime_offset_ns`
/// (wall clock minus run clock, sampled this pass), or `now_ns` when it has none. Never later
/// than `now_ns`, so a wall-clock step between arrival and reading cannot put it in the future.
fn arrival_ns(arrived_realtime_ns: Option<i128>, realtime_offset_ns: i128, now_ns: u64) -> u64 {
    match arrived_realtime_ns {
        Some(realtime_ns) => {
            let run_ns = (realtime_ns - realtime_offset_ns).clamp(0, i128::from(now_ns));
            u64::try_from(run_ns).unwrap_or(now_ns)
        }
        None => now_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use shardgate_proto::frame::{encode_ack, parse, Status};

    use crate::events::EventSource;
    use crate::plan::{tests::input, Plan, PlanInput};
    use crate::tracker::Tracker;

    /// A wire that answers every frame flushed, on the next receive: RETRY to a frame's first
    /// send when `retry_first`, ACCEPTED otherwise.
    struct EchoWire {
        frame_bytes: usize,
        retry_first: bool,
        queued: Vec<(usize, Vec<u8>)>,
        replies: Vec<(usize, Vec<u8>)>,
        retried: std::collections::HashSet<(u64, u64)>,
        sends: usize,
    }

    impl Wire for EchoWire {
        fn receive(&mut self, _: &Counters, mut deliver: impl FnMut(usize, &[u8], Option<i128>) -> usize) {
            for (lane, reply) in self.replies.drain(..) {
                assert_eq!(deliver(lane, &reply, None), reply.len());
            }
        }

        fn queue(&mut self, lane: usize, bytes: &[u8], _: &Counters) {
            self.queued.push((lane, bytes.to_vec()));
        }

        fn flush(&mut self, _: &Counters, _: u64) {
            for (lane, bytes) in self.queued.drain(..) {
                self.sends += 1;
                let mut reply = Vec::new();
                for frame in bytes.chunks(self.frame_bytes) {
                    let id = parse(frame).unwrap().id;
                    let first = self.retried.insert((id.player_id, id.seq));
                    let status = if self.retry_first && first {
                        Status::Retry
                    } else {
                        Status::Accepted
                    };
                    reply.extend_from_slice(&encode_ack(status, id));
                }
                self.replies.push((lane, reply));
            }
        }

        fn has_pending(&self) -> bool {
            false
        }
    }

    /// Drives a short run through an echo wire; returns the counters, the lanes and how long
    /// it took.
    fn drive_echo(retry_first: bool) -> (crate::live::Tally, Vec<Lane>, Duration, u64) {
        let plan = Plan::new(PlanInput {
            rate_per_sec: 4_000,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(100),
            dup_ratio: 0.0,
            frames_per_datagram: 2,
            ..input()
        })
        .unwrap();
        let schedule = Schedule::new(&plan);
        let (events, counters) = (EventSource::new(plan.players, 0), Counters::default());
        let shared = Shared {
            plan: &plan,
            events: &events,
            counters: &counters,
        };
        let mut lanes: Vec<Lane> = (0..plan.lanes)
            .map(|index| Lane::new(index, Tracker::new(16, 0)))
            .collect();
        let mut wire = EchoWire {
            frame_bytes: plan.frame_bytes(),
            retry_first,
            queued: Vec::new(),
            replies: Vec::new(),
            retried: Default::default(),
            sends: 0,
        };
        let started = Instant::now();
        drive(&shared, &Clock::starting_at(started), &schedule, &mut lanes, &mut wire);
        (counters.tally(), lanes, started.elapsed(), schedule.frames_total())
    }

    // Every scheduled frame is sent once and answered; the engine stops as soon as nothing is
    // awaited after the schedule, not at the end of the grace period.
    #[test]
    fn sends_the_schedule_and_stops_when_all_answered() {
        let (tally, lanes, took, scheduled) = drive_echo(false);
        assert_eq!(scheduled, 1_200);
        assert_eq!(
            (tally.sent, tally.resent, tally.accepted, tally.resolved),
            (1_200, 0, 1_200, 1_200)
        );
        assert!(lanes.iter().all(|lane| lane.tracker.outstanding() == 0));
        // Waiting out the grace period would take the 300 ms schedule plus `GRACE`; stopping
        // early leaves room below that for a machine that stalls the test for over a second.
        let waited_out = Duration::from_millis(300) + crate::plan::GRACE;
        assert!(took < waited_out - Duration::from_millis(200), "took {took:?}");
    }

    // A RETRY answer brings the frame back after its retry delay; the final latency includes it.
    #[test]
    fn resends_after_retry() {
        let (tally, lanes, _, _) = drive_echo(true);
        assert_eq!(
            (tally.sent, tally.retry, tally.resent, tally.accepted),
            (1_200, 1_200, 1_200, 1_200)
        );
        let mut latencies = crate::tracker::Latencies::new();
        for lane in lanes {
            latencies.merge(&lane.tracker.finish().latencies);
        }
        let retry_delay_min_us = crate::tracker::RETRY_DELAY_NS / 2 / 1_000;
        assert!(latencies.final_us.min() >= retry_delay_min_us);
        // Each frame's final latency is its first plus at least the shortest retry delay, so
        // the means keep that distance however long the machine stalls a first attempt
        // (comparing the first's maximum with the final's minimum failed on a VM that stalled
        // for more than the delay). A 1% margin for the histograms' rounding.
        let (first_mean_us, final_mean_us) = (latencies.first_us.mean(), latencies.final_us.mean());
        assert!(
            final_mean_us * 1.01 >= first_mean_us + retry_delay_min_us as f64,
            "first {first_mean_us} µs, final {final_mean_us} µs"
        );
    }

    #[test]
    fn pass_budget_is_bounded_by_bytes() {
        assert_eq!(sends_per_pass_max(104), SENDS_PER_PASS_MAX);
        assert_eq!(sends_per_pass_max(65_000), PASS_BYTES_MAX / 65_000);
        assert_eq!(sends_per_pass_max(0), SENDS_PER_PASS_MAX);
        assert_eq!(sends_per_pass_max(usize::MAX), 1);
    }

    #[test]
    fn arrival_is_moved_to_the_run_clock_and_never_in_the_future() {
        let offset_ns = 1_000_000_000_000;
        assert_eq!(arrival_ns(Some(offset_ns + 5_000), offset_ns, 9_000), 5_000);
        assert_eq!(arrival_ns(Some(offset_ns + 20_000), offset_ns, 9_000), 9_000);
        assert_eq!(arrival_ns(Some(3), offset_ns, 9_000), 0);
        assert_eq!(arrival_ns(None, offset_ns, 9_000), 9_000);
    }
}
