//! `--scrape URL`: a Prometheus-like scraper running beside the load, to measure what
//! instrumentation costs the server.
//!
//! One thread GETs `http://HOST:PORT/PATH` every `--scrape-interval` (1 s by default) from the
//! moment the schedule starts until the engine stops, over plain `std::net` TCP with
//! `Connection: close` and timeouts, and counts the scrapes, the failures and the bytes. It
//! asks for the classic text format (as `curl` would), reads the whole answer, and counts a
//! scrape as failed unless the answer is `200` with a body. Loopback only: like the load, this
//! tool must not poke other machines.
//!
//! Each good scrape also reads two counters the availability SLI needs (docs/operations.md,
//! "Service level objectives"): the server's answers and its RETRY answers with a cause of
//! ours, summed over shards; the run reports their growth between the first and last good scrape.
//!
//! The thread keeps a fixed timetable (`start + k × interval`): a slow scrape delays the next
//! one but does not shift the ones after it, and a scrape that would be more than one interval
//! late is skipped, as Prometheus does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Bounds of `--scrape-interval`.
const INTERVAL_MIN: Duration = Duration::from_millis(10);
const INTERVAL_MAX: Duration = Duration::from_secs(60);
/// Connect, write and read timeouts of one scrape: the interval, within these bounds.
const TIMEOUT_MIN: Duration = Duration::from_millis(100);
const TIMEOUT_MAX: Duration = Duration::from_secs(5);
/// Largest answer read; past it the scrape fails (a metrics page is a few tens of KiB).
const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// RETRY causes that spend the availability budget, as in docs/monitoring/shardgate-slos.toml:
/// in_flight_copy (the client resent too early) and shutting_down (a planned stop) do not.
pub const RETRY_CAUSES_OURS: [&str; 4] = ["overload", "redis_down", "redis_error", "replica_unconfirmed"];

/// Where to scrape: a parsed `http://HOST:PORT/PATH` on loopback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// `HOST:PORT` as given, for the `Host` header.
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// Parses `http://HOST:PORT[/PATH]` (path `/metrics` when absent) and refuses any address that
/// is not loopback.
pub fn parse_url(text: &str) -> Result<Endpoint, String> {
    let rest = text
        .strip_prefix("http://")
        .ok_or_else(|| format!("invalid scrape URL {text:?}: expected http://HOST:PORT/metrics"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/metrics"),
    };
    if authority.is_empty() || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid scrape URL {text:?}: expected http://HOST:PORT/metrics"
        ));
    }
    let resolved: Vec<SocketAddr> = authority
        .to_socket_addrs()
        .map_err(|error| format!("invalid scrape URL {text:?}: {error}"))?
        .collect();
    if resolved.is_empty() || !resolved.iter().all(|address| address.ip().is_loopback()) {
        return Err(format!(
            "scrape URL {text:?} is not a loopback address; only loopback is scraped"
        ));
    }
    let address = resolved
        .iter()
        .find(|address| address.is_ipv4())
        .unwrap_or(&resolved[0]);
    if address.port() == 0 {
        return Err(format!("invalid scrape URL {text:?}: port 0"));
    }
    Ok(Endpoint {
        address: *address,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

/// What to scrape and how often: `--scrape` and `--scrape-interval`, checked.
#[derive(Clone, Debug)]
pub struct ScrapeConfig {
    pub endpoint: Endpoint,
    pub interval: Duration,
}

impl ScrapeConfig {
    pub fn new(endpoint: Endpoint, interval: Duration) -> Result<ScrapeConfig, String> {
        if !(INTERVAL_MIN..=INTERVAL_MAX).contains(&interval) {
            return Err(format!(
                "--scrape-interval must be within {}ms..={}s",
                INTERVAL_MIN.as_millis(),
                INTERVAL_MAX.as_secs()
            ));
        }
        Ok(ScrapeConfig { endpoint, interval })
    }
}

/// What the scraper did during one run (the `scrape` object of the JSON summary).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ScrapeStats {
    pub url: String,
    pub interval_s: f64,
    /// Scrapes tried, failed ones included.
    pub scrapes: u64,
    pub failures: u64,
    /// Timetabled scrapes skipped because the one before ran more than an interval late.
    pub skipped: u64,
    /// Body bytes of the last scrape that succeeded.
    pub body_bytes_last: u64,
    /// Time of one scrape, connect to last byte.
    pub duration_mean_ms: f64,
    pub duration_max_ms: f64,
    /// The first failure's reason, if any.
    pub first_error: Option<String>,
    /// Growth of `shardgate_acks_sent_total` and of `shardgate_retries_total` with a cause in
    /// [`RETRY_CAUSES_OURS`] between the first and the last good scrape; null with fewer than two.
    pub answers: Option<u64>,
    pub retries_ours: Option<u64>,
}

impl ScrapeStats {
    /// The availability SLI's bad share over the run; `None` without two good scrapes or answers.
    pub fn retry_ours_share(&self) -> Option<f64> {
        match (self.answers, self.retries_ours) {
            (Some(answers), Some(retries_ours)) if answers > 0 => Some(retries_ours as f64 / answers as f64),
            _ => None,
        }
    }
}

/// The counters of one scrape the availability SLI needs, summed over shards and transports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AnswerCounts {
    answers: u64,
    retries_ours: u64,
}

/// Reads [`AnswerCounts`] from a Prometheus text page; lines it does not need are skipped.
fn answer_counts(body: &str) -> AnswerCounts {
    let mut counts = AnswerCounts::default();
    for line in body.lines().filter(|line| !line.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let (name, rest) = line.split_at(name_end);
        let (labels, value) = match rest.strip_prefix('{').and_then(|rest| rest.split_once('}')) {
            Some((labels, value)) => (labels, value),
            None => ("", rest),
        };
        // Counters are whole numbers, though the format writes them as floats.
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|value| value.parse::<f64>().ok())
        else {
            continue;
        };
        let value = value.max(0.0) as u64;
        if name == "shardgate_acks_sent_total" {
            counts.answers += value;
        } else if name == "shardgate_retries_total"
            && RETRY_CAUSES_OURS
                .iter()
                .any(|cause| labels.split(',').any(|label| label == format!("cause=\"{cause}\"")))
        {
            counts.retries_ours += value;
        }
    }
    counts
}

/// The running scraper thread; [`Scraper::stop`] ends it and returns its counts.
pub struct Scraper {
    stop: Sender<()>,
    thread: JoinHandle<ScrapeStats>,
}

impl Scraper {
    /// Starts scraping now: the first scrape at once, then one per interval.
    pub fn start(config: &ScrapeConfig) -> std::io::Result<Scraper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let config = config.clone();
        let thread = std::thread::Builder::new().name("scrape".into()).spawn(move || {
            let timeout = config.interval.clamp(TIMEOUT_MIN, TIMEOUT_MAX);
            let mut stats = ScrapeStats {
                url: config.endpoint.url(),
                interval_s: config.interval.as_secs_f64(),
                ..ScrapeStats::default()
            };
            let mut total = Duration::ZERO;
            let mut counts_first: Option<AnswerCounts> = None;
            let mut counts_last: Option<AnswerCounts> = None;
            let start = Instant::now();
            let mut due = start;
            loop {
                let began = Instant::now();
                stats.scrapes += 1;
                match scrape_once(&config.endpoint, timeout) {
                    Ok((body_bytes, counts)) => {
                        stats.body_bytes_last = body_bytes as u64;
                        counts_first.get_or_insert(counts);
                        counts_last = Some(counts);
                    }
                    Err(error) => {
                        stats.failures += 1;
                        stats.first_error.get_or_insert(error);
                    }
                }
                let took = began.elapsed();
                total += took;
                stats.duration_max_ms = stats.duration_max_ms.max(took.as_secs_f64() * 1e3);
                due += config.interval;
                let now = Instant::now();
                while due + config.interval <= now {
                    due += config.interval;
                    stats.skipped += 1;
                }
                match stopped.recv_timeout(due.saturating_duration_since(now)) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            stats.duration_mean_ms = round_thousandths(total.as_secs_f64() * 1e3 / stats.scrapes.max(1) as f64);
            stats.duration_max_ms = round_thousandths(stats.duration_max_ms);
            if let (Some(first), Some(last)) = (counts_first, counts_last) {
                if stats.scrapes - stats.failures >= 2 {
                    // A restarted server starts its counters at 0 again: count no growth then.
                    stats.answers = Some(last.answers.saturating_sub(first.answers));
                    stats.retries_ours = Some(last.retries_ours.saturating_sub(first.retries_ours));
                }
            }
            stats
        })?;
        Ok(Scraper { stop, thread })
    }

    /// Stops the thread (a scrape under way finishes first) and returns the counts.
    pub fn stop(self) -> ScrapeStats {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_else(|_| ScrapeStats {
            first_error: Some("the scrape thread panicked".into()),
            ..ScrapeStats::default()
        })
    }
}

/// One `GET`: the body's length and the SLI counters in it, or why it failed.
fn scrape_once(endpoint: &Endpoint, timeout: Duration) -> Result<(usize, AnswerCounts), String> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&endpoint.address, timeout).map_err(|error| format!("connect: {error}"))?;
    stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(|error| format!("socket: {error}"))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\nUser-Agent: shardgate-bench\r\nConnection: close\r\n\r\n",
        endpoint.path, endpoint.authority
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|error| format!("write: {error}"))?;
    let mut response = Vec::with_capacity(64 * 1024);
    let mut buffer = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no whole answer within {} ms", timeout.as_millis()));
        }
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                response.extend_from_slice(&buffer[..read]);
                if response.len() > RESPONSE_BYTES_MAX {
                    return Err(format!("answer longer than {RESPONSE_BYTES_MAX} bytes"));
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(format!("read: {error}")),
        }
    }
    let body = body_length(&response)?;
    Ok((
        body,
        answer_counts(&String::from_utf8_lossy(&response[response.len() - body..])),
    ))
}

/// The body's length of a whole `200` answer (checked against `Content-Length` when given).
fn body_length(response: &[u8]) -> Result<usize, String> {
    let head_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("answer without a whole header")?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !status_line.starts_with("HTTP/1.") || status != "200" {
        return Err(format!("answer {status_line:?}"));
    }
    let body = response.len() - head_end - 4;
    let declared = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    match declared {
        Some(declared) if declared != body => Err(format!("body of {body} bytes, Content-Length {declared}")),
        _ if body == 0 => Err("empty body".into()),
        _ => Ok(body),
    }
}

fn round_thousandths(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls_parse_loopback_only() {
        let endpoint = parse_url("http://127.0.0.1:9100/metrics").unwrap();
        assert_eq!(endpoint.address, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(endpoint.path, "/metrics");
        assert_eq!(endpoint.url(), "http://127.0.0.1:9100/metrics");
        assert_eq!(parse_url("http://127.0.0.1:9100").unwrap().path, "/metrics");
        assert_eq!(parse_url("http://[::1]:9100/m?x=1").unwrap().path, "/m?x=1");
        for bad in [
            "127.0.0.1:9100",
            "https://127.0.0.1:9100/metrics",
            "http://127.0.0.1/metrics",
            "http://127.0.0.1:0/metrics",
            "http://10.1.2.3:9100/metrics",
            "http://0.0.0.0:9100/metrics",
            "http://127.0.0.1:9100/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?} parsed");
        }
        let endpoint = parse_url("http://127.0.0.1:9100/metrics").unwrap();
        assert!(ScrapeConfig::new(endpoint.clone(), Duration::from_secs(1)).is_ok());
        assert!(ScrapeConfig::new(endpoint, Duration::ZERO).is_err());
    }

    #[test]
    fn answers_are_checked() {
        assert_eq!(body_length(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"), Ok(3));
        assert_eq!(body_length(b"HTTP/1.0 200 OK\r\n\r\nabcd"), Ok(4));
        assert!(body_length(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_err());
        assert!(body_length(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
        assert!(body_length(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(body_length(b"HTTP/1.1 200 OK").is_err());
    }

    // The availability SLI's counters: every answer, and only RETRY whose cause is ours, over
    // shards and transports; comments, other metrics and other causes are skipped.
    #[test]
    fn answer_counts_sum_ours_only() {
        let page = "\
# HELP shardgate_acks_sent Answers sent, by status.
# TYPE shardgate_acks_sent counter
shardgate_acks_sent_total{shard=\"0\",transport=\"udp\",status=\"accepted\"} 900
shardgate_acks_sent_total{shard=\"0\",transport=\"udp\",status=\"retry\"} 60
shardgate_acks_sent_total{shard=\"1\",transport=\"tcp\",status=\"accepted\"} 40
shardgate_acks_sent_created{shard=\"1\",transport=\"tcp\",status=\"accepted\"} 1700000000.5
# TYPE shardgate_retries counter
shardgate_retries_total{shard=\"0\",cause=\"overload\"} 3
shardgate_retries_total{shard=\"0\",cause=\"redis_down\"} 2
shardgate_retries_total{shard=\"1\",cause=\"redis_error\"} 1
shardgate_retries_total{shard=\"0\",cause=\"in_flight_copy\"} 50
shardgate_retries_total{shard=\"0\",cause=\"shutting_down\"} 4
shardgate_redis_up{shard=\"0\"} 1
broken line
";
        assert_eq!(
            answer_counts(page),
            AnswerCounts {
                answers: 1_000,
                retries_ours: 6
            }
        );
        assert_eq!(answer_counts(""), AnswerCounts::default());
    }

    // Against a server whose counters grow by the same amounts on every scrape: the run reports
    // their growth from the first to the last scrape, and the share of RETRY with our cause.
    #[test]
    fn scrapes_count_answers_between_first_and_last() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for (index, mut stream) in (1u64..).zip(listener.incoming().flatten()) {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let body = format!(
                    "shardgate_acks_sent_total{{shard=\"0\",transport=\"udp\",status=\"accepted\"}} {}\n\
                     shardgate_retries_total{{shard=\"0\",cause=\"overload\"}} {}\n\
                     shardgate_retries_total{{shard=\"0\",cause=\"in_flight_copy\"}} {}\n",
                    1_000 * index,
                    2 * index,
                    7 * index
                );
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        let config = ScrapeConfig::new(
            parse_url(&format!("http://{address}/metrics")).unwrap(),
            Duration::from_millis(20),
        )
        .unwrap();
        let scraper = Scraper::start(&config).unwrap();
        std::thread::sleep(Duration::from_millis(110));
        let stats = scraper.stop();
        let growths = stats.scrapes - 1;
        assert!(growths >= 2 && stats.failures == 0, "{stats:?}");
        assert_eq!(stats.answers, Some(1_000 * growths), "{stats:?}");
        assert_eq!(stats.retries_ours, Some(2 * growths), "{stats:?}");
        assert_eq!(stats.retry_ours_share(), Some(0.002));
        let single = ScrapeStats { answers: None, ..stats };
        assert_eq!(single.retry_ours_share(), None);
    }

    // Against a tiny server: scrapes happen on the timetable and are counted; a 404 is a failure.
    #[test]
    fn scrapes_a_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut request = [0u8; 1024];
                let read = stream.read(&mut request).unwrap_or(0);
                let answer: &[u8] = if request[..read].starts_with(b"GET /metrics ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nup 1\n"
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = stream.write_all(answer);
            }
        });
        let config = ScrapeConfig::new(
            parse_url(&format!("http://{address}/metrics")).unwrap(),
            Duration::from_millis(20),
        )
        .unwrap();
        let scraper = Scraper::start(&config).unwrap();
        std::thread::sleep(Duration::from_millis(110));
        let stats = scraper.stop();
        assert!(stats.scrapes >= 3, "{stats:?}");
        assert_eq!(stats.failures, 0, "{stats:?}");
        assert_eq!(stats.body_bytes_last, 5);
        // No counters in the page: no answers between scrapes, so no share.
        assert_eq!((stats.answers, stats.retries_ours), (Some(0), Some(0)));
        assert_eq!(stats.retry_ours_share(), None);
        let config = ScrapeConfig::new(
            parse_url(&format!("http://{address}/nope")).unwrap(),
            Duration::from_millis(20),
        )
        .unwrap();
        let stats = Scraper::start(&config).unwrap().stop();
        assert_eq!((stats.scrapes, stats.failures), (1, 1), "{stats:?}");
        assert!(stats.first_error.unwrap().contains("404"));
    }
}
