//! Proves that one UDP source flooding a shard cannot hurt a well-behaved client: while one
//! source sends valid frames, frames with a bad crc and garbage as fast as it can (for
//! SHARDGATE_FLOOD_SECS, 10 s by default, loopback only), a client at a modest rate on the
//! same shard gets every one of its events answered ACCEPTED or DUPLICATE (resending on RETRY
//! and on silence, as a real client does) and each is stored exactly once; the flooder gets
//! no more stored than its token bucket allows. None of the flood's bad-crc frames or
//! header-like garbage is answered (protocol revision 2: REJECTED names only an id whose crc
//! matched); they are counted as corrupt or unparseable.
//!
//! The flooder sends from 127.0.0.2, the client from 127.0.0.1: two hosts to the per-source
//! limit, on one server of one shard.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate::wire::frame::{EventId, Status};
use shardgate_client::resend::{Due, Limits, Outstanding, Schedule, Verdict, Waits};

const FLOODER: [u8; 4] = [127, 0, 0, 2];
const CLIENT: [u8; 4] = [127, 0, 0, 1];
const FLOOD_PLAYER: u64 = 7_000_000;
const CLIENT_PLAYER_BASE: u64 = 1_000;
const CLIENT_PLAYERS: u64 = 50;
/// The well-behaved client's fresh events per second.
const CLIENT_RATE_PER_SEC: u64 = 300;
/// The flooder's share: small next to what even a debug build stores, so the test shows the
/// bucket at work rather than the shard's own capacity.
const SOURCE_FRAMES_PER_SEC: u64 = 1_000;
const SOURCE_BURST_FRAMES: u64 = 2_000;
const FRAMES_PER_FLOOD_DATAGRAM: u64 = 16;
/// A client resends a frame that got no answer in this long.
const ACK_TIMEOUT: Duration = Duration::from_millis(300);

fn flood_seconds() -> u64 {
    std::env::var("SHARDGATE_FLOOD_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10)
}

/// The flooder's valid event number `seq`: fixed fields, so a stored one can be rebuilt.
fn flood_event(seq: u64) -> Event {
    Event {
        player: FLOOD_PLAYER,
        seq,
        client_time_us: seq,
        action_type: 7,
        payload: Vec::new(),
    }
}

#[derive(Default, Debug)]
struct FloodCounts {
    datagrams: u64,
    valid_frames: u64,
    elapsed: Duration,
}

/// Datagrams the flooder builds before it starts and then sends round and round, so that its
/// rate is that of the send calls, not of encoding.
const FLOOD_DATAGRAMS: usize = 8_192;

/// The flood, built ahead: in turn a datagram of valid frames (distinct ids), of frames with a
/// bad crc, of random bytes, and of bytes that start like a header.
fn flood_datagrams(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_seq = 0u64;
    (0..FLOOD_DATAGRAMS)
        .map(|index| {
            let mut datagram = Vec::with_capacity(1024);
            match index % 4 {
                0 => {
                    for _ in 0..FRAMES_PER_FLOOD_DATAGRAM {
                        flood_event(next_seq).encode_into(&mut datagram);
                        next_seq += 1;
                    }
                }
                1 => {
                    for _ in 0..FRAMES_PER_FLOOD_DATAGRAM {
                        let mut raw = flood_event(u64::MAX - rng.gen_range(0..1_000_000)).raw();
                        raw.crc_xor = rng.gen_range(1..u32::MAX);
                        datagram.extend_from_slice(&raw.bytes());
                    }
                }
                2 => {
                    datagram.resize(rng.gen_range(1..1400), 0);
                    rng.fill(&mut datagram[..]);
                }
                _ => {
                    datagram.extend_from_slice(b"SG\x01\x01");
                    datagram.resize(rng.gen_range(36..200), 0);
                    rng.fill(&mut datagram[4..]);
                }
            }
            datagram
        })
        .collect()
}

/// Sends `datagrams` round and round until `until` (or `stop`), as fast as one thread can.
fn flood(server: std::net::SocketAddr, datagrams: &[Vec<u8>], until: Instant, stop: Arc<AtomicBool>) -> FloodCounts {
    let socket = udp_socket_from(FLOODER);
    let mut counts = FloodCounts::default();
    let started = Instant::now();
    'flood: loop {
        for (index, datagram) in datagrams.iter().enumerate() {
            // Checking the clock every datagram would cost more than the send.
            if index % 256 == 0 && (stop.load(Ordering::Relaxed) || Instant::now() >= until) {
                break 'flood;
            }
            // A loopback send fails only for a full buffer (ENOBUFS): the flood goes on.
            let _ = socket.send_to(datagram, server);
            counts.datagrams += 1;
            if index % 4 == 0 {
                counts.valid_frames += FRAMES_PER_FLOOD_DATAGRAM;
            }
        }
    }
    counts.elapsed = started.elapsed();
    counts
}

#[derive(Default)]
struct ClientReport {
    latencies_us: Vec<u64>,
    lost: Vec<Key>,
    sends: u64,
    retries: u64,
    timeouts: u64,
}

/// Sends `events` at CLIENT_RATE_PER_SEC, each resent on RETRY (with backoff) and on silence,
/// until every one is answered ACCEPTED or DUPLICATE or `deadline`. The one resend loop
/// (`shardgate_client::resend::Outstanding`) decides; this client only sends and reads.
fn well_behaved_client(server: std::net::SocketAddr, events: &[Event], deadline: Instant) -> ClientReport {
    let socket: UdpSocket = udp_socket_from(CLIENT);
    socket
        .set_read_timeout(Some(Duration::from_millis(1)))
        .expect("read timeout");
    let mut report = ClientReport::default();
    // Silence: resent every ACK_TIMEOUT. RETRY: 20 ms after the first copy, doubling to 160 ms.
    let waits = Waits {
        answer: Schedule::new(ACK_TIMEOUT, ACK_TIMEOUT, 0),
        retry: Schedule::new(Duration::from_millis(20), Duration::from_millis(160), 0),
    };
    // Payload: the event's index in `events`.
    let mut pending: Outstanding<usize> = Outstanding::new(events.len(), waits, Limits::default());
    let frames: Vec<Vec<u8>> = events.iter().map(Event::frame).collect();
    let started = Instant::now();
    let now_ns = || started.elapsed().as_nanos() as u64;
    let mut next = 0usize;
    let mut reply = [0u8; 2048];
    let send = |frame: &[u8], report: &mut ClientReport| {
        let _ = socket.send_to(frame, server);
        report.sends += 1;
    };
    while (next < events.len() || !pending.is_empty()) && Instant::now() < deadline {
        let due = (started.elapsed().as_secs_f64() * CLIENT_RATE_PER_SEC as f64) as usize;
        while next < events.len() && next <= due {
            send(&frames[next], &mut report);
            let (key, at_ns) = (events[next].key(), now_ns());
            let id = EventId {
                player_id: key.0,
                seq: key.1,
            };
            pending
                .first_sent(id, next, at_ns, at_ns, 0)
                .expect("room for every event");
            next += 1;
        }
        while let Some(due) = pending.pop_due(now_ns(), 0) {
            // No limits are set, so nothing ends unconfirmed.
            if let Due::Resend { id, timed_out, .. } = due {
                report.timeouts += u64::from(timed_out);
                send(&frames[pending.get(id).expect("just resent").payload], &mut report);
            }
        }
        if let Ok((length, _)) = socket.recv_from(&mut reply) {
            for ack in parse_acks(&reply[..length]) {
                let id = EventId {
                    player_id: ack.player,
                    seq: ack.seq,
                };
                let status = match ack.status {
                    St::Accepted => Status::Accepted,
                    St::Duplicate => Status::Duplicate,
                    St::Retry => Status::Retry,
                    St::Rejected => panic!("a valid frame was REJECTED: {:?}", ack.key()),
                };
                report.retries += u64::from(ack.status == St::Retry);
                // Unknown: the answer to a copy of an event already answered.
                if let Verdict::Ended(ending) = pending.answered(id, status, now_ns(), 0) {
                    report.latencies_us.push(ending.latency_ns / 1_000);
                }
            }
        }
    }
    report.lost = pending.entries().map(|entry| events[entry.payload].key()).collect();
    report.lost.sort();
    report
}

fn percentile(sorted: &[u64], quantile: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1]
}

// A source flooding valid and garbage frames at full speed leaves a 300/s client on the same shard losing nothing, each of its events stored exactly once, and gets no more than its bucket stored.
#[test]
fn flood_from_one_source_does_not_hurt_a_well_behaved_client() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("flood_from_one_source_does_not_hurt_a_well_behaved_client");
    let flood_for = Duration::from_secs(flood_seconds());
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--udp-source-frames-per-sec", SOURCE_FRAMES_PER_SEC)
        .arg("--udp-source-burst-frames", SOURCE_BURST_FRAMES)
        .start();
    let metrics = serving_metrics_address(&server);
    // Redis connects after `serving`: wait until a frame from a third host is stored.
    let probe = udp_socket_from([127, 0, 0, 3]);
    probe.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let started = Instant::now();
    let mut reply = [0u8; 2048];
    loop {
        probe
            .send_to(&Event::new(1, 1, b"probe").frame(), server.udp_addr())
            .unwrap();
        let stored = probe
            .recv_from(&mut reply)
            .is_ok_and(|(length, _)| parse_acks(&reply[..length]).iter().any(|ack| ack.status.is_stored()));
        if stored {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server never stored a frame"
        );
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let client_events: Vec<Event> = (0..CLIENT_RATE_PER_SEC * flood_for.as_secs())
        .map(|seq| Event::random(&mut rng, CLIENT_PLAYER_BASE + seq % CLIENT_PLAYERS, seq, 200))
        .collect();
    // The flood is in full swing before the client starts, and ends with the client's sends.
    let datagrams = flood_datagrams(seed ^ 0xf100d);
    let flood_until = Instant::now() + Duration::from_millis(300) + flood_for;
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let (udp, stop) = (server.udp_addr(), Arc::clone(&stop));
        thread::spawn(move || flood(udp, &datagrams, flood_until, stop))
    };
    thread::sleep(Duration::from_millis(300));
    let client = well_behaved_client(
        server.udp_addr(),
        &client_events,
        Instant::now() + flood_for + Duration::from_secs(60),
    );
    stop.store(true, Ordering::Relaxed);
    let flood = flooder.join().expect("flooder thread");
    // Late answers and the flood's tail settle before the counts are read.
    thread::sleep(Duration::from_secs(1));

    let body = scrape_metrics(metrics);
    let limited = metric_sum(&body, "shardgate_frames_limited_total", &[("transport", "udp")]);
    let kernel_drops = metric_sum(&body, "shardgate_udp_kernel_drops_total", &[]);
    let corrupt = metric_sum(&body, "shardgate_frames_corrupt_total", &[("transport", "udp")]);
    let rejected = metric_sum(&body, "shardgate_frames_rejected_total", &[("transport", "udp")]);
    let mut latencies = client.latencies_us.clone();
    latencies.sort_unstable();
    println!(
        "flood: {} datagrams, {} valid frames in {:?} ({:.0} datagrams/s); server: {limited} frames limited, \
         {kernel_drops} datagrams dropped by the kernel, {corrupt} frames corrupt, {rejected} REJECTED",
        flood.datagrams,
        flood.valid_frames,
        flood.elapsed,
        flood.datagrams as f64 / flood.elapsed.as_secs_f64()
    );
    println!(
        "client: {} events, {} sends, {} RETRY, {} timeouts, lost {}; latency p50 {} us, p99 {} us, p99.9 {} us, \
         max {} us",
        client_events.len(),
        client.sends,
        client.retries,
        client.timeouts,
        client.lost.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(0)
    );

    assert!(
        client.lost.is_empty(),
        "{} of the client's events were never answered stored, e.g. {:?}",
        client.lost.len(),
        &client.lost[..client.lost.len().min(10)]
    );
    assert!(limited > 0, "the flood was never limited");
    assert!(corrupt > 0, "no bad-crc frame of the flood was counted corrupt");
    assert_eq!(
        rejected, 0,
        "the flood sends no frame whose crc matches and is invalid, so nothing may be REJECTED"
    );

    // Redis: each of the client's events exactly once; the flood's stored events are its own
    // valid frames, no more than its bucket let through.
    let stored = read_events(&mut redis.connection(), "sg", 16);
    let flood_stored: Vec<u64> = stored
        .iter()
        .filter(|event| event.player == FLOOD_PLAYER)
        .map(|event| event.seq)
        .collect();
    let mut sent: Vec<Event> = client_events.clone();
    sent.extend(flood_stored.iter().map(|&seq| flood_event(seq)));
    let must_have: HashSet<Key> = client_events.iter().map(Event::key).collect();
    // The probe (player 1) was sent with a new time at each try; it is not checked.
    let without_probe: Vec<_> = stored.iter().filter(|event| event.player != 1).cloned().collect();
    check_stored(&without_probe, &sent, &must_have, 16, None, "after the flood");
    let share = SOURCE_BURST_FRAMES as f64 + SOURCE_FRAMES_PER_SEC as f64 * (flood.elapsed.as_secs_f64() + 2.0);
    println!(
        "flooder: {} events stored, its share at most {share:.0}",
        flood_stored.len()
    );
    assert!(
        (flood_stored.len() as f64) <= share,
        "the flooder got {} events stored, more than its share {share:.0}",
        flood_stored.len()
    );
}
