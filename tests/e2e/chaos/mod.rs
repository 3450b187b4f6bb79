//! Proves that under a seeded storm of faults every acked event is stored exactly once, nothing else is stored, RSS stays bounded and nothing panics.
//!
//! A soak in the spirit of TigerBeetle's VOPR. One seed drives everything the test decides:
//! the fault schedule (Redis SIGKILL + AOF restart, Redis SIGSTOP/SIGCONT, `CLIENT PAUSE`
//! ALL or WRITE, server SIGTERM + drain + restart on the same ports, cut client TCP
//! connections with FIN or RST, garbage over UDP and TCP), the events, how many copies of
//! each go out and on which of the client's UDP sockets and TCP connections (so copies cross
//! shards and transports), the late duplicates of old events, and the garbage bytes. The
//! client behaves like a real one: it resends every copy that got RETRY (with exponential
//! backoff and jitter) or no answer, and reconnects when its connection breaks, until each
//! copy is answered ACCEPTED or DUPLICATE.
//!
//! After the fault phase the faults stop, the client resolves everything outstanding (with
//! a deadline), the server is stopped with SIGTERM, and the test checks:
//! 1. every event acked ACCEPTED or DUPLICATE is in the streams exactly once, with the bytes
//!    that were sent; no event is ACCEPTED twice;
//! 2. nothing else is stored: no id twice, no id that was never sent as a valid frame (the
//!    garbage), no stream outside `sg:{0..16}:events`; an event sent but never acked may be
//!    stored, at most once;
//! 3. the server's RSS (VmRSS and VmHWM from /proc, sampled through every incarnation)
//!    stayed under [`RSS_BOUND_BYTES`];
//! 4. no incarnation printed "panicked", each exited 0 on SIGTERM within its drain bound, and
//!    garbage was only ever answered REJECTED, and only for a frame whose crc matched, by
//!    that frame's id (protocol revision 2: a bad crc is never answered).
//!
//! A server that stops answering (no ack for [`STALL_LIMIT`]), dies, or does not exit after
//! SIGTERM fails the test with a message; every wait has a deadline.
//!
//! # Running it
//! - `cargo test --test e2e chaos:: -- --nocapture`: the default fault phase is
//!   [`CHAOS_SECS_DEFAULT`] seconds, about 2 minutes in all with warm-up, settling and checks.
//! - `SHARDGATE_CHAOS_SECS=600`: a longer soak (the fault phase in seconds).
//! - `SHARDGATE_CHAOS_SEED=N`: replay a seed (otherwise a random one, always printed). A
//!   failure prints the seed, the planned schedule and the journal of what was done when;
//!   `SHARDGATE_CHAOS_SEED=N SHARDGATE_CHAOS_SECS=S cargo test --test e2e chaos:: -- --nocapture`
//!   runs the same schedule, load and garbage again. Thread interleavings and kernel timing
//!   are not under the seed's control, so a replay reproduces the storm, not every race.

mod checks;
mod schedule;
mod world;

use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use checks::Finished;
use schedule::{plan, print_schedule, Journal, Planned};
use world::{
    execute, run_channel, run_generator, tail, AbortOnDrop, ChannelReport, GarbageSender, Gate, Link, Load, Phase,
    RedisPhase, RedisSide, Rss,
};

/// Length of the fault phase when `SHARDGATE_CHAOS_SECS` is not set.
const CHAOS_SECS_DEFAULT: u64 = 75;
/// Load without faults before the first one, so Redis is connected and acks flow.
const WARMUP_MS: u64 = 2_000;
/// No fault starts in the last second of the fault phase.
const QUIET_TAIL_MS: u64 = 1_000;
/// Fresh events per second (all channels). With copies, late duplicates and resends the
/// server sees roughly twice as many frames: modest for a debug build on 2 shared cores.
const RATE_PER_SEC: f64 = 400.0;
const UDP_CHANNELS: usize = 4;
const TCP_CHANNELS: usize = 2;
/// Valid events use players `PLAYER_BASE..PLAYER_BASE + PLAYERS` and a unique seq each.
const PLAYER_BASE: u64 = 40_000_000;
const PLAYERS: u64 = 211;
/// Garbage that does not reuse a real event's id uses players from here: never valid.
const GARBAGE_PLAYER_BASE: u64 = 9_000_000_000;
const MAX_PAYLOAD: usize = 96;
const PARTITIONS: u64 = 16;
/// Each shard's dedup cache: 2048 requested is 512 buckets of 7 ids, 3584 ids in 64 KiB.
/// Far fewer than the events of a run, so the cache evicts all the time, late duplicates
/// must be caught by the Redis marker, and the RSS bound below means something.
const DEDUP_CAPACITY: usize = 2048;
const DRAIN_TIMEOUT_MS: u64 = 2_000;
const REDIS_TIMEOUT_MS: u64 = 1_000;
/// SIGTERM to exit: the drain bound, the server's 500 ms connection flush, and slack for a
/// debug build on a loaded machine. Past it the server is wedged.
const EXIT_TIMEOUT: Duration = Duration::from_millis(DRAIN_TIMEOUT_MS + 8_000);
/// After the faults stop, how long every outstanding copy may take to be resolved.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);
/// No fault lasts more than a few seconds; no ACCEPTED/DUPLICATE at all for this long while
/// copies are outstanding means the server (or the test) is wedged.
const STALL_LIMIT: Duration = Duration::from_secs(25);
/// A UDP copy with no answer in this long is sent again (the longest legitimate wait for
/// an answer is a Redis call's timeout plus the linger).
const UDP_ACK_TIMEOUT: Duration = Duration::from_millis(2_000);
/// On TCP an answer is lost only with the connection; this is the safety net.
const TCP_ACK_TIMEOUT: Duration = Duration::from_millis(4_000);
const UDP_WINDOW: usize = 64;
const TCP_WINDOW: usize = 128;
const BACKOFF_BASE: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1_000);
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The server's resident memory (VmRSS, and the peak VmHWM) must stay under this, in every
/// incarnation. What it holds is bounded by construction: per shard a 64 KiB dedup table
/// (`DEDUP_CAPACITY`), 9 batches of at most 256 events with their blobs, the in-flight set,
/// a 40 KiB outbox per TCP connection (a handful here), glommio's io_uring rings and
/// buffers, the Redis client's queues; plus the histograms and a debug build's code. This
/// workload measures 38-45 MiB. 96 MiB is about twice that: room for allocator and page
/// cache noise, while a queue that grows during an outage (Redis down, frames piling up)
/// or a per-event leak over the tens of thousands of events shows.
const RSS_BOUND_BYTES: u64 = 96 << 20;

/// Locks, ignoring poisoning: a panicking thread must not hide the report.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// the test
// ---------------------------------------------------------------------------------------

fn chaos_seed() -> u64 {
    match std::env::var("SHARDGATE_CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SHARDGATE_CHAOS_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

fn chaos_secs() -> u64 {
    match std::env::var("SHARDGATE_CHAOS_SECS") {
        Ok(s) => {
            let secs: u64 = s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("SHARDGATE_CHAOS_SECS={s:?} is not a number of seconds"));
            assert!(secs >= 5, "SHARDGATE_CHAOS_SECS={secs}: at least 5");
            secs
        }
        Err(_) => CHAOS_SECS_DEFAULT,
    }
}

// One seed drives Redis crashes, stalls and pauses, server restarts, cut connections and
// garbage under duplicate-heavy UDP+TCP load; acked events are stored exactly once.
#[test]
fn chaos_soak_acked_events_stored_exactly_once() {
    let _turn = take_turn(module_path!());
    let seed = chaos_seed();
    let secs = chaos_secs();
    let replay =
        format!("SHARDGATE_CHAOS_SEED={seed} SHARDGATE_CHAOS_SECS={secs} cargo test --test e2e chaos:: -- --nocapture");
    println!("e2e_chaos: seed {seed}, fault phase {secs} s; replay with {replay}");
    let mut master = StdRng::seed_from_u64(seed);
    let schedule = plan(&mut StdRng::seed_from_u64(master.gen()), secs * 1000);
    let journal = Journal::new();
    let started = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| soak(seed, &mut master, secs, &schedule, &journal)));
    match outcome {
        Ok(_summary) => {}
        Err(e) => {
            println!(
                "\n======== e2e_chaos FAILED: seed {seed} after {:?} ========",
                started.elapsed()
            );
            print_schedule(&schedule);
            println!("journal (what was done, s after load start):");
            for l in lock(&journal.lines).iter() {
                println!("  {l}");
            }
            println!("faults done: {}", journal.counts_line());
            println!("replay with: {replay}");
            println!("======== e2e_chaos FAILED: seed {seed} ========\n");
            panic::resume_unwind(e);
        }
    }
}

/// The whole run; returns the summary line, panics with every problem found.
fn soak(seed: u64, master: &mut StdRng, secs: u64, schedule: &[Planned], journal: &Journal) -> String {
    let run_started = Instant::now();
    let chaos = Duration::from_secs(secs);
    // Markers must outlive the run: an expired marker would let a late copy be appended again.
    let dedup_window_secs = (2 * secs + 600).max(600);
    let redis = RedisServer::start_with_aof_on_port(free_port_outside_ephemeral());
    let port = free_port_outside_ephemeral();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut gate = Gate {
        redis_url: redis.url(),
        udp: addr,
        tcp: addr,
        dedup_window_secs,
        current: None,
        phase: Phase::Down {
            start_at: Instant::now(),
        },
        retired: Vec::new(),
        restart_pending: None,
        exit_problems: Vec::new(),
        rss: Rss::default(),
        last_sample: Instant::now(),
        scanned: 0,
    };
    let mut redis = RedisSide {
        redis,
        phase: RedisPhase::Up,
        pause_until: None,
    };
    journal.restart_clock();
    gate.bring_up(journal);

    // the client
    let n_chans = UDP_CHANNELS + TCP_CHANNELS;
    let load = Arc::new(Load {
        events: Mutex::new(Vec::new()),
        stop_gen: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        outstanding: AtomicUsize::new(0),
        copies: AtomicUsize::new(0),
        started: Instant::now(),
        last_progress_ms: AtomicU64::new(0),
        cut_requests: (0..TCP_CHANNELS).map(|_| AtomicU64::new(0)).collect(),
        cut_reset: (0..TCP_CHANNELS).map(|_| AtomicBool::new(false)).collect(),
        hard_deadline: Instant::now() + chaos + SETTLE_TIMEOUT + Duration::from_secs(60),
    });
    let _abort_guard = AbortOnDrop(load.clone());
    let mut inboxes = Vec::new();
    let mut channels: Vec<JoinHandle<ChannelReport>> = Vec::new();
    for ch in 0..n_chans {
        let (tx, rx) = mpsc::channel();
        inboxes.push(tx);
        let (name, link) = if ch < UDP_CHANNELS {
            (format!("udp{ch}"), Link::Udp(UdpClient::new(addr)))
        } else {
            let index = ch - UDP_CHANNELS;
            (
                format!("tcp{index}"),
                Link::Tcp {
                    addr,
                    index,
                    conn: None,
                    cuts_seen: 0,
                },
            )
        };
        let load = load.clone();
        let seed = master.gen();
        channels.push(thread::spawn(move || run_channel(name, link, rx, load, seed)));
    }
    let generator = {
        let load = load.clone();
        let seed = master.gen();
        thread::spawn(move || run_generator(load, inboxes, seed))
    };
    journal.log(format!(
        "load started: {RATE_PER_SEC}/s fresh events on {UDP_CHANNELS} UDP sockets + {TCP_CHANNELS} TCP \
         connections; server pid {} on {addr}; redis {}",
        gate.pid().unwrap_or(0),
        redis.redis.url()
    ));
    let mut garbage = GarbageSender::new(addr);

    // the fault phase
    let mut next = 0;
    while journal.elapsed() < chaos {
        let now_ms = journal.elapsed().as_millis() as u64;
        redis.tick(journal, false);
        gate.tick(journal);
        while next < schedule.len() && schedule[next].at_ms <= now_ms {
            let fault = schedule[next].fault.clone();
            next += 1;
            execute(&fault, &mut redis, &mut gate, &mut garbage, &load, journal);
        }
        garbage.poll();
        if let Some(i) = channels.iter().position(|h| h.is_finished()) {
            let h = channels.remove(i);
            h.join().unwrap_or_else(|e| panic::resume_unwind(e));
            panic!("client channel {i} stopped during the fault phase");
        }
        if load.outstanding.load(Ordering::SeqCst) > 0 && load.since_progress() > STALL_LIMIT {
            panic!(
                "no event was answered ACCEPTED/DUPLICATE for {:?} with {} copies outstanding: server wedged? \
                 server stderr (last 30 lines):\n{}",
                load.since_progress(),
                load.outstanding.load(Ordering::SeqCst),
                gate.current
                    .as_ref()
                    .map(|s| tail(&s.stderr_lines(), 30))
                    .unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }

    // faults off: everything back up, no new events, everything outstanding resolves
    journal.log("fault phase over: ending the faults still on, stopping new events");
    redis.tick(journal, true);
    gate.ensure_running(journal);
    load.stop_gen.store(true, Ordering::Relaxed);
    let gen_report = generator.join().unwrap_or_else(|e| panic::resume_unwind(e));
    let settle_started = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    loop {
        let outstanding = load.outstanding.load(Ordering::SeqCst);
        if outstanding == 0 {
            journal.log(format!(
                "all copies resolved {:?} after the faults stopped",
                settle_started.elapsed()
            ));
            break;
        }
        if settle_started.elapsed() > SETTLE_TIMEOUT {
            problems.push(format!(
                "{outstanding} copies still unresolved {SETTLE_TIMEOUT:?} after the faults stopped (server wedged?); \
                 server stderr (last 30 lines):\n{}",
                gate.current
                    .as_ref()
                    .map(|s| tail(&s.stderr_lines(), 30))
                    .unwrap_or_default()
            ));
            journal.log(format!("settle deadline passed with {outstanding} copies unresolved"));
            break;
        }
        gate.tick(journal);
        garbage.poll();
        thread::sleep(Duration::from_millis(20));
    }
    load.abort.store(true, Ordering::Relaxed);
    let join_deadline = Instant::now() + Duration::from_secs(10);
    while channels.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < join_deadline,
            "client channels did not stop within 10 s"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let reports: Vec<ChannelReport> = channels
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|e| panic::resume_unwind(e)))
        .collect();
    let garbage_deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < garbage_deadline {
        garbage.poll();
    }

    // a last clean stop, so every incarnation's log is complete
    gate.sigterm(0, journal);
    let stop_deadline = Instant::now() + EXIT_TIMEOUT + Duration::from_secs(1);
    while matches!(gate.phase, Phase::Draining { .. }) {
        assert!(Instant::now() < stop_deadline, "final SIGTERM: state machine stuck");
        gate.tick(journal);
        thread::sleep(Duration::from_millis(10));
    }

    // ---- checks
    checks::check(Finished {
        seed,
        secs,
        run_started,
        journal,
        load: &load,
        reports,
        gen_report,
        redis: &redis.redis,
        gate: &mut gate,
        garbage: &garbage,
        problems,
    })
}
