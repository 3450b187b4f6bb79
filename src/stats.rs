//! What each shard counted: the summary printed at shutdown.
//!
//! Counters are plain integers owned by the shard's thread: nothing on the data
//! path pays for an atomic. They are added up per batch or per datagram where
//! that is cheaper. (Prometheus export is the observability issue's; it will
//! read these through its own exporter.)

use std::ops::AddAssign;

/// Answers and drops, by cause. Every field is a count of frames unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_received: u64,
    pub bytes_received: u64,
    pub accepted: u64,
    /// DUPLICATE answered from this shard's cache, another shard's cache, or Redis.
    pub duplicate_own_cache: u64,
    pub duplicate_peer_cache: u64,
    pub duplicate_redis: u64,
    /// RETRY because the shard was at its in-flight bound.
    pub retry_overload: u64,
    /// RETRY because Redis was down, failed or timed out.
    pub retry_redis: u64,
    /// RETRY because an earlier copy of the same id was still in flight.
    pub retry_in_flight_copy: u64,
    /// RETRY because the server was shutting down.
    pub retry_shutting_down: u64,
    pub rejected: u64,
    /// UDP bytes without a parseable header, or TCP streams closed for one.
    pub unparseable: u64,
    pub batches_sent: u64,
    pub batch_events_total: u64,
    pub redis_errors: u64,
    pub tcp_accepted: u64,
    pub tcp_refused_at_limit: u64,
    /// Sends that failed (UDP destination gone, TCP peer reset): the client resends.
    pub reply_errors: u64,
}

impl Stats {
    pub fn duplicate(&self) -> u64 {
        self.duplicate_own_cache + self.duplicate_peer_cache + self.duplicate_redis
    }

    pub fn retry(&self) -> u64 {
        self.retry_overload + self.retry_redis + self.retry_in_flight_copy + self.retry_shutting_down
    }

    pub fn answered(&self) -> u64 {
        self.accepted + self.duplicate() + self.retry() + self.rejected
    }
}

impl AddAssign for Stats {
    fn add_assign(&mut self, other: Stats) {
        let Stats {
            frames_received,
            bytes_received,
            accepted,
            duplicate_own_cache,
            duplicate_peer_cache,
            duplicate_redis,
            retry_overload,
            retry_redis,
            retry_in_flight_copy,
            retry_shutting_down,
            rejected,
            unparseable,
            batches_sent,
            batch_events_total,
            redis_errors,
            tcp_accepted,
            tcp_refused_at_limit,
            reply_errors,
        } = other;
        self.frames_received += frames_received;
        self.bytes_received += bytes_received;
        self.accepted += accepted;
        self.duplicate_own_cache += duplicate_own_cache;
        self.duplicate_peer_cache += duplicate_peer_cache;
        self.duplicate_redis += duplicate_redis;
        self.retry_overload += retry_overload;
        self.retry_redis += retry_redis;
        self.retry_in_flight_copy += retry_in_flight_copy;
        self.retry_shutting_down += retry_shutting_down;
        self.rejected += rejected;
        self.unparseable += unparseable;
        self.batches_sent += batches_sent;
        self.batch_events_total += batch_events_total;
        self.redis_errors += redis_errors;
        self.tcp_accepted += tcp_accepted;
        self.tcp_refused_at_limit += tcp_refused_at_limit;
        self.reply_errors += reply_errors;
    }
}
