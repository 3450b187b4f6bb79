//! Microbenchmarks of the codec's hot path: what one received frame costs to decode
//! (`check` then `parse`), what a client pays to encode one, and what an ack costs the server.
//! The 64-byte payload stands in for a typical game action. Auth verification is measured too,
//! since with auth on it runs once per frame and dwarfs the rest.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardgate::wire::auth;
use shardgate::wire::frame::{
    check, decode_ack, encode_ack, encode_action, parse, ActionFields, EventId, Status, FRAME_BYTES_MAX,
};

const PAYLOAD_BYTES: usize = 64;

fn fields(payload: &[u8]) -> ActionFields<'_> {
    ActionFields {
        id: EventId {
            player_id: 0x0102_0304_0506_0708,
            seq: 42,
        },
        client_time_us: 1_700_000_000_000_000,
        action_type: 7,
        payload,
    }
}

fn payload() -> [u8; PAYLOAD_BYTES] {
    std::array::from_fn(|index| index as u8)
}

// Decode as the intake does it: find the boundary, then verify the whole frame.
fn bench_decode(criterion: &mut Criterion) {
    let payload = payload();
    let mut frame = Vec::new();
    encode_action(&fields(&payload), &mut frame);
    let mut group = criterion.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_64", |bencher| {
        bencher.iter(|| {
            let buf = black_box(&frame[..]);
            let header = check(buf).expect("bench frame checks");
            let action = parse(&buf[..header.frame_bytes]).expect("bench frame parses");
            black_box(action.id)
        })
    });
    group.finish();
}

// Encode into a reused buffer, as the load generator does.
fn bench_encode(criterion: &mut Criterion) {
    let payload = payload();
    let fields = fields(&payload);
    let mut out = Vec::with_capacity(FRAME_BYTES_MAX);
    let mut group = criterion.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_64", |bencher| {
        bencher.iter(|| {
            out.clear();
            encode_action(black_box(&fields), &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

// The server writes one ack per frame; the client decodes it.
fn bench_ack(criterion: &mut Criterion) {
    let id = EventId { player_id: 77, seq: 9 };
    let ack = encode_ack(Status::Accepted, id);
    let mut group = criterion.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_ack", |bencher| {
        bencher.iter(|| encode_ack(black_box(Status::Accepted), black_box(id)))
    });
    group.bench_function("decode_ack", |bencher| bencher.iter(|| decode_ack(black_box(&ack[..]))));
    group.finish();
}

// With auth on, every frame also pays one HMAC-SHA256 over its header and payload.
fn bench_auth_verify(criterion: &mut Criterion) {
    let payload = payload();
    let player_key = auth::player_key(b"bench-secret", 0x0102_0304_0506_0708);
    let mut frame = Vec::new();
    shardgate::wire::frame::encode_action_signed(&fields(&payload), &player_key, &mut frame);
    let action = parse(&frame).expect("bench frame parses");
    let tag = action.auth_tag.expect("signed frame has a tag");
    let mut group = criterion.benchmark_group("auth");
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify_64", |bencher| {
        bencher.iter(|| auth::verify(black_box(&player_key), black_box(action.signed), tag))
    });
    group.bench_function("player_key", |bencher| {
        bencher.iter(|| auth::player_key(black_box(b"bench-secret"), black_box(77)))
    });
    group.finish();
}

criterion_group!(benches, bench_decode, bench_encode, bench_ack, bench_auth_verify);
criterion_main!(benches);
