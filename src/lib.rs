//! shardgate: a thread-per-core io_uring server that takes game players'
//! action events over UDP and TCP, drops duplicates, stores each event exactly
//! once in Redis, and acks the client only after Redis confirmed the write.
//!
//! # The layers
//! Imports point one way, down this list; nothing imports a layer above it.
//!
//! ```text
//! host        config, placement, cpuset, server start/drain/stop, sd_notify, secret files
//!  └ intake    udp, tcp, per-source limits, the ack sink that writes answers back
//!     └ pipeline  admission, dedup cache, batch, linger -> send -> complete -> answer
//!        └ redis     the Lua script and its blob, the store: a batch in, outcomes out
//!           └ telemetry  metrics, the exporter, HDR histograms, snapshots, logs
//!              └ limits, sys   every bound and why; the one module with `unsafe`
//!                 └ wire       the codec (crate `shardgate-proto`): frames, auth tag, stream
//! ```
//!
//! - The pipeline never imports intake: it answers through [`pipeline::answer::AckSink`] and
//!   [`pipeline::answer::StreamAcks`], which intake implements.
//! - The pipeline, redis and telemetry never see the command line's `Config`: `host` builds
//!   each one's settings ([`pipeline::Settings`], [`redis::store::StoreSettings`],
//!   [`intake::Settings`]).
//! - `tests/layers.rs` checks these rules on the source.
//!
//! # The data path: socket -> frame -> dedup -> batch -> redis -> ack
//! Follow one event:
//! 1. **socket** (`intake/udp.rs`, `intake/tcp.rs`): every shard binds the same UDP and TCP
//!    address with SO_REUSEPORT; the kernel spreads clients over shards.
//! 2. **frame** (`wire::frame`): `check` finds a frame's length from its header; `parse`
//!    verifies the crc and flags. Bad frames are REJECTED, bytes that are not a frame get no
//!    answer (UDP) or close the connection (TCP).
//! 3. **dedup** (`pipeline/shard.rs` `admit`, `pipeline/dedup.rs`): an id this shard or
//!    another shard confirmed stored is answered DUPLICATE at once; a copy of an id still in
//!    flight waits for its original; any frame while Redis is down or the shard is at its
//!    bound gets RETRY at once.
//! 4. **batch** (`pipeline/batch.rs`, `redis/script.rs`): the event joins the shard's open
//!    batch, which is sent when full or after a short linger.
//! 5. **redis** (`redis/store.rs`): one `EVALSHA` per batch marks and appends each new event
//!    atomically, and says per event whether it was new.
//! 6. **ack** (`pipeline/sink.rs` `complete`/`answer`, `pipeline/answer.rs`): confirmed ids go
//!    into the cache, then every copy gets its answer through the ack sink: ACCEPTED,
//!    DUPLICATE, or RETRY if the call failed.

pub use shardgate_proto as wire;

pub mod limits;
pub mod sys;

pub mod telemetry;

pub mod redis;

pub mod pipeline;

pub mod intake;

pub mod host;
