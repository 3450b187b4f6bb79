//! Proves the multi-host guarantees on a Redis Cluster: several `shardgate` hosts, each in a
//! network namespace of its own, share one private 6-node cluster; copies of one event sent
//! to different hosts are stored once (the Redis marker decides); a host cut off from Redis
//! answers RETRY and recovers; a host killed with `kill -9` loses nothing its clients were
//! answered for; and a master killed under load with `--durability replica` fails over with
//! no acked event lost, none stored twice, and RETRY only while the failover lasts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::{check_exactly_once, check_keys};
use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

const PARTITIONS: u64 = 16;

/// The servers, the cluster and the network of a test, dropped in that order: the hosts'
/// processes end before the Redis nodes, and both before their namespaces go.
struct Hosts {
    servers: Vec<Server>,
    cluster: RedisCluster,
    network: Network,
}

impl Hosts {
    /// A network of `host_count` namespaces, a 6-node cluster on its Redis bridge (with
    /// `cluster-node-timeout` `node_timeout_ms`), and one 1-shard server per host, shaped by
    /// `configure`. `None` when namespaces cannot be made (the skip is said on stderr).
    fn start(
        test: &str,
        host_count: usize,
        node_timeout_ms: u32,
        configure: impl Fn(ServerBuilder) -> ServerBuilder,
    ) -> Option<Hosts> {
        let network = Network::create(test, host_count)?;
        let cluster = RedisCluster::start_on(network.redis_gateway(), node_timeout_ms);
        let servers = (0..host_count)
            .map(|index| {
                let builder = configure(Server::builder(&cluster.url()).cores(&(index % 2).to_string()));
                network.start_server(index, builder)
            })
            .collect();
        Some(Hosts {
            servers,
            cluster,
            network,
        })
    }

    /// Each host's (UDP, TCP) address, for `deliver_to_hosts`.
    fn addresses(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.servers
            .iter()
            .map(|server| (server.udp_addr(), server.tcp_addr()))
            .collect()
    }

    fn metrics(&self, index: usize) -> String {
        scrape_metrics(serving_metrics_address(&self.servers[index]))
    }
}

/// Every answer of `reports`, per event id.
fn merged_answers<'a>(reports: impl IntoIterator<Item = &'a DeliveryReport>) -> HashMap<Key, Vec<St>> {
    let mut answers: HashMap<Key, Vec<St>> = HashMap::new();
    for report in reports {
        for (key, statuses) in &report.answers {
            answers.entry(*key).or_default().extend(statuses);
        }
    }
    answers
}

/// Ids answered ACCEPTED or DUPLICATE at least once.
fn acked(answers: &HashMap<Key, Vec<St>>) -> HashSet<Key> {
    answers
        .iter()
        .filter(|(_, statuses)| statuses.iter().any(|status| status.is_stored()))
        .map(|(key, _)| *key)
        .collect()
}

/// What Redis holds against what the clients were told: ids acked but not stored (lost),
/// and ids stored more than once.
fn lost_and_doubled(stored: &[StoredEvent], acked: &HashSet<Key>) -> (Vec<Key>, Vec<Key>) {
    let mut times_stored: HashMap<Key, usize> = HashMap::new();
    for event in stored {
        *times_stored.entry(event.key()).or_default() += 1;
    }
    let mut lost: Vec<Key> = acked
        .iter()
        .filter(|key| !times_stored.contains_key(key))
        .copied()
        .collect();
    let mut doubled: Vec<Key> = times_stored
        .iter()
        .filter(|(_, &count)| count > 1)
        .map(|(key, _)| *key)
        .collect();
    lost.sort();
    doubled.sort();
    (lost, doubled)
}

// 1500 events x 2-3 copies, each copy to a different one of 3 hosts (UDP and TCP): every
// event is stored exactly once, nothing else is stored, no id is ACCEPTED twice by any
// host, and the hosts answered the later copies DUPLICATE from the marker in Redis.
#[test]
fn copies_spread_over_three_hosts_are_stored_exactly_once() {
    let _turn = take_turn(module_path!());
    let name = "copies_spread_over_three_hosts_are_stored_exactly_once";
    let seed = test_seed(name);
    let Some(hosts) = Hosts::start(name, 3, 2000, |builder| builder) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let events = random_events(&mut rng, 1500, 256);
    let t0 = unix_us();
    let report = deliver_to_hosts(
        &hosts.addresses(),
        &events,
        &DeliverOpts {
            seed,
            udp_sockets: 1,
            tcp_conns: 1,
            min_copies: 2,
            max_copies: 3,
            distinct_channels: true,
            // The copies of one event go out at about the same time, so they race.
            copy_spread: Some(4),
            total_timeout: Duration::from_secs(40),
            ..DeliverOpts::default()
        },
    );
    let t1 = unix_us();
    let ctx = format!("seed {seed}; {}", report.summary());
    eprintln!("{name}: {ctx}");
    check_exactly_once(&hosts.cluster, &events, &report, (t0, t1), &ctx);

    // Every host stored events and answered copies DUPLICATE; the hosts together sent one
    // ACCEPTED per event at most (fewer only if an appended batch's answer was RETRY). A
    // host's cache knows only its own copies, so every copy that reached a host after another
    // host stored its event went to Redis, and its marker answered DUPLICATE: the hosts sent
    // Redis more lookups than there are events.
    let (mut accepted_total, mut lookups_total) = (0, 0);
    for index in 0..hosts.servers.len() {
        let body = hosts.metrics(index);
        let accepted = metric_sum(&body, "shardgate_acks_sent_total", &[("status", "accepted")]);
        let duplicate = metric_sum(&body, "shardgate_acks_sent_total", &[("status", "duplicate")]);
        let lookups = metric_sum(&body, "shardgate_dedup_lookups_total", &[("outcome", "miss")]);
        eprintln!("{name}: host {index}: {accepted} ACCEPTED, {duplicate} DUPLICATE, {lookups} sent to Redis");
        assert!(
            accepted > 0 && duplicate > 0,
            "host {index}: {accepted} ACCEPTED, {duplicate} DUPLICATE; {ctx}"
        );
        accepted_total += accepted;
        lookups_total += lookups;
    }
    assert!(
        accepted_total as usize <= events.len(),
        "{accepted_total} ACCEPTED for {} events: some id was accepted by two hosts; {ctx}",
        events.len()
    );
    assert!(
        lookups_total as usize > events.len(),
        "{lookups_total} lookups went to Redis for {} events: no copy met another host's marker; {ctx}",
        events.len()
    );
}

// Host 0's link to Redis goes down (inside its namespace) while host 1's stays up: host 0
// answers RETRY to everything, host 1 keeps storing; once the link is back host 0 stores
// again, answering DUPLICATE for events host 1 stored and ACCEPTED for the rest; every event
// is stored exactly once.
#[test]
fn a_host_cut_off_from_redis_answers_retry_and_recovers() {
    let _turn = take_turn(module_path!());
    let name = "a_host_cut_off_from_redis_answers_retry_and_recovers";
    let seed = test_seed(name);
    let Some(hosts) = Hosts::start(name, 2, 2000, |builder| builder.arg("--redis-timeout-ms", "500")) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let events = random_events(&mut rng, 900, 256);
    let (stored_first, rest) = events.split_at(300);
    let (cut_off, elsewhere) = rest.split_at(300);
    let addresses = hosts.addresses();
    let opts = |seed: u64, total: Duration| DeliverOpts {
        seed,
        min_copies: 1,
        max_copies: 2,
        total_timeout: total,
        ..DeliverOpts::default()
    };
    let t0 = unix_us();
    let report = deliver_to_hosts(&addresses[1..], stored_first, &opts(seed, Duration::from_secs(30)));
    assert!(report.unresolved().is_empty(), "before the cut: {}", report.summary());
    let mut reports = vec![report];

    hosts.network.set_redis_link(0, false);
    let cut_at = Instant::now();
    // To host 0: new events and copies of stored ones, resent on RETRY for 4 s; meanwhile
    // host 1 stores its own.
    let to_cut_host: Vec<Event> = cut_off.iter().chain(stored_first).cloned().collect();
    let during = {
        let (host, events, opts) = (
            addresses[0],
            to_cut_host.clone(),
            opts(seed + 1, Duration::from_secs(4)),
        );
        thread::spawn(move || deliver_to_hosts(&[host], &events, &opts))
    };
    let report = deliver_to_hosts(&addresses[1..], elsewhere, &opts(seed + 2, Duration::from_secs(30)));
    assert!(
        report.unresolved().is_empty(),
        "host 1 while host 0 is cut off: {}",
        report.summary()
    );
    reports.push(report);
    let report = during.join().expect("the delivery to the cut-off host");
    let ctx = format!("seed {seed}; cut-off host: {}", report.summary());
    eprintln!("{name}: link down: {ctx}");
    assert!(
        report.stored_keys().is_empty(),
        "the host without a link to Redis answered {} events stored; {ctx}",
        report.stored_keys().len()
    );
    assert!(report.counts.retry > 0, "no RETRY from the cut-off host; {ctx}");
    reports.push(report);
    let cut_log: Vec<String> = hosts.servers[0]
        .stderr_lines()
        .into_iter()
        .filter(|line| line.contains("redis"))
        .collect();

    hosts.network.set_redis_link(0, true);
    let up_at = Instant::now();
    let report = deliver_to_hosts(&addresses[..1], &to_cut_host, &opts(seed + 3, Duration::from_secs(30)));
    let t1 = unix_us();
    let ctx = format!("seed {seed}; link back: {}", report.summary());
    eprintln!(
        "{name}: link down for {:?}, then every copy answered {:?} after the link came back; {ctx}",
        up_at - cut_at,
        report.elapsed
    );
    assert!(report.unresolved().is_empty(), "{ctx}");
    let stored_before: HashSet<Key> = stored_first.iter().map(Event::key).collect();
    let accepted_again: Vec<&Key> = report
        .answers
        .iter()
        .filter(|(key, statuses)| stored_before.contains(key) && statuses.contains(&St::Accepted))
        .map(|(key, _)| key)
        .collect();
    assert!(
        accepted_again.is_empty(),
        "stored events ACCEPTED again: {accepted_again:?}; {ctx}"
    );
    assert!(report.counts.accepted > 0 && report.counts.duplicate > 0, "{ctx}");
    reports.push(report);

    let stored = hosts.cluster.read_events("sg");
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    check_stored(&stored, &events, &all, PARTITIONS, Some((t0, t1 + 1_000_000)), &ctx);
    assert_eq!(stored.len(), events.len(), "{ctx}");
    check_keys(&hosts.cluster, &stored, &ctx);
    let answers = merged_answers(&reports);
    let accepted_twice = answers
        .values()
        .filter(|statuses| statuses.iter().filter(|status| **status == St::Accepted).count() > 1)
        .count();
    assert_eq!(accepted_twice, 0, "ids ACCEPTED more than once; {ctx}");
    // What host 0 said while cut off: that Redis is gone, or that its calls failed.
    for line in &cut_log {
        eprintln!("{name}: host 0 log while cut off: {line}");
    }
    assert!(
        cut_log.iter().any(|line| {
            line.contains("redis connection lost")
                || line.contains("redis unreachable")
                || line.contains("redis script calls failed")
        }),
        "host 0 logged nothing about Redis while cut off: {cut_log:?}"
    );
}

// Two hosts store a load; host 0 is killed with `kill -9` mid-run; its clients resend every
// event they had sent it to host 1: host 1 answers DUPLICATE for each event host 0 had
// acked (its marker is in Redis), nothing acked is lost, nothing is stored twice.
#[test]
fn a_killed_host_s_clients_resend_to_another_host_and_lose_nothing() {
    let _turn = take_turn(module_path!());
    let name = "a_killed_host_s_clients_resend_to_another_host_and_lose_nothing";
    let seed = test_seed(name);
    let Some(mut hosts) = Hosts::start(name, 2, 2000, |builder| builder) else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let events = random_events(&mut rng, 4000, 256);
    let (to_killed, to_survivor) = events.split_at(events.len() / 2);
    let addresses = hosts.addresses();
    let opts = |seed: u64, total: Duration, window: usize| DeliverOpts {
        seed,
        min_copies: 1,
        max_copies: 2,
        udp_window: window,
        tcp_window: window,
        total_timeout: total,
        ..DeliverOpts::default()
    };
    // Small windows for the load, so that the load to host 0 is still running when it is
    // killed; the resend has the default ones.
    let load_window = 8;
    let t0 = unix_us();
    let doomed = {
        let (host, events, opts) = (
            addresses[0],
            to_killed.to_vec(),
            opts(seed, Duration::from_secs(4), load_window),
        );
        thread::spawn(move || deliver_to_hosts(&[host], &events, &opts))
    };
    let surviving = {
        let (host, events, opts) = (
            addresses[1],
            to_survivor.to_vec(),
            opts(seed + 1, Duration::from_secs(40), load_window),
        );
        thread::spawn(move || deliver_to_hosts(&[host], &events, &opts))
    };
    thread::sleep(Duration::from_millis(800));
    hosts.servers[0].signal(Signal::SIGKILL);
    let status = hosts.servers[0].wait_exit(Duration::from_secs(5));
    let report = doomed.join().expect("the delivery to the killed host");
    let acked_by_killed = report.stored_keys();
    eprintln!(
        "{name}: host 0 killed ({status}) with {} of {} events acked; {}",
        acked_by_killed.len(),
        to_killed.len(),
        report.summary()
    );
    assert!(
        !acked_by_killed.is_empty() && !report.unresolved().is_empty(),
        "the kill was not mid-run: {} of {} events acked; seed {seed}",
        acked_by_killed.len(),
        to_killed.len()
    );
    let mut reports = vec![report];

    // Its clients resend everything they sent it to host 1.
    let resend = opts(seed + 2, Duration::from_secs(40), DeliverOpts::default().udp_window);
    let report = deliver_to_hosts(&addresses[1..], to_killed, &resend);
    let ctx = format!("seed {seed}; resent to host 1: {}", report.summary());
    eprintln!("{name}: {ctx}");
    assert!(report.unresolved().is_empty(), "{ctx}");
    let accepted_again: Vec<&Key> = acked_by_killed
        .iter()
        .filter(|key| {
            report
                .answers
                .get(key)
                .is_some_and(|statuses| statuses.contains(&St::Accepted))
        })
        .collect();
    assert!(
        accepted_again.is_empty(),
        "{} events host 0 acked were ACCEPTED again by host 1, e.g. {:?}; {ctx}",
        accepted_again.len(),
        &accepted_again[..accepted_again.len().min(5)]
    );
    reports.push(report);
    let report = surviving.join().expect("the delivery to host 1");
    assert!(
        report.unresolved().is_empty(),
        "host 1's own load: {}",
        report.summary()
    );
    reports.push(report);
    let t1 = unix_us();

    let stored = hosts.cluster.read_events("sg");
    let (lost, doubled) = lost_and_doubled(&stored, &acked(&merged_answers(&reports)));
    assert!(
        lost.is_empty() && doubled.is_empty(),
        "lost {lost:?}, stored twice {doubled:?}; {ctx}"
    );
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    check_stored(&stored, &events, &all, PARTITIONS, Some((t0, t1 + 1_000_000)), &ctx);
    assert_eq!(stored.len(), events.len(), "{ctx}");
    check_keys(&hosts.cluster, &stored, &ctx);
}

/// How long a master may be unreachable before its replica is promoted: short, so that the
/// failover test's failover takes a few seconds.
const NODE_TIMEOUT_MS: u32 = 1500;

/// Events per chunk of a load client: what it has outstanding at a time.
const CHUNK_EVENTS: usize = 40;

/// A steady load that a test stops: client threads, each with its own share of the events,
/// sent to its host in chunks of `CHUNK_EVENTS`, each chunk resent until every copy is
/// answered ACCEPTED or DUPLICATE (30 s at most), the next chunk only then, as a game client
/// with a window would.
struct Load {
    stop: Arc<AtomicBool>,
    /// Events of the chunks answered so far, all clients together.
    events_done: Arc<AtomicUsize>,
    clients: Vec<thread::JoinHandle<(Vec<Event>, Vec<DeliveryReport>)>>,
}

impl Load {
    /// `clients` threads, spread over `hosts` in turn.
    fn start(hosts: &[(SocketAddr, SocketAddr)], events: &[Event], clients: usize, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let events_done = Arc::new(AtomicUsize::new(0));
        let clients = events
            .chunks(events.len().div_ceil(clients))
            .enumerate()
            .map(|(client, mine)| {
                let (host, mine) = (hosts[client % hosts.len()], mine.to_vec());
                let (stop, events_done) = (stop.clone(), events_done.clone());
                thread::spawn(move || {
                    let (mut sent, mut reports) = (Vec::new(), Vec::new());
                    for (round, chunk) in mine.chunks(CHUNK_EVENTS).enumerate() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let opts = DeliverOpts {
                            seed: seed ^ ((client as u64) << 32 | round as u64),
                            udp_sockets: 1,
                            tcp_conns: 1,
                            min_copies: 1,
                            max_copies: 2,
                            total_timeout: Duration::from_secs(30),
                            ..DeliverOpts::default()
                        };
                        reports.push(deliver_to_hosts(&[host], chunk, &opts));
                        sent.extend_from_slice(chunk);
                        events_done.fetch_add(chunk.len(), Ordering::Relaxed);
                    }
                    (sent, reports)
                })
            })
            .collect();
        Load {
            stop,
            events_done,
            clients,
        }
    }

    fn events_done(&self) -> usize {
        self.events_done.load(Ordering::Relaxed)
    }

    /// Stops the clients after their current chunk: the events they sent, and their reports.
    fn stop(self) -> (Vec<Event>, Vec<DeliveryReport>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut sent, mut reports) = (Vec::new(), Vec::new());
        for client in self.clients {
            let (client_sent, client_reports) = client.join().expect("a load client");
            sent.extend(client_sent);
            reports.extend(client_reports);
        }
        (sent, reports)
    }
}

/// Waits (up to `timeout`) until `check` holds; the moment it did.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The failover test's `--redis-timeout-ms`: twice the default, so that a call that a busy
/// 2-core machine (six Redis nodes, two hosts, the clients) holds up for a second is not
/// answered RETRY outside the failover.
const FAILOVER_REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// RETRY may still be answered this long after the restarted node is in sync, or start this
/// long after the kill: a call waits up to its deadline (for its script, or for its `WAIT`),
/// then the client's backoff (300 ms at most) and some slack for the busy machine.
const RETRY_AFTER_SYNC_MAX: Duration = Duration::from_secs(4);

/// RETRY answers this close to each other are one episode: within the failover they are at
/// most a call's deadline and a backoff apart.
const RETRY_GAP_MAX: Duration = Duration::from_millis(2500);

/// The failover's RETRY: from the first RETRY at or after `from`, each RETRY that came
/// within `RETRY_GAP_MAX` of the one before. Its first and last moments and its count; and
/// the RETRY after `from` outside it (a loaded 2-core machine times a call out now and then).
fn retry_episode(retries: &[Instant], from: Instant) -> Option<(Instant, Instant, usize, usize)> {
    let after: Vec<Instant> = retries.iter().copied().filter(|&at| at >= from).collect();
    let first = *after.first()?;
    let mut last = first;
    let mut count = 0;
    for &at in &after {
        if at.duration_since(last) > RETRY_GAP_MAX {
            break;
        }
        last = at;
        count += 1;
    }
    Some((first, last, count, after.len() - count))
}

// With `--durability replica`, two hosts store a steady load on the cluster; one master is
// killed with `kill -9`, its replica is promoted (`cluster-node-timeout` 1.5 s), and the
// killed node is started again on its port and data dir 2 s later, as a supervisor would,
// and rejoins as a replica. No acked event is lost, none is stored twice, RETRY is answered
// only from the kill until shortly after the node is back in sync, the load is stored again
// after it, and the hosts' logs say what happened. Prints the counts.
#[test]
fn a_master_killed_under_load_fails_over_without_losing_an_acked_event() {
    let _turn = take_turn(module_path!());
    let name = "a_master_killed_under_load_fails_over_without_losing_an_acked_event";
    let seed = test_seed(name);
    let Some(mut hosts) = Hosts::start(name, 2, NODE_TIMEOUT_MS, |builder| {
        builder
            .arg("--durability", "replica")
            .arg("--redis-timeout-ms", FAILOVER_REDIS_TIMEOUT.as_millis())
    }) else {
        return;
    };
    hosts.cluster.wait_replicas_online(Duration::from_secs(30));
    let mut rng = StdRng::seed_from_u64(seed);
    let events = random_events(&mut rng, 40_000, 128);
    let victim = hosts.cluster.masters()[0];
    let heir = hosts.cluster.replica_of(victim);

    let load = Load::start(&hosts.addresses(), &events, 6, seed);
    thread::sleep(Duration::from_secs(2));
    let done_before_kill = load.events_done();
    hosts.cluster.node_mut(victim).kill();
    let killed_at = Instant::now();
    let promoted_at = wait_for("the replica promoted", Duration::from_secs(20), || {
        hosts.cluster.node(heir).role() == "master"
    });
    thread::sleep(Duration::from_secs(2));
    hosts.cluster.node_mut(victim).restart();
    let restarted_at = Instant::now();
    wait_for("the killed node back as a replica", Duration::from_secs(30), || {
        hosts.cluster.node(victim).role() == "slave"
    });
    hosts.cluster.wait_replicas_online(Duration::from_secs(30));
    let synced_at = Instant::now();
    let done_at_sync = load.events_done();
    thread::sleep(Duration::from_secs(3));
    let done_after_sync = load.events_done() - done_at_sync;
    let (sent, reports) = load.stop();

    // The counts, before anything is asserted.
    let answers = merged_answers(&reports);
    let acked_under_load = acked(&answers);
    let mut retries: Vec<Instant> = reports
        .iter()
        .flat_map(|report| report.retries_at.iter().copied())
        .collect();
    retries.sort();
    let retries_before_kill = retries.iter().filter(|&&at| at < killed_at).count();
    let (first_retry, last_retry, failover_retries, other_retries) =
        retry_episode(&retries, killed_at).unwrap_or((killed_at, killed_at, 0, 0));
    let last_retry_after_sync = last_retry.saturating_duration_since(synced_at);
    let stored_under_load = hosts.cluster.read_events("sg");
    let (lost, doubled) = lost_and_doubled(&stored_under_load, &acked_under_load);
    let mut retry_causes = String::new();
    for index in 0..hosts.servers.len() {
        let body = hosts.metrics(index);
        for cause in [
            "redis_down",
            "redis_error",
            "replica_unconfirmed",
            "overload",
            "in_flight_copy",
        ] {
            let count = metric_sum(&body, "shardgate_retries_total", &[("cause", cause)]);
            retry_causes += &format!(" host{index}.{cause}={count}");
        }
    }
    eprintln!(
        "{name}: seed {seed}; killed master {victim} after {done_before_kill} events; its replica {heir} promoted {:.1?} later; \
         {victim} restarted {:.1?} after the kill, a replica in sync {:.1?} after it; {done_after_sync} events stored in the 3 s after",
        promoted_at - killed_at,
        restarted_at - killed_at,
        synced_at - killed_at,
    );
    eprintln!(
        "{name}: COUNTS sent={} acked={} stored={} lost={} stored_twice={} retry_during_failover={failover_retries} \
         retry_from={:.2?} retry_until={:.2?} (after the kill; retry_duration={:.2?}, the killed node in sync at {:.2?}) \
         retry_before_kill={retries_before_kill} retry_after_failover={other_retries}; RETRY by cause:{retry_causes}",
        sent.len(),
        acked_under_load.len(),
        stored_under_load.len(),
        lost.len(),
        doubled.len(),
        first_retry - killed_at,
        last_retry - killed_at,
        last_retry - first_retry,
        synced_at - killed_at,
    );

    let ctx = format!("seed {seed}");
    assert!(lost.is_empty(), "acked events not stored: {lost:?}; {ctx}");
    assert!(doubled.is_empty(), "events stored twice: {doubled:?}; {ctx}");
    assert!(failover_retries > 0, "no RETRY after the kill: it hit nothing; {ctx}");
    assert!(
        first_retry - killed_at <= RETRY_AFTER_SYNC_MAX,
        "the first RETRY came {:?} after the kill: an episode of its own, not the failover; {ctx}",
        first_retry - killed_at
    );
    assert!(
        last_retry_after_sync <= RETRY_AFTER_SYNC_MAX,
        "RETRY answered {last_retry_after_sync:?} after the killed node was back in sync; {ctx}"
    );
    // After it the load is stored again; a loaded machine still times out a call now and
    // then, so some RETRY may follow, but no more than the events stored meanwhile.
    assert!(
        done_after_sync > 0 && other_retries <= done_after_sync,
        "{done_after_sync} events stored in the 3 s after the failover, {other_retries} RETRY after it; {ctx}"
    );

    // What the load left unanswered is resent until stored: every sent event is in Redis
    // once, and nothing else.
    let report = deliver_to_hosts(
        &hosts.addresses(),
        &sent,
        &DeliverOpts {
            seed: seed + 1,
            total_timeout: Duration::from_secs(30),
            ..DeliverOpts::default()
        },
    );
    let ctx = format!("seed {seed}; resend: {}", report.summary());
    assert!(report.unresolved().is_empty(), "{ctx}");
    hosts.cluster.wait_ok(Duration::from_secs(20));
    let stored = hosts.cluster.read_events("sg");
    let all: HashSet<Key> = sent.iter().map(Event::key).collect();
    check_stored(&stored, &sent, &all, PARTITIONS, None, &ctx);
    assert_eq!(stored.len(), sent.len(), "{ctx}");
    check_keys(&hosts.cluster, &stored, &ctx);

    // The hosts' logs: the connection lost and back, the new master by its address, and the
    // promise `--durability replica` could not keep while the new master had no replica.
    let heir_address = hosts.cluster.node(heir).address();
    let victim_address = hosts.cluster.node(victim).address();
    let lines: Vec<String> = hosts.servers.iter().flat_map(Server::stderr_lines).collect();
    for line in lines.iter().filter(|line| line.contains("redis")) {
        eprintln!("{name}: log: {line}");
    }
    let logged = |text: &str| lines.iter().any(|line| line.contains(text));
    assert!(
        lines.iter().any(|line| line.contains("redis cluster masters changed")
            && line.contains(&format!("gone={victim_address}"))
            && line.contains(&format!("came={heir_address}"))),
        "no host logged the new master {heir_address} in place of {victim_address}"
    );
    assert!(
        logged("redis connection lost") || logged("redis script calls failed"),
        "no host logged the failed calls"
    );
}
