//! Shared end-to-end harness: a private `redis-server`, the `shardgate` binary, UDP/TCP
//! clients that speak the wire protocol, a resend-until-answered delivery loop, a steady
//! background sender, and strict readers of what landed in Redis.
//!
//! Everything here is bounded in time and count, and talks only to 127.0.0.1, or to the
//! addresses of a test's own network namespaces (`netns`), which exist only on this machine.
//! One module per topic; this file re-exports what the tests use, so `use support::*` brings it all.

mod basics;
mod clients;
mod deliver;
mod events;
mod firehose;
mod hdr;
mod metrics;
mod netns;
mod redis_cluster;
mod redis_server;
mod server;
mod stored;
mod turns;

pub use nix::sys::signal::Signal;

pub use basics::{free_port, free_port_outside_ephemeral, hex, test_seed, unhex, unix_us};
pub use clients::{tcp_connect_from, udp_socket_from, TcpClient, UdpClient};
pub use deliver::{
    deliver_all, deliver_resolved, deliver_to_hosts, event_id, wire_status, ChannelLoop, DeliverOpts, DeliveryReport,
};
pub use events::{parse_acks, random_events, random_garbage, AckMsg, Event, Key, St, StatusCounts};
pub use firehose::{Firehose, FirehoseOpts};
pub use hdr::{parse_hdr_percentiles, HdrSummary};
pub use metrics::{metric_sum, scrape_metrics, serving_metrics_address, Exposition, Sample};
pub use netns::Network;
pub use redis_cluster::RedisCluster;
pub use redis_server::{redis_ping, RedisServer};
pub use server::{resident_bytes, run_cli, CliRun, Server, ServerBuilder};
pub use stored::{check_stored, read_events, stream_keys, StoredEvent};
pub use turns::take_turn;
