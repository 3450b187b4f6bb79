//! The Prometheus endpoint: `GET /metrics` on `--metrics ADDR`.
//!
//! It runs on its own thread, outside every shard, so a scrape never takes a
//! shard's time: it reads the shards' single-writer atomics (`metrics.rs`)
//! when asked.
//!
//! Every metric is one row of `FAMILIES`, and one writer turns the table into
//! either format: the Prometheus text format 0.0.4, which `promtool check
//! metrics` and `curl` readers expect, or OpenMetrics 1.0 for a scraper whose
//! `Accept` header names it (Prometheus does). The two differ only in a
//! family's comment lines and the closing `# EOF`, so their samples cannot
//! drift apart, and nothing has to parse one format to produce the other.
//! Numbers are written from the recorded integers, never through a float: a
//! bucket's `le` is a string to PromQL, and the alert rules match
//! `le="0.005"`, so its spelling must not depend on float printing.
//!
//! Connections are served one at a time, each request within one deadline
//! (`REQUEST_DEADLINE`) for its whole read and write, which bounds what a
//! misbehaving scraper can hold: one socket, one 8 KiB request buffer, one
//! response, for 2 s at most. A per-read timeout alone would let a client
//! that sends or reads one byte a second hold the endpoint for hours.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::telemetry::metrics::{
    CloseReason, EventErrorReason, HistogramReading, LookupOutcome, Redirection, RedisErrorKind, RetryCause,
    ShardMetrics, Transport,
};
use crate::wire::frame::{RejectReason, Status};

const REQUEST_BYTES_MAX: usize = 8 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// docs/operations.md promises every name starts with it.
const NAME_PREFIX: &str = "shardgate_";
/// Labels a family may have besides `shard`: two cover every family, and a
/// fixed count lets a row's reader take its indexes as an array pattern.
const LABELS_MAX: usize = 2;
/// A little over what the comments and process-wide series take (some 3 KiB)
/// and what one shard's series take (some 9 KiB, more as counters grow
/// digits), so the body is allocated once per scrape.
const BODY_BYTES_FIXED: usize = 4 * 1024;
const BODY_BYTES_PER_SHARD: usize = 10 * 1024;
/// What one Redis node's series of one shard take (28 lines with the node's address).
const BODY_BYTES_PER_NODE: usize = 3 * 1024;

/// Binds the endpoint and serves it on a thread for the life of the process.
pub fn start(address: SocketAddr, shards: Vec<Arc<ShardMetrics>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("shardgate-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // A failed request concerns only its own scraper.
                let _ = serve(stream, &shards);
            }
        })?;
    Ok(bound)
}

/// A connection whose every read and write must finish by one deadline.
struct DeadlineStream {
    stream: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn remaining(&self) -> std::io::Result<Duration> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "metrics request passed its deadline",
            ));
        }
        Ok(remaining)
    }

    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        self.stream.read(buffer)
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            self.stream.set_write_timeout(Some(self.remaining()?))?;
            match self.stream.write(bytes)? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                written => bytes = &bytes[written..],
            }
        }
        Ok(())
    }
}

fn serve(stream: TcpStream, shards: &[Arc<ShardMetrics>]) -> std::io::Result<()> {
    let mut stream = DeadlineStream {
        stream,
        deadline: Instant::now() + REQUEST_DEADLINE,
    };
    let mut request = [0u8; REQUEST_BYTES_MAX];
    let mut length = 0;
    while !request[..length].windows(4).any(|window| window == b"\r\n\r\n") && length < request.len() {
        let read = stream.read(&mut request[length..])?;
        if read == 0 {
            break;
        }
        length += read;
    }
    let request = &request[..length];
    let is_metrics = request.starts_with(b"GET /metrics ") || request.starts_with(b"GET /metrics?");
    if !is_metrics {
        return stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let format = Format::asked_for(request);
    let body = render(shards, format);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        format.content_type(),
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// The Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics only when the `Accept` header names it: curl, promtool and
    /// older scrapers read only the text format.
    fn asked_for(request: &[u8]) -> Format {
        let request = String::from_utf8_lossy(request);
        let named = request.lines().any(|line| {
            let line = line.to_ascii_lowercase();
            line.starts_with("accept:") && line.contains("application/openmetrics-text")
        });
        if named {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// One metric family: all that either format says about it. A new metric is
/// a new row of `FAMILIES`, plus its counter in `ShardMetrics`.
struct Family {
    /// After `shardgate_`, ending in the unit if it has one. A counter's
    /// samples add `_total`.
    name: &'static str,
    help: &'static str,
    /// The unit `name` ends with, which OpenMetrics states in `# UNIT`.
    unit: Option<&'static str>,
    /// The labels after `shard`, in the order they are written; each series is
    /// one combination of their values.
    labels: &'static [Label],
    /// The metric type, and how to read one series.
    value: Value,
}

/// The `ShardMetrics` array index each of a family's labels selects, in the
/// order of `Family::labels` (0 past its last label). The indexes are the
/// label enums' discriminants and `ShardMetrics` sizes its arrays by the same
/// enums, so a reader cannot index past its array; the tests render every
/// row with every label value to hold that.
type Slots = [usize; LABELS_MAX];

#[derive(Clone, Copy)]
enum Value {
    Counter(fn(&ShardMetrics, Slots) -> u64),
    Gauge(fn(&ShardMetrics, Slots) -> i64),
    Histogram(fn(&ShardMetrics, Slots) -> HistogramReading, Recorded),
    /// Of the whole process rather than of a shard: no `shard` label, and read
    /// once per scrape.
    ProcessGauge(fn() -> i64),
}

impl Value {
    fn type_name(self) -> &'static str {
        match self {
            Value::Counter(_) => "counter",
            Value::Gauge(_) | Value::ProcessGauge(_) => "gauge",
            Value::Histogram(..) => "histogram",
        }
    }
}

/// The unit a histogram records its integers in, against the one its family
/// name states.
#[derive(Clone, Copy)]
enum Recorded {
    /// In the unit the name states, or none (events per call).
    AsNamed,
    /// Named in seconds: the data path records whole microseconds, which six
    /// decimal places show exactly.
    Microseconds,
}

impl Recorded {
    fn decimal_places(self) -> u32 {
        match self {
            Recorded::AsNamed => 0,
            Recorded::Microseconds => 6,
        }
    }
}

/// What a family's series are split by. Each value also selects the slot of
/// the `ShardMetrics` array that counts it, the enum's discriminant.
#[derive(Clone, Copy, Debug)]
enum Label {
    Transport,
    /// `transport`, but only `udp`: for what only UDP counts.
    UdpTransport,
    Status,
    /// The `reason` of a REJECTED answer; a crc mismatch never gets one
    /// (`frames_corrupt` counts those).
    RejectReason,
    LookupOutcome,
    RetryCause,
    RedisErrorKind,
    EventErrorReason,
    CloseReason,
    /// A Redis node, `host:port`: a shard's own values (`RedisNodes`), whose slot is the
    /// node's row.
    Node,
    Redirection,
    /// The running build's version, for `build_info`.
    Version,
}

/// One label of one series.
#[derive(Clone, Copy, Debug)]
struct LabelValue<'a> {
    name: &'static str,
    value: &'a str,
    slot: usize,
}

impl Label {
    fn name(self) -> &'static str {
        match self {
            Label::Transport | Label::UdpTransport => "transport",
            Label::Status => "status",
            Label::RejectReason | Label::EventErrorReason | Label::CloseReason => "reason",
            Label::LookupOutcome => "outcome",
            Label::RetryCause => "cause",
            Label::RedisErrorKind | Label::Redirection => "kind",
            Label::Node => "node",
            Label::Version => "version",
        }
    }

    /// The value at `position`, in the order of the enum's `ALL` (a node's: the order the
    /// shard named them in), which is the order series are written in; `None` past the last.
    /// Only `Node` reads the shard, and has no value without one.
    fn value(self, position: usize, shard: Option<&ShardMetrics>) -> Option<LabelValue<'_>> {
        let (slot, value) = match self {
            Label::Transport => Transport::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::UdpTransport => [Transport::Udp].get(position).map(|&it| (it as usize, it.name())),
            Label::Status => Status::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::RejectReason => (RejectReason::ALL.iter())
                .filter(|&&reason| reason != RejectReason::Crc)
                .nth(position)
                .map(|&it| (it as usize, it.name())),
            Label::LookupOutcome => LookupOutcome::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::RetryCause => RetryCause::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::RedisErrorKind => RedisErrorKind::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::EventErrorReason => EventErrorReason::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::CloseReason => CloseReason::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::Node => shard?.redis_by_node.shown().nth(position),
            Label::Redirection => Redirection::ALL.get(position).map(|&it| (it as usize, it.name())),
            Label::Version => (position == 0).then_some((0, env!("CARGO_PKG_VERSION"))),
        }?;
        Some(LabelValue {
            name: self.name(),
            value,
            slot,
        })
    }
}

/// Every metric, in the order it is written.
const FAMILIES: &[Family] = &[
    Family {
        name: "frames_received",
        help: "Frames read whose header parsed.",
        unit: None,
        labels: &[Label::Transport],
        value: Value::Counter(|shard, [transport, _]| shard.frames_received[transport].get()),
    },
    Family {
        name: "received_bytes",
        help: "Bytes read from clients.",
        unit: Some("bytes"),
        labels: &[Label::Transport],
        value: Value::Counter(|shard, [transport, _]| shard.bytes_received[transport].get()),
    },
    Family {
        name: "acks_sent",
        help: "Answers sent, by status.",
        unit: None,
        labels: &[Label::Transport, Label::Status],
        value: Value::Counter(|shard, [transport, status]| shard.acks_sent[transport][status].get()),
    },
    Family {
        name: "frames_rejected",
        help: "Frames answered REJECTED, by reason (a crc mismatch is never answered: frames_corrupt).",
        unit: None,
        labels: &[Label::Transport, Label::RejectReason],
        value: Value::Counter(|shard, [transport, reason]| shard.frames_rejected[transport][reason].get()),
    },
    Family {
        name: "input_unparseable",
        help: "Inputs without a parseable header: UDP datagram tails dropped unanswered, TCP connections closed.",
        unit: None,
        labels: &[Label::Transport],
        value: Value::Counter(|shard, [transport, _]| shard.unparseable[transport].get()),
    },
    Family {
        name: "frames_corrupt",
        help: "Whole frames whose crc32c did not match: never answered; a TCP connection that sends one is closed.",
        unit: None,
        labels: &[Label::Transport],
        value: Value::Counter(|shard, [transport, _]| shard.frames_corrupt[transport].get()),
    },
    Family {
        name: "udp_receive_errors",
        help: "Errors the UDP socket returned on receive.",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| shard.udp_receive_errors.get()),
    },
    Family {
        name: "frames_limited",
        help: "Frames dropped unanswered because their source was over its per-source rate (UDP only).",
        unit: None,
        labels: &[Label::UdpTransport],
        value: Value::Counter(|shard, [transport, _]| shard.frames_limited[transport].get()),
    },
    Family {
        name: "udp_kernel_drops",
        help: "Datagrams the kernel dropped for a full socket buffer (the socket's SO_RXQ_OVFL count).",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| udp_drops(shard)),
    },
    Family {
        name: "dedup_lookups",
        help: "Dedup decisions, by where they were made.",
        unit: None,
        labels: &[Label::LookupOutcome],
        value: Value::Counter(|shard, [outcome, _]| shard.dedup_lookups[outcome].get()),
    },
    Family {
        name: "dedup_cache_events",
        help: "Event ids held in the shard's dedup cache.",
        unit: None,
        labels: &[],
        value: Value::Gauge(|shard, _| shard.dedup_cache_events.get()),
    },
    Family {
        name: "dedup_cache_evictions",
        help: "Ids evicted from the dedup cache.",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| shard.dedup_cache_evictions.get()),
    },
    Family {
        name: "batch_events",
        help: "Events per batch: one Redis script call standalone, one call per partition it holds on a cluster.",
        unit: None,
        labels: &[],
        value: Value::Histogram(|shard, _| shard.batch_events.read(), Recorded::AsNamed),
    },
    Family {
        name: "redis_round_trip_seconds",
        help: "Duration of one Redis script call, by the node it went to.",
        unit: Some("seconds"),
        labels: &[Label::Node],
        value: Value::Histogram(
            |shard, [node, _]| shard.redis_by_node.row_at(node).round_trip_us.read(),
            Recorded::Microseconds,
        ),
    },
    Family {
        name: "redis_errors",
        help: "Failed Redis script calls, by node and kind.",
        unit: None,
        labels: &[Label::Node, Label::RedisErrorKind],
        value: Value::Counter(|shard, [node, kind]| shard.redis_by_node.row_at(node).errors[kind].get()),
    },
    Family {
        name: "redis_redirections",
        help: "Script calls a Redis Cluster node answered with MOVED or ASK, which the client followed, by node.",
        unit: None,
        labels: &[Label::Node, Label::Redirection],
        value: Value::Counter(|shard, [node, kind]| shard.redis_by_node.row_at(node).redirections[kind].get()),
    },
    Family {
        name: "redis_calls",
        help:
            "Redis script calls: one per batch on a standalone Redis, one per partition group of a batch on a cluster.",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| shard.redis_calls.get()),
    },
    Family {
        name: "redis_nodes",
        help: "Redis nodes the shard is connected to: 1 on a standalone Redis, every master on a cluster.",
        unit: None,
        labels: &[],
        value: Value::Gauge(|shard, _| shard.redis_nodes.get()),
    },
    Family {
        name: "redis_event_errors",
        help: "Events Redis refused one by one (answered RETRY; the rest of their batch was stored), by reason.",
        unit: None,
        labels: &[Label::EventErrorReason],
        value: Value::Counter(|shard, [reason, _]| shard.redis_event_errors[reason].get()),
    },
    Family {
        name: "redis_reconnects",
        help: "Times the Redis connection came back.",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| shard.redis_reconnects.get()),
    },
    Family {
        name: "redis_wait_shortfalls",
        help: "WAIT calls after a script call (--durability replica) that no replica confirmed in time, by node; their events got RETRY.",
        unit: None,
        labels: &[Label::Node],
        value: Value::Counter(|shard, [node, _]| shard.redis_by_node.row_at(node).wait_shortfalls.get()),
    },
    Family {
        name: "redis_up",
        help: "1 while the shard's Redis connection is up.",
        unit: None,
        labels: &[],
        value: Value::Gauge(|shard, _| shard.redis_up.get()),
    },
    Family {
        name: "events_in_flight",
        help: "Events batched or in Redis, not yet answered.",
        unit: None,
        labels: &[],
        value: Value::Gauge(|shard, _| shard.events_in_flight.get()),
    },
    Family {
        name: "retries",
        help: "Frames answered RETRY, by cause.",
        unit: None,
        labels: &[Label::RetryCause],
        value: Value::Counter(|shard, [cause, _]| shard.retries[cause].get()),
    },
    Family {
        name: "tcp_connections_open",
        help: "Open TCP connections.",
        unit: None,
        labels: &[],
        value: Value::Gauge(|shard, _| shard.tcp_connections_open.get()),
    },
    Family {
        name: "tcp_connections_accepted",
        help: "TCP connections accepted.",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| shard.tcp_connections_accepted.get()),
    },
    Family {
        name: "tcp_connections_closed",
        help: "TCP connections ended, by reason.",
        unit: None,
        labels: &[Label::CloseReason],
        value: Value::Counter(|shard, [reason, _]| shard.tcp_connections_closed[reason].get()),
    },
    Family {
        name: "reply_send_errors",
        help: "Answers the socket refused to send.",
        unit: None,
        labels: &[],
        value: Value::Counter(|shard, _| shard.reply_send_errors.get()),
    },
    Family {
        name: "intake_to_ack_seconds",
        help: "From a frame's read to its answer.",
        unit: Some("seconds"),
        labels: &[Label::Transport],
        value: Value::Histogram(
            |shard, [transport, _]| shard.intake_to_ack_us[transport].read(),
            Recorded::Microseconds,
        ),
    },
    Family {
        name: "process_resident_memory_bytes",
        help: "Resident set size of the process.",
        unit: Some("bytes"),
        labels: &[],
        value: Value::ProcessGauge(resident_memory_bytes),
    },
    Family {
        name: "build_info",
        help: "Always 1; labels say which build runs.",
        unit: None,
        labels: &[Label::Version],
        value: Value::ProcessGauge(|| 1),
    },
];

// `label_sets` combines at most `LABELS_MAX` labels: a row with more must not build.
const _: () = {
    let mut row = 0;
    while row < FAMILIES.len() {
        assert!(
            FAMILIES[row].labels.len() <= LABELS_MAX,
            "a family has more labels than LABELS_MAX"
        );
        row += 1;
    }
};

/// Every combination of the labels' values, the last label varying fastest;
/// a family without labels has one series, so one empty combination. `shard` gives the
/// values of `node`; a family with it has no series without one.
fn label_sets<'a>(
    labels: &'static [Label],
    shard: Option<&'a ShardMetrics>,
) -> impl Iterator<Item = [Option<LabelValue<'a>>; LABELS_MAX]> + 'a {
    let values = move |label: Option<Label>| {
        (0..).map_while(move |position| match label {
            None => (position == 0).then_some(None),
            Some(label) => label.value(position, shard).map(Some),
        })
    };
    let (outer, inner) = (labels.first().copied(), labels.get(1).copied());
    values(outer).flat_map(move |first| values(inner).map(move |second| [first, second]))
}

fn render(shards: &[Arc<ShardMetrics>], format: Format) -> String {
    let mut exposition = Exposition {
        text: String::with_capacity(
            BODY_BYTES_FIXED
                + shards
                    .iter()
                    .map(|shard| BODY_BYTES_PER_SHARD + BODY_BYTES_PER_NODE * shard.redis_by_node.named_count())
                    .sum::<usize>(),
        ),
        format,
    };
    for family in FAMILIES {
        exposition.family(family, shards);
    }
    if format == Format::OpenMetrics {
        exposition.text.push_str("# EOF\n");
    }
    exposition.text
}

/// An exposition being written. It is written into a `String`, which cannot
/// fail, so nothing here returns an error.
struct Exposition {
    text: String,
    format: Format,
}

/// Which series of a family a sample line belongs to.
struct Series<'a> {
    /// `None` for a process-wide family.
    shard: Option<usize>,
    labels: [Option<LabelValue<'a>>; LABELS_MAX],
}

impl Series<'_> {
    fn slots(&self) -> Slots {
        self.labels.map(|label| label.map_or(0, |label| label.slot))
    }
}

/// A histogram bucket's `le` label.
struct UpperBound {
    /// In the recorded unit; `None` is +Inf.
    bound: Option<u64>,
    recorded: Recorded,
}

impl Exposition {
    fn family(&mut self, family: &Family, shards: &[Arc<ShardMetrics>]) {
        self.comments(family);
        if let Value::ProcessGauge(read) = family.value {
            let value = read();
            for labels in label_sets(family.labels, None) {
                self.sample_start(family, "", &Series { shard: None, labels }, None);
                self.integer_line_end(value);
            }
            return;
        }
        for (index, shard) in shards.iter().enumerate() {
            for labels in label_sets(family.labels, Some(shard)) {
                let series = Series {
                    shard: Some(index),
                    labels,
                };
                self.shard_series(family, shard, &series);
            }
        }
    }

    /// `# HELP` and `# TYPE`, and OpenMetrics' `# UNIT`. The text format's
    /// comments name the samples they describe, so a counter's name there ends
    /// in `_total`; OpenMetrics' name the family, without it.
    fn comments(&mut self, family: &Family) {
        let total = match (self.format, family.value) {
            (Format::Text, Value::Counter(_)) => "_total",
            _ => "",
        };
        for (keyword, text) in [("# HELP ", family.help), ("# TYPE ", family.value.type_name())] {
            for part in [keyword, NAME_PREFIX, family.name, total, " ", text, "\n"] {
                self.text.push_str(part);
            }
        }
        if let (Format::OpenMetrics, Some(unit)) = (self.format, family.unit) {
            for part in ["# UNIT ", NAME_PREFIX, family.name, " ", unit, "\n"] {
                self.text.push_str(part);
            }
        }
    }

    fn shard_series(&mut self, family: &Family, shard: &ShardMetrics, series: &Series) {
        match family.value {
            Value::Counter(read) => {
                self.sample_start(family, "_total", series, None);
                self.integer_line_end(read(shard, series.slots()));
            }
            Value::Gauge(read) => {
                self.sample_start(family, "", series, None);
                self.integer_line_end(read(shard, series.slots()));
            }
            Value::Histogram(read, recorded) => {
                let reading = read(shard, series.slots());
                self.sample_start(family, "_sum", series, None);
                push_decimal(&mut self.text, reading.sum, recorded.decimal_places());
                self.text.push('\n');
                self.sample_start(family, "_count", series, None);
                self.integer_line_end(reading.count());
                for (bound, cumulative) in reading.buckets() {
                    self.sample_start(family, "_bucket", series, Some(UpperBound { bound, recorded }));
                    self.integer_line_end(cumulative);
                }
            }
            // Not a shard's: `family` writes it once.
            Value::ProcessGauge(_) => {}
        }
    }

    /// A sample line up to its value: `shardgate_<name><suffix>{le,shard,labels} `.
    /// `le` leads, as it always has: order means nothing to a parser, but
    /// keeping it keeps the bytes scrapers and tests have seen.
    fn sample_start(&mut self, family: &Family, suffix: &str, series: &Series, le: Option<UpperBound>) {
        let text = &mut self.text;
        for part in [NAME_PREFIX, family.name, suffix] {
            text.push_str(part);
        }
        let mut opened = false;
        let mut label_start = |text: &mut String, name: &str| {
            text.push(if opened { ',' } else { '{' });
            opened = true;
            text.push_str(name);
            text.push_str("=\"");
        };
        if let Some(le) = le {
            label_start(text, "le");
            match le.bound {
                Some(bound) => push_decimal(text, bound, le.recorded.decimal_places()),
                None => text.push_str("+Inf"),
            }
            text.push('"');
        }
        if let Some(shard) = series.shard {
            label_start(text, "shard");
            text.push_str(itoa::Buffer::new().format(shard));
            text.push('"');
        }
        // Label values are the enums' names, the version and node addresses, which never need
        // escaping (`RedisNodes::row` names no node whose address would).
        for label in series.labels.iter().flatten() {
            label_start(text, label.name);
            text.push_str(label.value);
            text.push('"');
        }
        if opened {
            text.push('}');
        }
        text.push(' ');
    }

    fn integer_line_end(&mut self, value: impl itoa::Integer) {
        self.text.push_str(itoa::Buffer::new().format(value));
        self.text.push('\n');
    }
}

/// Writes `value / 10^decimal_places` exactly, with at least one decimal
/// (`1.0`, `0.00001`, `2.138478`): how these values have always been spelled,
/// which matters for `le`.
fn push_decimal(text: &mut String, value: u64, decimal_places: u32) {
    let scale = 10u64.pow(decimal_places);
    text.push_str(itoa::Buffer::new().format(value / scale));
    text.push('.');
    let fraction = value % scale;
    if fraction == 0 {
        text.push('0');
        return;
    }
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(fraction);
    for _ in digits.len()..decimal_places as usize {
        text.push('0');
    }
    text.push_str(digits.trim_end_matches('0'));
}

/// 0 when /proc cannot say: a scrape should not fail for one gauge.
fn resident_memory_bytes() -> i64 {
    let kib = || -> Option<i64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    kib().map_or(0, |kib| kib.saturating_mul(1024))
}

/// The kernel's drop count for the shard's UDP socket: the `drops` column of
/// /proc/net/udp{,6}, which is the counter SO_RXQ_OVFL reports. Reading it at
/// scrape time costs the data path nothing.
fn udp_drops(shard: &ShardMetrics) -> u64 {
    let inode = shard.udp_socket_inode.load(std::sync::atomic::Ordering::Relaxed);
    if inode == 0 {
        return 0;
    }
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|table| drops_for_inode(&table, inode))
        .unwrap_or(0)
}

fn drops_for_inode(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
        let line_inode: u64 = columns.get(9)?.parse().ok()?;
        (line_inode == inode).then(|| columns.get(12)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Counter;

    /// A shard whose every counter holds a value of its own, so a series read
    /// from another's slot shows.
    fn numbered_shard(base: u64) -> ShardMetrics {
        let shard = ShardMetrics::default();
        let mut next = base;
        let mut count = |counter: &Counter| {
            next += 1;
            counter.add(next);
        };
        for transport in 0..Transport::ALL.len() {
            count(&shard.frames_received[transport]);
            count(&shard.bytes_received[transport]);
            shard.acks_sent[transport].iter().for_each(&mut count);
            shard.frames_rejected[transport].iter().for_each(&mut count);
            count(&shard.unparseable[transport]);
            count(&shard.frames_corrupt[transport]);
            count(&shard.frames_limited[transport]);
        }
        count(&shard.udp_receive_errors);
        shard.dedup_lookups.iter().for_each(&mut count);
        count(&shard.dedup_cache_evictions);
        // Two nodes, named in this order.
        for (host, port) in [("10.0.0.1", 7000), ("10.0.0.2", 7001)] {
            let node = shard.redis_by_node.at(shard.redis_by_node.row(host, port));
            node.errors.iter().for_each(&mut count);
            node.redirections.iter().for_each(&mut count);
            count(&node.wait_shortfalls);
        }
        shard.redis_event_errors.iter().for_each(&mut count);
        count(&shard.redis_reconnects);
        shard.retries.iter().for_each(&mut count);
        count(&shard.tcp_connections_accepted);
        shard.tcp_connections_closed.iter().for_each(&mut count);
        count(&shard.reply_send_errors);
        shard.dedup_cache_events.set(base as i64 + 7);
        shard.redis_up.set(1);
        shard.events_in_flight.set(-(base as i64) - 3);
        shard.tcp_connections_open.set(base as i64 + 11);
        for value in [0, 1, 3, 17, 1024, 5000] {
            shard.batch_events.observe(value + base);
        }
        let first_node = shard.redis_by_node.at(shard.redis_by_node.row("10.0.0.1", 7000));
        for value in [1, 10, 11, 4_999, 5_000, 5_001, 123_456, 2_000_000] {
            first_node.round_trip_us.observe(value + base);
            shard.intake_to_ack_us[0].observe(value * 2 + base);
            shard.intake_to_ack_us[1].observe(value * 3 + base);
        }
        shard
    }

    /// Two numbered shards and an idle one.
    fn rendered(format: Format) -> String {
        let shards = [numbered_shard(0), numbered_shard(1000), ShardMetrics::default()].map(Arc::new);
        render(&shards, format)
    }

    fn samples(exposition: &str) -> Vec<&str> {
        exposition.lines().filter(|line| !line.starts_with('#')).collect()
    }

    /// Lines copied from what the prometheus-client encoder wrote for the same
    /// shards: the spellings alert rules, dashboards and parsers depend on.
    #[test]
    fn lines_as_scrapers_know_them() {
        let text = rendered(Format::Text);
        let version = env!("CARGO_PKG_VERSION");
        let build_info = format!("shardgate_build_info{{version=\"{version}\"}} 1");
        for line in [
            "# HELP shardgate_acks_sent_total Answers sent, by status.",
            "# TYPE shardgate_acks_sent_total counter",
            "shardgate_acks_sent_total{shard=\"1\",transport=\"tcp\",status=\"rejected\"} 1019",
            "shardgate_frames_rejected_total{shard=\"0\",transport=\"udp\",reason=\"length\"} 8",
            "shardgate_frames_limited_total{shard=\"1\",transport=\"udp\"} 1013",
            "shardgate_received_bytes_total{shard=\"0\",transport=\"tcp\"} 15",
            "shardgate_udp_kernel_drops_total{shard=\"0\"} 0",
            "shardgate_events_in_flight{shard=\"1\"} -1003",
            "# TYPE shardgate_batch_events histogram",
            "shardgate_batch_events_sum{shard=\"0\"} 6045.0",
            "shardgate_batch_events_bucket{le=\"1024.0\",shard=\"0\"} 5",
            "shardgate_redis_round_trip_seconds_sum{shard=\"0\",node=\"10.0.0.1:7000\"} 2.138478",
            "shardgate_redis_round_trip_seconds_count{shard=\"0\",node=\"10.0.0.1:7000\"} 8",
            "shardgate_redis_round_trip_seconds_bucket{le=\"0.00001\",shard=\"0\",node=\"10.0.0.1:7000\"} 2",
            "shardgate_redis_round_trip_seconds_bucket{le=\"1.0\",shard=\"0\",node=\"10.0.0.1:7000\"} 7",
            "shardgate_redis_round_trip_seconds_count{shard=\"0\",node=\"10.0.0.2:7001\"} 0",
            "shardgate_redis_errors_total{shard=\"1\",node=\"10.0.0.2:7001\",kind=\"cluster\"} 1047",
            "shardgate_redis_redirections_total{shard=\"0\",node=\"10.0.0.1:7000\",kind=\"ask\"} 40",
            "shardgate_redis_wait_shortfalls_total{shard=\"0\",node=\"10.0.0.2:7001\"} 50",
            "shardgate_intake_to_ack_seconds_bucket{le=\"0.005\",shard=\"0\",transport=\"udp\"} 3",
            "shardgate_intake_to_ack_seconds_bucket{le=\"+Inf\",shard=\"1\",transport=\"tcp\"} 8",
            "# TYPE shardgate_process_resident_memory_bytes gauge",
            &build_info,
        ] {
            assert!(
                text.lines().any(|written| written == line),
                "no line {line:?} in:\n{text}"
            );
        }
        // A shard that has named no node has no per-node series.
        assert!(!text.contains("shard=\"2\",node="), "{text}");
    }

    /// Both formats hold the same samples; the text format's comments name
    /// them, OpenMetrics' name the family and state units, and only
    /// OpenMetrics ends in `# EOF`.
    #[test]
    fn formats_differ_only_in_comments() {
        let text = rendered(Format::Text);
        let openmetrics = rendered(Format::OpenMetrics);
        // Resident memory moves between two renders.
        let steady = |line: &&str| !line.starts_with("shardgate_process_resident_memory_bytes ");
        let steady_samples = |exposition| samples(exposition).into_iter().filter(steady).collect::<Vec<_>>();
        assert_eq!(steady_samples(&text), steady_samples(&openmetrics));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT "));
        assert!(openmetrics.ends_with("\n# EOF\n"));
        assert!(text.contains("# TYPE shardgate_retries_total counter\n"));
        assert!(openmetrics.contains("# TYPE shardgate_retries counter\n"));
        assert!(
            openmetrics.contains("# TYPE shardgate_received_bytes counter\n# UNIT shardgate_received_bytes bytes\n")
        );
        for line in text.lines().filter_map(|line| line.strip_prefix("# TYPE ")) {
            let (name, _) = line.split_once(' ').unwrap_or((line, ""));
            let sample = if line.ends_with(" histogram") {
                format!("{name}_count")
            } else {
                name.to_string()
            };
            let described = |sample_line: &&str| {
                sample_line
                    .strip_prefix(sample.as_str())
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            };
            assert!(
                samples(&text).iter().any(described),
                "`# TYPE {line}` describes no sample"
            );
        }
    }

    /// Every counter series of a shard reads a slot no other series reads.
    #[test]
    fn series_read_their_own_slots() {
        let shards = [Arc::new(numbered_shard(0))];
        let text = render(&shards, Format::Text);
        let mut values: Vec<&str> = samples(&text)
            .into_iter()
            .filter(|line| line.contains("_total{") && !line.starts_with("shardgate_udp_kernel_drops"))
            .filter_map(|line| line.rsplit(' ').next())
            .collect();
        let series = values.len();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values.len(), series, "two counter series show the same slot");
    }

    /// Names are valid and unique and end in their unit; help and label values
    /// need no escaping in either format; each label lists every value once.
    #[test]
    fn table_rows_are_well_formed() {
        let shard = numbered_shard(0);
        let mut names: Vec<&str> = FAMILIES.iter().map(|family| family.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a name is used twice");
        for family in FAMILIES {
            let name_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
            assert!(family.name.chars().all(name_ok), "{}", family.name);
            assert!(!family.name.ends_with("_total"), "{}: `_total` is added", family.name);
            if let Some(unit) = family.unit {
                assert!(
                    family.name.ends_with(&format!("_{unit}")),
                    "{} is not in {unit}",
                    family.name
                );
            }
            assert!(
                !family.help.contains(['\\', '\n', '"']),
                "{}'s help needs escaping",
                family.name
            );
            for label in family.labels {
                let values: Vec<LabelValue> = (0..)
                    .map_while(|position| label.value(position, Some(&shard)))
                    .collect();
                assert!(values.iter().all(|value| !value.value.contains(['\\', '\n', '"'])));
                let mut distinct: Vec<usize> = values.iter().map(|value| value.slot).collect();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), values.len(), "{label:?} repeats a slot");
            }
        }
        let count = |label: Label| (0..).map_while(|position| label.value(position, Some(&shard))).count();
        assert_eq!(count(Label::Transport), Transport::ALL.len());
        assert_eq!(count(Label::UdpTransport), 1);
        assert_eq!(count(Label::Status), Status::ALL.len());
        assert_eq!(count(Label::RejectReason), RejectReason::ALL.len() - 1);
        assert_eq!(count(Label::LookupOutcome), LookupOutcome::ALL.len());
        assert_eq!(count(Label::RetryCause), RetryCause::ALL.len());
        assert_eq!(count(Label::RedisErrorKind), RedisErrorKind::ALL.len());
        assert_eq!(count(Label::EventErrorReason), EventErrorReason::ALL.len());
        assert_eq!(count(Label::CloseReason), CloseReason::ALL.len());
        assert_eq!(count(Label::Node), 2);
        assert_eq!(Label::Node.value(0, None).map(|value| value.value), None);
        assert_eq!(count(Label::Redirection), Redirection::ALL.len());
        assert_eq!(count(Label::Version), 1);
    }

    #[test]
    fn decimals_are_exact() {
        let decimal = |value: u64, decimal_places: u32| {
            let mut text = String::new();
            push_decimal(&mut text, value, decimal_places);
            text
        };
        assert_eq!(decimal(0, 6), "0.0");
        assert_eq!(decimal(10, 6), "0.00001");
        assert_eq!(decimal(5_000, 6), "0.005");
        assert_eq!(decimal(1_000_000, 6), "1.0");
        assert_eq!(decimal(2_138_478, 6), "2.138478");
        assert_eq!(decimal(u64::MAX, 6), "18446744073709.551615");
        assert_eq!(decimal(1024, 0), "1024.0");
    }

    /// Only an Accept header that names OpenMetrics gets it.
    #[test]
    fn accept_header_picks_the_format() {
        assert_eq!(
            Format::asked_for(
                b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
            ),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::asked_for(b"GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n\r\n"),
            Format::Text
        );
        assert_eq!(Format::asked_for(b"GET /metrics HTTP/1.1\r\n\r\n"), Format::Text);
    }

    /// The drops column is found by inode in the kernel's table format.
    #[test]
    fn drops_by_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                     1: 0100007F:1E14 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 17\n";
        assert_eq!(drops_for_inode(table, 4242), Some(17));
        assert_eq!(drops_for_inode(table, 1), None);
    }
}
