//! Proves exactly-once storage across shards and transports: every event sent 1-4 times over
//! many UDP sockets and TCP connections lands in its partition stream exactly once.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use support::*;

// ~3000 events x 1-4 copies over 6 UDP sockets and 3 TCP connections on 2 shards: each id is
// stored once with its exact fields, and ACCEPTED is answered exactly once per id.
#[test]
fn every_event_stored_exactly_once_across_shards_and_transports() {
    let seed = test_seed("every_event_stored_exactly_once_across_shards_and_transports");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url()).cores("0,1").start();
    assert_eq!(server.shards(), 2);

    let events = random_events(&mut rng, 3000, 1024);
    let t0 = unix_us();
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &events,
        &DeliverOpts {
            seed,
            udp_sockets: 6,
            tcp_conns: 3,
            min_copies: 1,
            max_copies: 4,
            total_timeout: Duration::from_secs(60),
            ..DeliverOpts::default()
        },
    );
    let t1 = unix_us();
    let rate = events.len() as f64 / report.elapsed.as_secs_f64();
    println!("e2e_dedup: {}", report.summary());
    eprintln!(
        "e2e_dedup: {} distinct events ({} copies) stored in {:.2?}: {rate:.0} events/s \
         (debug={})",
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
            "ACCEPTED answers != distinct events with no ack lost; {ctx}"
        );
    } else {
        eprintln!(
            "e2e_dedup: {} datagrams dropped at client sockets; ACCEPTED count {} <= {} checked only",
            report.udp_client_drops,
            report.counts.accepted,
            events.len()
        );
    }
}
