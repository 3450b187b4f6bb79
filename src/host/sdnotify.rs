//! systemd's readiness and watchdog protocol (`sd_notify`), spoken directly:
//! one datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET`.
//!
//! - `READY=1` and `STATUS=serving N shards` once every shard serves, so
//!   `systemctl start` returns only when traffic can be taken;
//! - `WATCHDOG=1` every half `$WATCHDOG_USEC`, but only while every shard's
//!   tick loop keeps running ([`Heartbeats`]): one wedged shard means no ping,
//!   and systemd restarts the service after `WatchdogSec`;
//! - `STOPPING=1` when a drain begins.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call does nothing. A socket
//! that is set but unusable is logged once and then ignored: readiness
//! reporting must never stop the server from serving.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The connection to systemd's notify socket, if there is one.
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
    pub fn from_env() -> Notifier {
        Notifier::from_name(std::env::var_os("NOTIFY_SOCKET"))
    }

    /// The notifier for the socket `$NOTIFY_SOCKET` names, or none.
    fn from_name(name: Option<std::ffi::OsString>) -> Notifier {
        let Some(name) = name else {
            return Notifier { socket: None };
        };
        let name = name.to_string_lossy().into_owned();
        let address = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        };
        let socket = address.and_then(|address| UnixDatagram::unbound().map(|socket| (socket, address)));
        match socket {
            Ok(socket) => Notifier { socket: Some(socket) },
            Err(error) => {
                tracing::warn!(notify_socket = %name, %error, "cannot use the systemd notify socket; not reporting readiness");
                Notifier { socket: None }
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends one notification; a failure is logged, never fatal.
    pub fn send(&self, state: &str) {
        debug_assert!(
            state.lines().all(|line| line.contains('=')),
            "sd_notify lines are KEY=VALUE"
        );
        let Some((socket, address)) = &self.socket else {
            return;
        };
        if let Err(error) = socket.send_to_addr(state.as_bytes(), address) {
            tracing::warn!(%error, state, "cannot notify systemd");
        }
    }
}

/// `$WATCHDOG_USEC` when it is meant for this process (`$WATCHDOG_PID`, if
/// set, is our pid): how often systemd expects a ping at the latest.
pub fn watchdog_timeout() -> Option<Duration> {
    let timeout_us: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (timeout_us > 0).then(|| Duration::from_micros(timeout_us))
}

/// One timestamp per shard, written by its tick loop and read by the
/// watchdog thread: the proof that every shard's executor still runs.
#[derive(Clone)]
pub struct Heartbeats {
    epoch: Instant,
    beats_ms: Arc<[AtomicU64]>,
}

impl Heartbeats {
    pub fn new(shard_count: usize) -> Heartbeats {
        assert!(shard_count > 0);
        Heartbeats {
            epoch: Instant::now(),
            beats_ms: (0..shard_count).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Called from shard `index`'s tick loop.
    pub fn beat(&self, index: usize) {
        self.beats_ms[index].store(self.elapsed_ms(Instant::now()), Ordering::Relaxed);
    }

    /// The shards whose last beat is older than `stale_after` at `now`.
    pub fn stale(&self, now: Instant, stale_after: Duration) -> Vec<usize> {
        let now_ms = self.elapsed_ms(now);
        let stale_ms = u64::try_from(stale_after.as_millis()).unwrap_or(u64::MAX);
        (0..self.beats_ms.len())
            .filter(|&index| now_ms.saturating_sub(self.beats_ms[index].load(Ordering::Relaxed)) > stale_ms)
            .collect()
    }

    fn elapsed_ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Pings systemd every half `timeout` while every shard beat within that
/// half, until `stop` is set. Runs on its own thread, so a wedged shard
/// cannot also wedge the pings of the others.
pub fn spawn_watchdog(
    notifier: Arc<Notifier>,
    timeout: Duration,
    heartbeats: Heartbeats,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let period = timeout / 2;
    std::thread::Builder::new()
        .name("shardgate-watchdog".into())
        .spawn(move || {
            let mut was_stale = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let stale = heartbeats.stale(Instant::now(), period);
                if stale.is_empty() {
                    notifier.send("WATCHDOG=1");
                } else if stale != was_stale {
                    tracing::error!(shards = ?stale, "shards stopped ticking; withholding the systemd watchdog ping");
                }
                was_stale = stale;
                std::thread::sleep(period);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notification reaches a listening socket byte for byte, as systemd would read it.
    #[test]
    fn notification_reaches_the_socket() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier {
            socket: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        assert!(notifier.is_enabled());
        notifier.send("READY=1\nSTATUS=serving 2 shards");
        let mut buffer = [0u8; 128];
        let length = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1\nSTATUS=serving 2 shards");
    }

    /// `$NOTIFY_SOCKET` decides where notifications go: nowhere when unset, else the path or the
    /// abstract `@name` it gives; a socket nobody listens on is not an error for the server.
    #[test]
    fn notify_socket_names_where_notifications_go() {
        let unset = Notifier::from_name(None);
        assert!(!unset.is_enabled());
        unset.send("READY=1");

        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let by_path = Notifier::from_name(Some(path.clone().into_os_string()));
        assert!(by_path.is_enabled());
        by_path.send("READY=1");
        let mut buffer = [0u8; 64];
        let length = listener
            .recv(&mut buffer)
            .expect("the path's listener got the datagram");
        assert_eq!(&buffer[..length], b"READY=1");

        let name = format!("shardgate-notify-test-{}", std::process::id());
        let abstract_listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        abstract_listener.set_nonblocking(true).unwrap();
        Notifier::from_name(Some(format!("@{name}").into())).send("STOPPING=1");
        let length = abstract_listener
            .recv(&mut buffer)
            .expect("the abstract listener got the datagram");
        assert_eq!(&buffer[..length], b"STOPPING=1");
        assert!(
            listener.recv(&mut buffer).is_err(),
            "nothing meant for the abstract name reached the path"
        );

        drop(listener);
        let gone = Notifier::from_name(Some(path.into_os_string()));
        assert!(
            gone.is_enabled(),
            "the socket is named; that nobody listens shows only on sending"
        );
        gone.send("WATCHDOG=1");
    }

    /// A shard that has not beaten within the period is stale; one that has is not.
    #[test]
    fn stale_shards_are_found() {
        let heartbeats = Heartbeats::new(2);
        let later = heartbeats.epoch + Duration::from_millis(500);
        heartbeats.beats_ms[0].store(450, Ordering::Relaxed);
        heartbeats.beats_ms[1].store(100, Ordering::Relaxed);
        assert_eq!(heartbeats.stale(later, Duration::from_millis(200)), vec![1]);
        assert!(heartbeats.stale(later, Duration::from_millis(400)).is_empty());
    }
}
