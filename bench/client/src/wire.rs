//! The socket side: packing frames into writes, reading ack bytes, and keeping a TCP connection
//! up. It knows nothing about events; the client decides what to send and what acks mean.
//!
//! A failed write loses its frames exactly as a lost datagram would: they are counted, and the
//! client's resend timers send them again. So no I/O error ever needs to reach the caller
//! after connect, and a server restart looks like a burst of packet loss.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::client::Stats;
use crate::config::{ClientConfig, Transport};
use crate::error::ClientError;
use crate::frame::{ACK_BYTES, FRAME_BYTES_MAX};

/// Largest datagram the client sends: below the 1500-byte Ethernet MTU with room for IP, UDP and
/// tunnel headers, so no datagram is fragmented on ordinary paths (a lost fragment loses every
/// frame in the datagram). The server's coalesced ack datagrams keep to the same bound.
pub const DATAGRAM_BYTES_MAX: usize = 1_400;
/// Largest single TCP write: enough to amortise the syscall over hundreds of frames.
const TCP_WRITE_BYTES_MAX: usize = 16 * 1024;
/// Receive buffer: a whole UDP datagram of any size, or a large bite of the TCP stream.
const RX_BYTES: usize = 65_536;
/// Most reads one non-blocking drain makes, so a flood of acks cannot hold `poll` forever.
pub(crate) const DRAIN_READS_MAX: usize = 64;

const _: () = assert!(
    FRAME_BYTES_MAX <= DATAGRAM_BYTES_MAX,
    "a frame must fit one datagram alone"
);
const _: () = assert!(FRAME_BYTES_MAX <= TCP_WRITE_BYTES_MAX);
const _: () = assert!(RX_BYTES >= ACK_BYTES * 2);

pub(crate) struct Wire {
    link: Link,
    /// Frames packed for the next write.
    tx: Vec<u8>,
    tx_frames: usize,
    tx_frames_max: usize,
    tx_bytes_max: usize,
    rx: Box<[u8]>,
    /// TCP: the start of an ack that the last read cut off, and its length.
    rx_carry: [u8; ACK_BYTES],
    rx_carry_bytes: usize,
    /// Whether the current socket is in non-blocking mode; tracked to skip redundant syscalls.
    nonblocking: bool,
}

enum Link {
    Udp(UdpSocket),
    Tcp(TcpLink),
}

struct TcpLink {
    target: SocketAddr,
    stream: Option<TcpStream>,
    connect_timeout: Duration,
    /// A write that cannot finish in this time means a stuck server; the connection is dropped.
    write_timeout: Duration,
    reconnect_at: Instant,
    /// The wait after the next failed connect; doubles up to `reconnect_delay_max`.
    reconnect_delay: Duration,
    reconnect_delay_first: Duration,
    reconnect_delay_max: Duration,
}

/// Ack bytes from one read.
pub(crate) struct Received<'a> {
    /// Whole acks, `ACK_BYTES` each.
    pub(crate) acks: &'a [u8],
    /// UDP: trailing bytes too short to be an ack, which the client counts as malformed.
    pub(crate) stray_bytes: usize,
}

impl Wire {
    pub(crate) fn open(config: &ClientConfig) -> Result<Wire, ClientError> {
        let connect_error = |source| ClientError::connect(config.target, config.transport, source);
        let (link, tx_frames_max, tx_bytes_max) = match config.transport {
            Transport::Udp => {
                let socket = open_udp(config.target, config.ack_timeout).map_err(connect_error)?;
                (Link::Udp(socket), config.frames_per_datagram_max, DATAGRAM_BYTES_MAX)
            }
            Transport::Tcp => {
                // A client that cannot reach its server at start is misconfigured; say so now
                // rather than letting every event give up later.
                let stream =
                    open_tcp(config.target, config.connect_timeout, config.backoff_max).map_err(connect_error)?;
                let link = TcpLink {
                    target: config.target,
                    stream: Some(stream),
                    connect_timeout: config.connect_timeout,
                    write_timeout: config.backoff_max,
                    reconnect_at: Instant::now(),
                    reconnect_delay: config.ack_timeout,
                    reconnect_delay_first: config.ack_timeout,
                    reconnect_delay_max: config.backoff_max,
                };
                (Link::Tcp(link), usize::MAX, TCP_WRITE_BYTES_MAX)
            }
        };
        Ok(Wire {
            link,
            tx: Vec::with_capacity(tx_bytes_max),
            tx_frames: 0,
            tx_frames_max,
            tx_bytes_max,
            rx: vec![0; RX_BYTES].into_boxed_slice(),
            rx_carry: [0; ACK_BYTES],
            rx_carry_bytes: 0,
            nonblocking: false,
        })
    }

    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        match &self.link {
            Link::Udp(socket) => socket.local_addr().ok(),
            Link::Tcp(tcp) => tcp.stream.as_ref().and_then(|stream| stream.local_addr().ok()),
        }
    }

    /// Whether a write now could reach the server. Always for UDP, which has no connection.
    pub(crate) fn is_up(&self) -> bool {
        match &self.link {
            Link::Udp(_) => true,
            Link::Tcp(tcp) => tcp.stream.is_some(),
        }
    }

    /// When the next reconnect attempt is due, while the TCP connection is down.
    pub(crate) fn reconnect_at(&self) -> Option<Instant> {
        match &self.link {
            Link::Tcp(tcp) if tcp.stream.is_none() => Some(tcp.reconnect_at),
            _ => None,
        }
    }

    /// Re-establishes a broken TCP connection once its reconnect time has come, waiting for it
    /// no later than `deadline` (the caller's poll deadline) and at least a millisecond.
    pub(crate) fn maintain(&mut self, now: Instant, deadline: Instant, stats: &mut Stats) {
        let Link::Tcp(tcp) = &mut self.link else {
            return;
        };
        if tcp.stream.is_some() || now < tcp.reconnect_at {
            return;
        }
        let budget = deadline
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), tcp.connect_timeout);
        match open_tcp(tcp.target, budget, tcp.write_timeout) {
            Ok(stream) => {
                tcp.stream = Some(stream);
                tcp.reconnect_delay = tcp.reconnect_delay_first;
                self.nonblocking = false;
                self.rx_carry_bytes = 0;
                stats.reconnects += 1;
            }
            Err(_) => {
                stats.io_errors += 1;
                tcp.reconnect_at = Instant::now() + tcp.reconnect_delay;
                tcp.reconnect_delay = tcp.reconnect_delay.saturating_mul(2).min(tcp.reconnect_delay_max);
            }
        }
    }

    /// Adds one encoded frame to the next write, first writing out what is packed if the frame
    /// would push the write over its frame count or byte bound.
    pub(crate) fn push_frame(&mut self, frame: &[u8], stats: &mut Stats) {
        if self.tx_frames >= self.tx_frames_max || self.tx.len() + frame.len() > self.tx_bytes_max {
            self.transmit(stats);
        }
        self.tx.extend_from_slice(frame);
        self.tx_frames += 1;
    }

    /// Writes out what is packed. Frames that cannot be written are counted and dropped; the
    /// resend timers of their events send them again.
    pub(crate) fn transmit(&mut self, stats: &mut Stats) {
        if self.tx_frames == 0 {
            return;
        }
        let frames = self.tx_frames;
        self.tx_frames = 0;
        let written = match self.set_nonblocking(false) {
            Err(_) => false,
            Ok(()) => match &mut self.link {
                // One datagram per write: UDP sends it whole or not at all.
                Link::Udp(socket) => socket.send(&self.tx).is_ok(),
                Link::Tcp(tcp) => match &mut tcp.stream {
                    None => {
                        stats.frames_unsent += frames as u64;
                        self.tx.clear();
                        return;
                    }
                    Some(stream) => stream.write_all(&self.tx).is_ok(),
                },
            },
        };
        self.tx.clear();
        if written {
            stats.writes += 1;
        } else {
            stats.io_errors += 1;
            stats.frames_unsent += frames as u64;
            // A TCP write that failed part-way leaves half a frame in the stream, after which
            // the server cannot find frame boundaries: only a new connection recovers.
            self.disconnect(stats);
        }
    }

    /// One read: waits up to `wait` for bytes, or with `None` takes only what has already
    /// arrived. `None` when nothing arrived.
    pub(crate) fn read(&mut self, wait: Option<Duration>, stats: &mut Stats) -> Option<Received<'_>> {
        if !self.is_up() {
            // No connection to wait on: waiting is still what the caller asked for, and
            // returning at once would turn its loop into a busy spin until the reconnect time.
            if let Some(wait) = wait {
                std::thread::sleep(wait);
            }
            return None;
        }
        let mode = match wait {
            None => self.set_nonblocking(true),
            Some(wait) => self
                .set_nonblocking(false)
                .and_then(|()| self.set_read_timeout(wait.max(Duration::from_micros(1)))),
        };
        if mode.is_err() {
            stats.io_errors += 1;
            return None;
        }
        match &mut self.link {
            Link::Udp(socket) => match socket.recv(&mut self.rx) {
                Ok(datagram_bytes) => {
                    let whole_bytes = datagram_bytes - datagram_bytes % ACK_BYTES;
                    Some(Received {
                        acks: &self.rx[..whole_bytes],
                        stray_bytes: datagram_bytes - whole_bytes,
                    })
                }
                Err(error) => {
                    // ConnectionRefused is an ICMP answer to an earlier datagram (no server
                    // there yet): worth counting, not acting on, since resends cover the loss.
                    if !is_no_data(&error) {
                        stats.io_errors += 1;
                    }
                    None
                }
            },
            Link::Tcp(tcp) => {
                let stream = tcp.stream.as_mut()?;
                // The start of an ack the last read cut off goes first; this read completes it.
                let carry_bytes = self.rx_carry_bytes;
                self.rx[..carry_bytes].copy_from_slice(&self.rx_carry[..carry_bytes]);
                match stream.read(&mut self.rx[carry_bytes..]) {
                    Ok(0) => {
                        self.disconnect(stats);
                        None
                    }
                    Ok(read_bytes) => {
                        let valid_bytes = carry_bytes + read_bytes;
                        let whole_bytes = valid_bytes - valid_bytes % ACK_BYTES;
                        self.rx_carry_bytes = valid_bytes - whole_bytes;
                        self.rx_carry[..self.rx_carry_bytes].copy_from_slice(&self.rx[whole_bytes..valid_bytes]);
                        Some(Received {
                            acks: &self.rx[..whole_bytes],
                            stray_bytes: 0,
                        })
                    }
                    Err(error) => {
                        if !is_no_data(&error) {
                            stats.io_errors += 1;
                            self.disconnect(stats);
                        }
                        None
                    }
                }
            }
        }
    }

    fn disconnect(&mut self, stats: &mut Stats) {
        if let Link::Tcp(tcp) = &mut self.link {
            if tcp.stream.take().is_some() {
                stats.disconnects += 1;
                tcp.reconnect_at = Instant::now();
            }
            self.rx_carry_bytes = 0;
            self.nonblocking = false;
        }
    }

    fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        if self.nonblocking == nonblocking {
            return Ok(());
        }
        match &self.link {
            Link::Udp(socket) => socket.set_nonblocking(nonblocking)?,
            Link::Tcp(tcp) => match &tcp.stream {
                Some(stream) => stream.set_nonblocking(nonblocking)?,
                None => return Ok(()),
            },
        }
        self.nonblocking = nonblocking;
        Ok(())
    }

    fn set_read_timeout(&self, wait: Duration) -> io::Result<()> {
        match &self.link {
            Link::Udp(socket) => socket.set_read_timeout(Some(wait)),
            Link::Tcp(tcp) => match &tcp.stream {
                Some(stream) => stream.set_read_timeout(Some(wait)),
                None => Ok(()),
            },
        }
    }
}

/// A read that found nothing: the wait ran out or a signal interrupted it.
fn is_no_data(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// A UDP socket bound to an ephemeral port of the target's family and connected to the target:
/// sends need no address, and the kernel drops datagrams from anyone else.
fn open_udp(target: SocketAddr, write_timeout: Duration) -> io::Result<UdpSocket> {
    let local: SocketAddr = match (target.is_ipv4(), target.ip().is_loopback()) {
        (true, true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (true, false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (false, true) => (Ipv6Addr::LOCALHOST, 0).into(),
        (false, false) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(target)?;
    // A send blocks only while the socket buffer is full; never longer than one resend wait.
    socket.set_write_timeout(Some(write_timeout))?;
    Ok(socket)
}

fn open_tcp(target: SocketAddr, connect_timeout: Duration, write_timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, connect_timeout)?;
    // Frames are already batched per write; Nagle would only add latency.
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(write_timeout))?;
    Ok(stream)
}
