//! The hot path does not allocate: decoding a frame, the per-source rate
//! limit, the dedup lookups and inserts, encoding acks, and adding an event to
//! a batch, checked with a counting global allocator over many thousands of
//! operations.

use std::time::Instant;

use shardgate::intake::limiter::SourceLimiter;
use shardgate::intake::source::SourceKey;
use shardgate::pipeline::answer::{Route, UdpReply};
use shardgate::pipeline::batch::Batch;
use shardgate::pipeline::dedup::new_cache;
use shardgate::sys::{thread_allocations, CountingAllocator};
use shardgate::wire::frame::{check, encode_ack, encode_action, parse, ActionFields, EventId, Status};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Allocations made by this thread's test body are what we count (`thread_allocations`): the
/// test harness prints from its own thread meanwhile, which a process-wide count saw now and then.
fn allocations_during(work: impl FnOnce()) -> u64 {
    let (before, _) = thread_allocations();
    work();
    thread_allocations().0 - before
}

fn prime(batch: &mut Batch, frames: &[u8]) {
    let header = check(frames).expect("valid frames");
    let action = parse(&frames[..header.frame_bytes]).expect("valid frames");
    batch.push(
        &action,
        0,
        1,
        Route::Datagram("127.0.0.1:9".parse().unwrap()),
        Instant::now(),
    );
    drop(batch.take_blob());
    batch.finish();
    assert!(batch.try_release(), "the primed blob's buffer comes back");
}

// Decode, the rate limit, dedup, ack encoding and batching of 20 000 events make zero heap allocations.
#[test]
fn hot_path_makes_no_allocations() {
    const EVENTS: u64 = 20_000;
    let payload = [7u8; 64];
    let mut frames = Vec::with_capacity(EVENTS as usize * 104);
    for seq in 0..EVENTS {
        let fields = ActionFields {
            id: EventId {
                player_id: seq % 997,
                seq,
            },
            client_time_us: seq,
            action_type: 3,
            payload: &payload,
        };
        encode_action(&fields, &mut frames);
    }
    let (mut writer, reader) = new_cache(1 << 16);
    let batch_events_max = 256;
    let mut batch = Batch::new(batch_events_max);
    // The first send turns the blob buffer into a shared one (one allocation per batch, at start).
    prime(&mut batch, &frames);
    let route = Route::Datagram("127.0.0.1:9".parse().unwrap());
    let destination = "127.0.0.1:9".parse().unwrap();
    let mut reply = UdpReply::default();
    let received_at = Instant::now();
    let mut acks_checksum = 0u64;
    // Allocated at shard start; 997 sources, most of them new to the table at first.
    let mut limiter = SourceLimiter::new(1024, 1_000_000, 1_000_000);
    let mut limited = 0u64;

    let allocations = allocations_during(|| {
        let mut offset = 0;
        while offset < frames.len() {
            let header = check(&frames[offset..]).expect("valid frames");
            let source = SourceKey::of(std::net::Ipv4Addr::from(header.id.player_id as u32).into());
            if !limiter.admit(source, received_at) {
                limited += 1;
            }
            let action = parse(&frames[offset..offset + header.frame_bytes]).expect("valid frames");
            offset += header.frame_bytes;
            if writer.contains(action.id) || reader.contains(action.id) {
                continue;
            }
            batch.push(
                &action,
                (action.id.player_id % 16) as u32,
                1,
                route.clone(),
                received_at,
            );
            writer.insert(action.id);
            if !reply.accepts(destination) {
                acks_checksum += reply.take().map(|(_, bytes)| bytes.len() as u64).unwrap_or(0);
            }
            reply.push(destination, Status::Accepted, action.id);
            acks_checksum += u64::from(encode_ack(Status::Duplicate, action.id)[4]);
            if batch.is_full() {
                // What a send does: lend the blob to the Redis client, get it back after the call.
                let blob = batch.take_blob();
                acks_checksum += blob.len() as u64;
                drop(blob);
                batch.finish();
                assert!(
                    batch.try_release(),
                    "the blob's buffer comes back once the client dropped it"
                );
            }
        }
    });
    assert_eq!(
        allocations, 0,
        "the hot path allocated {allocations} times for {EVENTS} events"
    );
    assert!(acks_checksum > 0, "the loop did its work");
    assert_eq!(limited, 0, "every source stayed within its bucket");
    // Every event was new, so each was added once (a full bucket may have evicted a few).
    assert_eq!(writer.len_events() as u64 + writer.evictions_total(), EVENTS);
}
