//! What a [`Client`](crate::Client) is told at connect time, and the checks that keep every
//! later computation (timer arithmetic, capacities) free of overflow and division by zero.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::ClientError;

/// Which socket carries the frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// One connected UDP socket; several frames per datagram.
    Udp,
    /// One TCP connection, re-established when it breaks.
    Tcp,
}

impl Transport {
    /// A lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Everything a client is configured with. Build it with [`ClientConfig::udp`] or
/// [`ClientConfig::tcp`] (which fill in the defaults below) and change fields as needed.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The server's UDP or TCP address.
    pub target: SocketAddr,
    pub transport: Transport,
    /// UDP: most frames packed into one datagram (which never exceeds
    /// [`DATAGRAM_BYTES_MAX`](crate::DATAGRAM_BYTES_MAX) bytes either). Default 16. TCP writes
    /// pack frames up to 16 KiB regardless, since a stream has no datagram to overflow.
    pub frames_per_datagram_max: usize,
    /// How long to wait for an answer to the first copy before resending; each later copy waits
    /// twice as long as the one before. Default 100 ms.
    pub ack_timeout: Duration,
    /// The longest wait between two copies, however many there were. Default 2 s.
    pub backoff_max: Duration,
    /// Up to this percentage of each wait is randomly cut off (0..=100), so that clients that
    /// failed together do not retry in lockstep. Default 50.
    pub jitter_percent: u32,
    /// Opt-in cap on the copies of one event: after this many unanswered or RETRY-answered
    /// copies it resolves as [`Outcome::Unknown`](crate::Outcome::Unknown). Default `None`: an
    /// event is resent until it gets a final answer, because RETRY means "not confirmed", not
    /// "not stored", and giving up cannot make a stored event unstored.
    pub attempts_max: Option<u32>,
    /// Opt-in deadline per event, counted from its [`Client::send`](crate::Client::send): an
    /// event with no final answer by then resolves as [`Outcome::Unknown`](crate::Outcome::Unknown)
    /// if it was sent, or [`Outcome::NotSent`](crate::Outcome::NotSent) if it was still queued.
    /// Default `None`: only [`Client::flush`](crate::Client::flush) gives up. Keep it below the
    /// server's dedup window (10 minutes by default; half of it with auth), past which a resent
    /// copy is no longer answered DUPLICATE; see the crate docs.
    pub give_up_after: Option<Duration>,
    /// Most events sent and not yet resolved; further events wait in the queue. Default 1024.
    pub in_flight_max: usize,
    /// Most events accepted by `send` and not yet sent; `send` fails beyond it. Default 4096.
    pub queue_max: usize,
    /// TCP: longest wait for a connection to be established. Default 1 s.
    pub connect_timeout: Duration,
    /// The server's auth secret: when set, every frame is signed with the player's key derived
    /// from it (`auth::player_key`), and `client_time_us` must be the Unix time in microseconds.
    pub auth_secret: Option<Vec<u8>>,
}

/// Upper bound on every configured duration: far beyond any sensible value, and small enough
/// that `Instant + duration` can never overflow.
const DURATION_MAX: Duration = Duration::from_secs(3600);
/// Upper bound on the capacities, which are allocated up front.
const CAPACITY_MAX: usize = 1 << 20;

impl ClientConfig {
    /// Defaults for sending over UDP to `target`.
    pub fn udp(target: SocketAddr) -> ClientConfig {
        ClientConfig::new(target, Transport::Udp)
    }

    /// Defaults for sending over TCP to `target`.
    pub fn tcp(target: SocketAddr) -> ClientConfig {
        ClientConfig::new(target, Transport::Tcp)
    }

    fn new(target: SocketAddr, transport: Transport) -> ClientConfig {
        ClientConfig {
            target,
            transport,
            frames_per_datagram_max: 16,
            ack_timeout: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            jitter_percent: 50,
            attempts_max: None,
            give_up_after: None,
            in_flight_max: 1024,
            queue_max: 4096,
            connect_timeout: Duration::from_secs(1),
            auth_secret: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        let problem = if self.frames_per_datagram_max == 0 {
            Some("frames_per_datagram_max must be at least 1")
        } else if self.ack_timeout.is_zero() || self.ack_timeout > DURATION_MAX {
            Some("ack_timeout must be above zero and at most one hour")
        } else if self.backoff_max < self.ack_timeout || self.backoff_max > DURATION_MAX {
            Some("backoff_max must be at least ack_timeout and at most one hour")
        } else if self.jitter_percent > 100 {
            Some("jitter_percent must be at most 100")
        } else if self.attempts_max == Some(0) {
            Some("attempts_max must be at least 1 when set")
        } else if self
            .give_up_after
            .is_some_and(|after| after.is_zero() || after > DURATION_MAX)
        {
            Some("give_up_after must be above zero and at most one hour when set")
        } else if self.in_flight_max == 0 || self.in_flight_max > CAPACITY_MAX {
            Some("in_flight_max must be between 1 and 1048576")
        } else if self.queue_max == 0 || self.queue_max > CAPACITY_MAX {
            Some("queue_max must be between 1 and 1048576")
        } else if self.connect_timeout.is_zero() || self.connect_timeout > DURATION_MAX {
            Some("connect_timeout must be above zero and at most one hour")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(ClientError::invalid_config(problem)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        ClientConfig::udp(SocketAddr::from(([127, 0, 0, 1], 7700)))
    }

    // The defaults pass validation and never give up on their own; each bound is enforced with
    // a lowercase message.
    #[test]
    fn validate_defaults_and_bounds() {
        let defaults = config();
        assert!(defaults.validate().is_ok());
        assert_eq!((defaults.attempts_max, defaults.give_up_after), (None, None));
        let mut opted_in = config();
        opted_in.attempts_max = Some(1);
        opted_in.give_up_after = Some(DURATION_MAX);
        assert!(opted_in.validate().is_ok());
        let cases: [fn(&mut ClientConfig); 10] = [
            |c| c.frames_per_datagram_max = 0,
            |c| c.ack_timeout = Duration::ZERO,
            |c| c.backoff_max = c.ack_timeout / 2,
            |c| c.jitter_percent = 101,
            |c| c.attempts_max = Some(0),
            |c| c.give_up_after = Some(Duration::ZERO),
            |c| c.give_up_after = Some(DURATION_MAX * 2),
            |c| c.in_flight_max = 0,
            |c| c.queue_max = CAPACITY_MAX + 1,
            |c| c.connect_timeout = DURATION_MAX * 2,
        ];
        for break_it in cases {
            let mut broken = config();
            break_it(&mut broken);
            let message = broken.validate().expect_err("invalid config").to_string();
            assert!(message.starts_with("invalid config: "), "{message}");
            assert_eq!(message, message.to_lowercase());
        }
    }
}
