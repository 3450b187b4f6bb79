//! RETRY means "not confirmed" (protocol revision 2): the client never gives up on an event
//! because of RETRY or silence alone, only at a deadline its caller set, and then reports it as
//! unknown (sent) or not sent, never as not stored; and seqs from `SeqCounter` never repeat.

mod support;

use std::time::{Duration, Instant};

use shardgate_client::frame::Status;
use shardgate_client::{Client, ClientConfig, Outcome, Resolution, SeqCounter};
use support::{event, id, resolve, Answer, FakeServer, Style};

const PATIENCE: Duration = Duration::from_secs(10);
/// The copies after which the client used to give up by default (attempts_max was 8).
const OLD_ATTEMPTS_MAX: usize = 8;

/// Waits as short as the config allows, so that many copies go out in little time.
fn fast_config(server: &FakeServer) -> ClientConfig {
    let mut config = support::config(server);
    config.ack_timeout = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(2);
    config
}

/// Polls until the server has seen `copies` copies, asserting that nothing resolves meanwhile.
fn poll_until_copies(client: &mut Client, server: &FakeServer, copies: usize) {
    let deadline = Instant::now() + PATIENCE;
    while server.log().copies.len() < copies {
        assert!(
            Instant::now() < deadline,
            "only {} copies within {PATIENCE:?}",
            server.log().copies.len()
        );
        let resolved = client.poll(Duration::from_millis(5));
        assert!(resolved.is_empty(), "resolved without a deadline: {resolved:?}");
    }
}

// An event answered RETRY forever, or never answered at all (as a frame whose crc did not match
// on arrival is), is still pending after many times the old default cap of copies; flush's
// deadline then resolves it as unknown, with the copies it took.
#[test]
fn unconfirmed_events_are_never_given_up_without_a_deadline() {
    for (name, retry) in [("retry", true), ("silence", false)] {
        let server = FakeServer::udp(
            move |_, _| {
                if retry {
                    Answer::Ack(Status::Retry)
                } else {
                    Answer::Silent
                }
            },
            Style::default(),
        );
        let mut client = Client::connect(fast_config(&server)).expect("connect");
        client.send(&event(30, 1, b"craft")).expect("send");
        let copies = OLD_ATTEMPTS_MAX * 8;
        poll_until_copies(&mut client, &server, copies);
        assert_eq!((client.pending(), client.in_flight()), (1, 1), "{name}");

        let resolved = client.flush(Instant::now() + Duration::from_millis(20));
        assert_eq!(resolved.len(), 1, "{name}: {resolved:?}");
        assert_eq!(resolved[0].outcome, Outcome::Unknown, "{name}");
        assert!(resolved[0].attempts as usize >= copies, "{name}: {resolved:?}");
        assert_eq!(client.pending(), 0, "{name}");
        if retry {
            assert!(client.stats().acks_retry as usize >= copies - 1, "{:?}", client.stats());
        }
    }
}

// give_up_after ends an event answered RETRY at its deadline as unknown: after many copies with
// short waits, and at the deadline rather than at the end of a longer wait with long ones.
#[test]
fn give_up_after_resolves_unknown_at_the_deadline() {
    let give_up_after = Duration::from_millis(150);
    let server = FakeServer::udp(|_, _| Answer::Ack(Status::Retry), Style::default());

    let mut config = fast_config(&server);
    config.give_up_after = Some(give_up_after);
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(31, 1, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!(resolved[0].outcome, Outcome::Unknown);
    assert!(resolved[0].attempts > 1, "{resolved:?}");
    assert_within(&resolved[0], give_up_after);

    // Each wait (400 ms, restarted by every RETRY) outlasts the deadline: one copy, cut short.
    let mut config = support::config(&server);
    config.ack_timeout = Duration::from_millis(400);
    config.give_up_after = Some(give_up_after);
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(31, 2, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!((resolved[0].outcome, resolved[0].attempts), (Outcome::Unknown, 1));
    assert_within(&resolved[0], give_up_after);
}

/// The resolution came at its deadline: not before, and not a resend period late.
fn assert_within(resolution: &Resolution, deadline: Duration) {
    let latency = resolution.latency;
    assert!(
        latency >= deadline && latency < deadline + Duration::from_millis(200),
        "resolved after {latency:?}, deadline {deadline:?}"
    );
}

// An event still queued at its give_up_after deadline was never sent: it resolves as not sent
// with no attempts, while the one in flight ahead of it resolves as unknown.
#[test]
fn give_up_after_resolves_queued_events_as_not_sent() {
    let server = FakeServer::udp(|_, _| Answer::Ack(Status::Retry), Style::default());
    let mut config = support::config(&server);
    config.in_flight_max = 1;
    config.give_up_after = Some(Duration::from_millis(100));
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(32, 1, b"")).expect("send");
    client.poll(Duration::ZERO);
    client.send(&event(32, 2, b"")).expect("send");
    assert_eq!((client.in_flight(), client.queued()), (1, 1));

    // Both deadlines pass before the next poll, which resolves both.
    std::thread::sleep(Duration::from_millis(250));
    let resolved = resolve(&mut client, 2, PATIENCE);
    let outcome_of = |seq| {
        let resolution = resolved.iter().find(|r| r.id == id(32, seq)).expect("resolved");
        (resolution.outcome, resolution.attempts)
    };
    assert_eq!(outcome_of(1), (Outcome::Unknown, 1));
    assert_eq!(outcome_of(2), (Outcome::NotSent, 0));
    assert!(server.log().copies_of(id(32, 2)).is_empty());
}

// An unknown event is settled by sending the same event again later: the same bytes go out, and
// a server that had stored it answers DUPLICATE.
#[test]
fn unknown_event_resent_later_is_answered_duplicate() {
    let server = FakeServer::udp(
        |_, copy| Answer::Ack(if copy <= 3 { Status::Retry } else { Status::Duplicate }),
        Style::default(),
    );
    let mut config = support::config(&server);
    config.attempts_max = Some(3);
    config.ack_timeout = Duration::from_millis(5);
    let mut client = Client::connect(config).expect("connect");
    client.send(&event(33, 1, b"trade")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!((resolved[0].outcome, resolved[0].attempts), (Outcome::Unknown, 3));

    client.send(&event(33, 1, b"trade")).expect("resend after unknown");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!(resolved[0].outcome, Outcome::Stored { first: false });
    let frames = server.log().frames;
    assert_eq!(frames.len(), 4);
    assert!(frames.iter().all(|frame| *frame == frames[0]), "copies differ");
}

// SeqCounter hands out strictly increasing seqs, and a counter made after a restart (modelled by
// a second counter made later) starts above every seq the first handed out.
#[test]
fn seq_counter_strictly_increases_across_restarts() {
    let mut counter = SeqCounter::new();
    let mut last = counter.next_seq();
    for _ in 0..100_000 {
        let seq = counter.next_seq();
        assert!(seq > last, "{seq} after {last}");
        last = seq;
    }
    // The first counter handed out far fewer seqs than microseconds have passed since it started
    // (well under the documented 1 per microsecond), so the next one starts above them all.
    let mut before_restart = SeqCounter::new();
    let last_before = (0..100).map(|_| before_restart.next_seq()).max().expect("seqs");
    std::thread::sleep(Duration::from_millis(2));
    let first_after = SeqCounter::new().next_seq();
    assert!(first_after > last_before, "{first_after} <= {last_before}");
}
