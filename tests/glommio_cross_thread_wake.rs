//! A wake across threads is never lost (glommio patch 0004, third_party/glommio/PATCHED.md):
//! two executors on their own threads pass a counter back and forth through glommio's shared
//! channels many thousand times, each parking between messages. The patch replaced the
//! `membarrier` between a sleeper's "notify me" flag and its last look at its channels with a
//! SeqCst fence on each side; if a push and a sleep ever missed each other, one executor would
//! sleep with a message waiting and the exchange would stop, which the watchdog reports.

use std::sync::mpsc;
use std::time::Duration;

use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};

const ROUND_TRIPS: u64 = 20_000;
/// Far above the few seconds the exchange takes in a debug build on a loaded 2-core machine.
const WATCHDOG: Duration = Duration::from_secs(120);

#[test]
fn cross_thread_wakes_are_never_lost() {
    let (to_echo, echo_inbox) = shared_channel::new_bounded::<u64>(1);
    let (to_origin, origin_inbox) = shared_channel::new_bounded::<u64>(1);
    let (finished, finished_seen) = mpsc::channel::<u64>();

    let echo = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let inbox = echo_inbox.connect().await;
            let outbox = to_origin.connect().await;
            while let Some(count) = inbox.recv().await {
                if outbox.send(count + 1).await.is_err() {
                    break;
                }
            }
        })
        .expect("the echo executor starts");
    let origin = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            let outbox = to_echo.connect().await;
            let inbox = origin_inbox.connect().await;
            let mut count = 0;
            for _ in 0..ROUND_TRIPS {
                outbox.send(count).await.expect("the echo is there");
                count = inbox.recv().await.expect("the echo answers") + 1;
            }
            finished.send(count).expect("the test waits");
        })
        .expect("the origin executor starts");

    let count = finished_seen.recv_timeout(WATCHDOG).unwrap_or_else(|_| {
        panic!(
            "the exchange stopped before {ROUND_TRIPS} round trips within {WATCHDOG:?}: a cross-thread wake was lost"
        )
    });
    assert_eq!(count, 2 * ROUND_TRIPS, "each side added one per message");
    origin.join().expect("the origin ends");
    echo.join().expect("the echo ends once the origin's channel closes");
}
