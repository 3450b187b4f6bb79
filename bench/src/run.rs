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
use crate::verify::{self, Ledger, Streams, Verification};

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
    redis: Option<&mut Streams>,
    scrape: Option<&ScrapeConfig>,
) -> Result<(RunOutcome, Option<Verification>), RunFailure> {
    let Some(streams) = redis else {
        return run(plan, scrape)
            .map(|outcome| (outcome, None))
            .map_err(RunFailure::Setup);
    };
    let since_ms = streams.time_ms().map_err(RunFailure::Setup)?;
    let outcome = run(plan, scrape).map_err(RunFailure::Setup)?;
    let ledger = Ledger::new(outcome.seq_base, &outcome.sent_per_player);
    match verify::verify_since(
        streams,
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
    let open_error = |lane: usize| {
        let target = plan.target_of_lane(lane).clone();
        move |error: std::io::Error| format!("cannot open a lane to {target}: {error}")
    };
    // Opened before the clock starts, so a dead target fails before any frame is scheduled.
    enum Opened {
        // Boxed: a UdpWire is hundreds of bytes larger than a TcpWire, and the enum takes the larger.
        Udp(Box<UdpWire>),
        Tcp(TcpWire),
    }
    let mut wire = match plan.transport {
        Transport::Udp => {
            let sockets = (0..plan.lanes)
                .map(|lane| udp::open(plan.target_of_lane(lane).address).map_err(open_error(lane)))
                .collect::<Result<Vec<_>, _>>()?;
            let datagram_bytes_max = plan.frames_per_send * plan.frame_bytes();
            Opened::Udp(Box::new(
                UdpWire::new(sockets, datagram_bytes_max, plan.frames_per_send).map_err(open_error(0))?,
            ))
        }
        Transport::Tcp => {
            let targets: Vec<_> = (0..plan.lanes).map(|lane| plan.target_of_lane(lane).address).collect();
            let streams = targets
                .iter()
                .enumerate()
                .map(|(lane, &target)| tcp::connect(target).map_err(open_error(lane)))
                .collect::<Result<Vec<_>, _>>()?;
            Opened::Tcp(TcpWire::new(targets, streams).map_err(open_error(0))?)
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
        Opened::Udp(wire) => engine::drive(&shared, &clock, &schedule, &mut lanes, wire.as_mut()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, UdpSocket};
    use std::sync::Mutex;
    use std::thread;

    use shardgate_proto::frame::{encode_ack, parse, Status};

    use crate::parse::parse_target;
    use crate::plan::{tests::input, PlanInput};

    /// A stand-in server on loopback that answers every frame ACCEPTED and records the ids it
    /// was sent, until `stop` is set.
    struct Echo {
        address: SocketAddr,
        ids: Arc<Mutex<Vec<EventId>>>,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    const POLL: Duration = Duration::from_millis(50);

    /// Answers the whole frames of `bytes`, records their ids, and returns the acks.
    fn answer(bytes: &[u8], frame_bytes: usize, ids: &Mutex<Vec<EventId>>) -> Vec<u8> {
        let mut acks = Vec::new();
        for frame in bytes.chunks_exact(frame_bytes) {
            let id = parse(frame).expect("the generator sends valid frames").id;
            ids.lock().unwrap().push(id);
            acks.extend_from_slice(&encode_ack(Status::Accepted, id));
        }
        acks
    }

    impl Echo {
        fn start(transport: Transport, frame_bytes: usize) -> Echo {
            let ids = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (thread_ids, thread_stop) = (Arc::clone(&ids), Arc::clone(&stop));
            let (address, thread) = match transport {
                Transport::Udp => {
                    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                    socket.set_read_timeout(Some(POLL)).unwrap();
                    let address = socket.local_addr().unwrap();
                    let thread = thread::spawn(move || {
                        let mut datagram = vec![0u8; 65_536];
                        while !thread_stop.load(Ordering::Relaxed) {
                            if let Ok((length, from)) = socket.recv_from(&mut datagram) {
                                let acks = answer(&datagram[..length], frame_bytes, &thread_ids);
                                let _ = socket.send_to(&acks, from);
                            }
                        }
                    });
                    (address, thread)
                }
                Transport::Tcp => {
                    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                    listener.set_nonblocking(true).unwrap();
                    let address = listener.local_addr().unwrap();
                    let thread = thread::spawn(move || {
                        thread::scope(|scope| {
                            while !thread_stop.load(Ordering::Relaxed) {
                                let Ok((mut stream, _)) = listener.accept() else {
                                    thread::sleep(Duration::from_millis(5));
                                    continue;
                                };
                                let (ids, stop) = (&thread_ids, &thread_stop);
                                scope.spawn(move || {
                                    stream.set_nonblocking(false).unwrap();
                                    stream.set_read_timeout(Some(POLL)).unwrap();
                                    let (mut inbox, mut filled) = (vec![0u8; 65_536], 0);
                                    while !stop.load(Ordering::Relaxed) {
                                        match stream.read(&mut inbox[filled..]) {
                                            // The generator closed its connection.
                                            Ok(0) => break,
                                            Ok(read_bytes) => {
                                                filled += read_bytes;
                                                let whole = filled - filled % frame_bytes;
                                                let _ = stream.write_all(&answer(&inbox[..whole], frame_bytes, ids));
                                                inbox.copy_within(whole..filled, 0);
                                                filled -= whole;
                                            }
                                            Err(_) => {}
                                        }
                                    }
                                });
                            }
                        });
                    });
                    (address, thread)
                }
            };
            Echo {
                address,
                ids,
                stop,
                thread: Some(thread),
            }
        }

        fn ids(&self) -> HashSet<EventId> {
            self.ids.lock().unwrap().iter().copied().collect()
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// Runs one second at 2 000/s with 30% copies over 4 lanes to two echo servers.
    fn run_to_two_targets(transport: Transport) {
        let plan_of = |targets| {
            Plan::new(PlanInput {
                targets,
                rate_per_sec: 2_000,
                duration: Duration::from_secs(1),
                warmup: Duration::from_millis(200),
                sockets: 4,
                connections: 4,
                ..input()
            })
            .unwrap()
        };
        let frame_bytes = plan_of(vec![parse_target("udp://127.0.0.1:1").unwrap()]).frame_bytes();
        let echoes = [Echo::start(transport, frame_bytes), Echo::start(transport, frame_bytes)];
        let targets = echoes
            .iter()
            .map(|echo| parse_target(&format!("{}://{}", transport.name(), echo.address)).unwrap())
            .collect();
        let plan = plan_of(targets);
        let outcome = run(&plan, None).unwrap();
        let sent = outcome.tally.sent;
        // A generator descheduled on a busy machine may fall short of the timetable (it stops
        // sending two slices past the end); what it sent must all be answered.
        assert!(sent > 1_000, "sent {sent} of 2000 frames");
        assert_eq!((outcome.lost, outcome.tally.resolved), (0, sent));
        let [first, second] = [echoes[0].ids(), echoes[1].ids()];
        // Lanes alternate between the targets, so each gets about half of the sends.
        for ids in [&first, &second] {
            assert!(
                ids.len() as u64 > sent * 3 / 10,
                "one target got only {} distinct ids of {sent} frames",
                ids.len()
            );
        }
        // Copies come from other lanes, often on the other target, as a client failing over.
        let on_both = first.intersection(&second).count() as u64;
        assert!(on_both > sent / 40, "only {on_both} ids reached both targets");
    }

    // Several UDP targets take the lanes in turn; every frame is answered, copies cross targets.
    #[test]
    fn udp_lanes_spread_over_targets() {
        run_to_two_targets(Transport::Udp);
    }

    // The same over TCP, one connection per lane to its own target.
    #[test]
    fn tcp_lanes_spread_over_targets() {
        run_to_two_targets(Transport::Tcp);
    }
}
