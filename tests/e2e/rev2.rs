//! Proves the rules that protocol revision 2 added, end to end against a real Redis:
//! one event that Redis refuses fails alone (RETRY, no marker) while the rest of its batch is
//! stored; the partition count is recorded under the prefix and a server with another count
//! exits 2, at start or once a late Redis comes; a second SIGTERM during the drain exits at
//! once with code 130; and a /metrics client that never finishes its request cannot hold
//! the endpoint.

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use shardgate_client::resend::{Due, Limits, Outstanding, Schedule, Waits};

const PARTITIONS: u64 = 16;
/// The partition whose stream key the tests turn into a string.
const BROKEN_PARTITION: u64 = 3;

fn redis_set(conn: &mut redis::Connection, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("SET {key}: {e}"));
}

fn redis_get(conn: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

/// How long a round waits for the answers to its copies.
const ROUND_ANSWER_WAIT: Duration = Duration::from_secs(3);
/// The pause between one round's answers and the next round's copies.
const ROUND_GAP: Duration = Duration::from_millis(50);

/// Sends the events in rounds over one UDP socket and collects the answers, until each event in
/// `settle` has a stored answer or `rounds` rounds went by. Returns every answer per event id.
///
/// A round sends every copy that is due at once (6 frames a datagram, so that they share
/// batches), reads answers until each of its copies was answered or `ROUND_ANSWER_WAIT` passed,
/// then pauses `ROUND_GAP`. The one resend loop (`shardgate_client::resend::Outstanding`) decides
/// what each answer means and which copies are due; its waits are the round's (no answer in
/// `ROUND_ANSWER_WAIT`, or a RETRY and `ROUND_GAP`), so every event neither stored nor rejected
/// is due again at the next round, and they all go out together again.
fn exchange_rounds(server: &Server, events: &[Event], settle: &HashSet<Key>, rounds: usize) -> HashMap<Key, Vec<St>> {
    assert!(rounds > 0, "a round sends the first copies");
    let waits = Waits {
        answer: Schedule::new(ROUND_ANSWER_WAIT, ROUND_ANSWER_WAIT, 0),
        retry: Schedule::new(ROUND_GAP, ROUND_GAP, 0),
    };
    // One copy per round.
    let limits = Limits {
        attempts_max: Some(u32::try_from(rounds).expect("a few rounds")),
        give_up_after_ns: None,
    };
    // Payload: the event's index in `events`.
    let mut table: Outstanding<usize> = Outstanding::new(events.len(), waits, limits);
    let origin = Instant::now();
    let now_ns = || origin.elapsed().as_nanos() as u64;
    let mut client = UdpClient::new(server.udp_addr());
    let mut answers: HashMap<Key, Vec<St>> = HashMap::new();
    let mut due: Vec<usize> = (0..events.len()).collect();
    for (index, event) in events.iter().enumerate() {
        let now = now_ns();
        table
            .first_sent(event_id(event.key()), index, now, now, 0)
            .expect("one entry per event, room for all");
    }
    while due.iter().any(|&index| settle.contains(&events[index].key())) {
        for chunk in due.chunks(6) {
            let mut datagram = Vec::new();
            for &index in chunk {
                events[index].encode_into(&mut datagram);
            }
            client.send_frames(&datagram);
        }
        // Until every copy of the round is answered: then each event left is paused by a RETRY.
        let deadline = Instant::now() + ROUND_ANSWER_WAIT;
        while table.entries().any(|entry| !entry.paused) && Instant::now() < deadline {
            for ack in client.try_recv() {
                answers.entry(ack.key()).or_default().push(ack.status);
                // Unknown: a late answer to a copy of an event already ended.
                table.answered(event_id(ack.key()), wire_status(ack.status), now_ns(), 0);
            }
        }
        thread::sleep(ROUND_GAP);
        due.clear();
        while let Some(next) = table.pop_due(now_ns(), 0) {
            // Due::Ended: the last round's copy was not answered; the event is done.
            if let Due::Resend { id, .. } = next {
                due.push(table.get(id).expect("a resent event is outstanding").payload);
            }
        }
    }
    answers
}

// With `SET sg:{3}:events x` in place, partition 3's events get RETRY and leave no marker while every other event (in the same batches) is ACCEPTED and stored; Redis refusals are counted and logged once; after DEL a resend stores each exactly once.
#[test]
fn an_event_redis_refuses_fails_alone() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("an_event_redis_refuses_fails_alone");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    let broken_key = format!("sg:{{{BROKEN_PARTITION}}}:events");
    redis_set(&mut conn, &broken_key, "x");
    let mut server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--batch-linger-us", 2000)
        .start();
    let metrics = serving_metrics_address(&server);

    // 10 players per partition, 2 events each: partition 3 has 20 of the 320.
    let events: Vec<Event> = (0..320u64)
        .map(|index| Event::random(&mut rng, 5_000 + index % 160, 1 + index / 160, 200))
        .collect();
    let (broken, healthy): (Vec<&Event>, Vec<&Event>) = events
        .iter()
        .partition(|event| event.player % PARTITIONS == BROKEN_PARTITION);
    let healthy_keys: HashSet<Key> = healthy.iter().map(|event| event.key()).collect();
    let answers = exchange_rounds(&server, &events, &healthy_keys, 5);

    let context = format!("seed {seed}; answers {answers:?}");
    for event in &healthy {
        let got = answers.get(&event.key()).map(Vec::as_slice).unwrap_or(&[]);
        assert!(!got.is_empty(), "event {:?} was never answered; {context}", event.key());
        // DUPLICATE only after a RETRY whose write had landed (RETRY means "not confirmed").
        let (last, before) = got.split_last().expect("an answer");
        assert!(
            before.iter().all(|&st| st == St::Retry)
                && (*last == St::Accepted || (*last == St::Duplicate && !before.is_empty())),
            "event {:?} of a healthy partition: expected ACCEPTED (after RETRY at most), got {got:?}; {context}",
            event.key()
        );
    }
    let mut broken_retries = 0u64;
    for event in &broken {
        let got = answers.get(&event.key()).map(Vec::as_slice).unwrap_or(&[]);
        assert!(
            !got.is_empty() && got.iter().all(|&st| st == St::Retry),
            "event {:?} of the broken partition: expected only RETRY, got {got:?}; {context}",
            event.key()
        );
        broken_retries += got.len() as u64;
    }

    // No marker is left for a refused event, and the key still holds the string.
    let markers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("sg:{{{BROKEN_PARTITION}}}:seen:*"))
        .query(&mut conn)
        .expect("KEYS");
    assert!(markers.is_empty(), "refused events left markers: {markers:?}");
    let key_type: String = redis::cmd("TYPE").arg(&broken_key).query(&mut conn).expect("TYPE");
    assert_eq!(key_type, "string");

    // The refusals are counted one by one, the calls themselves all succeeded.
    let body = scrape_metrics(metrics);
    let wrong_type = metric_sum(&body, "shardgate_redis_event_errors_total", &[("reason", "wrong_type")]);
    let call_errors = metric_sum(&body, "shardgate_redis_errors_total", &[]);
    assert_eq!(
        wrong_type, broken_retries,
        "one wrong_type event error per RETRY of the broken partition"
    );
    assert_eq!(call_errors, 0, "no whole call failed");

    // One rate-limited warning names the key.
    let warnings: Vec<String> = server
        .stderr_lines()
        .into_iter()
        .filter(|line| line.contains("redis refused events one by one"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning per 10 s, not one per event: {warnings:?}"
    );
    assert!(
        warnings[0].contains(&broken_key) && warnings[0].contains("WRONGTYPE"),
        "the warning names the key and the error: {warnings:?}"
    );

    // Fixed: resending stores each refused event exactly once (and the rest stay once).
    redis::cmd("DEL").arg(&broken_key).query::<()>(&mut conn).expect("DEL");
    let report = deliver_resolved(&server, &events, seed, Duration::from_secs(30));
    for event in &broken {
        let got = &report.answers[&event.key()];
        assert!(
            got.contains(&St::Accepted),
            "refused event {:?} was ACCEPTED once its key was fixed: {got:?}",
            event.key()
        );
    }
    let stored = read_events(&mut conn, "sg", PARTITIONS);
    let all_keys: HashSet<Key> = events.iter().map(Event::key).collect();
    let stored_keys = check_stored(&stored, &events, &all_keys, PARTITIONS, None, &format!("seed {seed}"));
    assert_eq!(stored_keys.len(), events.len());

    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

/// `serve` arguments for `redis_url` with these partitions and prefix; the builder holds
/// the temp dir they point into.
fn serve_args(redis_url: &str, partitions: u32, prefix: &str) -> (ServerBuilder, Vec<String>) {
    let builder = Server::builder(redis_url)
        .arg("--partitions", partitions)
        .arg("--prefix", prefix);
    let args = builder.args();
    (builder, args)
}

fn assert_refused(run: &CliRun, recorded: u32, configured: u32) {
    assert_eq!(
        run.code(),
        Some(2),
        "a server with another partition count exits 2: {run:?}"
    );
    assert!(
        !run.stderr.contains("shardgate: serving"),
        "it exits before serving: {}",
        run.stderr
    );
    for needle in [
        format!("--partitions {recorded}"),
        format!("--partitions {configured}"),
        "--prefix".to_string(),
    ] {
        assert!(
            run.stderr.contains(&needle),
            "the message gives both counts and the way forward ({needle:?} missing): {}",
            run.stderr
        );
    }
}

// The first server records its partition count under its prefix; a server with another count exits 2 before serving, saying both counts and the way forward; the same count, or a new prefix, starts.
#[test]
fn a_changed_partition_count_is_refused_at_start() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    let mut first = Server::builder(&redis.url()).arg("--partitions", 16).start();
    deliver_resolved(&first, &[Event::new(1, 1, b"first")], 1, Duration::from_secs(15));
    assert_eq!(redis_get(&mut conn, "sg:partitions").as_deref(), Some("16"));
    first.terminate();
    assert!(first.wait_exit(Duration::from_secs(10)).success());

    let (_builder, args) = serve_args(&redis.url(), 8, "sg");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_cli(&args, Duration::from_secs(20));
    assert_refused(&run, 16, 8);
    assert_eq!(
        redis_get(&mut conn, "sg:partitions").as_deref(),
        Some("16"),
        "the refused server changed nothing"
    );

    // The ways forward: the recorded count, or another prefix with its own count.
    let mut same = Server::builder(&redis.url()).arg("--partitions", 16).start();
    let report = deliver_resolved(&same, &[Event::new(1, 1, b"first")], 2, Duration::from_secs(15));
    assert_eq!(
        report.counts.duplicate,
        1,
        "the same count finds the marker: {}",
        report.summary()
    );
    same.terminate();
    assert!(same.wait_exit(Duration::from_secs(10)).success());
    let mut other = Server::builder(&redis.url())
        .arg("--partitions", 8)
        .arg("--prefix", "sg2")
        .start();
    deliver_resolved(&other, &[Event::new(1, 1, b"first")], 3, Duration::from_secs(15));
    assert_eq!(redis_get(&mut conn, "sg2:partitions").as_deref(), Some("8"));
    other.terminate();
    assert!(other.wait_exit(Duration::from_secs(10)).success());
}

// A server started while Redis is down serves (answering RETRY); when Redis comes with a recorded count that differs, the server exits 2 with the message.
#[test]
fn a_late_redis_with_another_partition_count_stops_the_server() {
    let _turn = take_turn(module_path!());
    let mut redis = RedisServer::start_with_aof();
    redis_set(&mut redis.connection(), "sg:partitions", "16");
    redis.kill();
    let mut server = Server::builder(&redis.url()).arg("--partitions", 8).start();
    // While Redis is away the server answers RETRY.
    let mut client = UdpClient::new(server.udp_addr());
    client.send_frames(&Event::new(1, 1, b"early").frame());
    let acks = client.recv_acks_until(Instant::now() + Duration::from_secs(3), 1);
    assert!(
        acks.iter().all(|ack| ack.status == St::Retry),
        "nothing is stored while Redis is away: {acks:?}"
    );
    assert!(server.is_alive());

    redis.restart();
    let started = Instant::now();
    let status = server.wait_exit(Duration::from_secs(15));
    println!("exited {status} {:?} after Redis came back", started.elapsed());
    assert_eq!(status.code(), Some(2), "exit code 2 once the count is known to differ");
    let stderr = server.stderr_lines().join("\n");
    assert!(
        stderr.contains("--partitions 16") && stderr.contains("--partitions 8"),
        "the message gives both counts: {stderr}"
    );
    assert_eq!(
        redis_get(&mut redis.connection(), "sg:partitions").as_deref(),
        Some("16")
    );
    let streams = stream_keys(&mut redis.connection());
    assert!(streams.is_empty(), "the server stored nothing: {streams:?}");
}

// A second SIGTERM while the drain waits on a stalled Redis exits at once with code 130 and says how many events it abandoned.
#[test]
fn a_second_sigterm_cuts_the_drain_short() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let mut server = Server::builder(&redis.url())
        .arg("--drain-timeout-ms", 30_000)
        .arg("--redis-timeout-ms", 30_000)
        .start();
    deliver_resolved(&server, &[Event::new(1, 1, b"warm-up")], 1, Duration::from_secs(15));

    redis.pause();
    let client = UdpClient::new(server.udp_addr());
    let events: Vec<Event> = (0..50).map(|seq| Event::new(2, seq, b"stalled")).collect();
    for chunk in events.chunks(5) {
        let mut datagram = Vec::new();
        for event in chunk {
            event.encode_into(&mut datagram);
        }
        client.send_frames(&datagram);
    }
    // The batches reach the stalled Redis and wait there.
    thread::sleep(Duration::from_millis(500));

    server.terminate();
    thread::sleep(Duration::from_millis(700));
    assert!(
        server.is_alive(),
        "the first SIGTERM drains: it waits for the stalled calls"
    );
    let second = Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(5));
    let took = second.elapsed();
    redis.resume();
    println!("second SIGTERM: exit {status} after {took:?}");
    assert_eq!(status.code(), Some(130), "a second signal exits 130");
    assert!(
        took < Duration::from_millis(1500),
        "at once, not after the drain: {took:?}"
    );
    let stderr = server.stderr_lines().join("\n");
    let abandoned = server
        .stderr_lines()
        .iter()
        .find_map(|line| {
            let (before, _) = line.split_once(" events abandoned")?;
            before.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no \"N events abandoned\" line: {stderr}"));
    assert!(
        (1..=50).contains(&abandoned),
        "the stalled events are counted as abandoned ({abandoned}): {stderr}"
    );
}

/// A /metrics client that sends one byte a second and never ends its request. Returns how
/// long after connecting the server closed it, if it did within `for_how_long`.
fn slow_metrics_client(address: std::net::SocketAddr, for_how_long: Duration) -> Option<Duration> {
    let mut stream = TcpStream::connect(address).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    let connected = Instant::now();
    let request = b"GET /metrics HTTP/1.1\r\nHost: slow\r\n";
    let mut buffer = [0u8; 1024];
    for byte in request.iter().cycle() {
        if connected.elapsed() > for_how_long {
            return None;
        }
        if stream.write_all(&[*byte]).is_err() {
            return Some(connected.elapsed());
        }
        // The read paces the client at a byte a second, and sees the server close.
        match stream.read(&mut buffer) {
            Ok(0) => return Some(connected.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(connected.elapsed()),
        }
    }
    None
}

// A /metrics client that sends one byte a second and never finishes its request does not block another scrape for more than its 2 s deadline.
#[test]
fn a_slow_metrics_client_cannot_hold_the_endpoint() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url()).arg("--metrics", "127.0.0.1:0").start();
    let address = serving_metrics_address(&server);
    let slow = thread::spawn(move || slow_metrics_client(address, Duration::from_secs(10)));
    thread::sleep(Duration::from_millis(300));
    for scrape in 0..2 {
        let started = Instant::now();
        let body = scrape_metrics(address);
        let took = started.elapsed();
        println!("scrape {scrape} beside the slow client took {took:?}");
        assert!(body.contains("shardgate_build_info"), "a whole exposition: {body}");
        assert!(
            took < Duration::from_secs(3),
            "scrape {scrape} waited {took:?} behind a client that never finishes"
        );
    }
    let closed_after = slow.join().expect("slow client thread");
    println!("the slow client was closed after {closed_after:?}");
    assert!(
        closed_after.is_some_and(|after| after < Duration::from_secs(4)),
        "the server closes a request that passed its 2 s deadline: {closed_after:?}"
    );
}

// SIGTERM while Redis stalls and the Redis client still holds every batch (calls past their deadline) ends the drain by --drain-timeout-ms: the open batch is answered RETRY unsent and the server exits 0.
#[test]
fn a_drain_ends_while_every_batch_is_held() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let mut server = Server::builder(&redis.url())
        .arg("--batch-events-max", 4)
        .arg("--batches-in-flight-max", 2)
        .arg("--drain-timeout-ms", 1000)
        .start();
    deliver_resolved(&server, &[Event::new(1, 1, b"warm-up")], 1, Duration::from_secs(15));

    redis.pause();
    // Two full batches go to the stalled Redis, the third fills the open batch and waits.
    let mut client = UdpClient::new(server.udp_addr());
    let events: Vec<Event> = (0..12).map(|seq| Event::new(2, seq, b"held")).collect();
    for event in &events {
        client.send_frames(&event.frame());
    }
    // The two calls pass their 1 s deadline (RETRY); the Redis client keeps their batches.
    let mut answers = client.recv_acks(Instant::now() + Duration::from_millis(1500));
    let signalled = Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    answers.extend(client.recv_acks(Instant::now() + Duration::from_millis(300)));
    redis.resume();
    println!("exit {status} {took:?} after SIGTERM; answers {answers:?}");
    assert!(status.success(), "a drain cut by its deadline still exits 0: {status}");
    assert!(
        took < Duration::from_secs(4),
        "the drain ends by its 1 s deadline, not when Redis comes back: {took:?}"
    );
    for event in &events {
        let got: Vec<St> = answers
            .iter()
            .filter(|ack| ack.key() == event.key())
            .map(|ack| ack.status)
            .collect();
        assert_eq!(got, vec![St::Retry], "event {:?}: one RETRY", event.key());
    }
}

// A Redis that may evict keys (any maxmemory-policy but noeviction) is refused at start, exit 2, naming the policy and the fix, since an evicted marker lets a late copy be stored twice; with noeviction the same server starts and stores.
#[test]
fn a_redis_that_may_evict_markers_is_refused_at_start() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let mut conn = redis.connection();
    for policy in ["volatile-ttl", "allkeys-lru"] {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query::<()>(&mut conn)
            .expect("CONFIG SET");
        let (_builder, args) = serve_args(&redis.url(), PARTITIONS as u32, "sg");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = run_cli(&args, Duration::from_secs(20));
        assert_eq!(run.code(), Some(2), "refused under {policy}: {run:?}");
        assert!(!run.stderr.contains("shardgate: serving"), "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("maxmemory-policy {policy}"))
                && run.stderr.contains("maxmemory-policy noeviction"),
            "names the policy and the fix: {}",
            run.stderr
        );
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query::<()>(&mut conn)
        .expect("CONFIG SET");
    let mut server = Server::builder(&redis.url()).start();
    let report = deliver_resolved(&server, &[Event::new(5, 1, b"kept")], 4, Duration::from_secs(15));
    assert_eq!(report.counts.accepted, 1, "{}", report.summary());
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
