//! The Prometheus endpoint: `GET /metrics` on `--metrics ADDR`.
//!
//! It runs on its own thread, outside every shard, so a scrape never takes a
//! shard's time: it reads the shards' single-writer atomics (`metrics.rs`) and
//! encodes them with `prometheus-client`'s text encoder. That encoder writes
//! OpenMetrics; a scraper that asks for OpenMetrics (Prometheus does, in its
//! `Accept` header) gets it as is, anyone else the classic Prometheus text
//! format 0.0.4 (`to_prometheus_text`), which is what `promtool check metrics`
//! and `curl` readers expect. Connections are served
//! one at a time, each request within one deadline (`REQUEST_DEADLINE`) for
//! its whole read and write, which bounds what a misbehaving scraper can hold:
//! one socket, one 8 KiB request buffer, one response, for 2 s at most. A
//! per-read timeout alone would let a client that sends or reads one byte a
//! second hold the endpoint for hours.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::telemetry::metrics::{
    CloseReason, EventErrorReason, Histogram, LookupOutcome, RedisErrorKind, RetryCause, ShardMetrics, Transport,
};
use crate::wire::frame::{RejectReason, Status};

const REQUEST_BYTES_MAX: usize = 8 * 1024;
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
const MICROS_PER_SECOND: f64 = 1e6;

/// Binds the endpoint and serves it on a thread for the life of the process.
pub fn start(address: SocketAddr, shards: Vec<Arc<ShardMetrics>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let bound = listener.local_addr()?;
    let mut registry = Registry::with_prefix("shardgate");
    registry.register_collector(Box::new(ShardCollector { shards }));
    std::thread::Builder::new()
        .name("shardgate-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &registry);
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

fn serve(stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
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
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode(&mut openmetrics, registry).map_err(std::io::Error::other)?;
    let (content_type, body) = if wants_openmetrics(request) {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            to_prometheus_text(&openmetrics),
        )
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Whether the request's `Accept` header names OpenMetrics.
fn wants_openmetrics(request: &[u8]) -> bool {
    let request = String::from_utf8_lossy(request);
    request.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("accept:") && line.contains("application/openmetrics-text")
    })
}

/// Rewrites OpenMetrics as the Prometheus text format 0.0.4: no `# UNIT` and
/// `# EOF` lines, and a counter's `# HELP`/`# TYPE` name its `_total` samples
/// (in OpenMetrics they name the family without the suffix).
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then_some((prefix, name, tail))
        });
        match described {
            Some((prefix, name, tail)) => {
                text.push_str(prefix);
                text.push_str(name);
                text.push_str("_total ");
                text.push_str(tail);
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

/// Encodes every shard's instruments at scrape time.
#[derive(Debug)]
struct ShardCollector {
    shards: Vec<Arc<ShardMetrics>>,
}

type Labels = Vec<(&'static str, String)>;

impl ShardCollector {
    /// One counter family: `values` yields `(labels, value)` per series.
    fn counter(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        values: impl Fn(usize, &ShardMetrics, &mut dyn FnMut(Labels, u64)),
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        let mut result = Ok(());
        for (index, shard) in self.shards.iter().enumerate() {
            values(index, shard, &mut |labels, value| {
                if result.is_ok() {
                    result = family
                        .encode_family(&labels)
                        .and_then(|metric| ConstCounter::new(value).encode(metric));
                }
            });
        }
        result
    }

    fn gauge(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: impl Fn(&ShardMetrics) -> i64,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for (index, shard) in self.shards.iter().enumerate() {
            let labels = shard_label(index);
            ConstGauge::new(value(shard)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram<const N: usize>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        divisor: f64,
        series: impl Fn(usize, &ShardMetrics) -> Vec<(Labels, &Histogram<N>)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Histogram)?;
        for (index, shard) in self.shards.iter().enumerate() {
            for (labels, histogram) in series(index, shard) {
                let snapshot = histogram.snapshot(divisor);
                family.encode_family(&labels)?.encode_histogram::<Labels>(
                    snapshot.sum,
                    snapshot.count,
                    &snapshot.buckets,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

fn shard_label(index: usize) -> Labels {
    vec![("shard", index.to_string())]
}

fn labels(index: usize, pairs: &[(&'static str, &str)]) -> Labels {
    let mut labels = shard_label(index);
    labels.extend(pairs.iter().map(|(key, value)| (*key, value.to_string())));
    labels
}

impl Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let encoder = &mut encoder;
        self.counter(
            encoder,
            "frames_received",
            "Frames read whose header parsed.",
            None,
            |index, shard, emit| {
                for transport in Transport::ALL {
                    emit(
                        labels(index, &[("transport", transport.name())]),
                        shard.frames_received[transport as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "received",
            "Bytes read from clients.",
            Some(&Unit::Bytes),
            |index, shard, emit| {
                for transport in Transport::ALL {
                    emit(
                        labels(index, &[("transport", transport.name())]),
                        shard.bytes_received[transport as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "acks_sent",
            "Answers sent, by status.",
            None,
            |index, shard, emit| {
                for transport in Transport::ALL {
                    for status in Status::ALL {
                        let value = shard.acks_sent[transport as usize][status as usize].get();
                        emit(
                            labels(index, &[("transport", transport.name()), ("status", status.name())]),
                            value,
                        );
                    }
                }
            },
        )?;
        self.counter(
            encoder,
            "frames_rejected",
            "Frames answered REJECTED, by reason (a crc mismatch is never answered: frames_corrupt).",
            None,
            |index, shard, emit| {
                for transport in Transport::ALL {
                    for reason in RejectReason::ALL
                        .into_iter()
                        .filter(|&reason| reason != RejectReason::Crc)
                    {
                        let value = shard.frames_rejected[transport as usize][reason as usize].get();
                        emit(
                            labels(index, &[("transport", transport.name()), ("reason", reason.name())]),
                            value,
                        );
                    }
                }
            },
        )?;
        self.counter(
            encoder,
            "input_unparseable",
            "Inputs without a parseable header: UDP datagram tails dropped unanswered, TCP connections closed.",
            None,
            |index, shard, emit| {
                for transport in Transport::ALL {
                    emit(
                        labels(index, &[("transport", transport.name())]),
                        shard.unparseable[transport as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "frames_corrupt",
            "Whole frames whose crc32c did not match: never answered; a TCP connection that sends one is closed.",
            None,
            |index, shard, emit| {
                for transport in Transport::ALL {
                    emit(
                        labels(index, &[("transport", transport.name())]),
                        shard.frames_corrupt[transport as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "udp_receive_errors",
            "Errors the UDP socket returned on receive.",
            None,
            |index, shard, emit| emit(shard_label(index), shard.udp_receive_errors.get()),
        )?;
        self.counter(
            encoder,
            "frames_limited",
            "Frames dropped unanswered because their source was over its per-source rate (UDP only).",
            None,
            |index, shard, emit| {
                emit(
                    labels(index, &[("transport", Transport::Udp.name())]),
                    shard.frames_limited[Transport::Udp as usize].get(),
                )
            },
        )?;
        self.counter(
            encoder,
            "udp_kernel_drops",
            "Datagrams the kernel dropped for a full socket buffer (the socket's SO_RXQ_OVFL count).",
            None,
            |index, shard, emit| emit(shard_label(index), udp_drops(shard)),
        )?;
        self.counter(
            encoder,
            "dedup_lookups",
            "Dedup decisions, by where they were made.",
            None,
            |index, shard, emit| {
                for outcome in LookupOutcome::ALL {
                    emit(
                        labels(index, &[("outcome", outcome.name())]),
                        shard.dedup_lookups[outcome as usize].get(),
                    );
                }
            },
        )?;
        self.gauge(
            encoder,
            "dedup_cache_events",
            "Event ids held in the shard's dedup cache.",
            None,
            |shard| shard.dedup_cache_events.get(),
        )?;
        self.counter(
            encoder,
            "dedup_cache_evictions",
            "Ids evicted from the dedup cache.",
            None,
            |index, shard, emit| emit(shard_label(index), shard.dedup_cache_evictions.get()),
        )?;
        self.histogram(
            encoder,
            "batch_events",
            "Events per Redis script call.",
            None,
            1.0,
            |index, shard| vec![(shard_label(index), &shard.batch_events)],
        )?;
        self.histogram(
            encoder,
            "redis_round_trip",
            "Duration of one Redis script call.",
            Some(&Unit::Seconds),
            MICROS_PER_SECOND,
            |index, shard| vec![(shard_label(index), &shard.redis_round_trip_us)],
        )?;
        self.counter(
            encoder,
            "redis_errors",
            "Failed Redis script calls, by kind.",
            None,
            |index, shard, emit| {
                for kind in RedisErrorKind::ALL {
                    emit(
                        labels(index, &[("kind", kind.name())]),
                        shard.redis_errors[kind as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "redis_event_errors",
            "Events Redis refused one by one (answered RETRY; the rest of their batch was stored), by reason.",
            None,
            |index, shard, emit| {
                for reason in EventErrorReason::ALL {
                    emit(
                        labels(index, &[("reason", reason.name())]),
                        shard.redis_event_errors[reason as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "redis_reconnects",
            "Times the Redis connection came back.",
            None,
            |index, shard, emit| emit(shard_label(index), shard.redis_reconnects.get()),
        )?;
        self.gauge(
            encoder,
            "redis_up",
            "1 while the shard's Redis connection is up.",
            None,
            |shard| shard.redis_up.get(),
        )?;
        self.gauge(
            encoder,
            "events_in_flight",
            "Events batched or in Redis, not yet answered.",
            None,
            |shard| shard.events_in_flight.get(),
        )?;
        self.counter(
            encoder,
            "retries",
            "Frames answered RETRY, by cause.",
            None,
            |index, shard, emit| {
                for cause in RetryCause::ALL {
                    emit(
                        labels(index, &[("cause", cause.name())]),
                        shard.retries[cause as usize].get(),
                    );
                }
            },
        )?;
        self.gauge(
            encoder,
            "tcp_connections_open",
            "Open TCP connections.",
            None,
            |shard| shard.tcp_connections_open.get(),
        )?;
        self.counter(
            encoder,
            "tcp_connections_accepted",
            "TCP connections accepted.",
            None,
            |index, shard, emit| emit(shard_label(index), shard.tcp_connections_accepted.get()),
        )?;
        self.counter(
            encoder,
            "tcp_connections_closed",
            "TCP connections ended, by reason.",
            None,
            |index, shard, emit| {
                for reason in CloseReason::ALL {
                    emit(
                        labels(index, &[("reason", reason.name())]),
                        shard.tcp_connections_closed[reason as usize].get(),
                    );
                }
            },
        )?;
        self.counter(
            encoder,
            "reply_send_errors",
            "Answers the socket refused to send.",
            None,
            |index, shard, emit| emit(shard_label(index), shard.reply_send_errors.get()),
        )?;
        self.histogram(
            encoder,
            "intake_to_ack",
            "From a frame's read to its answer.",
            Some(&Unit::Seconds),
            MICROS_PER_SECOND,
            |index, shard| {
                Transport::ALL
                    .iter()
                    .map(|&transport| {
                        (
                            labels(index, &[("transport", transport.name())]),
                            &shard.intake_to_ack_us[transport as usize],
                        )
                    })
                    .collect()
            },
        )?;
        process_metrics(encoder)
    }
}

/// Resident memory and build info: not per shard.
fn process_metrics(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let rss_bytes = resident_memory_bytes().unwrap_or(0);
    let family = encoder.encode_descriptor(
        "process_resident_memory",
        "Resident set size of the process.",
        Some(&Unit::Bytes),
        MetricType::Gauge,
    )?;
    ConstGauge::new(rss_bytes as i64).encode(family)?;
    let mut family = encoder.encode_descriptor(
        "build_info",
        "Always 1; labels say which build runs.",
        None,
        MetricType::Gauge,
    )?;
    let build: Labels = vec![("version", env!("CARGO_PKG_VERSION").to_string())];
    ConstGauge::new(1i64).encode(family.encode_family(&build)?)
}

fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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

    /// Counters' HELP/TYPE name their `_total` samples, OpenMetrics-only lines go, everything else stays.
    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let openmetrics = "# HELP sg_acks Answers.\n# TYPE sg_acks counter\nsg_acks_total{shard=\"0\"} 3\n\
                           # HELP sg_rtt_seconds Trip.\n# TYPE sg_rtt_seconds histogram\n# UNIT sg_rtt_seconds seconds\n\
                           sg_rtt_seconds_sum 0.5\n# EOF\n";
        let text = to_prometheus_text(openmetrics);
        assert_eq!(
            text,
            "# HELP sg_acks_total Answers.\n# TYPE sg_acks_total counter\nsg_acks_total{shard=\"0\"} 3\n\
             # HELP sg_rtt_seconds Trip.\n# TYPE sg_rtt_seconds histogram\nsg_rtt_seconds_sum 0.5\n"
        );
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    /// Only an Accept header that names OpenMetrics gets it.
    #[test]
    fn accept_header_picks_the_format() {
        assert!(wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
        ));
        assert!(!wants_openmetrics(
            b"GET /metrics HTTP/1.1\r\nAccept: text/plain\r\n\r\n"
        ));
        assert!(!wants_openmetrics(b"GET /metrics HTTP/1.1\r\n\r\n"));
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
