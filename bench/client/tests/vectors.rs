//! The protocol's test vectors (docs/protocol.md), checked through the codec as compiled into
//! this crate, and through the client itself: what it puts on the wire is the vector, byte for
//! byte, signed one included.

mod support;

use std::time::Duration;

use shardgate_client::frame::{
    decode_ack, encode_action, encode_action_signed, Ack, ActionFields, EventId, Status, ACK_BYTES,
};
use shardgate_client::{auth, Client, Event, Outcome};
use support::{hex, resolve, Answer, FakeServer, Style};

const VECTOR_1_EMPTY: &str = "5347010100000000010000000000000001000000000000000000000000000000000000005f487c5d";
const VECTOR_2_DIG: &str = "5347010100000b0008070605040302012a0000000000000000401e18240a06000700\
                            00006469673a783d332c793d39e8afc833";
const VECTOR_3_LOOT_SIGNED: &str = "53470101010004004d0000000000000009000000000000007b00000000000000\
                                    030000006c6f6f74c3ca4091825c1897ea3dd51ed4b0ac265499df7d";
const VECTOR_3_SECRET: &[u8] = b"gala-secret";
const VECTOR_3_PLAYER_KEY: &str = "affdb83077351dd9b88efcda1ef8f2a85b74923299c4e52418e00f23cbcc5f99";
const VECTOR_ACK_ACCEPTED: &str = "534701020000000001000000000000000100000000000000bb9dfb71";
const VECTOR_ACK_DUPLICATE: &str = "534701020100000008070605040302012a000000000000001612c88a";

fn vector_1() -> Event<'static> {
    Event {
        player_id: 1,
        seq: 1,
        client_time_us: 0,
        action_type: 0,
        payload: b"",
    }
}

fn vector_2() -> Event<'static> {
    Event {
        player_id: 0x0102_0304_0506_0708,
        seq: 42,
        client_time_us: 1_700_000_000_000_000,
        action_type: 7,
        payload: b"dig:x=3,y=9",
    }
}

fn vector_3() -> Event<'static> {
    Event {
        player_id: 77,
        seq: 9,
        client_time_us: 123,
        action_type: 3,
        payload: b"loot",
    }
}

fn fields<'a>(event: &Event<'a>) -> ActionFields<'a> {
    ActionFields {
        id: EventId {
            player_id: event.player_id,
            seq: event.seq,
        },
        client_time_us: event.client_time_us,
        action_type: event.action_type,
        payload: event.payload,
    }
}

// Vectors 1 and 2 encode byte for byte with the included codec.
#[test]
fn unsigned_vectors_encode_exactly() {
    for (event, expected) in [(vector_1(), VECTOR_1_EMPTY), (vector_2(), VECTOR_2_DIG)] {
        let mut frame = Vec::new();
        encode_action(&fields(&event), &mut frame);
        assert_eq!(frame, hex(expected));
    }
}

// Vector 3: the per-player key from secret "gala-secret", and the signed frame with its tag.
#[test]
fn signed_vector_3_encodes_exactly() {
    let key = auth::player_key(VECTOR_3_SECRET, 77);
    assert_eq!(key.to_vec(), hex(VECTOR_3_PLAYER_KEY));
    let mut frame = Vec::new();
    encode_action_signed(&fields(&vector_3()), &key, &mut frame);
    assert_eq!(frame, hex(VECTOR_3_LOOT_SIGNED));
}

// The two ack vectors decode to the status and id they name.
#[test]
fn ack_vectors_decode() {
    assert_eq!(
        decode_ack(&hex(VECTOR_ACK_ACCEPTED)),
        Ok(Ack {
            status: Status::Accepted,
            id: EventId { player_id: 1, seq: 1 }
        })
    );
    let duplicate = hex(VECTOR_ACK_DUPLICATE);
    assert_eq!(duplicate.len(), ACK_BYTES);
    assert_eq!(
        decode_ack(&duplicate),
        Ok(Ack {
            status: Status::Duplicate,
            id: EventId {
                player_id: 0x0102_0304_0506_0708,
                seq: 42
            }
        })
    );
}

// The client puts exactly the vectors on the wire: unsigned without a secret, vector 3 with one.
#[test]
fn client_sends_the_vectors_byte_for_byte() {
    let server = FakeServer::udp(|_, _| Answer::Ack(Status::Accepted), Style::default());

    let mut unsigned = Client::connect(support::config(&server)).expect("connect");
    unsigned.send(&vector_1()).expect("send vector 1");
    unsigned.send(&vector_2()).expect("send vector 2");
    let resolved = resolve(&mut unsigned, 2, Duration::from_secs(5));
    assert!(resolved
        .iter()
        .all(|resolution| resolution.outcome == Outcome::Stored { first: true }));

    let mut config = support::config(&server);
    config.auth_secret = Some(VECTOR_3_SECRET.to_vec());
    let mut signed = Client::connect(config).expect("connect");
    signed.send(&vector_3()).expect("send vector 3");
    resolve(&mut signed, 1, Duration::from_secs(5));

    let log = server.log();
    assert_eq!(
        log.frames,
        [hex(VECTOR_1_EMPTY), hex(VECTOR_2_DIG), hex(VECTOR_3_LOOT_SIGNED)]
    );
    assert_eq!(log.bad_frames, 0);
}
