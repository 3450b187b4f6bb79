//! The command line and the config file, resolved into one checked `Config`.
//!
//! The flags and the TOML file share one struct (`ServeArgs`), so they have the
//! same keys by construction: `--dedup-window-secs` on the command line is
//! `dedup_window_secs` in the file. A flag wins over the file, and the file
//! wins over the defaults in `limits.rs`. Every value is range-checked here, at
//! start, so nothing later has to wonder whether a bound holds.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::host::placement::{parse_core_list, PlacementMode};
use crate::limits;
use crate::redis::store::RedisUrl;
pub use crate::telemetry::logging::LogFormat;

/// shardgate: thread-per-core intake of game action events into Redis,
/// each event stored exactly once and acked only after the write.
#[derive(Debug, Parser)]
#[command(name = "shardgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: one shard per listed core, until SIGTERM or SIGINT.
    Serve(ServeArgs),
}

/// Every setting of `serve`. All are optional here so that a flag can be told
/// apart from a value in the config file; defaults are applied in `resolve`.
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Cores to run one shard each on: a list and/or ranges, e.g. `0,1` or `0-3`. [required with pinned; with fenced, every core the cgroup's cpuset allows]
    #[arg(long, value_name = "LIST")]
    pub cores: Option<String>,

    /// UDP address every shard binds with SO_REUSEPORT. Port 0 picks one free port for all. [required]
    #[arg(long, value_name = "ADDR")]
    pub udp: Option<SocketAddr>,

    /// TCP address every shard listens on with SO_REUSEPORT; may equal --udp. [required]
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<SocketAddr>,

    /// Redis to store events in, e.g. `redis://127.0.0.1:6379`. [required]
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,

    /// TOML file with these same keys in snake_case; flags win over it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// `pinned`: each shard fixed to its core. `fenced`: shards may move within the listed (or allowed) cores. [default: pinned]
    #[arg(long, value_enum, value_name = "MODE")]
    pub placement: Option<PlacementMode>,

    /// Prefix of every Redis key. [default: sg]
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,

    /// Streams per prefix; an event goes to `player_id % partitions`. [default: 16]
    #[arg(long, value_name = "N")]
    pub partitions: Option<u32>,

    /// How long Redis remembers an event id (the marker's TTL). [default: 600]
    #[arg(long, value_name = "SECS")]
    pub dedup_window_secs: Option<u64>,

    /// Event ids each shard's dedup cache holds before it evicts. [default: 1048576]
    #[arg(long, value_name = "N")]
    pub dedup_capacity: Option<usize>,

    /// Serve Prometheus metrics at `http://ADDR/metrics`. [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Write HDR latency histograms here on shutdown (more files beside it). [default: none]
    #[arg(long, value_name = "FILE")]
    pub hdr_out: Option<PathBuf>,

    /// File holding the secret players' frame tags are keyed from; give it twice during a rotation. [default: none]
    #[arg(long, value_name = "FILE", action = clap::ArgAction::Append)]
    pub auth_secret_file: Option<Vec<PathBuf>>,

    /// Most events in one Redis script call. [default: 256]
    #[arg(long, value_name = "N")]
    pub batch_events_max: Option<usize>,

    /// Pace of the script calls: a call starts at most this long after the previous one unless its batch is full; after a quiet period the first event goes at once. [default: 1000]
    #[arg(long, value_name = "MICROS")]
    pub batch_linger_us: Option<u64>,

    /// Script calls each shard keeps in flight; past it, frames get RETRY. [default: 8]
    #[arg(long, value_name = "N")]
    pub batches_in_flight_max: Option<usize>,

    /// Timeout of one Redis script call; its events then get RETRY. [default: 1000]
    #[arg(long, value_name = "MILLIS")]
    pub redis_timeout_ms: Option<u64>,

    /// On SIGTERM/SIGINT, how long to wait for in-flight writes. [default: 5000]
    #[arg(long, value_name = "MILLIS")]
    pub drain_timeout_ms: Option<u64>,

    /// TCP connections each shard accepts at once; more are closed at accept. [default: 1024]
    #[arg(long, value_name = "N")]
    pub tcp_connections_per_shard: Option<usize>,

    /// TCP connections one source (IP address, IPv6 /64) may hold on a shard; more are closed at accept. [default: 64]
    #[arg(long, value_name = "N")]
    pub tcp_connections_per_source: Option<usize>,

    /// A TCP connection that sends nothing for this long is closed. [default: 30000]
    #[arg(long, value_name = "MILLIS")]
    pub tcp_idle_timeout_ms: Option<u64>,

    /// A TCP peer whose acks cannot be written for this long (it does not read them) is closed. [default: 10000]
    #[arg(long, value_name = "MILLIS")]
    pub tcp_write_timeout_ms: Option<u64>,

    /// UDP frames per second one source (IP address, IPv6 /64) may have a shard take; more get no answer. [default: 5000]
    #[arg(long, value_name = "N")]
    pub udp_source_frames_per_sec: Option<u64>,

    /// UDP frames one source may send at once before its per-second rate applies. [default: 10000]
    #[arg(long, value_name = "N")]
    pub udp_source_burst_frames: Option<u64>,

    /// UDP sources whose rate each shard tracks (a fixed table). [default: 65536]
    #[arg(long, value_name = "N")]
    pub udp_source_table_entries: Option<usize>,

    /// Microseconds a shard spins before sleeping when idle: lower wake-up latency for a core of CPU. [default: 0]
    #[arg(long, value_name = "MICROS")]
    pub spin_before_park_us: Option<u64>,

    /// Log lines as `text` (one human-readable line each) or `json`. [default: text]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Least severe level logged: error, warn, info, debug, trace; RUST_LOG overrides it. [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
}

/// The resolved, range-checked settings a server runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cores: Vec<usize>,
    pub placement: PlacementMode,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub redis_url: RedisUrl,
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub prefix: String,
    pub partitions: u32,
    pub dedup_window_secs: u64,
    pub dedup_capacity: usize,
    pub hdr_out: Option<PathBuf>,
    /// With auth on, the secrets frame tags are keyed from (`auth.rs`).
    pub auth: Option<crate::pipeline::keys::Secrets>,
    pub batch_events_max: usize,
    pub batch_linger_us: u64,
    pub batches_in_flight_max: usize,
    pub redis_timeout_ms: u64,
    pub drain_timeout_ms: u64,
    pub tcp_connections_per_shard: usize,
    pub tcp_connections_per_source: usize,
    pub tcp_idle_timeout_ms: u64,
    pub tcp_write_timeout_ms: u64,
    pub udp_source_frames_per_sec: u64,
    pub udp_source_burst_frames: u64,
    pub udp_source_table_entries: usize,
    pub spin_before_park_us: u64,
}

/// Why the settings cannot run. The message names the setting and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> ConfigError {
        ConfigError(message.into())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ServeArgs {
    /// Fills every setting the flags left unset from `file`.
    pub fn or(self, file: ServeArgs) -> ServeArgs {
        ServeArgs {
            cores: self.cores.or(file.cores),
            udp: self.udp.or(file.udp),
            tcp: self.tcp.or(file.tcp),
            redis: self.redis.or(file.redis),
            config: self.config,
            placement: self.placement.or(file.placement),
            prefix: self.prefix.or(file.prefix),
            partitions: self.partitions.or(file.partitions),
            dedup_window_secs: self.dedup_window_secs.or(file.dedup_window_secs),
            dedup_capacity: self.dedup_capacity.or(file.dedup_capacity),
            metrics: self.metrics.or(file.metrics),
            hdr_out: self.hdr_out.or(file.hdr_out),
            auth_secret_file: self.auth_secret_file.or(file.auth_secret_file),
            batch_events_max: self.batch_events_max.or(file.batch_events_max),
            batch_linger_us: self.batch_linger_us.or(file.batch_linger_us),
            batches_in_flight_max: self.batches_in_flight_max.or(file.batches_in_flight_max),
            redis_timeout_ms: self.redis_timeout_ms.or(file.redis_timeout_ms),
            drain_timeout_ms: self.drain_timeout_ms.or(file.drain_timeout_ms),
            tcp_connections_per_shard: self.tcp_connections_per_shard.or(file.tcp_connections_per_shard),
            tcp_connections_per_source: self.tcp_connections_per_source.or(file.tcp_connections_per_source),
            tcp_idle_timeout_ms: self.tcp_idle_timeout_ms.or(file.tcp_idle_timeout_ms),
            tcp_write_timeout_ms: self.tcp_write_timeout_ms.or(file.tcp_write_timeout_ms),
            udp_source_frames_per_sec: self.udp_source_frames_per_sec.or(file.udp_source_frames_per_sec),
            udp_source_burst_frames: self.udp_source_burst_frames.or(file.udp_source_burst_frames),
            udp_source_table_entries: self.udp_source_table_entries.or(file.udp_source_table_entries),
            spin_before_park_us: self.spin_before_park_us.or(file.spin_before_park_us),
            log_format: self.log_format.or(file.log_format),
            log_level: self.log_level.or(file.log_level),
        }
    }

    /// Reads `--config`, if given, and merges it under the flags.
    pub fn with_config_file(self) -> Result<ServeArgs, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|error| ConfigError::new(format!("cannot read config file {}: {error}", path.display())))?;
        let file: ServeArgs = toml::from_str(&text)
            .map_err(|error| ConfigError::new(format!("invalid config file {}: {error}", path.display())))?;
        Ok(self.or(file))
    }

    /// Applies defaults and checks every bound.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let placement = self.placement.unwrap_or(PlacementMode::Pinned);
        let cores = resolve_cores(self.cores, placement)?;
        let redis_url = RedisUrl::new(required(self.redis, "redis")?);
        if !redis_url.expose().starts_with("redis://") {
            return Err(ConfigError::new(format!(
                "--redis {redis_url:?} must be a redis:// url (standalone redis; tls and cluster are not supported)"
            )));
        }
        fred::prelude::Config::from_url(redis_url.expose())
            .map_err(|error| ConfigError::new(format!("invalid --redis url {redis_url:?}: {error}")))?;
        let prefix = self.prefix.unwrap_or_else(|| "sg".to_string());
        check_prefix(&prefix)?;
        Ok(Config {
            cores,
            placement,
            udp: required(self.udp, "udp")?,
            tcp: required(self.tcp, "tcp")?,
            redis_url,
            metrics: self.metrics,
            log_format: self.log_format.unwrap_or(LogFormat::Text),
            log_level: check_log_level(self.log_level.unwrap_or_else(|| "info".into()))?,
            prefix,
            partitions: in_range(
                "partitions",
                self.partitions,
                limits::PARTITIONS_DEFAULT,
                1,
                limits::PARTITIONS_MAX,
            )?,
            dedup_window_secs: in_range(
                "dedup-window-secs",
                self.dedup_window_secs,
                limits::DEDUP_WINDOW_SECS_DEFAULT,
                1,
                limits::DEDUP_WINDOW_SECS_MAX,
            )?,
            dedup_capacity: in_range(
                "dedup-capacity",
                self.dedup_capacity,
                limits::DEDUP_CAPACITY_DEFAULT,
                limits::DEDUP_CAPACITY_MIN,
                limits::DEDUP_CAPACITY_MAX,
            )?,
            hdr_out: self.hdr_out,
            auth: match self.auth_secret_file {
                Some(paths) => Some(crate::host::secrets::load(&paths)?),
                None => None,
            },
            batch_events_max: in_range(
                "batch-events-max",
                self.batch_events_max,
                limits::BATCH_EVENTS_DEFAULT,
                1,
                limits::BATCH_EVENTS_MAX,
            )?,
            batch_linger_us: in_range(
                "batch-linger-us",
                self.batch_linger_us,
                limits::BATCH_LINGER_US_DEFAULT,
                0,
                limits::BATCH_LINGER_US_MAX,
            )?,
            batches_in_flight_max: in_range(
                "batches-in-flight-max",
                self.batches_in_flight_max,
                limits::BATCHES_IN_FLIGHT_DEFAULT,
                1,
                limits::BATCHES_IN_FLIGHT_MAX,
            )?,
            redis_timeout_ms: in_range(
                "redis-timeout-ms",
                self.redis_timeout_ms,
                limits::REDIS_TIMEOUT_MS_DEFAULT,
                1,
                limits::REDIS_TIMEOUT_MS_MAX,
            )?,
            drain_timeout_ms: in_range(
                "drain-timeout-ms",
                self.drain_timeout_ms,
                limits::DRAIN_TIMEOUT_MS_DEFAULT,
                0,
                limits::DRAIN_TIMEOUT_MS_MAX,
            )?,
            tcp_connections_per_shard: in_range(
                "tcp-connections-per-shard",
                self.tcp_connections_per_shard,
                limits::TCP_CONNECTIONS_PER_SHARD_DEFAULT,
                1,
                limits::TCP_CONNECTIONS_PER_SHARD_MAX,
            )?,
            tcp_connections_per_source: in_range(
                "tcp-connections-per-source",
                self.tcp_connections_per_source,
                limits::TCP_CONNECTIONS_PER_SOURCE_DEFAULT,
                1,
                limits::TCP_CONNECTIONS_PER_SHARD_MAX,
            )?,
            tcp_idle_timeout_ms: in_range(
                "tcp-idle-timeout-ms",
                self.tcp_idle_timeout_ms,
                limits::TCP_IDLE_TIMEOUT_MS_DEFAULT,
                limits::TCP_IDLE_TIMEOUT_MS_MIN,
                limits::TCP_IDLE_TIMEOUT_MS_MAX,
            )?,
            tcp_write_timeout_ms: in_range(
                "tcp-write-timeout-ms",
                self.tcp_write_timeout_ms,
                limits::TCP_WRITE_TIMEOUT_MS_DEFAULT,
                limits::TCP_WRITE_TIMEOUT_MS_MIN,
                limits::TCP_WRITE_TIMEOUT_MS_MAX,
            )?,
            udp_source_frames_per_sec: in_range(
                "udp-source-frames-per-sec",
                self.udp_source_frames_per_sec,
                limits::UDP_SOURCE_FRAMES_PER_SEC_DEFAULT,
                1,
                limits::UDP_SOURCE_FRAMES_PER_SEC_MAX,
            )?,
            udp_source_burst_frames: in_range(
                "udp-source-burst-frames",
                self.udp_source_burst_frames,
                limits::UDP_SOURCE_BURST_FRAMES_DEFAULT,
                1,
                limits::UDP_SOURCE_BURST_FRAMES_MAX,
            )?,
            udp_source_table_entries: in_range(
                "udp-source-table-entries",
                self.udp_source_table_entries,
                limits::UDP_SOURCE_TABLE_ENTRIES_DEFAULT,
                limits::UDP_SOURCE_TABLE_ENTRIES_MIN,
                limits::UDP_SOURCE_TABLE_ENTRIES_MAX,
            )?,
            spin_before_park_us: in_range(
                "spin-before-park-us",
                self.spin_before_park_us,
                0,
                0,
                limits::SPIN_BEFORE_PARK_US_MAX,
            )?,
        })
    }
}

impl Config {
    /// What the pipeline takes from the command line.
    pub fn pipeline_settings(&self) -> crate::pipeline::Settings {
        crate::pipeline::Settings {
            partitions: self.partitions,
            prefix: self.prefix.clone(),
            dedup_window_secs: self.dedup_window_secs,
            auth: self.auth.clone(),
            batch_events_max: self.batch_events_max,
            batch_linger_us: self.batch_linger_us,
            batches_in_flight_max: self.batches_in_flight_max,
        }
    }

    /// What a shard's Redis client takes from the command line.
    pub fn store_settings(&self) -> crate::redis::store::StoreSettings {
        crate::redis::store::StoreSettings {
            redis_url: self.redis_url.clone(),
            call_timeout_ms: self.redis_timeout_ms,
            batches_in_flight_max: self.batches_in_flight_max,
            prefix: self.prefix.clone(),
            dedup_window_secs: self.dedup_window_secs,
            partitions: self.partitions,
        }
    }

    /// What intake takes from the command line.
    pub fn intake_settings(&self) -> crate::intake::Settings {
        crate::intake::Settings {
            shard_count: self.cores.len(),
            udp_source_table_entries: self.udp_source_table_entries,
            udp_source_frames_per_sec: self.udp_source_frames_per_sec,
            udp_source_burst_frames: self.udp_source_burst_frames,
            tcp_connections_per_shard: self.tcp_connections_per_shard,
            tcp_connections_per_source: self.tcp_connections_per_source,
            tcp_idle_timeout_ms: self.tcp_idle_timeout_ms,
            tcp_write_timeout_ms: self.tcp_write_timeout_ms,
        }
    }
}

fn required<T>(value: Option<T>, name: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| {
        ConfigError::new(format!(
            "--{name} is required (as a flag or `{}` in --config)",
            name.replace('-', "_")
        ))
    })
}

fn in_range<T>(name: &str, value: Option<T>, default: T, min: T, max: T) -> Result<T, ConfigError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    let value = value.unwrap_or(default);
    if value < min || value > max {
        return Err(ConfigError::new(format!(
            "--{name} {value} is out of range {min}..={max}"
        )));
    }
    Ok(value)
}

fn check_log_level(level: String) -> Result<String, ConfigError> {
    match level.as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
        _ => Err(ConfigError::new(format!(
            "--log-level {level:?} must be one of error, warn, info, debug, trace"
        ))),
    }
}

/// Keys are `<prefix>:{<p>}:...`; a brace in the prefix would move the hash tag.
fn check_prefix(prefix: &str) -> Result<(), ConfigError> {
    let valid = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'{' && byte != b'}');
    if !valid {
        return Err(ConfigError::new(format!(
            "--prefix {prefix:?} must be 1..=64 printable ascii characters without spaces or braces"
        )));
    }
    Ok(())
}

impl ValueEnum for PlacementMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[PlacementMode::Pinned, PlacementMode::Fenced]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// `--cores` as listed, or with `fenced` and no list, every core the
/// cgroup's cpuset allows (`cpuset.rs`). Pinned shards need an explicit list:
/// taking "all allowed cores" on a host that reserved none would pin shards
/// onto the housekeeping cores.
fn resolve_cores(listed: Option<String>, placement: PlacementMode) -> Result<Vec<usize>, ConfigError> {
    let (cores, origin) = match (listed, placement) {
        (Some(listed), _) => (parse_core_list(&listed)?, "--cores lists".to_string()),
        (None, PlacementMode::Fenced) => {
            let allowed = crate::host::cpuset::allowed()?;
            let origin = format!("{} allows", allowed.source_name());
            (allowed.cores, origin)
        }
        (None, PlacementMode::Pinned) => {
            return Err(ConfigError::new(
                "--cores is required with --placement pinned (with fenced it defaults to the cgroup's cpuset)",
            ))
        }
    };
    if cores.len() > limits::SHARDS_MAX {
        return Err(ConfigError::new(format!(
            "{origin} {} cores; at most {} shards are supported (list fewer with --cores)",
            cores.len(),
            limits::SHARDS_MAX
        )));
    }
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redis password never shows in Debug, Display or a config error; urls without one are unchanged.
    #[test]
    fn redis_password_is_redacted() {
        for (url, shown) in [
            ("redis://:hunter2@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
            ("redis://game:hunter2@redis:6379", "redis://game:***@redis:6379"),
            ("redis://game@redis:6379", "redis://game@redis:6379"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ] {
            let redis_url = RedisUrl::new(url.to_string());
            assert_eq!(redis_url.to_string(), shown);
            assert_eq!(format!("{redis_url:?}"), format!("{shown:?}"));
            assert_eq!(redis_url.expose(), url);
        }
        let config = ServeArgs {
            redis: Some("redis://:hunter2@127.0.0.1:6379".into()),
            ..minimal()
        }
        .resolve()
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        let error = ServeArgs {
            redis: Some("rediss://:hunter2@127.0.0.1:6379".into()),
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    fn minimal() -> ServeArgs {
        ServeArgs {
            cores: Some("0".into()),
            udp: Some("127.0.0.1:7000".parse().unwrap()),
            tcp: Some("127.0.0.1:7000".parse().unwrap()),
            redis: Some("redis://127.0.0.1:6379".into()),
            ..ServeArgs::default()
        }
    }

    /// The defaults come from limits.rs when nothing is set.
    #[test]
    fn defaults_apply() {
        let config = minimal().resolve().unwrap();
        assert_eq!(config.partitions, limits::PARTITIONS_DEFAULT);
        assert_eq!(config.prefix, "sg");
        assert_eq!(config.placement, PlacementMode::Pinned);
        assert_eq!(config.batch_events_max, limits::BATCH_EVENTS_DEFAULT);
    }

    /// A flag wins over the file, and the file fills what the flags left unset.
    #[test]
    fn flags_win_over_file() {
        let file: ServeArgs = toml::from_str("prefix = \"file\"\npartitions = 4\ncores = \"0-1\"").unwrap();
        let flags = ServeArgs {
            prefix: Some("flag".into()),
            ..minimal()
        };
        let config = flags.or(file).resolve().unwrap();
        assert_eq!(config.prefix, "flag");
        assert_eq!(config.partitions, 4);
        assert_eq!(config.cores, vec![0]);
    }

    /// Unknown keys in the file are an error, not silently ignored.
    #[test]
    fn unknown_file_key_fails() {
        assert!(toml::from_str::<ServeArgs>("partitons = 4").is_err());
    }

    /// Out-of-range values and later-issue flags fail with a message naming them.
    #[test]
    fn bad_values_fail_clearly() {
        let error = ServeArgs {
            partitions: Some(0),
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(error.to_string().contains("--partitions 0"), "{error}");
        let error = ServeArgs {
            auth_secret_file: Some(vec!["/nonexistent/secret".into()]),
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/secret"), "{error}");
        let error = ServeArgs {
            log_level: Some("loud".into()),
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(error.to_string().contains("--log-level"), "{error}");
        let error = ServeArgs {
            prefix: Some("a{b}".into()),
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(error.to_string().contains("--prefix"), "{error}");
        let error = ServeArgs {
            redis: None,
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(error.to_string().contains("--redis is required"), "{error}");
        let error = ServeArgs {
            cores: None,
            ..minimal()
        }
        .resolve()
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--cores is required with --placement pinned"),
            "{error}"
        );
    }

    /// With fenced and no --cores, the shards take the cores this thread may run on, as the
    /// kernel lists them in /proc/thread-self/status (read here, not through `cpuset.rs`).
    #[test]
    fn fenced_without_cores_takes_the_allowed_set() {
        let config = ServeArgs {
            cores: None,
            placement: Some(PlacementMode::Fenced),
            ..minimal()
        }
        .resolve()
        .unwrap();
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let list = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .expect("the kernel lists the allowed cpus")
            .trim();
        let kernel_allowed: Vec<usize> = list
            .split(',')
            .flat_map(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                first.parse::<usize>().unwrap()..=last.parse::<usize>().unwrap()
            })
            .collect();
        assert!(!config.cores.is_empty());
        assert_eq!(config.cores, kernel_allowed, "kernel's list: {list}");
    }

    /// The abuse limits default from limits.rs, come from the file, and refuse values outside their ranges.
    #[test]
    fn abuse_limits_resolve() {
        let config = minimal().resolve().unwrap();
        assert_eq!(
            config.tcp_connections_per_source,
            limits::TCP_CONNECTIONS_PER_SOURCE_DEFAULT
        );
        assert_eq!(config.tcp_idle_timeout_ms, limits::TCP_IDLE_TIMEOUT_MS_DEFAULT);
        assert_eq!(config.tcp_write_timeout_ms, limits::TCP_WRITE_TIMEOUT_MS_DEFAULT);
        assert_eq!(
            config.udp_source_frames_per_sec,
            limits::UDP_SOURCE_FRAMES_PER_SEC_DEFAULT
        );
        assert_eq!(config.udp_source_burst_frames, limits::UDP_SOURCE_BURST_FRAMES_DEFAULT);
        assert_eq!(
            config.udp_source_table_entries,
            limits::UDP_SOURCE_TABLE_ENTRIES_DEFAULT
        );
        let file: ServeArgs = toml::from_str(
            "tcp_connections_per_source = 2\ntcp_idle_timeout_ms = 500\ntcp_write_timeout_ms = 700\n\
             udp_source_frames_per_sec = 10\nudp_source_burst_frames = 20\nudp_source_table_entries = 128",
        )
        .unwrap();
        let config = minimal().or(file).resolve().unwrap();
        assert_eq!(
            (
                config.tcp_connections_per_source,
                config.tcp_idle_timeout_ms,
                config.tcp_write_timeout_ms,
                config.udp_source_frames_per_sec,
                config.udp_source_burst_frames,
                config.udp_source_table_entries
            ),
            (2, 500, 700, 10, 20, 128)
        );
        for (args, flag) in [
            (
                ServeArgs {
                    tcp_connections_per_source: Some(0),
                    ..minimal()
                },
                "--tcp-connections-per-source 0",
            ),
            (
                ServeArgs {
                    tcp_idle_timeout_ms: Some(1),
                    ..minimal()
                },
                "--tcp-idle-timeout-ms 1",
            ),
            (
                ServeArgs {
                    udp_source_frames_per_sec: Some(0),
                    ..minimal()
                },
                "--udp-source-frames-per-sec 0",
            ),
            (
                ServeArgs {
                    udp_source_table_entries: Some(1 << 30),
                    ..minimal()
                },
                "--udp-source-table-entries 1073741824",
            ),
        ] {
            let error = args.resolve().unwrap_err();
            assert!(error.to_string().contains(flag), "{error}");
        }
    }
}
