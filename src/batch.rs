//! A batch: the events of one script call, and where each answer goes.
//!
//! A shard owns `batches_in_flight_max + 1` batches, allocated at start: one
//! open (filling) and the rest free or in Redis. A batch's two buffers are
//! sized for its worst case, so filling one never allocates. The blob is handed
//! to fred as a `Bytes` that owns the batch's buffer, and the batch keeps a
//! second handle on it. fred drops its copy some time after the call returns,
//! so the batch takes the buffer back lazily, when it is next filled: by then
//! it has been through the spare pool and fred is long done. Only if fred
//! still holds it does the batch allocate a new buffer (counted).

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::frame::{Action, EventId, Status};
use crate::limits::BATCH_RECORD_BYTES_MAX;
use crate::reply::Route;
use crate::script::{append_record, Record};
use crate::store::Outcome;

/// One event waiting for its batch's outcome.
pub struct Pending {
    pub id: EventId,
    pub route: Route,
    pub received_at: Instant,
}

pub struct Batch {
    events: Vec<Pending>,
    blob: BytesMut,
    /// The blob lent to the Redis client, kept to take its buffer back.
    lent: Option<Bytes>,
    /// Times the buffer could not be taken back and was allocated anew.
    blob_allocations: u64,
    /// Redis's answer per event, then the status each event is answered with.
    outcomes: Vec<Outcome>,
    statuses: Vec<Status>,
    events_max: usize,
    /// When the first event joined: the linger clock starts here.
    opened_at: Option<Instant>,
}

impl Batch {
    pub fn new(events_max: usize) -> Batch {
        assert!(events_max > 0);
        Batch {
            events: Vec::with_capacity(events_max),
            blob: BytesMut::with_capacity(events_max * BATCH_RECORD_BYTES_MAX),
            lent: None,
            blob_allocations: 0,
            outcomes: Vec::with_capacity(events_max),
            statuses: Vec::with_capacity(events_max),
            events_max,
            opened_at: None,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.events.len() == self.events_max
    }

    pub fn opened_at(&self) -> Option<Instant> {
        self.opened_at
    }

    /// Adds one event. The caller checks `is_full` first.
    pub fn push(&mut self, action: &Action<'_>, partition: u32, recv_us: u64, route: Route, received_at: Instant) {
        assert!(!self.is_full(), "the shard flushes a full batch before adding to it");
        if self.events.is_empty() {
            self.reclaim_blob();
        }
        debug_assert!(self.blob.capacity() - self.blob.len() >= BATCH_RECORD_BYTES_MAX);
        let record = Record {
            partition,
            player_id: action.id.player_id,
            seq: action.id.seq,
            action_type: action.action_type,
            client_time_us: action.client_time_us,
            recv_us,
            payload: action.payload,
        };
        append_record(&record, &mut self.blob);
        self.events.push(Pending {
            id: action.id,
            route,
            received_at,
        });
        self.opened_at.get_or_insert(received_at);
    }

    /// The blob to send. The batch keeps its events until `finish`.
    pub fn take_blob(&mut self) -> Bytes {
        debug_assert!(!self.is_empty());
        debug_assert!(self.lent.is_none(), "a batch is sent once per fill");
        // `split` leaves `self.blob` as the empty rest of the same buffer;
        // `reserve` later reuses the whole buffer if no other handle is left.
        let blob = self.blob.split().freeze();
        self.lent = Some(blob.clone());
        blob
    }

    /// Takes back the buffer lent to the Redis client, or allocates a new one
    /// if the client still holds it.
    fn reclaim_blob(&mut self) {
        let Some(lent) = self.lent.take() else {
            return;
        };
        // Once the Redis client dropped its copy, only `self.blob` (the empty
        // rest) refers to the buffer, and `reserve` moves back to its start
        // instead of allocating.
        let buffer_start = lent.as_ptr();
        drop(lent);
        let capacity_bytes = self.events_max * BATCH_RECORD_BYTES_MAX;
        self.blob.clear();
        self.blob.reserve(capacity_bytes);
        if self.blob.as_ptr() != buffer_start {
            self.blob_allocations += 1;
        }
        debug_assert!(self.blob.is_empty() && self.blob.capacity() >= capacity_bytes);
    }

    pub fn blob_allocations(&self) -> u64 {
        self.blob_allocations
    }

    pub fn events(&self) -> &[Pending] {
        &self.events
    }

    pub fn outcomes_mut(&mut self) -> &mut Vec<Outcome> {
        &mut self.outcomes
    }

    /// The events, Redis's outcomes, and the statuses to fill in, borrowed together.
    pub fn resolution_parts(&mut self) -> (&[Pending], &[Outcome], &mut Vec<Status>) {
        (&self.events, &self.outcomes, &mut self.statuses)
    }

    pub fn statuses(&self) -> &[Status] {
        &self.statuses
    }

    /// Empties the batch for reuse; its blob buffer comes back on the next fill.
    pub fn finish(&mut self) {
        self.events.clear();
        self.outcomes.clear();
        self.statuses.clear();
        self.opened_at = None;
        self.blob.clear();
        debug_assert!(self.is_empty());
    }
}
