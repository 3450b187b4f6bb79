//! The atomic dedup-and-append script, and the batch blob it reads.
//!
//! One `EVALSHA` carries a whole batch. Measured with redis-benchmark -P 64, a
//! script call costs about as much as three plain commands, so the per-call
//! cost has to be spread over many events. The events travel as one binary
//! blob argument rather than five arguments each: fred then encodes four
//! arguments per call instead of thousands, and the shard builds the blob in a
//! buffer it reuses, without allocating per event.
//!
//! # The blob
//! Records back to back, one per event, each
//! `[u8 len][partition][u8 len][player][u8 len][seq][u8 len][type][u8 len][ts][u8 len][recv_us][u16 LE len][payload]`
//! with every number in decimal ASCII, which is how the stream stores it. Lua
//! numbers are doubles and cannot hold a u64, so the script never turns them
//! into numbers: it only concatenates strings. `struct.unpack`'s `c0` reads a
//! string whose length is the integer just before it: one C call per event.
//!
//! # The script, per event
//! `SET <prefix>:{p}:seen:<player>:<seq> 1 NX EX <window>`. If it was set, the
//! event is new: `XADD <prefix>:{p}:events * player .. payload ..`. Both run
//! under `pcall`, so one event's error is that event's alone (protocol
//! revision 2): a failed SET leaves no marker, a failed XADD deletes the
//! marker it just set, and the event's outcome is `E`. The other events of the
//! batch are stored as usual. Each event is therefore both marked and appended,
//! or neither.
//!
//! # The reply
//! One string: the call's nonce, a space, one byte per event (`A` appended:
//! ACCEPTED; `D` already marked: DUPLICATE; `E` failed: RETRY), then for each
//! failed event a line `\n<index> <key> <error>`. The nonce is the shard's
//! count of calls, echoed so that a reply is matched to its call by more than
//! its length (the project once met a client bug that reordered replies).
//!
//! # KEYS
//! On a standalone Redis one call carries a whole batch, over several partitions, and
//! declares no key: Redis allows that. On a Redis Cluster (`groups.rs`) one call carries the
//! events of one partition, so every key it touches is under one hash tag, and it declares
//! them all: `KEYS[1]` is the stream key, `KEYS[1 + i]` the marker of event `i`. Declared, the
//! keys route the call to the node that owns the slot, and they let Redis refuse the call
//! (ASK, TRYAGAIN) while the slot is being migrated and some of its keys have moved: with
//! only the stream key declared, a call could run on the node the stream moved to while the
//! event's marker still sits on the other one, and store a resent event twice. The script
//! still builds every key itself, from the blob, so the layout has one source; with KEYS
//! given it checks each event's keys against the declared ones (a Lua string comparison is a
//! pointer comparison), and an event whose keys were not declared fails alone (`E`). The same
//! text serves both modes.

use bytes::{BufMut, BytesMut};

use crate::limits::BATCH_RECORD_BYTES_MAX;
use crate::wire::frame::PAYLOAD_BYTES_MAX;

/// ARGV: prefix, window seconds, event count, blob, nonce, and under `--durability replica`
/// a sixth, `1`. KEYS: none on a standalone Redis; on a cluster the group's stream key, then
/// each event's marker key, in blob order.
///
/// With ARGV[6] = `1`, a call that wrote nothing but found a marker (only `D` and `E`) sets
/// the last such marker again, unchanged (`SET .. XX KEEPTTL`): a write, so that the `WAIT`
/// that follows the call (`store.rs`) covers the replication stream up to this call, and
/// with it the earlier copy's write that the `D` answers rest on, which may have been made on
/// another connection after this connection's last write. A call that appended wrote already.
pub const DEDUP_APPEND_LUA: &str = r#"
local prefix = ARGV[1]
local window_secs = ARGV[2]
local count = tonumber(ARGV[3])
local blob = ARGV[4]
local declared = #KEYS > 0
local confirm = ARGV[6] == '1'
local wrote = false
local found_marker
local outcomes = {}
local failures = {}
local position = 1
local markers = {}
local streams = {}
for index = 1, count do
  local partition, player, seq, action_type, ts, recv_us, payload
  partition, player, seq, action_type, ts, recv_us, payload, position =
    struct.unpack('<Bc0Bc0Bc0Bc0Bc0Bc0I2c0', blob, position)
  local marker_prefix = markers[partition]
  if not marker_prefix then
    marker_prefix = prefix .. ':{' .. partition .. '}:seen:'
    markers[partition] = marker_prefix
    streams[partition] = prefix .. ':{' .. partition .. '}:events'
  end
  local marker = marker_prefix .. player .. ':' .. seq
  local marked
  if declared and (KEYS[index + 1] ~= marker or KEYS[1] ~= streams[partition]) then
    marked = { err = 'ERR key not declared in KEYS' }
  else
    marked = redis.pcall('SET', marker, '1', 'NX', 'EX', window_secs)
  end
  if type(marked) == 'table' and marked.err then
    outcomes[index] = 'E'
    failures[#failures + 1] = (index - 1) .. ' ' .. marker .. ' ' .. marked.err
  elseif marked then
    local stream = streams[partition]
    local appended = redis.pcall('XADD', stream, '*', 'player', player, 'seq', seq,
      'type', action_type, 'ts', ts, 'recv_us', recv_us, 'payload', payload)
    wrote = true
    if type(appended) == 'table' and appended.err then
      redis.call('DEL', marker)
      outcomes[index] = 'E'
      failures[#failures + 1] = (index - 1) .. ' ' .. stream .. ' ' .. appended.err
    else
      outcomes[index] = 'A'
    end
  else
    outcomes[index] = 'D'
    found_marker = marker
  end
end
if position ~= #blob + 1 then
  return redis.error_reply('batch blob has trailing bytes')
end
if confirm and not wrote and found_marker then
  redis.pcall('SET', found_marker, '1', 'XX', 'KEEPTTL')
end
local reply = ARGV[5] .. ' ' .. table.concat(outcomes)
if #failures > 0 then
  reply = reply .. '\n' .. table.concat(failures, '\n')
end
return reply
"#;

/// Records the prefix's partition count the first time, and returns the
/// count recorded (protocol revision 2: the count is part of the data).
/// KEYS: the count's key. ARGV: this server's count.
pub(crate) const PARTITIONS_LUA: &str = r#"
local recorded = redis.call('GET', KEYS[1])
if not recorded then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return recorded
"#;

/// The key holding a prefix's partition count. It carries no hash tag: it is
/// read once per connection, by a call of its own.
pub(crate) fn partitions_key(prefix: &str) -> String {
    format!("{prefix}:partitions")
}

/// Outcome bytes of the script's reply.
pub const OUTCOME_APPENDED: u8 = b'A';
pub const OUTCOME_ALREADY_STORED: u8 = b'D';
pub(crate) const OUTCOME_FAILED: u8 = b'E';

/// One event's fields as the script stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub partition: u32,
    pub player_id: u64,
    pub seq: u64,
    pub action_type: u16,
    pub client_time_us: u64,
    pub recv_us: u64,
    pub payload: &'a [u8],
}

/// Appends one record to the blob. Never allocates when `blob` has
/// `BATCH_RECORD_BYTES_MAX` spare capacity, which the batch guarantees.
pub fn append_record(record: &Record<'_>, blob: &mut BytesMut) {
    assert!(
        record.payload.len() <= PAYLOAD_BYTES_MAX,
        "frames were checked before batching"
    );
    let length_before = blob.len();
    append_decimal(u64::from(record.partition), blob);
    append_decimal(record.player_id, blob);
    append_decimal(record.seq, blob);
    append_decimal(u64::from(record.action_type), blob);
    append_decimal(record.client_time_us, blob);
    append_decimal(record.recv_us, blob);
    blob.put_u16_le(record.payload.len() as u16);
    blob.put_slice(record.payload);
    debug_assert!(blob.len() - length_before <= BATCH_RECORD_BYTES_MAX);
}

fn append_decimal(value: u64, blob: &mut BytesMut) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(value).as_bytes();
    debug_assert!(digits.len() <= 20);
    blob.put_u8(digits.len() as u8);
    blob.put_slice(digits);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record layout is the one the script's struct.unpack format reads.
    #[test]
    fn record_layout() {
        let mut blob = BytesMut::new();
        let record = Record {
            partition: 3,
            player_id: u64::MAX,
            seq: 42,
            action_type: 7,
            client_time_us: 0,
            recv_us: 5,
            payload: b"ab",
        };
        append_record(&record, &mut blob);
        let mut expected = Vec::new();
        expected.extend_from_slice(b"\x013\x1418446744073709551615\x0242\x017\x010\x015");
        expected.extend_from_slice(&[2, 0]);
        expected.extend_from_slice(b"ab");
        assert_eq!(&blob[..], &expected[..]);
    }

    /// The largest record fits the bound every batch reserves per event.
    #[test]
    fn largest_record_fits_bound() {
        let payload = [0u8; PAYLOAD_BYTES_MAX];
        let record = Record {
            partition: 9_999,
            player_id: u64::MAX,
            seq: u64::MAX,
            action_type: u16::MAX,
            client_time_us: u64::MAX,
            recv_us: u64::MAX,
            payload: &payload,
        };
        let mut blob = BytesMut::new();
        append_record(&record, &mut blob);
        assert_eq!(blob.len(), BATCH_RECORD_BYTES_MAX);
    }
}
