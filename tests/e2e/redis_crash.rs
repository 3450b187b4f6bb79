//! Proves ack-after-durable-write through Redis failures: what was acked survives a Redis
//! SIGKILL and restart, nothing is stored twice, and outages are answered RETRY.

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Final checks shared by the outage tests: `answers` is every answer seen during the run,
/// `resolve` the follow-up delivery of every event.
fn check_after_outage(
    redis: &RedisServer,
    events: &[Event],
    answers: &HashMap<Key, Vec<St>>,
    resolve: &DeliveryReport,
    ctx: &str,
) {
    let acked: HashSet<Key> = answers
        .iter()
        .filter(|(_, v)| v.iter().any(|s| s.is_stored()))
        .map(|(k, _)| *k)
        .collect();
    let unresolved = resolve.unresolved();
    assert!(
        unresolved.is_empty(),
        "{ctx}: {} events still unresolved after the outage, e.g. {:?}; {}",
        unresolved.len(),
        &unresolved[..unresolved.len().min(5)],
        resolve.summary()
    );
    assert!(resolve.foreign_acks.is_empty(), "{ctx}: acks for ids never sent");
    // An event acked stored before may only be answered DUPLICATE now: an ACCEPTED would be
    // a second append (its marker was lost while its event was kept, or the ack was a lie).
    let mut reaccepted: Vec<Key> = acked
        .iter()
        .filter(|k| resolve.answers.get(k).is_some_and(|v| v.contains(&St::Accepted)))
        .copied()
        .collect();
    reaccepted.sort();
    assert!(
        reaccepted.is_empty(),
        "{ctx}: {} events acked ACCEPTED/DUPLICATE during the run were ACCEPTED again after \
         the restart, e.g. {:?}",
        reaccepted.len(),
        &reaccepted[..reaccepted.len().min(5)]
    );
    let mut conn = redis.connection();
    let stored = read_events(&mut conn, "sg", 16);
    // Every event ever acked stored is there, exactly once; and after resolving, all are.
    check_stored(&stored, events, &acked, 16, None, ctx);
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    check_stored(&stored, events, &all, 16, None, ctx);
    assert_eq!(stored.len(), events.len(), "{ctx}");
    // ACCEPTED means a new append: never more than one per id over the whole run.
    let mut per_key: HashMap<Key, usize> = HashMap::new();
    for (k, v) in answers.iter().chain(resolve.answers.iter()) {
        *per_key.entry(*k).or_default() += v.iter().filter(|s| **s == St::Accepted).count();
    }
    let twice: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{ctx}: ACCEPTED more than once: {twice:?}");
}

// Redis (AOF, fsync always) is SIGKILLed under steady load and restarted: RETRY is answered
// meanwhile, every event acked ACCEPTED/DUPLICATE at any time is stored, none twice.
#[test]
fn acked_events_survive_redis_kill_and_restart() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("acked_events_survive_redis_kill_and_restart");
    let mut redis = RedisServer::start_with_aof();
    let server = Server::builder(&redis.url())
        .cores("0,1")
        .arg("--redis-timeout-ms", "300")
        .start();
    let fire = Firehose::start(
        server.udp_addr(),
        server.tcp_addr(),
        &FirehoseOpts {
            seed,
            rate_per_sec: 1500,
            dup_percent: 15,
            ..FirehoseOpts::default()
        },
    );
    thread::sleep(Duration::from_millis(1500));
    let before = fire.counts_so_far();
    redis.kill();
    let killed_at = Instant::now();
    thread::sleep(Duration::from_millis(1200));
    let during = fire.counts_so_far();
    redis.restart();
    println!("redis down for {:?}", killed_at.elapsed());
    thread::sleep(Duration::from_millis(1500));
    let result = fire.stop(Duration::from_millis(1500));
    let ctx = format!("seed {seed}; firehose {}", result.summary());
    println!("{ctx}");
    assert!(
        before.accepted > 0,
        "nothing was ACCEPTED before the kill: {before:?}; {ctx}"
    );
    assert!(
        during.retry > before.retry,
        "no RETRY answered while Redis was down (before {before:?}, during {during:?}); {ctx}"
    );
    assert!(
        result.counts.accepted > during.accepted,
        "nothing ACCEPTED after the restart; {ctx}"
    );

    let resolve = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &result.events,
        &DeliverOpts {
            seed: seed ^ 1,
            udp_sockets: 3,
            tcp_conns: 2,
            total_timeout: Duration::from_secs(30),
            ..DeliverOpts::default()
        },
    );
    println!("resolve: {}", resolve.summary());
    check_after_outage(&redis, &result.events, &result.answers, &resolve, &ctx);
}

// Redis stalls (SIGSTOP) under load: writes time out as RETRY, and after SIGCONT everything
// resolves with each event stored once (a timed-out write that landed is DUPLICATE).
#[test]
fn redis_stall_answers_retry_then_recovers() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("redis_stall_answers_retry_then_recovers");
    let redis = RedisServer::start_with_aof();
    let server = Server::builder(&redis.url()).arg("--redis-timeout-ms", "250").start();
    let fire = Firehose::start(
        server.udp_addr(),
        server.tcp_addr(),
        &FirehoseOpts {
            seed,
            rate_per_sec: 800,
            dup_percent: 10,
            player_base: 2_000_000,
            ..FirehoseOpts::default()
        },
    );
    thread::sleep(Duration::from_millis(1000));
    let before = fire.counts_so_far();
    redis.pause();
    thread::sleep(Duration::from_millis(1500));
    let during = fire.counts_so_far();
    redis.resume();
    thread::sleep(Duration::from_millis(1500));
    let result = fire.stop(Duration::from_millis(1500));
    let ctx = format!("seed {seed}; firehose {}", result.summary());
    println!("{ctx}");
    assert!(
        during.retry > before.retry,
        "no RETRY while Redis was stalled (before {before:?}, during {during:?}); {ctx}"
    );
    let resolve = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &result.events,
        &DeliverOpts {
            seed: seed ^ 1,
            total_timeout: Duration::from_secs(30),
            ..DeliverOpts::default()
        },
    );
    println!("resolve: {}", resolve.summary());
    check_after_outage(&redis, &result.events, &result.answers, &resolve, &ctx);
}

// The server starts while nothing listens at its Redis address, answers RETRY, and once a
// Redis comes up there the same events are ACCEPTED within a bounded time.
#[test]
fn starts_without_redis_then_accepts_when_it_appears() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("starts_without_redis_then_accepts_when_it_appears");
    let mut rng = StdRng::seed_from_u64(seed);
    let port = free_port();
    let server = Server::builder(&format!("redis://127.0.0.1:{port}"))
        .cores("0,1")
        .start();
    let events: Vec<Event> = (0..60)
        .map(|i| Event::random(&mut rng, 3_000_000 + i % 9, i, 200))
        .collect();

    // Each event once, over UDP and TCP: every answer is RETRY.
    let mut udp = UdpClient::new(server.udp_addr());
    let mut tcp = TcpClient::connect(server.tcp_addr()).expect("connect");
    for (i, e) in events.iter().enumerate() {
        if i % 2 == 0 {
            udp.send_frames(&e.frame());
        } else {
            tcp.send(&e.frame()).expect("tcp write");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = udp.recv_acks_until(deadline, events.len().div_ceil(2));
    got.extend(tcp.recv_acks_until(deadline, events.len() / 2));
    let mut by_key: HashMap<Key, Vec<St>> = HashMap::new();
    for a in &got {
        by_key.entry(a.key()).or_default().push(a.status);
    }
    let missing: Vec<Key> = events
        .iter()
        .map(Event::key)
        .filter(|k| !by_key.contains_key(k))
        .collect();
    assert!(missing.is_empty(), "no answer without Redis for {missing:?}");
    assert!(
        got.iter().all(|a| a.status == St::Retry),
        "without Redis every answer must be RETRY: {got:?}"
    );

    let redis = RedisServer::start_on_port(port);
    let up = Instant::now();
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &events,
        &DeliverOpts {
            seed,
            backoff_max: Duration::from_millis(200),
            total_timeout: Duration::from_secs(20),
            ..DeliverOpts::default()
        },
    );
    println!("after Redis came up: {} (took {:?})", report.summary(), up.elapsed());
    assert!(
        report.unresolved().is_empty(),
        "events not stored within 20 s of Redis coming up: {}",
        report.summary()
    );
    // Nothing was stored before, so the first stored answer of each event is ACCEPTED.
    for e in &events {
        let first = report.answers[&e.key()].iter().find(|s| s.is_stored());
        assert_eq!(
            first,
            Some(&St::Accepted),
            "{:?}: {:?}",
            e.key(),
            report.answers[&e.key()]
        );
    }
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    let stored = read_events(&mut redis.connection(), "sg", 16);
    check_stored(&stored, &events, &all, 16, None, &format!("seed {seed}"));
}
