//! The version-1 wire codec: ACTION frames in, ACK frames out.
//!
//! Every byte that reaches this module is untrusted, and it sits on the intake hot path, so
//! decoding happens in two steps that never allocate and never panic on any input:
//! [`check`] reads only the fixed header to learn where a frame ends and which event it names
//! (enough to answer or to wait for more bytes), and [`parse`] then verifies one whole frame.
//! The encoders serve clients, tests, benches and the load generator. The byte layout is the
//! contract in `docs/protocol.md`; the offsets below are its table.

use std::fmt;

use crate::auth;

/// The first two bytes of every frame and ack.
pub const MAGIC: [u8; 2] = *b"SG";
/// The only protocol version this codec speaks.
pub const VERSION: u8 = 1;
/// `kind` of a client-to-server event frame.
pub const KIND_ACTION: u8 = 1;
/// `kind` of a server-to-client answer.
pub const KIND_ACK: u8 = 2;
/// Flags bit 0: a 16-byte auth tag follows the payload.
pub const FLAG_AUTH: u8 = 0x01;
/// Bytes before the payload.
pub const HEADER_BYTES: usize = 36;
/// The trailing crc32c.
pub const CRC_BYTES: usize = 4;
/// The truncated HMAC-SHA256 tag carried when [`FLAG_AUTH`] is set.
pub const AUTH_TAG_BYTES: usize = 16;
/// Header and crc: a frame with no payload and no tag.
pub const FRAME_OVERHEAD_BYTES: usize = 40;
/// Largest payload a frame may carry.
pub const PAYLOAD_BYTES_MAX: usize = 1024;
/// Smallest possible frame: empty payload, no tag.
pub const FRAME_BYTES_MIN: usize = 40;
/// Largest possible frame: full payload and a tag.
pub const FRAME_BYTES_MAX: usize = 40 + 16 + 1024;
/// Every ack has this fixed size.
pub const ACK_BYTES: usize = 28;

const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 2;
const OFFSET_KIND: usize = 3;
const OFFSET_FLAGS: usize = 4;
const OFFSET_RESERVED_5: usize = 5;
const OFFSET_PAYLOAD_LEN: usize = 6;
const OFFSET_PLAYER_ID: usize = 8;
const OFFSET_SEQ: usize = 16;
const OFFSET_CLIENT_TIME_US: usize = 24;
const OFFSET_ACTION_TYPE: usize = 32;
const OFFSET_RESERVED_34: usize = 34;

const ACK_OFFSET_STATUS: usize = 4;
const ACK_OFFSET_RESERVED: usize = 5;
const ACK_RESERVED_BYTES: usize = 3;
const ACK_OFFSET_PLAYER_ID: usize = 8;
const ACK_OFFSET_SEQ: usize = 16;
const ACK_OFFSET_CRC: usize = 24;

const _: () = {
    assert!(FRAME_OVERHEAD_BYTES == HEADER_BYTES + CRC_BYTES);
    assert!(FRAME_BYTES_MIN == FRAME_OVERHEAD_BYTES);
    assert!(FRAME_BYTES_MAX == FRAME_OVERHEAD_BYTES + AUTH_TAG_BYTES + PAYLOAD_BYTES_MAX);
    // payload_len is a u16 on the wire.
    assert!(PAYLOAD_BYTES_MAX <= u16::MAX as usize);
    // An ack must never be larger than the smallest frame it answers: no UDP amplification.
    assert!(ACK_BYTES < FRAME_BYTES_MIN);
    assert!(ACK_BYTES == ACK_OFFSET_CRC + CRC_BYTES);
    assert!(ACK_OFFSET_RESERVED + ACK_RESERVED_BYTES == ACK_OFFSET_PLAYER_ID);
    // The header fields tile the header exactly.
    assert!(OFFSET_RESERVED_34 + 2 == HEADER_BYTES);
    // The tag is a prefix of an HMAC-SHA256 output.
    assert!(AUTH_TAG_BYTES <= 32);
    // A whole maximal frame fits one UDP datagram on any path with a 1280-byte IPv6 MTU.
    assert!(FRAME_BYTES_MAX + 48 <= 1280);
};

/// Names one event: a client retries with the same id, and dedup is keyed on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    pub player_id: u64,
    pub seq: u64,
}

/// What [`check`] learns from a valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: EventId,
    /// The whole frame's length: header, payload, tag if flagged, crc.
    pub frame_bytes: usize,
}

/// One verified ACTION frame, borrowing from the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Action<'a> {
    pub id: EventId,
    pub client_time_us: u64,
    pub action_type: u16,
    pub payload: &'a [u8],
    pub auth_tag: Option<&'a [u8; AUTH_TAG_BYTES]>,
    /// bytes from offset 0 to the end of the payload: what the auth tag covers
    pub signed: &'a [u8],
}

/// The answer an ack carries; the discriminants are the wire values.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// This copy was newly and durably stored.
    Accepted = 0,
    /// An earlier copy of this event id is durably stored.
    Duplicate = 1,
    /// Not confirmed: the event may or may not be stored. The client resends the same frame
    /// with backoff; a stored event's resend is answered DUPLICATE.
    Retry = 2,
    /// A frame whose crc matched but which is invalid (length, flags, auth, freshness); the
    /// client must not resend it unchanged. A crc mismatch is never answered at all.
    Rejected = 3,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 4] = [Status::Accepted, Status::Duplicate, Status::Retry, Status::Rejected];

    pub fn from_u8(value: u8) -> Option<Status> {
        match value {
            0 => Some(Status::Accepted),
            1 => Some(Status::Duplicate),
            2 => Some(Status::Retry),
            3 => Some(Status::Rejected),
            _ => None,
        }
    }

    /// A lowercase name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Duplicate => "duplicate",
            Status::Retry => "retry",
            Status::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Why `check` could not find a whole frame at the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckError {
    /// Fewer than HEADER_BYTES bytes, all consistent with a frame so far: more may arrive (TCP);
    /// on UDP it is a truncated tail (no ack).
    HeaderIncomplete,
    /// Header whole and valid, frame not: `Header::frame_bytes` says how long it will be.
    /// TCP: read more. UDP: a tail cut short, no answer (no crc vouched for the id, and the same
    /// bytes whole would be a valid event), counted.
    FrameIncomplete(Header),
    /// Wrong magic, version or kind (seen as soon as those bytes are present): no boundary can be
    /// trusted. UDP: no ack, drop rest. TCP: close.
    Unparseable,
    /// payload_len > PAYLOAD_BYTES_MAX. UDP: REJECTED (length) with this id only if the whole
    /// frame it announces is there and its crc matches, else no answer; drop the rest either
    /// way. TCP: close.
    PayloadTooLong(EventId),
}

impl fmt::Display for CheckError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = match self {
            CheckError::HeaderIncomplete => "frame header is incomplete",
            CheckError::FrameIncomplete(_) => "frame is incomplete",
            CheckError::Unparseable => "frame header is unparseable (wrong magic, version or kind)",
            CheckError::PayloadTooLong(_) => "frame payload_len is over 1024 bytes",
        };
        formatter.write_str(message)
    }
}

impl std::error::Error for CheckError {}

/// Why a whole frame is REJECTED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The trailing crc32c does not match the bytes before it. Never answered REJECTED: the
    /// id cannot be trusted, so the frame is counted corrupt and dropped (TCP: the connection
    /// is closed).
    Crc,
    /// The frame's length disagrees with its payload_len and flags.
    Length,
    /// Unknown flag bits or nonzero reserved bytes. [`parse`] also answers this for bytes whose
    /// magic, version or kind is wrong, which [`check`] would have called unparseable.
    Flags,
    /// Auth is on and the tag is missing, does not match, or `client_time_us` is not fresh.
    Auth,
}

impl RejectReason {
    /// Every reason, for metric registration.
    pub const ALL: [RejectReason; 4] = [
        RejectReason::Crc,
        RejectReason::Length,
        RejectReason::Flags,
        RejectReason::Auth,
    ];

    /// A lowercase name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::Crc => "crc",
            RejectReason::Length => "length",
            RejectReason::Flags => "flags",
            RejectReason::Auth => "auth",
        }
    }

    /// Bytes that `check` refused are, seen by `parse`, a frame of the wrong length, or a header
    /// holding values version 1 does not allow.
    fn from_check_error(error: CheckError) -> RejectReason {
        match error {
            CheckError::Unparseable => RejectReason::Flags,
            CheckError::HeaderIncomplete | CheckError::FrameIncomplete(_) | CheckError::PayloadTooLong(_) => {
                RejectReason::Length
            }
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = match self {
            RejectReason::Crc => "crc32c does not match",
            RejectReason::Length => "frame length does not match its payload_len and flags",
            RejectReason::Flags => "unknown flag bits or nonzero reserved bytes",
            RejectReason::Auth => "auth tag is missing, wrong or stale",
        };
        formatter.write_str(message)
    }
}

impl std::error::Error for RejectReason {}

/// A decoded ACK frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub status: Status,
    pub id: EventId,
}

/// Why [`decode_ack`] refused a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckError {
    /// Fewer than ACK_BYTES bytes.
    Incomplete,
    /// Wrong magic, version, kind, reserved bytes, status or crc.
    Invalid,
}

impl fmt::Display for AckError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = match self {
            AckError::Incomplete => "ack is incomplete",
            AckError::Invalid => "ack is invalid",
        };
        formatter.write_str(message)
    }
}

impl std::error::Error for AckError {}

/// What a client sends; used by tests, benches and the load generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActionFields<'a> {
    pub id: EventId,
    pub client_time_us: u64,
    pub action_type: u16,
    pub payload: &'a [u8],
}

/// CRC-32C (Castagnoli), the checksum frames and acks end with.
pub fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// magic, version and kind: the first four bytes of every ACTION frame.
const PREFIX: [u8; 4] = [MAGIC[0], MAGIC[1], VERSION, KIND_ACTION];

/// Cheap structural check (magic, version, kind, payload_len, flags' auth bit for the length):
/// reads only the fixed header fields, no CRC. Never panics on any input. Fewer than
/// `HEADER_BYTES` bytes are `HeaderIncomplete` unless the bytes present already show a wrong
/// magic, version or kind, which is `Unparseable` at once.
pub fn check(buf: &[u8]) -> Result<Header, CheckError> {
    // Garbage is known as soon as its first bytes arrive: a TCP peer that sends
    // a few wrong bytes and waits is closed at once instead of held open.
    let visible_bytes = buf.len().min(PREFIX.len());
    if buf[..visible_bytes] != PREFIX[..visible_bytes] {
        return Err(CheckError::Unparseable);
    }
    let Some(header_bytes) = buf.first_chunk::<HEADER_BYTES>() else {
        return Err(CheckError::HeaderIncomplete);
    };
    let fields = HeaderFields::read(header_bytes);
    if !fields.is_version_1_action() {
        return Err(CheckError::Unparseable);
    }
    if fields.payload_bytes > PAYLOAD_BYTES_MAX {
        return Err(CheckError::PayloadTooLong(fields.id));
    }
    let header = Header {
        id: fields.id,
        frame_bytes: fields.frame_bytes(),
    };
    debug_assert!((FRAME_BYTES_MIN..=FRAME_BYTES_MAX).contains(&header.frame_bytes));
    if buf.len() < header.frame_bytes {
        return Err(CheckError::FrameIncomplete(header));
    }
    Ok(header)
}

/// Full parse of exactly one whole frame (`frame.len() == header.frame_bytes` from [`check`]).
///
/// Checks run in this order, so the first failure names the reason: the structure `check`
/// looks at, then the exact length ([`RejectReason::Length`]), then the crc32c
/// ([`RejectReason::Crc`]: a corrupted header byte is reported as corruption), then the
/// flags and reserved bytes ([`RejectReason::Flags`]). Does not verify the auth tag
/// (`auth::verify` does). Never panics, never allocates.
pub fn parse(frame: &[u8]) -> Result<Action<'_>, RejectReason> {
    let header = check(frame).map_err(RejectReason::from_check_error)?;
    if frame.len() != header.frame_bytes {
        return Err(RejectReason::Length);
    }
    // The `else` arms below cannot run once the length matched; they keep bounds provable.
    let Some((covered, crc_field)) = frame.split_last_chunk::<CRC_BYTES>() else {
        return Err(RejectReason::Length);
    };
    if crc(covered) != u32::from_le_bytes(*crc_field) {
        return Err(RejectReason::Crc);
    }
    let Some(header_bytes) = frame.first_chunk::<HEADER_BYTES>() else {
        return Err(RejectReason::Length);
    };
    let fields = HeaderFields::read(header_bytes);
    if !fields.has_only_known_bits() {
        return Err(RejectReason::Flags);
    }
    let Some((signed, tag_bytes)) = covered.split_at_checked(HEADER_BYTES + fields.payload_bytes) else {
        return Err(RejectReason::Length);
    };
    let Some(payload) = signed.get(HEADER_BYTES..) else {
        return Err(RejectReason::Length);
    };
    let auth_tag = if fields.has_auth_tag() {
        Some(<&[u8; AUTH_TAG_BYTES]>::try_from(tag_bytes).map_err(|_| RejectReason::Length)?)
    } else {
        debug_assert!(tag_bytes.is_empty());
        None
    };
    Ok(Action {
        id: fields.id,
        client_time_us: fields.client_time_us,
        action_type: fields.action_type,
        payload,
        auth_tag,
        signed,
    })
}

/// Writes a 28-byte ACK.
pub fn encode_ack(status: Status, id: EventId) -> [u8; ACK_BYTES] {
    let mut ack = [0u8; ACK_BYTES];
    put::<OFFSET_MAGIC, 2, ACK_BYTES>(&mut ack, MAGIC);
    ack[OFFSET_VERSION] = VERSION;
    ack[OFFSET_KIND] = KIND_ACK;
    ack[ACK_OFFSET_STATUS] = status as u8;
    put::<ACK_OFFSET_PLAYER_ID, 8, ACK_BYTES>(&mut ack, id.player_id.to_le_bytes());
    put::<ACK_OFFSET_SEQ, 8, ACK_BYTES>(&mut ack, id.seq.to_le_bytes());
    let checksum = crc(&ack[..ACK_OFFSET_CRC]);
    put::<ACK_OFFSET_CRC, CRC_BYTES, ACK_BYTES>(&mut ack, checksum.to_le_bytes());
    debug_assert_eq!(decode_ack(&ack), Ok(Ack { status, id }));
    ack
}

/// Decodes the ACK at the front of `buf` (which may hold more bytes; only the first
/// [`ACK_BYTES`] are read). Checks magic, version, kind, reserved bytes, status and crc.
pub fn decode_ack(buf: &[u8]) -> Result<Ack, AckError> {
    let Some(ack) = buf.first_chunk::<ACK_BYTES>() else {
        return Err(AckError::Incomplete);
    };
    let checksum = u32::from_le_bytes(get::<ACK_OFFSET_CRC, CRC_BYTES, ACK_BYTES>(ack));
    let is_version_1_ack = get::<OFFSET_MAGIC, 2, ACK_BYTES>(ack) == MAGIC
        && ack[OFFSET_VERSION] == VERSION
        && ack[OFFSET_KIND] == KIND_ACK
        && get::<ACK_OFFSET_RESERVED, ACK_RESERVED_BYTES, ACK_BYTES>(ack) == [0; ACK_RESERVED_BYTES];
    if !is_version_1_ack || crc(&ack[..ACK_OFFSET_CRC]) != checksum {
        return Err(AckError::Invalid);
    }
    let status = Status::from_u8(ack[ACK_OFFSET_STATUS]).ok_or(AckError::Invalid)?;
    let id = EventId {
        player_id: u64::from_le_bytes(get::<ACK_OFFSET_PLAYER_ID, 8, ACK_BYTES>(ack)),
        seq: u64::from_le_bytes(get::<ACK_OFFSET_SEQ, 8, ACK_BYTES>(ack)),
    };
    Ok(Ack { status, id })
}

/// Appends one encoded ACTION frame (no auth tag) to `out`.
///
/// # Panics
/// If `fields.payload` is longer than [`PAYLOAD_BYTES_MAX`]: that is a caller bug, since no
/// such frame exists on the wire.
pub fn encode_action(fields: &ActionFields<'_>, out: &mut Vec<u8>) {
    encode_action_with(fields, None, out);
}

/// Appends one encoded ACTION frame with [`FLAG_AUTH`] set and a tag computed with
/// `auth::tag` from the per-player key.
///
/// # Panics
/// If `fields.payload` is longer than [`PAYLOAD_BYTES_MAX`] (a caller bug).
pub fn encode_action_signed(fields: &ActionFields<'_>, player_key: &[u8; auth::PLAYER_KEY_BYTES], out: &mut Vec<u8>) {
    encode_action_with(fields, Some(player_key), out);
}

fn encode_action_with(fields: &ActionFields<'_>, player_key: Option<&[u8; auth::PLAYER_KEY_BYTES]>, out: &mut Vec<u8>) {
    assert!(
        fields.payload.len() <= PAYLOAD_BYTES_MAX,
        "payload is {} bytes, over PAYLOAD_BYTES_MAX ({PAYLOAD_BYTES_MAX})",
        fields.payload.len()
    );
    let (flags, tag_bytes) = match player_key {
        Some(_) => (FLAG_AUTH, AUTH_TAG_BYTES),
        None => (0, 0),
    };
    let frame_bytes = FRAME_OVERHEAD_BYTES + fields.payload.len() + tag_bytes;
    let start = out.len();
    out.reserve(frame_bytes);
    out.extend_from_slice(&encode_header(fields, flags));
    out.extend_from_slice(fields.payload);
    if let Some(player_key) = player_key {
        let tag = auth::tag(player_key, &out[start..]);
        out.extend_from_slice(&tag);
    }
    let checksum = crc(&out[start..]);
    out.extend_from_slice(&checksum.to_le_bytes());
    debug_assert_eq!(out.len() - start, frame_bytes);
    debug_assert_eq!(
        check(&out[start..]),
        Ok(Header {
            id: fields.id,
            frame_bytes
        })
    );
}

fn encode_header(fields: &ActionFields<'_>, flags: u8) -> [u8; HEADER_BYTES] {
    // Fits: the caller asserted payload.len() <= PAYLOAD_BYTES_MAX <= u16::MAX.
    let payload_len = fields.payload.len() as u16;
    let mut header = [0u8; HEADER_BYTES];
    put::<OFFSET_MAGIC, 2, HEADER_BYTES>(&mut header, MAGIC);
    header[OFFSET_VERSION] = VERSION;
    header[OFFSET_KIND] = KIND_ACTION;
    header[OFFSET_FLAGS] = flags;
    put::<OFFSET_PAYLOAD_LEN, 2, HEADER_BYTES>(&mut header, payload_len.to_le_bytes());
    put::<OFFSET_PLAYER_ID, 8, HEADER_BYTES>(&mut header, fields.id.player_id.to_le_bytes());
    put::<OFFSET_SEQ, 8, HEADER_BYTES>(&mut header, fields.id.seq.to_le_bytes());
    put::<OFFSET_CLIENT_TIME_US, 8, HEADER_BYTES>(&mut header, fields.client_time_us.to_le_bytes());
    put::<OFFSET_ACTION_TYPE, 2, HEADER_BYTES>(&mut header, fields.action_type.to_le_bytes());
    header
}

/// The fixed header, decoded but not yet judged.
struct HeaderFields {
    magic: [u8; 2],
    version: u8,
    kind: u8,
    flags: u8,
    reserved_5: u8,
    payload_bytes: usize,
    id: EventId,
    client_time_us: u64,
    action_type: u16,
    reserved_34: [u8; 2],
}

impl HeaderFields {
    fn read(header: &[u8; HEADER_BYTES]) -> HeaderFields {
        let payload_len = u16::from_le_bytes(get::<OFFSET_PAYLOAD_LEN, 2, HEADER_BYTES>(header));
        HeaderFields {
            magic: get::<OFFSET_MAGIC, 2, HEADER_BYTES>(header),
            version: header[OFFSET_VERSION],
            kind: header[OFFSET_KIND],
            flags: header[OFFSET_FLAGS],
            reserved_5: header[OFFSET_RESERVED_5],
            payload_bytes: usize::from(payload_len),
            id: EventId {
                player_id: u64::from_le_bytes(get::<OFFSET_PLAYER_ID, 8, HEADER_BYTES>(header)),
                seq: u64::from_le_bytes(get::<OFFSET_SEQ, 8, HEADER_BYTES>(header)),
            },
            client_time_us: u64::from_le_bytes(get::<OFFSET_CLIENT_TIME_US, 8, HEADER_BYTES>(header)),
            action_type: u16::from_le_bytes(get::<OFFSET_ACTION_TYPE, 2, HEADER_BYTES>(header)),
            reserved_34: get::<OFFSET_RESERVED_34, 2, HEADER_BYTES>(header),
        }
    }

    /// Only these three bytes say how the rest is laid out; if they are wrong nothing is.
    fn is_version_1_action(&self) -> bool {
        self.magic == MAGIC && self.version == VERSION && self.kind == KIND_ACTION
    }

    fn has_auth_tag(&self) -> bool {
        self.flags & FLAG_AUTH != 0
    }

    /// Unknown bits are rejected rather than ignored, so a later version can give them meaning.
    fn has_only_known_bits(&self) -> bool {
        self.flags & !FLAG_AUTH == 0 && self.reserved_5 == 0 && self.reserved_34 == [0, 0]
    }

    fn frame_bytes(&self) -> usize {
        let tag_bytes = if self.has_auth_tag() { AUTH_TAG_BYTES } else { 0 };
        FRAME_OVERHEAD_BYTES + self.payload_bytes + tag_bytes
    }
}

/// Copies the `N` bytes at `OFFSET` out of a fixed-size buffer. The bounds are checked at
/// compile time, so reading a field can never panic.
fn get<const OFFSET: usize, const N: usize, const L: usize>(bytes: &[u8; L]) -> [u8; N] {
    const { assert!(OFFSET + N <= L) };
    let mut field = [0u8; N];
    field.copy_from_slice(&bytes[OFFSET..OFFSET + N]);
    field
}

/// Writes `field` at `OFFSET` of a fixed-size buffer, bounds checked at compile time.
fn put<const OFFSET: usize, const N: usize, const L: usize>(bytes: &mut [u8; L], field: [u8; N]) {
    const { assert!(OFFSET + N <= L) };
    bytes[OFFSET..OFFSET + N].copy_from_slice(&field);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(payload: &[u8]) -> ActionFields<'_> {
        ActionFields {
            id: EventId { player_id: 5, seq: 6 },
            client_time_us: 7,
            action_type: 8,
            payload,
        }
    }

    // The documented crc32c check value holds, so the checksum is Castagnoli and not IEEE.
    #[test]
    fn crc_is_castagnoli() {
        assert_eq!(crc(b"123456789"), 0xE306_9283);
    }

    // Every header field lands at the offset the protocol table gives it.
    #[test]
    fn header_fields_sit_at_their_offsets() {
        let mut frame = Vec::new();
        encode_action(
            &ActionFields {
                id: EventId {
                    player_id: 0x1111_1111_1111_1111,
                    seq: 0x2222_2222_2222_2222,
                },
                client_time_us: 0x3333_3333_3333_3333,
                action_type: 0x4444,
                payload: &[0x55; 3],
            },
            &mut frame,
        );
        assert_eq!(&frame[0..6], &[b'S', b'G', 1, 1, 0, 0]);
        assert_eq!(&frame[6..8], &[3, 0]);
        assert_eq!(&frame[8..16], &[0x11; 8]);
        assert_eq!(&frame[16..24], &[0x22; 8]);
        assert_eq!(&frame[24..32], &[0x33; 8]);
        assert_eq!(&frame[32..34], &[0x44; 2]);
        assert_eq!(&frame[34..36], &[0, 0]);
        assert_eq!(&frame[36..39], &[0x55; 3]);
        assert_eq!(frame.len(), 43);
    }

    // encode_action appends after existing bytes instead of overwriting them.
    #[test]
    fn encode_action_appends() {
        let mut out = vec![0xAA, 0xBB];
        encode_action(&fields(b"x"), &mut out);
        assert_eq!(&out[..2], &[0xAA, 0xBB]);
        assert_eq!(parse(&out[2..]).map(|action| action.payload), Ok(&b"x"[..]));
    }

    // A payload over the limit is a caller bug and panics rather than writing a bad frame.
    #[test]
    #[should_panic(expected = "over PAYLOAD_BYTES_MAX")]
    fn encode_action_panics_on_oversized_payload() {
        encode_action(&fields(&[0; PAYLOAD_BYTES_MAX + 1]), &mut Vec::new());
    }

    // Status wire values round trip and nothing else decodes.
    #[test]
    fn status_from_u8_round_trips() {
        for status in Status::ALL {
            assert_eq!(Status::from_u8(status as u8), Some(status));
        }
        assert_eq!(Status::from_u8(4), None);
        assert_eq!(Status::from_u8(u8::MAX), None);
    }

    // parse maps check's structural errors onto reject reasons instead of panicking.
    #[test]
    fn parse_maps_check_errors() {
        assert_eq!(parse(&[]), Err(RejectReason::Length));
        assert_eq!(parse(&[0; FRAME_BYTES_MIN]), Err(RejectReason::Flags));
    }
}
