//! Proves that bad input gets REJECTED or no answer, never a crash, never a stored event,
//! and never disturbs a well-behaved client running at the same time. Protocol revision 2:
//! a frame whose crc does not match is never answered (UDP drops it, TCP closes the
//! connection); REJECTED only ever names an id whose crc matched.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate_client::resend::{Due, End, Ending, Limits, Outstanding, Schedule, Verdict, Waits};

/// A client that keeps delivering fresh events (batches of 100, UDP and TCP) until stopped.
fn good_client(server: &Server, seed: u64, player_base: u64, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Event>> {
    let (udp, tcp) = (server.udp_addr(), server.tcp_addr());
    thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut all = Vec::new();
        let mut round = 0u64;
        let started = Instant::now();
        while (round < 3 || !stop.load(Ordering::Relaxed)) && started.elapsed() < Duration::from_secs(40) {
            let events: Vec<Event> = (0..100)
                .map(|i| Event::random(&mut rng, player_base + i % 7, round * 100 + i, 512))
                .collect();
            let report = deliver_all(
                udp,
                tcp,
                &events,
                &DeliverOpts {
                    seed: seed ^ round,
                    total_timeout: Duration::from_secs(15),
                    ..DeliverOpts::default()
                },
            );
            assert!(
                report.unresolved().is_empty() && report.counts.rejected == 0 && report.foreign_acks.is_empty(),
                "good client round {round} disturbed: {}",
                report.summary()
            );
            all.extend(events);
            round += 1;
            thread::sleep(Duration::from_millis(20));
        }
        all
    })
}

/// One expected answer.
#[derive(Clone, Copy, Debug)]
enum Exp {
    /// REJECTED with this id
    Rejected(Key),
    /// a valid fresh frame: ACCEPTED, or RETRY (then it is resent later)
    Good(Key),
}

/// Matches answers against expectations exactly (no missing, no extra answers).
fn match_answers(expect: &[Exp], got: &[AckMsg]) -> Result<(), String> {
    let mut left: Vec<AckMsg> = got.to_vec();
    for e in expect {
        let pos = left.iter().position(|a| match e {
            Exp::Rejected(k) => a.key() == *k && a.status == St::Rejected,
            Exp::Good(k) => a.key() == *k && matches!(a.status, St::Accepted | St::Retry),
        });
        match pos {
            Some(i) => {
                left.remove(i);
            }
            None => return Err(format!("missing {e:?} (expected {expect:?}, got {got:?})")),
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected answers {left:?} (expected {expect:?})"))
    }
}

/// A UDP probe: one socket, what it sent, and the exact answers it expects.
struct Probe {
    name: String,
    client: UdpClient,
    expect: Vec<Exp>,
    got: Vec<AckMsg>,
}

fn send_probe(udp: std::net::SocketAddr, name: &str, datagrams: &[Vec<u8>], expect: Vec<Exp>) -> Probe {
    let client = UdpClient::new(udp);
    for d in datagrams {
        client.send_frames(d);
    }
    Probe {
        name: name.to_string(),
        client,
        expect,
        got: Vec::new(),
    }
}

/// Collects answers for all probes: until each has as many as expected (5 s at most), then
/// a quiet period that catches extra answers.
fn collect(probes: &mut [Probe]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && probes.iter().any(|p| p.got.len() < p.expect.len()) {
        for p in probes.iter_mut() {
            let acks = p.client.try_recv();
            p.got.extend(acks);
        }
    }
    let quiet = Instant::now() + Duration::from_millis(700);
    while Instant::now() < quiet {
        for p in probes.iter_mut() {
            let acks = p.client.try_recv();
            p.got.extend(acks);
        }
    }
}

/// Delivers one event (resending on RETRY) so the server's Redis connection is up.
fn warm_up(server: &Server, player: u64) -> Event {
    let e = Event::new(player, 0, b"warm-up");
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        std::slice::from_ref(&e),
        &DeliverOpts {
            udp_sockets: 1,
            tcp_conns: 0,
            total_timeout: Duration::from_secs(15),
            ..DeliverOpts::default()
        },
    );
    assert!(report.unresolved().is_empty(), "warm-up: {}", report.summary());
    e
}

/// Ids for probe frames: a player range no other client uses.
struct Ids {
    base: u64,
    n: u64,
}

impl Ids {
    fn fresh(&mut self, rng: &mut StdRng) -> Event {
        self.n += 1;
        Event::random(rng, self.base + self.n % 13, self.n, 200)
    }
}

// Malformed UDP datagrams get exactly the answers the protocol promises (REJECTED with the
// right id for an intact but invalid frame, nothing for a bad crc or bytes that are no
// frame), while a good client keeps getting ACCEPTED; nothing bad is stored.
#[test]
fn udp_garbage_is_rejected_or_ignored() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("udp_garbage_is_rejected_or_ignored");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let mut server = Server::builder(&redis.url()).cores("0,1").start();
    let udp = server.udp_addr();
    let mut valid: Vec<Event> = vec![warm_up(&server, 99)];
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(&server, seed, 100, stop.clone());

    // Ids that are only ever sent in invalid form: they must be stored nowhere.
    let mut bad_ids: HashSet<Key> = HashSet::new();
    let mut ids = Ids {
        base: 7_000_000_000,
        n: 0,
    };
    let mut probes: Vec<Probe> = Vec::new();

    for _round in 0..3 {
        // bad crc: a flipped bit in the crc field, the payload or the id; never answered,
        // since an answer could name another event
        let e = ids.fresh(&mut rng);
        let mut r = e.raw();
        r.crc_xor = 1 << rng.gen_range(0..32);
        bad_ids.insert(e.key());
        probes.push(send_probe(udp, "bad crc", &[r.bytes()], vec![]));
        let mut e = ids.fresh(&mut rng);
        e.payload = vec![7u8; 50];
        let mut bytes = e.frame();
        bytes[36 + rng.gen_range(0..50)] ^= 0x10;
        bad_ids.insert(e.key());
        probes.push(send_probe(udp, "corrupted payload", &[bytes], vec![]));
        let e = ids.fresh(&mut rng);
        let mut bytes = e.frame();
        bytes[rng.gen_range(8..24)] ^= 1 << rng.gen_range(0..8);
        bad_ids.insert(e.key());
        probes.push(send_probe(udp, "corrupted player_id or seq", &[bytes], vec![]));

        // flags bits 1..7 (valid crc), one frame each, all in one datagram
        let mut dgram = Vec::new();
        let mut expect = Vec::new();
        for bit in 1..8 {
            let e = ids.fresh(&mut rng);
            let mut r = e.raw();
            r.flags = 1 << bit;
            dgram.extend(r.bytes());
            bad_ids.insert(e.key());
            expect.push(Exp::Rejected(e.key()));
        }
        probes.push(send_probe(udp, "flag bits", &[dgram], expect));

        // reserved bytes non-zero (valid crc)
        let e1 = ids.fresh(&mut rng);
        let mut r1 = e1.raw();
        r1.reserved5 = rng.gen_range(1..=255);
        let e2 = ids.fresh(&mut rng);
        let mut r2 = e2.raw();
        r2.reserved34 = rng.gen_range(1..=u16::MAX);
        bad_ids.extend([e1.key(), e2.key()]);
        probes.push(send_probe(
            udp,
            "reserved bytes",
            &[r1.bytes(), r2.bytes()],
            vec![Exp::Rejected(e1.key()), Exp::Rejected(e2.key())],
        ));

        // payload_len > 1024, whole frame present, valid crc
        let mut e = ids.fresh(&mut rng);
        e.payload = vec![0xAB; 1025 + rng.gen_range(0..100)];
        bad_ids.insert(e.key());
        probes.push(send_probe(
            udp,
            "payload_len > 1024",
            &[e.raw().bytes()],
            vec![Exp::Rejected(e.key())],
        ));
        // ... the same with a bad crc, or cut short: the crc vouches for no id, no answer
        let mut e = ids.fresh(&mut rng);
        e.payload = vec![0xCD; 1025 + rng.gen_range(0..100)];
        let mut r = e.raw();
        r.crc_xor = 1 << rng.gen_range(0..32);
        bad_ids.insert(e.key());
        probes.push(send_probe(udp, "payload_len > 1024, bad crc", &[r.bytes()], vec![]));
        let mut e = ids.fresh(&mut rng);
        e.payload = vec![0xEF; 1025 + rng.gen_range(0..100)];
        let whole = e.raw().bytes();
        let cut = rng.gen_range(36..whole.len());
        bad_ids.insert(e.key());
        probes.push(send_probe(
            udp,
            "payload_len > 1024, cut short",
            &[whole[..cut].to_vec()],
            vec![],
        ));

        // no parseable header: wrong magic, version, kind; empty, tiny and header-less
        let mut unparseable = Vec::new();
        for (field, value) in [(0usize, b'X'), (1, b'g'), (2, 0u8), (2, 2), (3, 0), (3, 2), (3, 3)] {
            let e = ids.fresh(&mut rng);
            let mut r = e.raw();
            match field {
                0 => r.magic[0] = value,
                1 => r.magic[1] = value,
                2 => r.version = value,
                _ => r.kind = value,
            }
            bad_ids.insert(e.key());
            unparseable.push(r.bytes());
        }
        unparseable.push(Vec::new());
        unparseable.push(vec![b'S']);
        unparseable.push(b"SG\x01\x01".to_vec());
        // a valid ACK sent to the server is not an ACTION: no answer, no reflection
        unparseable.push(unhex("534701020000000001000000000000000100000000000000bb9dfb71"));
        probes.push(send_probe(udp, "unparseable headers", &unparseable, vec![]));

        // a frame cut inside its 36-byte header: no answer
        let e = ids.fresh(&mut rng);
        let whole = e.frame();
        bad_ids.insert(e.key());
        let cuts: Vec<Vec<u8>> = [1, 8, 24, 35, rng.gen_range(1..36)]
            .iter()
            .map(|&c| whole[..c].to_vec())
            .collect();
        probes.push(send_probe(udp, "header cut short", &cuts, vec![]));

        // mixed: good, bad crc, good, a tail cut inside its header -> the good ones answered
        let (a, b, c, d) = (
            ids.fresh(&mut rng),
            ids.fresh(&mut rng),
            ids.fresh(&mut rng),
            ids.fresh(&mut rng),
        );
        let mut rb = b.raw();
        rb.crc_xor = 0x8000_0000;
        let mut dgram = a.frame();
        dgram.extend(rb.bytes());
        dgram.extend(c.frame());
        dgram.extend(&d.frame()[..rng.gen_range(1..36)]);
        bad_ids.extend([b.key(), d.key()]);
        valid.extend([a.clone(), c.clone()]);
        probes.push(send_probe(
            udp,
            "mixed datagram",
            &[dgram],
            vec![Exp::Good(a.key()), Exp::Good(c.key())],
        ));

        // a good frame followed by garbage in the same datagram: the good one is answered
        let a = ids.fresh(&mut rng);
        let mut dgram = a.frame();
        let glen = rng.gen_range(1..300);
        dgram.extend(random_garbage(&mut rng, glen));
        valid.push(a.clone());
        probes.push(send_probe(udp, "good then garbage", &[dgram], vec![Exp::Good(a.key())]));

        // random bytes: never a header, never an answer
        let datagrams: Vec<Vec<u8>> = (0..50)
            .map(|_| {
                let len = rng.gen_range(0..1500);
                random_garbage(&mut rng, len)
            })
            .collect();
        probes.push(send_probe(udp, "random bytes", &datagrams, vec![]));
    }

    // Parseable header, random rest: no answer, whether the frame is complete (its crc cannot
    // match) or not, and whatever its payload_len.
    for _ in 0..100 {
        let len = rng.gen_range(36..1500);
        let mut d = random_garbage(&mut rng, len);
        d[..4].copy_from_slice(b"SG\x01\x01");
        d[4] &= !1; // no auth tag: the frame is 40 + payload_len bytes
        let payload_len = u16::from_le_bytes([d[6], d[7]]) % 1100;
        d[6..8].copy_from_slice(&payload_len.to_le_bytes());
        let key = (
            u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")),
            u64::from_le_bytes(d[16..24].try_into().expect("8 bytes")),
        );
        bad_ids.insert(key);
        let name = format!("header fuzz: payload_len {payload_len}, datagram {len} bytes");
        probes.push(send_probe(udp, &name, &[d], vec![]));
    }

    collect(&mut probes);
    let mut failures = Vec::new();
    for p in &probes {
        if let Err(e) = match_answers(&p.expect, &p.got) {
            failures.push(format!("{}: {e}", p.name));
        }
    }

    // An unanswered bad-crc copy leaves no dedup trace: a valid frame of that id is then stored.
    let e = ids.fresh(&mut rng);
    let mut r = e.raw();
    r.crc_xor = 0xFFFF;
    let mut c = UdpClient::new(udp);
    c.send_frames(&r.bytes());
    let first = c.recv_acks(Instant::now() + Duration::from_secs(1));
    if let Err(err) = match_answers(&[], &first) {
        failures.push(format!("bad-crc copy before a valid copy: {err}"));
    }
    let report = deliver_all(
        udp,
        server.tcp_addr(),
        std::slice::from_ref(&e),
        &DeliverOpts {
            udp_sockets: 1,
            tcp_conns: 0,
            ..DeliverOpts::default()
        },
    );
    if report
        .answers
        .get(&e.key())
        .and_then(|v| v.iter().find(|s| s.is_stored()))
        != Some(&St::Accepted)
    {
        failures.push(format!(
            "valid copy after a bad-crc copy of {:?}: expected ACCEPTED, got {:?}",
            e.key(),
            report.answers.get(&e.key())
        ));
    }
    valid.push(e);

    stop.store(true, Ordering::Relaxed);
    let good_events = good.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(server.is_alive(), "server died: {:?}", server.stderr_lines());
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));

    // Valid probe frames answered RETRY are resent now; all must end up stored.
    let report = deliver_all(udp, server.tcp_addr(), &valid, &DeliverOpts::default());
    assert!(report.unresolved().is_empty(), "{}", report.summary());

    let mut conn = redis.connection();
    let stored = read_events(&mut conn, "sg", 16);
    let mut sent = good_events;
    sent.extend(valid.iter().cloned());
    let must: HashSet<Key> = sent.iter().map(Event::key).collect();
    let stored_keys = check_stored(&stored, &sent, &must, 16, None, &format!("seed {seed}"));
    let leaked: Vec<&Key> = bad_ids.iter().filter(|k| stored_keys.contains(k)).collect();
    assert!(leaked.is_empty(), "rejected frames were stored: {leaked:?}");
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

// A UDP frame whose header is whole but whose bytes end early (a truncated tail) gets no
// answer, alone or after a good frame, and is stored nowhere.
#[test]
fn udp_frame_cut_after_header_gets_no_answer() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("udp_frame_cut_after_header_gets_no_answer");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url()).start();
    let udp = server.udp_addr();
    let mut valid = vec![warm_up(&server, 98)];
    let mut ids = Ids {
        base: 7_500_000_000,
        n: 0,
    };
    let mut bad_ids = HashSet::new();
    let mut probes = Vec::new();
    let e = ids.fresh(&mut rng);
    let mut e = e;
    e.payload = vec![5u8; 100];
    let whole = e.frame();
    bad_ids.insert(e.key());
    for cut in [36, 37, 100, whole.len() - 1] {
        probes.push(send_probe(
            udp,
            &format!("frame of {} bytes cut to {cut}", whole.len()),
            &[whole[..cut].to_vec()],
            vec![],
        ));
    }
    let (a, d) = (ids.fresh(&mut rng), ids.fresh(&mut rng));
    let mut dgram = a.frame();
    let tail = d.frame();
    dgram.extend(&tail[..rng.gen_range(36..tail.len())]);
    bad_ids.insert(d.key());
    valid.push(a.clone());
    probes.push(send_probe(
        udp,
        "good frame, then a frame cut after its header",
        &[dgram],
        vec![Exp::Good(a.key())],
    ));
    collect(&mut probes);
    let failures: Vec<String> = probes
        .iter()
        .filter_map(|p| {
            match_answers(&p.expect, &p.got)
                .err()
                .map(|e| format!("{}: {e}", p.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "seed {seed}: protocol.md: bytes that do not form a whole frame (truncated tail) get no \
         ack:\n{}",
        failures.join("\n")
    );
    let report = deliver_all(udp, server.tcp_addr(), &valid, &DeliverOpts::default());
    assert!(report.unresolved().is_empty(), "{}", report.summary());
    let stored = read_events(&mut redis.connection(), "sg", 16);
    let must: HashSet<Key> = valid.iter().map(Event::key).collect();
    let stored_keys = check_stored(&stored, &valid, &must, 16, None, &format!("seed {seed}"));
    assert!(bad_ids.iter().all(|k| !stored_keys.contains(k)));
}

fn tcp(server: &Server) -> TcpClient {
    TcpClient::connect(server.tcp_addr()).expect("connect")
}

/// How long a good frame may go unanswered before `good_roundtrip` counts it a failure: the
/// server answers every good frame, so silence is never resent here.
const GOOD_ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Copies of a good frame, the first included, before RETRY counts as a failure.
const GOOD_ATTEMPTS_MAX: u32 = 20;

/// Sends a good frame on this connection until it is ACCEPTED, resending it there on RETRY;
/// DUPLICATE after a RETRY is fine, the RETRY'd write may have landed. The one resend loop
/// (`shardgate_client::resend::Outstanding`) says what each answer means and when the next copy
/// is due; this keeps the frame on its one connection and fails on anything else: silence for
/// `GOOD_ANSWER_WAIT`, a closed connection, a foreign or REJECTED answer, DUPLICATE to the
/// first copy, or RETRY to the last of `GOOD_ATTEMPTS_MAX` copies.
fn good_roundtrip(c: &mut TcpClient, e: &Event, what: &str, failures: &mut Vec<String>) {
    // After a RETRY the next copy goes 20 ms later, doubling to 200 ms; no jitter, since one
    // frame on one connection has nothing to spread out.
    let waits = Waits {
        answer: Schedule::new(GOOD_ANSWER_WAIT, GOOD_ANSWER_WAIT, 0),
        retry: Schedule::new(Duration::from_millis(20), Duration::from_millis(200), 0),
    };
    let limits = Limits {
        attempts_max: Some(GOOD_ATTEMPTS_MAX),
        give_up_after_ns: None,
    };
    let mut table: Outstanding<()> = Outstanding::new(1, waits, limits);
    let origin = Instant::now();
    let now_ns = || origin.elapsed().as_nanos() as u64;
    let (id, frame) = (event_id(e.key()), e.frame());
    let mut answers = Vec::new();
    let write_failed = format!("{what}: write of good frame {:?} failed", e.key());
    if c.send(&frame).is_err() {
        failures.push(write_failed);
        return;
    }
    table.first_sent(id, (), 0, now_ns(), 0).expect("a new table has room");
    loop {
        let due_ns = table.next_due_ns().expect("an outstanding event has a timer");
        let got = c.recv_acks_until(origin + Duration::from_nanos(due_ns), 1);
        answers.extend(got.iter().copied());
        match got.as_slice() {
            [] if c.is_closed() => break,
            [] => match table.pop_due(now_ns(), 0) {
                // Woke before the timer.
                None => {}
                // A RETRY pause ran out: the next copy.
                Some(Due::Resend { timed_out: false, .. }) => {
                    let Ok(()) = c.send(&frame) else {
                        failures.push(write_failed);
                        return;
                    };
                }
                // No answer within GOOD_ANSWER_WAIT.
                Some(Due::Resend { timed_out: true, .. } | Due::Ended(_)) => break,
            },
            [a] if a.key() == e.key() => match table.answered(id, wire_status(a.status), now_ns(), 0) {
                // The next copy waits for the RETRY pause (a timer).
                Verdict::ResendAt { .. } => {}
                // ACCEPTED, or DUPLICATE after a RETRY: silence fails before any resend, so a
                // second copy means a RETRY came first.
                Verdict::Ended(Ending {
                    end: End::Stored { first },
                    attempts,
                    ..
                }) if first || attempts > 1 => return,
                // REJECTED, DUPLICATE to the first copy, or RETRY to the last copy.
                _ => break,
            },
            _ => break,
        }
    }
    failures.push(format!(
        "{what}: good frame {:?} got {answers:?} (closed={})",
        e.key(),
        c.is_closed()
    ));
}

// On TCP an unparseable header, payload_len > 1024 or a bad crc closes the connection without
// an answer for it; bad flags or reserved bytes are REJECTED and the connection stays usable;
// the good client is undisturbed.
#[test]
fn tcp_garbage_closes_or_rejects() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("tcp_garbage_closes_or_rejects");
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = RedisServer::start();
    let mut server = Server::builder(&redis.url()).cores("0,1").start();
    let mut valid: Vec<Event> = vec![warm_up(&server, 97)];
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(&server, seed, 200, stop.clone());
    let mut failures: Vec<String> = Vec::new();
    let mut bad_ids: HashSet<Key> = HashSet::new();
    let mut ids = Ids {
        base: 8_000_000_000,
        n: 0,
    };

    // Connection-ending garbage: after answering the good frame before it, the server closes
    // the connection (EOF or reset) without answering the garbage.
    type Breaker = Box<dyn Fn(&Event) -> Vec<u8>>;
    let breakers: Vec<(&str, Breaker)> = vec![
        (
            "wrong magic",
            Box::new(|e: &Event| {
                let mut r = e.raw();
                r.magic = *b"XG";
                r.bytes()
            }),
        ),
        (
            "wrong version",
            Box::new(|e: &Event| {
                let mut r = e.raw();
                r.version = 2;
                r.bytes()
            }),
        ),
        (
            "wrong kind",
            Box::new(|e: &Event| {
                let mut r = e.raw();
                r.kind = 2;
                r.bytes()
            }),
        ),
        (
            "payload_len > 1024",
            Box::new(|e: &Event| {
                let mut r = e.raw();
                r.payload = vec![1u8; 1500];
                r.bytes()
            }),
        ),
        (
            "bad crc",
            Box::new(|e: &Event| {
                let mut r = e.raw();
                r.crc_xor = 0x0400_0001;
                r.bytes()
            }),
        ),
        (
            "a flipped bit in the player_id",
            Box::new(|e: &Event| {
                let mut bytes = e.frame();
                bytes[9] ^= 0x20;
                bytes
            }),
        ),
        (
            "payload_len 65535, header only",
            Box::new(|e: &Event| {
                let mut r = e.raw();
                r.payload_len = Some(u16::MAX);
                r.bytes()[..36].to_vec()
            }),
        ),
    ];
    for (name, make) in &breakers {
        let mut c = tcp(&server);
        let g = ids.fresh(&mut rng);
        valid.push(g.clone());
        good_roundtrip(&mut c, &g, name, &mut failures);
        let e = ids.fresh(&mut rng);
        bad_ids.insert(e.key());
        let _ = c.send_split(&make(&e), &mut rng);
        let (closed, acks) = c.wait_closed(Instant::now() + Duration::from_secs(3));
        if !closed || !acks.is_empty() {
            failures.push(format!(
                "{name}: expected the connection closed with no answer; closed={closed}, answers {acks:?}"
            ));
        }
    }
    // Random bytes (not starting with the magic) end the connection too.
    for _ in 0..10 {
        let mut c = tcp(&server);
        let len = rng.gen_range(1..3000);
        let _ = c.send_split(&random_garbage(&mut rng, len), &mut rng);
        let (closed, acks) = c.wait_closed(Instant::now() + Duration::from_secs(3));
        // A server may wait for a whole 36-byte header before it judges the magic.
        if (len >= 36 && !closed) || !acks.is_empty() {
            failures.push(format!("random bytes ({len}): closed={closed}, answers {acks:?}"));
        }
    }

    // Frame-level faults whose crc matches: REJECTED with the right id, interleaved good
    // frames answered, and the connection stays open.
    let mut c = tcp(&server);
    let mut expect = Vec::new();
    let mut stream = Vec::new();
    let mut goods = Vec::new();
    for i in 0..12 {
        let e = ids.fresh(&mut rng);
        let mut r = e.raw();
        match i % 3 {
            0 => r.flags = 1 << rng.gen_range(1..8),
            1 => r.reserved5 = 1,
            _ => r.reserved34 = 0x0100,
        }
        bad_ids.insert(e.key());
        expect.push(Exp::Rejected(e.key()));
        stream.extend(r.bytes());
        let g = ids.fresh(&mut rng);
        expect.push(Exp::Good(g.key()));
        stream.extend(g.frame());
        goods.push(g);
    }
    if c.send_split(&stream, &mut rng).is_err() {
        failures.push("frame faults: write failed".into());
    }
    let got = c.recv_acks_until(Instant::now() + Duration::from_secs(5), expect.len());
    if let Err(e) = match_answers(&expect, &got) {
        failures.push(format!("frame faults: {e}"));
    }
    if c.is_closed() {
        failures.push("frame faults: the server closed the connection".into());
    }
    valid.extend(goods);
    let g = ids.fresh(&mut rng);
    valid.push(g.clone());
    good_roundtrip(&mut c, &g, "after frame faults", &mut failures);

    // A bad-crc frame sent one byte at a time closes the connection unanswered; then its
    // valid copy, on a new connection, is stored.
    let e = ids.fresh(&mut rng);
    let mut r = e.raw();
    r.crc_xor = 0xdead;
    for b in r.bytes() {
        let _ = c.send(&[b]);
    }
    let (closed, got) = c.wait_closed(Instant::now() + Duration::from_secs(3));
    if !closed || !got.is_empty() {
        failures.push(format!(
            "byte-by-byte bad crc: expected the connection closed with no answer; closed={closed}, answers {got:?}"
        ));
    }
    valid.push(e.clone());
    let mut c = tcp(&server);
    good_roundtrip(&mut c, &e, "valid copy after its bad-crc copy", &mut failures);

    // Half frames and then the client goes away; many connections opened and dropped.
    for _ in 0..20 {
        let mut c = tcp(&server);
        let e = ids.fresh(&mut rng);
        bad_ids.insert(e.key());
        let f = e.frame();
        let _ = c.send(&f[..rng.gen_range(1..f.len())]);
        let _ = c.stream().shutdown(std::net::Shutdown::Write);
    }
    for _ in 0..50 {
        drop(tcp(&server));
    }

    stop.store(true, Ordering::Relaxed);
    let good_events = good.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(server.is_alive(), "server died: {:?}", server.stderr_lines());
    // The server still serves a fresh connection.
    let mut c = tcp(&server);
    let g = ids.fresh(&mut rng);
    valid.push(g.clone());
    good_roundtrip(&mut c, &g, "fresh connection at the end", &mut failures);
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));

    // Good frames of the fault stream that were answered RETRY are resent now.
    let report = deliver_all(server.udp_addr(), server.tcp_addr(), &valid, &DeliverOpts::default());
    assert!(report.unresolved().is_empty(), "{}", report.summary());

    let mut conn = redis.connection();
    let stored = read_events(&mut conn, "sg", 16);
    let mut sent = good_events;
    sent.extend(valid);
    let must: HashSet<Key> = sent.iter().map(Event::key).collect();
    let stored_keys = check_stored(&stored, &sent, &must, 16, None, &format!("seed {seed}"));
    let leaked: Vec<&Key> = bad_ids.iter().filter(|k| stored_keys.contains(k)).collect();
    assert!(leaked.is_empty(), "rejected frames were stored: {leaked:?}");
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}
