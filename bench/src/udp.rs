//! The UDP transport: one connected socket per lane, all driven by the engine's one thread.
//!
//! Each lane binds its own ephemeral port, so the server's SO_REUSEPORT group hashes the lanes
//! over its shards. On an IPv4 loopback target each lane also binds its own loopback address
//! (127.0.100.1, .2, ...): a lane stands for a client host, and shardgate limits each source
//! address to its share of a shard (docs/design.md, "Abuse limits"), which a whole run from
//! 127.0.0.1 alone would exceed. IPv6 has one loopback address, and a remote target sees this
//! host's one address: raise the server's `--udp-source-frames-per-sec` for such runs. The socket is `connect`ed to the target: sends need no address, the kernel
//! drops datagrams from anyone else, and an ICMP "port unreachable" (no server) surfaces as an
//! error on the socket instead of passing silently.
//!
//! A pass's datagrams for one lane leave in one `sendmmsg`, and with UDP segmentation offload
//! (`UDP_SEGMENT`) up to [`SEGMENTS_PER_MESSAGE_MAX`] equal datagrams travel the sender's stack
//! as one message: the server still receives them as separate datagrams, but the generator pays
//! one trip through its stack for them (on this project's 2-core VM that halved the send cost).
//! Replies are read with `recvmmsg` only from the sockets an epoll check reports readable, each
//! stamped by the kernel with its arrival time (`SO_TIMESTAMPNS`).

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use shardgate_proto::frame::ACK_BYTES;
use socket2::{Domain, Protocol, Socket, Type};

use crate::engine::Wire;
use crate::live::Counters;
use crate::sys::{self, Interest, Readiness, RecvBatch, SendScratch};

/// Kernel buffers for a lane's socket. The default (~200 KiB) holds only a few hundred
/// datagrams; replies wait in it for up to a slice (longer if the engine is descheduled on a
/// busy host), and a drop there would show up as resends and latency that are the generator's
/// fault, not the server's. The kernel caps the request at net.core.rmem_max/wmem_max.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// Reply slot: shardgate packs at most 50 acks (1400 bytes) in a reply, so 2 KiB holds any
/// reply it sends; larger slots are used only when one datagram's own acks could be larger.
const REPLY_SLOT_BYTES_MIN: usize = 2_048;
/// Largest reply slot: any UDP payload fits.
const REPLY_SLOT_BYTES_MAX: usize = 65_536;
/// Bytes of all reply slots together: bounds memory when slots are large.
const REPLY_BATCH_BYTES: usize = 1 << 20;
/// Most replies one `recvmmsg` reads.
const REPLY_SLOTS_MAX: usize = 64;
/// `recvmmsg` calls per readable socket per pass; what is left is read next pass.
const READS_PER_SOCKET_MAX: usize = 8;
/// Datagrams one segmented message may carry: the kernel's UDP_MAX_SEGMENTS (64 before Linux
/// 6.x raised it to 128).
pub const SEGMENTS_PER_MESSAGE_MAX: usize = 64;
/// Bytes one segmented message may carry: under the 64 KiB an IP packet can hold.
const MESSAGE_BYTES_MAX: usize = 60_000;
/// Largest datagram segmented when the target is not on loopback: segments must fit the path's
/// MTU (1500 minus IPv6 and UDP headers, with room to spare), or every send would fail.
const REMOTE_SEGMENT_BYTES_MAX: usize = 1_400;

/// Lanes opened so far: the next lane's loopback host number.
static LOOPBACK_LANES: AtomicU32 = AtomicU32::new(0);
/// Loopback hosts the lanes take in turn: 127.0.100.1 ..= 127.0.100.250.
const LOOPBACK_HOSTS: u32 = 250;

/// The next lane's own loopback address, if the host has it (all of 127.0.0.0/8 is local on
/// Linux); 127.0.0.1 otherwise.
fn next_loopback_host() -> Ipv4Addr {
    let host = LOOPBACK_LANES.fetch_add(1, Ordering::Relaxed) % LOOPBACK_HOSTS;
    let address = Ipv4Addr::new(127, 0, 100, 1 + host as u8);
    match UdpSocket::bind((address, 0)) {
        Ok(_) => address,
        Err(_) => Ipv4Addr::LOCALHOST,
    }
}

/// Opens one lane's socket, connected to `target`, non-blocking, stamping arrivals.
pub fn open(target: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match (target.is_ipv4(), target.ip().is_loopback()) {
        (true, true) => (next_loopback_host(), 0).into(),
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
    socket.set_nonblocking(true)?;
    // Best effort too: without stamps, a reply counts from when it is read.
    let _ = sys::enable_receive_timestamps(socket.as_raw_fd());
    Ok(socket)
}

/// Datagrams queued for one socket during a pass.
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    /// Where each datagram ends in `bytes`.
    ends: Vec<usize>,
}

/// Every lane's socket, and the buffers to move their datagrams in batches.
pub struct UdpWire {
    sockets: Vec<UdpSocket>,
    outboxes: Vec<Outbox>,
    /// Lanes with queued datagrams, each once, in the order they got their first.
    queued_lanes: Vec<usize>,
    /// Largest datagram queued: a scheduled send's frames.
    datagram_bytes_max: usize,
    /// Datagrams per segmented message; 1 when segmentation is off.
    segments_per_message: usize,
    /// Per message of a flush: its byte span and how many datagrams it carries.
    spans: Vec<(usize, usize)>,
    span_datagrams: Vec<usize>,
    send_scratch: SendScratch,
    readiness: Readiness,
    ready: Vec<u64>,
    replies: RecvBatch,
}

impl UdpWire {
    /// Takes the lanes' sockets (see [`open`]). `datagram_bytes_max` is a scheduled send's
    /// size, the largest datagram [`queue`](Wire::queue) gets; `frames_per_send` sizes the
    /// reply slots. Segmentation is turned on where it can work.
    pub fn new(sockets: Vec<UdpSocket>, datagram_bytes_max: usize, frames_per_send: usize) -> io::Result<UdpWire> {
        let readiness = Readiness::new(sockets.len())?;
        for (lane, socket) in sockets.iter().enumerate() {
            readiness.add(socket.as_raw_fd(), lane as u64, Interest::Read)?;
        }
        let slot_bytes = frames_per_send
            .saturating_mul(ACK_BYTES)
            .clamp(REPLY_SLOT_BYTES_MIN, REPLY_SLOT_BYTES_MAX);
        let slots = (REPLY_BATCH_BYTES / slot_bytes).clamp(1, REPLY_SLOTS_MAX);
        let mut wire = UdpWire {
            outboxes: sockets.iter().map(|_| Outbox::default()).collect(),
            queued_lanes: Vec::with_capacity(sockets.len()),
            ready: Vec::with_capacity(sockets.len()),
            datagram_bytes_max: datagram_bytes_max.max(1),
            segments_per_message: 1,
            spans: Vec::new(),
            span_datagrams: Vec::new(),
            sockets,
            send_scratch: SendScratch::default(),
            readiness,
            replies: RecvBatch::new(slots, slot_bytes),
        };
        wire.segment_if_possible();
        Ok(wire)
    }

    /// Turns segmentation on for every socket if the datagrams are small enough to group and
    /// to fit the path, and the kernel accepts it on all of them; otherwise leaves it off.
    fn segment_if_possible(&mut self) {
        let segments = (MESSAGE_BYTES_MAX / self.datagram_bytes_max).min(SEGMENTS_PER_MESSAGE_MAX);
        let loopback = !self.sockets.is_empty()
            && self
                .sockets
                .iter()
                .all(|socket| socket.peer_addr().is_ok_and(|peer| peer.ip().is_loopback()));
        let fits_path = loopback || self.datagram_bytes_max <= REMOTE_SEGMENT_BYTES_MAX;
        let Ok(segment_bytes) = u16::try_from(self.datagram_bytes_max) else {
            return;
        };
        if segments < 2 || !fits_path {
            return;
        }
        if self
            .sockets
            .iter()
            .all(|socket| sys::set_udp_segment(socket.as_raw_fd(), segment_bytes).is_ok())
        {
            self.segments_per_message = segments;
        } else {
            self.stop_segmenting();
        }
    }

    /// Back to one datagram per message, e.g. after the kernel refused a segmented send.
    fn stop_segmenting(&mut self) {
        for socket in &self.sockets {
            let _ = sys::set_udp_segment(socket.as_raw_fd(), 0);
        }
        self.segments_per_message = 1;
    }

    /// Groups `lane`'s datagrams from `first_datagram` on into messages: runs of full-size
    /// datagrams, each run closed by a shorter one, at most `segments_per_message` long. A
    /// shorter datagram may only end a message, since segmentation cuts at the full size.
    fn group_messages(&mut self, lane: usize, first_datagram: usize) {
        self.spans.clear();
        self.span_datagrams.clear();
        let outbox = &self.outboxes[lane];
        let mut index = first_datagram;
        while index < outbox.ends.len() {
            let start = if index == 0 { 0 } else { outbox.ends[index - 1] };
            let mut count = 0;
            let mut end = start;
            while index < outbox.ends.len() && count < self.segments_per_message {
                let datagram_bytes = outbox.ends[index] - end;
                end = outbox.ends[index];
                index += 1;
                count += 1;
                if datagram_bytes < self.datagram_bytes_max {
                    break;
                }
            }
            self.spans.push((start, end));
            self.span_datagrams.push(count);
        }
    }

    /// Sends `lane`'s queued datagrams; counts the ones that could not leave.
    fn flush_lane(&mut self, lane: usize, counters: &Counters) {
        let mut first_datagram = 0;
        'regroup: loop {
            self.group_messages(lane, first_datagram);
            let fd = self.sockets[lane].as_raw_fd();
            let mut done = 0;
            while done < self.spans.len() {
                let (sent, error) = sys::send_messages(
                    fd,
                    &self.outboxes[lane].bytes,
                    &self.spans[done..],
                    &mut self.send_scratch,
                );
                first_datagram += self.span_datagrams[done..done + sent].iter().sum::<usize>();
                done += sent;
                let Some(error) = error else {
                    break;
                };
                let unsent: usize = self.span_datagrams[done..].iter().sum();
                if error.kind() == ErrorKind::WouldBlock {
                    // The socket buffer is full: what is left would only fail again now.
                    Counters::add(&counters.send_errors, unsent as u64);
                    break;
                }
                let segmented = self.span_datagrams[done] > 1;
                if segmented && matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EIO)) {
                    // The kernel or the path cannot segment after all: resend individually.
                    self.stop_segmenting();
                    continue 'regroup;
                }
                // One message refused (e.g. an ICMP error reported on this send): skip it, its
                // frames time out and resend; the rest still go.
                Counters::add(&counters.send_errors, self.span_datagrams[done] as u64);
                first_datagram += self.span_datagrams[done];
                done += 1;
            }
            break;
        }
        let outbox = &mut self.outboxes[lane];
        outbox.bytes.clear();
        outbox.ends.clear();
    }
}

impl Wire for UdpWire {
    fn receive(&mut self, counters: &Counters, mut deliver: impl FnMut(usize, &[u8], Option<i128>) -> usize) {
        self.readiness.ready_now(&mut self.ready);
        for &token in &self.ready {
            let lane = usize::try_from(token).unwrap_or(usize::MAX);
            let Some(socket) = self.sockets.get(lane) else {
                continue;
            };
            for _ in 0..READS_PER_SOCKET_MAX {
                let count = match self.replies.receive(socket.as_raw_fd()) {
                    Ok(count) => count,
                    Err(_) => {
                        // ICMP unreachable from an earlier send (nobody listening, for now):
                        // the frames time out and are resent.
                        Counters::add(&counters.send_errors, 1);
                        break;
                    }
                };
                for index in 0..count {
                    let reply = self.replies.datagram(index);
                    let used_bytes = deliver(lane, reply.bytes, reply.arrived_realtime_ns);
                    if reply.truncated || used_bytes < reply.bytes.len() {
                        // A reply is whole acks only; a ragged or cut tail is a malformed ack.
                        Counters::add(&counters.malformed_acks, 1);
                    }
                }
                if count < self.replies.slots() {
                    break;
                }
            }
        }
    }

    fn queue(&mut self, lane: usize, bytes: &[u8], counters: &Counters) {
        let Some(outbox) = self.outboxes.get_mut(lane) else {
            Counters::add(&counters.send_errors, 1);
            return;
        };
        if bytes.is_empty() {
            return;
        }
        if bytes.len() > self.datagram_bytes_max {
            // Segmentation would cut it; the engine never queues more than a scheduled send.
            Counters::add(&counters.send_errors, 1);
            return;
        }
        if outbox.ends.is_empty() {
            self.queued_lanes.push(lane);
        }
        outbox.bytes.extend_from_slice(bytes);
        outbox.ends.push(outbox.bytes.len());
    }

    fn flush(&mut self, counters: &Counters, _now_ns: u64) {
        let mut queued_lanes = std::mem::take(&mut self.queued_lanes);
        for &lane in &queued_lanes {
            self.flush_lane(lane, counters);
        }
        queued_lanes.clear();
        self.queued_lanes = queued_lanes;
    }

    fn has_pending(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wire_to(receiver: &UdpSocket, datagram_bytes_max: usize) -> UdpWire {
        let socket = open(receiver.local_addr().unwrap()).unwrap();
        UdpWire::new(vec![socket], datagram_bytes_max, 1).unwrap()
    }

    // Messages are runs of full datagrams, closed early by a shorter one, never longer than
    // the segment count.
    #[test]
    fn groups_full_datagrams_into_messages() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut wire = wire_to(&receiver, 4);
        wire.segments_per_message = 3;
        let counters = Counters::default();
        for length in [4, 4, 4, 4, 2, 4, 1, 4] {
            wire.queue(0, &vec![7; length], &counters);
        }
        wire.group_messages(0, 0);
        assert_eq!(wire.spans, vec![(0, 12), (12, 18), (18, 23), (23, 27)]);
        assert_eq!(wire.span_datagrams, vec![3, 2, 2, 1]);
        wire.group_messages(0, 4);
        assert_eq!(wire.spans, vec![(16, 18), (18, 23), (23, 27)]);
        wire.queue(0, &[1; 5], &counters);
        assert_eq!(counters.tally().send_errors, 1, "longer than a scheduled send");
    }

    // Replies reach `deliver` with their lane and a timestamp; a ragged tail counts as one
    // malformed ack; an ICMP error is counted, not fatal.
    #[test]
    fn receives_replies_and_counts_ragged_ones() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut wire = wire_to(&receiver, 104);
        let local = wire.sockets[0].local_addr().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        receiver.send_to(&[1; 30], local).unwrap();
        receiver.send_to(&[2; 28], local).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let counters = Counters::default();
        let mut got = Vec::new();
        wire.receive(&counters, |lane, bytes, arrived| {
            got.push((lane, bytes.len(), arrived.is_some()));
            bytes.len() / ACK_BYTES * ACK_BYTES
        });
        assert_eq!(got, vec![(0, 30, true), (0, 28, true)]);
        assert_eq!(counters.tally().malformed_acks, 1);

        drop(receiver);
        wire.queue(0, &[0; 104], &counters);
        wire.flush(&counters, 0);
        std::thread::sleep(Duration::from_millis(20));
        wire.receive(&counters, |_, bytes, _| bytes.len());
        assert_eq!(counters.tally().send_errors, 1, "port unreachable");
    }

    // On loopback the datagrams are segmented, and still arrive one by one, whole, in order.
    #[test]
    fn segmented_flush_arrives_as_separate_datagrams() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut wire = wire_to(&receiver, 4);
        assert_eq!(wire.segments_per_message, SEGMENTS_PER_MESSAGE_MAX);
        let counters = Counters::default();
        let sent: Vec<Vec<u8>> = (0..70u8).map(|index| vec![index; 4]).chain([vec![99, 99]]).collect();
        for datagram in &sent {
            wire.queue(0, datagram, &counters);
        }
        wire.flush(&counters, 0);
        assert_eq!(counters.tally().send_errors, 0);
        receiver.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buffer = [0u8; 16];
        for datagram in &sent {
            let length = receiver.recv(&mut buffer).unwrap();
            assert_eq!(&buffer[..length], &datagram[..]);
        }
    }
}
