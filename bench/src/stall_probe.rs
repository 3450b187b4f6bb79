//! `run --stall-probe`: how long the machine stops running threads at all, measured beside a
//! run, and how many of the run's slow answers those stops explain.
//!
//! # Why
//! On the shared virtual machine this project is measured on, the headline's p99.9 moves
//! between 4 and 15 ms from run to run with the same binaries, and earlier rounds found gaps of
//! several milliseconds in which no thread of any priority ran. A slow answer can come from
//! shardgate, from Redis, or from the machine not running anything; only the last is outside
//! every program's reach. This probe separates it.
//!
//! # How
//! One thread per core, pinned there, at the lowest real-time priority (`SCHED_FIFO` 1), so
//! that it preempts every ordinary thread the moment its timer fires. It sleeps to absolute
//! deadlines one period apart (`clock_nanosleep(TIMER_ABSTIME)`) and records how late each
//! wake came. A wake late by a millisecond or more means that for that long nothing in this
//! machine's scheduler could run even the highest-priority thread on that core: the
//! hypervisor had the virtual CPU, or the kernel ran interrupts or softirq work there. Either
//! way shardgate's threads were stopped too. Without the privilege to go real-time, the probe
//! still runs as an ordinary thread and says so (`realtime: false`); its stalls then include
//! plain scheduling delay.
//!
//! # What the run reports
//! Per core: wakes, how late (p99.9, maximum), and the stalls of at least
//! [`STALL_THRESHOLD`]. Then the run's first-attempt answers slower than 5 ms, counted by the
//! millisecond they were meant to be sent, against the stalls: how many were meant to be sent
//! within [`COVER_BEFORE`] before a stall began up to [`COVER_AFTER`] after it ended, and what
//! share of the run's measured time those windows cover. A tail mostly inside a small share of
//! the time is the machine's.
//!
//! # `shardgate-bench stalls`: the same probe without a run
//! Checks a host before trusting its latency figures: the probe alone for `--duration`, idle,
//! then (`--busy`) again with one low-priority spinning thread per core, so that every
//! virtual CPU is busy the whole time, as under load. On this project's virtual machine the
//! second reading is the one that matters: a hypervisor that overcommits its cores takes a
//! busy virtual CPU away for milliseconds at a time, and an idle one hardly ever. On dedicated
//! metal both readings should show no stall of a millisecond.
//!
//! # Cost and bounds
//! Two wakes per millisecond on this 2-core machine, a few microseconds of CPU each. Each
//! thread keeps at most [`STALLS_MAX`] stalls; more are counted, not kept.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::reflector::pin_to_core;

/// How often each probe thread wakes.
pub const PERIOD: Duration = Duration::from_millis(1);
/// A wake at least this late is a stall.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(1);
/// A slow answer meant to be sent this long before a stall began may owe its wait to it: it
/// was still in flight (in the generator, the kernel, shardgate or Redis) when the stall came.
pub const COVER_BEFORE: Duration = Duration::from_millis(5);
/// ...and this long after it ended: the queues the stall left take a while to drain.
pub const COVER_AFTER: Duration = Duration::from_millis(2);
/// Stalls one thread keeps; at one per period over a 10-minute run it would need 600 000.
pub const STALLS_MAX: usize = 100_000;
/// The first-attempt latency above which an answer counts as slow: the SLO's bound.
pub const SLOW_NS: u64 = 5_000_000;

/// One stall: when the late wake came, and how late, in nanoseconds on the run's clock.
#[derive(Clone, Copy, Debug)]
pub struct Stall {
    pub woke_ns: u64,
    pub late_ns: u64,
}

impl Stall {
    /// The span the core could not run anything: from the missed deadline to the wake.
    fn began_ns(&self) -> u64 {
        self.woke_ns.saturating_sub(self.late_ns)
    }
}

/// What one probe thread saw.
#[derive(Debug, Default)]
struct CoreReading {
    core: usize,
    realtime: bool,
    wakes: u64,
    /// Lateness of every wake, microseconds.
    late_us: Vec<u32>,
    stalls: Vec<Stall>,
    stalls_dropped: u64,
}

/// The probe threads, running until [`Probe::stop`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<CoreReading>>,
}

/// The clock the probe and the run share: CLOCK_MONOTONIC nanoseconds, the clock `Instant`
/// reads on Linux.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec for the call's duration.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(result, 0, "CLOCK_MONOTONIC is always readable");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn sleep_until_monotonic_ns(deadline_ns: u64) {
    let deadline = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `deadline` is a valid timespec; the remainder pointer may be null with TIMER_ABSTIME.
    // An early return (a signal) only makes this wake early, which the loop tolerates.
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &deadline,
            std::ptr::null_mut(),
        );
    }
}

/// Asks for `SCHED_FIFO` priority 1 for the calling thread.
fn go_realtime() -> io::Result<()> {
    let parameters = libc::sched_param { sched_priority: 1 };
    // SAFETY: `parameters` is a valid sched_param; pid 0 means the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &parameters) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Probe {
    /// Starts one probe thread per core in `cores`. Times are kept relative to `start_ns`
    /// (CLOCK_MONOTONIC), the run's clock start.
    pub fn start(cores: &[usize], start_ns: u64) -> io::Result<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(cores.len());
        for &core in cores {
            let stop = Arc::clone(&stop);
            let thread = std::thread::Builder::new()
                .name(format!("stall-probe-{core}"))
                .spawn(move || probe_core(core, start_ns, &stop))?;
            threads.push(thread);
        }
        Ok(Probe { stop, threads })
    }

    /// Stops the threads and sets their stalls against `slow_by_ms` (first-attempt answers
    /// slower than [`SLOW_NS`], counted by the millisecond of the run they were meant to be
    /// sent in) over the measured span `[measure_from_ms, measure_to_ms)`.
    pub fn stop(self, slow_by_ms: &[u32], measure_from_ms: u64, measure_to_ms: u64) -> StallReport {
        self.stop.store(true, Ordering::Relaxed);
        let readings: Vec<CoreReading> = self
            .threads
            .into_iter()
            .filter_map(|thread| thread.join().ok())
            .collect();
        StallReport::new(&readings, slow_by_ms, measure_from_ms, measure_to_ms)
    }

    /// The cores this process may run on, from its affinity mask.
    pub fn allowed_cores() -> Vec<usize> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call writes at most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is valid and writable and the size passed is its own.
        let result = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if result != 0 {
            return vec![0];
        }
        // SAFETY: CPU_ISSET only reads the set, for indexes within its size.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&core| unsafe { libc::CPU_ISSET(core, &set) })
            .collect()
    }
}

fn probe_core(core: usize, start_ns: u64, stop: &AtomicBool) -> CoreReading {
    let mut reading = CoreReading {
        core,
        ..CoreReading::default()
    };
    // Pinning can fail in a cpuset that excludes the core; the readings then say nothing
    // about that core, so give up on it rather than measure another.
    if pin_to_core(core).is_err() {
        return reading;
    }
    reading.realtime = go_realtime().is_ok();
    let period_ns = PERIOD.as_nanos() as u64;
    let threshold_ns = STALL_THRESHOLD.as_nanos() as u64;
    let mut deadline_ns = monotonic_ns();
    while !stop.load(Ordering::Relaxed) {
        deadline_ns += period_ns;
        sleep_until_monotonic_ns(deadline_ns);
        let now_ns = monotonic_ns();
        let late_ns = now_ns.saturating_sub(deadline_ns);
        reading.wakes += 1;
        reading.late_us.push(u32::try_from(late_ns / 1_000).unwrap_or(u32::MAX));
        if late_ns >= threshold_ns {
            let stall = Stall {
                woke_ns: now_ns.saturating_sub(start_ns),
                late_ns,
            };
            if reading.stalls.len() < STALLS_MAX {
                reading.stalls.push(stall);
            } else {
                reading.stalls_dropped += 1;
            }
            // Late past a whole period: start again from now instead of firing the missed
            // deadlines back to back, which would read as more stalls.
            deadline_ns = now_ns;
        }
    }
    reading
}

/// One core's line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct CoreStalls {
    pub core: usize,
    pub realtime: bool,
    pub wakes: u64,
    pub late_p999_us: u32,
    pub late_max_us: u32,
    pub stalls: u64,
    pub stalls_over_2ms: u64,
    pub stalls_over_5ms: u64,
    /// Sum of the stalls' lengths.
    pub stalled_ms: f64,
}

/// The probe's readings and what they explain of the run's tail.
#[derive(Clone, Debug, Serialize)]
pub struct StallReport {
    pub period_us: u64,
    pub stall_threshold_us: u64,
    pub cores: Vec<CoreStalls>,
    /// First-attempt answers slower than 5 ms in the measured span.
    pub slow_first: u64,
    /// Of those, the ones meant to be sent in a stall's window (see the module doc).
    pub slow_first_in_stall_windows: u64,
    /// The share of the measured span that the stall windows cover.
    pub stall_window_share: f64,
    /// The largest bursts of slow answers, most slow answers first, at most [`EPISODES_MAX`].
    pub episodes: Vec<Episode>,
}

/// A burst of slow answers: milliseconds of intended send time with slow first attempts, no
/// more than [`EPISODE_GAP`] apart, and the longest stall from [`COVER_BEFORE`] before it to
/// its end.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Episode {
    pub from_ms: u64,
    pub to_ms: u64,
    pub slow_first: u64,
    /// 0 when no stall came near it.
    pub longest_stall_us: u64,
}

/// Slow milliseconds closer than this belong to one episode.
pub const EPISODE_GAP: Duration = Duration::from_millis(5);
/// Episodes the report keeps.
pub const EPISODES_MAX: usize = 10;

impl StallReport {
    fn new(readings: &[CoreReading], slow_by_ms: &[u32], measure_from_ms: u64, measure_to_ms: u64) -> StallReport {
        let cores = readings.iter().map(core_line).collect();
        let mut covered = vec![false; usize::try_from(measure_to_ms).unwrap_or(0)];
        for stall in readings.iter().flat_map(|reading| &reading.stalls) {
            let from_ms = stall.began_ns().saturating_sub(COVER_BEFORE.as_nanos() as u64) / 1_000_000;
            let to_ms = (stall.woke_ns + COVER_AFTER.as_nanos() as u64).div_ceil(1_000_000);
            let span = (from_ms as usize).min(covered.len())..(to_ms as usize).min(covered.len());
            covered[span].fill(true);
        }
        let measured = (measure_from_ms as usize).min(covered.len())..covered.len();
        let mut report = StallReport {
            period_us: PERIOD.as_micros() as u64,
            stall_threshold_us: STALL_THRESHOLD.as_micros() as u64,
            cores,
            slow_first: 0,
            slow_first_in_stall_windows: 0,
            stall_window_share: 0.0,
            episodes: Vec::new(),
        };
        for ms in measured.clone() {
            let slow = u64::from(slow_by_ms.get(ms).copied().unwrap_or(0));
            report.slow_first += slow;
            if covered[ms] {
                report.slow_first_in_stall_windows += slow;
            }
        }
        let covered_ms = covered[measured.clone()].iter().filter(|&&is| is).count();
        report.stall_window_share = covered_ms as f64 / measured.len().max(1) as f64;
        report.episodes = episodes(readings, slow_by_ms, measured);
        report
    }

    /// The lines `run` prints.
    pub fn text(&self) -> String {
        let mut text = self.text_without_answers();
        text.push_str(&format!(
            "  stalls    first attempts over 5 ms: {}, of them {} ({:.1}%) meant to be sent in a stall's window; the windows cover {:.1}% of the measured time\n",
            self.slow_first,
            self.slow_first_in_stall_windows,
            100.0 * self.slow_first_in_stall_windows as f64 / self.slow_first.max(1) as f64,
            100.0 * self.stall_window_share,
        ));
        for episode in &self.episodes {
            text.push_str(&format!(
                "  stalls    burst at {}-{} ms: {} slow, longest stall near it {} µs\n",
                episode.from_ms, episode.to_ms, episode.slow_first, episode.longest_stall_us
            ));
        }
        text
    }

    /// The per-core lines alone.
    fn text_without_answers(&self) -> String {
        let mut text = String::new();
        for core in &self.cores {
            text.push_str(&format!(
                "  stalls    core {}{}: {} wakes every {} µs, late p99.9 {} µs, max {} µs; {} stalls ≥ {} µs ({} ≥ 2 ms, {} ≥ 5 ms), {:.1} ms in all\n",
                core.core,
                if core.realtime { "" } else { " (not real-time: includes scheduling delay)" },
                core.wakes,
                self.period_us,
                core.late_p999_us,
                core.late_max_us,
                core.stalls,
                self.stall_threshold_us,
                core.stalls_over_2ms,
                core.stalls_over_5ms,
                core.stalled_ms,
            ));
        }
        text
    }
}

/// The largest bursts of slow answers in `measured`, each with the longest stall near it.
fn episodes(readings: &[CoreReading], slow_by_ms: &[u32], measured: std::ops::Range<usize>) -> Vec<Episode> {
    let gap_ms = EPISODE_GAP.as_millis() as u64;
    let mut found: Vec<Episode> = Vec::new();
    for ms in measured {
        let slow = u64::from(slow_by_ms.get(ms).copied().unwrap_or(0));
        if slow == 0 {
            continue;
        }
        let ms = ms as u64;
        match found.last_mut() {
            Some(last) if ms <= last.to_ms + gap_ms => {
                last.to_ms = ms;
                last.slow_first += slow;
            }
            _ => found.push(Episode {
                from_ms: ms,
                to_ms: ms,
                slow_first: slow,
                longest_stall_us: 0,
            }),
        }
    }
    found.sort_by(|a, b| b.slow_first.cmp(&a.slow_first).then(a.from_ms.cmp(&b.from_ms)));
    found.truncate(EPISODES_MAX);
    let before_ns = COVER_BEFORE.as_nanos() as u64;
    for episode in &mut found {
        let (from_ns, to_ns) = (episode.from_ms * 1_000_000, (episode.to_ms + 1) * 1_000_000);
        episode.longest_stall_us = readings
            .iter()
            .flat_map(|reading| &reading.stalls)
            .filter(|stall| stall.woke_ns + before_ns >= from_ns && stall.began_ns() < to_ns)
            .map(|stall| stall.late_ns / 1_000)
            .max()
            .unwrap_or(0);
    }
    found
}

fn core_line(reading: &CoreReading) -> CoreStalls {
    let mut late_us = reading.late_us.clone();
    late_us.sort_unstable();
    let p999 = late_us
        .get((late_us.len() * 999 / 1000).min(late_us.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0);
    let over = |ns: u64| reading.stalls.iter().filter(|stall| stall.late_ns >= ns).count() as u64;
    CoreStalls {
        core: reading.core,
        realtime: reading.realtime,
        wakes: reading.wakes,
        late_p999_us: p999,
        late_max_us: late_us.last().copied().unwrap_or(0),
        stalls: reading.stalls.len() as u64 + reading.stalls_dropped,
        stalls_over_2ms: over(2_000_000),
        stalls_over_5ms: over(5_000_000),
        stalled_ms: reading.stalls.iter().map(|stall| stall.late_ns as f64 / 1e6).sum(),
    }
}

/// Flags of `shardgate-bench stalls`.
#[derive(Debug, Args)]
pub struct StallsArgs {
    /// How long each reading lasts (1s..=10m).
    #[arg(long, value_name = "DURATION", value_parser = crate::parse::parse_duration, default_value = "10s")]
    duration: Duration,

    /// After the idle reading, take a second one with every core kept busy by a spinning
    /// thread at the lowest priority (`SCHED_IDLE`), which the probe preempts at once.
    #[arg(long)]
    busy: bool,
}

/// `shardgate-bench stalls`: the probe alone, idle and optionally busy; prints each reading.
pub fn command(arguments: StallsArgs) -> std::process::ExitCode {
    let seconds = arguments.duration.as_secs_f64();
    if !(1.0..=600.0).contains(&seconds) {
        eprintln!("shardgate-bench: error: --duration must be between 1s and 10m");
        return std::process::ExitCode::from(2);
    }
    let cores = Probe::allowed_cores();
    let mut readings = vec![("idle", false)];
    if arguments.busy {
        readings.push(("busy", true));
    }
    for (name, busy) in readings {
        match reading(&cores, arguments.duration, busy) {
            Ok(report) => print!("stalls ({name}, {seconds:.0} s):\n{}", report.text_without_answers()),
            Err(error) => {
                eprintln!("shardgate-bench: error: cannot start the probe: {error}");
                return std::process::ExitCode::from(1);
            }
        }
    }
    std::process::ExitCode::SUCCESS
}

/// One reading of `duration`; with `busy`, a `SCHED_IDLE` spinner per core runs meanwhile.
fn reading(cores: &[usize], duration: Duration, busy: bool) -> io::Result<StallReport> {
    let stop_spinning = Arc::new(AtomicBool::new(false));
    let spinners = if busy {
        cores
            .iter()
            .map(|&core| {
                let stop = Arc::clone(&stop_spinning);
                std::thread::Builder::new()
                    .name(format!("spinner-{core}"))
                    .spawn(move || spin(core, &stop))
            })
            .collect::<io::Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let probe = Probe::start(cores, monotonic_ns());
    std::thread::sleep(duration);
    stop_spinning.store(true, Ordering::Relaxed);
    for spinner in spinners {
        let _ = spinner.join();
    }
    Ok(probe?.stop(&[], 0, duration.as_millis() as u64))
}

/// Keeps `core` busy at the lowest priority until `stop`.
fn spin(core: usize, stop: &AtomicBool) {
    if pin_to_core(core).is_err() {
        return;
    }
    let parameters = libc::sched_param { sched_priority: 0 };
    // SAFETY: `parameters` is a valid sched_param; pid 0 means the calling thread. Failing
    // leaves the spinner at normal priority, where the real-time probe still preempts it.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &parameters) };
    while !stop.load(Ordering::Relaxed) {
        std::hint::spin_loop();
    }
}

/// The run clock's start in CLOCK_MONOTONIC nanoseconds, from an `Instant` (which Linux reads
/// from that clock).
pub fn monotonic_ns_of(start: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let now_ns = monotonic_ns();
    if start >= now {
        now_ns + (start - now).as_nanos() as u64
    } else {
        now_ns.saturating_sub((now - start).as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(stalls: &[(u64, u64)]) -> CoreReading {
        CoreReading {
            core: 0,
            realtime: true,
            wakes: 1_000,
            late_us: vec![10; 1_000],
            stalls: stalls
                .iter()
                .map(|&(woke_ms, late_ms)| Stall {
                    woke_ns: woke_ms * 1_000_000,
                    late_ns: late_ms * 1_000_000,
                })
                .collect(),
            stalls_dropped: 0,
        }
    }

    // Slow answers meant to be sent around a stall count as in its window; others do not.
    #[test]
    fn slow_answers_are_set_against_stall_windows() {
        // One 3 ms stall from 497 to 500 ms: its window is 492..502 ms, 10 ms of 1 000.
        let readings = [reading(&[(500, 3)])];
        let mut slow_by_ms = vec![0u32; 1_000];
        slow_by_ms[495] = 40;
        slow_by_ms[501] = 2;
        slow_by_ms[900] = 8;
        let report = StallReport::new(&readings, &slow_by_ms, 0, 1_000);
        assert_eq!(report.slow_first, 50);
        assert_eq!(report.slow_first_in_stall_windows, 42);
        assert!(
            (report.stall_window_share - 0.010).abs() < 1e-9,
            "{}",
            report.stall_window_share
        );
        assert_eq!(report.cores[0].stalls, 1);
        assert_eq!(report.cores[0].stalls_over_2ms, 1);
        assert_eq!(report.cores[0].stalls_over_5ms, 0);
    }

    // Slow milliseconds close together make one burst, largest first, each with the longest
    // stall near it.
    #[test]
    fn bursts_are_found_and_matched_to_stalls() {
        let readings = [reading(&[(502, 3), (800, 1)])];
        let mut slow_by_ms = vec![0u32; 1_000];
        for ms in [500, 503, 507] {
            slow_by_ms[ms] = 10;
        }
        slow_by_ms[700] = 50;
        let report = StallReport::new(&readings, &slow_by_ms, 0, 1_000);
        assert_eq!(
            report.episodes,
            vec![
                Episode {
                    from_ms: 700,
                    to_ms: 700,
                    slow_first: 50,
                    longest_stall_us: 0
                },
                Episode {
                    from_ms: 500,
                    to_ms: 507,
                    slow_first: 30,
                    longest_stall_us: 3_000
                },
            ]
        );
    }

    // Answers before the measured span (the warmup) are left out, and windows past the end are cut.
    #[test]
    fn only_the_measured_span_counts() {
        let readings = [reading(&[(100, 2), (1_000, 1)])];
        let mut slow_by_ms = vec![0u32; 1_000];
        slow_by_ms[99] = 5;
        slow_by_ms[600] = 1;
        let report = StallReport::new(&readings, &slow_by_ms, 500, 1_000);
        assert_eq!(report.slow_first, 1, "the warmup's slow answers are not counted");
        assert_eq!(report.slow_first_in_stall_windows, 0);
        // The stall at 999-1000 ms covers 994..1000 of the 500 measured milliseconds.
        assert!(
            (report.stall_window_share - 6.0 / 500.0).abs() < 1e-9,
            "{}",
            report.stall_window_share
        );
    }

    // A probe thread on this machine wakes, and reports each core it was given.
    #[test]
    fn the_probe_wakes_and_reports() {
        let start_ns = monotonic_ns_of(std::time::Instant::now());
        let probe = Probe::start(&[0], start_ns).expect("a thread starts");
        std::thread::sleep(Duration::from_millis(50));
        let report = probe.stop(&[], 0, 50);
        assert_eq!(report.cores.len(), 1);
        // A stalled machine may let it wake only a few times in 50 ms, never not at all.
        assert!(report.cores[0].wakes >= 1, "{:?}", report.cores[0]);
        assert_eq!(report.slow_first, 0);
    }
}
