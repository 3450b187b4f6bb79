//! Every bound in shardgate, in one place, with the reason for its value.
//!
//! A production server that takes bursts from 100k players must never grow
//! without limit: each queue, batch, buffer and connection count below is
//! fixed at shard start. Operator-tunable values have a default here and a
//! `*_MAX`/`*_MIN` range that `config.rs` enforces; the rest are constants.
//! Bounds that depend on each other are tied together with `const` asserts at
//! the bottom, so a change that breaks one relation fails to compile.

use crate::wire::frame::{ACK_BYTES, FRAME_BYTES_MAX, FRAME_BYTES_MIN, PAYLOAD_BYTES_MAX};

/// Shards (cores) one process may run. Far above any host we deploy on; the
/// bound exists so per-shard tables sized by it stay small.
pub(crate) const SHARDS_MAX: usize = 256;

/// Events in one script call. A bigger batch spreads fred's ~4 µs per command
/// and Redis's per-call overhead further, but a longer script blocks Redis for
/// other clients: 256 events run in well under a millisecond.
pub(crate) const BATCH_EVENTS_DEFAULT: usize = 256;
pub const BATCH_EVENTS_MAX: usize = 1024;

/// The pace of a shard's script calls: a call starts at most this long after
/// the one before it, unless its batch is full, and an event waits at most
/// this long in the open batch. After a quiet period the first event is sent
/// at once. A script call costs Redis about 28 µs on top of 6 µs per event
/// (docs/design.md, "Redis CPU"), so under load a longer pace means larger
/// batches and less Redis CPU per event; 1 ms is a fifth of the 5 ms p99.9
/// budget and gathers 20 events per call at 20k events/s per shard.
pub(crate) const BATCH_LINGER_US_DEFAULT: u64 = 1_000;
pub(crate) const BATCH_LINGER_US_MAX: u64 = 100_000;

/// Script calls one shard keeps in flight on its connection. Auto-pipelining
/// sends the next batch while earlier ones run; more than a few only queue
/// inside Redis, which runs scripts one at a time.
pub(crate) const BATCHES_IN_FLIGHT_DEFAULT: usize = 8;
pub const BATCHES_IN_FLIGHT_MAX: usize = 64;

/// Longest encoded record of one event in a batch blob: six length-prefixed
/// decimal fields (partition, player, seq, type, ts, recv_us) and a u16
/// length-prefixed payload. See `script.rs` for the layout.
pub const BATCH_RECORD_BYTES_MAX: usize = (1 + 4) + (1 + 20) * 2 + (1 + 5) + (1 + 20) * 2 + 2 + PAYLOAD_BYTES_MAX;

/// Longest `--prefix`: every key starts with it, and the cluster key bounds below count it.
pub(crate) const PREFIX_BYTES_MAX: usize = 64;

/// Longest marker key `<prefix>:{<p>}:seen:<player>:<seq>` and stream key
/// `<prefix>:{<p>}:events` (`redis::groups`): a prefix, a partition of at most four digits,
/// and two u64s of at most 20 digits.
pub(crate) const MARKER_KEY_BYTES_MAX: usize = PREFIX_BYTES_MAX + ":{".len() + 4 + "}:seen:".len() + 20 + 1 + 20;
pub(crate) const STREAM_KEY_BYTES_MAX: usize = PREFIX_BYTES_MAX + ":{".len() + 4 + "}:events".len();

/// On a Redis Cluster a batch is sent as one script call per partition group (every key of
/// a call under one hash tag, `redis::groups`). At most this many of one batch's group calls
/// are in flight at once, one per lane of its caller (`pipeline/sink.rs`; a lane is a task
/// spawned at start with a call's future, ~20 KB, so fewer lanes when there are fewer
/// partitions); the rest go as these complete. 8 sends a batch over the default 16
/// partitions in at most two waves, and a shard's calls in flight stay at most
/// `batches_in_flight_max` × 8, which fred's command queue is sized for (`store.rs`).
pub(crate) const CLUSTER_GROUP_CALLS_PER_BATCH: usize = 8;

/// Redis nodes one shard's metrics name (`node` label, `telemetry::metrics::RedisNodes`);
/// further nodes fold into `node="other"`. Each named node adds 28 series per shard to the
/// exposition (a 16-bucket round-trip histogram, 6 error kinds, 2 redirection kinds, WAIT
/// shortfalls), so this bounds a scrape's size and Prometheus's series however the cluster
/// changes. A shard's client talks only to masters, and the capacity model asks for a
/// handful (3 masters run the seed's 120 000 frames/s at 12% each, docs/operations.md);
/// 64 leaves room for a cluster grown tenfold plus the old addresses of failed-over or
/// replaced masters, which stay named for the life of the process. A row is ~300 bytes:
/// 20 KiB per shard.
pub(crate) const REDIS_NODES_PER_SHARD_MAX: usize = 64;

/// Partitions (streams) per prefix. 1024 keeps the partition field of a record
/// to four decimal digits.
pub(crate) const PARTITIONS_DEFAULT: u32 = 16;
pub const PARTITIONS_MAX: u32 = 1024;

/// Dedup window: Redis markers live this long, and with auth on it bounds how
/// old a frame may be.
pub(crate) const DEDUP_WINDOW_SECS_DEFAULT: u64 = 600;
pub(crate) const DEDUP_WINDOW_SECS_MAX: u64 = 7 * 24 * 3600;

/// Auth secret files held at once: the current secret, and during a rotation
/// the next one. A third would only widen the set of keys that forge a tag.
pub(crate) const AUTH_SECRET_FILES_MAX: usize = 2;
/// A secret shorter than 16 bytes (128 bits) could be guessed offline from
/// one captured tag; longer than 1 KiB is a wrong file, not a secret.
pub(crate) const AUTH_SECRET_BYTES_MIN: usize = 16;
pub(crate) const AUTH_SECRET_BYTES_MAX: usize = 1024;

/// Entries in each shard's dedup cache. 2^20 requested rounds up to 1,835,008
/// ids in 32 MiB per shard (see `dedup::table_bytes`), over 30 s of a 50k/s
/// shard: retries come within seconds, and anything older
/// still meets the Redis marker, which has the final say.
pub(crate) const DEDUP_CAPACITY_DEFAULT: usize = 1 << 20;
pub(crate) const DEDUP_CAPACITY_MIN: usize = 64;
pub(crate) const DEDUP_CAPACITY_MAX: usize = 1 << 30;

/// Timeout of one script call. Past it the events get RETRY; the call may still
/// run later, which is safe because the script is idempotent per event id.
pub(crate) const REDIS_TIMEOUT_MS_DEFAULT: u64 = 1_000;
pub(crate) const REDIS_TIMEOUT_MS_MAX: u64 = 60_000;

/// How long shutdown waits for in-flight batches before answering RETRY.
pub(crate) const DRAIN_TIMEOUT_MS_DEFAULT: u64 = 5_000;
pub(crate) const DRAIN_TIMEOUT_MS_MAX: u64 = 60_000;

/// Largest UDP datagram read. 64 KiB is the IPv4 maximum, so nothing is cut.
pub const DATAGRAM_BYTES_MAX: usize = 65_536;

/// Datagrams one `recvmmsg` reads (`sys::DatagramBatch`). A system call costs
/// microseconds in a VM, so a wake-up that finds several datagrams reads them
/// in one; 16 slots of `DATAGRAM_BYTES_MAX` are 1 MiB per shard, allocated at
/// start. More slots would rarely fill: the shard wakes every few datagrams.
pub const RECEIVE_BATCH_DATAGRAMS: usize = 16;

/// Largest reply datagram of coalesced acks: under a typical 1500-byte MTU so
/// a reply is never fragmented.
pub(crate) const REPLY_DATAGRAM_BYTES_MAX: usize = 1_400;
pub const REPLY_ACKS_MAX: usize = REPLY_DATAGRAM_BYTES_MAX / ACK_BYTES;

/// Destinations with an open reply at once (`reply::ReplyBook`): a batch or a
/// `recvmmsg` holds events of a few sources interleaved. 16 replies of
/// `REPLY_DATAGRAM_BYTES_MAX` are 22 KiB, held by one answering task.
pub const REPLY_BOOK_DESTINATIONS: usize = 16;

/// Copies of ids in flight that one shard holds until the original's call
/// completes, instead of answering RETRY (`shard.rs`). A client resends only
/// after its own timeout, so few wait at once: at 50 000 frames/s with 30%
/// copies, about 150 copies a second met their original in flight, a handful
/// at a time. Each holds an id, a route and a time (about 64 bytes); past the
/// bound a copy gets RETRY, as every copy did before.
pub const HELD_COPIES_MAX: usize = 1_024;

/// Kernel socket buffers for the UDP socket: a burst of 120k/s for 20 ms of
/// executor stall is ~2400 frames, ~250 KiB; 4 MiB leaves room for much worse.
pub(crate) const UDP_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// TCP connections per shard. A game server forwards for many players over a
/// few connections; thousands of direct clients is not a shape we serve.
pub(crate) const TCP_CONNECTIONS_PER_SHARD_DEFAULT: usize = 1_024;
pub(crate) const TCP_CONNECTIONS_PER_SHARD_MAX: usize = 65_536;

// Abuse limits (issue 6; the table "Abuse limits" in docs/design.md). All are
// per shard; a "source" is an IP address, or an IPv6 /64 (`source.rs`).

/// TCP connections one source may hold on a shard; more are closed at accept.
/// A player's client uses one, a game server relays for many players over a
/// few; 64 is far above both, and one host takes at most 1/16 of the default
/// 1024 slots. A connection costs ~100 KiB of buffers, so this also bounds
/// what one host can make a shard hold.
pub(crate) const TCP_CONNECTIONS_PER_SOURCE_DEFAULT: usize = 64;

/// A TCP connection that sends nothing for this long is closed (reason
/// `idle`). Clients and relays send steadily while in play; a silent
/// connection only holds a slot and its buffers (a connect-and-wait flood
/// would hold them all). A client that was closed reconnects; nothing is lost,
/// since every frame it sent was answered long before (redis_timeout_ms).
pub(crate) const TCP_IDLE_TIMEOUT_MS_DEFAULT: u64 = 30_000;
pub(crate) const TCP_IDLE_TIMEOUT_MS_MIN: u64 = 100;
pub(crate) const TCP_IDLE_TIMEOUT_MS_MAX: u64 = 3_600_000;

/// A TCP peer whose acks cannot be written for this long (it does not read
/// them) is disconnected (reason `slow_reader`) and the acks owed to it are
/// dropped; its events stay stored, and its resends get DUPLICATE. Until then
/// it holds at most its outbox (below) and its kernel send buffer, because the
/// shard stops reading from it at TCP_UNACKED_FRAMES_MAX.
pub(crate) const TCP_WRITE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
pub(crate) const TCP_WRITE_TIMEOUT_MS_MIN: u64 = 100;
pub(crate) const TCP_WRITE_TIMEOUT_MS_MAX: u64 = 600_000;

/// Kernel send buffer of an accepted connection (SO_SNDBUF; the kernel
/// doubles it). Acks for all frames a connection may have unanswered fit in
/// it, so a reading peer never waits on it, while a peer that stops reading
/// pins 128 KiB of kernel memory instead of autotuning's 4 MiB (tcp_wmem).
pub(crate) const TCP_SEND_BUFFER_BYTES: usize = 64 * 1024;

/// Frames per second one source may have a shard take, and how many it may
/// send at once (the token bucket of `limiter.rs`); frames past it get no
/// answer. A player sends a few to a few tens a second, so 5000/s leaves room
/// for hundreds of players behind one NAT, while one source takes at most a
/// fifth of a production shard (25k+/s) and cannot crowd out the rest. The
/// burst, 2 s at that rate, absorbs a client resending its backlog after a
/// network hiccup.
pub(crate) const UDP_SOURCE_FRAMES_PER_SEC_DEFAULT: u64 = 5_000;
pub(crate) const UDP_SOURCE_FRAMES_PER_SEC_MAX: u64 = 10_000_000;
pub(crate) const UDP_SOURCE_BURST_FRAMES_DEFAULT: u64 = 10_000;
pub(crate) const UDP_SOURCE_BURST_FRAMES_MAX: u64 = 1_000_000;

/// Sources whose buckets one shard keeps (32 bytes each: 2 MiB by default),
/// in sets of UDP_SOURCE_TABLE_WAYS. Past that, the fullest bucket of a set is
/// reused, which only ever resets a source to a full bucket (`limiter.rs`).
/// 65536 sources active within two seconds on one shard is far more clients
/// than one shard serves.
pub(crate) const UDP_SOURCE_TABLE_ENTRIES_DEFAULT: usize = 65_536;
pub(crate) const UDP_SOURCE_TABLE_ENTRIES_MIN: usize = 64;
pub(crate) const UDP_SOURCE_TABLE_ENTRIES_MAX: usize = 1 << 22;
pub(crate) const UDP_SOURCE_TABLE_WAYS: usize = 8;

/// TCP read buffer per connection: a few maximum frames, so a read that ends
/// mid-frame always leaves room to complete it.
pub const TCP_READ_BUFFER_BYTES: usize = 16 * 1024;

/// Frames a TCP connection may have unanswered before the shard stops reading
/// from it, which pushes back on the sender through TCP's own window. One read
/// may add up to a buffer's worth of frames past the bound, so the outbox is
/// sized for both and can never overflow: 40 KiB per connection.
pub(crate) const TCP_UNACKED_FRAMES_MAX: usize = 1_024;
pub(crate) const TCP_OUTBOX_BYTES: usize =
    (TCP_UNACKED_FRAMES_MAX + TCP_READ_BUFFER_BYTES / FRAME_BYTES_MIN) * ACK_BYTES;

/// Longest stretch one task may run before the shard's executor polls io_uring
/// and its timers again. Under a steady flood a socket is never empty, so the
/// receive loop would never wait and would starve the Redis connection and
/// the linger timer; it yields once this much time has passed. 250 µs is a
/// small share of the 5 ms p99.9 budget. (glommio's default is 100 ms.)
pub(crate) const PREEMPT_TIMER_US: u64 = 250;

/// Idle spinning before a shard sleeps. Off by default: on a shared host a
/// spinning shard takes CPU from Redis and everything else. On a dedicated
/// core, 50-200 µs saves a wake-up (tens of µs) per quiet-to-busy edge.
pub(crate) const SPIN_BEFORE_PARK_US_MAX: u64 = 10_000;

/// How often shard 0 counts the sockets of the UDP group (its own process's
/// and, during a rolling restart, the other's) to re-size the spreading
/// program. A count reads /proc/net/udp, ~100 µs on shard 0 however few
/// sockets there are, so once a second; until a change is seen, datagrams are
/// still delivered, only spread less evenly (`sys.rs`).
pub(crate) const UDP_GROUP_RECOUNT_MS: u64 = 1_000;

/// On a cluster, how often a shard compares the masters in its client's slot map with the
/// ones it last saw, while calls are failing and for `CLUSTER_MASTERS_WATCH_MS` after the
/// last failure: a failover or a reshard shows as failed calls first, and the client learns
/// the new masters within a few seconds of it. Each look copies the slot map (16 384 slots
/// in a few ranges), so at most once a second, and never on a quiet, healthy shard.
pub(crate) const CLUSTER_MASTERS_CHECK_MS: u64 = 1_000;
pub(crate) const CLUSTER_MASTERS_WATCH_MS: u64 = 30_000;

/// How often each shard looks at the process-wide shutdown flag.
pub(crate) const SHUTDOWN_POLL_MS: u64 = 5;

/// HDR histograms record 1 µs .. 60 s with 3 significant digits.
pub const HISTOGRAM_HIGHEST_US: u64 = 60_000_000;
pub const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

const _: () = assert!(BATCH_EVENTS_DEFAULT <= BATCH_EVENTS_MAX);
const _: () = assert!(BATCHES_IN_FLIGHT_DEFAULT <= BATCHES_IN_FLIGHT_MAX);
const _: () = assert!(PARTITIONS_DEFAULT <= PARTITIONS_MAX);
const _: () = assert!(DEDUP_CAPACITY_MIN <= DEDUP_CAPACITY_DEFAULT && DEDUP_CAPACITY_DEFAULT <= DEDUP_CAPACITY_MAX);
// The partition field is written with at most four digits (the key bounds count four too).
const _: () = assert!(PARTITIONS_MAX <= 9_999);
// A node's row index fits the u8 a call keeps it in, with the two rows `other` and `unknown`.
const _: () = assert!(REDIS_NODES_PER_SHARD_MAX >= 1 && REDIS_NODES_PER_SHARD_MAX + 2 <= u8::MAX as usize);
// A group call carries at least one event; a batch has at most one group per event.
const _: () = assert!(CLUSTER_GROUP_CALLS_PER_BATCH >= 1 && CLUSTER_GROUP_CALLS_PER_BATCH <= BATCH_EVENTS_MAX);
// The payload length is written as a u16.
const _: () = assert!(PAYLOAD_BYTES_MAX <= u16::MAX as usize);
// A whole frame always fits a read buffer, so a TCP stream can always make progress.
const _: () = assert!(TCP_READ_BUFFER_BYTES >= 2 * FRAME_BYTES_MAX);
// A whole frame always fits a datagram buffer.
const _: () = assert!(DATAGRAM_BYTES_MAX >= FRAME_BYTES_MAX);
// One reply datagram holds at least one ack.
const _: () = assert!(REPLY_ACKS_MAX >= 1);
// An in-flight entry per event held in every open or sent batch.
const _: () = assert!(BATCH_EVENTS_MAX * BATCHES_IN_FLIGHT_MAX <= 1 << 20);
// The per-source caps fit within the shard's.
const _: () = assert!(TCP_CONNECTIONS_PER_SOURCE_DEFAULT <= TCP_CONNECTIONS_PER_SHARD_DEFAULT);
const _: () = assert!(
    TCP_IDLE_TIMEOUT_MS_MIN <= TCP_IDLE_TIMEOUT_MS_DEFAULT && TCP_IDLE_TIMEOUT_MS_DEFAULT <= TCP_IDLE_TIMEOUT_MS_MAX
);
const _: () = assert!(
    TCP_WRITE_TIMEOUT_MS_MIN <= TCP_WRITE_TIMEOUT_MS_DEFAULT
        && TCP_WRITE_TIMEOUT_MS_DEFAULT <= TCP_WRITE_TIMEOUT_MS_MAX
);
// The acks of every frame a connection may have unanswered fit its kernel send buffer.
const _: () = assert!(TCP_SEND_BUFFER_BYTES >= TCP_OUTBOX_BYTES);
const _: () = assert!(UDP_SOURCE_FRAMES_PER_SEC_DEFAULT <= UDP_SOURCE_FRAMES_PER_SEC_MAX);
const _: () = assert!(UDP_SOURCE_BURST_FRAMES_DEFAULT <= UDP_SOURCE_BURST_FRAMES_MAX);
// A bucket's tolerance, one interval (at most 1 s) times the burst, fits the u64 nanoseconds it is kept in.
const _: () = assert!(UDP_SOURCE_BURST_FRAMES_MAX.checked_mul(1_000_000_000).is_some());
// The table is whole sets of a power-of-two ways.
const _: () =
    assert!(UDP_SOURCE_TABLE_WAYS.is_power_of_two() && UDP_SOURCE_TABLE_ENTRIES_MIN % UDP_SOURCE_TABLE_WAYS == 0);
const _: () = assert!(
    UDP_SOURCE_TABLE_ENTRIES_MIN <= UDP_SOURCE_TABLE_ENTRIES_DEFAULT
        && UDP_SOURCE_TABLE_ENTRIES_DEFAULT <= UDP_SOURCE_TABLE_ENTRIES_MAX
);
