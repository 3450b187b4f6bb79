//! Proves a rolling restart under load loses nothing: a new process joins the old one's
//! SO_REUSEPORT groups on the same UDP and TCP port, gets UDP datagrams while both run, and
//! the old one, on SIGTERM, leaves the groups, drains and exits 0; done twice (A to B to C)
//! under continuous UDP and TCP load from resending clients, every event acked ACCEPTED or
//! DUPLICATE is in Redis exactly once, and no event is left unresolved.
//!
//! The old and the new process run different shard counts (`CORES`), so the spreading program
//! is sized by the group, not by one process. The load is `LOADERS` threads, each running `deliver_all` on chunks of fresh events back to
//! back (two UDP sockets and a TCP connection each, one or two copies per event), so frames
//! are in flight at every moment of both handovers. A frame that reached the old process's
//! socket after it stopped reading gets no answer and is resent after `UDP_ACK_TIMEOUT`; a
//! TCP connection the old process closes is reconnected, to the new one, and its unanswered
//! frames resent. The seed (printed; `SHARDGATE_TEST_SEED=N` replays the events) decides the
//! events, their copies and channels; the kernel's timing is not under its control.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The processes' cores, in start order: two shards, then one, then two, so the group is
/// counted across processes of different sizes (3 sockets while A and B both serve).
const CORES: [&str; 3] = ["0,1", "0", "0,1"];
const HANDOVERS: usize = 2;
const _: () = assert!(CORES.len() == HANDOVERS + 1, "one core list per process");
const LOADERS: usize = 2;
/// Events per `deliver_all` call of one loader: a chunk takes a few hundred milliseconds on a
/// debug build, so the gaps between chunks are short against the handovers.
const CHUNK_EVENTS: usize = 1_500;
const MAX_PAYLOAD: usize = 64;
const PARTITIONS: u64 = 16;
const DRAIN_TIMEOUT_MS: u64 = 2_000;
/// A UDP frame without an answer this long is resent: frames the old process never read.
const UDP_ACK_TIMEOUT: Duration = Duration::from_millis(300);
/// Both processes serve for this long before the old one is told to stop.
const OVERLAP: Duration = Duration::from_millis(1_500);
/// The new process serves alone for this long before the next handover or the end.
const SETTLE: Duration = Duration::from_millis(1_500);
/// Bound on one chunk's delivery, resends included.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// One loader's results: every event it sent, and every chunk's delivery report.
struct LoaderResult {
    events: Vec<Event>,
    reports: Vec<DeliveryReport>,
}

/// Delivers chunks of fresh events until `stop` is set, then finishes the chunk under way.
fn run_loader(loader: usize, seed: u64, udp: SocketAddr, tcp: SocketAddr, stop: Arc<AtomicBool>) -> LoaderResult {
    let mut rng = StdRng::seed_from_u64(seed ^ (loader as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut result = LoaderResult {
        events: Vec::new(),
        reports: Vec::new(),
    };
    let mut chunk = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Players are distinct per loader and chunk, so every event id is fresh.
        let player_base = 1_000_000 * (loader as u64 + 1) + 1_000 * chunk;
        let events: Vec<Event> = (0..CHUNK_EVENTS)
            .map(|index| {
                let player = player_base + (index % 100) as u64;
                Event::random(&mut rng, player, index as u64, MAX_PAYLOAD)
            })
            .collect();
        let report = deliver_all(
            udp,
            tcp,
            &events,
            &DeliverOpts {
                seed: seed ^ chunk,
                udp_sockets: 2,
                tcp_conns: 1,
                min_copies: 1,
                max_copies: 2,
                udp_ack_timeout: UDP_ACK_TIMEOUT,
                tcp_ack_timeout: Duration::from_secs(3),
                total_timeout: CHUNK_TIMEOUT,
                ..DeliverOpts::default()
            },
        );
        result.events.extend(events);
        result.reports.push(report);
        chunk += 1;
    }
    result
}

fn start_process(redis: &RedisServer, address: SocketAddr, cores: &str) -> Server {
    Server::builder(&redis.url())
        .cores(cores)
        .arg("--udp", address)
        .arg("--tcp", address)
        .arg("--drain-timeout-ms", DRAIN_TIMEOUT_MS)
        .arg("--metrics", "127.0.0.1:0")
        // Every client is 127.0.0.1: one source, which the per-source limit would throttle.
        .arg("--udp-source-frames-per-sec", 10_000_000)
        .arg("--udp-source-burst-frames", 1_000_000)
        .start()
}

fn scrape(server: &Server, name: &str, filter: &[(&str, &str)]) -> u64 {
    metric_sum(&scrape_metrics(serving_metrics_address(server)), name, filter)
}

/// Two handovers under UDP and TCP load: the successor takes UDP datagrams while both serve,
/// takes the TCP connections after the old one stops, every old process exits 0, and Redis
/// holds every acked event exactly once with nothing left unresolved.
#[test]
fn two_handovers_under_load_store_every_acked_event_once() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("two_handovers_under_load_store_every_acked_event_once");
    let redis = RedisServer::start();
    let port = free_port_outside_ephemeral();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    let started_us = unix_us();
    let mut current = start_process(&redis, address, CORES[0]);
    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..LOADERS)
        .map(|loader| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || run_loader(loader, seed, address, address, stop))
        })
        .collect();
    thread::sleep(SETTLE);
    let mut journal = Vec::new();
    for (handover, cores) in CORES.iter().enumerate().skip(1) {
        let successor = start_process(&redis, address, cores);
        thread::sleep(OVERLAP);
        let udp_while_both = scrape(&successor, "shardgate_frames_received_total", &[("transport", "udp")]);
        assert!(
            udp_while_both > 0,
            "seed {seed}, handover {handover}: the new process got no UDP frame in {OVERLAP:?} beside the old one"
        );
        let signalled = Instant::now();
        current.terminate();
        let status = current.wait_exit(Duration::from_millis(DRAIN_TIMEOUT_MS + 10_000));
        let drained_in = signalled.elapsed();
        current.wait_output(Duration::from_secs(2));
        let lines = current.stderr_lines();
        assert!(
            status.success(),
            "seed {seed}, handover {handover}: the old process exited {status}; stderr:\n{}",
            lines.join("\n")
        );
        assert!(
            lines.iter().any(|line| line.contains("left the group before draining")),
            "seed {seed}, handover {handover}: the old process did not leave the UDP group; stderr:\n{}",
            lines.join("\n")
        );
        assert!(
            lines.iter().any(|line| line.starts_with("shardgate: stopped")),
            "seed {seed}, handover {handover}: no stopped line; stderr:\n{}",
            lines.join("\n")
        );
        current = successor;
        thread::sleep(SETTLE);
        let tcp_accepted = scrape(&current, "shardgate_tcp_connections_accepted_total", &[]);
        assert!(
            tcp_accepted > 0,
            "seed {seed}, handover {handover}: no TCP connection reached the new process"
        );
        journal.push(format!(
            "handover {handover}: new process had {udp_while_both} udp frames while both served; \
             old drained and exited in {drained_in:?}; new accepted {tcp_accepted} tcp connections"
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<LoaderResult> = loaders
        .into_iter()
        .map(|loader| loader.join().expect("loader thread"))
        .collect();
    current.terminate();
    let status = current.wait_exit(Duration::from_millis(DRAIN_TIMEOUT_MS + 10_000));
    assert!(status.success(), "seed {seed}: the last process exited {status}");
    let ended_us = unix_us();

    let mut events = Vec::new();
    let mut acked: HashSet<Key> = HashSet::new();
    let mut chunks = 0;
    for result in &results {
        for report in &result.reports {
            chunks += 1;
            let unresolved = report.unresolved();
            assert!(
                unresolved.is_empty(),
                "seed {seed}: {} events unresolved, e.g. {:?}; {}\n{}",
                unresolved.len(),
                &unresolved[..unresolved.len().min(5)],
                report.summary(),
                journal.join("\n")
            );
            assert!(
                report.foreign_acks.is_empty(),
                "seed {seed}: answers for ids never sent: {}",
                report.summary()
            );
            assert_eq!(
                report.counts.rejected,
                0,
                "seed {seed}: valid events were REJECTED: {}",
                report.summary()
            );
            acked.extend(report.stored_keys());
        }
        events.extend(result.events.iter().cloned());
    }
    let timeouts: usize = results
        .iter()
        .flat_map(|result| &result.reports)
        .map(|report| report.timeouts)
        .sum();
    let reconnects: usize = results
        .iter()
        .flat_map(|result| &result.reports)
        .map(|report| report.reconnects)
        .sum();
    let context = format!(
        "seed {seed}: {} events in {chunks} chunks, {timeouts} resends after no answer, {reconnects} reconnects\n{}",
        events.len(),
        journal.join("\n")
    );
    println!("{context}");
    assert!(chunks >= LOADERS * 2, "{context}: the load did not span the handovers");
    assert_eq!(
        acked.len(),
        events.len(),
        "{context}: every event resolved, so every one was acked"
    );
    let stored = read_events(&mut redis.connection(), "sg", PARTITIONS);
    check_stored(
        &stored,
        &events,
        &acked,
        PARTITIONS,
        Some((started_us, ended_us)),
        &context,
    );
}
