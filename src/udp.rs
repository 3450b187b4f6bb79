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
//! datagram are coalesced into as few reply datagrams as the MTU allows.
//!
//! Each frame first takes a token from its source's bucket (`limiter.rs`). A
//! frame that finds none is dropped before it is parsed, unanswered, and
//! counted as limited: a reply to a spoofable source would make the server a
//! reflector, and answering costs the very work the limit sheds (see
//! docs/design.md, "Abuse limits"). Bytes that are no frame take no token:
//! they cost no more than their read and get no answer anyway.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};

use crate::frame::{
    check, crc, CheckError, EventId, RejectReason, Status, AUTH_TAG_BYTES, CRC_BYTES, FLAG_AUTH, FRAME_OVERHEAD_BYTES,
};
use crate::limiter::SourceLimiter;
use crate::limits::{DATAGRAM_BYTES_MAX, UDP_SOCKET_BUFFER_BYTES};
use crate::metrics::Transport;
use crate::reply::{Route, UdpReply};
use crate::shard::{Fate, Shard};
use crate::source::SourceKey;

/// One shard's UDP socket, through two handles on the same descriptor.
///
/// Datagrams are read and answers sent with plain non-blocking syscalls on
/// `direct`; glommio's io_uring is used only to wait until the socket is
/// readable (a one-byte `MSG_PEEK`) or writable. glommio's own receive and
/// send allocate a buffer of the full datagram size whenever they have to
/// wait, which under a steady trickle is one 64 KiB allocation per datagram;
/// this way a wake-up costs one tiny buffer and then drains every datagram
/// that is ready.
pub struct UdpIo {
    waiter: glommio::net::UdpSocket,
    direct: std::net::UdpSocket,
}

impl UdpIo {
    /// A socket in the shared SO_REUSEPORT group on `address`, which the
    /// kernel then spreads over its `group_size` sockets at random per datagram
    /// (`sys.rs` says why); where the kernel refuses the program, by the hash.
    pub fn bind(address: SocketAddr, group_size: usize) -> std::io::Result<UdpIo> {
        let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        // Larger buffers absorb a burst while the shard is busy; the kernel caps
        // them at net.core.{r,w}mem_max, which operators raise (docs/operations.md).
        let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
        let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
        socket.bind(&address.into())?;
        if let Err(error) = crate::sys::spread_datagrams_randomly(&socket, group_size as u32) {
            tracing::warn!(%error, "udp datagrams spread by the kernel's source hash, not at random");
        }
        let direct: std::net::UdpSocket = socket.try_clone()?.into();
        direct.set_nonblocking(true)?;
        Ok(UdpIo {
            waiter: glommio::net::UdpSocket::from(socket),
            direct,
        })
    }

    /// The next datagram if one is ready, `Ok(None)` if none is.
    fn try_receive(&self, buffer: &mut [u8]) -> std::io::Result<Option<(usize, SocketAddr)>> {
        match self.direct.recv_from(buffer) {
            Ok(received) => Ok(Some(received)),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Resolves when a datagram is waiting, without taking it.
    async fn readable(&self) {
        let mut one_byte = [0u8; 1];
        let _ = self.waiter.peek_from(&mut one_byte).await;
    }

    /// Sends one datagram, waiting through io_uring only if the socket's send
    /// buffer is full.
    pub async fn send_to(&self, bytes: &[u8], destination: SocketAddr) -> std::io::Result<()> {
        match self.direct.send_to(bytes, destination) {
            Ok(_) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => self
                .waiter
                .send_to(bytes, destination)
                .await
                .map(|_| ())
                .map_err(std::io::Error::from),
            Err(error) => Err(error),
        }
    }

    /// The socket's inode: how /proc/net/udp names it (see `exporter.rs`).
    pub fn socket_inode(&self) -> u64 {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/self/fd/{}", self.direct.as_raw_fd()))
            .map(|metadata| metadata.ino())
            .unwrap_or(0)
    }
}

pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// Receive errors in a row after which the shard pauses reading for
/// `RECEIVE_ERROR_PAUSE`: an error that persists must not spin the shard and
/// starve its ticks (heartbeats, Redis liveness, the stop signal).
const RECEIVE_ERRORS_BEFORE_PAUSE: u32 = 16;
const RECEIVE_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Receives until the shard stops: drains every ready datagram, then waits.
pub async fn serve(shard: Rc<Shard>) {
    let mut datagram = vec![0u8; DATAGRAM_BYTES_MAX];
    let mut reply = Box::<UdpReply>::default();
    let mut limiter = SourceLimiter::new(
        shard.config.udp_source_table_entries,
        shard.config.udp_source_frames_per_sec,
        shard.config.udp_source_burst_frames,
    );
    let mut errors_in_a_row = 0u32;
    while !shard.stopping.is_open() {
        match shard.udp.try_receive(&mut datagram) {
            Ok(Some((length_bytes, source))) => {
                errors_in_a_row = 0;
                handle_datagram(&shard, &mut limiter, &datagram[..length_bytes], source, &mut reply).await;
                // A socket under a flood never makes us wait; let the Redis
                // connection, timers and completions run (see PREEMPT_TIMER_US).
                glommio::yield_if_needed().await;
            }
            Ok(None) => {
                errors_in_a_row = 0;
                futures_lite::future::or(shard.stopping.wait(), shard.udp.readable()).await;
            }
            // ICMP errors from earlier replies surface here; they concern one
            // client, never the socket. Anything that repeats gets a pause.
            Err(_) => {
                shard.metrics.udp_receive_errors.add(1);
                errors_in_a_row += 1;
                if errors_in_a_row >= RECEIVE_ERRORS_BEFORE_PAUSE {
                    errors_in_a_row = 0;
                    glommio::timer::sleep(RECEIVE_ERROR_PAUSE).await;
                } else {
                    glommio::executor().yield_now().await;
                }
            }
        }
    }
}

async fn handle_datagram(
    shard: &Rc<Shard>,
    limiter: &mut SourceLimiter,
    data: &[u8],
    source: SocketAddr,
    reply: &mut UdpReply,
) {
    let received_at = Instant::now();
    let recv_us = unix_now_us();
    let route = Route::Udp(source);
    let source_key = SourceKey::of(source.ip());
    let mut offset = 0;
    let mut frames = 0u64;
    let mut limited_frames = 0u64;
    while offset < data.len() {
        let rest = &data[offset..];
        let (answer, consumed_bytes) = match check(rest) {
            Ok(header) => {
                frames += 1;
                let status = if limiter.admit(source_key, received_at) {
                    let frame = &rest[..header.frame_bytes];
                    match shard.take_frame(frame, header, &route, received_at, recv_us) {
                        Fate::Now(status) => Some(status),
                        // A corrupt frame is counted by the shard and never answered.
                        Fate::Later | Fate::Corrupt => None,
                    }
                } else {
                    limited_frames += 1;
                    None
                };
                (status.map(|status| (status, header.id)), header.frame_bytes)
            }
            Err(error) => {
                let fate = oversized(rest, error);
                let rejected = match fate {
                    Oversized::Intact(id) => Some(id),
                    Oversized::Corrupt | Oversized::NotOne => None,
                };
                let answered = match fate {
                    Oversized::Intact(_) => {
                        frames += 1;
                        let admitted = limiter.admit(source_key, received_at);
                        if admitted {
                            shard.metrics.reject(Transport::Udp, RejectReason::Length);
                            shard.record_answered(Transport::Udp, Status::Rejected, received_at, Instant::now());
                        } else {
                            limited_frames += 1;
                        }
                        admitted
                    }
                    Oversized::Corrupt => {
                        frames += 1;
                        shard.metrics.frames_corrupt[Transport::Udp as usize].add(1);
                        false
                    }
                    Oversized::NotOne => {
                        shard.metrics.unparseable[Transport::Udp as usize].add(1);
                        false
                    }
                };
                (
                    rejected.filter(|_| answered).map(|id| (Status::Rejected, id)),
                    rest.len(),
                )
            }
        };
        offset += consumed_bytes;
        if let Some((status, id)) = answer {
            if !reply.accepts(source) {
                shard.send_udp_reply(reply).await;
            }
            reply.push(source, status, id);
        }
    }
    debug_assert_eq!(offset, data.len());
    shard.metrics.frames_received[Transport::Udp as usize].add(frames);
    shard.metrics.frames_limited[Transport::Udp as usize].add(limited_frames);
    shard.metrics.bytes_received[Transport::Udp as usize].add(data.len() as u64);
    shard.send_udp_reply(reply).await;
}

/// The bytes that end a datagram get a REJECTED answer only when the header
/// parsed and announces a payload over the limit; see the module doc.
/// What the bytes that `check` refused are, as far as an answer goes.
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
