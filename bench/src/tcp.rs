//! The TCP transport: one connection per lane, frames out, acks back on the same connection.
//!
//! # Backpressure without blocking the schedule
//! The server stops reading a connection that has too many unanswered frames, so a write can
//! block. The sender must keep its timetable anyway (open loop), so writes use a short timeout
//! and whatever the socket did not take waits in a local buffer, written first on the next
//! turn. Frames waiting there still count from their intended time, so the stall shows up as
//! latency.
//!
//! # A broken connection
//! Either thread may notice it (a write error, or EOF on read). The sender then drops the bytes
//! it held, connects again at most every [`RECONNECT_INTERVAL`], and hands the reader a clone
//! of the new connection. Frames that were on the old one time out and are resent on the new.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::lane::{absorb_acks, Lane, Shared, Transmit};
use crate::live::Counters;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest one write waits for socket space before the rest is kept for later.
const WRITE_WAIT: Duration = Duration::from_millis(2);
/// The reader wakes at least this often to notice the end of the run or a new connection.
const RECEIVE_POLL: Duration = Duration::from_millis(50);
const RECONNECT_INTERVAL: Duration = Duration::from_millis(200);
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Opens one lane's connection.
pub fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    // Each write is one scheduled send; Nagle would hold it back for the previous one's ack.
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_WAIT))?;
    Ok(stream)
}

/// The connection the reader should use, and whether it is known to be broken.
#[derive(Default)]
struct Current {
    generation: u64,
    reader: Option<TcpStream>,
    broken: bool,
}

/// How the sender hands a new connection to the reader.
#[derive(Default)]
pub struct Handoff {
    current: Mutex<Current>,
}

impl Handoff {
    fn current(&self) -> MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes a freshly opened connection for the reader.
    fn publish(&self, stream: &TcpStream) -> io::Result<()> {
        let reader = stream.try_clone()?;
        reader.set_read_timeout(Some(RECEIVE_POLL))?;
        let mut current = self.current();
        current.generation += 1;
        current.reader = Some(reader);
        current.broken = false;
        Ok(())
    }

    /// Marks `generation` broken, unless a newer connection already replaced it.
    fn mark_broken(&self, generation: u64) {
        let mut current = self.current();
        if current.generation == generation {
            current.broken = true;
        }
    }
}

/// Writes a lane's frames, keeping what the socket would not take yet.
pub struct TcpTransmit {
    target: SocketAddr,
    stream: Option<TcpStream>,
    handoff: Arc<Handoff>,
    counters: Arc<Counters>,
    pending: Vec<u8>,
    written_bytes: usize,
    last_connect: Instant,
}

impl TcpTransmit {
    /// Takes the lane's first connection and publishes it to the reader.
    pub fn new(
        target: SocketAddr,
        stream: TcpStream,
        handoff: Arc<Handoff>,
        counters: Arc<Counters>,
    ) -> io::Result<Self> {
        handoff.publish(&stream)?;
        Ok(TcpTransmit {
            target,
            stream: Some(stream),
            handoff,
            counters,
            pending: Vec::new(),
            written_bytes: 0,
            last_connect: Instant::now(),
        })
    }

    fn break_connection(&mut self) {
        if let Some(stream) = self.stream.take() {
            // Wakes the reader out of its read on the old connection.
            let _ = stream.shutdown(Shutdown::Both);
        }
        self.pending.clear();
        self.written_bytes = 0;
    }

    /// Replaces a broken connection, at most every RECONNECT_INTERVAL.
    fn ensure_connected(&mut self) -> bool {
        if self.handoff.current().broken {
            self.break_connection();
        }
        if self.stream.is_some() {
            return true;
        }
        if self.last_connect.elapsed() < RECONNECT_INTERVAL {
            return false;
        }
        self.last_connect = Instant::now();
        let Ok(stream) = connect(self.target) else {
            return false;
        };
        if self.handoff.publish(&stream).is_err() {
            return false;
        }
        Counters::add(&self.counters.reconnects, 1);
        self.stream = Some(stream);
        true
    }
}

impl Transmit for TcpTransmit {
    fn transmit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.ensure_connected() {
            return Err(io::Error::new(ErrorKind::NotConnected, "connection is being replaced"));
        }
        self.pending.extend_from_slice(bytes);
        self.flush_pending();
        Ok(())
    }

    fn flush_pending(&mut self) {
        while self.written_bytes < self.pending.len() {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match stream.write(&self.pending[self.written_bytes..]) {
                Ok(0) => return self.break_connection(),
                Ok(written_bytes) => self.written_bytes += written_bytes,
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.break_connection(),
            }
        }
        self.pending.clear();
        self.written_bytes = 0;
    }

    fn has_pending(&self) -> bool {
        self.written_bytes < self.pending.len()
    }
}

/// Reads acks from whichever connection is current until the lane's sender has finished.
pub fn receive_loop(shared: &Shared, lane: &Lane, handoff: &Handoff, sender: Thread) {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let mut filled_bytes = 0;
    let mut reading: Option<(u64, TcpStream)> = None;
    while !lane.finished.load(Ordering::Relaxed) {
        {
            let mut current = handoff.current();
            let stale = reading
                .as_ref()
                .is_none_or(|(generation, _)| *generation != current.generation);
            if stale && !current.broken {
                if let Some(stream) = current.reader.take() {
                    reading = Some((current.generation, stream));
                    // Acks never span connections.
                    filled_bytes = 0;
                }
            }
        }
        let Some((generation, stream)) = reading.as_mut() else {
            std::thread::sleep(RECEIVE_POLL / 5);
            continue;
        };
        match stream.read(&mut buffer[filled_bytes..]) {
            Ok(0) => {
                handoff.mark_broken(*generation);
                reading = None;
            }
            Ok(read_bytes) => {
                filled_bytes += read_bytes;
                let consumed_bytes = absorb_acks(shared, lane, &sender, &buffer[..filled_bytes]);
                buffer.copy_within(consumed_bytes..filled_bytes, 0);
                filled_bytes -= consumed_bytes;
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                handoff.mark_broken(*generation);
                reading = None;
            }
        }
    }
}
