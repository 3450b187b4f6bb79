//! Parsers for the command line's own value formats: durations and targets.
//!
//! They are plain functions from text to a value or a message, so clap can use them as value
//! parsers and tests can call them directly.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Parses `250us`, `500ms`, `30s` or `2m`: a whole number and a unit, nothing else. A bare
/// number is refused because `--duration 30` could mean seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let usage =
        || format!("invalid duration {text:?}: expected a whole number with a unit, e.g. 500us, 500ms, 30s, 2m");
    if number.is_empty() {
        return Err(usage());
    }
    let value: u64 = number.parse().map_err(|_| usage())?;
    let micros_per_unit: u64 = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        "m" => 60_000_000,
        _ => return Err(usage()),
    };
    let micros = value
        .checked_mul(micros_per_unit)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    Ok(Duration::from_micros(micros))
}

/// Formats a duration the way [`parse_duration`] reads it, for the summary.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if duration.subsec_micros() % 1_000 != 0 {
        return format!("{}us", duration.as_micros());
    }
    if millis % 60_000 == 0 && millis > 0 {
        format!("{}m", millis / 60_000)
    } else if millis % 1_000 == 0 {
        format!("{}s", millis / 1_000)
    } else {
        format!("{millis}ms")
    }
}

/// The two transports shardgate serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Where the load goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub transport: Transport,
    pub address: SocketAddr,
    /// Every address the host name resolved to, so the loopback check can see them all.
    pub resolved: Vec<SocketAddr>,
}

impl Target {
    /// True when every address the target names is on this machine's loopback.
    pub fn is_loopback(&self) -> bool {
        self.resolved.iter().all(|address| address.ip().is_loopback())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}://{}", self.transport.name(), self.address)
    }
}

/// Parses `udp://HOST:PORT` or `tcp://HOST:PORT` and resolves the host. IPv4 is preferred
/// when a name resolves to both families, because `127.0.0.1` is what servers usually bind.
pub fn parse_target(text: &str) -> Result<Target, String> {
    let (transport, host_port) = if let Some(rest) = text.strip_prefix("udp://") {
        (Transport::Udp, rest)
    } else if let Some(rest) = text.strip_prefix("tcp://") {
        (Transport::Tcp, rest)
    } else {
        return Err(format!(
            "invalid target {text:?}: expected udp://HOST:PORT or tcp://HOST:PORT"
        ));
    };
    let resolved: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map_err(|error| format!("invalid target {text:?}: {error}"))?
        .collect();
    let address = resolved
        .iter()
        .find(|address| address.is_ipv4())
        .or_else(|| resolved.first())
        .copied()
        .ok_or_else(|| format!("target {text:?} resolves to no address"))?;
    if address.port() == 0 {
        return Err(format!("invalid target {text:?}: port 0"));
    }
    Ok(Target {
        transport,
        address,
        resolved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The three documented units parse; everything else is refused with a usage message.
    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "30", "s", "1.5s", "-1s", "10 s", "10h", "10sec", "ms", "us", "10µs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse_duration("99999999999999999999m").is_err());
        assert!(parse_duration("999999999999999999m").is_err());
    }

    // Formatting reads back to the same duration.
    #[test]
    fn durations_format_round_trip() {
        for text in ["30s", "500ms", "2m", "0s", "1500ms", "250us", "1500us"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(format_duration(duration), text);
        }
    }

    // Both schemes parse; the loopback check sees through names.
    #[test]
    fn targets_parse() {
        let udp = parse_target("udp://127.0.0.1:4000").unwrap();
        assert_eq!(udp.transport, Transport::Udp);
        assert_eq!(udp.address, "127.0.0.1:4000".parse().unwrap());
        assert!(udp.is_loopback());
        let tcp = parse_target("tcp://[::1]:4001").unwrap();
        assert_eq!(tcp.transport, Transport::Tcp);
        assert!(tcp.is_loopback());
        assert_eq!(tcp.to_string(), "tcp://[::1]:4001");
        assert!(!parse_target("udp://10.1.2.3:4000").unwrap().is_loopback());
        assert!(!parse_target("udp://0.0.0.0:4000").unwrap().is_loopback());
        for bad in [
            "127.0.0.1:4000",
            "http://127.0.0.1:4000",
            "udp://127.0.0.1",
            "udp://127.0.0.1:0",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} parsed");
        }
    }
}
