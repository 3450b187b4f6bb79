//! The command line and the config file, resolved into one checked `Config`.
//!
//! Every setting of `serve` is one entry of one table, `serve_settings!` below:
//! its doc comment (the `--help` text, with its `[default: ...]`), its flag,
//! its name (the TOML key, and the flag in kebab case: `dedup_window_secs` is
//! `--dedup-window-secs`), its type, and for a number its default and range.
//! The table declares `ServeArgs`, which both clap and serde read, so the flags
//! and the file have the same keys by construction.
//!
//! A flag wins over the file, and the file over the table's defaults (most of
//! them named in `limits.rs`, with the reason for each): three layers of the
//! same struct, merged by `ServeArgs::or`. Every value is checked here, at
//! start, so nothing later has to wonder whether a bound holds.
//!
//! Adding a setting: an entry in the table, and the `Config` field it fills
//! (`Config` is written out so that its fields, and the `starting config=...`
//! log line, keep their order). A number needs nothing more: its default and
//! range are applied from the table. Any other setting is resolved in
//! `ServeArgs::resolve`, by a rule of its own, and named in the `Config` built
//! there. systemd/shardgate.toml must list the new key with the default its doc
//! states (tests/host/test-units.sh reads this table to check it).

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::host::placement::{parse_core_list, PlacementMode};
use crate::limits;
use crate::redis::store::{Durability, RedisUrl};
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

/// The settings table: every setting of `serve`, once, in `--help` order (also
/// the order a config file's "unknown field" error lists the keys in).
///
/// An entry is a doc comment (the `--help` text), `#[arg(...)]` (and any serde
/// attribute), and `name: Type`, optionally followed by `= DEFAULT` and, for a
/// number, `; within MIN..=MAX`. The doc's `[default: ...]` must state DEFAULT
/// (the test `documented_defaults_are_the_table_defaults` checks it); a setting
/// without a default is required or off, as its doc says.
///
/// The table is read twice: clap and serde need it as a struct with its doc
/// comments, and `resolve` needs its numbers again. So it is a macro that hands
/// its entries to another one (`$then`): `declare_serve_args!` makes the
/// struct, and `config_with_numbers!` fills the numbers of a `Config`.
macro_rules! serve_settings {
    ($then:ident $($arguments:tt)*) => {
        $then! {
            ($($arguments)*)

            /// Cores to run one shard each on: a list and/or ranges, e.g. `0,1` or `0-3`. [required with pinned; with fenced, every core the cgroup's cpuset allows]
            #[arg(long, value_name = "LIST")]
            cores: String,

            /// UDP address every shard binds with SO_REUSEPORT. Port 0 picks one free port for all. [required]
            #[arg(long, value_name = "ADDR")]
            udp: SocketAddr,

            /// TCP address every shard listens on with SO_REUSEPORT; may equal --udp. [required]
            #[arg(long, value_name = "ADDR")]
            tcp: SocketAddr,

            /// Redis to store events in: `redis://HOST:PORT` (standalone) or `redis-cluster://HOST:PORT[,HOST:PORT...]` (seed nodes of a Redis Cluster). [required]
            #[arg(long, value_name = "URL")]
            redis: String,

            /// TOML file with these same keys in snake_case; flags win over it.
            #[arg(long, value_name = "FILE")]
            #[serde(skip)]
            config: PathBuf,

            /// `pinned`: each shard fixed to its core. `fenced`: shards may move within the listed (or allowed) cores. [default: pinned]
            #[arg(long, value_enum, value_name = "MODE")]
            placement: PlacementMode = PlacementMode::Pinned,

            /// Prefix of every Redis key. [default: sg]
            #[arg(long, value_name = "PREFIX")]
            prefix: String = "sg".into(),

            /// Streams per prefix; an event goes to `player_id % partitions`. [default: 16]
            #[arg(long, value_name = "N")]
            partitions: u32 = limits::PARTITIONS_DEFAULT; within 1..=limits::PARTITIONS_MAX,

            /// How long Redis remembers an event id (the marker's TTL). [default: 600]
            #[arg(long, value_name = "SECS")]
            dedup_window_secs: u64 = limits::DEDUP_WINDOW_SECS_DEFAULT; within 1..=limits::DEDUP_WINDOW_SECS_MAX,

            /// Event ids each shard's dedup cache holds before it evicts. [default: 1048576]
            #[arg(long, value_name = "N")]
            dedup_capacity: usize = limits::DEDUP_CAPACITY_DEFAULT;
                within limits::DEDUP_CAPACITY_MIN..=limits::DEDUP_CAPACITY_MAX,

            /// Serve Prometheus metrics at `http://ADDR/metrics`. [default: off]
            #[arg(long, value_name = "ADDR")]
            metrics: SocketAddr,

            /// Write HDR latency histograms here on shutdown (more files beside it). [default: none]
            #[arg(long, value_name = "FILE")]
            hdr_out: PathBuf,

            /// File holding the secret players' frame tags are keyed from; give it twice during a rotation. [default: none]
            #[arg(long, value_name = "FILE", action = clap::ArgAction::Append)]
            auth_secret_file: Vec<PathBuf>,

            /// Most events in one Redis script call. [default: 256]
            #[arg(long, value_name = "N")]
            batch_events_max: usize = limits::BATCH_EVENTS_DEFAULT; within 1..=limits::BATCH_EVENTS_MAX,

            /// Pace of the script calls: a call starts at most this long after the previous one unless its batch is full; after a quiet period the first event goes at once. [default: 1000]
            #[arg(long, value_name = "MICROS")]
            batch_linger_us: u64 = limits::BATCH_LINGER_US_DEFAULT; within 0..=limits::BATCH_LINGER_US_MAX,

            /// Script calls each shard keeps in flight; past it, frames get RETRY. [default: 8]
            #[arg(long, value_name = "N")]
            batches_in_flight_max: usize = limits::BATCHES_IN_FLIGHT_DEFAULT;
                within 1..=limits::BATCHES_IN_FLIGHT_MAX,

            /// Timeout of one Redis script call; its events then get RETRY. [default: 1000]
            #[arg(long, value_name = "MILLIS")]
            redis_timeout_ms: u64 = limits::REDIS_TIMEOUT_MS_DEFAULT; within 1..=limits::REDIS_TIMEOUT_MS_MAX,

            /// `local`: answer once the Redis master ran the batch. `replica`: answer only after `WAIT 1` confirms that a replica has the batch's writes, within --redis-timeout-ms; else RETRY. [default: local]
            #[arg(long, value_enum, value_name = "MODE")]
            durability: Durability = Durability::Local,

            /// On SIGTERM/SIGINT, how long to wait for in-flight writes. [default: 5000]
            #[arg(long, value_name = "MILLIS")]
            drain_timeout_ms: u64 = limits::DRAIN_TIMEOUT_MS_DEFAULT; within 0..=limits::DRAIN_TIMEOUT_MS_MAX,

            /// TCP connections each shard accepts at once; more are closed at accept. [default: 1024]
            #[arg(long, value_name = "N")]
            tcp_connections_per_shard: usize = limits::TCP_CONNECTIONS_PER_SHARD_DEFAULT;
                within 1..=limits::TCP_CONNECTIONS_PER_SHARD_MAX,

            /// TCP connections one source (IP address, IPv6 /64) may hold on a shard; more are closed at accept. [default: 64]
            #[arg(long, value_name = "N")]
            tcp_connections_per_source: usize = limits::TCP_CONNECTIONS_PER_SOURCE_DEFAULT;
                within 1..=limits::TCP_CONNECTIONS_PER_SHARD_MAX,

            /// A TCP connection that sends nothing for this long is closed. [default: 30000]
            #[arg(long, value_name = "MILLIS")]
            tcp_idle_timeout_ms: u64 = limits::TCP_IDLE_TIMEOUT_MS_DEFAULT;
                within limits::TCP_IDLE_TIMEOUT_MS_MIN..=limits::TCP_IDLE_TIMEOUT_MS_MAX,

            /// A TCP peer whose acks cannot be written for this long (it does not read them) is closed. [default: 10000]
            #[arg(long, value_name = "MILLIS")]
            tcp_write_timeout_ms: u64 = limits::TCP_WRITE_TIMEOUT_MS_DEFAULT;
                within limits::TCP_WRITE_TIMEOUT_MS_MIN..=limits::TCP_WRITE_TIMEOUT_MS_MAX,

            /// UDP frames per second one source (IP address, IPv6 /64) may have a shard take; more get no answer. [default: 5000]
            #[arg(long, value_name = "N")]
            udp_source_frames_per_sec: u64 = limits::UDP_SOURCE_FRAMES_PER_SEC_DEFAULT;
                within 1..=limits::UDP_SOURCE_FRAMES_PER_SEC_MAX,

            /// UDP frames one source may send at once before its per-second rate applies. [default: 10000]
            #[arg(long, value_name = "N")]
            udp_source_burst_frames: u64 = limits::UDP_SOURCE_BURST_FRAMES_DEFAULT;
                within 1..=limits::UDP_SOURCE_BURST_FRAMES_MAX,

            /// UDP sources whose rate each shard tracks (a fixed table). [default: 65536]
            #[arg(long, value_name = "N")]
            udp_source_table_entries: usize = limits::UDP_SOURCE_TABLE_ENTRIES_DEFAULT;
                within limits::UDP_SOURCE_TABLE_ENTRIES_MIN..=limits::UDP_SOURCE_TABLE_ENTRIES_MAX,

            /// Microseconds a shard spins before sleeping when idle: lower wake-up latency for a core of CPU. [default: 0]
            #[arg(long, value_name = "MICROS")]
            spin_before_park_us: u64 = 0; within 0..=limits::SPIN_BEFORE_PARK_US_MAX,

            /// Log lines as `text` (one human-readable line each) or `json`. [default: text]
            #[arg(long, value_enum, value_name = "FORMAT")]
            log_format: LogFormat = LogFormat::Text,

            /// Least severe level logged: error, warn, info, debug, trace; RUST_LOG overrides it. [default: info]
            #[arg(long, value_name = "LEVEL")]
            log_level: String = "info".into(),
        }
    };
}

/// Declares `ServeArgs` from the table's entries, with `or` (one layer of
/// settings over another) and `table_defaults` (the bottom layer).
macro_rules! declare_serve_args {
    (
        ()
        $(
            $(#[$attribute:meta])*
            $name:ident: $type:ty $(= $default:expr $(; within $range:expr)?)?,
        )*
    ) => {
        /// Every setting of `serve`. All are optional here so that a flag can be told
        /// apart from a value in the config file; defaults are applied in `resolve`.
        #[derive(Debug, Default, Clone, Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct ServeArgs {
            $(
                $(#[$attribute])*
                pub $name: Option<$type>,
            )*
        }

        impl ServeArgs {
            /// Fills every setting left unset here from `lower`: the flags from
            /// the file, and either from the table's defaults.
            pub fn or(self, lower: ServeArgs) -> ServeArgs {
                ServeArgs {
                    $($name: self.$name.or(lower.$name),)*
                }
            }

            /// The table's defaults, and `None` for a setting that has none.
            fn table_defaults() -> ServeArgs {
                ServeArgs {
                    $($name: some_if_given!($($default)?),)*
                }
            }
        }
    };
}

/// `Some(value)`, or `None` when the table gives no value.
macro_rules! some_if_given {
    () => {
        None
    };
    ($value:expr) => {
        Some($value)
    };
}

/// `Config { <the given fields>, <every number of the table> }`, where a number is
/// its value in `$args` (which already holds the defaults) checked against its
/// range. It returns from the enclosing function with the first number out of range,
/// in table order.
macro_rules! config_with_numbers {
    (
        (($args:ident) Config { $($given:tt)* })
        $(
            $(#[$attribute:meta])*
            $name:ident: $type:ty $(= $default:expr $(; within $range:expr)?)?,
        )*
    ) => {
        Config {
            $($given)*
            $($($($name: within(stringify!($name), $args.$name, $range)?,)?)?)*
        }
    };
}

serve_settings!(declare_serve_args);

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
    pub durability: Durability,
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

    /// Applies the table's defaults and checks every setting: first those with a
    /// rule of their own, in this order, then the numbers in table order. With
    /// several faults, the message names the first.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        // After the defaults, a setting can only be unset if the table gives it
        // none: `required` then fails for it, and for nothing else.
        let args = self.or(ServeArgs::table_defaults());
        let placement = required(args.placement, "placement")?;
        let cores = resolve_cores(args.cores, placement)?;
        let redis_url = check_redis_url(RedisUrl::new(required(args.redis, "redis")?))?;
        let prefix = required(args.prefix, "prefix")?;
        check_prefix(&prefix)?;
        let udp = required(args.udp, "udp")?;
        let tcp = required(args.tcp, "tcp")?;
        let log_level = check_log_level(required(args.log_level, "log_level")?)?;
        let log_format = required(args.log_format, "log_format")?;
        let durability = required(args.durability, "durability")?;
        let auth = match &args.auth_secret_file {
            Some(paths) => Some(crate::host::secrets::load(paths)?),
            None => None,
        };
        // The numbers, each checked against its range in the table.
        Ok(serve_settings!(config_with_numbers(args) Config {
            cores,
            placement,
            udp,
            tcp,
            redis_url,
            metrics: args.metrics,
            log_format,
            log_level,
            prefix,
            hdr_out: args.hdr_out,
            auth,
            durability,
        }))
    }
}

impl Config {
    /// What the pipeline takes from the command line.
    pub(crate) fn pipeline_settings(&self) -> crate::pipeline::Settings {
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
    pub(crate) fn store_settings(&self) -> crate::redis::store::StoreSettings {
        crate::redis::store::StoreSettings {
            redis_url: self.redis_url.clone(),
            call_timeout_ms: self.redis_timeout_ms,
            batches_in_flight_max: self.batches_in_flight_max,
            prefix: self.prefix.clone(),
            dedup_window_secs: self.dedup_window_secs,
            partitions: self.partitions,
            durability: self.durability,
        }
    }

    /// What intake takes from the command line.
    pub(crate) fn intake_settings(&self) -> crate::intake::Settings {
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

/// The value of a setting that must be set, by a flag, the file or the table.
fn required<T>(value: Option<T>, key: &str) -> Result<T, ConfigError> {
    value.ok_or_else(|| {
        ConfigError::new(format!(
            "--{} is required (as a flag or `{key}` in --config)",
            key.replace('_', "-")
        ))
    })
}

/// A number of the table, checked against its range.
fn within<T>(key: &str, value: Option<T>, range: RangeInclusive<T>) -> Result<T, ConfigError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    let value = required(value, key)?;
    if !range.contains(&value) {
        return Err(ConfigError::new(format!(
            "--{} {value} is out of range {}..={}",
            key.replace('_', "-"),
            range.start(),
            range.end()
        )));
    }
    Ok(value)
}

/// A standalone `redis://` url or a cluster's `redis-cluster://` seed nodes, which fred must
/// take, so that a bad url stops the start instead of being retried forever.
fn check_redis_url(redis_url: RedisUrl) -> Result<RedisUrl, ConfigError> {
    redis_url
        .fred_config()
        .map_err(|reason| ConfigError::new(format!("--redis: {reason}")))?;
    Ok(redis_url)
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
        && prefix.len() <= limits::PREFIX_BYTES_MAX
        && prefix
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'{' && byte != b'}');
    if !valid {
        return Err(ConfigError::new(format!(
            "--prefix {prefix:?} must be 1..={} printable ascii characters without spaces or braces",
            limits::PREFIX_BYTES_MAX
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

    /// The `[default: X]` each flag's help states is the table's default, read as the config
    /// file would read it; `off` and `none` mean no default. So the help, the sample config
    /// (tests/host/test-units.sh compares it with these docs) and the code agree.
    #[test]
    fn documented_defaults_are_the_table_defaults() {
        let serve = ServeArgs::augment_args(clap::Command::new("serve"));
        let mut documented = String::new();
        for arg in serve.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some((_, rest)) = help.split_once("[default: ") else {
                continue;
            };
            let value = &rest[..rest.find(']').expect("a closing bracket")];
            if value == "off" || value == "none" {
                continue;
            }
            let value = match value.parse::<u64>() {
                Ok(number) => number.to_string(),
                Err(_) => format!("{value:?}"),
            };
            documented.push_str(&format!("{} = {value}\n", arg.get_id()));
        }
        let parsed: ServeArgs = toml::from_str(&documented).unwrap();
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", ServeArgs::table_defaults()),
            "the documented defaults:\n{documented}"
        );
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

    /// The smallest `serve` command line, with `--durability mode`.
    fn serve_with_durability(mode: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([
            "shardgate",
            "serve",
            "--cores",
            "0",
            "--udp",
            "127.0.0.1:7000",
            "--tcp",
            "127.0.0.1:7000",
            "--redis",
            "redis://127.0.0.1:6379",
            "--durability",
            mode,
        ])
    }

    /// `--durability` is `local` by default, `replica` from a flag or the file; a bad value is
    /// refused with a lowercase message naming the choices, by clap and by the file.
    #[test]
    fn durability_parses() {
        assert_eq!(minimal().resolve().unwrap().durability, Durability::Local);
        let from_file: ServeArgs = toml::from_str("durability = \"replica\"").unwrap();
        let config = minimal().or(from_file.clone()).resolve().unwrap();
        assert_eq!(config.durability, Durability::Replica);
        assert_eq!(config.store_settings().durability, Durability::Replica);
        let flag = ServeArgs {
            durability: Some(Durability::Local),
            ..minimal()
        };
        assert_eq!(flag.or(from_file).resolve().unwrap().durability, Durability::Local);
        let error = toml::from_str::<ServeArgs>("durability = \"replicas\"").unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("`local`") && message.contains("`replica`"),
            "{message}"
        );
        let message = serve_with_durability("Replica2").unwrap_err().to_string();
        assert!(
            message.contains("invalid value 'Replica2' for '--durability <MODE>'"),
            "{message}"
        );
        assert!(message.contains("[possible values: local, replica]"), "{message}");
        let Command::Serve(args) = serve_with_durability("replica").unwrap().command;
        assert_eq!(args.resolve().unwrap().durability, Durability::Replica);
        assert_eq!(Durability::Replica.name(), "replica");
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
