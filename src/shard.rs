//! One shard: the state a core owns, and the decision each frame gets.
//!
//! A shard is a glommio executor on one core. Everything in `Shard` is touched
//! only by that thread (`Cell`/`RefCell`, no locks, no atomics), except the
//! dedup cache, which other shards read through their `DedupReader`s.
//!
//! # One event, top to bottom
//! 1. `udp.rs`/`tcp.rs` read bytes and `frame::check` finds a frame.
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
//!    its first event (`linger_loop`), as one script call (`store.rs`).
//! 4. `complete` reads the outcome per event (ACCEPTED, DUPLICATE, or RETRY
//!    for all on error), records confirmed ids in the cache, clears them from
//!    the in-flight set, and sends the answers (`reply.rs`).
//!
//! # Bounds
//! At most `batches_in_flight_max` batches are in Redis and one is open, so
//! at most `inflight_events_max` events are held; past that frames get RETRY
//! at once. All batches and the in-flight set are allocated at start.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::udp::UdpIo;

use crate::batch::Batch;
use crate::config::Config;
use crate::dedup::{DedupReader, DedupWriter};
use crate::frame::{parse, Action, EventId, Header, RejectReason, Status};
use crate::latency::Latency;
use crate::limits::{HELD_COPIES_MAX, REPLY_BOOK_DESTINATIONS};
use crate::metrics::{LookupOutcome, RetryCause, ShardMetrics, Transport};
use crate::notify::{Latch, Notify};
use crate::reply::{ReplyBook, Route};
use crate::snapshot::Snapshots;
use crate::store::{EventFailures, Outcome, Partitions, Store};

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
enum Decision {
    Answer(Status),
    /// A copy of an id in flight on this shard: it waits for the original.
    Hold,
    Batch,
}

/// A copy that arrived while its id was in flight on this shard, waiting for
/// the original's call to complete (`Shard::answer_held_copies`).
struct HeldCopy {
    id: EventId,
    route: Route,
    received_at: Instant,
}

/// Makes one script call at a time, for the batch `Shard::flush` hands it.
///
/// A task per call was spawned before: its future, fred's call nested inside,
/// is about 24 KB, and that allocation was two thirds of the heap the server
/// allocated per frame (bench/wins.md). The shard's callers are spawned once,
/// at start, so a call spawns nothing.
struct Caller {
    /// The batch to send, put here by `flush` and taken by the caller's task.
    batch: RefCell<Option<Batch>>,
    /// Wakes the caller's task for a batch, or to end.
    ready: Notify,
}

/// At most one log line per this period about events Redis refused one by one.
const EVENT_FAILURE_LOG_PERIOD: Duration = Duration::from_secs(10);

pub struct Shard {
    pub index: usize,
    pub config: Arc<Config>,
    pub udp: UdpIo,
    pub store: Store,
    dedup: RefCell<DedupWriter>,
    peers: Vec<DedupReader>,
    in_flight: RefCell<HashSet<EventId>>,
    /// Copies of ids in flight, at most `HELD_COPIES_MAX`; allocated at start.
    held_copies: RefCell<Vec<HeldCopy>>,
    open: RefCell<Batch>,
    /// Free batches, ready to fill.
    spare: RefCell<VecDeque<Batch>>,
    /// Answered batches whose blob the Redis client still holds (`batch.rs`):
    /// they count against the in-flight bound until it lets go.
    held: RefCell<Vec<Batch>>,
    /// Calls sent and not yet answered.
    batches_in_flight: Cell<usize>,
    /// One per in-flight slot, each with a task spawned at start (`caller_loop`).
    callers: Vec<Caller>,
    /// Callers with no batch. A caller is busy exactly while its batch is in
    /// flight, so a free slot means an idle caller.
    idle_callers: RefCell<Vec<usize>>,
    /// Set after the drain: the callers' tasks end.
    callers_closed: Cell<bool>,
    /// When the last call started: calls are paced `batch_linger_us` apart.
    last_call_at: Cell<Option<Instant>>,
    /// Numbers the calls; the script echoes it (`script.rs`).
    call_nonce: Cell<u64>,
    /// Set once this process's partition count agrees with the one recorded
    /// under the prefix; until then the shard answers RETRY as if Redis were down.
    partitions_agreed: Cell<bool>,
    partitions_check_running: Cell<bool>,
    partitions_check_logged_at: Cell<Option<Instant>>,
    /// Refused events since the last log line, and when that line was written.
    event_failures_unlogged: Cell<u64>,
    event_failures_logged_at: Cell<Option<Instant>>,
    pub metrics: Arc<ShardMetrics>,
    pub latency: RefCell<Latency>,
    redis_up: Cell<bool>,
    /// Failed calls since start: the tick loop logs them as a summary, not one line each.
    redis_failures: Cell<u64>,
    /// Opened when the shard stops taking frames.
    pub stopping: Latch,
    /// Opened when the drain deadline passes: calls still in Redis are answered RETRY.
    abandon: Latch,
    /// Wakes `linger_loop` when a batch opens or a call completes.
    linger: Notify,
    /// Wakes the drain when the last batch completes.
    drained: Notify,
    pub tcp_connections_open: Cell<usize>,
    pub tcp_closed: Notify,
}

impl Shard {
    pub fn new(
        index: usize,
        config: Arc<Config>,
        udp: UdpIo,
        store: Store,
        dedup: DedupWriter,
        peers: Vec<DedupReader>,
        metrics: Arc<ShardMetrics>,
    ) -> Shard {
        let batches: VecDeque<Batch> = (0..config.batches_in_flight_max)
            .map(|_| Batch::new(config.batch_events_max))
            .collect();
        let in_flight = HashSet::with_capacity(config.inflight_events_max());
        Shard {
            index,
            udp,
            store,
            dedup: RefCell::new(dedup),
            peers,
            in_flight: RefCell::new(in_flight),
            held_copies: RefCell::new(Vec::with_capacity(HELD_COPIES_MAX)),
            open: RefCell::new(Batch::new(config.batch_events_max)),
            spare: RefCell::new(batches),
            held: RefCell::new(Vec::with_capacity(config.batches_in_flight_max)),
            batches_in_flight: Cell::new(0),
            callers: (0..config.batches_in_flight_max)
                .map(|_| Caller {
                    batch: RefCell::new(None),
                    ready: Notify::default(),
                })
                .collect(),
            idle_callers: RefCell::new((0..config.batches_in_flight_max).rev().collect()),
            callers_closed: Cell::new(false),
            last_call_at: Cell::new(None),
            call_nonce: Cell::new(0),
            partitions_agreed: Cell::new(false),
            partitions_check_running: Cell::new(false),
            partitions_check_logged_at: Cell::new(None),
            event_failures_unlogged: Cell::new(0),
            event_failures_logged_at: Cell::new(None),
            metrics,
            latency: RefCell::new(Latency::default()),
            redis_up: Cell::new(false),
            redis_failures: Cell::new(0),
            stopping: Latch::default(),
            abandon: Latch::default(),
            linger: Notify::default(),
            drained: Notify::default(),
            tcp_connections_open: Cell::new(0),
            tcp_closed: Notify::default(),
            config,
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
        let dedup = self.dedup.borrow();
        let mut offset = 0;
        while let Some(Ok(header)) = datagram.get(offset..).map(crate::frame::check) {
            dedup.prefetch(header.id);
            for peer in &self.peers {
                peer.prefetch(header.id);
            }
            offset += header.frame_bytes;
        }
    }

    /// With auth on, a frame needs a valid, fresh tag (`auth.rs`); without
    /// it, any tag a client sends is ignored.
    fn authenticate<'a>(&self, action: Action<'a>, recv_us: u64) -> Result<Action<'a>, RejectReason> {
        match &self.config.auth {
            Some(secrets) if !secrets.admits(&action, recv_us, self.config.dedup_window_secs) => {
                Err(RejectReason::Auth)
            }
            _ => Ok(action),
        }
    }

    fn admit(
        self: &Rc<Self>,
        action: &crate::frame::Action<'_>,
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
        let partition = (id.player_id % u64::from(self.config.partitions)) as u32;
        let mut open = self.open.borrow_mut();
        open.push(action, partition, recv_us, route.clone(), received_at);
        let (is_full, is_first) = (open.is_full(), open.len() == 1);
        drop(open);
        let mut in_flight = self.in_flight.borrow_mut();
        let inserted = in_flight.insert(id);
        assert!(inserted, "an id in flight was answered RETRY above");
        debug_assert!(in_flight.len() <= self.config.inflight_events_max());
        self.metrics.events_in_flight.set(in_flight.len() as i64);
        drop(in_flight);
        debug_assert!(self.slots_taken() <= self.config.batches_in_flight_max);
        let pace = Duration::from_micros(self.config.batch_linger_us);
        if is_full || (is_first && send_due(received_at, self.last_call_at.get(), pace) <= received_at) {
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
        if self.dedup.borrow_mut().contains(id) {
            self.metrics.lookup(LookupOutcome::OwnHit);
            return Decision::Answer(Status::Duplicate);
        }
        if self.in_flight.borrow().contains(&id) {
            self.metrics.lookup(LookupOutcome::InFlight);
            return Decision::Hold;
        }
        if self.peers.iter().any(|peer| peer.contains(id)) {
            self.metrics.lookup(LookupOutcome::PeerHit);
            return Decision::Answer(Status::Duplicate);
        }
        self.metrics.lookup(LookupOutcome::Miss);
        if !self.redis_up.get() {
            self.metrics.retry(RetryCause::RedisDown);
            return Decision::Answer(Status::Retry);
        }
        if self.open.borrow().is_full() {
            // Full and not sent: every in-flight slot is taken.
            self.metrics.retry(RetryCause::Overload);
            return Decision::Answer(Status::Retry);
        }
        Decision::Batch
    }

    /// Keeps a copy of an id in flight until the original's call completes;
    /// RETRY at once (`None` means held) when `HELD_COPIES_MAX` already wait.
    fn hold_copy(&self, id: EventId, route: &Route, received_at: Instant) -> Option<Status> {
        debug_assert!(self.in_flight.borrow().contains(&id));
        let mut held = self.held_copies.borrow_mut();
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
    pub fn record_answered(&self, transport: Transport, status: Status, received_at: Instant, now: Instant) {
        self.metrics.ack(transport, status, 1);
        let mut latency = self.latency.borrow_mut();
        latency.record_intake_to_ack(received_at, now);
        let elapsed_us = now.saturating_duration_since(received_at).as_micros() as u64;
        self.metrics.intake_to_ack_us[transport as usize].observe(elapsed_us);
    }

    /// Sends the open batch if it has events and an in-flight slot is free:
    /// a spare batch to take its place. Held batches take no slot back until
    /// the Redis client lets go of them.
    pub fn flush(&self) {
        if self.open.borrow().is_empty() {
            return;
        }
        if self.spare.borrow().is_empty() {
            self.release_held();
        }
        let Some(spare) = self.spare.borrow_mut().pop_front() else {
            return;
        };
        assert!(!self.callers_closed.get(), "no batch is sent after the drain");
        let caller = self.idle_callers.borrow_mut().pop();
        let caller = caller.expect("a free slot means an idle caller: busy callers are the batches in flight");
        let batch = self.open.replace(spare);
        self.last_call_at.set(Some(Instant::now()));
        self.batches_in_flight.set(self.batches_in_flight.get() + 1);
        debug_assert!(self.batches_in_flight.get() <= self.config.batches_in_flight_max);
        debug_assert_eq!(
            self.batches_in_flight.get() + self.idle_callers.borrow().len(),
            self.callers.len()
        );
        let previous = self.callers[caller].batch.replace(Some(batch));
        assert!(previous.is_none(), "an idle caller holds no batch");
        self.callers[caller].ready.notify();
    }

    /// The task of caller `caller`: sends each batch `flush` hands it, until
    /// `close_callers`. Spawned once per in-flight slot at start.
    pub async fn caller_loop(self: Rc<Self>, caller: usize) {
        loop {
            let batch = self.callers[caller].batch.take();
            match batch {
                Some(batch) => {
                    self.send(batch).await;
                    // No await since `send` counted the call done, so no
                    // `flush` ran meanwhile without this caller.
                    self.idle_callers.borrow_mut().push(caller);
                }
                None if self.callers_closed.get() => return,
                None => self.callers[caller].ready.wait().await,
            }
        }
    }

    /// Ends the callers' tasks, once the drain has answered every batch.
    pub fn close_callers(&self) {
        assert_eq!(self.batches_in_flight.get(), 0, "the drain answered every batch");
        self.callers_closed.set(true);
        for caller in &self.callers {
            caller.ready.notify();
        }
    }

    /// Moves held batches whose blob the Redis client dropped back to the
    /// spare pool; true if any came back.
    fn release_held(&self) -> bool {
        let mut held = self.held.borrow_mut();
        let mut spare = self.spare.borrow_mut();
        let mut index = 0;
        let mut released = false;
        while index < held.len() {
            if held[index].try_release() {
                spare.push_back(held.swap_remove(index));
                released = true;
            } else {
                index += 1;
            }
        }
        released
    }

    /// Batches not free: in Redis or held.
    fn slots_taken(&self) -> usize {
        self.batches_in_flight.get() + self.held.borrow().len()
    }

    async fn send(&self, mut batch: Batch) {
        let blob = batch.take_blob();
        let event_count = batch.len();
        let nonce = self.call_nonce.get().wrapping_add(1);
        self.call_nonce.set(nonce);
        let started = Instant::now();
        let mut outcomes = std::mem::take(batch.outcomes_mut());
        let mut failures = EventFailures::default();
        let call = self
            .store
            .dedup_append(nonce, event_count, blob, &mut outcomes, &mut failures);
        let abandoned = async {
            self.abandon.wait().await;
            Err(crate::store::StoreError::abandoned())
        };
        let result = futures_lite::future::or(call, abandoned).await;
        let round_trip = started.elapsed();
        self.latency.borrow_mut().record_redis_round_trip(round_trip);
        self.metrics.redis_round_trip_us.observe(round_trip.as_micros() as u64);
        self.metrics.batch_events.observe(event_count as u64);
        if let Err(error) = &result {
            self.metrics.redis_errors[error.kind() as usize].add(1);
            self.redis_failures.set(self.redis_failures.get() + 1);
        }
        self.count_event_failures(&failures);
        *batch.outcomes_mut() = outcomes;
        self.complete(&mut batch, result.is_ok());
        self.answer(&batch).await;
        batch.finish();
        if batch.try_release() {
            self.spare.borrow_mut().push_back(batch);
        } else {
            self.held.borrow_mut().push(batch);
        }
        self.batches_in_flight.set(self.batches_in_flight.get() - 1);
        if self.batches_in_flight.get() == 0 {
            self.drained.notify();
        }
        self.linger.notify();
    }

    /// Counts events Redis refused one by one, and logs the first failing
    /// key at most once per `EVENT_FAILURE_LOG_PERIOD`.
    fn count_event_failures(&self, failures: &EventFailures) {
        if failures.total() == 0 {
            return;
        }
        for (counter, &count) in self.metrics.redis_event_errors.iter().zip(&failures.by_reason) {
            counter.add(count);
        }
        let unlogged = self.event_failures_unlogged.get() + failures.total();
        let now = Instant::now();
        let due = log_due(self.event_failures_logged_at.get(), now, EVENT_FAILURE_LOG_PERIOD);
        if !due {
            self.event_failures_unlogged.set(unlogged);
            return;
        }
        let first = failures.first.as_deref().unwrap_or("");
        tracing::warn!(
            shard = self.index,
            refused_events = unlogged,
            first,
            "redis refused events one by one; they got RETRY, the rest of their batches were stored"
        );
        self.event_failures_unlogged.set(0);
        self.event_failures_logged_at.set(Some(now));
    }

    /// Bookkeeping for a finished call, before any answer goes out: a copy
    /// arriving while answers are being sent already sees the cache.
    fn complete(&self, batch: &mut Batch, stored: bool) {
        let mut dedup = self.dedup.borrow_mut();
        let mut in_flight = self.in_flight.borrow_mut();
        let (events, outcomes, statuses) = batch.resolution_parts();
        statuses.clear();
        for (index, event) in events.iter().enumerate() {
            let removed = in_flight.remove(&event.id);
            assert!(removed, "every batched id is in flight until its call completes");
            let status = match (stored, outcomes.get(index)) {
                (true, Some(Outcome::Appended)) => Status::Accepted,
                (true, Some(Outcome::AlreadyStored)) => Status::Duplicate,
                (true, Some(Outcome::Failed)) | (true, None) | (false, _) => Status::Retry,
            };
            if status == Status::Retry {
                self.metrics.retry(RetryCause::RedisError);
            } else {
                dedup.insert(event.id);
            }
            statuses.push(status);
        }
        debug_assert_eq!(statuses.len(), events.len());
        self.metrics.events_in_flight.set(in_flight.len() as i64);
        self.metrics.dedup_cache_events.set(dedup.len_events() as i64);
        let evictions = dedup.evictions_total();
        self.metrics
            .dedup_cache_evictions
            .add(evictions - self.metrics.dedup_cache_evictions.get());
    }

    /// Sends every answer of a completed batch, coalescing UDP acks per source.
    async fn answer(&self, batch: &Batch) {
        let mut replies = ReplyBook::<REPLY_BOOK_DESTINATIONS>::default();
        let now = Instant::now();
        for (event, &status) in batch.events().iter().zip(batch.statuses()) {
            self.record_answered(event.route.transport(), status, event.received_at, now);
            self.push_answer(&mut replies, &event.route, status, event.id).await;
        }
        self.answer_held_copies(&mut replies).await;
        self.send_udp_replies(&mut replies).await;
    }

    /// Answers every held copy whose id is no longer in flight: DUPLICATE if
    /// the cache holds the id (the original was stored, or found stored), else
    /// RETRY (its call failed). Each copy is looked up afresh after every
    /// await, since another batch's answers may take some meanwhile.
    async fn answer_held_copies<const N: usize>(&self, replies: &mut ReplyBook<N>) {
        while let Some(copy) = self.take_resolved_copy() {
            let status = if self.dedup.borrow_mut().contains(copy.id) {
                Status::Duplicate
            } else {
                self.metrics.retry(RetryCause::RedisError);
                Status::Retry
            };
            self.record_answered(copy.route.transport(), status, copy.received_at, Instant::now());
            self.push_answer(replies, &copy.route, status, copy.id).await;
        }
    }

    fn take_resolved_copy(&self) -> Option<HeldCopy> {
        let in_flight = self.in_flight.borrow();
        let mut held = self.held_copies.borrow_mut();
        let index = held.iter().position(|copy| !in_flight.contains(&copy.id))?;
        Some(held.swap_remove(index))
    }

    /// Queues one answer: UDP acks coalesce per source in `replies`, TCP acks
    /// go to their connection's writer.
    async fn push_answer<const N: usize>(
        &self,
        replies: &mut ReplyBook<N>,
        route: &Route,
        status: Status,
        id: EventId,
    ) {
        match route {
            Route::Udp(source) => self.push_udp_answer(replies, *source, status, id).await,
            Route::Tcp(connection) => connection.push_ack(status, id),
        }
    }

    /// Adds one UDP ack to `replies`, sending a reply first when there is no room.
    pub async fn push_udp_answer<const N: usize>(
        &self,
        replies: &mut ReplyBook<N>,
        destination: SocketAddr,
        status: Status,
        id: EventId,
    ) {
        while let Err(index) = replies.push(destination, status, id) {
            self.send_reply_of(replies, index).await;
        }
    }

    /// Sends every open reply of `replies`.
    pub async fn send_udp_replies<const N: usize>(&self, replies: &mut ReplyBook<N>) {
        for index in 0..replies.len() {
            self.send_reply_of(replies, index).await;
        }
        debug_assert!(replies.is_empty());
    }

    async fn send_reply_of<const N: usize>(&self, replies: &mut ReplyBook<N>, index: usize) {
        if let Some((destination, bytes)) = replies.take(index) {
            if self.udp.send_to(bytes, destination).await.is_err() {
                self.metrics.reply_send_errors.add(1);
            }
        }
    }

    /// Sends the open batch when it is due (`send_due`). Full batches are
    /// sent by `admit` at once.
    pub async fn linger_loop(self: Rc<Self>) {
        let linger = Duration::from_micros(self.config.batch_linger_us);
        loop {
            let opened_at = self.open.borrow().opened_at();
            let Some(opened_at) = opened_at else {
                if self.stopping.is_open() && self.batches_in_flight.get() == 0 {
                    return;
                }
                self.linger.wait().await;
                continue;
            };
            let due = send_due(opened_at, self.last_call_at.get(), linger);
            let now = Instant::now();
            if now < due && !self.stopping.is_open() {
                glommio::timer::sleep(due - now).await;
                continue;
            }
            self.flush();
            if !self.open.borrow().is_empty() {
                // Every slot is taken; a completing call wakes us.
                self.linger.wait().await;
            }
        }
    }

    /// Keeps the Redis-up flag fresh, logs Redis outages as a few summary
    /// lines instead of one per failure, and notices the process-wide stop.
    pub async fn tick_loop(
        self: Rc<Self>,
        stop: Arc<std::sync::atomic::AtomicBool>,
        snapshots: Snapshots,
        heartbeats: crate::sdnotify::Heartbeats,
    ) {
        let period = Duration::from_millis(crate::limits::SHUTDOWN_POLL_MS);
        let mut outage = Outage::default();
        let mut snapshot_answered = 0;
        loop {
            heartbeats.beat(self.index);
            if let Some(generation) = snapshots.due(&mut snapshot_answered) {
                snapshots.submit(self.index, generation, self.latency.borrow().clone());
            }
            // When every slot was held, no call is left to complete and wake
            // `linger_loop`: a full open batch would wait (and every new event
            // get RETRY, overload) until the next stop. A slot freed here wakes it.
            if self.release_held() && !self.open.borrow().is_empty() {
                self.linger.notify();
            }
            let connected = self.store.is_connected();
            if connected && !self.partitions_agreed.get() {
                self.check_partitions_once();
            }
            let connected = connected && self.partitions_agreed.get();
            if connected && !self.redis_up.get() && outage.was_ever_up {
                self.metrics.redis_reconnects.add(1);
            }
            self.redis_up.set(connected);
            self.metrics.redis_up.set(i64::from(connected));
            outage.observe(
                self.index,
                connected,
                self.redis_failures.get(),
                self.metrics.retries_by(RetryCause::RedisDown),
            );
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                self.stopping.open();
                self.linger.notify();
                return;
            }
            glommio::timer::sleep(period).await;
        }
    }

    /// Starts a partition count check unless one is running. A count that
    /// differs from the recorded one stops the process with exit code 2:
    /// serving it would store resent events a second time.
    fn check_partitions_once(self: &Rc<Self>) {
        if self.partitions_check_running.replace(true) {
            return;
        }
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            match shard.store.check_partitions().await {
                Ok(Partitions::Agree) => shard.partitions_agreed.set(true),
                Ok(Partitions::Differ { recorded }) => {
                    let message = partitions_differ_message(&shard.config.prefix, recorded, shard.config.partitions);
                    tracing::error!(shard = shard.index, "{message}");
                    eprintln!("shardgate: {message}");
                    std::process::exit(2);
                }
                Err(error) => shard.log_partitions_check_failure(&error),
            }
            shard.partitions_check_running.set(false);
        })
        .detach();
    }

    /// A check that fails keeps the shard answering RETRY, so it is logged as a
    /// warning, at most once per `EVENT_FAILURE_LOG_PERIOD`: a key that holds
    /// something else than a count would otherwise go unnoticed.
    fn log_partitions_check_failure(&self, error: &crate::store::StoreError) {
        let now = Instant::now();
        let due = log_due(self.partitions_check_logged_at.get(), now, EVENT_FAILURE_LOG_PERIOD);
        if due {
            tracing::warn!(shard = self.index, %error, "partition count check failed; answering RETRY and retrying");
            self.partitions_check_logged_at.set(Some(now));
        }
    }

    /// Waits up to `timeout` for Redis and checks the partition count, so a
    /// server with the wrong count exits before it serves. `Ok` also when
    /// Redis did not come in time: the tick loop checks once it does.
    pub async fn check_partitions_at_start(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !self.store.is_connected() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        if !self.store.is_connected() {
            return Ok(());
        }
        match self.store.check_partitions().await {
            Ok(Partitions::Agree) => {
                self.partitions_agreed.set(true);
                Ok(())
            }
            Ok(Partitions::Differ { recorded }) => Err(partitions_differ_message(
                &self.config.prefix,
                recorded,
                self.config.partitions,
            )),
            Err(_) => Ok(()),
        }
    }

    /// After intake stopped: waits for calls in flight, up to the drain
    /// deadline, then answers RETRY for whatever is left.
    pub async fn drain(self: &Rc<Self>, deadline: Instant) -> usize {
        debug_assert!(self.stopping.is_open());
        let held_events = self.in_flight.borrow().len();
        loop {
            self.flush();
            if self.batches_in_flight.get() == 0 && self.open.borrow().is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                self.abandon.open();
            }
            if self.batches_in_flight.get() == 0 {
                // The open batch has events but no slot: the Redis client holds
                // every batch (calls past their deadline), and no completing call
                // will wake us. Look for a slot until the deadline, then answer
                // the open batch RETRY unsent.
                if self.abandon.is_open() {
                    self.abandon_open_batch().await;
                } else {
                    glommio::timer::sleep(Duration::from_millis(crate::limits::SHUTDOWN_POLL_MS).min(deadline - now))
                        .await;
                }
                continue;
            }
            if self.abandon.is_open() {
                self.drained.wait().await;
            } else {
                futures_lite::future::or(self.drained.wait(), glommio::timer::sleep(deadline - now)).await;
            }
        }
        debug_assert!(self.in_flight.borrow().is_empty());
        debug_assert!(
            self.held_copies.borrow().is_empty(),
            "every held copy's original was answered"
        );
        held_events
    }

    /// Answers the open batch RETRY without a Redis call: the drain passed its
    /// deadline with every batch held by the Redis client. Its replacement is
    /// allocated, which is fine once: the shard is stopping.
    async fn abandon_open_batch(&self) {
        let mut batch = self.open.replace(Batch::new(self.config.batch_events_max));
        self.metrics.redis_errors[crate::metrics::RedisErrorKind::Abandoned as usize].add(1);
        self.complete(&mut batch, false);
        self.answer(&batch).await;
        batch.finish();
        // `linger_loop` may wait for a slot for this batch; it can end now.
        self.linger.notify();
    }

    pub fn dedup_len_events(&self) -> usize {
        self.dedup.borrow().len_events()
    }
}

/// When an open batch that is not full goes to Redis: one pace after the last
/// call started, but never before its first event came. So after a quiet
/// period the first event goes at once, and under load calls go one pace
/// apart with every event that came meanwhile: batches grow with the load
/// while calls per second stay flat (group commit). An event waits at most
/// one pace.
fn send_due(opened_at: Instant, last_call_at: Option<Instant>, pace: Duration) -> Instant {
    match last_call_at {
        Some(last_call_at) => opened_at.max(last_call_at + pace),
        None => opened_at,
    }
}

/// Whether a rate-limited log line may be written again: never written, or
/// last written at least `period` ago.
fn log_due(last_logged: Option<Instant>, now: Instant, period: Duration) -> bool {
    last_logged.is_none_or(|logged| now.duration_since(logged) >= period)
}

fn partitions_differ_message(prefix: &str, recorded: u32, configured: u32) -> String {
    format!(
        "prefix {prefix:?} holds events stored with --partitions {recorded}, and this server has --partitions \
         {configured}: a resent event would miss its marker and be stored twice. Start with --partitions \
         {recorded}, or use a new --prefix once the dedup window has passed"
    )
}

/// Turns the Redis-up flag and failure counts into rate-limited log lines:
/// one when Redis goes away (or, at start, when it has not come within a
/// second), a summary every `OUTAGE_LOG_PERIOD` while it stays away or calls
/// keep failing, and one when it is back.
#[derive(Default)]
struct Outage {
    was_ever_up: bool,
    down_since: Option<Instant>,
    outage_logged: bool,
    last_logged: Option<Instant>,
    failures_logged: u64,
    retries_at_start: u64,
}

const OUTAGE_LOG_PERIOD: Duration = Duration::from_secs(10);
const FIRST_CONNECT_GRACE: Duration = Duration::from_secs(1);

impl Outage {
    fn observe(&mut self, shard: usize, connected: bool, failures: u64, redis_down_retries: u64) {
        let now = Instant::now();
        let due = log_due(self.last_logged, now, OUTAGE_LOG_PERIOD);
        match (connected, self.down_since) {
            (true, Some(since)) => {
                if self.outage_logged {
                    let down_ms = now.duration_since(since).as_millis() as u64;
                    let retried_frames = redis_down_retries - self.retries_at_start;
                    tracing::info!(shard, down_ms, retried_frames, "redis connection is back");
                }
                self.down_since = None;
                self.outage_logged = false;
            }
            (false, None) => {
                self.down_since = Some(now);
                self.retries_at_start = redis_down_retries;
                if self.was_ever_up {
                    tracing::warn!(shard, "redis connection lost; answering RETRY until it is back");
                    self.outage_logged = true;
                    self.last_logged = Some(now);
                }
            }
            (false, Some(since)) => {
                let down = now.duration_since(since);
                let first_report = !self.outage_logged && down >= FIRST_CONNECT_GRACE;
                if first_report || (self.outage_logged && due) {
                    let retried_frames = redis_down_retries - self.retries_at_start;
                    tracing::warn!(
                        shard,
                        down_ms = down.as_millis() as u64,
                        retried_frames,
                        "redis unreachable; answering RETRY"
                    );
                    self.outage_logged = true;
                    self.last_logged = Some(now);
                }
            }
            (true, None) => {}
        }
        if connected && failures > self.failures_logged && due {
            let failed_calls = failures - self.failures_logged;
            tracing::warn!(shard, failed_calls, "redis script calls failed; their events got RETRY");
            self.failures_logged = failures;
            self.last_logged = Some(now);
        }
        self.was_ever_up |= connected;
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
