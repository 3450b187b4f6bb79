//! shardgate: a thread-per-core io_uring server that takes game players'
//! action events over UDP and TCP, drops duplicates, stores each event exactly
//! once in Redis, and acks the client only after Redis confirmed the write.
//!
//! # The data path: socket -> frame -> dedup -> batch -> redis -> ack
//! Follow one event:
//! 1. **socket** (`udp.rs`, `tcp.rs`): every shard binds the same UDP and TCP
//!    address with SO_REUSEPORT; the kernel spreads clients over shards.
//! 2. **frame** (`frame.rs`): `check` finds a frame's length from its header;
//!    `parse` verifies the crc and flags. Bad frames are REJECTED, bytes that
//!    are not a frame get no answer (UDP) or close the connection (TCP).
//! 3. **dedup** (`shard.rs` `admit`, `dedup.rs`): an id this shard or another
//!    shard confirmed stored is answered DUPLICATE at once; a copy of an id
//!    still in flight, or any frame while Redis is down or the shard is at its
//!    bound, gets RETRY at once.
//! 4. **batch** (`batch.rs`, `script.rs`): the event joins the shard's open
//!    batch, which is sent when full or after a short linger.
//! 5. **redis** (`store.rs`): one `EVALSHA` per batch marks and appends each
//!    new event atomically, and says per event whether it was new.
//! 6. **ack** (`shard.rs` `complete`/`answer`, `reply.rs`): confirmed ids go
//!    into the cache, then every copy gets its answer: ACCEPTED, DUPLICATE, or
//!    RETRY if the call failed.
//!
//! # The modules
//! - `config`: command line and TOML file -> a checked `Config`.
//! - `limits`: every bound and why it has its value.
//! - `placement`, `cpuset`: which cores, pinned or fenced; what the cgroup allows.
//! - `server`: start the shards, take signals, drain, write histograms.
//! - `sdnotify`: systemd readiness and watchdog pings.
//! - `shard`: one core's state and the fate of each frame.
//! - `udp`, `tcp`: the two transports.
//! - `source`, `limiter`, `tcp_sources`: the abuse limits: who a source is, its UDP token
//!   bucket, its TCP connection count.
//! - `frame`, `auth`: the wire codec and the optional auth tag (shared with the client crate).
//! - `secrets`: the auth secret files, checked and loaded at start.
//! - `stream`: splits a TCP connection's buffered bytes into whole frames.
//! - `dedup`: the per-shard cache of stored ids, single writer, lock-free readers.
//! - `batch`, `script`, `store`: the batch, the Lua script and its blob, the Redis client.
//! - `reply`: where answers go and how UDP answers are coalesced.
//! - `latency`, `snapshot`: HDR histograms, written on shutdown and on SIGUSR1.
//! - `metrics`, `exporter`: per-shard single-writer counters, and the Prometheus endpoint.
//! - `logging`: text or JSON log lines.
//! - `notify`: shard-local wake-ups.
//! - `sys`: the one small module with `unsafe`.

pub mod auth;
pub mod batch;
pub mod config;
pub mod cpuset;
pub mod dedup;
pub mod exporter;
pub mod frame;
pub mod latency;
pub mod limiter;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod placement;
pub mod reply;
pub mod script;
pub mod sdnotify;
pub mod secrets;
pub mod server;
pub mod shard;
pub mod snapshot;
pub mod source;
pub mod store;
pub mod stream;
pub mod sys;
pub mod tcp;
pub mod tcp_sources;
pub mod udp;
