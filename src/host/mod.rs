//! The process around the shards: the command line and config file, which cores and how
//! (pinned or fenced, inside the cgroup's cpuset), starting the shards, signals, the drain and
//! the stop, systemd readiness and watchdog, and loading the auth secret files.
//!
//! Host is the top layer: it imports every other one, and builds each one's settings from the
//! checked `config::Config`, so that nothing below it sees the command line.
//! - `config`: command line and TOML file -> a checked `Config`.
//! - `placement`, `cpuset`: which cores, pinned or fenced; what the cgroup allows.
//! - `server`: start the shards, take signals, drain, write histograms.
//! - `sdnotify`: systemd readiness and watchdog pings.
//! - `secrets`: the auth secret files, checked and loaded at start.

pub mod config;
pub(crate) mod cpuset;
pub(crate) mod placement;
pub(crate) mod sdnotify;
pub(crate) mod secrets;
pub mod server;
