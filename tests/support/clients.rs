//! UDP and TCP clients that speak the wire protocol, also from other loopback sources.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use shardgate::wire::frame;

use super::events::{parse_acks, AckMsg};

pub(super) fn set_rcvbuf(fd: i32, bytes: i32) {
    // SAFETY: plain setsockopt on a socket fd we own, with a properly sized int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// A UDP client on its own ephemeral port (loopback, for a server on loopback).
pub struct UdpClient {
    sock: UdpSocket,
    server: SocketAddr,
    /// datagrams that came from another address than the server's
    pub foreign_datagrams: usize,
}

impl UdpClient {
    pub fn new(server: SocketAddr) -> UdpClient {
        // A loopback source cannot leave the host: a server on another address (in a network
        // namespace) is reached from the address the route picks.
        let local = if server.ip().is_loopback() {
            "127.0.0.1:0"
        } else {
            "0.0.0.0:0"
        };
        let sock = UdpSocket::bind(local).expect("bind udp client");
        sock.set_read_timeout(Some(Duration::from_millis(5)))
            .expect("udp read timeout");
        set_rcvbuf(sock.as_raw_fd(), 4 << 20);
        UdpClient {
            sock,
            server,
            foreign_datagrams: 0,
        }
    }

    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().expect("local addr").port()
    }

    /// One datagram.
    pub fn send_frames(&self, bytes: &[u8]) {
        // A loopback send can fail only transiently (ENOBUFS); the caller's resend covers it.
        let _ = self.sock.send_to(bytes, self.server);
    }

    /// One receive attempt (about 5 ms at most): the acks of one datagram, if any.
    pub fn try_recv(&mut self) -> Vec<AckMsg> {
        let mut buf = [0u8; 65536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if from.port() != self.server.port() {
                    self.foreign_datagrams += 1;
                    return Vec::new();
                }
                parse_acks(&buf[..n])
            }
            Err(_) => Vec::new(),
        }
    }

    /// One receive attempt, then every datagram already queued behind it, without waiting
    /// again: the acks of one read of a busy socket.
    pub fn try_recv_queued(&mut self) -> Vec<AckMsg> {
        let mut acks = self.try_recv();
        if acks.is_empty() {
            return acks;
        }
        loop {
            let more = self.try_recv();
            if more.is_empty() {
                return acks;
            }
            acks.extend(more);
        }
    }

    /// Every ack that arrives until `deadline`.
    pub fn recv_acks(&mut self, deadline: Instant) -> Vec<AckMsg> {
        self.recv_acks_until(deadline, usize::MAX)
    }

    /// Acks until `want` arrived or `deadline` passed.
    pub fn recv_acks_until(&mut self, deadline: Instant, want: usize) -> Vec<AckMsg> {
        let mut acks = Vec::new();
        while acks.len() < want && Instant::now() < deadline {
            acks.extend(self.try_recv());
        }
        acks
    }

    /// Datagrams the kernel dropped at this socket (full receive buffer): lost acks.
    pub fn drops(&self) -> u64 {
        udp_socket_drops(self.local_port()).unwrap_or(0)
    }
}

/// Per-socket drop counter from /proc/net/udp for a socket bound to 127.0.0.1:port (summed
/// over every such socket, e.g. all of a server's SO_REUSEPORT shards).
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!("0100007F:{port:04X}");
    let mut found = None;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 13 && cols[1] == want {
            let drops: u64 = cols[cols.len() - 1].parse().ok()?;
            found = Some(found.unwrap_or(0) + drops);
        }
    }
    found
}

/// A TCP client; reassembles 28-byte acks across reads.
pub struct TcpClient {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl TcpClient {
    pub fn connect(addr: SocketAddr) -> io::Result<TcpClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(TcpClient {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes `bytes` in chunks cut at random offsets (each chunk its own segment).
    pub fn send_split(&mut self, bytes: &[u8], rng: &mut StdRng) -> io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let max = match rng.gen_range(0..4) {
                0 => 8,
                1 => 64,
                2 => 700,
                _ => 4096,
            };
            let n = rng.gen_range(1..=max).min(rest.len());
            self.stream.write_all(&rest[..n])?;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Has the server closed the connection (EOF or reset seen)?
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// One read attempt (about 5 ms at most).
    pub fn poll_acks(&mut self) -> Vec<AckMsg> {
        if self.closed {
            return Vec::new();
        }
        let mut tmp = [0u8; 16384];
        match self.stream.read(&mut tmp) {
            Ok(0) => self.closed = true,
            Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.closed = true,
        }
        let whole = self.buf.len() / frame::ACK_BYTES * frame::ACK_BYTES;
        let acks = parse_acks(&self.buf[..whole]);
        self.buf.drain(..whole);
        acks
    }

    pub fn recv_acks(&mut self, deadline: Instant) -> Vec<AckMsg> {
        self.recv_acks_until(deadline, usize::MAX)
    }

    pub fn recv_acks_until(&mut self, deadline: Instant, want: usize) -> Vec<AckMsg> {
        let mut acks = Vec::new();
        while acks.len() < want && !self.closed && Instant::now() < deadline {
            acks.extend(self.poll_acks());
        }
        acks
    }

    /// Reads until the server closes the connection or `deadline`; returns (closed, acks
    /// that arrived meanwhile).
    pub fn wait_closed(&mut self, deadline: Instant) -> (bool, Vec<AckMsg>) {
        let acks = self.recv_acks(deadline);
        (self.closed, acks)
    }
}

/// A UDP socket on `ip` (any 127.x.y.z is local on Linux), so a test can be several sources.
pub fn udp_socket_from(ip: [u8; 4]) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap_or_else(|e| panic!("bind udp {ip:?}: {e}"));
    set_rcvbuf(socket.as_raw_fd(), 4 << 20);
    socket
}

/// A TCP connection to `server` from `ip` (another loopback source), with short read and
/// write timeouts.
pub fn tcp_connect_from(ip: [u8; 4], server: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((ip, 0)).into())?;
    socket.connect_timeout(&server.into(), Duration::from_secs(2))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}
