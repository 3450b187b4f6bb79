//! Run-wide counters, shared by every lane, and the live progress line built from them.
//!
//! Counters are relaxed atomics: each is a tally read only for display while the run goes and
//! once after every thread has been joined, so no ordering between them is needed.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use shardgate_proto::frame::Status;

use crate::schedule::Clock;

/// How often the progress line is redrawn.
const PROGRESS_PERIOD: Duration = Duration::from_millis(250);

#[derive(Default)]
pub struct Counters {
    /// First sends of frames (fresh events and copies), not resends.
    pub sent: AtomicU64,
    /// First sends that were copies of an earlier event.
    pub copies: AtomicU64,
    /// Sends beyond the first of a frame (after RETRY or a timeout).
    pub resent: AtomicU64,
    /// Answers received, by status (wire value as index), matched to a frame or not.
    pub answers: [AtomicU64; 4],
    /// Frames done: answered ACCEPTED, DUPLICATE or REJECTED.
    pub resolved: AtomicU64,
    /// Acks for an id the lane was not awaiting (late answers to frames already done).
    pub unmatched_acks: AtomicU64,
    /// Reply bytes that were not a valid ack.
    pub malformed_acks: AtomicU64,
    /// Sends the OS refused (e.g. no server: ICMP port unreachable); the frames time out and resend.
    pub send_errors: AtomicU64,
    /// TCP connections that broke and were opened again.
    pub reconnects: AtomicU64,
}

/// A plain copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub copies: u64,
    pub resent: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub retry: u64,
    pub rejected: u64,
    pub resolved: u64,
    pub unmatched_acks: u64,
    pub malformed_acks: u64,
    pub send_errors: u64,
    pub reconnects: u64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn answered(&self, status: Status) {
        Counters::add(&self.answers[status as usize], 1);
    }

    pub fn tally(&self) -> Tally {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Tally {
            sent: load(&self.sent),
            copies: load(&self.copies),
            resent: load(&self.resent),
            accepted: load(&self.answers[Status::Accepted as usize]),
            duplicate: load(&self.answers[Status::Duplicate as usize]),
            retry: load(&self.answers[Status::Retry as usize]),
            rejected: load(&self.answers[Status::Rejected as usize]),
            resolved: load(&self.resolved),
            unmatched_acks: load(&self.unmatched_acks),
            malformed_acks: load(&self.malformed_acks),
            send_errors: load(&self.send_errors),
            reconnects: load(&self.reconnects),
        }
    }
}

impl Tally {
    pub fn answers_total(&self) -> u64 {
        self.accepted + self.duplicate + self.retry + self.rejected
    }
}

/// Draws the progress line on stderr until `done`, if stderr is a terminal (a log file would
/// only collect carriage returns).
pub fn spawn_progress(
    counters: Arc<Counters>,
    clock: Clock,
    duration: Duration,
    done: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let thread = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            let mut before = Tally::default();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(PROGRESS_PERIOD);
                let now = counters.tally();
                let elapsed_secs = clock.now_ns() as f64 / 1e9;
                let line = progress_line(&before, &now, elapsed_secs, duration.as_secs_f64());
                let mut stderr = std::io::stderr().lock();
                let _ = write!(stderr, "\r\x1b[K{line}");
                let _ = stderr.flush();
                before = now;
            }
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        })
        .ok()?;
    Some(thread)
}

fn progress_line(before: &Tally, now: &Tally, elapsed_secs: f64, duration_secs: f64) -> String {
    let rate_per_sec = now.sent.saturating_sub(before.sent) as f64 / PROGRESS_PERIOD.as_secs_f64();
    format!(
        "{elapsed_secs:5.1}s/{duration_secs:.0}s  sent {} ({rate_per_sec:.0}/s)  accepted {}  duplicate {}  retry {}  \
         rejected {}  awaiting {}  resent {}",
        now.sent,
        now.accepted,
        now.duplicate,
        now.retry,
        now.rejected,
        now.sent.saturating_sub(now.resolved),
        now.resent
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // The line shows the rate since the last redraw and what still awaits an answer.
    #[test]
    fn progress_line_shows_rate_and_awaiting() {
        let before = Tally {
            sent: 1_000,
            ..Tally::default()
        };
        let now = Tally {
            sent: 6_000,
            resolved: 5_900,
            accepted: 5_000,
            ..Tally::default()
        };
        let line = progress_line(&before, &now, 2.5, 30.0);
        assert!(line.contains("(20000/s)"), "{line}");
        assert!(line.contains("awaiting 100"), "{line}");
        assert!(line.starts_with("  2.5s/30s"), "{line}");
    }

    #[test]
    fn tally_reads_answers_by_status() {
        let counters = Counters::default();
        counters.answered(Status::Retry);
        counters.answered(Status::Retry);
        counters.answered(Status::Accepted);
        let tally = counters.tally();
        assert_eq!((tally.accepted, tally.retry, tally.answers_total()), (1, 2, 3));
    }
}
