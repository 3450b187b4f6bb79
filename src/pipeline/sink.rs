//! The sink chain of one shard: linger -> send -> complete -> answer.
//!
//! - **linger** (`linger_loop`): the open batch goes when full (`admit`) or when due
//!   (`shard::send_due`): one pace after the last call, never before its first event.
//! - **send** (`flush`, `caller_loop`, `send`): a caller task spawned at start makes the
//!   script call; at most `batches_in_flight_max` are in Redis at once. On a Redis Cluster
//!   the caller splits its batch by partition and its lanes (`lane_loop`, tasks spawned with
//!   it) make one call per group (`send_groups`).
//! - **complete**: confirmed ids go into the cache and leave the in-flight set, before any
//!   answer goes out, so a copy arriving meanwhile already sees the cache.
//! - **answer**: every event's answer, then every held copy's, leaves through intake's ack
//!   sink (`answer::AckSink`); UDP acks coalesce per source in a `ReplyBook`.
//!
//! Every batch and caller was allocated at start; nothing here allocates per event.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::limits::{CLUSTER_GROUP_CALLS_PER_BATCH, REPLY_BOOK_DESTINATIONS};
use crate::pipeline::answer::{AckSink, ReplyBook, Route};
use crate::pipeline::batch::Batch;
use crate::pipeline::liveness::log_due;
use crate::pipeline::notify::Notify;
use crate::pipeline::shard::Settings;
use crate::pipeline::shard::{send_due, HeldCopy, Shard, EVENT_FAILURE_LOG_PERIOD};
use crate::redis::groups::{GroupJob, Groups};
use crate::redis::store::{EventFailures, GroupCalls, GroupReply, GroupVerdict, Outcome, Shortfall, StoreError};
use crate::telemetry::metrics::{NodeRow, RedisNodes, RetryCause};
use crate::wire::frame::{EventId, Status};

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
    /// On a Redis Cluster, the caller's lanes: each makes one group call of the caller's
    /// batch at a time (`send_groups`). None on a standalone Redis.
    lanes: Vec<Lane>,
    /// Wakes the caller's task when one of its lanes has a reply.
    lane_done: Notify,
}

/// One lane of a caller on a Redis Cluster, with a task spawned at start (`lane_loop`): a
/// group call's future is as large as a batch call's (about 17-22 KB in a debug build), so
/// the `CLUSTER_GROUP_CALLS_PER_BATCH` calls of a batch run in tasks of their own, allocated
/// once, rather than joined inside the caller's future, whose size (and the stack a debug
/// build uses to build it) would grow with them.
struct Lane {
    /// The job, allocated at start; the lane's task holds it while it makes the call.
    job: RefCell<Option<GroupJob>>,
    /// The nonce of the job last handed over: tells this batch's jobs from an abandoned one's.
    nonce: Cell<u64>,
    state: Cell<LaneState>,
    /// The reply of the job just made, from `Done` until its caller takes it.
    reply: RefCell<Option<GroupReply>>,
    /// The node that answered the job just made: its failure or `WAIT` shortfall counts there.
    node: Cell<NodeRow>,
    /// Wakes the lane's task for a job, or to end.
    ready: Notify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LaneState {
    Idle,
    /// A job was handed over; the lane is making its call.
    Sent,
    /// The call answered; the reply waits for the caller.
    Done,
}

/// The batches of one shard and the calls they are in: all allocated at start.
pub(super) struct Batches {
    /// The batch filling now.
    pub(super) open: RefCell<Batch>,
    /// Free batches, ready to fill.
    spare: RefCell<VecDeque<Batch>>,
    /// Answered batches whose blob the Redis client still holds (`batch.rs`):
    /// they count against the in-flight bound until it lets go.
    held: RefCell<Vec<Batch>>,
    /// Calls sent and not yet answered.
    pub(super) batches_in_flight: Cell<usize>,
    /// One per in-flight slot, each with a task spawned at start (`caller_loop`).
    callers: Vec<Caller>,
    /// Callers with no batch. A caller is busy exactly while its batch is in
    /// flight, so a free slot means an idle caller.
    idle_callers: RefCell<Vec<usize>>,
    /// Set after the drain: the callers' tasks end.
    callers_closed: Cell<bool>,
    /// When the last call started: calls are paced `batch_linger_us` apart.
    pub(super) last_call_at: Cell<Option<Instant>>,
    /// Numbers the calls; the script echoes it (`script.rs`).
    call_nonce: Cell<u64>,
}

impl Batches {
    /// With `cluster`, every batch has its split by partition (`redis::groups`) too.
    pub(super) fn new(settings: &Settings, cluster: bool) -> Batches {
        let slots = settings.batches_in_flight_max;
        let batch = || Batch::new(settings.batch_events_max, cluster);
        // A batch has at most one group per partition and one per event.
        let lanes = if cluster {
            CLUSTER_GROUP_CALLS_PER_BATCH
                .min(settings.partitions as usize)
                .min(settings.batch_events_max)
        } else {
            0
        };
        Batches {
            open: RefCell::new(batch()),
            spare: RefCell::new((0..slots).map(|_| batch()).collect()),
            held: RefCell::new(Vec::with_capacity(slots)),
            batches_in_flight: Cell::new(0),
            callers: (0..slots)
                .map(|_| Caller {
                    batch: RefCell::new(None),
                    ready: Notify::default(),
                    lanes: (0..lanes)
                        .map(|_| Lane {
                            job: RefCell::new(Some(GroupJob::new(settings.batch_events_max))),
                            nonce: Cell::new(0),
                            state: Cell::new(LaneState::Idle),
                            reply: RefCell::new(None),
                            node: Cell::new(RedisNodes::UNKNOWN),
                            ready: Notify::default(),
                        })
                        .collect(),
                    lane_done: Notify::default(),
                })
                .collect(),
            idle_callers: RefCell::new((0..slots).rev().collect()),
            callers_closed: Cell::new(false),
            last_call_at: Cell::new(None),
            call_nonce: Cell::new(0),
        }
    }
}

impl Shard {
    /// Sends the open batch if it has events and an in-flight slot is free:
    /// a spare batch to take its place. Held batches take no slot back until
    /// the Redis client lets go of them.
    pub fn flush(&self) {
        if self.batches.open.borrow().is_empty() {
            return;
        }
        if self.batches.spare.borrow().is_empty() {
            self.release_held();
        }
        let Some(spare) = self.batches.spare.borrow_mut().pop_front() else {
            return;
        };
        assert!(!self.batches.callers_closed.get(), "no batch is sent after the drain");
        let caller = self.batches.idle_callers.borrow_mut().pop();
        let caller = caller.expect("a free slot means an idle caller: busy callers are the batches in flight");
        let batch = self.batches.open.replace(spare);
        self.batches.last_call_at.set(Some(Instant::now()));
        self.batches
            .batches_in_flight
            .set(self.batches.batches_in_flight.get() + 1);
        debug_assert!(self.batches.batches_in_flight.get() <= self.settings.batches_in_flight_max);
        debug_assert_eq!(
            self.batches.batches_in_flight.get() + self.batches.idle_callers.borrow().len(),
            self.batches.callers.len()
        );
        let previous = self.batches.callers[caller].batch.replace(Some(batch));
        assert!(previous.is_none(), "an idle caller holds no batch");
        self.batches.callers[caller].ready.notify();
    }

    /// The task of caller `caller`: sends each batch `flush` hands it, until
    /// `close_callers`. Spawned once per in-flight slot at start.
    pub async fn caller_loop<S: AckSink>(self: Rc<Self>, caller: usize, sink: Rc<S>) {
        let lanes: Vec<glommio::Task<()>> = (0..self.batches.callers[caller].lanes.len())
            .map(|lane| glommio::spawn_local(Rc::clone(&self).lane_loop(caller, lane)))
            .collect();
        loop {
            let batch = self.batches.callers[caller].batch.take();
            match batch {
                Some(batch) => {
                    self.send(caller, batch, &*sink).await;
                    // No await since `send` counted the call done, so no
                    // `flush` ran meanwhile without this caller.
                    self.batches.idle_callers.borrow_mut().push(caller);
                }
                None if self.batches.callers_closed.get() => break,
                None => self.batches.callers[caller].ready.wait().await,
            }
        }
        for lane in lanes {
            lane.await;
        }
    }

    /// The task of one lane of caller `caller` (cluster only): makes each group call its
    /// caller hands it, until `close_callers`.
    async fn lane_loop(self: Rc<Self>, caller: usize, lane: usize) {
        let owner = &self.batches.callers[caller];
        let this = &owner.lanes[lane];
        loop {
            match this.state.get() {
                LaneState::Sent => {
                    let mut job = this.job.take().expect("a sent lane's job is in place");
                    let started = Instant::now();
                    let reply = self.store.group_call(&job).await;
                    // Counted here rather than by the caller, which an abandoned batch no
                    // longer has. The slot's master now: a MOVED on the way refreshed the map.
                    let nodes = &self.metrics.redis_by_node;
                    let node = self.store.node_row(nodes, Some(job.slot()));
                    if reply.was_sent() {
                        nodes
                            .at(node)
                            .round_trip_us
                            .observe(started.elapsed().as_micros() as u64);
                    }
                    this.node.set(node);
                    job.release();
                    *this.job.borrow_mut() = Some(job);
                    *this.reply.borrow_mut() = Some(reply);
                    this.state.set(LaneState::Done);
                    owner.lane_done.notify();
                }
                _ if self.batches.callers_closed.get() => return,
                _ => this.ready.wait().await,
            }
        }
    }

    /// Ends the callers' tasks, once the drain has answered every batch.
    pub fn close_callers(&self) {
        assert_eq!(
            self.batches.batches_in_flight.get(),
            0,
            "the drain answered every batch"
        );
        self.batches.callers_closed.set(true);
        for caller in &self.batches.callers {
            caller.ready.notify();
            for lane in &caller.lanes {
                lane.ready.notify();
            }
        }
    }

    /// Moves held batches whose blob the Redis client dropped back to the
    /// spare pool; true if any came back.
    pub(super) fn release_held(&self) -> bool {
        let mut held = self.batches.held.borrow_mut();
        let mut spare = self.batches.spare.borrow_mut();
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
    pub(super) fn slots_taken(&self) -> usize {
        self.batches.batches_in_flight.get() + self.batches.held.borrow().len()
    }

    async fn send(&self, caller: usize, mut batch: Batch, sink: &impl AckSink) {
        let event_count = batch.len();
        // Standalone, the node of the batch's one call; on a cluster `unknown`, where a failure
        // of the batch as a whole counts (each group call counts at its own node).
        let node = self.store.node_row(&self.metrics.redis_by_node, None);
        let started = Instant::now();
        let mut outcomes = std::mem::take(batch.outcomes_mut());
        let mut failures = EventFailures::default();
        let result = match batch.cluster_parts() {
            // A Redis Cluster: one call per partition group. A group that failed has its
            // events `Failed` (RETRY) in `outcomes`; the batch itself counts as answered.
            Some((blob, groups)) => {
                let call = async {
                    Ok(self
                        .send_groups(caller, blob, event_count, groups, &mut outcomes, &mut failures)
                        .await)
                };
                match futures_lite::future::or(call, self.abandoned()).await {
                    Ok(calls) => {
                        self.metrics.redis_calls.add(calls.calls);
                        self.count_group_failures(&calls);
                        self.count_wait_shortfalls(calls.wait_shortfalls, calls.first_shortfall.as_ref());
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
            None => {
                let blob = batch.take_blob();
                let nonce = self.batches.call_nonce.get().wrapping_add(1);
                self.batches.call_nonce.set(nonce);
                self.metrics.redis_calls.add(1);
                let call = self
                    .store
                    .dedup_append(nonce, event_count, blob, &mut outcomes, &mut failures);
                futures_lite::future::or(call, self.abandoned()).await.map(|shortfall| {
                    if let Some(shortfall) = &shortfall {
                        self.metrics.redis_by_node.at(node).wait_shortfalls.add(1);
                        self.count_wait_shortfalls(1, Some(shortfall));
                    }
                })
            }
        };
        let round_trip = started.elapsed();
        self.latency.borrow_mut().record_redis_round_trip(round_trip);
        if !self.store.is_cluster() {
            let round_trip_us = round_trip.as_micros() as u64;
            self.metrics.redis_by_node.at(node).round_trip_us.observe(round_trip_us);
        }
        self.metrics.batch_events.observe(event_count as u64);
        if let Err(error) = &result {
            self.metrics.redis_by_node.at(node).errors[error.kind() as usize].add(1);
            self.liveness.redis_failures.set(self.liveness.redis_failures.get() + 1);
        }
        self.count_event_failures(&failures);
        *batch.outcomes_mut() = outcomes;
        self.complete(&mut batch, result.is_ok());
        self.answer(&batch, sink).await;
        batch.finish();
        if batch.try_release() {
            self.batches.spare.borrow_mut().push_back(batch);
        } else {
            self.batches.held.borrow_mut().push(batch);
        }
        self.batches
            .batches_in_flight
            .set(self.batches.batches_in_flight.get() - 1);
        if self.batches.batches_in_flight.get() == 0 {
            self.drained.notify();
        }
        self.linger.notify();
    }

    /// Sends a batch on a Redis Cluster: split by partition, one call per group, made by the
    /// caller's lanes, at most `CLUSTER_GROUP_CALLS_PER_BATCH` at once, all within one
    /// deadline. `outcomes` gets one entry per event, in the batch's order: each from its
    /// own group's reply, `Failed` (RETRY) for the events of a group whose call failed.
    async fn send_groups(
        &self,
        caller: usize,
        blob: &[u8],
        event_count: usize,
        groups: &mut Groups,
        outcomes: &mut Vec<Outcome>,
        failures: &mut EventFailures,
    ) -> GroupCalls {
        let mut report = GroupCalls::default();
        if let Err(error) = self.store.split(groups, blob, event_count) {
            self.count_at_node(
                RedisNodes::UNKNOWN,
                GroupVerdict {
                    failed: Some(error.kind()),
                    wait_shortfall: false,
                },
            );
            report.fail(error);
            outcomes.clear();
            outcomes.resize(event_count, Outcome::Failed);
            return report;
        }
        let owner = &self.batches.callers[caller];
        let deadline = Instant::now() + self.store.call_timeout();
        // Nonces go up by one per call: a lane's job with a nonce below this one is left
        // from a batch abandoned at the drain deadline, never this batch's.
        let first_nonce = self.batches.call_nonce.get().wrapping_add(1);
        let group_count = groups.groups().len();
        let mut next_group = 0;
        loop {
            let mut running = 0;
            for lane in &owner.lanes {
                if lane.state.get() == LaneState::Done {
                    let reply = lane.reply.take().expect("a done lane holds its reply");
                    if lane.nonce.get() >= first_nonce {
                        let job = lane.job.borrow();
                        let job = job.as_ref().expect("a done lane's job is back");
                        let verdict = self.store.take_group_reply(job, reply, groups, failures, &mut report);
                        self.count_at_node(lane.node.get(), verdict);
                    }
                    lane.state.set(LaneState::Idle);
                }
                if lane.state.get() == LaneState::Idle && next_group < group_count {
                    let nonce = self.batches.call_nonce.get().wrapping_add(1);
                    self.batches.call_nonce.set(nonce);
                    let mut job = lane.job.borrow_mut();
                    groups.prepare(
                        next_group,
                        nonce,
                        deadline,
                        job.as_mut().expect("an idle lane's job is in place"),
                    );
                    drop(job);
                    lane.nonce.set(nonce);
                    next_group += 1;
                    lane.state.set(LaneState::Sent);
                    lane.ready.notify();
                }
                if lane.state.get() == LaneState::Sent && lane.nonce.get() >= first_nonce {
                    running += 1;
                }
            }
            if running == 0 && next_group == group_count {
                break;
            }
            owner.lane_done.wait().await;
        }
        groups.merge(outcomes);
        report
    }

    /// Ends when the drain deadline passes: the call raced against it is answered RETRY.
    async fn abandoned<T>(&self) -> Result<T, StoreError> {
        self.abandon.wait().await;
        Err(StoreError::abandoned())
    }

    /// Counts a group call's failure or `WAIT` shortfall at the node it went to.
    fn count_at_node(&self, node: NodeRow, verdict: GroupVerdict) {
        let node = self.metrics.redis_by_node.at(node);
        if let Some(kind) = verdict.failed {
            node.errors[kind as usize].add(1);
        }
        if verdict.wait_shortfall {
            node.wait_shortfalls.add(1);
        }
    }

    /// Counts the group calls of a batch that failed as a whole (on a cluster; each was
    /// counted at its node already); the tick logs them with the other failed calls.
    fn count_group_failures(&self, calls: &GroupCalls) {
        let failed = calls.failed_total();
        if failed == 0 {
            return;
        }
        self.liveness
            .redis_failures
            .set(self.liveness.redis_failures.get() + failed);
        if let Some(error) = &calls.first_error {
            tracing::debug!(shard = self.index, failed_groups = failed, %error, "redis cluster group calls failed; their events got RETRY");
        }
    }

    /// Logs `WAIT`s that fell short (`--durability replica`; their events get RETRY,
    /// `replica_unconfirmed`; each was counted at its node), with how many replicas confirmed,
    /// at most once per `EVENT_FAILURE_LOG_PERIOD`.
    fn count_wait_shortfalls(&self, count: u64, first: Option<&Shortfall>) {
        if count == 0 {
            return;
        }
        let unlogged = self.liveness.wait_shortfalls_unlogged.get() + count;
        let now = Instant::now();
        if !log_due(
            self.liveness.wait_shortfalls_logged_at.get(),
            now,
            EVENT_FAILURE_LOG_PERIOD,
        ) {
            self.liveness.wait_shortfalls_unlogged.set(unlogged);
            return;
        }
        let replicas_confirmed = match first.and_then(|shortfall| shortfall.replicas) {
            Some(replicas) => replicas.to_string(),
            None => "unknown".to_string(),
        };
        let reason = first.map_or("", |shortfall| shortfall.reason.as_str());
        tracing::warn!(
            shard = self.index,
            shortfalls = unlogged,
            %replicas_confirmed,
            replicas_needed = 1,
            reason,
            "--durability replica: no replica confirmed the writes of some calls in time; their events got RETRY (is the master's replica down or lagging?)"
        );
        self.liveness.wait_shortfalls_unlogged.set(0);
        self.liveness.wait_shortfalls_logged_at.set(Some(now));
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
        let unlogged = self.liveness.event_failures_unlogged.get() + failures.total();
        let now = Instant::now();
        let due = log_due(
            self.liveness.event_failures_logged_at.get(),
            now,
            EVENT_FAILURE_LOG_PERIOD,
        );
        if !due {
            self.liveness.event_failures_unlogged.set(unlogged);
            return;
        }
        let first = failures.first.as_deref().unwrap_or("");
        tracing::warn!(
            shard = self.index,
            refused_events = unlogged,
            first,
            "redis refused events one by one; they got RETRY, the rest of their batches were stored"
        );
        self.liveness.event_failures_unlogged.set(0);
        self.liveness.event_failures_logged_at.set(Some(now));
    }

    /// Bookkeeping for a finished call, before any answer goes out: a copy
    /// arriving while answers are being sent already sees the cache.
    pub(super) fn complete(&self, batch: &mut Batch, stored: bool) {
        let mut dedup = self.admission.dedup.borrow_mut();
        let mut in_flight = self.admission.in_flight.borrow_mut();
        let (events, outcomes, statuses) = batch.resolution_parts();
        statuses.clear();
        for (index, event) in events.iter().enumerate() {
            let removed = in_flight.remove(&event.id);
            assert!(removed, "every batched id is in flight until its call completes");
            let status = match (stored, outcomes.get(index)) {
                (true, Some(Outcome::Appended)) => Status::Accepted,
                (true, Some(Outcome::AlreadyStored)) => Status::Duplicate,
                (true, Some(Outcome::Unconfirmed)) => {
                    // Written, maybe, but no replica confirmed it: not in the cache, so that
                    // a resend goes to Redis (and its WAIT) again.
                    self.metrics.retry(RetryCause::ReplicaUnconfirmed);
                    Status::Retry
                }
                (true, Some(Outcome::Failed)) | (true, None) | (false, _) => {
                    self.metrics.retry(RetryCause::RedisError);
                    Status::Retry
                }
            };
            if status != Status::Retry {
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
    pub(super) async fn answer(&self, batch: &Batch, sink: &impl AckSink) {
        let mut replies = ReplyBook::<REPLY_BOOK_DESTINATIONS>::default();
        let now = Instant::now();
        for (event, &status) in batch.events().iter().zip(batch.statuses()) {
            self.record_answered(event.route.transport(), status, event.received_at, now);
            self.push_answer(sink, &mut replies, &event.route, status, event.id)
                .await;
        }
        self.answer_held_copies(sink, &mut replies).await;
        self.send_udp_replies(sink, &mut replies).await;
    }

    /// Answers every held copy whose id is no longer in flight: DUPLICATE if
    /// the cache holds the id (the original was stored, or found stored), else
    /// RETRY (its call failed). Each copy is looked up afresh after every
    /// await, since another batch's answers may take some meanwhile.
    async fn answer_held_copies<const N: usize>(&self, sink: &impl AckSink, replies: &mut ReplyBook<N>) {
        while let Some(copy) = self.take_resolved_copy() {
            let status = if self.admission.dedup.borrow_mut().contains(copy.id) {
                Status::Duplicate
            } else {
                self.metrics.retry(RetryCause::RedisError);
                Status::Retry
            };
            self.record_answered(copy.route.transport(), status, copy.received_at, Instant::now());
            self.push_answer(sink, replies, &copy.route, status, copy.id).await;
        }
    }

    fn take_resolved_copy(&self) -> Option<HeldCopy> {
        let in_flight = self.admission.in_flight.borrow();
        let mut held = self.admission.held_copies.borrow_mut();
        let index = held.iter().position(|copy| !in_flight.contains(&copy.id))?;
        Some(held.swap_remove(index))
    }

    /// Queues one answer: UDP acks coalesce per source in `replies`, TCP acks
    /// go to their connection's writer.
    async fn push_answer<const N: usize>(
        &self,
        sink: &impl AckSink,
        replies: &mut ReplyBook<N>,
        route: &Route,
        status: Status,
        id: EventId,
    ) {
        match route {
            Route::Datagram(source) => self.push_udp_answer(sink, replies, *source, status, id).await,
            Route::Stream(connection) => connection.push_ack(status, id),
        }
    }

    /// Adds one UDP ack to `replies`, sending a reply first when there is no room.
    pub(crate) async fn push_udp_answer<const N: usize>(
        &self,
        sink: &impl AckSink,
        replies: &mut ReplyBook<N>,
        destination: SocketAddr,
        status: Status,
        id: EventId,
    ) {
        while let Err(index) = replies.push(destination, status, id) {
            self.send_reply_of(sink, replies, index).await;
        }
    }

    /// Sends every open reply of `replies`.
    pub async fn send_udp_replies<const N: usize>(&self, sink: &impl AckSink, replies: &mut ReplyBook<N>) {
        for index in 0..replies.len() {
            self.send_reply_of(sink, replies, index).await;
        }
        debug_assert!(replies.is_empty());
    }

    async fn send_reply_of<const N: usize>(&self, sink: &impl AckSink, replies: &mut ReplyBook<N>, index: usize) {
        if let Some((destination, bytes)) = replies.take(index) {
            if sink.send_datagram(bytes, destination).await.is_err() {
                self.metrics.reply_send_errors.add(1);
            }
        }
    }

    /// Sends the open batch when it is due (`send_due`). Full batches are
    /// sent by `admit` at once.
    pub async fn linger_loop(self: Rc<Self>) {
        let linger = Duration::from_micros(self.settings.batch_linger_us);
        loop {
            let opened_at = self.batches.open.borrow().opened_at();
            let Some(opened_at) = opened_at else {
                if self.stopping.is_open() && self.batches.batches_in_flight.get() == 0 {
                    return;
                }
                self.linger.wait().await;
                continue;
            };
            let due = send_due(opened_at, self.batches.last_call_at.get(), linger);
            let now = Instant::now();
            if now < due && !self.stopping.is_open() {
                glommio::timer::sleep(due - now).await;
                continue;
            }
            self.flush();
            if !self.batches.open.borrow().is_empty() {
                // Every slot is taken; a completing call wakes us.
                self.linger.wait().await;
            }
        }
    }
}
