//! The wire contract, checked from outside the crate: every test vector of the protocol
//! byte for byte in both directions, one test per error variant, and property tests that
//! the codec round trips, never panics, and never takes damaged or cut frames for good ones.

use proptest::prelude::*;
use shardgate::wire::auth;
use shardgate::wire::frame::{
    check, crc, decode_ack, encode_ack, encode_action, encode_action_signed, parse, Ack, AckError, Action,
    ActionFields, CheckError, EventId, Header, RejectReason, Status, ACK_BYTES, AUTH_TAG_BYTES, FLAG_AUTH,
    FRAME_BYTES_MAX, FRAME_BYTES_MIN, HEADER_BYTES, PAYLOAD_BYTES_MAX,
};

const VECTOR_1_EMPTY: &str = "5347010100000000010000000000000001000000000000000000000000000000000000005f487c5d";
const VECTOR_2_DIG: &str = "5347010100000b0008070605040302012a0000000000000000401e18240a06000700\
                            00006469673a783d332c793d39e8afc833";
const VECTOR_3_LOOT_SIGNED: &str = "53470101010004004d0000000000000009000000000000007b00000000000000\
                                    030000006c6f6f74c3ca4091825c1897ea3dd51ed4b0ac265499df7d";
const VECTOR_3_SECRET: &[u8] = b"gala-secret";
const VECTOR_3_PLAYER_KEY: &str = "affdb83077351dd9b88efcda1ef8f2a85b74923299c4e52418e00f23cbcc5f99";
const VECTOR_ACK_ACCEPTED: &str = "534701020000000001000000000000000100000000000000bb9dfb71";
const VECTOR_ACK_DUPLICATE: &str = "534701020100000008070605040302012a000000000000001612c88a";

const SOME_ID: EventId = EventId { player_id: 3, seq: 4 };

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "hex text has an odd length");
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&text[index..index + 2], 16).expect("valid hex"))
        .collect()
}

fn vector_1_fields() -> ActionFields<'static> {
    ActionFields {
        id: EventId { player_id: 1, seq: 1 },
        client_time_us: 0,
        action_type: 0,
        payload: b"",
    }
}

fn vector_2_fields() -> ActionFields<'static> {
    ActionFields {
        id: EventId {
            player_id: 0x0102_0304_0506_0708,
            seq: 42,
        },
        client_time_us: 1_700_000_000_000_000,
        action_type: 7,
        payload: b"dig:x=3,y=9",
    }
}

fn vector_3_fields() -> ActionFields<'static> {
    ActionFields {
        id: EventId { player_id: 77, seq: 9 },
        client_time_us: 123,
        action_type: 3,
        payload: b"loot",
    }
}

fn encoded(fields: &ActionFields<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_action(fields, &mut out);
    out
}

fn encoded_signed(fields: &ActionFields<'_>, player_key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_action_signed(fields, player_key, &mut out);
    out
}

/// Rewrites the trailing crc so that a deliberately edited frame gets past the crc check.
fn reseal(frame: &mut [u8]) {
    let covered_bytes = frame.len() - 4;
    let checksum = crc(&frame[..covered_bytes]);
    frame[covered_bytes..].copy_from_slice(&checksum.to_le_bytes());
}

fn assert_action_matches(action: &Action<'_>, fields: &ActionFields<'_>) {
    assert_eq!(action.id, fields.id);
    assert_eq!(action.client_time_us, fields.client_time_us);
    assert_eq!(action.action_type, fields.action_type);
    assert_eq!(action.payload, fields.payload);
}

// ---- test vectors ----

// The crc32c check value in the protocol's preamble holds.
#[test]
fn crc32c_check_value() {
    assert_eq!(crc(b"123456789"), 0xE306_9283);
}

// Vector 1 (empty payload) encodes to exactly its bytes.
#[test]
fn vector_1_encodes() {
    assert_eq!(encoded(&vector_1_fields()), hex(VECTOR_1_EMPTY));
}

// Vector 1 checks and parses back to its fields.
#[test]
fn vector_1_decodes() {
    let frame = hex(VECTOR_1_EMPTY);
    assert_eq!(frame.len(), 40);
    let header = check(&frame).expect("vector 1 checks");
    assert_eq!(header.frame_bytes, 40);
    let action = parse(&frame).expect("vector 1 parses");
    assert_action_matches(&action, &vector_1_fields());
    assert_eq!(action.auth_tag, None);
    assert_eq!(action.signed, &frame[..HEADER_BYTES]);
}

// Vector 2 (11-byte payload) encodes to exactly its bytes.
#[test]
fn vector_2_encodes() {
    assert_eq!(encoded(&vector_2_fields()), hex(VECTOR_2_DIG));
}

// Vector 2 checks and parses back to its fields.
#[test]
fn vector_2_decodes() {
    let frame = hex(VECTOR_2_DIG);
    assert_eq!(frame.len(), 51);
    assert_eq!(
        check(&frame),
        Ok(Header {
            id: vector_2_fields().id,
            frame_bytes: 51
        })
    );
    let action = parse(&frame).expect("vector 2 parses");
    assert_action_matches(&action, &vector_2_fields());
    assert_eq!(action.auth_tag, None);
}

// Vector 3's per-player key derives from the secret as documented.
#[test]
fn vector_3_player_key() {
    let player_key = auth::player_key(VECTOR_3_SECRET, 77);
    assert_eq!(player_key.to_vec(), hex(VECTOR_3_PLAYER_KEY));
}

// Vector 3 (signed) encodes to exactly its bytes, tag included.
#[test]
fn vector_3_encodes() {
    let player_key = auth::player_key(VECTOR_3_SECRET, 77);
    assert_eq!(
        encoded_signed(&vector_3_fields(), &player_key),
        hex(VECTOR_3_LOOT_SIGNED)
    );
}

// Vector 3 parses, its tag covers offset 0 to the end of the payload, and verifies.
#[test]
fn vector_3_decodes_and_verifies() {
    let frame = hex(VECTOR_3_LOOT_SIGNED);
    assert_eq!(frame.len(), 60);
    assert_eq!(check(&frame).map(|header| header.frame_bytes), Ok(60));
    let action = parse(&frame).expect("vector 3 parses");
    assert_action_matches(&action, &vector_3_fields());
    assert_eq!(action.signed, &frame[..40]);
    let tag = action.auth_tag.expect("vector 3 carries a tag");
    assert_eq!(&tag[..], &frame[40..56]);
    let player_key = auth::player_key(VECTOR_3_SECRET, 77);
    assert_eq!(&auth::tag(&player_key, action.signed), tag);
    assert!(auth::verify(&player_key, action.signed, tag));
    assert!(!auth::verify(
        &auth::player_key(b"other-secret", 77),
        action.signed,
        tag
    ));
}

// The ACCEPTED ack vector encodes and decodes byte for byte.
#[test]
fn vector_ack_accepted() {
    let id = EventId { player_id: 1, seq: 1 };
    let bytes = hex(VECTOR_ACK_ACCEPTED);
    assert_eq!(encode_ack(Status::Accepted, id).to_vec(), bytes);
    assert_eq!(
        decode_ack(&bytes),
        Ok(Ack {
            status: Status::Accepted,
            id
        })
    );
}

// The DUPLICATE ack vector encodes and decodes byte for byte.
#[test]
fn vector_ack_duplicate() {
    let id = EventId {
        player_id: 0x0102_0304_0506_0708,
        seq: 42,
    };
    let bytes = hex(VECTOR_ACK_DUPLICATE);
    assert_eq!(encode_ack(Status::Duplicate, id).to_vec(), bytes);
    assert_eq!(
        decode_ack(&bytes),
        Ok(Ack {
            status: Status::Duplicate,
            id
        })
    );
}

// ---- CheckError variants ----

// A valid prefix shorter than the header is HeaderIncomplete; a short prefix that is already wrong is Unparseable.
#[test]
fn check_header_incomplete() {
    let frame = hex(VECTOR_2_DIG);
    assert_eq!(check(&[]), Err(CheckError::HeaderIncomplete));
    for length in 1..HEADER_BYTES {
        assert_eq!(
            check(&frame[..length]),
            Err(CheckError::HeaderIncomplete),
            "prefix of {length} bytes"
        );
    }
    assert_eq!(check(&[0xFF; 10]), Err(CheckError::Unparseable));
    assert_eq!(check(b"S"), Err(CheckError::HeaderIncomplete));
    assert_eq!(check(b"SX"), Err(CheckError::Unparseable));
    assert_eq!(check(&[b'S', b'G', 2]), Err(CheckError::Unparseable));
    assert_eq!(check(&[b'S', b'G', 1, 2]), Err(CheckError::Unparseable));
}

// A whole header with a cut body is FrameIncomplete carrying the id and the full length.
#[test]
fn check_frame_incomplete() {
    let frame = hex(VECTOR_2_DIG);
    let expected = Header {
        id: vector_2_fields().id,
        frame_bytes: 51,
    };
    assert_eq!(
        check(&frame[..HEADER_BYTES]),
        Err(CheckError::FrameIncomplete(expected))
    );
    assert_eq!(check(&frame[..50]), Err(CheckError::FrameIncomplete(expected)));
}

// The auth flag adds the tag's 16 bytes to the length check expects.
#[test]
fn check_counts_the_auth_tag() {
    let frame = hex(VECTOR_3_LOOT_SIGNED);
    assert_eq!(frame[4], FLAG_AUTH);
    match check(&frame[..44]) {
        Err(CheckError::FrameIncomplete(header)) => assert_eq!(header.frame_bytes, 60),
        other => panic!("expected FrameIncomplete, got {other:?}"),
    }
}

// Wrong magic, version or kind are Unparseable whatever follows.
#[test]
fn check_unparseable() {
    for (offset, value) in [(0, b'X'), (1, b'X'), (2, 0), (2, 2), (3, 0), (3, 2)] {
        let mut frame = hex(VECTOR_1_EMPTY);
        frame[offset] = value;
        reseal(&mut frame);
        assert_eq!(check(&frame), Err(CheckError::Unparseable), "offset {offset}");
    }
}

// An ack is not an ACTION frame: kind 2 is Unparseable for check.
#[test]
fn check_rejects_an_ack() {
    let mut buf = encode_ack(Status::Accepted, SOME_ID).to_vec();
    buf.resize(FRAME_BYTES_MIN, 0);
    assert_eq!(check(&buf), Err(CheckError::Unparseable));
}

// payload_len over 1024 is PayloadTooLong with the id to reject, at 1024 it is fine.
#[test]
fn check_payload_too_long() {
    let mut frame = hex(VECTOR_2_DIG);
    frame[6..8].copy_from_slice(&1025u16.to_le_bytes());
    assert_eq!(check(&frame), Err(CheckError::PayloadTooLong(vector_2_fields().id)));
    frame[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(check(&frame), Err(CheckError::PayloadTooLong(vector_2_fields().id)));
    frame[6..8].copy_from_slice(&1024u16.to_le_bytes());
    assert!(matches!(check(&frame), Err(CheckError::FrameIncomplete(_))));
}

// check reports only the first frame of a buffer holding several, so a datagram can be walked.
#[test]
fn check_walks_back_to_back_frames() {
    let mut datagram = hex(VECTOR_1_EMPTY);
    datagram.extend(hex(VECTOR_2_DIG));
    datagram.extend(hex(VECTOR_3_LOOT_SIGNED));
    datagram.extend(&hex(VECTOR_1_EMPTY)[..10]);
    let mut rest = &datagram[..];
    let mut ids = Vec::new();
    let tail = loop {
        match check(rest) {
            Ok(header) => {
                let (frame, after) = rest.split_at(header.frame_bytes);
                ids.push(parse(frame).expect("each frame parses").id);
                rest = after;
            }
            Err(error) => break error,
        }
    };
    assert_eq!(ids, [vector_1_fields().id, vector_2_fields().id, vector_3_fields().id]);
    assert_eq!(tail, CheckError::HeaderIncomplete);
}

// The largest legal frame (1024-byte payload and a tag) is exactly FRAME_BYTES_MAX and parses.
#[test]
fn largest_frame_is_accepted() {
    let payload = [0xA5; PAYLOAD_BYTES_MAX];
    let fields = ActionFields {
        payload: &payload,
        ..vector_3_fields()
    };
    let frame = encoded_signed(&fields, &[7; 32]);
    assert_eq!(frame.len(), FRAME_BYTES_MAX);
    assert_eq!(check(&frame).map(|header| header.frame_bytes), Ok(FRAME_BYTES_MAX));
    assert_action_matches(&parse(&frame).expect("largest frame parses"), &fields);
}

// ---- RejectReason variants ----

// Any damage under the crc is Crc.
#[test]
fn parse_rejects_bad_crc() {
    let mut frame = hex(VECTOR_2_DIG);
    frame[40] ^= 0x20;
    assert_eq!(parse(&frame), Err(RejectReason::Crc));
    let mut frame = hex(VECTOR_2_DIG);
    let last = frame.len() - 1;
    frame[last] ^= 0x01;
    assert_eq!(parse(&frame), Err(RejectReason::Crc));
}

// A frame longer or shorter than its payload_len says is Length.
#[test]
fn parse_rejects_wrong_length() {
    let frame = hex(VECTOR_2_DIG);
    let mut longer = frame.clone();
    longer.push(0);
    assert_eq!(parse(&longer), Err(RejectReason::Length));
    assert_eq!(parse(&frame[..50]), Err(RejectReason::Length));
    assert_eq!(parse(&frame[..10]), Err(RejectReason::Length));
    let mut oversized = frame.clone();
    oversized[6..8].copy_from_slice(&2000u16.to_le_bytes());
    assert_eq!(parse(&oversized), Err(RejectReason::Length));
}

// Unknown flag bits and nonzero reserved bytes are Flags, even under a valid crc.
#[test]
fn parse_rejects_unknown_flags_and_reserved_bytes() {
    for (offset, value) in [(4, 0x02), (4, 0x80), (5, 1), (34, 1), (35, 0xFF)] {
        let mut frame = hex(VECTOR_2_DIG);
        frame[offset] = value;
        reseal(&mut frame);
        assert!(check(&frame).is_ok(), "offset {offset}: check looks only at the length");
        assert_eq!(parse(&frame), Err(RejectReason::Flags), "offset {offset}");
    }
}

// Bytes check calls Unparseable are Flags for parse, not a panic or a bogus Ok.
#[test]
fn parse_rejects_wrong_magic_as_flags() {
    let mut frame = hex(VECTOR_1_EMPTY);
    frame[2] = 2;
    reseal(&mut frame);
    assert_eq!(parse(&frame), Err(RejectReason::Flags));
}

// Auth failures (forged tag, wrong key, unsigned frame, stale time) are caught by auth, not parse.
#[test]
fn auth_rejects_forged_tags_and_stale_frames() {
    let player_key = auth::player_key(VECTOR_3_SECRET, 77);
    let mut frame = hex(VECTOR_3_LOOT_SIGNED);
    frame[45] ^= 0x01;
    reseal(&mut frame);
    let action = parse(&frame).expect("a forged tag still parses");
    let tag = action.auth_tag.expect("tag present");
    assert!(!auth::verify(&player_key, action.signed, tag));

    let unsigned = hex(VECTOR_2_DIG);
    assert_eq!(parse(&unsigned).expect("parses").auth_tag, None);

    let now_us = 1_700_000_000_000_000;
    assert!(auth::is_fresh(now_us - 300_000_000, now_us, 600));
    assert!(!auth::is_fresh(now_us - 300_000_001, now_us, 600));
    assert_eq!(RejectReason::Auth.name(), "auth");
}

// A tag copied onto another frame (changed payload) no longer verifies.
#[test]
fn auth_tag_binds_the_payload() {
    let player_key = auth::player_key(VECTOR_3_SECRET, 77);
    let mut frame = hex(VECTOR_3_LOOT_SIGNED);
    frame[36] = b'L';
    reseal(&mut frame);
    let action = parse(&frame).expect("parses");
    assert!(!auth::verify(&player_key, action.signed, action.auth_tag.expect("tag")));
}

// ---- ack errors and names ----

// decode_ack wants 28 bytes and ignores anything after them.
#[test]
fn decode_ack_lengths() {
    let bytes = hex(VECTOR_ACK_ACCEPTED);
    assert_eq!(decode_ack(&bytes[..ACK_BYTES - 1]), Err(AckError::Incomplete));
    assert_eq!(decode_ack(&[]), Err(AckError::Incomplete));
    let mut longer = bytes.clone();
    longer.extend(hex(VECTOR_ACK_DUPLICATE));
    assert_eq!(decode_ack(&longer).map(|ack| ack.status), Ok(Status::Accepted));
}

// Wrong magic, version, kind, reserved bytes, unknown status or bad crc are Invalid.
#[test]
fn decode_ack_invalid() {
    let good = hex(VECTOR_ACK_ACCEPTED);
    for (offset, value) in [(0, 0), (2, 2), (3, 1), (4, 4), (5, 1), (7, 1)] {
        let mut ack = good.clone();
        ack[offset] = value;
        reseal(&mut ack);
        assert_eq!(decode_ack(&ack), Err(AckError::Invalid), "offset {offset}");
    }
    let mut ack = good.clone();
    ack[10] ^= 1;
    assert_eq!(decode_ack(&ack), Err(AckError::Invalid));
}

// Every status round trips through an ack, and acks are smaller than any frame.
#[test]
fn every_status_round_trips() {
    let id = EventId {
        player_id: u64::MAX,
        seq: 0,
    };
    for status in Status::ALL {
        let ack = encode_ack(status, id);
        assert_eq!(ack.len(), ACK_BYTES);
        assert!(ack.len() < FRAME_BYTES_MIN);
        assert_eq!(decode_ack(&ack), Ok(Ack { status, id }));
    }
}

// Names and messages are lowercase, as logs and metric labels expect.
#[test]
fn names_and_messages_are_lowercase() {
    let names: Vec<String> = Status::ALL
        .iter()
        .map(|status| status.name().to_owned())
        .chain(RejectReason::ALL.iter().map(|reason| reason.name().to_owned()))
        .chain(RejectReason::ALL.iter().map(|reason| reason.to_string()))
        .chain(
            [
                CheckError::HeaderIncomplete,
                CheckError::FrameIncomplete(Header {
                    id: SOME_ID,
                    frame_bytes: 40,
                }),
                CheckError::Unparseable,
                CheckError::PayloadTooLong(SOME_ID),
            ]
            .iter()
            .map(|error| error.to_string()),
        )
        .chain(
            [AckError::Incomplete, AckError::Invalid]
                .iter()
                .map(|error| error.to_string()),
        )
        .collect();
    assert_eq!(
        &names[..8],
        [
            "accepted",
            "duplicate",
            "retry",
            "rejected",
            "crc",
            "length",
            "flags",
            "auth"
        ]
    );
    for name in names {
        assert_eq!(name, name.to_lowercase());
        assert!(!name.is_empty());
    }
}

// ---- properties ----

fn arbitrary_event_id() -> impl Strategy<Value = EventId> {
    (any::<u64>(), any::<u64>()).prop_map(|(player_id, seq)| EventId { player_id, seq })
}

/// Owned fields plus an optional player key: everything needed to encode one frame.
#[derive(Clone, Debug)]
struct OwnedFrame {
    id: EventId,
    client_time_us: u64,
    action_type: u16,
    payload: Vec<u8>,
    player_key: Option<[u8; 32]>,
}

impl OwnedFrame {
    fn fields(&self) -> ActionFields<'_> {
        ActionFields {
            id: self.id,
            client_time_us: self.client_time_us,
            action_type: self.action_type,
            payload: &self.payload,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match &self.player_key {
            Some(player_key) => encode_action_signed(&self.fields(), player_key, out),
            None => encode_action(&self.fields(), out),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

fn arbitrary_frame() -> impl Strategy<Value = OwnedFrame> {
    (
        arbitrary_event_id(),
        any::<u64>(),
        any::<u16>(),
        prop::collection::vec(any::<u8>(), 0..=PAYLOAD_BYTES_MAX),
        prop::option::of(any::<[u8; 32]>()),
    )
        .prop_map(|(id, client_time_us, action_type, payload, player_key)| OwnedFrame {
            id,
            client_time_us,
            action_type,
            payload,
            player_key,
        })
}

/// Bytes that start like an ACTION header, so check and parse get past the magic.
fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2200).prop_map(|mut bytes| {
        for (index, value) in [b'S', b'G', 1, 1].into_iter().enumerate() {
            if let Some(byte) = bytes.get_mut(index) {
                *byte = value;
            }
        }
        // Keep payload_len mostly under the limit so the length and crc paths are reached too.
        if let Some(high_byte) = bytes.get_mut(7) {
            *high_byte &= 0x07;
        }
        bytes
    })
}

/// Everything a decoder can be asked about some bytes; the point is that it returns.
fn decode_everything(bytes: &[u8]) {
    let _ = decode_ack(bytes);
    let _ = parse(bytes);
    match check(bytes) {
        Ok(header) => {
            assert!((FRAME_BYTES_MIN..=FRAME_BYTES_MAX).contains(&header.frame_bytes));
            assert!(header.frame_bytes <= bytes.len());
            let _ = parse(&bytes[..header.frame_bytes]);
        }
        Err(CheckError::FrameIncomplete(header)) => assert!(header.frame_bytes > bytes.len()),
        Err(CheckError::HeaderIncomplete) => assert!(bytes.len() < HEADER_BYTES),
        Err(CheckError::Unparseable | CheckError::PayloadTooLong(_)) => {}
    }
}

proptest! {
    // Any fields, signed or not, survive encode -> check -> parse unchanged, and a signed one verifies.
    #[test]
    fn round_trip(frame in arbitrary_frame()) {
        let bytes = frame.encode();
        let tag_bytes = if frame.player_key.is_some() { AUTH_TAG_BYTES } else { 0 };
        prop_assert_eq!(bytes.len(), 40 + frame.payload.len() + tag_bytes);
        let header = check(&bytes).expect("an encoded frame checks");
        prop_assert_eq!(header, Header { id: frame.id, frame_bytes: bytes.len() });
        let action = parse(&bytes).expect("an encoded frame parses");
        prop_assert_eq!(action.id, frame.id);
        prop_assert_eq!(action.client_time_us, frame.client_time_us);
        prop_assert_eq!(action.action_type, frame.action_type);
        prop_assert_eq!(action.payload, &frame.payload[..]);
        prop_assert_eq!(action.signed, &bytes[..HEADER_BYTES + frame.payload.len()]);
        match (frame.player_key, action.auth_tag) {
            (Some(player_key), Some(tag)) => {
                prop_assert!(auth::verify(&player_key, action.signed, tag));
            }
            (None, None) => {}
            (expected, found) => {
                prop_assert!(false, "tag mismatch: key {:?}, tag {:?}", expected, found);
            }
        }
    }

    // Several frames appended to one buffer come back out in order by walking with check.
    #[test]
    fn back_to_back_frames_walk(frames in prop::collection::vec(arbitrary_frame(), 1..6)) {
        let mut datagram = Vec::new();
        for frame in &frames {
            frame.encode_into(&mut datagram);
        }
        let mut rest = &datagram[..];
        for frame in &frames {
            let header = check(rest).expect("the next frame checks");
            let (bytes, after) = rest.split_at(header.frame_bytes);
            prop_assert_eq!(parse(bytes).expect("it parses").id, frame.id);
            rest = after;
        }
        prop_assert!(rest.is_empty());
    }

    // Arbitrary bytes never panic check, parse or decode_ack.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2200)) {
        decode_everything(&bytes);
    }

    // Arbitrary bytes behind a valid magic, version and kind never panic either.
    #[test]
    fn header_like_bytes_never_panic(bytes in header_like_bytes()) {
        decode_everything(&bytes);
    }

    // Flipping any bits of any one byte is never taken for a good frame.
    #[test]
    fn single_byte_damage_is_caught(
        frame in arbitrary_frame(),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut bytes = frame.encode();
        let index = position.index(bytes.len());
        bytes[index] ^= flip;
        if let Ok(header) = check(&bytes) {
            prop_assert!(parse(&bytes[..header.frame_bytes]).is_err(), "byte {} flipped by {:#x}", index, flip);
        }
        prop_assert!(parse(&bytes).is_err());
    }

    // Every cut of a valid frame is incomplete, never Ok, and parse refuses it.
    #[test]
    fn truncations_are_incomplete(frame in arbitrary_frame(), position in any::<prop::sample::Index>()) {
        let bytes = frame.encode();
        let cut = position.index(bytes.len());
        let expected = if cut < HEADER_BYTES {
            CheckError::HeaderIncomplete
        } else {
            CheckError::FrameIncomplete(Header { id: frame.id, frame_bytes: bytes.len() })
        };
        prop_assert_eq!(check(&bytes[..cut]), Err(expected));
        prop_assert_eq!(parse(&bytes[..cut]), Err(RejectReason::Length));
    }

    // Acks round trip for every status and id, and any one damaged byte makes them invalid.
    #[test]
    fn ack_round_trip_and_damage(
        id in arbitrary_event_id(),
        status_index in 0usize..4,
        position in 0usize..ACK_BYTES,
        flip in 1u8..=255,
    ) {
        let status = Status::ALL[status_index];
        let mut ack = encode_ack(status, id);
        prop_assert_eq!(decode_ack(&ack), Ok(Ack { status, id }));
        ack[position] ^= flip;
        prop_assert_eq!(decode_ack(&ack), Err(AckError::Invalid));
    }
}
