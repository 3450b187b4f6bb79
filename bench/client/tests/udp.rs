//! The client's behaviour over UDP against a scripted fake server on loopback: packing, ack
//! matching, resends and their backoff, the final outcomes, and its bounds.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shardgate_client::frame::{self, Status, ACK_BYTES, FRAME_OVERHEAD_BYTES};
use shardgate_client::{Client, Outcome, DATAGRAM_BYTES_MAX};
use support::{ack, event, gaps, id, resolve, Answer, FakeServer, Style};

const PATIENCE: Duration = Duration::from_secs(10);

fn accept_all() -> FakeServer {
    FakeServer::udp(|_, _| Answer::Ack(Status::Accepted), Style::default())
}

fn silent() -> FakeServer {
    FakeServer::udp(|_, _| Answer::Silent, Style::default())
}

/// The frames of one datagram, by length.
fn frame_lengths(datagram: &[u8]) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut offset = 0;
    while let Ok(header) = frame::check(&datagram[offset..]) {
        lengths.push(header.frame_bytes);
        offset += header.frame_bytes;
    }
    assert_eq!(offset, datagram.len(), "a datagram holds only whole frames");
    lengths
}

// Datagrams hold at most frames_per_datagram_max frames and 1400 bytes, and each is filled as
// far as those bounds allow before the next starts.
#[test]
fn packing_respects_frame_count_and_byte_bound() {
    let server = accept_all();
    let mut config = support::config(&server);
    config.frames_per_datagram_max = 8;
    let mut client = Client::connect(config).expect("connect");
    let (small, medium, large) = (vec![], vec![0x5A; 300], vec![0xA5; 1024]);
    let payloads: Vec<&[u8]> = [(&small, 20), (&medium, 12), (&large, 2)]
        .into_iter()
        .flat_map(|(payload, count)| std::iter::repeat_n(payload.as_slice(), count))
        .collect();
    for (seq, payload) in payloads.iter().enumerate() {
        client.send(&event(1, seq as u64, payload)).expect("send");
    }
    let resolved = resolve(&mut client, payloads.len(), PATIENCE);
    assert!(resolved.iter().all(|resolution| resolution.outcome.is_stored()));

    let datagrams: Vec<Vec<usize>> = server.log().datagrams.iter().map(|d| frame_lengths(d)).collect();
    assert_eq!(datagrams.iter().map(Vec::len).sum::<usize>(), payloads.len());
    for (index, frames) in datagrams.iter().enumerate() {
        let bytes: usize = frames.iter().sum();
        assert!(
            frames.len() <= 8 && bytes <= DATAGRAM_BYTES_MAX,
            "datagram {index}: {frames:?}"
        );
        if let Some(next) = datagrams.get(index + 1) {
            let was_full = frames.len() == 8 || bytes + next[0] > DATAGRAM_BYTES_MAX;
            assert!(was_full, "datagram {index} {frames:?} had room for {}", next[0]);
        }
    }
    // Both bounds were exercised: 8 small frames, and 4 medium ones (a fifth would pass 1400).
    assert!(datagrams.contains(&vec![FRAME_OVERHEAD_BYTES; 8]));
    assert!(datagrams.contains(&vec![FRAME_OVERHEAD_BYTES + 300; 4]));
}

// frames_per_datagram_max 1 sends one frame per datagram.
#[test]
fn one_frame_per_datagram_when_asked() {
    let server = accept_all();
    let mut config = support::config(&server);
    config.frames_per_datagram_max = 1;
    let mut client = Client::connect(config).expect("connect");
    for seq in 0..5 {
        client.send(&event(2, seq, b"x")).expect("send");
    }
    resolve(&mut client, 5, PATIENCE);
    let log = server.log();
    assert_eq!(log.datagrams.len(), 5);
    assert_eq!(client.stats().writes, 5);
}

// Acks coalesced into one datagram and in reverse order still reach the right events, each
// event resolving once with the status its own ack carried.
#[test]
fn acks_match_out_of_order_and_coalesced() {
    let server = FakeServer::udp(
        |id, _| {
            Answer::Ack(if id.seq % 2 == 0 {
                Status::Accepted
            } else {
                Status::Duplicate
            })
        },
        Style {
            reverse: true,
            ..Style::default()
        },
    );
    let mut config = support::config(&server);
    config.frames_per_datagram_max = 10;
    let mut client = Client::connect(config).expect("connect");
    for seq in 0..30 {
        client.send(&event(3, seq, b"move")).expect("send");
    }
    let resolved = resolve(&mut client, 30, PATIENCE);
    let by_seq: HashMap<u64, Outcome> = resolved.iter().map(|r| (r.id.seq, r.outcome)).collect();
    assert_eq!(by_seq.len(), 30, "each event resolves exactly once");
    for (seq, outcome) in by_seq {
        assert_eq!(outcome, Outcome::Stored { first: seq % 2 == 0 }, "seq {seq}");
    }
    assert!(resolved.iter().all(|r| r.attempts == 1 && r.id.player_id == 3));
    let log = server.log();
    assert!(
        log.replies.iter().any(|&bytes| bytes >= 2 * ACK_BYTES),
        "replies were coalesced"
    );
    let stats = client.stats();
    assert_eq!((stats.acks, stats.acks_unmatched, stats.resends), (30, 0, 0));
}

// RETRY makes the client resend after a wait that doubles each time; the next answer ends it.
#[test]
fn retry_resends_with_growing_backoff() {
    let server = FakeServer::udp(
        |_, copy| Answer::Ack(if copy <= 3 { Status::Retry } else { Status::Accepted }),
        Style::default(),
    );
    let config = support::config(&server);
    let ack_timeout = config.ack_timeout;
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(4, 1, b"build")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!(resolved[0].outcome, Outcome::Stored { first: true });
    assert_eq!(resolved[0].attempts, 4);

    let gaps = gaps(&server.log().copies_of(id(4, 1)));
    assert_eq!(gaps.len(), 3);
    for (index, gap) in gaps.iter().enumerate() {
        let least = ack_timeout * (1 << index);
        assert!(*gap >= least, "gap {index} is {gap:?}, under {least:?}: {gaps:?}");
    }
    assert!(gaps[0] < gaps[1] && gaps[1] < gaps[2], "gaps do not grow: {gaps:?}");
    let stats = client.stats();
    assert_eq!((stats.acks_retry, stats.resends), (3, 3));
}

// No answer at all: the client resends once ack_timeout has passed.
#[test]
fn silence_times_out_and_resends() {
    let server = FakeServer::udp(
        |_, copy| {
            if copy == 1 {
                Answer::Silent
            } else {
                Answer::Ack(Status::Accepted)
            }
        },
        Style::default(),
    );
    let config = support::config(&server);
    let ack_timeout = config.ack_timeout;
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(5, 1, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!(
        (resolved[0].outcome, resolved[0].attempts),
        (Outcome::Stored { first: true }, 2)
    );
    assert!(resolved[0].latency >= ack_timeout);
    let gaps = gaps(&server.log().copies_of(id(5, 1)));
    assert!(gaps.len() == 1 && gaps[0] >= ack_timeout, "{gaps:?}");
}

// A REJECTED frame resolves at once and is never sent again, however long the client runs.
#[test]
fn rejected_is_never_resent() {
    let server = FakeServer::udp(|_, _| Answer::Ack(Status::Rejected), Style::default());
    let config = support::config(&server);
    let ack_timeout = config.ack_timeout;
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(6, 1, b"bad")).expect("send");
    client.send(&event(6, 2, b"ok")).expect("send");
    let resolved = resolve(&mut client, 2, PATIENCE);
    assert!(resolved
        .iter()
        .all(|r| r.outcome == Outcome::Rejected && r.attempts == 1));
    // Several resend periods later, still one copy each.
    let quiet_until = Instant::now() + ack_timeout * 8;
    while Instant::now() < quiet_until {
        assert!(client.poll(Duration::from_millis(10)).is_empty());
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = server.log();
    assert_eq!(log.copies.len(), 2);
    assert_eq!(client.stats().resends, 0);
    assert_eq!(client.pending(), 0);
}

// With the opt-in attempts cap, an event never answered resolves unknown after that many
// copies, each after its own wait.
#[test]
fn silence_is_unknown_after_opt_in_attempts_max() {
    let server = silent();
    let mut config = support::config(&server);
    config.attempts_max = Some(3);
    config.ack_timeout = Duration::from_millis(10);
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(7, 1, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!((resolved[0].outcome, resolved[0].attempts), (Outcome::Unknown, 3));
    // 10 + 20 + 40 ms: the last copy too gets its full wait.
    assert!(
        resolved[0].latency >= Duration::from_millis(70),
        "{:?}",
        resolved[0].latency
    );
    assert_eq!(server.log().copies_of(id(7, 1)).len(), 3);
}

// RETRY to the last copy the opt-in cap allows resolves unknown at once rather than waiting out
// its timeout.
#[test]
fn retry_on_the_last_allowed_attempt_is_unknown_at_once() {
    let server = FakeServer::udp(|_, _| Answer::Ack(Status::Retry), Style::default());
    let mut config = support::config(&server);
    config.attempts_max = Some(2);
    config.ack_timeout = Duration::from_millis(200);
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(8, 1, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!((resolved[0].outcome, resolved[0].attempts), (Outcome::Unknown, 2));
    // One wait of 200 ms before the second copy; not the 400 ms after it.
    let latency = resolved[0].latency;
    assert!(
        latency >= Duration::from_millis(200) && latency < Duration::from_millis(550),
        "{latency:?}"
    );
    assert_eq!(server.log().copies.len(), 2);
}

// Malformed acks (garbage, bad crc, unknown status, a short tail) and acks for unknown events
// are counted and ignored; the good ack in the same datagram still resolves its event.
#[test]
fn malformed_and_unmatched_acks_are_counted_and_ignored() {
    let server = FakeServer::udp(
        |id, _| {
            let mut bad_crc = ack(Status::Accepted, id);
            bad_crc[ACK_BYTES - 1] ^= 0xFF;
            let mut unknown_status = ack(Status::Accepted, id);
            unknown_status[4] = 9;
            let checksum = frame::crc(&unknown_status[..ACK_BYTES - 4]);
            unknown_status[ACK_BYTES - 4..].copy_from_slice(&checksum.to_le_bytes());
            let other = ack(Status::Accepted, support::id(id.player_id, id.seq + 1000));
            let raw = [
                vec![0xEE; ACK_BYTES],
                bad_crc,
                unknown_status,
                other,
                ack(Status::Duplicate, id),
                vec![b'S', b'G', 1, 2, 0],
            ]
            .concat();
            Answer::Raw(raw)
        },
        Style::default(),
    );
    let mut client = Client::connect(support::config(&server)).expect("connect");
    client.send(&event(9, 1, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!(
        (resolved[0].outcome, resolved[0].attempts),
        (Outcome::Stored { first: false }, 1)
    );
    let stats = client.stats();
    assert_eq!(stats.acks_malformed, 4, "three bad acks and a short tail: {stats:?}");
    assert_eq!((stats.acks, stats.acks_unmatched), (2, 1), "{stats:?}");
}

// send refuses, without queueing, a full queue, a pending id and an oversized payload, with
// lowercase messages.
#[test]
fn send_refuses_what_it_cannot_take() {
    let server = silent();
    let mut config = support::config(&server);
    config.queue_max = 2;
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(10, 1, b"")).expect("send");
    client.send(&event(10, 2, b"")).expect("send");

    let full = client.send(&event(10, 3, b"")).expect_err("queue is full");
    assert!(full.is_queue_full());
    assert_eq!(full.to_string(), "send queue is full (2 events)");

    let mut roomy = support::config(&server);
    roomy.queue_max = 8;
    let mut client = Client::connect(roomy).expect("connect");
    client.send(&event(10, 1, b"")).expect("send");
    let again = client.send(&event(10, 1, b"")).expect_err("already pending");
    assert!(again.is_already_pending() && !again.is_queue_full());
    assert_eq!(again.to_string(), "event player_id=10 seq=1 is already pending");
    let long = client.send(&event(10, 2, &[0; 1025])).expect_err("payload too long");
    assert_eq!(long.to_string(), "payload is 1025 bytes, over the protocol's 1024");
    assert_eq!(client.pending(), 1);
}

// At most in_flight_max events are on the wire unresolved; the rest wait queued and follow as
// earlier ones resolve.
#[test]
fn in_flight_is_bounded() {
    let server = silent();
    let mut config = support::config(&server);
    config.in_flight_max = 4;
    config.ack_timeout = Duration::from_secs(10);
    config.backoff_max = Duration::from_secs(10);
    let mut client = Client::connect(config).expect("connect");
    for seq in 0..20 {
        client.send(&event(11, seq, b"")).expect("send");
    }
    client.poll(Duration::from_millis(100));
    assert_eq!((client.in_flight(), client.queued()), (4, 16));
    assert_eq!(server.log().copies.len(), 4);

    let answering = accept_all();
    let mut config = support::config(&answering);
    config.in_flight_max = 4;
    let mut client = Client::connect(config).expect("connect");
    for seq in 0..20 {
        client.send(&event(11, seq, b"")).expect("send");
    }
    let resolved = resolve(&mut client, 20, PATIENCE);
    assert!(resolved.iter().all(|r| r.outcome.is_stored()));
    assert!(answering.log().datagrams.iter().all(|d| frame_lengths(d).len() <= 4));
}

// flush returns once all is resolved, or at its deadline gives up on the rest: those sent as
// unknown, those never sent as not sent with attempts 0.
#[test]
fn flush_resolves_everything_by_its_deadline() {
    let answering = accept_all();
    let mut client = Client::connect(support::config(&answering)).expect("connect");
    for seq in 0..10 {
        client.send(&event(12, seq, b"")).expect("send");
    }
    let resolved = client.flush(Instant::now() + PATIENCE);
    assert_eq!(resolved.len(), 10);
    assert!(resolved.iter().all(|r| r.outcome.is_stored()));

    let server = silent();
    let mut config = support::config(&server);
    config.in_flight_max = 2;
    let mut client = Client::connect(config).expect("connect");
    for seq in 0..5 {
        client.send(&event(12, seq, b"")).expect("send");
    }
    let started = Instant::now();
    let resolved = client.flush(started + Duration::from_millis(200));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(resolved.len(), 5);
    for resolution in &resolved {
        let expected = if resolution.attempts == 0 {
            Outcome::NotSent
        } else {
            Outcome::Unknown
        };
        assert_eq!(resolution.outcome, expected, "{resolution:?}");
    }
    assert_eq!(resolved.iter().filter(|r| r.attempts == 0).count(), 3);
    assert_eq!(client.pending(), 0);
    // Still usable afterwards.
    client.send(&event(12, 0, b"")).expect("send after flush");
}

// poll with a zero timeout never blocks, yet sends and takes in acks that have arrived.
#[test]
fn zero_timeout_poll_does_not_wait() {
    let server = accept_all();
    let mut client = Client::connect(support::config(&server)).expect("connect");
    client.send(&event(13, 1, b"")).expect("send");
    let started = Instant::now();
    let mut resolved = Vec::new();
    while resolved.is_empty() && started.elapsed() < PATIENCE {
        let before = Instant::now();
        client.poll_into(Duration::ZERO, &mut resolved);
        assert!(before.elapsed() < Duration::from_millis(50), "poll(0) waited");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(resolved.len(), 1);
}
