//! The one error type. It is opaque so that variants can be added without breaking callers;
//! the predicates name the cases a caller reacts to differently. Building one never allocates,
//! since a full queue is an ordinary event under load.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::config::Transport;
use crate::frame::{EventId, PAYLOAD_BYTES_MAX};

/// Why connecting or sending failed. The message is lowercase.
pub struct ClientError {
    kind: Kind,
}

enum Kind {
    InvalidConfig(&'static str),
    Connect {
        target: SocketAddr,
        transport: Transport,
        source: io::Error,
    },
    QueueFull {
        queue_max: usize,
    },
    PayloadTooLong {
        payload_bytes: usize,
    },
    AlreadyPending(EventId),
}

impl ClientError {
    pub(crate) fn invalid_config(problem: &'static str) -> ClientError {
        ClientError {
            kind: Kind::InvalidConfig(problem),
        }
    }

    pub(crate) fn connect(target: SocketAddr, transport: Transport, source: io::Error) -> ClientError {
        ClientError {
            kind: Kind::Connect {
                target,
                transport,
                source,
            },
        }
    }

    pub(crate) fn queue_full(queue_max: usize) -> ClientError {
        ClientError {
            kind: Kind::QueueFull { queue_max },
        }
    }

    pub(crate) fn payload_too_long(payload_bytes: usize) -> ClientError {
        ClientError {
            kind: Kind::PayloadTooLong { payload_bytes },
        }
    }

    pub(crate) fn already_pending(id: EventId) -> ClientError {
        ClientError {
            kind: Kind::AlreadyPending(id),
        }
    }

    /// The send queue is full: poll, then send the event again.
    pub fn is_queue_full(&self) -> bool {
        matches!(self.kind, Kind::QueueFull { .. })
    }

    /// An event with the same `(player_id, seq)` is still queued or in flight, so its acks could
    /// not be told apart; the client already retries that event itself.
    pub fn is_already_pending(&self) -> bool {
        matches!(self.kind, Kind::AlreadyPending(_))
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::InvalidConfig(problem) => write!(formatter, "invalid config: {problem}"),
            Kind::Connect {
                target,
                transport,
                source,
            } => {
                // The kind's text, not the os's, keeps the message lowercase; the errno keeps
                // the detail.
                write!(
                    formatter,
                    "cannot open {} to {target}: {}",
                    transport.name(),
                    source.kind()
                )?;
                match source.raw_os_error() {
                    Some(errno) => write!(formatter, " (os error {errno})"),
                    None => Ok(()),
                }
            }
            Kind::QueueFull { queue_max } => write!(formatter, "send queue is full ({queue_max} events)"),
            Kind::PayloadTooLong { payload_bytes } => write!(
                formatter,
                "payload is {payload_bytes} bytes, over the protocol's {PAYLOAD_BYTES_MAX}"
            ),
            Kind::AlreadyPending(id) => write!(
                formatter,
                "event player_id={} seq={} is already pending",
                id.player_id, id.seq
            ),
        }
    }
}

impl fmt::Debug for ClientError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "ClientError({self})")
    }
}

impl std::error::Error for ClientError {}
