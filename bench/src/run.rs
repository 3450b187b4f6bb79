//! One run: open the lanes, drive them from this thread until the engine stops, gather the
//! results.
//!
//! Threads: the calling thread runs the engine (`engine.rs`), which drives every lane; one more
//! thread draws the progress line, and with `--scrape` one more scrapes the server's metrics
//! (`scrape.rs`) while the engine runs. The engine stops by itself: at the schedule's end plus
//! grace at the latest, earlier once every frame is answered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardgate_proto::frame::EventId;

use crate::engine;
use crate::events::EventSource;
use crate::lane::{unix_now_us, Lane, Shared};
use crate::live::{self, Counters, Tally};
use crate::parse::Transport;
use crate::plan::Plan;
use crate::schedule::{Clock, Schedule};
use crate::scrape::{ScrapeConfig, ScrapeStats, Scraper};
use crate::stall_probe::{self, Probe, StallReport};
use crate::sys;
use crate::tcp::{self, TcpWire};
use crate::tracker::{Latencies, Tracker, LOST_SAMPLE_MAX};
use crate::udp::{self, UdpWire};
use crate::verify::{self, Ledger, Verification};

/// Time between opening the lanes and the schedule's start, so the progress thread is up and
/// the first pass starts on time.
const START_DELAY: Duration = Duration::from_millis(50);
/// Seconds of sends each lane's table of outstanding frames holds; it is allocated at the start
/// and never grows. A healthy server answers in about a millisecond and a lost frame is resent
/// within a few seconds, so only a server stalled for about this long fills it, and the lanes
/// then shed frames (counted lost) rather than grow on the machine the server runs on. At
/// 100k frames/s that is a million entries in all, touched only as far as they are used.
const OUTSTANDING_SECS_MAX: f64 = 10.0;

/// Everything the report and the verification need from a run.
pub struct RunOutcome {
    pub tally: Tally,
    pub latencies: Latencies,
    /// Ids answered ACCEPTED or DUPLICATE, across lanes (repeats for copies).
    pub acked_ids: Vec<EventId>,
    pub lost: u64,
    pub lost_sample: Vec<EventId>,
    /// Frames the timetable held; `tally.sent` falls short if the generator could not keep up.
    pub frames_scheduled: u64,
    /// Distinct fresh events sent.
    pub events: u64,
    pub sent_per_player: Vec<u64>,
    pub seq_base: u64,
    /// CPU time (user + system, all threads) the generator used while the load ran.
    pub generator_cpu: Duration,
    /// What `--scrape` did while the load ran; None without it.
    pub scrape: Option<ScrapeStats>,
    /// What `--stall-probe` saw while the load ran; None without it.
    pub stall_probe: Option<StallReport>,
}

/// Why [`run_verified`] has no result.
pub enum RunFailure {
    /// Nothing was sent: a lane could not be opened, or Redis did not answer before the run.
    Setup(String),
    /// The run happened but reading Redis back failed.
    Verify { outcome: Box<RunOutcome>, message: String },
}

/// Runs the plan and, given Redis, verifies what it stored: what `run` does, and each step of
/// `sweep`. With `scrape`, the server's metrics are scraped meanwhile.
pub fn run_verified(
    plan: &Plan,
    redis: Option<&mut redis::Connection>,
    scrape: Option<&ScrapeConfig>,
) -> Result<(RunOutcome, Option<Verification>), RunFailure> {
    let Some(connection) = redis else {
        return run(plan, scrape)
            .map(|outcome| (outcome, None))
            .map_err(RunFailure::Setup);
    };
    let since_ms = verify::redis_time_ms(connection).map_err(RunFailure::Setup)?;
    let outcome = run(plan, scrape).map_err(RunFailure::Setup)?;
    let ledger = Ledger::new(outcome.seq_base, &outcome.sent_per_player);
    match verify::verify_since(
        connection,
        &plan.prefix,
        plan.partitions,
        ledger,
        &outcome.acked_ids,
        Some(since_ms),
    ) {
        Ok(verification) => Ok((outcome, Some(verification))),
        Err(message) => Err(RunFailure::Verify {
            outcome: Box::new(outcome),
            message,
        }),
    }
}

/// Runs the plan, scraping `scrape` from the schedule's start to the engine's end. An error
/// means a lane (or the scrape thread) could not be opened (nothing was sent).
pub fn run(plan: &Plan, scrape: Option<&ScrapeConfig>) -> Result<RunOutcome, String> {
    let target = plan.target.address;
    let open_error = |error: std::io::Error| format!("cannot open a lane to {}: {error}", plan.target);
    // Opened before the clock starts, so a dead target fails before any frame is scheduled.
    enum Opened {
        Udp(UdpWire),
        Tcp(TcpWire),
    }
    let mut wire = match plan.target.transport {
        Transport::Udp => {
            let sockets = (0..plan.lanes)
                .map(|_| udp::open(target))
                .collect::<Result<Vec<_>, _>>()
                .map_err(open_error)?;
            let datagram_bytes_max = plan.frames_per_send * plan.frame_bytes();
            Opened::Udp(UdpWire::new(sockets, datagram_bytes_max, plan.frames_per_send).map_err(open_error)?)
        }
        Transport::Tcp => {
            let streams = (0..plan.lanes)
                .map(|_| tcp::connect(target))
                .collect::<Result<Vec<_>, _>>()
                .map_err(open_error)?;
            Opened::Tcp(TcpWire::new(target, streams).map_err(open_error)?)
        }
    };

    let schedule = Schedule::new(plan);
    let seq_base = unix_now_us();
    let start = Instant::now() + START_DELAY;
    let clock = Clock::starting_at(start);
    let events = EventSource::new(plan.players, seq_base);
    let counters = Arc::new(Counters::default());
    // No lane ever holds more than all it sends in the run, however long the server stalls.
    let lane_frames = schedule.frames_total().div_ceil(plan.lanes as u64) as f64;
    let lane_capacity = (plan.rate_per_sec as f64 * OUTSTANDING_SECS_MAX / plan.lanes as f64)
        .min(lane_frames)
        .ceil() as usize
        + 64;
    let mut lanes: Vec<Lane> = (0..plan.lanes)
        .map(|index| Lane::new(index, Tracker::new(lane_capacity, schedule.warmup_ns)))
        .collect();

    let scraper = scrape
        .map(Scraper::start)
        .transpose()
        .map_err(|error| format!("cannot start the scrape thread: {error}"))?;
    let probe = plan
        .stall_probe
        .then(|| Probe::start(&Probe::allowed_cores(), stall_probe::monotonic_ns_of(start)))
        .transpose()
        .map_err(|error| format!("cannot start the stall probe: {error}"))?;
    let progress_done = Arc::new(AtomicBool::new(false));
    let progress = live::spawn_progress(Arc::clone(&counters), clock, plan.duration, Arc::clone(&progress_done));
    let shared = Shared {
        plan,
        events: &events,
        counters: &counters,
    };
    let cpu_before = sys::process_cpu_time();
    match &mut wire {
        Opened::Udp(wire) => engine::drive(&shared, &clock, &schedule, &mut lanes, wire),
        Opened::Tcp(wire) => engine::drive(&shared, &clock, &schedule, &mut lanes, wire),
    }
    let scrape = scraper.map(Scraper::stop);
    let generator_cpu = sys::process_cpu_time().saturating_sub(cpu_before);
    progress_done.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        let _ = progress.join();
    }

    let mut outcome = RunOutcome {
        tally: counters.tally(),
        latencies: Latencies::new(),
        acked_ids: Vec::new(),
        lost: 0,
        lost_sample: Vec::new(),
        frames_scheduled: schedule.frames_total(),
        events: 0,
        sent_per_player: events.sent_per_player(),
        seq_base,
        generator_cpu,
        scrape,
        stall_probe: None,
    };
    outcome.events = outcome.sent_per_player.iter().sum();
    for lane in lanes {
        let report = lane.tracker.finish();
        outcome.latencies.merge(&report.latencies);
        outcome.acked_ids.extend(report.acked_ids);
        outcome.lost += report.lost;
        let room = LOST_SAMPLE_MAX.saturating_sub(outcome.lost_sample.len());
        outcome.lost_sample.extend(report.lost_sample.into_iter().take(room));
    }
    let measured_ms = (schedule.warmup_ns / 1_000_000, plan.duration.as_millis() as u64);
    outcome.stall_probe =
        probe.map(|probe| probe.stop(&outcome.latencies.slow_first_by_ms, measured_ms.0, measured_ms.1));
    Ok(outcome)
}
