//! A shard's liveness: whether Redis is up, the partition count check, outage log lines, and
//! the drain at stop.
//!
//! Redis counts as up when the client is connected and the partition count recorded under
//! the prefix agrees with this process's (protocol revision 2); until then every new event
//! gets RETRY. Outages are logged as a few summary lines, never one per failure. At stop the
//! drain waits for calls in flight up to its deadline, then answers RETRY for the rest.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::limits::{CLUSTER_MASTERS_CHECK_MS, CLUSTER_MASTERS_WATCH_MS, SHUTDOWN_POLL_MS};
use crate::pipeline::answer::AckSink;
use crate::pipeline::batch::Batch;
use crate::pipeline::shard::{Shard, EVENT_FAILURE_LOG_PERIOD};
use crate::redis::store::{eviction_refusal, Partitions, StoreError};
use crate::telemetry::metrics::{RedisErrorKind, RetryCause};

/// Whether the shard may send to Redis, and what it has logged about it.
#[derive(Default)]
pub(super) struct Liveness {
    /// Connected and the partition count agreed: new events may join a batch.
    pub(super) redis_up: Cell<bool>,
    /// Failed calls since start: the tick logs them as a summary, not one line each.
    pub(super) redis_failures: Cell<u64>,
    /// Set once this process's partition count agrees with the one recorded
    /// under the prefix; until then the shard answers RETRY as if Redis were down.
    partitions_agreed: Cell<bool>,
    partitions_check_running: Cell<bool>,
    partitions_check_logged_at: Cell<Option<Instant>>,
    /// Refused events since the last log line, and when that line was written.
    pub(super) event_failures_unlogged: Cell<u64>,
    pub(super) event_failures_logged_at: Cell<Option<Instant>>,
    /// `WAIT` shortfalls (`--durability replica`) since the last log line, and when it was written.
    pub(super) wait_shortfalls_unlogged: Cell<u64>,
    pub(super) wait_shortfalls_logged_at: Cell<Option<Instant>>,
    /// Restarts of the client's connection task since the last log line, and when it was written.
    client_restarts_unlogged: Cell<u64>,
    client_restart_logged_at: Cell<Option<Instant>>,
    /// On a cluster: the masters last seen in the client's slot map, the failed calls counted
    /// when the count last rose and when that was, and when the masters were last looked at.
    cluster_masters: RefCell<Vec<String>>,
    failures_seen: Cell<u64>,
    failures_rose_at: Cell<Option<Instant>>,
    masters_checked_at: Cell<Option<Instant>>,
}

impl Shard {
    /// One tick of the shard's liveness (`host` calls it every `SHUTDOWN_POLL_MS`): frees held
    /// batches, keeps the Redis-up flag fresh, starts the partition count check, and logs
    /// Redis outages as a few summary lines instead of one per failure.
    pub fn tick(self: &Rc<Self>, outage: &mut Outage) {
        // When every slot was held, no call is left to complete and wake
        // `linger_loop`: a full open batch would wait (and every new event
        // get RETRY, overload) until the next tick. A slot freed here wakes it.
        if self.release_held() && !self.batches.open.borrow().is_empty() {
            self.linger.notify();
        }
        if self.store.restart_if_ended() {
            self.log_client_restart();
        }
        self.store.take_redirections(&self.metrics.redis_by_node);
        let connected = self.store.is_connected();
        if connected && !self.liveness.partitions_agreed.get() {
            self.check_partitions_once();
        }
        let connected = connected && self.liveness.partitions_agreed.get();
        if connected && !self.liveness.redis_up.get() {
            if outage.was_ever_up {
                self.metrics.redis_reconnects.add(1);
            }
            self.note_redis_nodes();
        }
        if connected && self.store.is_cluster() {
            self.watch_cluster_masters();
        }
        self.liveness.redis_up.set(connected);
        self.metrics.redis_up.set(i64::from(connected));
        outage.observe(
            self.index,
            connected,
            self.liveness.redis_failures.get(),
            self.metrics.retries_by(RetryCause::RedisDown),
        );
    }

    /// fred's connection task ended on its own and was started again (`Store::restart_if_ended`):
    /// logged at most once per `EVENT_FAILURE_LOG_PERIOD`, with the restarts since.
    fn log_client_restart(&self) {
        let restarts = self.liveness.client_restarts_unlogged.get() + 1;
        let now = Instant::now();
        if !log_due(
            self.liveness.client_restart_logged_at.get(),
            now,
            EVENT_FAILURE_LOG_PERIOD,
        ) {
            self.liveness.client_restarts_unlogged.set(restarts);
            return;
        }
        tracing::warn!(
            shard = self.index,
            restarts,
            "the redis client's connection task ended on its own and was started again (if this repeats: \
             does the url's mode, redis:// or redis-cluster://, match the server?)"
        );
        self.liveness.client_restarts_unlogged.set(0);
        self.liveness.client_restart_logged_at.set(Some(now));
    }

    /// While a cluster's calls fail, and for a while after, looks once a second whether the
    /// masters in the client's slot map changed (`CLUSTER_MASTERS_CHECK_MS`): a failover or a
    /// reshard then gets a log line naming the masters that went and came.
    fn watch_cluster_masters(&self) {
        let now = Instant::now();
        let failures = self.liveness.redis_failures.get();
        if failures != self.liveness.failures_seen.get() {
            self.liveness.failures_seen.set(failures);
            self.liveness.failures_rose_at.set(Some(now));
        }
        let watching = self
            .liveness
            .failures_rose_at
            .get()
            .is_some_and(|rose_at| now.duration_since(rose_at) < Duration::from_millis(CLUSTER_MASTERS_WATCH_MS));
        let due = log_due(
            self.liveness.masters_checked_at.get(),
            now,
            Duration::from_millis(CLUSTER_MASTERS_CHECK_MS),
        );
        if watching && due {
            self.liveness.masters_checked_at.set(Some(now));
            self.note_cluster_masters();
        }
    }

    /// Records the cluster's masters as the client's slot map has them, and logs a change
    /// from the ones recorded before (not the first ones: `note_redis_nodes` says those).
    fn note_cluster_masters(&self) {
        let masters = self.store.cluster_masters();
        if masters.is_empty() {
            return;
        }
        let mut known = self.liveness.cluster_masters.borrow_mut();
        if *known == masters {
            return;
        }
        if !known.is_empty() {
            let gone: Vec<&str> = known
                .iter()
                .filter(|master| !masters.contains(master))
                .map(String::as_str)
                .collect();
            let came: Vec<&str> = masters
                .iter()
                .filter(|master| !known.contains(master))
                .map(String::as_str)
                .collect();
            tracing::warn!(
                shard = self.index,
                masters = %masters.join(","),
                gone = %gone.join(","),
                came = %came.join(","),
                "redis cluster masters changed (a failover or a reshard): calls for the slots of a gone master go to the one that serves them now"
            );
        }
        *known = masters;
    }

    /// Counts the Redis nodes the client is connected to (`redis_nodes`), and logs the count
    /// on a cluster when it changes: at start, it says cluster mode is on and how many
    /// masters were discovered. Called when Redis comes up, not per tick: the count is read
    /// from a list the client builds for it. Also names the nodes the client knows of in the
    /// metrics (`node` label), so that their series show before their first call.
    fn note_redis_nodes(&self) {
        self.store.name_nodes(&self.metrics.redis_by_node);
        if self.store.is_cluster() {
            self.note_cluster_masters();
        }
        let nodes = self.store.connected_nodes() as i64;
        let before = self.metrics.redis_nodes.get();
        self.metrics.redis_nodes.set(nodes);
        if self.store.is_cluster() && nodes != before {
            tracing::info!(
                shard = self.index,
                masters = nodes,
                "redis cluster mode: connected to {nodes} masters; a batch goes as one script call per partition"
            );
        }
    }

    /// Stops taking frames: every new frame gets RETRY, and `linger_loop` sends what is open.
    pub fn stop(&self) {
        self.stopping.open();
        self.linger.notify();
    }

    /// Starts a partition count check unless one is running. A count that
    /// differs from the recorded one stops the process with exit code 2:
    /// serving it would store resent events a second time.
    fn check_partitions_once(self: &Rc<Self>) {
        if self.liveness.partitions_check_running.replace(true) {
            return;
        }
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            match shard.store.check_partitions().await {
                Ok(Partitions::Agree) => match shard.check_eviction().await {
                    Ok(()) => shard.liveness.partitions_agreed.set(true),
                    Err(message) => {
                        tracing::error!(shard = shard.index, "{message}");
                        eprintln!("shardgate: {message}");
                        std::process::exit(2);
                    }
                },
                Ok(Partitions::Differ { recorded }) => {
                    let message =
                        partitions_differ_message(&shard.settings.prefix, recorded, shard.settings.partitions);
                    tracing::error!(shard = shard.index, "{message}");
                    eprintln!("shardgate: {message}");
                    std::process::exit(2);
                }
                Err(error) => shard.log_partitions_check_failure(&error),
            }
            shard.liveness.partitions_check_running.set(false);
        })
        .detach();
    }

    /// A check that fails keeps the shard answering RETRY, so it is logged as a
    /// warning, at most once per `EVENT_FAILURE_LOG_PERIOD`: a key that holds
    /// something else than a count would otherwise go unnoticed.
    fn log_partitions_check_failure(&self, error: &StoreError) {
        let now = Instant::now();
        let due = log_due(
            self.liveness.partitions_check_logged_at.get(),
            now,
            EVENT_FAILURE_LOG_PERIOD,
        );
        if due {
            tracing::warn!(shard = self.index, %error, "partition count check failed; answering RETRY and retrying");
            self.liveness.partitions_check_logged_at.set(Some(now));
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
                self.check_eviction().await?;
                self.liveness.partitions_agreed.set(true);
                self.note_redis_nodes();
                Ok(())
            }
            Ok(Partitions::Differ { recorded }) => Err(partitions_differ_message(
                &self.settings.prefix,
                recorded,
                self.settings.partitions,
            )),
            Err(_) => Ok(()),
        }
    }

    /// Refuses a Redis that may evict markers (`store::eviction_refusal`). A Redis that does
    /// not say, or a check that fails, is let through with a warning: `CONFIG` may be renamed
    /// or forbidden on a managed Redis, and the operator's runbook asks for `noeviction`.
    async fn check_eviction(&self) -> Result<(), String> {
        match self.store.eviction_policy().await {
            Ok(Some(policy)) => eviction_refusal(&policy).map_or(Ok(()), Err),
            Ok(None) => {
                tracing::warn!(
                    shard = self.index,
                    "redis did not say its maxmemory-policy; it must be noeviction"
                );
                Ok(())
            }
            Err(error) => {
                tracing::warn!(shard = self.index, %error, "cannot read redis's maxmemory-policy; it must be noeviction");
                Ok(())
            }
        }
    }

    /// After intake stopped: waits for calls in flight, up to the drain
    /// deadline, then answers RETRY for whatever is left.
    pub async fn drain(self: &Rc<Self>, deadline: Instant, sink: &impl AckSink) -> usize {
        debug_assert!(self.stopping.is_open());
        let held_events = self.admission.in_flight.borrow().len();
        loop {
            self.flush();
            if self.batches.batches_in_flight.get() == 0 && self.batches.open.borrow().is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                self.abandon.open();
            }
            if self.batches.batches_in_flight.get() == 0 {
                // The open batch has events but no slot: the Redis client holds
                // every batch (calls past their deadline), and no completing call
                // will wake us. Look for a slot until the deadline, then answer
                // the open batch RETRY unsent.
                if self.abandon.is_open() {
                    self.abandon_open_batch(sink).await;
                } else {
                    glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS).min(deadline - now)).await;
                }
                continue;
            }
            if self.abandon.is_open() {
                self.drained.wait().await;
            } else {
                futures_lite::future::or(self.drained.wait(), glommio::timer::sleep(deadline - now)).await;
            }
        }
        debug_assert!(self.admission.in_flight.borrow().is_empty());
        debug_assert!(
            self.admission.held_copies.borrow().is_empty(),
            "every held copy's original was answered"
        );
        held_events
    }

    /// Answers the open batch RETRY without a Redis call: the drain passed its
    /// deadline with every batch held by the Redis client. Its replacement is
    /// allocated, which is fine once: the shard is stopping.
    async fn abandon_open_batch(&self, sink: &impl AckSink) {
        let mut batch = self
            .batches
            .open
            .replace(Batch::new(self.settings.batch_events_max, self.store.is_cluster()));
        let node = self.store.node_row(&self.metrics.redis_by_node, None);
        self.metrics.redis_by_node.at(node).errors[RedisErrorKind::Abandoned as usize].add(1);
        self.complete(&mut batch, false);
        self.answer(&batch, sink).await;
        batch.finish();
        // `linger_loop` may wait for a slot for this batch; it can end now.
        self.linger.notify();
    }
}

/// Whether a rate-limited log line may be written again: never written, or
/// last written at least `period` ago.
pub(super) fn log_due(last_logged: Option<Instant>, now: Instant, period: Duration) -> bool {
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
pub struct Outage {
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
