//! TCP stream reassembly: splits the bytes a connection has buffered so far into whole frames.
//!
//! TCP delivers a byte stream, not frames: one read may end mid-header, mid-payload, or hold
//! many frames. [`split`] walks [`frame::check`] over the buffered bytes and yields each whole
//! frame at the front, then says why it stopped: either the next frame is not all here yet
//! ([`Stop::NeedMoreBytes`]: keep the unconsumed tail, read more, call again) or the bytes at
//! the front can never start a frame ([`Stop::Broken`]: the connection must be closed, since no
//! later frame boundary can be trusted).
//!
//! It is pure and allocation-free: it borrows the caller's buffer, never copies, and never
//! panics on any input. Its answer does not depend on how the stream was cut into reads:
//! feeding a stream in any chunks, dropping the consumed bytes after each call, yields the same
//! frames and the same final stop as feeding it whole (property-tested here and fuzzed by
//! `fuzz/fuzz_targets/stream_reassembly.rs`). That holds because [`frame::check`] only ever
//! turns a "need more" prefix into a verdict when more bytes arrive, and never takes back an
//! `Unparseable` it already saw in a prefix.
//!
//! The frames are only split, not verified: each still goes through [`frame::parse`]. Its
//! rejections (flags, length) are answered per frame without ending the stream; a crc that does
//! not match is never answered and ends the connection (`tcp.rs`, protocol revision 2), since the
//! bytes that were corrupted may be the framing itself.

use crate::frame::{self, CheckError, EventId, Header, HEADER_BYTES};

/// One whole frame at the front of the unconsumed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What [`frame::check`] read from its header; `header.frame_bytes == bytes.len()`.
    pub header: Header,
    /// Exactly the frame's bytes, ready for [`frame::parse`].
    pub bytes: &'a [u8],
}

/// Why [`Frames`] yields no more frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The unconsumed bytes are a consistent start of a frame (possibly none at all). Keep them
    /// and read more. `wanted_bytes` is how many unconsumed bytes the next step needs at least:
    /// [`HEADER_BYTES`] while the header is cut short, the whole frame's length once it is known.
    NeedMoreBytes { wanted_bytes: usize },
    /// The bytes at the front can never be a frame; the stream cannot go on.
    Broken(Broken),
}

/// Why a stream cannot be split any further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// Wrong magic, version or kind ([`CheckError::Unparseable`]).
    Unparseable,
    /// A whole header whose payload_len is over the limit ([`CheckError::PayloadTooLong`]); the
    /// id is there for logging, not for an answer the stream could carry on after.
    PayloadTooLong(EventId),
}

/// Splits `buffered` (the unconsumed bytes of one connection, oldest first) into whole frames.
pub fn split(buffered: &[u8]) -> Frames<'_> {
    Frames {
        buffered,
        consumed_bytes: 0,
        stop: None,
    }
}

/// The iterator [`split`] returns. After it yields `None`, [`Frames::stop`] says why and
/// [`Frames::consumed_bytes`] how many bytes at the front of the buffer the yielded frames used.
#[derive(Clone, Debug)]
pub struct Frames<'a> {
    buffered: &'a [u8],
    consumed_bytes: usize,
    /// Set once the walk ended; the iterator is fused from then on.
    stop: Option<Stop>,
}

impl<'a> Frames<'a> {
    /// Bytes of the buffer taken by the frames yielded so far. Drop exactly these from the front
    /// and keep the rest for the next call.
    pub fn consumed_bytes(&self) -> usize {
        self.consumed_bytes
    }

    /// Why the walk ended, or `None` while frames may remain.
    pub fn stop(&self) -> Option<Stop> {
        self.stop
    }

    /// The bytes not yet consumed.
    pub fn unconsumed(&self) -> &'a [u8] {
        // consumed_bytes only ever grows by a frame length that check found inside the slice.
        self.buffered.get(self.consumed_bytes..).unwrap_or_default()
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.stop.is_some() {
            return None;
        }
        let unconsumed = self.unconsumed();
        let stop = match frame::check(unconsumed) {
            Ok(header) => match unconsumed.get(..header.frame_bytes) {
                Some(bytes) => {
                    self.consumed_bytes += header.frame_bytes;
                    return Some(Frame { header, bytes });
                }
                // check promised the frame is whole; if it ever were not, waiting is the
                // answer that neither panics nor drops the connection's good bytes.
                None => Stop::NeedMoreBytes {
                    wanted_bytes: header.frame_bytes,
                },
            },
            Err(CheckError::HeaderIncomplete) => Stop::NeedMoreBytes {
                wanted_bytes: HEADER_BYTES,
            },
            Err(CheckError::FrameIncomplete(header)) => Stop::NeedMoreBytes {
                wanted_bytes: header.frame_bytes,
            },
            Err(CheckError::Unparseable) => Stop::Broken(Broken::Unparseable),
            Err(CheckError::PayloadTooLong(id)) => Stop::Broken(Broken::PayloadTooLong(id)),
        };
        self.stop = Some(stop);
        None
    }
}

impl std::iter::FusedIterator for Frames<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_action, encode_action_signed, ActionFields, FRAME_BYTES_MAX, PAYLOAD_BYTES_MAX};
    use proptest::prelude::*;

    fn action(player_id: u64, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
        let fields = ActionFields {
            id: EventId { player_id, seq },
            client_time_us: 1,
            action_type: 2,
            payload,
        };
        encode_action(&fields, out);
    }

    /// Everything one call of `split` reports: the frames' bytes, the bytes used, the stop.
    fn split_all(buffered: &[u8]) -> (Vec<Vec<u8>>, usize, Stop) {
        let mut frames = split(buffered);
        let yielded = frames.by_ref().map(|frame| frame.bytes.to_vec()).collect();
        let stop = frames.stop().expect("an exhausted walk says why");
        (yielded, frames.consumed_bytes(), stop)
    }

    /// Feeds `stream` in reads of `chunk_bytes` (cycled), the way tcp.rs does: append the read,
    /// split, drop the consumed bytes, stop at a broken stream. Returns every frame and the
    /// last stop.
    fn feed_chunked(stream: &[u8], chunk_bytes: &[usize]) -> (Vec<Vec<u8>>, Stop) {
        let mut buffered = Vec::new();
        let mut frames = Vec::new();
        let mut stop = Stop::NeedMoreBytes {
            wanted_bytes: HEADER_BYTES,
        };
        let mut offset = 0;
        let mut sizes = chunk_bytes.iter().copied().filter(|&size| size > 0).cycle();
        while offset < stream.len() {
            let size = sizes.next().unwrap_or(stream.len()).min(stream.len() - offset);
            buffered.extend_from_slice(&stream[offset..offset + size]);
            offset += size;
            let (yielded, consumed_bytes, this_stop) = split_all(&buffered);
            frames.extend(yielded);
            buffered.drain(..consumed_bytes);
            stop = this_stop;
            if matches!(stop, Stop::Broken(_)) {
                break;
            }
        }
        (frames, stop)
    }

    // Three back-to-back frames split into exactly those frames and nothing is left over.
    #[test]
    fn whole_frames_split_exactly() {
        let mut stream = Vec::new();
        action(1, 1, b"", &mut stream);
        action(1, 2, b"abc", &mut stream);
        action(2, 1, &[7; PAYLOAD_BYTES_MAX], &mut stream);
        let mut frames = split(&stream);
        let ids: Vec<u64> = frames.by_ref().map(|frame| frame.header.id.seq).collect();
        assert_eq!(ids, [1, 2, 1]);
        assert_eq!(frames.consumed_bytes(), stream.len());
        assert_eq!(
            frames.stop(),
            Some(Stop::NeedMoreBytes {
                wanted_bytes: HEADER_BYTES
            })
        );
        assert!(frames.unconsumed().is_empty());
    }

    // A cut header and a cut body both ask for more, naming the bytes they need.
    #[test]
    fn cut_frames_ask_for_more() {
        let mut stream = Vec::new();
        action(1, 1, b"payload", &mut stream);
        let frame_bytes = stream.len();
        let (frames, consumed_bytes, stop) = split_all(&stream[..HEADER_BYTES - 1]);
        assert!(frames.is_empty());
        assert_eq!(consumed_bytes, 0);
        assert_eq!(
            stop,
            Stop::NeedMoreBytes {
                wanted_bytes: HEADER_BYTES
            }
        );
        let (_, _, stop) = split_all(&stream[..frame_bytes - 1]);
        assert_eq!(
            stop,
            Stop::NeedMoreBytes {
                wanted_bytes: frame_bytes
            }
        );
    }

    // Garbage after a good frame ends the stream there, and the good frame still counts.
    #[test]
    fn garbage_breaks_the_stream_after_the_good_frames() {
        let mut stream = Vec::new();
        action(1, 1, b"", &mut stream);
        let good_bytes = stream.len();
        stream.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (frames, consumed_bytes, stop) = split_all(&stream);
        assert_eq!(frames.len(), 1);
        assert_eq!(consumed_bytes, good_bytes);
        assert_eq!(stop, Stop::Broken(Broken::Unparseable));
    }

    // A whole header with payload_len over the limit breaks the stream and names the id.
    #[test]
    fn oversized_payload_breaks_the_stream() {
        let mut stream = Vec::new();
        action(5, 6, b"", &mut stream);
        stream[6..8].copy_from_slice(&(PAYLOAD_BYTES_MAX as u16 + 1).to_le_bytes());
        let (frames, _, stop) = split_all(&stream);
        assert!(frames.is_empty());
        assert_eq!(
            stop,
            Stop::Broken(Broken::PayloadTooLong(EventId { player_id: 5, seq: 6 }))
        );
    }

    // A frame with a bad crc or unknown flags is still split: judging it is parse's job (and tcp.rs's).
    #[test]
    fn damaged_frames_are_split_not_judged() {
        let mut stream = Vec::new();
        action(1, 1, b"x", &mut stream);
        let last = stream.len() - 1;
        stream[last] ^= 0xFF;
        action(1, 2, b"y", &mut stream);
        let (frames, consumed_bytes, _) = split_all(&stream);
        assert_eq!(frames.len(), 2);
        assert_eq!(consumed_bytes, stream.len());
        assert!(frame::parse(&frames[0]).is_err());
        assert!(frame::parse(&frames[1]).is_ok());
    }

    // Once stopped the iterator stays stopped, even though the buffer is unchanged.
    #[test]
    fn stopped_walk_stays_stopped() {
        let mut frames = split(b"XX");
        assert_eq!(frames.next(), None);
        assert_eq!(frames.next(), None);
        assert_eq!(frames.stop(), Some(Stop::Broken(Broken::Unparseable)));
        assert_eq!(frames.consumed_bytes(), 0);
    }

    /// A valid stream: frames with and without tags, payloads from empty to the maximum.
    fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
        let frame = (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..=PAYLOAD_BYTES_MAX),
            any::<bool>(),
        );
        prop::collection::vec(frame, 0..12).prop_map(|frames| {
            let mut stream = Vec::new();
            for (player_id, seq, payload, signed) in frames {
                let fields = ActionFields {
                    id: EventId { player_id, seq },
                    client_time_us: seq,
                    action_type: 3,
                    payload: &payload,
                };
                if signed {
                    encode_action_signed(&fields, &[9; 32], &mut stream);
                } else {
                    encode_action(&fields, &mut stream);
                }
            }
            stream
        })
    }

    proptest! {
        // Any chunking of a valid stream yields the same frames as feeding it whole, and all of it.
        #[test]
        fn chunking_a_valid_stream_changes_nothing(
            stream in valid_stream(),
            chunk_bytes in prop::collection::vec(1..2 * FRAME_BYTES_MAX, 1..16),
        ) {
            let (whole, consumed_bytes, whole_stop) = split_all(&stream);
            prop_assert_eq!(consumed_bytes, stream.len());
            prop_assert_eq!(whole_stop, Stop::NeedMoreBytes { wanted_bytes: HEADER_BYTES });
            let (chunked, chunked_stop) = feed_chunked(&stream, &chunk_bytes);
            prop_assert_eq!(&chunked, &whole);
            prop_assert_eq!(chunked_stop, whole_stop);
            for frame in &chunked {
                prop_assert!(frame::parse(frame).is_ok());
            }
        }

        // Any chunking of any bytes (a valid stream with bytes flipped or cut) yields the same
        // frames and the same final stop as feeding them whole.
        #[test]
        fn chunking_any_stream_changes_nothing(
            stream in valid_stream(),
            damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            chunk_bytes in prop::collection::vec(1..2 * FRAME_BYTES_MAX, 1..16),
        ) {
            let mut stream = stream;
            if !stream.is_empty() {
                for (index, byte) in damage {
                    let at = index.index(stream.len());
                    stream[at] = byte;
                }
                stream.truncate(cut.index(stream.len() + 1));
            }
            let (whole, _, whole_stop) = split_all(&stream);
            let (chunked, chunked_stop) = feed_chunked(&stream, &chunk_bytes);
            prop_assert_eq!(chunked, whole);
            prop_assert_eq!(chunked_stop, whole_stop);
        }

        // No input makes split panic, and every frame it yields is a whole frame check accepts.
        #[test]
        fn arbitrary_bytes_split_into_checked_frames(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let mut frames = split(&bytes);
            let mut total_bytes = 0;
            for frame in frames.by_ref() {
                prop_assert_eq!(frame::check(frame.bytes), Ok(frame.header));
                prop_assert_eq!(frame.bytes.len(), frame.header.frame_bytes);
                total_bytes += frame.bytes.len();
            }
            prop_assert_eq!(frames.consumed_bytes(), total_bytes);
            prop_assert!(frames.stop().is_some());
        }
    }
}
