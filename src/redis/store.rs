//! One shard's Redis connection and the script call that stores a batch.
//!
//! Each shard has its own fred client on the glommio runtime. Batches are sent
//! as concurrent `EVALSHA` commands on that one client: fred pipelines
//! concurrent commands by itself. The explicit `pipeline()` API is avoided
//! because under glommio fred 10.1 broke the connection with it ("invalid
//! buffer response index").
//!
//! fred's glommio mode still calls `tokio::time` for connection and command
//! timeouts; without a Tokio time driver it panics at connect and on every
//! disconnect. `TimeDriver` is a one-thread Tokio runtime with only the time
//! driver, whose handle each shard thread enters for its whole life.
//!
//! The client never gives up reconnecting (exponential backoff to 1 s), and
//! the first connection uses the same policy (`fail_fast = false`), so a
//! server started while Redis is down comes up and answers RETRY until Redis
//! is back.
//!
//! # Bounded while Redis stalls
//! Every call has one deadline, `redis_timeout_ms`, that covers the `NOSCRIPT`
//! reload too; it is a glommio timer, not fred's per-command Tokio timer. A call
//! past its deadline is answered RETRY but may still sit in fred's queue, or
//! run in Redis later: RETRY means "not confirmed" (protocol revision 2), and
//! the script is idempotent per event id. What such a call holds is bounded
//! elsewhere: its batch does not come back to the shard until fred has let go
//! of the blob (`batch.rs`), so the shard's in-flight bound counts it; fred's
//! own queue is bounded (`max_command_buffer_len`); a connection that answers
//! nothing for `UNRESPONSIVE_TIMEOUT_CALLS` deadlines is closed and reopened
//! (a blackholed host keeps a socket "connected" for minutes); and a command
//! is sent once (`max_command_attempts = 1`), never replayed by fred after a
//! reconnect, so a dead connection lets go of every blob it held.
//!
//! # On a Redis Cluster
//! `redis-cluster://HOST:PORT[,HOST:PORT...]` names seed nodes (`RedisUrl::fred_config`).
//! A batch then goes as one call per partition group (`groups.rs`, made by the pipeline's
//! lanes through `group_call`), with its keys declared, so that fred routes it to the slot's
//! master. fred follows `MOVED` and `ASK`; each redirection is one more write of the
//! command, so there a command may be written `1 + CLUSTER_REDIRECTIONS_MAX` times, and a
//! command may then also be replayed after a reconnect (safe: the script is idempotent per
//! event id). fred's router task ends on some cluster errors instead of reconnecting; the
//! shard's tick starts it again (`restart_if_ended`).
//!
//! # `--durability replica`
//! After a call's script reply, `WAIT 1 <ms>` goes on the same connection, and its events are
//! answered only if at least one replica confirms (`confirm`); otherwise they are `Unconfirmed`
//! (RETRY). Redis's `WAIT` counts the replicas that have every write made *on the connection
//! it is sent on*, so it must follow the script on that connection:
//! - standalone: fred keeps one connection per client (`router::Connections::Centralized`),
//!   and its one router task takes commands off one channel in the order they were sent
//!   (`router/commands.rs`: `rx.recv()` -> `process_command` -> `write_command`, the route
//!   being that single connection), so a `WAIT` sent after the script's reply is written after
//!   the script, on its connection. Other batches' calls may sit between them: `WAIT` then
//!   waits for those too, never for less.
//! - cluster: the `WAIT` is routed to the group's hash slot (`ClusterHash::Custom`, the slot
//!   of the group's stream key), i.e. to the master that owns it, which ran the script unless
//!   the slot moved in between (see docs/design.md, "Durability").
//!
//! The `WAIT` is sent as a custom command that fred does not treat as blocking: fred's
//! `WAIT` is marked blocking, and a blocking command stops fred from writing anything else on
//! the connection until it answers (or, with `Blocking::Interrupt`, gets it unblocked). Redis
//! itself answers a connection's commands in order, so pipelining after a `WAIT` is safe. Its
//! timeout is what is left of the call's one deadline (`redis_timeout_ms`) less a margin
//! (`WAIT_ANSWER_MARGIN`), at least 1 ms (`WAIT 1 0` would block for ever), so that Redis
//! answers with its count before the deadline fires and the count can be logged. While a
//! `WAIT` waits, Redis runs nothing else of that connection: with the replica down, a
//! standalone shard's calls queue behind each other's `WAIT`s, and many end at their
//! deadline (RETRY, `redis_errors_total{kind="timeout"}`) rather than at their `WAIT`.
//!
//! One `WAIT` at a time per connection (`WaitGate`, group commit): Redis starts a `WAIT`'s
//! timer only when it reaches it, after the `WAIT`s before it on the connection, so `WAIT`s
//! sent back to back would hold the connection for the sum of their timeouts (seen: fred then
//! closed it as unresponsive, and on a cluster that stalled the other masters' calls too). A
//! call whose script answered while a `WAIT` is out waits for the next one, which covers its
//! writes and those of every call that answered meanwhile: the first of them sends it, and
//! all of them take its answer. On a cluster the gate is the slot's master's (fred's cached
//! slot map), since fred keeps one connection per node.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::interfaces::{ClusterInterface, LuaInterface, MetricsInterface};
use fred::prelude::{ClientLike, Config as FredConfig, ReconnectPolicy, Value};
use fred::types::config::ClusterDiscoveryPolicy;
use fred::types::scripts::Script;
use fred::types::{Builder, ClusterHash, CustomCommand};

use crate::limits::CLUSTER_GROUP_CALLS_PER_BATCH;
use crate::redis::groups::{GroupJob, Groups};
use crate::redis::script::{
    partitions_key, DEDUP_APPEND_LUA, OUTCOME_ALREADY_STORED, OUTCOME_APPENDED, OUTCOME_FAILED, PARTITIONS_LUA,
};
use crate::telemetry::metrics::{EventErrorReason, NodeRow, Redirection, RedisErrorKind, RedisNodes};

/// What a shard's Redis client needs from the command line; built by `host`.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub redis_url: RedisUrl,
    /// One deadline per call, `NOSCRIPT` reload included (module doc).
    pub call_timeout_ms: u64,
    /// Calls the shard may have in flight: fred's command queue is sized for them.
    pub batches_in_flight_max: usize,
    pub prefix: String,
    pub dedup_window_secs: u64,
    pub partitions: u32,
    pub durability: Durability,
}

/// `--durability`: when a stored batch is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Once the master ran the script (and its AOF policy, if any, applies).
    Local,
    /// Once `WAIT 1` confirms that at least one replica has the batch's writes.
    Replica,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Local => "local",
            Durability::Replica => "replica",
        }
    }
}

/// Replicas that must confirm a batch's writes under `--durability replica`.
const WAIT_REPLICAS: i64 = 1;
/// What `WAIT` leaves of the call's deadline, so that Redis answers with its count before our
/// own deadline fires: Redis times blocked clients out from its event loop, which an idle
/// server wakes only every 100 ms (`hz 10`), so a `WAIT` may answer up to about 100 ms late
/// (seen: a `WAIT 1 355` answered after more than 400 ms). At most half of what is left.
const WAIT_ANSWER_MARGIN: Duration = Duration::from_millis(150);

/// The `WAIT`s of one connection, one at a time (module doc). Numbered: a call needs the
/// answer of a `WAIT` numbered above the last one sent when its script answered.
#[derive(Default)]
struct WaitGate {
    /// `WAIT`s sent so far; the one out, if any, is the last of them.
    sent: Cell<u64>,
    out: Cell<bool>,
    /// The last `WAIT` that answered (or was given up): its number and what it said.
    last: RefCell<(u64, Option<Shortfall>)>,
    /// Bumped when `last` changes; calls waiting for it are woken.
    version: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl WaitGate {
    fn finish(&self, number: u64, result: Option<Shortfall>) {
        *self.last.borrow_mut() = (number, result);
        self.out.set(false);
        self.version.set(self.version.get() + 1);
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Resolves once `finish` ran after this was called.
    async fn changed(&self) {
        let seen = self.version.get();
        std::future::poll_fn(|context| {
            if self.version.get() != seen {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|waker| waker.will_wake(context.waker())) {
                waiters.push(context.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// Gives the gate its `WAIT`'s answer, or, if the call that sent it was dropped before the
/// answer (the drain's deadline), a shortfall, so that the gate is never left taken.
struct WaitOut<'a> {
    gate: &'a WaitGate,
    number: u64,
    done: bool,
}

impl WaitOut<'_> {
    fn finish(mut self, result: Option<Shortfall>) {
        self.done = true;
        self.gate.finish(self.number, result);
    }
}

impl Drop for WaitOut<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.gate.finish(
                self.number,
                Some(Shortfall {
                    replicas: None,
                    reason: "WAIT given up by its call".into(),
                }),
            );
        }
    }
}

/// Why a call's writes were not confirmed by a replica (`--durability replica`): its events
/// get RETRY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// Replicas that confirmed, if `WAIT` answered.
    pub replicas: Option<i64>,
    /// For the log: what `WAIT` said, or why it did not answer.
    pub reason: String,
}

/// Reconnect backoff: quick first retries for a restart, capped at 1 s.
const RECONNECT_DELAY_MS_MIN: u32 = 10;
const RECONNECT_DELAY_MS_MAX: u32 = 1_000;
const CONNECT_TIMEOUT_MS: u64 = 1_000;
const QUIT_TIMEOUT: Duration = Duration::from_millis(100);
/// A connection with a command unanswered for this many call deadlines is
/// closed and reopened; see the module doc.
const UNRESPONSIVE_TIMEOUT_CALLS: u32 = 3;
const UNRESPONSIVE_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// fred's command queue beyond the shard's own in-flight calls: room for the
/// partition check and a `SCRIPT LOAD`.
const COMMAND_BUFFER_SPARE: usize = 4;
/// `MOVED`/`ASK` redirections fred follows for one command before it fails it (fred's own
/// default, set here so that it is ours): a slot moves once per resharding step, and a
/// command that keeps being redirected meets a cluster that is changing under it; its
/// events get RETRY, and the resend finds the settled cluster.
const CLUSTER_REDIRECTIONS_MAX: u32 = 5;

/// Keeps a Tokio time driver running for fred; see the module doc.
pub struct TimeDriver {
    handle: tokio::runtime::Handle,
}

impl TimeDriver {
    pub fn start() -> std::io::Result<TimeDriver> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("shardgate-timers".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        Ok(TimeDriver { handle })
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

/// Why a batch was not stored. All of them answer RETRY.
#[derive(Debug)]
pub struct StoreError {
    kind: RedisErrorKind,
    message: String,
}

impl fmt::Display for StoreError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl StoreError {
    fn new(kind: RedisErrorKind, message: String) -> StoreError {
        StoreError { kind, message }
    }

    fn from_fred(error: &fred::error::Error) -> StoreError {
        use fred::error::ErrorKind;
        let kind = match error.kind() {
            ErrorKind::Timeout => RedisErrorKind::Timeout,
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Backpressure => RedisErrorKind::Connection,
            ErrorKind::Cluster | ErrorKind::Routing => RedisErrorKind::Cluster,
            _ if error.details().starts_with("TRYAGAIN") => RedisErrorKind::Cluster,
            _ => RedisErrorKind::Script,
        };
        StoreError::new(kind, format!("redis script failed: {error}"))
    }

    fn timeout(timeout: Duration) -> StoreError {
        StoreError::new(
            RedisErrorKind::Timeout,
            format!("redis did not answer within {} ms", timeout.as_millis()),
        )
    }

    pub fn kind(&self) -> RedisErrorKind {
        self.kind
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    /// The drain deadline passed while the call was in Redis.
    pub fn abandoned() -> StoreError {
        StoreError::new(
            RedisErrorKind::Abandoned,
            "shutdown drain deadline passed before redis answered".into(),
        )
    }
}

/// What Redis said about one event of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Newly marked and appended: ACCEPTED.
    Appended,
    /// The marker was there: an earlier copy is stored. DUPLICATE.
    AlreadyStored,
    /// Redis refused this event alone; no marker is left. RETRY.
    Failed,
    /// Stored or found stored, but under `--durability replica` no replica confirmed the
    /// call's writes (`Store::confirm`). RETRY; never put in the dedup cache.
    Unconfirmed,
}

/// Marks every answered event of a call `Unconfirmed`; `Failed` ones stay `Failed`.
pub fn mark_unconfirmed(outcomes: &mut [Outcome]) {
    for outcome in outcomes {
        if matches!(outcome, Outcome::Appended | Outcome::AlreadyStored) {
            *outcome = Outcome::Unconfirmed;
        }
    }
}

/// The events of a call that Redis refused one by one: counts by reason, and
/// the first one's key and error for the (rate-limited) log.
#[derive(Debug, Default)]
pub struct EventFailures {
    pub by_reason: [u64; EventErrorReason::ALL.len()],
    pub first: Option<String>,
}

impl EventFailures {
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum()
    }

    fn clear(&mut self) {
        self.by_reason = [0; EventErrorReason::ALL.len()];
        self.first = None;
    }

    /// Adds another call's failures (a group of a batch, on a cluster).
    fn absorb(&mut self, other: EventFailures) {
        for (total, count) in self.by_reason.iter_mut().zip(other.by_reason) {
            *total += count;
        }
        if self.first.is_none() {
            self.first = other.first;
        }
    }
}

/// The answer to one group call (`Store::group_call`), for `Store::take_group_reply`.
pub(crate) struct GroupReply {
    /// False if the batch's deadline passed before the call was sent.
    sent: bool,
    result: Result<Value, StoreError>,
    /// Under `--durability replica`, a `WAIT` after a successful call that fell short.
    shortfall: Option<Shortfall>,
}

impl GroupReply {
    /// Whether the call was sent: its batch's deadline had not passed before it.
    pub(crate) fn was_sent(&self) -> bool {
        self.sent
    }
}

/// What became of a batch's group calls on a Redis Cluster (`pipeline/sink.rs`).
/// A failed group's events are `Failed` (RETRY); the other groups' events have their own
/// outcomes.
#[derive(Debug, Default)]
pub(crate) struct GroupCalls {
    /// Script calls made: one per partition group that was sent.
    pub calls: u64,
    /// Groups that failed as a whole, by kind.
    pub failed: [u64; RedisErrorKind::ALL.len()],
    /// The first group failure, for the log.
    pub first_error: Option<StoreError>,
    /// Group calls whose `WAIT` fell short (`--durability replica`): their events got RETRY.
    pub wait_shortfalls: u64,
    /// The first of them, for the log.
    pub first_shortfall: Option<Shortfall>,
}

/// What one group call's reply said, for the counts of its node (`pipeline/sink.rs`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupVerdict {
    /// The call failed as a whole: every event of its group got RETRY.
    pub failed: Option<RedisErrorKind>,
    /// Its `WAIT` fell short (`--durability replica`): every event of its group got RETRY.
    pub wait_shortfall: bool,
}

impl GroupCalls {
    pub(crate) fn failed_total(&self) -> u64 {
        self.failed.iter().sum()
    }

    pub(crate) fn fail(&mut self, error: StoreError) {
        self.failed[error.kind() as usize] += 1;
        self.first_error.get_or_insert(error);
    }
}

/// What the prefix's recorded partition count says about ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Partitions {
    /// Recorded now, or recorded earlier with the same count.
    Agree,
    /// Recorded earlier with another count: serving would store copies twice.
    Differ { recorded: u32 },
}

pub struct Store {
    client: fred::clients::Client,
    /// `redis-cluster://`: a batch goes as one call per partition group.
    cluster: bool,
    /// fred's connection (router) task, watched by `restart_if_ended`.
    connection_task: RefCell<Option<fred::types::ConnectHandle>>,
    /// Set by `quit`: the connection task ends on purpose.
    quitting: Cell<bool>,
    /// When `restart_if_ended` last started the connection task again.
    restarted_at: Cell<Option<Instant>>,
    script: Script,
    partitions_script: Script,
    prefix: Bytes,
    window_secs: Bytes,
    partitions_key: String,
    partitions: u32,
    call_timeout: Duration,
    durability: Durability,
    /// `WAIT`, as a command fred pipelines (module doc); its cluster hash is set per group.
    wait_command: CustomCommand,
    /// Standalone: the connection's `WAIT` gate. Cluster: the gates of the masters, by node.
    wait_gate: Rc<WaitGate>,
    node_wait_gates: RefCell<HashMap<fred::types::config::Server, Rc<WaitGate>>>,
    /// Standalone: the node every call goes to, as the url names it (the `node` label).
    standalone_node: Option<(String, u16)>,
}

impl Store {
    /// Builds the client; `connect` starts it. Must run on a shard thread that
    /// has entered the `TimeDriver`.
    pub fn new(settings: &StoreSettings) -> Result<Store, StoreError> {
        let fred_config = settings
            .redis_url
            .fred_config()
            .map_err(|error| StoreError::new(RedisErrorKind::Connection, error))?;
        let cluster = settings.redis_url.is_cluster();
        let standalone_node = match &fred_config.server {
            fred::types::config::ServerConfig::Centralized { server } => Some((server.host.to_string(), server.port)),
            _ => None,
        };
        let call_timeout = Duration::from_millis(settings.call_timeout_ms);
        // On a cluster each batch makes up to CLUSTER_GROUP_CALLS_PER_BATCH calls at once, and
        // a redirected call goes through the queue a second time.
        // A command is written once (module doc), but on a cluster each MOVED or ASK it
        // follows is one more write of it, and fred fails a redirection with no write left;
        // for ASK it also ends its router task (`restart_if_ended`). So on a cluster a
        // command may be written once and once per redirection. A side effect: fred may then
        // also write a command again after a reconnect, which is safe (the script is
        // idempotent per event id, and its batch stays held until fred lets go of it).
        let command_attempts = if cluster { 1 + CLUSTER_REDIRECTIONS_MAX } else { 1 };
        let calls_in_flight = if cluster {
            2 * settings.batches_in_flight_max * CLUSTER_GROUP_CALLS_PER_BATCH
        } else {
            settings.batches_in_flight_max
        };
        let mut builder = Builder::from_config(fred_config);
        builder
            .with_config(|fred_config| fred_config.fail_fast = false)
            .with_performance_config(|performance| {
                // Our own deadline per call (module doc); no Tokio timer per command.
                performance.default_command_timeout = Duration::ZERO;
            })
            .with_connection_config(|connection| {
                connection.connection_timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
                connection.internal_command_timeout = call_timeout;
                connection.max_command_attempts = command_attempts;
                connection.max_command_buffer_len = calls_in_flight + COMMAND_BUFFER_SPARE;
                connection.max_redirections = CLUSTER_REDIRECTIONS_MAX;
                // A MOVED refreshes the slot map at once; CLUSTER INFO must say ok at connect.
                connection.cluster_cache_update_delay = Duration::ZERO;
                connection.disable_cluster_health_check = false;
                connection.unresponsive.max_timeout = Some(call_timeout * UNRESPONSIVE_TIMEOUT_CALLS);
                connection.unresponsive.interval = UNRESPONSIVE_CHECK_INTERVAL;
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                RECONNECT_DELAY_MS_MIN,
                RECONNECT_DELAY_MS_MAX,
                2,
            ));
        let client = builder.build().map_err(|error| {
            StoreError::new(
                RedisErrorKind::Connection,
                format!("cannot build redis client: {error}"),
            )
        })?;
        Ok(Store {
            client,
            cluster,
            connection_task: RefCell::new(None),
            quitting: Cell::new(false),
            restarted_at: Cell::new(None),
            script: Script::from_lua(DEDUP_APPEND_LUA),
            partitions_script: Script::from_lua(PARTITIONS_LUA),
            prefix: Bytes::copy_from_slice(settings.prefix.as_bytes()),
            window_secs: Bytes::copy_from_slice(settings.dedup_window_secs.to_string().as_bytes()),
            partitions_key: partitions_key(&settings.prefix),
            partitions: settings.partitions,
            call_timeout,
            durability: settings.durability,
            wait_command: CustomCommand::new_static("WAIT", ClusterHash::Random, false),
            wait_gate: Rc::default(),
            node_wait_gates: RefCell::default(),
            standalone_node,
        })
    }

    /// Starts the connection task; it reconnects forever.
    pub fn connect(&self) {
        *self.connection_task.borrow_mut() = Some(self.client.connect());
    }

    /// Starts the connection task again if it ended on its own, and says so. fred's router
    /// task ends on some errors instead of reconnecting: seen on a cluster when an `ASK`
    /// arrives for a command that has used all its write attempts ("Max attempts reached"),
    /// which left the client with no task to send anything, every call timing out, for
    /// good. The shard's tick calls this every 5 ms; it is a flag read.
    ///
    /// It also ends when a `redis-cluster://` url names a standalone Redis (fred takes that
    /// as a configuration error, not to be retried): restarts are spaced like reconnects,
    /// at most one per `RECONNECT_DELAY_MS_MAX`, so that case costs one attempt a second.
    pub(crate) fn restart_if_ended(&self) -> bool {
        let ended = self
            .connection_task
            .borrow()
            .as_ref()
            .is_some_and(|task| task.is_finished());
        if !ended || self.quitting.get() {
            return false;
        }
        let now = Instant::now();
        let spacing = Duration::from_millis(u64::from(RECONNECT_DELAY_MS_MAX));
        if self
            .restarted_at
            .get()
            .is_some_and(|at| now.duration_since(at) < spacing)
        {
            return false;
        }
        self.restarted_at.set(Some(now));
        self.connect();
        true
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Whether `--redis` names a cluster: batches then go as one call per partition group.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// On a cluster, the masters the client's slot map routes to (`host:port`, sorted); empty
    /// on a standalone Redis or before the first slot map. Copies the map: for a log line
    /// when the masters change, never per call.
    pub(crate) fn cluster_masters(&self) -> Vec<String> {
        if !self.cluster {
            return Vec::new();
        }
        let mut masters: Vec<String> = self
            .client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes().iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        masters.sort();
        masters
    }

    /// The nodes the client holds a connection to: on a cluster, every master it discovered.
    pub(crate) fn connected_nodes(&self) -> usize {
        self.client.active_connections().len()
    }

    /// The row in `nodes` of the node a call goes to: standalone, the url's; on a cluster, the
    /// master of `slot` in the client's slot map (after a call, the one that answered it, since a
    /// `MOVED` refreshes the map), or `unknown` without a slot or a map. Never allocates past a
    /// node's first sight.
    pub(crate) fn node_row(&self, nodes: &RedisNodes, slot: Option<u16>) -> NodeRow {
        if let Some((host, port)) = &self.standalone_node {
            return nodes.row(host, *port);
        }
        let Some(slot) = slot else {
            return RedisNodes::UNKNOWN;
        };
        self.client
            .with_cached_cluster_state(|state| {
                state
                    .get_server(slot)
                    .map(|server| nodes.row(&server.host, server.port))
            })
            .flatten()
            .unwrap_or(RedisNodes::UNKNOWN)
    }

    /// Names every node the client knows of in `nodes`, so that their series show from the
    /// start: standalone, the url's node; on a cluster, every master of the slot map.
    pub(crate) fn name_nodes(&self, nodes: &RedisNodes) {
        if self.standalone_node.is_some() {
            self.node_row(nodes, None);
            return;
        }
        self.client.with_cached_cluster_state(|state| {
            for master in state.unique_primary_nodes() {
                nodes.row(&master.host, master.port);
            }
        });
    }

    /// Counts the `MOVED` and `ASK` redirections the client followed since the last call, by
    /// the node that answered with them (a vendored fred patch counts them).
    pub(crate) fn take_redirections(&self, nodes: &RedisNodes) {
        if !self.cluster {
            return;
        }
        self.client.take_redirections(|server, moved, ask| {
            let node = nodes.at(nodes.row(&server.host, server.port));
            node.redirections[Redirection::Moved as usize].add(moved);
            node.redirections[Redirection::Ask as usize].add(ask);
        });
    }

    /// Runs the script on one batch. `outcomes` receives one entry per event,
    /// in order, and `failures` what Redis refused event by event. On error
    /// nothing is known about any event of the batch: any of them may be
    /// stored (RETRY means "not confirmed"). Under `--durability replica` the call is followed
    /// by `WAIT` (`confirm`); if it falls short, the events Redis answered are `Unconfirmed`
    /// and the shortfall is returned.
    pub async fn dedup_append(
        &self,
        nonce: u64,
        event_count: usize,
        blob: Bytes,
        outcomes: &mut Vec<Outcome>,
        failures: &mut EventFailures,
    ) -> Result<Option<Shortfall>, StoreError> {
        let deadline = Instant::now() + self.call_timeout;
        outcomes.clear();
        outcomes.resize(event_count, Outcome::Failed);
        failures.clear();
        let mut nonce_text = itoa::Buffer::new();
        let nonce_text = nonce_text.format(nonce);
        // Built again for a NOSCRIPT retry rather than cloned up front, as fred's
        // `evalsha_with_reload` does on every call: one heap copy of the arguments per call
        // instead of two. The nonce goes as an integer, which fred writes without a buffer.
        let arguments = || self.script_arguments(event_count, &blob, nonce);
        let reply = self
            .until(deadline, self.evalsha(&self.script, Vec::new, arguments))
            .await?;
        decode_reply(&reply, nonce_text.as_bytes(), outcomes, failures)?;
        let shortfall = self.confirm(deadline, None).await;
        if shortfall.is_some() {
            mark_unconfirmed(outcomes);
        }
        Ok(shortfall)
    }

    /// Under `--durability replica`, the answer of a `WAIT 1 <ms>` sent on the connection
    /// (standalone) or to the slot's master (cluster, `slot`) after a script call answered,
    /// within the call's `deadline`: None if a replica confirmed (or under `local`), else why
    /// not. One `WAIT` at a time per connection, shared by the calls that answered before it
    /// was sent (module doc).
    async fn confirm(&self, deadline: Instant, slot: Option<u16>) -> Option<Shortfall> {
        if self.durability == Durability::Local {
            return None;
        }
        let gate = self.wait_gate_for(slot);
        // A WAIT out now was sent before this call's script answered: it may not cover it.
        let needed = gate.sent.get() + 1;
        let confirmed = async {
            loop {
                {
                    let last = gate.last.borrow();
                    if last.0 >= needed {
                        return last.1.clone();
                    }
                }
                if !gate.out.get() {
                    gate.out.set(true);
                    let number = gate.sent.get() + 1;
                    gate.sent.set(number);
                    let out = WaitOut {
                        gate: &gate,
                        number,
                        done: false,
                    };
                    let result = self.send_wait(deadline, slot).await;
                    out.finish(result.clone());
                    return result;
                }
                gate.changed().await;
            }
        };
        let deadline_passed = async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            Some(Shortfall {
                replicas: None,
                reason: "the call's deadline passed waiting for the connection's WAIT".into(),
            })
        };
        futures_lite::future::or(confirmed, deadline_passed).await
    }

    /// The `WAIT` gate of the connection a call's `WAIT` goes on: on a cluster, the slot's
    /// master's as fred's cached slot map has it.
    fn wait_gate_for(&self, slot: Option<u16>) -> Rc<WaitGate> {
        let Some(slot) = slot else {
            return Rc::clone(&self.wait_gate);
        };
        // Read in place: `cached_cluster_state` would copy the whole slot map per call. Only a
        // node's first gate copies its address.
        let gate = self.client.with_cached_cluster_state(|state| {
            let node = state.get_server(slot)?;
            let mut gates = self.node_wait_gates.borrow_mut();
            if let Some(gate) = gates.get(node) {
                return Some(Rc::clone(gate));
            }
            Some(Rc::clone(gates.entry(node.clone()).or_default()))
        });
        gate.flatten().unwrap_or_else(|| Rc::clone(&self.wait_gate))
    }

    /// Sends one `WAIT 1 <ms>` (`confirm`) and reads its answer.
    async fn send_wait(&self, deadline: Instant, slot: Option<u16>) -> Option<Shortfall> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let wait_ms = remaining
            .saturating_sub(WAIT_ANSWER_MARGIN.min(remaining / 2))
            .as_millis();
        if wait_ms == 0 {
            return Some(Shortfall {
                replicas: None,
                reason: "no time left in the call's deadline for WAIT".into(),
            });
        }
        let mut command = self.wait_command.clone();
        if let Some(slot) = slot {
            command.cluster_hash = ClusterHash::Custom(slot);
        }
        let arguments = vec![
            Value::Integer(WAIT_REPLICAS),
            Value::Integer(i64::try_from(wait_ms).unwrap_or(i64::MAX)),
        ];
        let wait = self.client.custom::<Value, Value>(command, arguments);
        match self.until(deadline, wait).await {
            Ok(Value::Integer(replicas)) if replicas >= WAIT_REPLICAS => None,
            Ok(Value::Integer(replicas)) => Some(Shortfall {
                replicas: Some(replicas),
                reason: format!("WAIT {WAIT_REPLICAS} {wait_ms}: {replicas} replicas confirmed"),
            }),
            Ok(other) => Some(Shortfall {
                replicas: None,
                reason: format!("WAIT replied with an unexpected type: {:?}", other.kind()),
            }),
            Err(error) => Some(Shortfall {
                replicas: None,
                reason: format!("WAIT failed: {error}"),
            }),
        }
    }

    /// The script's ARGV (`script.rs`): under `--durability replica` a sixth, `1`, has a call
    /// that wrote nothing but found markers write one, so that its `WAIT` covers them.
    fn script_arguments(&self, event_count: usize, blob: &Bytes, nonce: u64) -> Vec<Value> {
        let mut arguments = Vec::with_capacity(6);
        arguments.extend([
            Value::Bytes(self.prefix.clone()),
            Value::Bytes(self.window_secs.clone()),
            Value::Integer(event_count as i64),
            Value::Bytes(blob.clone()),
            Value::Integer(i64::try_from(nonce).unwrap_or(i64::MAX)),
        ]);
        if self.durability == Durability::Replica {
            arguments.push(Value::Integer(1));
        }
        arguments
    }

    /// The deadline of one call; on a cluster, of all the group calls of one batch.
    pub(crate) fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Splits a batch's blob by partition for a cluster (`groups.rs`), keys under our prefix.
    pub(crate) fn split(&self, groups: &mut Groups, blob: &[u8], event_count: usize) -> Result<(), StoreError> {
        groups.split(&self.prefix, blob, event_count).map_err(|_| {
            StoreError::new(
                RedisErrorKind::Script,
                "the batch blob could not be split by partition".into(),
            )
        })
    }

    /// One group's script call on a cluster, its keys declared, within the job's deadline
    /// (the batch's). Not sent at all if the deadline has passed.
    pub(crate) async fn group_call(&self, job: &GroupJob) -> GroupReply {
        if Instant::now() >= job.deadline() {
            return GroupReply {
                sent: false,
                result: Err(StoreError::timeout(self.call_timeout)),
                shortfall: None,
            };
        }
        let arguments = || self.script_arguments(job.event_count(), job.blob(), job.nonce());
        let result = self
            .until(job.deadline(), self.evalsha(&self.script, || job.keys(), arguments))
            .await;
        let shortfall = match (&result, self.durability) {
            (Ok(_), Durability::Replica) => self.confirm(job.deadline(), Some(job.slot())).await,
            _ => None,
        };
        GroupReply {
            sent: true,
            result,
            shortfall,
        }
    }

    /// Puts a group call's reply on its events in `groups`: their outcomes, or `Failed`
    /// (RETRY) for all of them if the call failed or its reply does not match it. Says which,
    /// for the counts of the call's node.
    pub(crate) fn take_group_reply(
        &self,
        job: &GroupJob,
        reply: GroupReply,
        groups: &mut Groups,
        failures: &mut EventFailures,
        report: &mut GroupCalls,
    ) -> GroupVerdict {
        report.calls += u64::from(reply.sent);
        let outcomes = groups.outcomes_of(job.group());
        let decoded = reply.result.and_then(|value| {
            let mut nonce_text = itoa::Buffer::new();
            let mut group_failures = EventFailures::default();
            decode_reply(
                &value,
                nonce_text.format(job.nonce()).as_bytes(),
                outcomes,
                &mut group_failures,
            )?;
            failures.absorb(group_failures);
            Ok(())
        });
        let mut verdict = GroupVerdict::default();
        match decoded {
            Err(error) => {
                groups.outcomes_of(job.group()).fill(Outcome::Failed);
                verdict.failed = Some(error.kind());
                report.fail(error);
            }
            Ok(()) => {
                if let Some(shortfall) = reply.shortfall {
                    mark_unconfirmed(groups.outcomes_of(job.group()));
                    report.wait_shortfalls += 1;
                    report.first_shortfall.get_or_insert(shortfall);
                    verdict.wait_shortfall = true;
                }
            }
        }
        verdict
    }

    /// Records our partition count under the prefix if none is, and says
    /// whether a recorded one agrees.
    pub(crate) async fn check_partitions(&self) -> Result<Partitions, StoreError> {
        let call = self.evalsha(
            &self.partitions_script,
            || vec![fred::types::Key::from(self.partitions_key.as_str())],
            || vec![Value::Integer(i64::from(self.partitions))],
        );
        let reply = self.within_deadline(call).await?;
        let recorded = reply
            .as_string()
            .and_then(|text| text.parse::<u32>().ok())
            .ok_or_else(|| {
                StoreError::new(
                    RedisErrorKind::Script,
                    format!("{} holds {reply:?}, not a partition count", self.partitions_key),
                )
            })?;
        Ok(if recorded == self.partitions {
            Partitions::Agree
        } else {
            Partitions::Differ { recorded }
        })
    }

    /// Redis's `maxmemory-policy`, read with `CONFIG GET`: on a cluster each master's (every
    /// master holds markers), the first that is not `noeviction`, else the last read. `None`
    /// when Redis does not say: a managed Redis may rename or forbid `CONFIG`.
    pub(crate) async fn eviction_policy(&self) -> Result<Option<String>, StoreError> {
        let arguments = || vec![Value::from("GET"), Value::from("maxmemory-policy")];
        let command = || CustomCommand::new_static("CONFIG", ClusterHash::Random, false);
        if !self.is_cluster() {
            let reply = self
                .within_deadline(self.client.custom::<Value, Value>(command(), arguments()))
                .await?;
            return Ok(policy_of(&reply));
        }
        let masters = self
            .client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default();
        let mut policy = None;
        for master in masters {
            let node = self.client.with_cluster_node(&master);
            let call = node.custom::<Value, Value>(command(), arguments());
            policy = policy_of(&self.within_deadline(call).await?);
            if let Some(name) = &policy {
                if eviction_refusal(name).is_some() {
                    return Ok(Some(format!("{name} (on {master})")));
                }
            }
        }
        Ok(policy)
    }

    /// `EVALSHA`, loading the script and calling once more if Redis has forgotten it (a
    /// restart, `SCRIPT FLUSH`). Keys and arguments are built again for that second call.
    async fn evalsha(
        &self,
        script: &Script,
        keys: impl Fn() -> Vec<fred::types::Key>,
        arguments: impl Fn() -> Vec<Value>,
    ) -> Result<Value, fred::error::Error> {
        match self.client.evalsha(script.sha1().clone(), keys(), arguments()).await {
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                script.load(&self.client).await?;
                self.client.evalsha(script.sha1().clone(), keys(), arguments()).await
            }
            result => result,
        }
    }

    /// One deadline for a whole call, `NOSCRIPT` reload included.
    async fn within_deadline(
        &self,
        call: impl std::future::Future<Output = Result<Value, fred::error::Error>>,
    ) -> Result<Value, StoreError> {
        self.until(Instant::now() + self.call_timeout, call).await
    }

    /// A call raced against a deadline: past it, the call is a timeout.
    async fn until(
        &self,
        deadline: Instant,
        call: impl std::future::Future<Output = Result<Value, fred::error::Error>>,
    ) -> Result<Value, StoreError> {
        let call = async { Some(call.await) };
        let deadline = async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            None
        };
        match futures_lite::future::or(call, deadline).await {
            Some(result) => result.map_err(|error| StoreError::from_fred(&error)),
            None => Err(StoreError::timeout(self.call_timeout)),
        }
    }

    /// Closes the connection; bounded, since a client still trying to connect
    /// would otherwise wait out its connect timeout.
    pub async fn quit(&self) {
        self.quitting.set(true);
        let quit = async {
            let _ = self.client.quit().await;
        };
        futures_lite::future::or(quit, glommio::timer::sleep(QUIT_TIMEOUT)).await;
    }
}

/// Reads the script's reply (`script.rs`): the call's nonce, then exactly one
/// `A`, `D` or `E` per event, then one line per failed event. Anything else is
/// an error for the whole call, never a guess.
fn decode_reply(
    reply: &Value,
    nonce: &[u8],
    outcomes: &mut [Outcome],
    failures: &mut EventFailures,
) -> Result<(), StoreError> {
    let event_count = outcomes.len();
    let bytes: &[u8] = match reply {
        Value::String(text) => text.as_bytes(),
        Value::Bytes(bytes) => bytes,
        other => {
            return Err(StoreError::new(
                RedisErrorKind::Script,
                format!("redis script replied with an unexpected type: {:?}", other.kind()),
            ))
        }
    };
    let (head, failure_lines) = match bytes.iter().position(|&byte| byte == b'\n') {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[][..]),
    };
    let echoed = head.strip_prefix(nonce).and_then(|rest| rest.strip_prefix(b" "));
    let Some(outcome_bytes) = echoed else {
        return Err(StoreError::new(
            RedisErrorKind::ReplyMismatch,
            "redis script reply does not echo its call's nonce".into(),
        ));
    };
    if outcome_bytes.len() != event_count {
        return Err(StoreError::new(
            RedisErrorKind::ReplyMismatch,
            format!("redis script answered {} events of {event_count}", outcome_bytes.len()),
        ));
    }
    for (slot, &byte) in outcomes.iter_mut().zip(outcome_bytes) {
        *slot = match byte {
            OUTCOME_APPENDED => Outcome::Appended,
            OUTCOME_ALREADY_STORED => Outcome::AlreadyStored,
            OUTCOME_FAILED => Outcome::Failed,
            _ => {
                return Err(StoreError::new(
                    RedisErrorKind::Script,
                    format!("redis script answered an unknown outcome {byte:#04x}"),
                ))
            }
        };
    }
    read_failures(failure_lines, failures);
    let failed_events = outcomes.iter().filter(|&&outcome| outcome == Outcome::Failed).count();
    if failures.total() != failed_events as u64 {
        return Err(StoreError::new(
            RedisErrorKind::ReplyMismatch,
            format!(
                "redis script listed {} failures for {failed_events} failed events",
                failures.total()
            ),
        ));
    }
    Ok(())
}

/// Lines `<index> <key> <error>`; counted by the error's code.
fn read_failures(lines: &[u8], failures: &mut EventFailures) {
    for line in lines.split(|&byte| byte == b'\n').filter(|line| !line.is_empty()) {
        let line = String::from_utf8_lossy(line);
        let mut parts = line.splitn(3, ' ');
        let (_index, key, message) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        failures.by_reason[EventErrorReason::of_message(message) as usize] += 1;
        if failures.first.is_none() {
            failures.first = Some(format!("{key}: {message}"));
        }
    }
}

/// A `redis://` (standalone) or `redis-cluster://` (cluster seed nodes) url whose password
/// never reaches a log line or an error message: `Debug` and `Display` show it as `***`.
/// `Store::new` alone reads the real text, through `fred_config`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

const STANDALONE_SCHEME: &str = "redis://";
const CLUSTER_SCHEME: &str = "redis-cluster://";

impl RedisUrl {
    pub fn new(url: String) -> RedisUrl {
        RedisUrl(url)
    }

    /// `redis-cluster://HOST:PORT[,HOST:PORT...]`: seed nodes of a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.0.starts_with(CLUSTER_SCHEME)
    }

    /// fred's configuration for this url, or a lowercase reason it is not one we serve.
    /// The reason never holds the password: it names the url through `Display`.
    pub(crate) fn fred_config(&self) -> Result<FredConfig, String> {
        if self.0.starts_with(STANDALONE_SCHEME) {
            let config = FredConfig::from_url_centralized(&self.0)
                .map_err(|error| format!("invalid redis url {self}: {}", error.details().to_lowercase()))?;
            return Ok(config);
        }
        if !self.is_cluster() {
            return Err(format!(
                "redis url {self} must be redis://HOST:PORT[/DB] (a standalone redis) or \
                 redis-cluster://HOST:PORT[,HOST:PORT...] (seed nodes of a redis cluster); tls is not supported"
            ));
        }
        let fred_url = cluster_url_for_fred(&self.0).map_err(|reason| format!("invalid redis url {self}: {reason}"))?;
        let mut config = FredConfig::from_url_clustered(&fred_url)
            .map_err(|error| format!("invalid redis url {self}: {}", error.details().to_lowercase()))?;
        // After a failover or a reshard the seeds may be gone: reconnect through the nodes
        // last seen too, not only the seeds.
        config
            .server
            .set_cluster_discovery_policy(ClusterDiscoveryPolicy::UseCache)
            .map_err(|error| format!("invalid redis url {self}: {}", error.details().to_lowercase()))?;
        Ok(config)
    }

    #[cfg(test)]
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// The url with the password part of its userinfo replaced by `***`.
    pub(crate) fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:?}", self.redacted())
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted())
    }
}

/// Our cluster form, `redis-cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`, in fred's:
/// `redis-cluster://[USER:PASSWORD@]HOST:PORT?node=HOST:PORT&...`. Every seed needs a port;
/// nothing may follow the seeds (a cluster has no database number). The reason for a
/// refusal names only the seeds, never the userinfo.
fn cluster_url_for_fred(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix(CLUSTER_SCHEME).ok_or("not a redis-cluster:// url")?;
    let (userinfo, seeds) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    if seeds.is_empty() {
        return Err("a redis-cluster url needs at least one seed node host:port".into());
    }
    if seeds.contains(['/', '?', '#']) {
        return Err(format!(
            "a redis-cluster url lists seed nodes host:port[,host:port...] and nothing after them \
             (no database, no query), not {seeds:?}"
        ));
    }
    let mut fred_url = String::with_capacity(url.len() + 16);
    fred_url.push_str(CLUSTER_SCHEME);
    fred_url.push_str(userinfo);
    for (index, seed) in seeds.split(',').enumerate() {
        let port = seed
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .map(|(_, port)| port);
        let valid_port = port
            .and_then(|port| port.parse::<u16>().ok())
            .is_some_and(|port| port > 0);
        if !valid_port {
            return Err(format!("seed node {seed:?} must be host:port with a port in 1..=65535"));
        }
        fred_url.push_str(match index {
            0 => "",
            1 => "?node=",
            _ => "&node=",
        });
        fred_url.push_str(seed);
    }
    Ok(fred_url)
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`; urls without a
/// password are returned as they are.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _secret)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// The policy in a `CONFIG GET maxmemory-policy` reply: a map under RESP3, a name-value array
/// under RESP2; `None` for anything else.
fn policy_of(reply: &Value) -> Option<String> {
    match reply {
        Value::Map(map) => map.values().next().and_then(Value::as_string),
        Value::Array(items) if items.len() == 2 => items[1].as_string(),
        _ => None,
    }
}

/// Why a Redis with this `maxmemory-policy` must not hold markers, or `None` if it may. Any
/// policy but `noeviction` may delete a marker before its window ends (the `volatile-*` ones
/// pick keys with a TTL, which is every marker), and a late copy of that event would then be
/// stored a second time; `allkeys-*` may also delete a stream.
pub(crate) fn eviction_refusal(policy: &str) -> Option<String> {
    if policy.eq_ignore_ascii_case("noeviction") {
        return None;
    }
    Some(format!(
        "redis has maxmemory-policy {policy}: at maxmemory it deletes keys, a dedup marker among them, and a \
         late copy of that event would be stored twice; set maxmemory-policy noeviction (CONFIG SET \
         maxmemory-policy noeviction, and in redis.conf)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` outcome slots, as a call of `count` events gets them.
    fn slots(outcomes: &mut Vec<Outcome>, count: usize) -> &mut [Outcome] {
        outcomes.clear();
        outcomes.resize(count, Outcome::Failed);
        outcomes
    }

    fn cluster_seeds(url: &str) -> Result<Vec<String>, String> {
        let config = RedisUrl::new(url.to_string()).fred_config()?;
        match config.server {
            fred::types::config::ServerConfig::Clustered { hosts, policy } => {
                assert_eq!(policy, ClusterDiscoveryPolicy::UseCache);
                let mut seeds: Vec<String> = hosts
                    .iter()
                    .map(|host| format!("{}:{}", host.host, host.port))
                    .collect();
                seeds.sort();
                Ok(seeds)
            }
            other => panic!("{url} is not clustered: {other:?}"),
        }
    }

    /// The comma form becomes fred's seed list; `redis://` stays standalone.
    #[test]
    fn cluster_urls_list_their_seeds() {
        assert_eq!(
            cluster_seeds("redis-cluster://127.0.0.1:7000").unwrap(),
            ["127.0.0.1:7000"]
        );
        assert_eq!(
            cluster_seeds("redis-cluster://10.0.0.2:7001,10.0.0.1:7000,redis-c:7002").unwrap(),
            ["10.0.0.1:7000", "10.0.0.2:7001", "redis-c:7002"]
        );
        let with_password = RedisUrl::new("redis-cluster://game:s3cret,x@10.0.0.1:7000,10.0.0.2:7000".into());
        let config = with_password.fred_config().unwrap();
        assert_eq!(config.username.as_deref(), Some("game"));
        assert_eq!(config.password.as_deref(), Some("s3cret,x"));
        assert_eq!(
            with_password.to_string(),
            "redis-cluster://game:***@10.0.0.1:7000,10.0.0.2:7000"
        );
        assert!(with_password.is_cluster());
        let standalone = RedisUrl::new("redis://127.0.0.1:6379".into());
        assert!(!standalone.is_cluster());
        assert!(!standalone.fred_config().unwrap().server.is_clustered());
    }

    /// A bad url gets a lowercase reason that names it without its password.
    #[test]
    fn bad_cluster_urls_are_refused_clearly() {
        for (url, reason) in [
            ("redis-cluster://", "at least one seed node"),
            ("redis-cluster://127.0.0.1", "port in 1..=65535"),
            ("redis-cluster://127.0.0.1:7000,", "seed node \"\""),
            ("redis-cluster://127.0.0.1:7000,:7001", "seed node \":7001\""),
            ("redis-cluster://127.0.0.1:0", "port in 1..=65535"),
            ("redis-cluster://127.0.0.1:99999", "port in 1..=65535"),
            ("redis-cluster://127.0.0.1:7000/0", "nothing after them"),
            ("redis-cluster://127.0.0.1:7000?node=x:1", "nothing after them"),
            ("rediss-cluster://127.0.0.1:7000", "tls is not supported"),
            ("http://127.0.0.1:7000", "must be redis://"),
        ] {
            let url = url.replacen("://", "://user:hunter2@", 1);
            let error = RedisUrl::new(url.clone()).fred_config().unwrap_err();
            assert!(error.contains(reason), "{url}: {error}");
            assert!(!error.contains("hunter2"), "{url}: {error}");
            assert!(error.starts_with(char::is_lowercase), "{url}: {error}");
        }
    }

    /// A reply of the right length decodes in order; anything else is an error, never a guess.
    #[test]
    fn outcomes_decode_strictly() {
        let mut outcomes = Vec::new();
        let mut failures = EventFailures::default();
        let reply = |text: &'static str| Value::Bytes(Bytes::from_static(text.as_bytes()));
        decode_reply(&reply("7 ADA"), b"7", slots(&mut outcomes, 3), &mut failures).unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Appended, Outcome::AlreadyStored, Outcome::Appended]
        );
        assert_eq!(failures.total(), 0);
        assert!(decode_reply(&reply("7 AD"), b"7", slots(&mut outcomes, 3), &mut failures).is_err());
        assert!(decode_reply(&reply("7 AX"), b"7", slots(&mut outcomes, 2), &mut failures).is_err());
        assert!(decode_reply(&Value::Integer(1), b"7", slots(&mut outcomes, 1), &mut failures).is_err());
    }

    /// A reply that echoes another call's nonce fails the call, whatever its length.
    #[test]
    fn a_reply_for_another_call_is_refused() {
        let mut outcomes = Vec::new();
        let mut failures = EventFailures::default();
        let reply = Value::Bytes(Bytes::from_static(b"8 AA"));
        let error = decode_reply(&reply, b"7", slots(&mut outcomes, 2), &mut failures).unwrap_err();
        assert_eq!(error.kind(), RedisErrorKind::ReplyMismatch);
        let prefix_of_nonce = Value::Bytes(Bytes::from_static(b"17 AA"));
        assert!(decode_reply(&prefix_of_nonce, b"1", slots(&mut outcomes, 2), &mut failures).is_err());
    }

    /// A failed event is that event's alone: its outcome is `Failed`, counted by its error's code.
    #[test]
    fn failed_events_are_counted_by_reason() {
        let mut outcomes = Vec::new();
        let mut failures = EventFailures::default();
        let text =
            "3 AEE\n1 sg:{3}:events WRONGTYPE Operation against a key\n2 sg:{4}:seen:1:2 OOM command not allowed";
        let reply = Value::Bytes(Bytes::copy_from_slice(text.as_bytes()));
        decode_reply(&reply, b"3", slots(&mut outcomes, 3), &mut failures).unwrap();
        assert_eq!(outcomes, vec![Outcome::Appended, Outcome::Failed, Outcome::Failed]);
        assert_eq!(failures.by_reason[EventErrorReason::WrongType as usize], 1);
        assert_eq!(failures.by_reason[EventErrorReason::OutOfMemory as usize], 1);
        assert_eq!(
            failures.first.as_deref(),
            Some("sg:{3}:events: WRONGTYPE Operation against a key")
        );
        let unlisted = Value::Bytes(Bytes::from_static(b"3 AE"));
        assert!(decode_reply(&unlisted, b"3", slots(&mut outcomes, 2), &mut failures).is_err());
    }

    /// Only noeviction may hold markers; the refusal names the policy and the fix.
    #[test]
    fn only_noeviction_keeps_every_marker() {
        assert_eq!(eviction_refusal("noeviction"), None);
        assert_eq!(eviction_refusal("NoEviction"), None);
        for policy in [
            "volatile-lru",
            "volatile-ttl",
            "allkeys-lru",
            "allkeys-random",
            "volatile-lfu",
        ] {
            let message = eviction_refusal(policy).expect("an evicting policy is refused");
            assert!(
                message.contains(policy) && message.contains("maxmemory-policy noeviction"),
                "{message}"
            );
            assert_eq!(
                message,
                message.to_lowercase().replace("config set", "CONFIG SET"),
                "lowercase: {message}"
            );
        }
    }

    /// The policy is read from both reply shapes, and nothing else is taken for one.
    #[test]
    fn the_policy_is_read_from_either_reply_shape() {
        let array = Value::Array(vec![Value::from("maxmemory-policy"), Value::from("allkeys-lru")]);
        assert_eq!(policy_of(&array).as_deref(), Some("allkeys-lru"));
        let mut map = fred::types::Map::new();
        map.insert("maxmemory-policy".into(), Value::from("noeviction"));
        assert_eq!(policy_of(&Value::Map(map)).as_deref(), Some("noeviction"));
        assert_eq!(policy_of(&Value::Array(vec![])), None);
        assert_eq!(policy_of(&Value::Null), None);
    }
}
