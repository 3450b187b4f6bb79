//! Proves graceful shutdown: on SIGTERM or SIGINT under load the server drains, answers,
//! exits 0 within the drain timeout, loses nothing it acked, and writes its HDR histogram.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

const DRAIN_MS: u64 = 2000;

/// Runs load, sends `sig` mid-run, and checks exit, Redis contents and the HDR file.
fn shutdown_under_load(sig: Signal, seed: u64, cores: &str, load_for: Duration) {
    let redis = RedisServer::start();
    let mut server = Server::builder(&redis.url())
        .cores(cores)
        .arg("--drain-timeout-ms", DRAIN_MS)
        .start();
    let fire = Firehose::start(
        server.udp_addr(),
        server.tcp_addr(),
        &FirehoseOpts {
            seed,
            rate_per_sec: 3000,
            dup_percent: 10,
            ..FirehoseOpts::default()
        },
    );
    thread::sleep(load_for);
    let answered_before = fire.counts_so_far();
    let signalled = Instant::now();
    server.signal(sig);
    // Keep sending while it drains; the exit must come within the drain timeout + margin.
    let status = server.wait_exit(Duration::from_millis(DRAIN_MS + 5000));
    let took = signalled.elapsed();
    let result = fire.stop(Duration::from_millis(300));
    let ctx = format!(
        "seed {seed}; {sig} -> {status} after {took:?}; firehose {}",
        result.summary()
    );
    println!("{ctx}");
    assert!(
        status.success(),
        "exit status not 0: {ctx}\nstderr:\n{}",
        server.stderr_lines().join("\n")
    );
    assert!(
        answered_before.accepted > 0,
        "nothing ACCEPTED before the signal; {ctx}"
    );
    let lines = server.stderr_lines();
    assert!(
        lines.iter().any(|l| l.starts_with("shardgate: stopped")),
        "no `shardgate: stopped` line: {lines:?}"
    );

    // Every event acked ACCEPTED/DUPLICATE (before or during the drain) is in Redis, once.
    let acked = result.stored_keys();
    let stored = read_events(&mut redis.connection(), "sg", 16);
    let stored_keys = check_stored(&stored, &result.events, &acked, 16, None, &ctx);
    // No resends here, so an id has at most one ACCEPTED answer.
    let mut accepted: HashMap<Key, usize> = HashMap::new();
    for (k, v) in &result.answers {
        accepted.insert(*k, v.iter().filter(|s| **s == St::Accepted).count());
    }
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ACCEPTED twice: {twice:?}; {ctx}");
    // The drain answers every copy it took in: a stored event got an answer (unless that answer
    // was lost at a client socket, which the drop counter would show). The answer is usually
    // ACCEPTED, but may be RETRY (a call abandoned at the drain deadline, or timed out, that
    // Redis ran anyway) or DUPLICATE (the Redis client resent a call whose reply it lost): both
    // are correct, since a resend of that copy gets DUPLICATE.
    let unanswered: Vec<&Key> = stored_keys
        .iter()
        .filter(|k| result.answers.get(k).is_none_or(|answers| answers.is_empty()))
        .collect();
    if result.udp_client_drops == 0 {
        assert!(
            unanswered.is_empty(),
            "{} events were stored but never answered, e.g. {:?}; {ctx}",
            unanswered.len(),
            &unanswered[..unanswered.len().min(5)]
        );
    }

    // The merged intake-to-ack histogram.
    let hdr = server.hdr_path().to_path_buf();
    let text = std::fs::read_to_string(&hdr).unwrap_or_else(|e| panic!("HDR file {} not written: {e}", hdr.display()));
    let summary = parse_hdr_percentiles(&text)
        .unwrap_or_else(|e| panic!("HDR file {} does not parse: {e}\n{text}", hdr.display()));
    println!("hdr: {summary:?}");
    assert!(summary.total_count > 0, "HDR total count is 0:\n{text}");
}

// SIGTERM under UDP+TCP load on 2 shards: exit 0 within the drain timeout, nothing acked is
// lost, the HDR file parses with a non-zero count.
#[test]
fn sigterm_under_load_drains_and_exits_0() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("sigterm_under_load_drains_and_exits_0");
    shutdown_under_load(Signal::SIGTERM, seed, "0,1", Duration::from_millis(1500));
}

// SIGINT behaves like SIGTERM.
#[test]
fn sigint_under_load_drains_and_exits_0() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("sigint_under_load_drains_and_exits_0");
    shutdown_under_load(Signal::SIGINT, seed, "0", Duration::from_millis(800));
}

// An idle server exits 0 promptly on SIGTERM and still writes a parseable HDR file.
#[test]
fn idle_sigterm_exits_promptly() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let mut server = Server::builder(&redis.url()).start();
    let t = Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    println!("idle shutdown took {:?}", t.elapsed());
    let text = std::fs::read_to_string(server.hdr_path()).expect("HDR file");
    parse_hdr_percentiles(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
}
