//! UDP intake: datagrams in, frames out, immediate answers back.
//!
//! A datagram carries one or more whole frames. Each whole frame gets exactly
//! one answer. The first bytes that do not form a whole frame end the
//! datagram: a header announcing a payload over the limit is REJECTED by its
//! id (the protocol's "length" reason); anything else (unparseable bytes, or a
//! tail cut short, even after a whole header) gets no answer and is counted.
//! A cut frame is not REJECTED because REJECTED tells a client never to resend
//! it unchanged, and the same bytes, whole, would be a valid event. Immediate answers for one
//! datagram are coalesced into as few reply datagrams as the MTU allows.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};

use crate::frame::{check, CheckError, EventId, RejectReason, Status};
use crate::limits::{DATAGRAM_BYTES_MAX, UDP_SOCKET_BUFFER_BYTES};
use crate::metrics::Transport;
use crate::reply::{Route, UdpReply};
use crate::shard::Shard;

/// A UDP socket in the shared SO_REUSEPORT group on `address`.
pub fn bind(address: SocketAddr) -> std::io::Result<glommio::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Larger buffers absorb a burst while the shard is busy; the kernel caps
    // them at net.core.{r,w}mem_max, which scripts/tune-host.sh raises.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER_BYTES);
    socket.bind(&address.into())?;
    Ok(glommio::net::UdpSocket::from(socket))
}

/// The socket's inode: how /proc/net/udp names it (see `exporter.rs`).
pub fn socket_inode(socket: &glommio::net::UdpSocket) -> u64 {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd()))
        .map(|metadata| metadata.ino())
        .unwrap_or(0)
}

pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// Receives until the shard stops.
pub async fn serve(shard: Rc<Shard>) {
    let mut datagram = vec![0u8; DATAGRAM_BYTES_MAX];
    let mut reply = Box::<UdpReply>::default();
    loop {
        let receive = async { Some(shard.udp.recv_from(&mut datagram).await) };
        let stop = async {
            shard.stopping.wait().await;
            None
        };
        let Some(received) = futures_lite::future::or(stop, receive).await else {
            return;
        };
        let Ok((length_bytes, source)) = received else {
            // ICMP errors from earlier replies surface here; they concern one
            // client, never the socket.
            continue;
        };
        let data = &datagram[..length_bytes];
        handle_datagram(&shard, data, source, &mut reply).await;
        // A receive that finds data ready never waits; let the Redis
        // connection, timers and completions run (see PREEMPT_TIMER_US).
        glommio::yield_if_needed().await;
    }
}

async fn handle_datagram(shard: &Rc<Shard>, data: &[u8], source: SocketAddr, reply: &mut UdpReply) {
    let received_at = Instant::now();
    let recv_us = unix_now_us();
    let route = Route::Udp(source);
    let mut offset = 0;
    let mut frames = 0u64;
    while offset < data.len() {
        let rest = &data[offset..];
        let (answer, consumed_bytes) = match check(rest) {
            Ok(header) => {
                frames += 1;
                let frame = &rest[..header.frame_bytes];
                let status = shard.take_frame(frame, header, &route, received_at, recv_us);
                (status.map(|status| (status, header.id)), header.frame_bytes)
            }
            Err(error) => {
                let rejected = rejected_id(error);
                match rejected {
                    Some(_) => {
                        frames += 1;
                        shard.metrics.reject(Transport::Udp, RejectReason::Length);
                        shard.metrics.ack(Transport::Udp, Status::Rejected, 1);
                    }
                    None => shard.metrics.unparseable[Transport::Udp as usize].add(1),
                }
                (rejected.map(|id| (Status::Rejected, id)), rest.len())
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
    shard.metrics.bytes_received[Transport::Udp as usize].add(data.len() as u64);
    shard.send_udp_reply(reply).await;
}

/// The bytes that end a datagram get a REJECTED answer only when the header
/// parsed and announces a payload over the limit; see the module doc.
fn rejected_id(error: CheckError) -> Option<EventId> {
    match error {
        CheckError::PayloadTooLong(id) => Some(id),
        CheckError::FrameIncomplete(_) | CheckError::HeaderIncomplete | CheckError::Unparseable => None,
    }
}
