//! TCP intake: a stream of frames per connection, acks back on the same one.
//!
//! A connection may carry many players (a game server forwarding for them), so
//! frames span reads and answers come back in any order. Each connection has a
//! reader and a writer task on two handles of the same socket (`sys.rs`).
//!
//! Bounds: the reader stops reading once `TCP_UNACKED_FRAMES_MAX` frames are
//! unanswered, which pushes back on the sender through TCP's window and caps
//! the outbox; a shard holds at most `tcp_connections_per_shard` connections,
//! and at most `tcp_connections_per_source` from one source (`tcp_sources.rs`),
//! and closes any more at accept. A header that does not parse, or a
//! payload_len over the limit, ends the connection: the stream cannot be
//! resynced. Answers already owed are still written first.
//!
//! Two timeouts end a connection that holds resources without using them: one
//! that sends nothing for `tcp_idle_timeout_ms` is closed (`idle`), and one
//! whose acks cannot be written for `tcp_write_timeout_ms` because it does not
//! read them is closed (`slow_reader`). Until then such a peer holds its
//! outbox and a small kernel send buffer (`TCP_SEND_BUFFER_BYTES`), never
//! more: the reader stops at the unanswered bound. When it goes, the acks
//! still owed to it are dropped; its events are stored all the same, and the
//! copies it resends are answered DUPLICATE.

use std::cell::{Cell, RefCell};
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use crate::intake::source::SourceKey;
use crate::intake::tcp_sources::TcpSources;
use crate::intake::{unix_now_us, Settings};
use crate::limits::{TCP_OUTBOX_BYTES, TCP_READ_BUFFER_BYTES, TCP_SEND_BUFFER_BYTES, TCP_UNACKED_FRAMES_MAX};
use crate::pipeline::answer::{Route, StreamAcks};
use crate::pipeline::notify::Notify;
use crate::pipeline::shard::{Fate, Shard};
use crate::telemetry::metrics::{CloseReason, Transport};
use crate::wire::frame::{encode_ack, EventId, Status, ACK_BYTES};
use crate::wire::stream::{self, Stop};

/// A shard's open TCP connections: counted at accept, and waited for at stop.
#[derive(Default)]
pub struct Connections {
    open: Cell<usize>,
    closed: Notify,
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Waits until every connection has closed, or until `deadline`.
    pub async fn wait_closed(&self, deadline: Instant) {
        while self.open.get() > 0 && Instant::now() < deadline {
            let poll = Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
            futures_lite::future::or(self.closed.wait(), glommio::timer::sleep(poll)).await;
        }
    }

    fn set_open(&self, shard: &Shard, open: usize) {
        self.open.set(open);
        shard.metrics.tcp_connections_open.set(open as i64);
    }
}

/// The state a connection's reader, writer and in-flight batches share.
struct Connection {
    outbox: RefCell<Vec<u8>>,
    /// Frames read whose answer is not yet written to the socket.
    unacked_frames: Cell<usize>,
    reading_done: Cell<bool>,
    /// Why writing failed, once it has: `slow_reader` or `write_failed`. From
    /// then on the connection is broken and its acks are dropped.
    write_failure: Cell<Option<CloseReason>>,
    writer_wake: Notify,
    reader_wake: Notify,
}

impl Connection {
    fn new() -> Connection {
        Connection {
            outbox: RefCell::new(Vec::with_capacity(TCP_OUTBOX_BYTES)),
            unacked_frames: Cell::new(0),
            reading_done: Cell::new(false),
            write_failure: Cell::new(None),
            writer_wake: Notify::default(),
            reader_wake: Notify::default(),
        }
    }

    /// The peer cannot be written to, so its acks are dropped.
    fn broken(&self) -> bool {
        self.write_failure.get().is_some()
    }

    /// The peer cannot be written to: from now on its acks are dropped.
    fn fail_writes(&self, reason: CloseReason) {
        self.write_failure.set(Some(reason));
        self.outbox.borrow_mut().clear();
        self.reader_wake.notify();
    }
}

impl StreamAcks for Connection {
    /// Queues one answer. Never grows the outbox: the reader's bound on
    /// unanswered frames keeps it within its capacity.
    fn push_ack(&self, status: Status, id: EventId) {
        if self.broken() {
            return;
        }
        let mut outbox = self.outbox.borrow_mut();
        assert!(
            outbox.len() + ACK_BYTES <= TCP_OUTBOX_BYTES,
            "unacked frames are bounded below the outbox"
        );
        outbox.extend_from_slice(&encode_ack(status, id));
        drop(outbox);
        self.writer_wake.notify();
    }
}

/// A listener in the shared SO_REUSEPORT group (glommio sets the option).
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).map_err(std::io::Error::from)
}

/// Accepts until the shard stops.
pub async fn serve(shard: Rc<Shard>, listener: TcpListener, settings: Settings, connections: Rc<Connections>) {
    // Allocated once, here at shard start; the connections' tasks release their counts.
    let sources = Rc::new(RefCell::new(TcpSources::new(
        settings.tcp_connections_per_shard,
        settings.tcp_connections_per_source,
    )));
    loop {
        let accept = async { Some(listener.accept().await) };
        let stop = async {
            shard.stopping.wait().await;
            None
        };
        let Some(accepted) = futures_lite::future::or(stop, accept).await else {
            return;
        };
        let Ok(stream) = accepted else {
            // Out of descriptors or a connection reset before accept: back off
            // briefly instead of spinning.
            glommio::timer::sleep(Duration::from_millis(1)).await;
            continue;
        };
        if connections.open() >= settings.tcp_connections_per_shard {
            shard.metrics.close(CloseReason::AtLimit);
            continue;
        }
        // Without a peer address the peer has already gone (ENOTCONN).
        let Ok(peer) = stream.peer_addr() else {
            shard.metrics.tcp_connections_accepted.add(1);
            shard.metrics.close(CloseReason::PeerClosed);
            continue;
        };
        let source = SourceKey::of(peer.ip());
        if !sources.borrow_mut().try_open(source) {
            shard.metrics.close(CloseReason::SourceLimit);
            continue;
        }
        shard.metrics.tcp_connections_accepted.add(1);
        connections.set_open(&shard, connections.open() + 1);
        let connection = serve_connection(
            Rc::clone(&shard),
            stream,
            settings.clone(),
            Rc::clone(&sources),
            source,
            Rc::clone(&connections),
        );
        glommio::spawn_local(connection).detach();
    }
}

async fn serve_connection(
    shard: Rc<Shard>,
    stream: TcpStream,
    settings: Settings,
    sources: Rc<RefCell<TcpSources>>,
    source: SourceKey,
    connections: Rc<Connections>,
) {
    let _ = stream.set_nodelay(true);
    // Bounds the kernel memory a peer that stops reading pins (limits.rs).
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(TCP_SEND_BUFFER_BYTES);
    // A read that waits this long fails with TimedOut: the peer is idle.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(settings.tcp_idle_timeout_ms)));
    let connection = Rc::new(Connection::new());
    if let Ok(writer_stream) = crate::sys::duplicate_stream(&stream) {
        // A write that makes no progress this long fails with TimedOut: the peer does not read.
        let _ = writer_stream.set_write_timeout(Some(Duration::from_millis(settings.tcp_write_timeout_ms)));
        let writer = glommio::spawn_local(write_acks(Rc::clone(&connection), writer_stream));
        let reason = read_frames(&shard, &connection, stream).await;
        connection.reading_done.set(true);
        connection.writer_wake.notify();
        writer.await;
        shard.metrics.close(connection.write_failure.get().unwrap_or(reason));
    }
    sources.borrow_mut().close(source);
    connections.set_open(&shard, connections.open() - 1);
    connections.closed.notify();
}

/// Reads and admits frames until the peer closes, the stream breaks, the
/// bytes stop making sense, or the shard stops; says which.
async fn read_frames(shard: &Rc<Shard>, connection: &Rc<Connection>, mut stream: TcpStream) -> CloseReason {
    let route = Route::Stream(Rc::clone(connection) as Rc<dyn StreamAcks>);
    let mut buffer = vec![0u8; TCP_READ_BUFFER_BYTES];
    let mut filled_bytes = 0;
    loop {
        while connection.unacked_frames.get() >= TCP_UNACKED_FRAMES_MAX && !connection.broken() {
            let stop = shard.stopping.wait();
            futures_lite::future::or(connection.reader_wake.wait(), stop).await;
            if shard.stopping.is_open() {
                return CloseReason::Shutdown;
            }
        }
        let read = async { Some(stream.read(&mut buffer[filled_bytes..]).await) };
        let stop = async {
            shard.stopping.wait().await;
            None
        };
        let read_bytes = match futures_lite::future::or(stop, read).await {
            None => return CloseReason::Shutdown,
            Some(Err(error)) if error.kind() == ErrorKind::TimedOut => return CloseReason::Idle,
            // A writer that gave up shut the socket down, which ends this read too.
            Some(Err(_)) | Some(Ok(0)) => return CloseReason::PeerClosed,
            Some(Ok(read_bytes)) => read_bytes,
        };
        if connection.broken() {
            return CloseReason::WriteFailed;
        }
        shard.metrics.bytes_received[Transport::Tcp as usize].add(read_bytes as u64);
        filled_bytes += read_bytes;
        let consumed_bytes = match take_frames(shard, connection, &route, &buffer[..filled_bytes]) {
            Ok(consumed_bytes) => consumed_bytes,
            Err(CloseReason::Unparseable) => {
                shard.metrics.unparseable[Transport::Tcp as usize].add(1);
                return CloseReason::Unparseable;
            }
            Err(reason) => return reason,
        };
        buffer.copy_within(consumed_bytes..filled_bytes, 0);
        filled_bytes -= consumed_bytes;
        glommio::yield_if_needed().await;
    }
}

/// Admits every whole frame at the front of `data`; returns the bytes used,
/// or why the stream cannot go on: bytes that are no frame, or a frame whose
/// crc does not match (the framing itself may be what was corrupted).
fn take_frames(shard: &Rc<Shard>, connection: &Connection, route: &Route, data: &[u8]) -> Result<usize, CloseReason> {
    let received_at = Instant::now();
    let recv_us = unix_now_us();
    let mut frames = stream::split(data);
    let mut frame_count = 0;
    for frame in frames.by_ref() {
        frame_count += 1;
        connection.unacked_frames.set(connection.unacked_frames.get() + 1);
        match shard.take_frame(frame.bytes, frame.header, route, received_at, recv_us) {
            Fate::Now(status) => connection.push_ack(status, frame.header.id),
            Fate::Later => {}
            Fate::Corrupt => {
                // Never answered, so never owed: the writer must not wait for it.
                connection.unacked_frames.set(connection.unacked_frames.get() - 1);
                shard.metrics.frames_received[Transport::Tcp as usize].add(frame_count);
                return Err(CloseReason::Corrupt);
            }
        }
    }
    shard.metrics.frames_received[Transport::Tcp as usize].add(frame_count);
    match frames.stop() {
        Some(Stop::Broken(_)) => Err(CloseReason::Unparseable),
        Some(Stop::NeedMoreBytes { .. }) | None => Ok(frames.consumed_bytes()),
    }
}

/// Writes answers as they come, until the reader is done and nothing is owed.
async fn write_acks(connection: Rc<Connection>, mut stream: TcpStream) {
    let mut sending: Vec<u8> = Vec::with_capacity(TCP_OUTBOX_BYTES);
    loop {
        if connection.outbox.borrow().is_empty() {
            if connection.reading_done.get() && connection.unacked_frames.get() == 0 {
                break;
            }
            connection.writer_wake.wait().await;
            continue;
        }
        std::mem::swap(&mut *connection.outbox.borrow_mut(), &mut sending);
        if let Err(error) = stream.write_all(&sending).await {
            let reason = match error.kind() {
                ErrorKind::TimedOut => CloseReason::SlowReader,
                _ => CloseReason::WriteFailed,
            };
            connection.fail_writes(reason);
            // Wakes a reader blocked in read() on the other handle: after a
            // shutdown its read returns end-of-stream at once.
            let _ = stream.shutdown(Shutdown::Both).await;
            return;
        }
        debug_assert_eq!(sending.len() % ACK_BYTES, 0);
        let acks_written = sending.len() / ACK_BYTES;
        assert!(
            acks_written <= connection.unacked_frames.get(),
            "every ack answers a frame read"
        );
        connection
            .unacked_frames
            .set(connection.unacked_frames.get() - acks_written);
        sending.clear();
        connection.reader_wake.notify();
    }
    let _ = stream.close().await;
}
