//! The frame decoder on arbitrary bytes: `check` and `parse` never panic and always agree, a
//! frame `parse` accepts is exactly the frame its fields encode to, and `decode_ack` accepts only
//! what `encode_ack` writes.
//!
//! Random bytes almost never carry a right crc32c, so each input is also tried "resealed", with
//! its last four bytes replaced by the crc of the rest: that lets the fuzzer reach the flags,
//! reserved-byte and auth-tag checks that run after the crc.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardgate_proto::frame::{
    self, ActionFields, CheckError, RejectReason, ACK_BYTES, CRC_BYTES, FLAG_AUTH, HEADER_BYTES, PAYLOAD_BYTES_MAX,
};

fuzz_target!(|data: &[u8]| {
    check_and_parse_agree(data);
    if let Some(covered_bytes) = data.len().checked_sub(CRC_BYTES) {
        let mut resealed = data.to_vec();
        let checksum = frame::crc(&resealed[..covered_bytes]);
        resealed[covered_bytes..].copy_from_slice(&checksum.to_le_bytes());
        check_and_parse_agree(&resealed);
    }
    acks_round_trip(data);
});

fn check_and_parse_agree(data: &[u8]) {
    let checked = frame::check(data);
    let parsed = frame::parse(data);
    match checked {
        Ok(header) if header.frame_bytes == data.len() => match parsed {
            Ok(action) => parsed_frame_re_encodes(data, &action, header),
            // A whole frame of the right length fails only on content, never on length.
            Err(reason) => assert!(
                matches!(reason, RejectReason::Crc | RejectReason::Flags),
                "check found a whole frame but parse said {reason:?}"
            ),
        },
        Ok(header) => {
            assert!(header.frame_bytes < data.len());
            assert_eq!(parsed, Err(RejectReason::Length), "trailing bytes after one frame");
            // The front frame alone is what a transport hands to parse.
            let front = &data[..header.frame_bytes];
            assert_eq!(frame::check(front), Ok(header));
            check_and_parse_agree(front);
        }
        Err(CheckError::Unparseable) => assert_eq!(parsed, Err(RejectReason::Flags)),
        Err(CheckError::HeaderIncomplete) => {
            assert!(data.len() < HEADER_BYTES);
            assert_eq!(parsed, Err(RejectReason::Length));
        }
        Err(CheckError::FrameIncomplete(header)) => {
            assert!(data.len() >= HEADER_BYTES && data.len() < header.frame_bytes);
            assert_eq!(parsed, Err(RejectReason::Length));
        }
        Err(CheckError::PayloadTooLong(_)) => {
            let payload_len = u16::from_le_bytes([data[6], data[7]]);
            assert!(usize::from(payload_len) > PAYLOAD_BYTES_MAX);
            assert_eq!(parsed, Err(RejectReason::Length));
        }
    }
}

/// A frame parse accepted is rebuilt byte for byte from what parse returned.
fn parsed_frame_re_encodes(data: &[u8], action: &frame::Action<'_>, header: frame::Header) {
    assert_eq!(action.id, header.id);
    assert!(action.payload.len() <= PAYLOAD_BYTES_MAX);
    assert_eq!(action.signed, &data[..HEADER_BYTES + action.payload.len()]);
    assert_eq!(action.auth_tag.is_some(), data[4] & FLAG_AUTH != 0);
    let fields = ActionFields {
        id: action.id,
        client_time_us: action.client_time_us,
        action_type: action.action_type,
        payload: action.payload,
    };
    let mut encoded = Vec::with_capacity(data.len());
    frame::encode_action(&fields, &mut encoded);
    match action.auth_tag {
        None => assert_eq!(encoded, data, "an untagged frame re-encodes to itself"),
        Some(tag) => {
            // The encoder cannot make this tag without the key, so rebuild around it: the header
            // differs only in the auth flag, then the tag, then the crc over all of it.
            let mut rebuilt = encoded[..HEADER_BYTES + action.payload.len()].to_vec();
            rebuilt[4] |= FLAG_AUTH;
            rebuilt.extend_from_slice(tag);
            let checksum = frame::crc(&rebuilt);
            rebuilt.extend_from_slice(&checksum.to_le_bytes());
            assert_eq!(rebuilt, data, "a tagged frame rebuilds to itself");
        }
    }
}

/// `decode_ack` reads only the first ACK_BYTES and accepts exactly what `encode_ack` writes.
fn acks_round_trip(data: &[u8]) {
    match frame::decode_ack(data) {
        Ok(ack) => assert_eq!(&frame::encode_ack(ack.status, ack.id)[..], &data[..ACK_BYTES]),
        Err(frame::AckError::Incomplete) => assert!(data.len() < ACK_BYTES),
        Err(frame::AckError::Invalid) => assert!(data.len() >= ACK_BYTES),
    }
}
