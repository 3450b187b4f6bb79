//! Proves `--durability replica`: an event is answered ACCEPTED or DUPLICATE only once a
//! replica has its write (`WAIT 1`); while the master's replica is stopped, or when it has
//! none, events get RETRY (cause `replica_unconfirmed`, counted in
//! `shardgate_redis_wait_shortfalls_total`, and logged), and once the replica is back the
//! resends are stored, each event exactly once.

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: u64 = 16;
/// Short, so that a batch no replica confirms is answered RETRY within about 0.4 s.
const REDIS_TIMEOUT_MS: &str = "400";

fn replica_server(redis_url: &str) -> Server {
    Server::builder(redis_url)
        .cores("0")
        .arg("--durability", "replica")
        .arg("--redis-timeout-ms", REDIS_TIMEOUT_MS)
        .arg("--metrics", "127.0.0.1:0")
        .start()
}

/// A bounded delivery that expects no answer but RETRY: every copy is resent on RETRY until
/// `total`, and none may be answered ACCEPTED or DUPLICATE.
fn deliver_expecting_retry(server: &Server, events: &[Event], seed: u64, total: Duration, ctx: &str) -> DeliveryReport {
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        events,
        &DeliverOpts {
            seed,
            udp_sockets: 2,
            tcp_conns: 1,
            total_timeout: total,
            ..DeliverOpts::default()
        },
    );
    let stored = report.stored_keys();
    assert!(
        stored.is_empty(),
        "{ctx}: {} events were answered ACCEPTED/DUPLICATE with no replica confirming, e.g. {:?}; {}",
        stored.len(),
        stored.iter().take(5).collect::<Vec<_>>(),
        report.summary()
    );
    assert!(report.counts.retry > 0, "{ctx}: no RETRY at all; {}", report.summary());
    report
}

/// The shard's stderr has the shortfall line, with how many replicas confirmed.
fn wait_for_shortfall_log(server: &Server, ctx: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let line = server
            .stderr_lines()
            .into_iter()
            .find(|line| line.contains("no replica confirmed the writes"));
        if let Some(line) = line {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: no shortfall line in the log:\n{}",
            server.stderr_lines().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// A master with one replica: events are ACCEPTED once the replica has them; with the replica
// stopped (SIGSTOP) new events get RETRY within about the timeout, counted and logged; after
// SIGCONT they are stored, their resends DUPLICATE or ACCEPTED, every event exactly once, on
// the master and on the replica.
#[test]
fn replica_durability_answers_retry_while_the_replica_is_stopped() {
    let _turn = take_turn(module_path!());
    let name = "replica_durability_answers_retry_while_the_replica_is_stopped";
    let seed = test_seed(name);
    let mut rng = StdRng::seed_from_u64(seed);
    let master = RedisServer::start();
    let replica = RedisServer::start_replica_of(master.port());
    let server = replica_server(&master.url());
    let metrics = serving_metrics_address(&server);
    let events = random_events(&mut rng, 900, 256);
    let (before, rest) = events.split_at(300);
    let (during, after) = rest.split_at(300);

    // 1. The replica is up: everything is ACCEPTED (some copies DUPLICATE), nothing RETRY'd
    //    for want of a replica.
    let report = deliver_resolved(&server, before, seed, Duration::from_secs(30));
    assert!(report.counts.accepted > 0, "{}", report.summary());
    let body = scrape_metrics(metrics);
    assert_eq!(metric_sum(&body, "shardgate_redis_wait_shortfalls_total", &[]), 0);
    assert_eq!(
        metric_sum(&body, "shardgate_retries_total", &[("cause", "replica_unconfirmed")]),
        0
    );
    let mut answers: HashMap<Key, Vec<St>> = report.answers;

    // 2. The replica is stopped: the master still counts it connected, but it acknowledges
    //    nothing, so every WAIT falls short and every event gets RETRY.
    replica.pause();
    let started = Instant::now();
    let report = deliver_expecting_retry(&server, during, seed + 1, Duration::from_secs(4), "replica stopped");
    assert!(started.elapsed() < Duration::from_secs(10), "{}", report.summary());
    for (key, statuses) in report.answers {
        answers.entry(key).or_default().extend(statuses);
    }
    let body = scrape_metrics(metrics);
    let shortfalls = metric_sum(&body, "shardgate_redis_wait_shortfalls_total", &[]);
    let unconfirmed = metric_sum(&body, "shardgate_retries_total", &[("cause", "replica_unconfirmed")]);
    assert!(shortfalls > 0, "no WAIT shortfall counted:\n{body}");
    assert!(unconfirmed > 0, "no replica_unconfirmed RETRY counted:\n{body}");
    let line = wait_for_shortfall_log(&server, "replica stopped");
    assert!(line.contains("replicas_confirmed="), "{line}");

    // 3. The replica is back: the RETRY'd events' resends are DUPLICATE (the master has them)
    //    or ACCEPTED, new events ACCEPTED; all of them resolved.
    replica.resume();
    replica.wait_master_link_up(Duration::from_secs(20));
    let resent: Vec<Event> = during.iter().chain(after).cloned().collect();
    let report = deliver_resolved(&server, &resent, seed + 2, Duration::from_secs(30));
    for (key, statuses) in report.answers {
        answers.entry(key).or_default().extend(statuses);
    }

    // Every event exactly once on the master, and (once it caught up) on the replica.
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    let stored = read_events(&mut master.connection(), "sg", PARTITIONS);
    check_stored(&stored, &events, &all, PARTITIONS, None, "master");
    assert_eq!(stored.len(), events.len(), "master");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let copied = read_events(&mut replica.connection(), "sg", PARTITIONS);
        if copied.len() == events.len() {
            check_stored(&copied, &events, &all, PARTITIONS, None, "replica");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica holds {} of {} events",
            copied.len(),
            events.len()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let accepted_twice: Vec<&Key> = answers
        .iter()
        .filter(|(_, statuses)| statuses.iter().filter(|status| **status == St::Accepted).count() > 1)
        .map(|(key, _)| key)
        .collect();
    assert!(accepted_twice.is_empty(), "ACCEPTED more than once: {accepted_twice:?}");

    // 4. A second server (an empty dedup cache) resends stored events: its calls find only
    //    markers and write nothing, so each sets one marker again (`SET .. XX KEEPTTL`) for
    //    its WAIT to cover the first copies' writes. Every answer DUPLICATE, nothing more stored.
    let second = replica_server(&master.url());
    let set_calls = || command_calls(&master, "set");
    let script_calls = || command_calls(&master, "evalsha");
    let (sets_before, scripts_before) = (set_calls(), script_calls());
    let resend = deliver_all(
        second.udp_addr(),
        second.tcp_addr(),
        before,
        &DeliverOpts {
            seed: seed + 3,
            udp_sockets: 0,
            tcp_conns: 1,
            total_timeout: Duration::from_secs(20),
            ..DeliverOpts::default()
        },
    );
    assert!(resend.unresolved().is_empty(), "{}", resend.summary());
    assert_eq!(resend.counts.accepted, 0, "{}", resend.summary());
    let (sets, scripts) = (set_calls() - sets_before, script_calls() - scripts_before);
    // One SET NX per event, plus at most one marker set again per call, at least one.
    let events_sent = before.len() as u64;
    assert!(
        sets > events_sent && sets <= events_sent + scripts,
        "{sets} SET for {events_sent} events in {scripts} calls"
    );
    assert_eq!(
        read_events(&mut master.connection(), "sg", PARTITIONS).len(),
        events.len()
    );
}

/// `calls` of `command` in the Redis's `INFO commandstats`, less its failed calls.
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .expect("INFO commandstats");
    stat(&stats, command, "calls") - stat(&stats, command, "failed_calls")
}

/// One field of `cmdstat_<command>:calls=N,...,failed_calls=F`, 0 when absent.
fn stat(stats: &str, command: &str, field: &str) -> u64 {
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|fields| {
            fields
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{field}=")))
        })
        .map_or(0, |count| count.parse().expect("a call count"))
}

// `--durability replica` against a master with no replica at all: every event RETRY, and the
// log says that no replica confirmed.
#[test]
fn replica_durability_without_a_replica_answers_retry() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("replica_durability_without_a_replica_answers_retry");
    let mut rng = StdRng::seed_from_u64(seed);
    let master = RedisServer::start();
    let server = replica_server(&master.url());
    let metrics = serving_metrics_address(&server);
    let events = random_events(&mut rng, 100, 128);
    deliver_expecting_retry(&server, &events, seed, Duration::from_secs(3), "no replica");
    let body = scrape_metrics(metrics);
    assert!(
        metric_sum(&body, "shardgate_redis_wait_shortfalls_total", &[]) > 0,
        "{body}"
    );
    assert!(
        metric_sum(&body, "shardgate_retries_total", &[("cause", "replica_unconfirmed")]) > 0,
        "{body}"
    );
    let line = wait_for_shortfall_log(&server, "no replica");
    assert!(
        line.contains("replicas_confirmed=0") && line.contains("0 replicas confirmed"),
        "the first shortfall is a WAIT that answered 0: {line}"
    );
}

// The 6-node cluster (every master has a replica): with `--durability replica` each group
// call's WAIT goes to its slot's master, and every event is ACCEPTED or DUPLICATE, stored once.
#[test]
fn replica_durability_on_a_redis_cluster_stores_every_event() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("replica_durability_on_a_redis_cluster_stores_every_event");
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = RedisCluster::start();
    cluster.wait_replicas_online(Duration::from_secs(30));
    let server = Server::builder(&cluster.url())
        .cores("0")
        .arg("--durability", "replica")
        .arg("--metrics", "127.0.0.1:0")
        .start();
    let metrics = serving_metrics_address(&server);
    let events = random_events(&mut rng, 600, 256);
    let report = deliver_resolved(&server, &events, seed, Duration::from_secs(40));
    assert_eq!(report.counts.rejected, 0, "{}", report.summary());
    let stored = cluster.read_events("sg");
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    check_stored(&stored, &events, &all, PARTITIONS, None, "cluster");
    assert_eq!(stored.len(), events.len());
    let body = scrape_metrics(metrics);
    assert_eq!(
        metric_sum(&body, "shardgate_redis_wait_shortfalls_total", &[]),
        0,
        "every master has a replica: {body}"
    );
    // Every master that ran group calls got WAITs, at most one per call: calls whose scripts
    // answered while a WAIT was out on that master share the next one (`WaitGate`). That each
    // WAIT goes to its call's master is shown by the test below, where one master's calls get
    // RETRY and the others' do not.
    let mut waits_total = 0;
    for port in cluster.masters() {
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut cluster.node(port).connection())
            .expect("INFO commandstats");
        // A NOSCRIPT answer (the first calls on a master, before fred loads the script) is a
        // failed call.
        let scripts = stat(&stats, "evalsha", "calls") - stat(&stats, "evalsha", "failed_calls");
        let waits = stat(&stats, "wait", "calls");
        waits_total += waits;
        assert!(
            waits <= scripts && (waits > 0 || scripts <= 1),
            "master {port}: {scripts} EVALSHA answered, {waits} WAIT:\n{stats}"
        );
    }
    assert!(waits_total > 0, "no WAIT reached any master");
}

// The 6-node cluster with one master's replica stopped (SIGSTOP): the partitions that master
// serves answer RETRY (their group's WAIT falls short), the other masters' partitions keep
// being stored; once the replica is back every event is stored exactly once.
#[test]
fn replica_durability_on_a_cluster_retries_only_the_master_without_replica() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("replica_durability_on_a_cluster_retries_only_the_master_without_replica");
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = RedisCluster::start();
    cluster.wait_replicas_online(Duration::from_secs(30));
    let server = Server::builder(&cluster.url())
        .cores("0")
        .arg("--durability", "replica")
        .arg("--redis-timeout-ms", REDIS_TIMEOUT_MS)
        .arg("--metrics", "127.0.0.1:0")
        .start();
    let metrics = serving_metrics_address(&server);
    let master = cluster.masters()[0];
    let replica = cluster.replica_of(master);
    let on_master: HashSet<u64> = (0..PARTITIONS)
        .filter(|partition| cluster.owner_of_slot(cluster.key_slot(&format!("sg:{{{partition}}}:events"))) == master)
        .collect();
    assert!(!on_master.is_empty(), "master {master} serves no partition");
    let events = random_events(&mut rng, 400, 128);

    cluster.node(replica).pause();
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &events,
        &DeliverOpts {
            seed,
            total_timeout: Duration::from_secs(8),
            ..DeliverOpts::default()
        },
    );
    let stored = report.stored_keys();
    let (mut unconfirmed_stored, mut others, mut others_unresolved) = (Vec::new(), 0, 0);
    for event in &events {
        let confirmed = stored.contains(&event.key());
        if on_master.contains(&(event.player % PARTITIONS)) {
            if confirmed {
                unconfirmed_stored.push(event.key());
            }
        } else {
            others += 1;
            others_unresolved += usize::from(!confirmed);
        }
    }
    assert!(
        unconfirmed_stored.is_empty(),
        "events of master {master} (replica {replica} stopped) answered stored: {unconfirmed_stored:?}; {}",
        report.summary()
    );
    println!(
        "replica {replica} of master {master} stopped: {others_unresolved} of {others} other masters' events unresolved; {}",
        report.summary()
    );
    // The other masters' events are stored meanwhile, but not all of them: a batch with a
    // group on the stopped master's partitions is answered only when that group's WAIT gives
    // up, so the resent events of those partitions hold the shard's in-flight slots, and some
    // of the others get RETRY (overload, or a group call sent too late in its batch).
    assert!(
        others_unresolved * 4 <= others,
        "{others_unresolved} of {others} events of the other masters unresolved; {}",
        report.summary()
    );
    let body = scrape_metrics(metrics);
    // The shortfalls are counted at the master without a replica (node label). Not all of
    // them: a group call sent late in its batch may find no time left for its WAIT elsewhere.
    let shortfalls = "shardgate_redis_wait_shortfalls_total";
    let total = metric_sum(&body, shortfalls, &[]);
    let at_master = metric_sum(&body, shortfalls, &[("node", &format!("127.0.0.1:{master}"))]);
    assert!(
        total > 0 && at_master * 2 > total,
        "{at_master} of {total} WAIT shortfalls at master {master}: {body}"
    );
    assert!(
        metric_sum(&body, "shardgate_retries_total", &[("cause", "replica_unconfirmed")]) > 0,
        "{body}"
    );

    cluster.node(replica).resume();
    cluster.wait_replicas_online(Duration::from_secs(30));
    let report = deliver_resolved(&server, &events, seed + 1, Duration::from_secs(30));
    assert_eq!(report.counts.rejected, 0, "{}", report.summary());
    let stored = cluster.read_events("sg");
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    check_stored(&stored, &events, &all, PARTITIONS, None, "cluster");
    assert_eq!(stored.len(), events.len());
}
