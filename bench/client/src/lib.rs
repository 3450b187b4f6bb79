//! A blocking, std-only client for shardgate's wire protocol (`docs/protocol.md`).
//!
//! It does what every sender of events to shardgate must do to get each event stored exactly
//! once: encode ACTION frames (optionally signed), pack several into one UDP datagram, match
//! acks to events by `(player_id, seq)` in any order and however they are coalesced, and resend
//! every event that got RETRY or no answer, with exponential backoff and jitter, until it is
//! ACCEPTED, DUPLICATE or REJECTED, or until a deadline the caller set. A game server written in
//! Rust can use it as is.
//!
//! Nothing here needs an async runtime: the client owns one connected `UdpSocket` or one
//! `TcpStream` and does all its work inside [`Client::poll`] on the caller's thread, so a game
//! server can drive it from its own tick loop or a dedicated thread. It does not depend on the
//! `shardgate` server crate (and so pulls in none of its io_uring or Redis dependencies); the
//! codec is nevertheless the server's own: [`frame`] and [`auth`] come from the
//! `shardgate-proto` crate (`proto/`) that the server, the bench and the fuzzers also use, so
//! client and server cannot drift apart.
//!
//! # The life of an event
//! 1. [`Client::send`] encodes the event into a frame and queues it (at most
//!    [`ClientConfig::queue_max`] queued; a full queue is an error the caller sees at once).
//! 2. [`Client::poll`] moves queued frames into flight while fewer than
//!    [`ClientConfig::in_flight_max`] are unresolved, packs up to
//!    [`ClientConfig::frames_per_datagram_max`] frames into each datagram (never over
//!    [`DATAGRAM_BYTES_MAX`] bytes), reads acks, and resends what is due.
//! 3. Each event ends as exactly one [`Resolution`], returned by `poll` or [`Client::flush`]:
//!    - [`Outcome::Stored`]: ACCEPTED or DUPLICATE, durably stored;
//!    - [`Outcome::Rejected`]: the frame is invalid; resending it unchanged is pointless, so it
//!      never is;
//!    - [`Outcome::Unknown`]: sent, but a deadline the caller set passed before a final answer
//!      came: the event may or may not be stored;
//!    - [`Outcome::NotSent`]: that deadline passed while the event was still queued: not stored.
//!
//! # RETRY means "not confirmed"
//! RETRY (like silence) says the server could not confirm the write, not that it did not
//! happen. An event answered RETRY can already be in Redis in three cases:
//! - a script call that timed out on the server still runs in Redis later;
//! - a batch that failed part way stored the events before the failure;
//! - at the server's drain deadline, its open batch is still queued in the server's Redis client
//!   and runs after its events were answered.
//!
//! So the promise is: resend the same frame and you get DUPLICATE if it was stored, ACCEPTED if
//! not. The client therefore never gives up on an event because of RETRY or silence alone. By
//! default it resends until ACCEPTED, DUPLICATE or REJECTED; an event ends without a final
//! answer only by a caller's explicit deadline: [`Client::flush`]'s, or the opt-in
//! [`ClientConfig::give_up_after`] (per event) or [`ClientConfig::attempts_max`] (copies per
//! event). It then resolves as [`Outcome::Unknown`] ("not confirmed"), never as not stored,
//! unless not one copy of it was sent ([`Outcome::NotSent`]). To settle an unknown event, send
//! the same [`Event`] again later, every field equal (so the frame is the same bytes).
//!
//! A frame whose crc does not match on arrival (corrupted on the way) gets no answer at all,
//! since the id it names cannot be trusted; over TCP the server also closes the connection. The
//! client treats it like any unanswered copy: it resends after the ack timeout (over TCP, on the
//! new connection).
//!
//! # Seqs are never reused
//! `(player_id, seq)` names an event, and the server stores each name once within its dedup
//! window: a seq reused for a different event of the same player would be answered DUPLICATE and
//! never stored. So a caller never reuses a seq for a different event of the same player.
//! [`Client::send`] refuses an id that is still pending, and [`SeqCounter`] hands out seqs that
//! do not repeat across restarts (they start at the Unix time in microseconds).
//!
//! # Resend schedule
//! The decisions below are the one resend loop's ([`resend::Outstanding`], without I/O), which
//! the bench and the end-to-end tests drive too. After the n-th copy of an event the client waits `ack_timeout × 2^(n-1)`, capped at
//! `backoff_max`, minus a random part of up to `jitter_percent` of it (so that clients that
//! failed together do not retry together). If no final answer came by then, it sends copy n+1.
//! A RETRY answer restarts that wait from the moment it arrives, so the server gets the full
//! backoff it asked for. An event's waits end early at its `give_up_after` deadline, if set.
//!
//! Every copy is byte-identical, so the server's dedup makes resending safe as long as the
//! copies arrive within the server's dedup window (10 minutes by default): a copy that arrives
//! after an earlier copy's marker expired is stored a second time. With auth, a signed copy
//! further than half that window from the server's clock is REJECTED as stale. An event stays
//! unconfirmed that long only while the server or its Redis is down for minutes (a running
//! server answers within its call timeout); a caller to whom a second stored copy costs more
//! than an unknown event sets `give_up_after` below those bounds.
//!
//! # Example
//! ```no_run
//! use std::time::{Duration, Instant};
//! use shardgate_client::{unix_time_us, Client, ClientConfig, Event, Outcome, SeqCounter};
//!
//! # fn main() -> Result<(), shardgate_client::ClientError> {
//! let mut config = ClientConfig::udp("127.0.0.1:7700".parse().unwrap());
//! config.ack_timeout = Duration::from_millis(50);
//! let mut client = Client::connect(config)?;
//! let mut seqs = SeqCounter::new();
//!
//! client.send(&Event {
//!     player_id: 42,
//!     seq: seqs.next_seq(),
//!     client_time_us: unix_time_us(),
//!     action_type: 7,
//!     payload: b"dig:x=3,y=9",
//! })?;
//!
//! // In a game loop: poll a little every tick and act on what resolved.
//! for resolution in client.poll(Duration::from_millis(5)) {
//!     match resolution.outcome {
//!         Outcome::Stored { .. } => {}
//!         Outcome::Rejected => eprintln!("event {:?} was rejected", resolution.id),
//!         // Only a deadline set by the caller ends an event this way; none is set here.
//!         Outcome::Unknown | Outcome::NotSent => {}
//!     }
//! }
//!
//! // At shutdown: resolve everything still pending, giving up on the rest after 2 s. Events
//! // that come back Unknown may be stored; resend them (same fields) after the restart.
//! let rest = client.flush(Instant::now() + Duration::from_secs(2));
//! # let _ = rest;
//! # Ok(())
//! # }
//! ```
//!
//! # Limits
//! - Timing: waits use the sockets' receive timeouts, which Linux rounds up to a scheduler tick
//!   (1 to 4 ms), so resends and `poll` may run up to a tick late.
//! - TCP: a broken connection is re-established inside `poll` (with backoff); copies that could
//!   not be written count as attempts and are resent on schedule. Keep `in_flight_max × 28` bytes
//!   (the acks a server may have to write to us at once) well under the socket buffers, since the
//!   client reads acks only between writes.
//! - Auth: with [`ClientConfig::auth_secret`] the client derives each player's key from the
//!   server's secret, as a trusted game server relaying for its players would, and
//!   `client_time_us` must then be the Unix time in microseconds ([`unix_time_us`]).

pub use shardgate_proto::{auth, frame};

mod client;
mod config;
mod draws;
mod error;
pub mod resend;
mod seq;
mod wire;

pub use client::{Client, Event, Outcome, Resolution, Stats};
pub use config::{ClientConfig, Transport};
pub use error::ClientError;
pub use frame::EventId;
pub use seq::SeqCounter;
pub use wire::DATAGRAM_BYTES_MAX;

/// The current Unix time in microseconds: the `client_time_us` a signed frame must carry, since
/// the server rejects a signed frame whose time is further than half its dedup window from its
/// own clock. A clock before 1970 reads as 0.
pub fn unix_time_us() -> u64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX)
}
