//! A glommio reactor with timers pending polls its timer map without allocating (glommio patch
//! 0002, third_party/glommio/PATCHED.md). Every reactor poll runs `Timers::process_timers`, several
//! times per park and wake (four here); upstream split the map there with `BTreeMap::split_off`,
//! which allocates a new tree node (456 bytes for glommio's key and waker) whenever the map is
//! not empty, that is whenever any timer is pending. The patch pops the due timers from the front
//! instead. Here several tasks hold long timers while one task parks and wakes thousands of times
//! on a reused `Timer`, which itself allocates nothing per wait, so the executor thread should
//! allocate nothing at all per park.

use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use reused_timer::{allocations_over_sleeps, MEASURED_SLEEPS};
use shardgate::sys::CountingAllocator;

mod reused_timer;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Tasks each waiting on a timer that never fires during the test: several fit in one node of
/// the timer map, as a shard's few timers do.
const PENDING_TIMERS: usize = 8;

/// Allocations and bytes per park of `MEASURED_SLEEPS` short sleeps on one reused timer, with
/// `PENDING_TIMERS` other timers pending, counted on the executor's thread.
fn per_sleep_with_timers_pending() -> (f64, f64) {
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(|| async {
            let waiters: Vec<_> = (0..PENDING_TIMERS)
                .map(|_| glommio::spawn_local(glommio::timer::sleep(Duration::from_secs(3_600))).detach())
                .collect();
            let counted = allocations_over_sleeps().await;
            for waiter in waiters {
                waiter.cancel();
            }
            counted
        })
        .expect("an executor starts");
    let (allocations, bytes) = executor.join().expect("the executor ends");
    let sleeps = f64::from(MEASURED_SLEEPS);
    (allocations as f64 / sleeps, bytes as f64 / sleeps)
}

/// Parking and waking with timers pending allocates nothing per reactor poll.
#[test]
fn polling_with_timers_pending_allocates_nothing() {
    let (allocations, bytes) = per_sleep_with_timers_pending();
    let bytes_each = if allocations > 0.0 { bytes / allocations } else { 0.0 };
    eprintln!("per sleep with {PENDING_TIMERS} timers pending: {allocations:.3} allocations, {bytes:.1} bytes");
    // Without the patch: one tree node per poll (the map is never empty here), at least one poll
    // per sleep and four in practice (4.0 allocations and 1 824 bytes per sleep measured). With
    // it: none. A tenth of an allocation per sleep leaves room for a stray one and still fails
    // by a factor of ten or more.
    assert!(
        allocations < 0.1,
        "{allocations:.3} allocations per sleep ({bytes_each:.0} bytes each) with timers pending: the timer map \
         allocates on every poll again (patch 0002, 456-byte nodes), or another part of the park does \
         (tests/reactor_alloc.rs covers the reactor's sources, patch 0007)"
    );
}
