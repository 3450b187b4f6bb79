//! What landed in Redis: strict readers of the event streams and the checks against what was sent.

use std::collections::{HashMap, HashSet};

use super::basics::hex;
use super::events::{Event, Key};

/// One stream entry, strictly parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub player: u64,
    pub seq: u64,
    pub action_type: u16,
    pub client_time_us: u64,
    pub recv_us: u64,
    pub payload: Vec<u8>,
    pub partition: u64,
    pub stream_key: String,
    pub entry_id: String,
}

impl StoredEvent {
    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }
}

fn bulk(v: &redis::Value, what: &str) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b.clone(),
        redis::Value::SimpleString(s) => s.as_bytes().to_vec(),
        other => panic!("{what}: expected a bulk string, got {other:?}"),
    }
}

fn decimal<T: std::str::FromStr>(bytes: &[u8], what: &str) -> T {
    let s = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("{what}: not UTF-8: {}", hex(bytes)));
    assert!(
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0')),
        "{what}: not canonical decimal ASCII: {s:?}"
    );
    s.parse().unwrap_or_else(|_| panic!("{what}: out of range: {s:?}"))
}

/// Every entry of `<prefix>:{p}:events` for p in 0..partitions (XRANGE - +, paged).
/// Panics on an entry whose fields are not exactly player, seq, type, ts, recv_us, payload.
pub fn read_events(conn: &mut redis::Connection, prefix: &str, partitions: u64) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    for p in 0..partitions {
        out.extend(read_stream(conn, &format!("{prefix}:{{{p}}}:events"), p));
    }
    out
}

/// Every entry of one stream `key` of partition `partition` (XRANGE - +, paged), strictly parsed.
pub fn read_stream(conn: &mut redis::Connection, key: &str, partition: u64) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
        let redis::Value::Array(entries) = v else {
            panic!("XRANGE {key}: expected an array, got {v:?}");
        };
        if entries.is_empty() {
            break;
        }
        for entry in &entries {
            let (id, ev) = parse_entry(entry, key, partition);
            start = format!("({id}");
            out.push(ev);
        }
        if entries.len() < 1000 {
            break;
        }
    }
    out
}

fn parse_entry(entry: &redis::Value, key: &str, partition: u64) -> (String, StoredEvent) {
    let redis::Value::Array(parts) = entry else {
        panic!("{key}: entry is not an array: {entry:?}");
    };
    assert_eq!(parts.len(), 2, "{key}: entry is not [id, fields]: {entry:?}");
    let id = String::from_utf8(bulk(&parts[0], "entry id")).expect("utf-8 id");
    let redis::Value::Array(fields) = &parts[1] else {
        panic!("{key} {id}: fields are not an array: {:?}", parts[1]);
    };
    assert!(fields.len() % 2 == 0, "{key} {id}: odd field list");
    let mut map: HashMap<String, Vec<u8>> = HashMap::new();
    for pair in fields.chunks(2) {
        let name = String::from_utf8(bulk(&pair[0], "field name")).expect("utf-8 field name");
        let value = bulk(&pair[1], &name);
        assert!(
            map.insert(name.clone(), value).is_none(),
            "{key} {id}: field {name:?} appears twice"
        );
    }
    let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["payload", "player", "recv_us", "seq", "ts", "type"],
        "{key} {id}: the entry's fields are not exactly player, seq, type, ts, recv_us, payload"
    );
    let ctx = |f: &str| format!("{key} {id} field {f}");
    let ev = StoredEvent {
        player: decimal(&map["player"], &ctx("player")),
        seq: decimal(&map["seq"], &ctx("seq")),
        action_type: decimal(&map["type"], &ctx("type")),
        client_time_us: decimal(&map["ts"], &ctx("ts")),
        recv_us: decimal(&map["recv_us"], &ctx("recv_us")),
        payload: map["payload"].clone(),
        partition,
        stream_key: key.to_string(),
        entry_id: id.clone(),
    };
    (id, ev)
}

/// Every key of type stream in the database.
pub fn stream_keys(conn: &mut redis::Connection) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    for _ in 0..100_000 {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query(conn)
            .expect("SCAN TYPE stream");
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Checks what landed in Redis against what was sent:
/// - no event id is stored twice;
/// - every stored event is one of `sent`, with exactly its type, ts and payload, in partition
///   `player % partitions`, and (when given) a recv_us inside `recv_window`;
/// - every id in `must_have` is stored.
///
/// Returns the set of stored ids.
pub fn check_stored(
    stored: &[StoredEvent],
    sent: &[Event],
    must_have: &HashSet<Key>,
    partitions: u64,
    recv_window: Option<(u64, u64)>,
    ctx: &str,
) -> HashSet<Key> {
    let by_key: HashMap<Key, &Event> = sent.iter().map(|e| (e.key(), e)).collect();
    let mut seen: HashMap<Key, Vec<&StoredEvent>> = HashMap::new();
    for s in stored {
        seen.entry(s.key()).or_default().push(s);
    }
    let mut twice: Vec<_> = seen
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| {
            (
                *k,
                v.iter()
                    .map(|s| format!("{} {}", s.stream_key, s.entry_id))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    twice.sort();
    assert!(
        twice.is_empty(),
        "{ctx}: {} event ids are stored more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    for s in stored {
        let Some(e) = by_key.get(&s.key()) else {
            panic!(
                "{ctx}: stored event {:?} was never sent as a valid frame ({} {})",
                s.key(),
                s.stream_key,
                s.entry_id
            );
        };
        assert_eq!(
            s.partition,
            s.player % partitions,
            "{ctx}: event {:?} is in {}, not partition player % {partitions}",
            s.key(),
            s.stream_key
        );
        assert_eq!(s.action_type, e.action_type, "{ctx}: type of {:?}", s.key());
        assert_eq!(s.client_time_us, e.client_time_us, "{ctx}: ts of {:?}", s.key());
        assert!(
            s.payload == e.payload,
            "{ctx}: payload of {:?} differs: stored {} bytes {}.., sent {} bytes {}..",
            s.key(),
            s.payload.len(),
            hex(&s.payload[..s.payload.len().min(32)]),
            e.payload.len(),
            hex(&e.payload[..e.payload.len().min(32)])
        );
        if let Some((lo, hi)) = recv_window {
            assert!(
                (lo..=hi).contains(&s.recv_us),
                "{ctx}: recv_us {} of {:?} is outside the test's run [{lo}, {hi}]",
                s.recv_us,
                s.key()
            );
        }
    }
    let stored_keys: HashSet<Key> = seen.keys().copied().collect();
    let mut missing: Vec<Key> = must_have.difference(&stored_keys).copied().collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{ctx}: {} event ids that must be stored are not in Redis, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    stored_keys
}
