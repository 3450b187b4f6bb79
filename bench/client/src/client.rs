//! The client: the queue of events not yet sent, the resend loop's table of events in flight
//! (`resend::Outstanding`, which decides what each ack and each timeout means), and the poll
//! loop that does the I/O around them.
//!
//! Every event the client accepted is either queued (never sent) or in flight, under its id
//! until it resolves, so an ack is matched with one hash lookup however acks are ordered or
//! coalesced, and a second event with a pending id is refused (its acks could not be told
//! apart). All containers are sized at connect time.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth;
use crate::config::ClientConfig;
use crate::draws::Draws;
use crate::error::ClientError;
use crate::frame::{self, Ack, ActionFields, EventId, Status, ACK_BYTES, FRAME_BYTES_MAX, PAYLOAD_BYTES_MAX};
use crate::resend::{Due, End, Ending, Limits, Outstanding, Schedule, Verdict, Waits};
use crate::wire::{Wire, DRAIN_READS_MAX};

/// The longest a single `poll` waits, however long it was asked to: keeps `Instant` arithmetic
/// far from overflow.
const POLL_TIMEOUT_MAX: Duration = Duration::from_secs(24 * 3600);

/// One game action to store. The payload is copied into the encoded frame by [`Client::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    pub player_id: u64,
    /// Picked by the caller; `(player_id, seq)` names the event, and the server stores each name
    /// once, so a new event needs a new seq, and a seq is never reused for a different event of
    /// the same player (a [`SeqCounter`](crate::SeqCounter) hands out such seqs). Sending the
    /// same event again, every field equal, is how an [`Outcome::Unknown`] event is resolved.
    pub seq: u64,
    /// Stored as is; with auth it must be the Unix time in microseconds. A resend of the same
    /// event keeps the original value, so that its frame is the same bytes.
    pub client_time_us: u64,
    pub action_type: u16,
    /// At most 1024 bytes.
    pub payload: &'a [u8],
}

/// How an event ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The event is durably stored. `first` is true for ACCEPTED (the copy this ack answers was
    /// the one stored) and false for DUPLICATE (an earlier copy was stored: possibly this
    /// client's own earlier copy whose ACCEPTED was lost, or another sender's).
    Stored { first: bool },
    /// The server found the frame invalid (length, flags, auth tag or freshness) and did not
    /// store this copy. It is never resent, since the same bytes would be rejected again. When
    /// earlier copies went unanswered (`attempts > 1`) and the frame is signed, the rejection can
    /// be a copy gone stale past half the dedup window after an earlier copy was stored; a
    /// [`ClientConfig::give_up_after`](crate::ClientConfig::give_up_after) below that bound rules
    /// it out.
    Rejected,
    /// Not confirmed: the event was sent (`attempts > 0`) but got no final answer before a
    /// deadline the caller set ([`Client::flush`], `give_up_after`) or the opt-in
    /// `attempts_max` ran out. It may or may not be stored: RETRY and silence can both follow a
    /// write that reached Redis. Sending the same event again later (same `player_id`, `seq` and
    /// every other field) is safe within the server's dedup window, and is answered DUPLICATE if
    /// it was stored.
    Unknown,
    /// Given up at a caller's deadline before its first copy left the queue (`attempts == 0`):
    /// not stored.
    NotSent,
}

impl Outcome {
    /// Whether the event is known to be stored.
    pub fn is_stored(self) -> bool {
        matches!(self, Outcome::Stored { .. })
    }

    /// How the resend loop's end of a sent event reads here.
    fn of(end: End) -> Outcome {
        match end {
            End::Stored { first } => Outcome::Stored { first },
            End::Rejected => Outcome::Rejected,
            End::Unconfirmed => Outcome::Unknown,
        }
    }
}

/// The end of one event, reported exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolution {
    pub id: EventId,
    pub outcome: Outcome,
    /// Copies sent, including the first; 0 if it never left the queue.
    pub attempts: u32,
    /// From the `send` call to the resolution, queueing and resends included.
    pub latency: Duration,
}

/// Counters since connect, for logs and metrics. Each only grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events whose first copy was handed to the socket.
    pub events_sent: u64,
    /// Copies after the first.
    pub resends: u64,
    /// Datagrams (UDP) or writes (TCP) that went out.
    pub writes: u64,
    /// Frames that a failed write or a down TCP connection kept off the wire; each was counted as
    /// an attempt and is resent on schedule.
    pub frames_unsent: u64,
    /// Well-formed acks received, matched or not.
    pub acks: u64,
    /// Of those, RETRY answers.
    pub acks_retry: u64,
    /// Well-formed acks for no pending event: typically answers to a copy of an event that an
    /// earlier copy's answer had already resolved.
    pub acks_unmatched: u64,
    /// Received byte runs that are not a valid ack (bad magic, version, kind, status, crc, or a
    /// short tail). Counted and skipped, never trusted.
    pub acks_malformed: u64,
    /// Socket errors other than timeouts (ICMP refusals, failed writes or connects).
    pub io_errors: u64,
    /// TCP connections lost and re-established.
    pub disconnects: u64,
    pub reconnects: u64,
}

/// A connection to one shardgate server. See the crate documentation for the life of an event.
pub struct Client {
    wire: Wire,
    book: Book,
    draws: Draws,
    signer: Option<Signer>,
    stats: Stats,
    give_up_after: Option<Duration>,
    in_flight_max: usize,
    queue_max: usize,
    /// Time zero of the resend loop's nanosecond clock.
    origin: Instant,
}

struct Book {
    /// Events sent at least once and not resolved; its frame is what a resend writes.
    in_flight: Outstanding<Vec<u8>>,
    /// Events not sent yet, oldest first.
    queue: VecDeque<Queued>,
    /// The ids in `queue`, so that `send` refuses a pending id in one lookup.
    queued_ids: HashSet<EventId>,
    /// Frame buffers of resolved events, reused so that steady sending does not allocate.
    spare_frames: Vec<Vec<u8>>,
    spare_frames_max: usize,
}

struct Queued {
    id: EventId,
    frame: Vec<u8>,
    /// On the client's nanosecond clock; latency and `give_up_after` count from here.
    queued_at_ns: u64,
}

impl Book {
    fn is_empty(&self) -> bool {
        self.in_flight.is_empty() && self.queue.is_empty()
    }

    fn resolve(&mut self, ending: Ending<Vec<u8>>, resolved: &mut Vec<Resolution>) {
        resolved.push(Resolution {
            id: ending.id,
            outcome: Outcome::of(ending.end),
            attempts: ending.attempts,
            latency: Duration::from_nanos(ending.latency_ns),
        });
        self.spare(ending.payload);
    }

    /// Resolves a queued event that never left the queue.
    fn resolve_unsent(&mut self, queued: Queued, now_ns: u64, resolved: &mut Vec<Resolution>) {
        self.queued_ids.remove(&queued.id);
        resolved.push(Resolution {
            id: queued.id,
            outcome: Outcome::NotSent,
            attempts: 0,
            latency: Duration::from_nanos(now_ns.saturating_sub(queued.queued_at_ns)),
        });
        self.spare(queued.frame);
    }

    fn spare(&mut self, frame: Vec<u8>) {
        if self.spare_frames.len() < self.spare_frames_max {
            self.spare_frames.push(frame);
        }
    }
}

/// Signs frames with per-player keys derived from the server's secret.
struct Signer {
    secret: Vec<u8>,
    /// The last player's key: events tend to come in runs per player, and a derivation costs two
    /// HMAC computations.
    cached: Option<(u64, [u8; auth::PLAYER_KEY_BYTES])>,
}

impl Signer {
    fn key(&mut self, player_id: u64) -> &[u8; auth::PLAYER_KEY_BYTES] {
        if self
            .cached
            .is_some_and(|(cached_player_id, _)| cached_player_id != player_id)
        {
            self.cached = None;
        }
        let secret = &self.secret;
        &self
            .cached
            .get_or_insert_with(|| (player_id, auth::player_key(secret, player_id)))
            .1
    }
}

impl Client {
    /// Opens the socket (for TCP, connects, failing if the server cannot be reached) and
    /// allocates every container at its configured bound.
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        config.validate()?;
        let wire = Wire::open(&config)?;
        let schedule = Schedule::new(config.ack_timeout, config.backoff_max, config.jitter_percent.min(100));
        // A RETRY restarts the same wait a copy gets: the server gets the full backoff it asked for.
        let waits = Waits {
            answer: schedule,
            retry: schedule,
        };
        let limits = Limits {
            attempts_max: config.attempts_max,
            give_up_after_ns: config.give_up_after.map(duration_ns),
        };
        Ok(Client {
            wire,
            book: Book {
                in_flight: Outstanding::new(config.in_flight_max, waits, limits),
                queue: VecDeque::with_capacity(config.queue_max),
                queued_ids: HashSet::with_capacity(config.queue_max),
                spare_frames: Vec::new(),
                spare_frames_max: config.in_flight_max + config.queue_max,
            },
            draws: Draws::new(),
            signer: config.auth_secret.map(|secret| Signer { secret, cached: None }),
            stats: Stats::default(),
            give_up_after: config.give_up_after,
            in_flight_max: config.in_flight_max,
            queue_max: config.queue_max,
            origin: Instant::now(),
        })
    }

    /// Encodes the event (signed if the config has an auth secret) and queues it; `poll` sends
    /// it. Fails, leaving nothing queued, if the queue holds `queue_max` events, if the payload is
    /// over 1024 bytes, or if an event with the same `(player_id, seq)` is still pending.
    pub fn send(&mut self, event: &Event<'_>) -> Result<(), ClientError> {
        if event.payload.len() > PAYLOAD_BYTES_MAX {
            return Err(ClientError::payload_too_long(event.payload.len()));
        }
        if self.book.queue.len() >= self.queue_max {
            return Err(ClientError::queue_full(self.queue_max));
        }
        let id = EventId {
            player_id: event.player_id,
            seq: event.seq,
        };
        if self.book.in_flight.contains(id) || self.book.queued_ids.contains(&id) {
            return Err(ClientError::already_pending(id));
        }
        let mut frame = self
            .book
            .spare_frames
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FRAME_BYTES_MAX));
        frame.clear();
        let fields = ActionFields {
            id,
            client_time_us: event.client_time_us,
            action_type: event.action_type,
            payload: event.payload,
        };
        match &mut self.signer {
            Some(signer) => frame::encode_action_signed(&fields, signer.key(id.player_id), &mut frame),
            None => frame::encode_action(&fields, &mut frame),
        }
        let queued_at_ns = self.clock_ns(Instant::now());
        self.book.queued_ids.insert(id);
        self.book.queue.push_back(Queued {
            id,
            frame,
            queued_at_ns,
        });
        Ok(())
    }

    /// Drives the client for at most `timeout` and returns what resolved; see [`Client::poll_into`].
    pub fn poll(&mut self, timeout: Duration) -> Vec<Resolution> {
        let mut resolved = Vec::new();
        self.poll_into(timeout, &mut resolved);
        resolved
    }

    /// Drives the client: sends queued events while fewer than `in_flight_max` are in flight,
    /// resends what is due, gives up on what passed `give_up_after` or the opt-in
    /// `attempts_max` (nothing, by default), and reads acks. Appends each
    /// resolution to `resolved` and returns how many it appended.
    ///
    /// Returns as soon as something resolved (after taking in the acks already read), when
    /// nothing is pending, or when `timeout` has passed. `Duration::ZERO` never waits: it sends
    /// what is due and takes in only the acks that have already arrived. Call it often enough
    /// for resends to go out on time, e.g. every game tick.
    pub fn poll_into(&mut self, timeout: Duration, resolved: &mut Vec<Resolution>) -> usize {
        let resolved_before = resolved.len();
        let started = Instant::now();
        let deadline = started.checked_add(timeout.min(POLL_TIMEOUT_MAX)).unwrap_or(started);
        loop {
            let now = Instant::now();
            self.drive(now, deadline, resolved);
            if resolved.len() > resolved_before || self.book.is_empty() {
                break;
            }
            let wake = self.next_wake().map_or(deadline, |wake| wake.min(deadline));
            let wait = wake.saturating_duration_since(now);
            if wait.is_zero() {
                // Nothing left to wait for, but answers that have already arrived still count.
                self.drain(resolved);
                if now >= deadline {
                    // Acks just taken in may have freed room in flight; use it now, not a
                    // poll later.
                    self.drive(Instant::now(), deadline, resolved);
                    break;
                }
                continue;
            }
            self.read_once(Some(wait), resolved);
        }
        resolved.len() - resolved_before
    }

    /// Polls until nothing is pending or `deadline` passes, then resolves whatever is still
    /// pending as [`Outcome::Unknown`] if it was sent, or [`Outcome::NotSent`] if it never left
    /// the queue. Afterwards the client holds no events; it can go on being used. This caller's
    /// deadline is the only way an event ends without a final answer, unless the config opts in
    /// to `give_up_after` or `attempts_max`.
    pub fn flush(&mut self, deadline: Instant) -> Vec<Resolution> {
        let mut resolved = Vec::new();
        self.flush_into(deadline, &mut resolved);
        resolved
    }

    /// [`Client::flush`] appending to `resolved`; returns how many it appended.
    pub fn flush_into(&mut self, deadline: Instant, resolved: &mut Vec<Resolution>) -> usize {
        let resolved_before = resolved.len();
        loop {
            let now = Instant::now();
            if self.book.is_empty() {
                break;
            }
            if now >= deadline {
                let now_ns = self.clock_ns(now);
                let book = &mut self.book;
                let mut unconfirmed = Vec::new();
                book.in_flight.give_up_all(now_ns, |ending| unconfirmed.push(ending));
                for ending in unconfirmed {
                    book.resolve(ending, resolved);
                }
                while let Some(queued) = book.queue.pop_front() {
                    book.resolve_unsent(queued, now_ns, resolved);
                }
                break;
            }
            self.poll_into(deadline - now, resolved);
        }
        resolved.len() - resolved_before
    }

    /// Events accepted by `send` and not yet resolved, queued or in flight.
    pub fn pending(&self) -> usize {
        self.book.in_flight.len() + self.book.queue.len()
    }

    /// Events sent at least once and not yet resolved.
    pub fn in_flight(&self) -> usize {
        self.book.in_flight.len()
    }

    /// Events waiting to be sent for the first time.
    pub fn queued(&self) -> usize {
        self.book.queue.len()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The local address of the socket (of the current connection, for TCP).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.wire.local_addr()
    }

    /// `at` on the resend loop's nanosecond clock.
    fn clock_ns(&self, at: Instant) -> u64 {
        duration_ns(at.saturating_duration_since(self.origin))
    }

    /// One round of work that never waits (beyond a TCP reconnect bounded by `deadline`).
    fn drive(&mut self, now: Instant, deadline: Instant, resolved: &mut Vec<Resolution>) {
        self.wire.maintain(now, deadline, &mut self.stats);
        let now_ns = self.clock_ns(now);
        self.expire(now_ns, resolved);
        self.expire_queued(now_ns, resolved);
        self.promote(now_ns);
        self.wire.transmit(&mut self.stats);
    }

    /// Resends every in-flight event whose wait ran out, or resolves it as unknown once its
    /// give-up deadline passed or its opt-in last copy went unanswered: the resend loop decides.
    fn expire(&mut self, now_ns: u64, resolved: &mut Vec<Resolution>) {
        while let Some(due) = self.book.in_flight.pop_due(now_ns, self.draws.next_draw()) {
            match due {
                Due::Resend { id, .. } => {
                    if let Some(entry) = self.book.in_flight.get(id) {
                        self.wire.push_frame(&entry.payload, &mut self.stats);
                        self.stats.resends += 1;
                    }
                }
                Due::Ended(ending) => self.book.resolve(ending, resolved),
            }
        }
    }

    /// Resolves as not sent the queued events whose give-up deadline passed. All share one
    /// `give_up_after` and the queue is in `send` order, so they are at its front.
    fn expire_queued(&mut self, now_ns: u64, resolved: &mut Vec<Resolution>) {
        let Some(give_up_after) = self.give_up_after.map(duration_ns) else {
            return;
        };
        while let Some(queued) = self.book.queue.front() {
            if queued.queued_at_ns.saturating_add(give_up_after) > now_ns {
                break;
            }
            let queued = self.book.queue.pop_front().expect("the front was just seen");
            self.book.resolve_unsent(queued, now_ns, resolved);
        }
    }

    /// Moves queued events into flight, oldest first, while there is room and a way to send.
    /// While a TCP connection is down they stay queued, so they spend no attempts and `send`
    /// pushes back once the queue fills.
    fn promote(&mut self, now_ns: u64) {
        while self.book.in_flight.len() < self.in_flight_max && self.wire.is_up() {
            let Some(queued) = self.book.queue.pop_front() else {
                break;
            };
            self.book.queued_ids.remove(&queued.id);
            self.wire.push_frame(&queued.frame, &mut self.stats);
            let draw = self.draws.next_draw();
            let first_sent = self
                .book
                .in_flight
                .first_sent(queued.id, queued.frame, queued.queued_at_ns, now_ns, draw);
            // Cannot fail: there is room, and `send` refused an id already pending.
            debug_assert!(first_sent.is_ok());
            self.stats.events_sent += 1;
        }
    }

    /// The earliest moment something needs doing without an ack arriving.
    fn next_wake(&self) -> Option<Instant> {
        let timer = self
            .book
            .in_flight
            .next_due_ns()
            .map(|due_ns| self.origin + Duration::from_nanos(due_ns));
        let reconnect = self.wire.reconnect_at().filter(|_| !self.book.is_empty());
        // The oldest queued event's deadline: it may pass while nothing can be sent.
        let queued_give_up = self.book.queue.front().and_then(|queued| {
            let give_up_after = self.give_up_after?;
            Some(self.origin + Duration::from_nanos(queued.queued_at_ns) + give_up_after)
        });
        [timer, reconnect, queued_give_up].into_iter().flatten().min()
    }

    /// Takes in every ack that has already arrived, without waiting.
    fn drain(&mut self, resolved: &mut Vec<Resolution>) {
        for _ in 0..DRAIN_READS_MAX {
            if !self.read_once(None, resolved) {
                break;
            }
        }
    }

    /// One read (waiting up to `wait`, or not at all with `None`), and every ack in it applied.
    /// Returns whether anything was read.
    fn read_once(&mut self, wait: Option<Duration>, resolved: &mut Vec<Resolution>) -> bool {
        let Some(received) = self.wire.read(wait, &mut self.stats) else {
            return false;
        };
        let now_ns = duration_ns(Instant::now().saturating_duration_since(self.origin));
        if received.stray_bytes > 0 {
            self.stats.acks_malformed += 1;
        }
        for bytes in received.acks.chunks_exact(ACK_BYTES) {
            match frame::decode_ack(bytes) {
                Ok(ack) => {
                    self.stats.acks += 1;
                    let draw = self.draws.next_draw();
                    apply(&mut self.book, &mut self.stats, ack, now_ns, draw, resolved);
                }
                Err(_) => self.stats.acks_malformed += 1,
            }
        }
        true
    }
}

/// Applies one well-formed ack: the resend loop says what it means for the event it names.
fn apply(book: &mut Book, stats: &mut Stats, ack: Ack, now_ns: u64, draw: u64, resolved: &mut Vec<Resolution>) {
    if ack.status == Status::Retry {
        stats.acks_retry += 1;
    }
    match book.in_flight.answered(ack.id, ack.status, now_ns, draw) {
        Verdict::Ended(ending) => book.resolve(ending, resolved),
        // The next copy is due then; `expire` sends it.
        Verdict::ResendAt { .. } => {}
        // Nothing in flight has that id (a queued event with it was never sent, so the ack
        // answers an earlier event): typically the answer to a copy already answered.
        Verdict::Unknown => stats.acks_unmatched += 1,
    }
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
