//! The client: the book of pending events, their resend timers, and the poll loop that drives
//! sending and receiving.
//!
//! Every event the client accepted is in `entries` under its id until it resolves, so an ack
//! is matched with one hash lookup however acks are ordered or coalesced, and a second event
//! with a pending id is refused (its acks could not be told apart). Entries are either queued
//! (never sent; `attempts == 0`) or in flight. Resend times live in a min-heap with one item per
//! in-flight entry; since an entry's due time only ever moves later, an item that comes up early
//! is simply pushed again with the entry's current due time, and items of resolved entries are
//! dropped when they come up (or swept if they pile up), so the heap stays bounded without
//! deleting from its middle. All containers are sized at connect time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth;
use crate::backoff::Backoff;
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::frame::{self, Ack, ActionFields, EventId, Status, ACK_BYTES, FRAME_BYTES_MAX, PAYLOAD_BYTES_MAX};
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

    /// How a caller's deadline ends an event with no final answer: unknown once a copy was sent.
    fn given_up(attempts: u32) -> Outcome {
        if attempts == 0 {
            Outcome::NotSent
        } else {
            Outcome::Unknown
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
    backoff: Backoff,
    signer: Option<Signer>,
    stats: Stats,
    attempts_max: Option<u32>,
    give_up_after: Option<Duration>,
    in_flight_max: usize,
    queue_max: usize,
}

struct Book {
    entries: HashMap<EventId, Entry>,
    /// Ids of queued entries, oldest first.
    queue: VecDeque<EventId>,
    /// (due, nonce, id) of in-flight entries; see the module docs.
    timers: BinaryHeap<Reverse<(Instant, u64, EventId)>>,
    /// Timer items beyond this many are swept of dead ones.
    timers_sweep_len: usize,
    in_flight: usize,
    /// Frame buffers of resolved events, reused so that steady sending does not allocate.
    spare_frames: Vec<Vec<u8>>,
    spare_frames_max: usize,
    /// Tells apart two events that had the same id one after the other, so a stale timer item of
    /// the first cannot act on the second.
    next_nonce: u64,
}

struct Entry {
    frame: Vec<u8>,
    nonce: u64,
    queued_at: Instant,
    /// Copies sent so far; 0 while queued.
    attempts: u32,
    /// The wait after the latest copy (jitter included), reused when a RETRY restarts it.
    delay: Duration,
    /// When the next copy goes out (or the event gives up) if no final answer came; never later
    /// than `give_up_at`.
    due: Instant,
    /// `send` time plus `give_up_after`, if set: the event resolves unanswered then.
    give_up_at: Option<Instant>,
}

impl Entry {
    /// The moment the current wait ends: `delay` after `from`, or the give-up deadline if sooner.
    fn wait_end(&self, from: Instant) -> Instant {
        let end = from + self.delay;
        self.give_up_at.map_or(end, |give_up_at| end.min(give_up_at))
    }

    /// Whether this event's own limits end it now instead of another copy.
    fn is_given_up(&self, now: Instant, attempts_max: Option<u32>) -> bool {
        self.give_up_at.is_some_and(|give_up_at| give_up_at <= now)
            || attempts_max.is_some_and(|attempts_max| self.attempts >= attempts_max)
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
        let entries_max = config.in_flight_max + config.queue_max;
        let timers_sweep_len = config.in_flight_max * 2 + 64;
        Ok(Client {
            wire,
            book: Book {
                entries: HashMap::with_capacity(entries_max),
                queue: VecDeque::with_capacity(config.queue_max),
                timers: BinaryHeap::with_capacity(timers_sweep_len + 1),
                timers_sweep_len,
                in_flight: 0,
                spare_frames: Vec::new(),
                spare_frames_max: entries_max,
                next_nonce: 0,
            },
            backoff: Backoff::new(config.ack_timeout, config.backoff_max, config.jitter_percent),
            signer: config.auth_secret.map(|secret| Signer { secret, cached: None }),
            stats: Stats::default(),
            attempts_max: config.attempts_max,
            give_up_after: config.give_up_after,
            in_flight_max: config.in_flight_max,
            queue_max: config.queue_max,
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
        if self.book.entries.contains_key(&id) {
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
        let now = Instant::now();
        self.book.next_nonce += 1;
        self.book.entries.insert(
            id,
            Entry {
                frame,
                nonce: self.book.next_nonce,
                queued_at: now,
                attempts: 0,
                delay: Duration::ZERO,
                due: now,
                give_up_at: self.give_up_after.map(|after| now + after),
            },
        );
        self.book.queue.push_back(id);
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
            if resolved.len() > resolved_before || self.book.entries.is_empty() {
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
            if self.book.entries.is_empty() {
                break;
            }
            if now >= deadline {
                let pending: Vec<EventId> = self.book.entries.keys().copied().collect();
                for id in pending {
                    let attempts = self.book.entries.get(&id).map_or(0, |entry| entry.attempts);
                    self.book.resolve(id, Outcome::given_up(attempts), now, resolved);
                }
                self.book.queue.clear();
                self.book.timers.clear();
                break;
            }
            self.poll_into(deadline - now, resolved);
        }
        resolved.len() - resolved_before
    }

    /// Events accepted by `send` and not yet resolved, queued or in flight.
    pub fn pending(&self) -> usize {
        self.book.entries.len()
    }

    /// Events sent at least once and not yet resolved.
    pub fn in_flight(&self) -> usize {
        self.book.in_flight
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

    /// One round of work that never waits (beyond a TCP reconnect bounded by `deadline`).
    fn drive(&mut self, now: Instant, deadline: Instant, resolved: &mut Vec<Resolution>) {
        self.wire.maintain(now, deadline, &mut self.stats);
        self.expire(now, resolved);
        self.expire_queued(now, resolved);
        self.promote(now);
        self.wire.transmit(&mut self.stats);
        self.book.sweep_timers();
    }

    /// Resends every in-flight event whose wait ran out, or resolves it as unknown once its
    /// give-up deadline passed or its opt-in last copy went unanswered.
    fn expire(&mut self, now: Instant, resolved: &mut Vec<Resolution>) {
        while let Some(&Reverse((due, nonce, id))) = self.book.timers.peek() {
            if due > now {
                break;
            }
            self.book.timers.pop();
            let Some(entry) = self.book.entries.get_mut(&id) else {
                continue; // resolved since
            };
            if entry.nonce != nonce || entry.attempts == 0 {
                continue; // an item of an earlier event with the same id
            }
            if entry.due > now {
                // A RETRY moved the due time later.
                self.book.timers.push(Reverse((entry.due, nonce, id)));
                continue;
            }
            if entry.is_given_up(now, self.attempts_max) {
                self.book.resolve(id, Outcome::Unknown, now, resolved);
                continue;
            }
            entry.attempts = entry.attempts.saturating_add(1);
            entry.delay = self.backoff.delay(entry.attempts);
            entry.due = entry.wait_end(now);
            self.book.timers.push(Reverse((entry.due, nonce, id)));
            self.wire.push_frame(&entry.frame, &mut self.stats);
            self.stats.resends += 1;
        }
    }

    /// Resolves as not sent the queued events whose give-up deadline passed. All share one
    /// `give_up_after` and the queue is in `send` order, so they are at its front.
    fn expire_queued(&mut self, now: Instant, resolved: &mut Vec<Resolution>) {
        while let Some(&id) = self.book.queue.front() {
            let expired = self
                .book
                .entries
                .get(&id)
                .is_none_or(|entry| entry.give_up_at.is_some_and(|give_up_at| give_up_at <= now));
            if !expired {
                break;
            }
            self.book.queue.pop_front();
            self.book.resolve(id, Outcome::NotSent, now, resolved);
        }
    }

    /// Moves queued events into flight, oldest first, while there is room and a way to send.
    /// While a TCP connection is down they stay queued, so they spend no attempts and `send`
    /// pushes back once the queue fills.
    fn promote(&mut self, now: Instant) {
        while self.book.in_flight < self.in_flight_max && self.wire.is_up() {
            let Some(id) = self.book.queue.pop_front() else {
                break;
            };
            let Some(entry) = self.book.entries.get_mut(&id) else {
                continue; // cannot happen: queued entries resolve only in flush, which clears the queue
            };
            entry.attempts = 1;
            entry.delay = self.backoff.delay(1);
            entry.due = entry.wait_end(now);
            self.book.timers.push(Reverse((entry.due, entry.nonce, id)));
            self.book.in_flight += 1;
            self.wire.push_frame(&entry.frame, &mut self.stats);
            self.stats.events_sent += 1;
        }
    }

    /// The earliest moment something needs doing without an ack arriving.
    fn next_wake(&self) -> Option<Instant> {
        let timer = self.book.timers.peek().map(|Reverse((due, _, _))| *due);
        let reconnect = self.wire.reconnect_at().filter(|_| !self.book.entries.is_empty());
        // The oldest queued event's deadline: it may pass while nothing can be sent.
        let queued_give_up = self
            .book
            .queue
            .front()
            .and_then(|id| self.book.entries.get(id))
            .and_then(|entry| entry.give_up_at);
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
        let now = Instant::now();
        if received.stray_bytes > 0 {
            self.stats.acks_malformed += 1;
        }
        for bytes in received.acks.chunks_exact(ACK_BYTES) {
            match frame::decode_ack(bytes) {
                Ok(ack) => {
                    self.stats.acks += 1;
                    self.book.apply(ack, self.attempts_max, &mut self.stats, now, resolved);
                }
                Err(_) => self.stats.acks_malformed += 1,
            }
        }
        true
    }
}

impl Book {
    /// Applies one well-formed ack to the event it names.
    fn apply(
        &mut self,
        ack: Ack,
        attempts_max: Option<u32>,
        stats: &mut Stats,
        now: Instant,
        resolved: &mut Vec<Resolution>,
    ) {
        if ack.status == Status::Retry {
            stats.acks_retry += 1;
        }
        let Some(entry) = self.entries.get_mut(&ack.id) else {
            stats.acks_unmatched += 1;
            return;
        };
        if entry.attempts == 0 {
            // Queued and never sent: the ack answers an earlier event with the same id.
            stats.acks_unmatched += 1;
            return;
        }
        let outcome = match ack.status {
            Status::Accepted => Outcome::Stored { first: true },
            Status::Duplicate => Outcome::Stored { first: false },
            Status::Rejected => Outcome::Rejected,
            // Not confirmed, so never an end in itself: only a limit the caller opted in to
            // ends the event here, and then as unknown.
            Status::Retry if entry.is_given_up(now, attempts_max) => Outcome::Unknown,
            Status::Retry => {
                // The server asked for a pause: the full wait starts now, not at the send (but
                // ends by the give-up deadline). Never earlier than the current due time, so the
                // timer item stays valid and is pushed again when it comes up.
                entry.due = entry.due.max(entry.wait_end(now));
                return;
            }
        };
        self.resolve(ack.id, outcome, now, resolved);
    }

    fn resolve(&mut self, id: EventId, outcome: Outcome, now: Instant, resolved: &mut Vec<Resolution>) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        if entry.attempts > 0 {
            self.in_flight -= 1;
        }
        resolved.push(Resolution {
            id,
            outcome,
            attempts: entry.attempts,
            latency: now.saturating_duration_since(entry.queued_at),
        });
        if self.spare_frames.len() < self.spare_frames_max {
            self.spare_frames.push(entry.frame);
        }
    }

    /// Drops the items of resolved entries once they outnumber the live ones, keeping the heap
    /// within its preallocated size at a cost spread over the resolutions that made them.
    fn sweep_timers(&mut self) {
        if self.timers.len() <= self.timers_sweep_len {
            return;
        }
        let entries = &self.entries;
        self.timers.retain(|Reverse((_, nonce, id))| {
            entries
                .get(id)
                .is_some_and(|entry| entry.nonce == *nonce && entry.attempts > 0)
        });
    }
}
