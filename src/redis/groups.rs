//! A batch split by partition, for a Redis Cluster: one script call per partition group.
//!
//! On a cluster, every key of one script call must be in one hash slot, and every key of a
//! partition `p` is under the hash tag `{p}`. So a batch is sent as one call per partition
//! it holds, each with the records of that partition alone and its keys declared
//! (`script.rs`, "KEYS"). Per partition rather than per slot: a partition is one slot by
//! construction, two partitions may share a slot only by a hash collision, and grouping by
//! the partition field needs no slot computation.
//!
//! `split` reads the batch's blob (the records in arrival order), sorts the events by
//! (partition, arrival index), copies each group's records into a blob of its own and writes
//! its keys; `merge` puts each group's outcomes back on its events, in the batch's order.
//! Within a partition, events keep their arrival order, so the stream gets them in the order
//! a standalone call would have appended them.
//!
//! Every buffer is allocated once, with the batch, for the worst case (`new`): a split
//! never allocates. The group blob and the keys are lent to the Redis client as slices of
//! one `Bytes` each, and taken back with `try_release`, as a batch's own blob is
//! (`pipeline/batch.rs`).

use std::ops::Range;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::limits::{BATCH_RECORD_BYTES_MAX, MARKER_KEY_BYTES_MAX, STREAM_KEY_BYTES_MAX};
use crate::redis::store::Outcome;

/// One event of the batch, as the split found it.
#[derive(Clone, Copy, Debug)]
struct Span {
    partition: u32,
    /// The event's index in the batch.
    event: u32,
    /// Its record in the batch's blob.
    record: (u32, u32),
    /// Its marker key in the keys buffer.
    marker: (u32, u32),
}

/// One partition's events: one script call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub partition: u32,
    /// Its events' positions in the split order (`spans`, `outcomes`).
    pub positions: Range<usize>,
    /// Its records in the group blob.
    blob: Range<usize>,
    /// Its stream key in the keys buffer.
    stream: Range<usize>,
}

/// The split of one batch; owned by the batch, allocated with it.
pub struct Groups {
    spans: Vec<Span>,
    groups: Vec<Group>,
    blob: BytesMut,
    keys: BytesMut,
    /// The buffers as lent to the client, from `split` until `finish`.
    lent: Option<(Bytes, Bytes)>,
    /// True from `split` until the client let go of both buffers.
    held: bool,
    /// Redis's outcome per event, in split order; a failed group's events stay `Failed`.
    outcomes: Vec<Outcome>,
    events_max: usize,
}

/// One group call, as a lane makes it (`pipeline/sink.rs`): the group's records and keys,
/// as handles on the split's lent buffers, its nonce and the batch's deadline. Allocated
/// once per lane; `prepare` refills it without allocating.
pub struct GroupJob {
    group: usize,
    nonce: u64,
    event_count: usize,
    deadline: Instant,
    blob: Bytes,
    keys: Bytes,
    /// The declared keys in `keys`: the stream key, then one marker per event.
    key_ranges: Vec<(u32, u32)>,
}

impl GroupJob {
    pub fn new(events_max: usize) -> GroupJob {
        GroupJob {
            group: 0,
            nonce: 0,
            event_count: 0,
            deadline: Instant::now(),
            blob: Bytes::new(),
            keys: Bytes::new(),
            key_ranges: Vec::with_capacity(1 + events_max),
        }
    }

    /// The group's index in its split.
    pub fn group(&self) -> usize {
        self.group
    }

    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    pub(crate) fn event_count(&self) -> usize {
        self.event_count
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(crate) fn blob(&self) -> &Bytes {
        &self.blob
    }

    /// The script's KEYS: built for each attempt (a `NOSCRIPT` reload sends twice), as
    /// handles on the lent keys buffer.
    pub(crate) fn keys(&self) -> Vec<fred::types::Key> {
        self.key_ranges
            .iter()
            .map(|&(start, end)| fred::types::Key::from(self.keys.slice(start as usize..end as usize)))
            .collect()
    }

    /// The group's stream key (`KEYS[1]`): its hash slot is the call's.
    pub(crate) fn stream_key(&self) -> &[u8] {
        let (start, end) = self.key_ranges[0];
        &self.keys[start as usize..end as usize]
    }

    /// The call's hash slot: its keys share one hash tag, so the stream key's slot.
    pub(crate) fn slot(&self) -> u16 {
        fred::util::redis_keyslot(self.stream_key())
    }

    /// Drops the job's handles on the split's buffers, so that the batch can take them back.
    pub fn release(&mut self) {
        self.blob = Bytes::new();
        self.keys = Bytes::new();
    }
}

/// Why a blob could not be split. Never expected: the shard wrote the blob.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedBlob;

impl Groups {
    pub fn new(events_max: usize) -> Groups {
        Groups {
            spans: Vec::with_capacity(events_max),
            groups: Vec::with_capacity(events_max),
            blob: BytesMut::with_capacity(Self::blob_bytes(events_max)),
            keys: BytesMut::with_capacity(Self::keys_bytes(events_max)),
            lent: None,
            held: false,
            outcomes: Vec::with_capacity(events_max),
            events_max,
        }
    }

    fn blob_bytes(events_max: usize) -> usize {
        events_max * BATCH_RECORD_BYTES_MAX
    }

    /// One marker per event, and at most one stream key per event (a group per event).
    fn keys_bytes(events_max: usize) -> usize {
        events_max * (MARKER_KEY_BYTES_MAX + STREAM_KEY_BYTES_MAX)
    }

    /// Splits `event_count` records of `blob` by partition, with keys under `prefix`.
    /// Never allocates: `blob` holds at most `events_max` records, as the batch guarantees.
    pub fn split(&mut self, prefix: &[u8], blob: &[u8], event_count: usize) -> Result<(), MalformedBlob> {
        assert!(!self.held, "a held split is not reused");
        assert!(event_count <= self.events_max);
        assert!(prefix.len() <= crate::limits::PREFIX_BYTES_MAX);
        self.spans.clear();
        self.groups.clear();
        self.blob.clear();
        self.keys.clear();
        let mut offset = 0;
        for event in 0..event_count {
            let fields = read_record(blob, offset).ok_or(MalformedBlob)?;
            let partition = parse_partition(&blob[fields.partition.clone()]).ok_or(MalformedBlob)?;
            self.spans.push(Span {
                partition,
                event: event as u32,
                record: (offset as u32, fields.end as u32),
                marker: (0, 0),
            });
            offset = fields.end;
        }
        if offset != blob.len() {
            return Err(MalformedBlob);
        }
        // In place and without allocating; (partition, event) is unique, so the order is total.
        self.spans.sort_unstable_by_key(|span| (span.partition, span.event));
        let mut position = 0;
        while position < self.spans.len() {
            let partition = self.spans[position].partition;
            let first = position;
            let blob_start = self.blob.len();
            let stream_start = self.keys.len();
            let first_record = &blob[self.spans[first].record.0 as usize..self.spans[first].record.1 as usize];
            let partition_text = &first_record[1..1 + first_record[0] as usize];
            put_key(&mut self.keys, prefix, partition_text, b"}:events", &[]);
            let stream = stream_start..self.keys.len();
            while position < self.spans.len() && self.spans[position].partition == partition {
                let (start, end) = self.spans[position].record;
                let record = &blob[start as usize..end as usize];
                self.blob.put_slice(record);
                let fields = read_record(record, 0).ok_or(MalformedBlob)?;
                let marker_start = self.keys.len();
                put_key(
                    &mut self.keys,
                    prefix,
                    partition_text,
                    b"}:seen:",
                    &[&record[fields.player], b":", &record[fields.seq]],
                );
                self.spans[position].marker = (marker_start as u32, self.keys.len() as u32);
                position += 1;
            }
            self.groups.push(Group {
                partition,
                positions: first..position,
                blob: blob_start..self.blob.len(),
                stream,
            });
        }
        debug_assert!(self.blob.len() <= Self::blob_bytes(self.events_max));
        debug_assert!(self.keys.len() <= Self::keys_bytes(self.events_max));
        self.outcomes.clear();
        self.outcomes.resize(event_count, Outcome::Failed);
        self.held = true;
        self.lent = Some((self.blob.split().freeze(), self.keys.split().freeze()));
        Ok(())
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// A group's records, as the script's blob argument: a slice of the lent buffer. The
    /// tests read a group through it; the calls take theirs through `prepare`.
    #[cfg(test)]
    pub fn blob_of(&self, group: &Group) -> Bytes {
        self.lent_buffers().0.slice(group.blob.clone())
    }

    /// A group's keys, as the script's KEYS: its stream key, then each event's marker.
    #[cfg(test)]
    pub fn keys_of(&self, group: &Group) -> Vec<fred::types::Key> {
        let keys = &self.lent_buffers().1;
        let mut declared = Vec::with_capacity(1 + group.positions.len());
        declared.push(fred::types::Key::from(keys.slice(group.stream.clone())));
        for span in &self.spans[group.positions.clone()] {
            declared.push(fred::types::Key::from(
                keys.slice(span.marker.0 as usize..span.marker.1 as usize),
            ));
        }
        declared
    }

    /// Fills `job` for group `index`: its records, keys, `nonce` and `deadline`.
    pub fn prepare(&self, index: usize, nonce: u64, deadline: Instant, job: &mut GroupJob) {
        let group = &self.groups[index];
        let (blob, keys) = self.lent_buffers();
        job.group = index;
        job.nonce = nonce;
        job.deadline = deadline;
        job.event_count = group.positions.len();
        job.blob = blob.slice(group.blob.clone());
        job.keys = keys.clone();
        job.key_ranges.clear();
        job.key_ranges
            .push((group.stream.start as u32, group.stream.end as u32));
        job.key_ranges
            .extend(self.spans[group.positions.clone()].iter().map(|span| span.marker));
        debug_assert!(job.key_ranges.len() <= job.key_ranges.capacity());
    }

    fn lent_buffers(&self) -> &(Bytes, Bytes) {
        self.lent.as_ref().expect("split before the calls")
    }

    /// Where a group's reply goes: its events' outcomes, in split order.
    pub fn outcomes_of(&mut self, group_index: usize) -> &mut [Outcome] {
        let positions = self.groups[group_index].positions.clone();
        &mut self.outcomes[positions]
    }

    /// Puts every event's outcome at its place in the batch: `merged[event]`.
    pub fn merge(&self, merged: &mut Vec<Outcome>) {
        merged.clear();
        merged.resize(self.spans.len(), Outcome::Failed);
        for (span, &outcome) in self.spans.iter().zip(&self.outcomes) {
            merged[span.event as usize] = outcome;
        }
    }

    /// Drops this split's handles on the lent buffers; the client may still hold its own.
    pub fn finish(&mut self) {
        self.lent = None;
        self.spans.clear();
        self.groups.clear();
        self.outcomes.clear();
    }

    /// Takes back both buffers once the client has let go of them; false while it holds
    /// either. Never allocates.
    pub fn try_release(&mut self) -> bool {
        if !self.held {
            return true;
        }
        debug_assert!(self.lent.is_none(), "finish before release");
        self.blob.clear();
        self.keys.clear();
        if !self.blob.try_reclaim(Self::blob_bytes(self.events_max))
            || !self.keys.try_reclaim(Self::keys_bytes(self.events_max))
        {
            return false;
        }
        self.held = false;
        true
    }
}

/// Where one record's fields are, relative to the slice read.
struct Fields {
    partition: Range<usize>,
    player: Range<usize>,
    seq: Range<usize>,
    end: usize,
}

/// Reads the record at `offset` (`script.rs`, "The blob"); `None` if it does not fit.
fn read_record(blob: &[u8], offset: usize) -> Option<Fields> {
    let mut at = offset;
    let mut field = || -> Option<Range<usize>> {
        let length = *blob.get(at)? as usize;
        let range = at + 1..at + 1 + length;
        blob.get(range.clone())?;
        at = range.end;
        Some(range)
    };
    let partition = field()?;
    let player = field()?;
    let seq = field()?;
    for _type_ts_recv in 0..3 {
        field()?;
    }
    let payload_length = u16::from_le_bytes([*blob.get(at)?, *blob.get(at + 1)?]) as usize;
    let end = at + 2 + payload_length;
    blob.get(at + 2..end)?;
    Some(Fields {
        partition,
        player,
        seq,
        end,
    })
}

fn parse_partition(text: &[u8]) -> Option<u32> {
    if text.is_empty() || text.len() > 4 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        text.iter()
            .fold(0, |value, &digit| value * 10 + u32::from(digit - b'0')),
    )
}

/// `<prefix>:{<partition>` then `middle` then `tail`: the layout of protocol.md.
fn put_key(keys: &mut BytesMut, prefix: &[u8], partition: &[u8], middle: &[u8], tail: &[&[u8]]) {
    keys.put_slice(prefix);
    keys.put_slice(b":{");
    keys.put_slice(partition);
    keys.put_slice(middle);
    for part in tail {
        keys.put_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::script::{append_record, Record};
    use proptest::prelude::*;

    fn blob_of(records: &[(u32, u64, u64)]) -> BytesMut {
        let mut blob = BytesMut::new();
        for &(partition, player_id, seq) in records {
            let payload = seq.to_le_bytes();
            append_record(
                &Record {
                    partition,
                    player_id,
                    seq,
                    action_type: 1,
                    client_time_us: 2,
                    recv_us: 3,
                    payload: &payload[..(seq % 9) as usize],
                },
                &mut blob,
            );
        }
        blob
    }

    fn key_text(key: &fred::types::Key) -> String {
        String::from_utf8(key.as_bytes().to_vec()).unwrap()
    }

    /// Each group holds one partition's records in arrival order, with its stream key and
    /// one marker per event, named as protocol.md says.
    #[test]
    fn groups_by_partition_with_their_keys() {
        let blob = blob_of(&[(3, 19, 1), (0, 16, 2), (3, 35, 3)]);
        let mut groups = Groups::new(4);
        groups.split(b"sg", &blob, 3).unwrap();
        let found: Vec<(u32, usize)> = groups
            .groups()
            .iter()
            .map(|group| (group.partition, group.positions.len()))
            .collect();
        assert_eq!(found, vec![(0, 1), (3, 2)]);
        let keys: Vec<String> = groups
            .keys_of(&groups.groups()[1].clone())
            .iter()
            .map(key_text)
            .collect();
        assert_eq!(keys, vec!["sg:{3}:events", "sg:{3}:seen:19:1", "sg:{3}:seen:35:3"]);
        let expected = blob_of(&[(3, 19, 1), (3, 35, 3)]);
        assert_eq!(&groups.blob_of(&groups.groups()[1].clone())[..], &expected[..]);
        groups.finish();
        assert!(groups.try_release());
    }

    /// The lent buffers come back only once every slice handed out is dropped.
    #[test]
    fn held_until_the_client_lets_go() {
        let blob = blob_of(&[(1, 1, 1)]);
        let mut groups = Groups::new(2);
        groups.split(b"sg", &blob, 1).unwrap();
        let group = groups.groups()[0].clone();
        let lent = groups.blob_of(&group);
        let keys = groups.keys_of(&group);
        groups.finish();
        assert!(!groups.try_release());
        drop(lent);
        assert!(!groups.try_release());
        drop(keys);
        assert!(groups.try_release());
        groups.split(b"sg", &blob, 1).unwrap();
    }

    /// A full batch of the largest records, each its own partition, under the longest
    /// prefix, splits within the buffers allocated at start: none grows or moves.
    #[test]
    fn the_worst_batch_fits_the_buffers_allocated_at_start() {
        use crate::limits::PREFIX_BYTES_MAX;
        use crate::wire::frame::PAYLOAD_BYTES_MAX;
        let events_max = 8;
        let payload = [7u8; PAYLOAD_BYTES_MAX];
        let mut blob = BytesMut::new();
        for index in 0..events_max {
            append_record(
                &Record {
                    partition: 9_999 - index as u32,
                    player_id: u64::MAX - index as u64,
                    seq: u64::MAX,
                    action_type: u16::MAX,
                    client_time_us: u64::MAX,
                    recv_us: u64::MAX,
                    payload: &payload,
                },
                &mut blob,
            );
        }
        let prefix = [b'p'; PREFIX_BYTES_MAX];
        let mut groups = Groups::new(events_max);
        let capacities = |groups: &Groups| {
            (
                groups.spans.capacity(),
                groups.groups.capacity(),
                groups.blob.capacity(),
                groups.keys.capacity(),
                groups.outcomes.capacity(),
            )
        };
        let before = capacities(&groups);
        let (blob_start, keys_start) = (groups.blob.as_ptr(), groups.keys.as_ptr());
        groups.split(&prefix, &blob, events_max).unwrap();
        assert_eq!(groups.groups().len(), events_max);
        let (lent_blob, lent_keys) = groups.lent_buffers().clone();
        assert_eq!(lent_blob.as_ptr(), blob_start, "the blob was not moved");
        assert_eq!(lent_keys.as_ptr(), keys_start, "the keys were not moved");
        assert_eq!(lent_blob.len(), blob.len());
        drop((lent_blob, lent_keys));
        let mut job = GroupJob::new(events_max);
        let job_capacity = job.key_ranges.capacity();
        groups.prepare(0, 1, Instant::now(), &mut job);
        assert_eq!(job.key_ranges.capacity(), job_capacity);
        job.release();
        groups.finish();
        assert!(groups.try_release());
        assert_eq!(capacities(&groups).0, before.0);
        assert_eq!(capacities(&groups).1, before.1);
        assert_eq!(capacities(&groups).4, before.4);
        assert!(groups.blob.capacity() >= before.2 && groups.keys.capacity() >= before.3);
        assert_eq!(groups.blob.as_ptr(), blob_start, "the same buffer came back");
    }

    #[test]
    fn a_malformed_blob_is_refused() {
        let blob = blob_of(&[(1, 1, 1), (2, 2, 2)]);
        let mut groups = Groups::new(2);
        assert_eq!(groups.split(b"sg", &blob[..blob.len() - 1], 2), Err(MalformedBlob));
        let mut groups = Groups::new(3);
        assert_eq!(groups.split(b"sg", &blob, 1), Err(MalformedBlob), "trailing bytes");
    }

    proptest! {
        /// Whatever the partition mix, every event's outcome comes back to that event: each
        /// group answers with outcomes derived from its own events' ids, and after the merge
        /// event `i` holds the outcome its own id gives, and each group's keys are its own.
        #[test]
        fn outcomes_land_on_their_own_events(
            events in proptest::collection::vec((0u32..6, 0u64..1_000, 0u64..u64::MAX), 1..64)
        ) {
            let blob = blob_of(&events);
            let mut groups = Groups::new(64);
            groups.split(b"p", &blob, events.len()).unwrap();
            let outcome_of = |player: u64, seq: u64| match (player ^ seq) % 3 {
                0 => Outcome::Appended,
                1 => Outcome::AlreadyStored,
                _ => Outcome::Failed,
            };
            let mut seen = 0;
            for index in 0..groups.groups().len() {
                let group = groups.groups()[index].clone();
                let keys: Vec<String> = groups.keys_of(&group).iter().map(key_text).collect();
                prop_assert_eq!(&keys[0], &format!("p:{{{}}}:events", group.partition));
                let mut answers = Vec::new();
                for marker in &keys[1..] {
                    let tail = marker.strip_prefix(&format!("p:{{{}}}:seen:", group.partition)).unwrap();
                    let (player, seq) = tail.split_once(':').unwrap();
                    answers.push(outcome_of(player.parse().unwrap(), seq.parse().unwrap()));
                }
                seen += answers.len();
                groups.outcomes_of(index).copy_from_slice(&answers);
            }
            prop_assert_eq!(seen, events.len());
            let mut merged = Vec::new();
            groups.merge(&mut merged);
            for (&(_, player, seq), outcome) in events.iter().zip(&merged) {
                prop_assert_eq!(*outcome, outcome_of(player, seq));
            }
            let partitions: Vec<u32> = groups.groups().iter().map(|group| group.partition).collect();
            let mut distinct: Vec<u32> = events.iter().map(|event| event.0).collect();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(partitions, distinct);
        }
    }
}
