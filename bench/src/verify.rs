//! After the run: read what the server stored and hold it against what was sent and acked.
//!
//! Every partition stream `<prefix>:{p}:events` is read with XRANGE in pages, from the run's
//! start on Redis's own clock (stream ids are Redis's milliseconds, so nothing this run stored
//! can be older; earlier runs against the prefix, such as a sweep's earlier steps, are not read
//! again). Only entries whose `(player, seq)` this run sent count; anything else (earlier runs,
//! other writers) is skipped.
//!
//! With `--redis redis-cluster://...` the streams are spread over the cluster's masters (each
//! partition's keys share the hash tag `{p}`, so each stream is one slot): the slot map
//! (`CLUSTER SLOTS`) says which master serves each stream's slot, and each stream is read there,
//! so every master is read. The run's start is the earliest of the masters' clocks.
//!
//! The ids a run sent are exactly, per player, the seqs just above the run's `seq_base` up to
//! that player's count (see `events.rs`), so each one has a dense index: the player's offset
//! plus its seq's distance from the base. Bit sets over that index say, per id, whether it was
//! seen once or twice; a few bits per event instead of a hash set of millions of ids.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;
use shardgate_proto::frame::EventId;

/// Entries per XRANGE call: large enough to keep round trips few, small enough that one reply
/// stays a few megabytes.
const PAGE_ENTRIES: usize = 10_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How far before the run's start (on Redis's clock) reading begins: room for Redis's clock to
/// be stepped back a little during the run, which could give an entry an older id.
const START_MARGIN_MS: u64 = 1_000;

/// What Redis holds of this run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Stream entries whose id this run sent (an id stored twice counts twice).
    pub stored: u64,
    /// Ids present more than once.
    pub stored_twice: u64,
    /// Ids answered ACCEPTED or DUPLICATE that no stream holds.
    pub acked_missing: u64,
    /// Distinct events (fresh ids) this run sent.
    pub events: u64,
    /// Of those, how many no stream holds (acked or not).
    pub events_not_stored: u64,
    /// Entries read that were not this run's, or whose fields could not be read.
    pub foreign_entries: u64,
}

/// The exact set of ids a run sent, with a dense index for each.
pub struct Ledger {
    seq_base: u64,
    /// `offsets[p - 1]` is the index of player p's first event; the last entry is the total.
    offsets: Vec<u64>,
}

impl Ledger {
    /// `sent_per_player[p - 1]` fresh events of player p, with seqs `seq_base + 1 ..`.
    pub fn new(seq_base: u64, sent_per_player: &[u64]) -> Ledger {
        let mut offsets = Vec::with_capacity(sent_per_player.len() + 1);
        let mut total = 0u64;
        offsets.push(0);
        for &sent in sent_per_player {
            total += sent;
            offsets.push(total);
        }
        Ledger { seq_base, offsets }
    }

    pub fn events(&self) -> u64 {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// The id's index if this run sent it.
    fn index_of(&self, id: EventId) -> Option<usize> {
        let player_index = usize::try_from(id.player_id.checked_sub(1)?).ok()?;
        let (first, end) = (*self.offsets.get(player_index)?, *self.offsets.get(player_index + 1)?);
        let distance = id.seq.checked_sub(self.seq_base)?.checked_sub(1)?;
        let index = first.checked_add(distance)?;
        (index < end).then(|| usize::try_from(index).ok()).flatten()
    }
}

struct Bits(Vec<u64>);

impl Bits {
    fn new(count: usize) -> Bits {
        Bits(vec![0; count.div_ceil(64)])
    }

    /// Sets the bit and says whether it was already set.
    fn set(&mut self, index: usize) -> bool {
        let (word, mask) = (index / 64, 1u64 << (index % 64));
        let was_set = self.0[word] & mask != 0;
        self.0[word] |= mask;
        was_set
    }

    fn get(&self, index: usize) -> bool {
        self.0[index / 64] & (1u64 << (index % 64)) != 0
    }
}

/// Counts stream entries against the ledger; pure, so it can be tested without Redis.
pub struct Checker {
    ledger: Ledger,
    seen: Bits,
    seen_twice: Bits,
    verification: Verification,
}

impl Checker {
    pub fn new(ledger: Ledger) -> Checker {
        let events = usize::try_from(ledger.events()).expect("events fit memory");
        Checker {
            seen: Bits::new(events),
            seen_twice: Bits::new(events),
            verification: Verification {
                events: ledger.events(),
                ..Verification::default()
            },
            ledger,
        }
    }

    /// One stream entry; `None` when its fields could not be read.
    pub fn entry(&mut self, id: Option<EventId>) {
        let Some(index) = id.and_then(|id| self.ledger.index_of(id)) else {
            self.verification.foreign_entries += 1;
            return;
        };
        self.verification.stored += 1;
        if self.seen.set(index) && !self.seen_twice.set(index) {
            self.verification.stored_twice += 1;
        }
    }

    /// Holds the acked ids (copies repeat an id; each id counts once) against what was seen.
    pub fn finish(self, acked_ids: &[EventId]) -> Verification {
        let mut verification = self.verification;
        let mut missing_counted = Bits::new(usize::try_from(verification.events).expect("events fit memory"));
        for &id in acked_ids {
            match self.ledger.index_of(id) {
                Some(index) if !self.seen.get(index) && !missing_counted.set(index) => {
                    verification.acked_missing += 1;
                }
                Some(_) => {}
                // An ack for an id this run never sent cannot have matched a frame.
                None => {}
            }
        }
        let distinct_stored = self.seen.0.iter().map(|word| u64::from(word.count_ones())).sum::<u64>();
        verification.events_not_stored = verification.events - distinct_stored;
        verification
    }
}

/// Where verification reads the streams: one standalone Redis, or every master of a Redis
/// Cluster.
pub enum Streams {
    Standalone(redis::Connection),
    Cluster(Cluster),
}

/// A Redis Cluster, read node by node: each partition stream from the master that serves its
/// slot. The slot map is read again for every verification (and every clock reading), so a
/// failover or a reshard during the run is followed.
pub struct Cluster {
    /// `user:password@` or empty, put before a node's `host:port`; never printed.
    userinfo: String,
    /// The url's seed nodes, `host:port`: where the slot map is asked for.
    seeds: Vec<String>,
    /// Connections opened so far, by node `host:port`.
    nodes: HashMap<String, redis::Connection>,
}

/// One range of `CLUSTER SLOTS`: slots `first..=last` served by the master at `node`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotRange {
    first: u16,
    last: u16,
    node: String,
}

const CLUSTER_SCHEME: &str = "redis-cluster://";

/// Opens what verification will use: `redis://...` a standalone Redis, `redis-cluster://
/// [user:password@]HOST:PORT[,HOST:PORT...]` a cluster (as the server's `--redis` takes them),
/// where it connects to every master. Called before the run so that a wrong URL fails fast
/// instead of after minutes of load.
pub fn connect(url: &str) -> Result<Streams, String> {
    if url.starts_with(CLUSTER_SCHEME) {
        let mut cluster = Cluster::new(url)?;
        cluster.masters()?;
        return Ok(Streams::Cluster(cluster));
    }
    connect_standalone(url).map(Streams::Standalone)
}

/// One connection to a standalone Redis (`redis://`), answering PING.
pub fn connect_standalone(url: &str) -> Result<redis::Connection, String> {
    let client = redis::Client::open(url).map_err(|error| format!("invalid --redis {url:?}: {error}"))?;
    let mut connection = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|error| format!("cannot connect to redis at {url}: {error}"))?;
    connection
        .set_read_timeout(Some(COMMAND_TIMEOUT))
        .and_then(|()| connection.set_write_timeout(Some(COMMAND_TIMEOUT)))
        .map_err(|error| format!("cannot set redis timeouts: {error}"))?;
    redis::cmd("PING")
        .query::<Value>(&mut connection)
        .map_err(|error| format!("redis at {url} does not answer PING: {error}"))?;
    Ok(connection)
}

impl Cluster {
    /// Reads the url; connects to nothing yet.
    fn new(url: &str) -> Result<Cluster, String> {
        let (userinfo, seeds) = parse_cluster_url(url)?;
        Ok(Cluster {
            userinfo,
            seeds,
            nodes: HashMap::new(),
        })
    }

    /// The connection to `node` (`host:port`), opened on first use.
    fn node(&mut self, node: &str) -> Result<&mut redis::Connection, String> {
        if !self.nodes.contains_key(node) {
            let connection = connect_standalone(&format!("redis://{}{node}", self.userinfo))
                .map_err(|_| format!("cannot connect to redis cluster node {node}"))?;
            self.nodes.insert(node.to_string(), connection);
        }
        Ok(self.nodes.get_mut(node).expect("inserted above"))
    }

    /// The slot map, from the first seed (or node seen before) that gives one whole: every
    /// slot served. A map with holes means the cluster is not `ok`.
    fn slot_map(&mut self) -> Result<Vec<SlotRange>, String> {
        let mut asked: Vec<String> = self.seeds.clone();
        asked.extend(self.nodes.keys().filter(|node| !self.seeds.contains(node)).cloned());
        let mut last_error = String::from("no seed node");
        for node in asked {
            let reply = self.node(&node).and_then(|connection| {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query::<Value>(connection)
                    .map_err(|error| format!("CLUSTER SLOTS on {node} failed: {error}"))
            });
            let host = node.rsplit_once(':').map_or("", |(host, _)| host).to_string();
            match reply.and_then(|reply| read_slot_map(reply, &host)) {
                Ok(map) if covers_every_slot(&map) => return Ok(map),
                Ok(_) => last_error = format!("node {node} has slots no master serves (cluster_state not ok?)"),
                Err(message) => last_error = message,
            }
        }
        Err(format!(
            "cannot read the slot map of the redis cluster at {}: {last_error}",
            self.seeds.join(",")
        ))
    }

    /// Every master's `host:port`, each connected.
    fn masters(&mut self) -> Result<Vec<String>, String> {
        let mut masters: Vec<String> = self.slot_map()?.into_iter().map(|range| range.node).collect();
        masters.sort();
        masters.dedup();
        for master in &masters {
            self.node(master)?;
        }
        Ok(masters)
    }
}

impl Streams {
    /// Redis's clock in milliseconds (`TIME`): taken before a run, it bounds the stream ids the
    /// run's entries can have from below. On a cluster, the earliest of the masters' clocks:
    /// each master stamps the entries it appends with its own.
    pub fn time_ms(&mut self) -> Result<u64, String> {
        match self {
            Streams::Standalone(connection) => redis_time_ms(connection),
            Streams::Cluster(cluster) => {
                let mut earliest_ms = u64::MAX;
                for master in cluster.masters()? {
                    earliest_ms = earliest_ms.min(redis_time_ms(cluster.node(&master)?)?);
                }
                Ok(earliest_ms)
            }
        }
    }
}

/// Redis's clock in milliseconds (`TIME`) on one node.
fn redis_time_ms(connection: &mut redis::Connection) -> Result<u64, String> {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME")
        .query(connection)
        .map_err(|error| format!("redis TIME failed: {error}"))?;
    Ok(seconds.saturating_mul(1_000).saturating_add(micros / 1_000))
}

/// Reads every partition stream whole and returns the verification.
pub fn verify(
    streams: &mut Streams,
    prefix: &str,
    partitions: u32,
    ledger: Ledger,
    acked_ids: &[EventId],
) -> Result<Verification, String> {
    verify_since(streams, prefix, partitions, ledger, acked_ids, None)
}

/// Reads every partition stream from `since_ms` on Redis's clock (all of it if `None`) and
/// returns the verification. On a cluster each stream is read from the master serving its
/// slot, as the slot map says now; a stream that moved meanwhile fails the read (`MOVED`)
/// rather than being skipped.
pub fn verify_since(
    streams: &mut Streams,
    prefix: &str,
    partitions: u32,
    ledger: Ledger,
    acked_ids: &[EventId],
    since_ms: Option<u64>,
) -> Result<Verification, String> {
    let mut checker = Checker::new(ledger);
    let first_id = match since_ms {
        Some(since_ms) => format!("{}-0", since_ms.saturating_sub(START_MARGIN_MS)),
        None => "-".to_string(),
    };
    let keys = (0..partitions).map(|partition| format!("{prefix}:{{{partition}}}:events"));
    match streams {
        Streams::Standalone(connection) => {
            for key in keys {
                read_stream(connection, &key, &first_id, &mut checker)?;
            }
        }
        Streams::Cluster(cluster) => {
            let map = cluster.slot_map()?;
            for key in keys {
                let node = owner_of(&map, key_slot(key.as_bytes()))
                    .ok_or_else(|| format!("no master serves the slot of {key}"))?
                    .to_string();
                read_stream(cluster.node(&node)?, &key, &first_id, &mut checker)
                    .map_err(|message| format!("{message} (on {node})"))?;
            }
        }
    }
    Ok(checker.finish(acked_ids))
}

/// Reads one stream from `first_id` on, in pages, into the checker.
fn read_stream(
    connection: &mut redis::Connection,
    key: &str,
    first_id: &str,
    checker: &mut Checker,
) -> Result<(), String> {
    let mut start = first_id.to_string();
    loop {
        let reply: Value = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE_ENTRIES)
            .query(connection)
            .map_err(|error| format!("XRANGE {key} failed: {error}"))?;
        let page = read_page(reply).map_err(|error| format!("XRANGE {key}: {error}"))?;
        for (_, id) in &page {
            checker.entry(*id);
        }
        match page.last() {
            Some((last_entry, _)) if page.len() == PAGE_ENTRIES => {
                start = entry_id_after(last_entry).ok_or_else(|| format!("{key}: bad entry id {last_entry:?}"))?;
            }
            _ => return Ok(()),
        }
    }
}

/// `redis-cluster://[user:password@]HOST:PORT[,HOST:PORT...]` as (userinfo with its `@`, or
/// empty; the seeds). The reason for a refusal names the seeds only, never the userinfo.
fn parse_cluster_url(url: &str) -> Result<(String, Vec<String>), String> {
    let rest = url
        .strip_prefix(CLUSTER_SCHEME)
        .ok_or("a cluster --redis starts with redis-cluster://")?;
    let (userinfo, seeds) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let seeds: Vec<String> = seeds.split(',').map(str::to_string).collect();
    for seed in &seeds {
        let port = seed
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .and_then(|(_, port)| port.parse::<u16>().ok());
        if port.filter(|&port| port > 0).is_none() {
            return Err(format!(
                "invalid --redis: seed node {seed:?} must be host:port with a port in 1..=65535 \
                 (redis-cluster://HOST:PORT[,HOST:PORT...])"
            ));
        }
    }
    Ok((userinfo.to_string(), seeds))
}

/// `CLUSTER SLOTS`' reply as ranges and their masters' `host:port`. A master listed with an
/// empty host is on `asked_host`, the node that answered (Redis's way of saying "me").
fn read_slot_map(reply: Value, asked_host: &str) -> Result<Vec<SlotRange>, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("CLUSTER SLOTS: expected an array, got {reply:?}"));
    };
    let mut map = Vec::with_capacity(ranges.len());
    for range in ranges {
        let malformed = || format!("CLUSTER SLOTS: a range is not [first, last, [host, port, ..], ..]: {range:?}");
        let Value::Array(parts) = &range else {
            return Err(malformed());
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(malformed());
        };
        let host = match master.first() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(Value::SimpleString(text)) => text.clone(),
            _ => return Err(malformed()),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(malformed());
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_string()
        } else {
            host
        };
        // An IPv6 address needs brackets before its port.
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        let (Ok(first), Ok(last), Ok(port)) = (u16::try_from(*first), u16::try_from(*last), u16::try_from(*port))
        else {
            return Err(malformed());
        };
        map.push(SlotRange {
            first,
            last,
            node: format!("{host}:{port}"),
        });
    }
    Ok(map)
}

/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;

fn covers_every_slot(map: &[SlotRange]) -> bool {
    let served: u32 = map
        .iter()
        .map(|range| u32::from(range.last.saturating_sub(range.first)) + 1)
        .sum();
    served >= u32::from(SLOTS)
}

/// The master serving `slot`, if any.
fn owner_of(map: &[SlotRange], slot: u16) -> Option<&str> {
    map.iter()
        .find(|range| (range.first..=range.last).contains(&slot))
        .map(|range| range.node.as_str())
}

/// The hash slot of `key`, as Redis computes it: CRC16 (XMODEM) of the hash tag (what is
/// between the first `{` and the next `}`, if not empty) or of the whole key, modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&byte| byte == b'{').and_then(|open| {
        let after = &key[open + 1..];
        let close = after.iter().position(|&byte| byte == b'}')?;
        (close > 0).then(|| &after[..close])
    });
    crc16_xmodem(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16 with polynomial 0x1021, initial value 0, no reflection: Redis Cluster's key hash.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One XRANGE reply: per entry, its stream id and the event id its fields name (if readable).
fn read_page(reply: Value) -> Result<Vec<(String, Option<EventId>)>, String> {
    let Value::Array(entries) = reply else {
        return Err(format!("expected an array, got {reply:?}"));
    };
    let mut page = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(mut parts) = entry else {
            return Err("an entry is not an array".into());
        };
        if parts.len() != 2 {
            return Err("an entry is not [id, fields]".into());
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let entry_id = match parts.pop() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Value::SimpleString(text)) => text,
            _ => return Err("an entry id is not a string".into()),
        };
        page.push((entry_id, event_id_of(&fields)));
    }
    Ok(page)
}

/// The `player` and `seq` fields of an entry, as the server writes them (decimal ASCII).
fn event_id_of(fields: &Value) -> Option<EventId> {
    let pairs: Vec<(&Value, &Value)> = match fields {
        Value::Array(items) => items.chunks_exact(2).map(|pair| (&pair[0], &pair[1])).collect(),
        Value::Map(pairs) => pairs.iter().map(|(name, value)| (name, value)).collect(),
        _ => return None,
    };
    let (mut player_id, mut seq) = (None, None);
    for (name, value) in pairs {
        let (Value::BulkString(name), Value::BulkString(value)) = (name, value) else {
            continue;
        };
        let number = || std::str::from_utf8(value).ok()?.parse::<u64>().ok();
        match name.as_slice() {
            b"player" => player_id = number(),
            b"seq" => seq = number(),
            _ => {}
        }
    }
    Some(EventId {
        player_id: player_id?,
        seq: seq?,
    })
}

/// The smallest stream id after `entry_id` (`ms-seq`), for the next page's inclusive start.
/// Computed rather than using the `(` exclusive form so that Redis older than 6.2 works too.
fn entry_id_after(entry_id: &str) -> Option<String> {
    let (millis, seq) = entry_id.split_once('-')?;
    let (millis, seq): (u64, u64) = (millis.parse().ok()?, seq.parse().ok()?);
    match seq.checked_add(1) {
        Some(next_seq) => Some(format!("{millis}-{next_seq}")),
        None => Some(format!("{}-0", millis.checked_add(1)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(player_id: u64, seq: u64) -> EventId {
        EventId { player_id, seq }
    }

    // Only this run's ids have an index; indexes are dense and distinct.
    #[test]
    fn ledger_indexes_sent_ids() {
        let ledger = Ledger::new(100, &[2, 0, 3]);
        assert_eq!(ledger.events(), 5);
        assert_eq!(ledger.index_of(id(1, 101)), Some(0));
        assert_eq!(ledger.index_of(id(1, 102)), Some(1));
        assert_eq!(ledger.index_of(id(1, 103)), None);
        assert_eq!(ledger.index_of(id(2, 101)), None);
        assert_eq!(ledger.index_of(id(3, 103)), Some(4));
        assert_eq!(ledger.index_of(id(3, 100)), None);
        assert_eq!(ledger.index_of(id(0, 101)), None);
        assert_eq!(ledger.index_of(id(4, 101)), None);
        assert_eq!(ledger.index_of(id(u64::MAX, u64::MAX)), None);
    }

    // stored counts entries, stored_twice ids seen more than once (once each), acked_missing
    // acked ids absent from the streams (once each), and foreign entries are ignored.
    #[test]
    fn checker_counts() {
        let mut checker = Checker::new(Ledger::new(0, &[3, 2]));
        for entry in [id(1, 1), id(1, 2), id(1, 2), id(1, 2), id(2, 1), id(9, 1), id(1, 99)] {
            checker.entry(Some(entry));
        }
        checker.entry(None);
        let verification = checker.finish(&[id(1, 1), id(1, 3), id(1, 3), id(2, 2), id(2, 1)]);
        assert_eq!(
            verification,
            Verification {
                stored: 5,
                stored_twice: 1,
                acked_missing: 2,
                events: 5,
                events_not_stored: 2,
                foreign_entries: 3,
            }
        );
    }

    // Reply parsing reads the fields the server writes, in any order.
    #[test]
    fn reads_pages() {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let entry = |entry_id: &str, fields: Vec<Value>| Value::Array(vec![bulk(entry_id), Value::Array(fields)]);
        let reply = Value::Array(vec![
            entry(
                "5-0",
                vec![
                    bulk("player"),
                    bulk("7"),
                    bulk("seq"),
                    bulk("9"),
                    bulk("payload"),
                    bulk("x"),
                ],
            ),
            entry("5-1", vec![bulk("seq"), bulk("3"), bulk("player"), bulk("2")]),
            entry("6-0", vec![bulk("player"), bulk("x1"), bulk("seq"), bulk("3")]),
        ]);
        let page = read_page(reply).unwrap();
        assert_eq!(page[0], ("5-0".to_string(), Some(id(7, 9))));
        assert_eq!(page[1].1, Some(id(2, 3)));
        assert_eq!(page[2].1, None);
        assert!(read_page(Value::Int(1)).is_err());
    }

    #[test]
    fn next_entry_id() {
        assert_eq!(entry_id_after("5-0").as_deref(), Some("5-1"));
        assert_eq!(entry_id_after(&format!("5-{}", u64::MAX)).as_deref(), Some("6-0"));
        assert_eq!(entry_id_after("junk"), None);
    }

    // Redis Cluster's key hash: the CRC16 check value, keys from Redis's own documentation and
    // tests, and hash tags (only the first `{...}`, and not an empty one).
    #[test]
    fn key_slots_match_redis() {
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"bar"), 5_061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), crc16_xmodem(b"{bar") % SLOTS);
        assert_eq!(key_slot(b"sg:{7}:events"), key_slot(b"sg:{7}:m:1:2"));
    }

    // The cluster url's seeds and userinfo; a seed without a port is refused without the password.
    #[test]
    fn cluster_urls() {
        assert_eq!(
            parse_cluster_url("redis-cluster://127.0.0.1:7000,h2:7001").unwrap(),
            (String::new(), vec!["127.0.0.1:7000".to_string(), "h2:7001".to_string()])
        );
        assert_eq!(
            parse_cluster_url("redis-cluster://user:secret@h1:7000").unwrap(),
            ("user:secret@".to_string(), vec!["h1:7000".to_string()])
        );
        for bad in [
            "redis-cluster://",
            "redis-cluster://user:secret@h1",
            "redis-cluster://h1:7000,",
            "redis-cluster://h1:0",
            "redis-cluster://:7000",
        ] {
            let error = parse_cluster_url(bad).unwrap_err();
            assert!(!error.contains("secret"), "{error}");
        }
    }

    // CLUSTER SLOTS ranges become nodes to read from; an empty host is the node asked; holes
    // in the map are seen.
    #[test]
    fn slot_maps() {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let range = |first: i64, last: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
                Value::Array(vec![bulk(host), Value::Int(port + 1), bulk("replica")]),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000),
            range(5461, 10922, "", 7002),
            range(10923, 16383, "::1", 7004),
        ]);
        let map = read_slot_map(reply, "10.0.0.9").unwrap();
        assert!(covers_every_slot(&map));
        assert_eq!(owner_of(&map, 0), Some("127.0.0.1:7000"));
        assert_eq!(owner_of(&map, 5461), Some("10.0.0.9:7002"));
        assert_eq!(owner_of(&map, 16383), Some("[::1]:7004"));
        assert!(!covers_every_slot(&map[..2]));
        assert_eq!(owner_of(&map[..2], 16383), None);
        assert!(read_slot_map(Value::Array(vec![Value::Int(1)]), "").is_err());
        assert!(read_slot_map(Value::Nil, "").is_err());
    }

    /// A private 3-master Redis Cluster (no replicas) on free loopback ports, in a temp dir;
    /// every node is killed on drop.
    struct TestCluster {
        nodes: Vec<(std::process::Child, u16)>,
        dir: tempfile::TempDir,
    }

    impl TestCluster {
        fn start() -> TestCluster {
            use std::process::{Command, Stdio};
            let mut cluster = TestCluster {
                nodes: Vec::new(),
                dir: tempfile::tempdir().expect("a temp dir"),
            };
            for index in 0..3 {
                let port = free_port_pair();
                let node_dir = cluster.dir.path().join(format!("node{index}"));
                std::fs::create_dir(&node_dir).expect("a node dir");
                let child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .args(["--cluster-enabled", "yes", "--save", "", "--appendonly", "no"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server (apt-get install redis-server)");
                cluster.nodes.push((child, port));
            }
            for &(_, port) in &cluster.nodes {
                wait_until(|| connect_standalone(&format!("redis://127.0.0.1:{port}")).is_ok());
            }
            let output = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(cluster.nodes.iter().map(|(_, port)| format!("127.0.0.1:{port}")))
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdin(Stdio::null())
                .output()
                .expect("run redis-cli --cluster create");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
            wait_until(|| {
                cluster.nodes.iter().all(|&(_, port)| {
                    connect_standalone(&format!("redis://127.0.0.1:{port}"))
                        .and_then(|mut connection| {
                            redis::cmd("CLUSTER")
                                .arg("INFO")
                                .query::<String>(&mut connection)
                                .map_err(|error| error.to_string())
                        })
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                })
            });
            cluster
        }

        fn connection(&self, node: usize) -> redis::Connection {
            connect_standalone(&format!("redis://127.0.0.1:{}", self.nodes[node].1)).expect("a node")
        }
    }

    impl Drop for TestCluster {
        fn drop(&mut self) {
            for (child, _) in &mut self.nodes {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// A loopback port whose cluster bus port (port + 10000) is free too, below the ephemeral
    /// range so that no client socket takes either meanwhile.
    fn free_port_pair() -> u16 {
        use rand::Rng;
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        let mut rng = rand::thread_rng();
        (0..1_000)
            .map(|_| rng.gen_range(12_000..22_000u16))
            .find(|&port| free(port) && free(port + 10_000))
            .expect("a free port pair in 12000..22000")
    }

    /// Polls `ready` every 50 ms for up to 30 s.
    fn wait_until(mut ready: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(std::time::Instant::now() < deadline, "not ready after 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // On a cluster every partition stream is read from the master serving it: entries written
    // to each stream's own master (found by MOVED alone, not by the slot map) are all counted,
    // the copy stored twice and the acked id never stored are seen, and our slots are Redis's.
    #[test]
    fn reads_every_master_of_a_cluster() {
        let cluster = TestCluster::start();
        let url = format!(
            "redis-cluster://127.0.0.1:{},127.0.0.1:{}",
            cluster.nodes[0].1, cluster.nodes[1].1
        );
        let mut streams = connect(&url).unwrap();
        let since_ms = streams.time_ms().unwrap();
        let partitions = 16u32;
        // Player p (1..=16) sends 3 events, to partition p - 1; player 5's second is stored
        // twice, player 9's third never.
        let mut masters_written = std::collections::HashSet::new();
        for player in 1..=u64::from(partitions) {
            let key = format!("sgv:{{{}}}:events", player - 1);
            let mut entries = vec![1, 2, 3];
            if player == 5 {
                entries.push(2);
            }
            if player == 9 {
                entries.pop();
            }
            for seq in entries {
                let written = (0..cluster.nodes.len()).find(|&node| {
                    redis::cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("player")
                        .arg(player)
                        .arg("seq")
                        .arg(seq)
                        .query::<String>(&mut cluster.connection(node))
                        .is_ok()
                });
                masters_written.insert(written.unwrap_or_else(|| panic!("no master took {key}")));
            }
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&key)
                .query(&mut cluster.connection(0))
                .unwrap();
            assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
        }
        assert_eq!(masters_written.len(), 3, "16 partitions land on every master");
        let acked: Vec<EventId> = vec![id(9, 3), id(1, 1), id(5, 2)];
        let verification = verify_since(
            &mut streams,
            "sgv",
            partitions,
            Ledger::new(0, &[3; 16]),
            &acked,
            Some(since_ms),
        )
        .unwrap();
        assert_eq!(
            verification,
            Verification {
                stored: 48,
                stored_twice: 1,
                acked_missing: 1,
                events: 48,
                events_not_stored: 1,
                foreign_entries: 0,
            }
        );
    }
}
