//! The server's `/metrics`: where it serves, one scrape, and its samples as a real parser of the
//! Prometheus text format (`prom_text_format_parser`) reads them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use prom_text_format_parser::{Scrape, Type, ValueType};

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
/// `filter` (Prometheus text format, as /metrics serves it); 0 when there is none.
pub fn metric_sum(body: &str, name: &str, filter: &[(&str, &str)]) -> u64 {
    Exposition::parse(body)
        .matching(name, filter)
        .map(|sample| sample.value)
        .sum::<f64>() as u64
}

pub type Labels = Vec<(String, String)>;

/// One sample line: its series name as written (`_bucket`, `_sum` and `_count` included), its
/// labels (unescaped) and its value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Every sample of a text exposition, as `prom_text_format_parser` reads it: it refuses a
/// malformed line, and a `# HELP` or `# TYPE` that no sample of that name follows.
pub struct Exposition {
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Panics with the parser's complaint unless `body` is a valid exposition.
    /// What `promtool check metrics` (the Debian `prometheus` package) says of `body`: `Err`
    /// with its output if it refuses it. Panics if promtool is not installed.
    pub fn check_with_promtool(body: &str) -> Result<(), String> {
        let mut promtool = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "promtool not found on PATH: install the Debian `prometheus` package \
                 (`apt-get install -y prometheus`, as root; CI installs it)"
            ),
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        let mut stdin = promtool.stdin.take().expect("promtool stdin");
        let writer = {
            let body = body.to_string();
            std::thread::spawn(move || stdin.write_all(body.as_bytes()))
        };
        let output = promtool.wait_with_output().expect("promtool output");
        writer.join().expect("writer").expect("write to promtool");
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "promtool check metrics failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }

    pub fn parse(body: &str) -> Exposition {
        Exposition::read(body).unwrap_or_else(|e| panic!("bad exposition: {e}\n--- body:\n{body}"))
    }

    /// The samples, or what the parser refuses.
    pub fn read(body: &str) -> Result<Exposition, String> {
        let scrape = Scrape::parse(body).map_err(|e| format!("{e:?}"))?;
        let mut samples = Vec::new();
        for metric in scrape.metrics {
            for sample in metric.samples {
                let name = match (sample.value.value_type, metric.kind) {
                    (ValueType::Sum, _) => format!("{}_sum", metric.name),
                    (ValueType::Count, _) => format!("{}_count", metric.name),
                    (ValueType::Sample, Type::Histogram) => format!("{}_bucket", metric.name),
                    (ValueType::Sample, _) => metric.name.clone(),
                };
                let labels = sample
                    .labels
                    .iter()
                    .map(|label| (label.key.clone(), unescape(&label.value)))
                    .collect();
                samples.push(Sample {
                    name,
                    labels,
                    value: sample.value.value.as_f64(),
                });
            }
        }
        Ok(Exposition { samples })
    }

    pub fn matching<'a>(&'a self, name: &'a str, filter: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples
            .iter()
            .filter(move |s| s.name == name && filter.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// The sum over every series of `name` whose labels include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        let mut found = false;
        let total: f64 = self
            .matching(name, filter)
            .map(|s| {
                found = true;
                s.value
            })
            .sum();
        assert!(found, "no series {name} with {filter:?}");
        assert!(
            total >= 0.0 && total.fract() == 0.0,
            "{name} {filter:?} is not a count: {total}"
        );
        total as u64
    }

    pub fn float_sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    /// Checks every histogram series: buckets cumulative, `+Inf` == `_count`.
    pub fn histogram_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut series: HashMap<(String, Labels), Vec<(f64, f64)>> = HashMap::new();
        for sample in &self.samples {
            let Some(family) = sample.name.strip_suffix("_bucket") else {
                continue;
            };
            let le = sample
                .label("le")
                .unwrap_or_else(|| panic!("bucket without le: {sample:?}"));
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or_else(|e| panic!("le={le:?}: {e}"))
            };
            let mut labels: Labels = sample.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            labels.sort();
            series
                .entry((family.to_string(), labels))
                .or_default()
                .push((bound, sample.value));
        }
        for ((family, labels), mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|pair| pair[1].1 < pair[0].1) {
                problems.push(format!("{family}{labels:?}: buckets not cumulative: {buckets:?}"));
            }
            let count_name = format!("{family}_count");
            let count = self
                .samples
                .iter()
                .find(|s| {
                    let mut own: Labels = s.labels.clone();
                    own.sort();
                    s.name == count_name && own == labels
                })
                .map(|s| s.value);
            let infinity = buckets.last().filter(|(bound, _)| bound.is_infinite()).map(|b| b.1);
            if infinity.is_none() || infinity != count {
                problems.push(format!(
                    "{family}{labels:?}: +Inf bucket {infinity:?} != _count {count:?}"
                ));
            }
        }
        problems
    }
}

/// A label value with the text format's escapes (`\\`, `\"`, `\n`) undone: the parser keeps
/// them as written.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(escaped) => out.push(escaped),
            None => out.push('\\'),
        }
    }
    out
}
