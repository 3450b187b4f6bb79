//! Bytes in, answers out: the UDP and TCP transports of one shard.
//!
//! - `udp`: datagrams read many per system call, frames handed to the pipeline, immediate
//!   answers coalesced per source; the SO_REUSEPORT group and its spreading program.
//! - `tcp`: a reader and a writer task per connection; acks back on the same connection.
//! - `source`, `limiter`, `tcp_sources`: the abuse limits: who a source is, its UDP token
//!   bucket, its TCP connection count.
//!
//! Intake implements the pipeline's ack sink (`pipeline::answer`): the UDP socket sends reply
//! datagrams, a TCP connection queues acks for its writer.

use std::time::SystemTime;

pub mod limiter;
pub(crate) mod source;
pub(crate) mod tcp;
pub(crate) mod tcp_sources;
pub mod udp;

/// What intake needs from the command line; built by `host`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Shards of this process: the UDP group's size when it cannot be counted.
    pub shard_count: usize,
    pub udp_source_table_entries: usize,
    pub udp_source_frames_per_sec: u64,
    pub udp_source_burst_frames: u64,
    pub tcp_connections_per_shard: usize,
    pub tcp_connections_per_source: usize,
    pub tcp_idle_timeout_ms: u64,
    pub tcp_write_timeout_ms: u64,
}

/// The wall clock in Unix microseconds: the receive time stamped on each stored event.
pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}
