//! What parking costs an executor's thread, shared by the glommio patch tests: one task parks and
//! wakes on one reused `Timer`, which itself allocates nothing per wait, so whatever the thread
//! allocates during the measured sleeps is the reactor's.

use std::time::Duration;

use glommio::timer::Timer;
use shardgate::sys::thread_allocations;

pub const WARM_UP_SLEEPS: u32 = 500;
pub const MEASURED_SLEEPS: u32 = 2_000;
pub const SLEEP: Duration = Duration::from_micros(50);

/// Allocations and bytes of this thread over `MEASURED_SLEEPS` short sleeps on one reused timer,
/// after `WARM_UP_SLEEPS`. Runs inside the executor under test.
pub async fn allocations_over_sleeps() -> (u64, u64) {
    let mut timer = Timer::new(SLEEP);
    for _ in 0..WARM_UP_SLEEPS {
        timer.reset(SLEEP);
        (&mut timer).await;
    }
    let (allocations_before, bytes_before) = thread_allocations();
    for _ in 0..MEASURED_SLEEPS {
        timer.reset(SLEEP);
        (&mut timer).await;
    }
    let (allocations_after, bytes_after) = thread_allocations();
    (allocations_after - allocations_before, bytes_after - bytes_before)
}
