//! Where an answer goes, how answers are coalesced on the way out, and the two traits through
//! which intake writes them: the pipeline never imports intake.
//!
//! Every event remembers its `Route` while its batch is in Redis: the UDP
//! source address, or the TCP connection it came on. Answers for one UDP
//! source are packed into one reply datagram (several 28-byte acks back to
//! back) up to `REPLY_ACKS_MAX`, which keeps replies under one MTU; the bytes
//! sent back to an address never exceed the bytes it sent, so a spoofed source
//! cannot turn shardgate into an amplifier.
//!
//! A `ReplyBook` keeps one open reply per destination for a handful of
//! destinations at once. The events of one batch, or the datagrams of one
//! `recvmmsg`, come from a few sources interleaved; one reply buffer would be
//! sent at every change of source, nearly one datagram per ack. Each reply
//! datagram costs a system call and a trip through the network stack, the
//! largest single cost of a frame (`perf`, issue 14).

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;

use crate::limits::REPLY_DATAGRAM_BYTES_MAX;
use crate::telemetry::metrics::Transport;
use crate::wire::frame::{encode_ack, EventId, Status, ACK_BYTES};

/// Sends reply datagrams: intake's UDP socket. Generic, not `dyn`, so a send costs no box.
pub trait AckSink {
    /// Sends one reply datagram of whole acks to `destination`, waiting only if the socket's
    /// send buffer is full. An error concerns this reply alone; it is counted, and the client
    /// resends.
    fn send_datagram(&self, bytes: &[u8], destination: SocketAddr) -> impl Future<Output = std::io::Result<()>>;
}

/// A stream connection's outbox: intake's TCP connection. Queuing never waits: the
/// connection's reader bounds the acks it may owe (`TCP_UNACKED_FRAMES_MAX`).
pub trait StreamAcks {
    fn push_ack(&self, status: Status, id: EventId);
}

/// Where one frame's answer goes.
#[derive(Clone)]
pub enum Route {
    /// The UDP source address.
    Datagram(SocketAddr),
    /// The TCP connection the frame came on.
    Stream(Rc<dyn StreamAcks>),
}

impl Route {
    pub fn transport(&self) -> Transport {
        match self {
            Route::Datagram(_) => Transport::Udp,
            Route::Stream(_) => Transport::Tcp,
        }
    }
}

/// Acks waiting to go to one UDP address. Its buffer is fixed: it is flushed
/// before it would overflow.
pub(crate) struct UdpReply {
    destination: Option<SocketAddr>,
    bytes: [u8; REPLY_DATAGRAM_BYTES_MAX],
    length_bytes: usize,
}

impl Default for UdpReply {
    fn default() -> UdpReply {
        UdpReply {
            destination: None,
            bytes: [0; REPLY_DATAGRAM_BYTES_MAX],
            length_bytes: 0,
        }
    }
}

impl UdpReply {
    /// True if an ack for `destination` can join this reply without sending first.
    pub fn accepts(&self, destination: SocketAddr) -> bool {
        let same_destination = self.destination.is_none() || self.destination == Some(destination);
        same_destination && self.length_bytes + ACK_BYTES <= REPLY_DATAGRAM_BYTES_MAX
    }

    pub fn push(&mut self, destination: SocketAddr, status: Status, id: EventId) {
        assert!(
            self.accepts(destination),
            "caller sends the reply before it would overflow"
        );
        self.destination = Some(destination);
        self.bytes[self.length_bytes..self.length_bytes + ACK_BYTES].copy_from_slice(&encode_ack(status, id));
        self.length_bytes += ACK_BYTES;
    }

    /// The datagram to send, if any; the reply is empty afterwards.
    pub fn take(&mut self) -> Option<(SocketAddr, &[u8])> {
        let destination = self.destination.take()?;
        let length_bytes = std::mem::replace(&mut self.length_bytes, 0);
        debug_assert!(length_bytes > 0 && length_bytes % ACK_BYTES == 0);
        Some((destination, &self.bytes[..length_bytes]))
    }

    pub fn is_empty(&self) -> bool {
        self.length_bytes == 0
    }
}

/// Open replies to up to `N` destinations; see the module doc.
pub struct ReplyBook<const N: usize> {
    replies: [UdpReply; N],
}

impl<const N: usize> Default for ReplyBook<N> {
    fn default() -> ReplyBook<N> {
        ReplyBook {
            replies: std::array::from_fn(|_| UdpReply::default()),
        }
    }
}

impl<const N: usize> ReplyBook<N> {
    /// Adds an ack to the open reply for `destination`. When there is no room
    /// (that reply is full, or every reply is open for another destination),
    /// nothing is added and the index of the reply to send first is returned.
    pub fn push(&mut self, destination: SocketAddr, status: Status, id: EventId) -> Result<(), usize> {
        const { assert!(N > 0) };
        let open = self
            .replies
            .iter()
            .position(|reply| reply.destination == Some(destination));
        let index = match open {
            Some(index) if !self.replies[index].accepts(destination) => return Err(index),
            Some(index) => index,
            None => self.replies.iter().position(UdpReply::is_empty).ok_or(0usize)?,
        };
        self.replies[index].push(destination, status, id);
        Ok(())
    }

    /// The datagram of reply `index`, if it holds any ack; it is empty afterwards.
    pub fn take(&mut self, index: usize) -> Option<(SocketAddr, &[u8])> {
        self.replies[index].take()
    }

    pub fn len(&self) -> usize {
        N
    }

    pub fn is_empty(&self) -> bool {
        self.replies.iter().all(UdpReply::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::decode_ack;

    /// Acks for one address coalesce up to the datagram bound; another address needs a new reply.
    #[test]
    fn coalesces_per_destination() {
        let first: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let second: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut reply = UdpReply::default();
        let mut pushed = 0;
        while reply.accepts(first) {
            reply.push(
                first,
                Status::Accepted,
                EventId {
                    player_id: 1,
                    seq: pushed,
                },
            );
            pushed += 1;
        }
        assert_eq!(pushed as usize, REPLY_DATAGRAM_BYTES_MAX / ACK_BYTES);
        assert!(!reply.accepts(second));
        let (destination, bytes) = reply.take().unwrap();
        assert_eq!(destination, first);
        assert_eq!(bytes.len(), pushed as usize * ACK_BYTES);
        let last = decode_ack(&bytes[bytes.len() - ACK_BYTES..]).unwrap();
        assert_eq!(last.id.seq, pushed - 1);
        assert!(reply.is_empty() && reply.accepts(second) && reply.take().is_none());
    }
}

#[cfg(test)]
mod book_tests {
    use super::*;
    use crate::wire::frame::decode_ack;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the order of destinations, every ack goes out exactly once, to its own destination, in
        /// datagrams under the bound, and never more datagrams than a new one per change of reply.
        #[test]
        fn every_ack_reaches_its_destination_once(destinations in proptest::collection::vec(0u16..12, 0..400)) {
            let mut book = ReplyBook::<4>::default();
            let mut sent: Vec<(SocketAddr, EventId)> = Vec::new();
            let mut datagrams = 0;
            let collect = |destination: SocketAddr, bytes: &[u8], sent: &mut Vec<(SocketAddr, EventId)>| {
                assert!(bytes.len() <= REPLY_DATAGRAM_BYTES_MAX && bytes.len() % ACK_BYTES == 0 && !bytes.is_empty());
                for ack in bytes.chunks(ACK_BYTES) {
                    sent.push((destination, decode_ack(ack).unwrap().id));
                }
            };
            for (seq, &port) in destinations.iter().enumerate() {
                let destination = SocketAddr::from(([127, 0, 0, 1], 1000 + port));
                let id = EventId { player_id: u64::from(port), seq: seq as u64 };
                while let Err(index) = book.push(destination, Status::Accepted, id) {
                    let (to, bytes) = book.take(index).expect("a reply that blocks holds acks");
                    collect(to, bytes, &mut sent);
                    datagrams += 1;
                }
            }
            for index in 0..book.len() {
                if let Some((to, bytes)) = book.take(index) {
                    collect(to, bytes, &mut sent);
                    datagrams += 1;
                }
            }
            prop_assert!(book.is_empty());
            prop_assert!(datagrams <= destinations.len());
            let mut expected: Vec<(SocketAddr, EventId)> = destinations
                .iter()
                .enumerate()
                .map(|(seq, &port)| (SocketAddr::from(([127, 0, 0, 1], 1000 + port)), EventId { player_id: u64::from(port), seq: seq as u64 }))
                .collect();
            expected.sort_by_key(|(to, id)| (*to, id.seq));
            sent.sort_by_key(|(to, id)| (*to, id.seq));
            prop_assert_eq!(sent, expected);
        }
    }

    /// Acks for a few interleaved destinations go out as one datagram per destination, not one per change.
    #[test]
    fn interleaved_destinations_share_datagrams() {
        let mut book = ReplyBook::<8>::default();
        for seq in 0..40u64 {
            let destination = SocketAddr::from(([127, 0, 0, 1], 2000 + (seq % 4) as u16));
            book.push(destination, Status::Duplicate, EventId { player_id: 1, seq })
                .unwrap();
        }
        let datagrams = (0..book.len()).filter(|&index| book.take(index).is_some()).count();
        assert_eq!(datagrams, 4);
    }
}
