//! Turns: the tests of one module of `tests/e2e` run beside each other, never beside another
//! module's.
//!
//! Each module was a test binary of its own, and cargo runs test binaries one after another:
//! the flood, the 60 s Redis stall, the rolling restart and the chaos soak had the machine to
//! themselves, and the tests of one file ran only beside each other. Their bounds (resident
//! memory, answers within N seconds, no kernel drops, a steady client rate) were tuned that
//! way, on 2 cores. Every test takes its module's turn first, so the one binary runs them as
//! the separate binaries did: up to `--test-threads` tests of one module at once, and a test
//! of another module only once the last of them has finished, passed or failed.

use std::sync::{Condvar, Mutex, PoisonError};

/// Whose turn it is: the module whose tests are running, and how many of them.
struct Floor {
    module: Option<&'static str>,
    running: usize,
}

static FLOOR: Mutex<Floor> = Mutex::new(Floor {
    module: None,
    running: 0,
});
static FREED: Condvar = Condvar::new();

/// Held by a running test; dropping it (also when the test panics) may end its module's turn.
#[must_use = "the turn ends when this is dropped: bind it to `_turn` for the whole test"]
pub struct Turn;

/// Waits until no test of another module runs, then counts this one in. Call it first in
/// every test, with `module_path!()`.
pub fn take_turn(module: &'static str) -> Turn {
    let mut floor = FLOOR.lock().unwrap_or_else(PoisonError::into_inner);
    while floor.running > 0 && floor.module != Some(module) {
        floor = FREED.wait(floor).unwrap_or_else(PoisonError::into_inner);
    }
    floor.module = Some(module);
    floor.running += 1;
    Turn
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut floor = FLOOR.lock().unwrap_or_else(PoisonError::into_inner);
        floor.running -= 1;
        if floor.running == 0 {
            floor.module = None;
            FREED.notify_all();
        }
    }
}
