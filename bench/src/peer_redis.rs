//! `shardgate-bench peer redis`: game clients call Redis directly, one script call per event.
//!
//! Each event is one `EVALSHA` of shardgate's own `DEDUP_APPEND_LUA` with a one-record blob
//! (`count = 1`), so Redis ends up with exactly what shardgate would store (same keys, same
//! fields, same atomic marker-and-append) and the same guarantee: an event acked `A` or `D` is
//! stored exactly once. The only difference from shardgate is the missing middle tier: no
//! batching of many clients' events into one call, no dedup cache in front of Redis.
//!
//! Each connection has its own thread (the sync `redis` client). A thread sends every event
//! that is due as one pipeline (at most `--pipeline-max` calls), waits for the replies, then
//! sleeps until the next event is due. Events that fall due while it waits go out in the next
//! pipeline, late, and their latency counts from when they were due: a client library that
//! pipelines on one connection behaves the same way. A failed call (error reply, timeout,
//! broken connection) is sent again, which the script makes safe: a copy whose first attempt
//! did store is answered `D`.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::Duration;

use bytes::BytesMut;
use clap::Args;
use redis::{Connection, ErrorKind, RedisError, Value};
use shardgate::redis::script::{append_record, Record, DEDUP_APPEND_LUA, OUTCOME_ALREADY_STORED, OUTCOME_APPENDED};

use crate::peer::{
    check_target_url, fail, fill_payload, finish, unix_now_us, Clock, Event, LaneEvents, PeerSummary, RecentEvents,
    Tally, Timetable, Workload, WorkloadArgs, EXIT_CONNECTION, EXIT_USAGE, START_DELAY,
};
use crate::verify::{self, Ledger};

const PEER: &str = "redis";
/// Timeout of one connect and of one pipeline's write and read. A pipeline that takes longer
/// is counted as failed and sent again on a new connection.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait before sending again after an error reply, so a Redis refusing writes (OOM, BUSY) is
/// not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// Bounds of --pipeline-max.
const PIPELINE_MAX_LIMIT: usize = 4_096;
/// Bounds of --partitions, as the server's.
const PARTITIONS_MAX: u32 = 1_024;

/// Flags of `shardgate-bench peer redis`.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// The Redis to store into, e.g. redis://127.0.0.1:6379 (loopback only, see --allow-remote).
    #[arg(long, value_name = "URL")]
    redis: String,

    /// Key prefix, as shardgate's --prefix; default `peer` and the start time, unique per run.
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,

    /// Streams per prefix; event goes to player_id % N, as shardgate's --partitions.
    #[arg(long, value_name = "N", default_value_t = 16)]
    partitions: u32,

    /// TTL of the dedup marker, as shardgate's --dedup-window-secs.
    #[arg(long, value_name = "S", default_value_t = 600)]
    window_secs: u64,

    /// Most script calls one connection sends as one pipeline before reading the replies.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pipeline_max: usize,

    #[command(flatten)]
    workload: WorkloadArgs,
}

/// What every lane thread reads.
struct Shared {
    workload: Workload,
    timetable: Timetable,
    clock: Clock,
    recent: RecentEvents,
    client: redis::Client,
    script_sha: String,
    prefix: String,
    partitions: u32,
    window_secs: u64,
    pipeline_max: usize,
}

pub fn command(arguments: RedisArgs) -> ExitCode {
    let allow_remote = arguments.workload.allow_remote;
    let workload = match Workload::new(arguments.workload) {
        Ok(workload) => workload,
        Err(message) => return fail(PEER, EXIT_USAGE, &message),
    };
    let url = arguments.redis;
    if let Err(message) = check_target_url(&url, "redis", "redis", allow_remote) {
        return fail(PEER, EXIT_USAGE, &message);
    }
    if !(1..=PARTITIONS_MAX).contains(&arguments.partitions) {
        return fail(
            PEER,
            EXIT_USAGE,
            &format!("--partitions must be within 1..={PARTITIONS_MAX}"),
        );
    }
    if !(1..=PIPELINE_MAX_LIMIT).contains(&arguments.pipeline_max) {
        return fail(
            PEER,
            EXIT_USAGE,
            &format!("--pipeline-max must be within 1..={PIPELINE_MAX_LIMIT}"),
        );
    }
    if arguments.window_secs == 0 {
        return fail(PEER, EXIT_USAGE, "--window-secs must be at least 1");
    }
    let seq_base = unix_now_us();
    let prefix = arguments.prefix.unwrap_or_else(|| format!("peer{}", seq_base / 1_000));
    if prefix.is_empty() || prefix.len() > 64 || prefix.contains(['{', '}', ' ']) {
        return fail(
            PEER,
            EXIT_USAGE,
            "--prefix must be 1..=64 bytes without braces or spaces",
        );
    }

    // Connect and load the script before the load, so a wrong URL fails at once.
    let mut verifier = match verify::connect_standalone(&url) {
        Ok(connection) => connection,
        Err(message) => return fail(PEER, EXIT_CONNECTION, &message),
    };
    let script_sha = match load_script(&mut verifier) {
        Ok(sha) => sha,
        Err(error) => return fail(PEER, EXIT_CONNECTION, &format!("SCRIPT LOAD failed: {error}")),
    };
    let client = match redis::Client::open(url.as_str()) {
        Ok(client) => client,
        Err(error) => return fail(PEER, EXIT_USAGE, &format!("invalid --redis {url:?}: {error}")),
    };
    let mut connections = Vec::with_capacity(workload.lanes);
    for _ in 0..workload.lanes {
        match open(&client) {
            Ok(connection) => connections.push(connection),
            Err(error) => return fail(PEER, EXIT_CONNECTION, &format!("cannot connect to {url}: {error}")),
        }
    }
    eprintln!(
        "peer redis: {}/s for {:?} over {} connections, one EVALSHA per event, prefix {prefix}",
        workload.rate_per_sec, workload.duration, workload.lanes
    );

    let shared = Shared {
        timetable: Timetable::new(&workload),
        clock: Clock::starting_in(START_DELAY),
        recent: RecentEvents::new(),
        client,
        script_sha,
        prefix,
        partitions: arguments.partitions,
        window_secs: arguments.window_secs,
        pipeline_max: arguments.pipeline_max,
        workload,
    };
    let lanes: Vec<(Tally, LaneEvents)> = std::thread::scope(|scope| {
        let threads: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(lane, connection)| {
                let shared = &shared;
                let events = LaneEvents::new(&shared.workload, lane, seq_base);
                scope.spawn(move || run_lane(shared, lane, connection, events))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a lane thread panicked"))
            .collect()
    });

    let mut tally = Tally::new();
    let mut sent_per_player = vec![0u64; shared.workload.players as usize];
    for (lane_tally, events) in lanes {
        events.record_sent(&mut sent_per_player);
        tally.merge(lane_tally);
    }
    let ledger = Ledger::new(seq_base, &sent_per_player);
    let mut verifier = verify::Streams::Standalone(verifier);
    let verification = verify::verify(
        &mut verifier,
        &shared.prefix,
        shared.partitions,
        ledger,
        &tally.acked_ids,
    );
    let summary = |verification| {
        PeerSummary::new(
            PEER,
            url.clone(),
            &shared.workload,
            &shared.timetable,
            &tally,
            verification,
        )
    };
    match verification {
        Ok(verification) => {
            let code = finish(&summary(Some(&verification)), &shared.workload);
            eprintln!("peer redis: events stay in {url} under prefix {}", shared.prefix);
            code
        }
        Err(message) => {
            print!("{}", summary(None).to_text());
            fail(PEER, EXIT_CONNECTION, &format!("verification failed: {message}"))
        }
    }
}

fn load_script(connection: &mut Connection) -> redis::RedisResult<String> {
    redis::cmd("SCRIPT").arg("LOAD").arg(DEDUP_APPEND_LUA).query(connection)
}

/// One lane's connection, with the call timeout on both directions.
fn open(client: &redis::Client) -> redis::RedisResult<Connection> {
    let connection = client.get_connection_with_timeout(CALL_TIMEOUT)?;
    connection.set_read_timeout(Some(CALL_TIMEOUT))?;
    connection.set_write_timeout(Some(CALL_TIMEOUT))?;
    Ok(connection)
}

/// One event on its way: sent, maybe failed and waiting to be sent again.
struct Attempt {
    event: Event,
    intended_ns: u64,
    /// True once any answer (even a failure) came: the first-attempt latency is taken.
    answered_once: bool,
}

/// What the script said about one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Appended,
    AlreadyStored,
    Failed,
}

/// Reads one script reply: a one-byte string, `A` or `D`; anything else is a failure.
fn outcome_of(value: &Value) -> Outcome {
    let bytes: &[u8] = match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(text) => text.as_bytes(),
        _ => return Outcome::Failed,
    };
    match bytes {
        [OUTCOME_APPENDED] => Outcome::Appended,
        [OUTCOME_ALREADY_STORED] => Outcome::AlreadyStored,
        _ => Outcome::Failed,
    }
}

/// Sends this lane's slots until the timetable ends, then retries until the grace ends.
fn run_lane(shared: &Shared, lane: usize, mut connection: Connection, mut events: LaneEvents) -> (Tally, LaneEvents) {
    let (timetable, clock) = (&shared.timetable, &shared.clock);
    let mut tally = Tally::new();
    let mut slots = timetable.slots_of(lane).peekable();
    let mut retries: VecDeque<Attempt> = VecDeque::new();
    let mut batch: Vec<Attempt> = Vec::with_capacity(shared.pipeline_max);
    let mut pipeline = redis::pipe();
    let mut blob = BytesMut::with_capacity(shardgate::limits::BATCH_RECORD_BYTES_MAX);
    let mut payload = Vec::with_capacity(shared.workload.payload_bytes);
    loop {
        let now_ns = clock.now_ns();
        if now_ns >= timetable.end_ns {
            break;
        }
        // Older attempts first; the retry queue holds at most a few pipelines' worth.
        while batch.len() < shared.pipeline_max {
            let Some(attempt) = retries.pop_front() else { break };
            tally.resent += 1;
            batch.push(attempt);
        }
        while batch.len() < shared.pipeline_max {
            match slots.peek() {
                Some(&slot) if timetable.intended_ns(slot) <= now_ns => {
                    slots.next();
                    let (event, is_copy) = events.next(&shared.recent, unix_now_us());
                    tally.on_send(is_copy);
                    batch.push(Attempt {
                        event,
                        intended_ns: timetable.intended_ns(slot),
                        answered_once: false,
                    });
                }
                _ => break,
            }
        }
        if batch.is_empty() {
            match slots.peek() {
                Some(&slot) => {
                    clock.sleep_until(timetable.intended_ns(slot));
                    continue;
                }
                None => break,
            }
        }

        pipeline.clear();
        let recv_us = unix_now_us();
        for attempt in &batch {
            fill_payload(attempt.event.id, shared.workload.payload_bytes, &mut payload);
            blob.clear();
            append_record(
                &Record {
                    partition: (attempt.event.id.player_id % u64::from(shared.partitions)) as u32,
                    player_id: attempt.event.id.player_id,
                    seq: attempt.event.id.seq,
                    action_type: attempt.event.action_type,
                    client_time_us: attempt.event.client_time_us,
                    recv_us,
                    payload: &payload,
                },
                &mut blob,
            );
            pipeline
                .cmd("EVALSHA")
                .arg(&shared.script_sha)
                .arg(0)
                .arg(&shared.prefix)
                .arg(shared.window_secs)
                .arg(1)
                .arg(&blob[..]);
        }
        let replies: redis::RedisResult<Vec<Value>> = pipeline.query(&mut connection);
        let now_ns = clock.now_ns();
        // A reply of the wrong length cannot be matched to the calls: all of them count as failed.
        let outcomes = match &replies {
            Ok(values) if values.len() == batch.len() => Some(values),
            _ => None,
        };
        let all_failed = outcomes.is_none();
        for (index, mut attempt) in batch.drain(..).enumerate() {
            let outcome = outcomes.map_or(Outcome::Failed, |values| outcome_of(&values[index]));
            if !attempt.answered_once {
                Tally::record(&mut tally.first_us, attempt.intended_ns, now_ns, timetable);
                attempt.answered_once = true;
            }
            match outcome {
                Outcome::Appended | Outcome::AlreadyStored => {
                    Tally::record(&mut tally.final_us, attempt.intended_ns, now_ns, timetable);
                    tally.accepted += u64::from(outcome == Outcome::Appended);
                    tally.duplicate += u64::from(outcome == Outcome::AlreadyStored);
                    tally.acked_ids.push(attempt.event.id);
                }
                Outcome::Failed => {
                    tally.failed_attempts += 1;
                    retries.push_back(attempt);
                }
            }
        }
        match replies {
            Err(error) => recover(shared, &error, &mut connection, &mut tally),
            Ok(_) if all_failed => std::thread::sleep(ERROR_BACKOFF),
            Ok(_) => {}
        }
    }
    for attempt in batch.into_iter().chain(retries) {
        tally.on_lost(attempt.event.id);
    }
    (tally, events)
}

/// After a failed pipeline: reload the script after NOSCRIPT (a restarted Redis), reconnect
/// after a broken or timed-out connection (its replies can no longer be matched), otherwise
/// back off a little.
fn recover(shared: &Shared, error: &RedisError, connection: &mut Connection, tally: &mut Tally) {
    if error.kind() == ErrorKind::NoScriptError {
        if load_script(connection).is_err() {
            std::thread::sleep(ERROR_BACKOFF);
        }
        return;
    }
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        tally.send_errors += 1;
        while shared.clock.now_ns() < shared.timetable.end_ns {
            match open(&shared.client) {
                Ok(fresh) => {
                    *connection = fresh;
                    tally.reconnects += 1;
                    return;
                }
                Err(_) => std::thread::sleep(ERROR_BACKOFF),
            }
        }
        return;
    }
    std::thread::sleep(ERROR_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_script_replies() {
        assert_eq!(outcome_of(&Value::BulkString(b"A".to_vec())), Outcome::Appended);
        assert_eq!(outcome_of(&Value::BulkString(b"D".to_vec())), Outcome::AlreadyStored);
        assert_eq!(outcome_of(&Value::SimpleString("A".into())), Outcome::Appended);
        assert_eq!(outcome_of(&Value::BulkString(b"AD".to_vec())), Outcome::Failed);
        assert_eq!(outcome_of(&Value::BulkString(Vec::new())), Outcome::Failed);
        assert_eq!(outcome_of(&Value::Nil), Outcome::Failed);
        assert_eq!(outcome_of(&Value::Int(1)), Outcome::Failed);
    }
}
