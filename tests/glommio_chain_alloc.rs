//! The throughput timer's submission chain stays inline (glommio patch 0003,
//! third_party/glommio/PATCHED.md). The reactor keeps a throughput timer armed on the main ring:
//! a timeout that fires after `ring_depth` completions there, linked to a write of the latency
//! ring's eventfd. Once it fires, the next reactor loop arms a new one, and submitting that chain
//! of two descriptors collected it into a `SmallVec` with room for one, which spilled to the heap
//! (96 bytes) on every re-arm. The patch gives it room for two.
//!
//! Each park of an executor ends with one main-ring completion (the poll that links the rings),
//! so with a ring depth of `RING_DEPTH` the timer is re-armed about once every `RING_DEPTH`
//! parks. A small depth makes the re-arm frequent; shardgate's default of 128 only makes it rarer.
//! One task parks and wakes on a reused `Timer`, which itself allocates nothing per wait.

use glommio::{LocalExecutorBuilder, Placement};
use reused_timer::{allocations_over_sleeps, MEASURED_SLEEPS};
use shardgate::sys::CountingAllocator;

mod reused_timer;

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// The throughput timer fires after this many main-ring completions (glommio's default is 128).
const RING_DEPTH: usize = 4;

/// Allocations and bytes of the measured sleeps (`reused_timer`), counted on the thread of an
/// executor whose rings are `RING_DEPTH` deep.
fn allocations_at_ring_depth() -> (u64, u64) {
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .ring_depth(RING_DEPTH)
        .spawn(allocations_over_sleeps)
        .expect("an executor starts");
    executor.join().expect("the executor ends")
}

/// Re-arming the throughput timer, a linked chain of two descriptors, allocates nothing.
#[test]
fn throughput_timer_rearm_allocates_nothing() {
    let (allocations, bytes) = allocations_at_ring_depth();
    // One main-ring completion per park: about one re-arm every RING_DEPTH sleeps.
    let rearms = f64::from(MEASURED_SLEEPS) / RING_DEPTH as f64;
    let per_rearm = allocations as f64 / rearms;
    let bytes_each = bytes.checked_div(allocations).unwrap_or(0);
    eprintln!(
        "{MEASURED_SLEEPS} sleeps at ring depth {RING_DEPTH}: {allocations} allocations, {bytes} bytes \
         ({per_rearm:.3} per expected re-arm of the throughput timer)"
    );
    // Without the patch: one 96-byte spill per re-arm (500 allocations, 1.0 per re-arm, measured).
    // With it: none. A tenth per re-arm leaves room for a stray allocation, and for a loaded
    // machine where some sleeps find their timer due without parking, and still fails if most
    // re-arms spill.
    assert!(
        per_rearm < 0.1,
        "{per_rearm:.3} allocations per throughput timer re-arm ({bytes_each} bytes each): its two-descriptor \
         chain spills to the heap again (patch 0003, 96 bytes each), or another part of the park allocates \
         (tests/glommio_timer_alloc.rs and tests/reactor_alloc.rs cover patches 0002 and 0007)"
    );
}
