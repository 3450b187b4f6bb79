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
