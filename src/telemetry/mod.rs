//! What the server tells operators: per-shard counters and the Prometheus endpoint, HDR
//! latency histograms and their snapshots, and log lines.
//!
//! Telemetry imports nothing of the data path: the layers above record into it. Its label
//! enums (transport, retry cause, close reason ...) live here or in `wire` (status, reject
//! reason).
//! - `metrics`: single-writer per-shard counters, gauges and histograms.
//! - `exporter`: the HTTP endpoint that renders them for Prometheus.
//! - `latency`, `snapshot`: HDR histograms, written on shutdown and on SIGUSR1.
//! - `logging`: text or JSON log lines.

pub(crate) mod exporter;
pub(crate) mod latency;
pub mod logging;
pub mod metrics;
pub(crate) mod snapshot;
