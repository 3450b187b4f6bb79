//! Proves the Redis Cluster data path: with `--redis redis-cluster://SEED,SEED` against a
//! private 6-node cluster (3 masters, 3 replicas), every event sent with copies over UDP and
//! TCP is stored exactly once, in its partition's stream on the master that owns the
//! partition's slot, and nothing else is stored.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: u64 = 16;

/// Checks every key on every master: only the partition count, the partitions' streams and
/// one marker per stored event, each on the master that owns its slot.
pub(crate) fn check_keys(cluster: &RedisCluster, stored: &[StoredEvent], ctx: &str) {
    let stored_ids: HashSet<(u64, u64)> = stored.iter().map(StoredEvent::key).collect();
    let mut markers = 0;
    let mut partitions_keys = 0;
    let mut slot_owner = HashMap::new();
    for (port, keys) in cluster.keys_by_master() {
        for key in keys {
            if key == "sg:partitions" {
                partitions_keys += 1;
                continue;
            }
            let (partition, rest) = key
                .strip_prefix("sg:{")
                .and_then(|rest| rest.split_once('}'))
                .unwrap_or_else(|| panic!("{ctx}: unexpected key {key:?} on master {port}"));
            let partition: u64 = partition
                .parse()
                .unwrap_or_else(|_| panic!("{ctx}: key {key:?} has no partition"));
            assert!(partition < PARTITIONS, "{ctx}: key {key:?} is in no partition");
            let owner = *slot_owner
                .entry(partition)
                .or_insert_with(|| cluster.owner_of_slot(cluster.key_slot(&format!("sg:{{{partition}}}:events"))));
            assert_eq!(
                owner, port,
                "{ctx}: key {key:?} is on master {port}, its slot is served by {owner}"
            );
            if rest == ":events" {
                continue;
            }
            let (player, seq) = rest
                .strip_prefix(":seen:")
                .and_then(|rest| rest.split_once(':'))
                .unwrap_or_else(|| panic!("{ctx}: unexpected key {key:?}"));
            let id = (player.parse().expect("player"), seq.parse().expect("seq"));
            assert!(stored_ids.contains(&id), "{ctx}: marker {key:?} has no stored event");
            assert_eq!(
                id.0 % PARTITIONS,
                partition,
                "{ctx}: marker {key:?} is in the wrong partition"
            );
            markers += 1;
        }
    }
    assert_eq!(partitions_keys, 1, "{ctx}: sg:partitions is on exactly one master");
    assert_eq!(markers, stored.len(), "{ctx}: one marker per stored event");
}

/// Every event was answered ACCEPTED or DUPLICATE, ACCEPTED at most once, and is stored
/// exactly once with its fields; nothing else is stored, and every key is where its slot is.
pub(crate) fn check_exactly_once(
    cluster: &RedisCluster,
    events: &[Event],
    report: &DeliveryReport,
    run: (u64, u64),
    ctx: &str,
) {
    assert!(report.foreign_acks.is_empty(), "acks for ids never sent; {ctx}");
    assert_eq!(report.counts.rejected, 0, "valid frames were REJECTED; {ctx}");
    let unresolved = report.unresolved();
    assert!(
        unresolved.is_empty(),
        "{} event ids never got ACCEPTED or DUPLICATE, e.g. {:?}; {ctx}",
        unresolved.len(),
        &unresolved[..unresolved.len().min(5)]
    );
    let stored = cluster.read_events("sg");
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    check_stored(&stored, events, &all, PARTITIONS, Some((run.0, run.1 + 1_000_000)), ctx);
    assert_eq!(stored.len(), events.len(), "{ctx}");
    check_keys(cluster, &stored, ctx);
    let accepted_twice = report
        .answers
        .values()
        .filter(|answers| answers.iter().filter(|status| **status == St::Accepted).count() > 1)
        .count();
    assert_eq!(accepted_twice, 0, "ids answered ACCEPTED more than once; {ctx}");
}

/// A test's seed and generator, a fresh 6-node cluster, and a 2-shard server on it with its
/// metrics address. Bound in this order, the server is dropped (stopped) before the cluster.
fn two_shards_on_a_cluster(name: &str) -> (u64, StdRng, RedisCluster, Server, std::net::SocketAddr) {
    let seed = test_seed(name);
    let cluster = RedisCluster::start();
    let server = Server::builder(&cluster.url())
        .cores("0,1")
        .arg("--metrics", "127.0.0.1:0")
        .start();
    let metrics = serving_metrics_address(&server);
    (seed, StdRng::seed_from_u64(seed), cluster, server, metrics)
}

// ~2000 events x 1-3 copies over 4 UDP sockets and 2 TCP connections to a 2-shard server
// on a 3-master cluster: each id stored once, exactly, and only where its slot lives.
#[test]
fn every_event_stored_exactly_once_on_a_redis_cluster() {
    let _turn = take_turn(module_path!());
    let name = "every_event_stored_exactly_once_on_a_redis_cluster";
    let (seed, mut rng, cluster, server, metrics) = two_shards_on_a_cluster(name);
    assert_eq!(server.shards(), 2);

    let events = random_events(&mut rng, 2000, 512);
    let t0 = unix_us();
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &events,
        &DeliverOpts {
            seed,
            udp_sockets: 4,
            tcp_conns: 2,
            min_copies: 1,
            max_copies: 3,
            total_timeout: Duration::from_secs(40),
            ..DeliverOpts::default()
        },
    );
    let t1 = unix_us();
    let ctx = format!("seed {seed}; {}", report.summary());
    eprintln!("{name}: {ctx}");
    check_exactly_once(&cluster, &events, &report, (t0, t1), &ctx);

    // The cluster is seen, and each batch went as one call per partition group.
    let body = scrape_metrics(metrics);
    assert_eq!(
        metric_sum(&body, "shardgate_redis_nodes", &[]),
        2 * 3,
        "3 masters per shard"
    );
    let calls = metric_sum(&body, "shardgate_redis_calls_total", &[]);
    let batches = metric_sum(&body, "shardgate_batch_events_count", &[]);
    let errors = metric_sum(&body, "shardgate_redis_errors_total", &[]);
    eprintln!(
        "{name}: {batches} batches, {calls} script calls ({:.2} per batch), {:.1} events per call, {errors} failed calls",
        calls as f64 / batches.max(1) as f64,
        metric_sum(&body, "shardgate_batch_events_sum", &[]) as f64 / calls.max(1) as f64,
    );
    assert!(
        calls >= batches,
        "at least one call per batch: {calls} calls, {batches} batches"
    );
    assert_eq!(errors, 0, "no call failed on a steady cluster");

    // Per node: the masters are the `node` values, by their real addresses, each with calls,
    // and the calls add up; promtool takes the exposition with them.
    let masters: HashSet<String> = cluster
        .masters()
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let exposition = Exposition::parse(&body);
    let round_trips = "shardgate_redis_round_trip_seconds_count";
    let nodes: HashSet<&str> = exposition
        .matching(round_trips, &[])
        .filter_map(|sample| sample.label("node"))
        .collect();
    assert_eq!(nodes, masters.iter().map(String::as_str).collect(), "{body}");
    for master in &masters {
        assert!(
            exposition.sum(round_trips, &[("node", master)]) > 0,
            "no call to master {master}: {body}"
        );
    }
    assert_eq!(
        exposition.sum(round_trips, &[]),
        calls,
        "one round trip per script call"
    );
    if let Err(problem) = Exposition::check_with_promtool(&body) {
        panic!("{problem}\n--- exposition:\n{body}");
    }
    let lines = server.stderr_lines();
    assert!(
        lines
            .iter()
            .any(|line| line.contains("redis cluster mode: connected to 3 masters")),
        "the log says cluster mode is on: {lines:?}"
    );

    // The partition count recorded on the cluster (one key, on its slot's master) refuses a
    // second server with another count, as on a standalone Redis.
    let other = run_cli(
        &[
            "serve",
            "--cores",
            "0",
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--partitions",
            "8",
            "--redis",
            &cluster.url(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(other.code(), Some(2), "{}", other.stderr);
    assert!(
        other.stderr.contains("--partitions 16") && other.stderr.contains("--partitions 8"),
        "{}",
        other.stderr
    );
}

// A bad cluster url stops the start with a clear reason, and names no password.
#[test]
fn a_bad_cluster_url_is_refused_at_start() {
    let _turn = take_turn(module_path!());
    let run = run_cli(
        &[
            "serve",
            "--cores",
            "0",
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--redis",
            "redis-cluster://game:hunter2@127.0.0.1",
        ],
        Duration::from_secs(20),
    );
    assert!(run.code().is_some_and(|code| code != 0), "{}", run.stderr);
    assert!(run.stderr.contains("port in 1..=65535"), "{}", run.stderr);
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
}

// While ~8000 events x 1-3 copies are being delivered, the slots of every partition one
// master serves move to another master, a few keys at a time (MIGRATING/IMPORTING, MIGRATE,
// SETSLOT NODE): the client follows MOVED and ASK, a call that meets its slot half moved
// gets TRYAGAIN and its events RETRY, and in the end every event is stored exactly once,
// on the master that now serves its slot, and nothing is lost.
#[test]
fn a_slot_migration_under_load_loses_nothing_and_stores_nothing_twice() {
    let _turn = take_turn(module_path!());
    let name = "a_slot_migration_under_load_loses_nothing_and_stores_nothing_twice";
    let (seed, mut rng, cluster, server, metrics) = two_shards_on_a_cluster(name);

    // The partitions whose slots the first master serves move to the second.
    let masters = cluster.masters();
    let (from, to) = (masters[0], masters[1]);
    let slots: Vec<u16> = (0..PARTITIONS)
        .map(|partition| cluster.key_slot(&format!("sg:{{{partition}}}:events")))
        .filter(|&slot| cluster.owner_of_slot(slot) == from)
        .collect();
    assert!(!slots.is_empty(), "master {from} serves no partition's slot");

    let events = random_events(&mut rng, 8000, 256);
    let t0 = unix_us();
    let (udp, tcp) = (server.udp_addr(), server.tcp_addr());
    let delivery = {
        let events = events.clone();
        std::thread::spawn(move || {
            deliver_all(
                udp,
                tcp,
                &events,
                &DeliverOpts {
                    seed,
                    udp_sockets: 4,
                    tcp_conns: 2,
                    min_copies: 1,
                    max_copies: 3,
                    udp_window: 16,
                    tcp_window: 16,
                    total_timeout: Duration::from_secs(40),
                    ..DeliverOpts::default()
                },
            )
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let moved: usize = slots
        .iter()
        .map(|&slot| cluster.migrate_slot(slot, to, 20, Duration::from_millis(5)))
        .sum();
    let migration = started.elapsed();
    assert!(
        !delivery.is_finished(),
        "the load ended before the migration did ({migration:.2?}): nothing ran under load"
    );
    let report = delivery.join().expect("the delivery thread");
    let t1 = unix_us();
    let ctx = format!("seed {seed}; {}", report.summary());
    eprintln!(
        "{name}: moved {} slots ({moved} keys) from {from} to {to} in {migration:.2?}, while: {ctx}",
        slots.len()
    );
    assert!(moved > 0, "the migration moved no key: it ran after the load");
    for &slot in &slots {
        assert_eq!(cluster.owner_of_slot(slot), to, "slot {slot} moved");
    }
    cluster.wait_ok(Duration::from_secs(20));
    check_exactly_once(&cluster, &events, &report, (t0, t1), &ctx);
    let body = scrape_metrics(metrics);
    eprintln!(
        "{name}: RETRY answers {}, failed group calls by kind: cluster {} reply_mismatch {} timeout {} script {} connection {}",
        report.counts.retry,
        metric_sum(&body, "shardgate_redis_errors_total", &[("kind", "cluster")]),
        metric_sum(&body, "shardgate_redis_errors_total", &[("kind", "reply_mismatch")]),
        metric_sum(&body, "shardgate_redis_errors_total", &[("kind", "timeout")]),
        metric_sum(&body, "shardgate_redis_errors_total", &[("kind", "script")]),
        metric_sum(&body, "shardgate_redis_errors_total", &[("kind", "connection")]),
    );
    // The old owner sent the calls of its moved slots on: the client followed its MOVED (and
    // ASK while a slot was half moved), counted at its node; the new owner sent none back.
    let redirections = "shardgate_redis_redirections_total";
    let (from_node, to_node) = (format!("127.0.0.1:{from}"), format!("127.0.0.1:{to}"));
    let moved = metric_sum(&body, redirections, &[("node", &from_node), ("kind", "moved")]);
    let ask = metric_sum(&body, redirections, &[("node", &from_node), ("kind", "ask")]);
    eprintln!("{name}: redirections from {from_node}: MOVED {moved}, ASK {ask}");
    assert!(moved > 0, "no MOVED counted at {from_node}: {body}");
    assert_eq!(metric_sum(&body, redirections, &[("node", &to_node)]), 0, "{body}");
}

// A redis-cluster url that names a standalone Redis: fred ends its connection task on
// every attempt (a configuration error to it); the server restarts it once a second,
// answers RETRY meanwhile, and says what to check, once, not on every tick.
#[test]
fn a_cluster_url_to_a_standalone_redis_answers_retry_and_says_why() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let server = Server::builder(&format!("redis-cluster://127.0.0.1:{}", redis.port())).start();
    let mut rng = StdRng::seed_from_u64(test_seed("a_cluster_url_to_a_standalone_redis"));
    let event = random_events(&mut rng, 1, 16).remove(0);
    let mut client = UdpClient::new(server.udp_addr());
    std::thread::sleep(Duration::from_millis(2_500));
    client.send_frames(&event.frame());
    let acks = client.recv_acks_until(std::time::Instant::now() + Duration::from_secs(5), 1);
    assert_eq!(acks.len(), 1, "one answer: {acks:?}");
    assert_eq!(acks[0].status, St::Retry, "not stored: {acks:?}");
    let lines = server.stderr_lines();
    let restarts = lines.iter().filter(|line| line.contains("ended on its own")).count();
    assert_eq!(restarts, 1, "logged once in its first 10 s: {lines:?}");
    assert!(
        lines.iter().any(|line| line.contains("redis:// or redis-cluster://")),
        "the line says what to check: {lines:?}"
    );
}

// On a cluster every master holds markers, so one master whose maxmemory-policy may evict (here the last) refuses the start with exit 2, naming it; set back to noeviction, the server starts.
#[test]
fn one_evicting_master_is_refused_at_start() {
    let _turn = take_turn(module_path!());
    let cluster = RedisCluster::start();
    let masters = cluster.masters();
    let evicting = *masters.last().expect("the cluster has masters");
    let set_policy = |policy: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query::<()>(&mut cluster.node(evicting).connection())
            .expect("CONFIG SET");
    };
    set_policy("volatile-lru");
    let url = cluster.url();
    let args = Server::builder(&url).args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_cli(&args, Duration::from_secs(20));
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("maxmemory-policy volatile-lru") && run.stderr.contains(&format!(":{evicting}")),
        "names the policy and the master: {}",
        run.stderr
    );
    set_policy("noeviction");
    let mut server = Server::builder(&url).start();
    let report = deliver_resolved(&server, &[Event::new(9, 1, b"kept")], 5, Duration::from_secs(15));
    assert_eq!(report.counts.accepted, 1, "{}", report.summary());
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
