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
            let start = Instant::now();
            let mut due = start;
            loop {
                let began = Instant::now();
                stats.scrapes += 1;
                match scrape_once(&config.endpoint, timeout) {
                    Ok(body_bytes) => stats.body_bytes_last = body_bytes as u64,
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

/// One `GET`: the body's length, or why it failed.
fn scrape_once(endpoint: &Endpoint, timeout: Duration) -> Result<usize, String> {
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
    body_length(&response)
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
