//! One lane (a UDP socket or a TCP connection): which event each of its frames carries, when to
//! resend, and what an ack means.
//!
//! The transports (`udp.rs`, `tcp.rs`) only move bytes and the engine (`engine.rs`) only decides
//! when; everything a lane decides lives here and is the same for both transports. A lane is
//! plain data owned by the engine's one thread, so nothing here locks or wakes anybody.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use shardgate_proto::frame::{decode_ack, ACK_BYTES};

use crate::events::{self, Event, EventSource};
use crate::live::Counters;
use crate::plan::Plan;
use crate::tracker::{Fate, Tracker};

/// What every lane reads.
pub struct Shared<'a> {
    pub plan: &'a Plan,
    pub events: &'a EventSource,
    pub counters: &'a Counters,
}

/// Buffers the engine reuses for every send, so a send allocates nothing.
pub struct Scratch {
    /// One datagram's or write's frames.
    pub bytes: Vec<u8>,
    payload: Vec<u8>,
    resend: Vec<Event>,
}

impl Scratch {
    pub fn new(plan: &Plan) -> Scratch {
        Scratch {
            bytes: Vec::with_capacity(plan.frames_per_send * plan.frame_bytes()),
            payload: Vec::with_capacity(plan.payload_bytes),
            resend: Vec::with_capacity(plan.frames_per_send),
        }
    }
}

/// One lane's frames awaiting answers.
pub struct Lane {
    pub index: usize,
    pub tracker: Tracker,
}

impl Lane {
    pub fn new(index: usize, tracker: Tracker) -> Lane {
        Lane { index, tracker }
    }

    /// Encodes one scheduled send into `scratch.bytes`: `frames_per_send` frames, each a copy
    /// with probability `dup_ratio` (when a usable one exists) or else a fresh event, each
    /// registered before it leaves so no ack can arrive for an unknown frame. `sent_ns` is when
    /// the engine hands it to the kernel (it arms the answer timeout).
    pub fn fill_scheduled(
        &mut self,
        shared: &Shared<'_>,
        rng: &mut impl Rng,
        intended_ns: u64,
        sent_ns: u64,
        scratch: &mut Scratch,
    ) {
        scratch.bytes.clear();
        let plan = shared.plan;
        let client_time_us = unix_now_us();
        let (mut frames, mut copies) = (0u64, 0u64);
        for _ in 0..plan.frames_per_send {
            let copy = if rng.gen_bool(plan.dup_ratio) {
                let tracker = &self.tracker;
                shared.events.copy(rng, self.index, |id| !tracker.is_outstanding(id))
            } else {
                None
            };
            let event = match copy {
                Some(event) => event,
                None => shared.events.fresh(rng, self.index, client_time_us),
            };
            // Fresh ids are new and copies were drawn as usable, so only a full table refuses a
            // frame: it is shed, not sent, and the tracker counts it lost.
            if self.tracker.register(event, intended_ns, sent_ns).is_ok() {
                events::encode(&event, plan.payload_bytes, &mut scratch.payload, &mut scratch.bytes);
                frames += 1;
                copies += u64::from(copy.is_some());
            }
        }
        Counters::add(&shared.counters.sent, frames);
        Counters::add(&shared.counters.copies, copies);
    }

    /// Encodes into `scratch.bytes` up to `frames_per_send` frames whose retry delay or answer
    /// timeout has passed by `now_ns`, packed like first sends. Returns false when none is due.
    pub fn fill_resends(&mut self, shared: &Shared<'_>, now_ns: u64, scratch: &mut Scratch) -> bool {
        scratch.resend.clear();
        self.tracker
            .take_due(now_ns, shared.plan.frames_per_send, &mut scratch.resend);
        if scratch.resend.is_empty() {
            return false;
        }
        scratch.bytes.clear();
        for event in &scratch.resend {
            events::encode(
                event,
                shared.plan.payload_bytes,
                &mut scratch.payload,
                &mut scratch.bytes,
            );
        }
        Counters::add(&shared.counters.resent, scratch.resend.len() as u64);
        true
    }

    /// Applies every whole ack at the front of `bytes`, as received at `arrived_ns`, and
    /// returns how many bytes that was; a trailing part shorter than an ack is left to the
    /// caller. An invalid ack is counted and skipped: acks are fixed-size, so the next one
    /// still starts 28 bytes further.
    pub fn absorb_acks(&mut self, counters: &Counters, bytes: &[u8], arrived_ns: u64) -> usize {
        let whole_bytes = bytes.len() - bytes.len() % ACK_BYTES;
        for chunk in bytes[..whole_bytes].chunks_exact(ACK_BYTES) {
            let Ok(ack) = decode_ack(chunk) else {
                Counters::add(&counters.malformed_acks, 1);
                continue;
            };
            counters.answered(ack.status);
            match self.tracker.on_ack(ack, arrived_ns) {
                Fate::Stored | Fate::Rejected => Counters::add(&counters.resolved, 1),
                // The resend is armed in the tracker; the engine looks at timers every slice.
                Fate::Retrying => {}
                Fate::Unmatched => Counters::add(&counters.unmatched_acks, 1),
            }
        }
        whole_bytes
    }
}

/// Unix time in microseconds: the frames' client_time_us.
pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::input;
    use crate::tracker::ANSWER_TIMEOUT_NS;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use shardgate_proto::frame::{encode_ack, parse, EventId, Status};

    fn ids_in(bytes: &[u8], frame_bytes: usize) -> Vec<EventId> {
        bytes
            .chunks(frame_bytes)
            .map(|frame| parse(frame).unwrap().id)
            .collect()
    }

    // A scheduled send registers its frames; acks resolve them, whatever garbage sits between;
    // a timeout resends exactly the frames still awaited.
    #[test]
    fn send_ack_and_resend() {
        let plan = Plan::new(crate::plan::PlanInput {
            frames_per_datagram: 3,
            dup_ratio: 0.0,
            ..input()
        })
        .unwrap();
        let (events, counters) = (EventSource::new(plan.players, 1_000), Counters::default());
        let shared = Shared {
            plan: &plan,
            events: &events,
            counters: &counters,
        };
        let mut lane = Lane::new(0, Tracker::new(8, 0));
        let mut scratch = Scratch::new(&plan);
        let mut rng = StdRng::seed_from_u64(3);
        lane.fill_scheduled(&shared, &mut rng, 0, 10, &mut scratch);
        let sent = ids_in(&scratch.bytes, plan.frame_bytes());
        assert_eq!((sent.len(), lane.tracker.outstanding()), (3, 3));

        let mut reply = encode_ack(Status::Accepted, sent[0]).to_vec();
        reply.extend_from_slice(&[0xFF; ACK_BYTES]);
        reply.extend_from_slice(&encode_ack(Status::Duplicate, sent[2]));
        reply.extend_from_slice(&[1, 2, 3]);
        assert_eq!(lane.absorb_acks(&counters, &reply, 1_000), 3 * ACK_BYTES);
        let tally = counters.tally();
        assert_eq!(
            (tally.accepted, tally.duplicate, tally.resolved, tally.malformed_acks),
            (1, 1, 2, 1)
        );

        assert!(!lane.fill_resends(&shared, ANSWER_TIMEOUT_NS, &mut scratch));
        assert!(lane.fill_resends(&shared, ANSWER_TIMEOUT_NS + 10, &mut scratch));
        assert_eq!(ids_in(&scratch.bytes, plan.frame_bytes()), vec![sent[1]]);
        assert_eq!(counters.tally().resent, 1);
    }
}
