//! Proves exactly-once storage across shards and transports: every event sent 1-4 times over
//! many UDP sockets and TCP connections lands in its partition stream exactly once.

use std::collections::HashSet;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use shardgate::wire::frame::{encode_action, ActionFields, EventId};

/// Starts Redis and a 2-shard server (plus `extra` flags), delivers `n` random events with
/// `opts`, and checks: every copy ends ACCEPTED or DUPLICATE; every id is stored exactly once
/// with exactly its fields, in stream `sg:{player % 16}:events`; exactly one ACCEPTED per id.
fn run_exactly_once(name: &str, n: usize, extra: &[(&str, &str)], opts: DeliverOpts) {
    let seed = test_seed(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let mut builder = Server::builder(&redis.url()).cores("0,1");
    for (flag, value) in extra {
        builder = builder.arg(flag, value);
    }
    let server = builder.start();
    assert_eq!(server.shards(), 2);

    let events = random_events(&mut rng, n, 1024);
    let t0 = unix_us();
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &events,
        &DeliverOpts { seed, ..opts },
    );
    let t1 = unix_us();
    let rate = events.len() as f64 / report.elapsed.as_secs_f64();
    println!("{name}: {}", report.summary());
    eprintln!(
        "{name}: {} distinct events ({} copies) stored in {:.2?}: {rate:.0} events/s (debug build: {})",
        events.len(),
        report.copies,
        report.elapsed,
        cfg!(debug_assertions)
    );
    let ctx = format!("seed {seed}; {}", report.summary());

    assert!(
        report.foreign_acks.is_empty(),
        "acks for ids never sent: {:?}; {ctx}",
        &report.foreign_acks[..report.foreign_acks.len().min(5)]
    );
    assert_eq!(report.counts.rejected, 0, "valid frames were REJECTED; {ctx}");
    let unresolved = report.unresolved();
    assert!(
        unresolved.is_empty(),
        "{} event ids never got ACCEPTED or DUPLICATE, e.g. {:?}; {ctx}",
        unresolved.len(),
        &unresolved[..unresolved.len().min(5)]
    );

    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    let mut conn = redis.connection();
    let stored = read_events(&mut conn, "sg", 16);
    check_stored(&stored, &events, &all, 16, Some((t0, t1 + 1_000_000)), &ctx);
    assert_eq!(stored.len(), events.len(), "{ctx}");
    let streams = stream_keys(&mut conn);
    assert!(
        streams.iter().all(|k| {
            k.strip_prefix("sg:{")
                .and_then(|r| r.strip_suffix("}:events"))
                .and_then(|p| p.parse::<u64>().ok())
                .is_some_and(|p| p < 16)
        }),
        "unexpected streams: {streams:?}"
    );

    // Every ACCEPTED is a new append: no more than one per id. Exactly one per id, unless an
    // ACCEPTED answer was lost on the way (a UDP drop at a client socket, counted).
    let mut accepted_twice: Vec<Key> = report
        .answers
        .iter()
        .filter(|(_, v)| v.iter().filter(|s| **s == St::Accepted).count() > 1)
        .map(|(k, _)| *k)
        .collect();
    accepted_twice.sort();
    assert!(
        accepted_twice.is_empty(),
        "{} ids were answered ACCEPTED more than once, e.g. {:?}; {ctx}",
        accepted_twice.len(),
        &accepted_twice[..accepted_twice.len().min(5)]
    );
    if report.udp_client_drops == 0 {
        assert_eq!(
            report.counts.accepted,
            events.len(),
            "ACCEPTED answers != distinct events, and no ack was lost; {ctx}"
        );
    } else {
        eprintln!(
            "{name}: {} datagrams dropped at client sockets; only ACCEPTED <= events checked",
            report.udp_client_drops
        );
    }
}

// ~3000 events x 1-4 copies over 6 UDP sockets (several frames per datagram) and 3 TCP
// connections (writes cut at random offsets) on 2 shards: each id stored once, exactly.
#[test]
fn every_event_stored_exactly_once_across_shards_and_transports() {
    let _turn = take_turn(module_path!());
    run_exactly_once(
        "every_event_stored_exactly_once_across_shards_and_transports",
        3000,
        &[],
        DeliverOpts {
            udp_sockets: 6,
            tcp_conns: 3,
            min_copies: 1,
            max_copies: 4,
            total_timeout: Duration::from_secs(60),
            ..DeliverOpts::default()
        },
    );
}

// Four copies of each event go out at the same moment on four different sockets or
// connections (so on both shards, in flight together, some in 16 KB datagrams): still one.
#[test]
fn simultaneous_copies_race_across_shards() {
    let _turn = take_turn(module_path!());
    run_exactly_once(
        "simultaneous_copies_race_across_shards",
        1500,
        &[],
        DeliverOpts {
            udp_sockets: 4,
            tcp_conns: 2,
            min_copies: 4,
            max_copies: 4,
            copy_spread: Some(1),
            distinct_channels: true,
            udp_max_datagram: 16_000,
            udp_max_frames: 16,
            total_timeout: Duration::from_secs(60),
            ..DeliverOpts::default()
        },
    );
}

// With the smallest shard dedup cache (64 ids) most copies miss the cache, so Redis's markers
// alone must keep each event to one append.
#[test]
fn tiny_dedup_cache_still_exactly_once() {
    let _turn = take_turn(module_path!());
    run_exactly_once(
        "tiny_dedup_cache_still_exactly_once",
        2000,
        &[("--dedup-capacity", "64")],
        DeliverOpts {
            udp_sockets: 4,
            tcp_conns: 2,
            min_copies: 2,
            max_copies: 3,
            total_timeout: Duration::from_secs(60),
            ..DeliverOpts::default()
        },
    );
}

/// The server's call deadline in `a_copy_in_flight_waits_for_its_original`: far longer than the
/// first pause (about 200 ms, however loaded the machine), which must not time the call out.
const CALL_TIMEOUT_MS: u64 = 1_500;

/// One ACTION frame of player 9 with this seq.
fn frame_of(seq: u64) -> Vec<u8> {
    let mut frame = Vec::new();
    let fields = ActionFields {
        id: EventId { player_id: 9, seq },
        client_time_us: 1,
        action_type: 2,
        payload: b"chest",
    };
    encode_action(&fields, &mut frame);
    frame
}

/// The first answer `client` gets for (9, `seq`) before `deadline`.
fn answer_before(client: &mut UdpClient, seq: u64, deadline: Instant) -> Option<St> {
    while Instant::now() < deadline {
        let acks = client.recv_acks_until(deadline, 1);
        if let Some(ack) = acks.iter().find(|ack| ack.key() == (9, seq)) {
            return Some(ack.status);
        }
    }
    None
}

// A copy that arrives while its original is in Redis waits for the original's outcome: DUPLICATE
// once the original is stored, RETRY when the original's call times out; never an answer before.
#[test]
fn a_copy_in_flight_waits_for_its_original() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url())
        .cores("0")
        .arg("--redis-timeout-ms", CALL_TIMEOUT_MS)
        .start();
    let mut original = UdpClient::new(server.udp_addr());
    let mut copy = UdpClient::new(server.udp_addr());

    // Redis is up and the script loaded before the pauses begin: one event stored first.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut warm_up = None;
    while warm_up != Some(St::Accepted) && Instant::now() < deadline {
        original.send_frames(&frame_of(0));
        warm_up = answer_before(&mut original, 0, Instant::now() + Duration::from_millis(300));
    }
    assert_eq!(
        warm_up,
        Some(St::Accepted),
        "the server stores an event before the test"
    );

    // Stored: Redis is stopped while both copies arrive, then goes on.
    redis.pause();
    original.send_frames(&frame_of(1));
    thread::sleep(Duration::from_millis(50));
    copy.send_frames(&frame_of(1));
    let early = answer_before(&mut copy, 1, Instant::now() + Duration::from_millis(150));
    assert_eq!(early, None, "the copy was answered while its original was in flight");
    redis.resume();
    let deadline = Instant::now() + Duration::from_secs(5);
    assert_eq!(answer_before(&mut original, 1, deadline), Some(St::Accepted));
    assert_eq!(answer_before(&mut copy, 1, deadline), Some(St::Duplicate));

    // Not confirmed: the original's call outlives its deadline, and the copy shares its RETRY.
    redis.pause();
    original.send_frames(&frame_of(2));
    thread::sleep(Duration::from_millis(50));
    copy.send_frames(&frame_of(2));
    let deadline = Instant::now() + Duration::from_millis(CALL_TIMEOUT_MS) + Duration::from_secs(3);
    assert_eq!(answer_before(&mut original, 2, deadline), Some(St::Retry));
    assert_eq!(answer_before(&mut copy, 2, deadline), Some(St::Retry));
    redis.resume();

    // The timed-out call ran once Redis went on: a resend is DUPLICATE, and each event is stored once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut resent = None;
    while resent.is_none_or(|status| status == St::Retry) && Instant::now() < deadline {
        copy.send_frames(&frame_of(2));
        resent = answer_before(&mut copy, 2, Instant::now() + Duration::from_millis(300));
    }
    assert_eq!(resent, Some(St::Duplicate));
    let mut stored: Vec<Key> = read_events(&mut redis.connection(), "sg", 16)
        .iter()
        .map(|event| event.key())
        .collect();
    stored.sort();
    assert_eq!(stored, vec![(9, 0), (9, 1), (9, 2)], "each event stored once");
}
