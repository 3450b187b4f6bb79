//! Where an answer goes, and how answers are coalesced on the way out.
//!
//! Every event remembers its `Route` while its batch is in Redis: the UDP
//! source address, or the TCP connection it came on. Answers for one UDP
//! source are packed into one reply datagram (several 28-byte acks back to
//! back) up to `REPLY_ACKS_MAX`, which keeps replies under one MTU; the bytes
//! sent back to an address never exceed the bytes it sent, so a spoofed source
//! cannot turn shardgate into an amplifier.

use std::net::SocketAddr;
use std::rc::Rc;

use crate::frame::{encode_ack, EventId, Status, ACK_BYTES};
use crate::limits::REPLY_DATAGRAM_BYTES_MAX;
use crate::metrics::Transport;
use crate::tcp::Connection;

#[derive(Clone)]
pub enum Route {
    Udp(SocketAddr),
    Tcp(Rc<Connection>),
}

impl Route {
    pub fn transport(&self) -> Transport {
        match self {
            Route::Udp(_) => Transport::Udp,
            Route::Tcp(_) => Transport::Tcp,
        }
    }
}

/// Acks waiting to go to one UDP address. Its buffer is fixed: it is flushed
/// before it would overflow.
pub struct UdpReply {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_ack;

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
