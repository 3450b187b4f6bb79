//! One run: open the lanes, start their threads at a common instant, wait, gather the results.
//!
//! Threads: per lane a sender and a receiver (see `lane.rs`), plus the progress line. They all
//! stop by themselves: senders at the schedule's end plus grace at the latest (earlier once
//! every frame is answered), receivers when their sender stops.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use shardgate::frame::EventId;

use crate::events::EventSource;
use crate::lane::{self, unix_now_us, Lane, Shared, Transmit};
use crate::live::{self, Counters, Tally};
use crate::parse::Transport;
use crate::plan::Plan;
use crate::schedule::{Clock, Schedule};
use crate::tcp::{self, Handoff, TcpTransmit};
use crate::tracker::{Latencies, Tracker, LOST_SAMPLE_MAX};
use crate::udp::{self, UdpTransmit};

/// Time between opening the lanes and the schedule's start, so every thread is up and parked
/// before the first send is due.
const START_DELAY: Duration = Duration::from_millis(50);
/// Seconds of sends each lane's tables are first sized for (they grow if the server stalls).
const EXPECTED_OUTSTANDING_SECS: f64 = 0.25;

/// Everything the report and the verification need from a run.
pub struct RunOutcome {
    pub tally: Tally,
    pub latencies: Latencies,
    /// Ids answered ACCEPTED or DUPLICATE, across lanes (repeats for copies).
    pub acked_ids: Vec<EventId>,
    pub lost: u64,
    pub lost_sample: Vec<EventId>,
    /// Frames the timetable held; `tally.sent` falls short if the senders could not keep up.
    pub frames_scheduled: u64,
    /// Distinct fresh events sent.
    pub events: u64,
    pub sent_per_player: Vec<u64>,
    pub seq_base: u64,
}

/// A lane's opened transport, before its threads start.
enum Opened {
    Udp(UdpSocket),
    Tcp(std::net::TcpStream),
}

/// Runs the plan. An error means a lane could not be opened (nothing was sent).
pub fn run(plan: &Plan) -> Result<RunOutcome, String> {
    let target = plan.target.address;
    let mut opened = Vec::with_capacity(plan.lanes);
    for _ in 0..plan.lanes {
        let lane = match plan.target.transport {
            Transport::Udp => udp::open(target).map(Opened::Udp),
            Transport::Tcp => tcp::connect(target).map(Opened::Tcp),
        };
        opened.push(lane.map_err(|error| format!("cannot open a lane to {}: {error}", plan.target))?);
    }

    let schedule = Schedule::new(plan);
    let seq_base = unix_now_us();
    let clock = Clock::starting_at(Instant::now() + START_DELAY);
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        schedule,
        clock,
        events: EventSource::new(plan.players, seq_base),
        counters: Arc::new(Counters::default()),
    });
    let expected_outstanding =
        (plan.rate_per_sec as f64 * EXPECTED_OUTSTANDING_SECS / plan.lanes as f64).ceil() as usize + 64;

    let mut lanes = Vec::with_capacity(plan.lanes);
    let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(plan.lanes * 2);
    for (index, opened) in opened.into_iter().enumerate() {
        let lane = Arc::new(Lane::new(index, Tracker::new(expected_outstanding, schedule.warmup_ns)));
        lanes.push(Arc::clone(&lane));
        let (sender, receiver) = spawn_lane(&shared, lane, opened)?;
        threads.extend([sender, receiver]);
    }
    let progress_done = Arc::new(AtomicBool::new(false));
    let progress = live::spawn_progress(
        Arc::clone(&shared.counters),
        clock,
        plan.duration,
        Arc::clone(&progress_done),
    );

    let mut thread_failed = false;
    for thread in threads {
        thread_failed |= thread.join().is_err();
    }
    progress_done.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        let _ = progress.join();
    }
    if thread_failed {
        return Err("a lane thread panicked".into());
    }

    let mut outcome = RunOutcome {
        tally: shared.counters.tally(),
        latencies: Latencies::new(),
        acked_ids: Vec::new(),
        lost: 0,
        lost_sample: Vec::new(),
        frames_scheduled: schedule.frames_total(),
        events: 0,
        sent_per_player: shared.events.sent_per_player(),
        seq_base,
    };
    outcome.events = outcome.sent_per_player.iter().sum();
    for lane in lanes {
        let tracker = std::mem::replace(&mut *lane.tracker(), Tracker::new(0, 0));
        let report = tracker.finish();
        outcome.latencies.merge(&report.latencies);
        outcome.acked_ids.extend(report.acked_ids);
        outcome.lost += report.lost;
        let room = LOST_SAMPLE_MAX.saturating_sub(outcome.lost_sample.len());
        outcome.lost_sample.extend(report.lost_sample.into_iter().take(room));
    }
    Ok(outcome)
}

/// Starts a lane's threads for its transport.
fn spawn_lane(
    shared: &Arc<Shared>,
    lane: Arc<Lane>,
    opened: Opened,
) -> Result<(JoinHandle<()>, JoinHandle<()>), String> {
    let spawn_error = |error: std::io::Error| format!("cannot start lane {}: {error}", lane.index);
    match opened {
        Opened::Udp(socket) => {
            let reader = socket.try_clone().map_err(spawn_error)?;
            let transmit = UdpTransmit::new(socket);
            spawn_pair(shared, lane, transmit, move |shared, lane, sender| {
                udp::receive_loop(shared, lane, reader, sender)
            })
        }
        Opened::Tcp(stream) => {
            let handoff = Arc::new(Handoff::default());
            let target = shared.plan.target.address;
            let transmit = TcpTransmit::new(target, stream, Arc::clone(&handoff), Arc::clone(&shared.counters))
                .map_err(spawn_error)?;
            spawn_pair(shared, lane, transmit, move |shared, lane, sender| {
                tcp::receive_loop(shared, lane, &handoff, sender)
            })
        }
    }
}

/// Starts the sender, then the receiver, which gets the sender's handle to wake it when a
/// resend is due sooner than the sender planned to look.
fn spawn_pair(
    shared: &Arc<Shared>,
    lane: Arc<Lane>,
    mut transmit: impl Transmit + Send + 'static,
    receive: impl FnOnce(&Shared, &Lane, Thread) + Send + 'static,
) -> Result<(JoinHandle<()>, JoinHandle<()>), String> {
    let index = lane.index;
    let spawn_error = |error: std::io::Error| format!("cannot start lane {index}: {error}");
    let (sender_shared, sender_lane) = (Arc::clone(shared), Arc::clone(&lane));
    let sender = thread::Builder::new()
        .name(format!("send-{index}"))
        .spawn(move || lane::send_loop(&sender_shared, &sender_lane, &mut transmit))
        .map_err(spawn_error)?;
    let (receiver_shared, sender_thread) = (Arc::clone(shared), sender.thread().clone());
    let receiver = thread::Builder::new()
        .name(format!("recv-{index}"))
        .spawn(move || receive(&receiver_shared, &lane, sender_thread))
        .map_err(spawn_error)?;
    Ok((sender, receiver))
}
