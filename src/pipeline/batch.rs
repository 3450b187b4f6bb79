//! A batch: the events of one script call, and where each answer goes.
//!
//! A shard owns `batches_in_flight_max + 1` batches, allocated at start: one
//! open (filling) and the rest free, in Redis, or held. A batch's buffers are
//! sized for its worst case, so filling one never allocates. The blob is handed
//! to fred as a `Bytes` that shares the batch's buffer. fred drops its copy
//! some time after the call returns, or, for a call that passed its deadline,
//! only once Redis answers or the connection drops. Until then the batch is
//! *held*: answered, but not reusable (`try_release`). The shard counts held
//! batches against its in-flight bound, so a Redis that stalls while staying
//! connected holds at most `batches_in_flight_max` blobs, never a growing pile
//! of them, and the batch never allocates a second buffer.
//!
//! On a Redis Cluster the blob is not lent: it is split by partition into the batch's
//! `Groups` (`redis::groups`), allocated with it, whose buffers are lent and held the same way.

use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::limits::BATCH_RECORD_BYTES_MAX;
use crate::pipeline::answer::Route;
use crate::redis::groups::Groups;
use crate::redis::script::{append_record, Record};
use crate::redis::store::Outcome;
use crate::wire::frame::{Action, EventId, Status};

/// One event waiting for its batch's outcome.
pub struct Pending {
    pub id: EventId,
    pub route: Route,
    pub received_at: Instant,
}

pub struct Batch {
    events: Vec<Pending>,
    blob: BytesMut,
    /// True from `take_blob` until the Redis client let go of the blob.
    lent: bool,
    /// Redis's answer per event, then the status each event is answered with.
    outcomes: Vec<Outcome>,
    statuses: Vec<Status>,
    events_max: usize,
    /// When the first event joined: the linger clock starts here.
    opened_at: Option<Instant>,
    /// On a Redis Cluster, the split of the blob by partition; `None` on a standalone Redis.
    groups: Option<Groups>,
}

impl Batch {
    /// A batch for `events_max` events; with `cluster`, with its split by partition too.
    pub fn new(events_max: usize, cluster: bool) -> Batch {
        assert!(events_max > 0);
        Batch {
            groups: cluster.then(|| Groups::new(events_max)),
            events: Vec::with_capacity(events_max),
            blob: BytesMut::with_capacity(events_max * BATCH_RECORD_BYTES_MAX),
            lent: false,
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
        assert!(!self.lent, "a held batch is not filled");
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
        debug_assert!(!self.lent, "a batch is sent once per fill");
        // `split` leaves `self.blob` as the empty rest of the same buffer;
        // `try_release` later moves it back to the buffer's start.
        self.lent = true;
        self.blob.split().freeze()
    }

    /// Takes back the buffer lent to the Redis client if the client has let
    /// go of it; false while the client still holds it. Never allocates.
    pub fn try_release(&mut self) -> bool {
        if let Some(groups) = &mut self.groups {
            if !groups.try_release() {
                return false;
            }
        }
        if !self.lent {
            return true;
        }
        debug_assert!(self.is_empty(), "a batch is released after it was answered");
        let capacity_bytes = self.events_max * BATCH_RECORD_BYTES_MAX;
        self.blob.clear();
        // Asks for the whole buffer: only possible once no other handle is left.
        if !self.blob.try_reclaim(capacity_bytes) {
            return false;
        }
        self.lent = false;
        debug_assert!(self.blob.is_empty() && self.blob.capacity() >= capacity_bytes);
        true
    }

    /// On a cluster: the blob, which stays here, and the split it is sent through.
    pub(crate) fn cluster_parts(&mut self) -> Option<(&[u8], &mut Groups)> {
        debug_assert!(!self.lent);
        let groups = self.groups.as_mut()?;
        Some((&self.blob[..], groups))
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

    /// Empties the batch; its blob buffer comes back with `try_release`.
    pub fn finish(&mut self) {
        self.events.clear();
        self.outcomes.clear();
        self.statuses.clear();
        self.opened_at = None;
        self.blob.clear();
        if let Some(groups) = &mut self.groups {
            groups.finish();
        }
        debug_assert!(self.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::{Action, EventId};

    fn action(seq: u64) -> Action<'static> {
        Action {
            id: EventId { player_id: 1, seq },
            client_time_us: 0,
            action_type: 0,
            payload: b"x",
            auth_tag: None,
            signed: b"",
        }
    }

    /// A batch is reusable only once the client dropped the blob, and then
    /// reuses the same buffer; while the blob is held it is not reusable.
    #[test]
    fn held_until_the_client_lets_go() {
        let mut batch = Batch::new(4, false);
        let route = Route::Datagram("127.0.0.1:1".parse().unwrap());
        batch.push(&action(1), 0, 0, route.clone(), Instant::now());
        let blob = batch.take_blob();
        let buffer_start = blob.as_ptr();
        batch.finish();
        assert!(!batch.try_release(), "the client still holds the blob");
        let second_handle = blob.clone();
        drop(blob);
        assert!(!batch.try_release(), "any handle left keeps it held");
        drop(second_handle);
        assert!(batch.try_release());
        batch.push(&action(2), 0, 0, route, Instant::now());
        assert_eq!(
            batch.take_blob().as_ptr(),
            buffer_start,
            "the same buffer, not a new one"
        );
    }
}
