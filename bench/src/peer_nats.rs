//! `shardgate-bench peer nats`: game clients publish to NATS JetStream directly.
//!
//! JetStream has dedup built in: a stream drops a message whose `Nats-Msg-Id` header it has
//! seen within its `duplicate_window`, and says so in the publish ack (`duplicate: true`). Each
//! event is published with `Nats-Msg-Id = player:seq` and counts as stored once its ack came
//! back, exactly like shardgate's ACCEPTED/DUPLICATE. The run creates its own stream on a
//! subject no one else uses, and deletes it at the end.
//!
//! # Threads
//! Per connection, a pacing thread sends each event at its due time (a tokio timer ticks in
//! whole milliseconds, which would add up to a millisecond of pacing error to every latency;
//! a thread's sleep is far finer) and hands the pending ack to that connection's collector
//! task on a small tokio runtime, which awaits the acks, records latencies from the intended
//! times, and publishes again any event whose attempt failed or timed out. Acks awaited per
//! connection are bounded (`--in-flight-max`); past it the pacing thread blocks, so its sends
//! fall late and their latency shows it.
//!
//! # Verification
//! The stream is read back with an ordered consumer, headers only: every stored message's
//! `Nats-Msg-Id` is counted against the ids the run sent, which gives stored, stored twice and
//! acked but missing, as for Redis.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::{Publish, PublishAckFuture, PublishError};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::stream::{FuturesUnordered, StreamExt};
use shardgate_proto::frame::EventId;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;

use crate::parse::parse_duration;
use crate::peer::{
    check_target_url, fail, fill_payload, finish, unix_now_us, Clock, Event, LaneEvents, PeerSummary, RecentEvents,
    Tally, Timetable, Workload, WorkloadArgs, EXIT_CONNECTION, EXIT_USAGE, GRACE, START_DELAY,
};
use crate::verify::{Checker, Ledger, Verification};

const PEER: &str = "nats";
/// How long connecting may take before NATS counts as not reachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one publish ack may take; then the event is published again (the duplicate
/// window makes that safe), as shardgate's Redis calls time out after 1 s.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait before publishing again after a failed attempt, so a refusing server is not hammered.
const RETRY_BACKOFF: Duration = Duration::from_millis(10);
/// Attempts handed from a pacing thread to its collector and not yet taken.
const HANDOFF_CAPACITY: usize = 1_024;
/// Longest wait for the next message when reading the stream back.
const READ_BACK_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of --in-flight-max.
const IN_FLIGHT_LIMIT: usize = 1 << 20;

/// Where the stream keeps its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Storage {
    /// In memory: the like of a Redis without persistence.
    Memory,
    /// On disk, as JetStream's default (flushed to the OS per message, fsynced periodically).
    File,
}

/// Flags of `shardgate-bench peer nats`.
#[derive(Debug, Args)]
pub struct NatsArgs {
    /// The NATS server (with JetStream), loopback only (see --allow-remote).
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,

    /// The stream's duplicate window: copies of an id within it are dropped. Must cover the run.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "2m")]
    duplicate_window: Duration,

    /// The stream's storage.
    #[arg(long, value_enum, default_value_t = Storage::Memory)]
    storage: Storage,

    /// Publish acks each connection awaits at most at once.
    #[arg(long, value_name = "N", default_value_t = 8_192)]
    in_flight_max: usize,

    #[command(flatten)]
    workload: WorkloadArgs,
}

/// What every lane reads.
struct Shared {
    workload: Workload,
    timetable: Timetable,
    clock: Clock,
    recent: RecentEvents,
    subject: String,
    in_flight_max: usize,
}

pub fn command(arguments: NatsArgs) -> ExitCode {
    let allow_remote = arguments.workload.allow_remote;
    let workload = match Workload::new(arguments.workload) {
        Ok(workload) => workload,
        Err(message) => return fail(PEER, EXIT_USAGE, &message),
    };
    let url = arguments.nats;
    if let Err(message) = check_target_url(&url, "nats", "nats", allow_remote) {
        return fail(PEER, EXIT_USAGE, &message);
    }
    // A copy or retry must fall inside the window, or JetStream would store it again.
    if arguments.duplicate_window < workload.duration + GRACE + ACK_TIMEOUT {
        return fail(
            PEER,
            EXIT_USAGE,
            "--duplicate-window must be longer than --duration plus 3 s: copies and retries must fall inside it",
        );
    }
    if !(1..=IN_FLIGHT_LIMIT).contains(&arguments.in_flight_max) {
        return fail(
            PEER,
            EXIT_USAGE,
            &format!("--in-flight-max must be within 1..={IN_FLIGHT_LIMIT}"),
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("peer-nats")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return fail(
                PEER,
                EXIT_CONNECTION,
                &format!("cannot start the async runtime: {error}"),
            )
        }
    };
    let skip = |reason: &str| {
        println!("peer nats: {reason}; skipped");
        let summary = PeerSummary::skipped(PEER, url.clone(), &workload, reason);
        finish(&summary, &workload)
    };

    let first = match runtime.block_on(connect(&url)) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("peer nats: connecting to {url}: {error}");
            return skip(&format!("no NATS reachable at {url}"));
        }
    };
    let seq_base = unix_now_us();
    let run_name = format!("{}_{}", std::process::id(), seq_base / 1_000);
    let stream_name = format!("SGBENCH_{run_name}");
    let subject = format!("sgbench.{run_name}");
    let context = jetstream::new(first);
    let created = runtime.block_on(context.create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![subject.clone()],
        duplicate_window: arguments.duplicate_window,
        storage: match arguments.storage {
            Storage::Memory => stream::StorageType::Memory,
            Storage::File => stream::StorageType::File,
        },
        ..Default::default()
    }));
    if let Err(error) = created {
        return skip(&format!("NATS at {url} has no usable JetStream ({error})"));
    }
    eprintln!(
        "peer nats: {}/s for {:?} over {} connections, stream {stream_name} ({:?} storage, duplicate window {:?})",
        workload.rate_per_sec, workload.duration, workload.lanes, arguments.storage, arguments.duplicate_window
    );

    let stream = RunStream {
        context: &context,
        name: &stream_name,
        subject,
    };
    let outcome = run_and_verify(&runtime, &url, &workload, arguments.in_flight_max, seq_base, stream);
    // Always delete the stream, whatever happened, so runs leave nothing behind.
    if let Err(error) = runtime.block_on(context.delete_stream(&stream_name)) {
        eprintln!("peer nats: could not delete stream {stream_name}: {error}");
    }
    match outcome {
        Ok(summary) => finish(&summary, &workload),
        Err((message, summary)) => {
            if let Some(summary) = summary {
                print!("{}", summary.to_text());
            }
            fail(PEER, EXIT_CONNECTION, &message)
        }
    }
}

async fn connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
}

/// Why a run failed, with the summary of the load when it ran.
type Failure = (String, Option<Box<PeerSummary>>);

/// The run's own stream.
struct RunStream<'a> {
    context: &'a jetstream::Context,
    name: &'a str,
    subject: String,
}

/// Opens the lanes, runs the load, reads the stream back. The caller deletes the stream.
fn run_and_verify(
    runtime: &Runtime,
    url: &str,
    workload: &Workload,
    in_flight_max: usize,
    seq_base: u64,
    stream: RunStream<'_>,
) -> Result<PeerSummary, Failure> {
    let mut contexts = Vec::with_capacity(workload.lanes);
    for _ in 0..workload.lanes {
        let client = runtime
            .block_on(connect(url))
            .map_err(|error| (format!("cannot open a connection to {url}: {error}"), None))?;
        let mut lane_context = jetstream::new(client);
        lane_context.set_timeout(ACK_TIMEOUT);
        contexts.push(lane_context);
    }
    let shared = Shared {
        timetable: Timetable::new(workload),
        clock: Clock::starting_in(START_DELAY),
        recent: RecentEvents::new(),
        subject: stream.subject,
        in_flight_max,
        workload: workload.clone(),
    };

    let lanes: Vec<(Tally, LaneEvents)> = std::thread::scope(|scope| {
        let threads: Vec<_> = contexts
            .into_iter()
            .enumerate()
            .map(|(lane, lane_context)| {
                let shared = &shared;
                let handle = runtime.handle().clone();
                let events = LaneEvents::new(&shared.workload, lane, seq_base);
                scope.spawn(move || run_lane(shared, lane, lane_context, events, handle))
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a lane thread panicked"))
            .collect()
    });

    let mut tally = Tally::new();
    let mut sent_per_player = vec![0u64; workload.players as usize];
    for (lane_tally, events) in lanes {
        events.record_sent(&mut sent_per_player);
        tally.merge(lane_tally);
    }
    let ledger = Ledger::new(seq_base, &sent_per_player);
    let summary = |verification: Option<&Verification>| {
        PeerSummary::new(PEER, url.to_string(), workload, &shared.timetable, &tally, verification)
    };
    match runtime.block_on(read_back(stream.context, stream.name, ledger, &tally.acked_ids)) {
        Ok(verification) => Ok(summary(Some(&verification))),
        Err(message) => Err((format!("verification failed: {message}"), Some(Box::new(summary(None))))),
    }
}

/// One event on its way, without its pending ack.
#[derive(Clone, Copy)]
struct Attempt {
    event: Event,
    intended_ns: u64,
    /// True once any answer (even a failure) came: the first-attempt latency is taken.
    answered_once: bool,
}

/// An attempt whose publish went out, handed from the pacing thread to the collector.
struct Handoff {
    attempt: Attempt,
    ack: Result<PublishAckFuture, PublishError>,
}

type Awaited = Pin<Box<dyn Future<Output = (Attempt, Result<PublishAck, PublishError>)> + Send>>;

/// The publish of `event`: its payload, and its id as `Nats-Msg-Id`.
fn publish_of(event: &Event, payload_bytes: usize, payload: &mut Vec<u8>) -> Publish {
    fill_payload(event.id, payload_bytes, payload);
    Publish::build()
        .payload(Bytes::copy_from_slice(payload))
        .message_id(message_id(event.id))
}

fn message_id(id: EventId) -> String {
    format!("{}:{}", id.player_id, id.seq)
}

/// Reads a `player:seq` message id back; None for anything else.
fn parse_message_id(text: &str) -> Option<EventId> {
    let (player_id, seq) = text.split_once(':')?;
    Some(EventId {
        player_id: player_id.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

/// The pacing thread of one lane; its collector runs on the runtime meanwhile.
fn run_lane(
    shared: &Shared,
    lane: usize,
    context: jetstream::Context,
    mut events: LaneEvents,
    handle: Handle,
) -> (Tally, LaneEvents) {
    let (timetable, clock) = (&shared.timetable, &shared.clock);
    let (sender, receiver) = mpsc::channel::<Handoff>(HANDOFF_CAPACITY);
    let collector = handle.spawn(collect(
        receiver,
        context.clone(),
        shared.subject.clone(),
        shared.workload.payload_bytes,
        *timetable,
        *clock,
        shared.in_flight_max,
    ));
    let mut sends = Tally::new();
    let mut payload = Vec::with_capacity(shared.workload.payload_bytes);
    for slot in timetable.slots_of(lane) {
        let intended_ns = timetable.intended_ns(slot);
        clock.sleep_until(intended_ns);
        if clock.now_ns() >= timetable.end_ns {
            // Hopelessly behind: what is left was never sent, and `scheduled` shows it.
            break;
        }
        let (event, is_copy) = events.next(&shared.recent, unix_now_us());
        sends.on_send(is_copy);
        let publish = publish_of(&event, shared.workload.payload_bytes, &mut payload);
        let ack = handle.block_on(context.send_publish(shared.subject.clone(), publish));
        let attempt = Attempt {
            event,
            intended_ns,
            answered_once: false,
        };
        if sender.blocking_send(Handoff { attempt, ack }).is_err() {
            break;
        }
    }
    drop(sender);
    let mut tally = handle.block_on(collector).unwrap_or_else(|_| Tally::new());
    tally.sent = sends.sent;
    tally.copies = sends.copies;
    tally.fresh_events = sends.fresh_events;
    (tally, events)
}

/// Awaits one lane's acks until its pacing thread is done and every ack is in, publishing
/// failed attempts again until the grace ends.
async fn collect(
    mut receiver: mpsc::Receiver<Handoff>,
    context: jetstream::Context,
    subject: String,
    payload_bytes: usize,
    timetable: Timetable,
    clock: Clock,
    in_flight_max: usize,
) -> Tally {
    let mut tally = Tally::new();
    let mut in_flight: FuturesUnordered<Awaited> = FuturesUnordered::new();
    let mut receiving = true;
    // Every ack future ends within ACK_TIMEOUT and no retry starts after end_ns, so the loop
    // ends by itself; this bound only guards against a client that never resolves a future.
    let hard_stop =
        tokio::time::sleep(Duration::from_nanos(timetable.end_ns.saturating_sub(clock.now_ns())) + 2 * ACK_TIMEOUT);
    tokio::pin!(hard_stop);
    loop {
        tokio::select! {
            Some((mut attempt, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let now_ns = clock.now_ns();
                if !attempt.answered_once {
                    Tally::record(&mut tally.first_us, attempt.intended_ns, now_ns, &timetable);
                    attempt.answered_once = true;
                }
                match result {
                    Ok(ack) => {
                        Tally::record(&mut tally.final_us, attempt.intended_ns, now_ns, &timetable);
                        tally.accepted += u64::from(!ack.duplicate);
                        tally.duplicate += u64::from(ack.duplicate);
                        tally.acked_ids.push(attempt.event.id);
                    }
                    Err(_) if now_ns < timetable.end_ns => {
                        tally.failed_attempts += 1;
                        tally.resent += 1;
                        in_flight.push(Box::pin(publish_again(context.clone(), subject.clone(), attempt, payload_bytes)));
                    }
                    Err(_) => {
                        tally.failed_attempts += 1;
                        tally.on_lost(attempt.event.id);
                    }
                }
            }
            handoff = receiver.recv(), if receiving && in_flight.len() < in_flight_max => {
                match handoff {
                    Some(Handoff { attempt, ack }) => in_flight.push(Box::pin(await_ack(attempt, ack))),
                    None => receiving = false,
                }
            }
            () = &mut hard_stop, if receiving || !in_flight.is_empty() => {
                // Whatever is still awaited or handed over has no answer: lost, uncounted ids.
                tally.lost += in_flight.len() as u64;
                receiver.close();
                while let Ok(Handoff { attempt, .. }) = receiver.try_recv() {
                    tally.on_lost(attempt.event.id);
                }
                break;
            }
            else => break,
        }
    }
    tally
}

async fn await_ack(
    attempt: Attempt,
    ack: Result<PublishAckFuture, PublishError>,
) -> (Attempt, Result<PublishAck, PublishError>) {
    let result = match ack {
        Ok(ack) => ack.await,
        Err(error) => Err(error),
    };
    (attempt, result)
}

async fn publish_again(
    context: jetstream::Context,
    subject: String,
    attempt: Attempt,
    payload_bytes: usize,
) -> (Attempt, Result<PublishAck, PublishError>) {
    tokio::time::sleep(RETRY_BACKOFF).await;
    let mut payload = Vec::with_capacity(payload_bytes);
    let publish = publish_of(&attempt.event, payload_bytes, &mut payload);
    let ack = context.send_publish(subject, publish).await;
    await_ack(attempt, ack).await
}

/// Reads every message of the stream (headers only) and counts their ids against the ledger.
async fn read_back(
    context: &jetstream::Context,
    stream_name: &str,
    ledger: Ledger,
    acked_ids: &[EventId],
) -> Result<Verification, String> {
    let mut stream = context
        .get_stream(stream_name)
        .await
        .map_err(|error| format!("cannot open stream {stream_name}: {error}"))?;
    let stored_messages = stream
        .info()
        .await
        .map_err(|error| format!("cannot read stream info: {error}"))?
        .state
        .messages;
    let mut checker = Checker::new(ledger);
    if stored_messages == 0 {
        return Ok(checker.finish(acked_ids));
    }
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            headers_only: true,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|error| format!("cannot create a consumer: {error}"))?;
    let mut messages = reader
        .messages()
        .await
        .map_err(|error| format!("cannot read the stream: {error}"))?;
    let mut read = 0u64;
    while read < stored_messages {
        let message = match tokio::time::timeout(READ_BACK_IDLE_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => return Err(format!("reading message {}: {error}", read + 1)),
            Ok(None) | Err(_) => {
                return Err(format!("read {read} of {stored_messages} messages, then nothing more"));
            }
        };
        read += 1;
        let id = message
            .message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(NATS_MESSAGE_ID))
            .and_then(|value| parse_message_id(value.as_str()));
        checker.entry(id);
    }
    Ok(checker.finish(acked_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_round_trip() {
        let id = EventId {
            player_id: 42,
            seq: u64::MAX,
        };
        assert_eq!(parse_message_id(&message_id(id)), Some(id));
        for junk in ["", ":", "1:", ":2", "1:2:3", "a:1", "1;2", "-1:2"] {
            assert_eq!(parse_message_id(junk), None, "{junk:?}");
        }
    }
}
