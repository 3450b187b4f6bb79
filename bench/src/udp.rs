//! The UDP transport: one connected socket per lane.
//!
//! Each lane binds its own ephemeral port, so the server's SO_REUSEPORT group hashes the lanes
//! over its shards. The socket is `connect`ed to the target: sends need no address, the kernel
//! drops datagrams from anyone else, and an ICMP "port unreachable" (no server) surfaces as an
//! error on the socket instead of passing silently.

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::thread::Thread;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::lane::{absorb_acks, Lane, Shared, Transmit};
use crate::live::Counters;

/// The receiver wakes at least this often to notice the end of the run.
const RECEIVE_POLL: Duration = Duration::from_millis(50);
/// Kernel buffers for a lane's socket. The default (~200 KiB) holds only a few hundred
/// datagrams, and a receiver thread descheduled for a moment on a busy host would lose acks,
/// which would show up as resends and latency that are the generator's fault, not the server's.
/// The kernel caps the request at net.core.rmem_max/wmem_max.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Largest datagram read: a reply never exceeds the datagram it answers.
const DATAGRAM_BYTES_MAX: usize = 65_536;

/// Opens one lane's socket, connected to `target`.
pub fn open(target: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match (target.is_ipv4(), target.ip().is_loopback()) {
        (true, true) => (Ipv4Addr::LOCALHOST, 0).into(),
        (true, false) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        (false, true) => (Ipv6Addr::LOCALHOST, 0).into(),
        (false, false) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only makes the run noisier.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&local.into())?;
    let socket: UdpSocket = socket.into();
    socket.connect(target)?;
    socket.set_read_timeout(Some(RECEIVE_POLL))?;
    Ok(socket)
}

/// Sends a lane's datagrams.
pub struct UdpTransmit {
    socket: UdpSocket,
}

impl UdpTransmit {
    pub fn new(socket: UdpSocket) -> UdpTransmit {
        UdpTransmit { socket }
    }
}

impl Transmit for UdpTransmit {
    fn transmit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let sent_bytes = self.socket.send(bytes)?;
        if sent_bytes != bytes.len() {
            return Err(io::Error::new(ErrorKind::WriteZero, "datagram truncated"));
        }
        Ok(())
    }
}

/// Reads replies until the lane's sender has finished.
pub fn receive_loop(shared: &Shared, lane: &Lane, socket: UdpSocket, sender: Thread) {
    let mut datagram = vec![0u8; DATAGRAM_BYTES_MAX];
    while !lane.finished.load(Ordering::Relaxed) {
        match socket.recv(&mut datagram) {
            Ok(length_bytes) => {
                let consumed_bytes = absorb_acks(shared, lane, &sender, &datagram[..length_bytes]);
                if consumed_bytes < length_bytes {
                    // A reply is whole acks only; a ragged tail is a malformed ack.
                    Counters::add(&shared.counters.malformed_acks, 1);
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                // ICMP unreachable from an earlier send (nobody listening, for now): the frames
                // time out and are resent. Pause so a dead target does not make this a spin.
                Counters::add(&shared.counters.send_errors, 1);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
