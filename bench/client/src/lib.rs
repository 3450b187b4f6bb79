//! A blocking, std-only client for shardgate's wire protocol (`docs/protocol.md`).
//!
//! It does what every sender of events to shardgate must do to get each event stored exactly
//! once: encode ACTION frames (optionally signed), pack several into one UDP datagram, match
//! acks to events by `(player_id, seq)` in any order and however they are coalesced, and resend
//! every event that got RETRY or no answer, with exponential backoff and jitter, until it is
//! ACCEPTED, DUPLICATE or REJECTED, or until its attempts run out. The load generator uses it,
//! and so can a game server written in Rust.
//!
//! Nothing here needs an async runtime: the client owns one connected `UdpSocket` or one
//! `TcpStream` and does all its work inside [`Client::poll`] on the caller's thread, so a game
//! server can drive it from its own tick loop or a dedicated thread. It does not depend on the
//! `shardgate` server crate (and so pulls in none of its io_uring or Redis dependencies); the
//! codec is nevertheless the server's own: [`frame`] and [`auth`] are the server's
//! `src/frame.rs` and `src/auth.rs`, compiled into this crate, so client and server cannot drift
//! apart.
//!
//! # The life of an event
//! 1. [`Client::send`] encodes the event into a frame and queues it (at most
//!    [`ClientConfig::queue_max`] queued; a full queue is an error the caller sees at once).
//! 2. [`Client::poll`] moves queued frames into flight while fewer than
//!    [`ClientConfig::in_flight_max`] are unresolved, packs up to
//!    [`ClientConfig::frames_per_datagram_max`] frames into each datagram (never over
//!    [`DATAGRAM_BYTES_MAX`] bytes), reads acks, and resends what is due.
//! 3. Each event ends as exactly one [`Resolution`], returned by `poll` or [`Client::flush`]:
//!    [`Outcome::Stored`] (ACCEPTED or DUPLICATE: durably stored, stop), [`Outcome::Rejected`]
//!    (the frame is invalid; resending it unchanged is pointless, so it never is) or
//!    [`Outcome::GaveUp`] (no final answer within [`ClientConfig::attempts_max`] copies: the event
//!    may or may not be stored).
//!
//! # Resend schedule
//! After the n-th copy of an event the client waits `ack_timeout × 2^(n-1)`, capped at
//! `backoff_max`, minus a random part of up to `jitter_percent` of it (so that clients that
//! failed together do not retry together). If no final answer came by then, it sends copy n+1,
//! or gives up after copy `attempts_max`. A RETRY answer restarts that wait from the moment it
//! arrives, so the server gets the full backoff it asked for. Every copy is byte-identical, so
//! the server's dedup makes resending safe — as long as all copies arrive within the server's
//! dedup window (10 minutes by default), which the default schedule (under 10 s) is far inside.
//!
//! # Example
//! ```no_run
//! use std::time::{Duration, Instant};
//! use shardgate_client::{unix_time_us, Client, ClientConfig, Event, Outcome};
//!
//! # fn main() -> Result<(), shardgate_client::ClientError> {
//! let mut config = ClientConfig::udp("127.0.0.1:7700".parse().unwrap());
//! config.ack_timeout = Duration::from_millis(50);
//! let mut client = Client::connect(config)?;
//!
//! client.send(&Event {
//!     player_id: 42,
//!     seq: 1,
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
//!         Outcome::GaveUp => eprintln!("event {:?} may be lost", resolution.id),
//!     }
//! }
//!
//! // At shutdown: resolve everything still pending, giving up on the rest after 2 s.
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

#[path = "../../../src/auth.rs"]
pub mod auth;
#[path = "../../../src/frame.rs"]
pub mod frame;

mod backoff;
mod client;
mod config;
mod error;
mod wire;

pub use client::{Client, Event, Outcome, Resolution, Stats};
pub use config::{ClientConfig, Transport};
pub use error::ClientError;
pub use frame::EventId;
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
