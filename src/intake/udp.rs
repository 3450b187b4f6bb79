//! UDP intake: datagrams in, frames out, immediate answers back.
//!
//! A datagram carries one or more whole frames. Each whole frame gets exactly
//! one answer. The first bytes that do not form a whole frame end the
//! datagram: a header announcing a payload over the limit is REJECTED by its
//! id (the protocol's "length" reason) when the whole frame it announces is
//! there and its crc matches, since REJECTED names only an id the crc vouched
//! for (protocol revision 2); anything else (unparseable bytes, or a tail cut
//! short, even after a whole header) gets no answer and is counted.
//! A cut frame is not REJECTED because REJECTED tells a client never to resend
//! it unchanged, and the same bytes, whole, would be a valid event. Immediate answers for one
//! datagram, and of every datagram one `recvmmsg` read, are coalesced per
//! source into as few reply datagrams as the MTU allows (`reply::ReplyBook`).
//!
//! Each frame first takes a token from its source's bucket (`limiter.rs`). A
//! frame that finds none is dropped before it is parsed, unanswered, and
//! counted as limited: a reply to a spoofable source would make the server a
//! reflector, and answering costs the very work the limit sheds (see
//! docs/design.md, "Abuse limits"). Bytes that are no frame take no token:
//! they cost no more than their read and get no answer anyway.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::frame::{
    check, crc, CheckError, EventId, Header, RejectReason, Status, AUTH_TAG_BYTES, CRC_BYTES, FLAG_AUTH,
    FRAME_OVERHEAD_BYTES,
};

use crate::intake::limiter::SourceLimiter;
use crate::intake::source::SourceKey;
use crate::intake::{unix_now_us, Settings};
use crate::limits::{
    DATAGRAM_BYTES_MAX, RECEIVE_BATCH_DATAGRAMS, REPLY_BOOK_DESTINATIONS, UDP_GROUP_RECOUNT_MS, UDP_SOCKET_BUFFER_BYTES,
};
use crate::pipeline::answer::{AckSink, ReplyBook, Route};
use crate::pipeline::shard::{Fate, Shard};
use crate::sys::DatagramBatch;
use crate::telemetry::metrics::Transport;

/// One shard's UDP socket, through two handles on the same descriptor.
///
/// Datagrams are read and answers sent with plain non-blocking syscalls on
/// `direct`; glommio's io_uring is used only to wait until the socket is
/// readable (a one-byte `MSG_PEEK`) or writable. glommio's own receive and
/// send allocate a buffer of the full datagram size whenever they have to
/// wait, which under a steady trickle is one 64 KiB allocation per datagram;
/// this way a wake-up costs one tiny buffer and then drains every datagram
/// that is ready.
///
/// The socket can be closed while the shard lives on (`leave_group`): in a
/// rolling restart the old process leaves the SO_REUSEPORT group before it
/// drains, so the kernel sends every later datagram to the new process. From
/// then on answers cannot be sent (any socket bound to the address would join
/// the group again); they are counted, and their clients resend.
pub struct UdpIo {
    address: SocketAddr,
    open: RefCell<Option<Rc<UdpSockets>>>,
    replies_unsent: Cell<u64>,
}

struct UdpSockets {
    waiter: glommio::net::UdpSocket,
    direct: std::net::UdpSocket,
}

/// Whether this process shares its UDP group with another one, as seen at stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GroupShare {
    /// Only this process's sockets are bound to the address.
    Alone,
    /// Sockets of another process (a rolling restart's successor) are in the group.
    Shared { other_sockets: usize },
}

impl UdpIo {
    /// A socket in the shared SO_REUSEPORT group on `address`. The group's
    /// spreading program is attached later, by `spread_over_group`, once every
    /// shard has bound its socket and the group can be counted.
    pub fn bind(address: SocketAddr) -> std::io::Result<UdpIo> {
        let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        // Larger buffers absorb a burst while the shard is busy; the kernel caps
        // them at net.core.{r,w}mem_max, which operators raise (docs/operations.md).
        let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
        let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
        socket.bind(&address.into())?;
        let direct: std::net::UdpSocket = socket.try_clone()?.into();
        direct.set_nonblocking(true)?;
        Ok(UdpIo {
            address,
            open: RefCell::new(Some(Rc::new(UdpSockets {
                waiter: glommio::net::UdpSocket::from(socket),
                direct,
            }))),
            replies_unsent: Cell::new(0),
        })
    }

    /// Reads every datagram that is ready, up to the batch's slots, in one
    /// system call; `Ok(0)` if none is (or the socket is closed).
    // pub for tests/alloc.rs
    #[doc(hidden)]
    pub fn try_receive(&self, batch: &mut DatagramBatch) -> std::io::Result<usize> {
        let open = self.open.borrow();
        let Some(sockets) = open.as_ref() else {
            return Ok(0);
        };
        batch.receive(&sockets.direct)
    }

    /// Resolves when a datagram is waiting, without taking it; never, once the socket is closed.
    async fn readable(&self) {
        let Some(sockets) = self.open.borrow().clone() else {
            return futures_lite::future::pending().await;
        };
        let mut one_byte = [0u8; 1];
        let _ = sockets.waiter.peek_from(&mut one_byte).await;
    }

    /// Sends one datagram, waiting through io_uring only if the socket's send
    /// buffer is full. After `leave_group` nothing is sent; the reply is only counted.
    pub async fn send_to(&self, bytes: &[u8], destination: SocketAddr) -> std::io::Result<()> {
        let sent = match self.open.borrow().as_ref() {
            Some(sockets) => sockets.direct.send_to(bytes, destination),
            None => {
                self.replies_unsent.set(self.replies_unsent.get() + 1);
                return Ok(());
            }
        };
        match sent {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                // Held for the wait, so a leave meanwhile closes the socket after this send.
                let Some(sockets) = self.open.borrow().clone() else {
                    return Ok(());
                };
                sockets
                    .waiter
                    .send_to(bytes, destination)
                    .await
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            }
            Err(error) => Err(error),
        }
    }

    /// The socket's inode: how /proc/net/udp names it (see `exporter.rs`); 0 once closed.
    pub(crate) fn socket_inode(&self) -> u64 {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let Some(fd) = self.open.borrow().as_ref().map(|sockets| sockets.direct.as_raw_fd()) else {
            return 0;
        };
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .map(|metadata| metadata.ino())
            .unwrap_or(0)
    }

    /// Counts the sockets in the group (this process's and any other's) and, if the count
    /// differs from `attached_size`, attaches the spreading program for the new count; returns
    /// the size now attached. Where the group cannot be counted (no /proc), the first call
    /// attaches `fallback_size`, this process's shard count, as before rolling restarts existed.
    pub(crate) fn spread_over_group(&self, attached_size: usize, fallback_size: usize) -> usize {
        let Some(sockets) = self.open.borrow().clone() else {
            return attached_size;
        };
        let size = match crate::sys::udp_group_inodes(self.address) {
            Ok(members) if !members.is_empty() => members.len(),
            // A failed re-count keeps what is attached: it still delivers every datagram.
            _ if attached_size != 0 => return attached_size,
            counted => {
                let error = counted.map_or_else(|error| error.to_string(), |_| "not in the socket table".into());
                tracing::warn!(%error, "cannot count the udp group's sockets; spreading over this process's only");
                fallback_size
            }
        };
        if size == attached_size {
            return attached_size;
        }
        match crate::sys::spread_datagrams_randomly(&sockets.direct, size as u32) {
            Ok(()) => {
                if attached_size != 0 {
                    tracing::info!(
                        group_sockets = size,
                        was = attached_size,
                        "udp group changed; spreading over all of it"
                    );
                }
                size
            }
            Err(error) => {
                if attached_size == 0 {
                    tracing::warn!(%error, "udp datagrams spread by the kernel's source hash, not at random");
                }
                attached_size
            }
        }
    }

    /// Whether sockets of another process are in the group: group members that are not among
    /// this process's open sockets. Every shard asks before any of this process's shards closes
    /// its socket, unless another process is there: only then do shards close theirs.
    pub(crate) fn group_share(&self) -> std::io::Result<GroupShare> {
        let members = crate::sys::udp_group_inodes(self.address)?;
        let own = crate::sys::own_socket_inodes()?;
        let other_sockets = members.iter().filter(|inode| !own.contains(inode)).count();
        Ok(match other_sockets {
            0 => GroupShare::Alone,
            other_sockets => GroupShare::Shared { other_sockets },
        })
    }

    /// Closes the socket, which takes it out of the group: the kernel stops routing datagrams to
    /// it (those already queued are dropped unanswered, and their clients resend).
    pub(crate) fn leave_group(&self) {
        self.open.borrow_mut().take();
    }

    /// Reply datagrams not sent because the socket had left the group.
    pub(crate) fn replies_unsent(&self) -> u64 {
        self.replies_unsent.get()
    }
}

/// Answers leave through the shard's own socket.
impl AckSink for UdpIo {
    async fn send_datagram(&self, bytes: &[u8], destination: SocketAddr) -> std::io::Result<()> {
        self.send_to(bytes, destination).await
    }
}

/// Shard 0's task: re-counts the group every `UDP_GROUP_RECOUNT_MS` and re-attaches the
/// program when another process joined or left it, until the shard stops.
pub async fn keep_spread_over_group(shard: Rc<Shard>, udp: Rc<UdpIo>, mut attached_size: usize, shard_count: usize) {
    let period = Duration::from_millis(UDP_GROUP_RECOUNT_MS);
    loop {
        futures_lite::future::or(shard.stopping.wait(), glommio::timer::sleep(period)).await;
        if shard.stopping.is_open() {
            return;
        }
        attached_size = udp.spread_over_group(attached_size, shard_count);
    }
}

/// Receive errors in a row after which the shard pauses reading for
/// `RECEIVE_ERROR_PAUSE`: an error that persists must not spin the shard and
/// starve its ticks (heartbeats, Redis liveness, the stop signal).
const RECEIVE_ERRORS_BEFORE_PAUSE: u32 = 16;
const RECEIVE_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// What the reader does after a receive error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReceiveBackoff {
    /// Let the shard's other tasks run, then read again.
    Yield,
    /// Sleep this long: the error persists.
    Pause(std::time::Duration),
}

/// The errors in a row after one more, and what to do: yield, and after
/// `RECEIVE_ERRORS_BEFORE_PAUSE` in a row pause, so that an error that never
/// clears costs a read per millisecond, not a spinning core.
fn after_receive_error(errors_in_a_row: u32) -> (u32, ReceiveBackoff) {
    let errors_in_a_row = errors_in_a_row + 1;
    if errors_in_a_row >= RECEIVE_ERRORS_BEFORE_PAUSE {
        (0, ReceiveBackoff::Pause(RECEIVE_ERROR_PAUSE))
    } else {
        (errors_in_a_row, ReceiveBackoff::Yield)
    }
}

/// Receives until the shard stops: drains every ready datagram, many per
/// system call, then waits.
pub async fn serve(shard: Rc<Shard>, udp: Rc<UdpIo>, settings: Settings) {
    let mut batch = DatagramBatch::new(RECEIVE_BATCH_DATAGRAMS, DATAGRAM_BYTES_MAX);
    let mut replies = Box::<ReplyBook<REPLY_BOOK_DESTINATIONS>>::default();
    let mut limiter = SourceLimiter::new(
        settings.udp_source_table_entries,
        settings.udp_source_frames_per_sec,
        settings.udp_source_burst_frames,
    );
    let mut errors_in_a_row = 0u32;
    while !shard.stopping.is_open() {
        match udp.try_receive(&mut batch) {
            Ok(0) => {
                errors_in_a_row = 0;
                futures_lite::future::or(shard.stopping.wait(), udp.readable()).await;
            }
            Ok(count) => {
                errors_in_a_row = 0;
                // One clock reading for the whole read: its datagrams were all queued
                // before it, and two clock calls per datagram showed in the profile.
                let received = Received {
                    at: Instant::now(),
                    unix_us: unix_now_us(),
                };
                // The dedup lookups of the whole read start before any frame is decided.
                for index in 0..count {
                    if let Some((data, _)) = batch.datagram(index) {
                        shard.prefetch(data);
                    }
                }
                for index in 0..count {
                    match batch.datagram(index) {
                        Some((data, source)) => {
                            handle_datagram(&shard, &udp, &mut limiter, data, source, received, &mut replies).await
                        }
                        // Cut short by the kernel, or from an unknown address family: no frame to trust.
                        None => shard.metrics.unparseable[Transport::Udp as usize].add(1),
                    }
                }
                // Immediate answers of every datagram of this read, coalesced per source.
                shard.send_udp_replies(&*udp, &mut replies).await;
                if count < batch.slots() {
                    // The queue was drained: wait, without a system call that would find it empty.
                    futures_lite::future::or(shard.stopping.wait(), udp.readable()).await;
                } else {
                    // A socket under a flood never makes us wait; let the Redis
                    // connection, timers and completions run (see PREEMPT_TIMER_US).
                    glommio::yield_if_needed().await;
                }
            }
            // ICMP errors from earlier replies surface here; they concern one
            // client, never the socket. Anything that repeats gets a pause.
            Err(_) => {
                shard.metrics.udp_receive_errors.add(1);
                let backoff;
                (errors_in_a_row, backoff) = after_receive_error(errors_in_a_row);
                match backoff {
                    ReceiveBackoff::Yield => glommio::executor().yield_now().await,
                    ReceiveBackoff::Pause(pause) => glommio::timer::sleep(pause).await,
                }
            }
        }
    }
}

/// When a read's datagrams were taken from the socket.
// pub for tests/alloc.rs
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Received {
    pub at: Instant,
    pub unix_us: u64,
}

/// Frames and limited frames of one datagram, counted per datagram rather than per frame.
#[derive(Default)]
struct Tally {
    frames: u64,
    limited_frames: u64,
}

// pub for tests/alloc.rs
#[doc(hidden)]
pub async fn handle_datagram(
    shard: &Rc<Shard>,
    udp: &UdpIo,
    limiter: &mut SourceLimiter,
    data: &[u8],
    source: SocketAddr,
    received: Received,
    replies: &mut ReplyBook<REPLY_BOOK_DESTINATIONS>,
) {
    let route = Route::Datagram(source);
    let source_key = SourceKey::of(source.ip());
    let mut offset = 0;
    let mut tally = Tally::default();
    while offset < data.len() {
        let rest = &data[offset..];
        let (answer, consumed_bytes) = match check(rest) {
            Ok(header) => {
                tally.frames += 1;
                let admitted = limiter.admit(source_key, received.at);
                tally.limited_frames += u64::from(!admitted);
                let status = admitted
                    .then(|| take_whole_frame(shard, &rest[..header.frame_bytes], header, &route, received))
                    .flatten();
                (status.map(|status| (status, header.id)), header.frame_bytes)
            }
            Err(error) => {
                let fate = oversized(rest, error);
                // Only a frame REJECTED by its id takes a token: it is the only one answered.
                let admitted = matches!(fate, Oversized::Intact(_)) && limiter.admit(source_key, received.at);
                let refusal = refusal(fate, admitted);
                tally.frames += u64::from(refusal.is_frame);
                count_refusal(shard, refusal.counted, &mut tally, received.at);
                (refusal.answer.map(|id| (Status::Rejected, id)), rest.len())
            }
        };
        offset += consumed_bytes;
        if let Some((status, id)) = answer {
            shard.push_udp_answer(udp, replies, source, status, id).await;
        }
    }
    debug_assert_eq!(offset, data.len());
    debug_assert!(tally.limited_frames <= tally.frames);
    shard.metrics.frames_received[Transport::Udp as usize].add(tally.frames);
    shard.metrics.frames_limited[Transport::Udp as usize].add(tally.limited_frames);
    shard.metrics.bytes_received[Transport::Udp as usize].add(data.len() as u64);
}

/// A whole frame that took its token: the shard decides; `None` if it answers later or never.
fn take_whole_frame(
    shard: &Rc<Shard>,
    frame: &[u8],
    header: Header,
    route: &Route,
    received: Received,
) -> Option<Status> {
    match shard.take_frame(frame, header, route, received.at, received.unix_us) {
        Fate::Now(status) => Some(status),
        // A corrupt frame is counted by the shard and never answered.
        Fate::Later | Fate::Corrupt => None,
    }
}

/// What becomes of the bytes that end a datagram because `check` refused them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refusal {
    /// The id REJECTED is answered for, if any.
    answer: Option<EventId>,
    /// Whether the bytes were a whole frame (counted as received), or no frame at all.
    is_frame: bool,
    counted: Counted,
}

/// The counter a refusal goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Rejected,
    Limited,
    Corrupt,
    Unparseable,
}

/// Pure, so that every case is tested alone: an intact oversized frame that got a token is
/// REJECTED by its id; one that did not is limited; a corrupt one and bytes that are no frame
/// get no answer (see the module doc).
fn refusal(fate: Oversized, admitted: bool) -> Refusal {
    let (answer, is_frame, counted) = match fate {
        Oversized::Intact(id) if admitted => (Some(id), true, Counted::Rejected),
        Oversized::Intact(_) => (None, true, Counted::Limited),
        Oversized::Corrupt => (None, true, Counted::Corrupt),
        Oversized::NotOne => (None, false, Counted::Unparseable),
    };
    Refusal {
        answer,
        is_frame,
        counted,
    }
}

fn count_refusal(shard: &Shard, counted: Counted, tally: &mut Tally, received_at: Instant) {
    let udp = Transport::Udp as usize;
    match counted {
        Counted::Rejected => {
            shard.metrics.reject(Transport::Udp, RejectReason::Length);
            shard.record_answered(Transport::Udp, Status::Rejected, received_at, Instant::now());
        }
        Counted::Limited => tally.limited_frames += 1,
        Counted::Corrupt => shard.metrics.frames_corrupt[udp].add(1),
        Counted::Unparseable => shard.metrics.unparseable[udp].add(1),
    }
}

/// What the bytes that `check` refused are, as far as an answer goes: they get a REJECTED
/// answer only when the header parsed and announces a payload over the limit, and the crc of
/// the whole frame it announces matches; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Oversized {
    /// A whole frame over the payload limit whose crc matches: REJECTED by its id.
    Intact(EventId),
    /// A whole frame over the payload limit whose crc does not match: its id
    /// cannot be trusted, so it is counted and never answered.
    Corrupt,
    /// No whole frame: unparseable bytes or a tail cut short.
    NotOne,
}

fn oversized(rest: &[u8], error: CheckError) -> Oversized {
    let CheckError::PayloadTooLong(id) = error else {
        return Oversized::NotOne;
    };
    // `check` read the whole header, so these bytes are there.
    let (Some(&flags), Some(length_bytes)) = (rest.get(4), rest.get(6..8)) else {
        return Oversized::NotOne;
    };
    let payload_bytes = usize::from(u16::from_le_bytes([length_bytes[0], length_bytes[1]]));
    let tag_bytes = if flags & FLAG_AUTH != 0 { AUTH_TAG_BYTES } else { 0 };
    let frame_bytes = FRAME_OVERHEAD_BYTES + payload_bytes + tag_bytes;
    let Some(frame) = rest.get(..frame_bytes) else {
        return Oversized::NotOne;
    };
    let Some((covered, crc_field)) = frame.split_last_chunk::<CRC_BYTES>() else {
        return Oversized::NotOne;
    };
    if crc(covered) == u32::from_le_bytes(*crc_field) {
        Oversized::Intact(id)
    } else {
        Oversized::Corrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that never clears makes the reader pause regularly, bounding it to a read per pause, never a spin.
    #[test]
    fn persistent_receive_errors_pause() {
        let mut errors_in_a_row = 0;
        let mut pauses = 0;
        let reads = 10 * RECEIVE_ERRORS_BEFORE_PAUSE;
        for _ in 0..reads {
            let backoff;
            (errors_in_a_row, backoff) = after_receive_error(errors_in_a_row);
            assert!(errors_in_a_row < RECEIVE_ERRORS_BEFORE_PAUSE);
            if let ReceiveBackoff::Pause(pause) = backoff {
                assert!(pause >= std::time::Duration::from_millis(1));
                pauses += 1;
            }
        }
        assert_eq!(
            pauses, 10,
            "one pause per {RECEIVE_ERRORS_BEFORE_PAUSE} errors in a row"
        );
        assert_eq!(
            after_receive_error(0),
            (1, ReceiveBackoff::Yield),
            "a lone error only yields"
        );
    }

    /// Each kind of refused bytes gets its one answer and its one counter; only an intact
    /// oversized frame that got a token is answered, and only whole frames count as frames.
    #[test]
    fn refused_bytes_get_one_answer_and_one_counter() {
        let id = EventId { player_id: 5, seq: 6 };
        let cases = [
            (Oversized::Intact(id), true, Some(id), true, Counted::Rejected),
            (Oversized::Intact(id), false, None, true, Counted::Limited),
            (Oversized::Corrupt, true, None, true, Counted::Corrupt),
            (Oversized::Corrupt, false, None, true, Counted::Corrupt),
            (Oversized::NotOne, true, None, false, Counted::Unparseable),
            (Oversized::NotOne, false, None, false, Counted::Unparseable),
        ];
        for (fate, admitted, answer, is_frame, counted) in cases {
            let expected = Refusal {
                answer,
                is_frame,
                counted,
            };
            assert_eq!(refusal(fate, admitted), expected, "{fate:?} admitted={admitted}");
        }
    }
}
