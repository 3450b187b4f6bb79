//! One lane (a UDP socket or a TCP connection): its paced sender loop and its ack handling.
//!
//! The transports (`udp.rs`, `tcp.rs`) only move bytes; everything a lane decides lives here
//! and is the same for both: which event each scheduled frame carries, when to resend, and
//! what an ack means.
//!
//! The sender thread owns the lane's socket for writing; the receiver thread reads acks and
//! applies them to the lane's tracker. The tracker is behind a mutex that both take briefly:
//! the sender once per send (registering its frames before they leave, so an ack can never
//! arrive for a frame not yet known), the receiver once per reply.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use shardgate::frame::{decode_ack, ACK_BYTES};

use crate::events::{self, Event, EventSource};
use crate::live::Counters;
use crate::plan::Plan;
use crate::schedule::{Clock, Schedule};
use crate::tracker::{Fate, Tracker};

/// Longest the sender sleeps without looking at the clock: bounds how late it notices the end.
const PARK_MAX: Duration = Duration::from_millis(20);
/// Sleep while a TCP lane holds bytes the socket would not take yet.
const PARK_PENDING: Duration = Duration::from_millis(1);

/// How a lane's bytes leave.
pub trait Transmit {
    /// Sends one datagram (UDP) or one write (TCP) of whole frames. An error loses the bytes;
    /// their frames are resent when their timeout passes.
    fn transmit(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// Pushes out bytes held back by backpressure. Nothing to do for UDP.
    fn flush_pending(&mut self) {}

    /// True while bytes are held back.
    fn has_pending(&self) -> bool {
        false
    }
}

/// What every lane shares.
pub struct Shared {
    pub plan: Plan,
    pub schedule: Schedule,
    pub clock: Clock,
    pub events: EventSource,
    pub counters: Arc<Counters>,
}

/// One lane's state, shared by its sender and receiver threads.
pub struct Lane {
    pub index: usize,
    tracker: Mutex<Tracker>,
    /// Set by the sender when it stops: the receiver then stops too.
    pub finished: AtomicBool,
}

impl Lane {
    pub fn new(index: usize, tracker: Tracker) -> Lane {
        Lane {
            index,
            tracker: Mutex::new(tracker),
            finished: AtomicBool::new(false),
        }
    }

    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // Every tracker operation leaves it consistent before it could panic, so a poisoned
        // lock still holds usable state.
        self.tracker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Buffers a sender reuses for every send.
struct Scratch {
    bytes: Vec<u8>,
    payload: Vec<u8>,
    resend: Vec<Event>,
}

/// Sends the lane's share of the schedule, and resends, until every frame is answered after
/// the schedule ended or the run's end (schedule plus grace) is reached.
pub fn send_loop(shared: &Shared, lane: &Lane, transmit: &mut impl Transmit) {
    let (schedule, clock) = (&shared.schedule, &shared.clock);
    let mut rng = rand::thread_rng();
    let mut scratch = Scratch {
        bytes: Vec::with_capacity(shared.plan.frames_per_send * shared.plan.frame_bytes()),
        payload: Vec::with_capacity(shared.plan.payload_bytes),
        resend: Vec::with_capacity(shared.plan.frames_per_send),
    };
    let mut send_index = schedule.first_send_of(lane.index);
    loop {
        let now_ns = clock.now_ns();
        if now_ns >= schedule.end_ns {
            break;
        }
        let schedule_open = |send_index: u64| schedule.is_scheduled(send_index) && now_ns < schedule.duration_ns;
        // Behind schedule: every due send goes now, none is skipped (open loop).
        while schedule_open(send_index) && schedule.intended_ns(send_index) <= now_ns {
            send_scheduled(
                shared,
                lane,
                transmit,
                &mut rng,
                schedule.intended_ns(send_index),
                &mut scratch,
            );
            send_index = schedule.next_send_of_lane(send_index);
        }
        resend_due(shared, lane, transmit, now_ns, &mut scratch);
        transmit.flush_pending();

        let next_send_ns = if schedule_open(send_index) {
            schedule.intended_ns(send_index)
        } else {
            let tracker = lane.tracker();
            if tracker.outstanding() == 0 {
                break;
            }
            u64::MAX
        };
        let next_timer_ns = lane.tracker().next_due_ns().unwrap_or(u64::MAX);
        let longest = if transmit.has_pending() { PARK_PENDING } else { PARK_MAX };
        clock.park_until(next_send_ns.min(next_timer_ns).min(schedule.end_ns), longest);
    }
    lane.finished.store(true, Ordering::Relaxed);
}

/// One scheduled send: `frames_per_send` frames, each a copy with probability `dup_ratio`
/// (when a usable one exists) or else a fresh event.
fn send_scheduled(
    shared: &Shared,
    lane: &Lane,
    transmit: &mut impl Transmit,
    rng: &mut impl Rng,
    intended_ns: u64,
    scratch: &mut Scratch,
) {
    scratch.bytes.clear();
    let client_time_us = unix_now_us();
    let (mut frames, mut copies) = (0u64, 0u64);
    {
        let mut tracker = lane.tracker();
        let sent_ns = shared.clock.now_ns();
        for _ in 0..shared.plan.frames_per_send {
            let copy = if rng.gen_bool(shared.plan.dup_ratio) {
                shared.events.copy(rng, lane.index, |id| !tracker.is_outstanding(id))
            } else {
                None
            };
            let event = match copy {
                Some(event) => event,
                None => shared.events.fresh(rng, lane.index, client_time_us),
            };
            // Registration cannot fail: fresh ids are new and copies were drawn as usable.
            if tracker.register(event, intended_ns, sent_ns) {
                events::encode(
                    &event,
                    shared.plan.payload_bytes,
                    &mut scratch.payload,
                    &mut scratch.bytes,
                );
                frames += 1;
                copies += u64::from(copy.is_some());
            }
        }
    }
    Counters::add(&shared.counters.sent, frames);
    Counters::add(&shared.counters.copies, copies);
    if transmit.transmit(&scratch.bytes).is_err() {
        Counters::add(&shared.counters.send_errors, 1);
    }
}

/// Resends every frame whose retry delay or answer timeout has passed, packed like first sends.
fn resend_due(shared: &Shared, lane: &Lane, transmit: &mut impl Transmit, now_ns: u64, scratch: &mut Scratch) {
    loop {
        scratch.resend.clear();
        lane.tracker()
            .take_due(now_ns, shared.plan.frames_per_send, &mut scratch.resend);
        if scratch.resend.is_empty() {
            return;
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
        if transmit.transmit(&scratch.bytes).is_err() {
            Counters::add(&shared.counters.send_errors, 1);
        }
    }
}

/// Applies every whole ack at the front of `bytes` and returns how many bytes that was; a
/// trailing part shorter than an ack is left to the caller. An invalid ack is counted and
/// skipped: acks are fixed-size, so the next one still starts 28 bytes further.
pub fn absorb_acks(shared: &Shared, lane: &Lane, sender: &Thread, bytes: &[u8]) -> usize {
    let whole_bytes = bytes.len() - bytes.len() % ACK_BYTES;
    if whole_bytes == 0 {
        return 0;
    }
    let counters = &shared.counters;
    let now_ns = shared.clock.now_ns();
    let mut wake_sender = false;
    let mut tracker = lane.tracker();
    for chunk in bytes[..whole_bytes].chunks_exact(ACK_BYTES) {
        let Ok(ack) = decode_ack(chunk) else {
            Counters::add(&counters.malformed_acks, 1);
            continue;
        };
        counters.answered(ack.status);
        match tracker.on_ack(ack, now_ns) {
            Fate::Stored | Fate::Rejected => Counters::add(&counters.resolved, 1),
            Fate::Retrying => wake_sender = true,
            Fate::Unmatched => Counters::add(&counters.unmatched_acks, 1),
        }
    }
    drop(tracker);
    if wake_sender {
        // The resend may be due before the sender's planned wake-up.
        sender.unpark();
    }
    whole_bytes
}

/// Unix time in microseconds: the frames' client_time_us.
pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
