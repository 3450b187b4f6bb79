//! TCP stream reassembly (`shardgate_proto::stream`) on an arbitrary byte stream cut into arbitrary
//! reads: fed read by read through a buffer of the server's size, it yields exactly the frames,
//! and ends with exactly the stop, that splitting the whole stream at once gives; and a full
//! buffer never leaves it waiting for bytes that cannot fit.
//!
//! Input layout: byte 0 gives how many read sizes follow (0 to 16), each a u16 LE; the rest is the
//! stream. The sizes are cycled; none at all means one read per byte.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardgate_proto::frame::{self, FRAME_BYTES_MAX};
use shardgate::limits::TCP_READ_BUFFER_BYTES;
use shardgate_proto::stream::{self, Stop};

/// Read sizes run from 1 to twice the largest frame, so reads both split and join frames.
const READ_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX;
const READ_SIZES_MAX: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&count_byte, rest)) = data.split_first() else {
        return;
    };
    let read_sizes_count = usize::from(count_byte) % (READ_SIZES_MAX + 1);
    let Some((size_bytes, byte_stream)) = rest.split_at_checked(2 * read_sizes_count) else {
        return;
    };
    let read_sizes: Vec<usize> = size_bytes
        .chunks_exact(2)
        .map(|pair| usize::from(u16::from_le_bytes([pair[0], pair[1]])) % READ_BYTES_MAX + 1)
        .collect();

    let (whole_frames, whole_stop) = split_whole(byte_stream);
    let (fed_frames, fed_stop) = feed_in_reads(byte_stream, &read_sizes);
    assert_eq!(fed_frames, whole_frames, "frames depend on how the stream was read");
    assert_eq!(
        fed_stop, whole_stop,
        "the final stop depends on how the stream was read"
    );
});

/// Frames and stop of one split over the whole stream.
fn split_whole(byte_stream: &[u8]) -> (Vec<&[u8]>, Stop) {
    let mut frames = stream::split(byte_stream);
    let yielded: Vec<&[u8]> = frames.by_ref().map(|frame| frame.bytes).collect();
    let consumed_bytes: usize = yielded.iter().map(|bytes| bytes.len()).sum();
    assert_eq!(frames.consumed_bytes(), consumed_bytes);
    let stop = frames.stop().expect("an exhausted walk says why it stopped");
    (yielded, stop)
}

/// What tcp.rs does: read into a fixed buffer, split, keep the unconsumed tail, stop when
/// the stream is broken.
fn feed_in_reads<'a>(byte_stream: &'a [u8], read_sizes: &[usize]) -> (Vec<&'a [u8]>, Stop) {
    let mut buffer = vec![0u8; TCP_READ_BUFFER_BYTES];
    let mut filled_bytes = 0;
    // Where in `byte_stream` the buffer's first byte came from, to return frames by reference.
    let mut buffer_origin = 0;
    let mut offset = 0;
    let mut read_sizes = read_sizes.iter().copied().cycle();
    let mut frames = Vec::new();
    // An empty stream is where every connection starts.
    let mut stop = split_whole(&[]).1;
    while offset < byte_stream.len() {
        let free_bytes = TCP_READ_BUFFER_BYTES - filled_bytes;
        assert!(free_bytes > 0, "a full buffer still waits for more bytes: {stop:?}");
        let read_bytes = read_sizes
            .next()
            .unwrap_or(1)
            .min(free_bytes)
            .min(byte_stream.len() - offset);
        buffer[filled_bytes..filled_bytes + read_bytes].copy_from_slice(&byte_stream[offset..offset + read_bytes]);
        filled_bytes += read_bytes;
        offset += read_bytes;

        let mut split = stream::split(&buffer[..filled_bytes]);
        let mut frame_offset = buffer_origin;
        for frame in split.by_ref() {
            assert_eq!(frame.bytes.len(), frame.header.frame_bytes);
            assert_eq!(frame::check(frame.bytes), Ok(frame.header));
            frames.push(&byte_stream[frame_offset..frame_offset + frame.bytes.len()]);
            assert_eq!(frames.last().copied(), Some(frame.bytes));
            frame_offset += frame.bytes.len();
        }
        stop = split.stop().expect("an exhausted walk says why it stopped");
        let consumed_bytes = split.consumed_bytes();
        if let Stop::NeedMoreBytes { wanted_bytes } = stop {
            assert!(wanted_bytes <= FRAME_BYTES_MAX && wanted_bytes > filled_bytes - consumed_bytes);
        }
        buffer.copy_within(consumed_bytes..filled_bytes, 0);
        filled_bytes -= consumed_bytes;
        buffer_origin += consumed_bytes;
        if matches!(stop, Stop::Broken(_)) {
            break;
        }
    }
    (frames, stop)
}
