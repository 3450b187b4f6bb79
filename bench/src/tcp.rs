//! The TCP transport: one connection per lane, frames out, acks back on the same connection,
//! all driven by the engine's one thread with non-blocking sockets.
//!
//! # Backpressure without blocking the schedule
//! The server stops reading a connection that has too many unanswered frames, so its socket
//! may take fewer bytes than were queued. The engine must keep its timetable anyway (open
//! loop), so what the socket did not take waits in the lane's outbox and is written first on
//! the next pass. Frames waiting there still count from their intended time, so the stall
//! shows up as latency. The outbox is bounded ([`outbox_bytes_max`]); a write that would pass
//! the bound is refused and counted in `send_errors`, and its frames time out and resend.
//!
//! # A broken connection
//! A write error, or EOF or an error on read, drops the connection and whatever its outbox
//! held. At most every [`RECONNECT_INTERVAL_NS`] a new connection is started without blocking
//! (the other lanes keep their timetable meanwhile); frames that were on the old one time out
//! and are resent on the new.

use std::io::{self, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::engine::Wire;
use crate::live::Counters;
use crate::sys::{self, Interest, Readiness};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT_NS: u64 = 1_000_000_000;
const RECONNECT_INTERVAL_NS: u64 = 200_000_000;
const INBOX_BYTES: usize = 64 * 1024;
/// Reads per readable connection per pass; what is left is read next pass.
const READS_PER_CONNECTION_MAX: usize = 8;
/// Outbox bytes all lanes together may hold back, shared evenly...
const OUTBOX_BYTES_TOTAL: usize = 64 << 20;
/// ...but each at least this (a few writes of the largest frames)...
const OUTBOX_BYTES_MIN: usize = 256 << 10;
/// ...and at most this: at 50k frames/s of 100 bytes over 8 lanes, over ten seconds of a
/// lane's share, long past any SLO.
const OUTBOX_BYTES_MAX: usize = 8 << 20;
/// Written bytes kept at the outbox's front before they are dropped (moving the rest down).
const OUTBOX_COMPACT_BYTES: usize = 64 * 1024;
/// `Down::since_ns` of a link that broke where the clock was not at hand: the next `flush`
/// sets it to its own time.
const SINCE_NEXT_FLUSH: u64 = u64::MAX;

/// Each lane's outbox bound: a share of [`OUTBOX_BYTES_TOTAL`] within the per-lane limits.
fn outbox_bytes_max(lanes: usize) -> usize {
    (OUTBOX_BYTES_TOTAL / lanes.max(1)).clamp(OUTBOX_BYTES_MIN, OUTBOX_BYTES_MAX)
}

/// Opens one lane's first connection (blocking, with a timeout: a target that does not answer
/// fails the run before it starts).
pub fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    prepare(&stream)?;
    Ok(stream)
}

/// Settings every lane connection needs.
fn prepare(stream: &TcpStream) -> io::Result<()> {
    // Each write is one pass's frames; Nagle would hold it back for the previous one's ack.
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    // Best effort: without stamps, acks count from when they are read.
    let _ = sys::enable_receive_timestamps(stream.as_raw_fd());
    Ok(())
}

struct Connection {
    stream: TcpStream,
    outbox: Vec<u8>,
    written_bytes: usize,
    inbox: Vec<u8>,
    filled_bytes: usize,
}

enum Link {
    Up(Connection),
    /// A non-blocking connect in progress since `since_ns`.
    Connecting {
        socket: Socket,
        since_ns: u64,
    },
    /// Broken; the last connect attempt was at `since_ns`.
    Down {
        since_ns: u64,
    },
}

/// Every lane's connection.
pub struct TcpWire {
    /// Each lane's target, where a broken connection is made again.
    targets: Vec<SocketAddr>,
    links: Vec<Link>,
    readiness: Readiness,
    ready: Vec<u64>,
    /// Lanes whose outbox holds unwritten bytes, each once.
    dirty_lanes: Vec<usize>,
    outbox_bytes_max: usize,
    /// Lanes not Up: only then does `flush` look at every lane.
    links_not_up: usize,
}

impl TcpWire {
    /// Takes the lanes' targets and first connections (see [`connect`]), one of each per lane.
    pub fn new(targets: Vec<SocketAddr>, streams: Vec<TcpStream>) -> io::Result<TcpWire> {
        if targets.len() != streams.len() {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "one target per lane connection",
            ));
        }
        let readiness = Readiness::new(streams.len())?;
        for (lane, stream) in streams.iter().enumerate() {
            readiness.add(stream.as_raw_fd(), lane as u64, Interest::Read)?;
        }
        Ok(TcpWire {
            targets,
            outbox_bytes_max: outbox_bytes_max(streams.len()),
            ready: Vec::with_capacity(streams.len()),
            dirty_lanes: Vec::with_capacity(streams.len()),
            links: streams
                .into_iter()
                .map(|stream| Link::Up(Connection::new(stream)))
                .collect(),
            readiness,
            links_not_up: 0,
        })
    }

    fn break_link(&mut self, lane: usize, now_ns: u64) {
        if let Link::Up(connection) = &self.links[lane] {
            // Closing the socket (dropping it below) also removes it from epoll; this is only
            // explicit so a clone held elsewhere could not keep it registered.
            self.readiness.remove(connection.stream.as_raw_fd());
        }
        if !matches!(self.links[lane], Link::Down { .. }) {
            if matches!(self.links[lane], Link::Up(_)) {
                self.links_not_up += 1;
            }
            self.links[lane] = Link::Down { since_ns: now_ns };
        }
    }

    /// Starts a non-blocking connect for a lane that is down, or gives up on one that took too
    /// long. Called from `flush` only while some lane is not up.
    fn look_after_links(&mut self, now_ns: u64) {
        for lane in 0..self.links.len() {
            match &self.links[lane] {
                Link::Up(_) => {}
                Link::Connecting { since_ns, .. } => {
                    if now_ns.saturating_sub(*since_ns) >= CONNECT_TIMEOUT_NS {
                        self.links[lane] = Link::Down { since_ns: now_ns };
                    }
                }
                Link::Down { since_ns } => {
                    if now_ns.saturating_sub(*since_ns) >= RECONNECT_INTERVAL_NS {
                        self.links[lane] = match self.start_connect(lane) {
                            Ok(socket) => Link::Connecting {
                                socket,
                                since_ns: now_ns,
                            },
                            Err(_) => Link::Down { since_ns: now_ns },
                        };
                    }
                }
            }
        }
    }

    fn start_connect(&self, lane: usize) -> io::Result<Socket> {
        let target = self.targets[lane];
        let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        match socket.connect(&SockAddr::from(target)) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(error) => return Err(error),
        }
        self.readiness.add(socket.as_raw_fd(), lane as u64, Interest::Write)?;
        Ok(socket)
    }

    /// A connect reported ready: up if it succeeded, down otherwise.
    fn finish_connect(&mut self, lane: usize, counters: &Counters) {
        let down = Link::Down {
            since_ns: SINCE_NEXT_FLUSH,
        };
        let Link::Connecting { socket, .. } = std::mem::replace(&mut self.links[lane], down) else {
            return;
        };
        let connected = matches!(socket.take_error(), Ok(None)) && socket.peer_addr().is_ok();
        let stream: TcpStream = socket.into();
        if !connected || prepare(&stream).is_err() {
            // Dropping the stream closes it and takes it out of epoll.
            return;
        }
        if self
            .readiness
            .modify(stream.as_raw_fd(), lane as u64, Interest::Read)
            .is_err()
        {
            return;
        }
        Counters::add(&counters.reconnects, 1);
        self.links[lane] = Link::Up(Connection::new(stream));
        self.links_not_up -= 1;
    }

    /// Reads what one connection holds; false if the connection broke.
    fn read_connection(
        connection: &mut Connection,
        lane: usize,
        deliver: &mut impl FnMut(usize, &[u8], Option<i128>) -> usize,
    ) -> bool {
        for _ in 0..READS_PER_CONNECTION_MAX {
            let space_bytes = connection.inbox.len() - connection.filled_bytes;
            let fd = connection.stream.as_raw_fd();
            match sys::recv_stream(fd, &mut connection.inbox[connection.filled_bytes..]) {
                Ok((0, _)) => return false,
                Ok((read_bytes, arrived_realtime_ns)) => {
                    connection.filled_bytes += read_bytes;
                    let filled = connection.filled_bytes;
                    let used_bytes = deliver(lane, &connection.inbox[..filled], arrived_realtime_ns).min(filled);
                    connection.inbox.copy_within(used_bytes..filled, 0);
                    connection.filled_bytes -= used_bytes;
                    if read_bytes < space_bytes {
                        return true;
                    }
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return true,
                Err(_) => return false,
            }
        }
        true
    }
}

impl Connection {
    fn new(stream: TcpStream) -> Connection {
        Connection {
            stream,
            outbox: Vec::new(),
            written_bytes: 0,
            inbox: vec![0; INBOX_BYTES],
            filled_bytes: 0,
        }
    }

    /// Writes what the socket takes; false if the connection broke.
    fn write_out(&mut self) -> bool {
        while self.written_bytes < self.outbox.len() {
            match self.stream.write(&self.outbox[self.written_bytes..]) {
                Ok(0) => return false,
                Ok(written_bytes) => self.written_bytes += written_bytes,
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.written_bytes == self.outbox.len() {
            self.outbox.clear();
            self.written_bytes = 0;
        } else if self.written_bytes >= OUTBOX_COMPACT_BYTES {
            self.outbox.drain(..self.written_bytes);
            self.written_bytes = 0;
        }
        true
    }

    fn has_pending(&self) -> bool {
        self.written_bytes < self.outbox.len()
    }
}

impl Wire for TcpWire {
    fn receive(&mut self, counters: &Counters, mut deliver: impl FnMut(usize, &[u8], Option<i128>) -> usize) {
        self.readiness.ready_now(&mut self.ready);
        let mut broken = Vec::new();
        for index in 0..self.ready.len() {
            let lane = usize::try_from(self.ready[index]).unwrap_or(usize::MAX);
            match self.links.get_mut(lane) {
                Some(Link::Up(connection)) => {
                    if !Self::read_connection(connection, lane, &mut deliver) {
                        broken.push(lane);
                    }
                }
                Some(Link::Connecting { .. }) => self.finish_connect(lane, counters),
                Some(Link::Down { .. }) | None => {}
            }
        }
        for lane in broken {
            // The reconnect waits RECONNECT_INTERVAL from the next flush.
            self.break_link(lane, SINCE_NEXT_FLUSH);
        }
    }

    fn queue(&mut self, lane: usize, bytes: &[u8], counters: &Counters) {
        let outbox_bytes_max = self.outbox_bytes_max;
        let Some(Link::Up(connection)) = self.links.get_mut(lane) else {
            // Being replaced: the frames time out and resend on the new connection.
            Counters::add(&counters.send_errors, 1);
            return;
        };
        // An empty outbox takes any one write, so even the largest write fits a small bound.
        let held_bytes = connection.outbox.len() - connection.written_bytes;
        if held_bytes > 0 && held_bytes + bytes.len() > outbox_bytes_max {
            Counters::add(&counters.send_errors, 1);
            return;
        }
        if !connection.has_pending() {
            self.dirty_lanes.push(lane);
        }
        connection.outbox.extend_from_slice(bytes);
    }

    fn flush(&mut self, _counters: &Counters, now_ns: u64) {
        let mut index = 0;
        while index < self.dirty_lanes.len() {
            let lane = self.dirty_lanes[index];
            let (still_up, pending) = match &mut self.links[lane] {
                Link::Up(connection) => (connection.write_out(), connection.has_pending()),
                _ => (true, false),
            };
            if !still_up {
                self.break_link(lane, now_ns);
            }
            if still_up && pending {
                index += 1;
            } else {
                self.dirty_lanes.swap_remove(index);
            }
        }
        if self.links_not_up > 0 {
            for link in &mut self.links {
                if let Link::Down { since_ns } = link {
                    if *since_ns == SINCE_NEXT_FLUSH {
                        *since_ns = now_ns;
                    }
                }
            }
            self.look_after_links(now_ns);
        }
    }

    fn has_pending(&self) -> bool {
        !self.dirty_lanes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    // Bytes queued go out on flush; acks read come back whole with the lane; a closed
    // connection is replaced after the interval and counted.
    #[test]
    fn writes_reads_and_reconnects() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let mut wire = TcpWire::new(vec![target], vec![connect(target).unwrap()]).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let counters = Counters::default();

        wire.queue(0, b"hello", &counters);
        wire.flush(&counters, 0);
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");

        server.write_all(&[7u8; 30]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut delivered = Vec::new();
        wire.receive(&counters, |lane, bytes, _| {
            delivered.push((lane, bytes.len()));
            28
        });
        assert_eq!(delivered, vec![(0, 30)]);

        drop(server);
        std::thread::sleep(Duration::from_millis(20));
        wire.receive(&counters, |_, bytes, _| bytes.len());
        wire.flush(&counters, 1_000);
        assert!(matches!(wire.links[0], Link::Down { since_ns: 1_000 }));
        wire.queue(0, b"lost", &counters);
        assert_eq!(counters.tally().send_errors, 1);
        wire.flush(&counters, 1_000 + RECONNECT_INTERVAL_NS);
        let (_server, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        wire.receive(&counters, |_, bytes, _| bytes.len());
        assert!(matches!(wire.links[0], Link::Up(_)));
        assert_eq!(counters.tally().reconnects, 1);
    }

    #[test]
    fn outbox_bound_is_shared() {
        assert_eq!(outbox_bytes_max(8), OUTBOX_BYTES_MAX);
        assert_eq!(outbox_bytes_max(1_024), OUTBOX_BYTES_MIN);
        assert_eq!(outbox_bytes_max(0), OUTBOX_BYTES_MAX);
    }
}
