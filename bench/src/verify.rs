//! After the run: read what the server stored and hold it against what was sent and acked.
//!
//! Every partition stream `<prefix>:{p}:events` is read with XRANGE in pages, from the run's
//! start on Redis's own clock (stream ids are Redis's milliseconds, so nothing this run stored
//! can be older; earlier runs against the prefix, such as a sweep's earlier steps, are not read
//! again). Only entries whose `(player, seq)` this run sent count; anything else (earlier runs,
//! other writers) is skipped.
//!
//! The ids a run sent are exactly, per player, the seqs just above the run's `seq_base` up to
//! that player's count (see `events.rs`), so each one has a dense index: the player's offset
//! plus its seq's distance from the base. Bit sets over that index say, per id, whether it was
//! seen once or twice; a few bits per event instead of a hash set of millions of ids.

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

/// The userinfo (`user:password@`, or empty) of a `redis-cluster://` url given to `connect`, for
/// the connections a `MOVED` sends verification to.
static CLUSTER_USERINFO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Opens the connection verification will use; called before the run so that a wrong URL
/// fails fast instead of after minutes of load. A `redis-cluster://[userinfo@]SEED[,SEED...]`
/// url (shardgate's form) connects to its first seed; verification then follows each
/// partition's `MOVED` to the master that serves it.
pub fn connect(url: &str) -> Result<redis::Connection, String> {
    let seed_url;
    let url = match url.strip_prefix("redis-cluster://") {
        Some(rest) => {
            let (userinfo, seeds) = rest.rfind('@').map_or(("", rest), |at| (&rest[..=at], &rest[at + 1..]));
            let first_seed = seeds.split(',').next().unwrap_or("");
            let _ = CLUSTER_USERINFO.set(userinfo.to_string());
            seed_url = format!("redis://{userinfo}{first_seed}");
            seed_url.as_str()
        }
        None => url,
    };
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

/// Redis's clock in milliseconds (`TIME`): taken before a run, it bounds the stream ids the
/// run's entries can have from below.
pub fn redis_time_ms(connection: &mut redis::Connection) -> Result<u64, String> {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME")
        .query(connection)
        .map_err(|error| format!("redis TIME failed: {error}"))?;
    Ok(seconds.saturating_mul(1_000).saturating_add(micros / 1_000))
}

/// Reads every partition stream whole and returns the verification.
pub fn verify(
    connection: &mut redis::Connection,
    prefix: &str,
    partitions: u32,
    ledger: Ledger,
    acked_ids: &[EventId],
) -> Result<Verification, String> {
    verify_since(connection, prefix, partitions, ledger, acked_ids, None)
}

/// Reads every partition stream from `since_ms` on Redis's clock (all of it if `None`) and
/// returns the verification.
pub fn verify_since(
    connection: &mut redis::Connection,
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
    // On a cluster, the master of each partition's slot, opened at its first MOVED.
    let mut masters: Vec<(String, redis::Connection)> = Vec::new();
    for partition in 0..partitions {
        let key = format!("{prefix}:{{{partition}}}:events");
        let mut start = first_id.clone();
        let mut node: Option<usize> = None;
        loop {
            let query = |connection: &mut redis::Connection| {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE_ENTRIES)
                    .query::<Value>(connection)
            };
            let reply = match node {
                Some(index) => query(&mut masters[index].1),
                None => query(connection),
            };
            let reply = match reply {
                Err(error) if error.kind() == redis::ErrorKind::Moved && node.is_none() => {
                    let (address, _slot) = error
                        .redirect_node()
                        .ok_or_else(|| format!("XRANGE {key}: a MOVED without a node: {error}"))?;
                    let index = match masters.iter().position(|(known, _)| known == address) {
                        Some(index) => index,
                        None => {
                            let userinfo = CLUSTER_USERINFO.get().map_or("", String::as_str);
                            masters.push((address.to_string(), connect(&format!("redis://{userinfo}{address}"))?));
                            masters.len() - 1
                        }
                    };
                    node = Some(index);
                    continue;
                }
                reply => reply.map_err(|error| format!("XRANGE {key} failed: {error}"))?,
            };
            let page = read_page(reply).map_err(|error| format!("XRANGE {key}: {error}"))?;
            for (_, id) in &page {
                checker.entry(*id);
            }
            match page.last() {
                Some((last_entry, _)) if page.len() == PAGE_ENTRIES => {
                    start = entry_id_after(last_entry).ok_or_else(|| format!("{key}: bad entry id {last_entry:?}"))?;
                }
                _ => break,
            }
        }
    }
    Ok(checker.finish(acked_ids))
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
}
