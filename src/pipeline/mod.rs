//! The fate of each frame on one shard, after intake found it and before intake writes its
//! answer: admission, the dedup cache, the batch, and the sink chain
//! linger -> send -> complete -> answer.
//!
//! - `shard`: one core's state and admission: DUPLICATE, held, RETRY, or into the open batch.
//! - `sink`: the batch's way to Redis and back: linger, send through a caller, complete
//!   (cache and in-flight set), answer.
//! - `liveness`: Redis up or down, the partition count check, outage log lines, the drain.
//! - `dedup`: the per-shard cache of stored ids, single writer, lock-free readers.
//! - `batch`: the events of one script call and where each answer goes.
//! - `answer`: routes, reply coalescing, and the traits intake implements to write answers.
//! - `keys`: the auth secrets a shard checks tags with.
//! - `notify`: shard-local wake-ups.
//!
//! The pipeline never imports intake or host: answers leave through `answer::AckSink` and
//! `answer::StreamAcks`, and its settings are `Settings`, built by `host`.

pub mod answer;
pub(crate) mod batch;
pub mod dedup;
pub mod keys;
mod liveness;
pub mod notify;
pub mod shard;
mod sink;

pub use liveness::Outage;
pub use shard::Settings;
