//! Events, frames and acks: what a client sends (through the crate's codec or byte by byte)
//! and what it gets back.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use shardgate::wire::frame;

use super::basics::{hex, unix_us};

/// `(player_id, seq)`: an event id.
pub type Key = (u64, u64);

/// One game action event as a client would send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub player: u64,
    pub seq: u64,
    pub client_time_us: u64,
    pub action_type: u16,
    pub payload: Vec<u8>,
}

impl Event {
    pub fn new(player: u64, seq: u64, payload: &[u8]) -> Event {
        Event {
            player,
            seq,
            client_time_us: unix_us(),
            action_type: (seq % 50) as u16,
            payload: payload.to_vec(),
        }
    }

    /// Random type, time and payload (0..=max_payload bytes, any byte values).
    pub fn random(rng: &mut StdRng, player: u64, seq: u64, max_payload: usize) -> Event {
        let len = match rng.gen_range(0..10) {
            0 => 0,
            1 => max_payload,
            _ => rng.gen_range(0..=max_payload),
        };
        let mut payload = vec![0u8; len];
        rng.fill(&mut payload[..]);
        let client_time_us = match rng.gen_range(0..8) {
            0 => 0,
            1 => u64::MAX,
            2 => rng.gen(),
            _ => unix_us(),
        };
        let action_type = match rng.gen_range(0..8) {
            0 => 0,
            1 => u16::MAX,
            _ => rng.gen(),
        };
        Event {
            player,
            seq,
            client_time_us,
            action_type,
            payload,
        }
    }

    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }

    /// Appends the ACTION frame (through the crate's codec).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        frame::encode_action(
            &frame::ActionFields {
                id: frame::EventId {
                    player_id: self.player,
                    seq: self.seq,
                },
                client_time_us: self.client_time_us,
                action_type: self.action_type,
                payload: &self.payload,
            },
            out,
        );
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.payload.len());
        self.encode_into(&mut v);
        v
    }

    pub fn raw(&self) -> RawFrame {
        RawFrame::from_event(self)
    }
}

/// A frame built byte by byte from the protocol table (independent of the crate's codec),
/// so tests can make every kind of malformed frame.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub magic: [u8; 2],
    pub version: u8,
    pub kind: u8,
    pub flags: u8,
    pub reserved5: u8,
    /// `None`: the payload's real length.
    pub payload_len: Option<u16>,
    pub player: u64,
    pub seq: u64,
    pub client_time_us: u64,
    pub action_type: u16,
    pub reserved34: u16,
    pub payload: Vec<u8>,
    pub auth_tag: Option<[u8; 16]>,
    /// XORed into the correct crc (0 = valid crc).
    pub crc_xor: u32,
}

impl RawFrame {
    pub fn from_event(e: &Event) -> RawFrame {
        RawFrame {
            magic: *b"SG",
            version: 1,
            kind: 1,
            flags: 0,
            reserved5: 0,
            payload_len: None,
            player: e.player,
            seq: e.seq,
            client_time_us: e.client_time_us,
            action_type: e.action_type,
            reserved34: 0,
            payload: e.payload.clone(),
            auth_tag: None,
            crc_xor: 0,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(60 + self.payload.len());
        v.extend_from_slice(&self.magic);
        v.push(self.version);
        v.push(self.kind);
        v.push(self.flags);
        v.push(self.reserved5);
        let len = self.payload_len.unwrap_or(self.payload.len() as u16);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&self.player.to_le_bytes());
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.client_time_us.to_le_bytes());
        v.extend_from_slice(&self.action_type.to_le_bytes());
        v.extend_from_slice(&self.reserved34.to_le_bytes());
        v.extend_from_slice(&self.payload);
        if let Some(tag) = &self.auth_tag {
            v.extend_from_slice(tag);
        }
        let crc = shardgate::wire::frame::crc(&v) ^ self.crc_xor;
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }
}

/// An ack status (mirror of `frame::Status`, hashable and printable here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum St {
    Accepted,
    Duplicate,
    Retry,
    Rejected,
}

impl St {
    /// ACCEPTED or DUPLICATE: the event is durably stored.
    pub fn is_stored(self) -> bool {
        matches!(self, St::Accepted | St::Duplicate)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckMsg {
    pub status: St,
    pub player: u64,
    pub seq: u64,
}

impl AckMsg {
    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }
}

/// Splits a reply (UDP datagram or TCP bytes) into 28-byte acks; panics on anything the
/// codec does not accept as an ack (a server bug).
pub fn parse_acks(bytes: &[u8]) -> Vec<AckMsg> {
    assert!(
        bytes.len() % frame::ACK_BYTES == 0,
        "ack bytes of length {} are not a multiple of {}: {}",
        bytes.len(),
        frame::ACK_BYTES,
        hex(&bytes[..bytes.len().min(120)])
    );
    bytes
        .chunks(frame::ACK_BYTES)
        .map(|chunk| {
            let ack =
                frame::decode_ack(chunk).unwrap_or_else(|e| panic!("server sent an invalid ack ({e}): {}", hex(chunk)));
            AckMsg {
                status: match ack.status {
                    frame::Status::Accepted => St::Accepted,
                    frame::Status::Duplicate => St::Duplicate,
                    frame::Status::Retry => St::Retry,
                    frame::Status::Rejected => St::Rejected,
                },
                player: ack.id.player_id,
                seq: ack.id.seq,
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub accepted: usize,
    pub duplicate: usize,
    pub retry: usize,
    pub rejected: usize,
}

impl StatusCounts {
    pub fn add(&mut self, st: St) {
        match st {
            St::Accepted => self.accepted += 1,
            St::Duplicate => self.duplicate += 1,
            St::Retry => self.retry += 1,
            St::Rejected => self.rejected += 1,
        }
    }

    pub fn merge(&mut self, o: &StatusCounts) {
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.retry += o.retry;
        self.rejected += o.rejected;
    }

    pub fn total(&self) -> usize {
        self.accepted + self.duplicate + self.retry + self.rejected
    }
}

/// `n` distinct random events (ids unique, drawn from the whole u64 range, edge ids included).
pub fn random_events(rng: &mut StdRng, n: usize, max_payload: usize) -> Vec<Event> {
    let mut ids = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let edge = [(0, 0), (u64::MAX, u64::MAX), (0, u64::MAX), (u64::MAX, 0)];
    for &(p, s) in edge.iter().take(n) {
        ids.insert((p, s));
        out.push(Event::random(rng, p, s, max_payload));
    }
    while out.len() < n {
        let player = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..64),
            _ => rng.gen(),
        };
        let seq = match rng.gen_range(0..2) {
            0 => rng.gen_range(0..10_000),
            _ => rng.gen(),
        };
        if ids.insert((player, seq)) {
            out.push(Event::random(rng, player, seq, max_payload));
        }
    }
    out.shuffle(rng);
    out
}

/// Picks `n` random bytes that do not start with the magic `SG`.
pub fn random_garbage(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    if v.len() >= 2 && v[0] == b'S' && v[1] == b'G' {
        v[0] = b'X';
    }
    v
}
