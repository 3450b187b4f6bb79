//! Proves that the server's memory stays flat while Redis stalls with its connection open:
//! under a steady load of unique UDP events (with resends of what got RETRY), a 60 s SIGSTOP
//! of Redis grows the server's RSS by at most 2 MiB, and once Redis continues, events are
//! ACCEPTED again within 5 s. The whole test takes about 70 s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use shardgate_client::resend::{Due, Limits, Outstanding, Schedule, Waits};

const SENDERS: u64 = 4;
/// Per sender: a datagram of this many frames every `SEND_INTERVAL`, so 4 x 15 x 100/s =
/// 6,000 frames/s in all.
const FRAMES_PER_DATAGRAM: usize = 15;
const SEND_INTERVAL: Duration = Duration::from_millis(10);
/// Resends that go with each datagram's new events, earliest due first.
const RESENDS_PER_DATAGRAM: usize = 5;
/// Events a sender tracks for resending (the resend loop's table, sized once): the bound on its
/// memory. With the table full a new event still goes out, once and untracked, so that the send
/// rate stays steady (the test checks the server's memory under a steady load, not delivery).
const TRACKED_MAX: usize = 5_000;
/// A copy with no answer in this long is resent: the server answers RETRY within its 1 s Redis
/// timeout, so this only covers lost datagrams.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// After a RETRY the next copy goes this long later, doubling to `RETRY_WAIT_MAX`: short, so
/// that once Redis continues every RETRY'd event is resent within a second.
const RETRY_WAIT_FIRST: Duration = Duration::from_millis(10);
const RETRY_WAIT_MAX: Duration = Duration::from_secs(1);
/// An event not stored this long after its first copy is given up: during the stall nothing is
/// stored, so without this the stall's first events would hold the table for all of it.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);
const WARMUP: Duration = Duration::from_secs(8);
/// The stall; `SHARDGATE_STALL_SECS` shortens it when looking into a failure.
const STALL_SECS_DEFAULT: u64 = 60;
const RECOVERY_MAX: Duration = Duration::from_secs(5);
/// How long the test watches for recovery, so that a failure says when (if ever) it came.
const RECOVERY_WATCH: Duration = Duration::from_secs(20);
const RSS_GROWTH_MAX_BYTES: u64 = 2 << 20;

/// What the senders share with the test.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    frames_sent: AtomicU64,
    accepted: AtomicU64,
    retries: AtomicU64,
    /// Microseconds since `epoch` of the latest ACCEPTED answer, plus one (0: none yet).
    last_accepted_us: AtomicU64,
    /// New events sent untracked because the sender's table was full.
    untracked: AtomicU64,
    /// Events that reached `GIVE_UP_AFTER` unstored.
    given_up: AtomicU64,
}

/// Sends unique events at a steady rate and resends what got RETRY (or no answer), until
/// stopped. The one resend loop (`shardgate_client::resend::Outstanding`) decides what each
/// answer means and which copy is due; the sender packs datagrams and counts answers.
fn sender(server: std::net::SocketAddr, index: u64, load: Arc<Load>, epoch: Instant) {
    let mut client = UdpClient::new(server);
    let waits = Waits {
        answer: Schedule::new(ANSWER_WAIT, ANSWER_WAIT, 0),
        retry: Schedule::new(RETRY_WAIT_FIRST, RETRY_WAIT_MAX, 0),
    };
    let limits = Limits {
        attempts_max: None,
        give_up_after_ns: Some(GIVE_UP_AFTER.as_nanos() as u64),
    };
    // No payload: a resend is rebuilt from its id.
    let mut tracked: Outstanding<()> = Outstanding::new(TRACKED_MAX, waits, limits);
    let now_ns = || epoch.elapsed().as_nanos() as u64;
    let mut next_seq = 0u64;
    let payload = [b'm'; 64];
    let mut next_send = Instant::now();
    while !load.stop.load(Ordering::Relaxed) {
        let mut datagram = Vec::with_capacity(1400);
        let mut frames = 0;
        let now = now_ns();
        // Due copies beyond this datagram's share stay due for the next one.
        while frames < RESENDS_PER_DATAGRAM {
            match tracked.pop_due(now, 0) {
                Some(Due::Resend { id, .. }) => {
                    Event::new(id.player_id, id.seq, &payload).encode_into(&mut datagram);
                    frames += 1;
                }
                Some(Due::Ended(_)) => {
                    load.given_up.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
        while frames < FRAMES_PER_DATAGRAM {
            next_seq += 1;
            let event = Event::new(1_000_000 * (index + 1) + next_seq % 1_000, next_seq, &payload);
            event.encode_into(&mut datagram);
            frames += 1;
            // Full: the event goes out untracked (see TRACKED_MAX); ids are unique, so nothing
            // else is refused.
            if tracked.first_sent(event_id(event.key()), (), now, now, 0).is_err() {
                load.untracked.fetch_add(1, Ordering::Relaxed);
            }
        }
        client.send_frames(&datagram);
        load.frames_sent.fetch_add(frames as u64, Ordering::Relaxed);
        next_send += SEND_INTERVAL;
        // Reads answers until the next send is due.
        loop {
            for ack in client.try_recv() {
                match ack.status {
                    St::Accepted => {
                        load.accepted.fetch_add(1, Ordering::Relaxed);
                        let at_us = epoch.elapsed().as_micros() as u64 + 1;
                        load.last_accepted_us.fetch_max(at_us, Ordering::Relaxed);
                    }
                    St::Retry => {
                        load.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    St::Duplicate | St::Rejected => {}
                }
                // Unknown (an untracked event, or a late answer) changes nothing.
                tracked.answered(event_id(ack.key()), wire_status(ack.status), now_ns(), 0);
            }
            if Instant::now() >= next_send {
                break;
            }
        }
    }
}

// Under ~6,000 unique frames/s, a 60 s SIGSTOP of Redis grows the server's RSS by at most 2 MiB, and events are ACCEPTED again within 5 s of SIGCONT.
#[test]
fn memory_stays_flat_while_redis_stalls() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let stall = Duration::from_secs(
        std::env::var("SHARDGATE_STALL_SECS")
            .ok()
            .and_then(|secs| secs.parse().ok())
            .unwrap_or(STALL_SECS_DEFAULT),
    );
    let mut server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--udp-source-frames-per-sec", 1_000_000)
        .arg("--udp-source-burst-frames", 1_000_000)
        .start();
    let metrics = serving_metrics_address(&server);
    let epoch = Instant::now();
    let load = Arc::new(Load::default());
    let senders: Vec<_> = (0..SENDERS)
        .map(|index| {
            let (udp, load) = (server.udp_addr(), Arc::clone(&load));
            thread::spawn(move || sender(udp, index, load, epoch))
        })
        .collect();

    thread::sleep(WARMUP);
    let accepted_in_warmup = load.accepted.load(Ordering::Relaxed);
    assert!(accepted_in_warmup > 0, "nothing was ACCEPTED during the warm-up");
    let rss_before = resident_bytes(server.pid());
    redis.pause();
    let stall_started = Instant::now();
    let mut rss_max = rss_before;
    while stall_started.elapsed() < stall {
        thread::sleep(Duration::from_secs(5).min(stall.saturating_sub(stall_started.elapsed())));
        let rss = resident_bytes(server.pid());
        rss_max = rss_max.max(rss);
        println!(
            "stalled {:>4.1} s: rss {:.2} MiB, frames sent {}, RETRY {}, untracked {}, given up {}",
            stall_started.elapsed().as_secs_f64(),
            rss as f64 / (1 << 20) as f64,
            load.frames_sent.load(Ordering::Relaxed),
            load.retries.load(Ordering::Relaxed),
            load.untracked.load(Ordering::Relaxed),
            load.given_up.load(Ordering::Relaxed)
        );
        assert!(server.is_alive(), "the server died during the stall");
    }
    let rss_after = resident_bytes(server.pid());
    let accepted_before_resume = load.accepted.load(Ordering::Relaxed);
    let resumed_at = epoch.elapsed();
    redis.resume();
    let resumed = Instant::now();
    let recovered_after = loop {
        let last_us = load.last_accepted_us.load(Ordering::Relaxed);
        if last_us > resumed_at.as_micros() as u64 + 1 {
            break Some(resumed.elapsed());
        }
        if resumed.elapsed() > RECOVERY_WATCH {
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let body = scrape_metrics(metrics);
    let redis_lines: Vec<&str> = body
        .lines()
        .filter(|line| {
            [
                "shardgate_redis_",
                "shardgate_retries_total",
                "shardgate_events_in_flight",
            ]
            .iter()
            .any(|name| line.starts_with(name))
                && !line.contains("_bucket")
        })
        .collect();
    println!("after the stall:\n{}", redis_lines.join("\n"));
    load.stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().expect("sender thread");
    }
    println!(
        "rss before the stall {rss_before} B ({:.2} MiB), after {rss_after} B ({:.2} MiB), max {:.2} MiB; \
         accepted {accepted_in_warmup} in the warm-up, {} during the stall; ACCEPTED again after {recovered_after:?}",
        rss_before as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
        rss_max as f64 / (1 << 20) as f64,
        accepted_before_resume - accepted_in_warmup,
    );
    assert!(
        rss_after <= rss_before + RSS_GROWTH_MAX_BYTES,
        "RSS grew by {} KiB during the stall (at most {} KiB)",
        rss_after.saturating_sub(rss_before) >> 10,
        RSS_GROWTH_MAX_BYTES >> 10
    );
    assert!(
        recovered_after.is_some_and(|after| after <= RECOVERY_MAX),
        "events were ACCEPTED again only after {recovered_after:?} (None: not within {RECOVERY_WATCH:?}), \
         expected within {RECOVERY_MAX:?} of SIGCONT"
    );
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(15)).success());
}
