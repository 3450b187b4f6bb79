//! The server's `/metrics`: where it serves, one scrape, and sums of its samples.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::server::Server;

/// The `/metrics` address from the serving line (`metrics="127.0.0.1:PORT"`).
pub fn serving_metrics_address(server: &Server) -> SocketAddr {
    let lines = server.stderr_lines();
    let serving = lines
        .iter()
        .find(|line| line.starts_with("shardgate: serving"))
        .expect("the harness saw the serving line");
    let value = serving
        .split_whitespace()
        .find_map(|token| token.strip_prefix("metrics="))
        .unwrap_or_else(|| panic!("no metrics= in {serving:?}"));
    value
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("metrics={value} in {serving:?}: {e}"))
}

/// The body of one `GET /metrics`.
pub fn scrape_metrics(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to /metrics at {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("send GET");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read /metrics");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_string()
}

/// The sum of every sample named `name` whose labels include each `key="value"` of
/// `filter` (Prometheus text format, as /metrics serves it).
pub fn metric_sum(body: &str, name: &str, filter: &[(&str, &str)]) -> u64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (sample_name, labels) = series.split_once('{').unwrap_or((series, ""));
            let wanted = sample_name == name
                && filter
                    .iter()
                    .all(|(key, value)| labels.contains(&format!("{key}=\"{value}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}
