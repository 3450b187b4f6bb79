//! Seeds, ports, time, hex and signals: the small things the other support modules build on.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use rand::Rng;

/// The seed for a randomized test: `SHARDGATE_TEST_SEED` if set, else fresh. Printed so that
/// a failing run (whose captured stdout is shown) can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("SHARDGATE_TEST_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("SHARDGATE_TEST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    println!("{test}: seed {seed} (replay with SHARDGATE_TEST_SEED={seed})");
    seed
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub(super) fn send_signal(pid: u32, sig: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), sig)
}

/// A loopback port below the kernel's ephemeral range (`ip_local_port_range`; above it if
/// the range starts too low) that was free for both TCP and UDP a moment ago.
///
/// For a server that a test stops and starts again on the same port: while nothing listens
/// on an ephemeral port, a client's `connect()` to it may pick that very port as its own
/// source and connect to itself (TCP simultaneous open), which then holds the port and
/// swallows the client's frames. A port outside the range is never a source port.
pub fn free_port_outside_ephemeral() -> u16 {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let range = if lo > 11_000 {
        10_000..lo
    } else {
        assert!(hi < 64_000, "no port outside the ephemeral range {lo}-{hi}");
        hi + 1..u16::MAX
    };
    let mut rng = rand::thread_rng();
    for _attempt in 0..500 {
        let port = rng.gen_range(range.clone());
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {range:?}");
}
