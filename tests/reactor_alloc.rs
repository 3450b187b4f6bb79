//! A glommio executor that parks and wakes reuses its io_uring sources: after a warm-up, a
//! thousand sleeps allocate far less than one source each (the `SOURCE_POOL` patch,
//! third_party/glommio/PATCHED.md). Before the patch every park allocated two or more
//! sources of about 500 bytes: the poll that links the rings and the preemption timer.

use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use shardgate::sys::{thread_allocations, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const WARM_UP_SLEEPS: u32 = 500;
const MEASURED_SLEEPS: u32 = 2_000;

/// Allocations and bytes per sleep of `MEASURED_SLEEPS` short sleeps, each a park and a wake of
/// the reactor, counted on the executor's thread.
fn per_sleep() -> (f64, f64) {
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            for _ in 0..WARM_UP_SLEEPS {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            let (allocations_before, bytes_before) = thread_allocations();
            for _ in 0..MEASURED_SLEEPS {
                glommio::timer::sleep(Duration::from_micros(50)).await;
            }
            let (allocations_after, bytes_after) = thread_allocations();
            (allocations_after - allocations_before, bytes_after - bytes_before)
        })
        .expect("an executor starts");
    let (allocations, bytes) = executor.join().expect("the executor ends");
    let sleeps = f64::from(MEASURED_SLEEPS);
    (allocations as f64 / sleeps, bytes as f64 / sleeps)
}

#[test]
fn parking_reuses_the_reactors_sources() {
    let (allocations, bytes) = per_sleep();
    eprintln!("per sleep: {allocations:.2} allocations, {bytes:.0} bytes");
    // What is left is glommio's timer entry per sleep (a few dozen bytes), not a source.
    assert!(
        bytes < 200.0,
        "{bytes:.0} bytes per sleep: sources are allocated again (patch 0007), or timer-map nodes (patch 0002)"
    );
    assert!(allocations < 1.5, "{allocations:.2} allocations per sleep");
}
