//! A one-waiter wake-up for tasks on the same shard.
//!
//! Glommio runs each shard's tasks on one thread, so a `Cell` is enough: no
//! atomics, no lock. A notification that arrives while nobody waits is kept
//! (one bit), so a wake-up between "check the condition" and "wait" is never
//! lost.

use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Poll, Waker};

#[derive(Default)]
pub struct Notify {
    notified: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Resolves once `notify` has been called since the last wait returned.
    /// One task waits at a time; a second waiter would replace the first.
    pub async fn wait(&self) {
        poll_fn(|context| {
            if self.notified.replace(false) {
                return Poll::Ready(());
            }
            self.waker.set(Some(context.waker().clone()));
            Poll::Pending
        })
        .await
    }
}

/// A one-way latch many tasks of a shard can wait on: once opened it stays
/// open. Built on glommio's semaphore, whose `close` wakes every waiter.
pub struct Latch {
    semaphore: glommio::sync::Semaphore,
}

impl Default for Latch {
    fn default() -> Latch {
        Latch {
            semaphore: glommio::sync::Semaphore::new(0),
        }
    }
}

impl Latch {
    pub fn open(&self) {
        self.semaphore.close();
    }

    pub(crate) fn is_open(&self) -> bool {
        self.semaphore.try_acquire(1).is_err()
    }

    /// Resolves once the latch is open.
    pub async fn wait(&self) {
        // No permit is ever signalled, so acquire only returns when closed.
        let result = self.semaphore.acquire(1).await;
        debug_assert!(result.is_err());
    }
}
