//! One shard: the state a core owns, and admission: the decision each frame gets.
//!
//! A shard is a glommio executor on one core. Everything in `Shard` is touched
//! only by that thread (`Cell`/`RefCell`, no locks, no atomics), except the
//! dedup cache, which other shards read through their `DedupReader`s.
//!
//! # One event, top to bottom
//! 1. intake (`intake/udp.rs`, `intake/tcp.rs`) reads bytes and `frame::check` finds a frame.
//! 2. `take_frame` parses it (REJECTED if invalid) and `admit` decides:
//!    - DUPLICATE now, if this shard's or another shard's cache holds the id:
//!      the cache only ever holds ids Redis confirmed stored;
//!    - held, if a copy of the id is already in flight here: its outcome is
//!      unknown, so DUPLICATE now would be a lie if that write fails. The copy
//!      is answered when the original's call completes, DUPLICATE if it was
//!      stored and RETRY if not (`answer_held_copies`); RETRY at once when
//!      `HELD_COPIES_MAX` copies already wait;
//!    - RETRY now, if Redis is down, if the shard is at its in-flight bound,
//!      or if it is stopping;
//!    - otherwise it joins the open batch and answers later.
//! 3. The batch is sent when full, or when `batch_linger_us` has passed since
//!    its first event (`linger_loop`, `sink.rs`), as one script call (`redis/store.rs`).
//! 4. `complete` reads the outcome per event (ACCEPTED, DUPLICATE, or RETRY
//!    for all on error), records confirmed ids in the cache, clears them from
//!    the in-flight set, and sends the answers through intake's ack sink
//!    (`sink.rs`, `answer.rs`).
//!
//! # Bounds
//! At most `batches_in_flight_max` batches are in Redis and one is open, so
//! at most `inflight_events_max` events are held; past that frames get RETRY
//! at once. All batches and the in-flight set are allocated at start.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits::HELD_COPIES_MAX;
use crate::pipeline::answer::Route;
use crate::pipeline::dedup::{DedupReader, DedupWriter};
use crate::pipeline::keys::Secrets;
use crate::pipeline::liveness::Liveness;
use crate::pipeline::notify::{Latch, Notify};
use crate::pipeline::sink::Batches;
use crate::redis::store::Store;
use crate::telemetry::latency::Latency;
use crate::telemetry::metrics::{LookupOutcome, RetryCause, ShardMetrics, Transport};
use crate::wire::frame::{parse, Action, EventId, Header, RejectReason, Status};

/// What the pipeline needs from the command line; built by `host`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Events are spread over this many stream partitions by player id (protocol revision 2).
    pub partitions: u32,
    /// The key prefix, named in the message when the partition count differs.
    pub prefix: String,
    pub dedup_window_secs: u64,
    /// With auth on, the secrets frame tags are keyed from.
    pub auth: Option<Secrets>,
    pub batch_events_max: usize,
    pub batch_linger_us: u64,
    pub batches_in_flight_max: usize,
}

impl Settings {
    /// Events one shard may hold in its open batch and its sent batches.
    pub(crate) fn inflight_events_max(&self) -> usize {
        self.batch_events_max * (self.batches_in_flight_max + 1)
    }
}

/// What becomes of one whole frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Answered at once with this status.
    Now(Status),
    /// Joined a batch; answered when its call completes.
    Later,
    /// Its crc32c does not match: never answered, since its id cannot be
    /// trusted (protocol revision 2). UDP drops it; TCP closes the connection.
    Corrupt,
}

/// What `Shard::decide` makes of an event id before any batch.
pub(super) enum Decision {
    Answer(Status),
    /// A copy of an id in flight on this shard: it waits for the original.
    Hold,
    Batch,
}

/// A copy that arrived while its id was in flight on this shard, waiting for
/// the original's call to complete (`Shard::answer_held_copies`).
pub(super) struct HeldCopy {
    pub(super) id: EventId,
    pub(super) route: Route,
    pub(super) received_at: Instant,
}

/// At most one log line per this period about events Redis refused one by one.
pub(super) const EVENT_FAILURE_LOG_PERIOD: Duration = Duration::from_secs(10);
/// One core's pipeline. Its state is grouped by the stage that owns it: `admission` (this
/// file), `batches` (the sink chain, `sink.rs`) and `liveness` (`liveness.rs`).
pub struct Shard {
    pub index: usize,
    pub settings: Settings,
    pub store: Store,
    pub metrics: Arc<ShardMetrics>,
    pub latency: RefCell<Latency>,
    pub(super) admission: Admission,
    pub(super) batches: Batches,
    pub(super) liveness: Liveness,
    /// Opened when the shard stops taking frames.
    pub stopping: Latch,
    /// Opened when the drain deadline passes: calls still in Redis are answered RETRY.
    pub(super) abandon: Latch,
    /// Wakes `linger_loop` when a batch opens or a call completes.
    pub(super) linger: Notify,
    /// Wakes the drain when the last batch completes.
    pub(super) drained: Notify,
}

/// What admission decides with: the caches and the ids in flight.
pub(super) struct Admission {
    pub(super) dedup: RefCell<DedupWriter>,
    pub(super) peers: Vec<DedupReader>,
    /// Ids in a batch (open or in Redis), at most `inflight_events_max`; allocated at start.
    pub(super) in_flight: RefCell<HashSet<EventId>>,
    /// Copies of ids in flight, at most `HELD_COPIES_MAX`; allocated at start.
    pub(super) held_copies: RefCell<Vec<HeldCopy>>,
}

impl Admission {
    fn new(settings: &Settings, dedup: DedupWriter, peers: Vec<DedupReader>) -> Admission {
        Admission {
            dedup: RefCell::new(dedup),
            peers,
            // Twice the bound: ids come and go, and the table's deleted slots use up its room;
            // while at most half full it then rehashes in place, but past half it would grow
            // to a new table, an allocation on the receive path (tests/alloc.rs found it).
            in_flight: RefCell::new(HashSet::with_capacity(2 * settings.inflight_events_max())),
            held_copies: RefCell::new(Vec::with_capacity(HELD_COPIES_MAX)),
        }
    }
}

impl Shard {
    pub fn new(
        index: usize,
        settings: Settings,
        store: Store,
        dedup: DedupWriter,
        peers: Vec<DedupReader>,
        metrics: Arc<ShardMetrics>,
    ) -> Shard {
        let cluster = store.is_cluster();
        Shard {
            index,
            store,
            metrics,
            latency: RefCell::new(Latency::default()),
            admission: Admission::new(&settings, dedup, peers),
            batches: Batches::new(&settings, cluster),
            liveness: Liveness::default(),
            stopping: Latch::default(),
            abandon: Latch::default(),
            linger: Notify::default(),
            drained: Notify::default(),
            settings,
        }
    }

    /// Parses one whole frame and decides its fate (see `Fate`).
    pub fn take_frame(
        self: &Rc<Self>,
        frame: &[u8],
        header: Header,
        route: &Route,
        received_at: Instant,
        recv_us: u64,
    ) -> Fate {
        debug_assert_eq!(frame.len(), header.frame_bytes);
        let transport = route.transport();
        let answer = match parse(frame).and_then(|action| self.authenticate(action, recv_us)) {
            Ok(action) => {
                debug_assert_eq!(action.id, header.id);
                self.admit(&action, route, received_at, recv_us)
            }
            Err(RejectReason::Crc) => {
                self.metrics.frames_corrupt[transport as usize].add(1);
                return Fate::Corrupt;
            }
            Err(reason) => {
                self.metrics.reject(transport, reason);
                Some(Status::Rejected)
            }
        };
        match answer {
            Some(status) => {
                // Answered now: the ack goes out with the rest of this read's answers.
                self.record_answered(transport, status, received_at, Instant::now());
                Fate::Now(status)
            }
            None => Fate::Later,
        }
    }

    /// Starts the dedup lookups of every frame in `datagram` without waiting
    /// for them (`DedupWriter::prefetch`): called for a whole `recvmmsg` read
    /// before `take_frame` decides any of it. Reads only the frames' headers.
    pub fn prefetch(&self, datagram: &[u8]) {
        let dedup = self.admission.dedup.borrow();
        let mut offset = 0;
        while let Some(Ok(header)) = datagram.get(offset..).map(crate::wire::frame::check) {
            dedup.prefetch(header.id);
            for peer in &self.admission.peers {
                peer.prefetch(header.id);
            }
            offset += header.frame_bytes;
        }
    }

    /// With auth on, a frame needs a valid, fresh tag (`wire::auth`, `keys.rs`); without
    /// it, any tag a client sends is ignored.
    fn authenticate<'a>(&self, action: Action<'a>, recv_us: u64) -> Result<Action<'a>, RejectReason> {
        match &self.settings.auth {
            Some(secrets) if !secrets.admits(&action, recv_us, self.settings.dedup_window_secs) => {
                Err(RejectReason::Auth)
            }
            _ => Ok(action),
        }
    }

    fn admit(
        self: &Rc<Self>,
        action: &Action<'_>,
        route: &Route,
        received_at: Instant,
        recv_us: u64,
    ) -> Option<Status> {
        let id = action.id;
        match self.decide(id) {
            Decision::Answer(status) => return Some(status),
            Decision::Hold => return self.hold_copy(id, route, received_at),
            Decision::Batch => {}
        }
        let partition = (id.player_id % u64::from(self.settings.partitions)) as u32;
        let mut open = self.batches.open.borrow_mut();
        open.push(action, partition, recv_us, route.clone(), received_at);
        let (is_full, is_first) = (open.is_full(), open.len() == 1);
        drop(open);
        let mut in_flight = self.admission.in_flight.borrow_mut();
        let inserted = in_flight.insert(id);
        assert!(inserted, "an id in flight was answered RETRY above");
        debug_assert!(in_flight.len() <= self.settings.inflight_events_max());
        self.metrics.events_in_flight.set(in_flight.len() as i64);
        drop(in_flight);
        debug_assert!(self.slots_taken() <= self.settings.batches_in_flight_max);
        let pace = Duration::from_micros(self.settings.batch_linger_us);
        if is_full || (is_first && send_due(received_at, self.batches.last_call_at.get(), pace) <= received_at) {
            self.flush();
        } else if is_first {
            self.linger.notify();
        }
        None
    }

    /// Whether an event is answered now, waits for a copy in flight, or joins
    /// the open batch; see the module doc.
    fn decide(&self, id: EventId) -> Decision {
        if self.stopping.is_open() {
            self.metrics.retry(RetryCause::ShuttingDown);
            return Decision::Answer(Status::Retry);
        }
        if self.admission.dedup.borrow_mut().contains(id) {
            self.metrics.lookup(LookupOutcome::OwnHit);
            return Decision::Answer(Status::Duplicate);
        }
        if self.admission.in_flight.borrow().contains(&id) {
            self.metrics.lookup(LookupOutcome::InFlight);
            return Decision::Hold;
        }
        if self.admission.peers.iter().any(|peer| peer.contains(id)) {
            self.metrics.lookup(LookupOutcome::PeerHit);
            return Decision::Answer(Status::Duplicate);
        }
        self.metrics.lookup(LookupOutcome::Miss);
        if !self.liveness.redis_up.get() {
            self.metrics.retry(RetryCause::RedisDown);
            return Decision::Answer(Status::Retry);
        }
        if self.batches.open.borrow().is_full() {
            // Full and not sent: every in-flight slot is taken.
            self.metrics.retry(RetryCause::Overload);
            return Decision::Answer(Status::Retry);
        }
        Decision::Batch
    }

    /// Keeps a copy of an id in flight until the original's call completes;
    /// RETRY at once (`None` means held) when `HELD_COPIES_MAX` already wait.
    fn hold_copy(&self, id: EventId, route: &Route, received_at: Instant) -> Option<Status> {
        debug_assert!(self.admission.in_flight.borrow().contains(&id));
        let mut held = self.admission.held_copies.borrow_mut();
        if held.len() == HELD_COPIES_MAX {
            self.metrics.retry(RetryCause::InFlightCopy);
            return Some(Status::Retry);
        }
        held.push(HeldCopy {
            id,
            route: route.clone(),
            received_at,
        });
        debug_assert!(held.len() <= held.capacity(), "held copies never grow their buffer");
        None
    }

    /// Counts an answer given without a Redis call and records its latency.
    pub(crate) fn record_answered(&self, transport: Transport, status: Status, received_at: Instant, now: Instant) {
        self.metrics.ack(transport, status, 1);
        let mut latency = self.latency.borrow_mut();
        latency.record_intake_to_ack(received_at, now);
        let elapsed_us = now.saturating_duration_since(received_at).as_micros() as u64;
        self.metrics.intake_to_ack_us[transport as usize].observe(elapsed_us);
    }
    pub(crate) fn dedup_len_events(&self) -> usize {
        self.admission.dedup.borrow().len_events()
    }
}
/// When an open batch that is not full goes to Redis: one pace after the last
/// call started, but never before its first event came. So after a quiet
/// period the first event goes at once, and under load calls go one pace
/// apart with every event that came meanwhile: batches grow with the load
/// while calls per second stay flat (group commit). An event waits at most
/// one pace.
pub(super) fn send_due(opened_at: Instant, last_call_at: Option<Instant>, pace: Duration) -> Instant {
    match last_call_at {
        Some(last_call_at) => opened_at.max(last_call_at + pace),
        None => opened_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a quiet period a batch goes at once; under load calls go one pace apart, and no event waits longer.
    #[test]
    fn calls_are_paced() {
        let pace = Duration::from_millis(1);
        let start = Instant::now();
        assert_eq!(send_due(start, None, pace), start, "the first batch ever goes at once");
        let quiet = start + Duration::from_millis(5);
        assert_eq!(
            send_due(quiet, Some(start), pace),
            quiet,
            "after a quiet period: at once"
        );
        let busy = start + Duration::from_micros(100);
        assert_eq!(
            send_due(busy, Some(start), pace),
            start + pace,
            "under load: one pace after the last call"
        );
        for offset_us in [0, 1, 500, 999, 1_000, 5_000] {
            let opened_at = start + Duration::from_micros(offset_us);
            let due = send_due(opened_at, Some(start), pace);
            assert!(due >= opened_at && due <= opened_at + pace, "waits at most one pace");
        }
    }
}
