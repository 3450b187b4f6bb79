//! Per-shard counters, gauges and histograms, written by their shard and read
//! by the Prometheus exporter without locks.
//!
//! Every instrument here has exactly one writer: the shard that owns it. A
//! single writer needs no read-modify-write: `add` is a relaxed load and a
//! relaxed store, which compiles to plain moves on x86, so counting on the data
//! path costs what a plain integer costs. The exporter's thread reads each word
//! atomically and may see a value a few nanoseconds old, which is what a
//! scrape means anyway. Nothing allocates after `ShardMetrics::new`.
//!
//! Labels stay low-cardinality: `shard`, `transport`, `status`, `reason`,
//! `outcome`, `cause`, `kind`, and `node`, whose values are bounded by
//! `REDIS_NODES_PER_SHARD_MAX` (`RedisNodes`). See docs/operations.md for the reference.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::limits::REDIS_NODES_PER_SHARD_MAX;
use crate::wire::frame::{RejectReason, Status};

/// A monotonically increasing count with one writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Single-writer increment; see the module doc.
    #[inline]
    pub fn add(&self, amount: u64) {
        let value = self.0.load(Ordering::Relaxed);
        self.0.store(value.wrapping_add(amount), Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, with one writer.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in microseconds: log-spaced 1-2-5
/// from 10 µs to 1 s, as operators read them (the 5 ms SLO is a bound).
pub(crate) const LATENCY_BOUNDS_US: [u64; 16] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
];

/// Upper bounds of the batch-size buckets, in events.
pub(crate) const BATCH_BOUNDS_EVENTS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

const HISTOGRAM_BUCKETS_MAX: usize = 24;
const _: () =
    assert!(LATENCY_BOUNDS_US.len() < HISTOGRAM_BUCKETS_MAX && BATCH_BOUNDS_EVENTS.len() < HISTOGRAM_BUCKETS_MAX);

/// A fixed-bucket histogram with one writer. `N` bounds, plus the +Inf bucket.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    /// Non-cumulative counts per bucket; index N is +Inf, the rest unused.
    buckets: [Counter; HISTOGRAM_BUCKETS_MAX],
    sum: Counter,
    count: Counter,
}

impl<const N: usize> Histogram<N> {
    pub fn new(bounds: &'static [u64; N]) -> Histogram<N> {
        assert!(
            N < HISTOGRAM_BUCKETS_MAX,
            "bounds plus the +Inf bucket fit the bucket array"
        );
        assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]), "bounds increase");
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| Counter::default()),
            sum: Counter::default(),
            count: Counter::default(),
        }
    }

    #[inline]
    pub(crate) fn observe(&self, value: u64) {
        let index = self.bounds.partition_point(|&bound| bound < value);
        debug_assert!(index <= N);
        self.buckets[index].add(1);
        self.sum.add(value);
        self.count.add(1);
    }

    /// What the exporter shows: every bucket read once, so the +Inf bucket
    /// and the count cannot disagree however the writer races the read, and
    /// in the recorded integer unit, so the exporter can print bounds and sum
    /// as exact decimals (an `le` label is matched as a string: `0.005` must
    /// stay `0.005`).
    pub fn read(&self) -> HistogramReading {
        let mut cumulative = [0; HISTOGRAM_BUCKETS_MAX];
        let mut total: u64 = 0;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets).take(N + 1) {
            total = total.wrapping_add(bucket.get());
            *slot = total;
        }
        HistogramReading {
            bounds: self.bounds,
            cumulative,
            sum: self.sum.get(),
        }
    }
}

/// One read of a histogram (`Histogram::read`), whatever its bucket count.
pub struct HistogramReading {
    bounds: &'static [u64],
    /// Observations at or below each bound, then all of them (+Inf); the rest unused.
    cumulative: [u64; HISTOGRAM_BUCKETS_MAX],
    /// In the recorded unit, like the bounds.
    pub sum: u64,
}

impl HistogramReading {
    /// `(upper bound, observations at or below it)` per bucket, ending with
    /// `(None, count)`: the +Inf bucket.
    pub fn buckets(&self) -> impl Iterator<Item = (Option<u64>, u64)> + '_ {
        let bounds = self.bounds.iter().copied().map(Some).chain([None]);
        bounds.zip(self.cumulative.iter().copied())
    }

    pub fn count(&self) -> u64 {
        self.buckets().last().map_or(0, |(_, count)| count)
    }

    /// `(upper bound, observations in that bucket alone)`, over the same buckets as `buckets`.
    pub fn per_bucket(&self) -> impl Iterator<Item = (Option<u64>, u64)> + '_ {
        let mut below = 0;
        self.buckets().map(move |(bound, cumulative)| {
            let in_bucket = cumulative - below;
            below = cumulative;
            (bound, in_bucket)
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp = 0,
    Tcp = 1,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Udp, Transport::Tcp];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Where a dedup lookup was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupOutcome {
    OwnHit = 0,
    PeerHit = 1,
    InFlight = 2,
    Miss = 3,
}

impl LookupOutcome {
    pub const ALL: [LookupOutcome; 4] = [
        LookupOutcome::OwnHit,
        LookupOutcome::PeerHit,
        LookupOutcome::InFlight,
        LookupOutcome::Miss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LookupOutcome::OwnHit => "own_shard_hit",
            LookupOutcome::PeerHit => "other_shard_hit",
            LookupOutcome::InFlight => "in_flight",
            LookupOutcome::Miss => "miss",
        }
    }
}

/// Why a frame was answered RETRY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCause {
    Overload = 0,
    RedisDown = 1,
    RedisError = 2,
    InFlightCopy = 3,
    ShuttingDown = 4,
    /// Stored, but under `--durability replica` no replica confirmed the write in time.
    ReplicaUnconfirmed = 5,
}

impl RetryCause {
    pub const ALL: [RetryCause; 6] = [
        RetryCause::Overload,
        RetryCause::RedisDown,
        RetryCause::RedisError,
        RetryCause::InFlightCopy,
        RetryCause::ShuttingDown,
        RetryCause::ReplicaUnconfirmed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RetryCause::Overload => "overload",
            RetryCause::RedisDown => "redis_down",
            RetryCause::RedisError => "redis_error",
            RetryCause::InFlightCopy => "in_flight_copy",
            RetryCause::ShuttingDown => "shutting_down",
            RetryCause::ReplicaUnconfirmed => "replica_unconfirmed",
        }
    }
}

/// Why a Redis call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisErrorKind {
    Timeout = 0,
    Connection = 1,
    Script = 2,
    Abandoned = 3,
    /// The reply did not echo the call's nonce or had the wrong length.
    ReplyMismatch = 4,
    /// A Redis Cluster refused the call: `CLUSTERDOWN`, `TRYAGAIN` while its slot migrates,
    /// or more `MOVED`/`ASK` redirections than the client follows. (A redirection the client
    /// followed to an answer is no error.)
    Cluster = 5,
}

impl RedisErrorKind {
    pub const ALL: [RedisErrorKind; 6] = [
        RedisErrorKind::Timeout,
        RedisErrorKind::Connection,
        RedisErrorKind::Script,
        RedisErrorKind::Abandoned,
        RedisErrorKind::ReplyMismatch,
        RedisErrorKind::Cluster,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RedisErrorKind::Timeout => "timeout",
            RedisErrorKind::Connection => "connection",
            RedisErrorKind::Script => "script",
            RedisErrorKind::Abandoned => "abandoned_at_shutdown",
            RedisErrorKind::ReplyMismatch => "reply_mismatch",
            RedisErrorKind::Cluster => "cluster",
        }
    }
}

/// A redirection a Redis Cluster node answered a call with, which the client followed: the
/// `kind` of `redis_redirections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirection {
    /// The slot is served by another node: the client refreshes its slot map and resends.
    Moved = 0,
    /// The slot is being migrated and the key is already on the target: resent there once.
    Ask = 1,
}

impl Redirection {
    pub const ALL: [Redirection; 2] = [Redirection::Moved, Redirection::Ask];

    pub fn name(self) -> &'static str {
        match self {
            Redirection::Moved => "moved",
            Redirection::Ask => "ask",
        }
    }
}

/// What one shard counts for one Redis node.
#[derive(Debug)]
pub struct NodeMetrics {
    /// One script call to the node, success or failure.
    pub round_trip_us: Histogram<16>,
    /// Failed script calls to the node, by kind.
    pub errors: [Counter; RedisErrorKind::ALL.len()],
    /// Calls the node answered with a redirection, by kind.
    pub redirections: [Counter; Redirection::ALL.len()],
    /// `WAIT`s after a call to the node that fell short (`--durability replica`).
    pub wait_shortfalls: Counter,
}

impl Default for NodeMetrics {
    fn default() -> NodeMetrics {
        NodeMetrics {
            round_trip_us: Histogram::new(&LATENCY_BOUNDS_US),
            errors: Default::default(),
            redirections: Default::default(),
            wait_shortfalls: Counter::default(),
        }
    }
}

/// A node's row in a shard's `RedisNodes`: a small index, so that a call keeps it in a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRow(u8);

/// The Redis nodes one shard has made calls to, each with its `NodeMetrics`: the `node` label.
///
/// A node is named `host:port`, as the client knows it (the `--redis` url standalone, the slot
/// map on a cluster), and interned into a fixed table at first sight: its row is then found by
/// comparing names, without allocating; only the first sight allocates its name. At most
/// `REDIS_NODES_PER_SHARD_MAX` are named; calls to any further node count under
/// `node="other"`, and failures no node can be named for (a cluster batch abandoned at the drain
/// deadline, a call whose slot the client has no map for yet) under `node="unknown"`. Those two
/// rows are shown once they count something. One writer, the shard; the exporter reads a name
/// once its row is published (`named`, release/acquire).
#[derive(Debug)]
pub struct RedisNodes {
    names: [OnceLock<Box<str>>; REDIS_NODES_PER_SHARD_MAX],
    /// Names set so far: rows `0..named` are named nodes.
    named: AtomicUsize,
    /// The named rows, then `other`, then `unknown`.
    rows: [NodeMetrics; REDIS_NODES_PER_SHARD_MAX + 2],
    /// Whether `other` and `unknown` counted anything yet: they are shown from then on.
    spare_rows_used: [AtomicBool; 2],
}

impl Default for RedisNodes {
    fn default() -> RedisNodes {
        RedisNodes {
            names: std::array::from_fn(|_| OnceLock::new()),
            named: AtomicUsize::new(0),
            rows: std::array::from_fn(|_| NodeMetrics::default()),
            spare_rows_used: Default::default(),
        }
    }
}

impl RedisNodes {
    /// Calls to nodes past the first `REDIS_NODES_PER_SHARD_MAX`.
    pub const OTHER: NodeRow = NodeRow(REDIS_NODES_PER_SHARD_MAX as u8);
    /// Failures that no node can be named for.
    pub const UNKNOWN: NodeRow = NodeRow(REDIS_NODES_PER_SHARD_MAX as u8 + 1);

    /// The row of node `host:port`, named now if it is new and the table has room. A name that
    /// would need escaping in the exposition is no host name: it counts under `other`.
    pub fn row(&self, host: &str, port: u16) -> NodeRow {
        let named = self.named.load(Ordering::Relaxed);
        let known = self.names[..named]
            .iter()
            .position(|name| name.get().is_some_and(|name| names_node(name, host, port)));
        if let Some(index) = known {
            return NodeRow(index as u8);
        }
        if named == REDIS_NODES_PER_SHARD_MAX || host.contains(['"', '\\', '\n']) {
            return RedisNodes::OTHER;
        }
        let name = format!("{host}:{port}").into_boxed_str();
        assert!(self.names[named].set(name).is_ok(), "one writer names each row once");
        self.named.store(named + 1, Ordering::Release);
        NodeRow(named as u8)
    }

    /// The metrics of `row`; `other` and `unknown` are shown from their first use on.
    #[inline]
    pub fn at(&self, row: NodeRow) -> &NodeMetrics {
        if let Some(spare) = (row.0 as usize).checked_sub(REDIS_NODES_PER_SHARD_MAX) {
            if !self.spare_rows_used[spare].load(Ordering::Relaxed) {
                self.spare_rows_used[spare].store(true, Ordering::Relaxed);
            }
        }
        &self.rows[row.0 as usize]
    }

    /// The rows shown, in order: every named node, then `other` and `unknown` if used. Each
    /// comes with its index, which `row_at` takes back.
    pub fn shown(&self) -> impl Iterator<Item = (usize, &str)> + '_ {
        let named = self.named.load(Ordering::Acquire);
        let names = self.names[..named]
            .iter()
            .enumerate()
            .filter_map(|(index, name)| Some((index, &**name.get()?)));
        let spares = ["other", "unknown"]
            .into_iter()
            .enumerate()
            .filter(|&(spare, _)| self.spare_rows_used[spare].load(Ordering::Relaxed))
            .map(|(spare, name)| (REDIS_NODES_PER_SHARD_MAX + spare, name));
        names.chain(spares)
    }

    /// The metrics of a row `shown` listed.
    pub fn row_at(&self, index: usize) -> &NodeMetrics {
        &self.rows[index]
    }

    /// Named nodes so far.
    pub fn named_count(&self) -> usize {
        self.named.load(Ordering::Acquire)
    }

    /// Failed calls of one kind, over every node.
    pub fn errors_total(&self, kind: RedisErrorKind) -> u64 {
        self.rows.iter().map(|row| row.errors[kind as usize].get()).sum()
    }
}

/// Whether `name` is `host:port`, compared without building the text.
fn names_node(name: &str, host: &str, port: u16) -> bool {
    name.strip_prefix(host)
        .and_then(|rest| rest.strip_prefix(':'))
        .is_some_and(|text| text.parse::<u16>() == Ok(port))
}

/// Why Redis refused one event of a batch, from its error's code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventErrorReason {
    /// `WRONGTYPE`: the event's stream or marker key holds another type.
    WrongType = 0,
    /// `OOM`: Redis is at `maxmemory` and may not evict.
    OutOfMemory = 1,
    Other = 2,
}

impl EventErrorReason {
    pub const ALL: [EventErrorReason; 3] = [
        EventErrorReason::WrongType,
        EventErrorReason::OutOfMemory,
        EventErrorReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventErrorReason::WrongType => "wrong_type",
            EventErrorReason::OutOfMemory => "out_of_memory",
            EventErrorReason::Other => "other",
        }
    }

    /// The reason from a Redis error message's code (`WRONGTYPE ...`).
    pub(crate) fn of_message(message: &str) -> EventErrorReason {
        if message.starts_with("WRONGTYPE") {
            EventErrorReason::WrongType
        } else if message.starts_with("OOM") {
            EventErrorReason::OutOfMemory
        } else {
            EventErrorReason::Other
        }
    }
}

/// Why a TCP connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed = 0,
    Unparseable = 1,
    WriteFailed = 2,
    AtLimit = 3,
    Shutdown = 4,
    /// Closed at accept: its source already held `tcp_connections_per_source`.
    SourceLimit = 5,
    /// Sent nothing for `tcp_idle_timeout_ms`.
    Idle = 6,
    /// Did not read its acks for `tcp_write_timeout_ms`.
    SlowReader = 7,
    /// Sent a frame whose crc32c does not match: its framing can no longer be trusted.
    Corrupt = 8,
}

impl CloseReason {
    pub const ALL: [CloseReason; 9] = [
        CloseReason::PeerClosed,
        CloseReason::Unparseable,
        CloseReason::WriteFailed,
        CloseReason::AtLimit,
        CloseReason::Shutdown,
        CloseReason::SourceLimit,
        CloseReason::Idle,
        CloseReason::SlowReader,
        CloseReason::Corrupt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Unparseable => "unparseable",
            CloseReason::WriteFailed => "write_failed",
            CloseReason::AtLimit => "at_limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SourceLimit => "source_limit",
            CloseReason::Idle => "idle",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::Corrupt => "corrupt",
        }
    }
}

const TRANSPORTS: usize = Transport::ALL.len();

/// Everything one shard counts. `[transport]`, `[transport][status]`, ... are
/// indexed by the enums' discriminants.
#[derive(Debug)]
pub struct ShardMetrics {
    pub frames_received: [Counter; TRANSPORTS],
    pub bytes_received: [Counter; TRANSPORTS],
    pub acks_sent: [[Counter; 4]; TRANSPORTS],
    pub frames_rejected: [[Counter; 4]; TRANSPORTS],
    pub unparseable: [Counter; TRANSPORTS],
    /// Whole frames whose crc32c did not match: never answered (protocol revision 2).
    pub frames_corrupt: [Counter; TRANSPORTS],
    /// Errors the UDP socket returned on receive (ICMP errors of earlier replies, mostly).
    pub udp_receive_errors: Counter,
    /// Frames dropped unanswered because their source was over its rate
    /// (`limiter.rs`; UDP only, TCP is bounded by its window).
    pub frames_limited: [Counter; TRANSPORTS],
    pub dedup_lookups: [Counter; 4],
    pub dedup_cache_events: Gauge,
    pub dedup_cache_evictions: Counter,
    pub batch_events: Histogram<11>,
    /// Script calls' round trips, errors, redirections and `WAIT` shortfalls, by Redis node.
    pub redis_by_node: RedisNodes,
    /// Script calls made: one per batch on a standalone Redis, one per partition group of a
    /// batch on a Redis Cluster.
    pub redis_calls: Counter,
    /// Redis nodes the shard's client is connected to: 1 standalone, the masters on a cluster.
    pub redis_nodes: Gauge,
    /// Events Redis refused one by one inside a call that succeeded.
    pub redis_event_errors: [Counter; EventErrorReason::ALL.len()],
    pub redis_reconnects: Counter,
    pub redis_up: Gauge,
    pub events_in_flight: Gauge,
    pub retries: [Counter; RetryCause::ALL.len()],
    pub tcp_connections_open: Gauge,
    pub tcp_connections_accepted: Counter,
    pub tcp_connections_closed: [Counter; CloseReason::ALL.len()],
    pub intake_to_ack_us: [Histogram<16>; TRANSPORTS],
    pub reply_send_errors: Counter,
    /// The UDP socket's inode, to find its kernel drop count in /proc/net/udp.
    pub udp_socket_inode: AtomicU64,
}

impl Default for ShardMetrics {
    fn default() -> ShardMetrics {
        ShardMetrics {
            frames_received: Default::default(),
            bytes_received: Default::default(),
            acks_sent: Default::default(),
            frames_rejected: Default::default(),
            unparseable: Default::default(),
            frames_corrupt: Default::default(),
            udp_receive_errors: Counter::default(),
            frames_limited: Default::default(),
            dedup_lookups: Default::default(),
            dedup_cache_events: Gauge::default(),
            dedup_cache_evictions: Counter::default(),
            batch_events: Histogram::new(&BATCH_BOUNDS_EVENTS),
            redis_by_node: RedisNodes::default(),
            redis_calls: Counter::default(),
            redis_nodes: Gauge::default(),
            redis_event_errors: Default::default(),
            redis_reconnects: Counter::default(),
            redis_up: Gauge::default(),
            events_in_flight: Gauge::default(),
            retries: Default::default(),
            tcp_connections_open: Gauge::default(),
            tcp_connections_accepted: Counter::default(),
            tcp_connections_closed: Default::default(),
            intake_to_ack_us: [Histogram::new(&LATENCY_BOUNDS_US), Histogram::new(&LATENCY_BOUNDS_US)],
            reply_send_errors: Counter::default(),
            udp_socket_inode: AtomicU64::new(0),
        }
    }
}

impl ShardMetrics {
    #[inline]
    pub fn ack(&self, transport: Transport, status: Status, count: u64) {
        self.acks_sent[transport as usize][status as usize].add(count);
    }

    #[inline]
    pub fn reject(&self, transport: Transport, reason: RejectReason) {
        self.frames_rejected[transport as usize][reason as usize].add(1);
    }

    #[inline]
    pub fn retry(&self, cause: RetryCause) {
        self.retries[cause as usize].add(1);
    }

    #[inline]
    pub fn lookup(&self, outcome: LookupOutcome) {
        self.dedup_lookups[outcome as usize].add(1);
    }

    pub fn close(&self, reason: CloseReason) {
        self.tcp_connections_closed[reason as usize].add(1);
    }

    /// Acks of one status over both transports.
    pub fn acks(&self, status: Status) -> u64 {
        Transport::ALL
            .iter()
            .map(|&transport| self.acks_sent[transport as usize][status as usize].get())
            .sum()
    }

    pub fn frames(&self) -> u64 {
        self.frames_received.iter().map(Counter::get).sum()
    }

    pub(crate) fn unparseable_total(&self) -> u64 {
        self.unparseable.iter().map(Counter::get).sum()
    }

    pub fn retries_by(&self, cause: RetryCause) -> u64 {
        self.retries[cause as usize].get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values land in the first bucket whose bound is >= the value; per-bucket counts (not
    /// cumulative) end at +Inf.
    #[test]
    fn histogram_buckets() {
        let histogram = Histogram::new(&LATENCY_BOUNDS_US);
        for value in [1, 10, 11, 5_000, 5_001, 2_000_000] {
            histogram.observe(value);
        }
        let reading = histogram.read();
        let per_bucket: Vec<(Option<u64>, u64)> = reading.per_bucket().collect();
        assert_eq!(reading.count(), 6);
        assert_eq!(per_bucket[0], (Some(10), 2));
        assert_eq!(per_bucket[1].1, 1);
        let cumulative_at = |bound_us: u64| -> u64 {
            per_bucket
                .iter()
                .take_while(|(bound, _)| bound.is_some_and(|bound| bound <= bound_us))
                .map(|(_, count)| count)
                .sum()
        };
        assert_eq!(cumulative_at(5_000), 4);
        assert_eq!(cumulative_at(1_000_000), 5);
        assert_eq!(per_bucket.last().unwrap(), &(None, 1));
        assert_eq!(per_bucket.iter().map(|(_, count)| count).sum::<u64>(), reading.count());
        assert_eq!(reading.sum, 2_010_023);
    }

    /// A reading is cumulative, ends at +Inf with the count, and keeps the recorded unit.
    #[test]
    fn histogram_reading() {
        let histogram = Histogram::new(&BATCH_BOUNDS_EVENTS);
        for value in [1, 1, 3, 2000] {
            histogram.observe(value);
        }
        let reading = histogram.read();
        let buckets: Vec<_> = reading.buckets().collect();
        assert_eq!(buckets.len(), BATCH_BOUNDS_EVENTS.len() + 1);
        assert_eq!(&buckets[..3], &[(Some(1), 2), (Some(2), 2), (Some(4), 3)]);
        assert_eq!(buckets[BATCH_BOUNDS_EVENTS.len() - 1], (Some(1024), 3));
        assert_eq!(buckets.last(), Some(&(None, 4)));
        assert_eq!(reading.count(), 4);
        assert_eq!(reading.sum, 2005);
        assert_eq!(Histogram::new(&LATENCY_BOUNDS_US).read().count(), 0);
    }

    /// A node is named once, found again by its name, and past the bound folds into `other`;
    /// `other` and `unknown` are shown only once used.
    #[test]
    fn nodes_are_interned_up_to_the_bound() {
        let nodes = RedisNodes::default();
        assert_eq!(nodes.shown().count(), 0);
        let first = nodes.row("10.0.0.1", 7000);
        assert_eq!(nodes.row("10.0.0.2", 7000), NodeRow(1));
        assert_eq!(nodes.row("10.0.0.1", 7000), first);
        assert_eq!(
            nodes.row("10.0.0.1", 700),
            NodeRow(2),
            "a port that is a prefix of another"
        );
        assert_eq!(nodes.row("bad\"host", 1), RedisNodes::OTHER);
        nodes.at(first).errors[RedisErrorKind::Timeout as usize].add(2);
        let shown: Vec<(usize, &str)> = nodes.shown().collect();
        assert_eq!(shown, [(0, "10.0.0.1:7000"), (1, "10.0.0.2:7000"), (2, "10.0.0.1:700")]);
        for port in 0..REDIS_NODES_PER_SHARD_MAX as u16 {
            nodes.row("10.0.1.1", port);
        }
        assert_eq!(nodes.named_count(), REDIS_NODES_PER_SHARD_MAX);
        assert_eq!(nodes.row("10.0.0.9", 7000), RedisNodes::OTHER);
        assert_eq!(nodes.row("10.0.0.2", 7000), NodeRow(1), "named nodes keep their rows");
        nodes.at(RedisNodes::OTHER).errors[RedisErrorKind::Timeout as usize].add(1);
        let spares: Vec<&str> = nodes
            .shown()
            .skip(REDIS_NODES_PER_SHARD_MAX)
            .map(|(_, name)| name)
            .collect();
        assert_eq!(spares, ["other"]);
        nodes.at(RedisNodes::UNKNOWN).wait_shortfalls.add(1);
        assert_eq!(nodes.shown().count(), REDIS_NODES_PER_SHARD_MAX + 2);
        assert_eq!(nodes.errors_total(RedisErrorKind::Timeout), 3);
    }

    /// Enum discriminants index the arrays: every variant has its own slot.
    #[test]
    fn label_indexes_are_dense() {
        for (index, status) in Status::ALL.iter().enumerate() {
            assert_eq!(*status as usize, index);
        }
        for (index, reason) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
        }
        for (index, cause) in RetryCause::ALL.iter().enumerate() {
            assert_eq!(*cause as usize, index);
        }
        for (index, outcome) in LookupOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index);
        }
        for (index, reason) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
        }
        for (index, kind) in RedisErrorKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index);
        }
        for (index, reason) in EventErrorReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
        }
        for (index, kind) in Redirection::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index);
        }
    }
}
