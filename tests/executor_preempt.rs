//! Proves the patched glommio (third_party/glommio/PATCHED.md) never parks
//! with runnable work when the preempt timer fires before any task ran.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// A 1 ns preempt timer makes "preempted before anything ran" the common case;
/// unpatched glommio 0.9.0 hangs here within a few iterations.
#[test]
fn runnable_work_survives_early_preemption() {
    let (done, finished) = mpsc::channel();
    let worker = thread::spawn(move || {
        let executor = glommio::LocalExecutorBuilder::default()
            .preempt_timer(Duration::from_nanos(1))
            .make()
            .expect("an executor starts");
        for round in 0..1_000u32 {
            let value = executor.run(async move { glommio::spawn_local(async move { round + 1 }).await });
            assert_eq!(value, round + 1);
        }
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the executor stopped making progress with runnable work (glommio parks while tasks are queued)");
    worker.join().expect("the worker thread ends");
}

/// A busy task that yields when asked is still preempted at about the preempt
/// timer's rate, and a timer in another task queue still fires on time, now that
/// the patched reactor keeps an armed preempt timer across loops instead of
/// cancelling and re-arming it on every loop.
#[test]
fn kept_preempt_timer_still_preempts_and_lets_timers_run() {
    const PREEMPT_TIMER: Duration = Duration::from_micros(250);
    const RUN_FOR: Duration = Duration::from_millis(300);
    const TICK: Duration = Duration::from_millis(2);
    let (done, finished) = mpsc::channel();
    let worker = thread::spawn(move || {
        let executor = glommio::LocalExecutorBuilder::default()
            .preempt_timer(PREEMPT_TIMER)
            .make()
            .expect("an executor starts");
        let counts = executor.run(async move {
            let ticker_queue = glommio::executor().create_task_queue(
                glommio::Shares::default(),
                glommio::Latency::Matters(Duration::from_millis(1)),
                "ticker",
            );
            let ticker =
                glommio::spawn_local_into(ticks_for(RUN_FOR, TICK), ticker_queue).expect("the ticker queue exists");
            let busy = glommio::spawn_local(async move {
                let started = std::time::Instant::now();
                let mut preemptions = 0u32;
                while started.elapsed() < RUN_FOR {
                    if glommio::executor().need_preempt() {
                        preemptions += 1;
                        glommio::executor().yield_task_queue_now().await;
                    }
                    std::hint::spin_loop();
                }
                preemptions
            });
            (busy.await, ticker.await)
        });
        let _ = done.send(counts);
    });
    let (preemptions, ticks) = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the executor stopped making progress");
    worker.join().expect("the worker thread ends");
    // 300 ms of a 250 µs timer is 1 200 preemptions on a quiet core; a tenth of
    // that still proves the timer keeps firing on a shared, noisy machine. The
    // ticker asks for 150 ticks; a third of them proves it was not starved.
    assert!(
        preemptions >= 120,
        "the busy task was preempted only {preemptions} times in {RUN_FOR:?}"
    );
    assert!(
        ticks >= 50,
        "the 2 ms ticker in another queue ticked only {ticks} times in {RUN_FOR:?}"
    );
    // And the other way: the preempt timer does not fire far more often than asked.
    assert!(
        preemptions <= 3 * 1_200,
        "preempted {preemptions} times: more than the timer allows"
    );
}

/// An executor woken by I/O many times, and then left with nothing but a timer,
/// still wakes for the timer: the user timer that the patched reactor keeps
/// armed across sleeps is replaced when it fired and never left stale.
#[test]
fn timers_still_wake_a_sleeping_executor_after_io_wakes() {
    const SENDING_FOR: Duration = Duration::from_millis(100);
    const TICKING_FOR: Duration = Duration::from_millis(300);
    const TICK: Duration = Duration::from_millis(2);
    let (address_sent, address_received) = mpsc::channel::<std::net::SocketAddr>();
    let sender = thread::spawn(move || {
        let address = address_received.recv().expect("the executor's socket address");
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a loopback socket");
        let started = std::time::Instant::now();
        while started.elapsed() < SENDING_FOR {
            let _ = socket.send_to(b"wake", address);
            thread::sleep(Duration::from_micros(300));
        }
    });
    let (done, finished) = mpsc::channel();
    let worker = thread::spawn(move || {
        let executor = glommio::LocalExecutorBuilder::default()
            .preempt_timer(Duration::from_micros(250))
            .make()
            .expect("an executor starts");
        let counts = executor.run(async move {
            let socket = glommio::net::UdpSocket::bind("127.0.0.1:0").expect("a loopback socket");
            address_sent
                .send(socket.local_addr().unwrap())
                .expect("the sender waits");
            let reader = glommio::spawn_local(async move {
                let mut buffer = [0u8; 16];
                let mut datagrams = 0u32;
                let read_until = std::time::Instant::now() + SENDING_FOR;
                while std::time::Instant::now() < read_until {
                    let wait = glommio::timer::timeout(Duration::from_millis(20), async {
                        Ok(socket.recv_from(&mut buffer).await)
                    });
                    if let Ok(Ok(_)) = wait.await {
                        datagrams += 1;
                    }
                }
                datagrams
            });
            let ticker = glommio::spawn_local(ticks_for(TICKING_FOR, TICK));
            (reader.await, ticker.await)
        });
        let _ = done.send(counts);
    });
    let (datagrams, ticks) = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the executor slept through its timers after the I/O stopped");
    worker.join().expect("the worker thread ends");
    sender.join().expect("the sender ends");
    assert!(
        datagrams >= 20,
        "only {datagrams} datagrams woke the executor: the test did not exercise I/O wakes"
    );
    // 150 ticks on a quiet machine; two thirds of them come after the I/O stopped.
    assert!(
        ticks >= 50,
        "the 2 ms ticker ticked only {ticks} times in {TICKING_FOR:?}"
    );
}

/// Sleeps `tick` at a time for `run_for` and counts the wake-ups.
async fn ticks_for(run_for: Duration, tick: Duration) -> u32 {
    let started = std::time::Instant::now();
    let mut ticks = 0u32;
    while started.elapsed() < run_for {
        glommio::timer::sleep(tick).await;
        ticks += 1;
    }
    ticks
}
