//! `shardgate-bench flood`: what one flooding source costs a well-behaved client.
//!
//! Two phases against a running shardgate, back to back, each `--duration` long. In both, a
//! well-behaved client sends `--rate` events a second over UDP, one per datagram, from
//! 127.0.0.1, and resends each on RETRY and on silence, with backoff, until it is answered
//! ACCEPTED or DUPLICATE, as a game client does (`WellBehavedClient`). In the second phase a
//! flooder thread sends at the same time from `--flood-source` (another loopback address, so
//! another source to the server's per-source limit), as fast as it can, datagrams of valid
//! frames, of frames with a bad crc, of random bytes and of bytes that start like a header, in
//! turn. The report puts the client's ack latency (from its first send to ACCEPTED or
//! DUPLICATE, resends included) in the two phases side by side, with the events it lost (never
//! answered stored); with `--redis`, whether each of its events is stored exactly once; with
//! `--metrics`, what the server limited and what its kernel dropped.
//!
//! For one shard to take both, start the server with one core (`--cores 0`): with several,
//! SO_REUSEPORT may put the client and the flooder on different shards.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shardgate_client::resend::{Due, End, Limits, Outstanding, Schedule, Verdict, Waits};
use shardgate_proto::frame::{decode_ack, encode_action, ActionFields, EventId, Status, ACK_BYTES};

use crate::lane::unix_now_us;
use crate::parse::{format_duration, parse_duration, Target, Transport};
use crate::report::Percentiles;
use crate::verify::{self, Ledger};

const EXIT_USAGE: u8 = 2;
const EXIT_CONNECTION: u8 = 3;
/// The client's players: ids 1..=PLAYERS, as `verify` expects them.
const PLAYERS: u64 = 64;
const PAYLOAD: &[u8] = b"flood-bench-client-event-0123456789";
/// The flooder's valid frames name this player, which the client never uses.
const FLOOD_PLAYER: u64 = 1 << 62;
/// Datagrams the flooder builds before it starts and sends round and round, so that its rate is
/// that of its send calls, not of encoding.
const FLOOD_DATAGRAMS: usize = 8_192;
/// After a phase's last send, how long the client may still take to get every answer.
const DRAIN_GRACE: Duration = Duration::from_secs(30);
const HISTOGRAM_HIGHEST_US: u64 = 60_000_000;
const RATE_MAX: u64 = 100_000;
/// The client's wait for an answer to a first copy; each later copy waits twice as long, up to
/// BACKOFF_MAX. A RETRY answer starts the same wait (as `shardgate-client` does).
const ACK_TIMEOUT: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Flags of `shardgate-bench flood`.
#[derive(Debug, Args)]
pub struct FloodArgs {
    /// The server's UDP address: udp://HOST:PORT on loopback.
    #[arg(long, value_name = "URL", value_parser = crate::parse::parse_target)]
    target: Target,

    /// The well-behaved client's events per second.
    #[arg(long, value_name = "N", default_value_t = 300)]
    rate: u64,

    /// Length of each phase (without the flood, then with it), e.g. 10s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    duration: Duration,

    /// The flooder's source address: a loopback address other than the client's 127.0.0.1.
    #[arg(long, value_name = "IPV4", default_value = "127.0.0.2")]
    flood_source: Ipv4Addr,

    /// Frames in each of the flooder's datagrams of frames.
    #[arg(long, value_name = "K", default_value_t = 16)]
    flood_frames_per_datagram: usize,

    /// Verify against this Redis that each of the client's events is stored exactly once.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// The server's --prefix.
    #[arg(long, value_name = "PREFIX", default_value = "sg")]
    prefix: String,

    /// The server's --partitions.
    #[arg(long, value_name = "N", default_value_t = 16)]
    partitions: u32,

    /// The server's --metrics address, to report frames limited and kernel drops per phase.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// One phase, as the client saw it and the server counted it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseSummary {
    pub flood: bool,
    pub events: u64,
    /// Events never answered ACCEPTED or DUPLICATE.
    pub lost: u64,
    pub rejected: u64,
    /// From the client's send to ACCEPTED or DUPLICATE, resends included, in microseconds.
    pub latency_us: Percentiles,
    pub resends: u64,
    pub retry_answers: u64,
    pub flood_datagrams: u64,
    pub flood_datagrams_per_sec: f64,
    /// Server counters over the phase (with `--metrics`).
    pub frames_limited: Option<u64>,
    pub kernel_drops: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FloodSummary {
    pub target: String,
    pub rate: u64,
    pub duration_s: f64,
    pub flood_source: String,
    pub phases: Vec<PhaseSummary>,
    pub verification: Option<StoredSummary>,
}

/// What Redis holds of the client's events (with `--redis`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StoredSummary {
    pub events: u64,
    pub stored: u64,
    pub stored_twice: u64,
    pub acked_missing: u64,
}

/// Runs `flood` and prints the summary; the exit code follows `main`'s.
pub fn command(arguments: FloodArgs) -> ExitCode {
    if let Err(message) = check(&arguments) {
        return fail(EXIT_USAGE, &message);
    }
    let mut redis = match arguments.redis.as_deref().map(verify::connect).transpose() {
        Ok(redis) => redis,
        Err(message) => return fail(EXIT_CONNECTION, &message),
    };
    let since_ms = match redis.as_mut().map(verify::Streams::time_ms).transpose() {
        Ok(since_ms) => since_ms,
        Err(message) => return fail(EXIT_CONNECTION, &message),
    };
    let seq_base = unix_now_us();
    let events_per_phase = arguments.rate * arguments.duration.as_secs().max(1);
    let mut client = match WellBehavedClient::connect(arguments.target.address, events_per_phase as usize) {
        Ok(client) => client,
        Err(error) => return fail(EXIT_CONNECTION, &format!("cannot open the client's socket: {error}")),
    };
    let mut phases = Vec::new();
    let mut acked_ids = Vec::new();
    for (index, flood) in [false, true].into_iter().enumerate() {
        let first = index as u64 * events_per_phase;
        eprintln!(
            "shardgate-bench flood: phase {} of 2, {} flood: {} events at {}/s",
            index + 1,
            if flood { "with" } else { "without" },
            events_per_phase,
            arguments.rate
        );
        match phase(
            &arguments,
            &mut client,
            flood,
            seq_base,
            first..first + events_per_phase,
            &mut acked_ids,
        ) {
            Ok(summary) => phases.push(summary),
            Err(message) => return fail(EXIT_CONNECTION, &message),
        }
    }
    let verification = match redis.as_mut() {
        Some(connection) => {
            let total = 2 * events_per_phase;
            let sent_per_player: Vec<u64> = (0..PLAYERS)
                .map(|player| total / PLAYERS + u64::from(player < total % PLAYERS))
                .collect();
            let ledger = Ledger::new(seq_base, &sent_per_player);
            match verify::verify_since(
                connection,
                &arguments.prefix,
                arguments.partitions,
                ledger,
                &acked_ids,
                since_ms,
            ) {
                Ok(verification) => Some(StoredSummary {
                    events: verification.events,
                    stored: verification.events - verification.events_not_stored,
                    stored_twice: verification.stored_twice,
                    acked_missing: verification.acked_missing,
                }),
                Err(message) => return fail(EXIT_CONNECTION, &format!("verification failed: {message}")),
            }
        }
        None => None,
    };
    let summary = FloodSummary {
        target: arguments.target.to_string(),
        rate: arguments.rate,
        duration_s: arguments.duration.as_secs_f64(),
        flood_source: arguments.flood_source.to_string(),
        phases,
        verification,
    };
    print!("{}", to_text(&summary));
    if let Some(path) = &arguments.json {
        let written = serde_json::to_string_pretty(&summary)
            .map_err(|error| error.to_string())
            .and_then(|json| std::fs::write(path, json + "\n").map_err(|error| error.to_string()));
        if let Err(error) = written {
            return fail(EXIT_CONNECTION, &format!("cannot write {}: {error}", path.display()));
        }
    }
    ExitCode::SUCCESS
}

fn check(arguments: &FloodArgs) -> Result<(), String> {
    if arguments.target.transport != Transport::Udp || !arguments.target.is_loopback() {
        return Err(format!("--target {} must be udp:// on loopback", arguments.target));
    }
    if !arguments.flood_source.is_loopback() || arguments.flood_source == Ipv4Addr::LOCALHOST {
        return Err(format!(
            "--flood-source {} must be a loopback address other than the client's 127.0.0.1",
            arguments.flood_source
        ));
    }
    if !(1..=RATE_MAX).contains(&arguments.rate) {
        return Err(format!("--rate {} is out of range 1..={RATE_MAX}", arguments.rate));
    }
    if arguments.duration < Duration::from_secs(1) || arguments.duration > Duration::from_secs(600) {
        return Err(format!(
            "--duration {} is out of range 1s..=600s",
            format_duration(arguments.duration)
        ));
    }
    if !(1..=64).contains(&arguments.flood_frames_per_datagram) {
        return Err(format!(
            "--flood-frames-per-datagram {} is out of range 1..=64",
            arguments.flood_frames_per_datagram
        ));
    }
    Ok(())
}

/// The client's event number `index`: player `1 + index % PLAYERS`, each player's seqs rising
/// from `seq_base + 1`, as `verify::Ledger` reads them.
fn client_event(seq_base: u64, index: u64) -> EventId {
    EventId {
        player_id: 1 + index % PLAYERS,
        seq: seq_base + 1 + index / PLAYERS,
    }
}

/// How one of the client's events ended.
enum Resolution {
    /// ACCEPTED or DUPLICATE, this long after its first send.
    Stored(EventId, Duration),
    Rejected,
}

/// The well-behaved client: one UDP socket on 127.0.0.1 connected to the server, one frame per
/// datagram, each event resent until it is answered ACCEPTED or DUPLICATE: after
/// `ACK_TIMEOUT × 2^(copies - 1)` (at most BACKOFF_MAX) without a final answer, or that long
/// after a RETRY. The one resend loop (`shardgate_client::resend::Outstanding`) decides; the
/// client only writes and reads.
struct WellBehavedClient {
    socket: UdpSocket,
    /// Each event's frame, by id, until it ends.
    pending: Outstanding<Vec<u8>>,
    /// Time zero of the resend loop's nanosecond clock.
    origin: Instant,
    /// Events the table had no room for: not sent, so lost.
    unsent: u64,
    resends: u64,
    retry_answers: u64,
}

impl WellBehavedClient {
    /// A client for at most `events_max` events pending at once.
    fn connect(target: SocketAddr, events_max: usize) -> std::io::Result<WellBehavedClient> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        socket.connect(target)?;
        socket.set_read_timeout(Some(Duration::from_micros(500)))?;
        // The shared resend schedule without jitter, for silence and RETRY alike.
        let schedule = Schedule::new(ACK_TIMEOUT, BACKOFF_MAX, 0);
        let waits = Waits {
            answer: schedule,
            retry: schedule,
        };
        Ok(WellBehavedClient {
            socket,
            pending: Outstanding::new(events_max, waits, Limits::default()),
            origin: Instant::now(),
            unsent: 0,
            resends: 0,
            retry_answers: 0,
        })
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn send(&mut self, id: EventId) {
        let mut frame = Vec::with_capacity(64 + PAYLOAD.len());
        encode_action(
            &ActionFields {
                id,
                client_time_us: unix_now_us(),
                action_type: 1,
                payload: PAYLOAD,
            },
            &mut frame,
        );
        // A send that fails (a full buffer) is resent on schedule like a lost one.
        let _ = self.socket.send(&frame);
        let now_ns = self.now_ns();
        // No jitter: no draw.
        if self.pending.first_sent(id, frame, now_ns, now_ns, 0).is_err() {
            self.unsent += 1;
        }
    }

    /// Resends what is due, then reads answers for up to half a millisecond.
    fn poll(&mut self, resolved: &mut Vec<Resolution>) {
        let now_ns = self.now_ns();
        while let Some(due) = self.pending.pop_due(now_ns, 0) {
            // No limits are set, so nothing ends this way.
            let Due::Resend { id, .. } = due else { continue };
            if let Some(entry) = self.pending.get(id) {
                let _ = self.socket.send(&entry.payload);
                self.resends += 1;
            }
        }
        let mut reply = [0u8; 2048];
        let length = match self.socket.recv(&mut reply) {
            Ok(length) => length,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
            // An ICMP error from an earlier send: the resend schedule covers it.
            Err(_) => return,
        };
        let now_ns = self.now_ns();
        for chunk in reply[..length].chunks_exact(ACK_BYTES) {
            let Ok(ack) = decode_ack(chunk) else {
                continue;
            };
            if ack.status == Status::Retry {
                self.retry_answers += 1;
            }
            // Unknown: the answer to a copy of an event already answered.
            if let Verdict::Ended(ending) = self.pending.answered(ack.id, ack.status, now_ns, 0) {
                resolved.push(match ending.end {
                    End::Stored { .. } => Resolution::Stored(ending.id, Duration::from_nanos(ending.latency_ns)),
                    // No limits are set, so nothing ends unconfirmed.
                    End::Rejected | End::Unconfirmed => Resolution::Rejected,
                });
            }
        }
    }

    /// Gives up on every event still pending; returns how many were lost, unsent ones included.
    fn give_up(&mut self) -> u64 {
        let mut lost = std::mem::take(&mut self.unsent);
        let now_ns = self.now_ns();
        self.pending.give_up_all(now_ns, |_| lost += 1);
        lost
    }
}

/// One phase: the client's events at the rate, the flooder alongside if `flood`, then every
/// answer awaited.
fn phase(
    arguments: &FloodArgs,
    client: &mut WellBehavedClient,
    flood: bool,
    seq_base: u64,
    indexes: std::ops::Range<u64>,
    acked_ids: &mut Vec<EventId>,
) -> Result<PhaseSummary, String> {
    let counters_before = arguments.metrics.map(server_counters).transpose()?;
    let (resends_before, retries_before) = (client.resends, client.retry_answers);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = if flood {
        let datagrams = flood_datagrams(seq_base, arguments.flood_frames_per_datagram);
        let socket = UdpSocket::bind((arguments.flood_source, 0))
            .map_err(|error| format!("cannot bind the flooder to {}: {error}", arguments.flood_source))?;
        let (target, stop) = (arguments.target.address, Arc::clone(&stop));
        Some(thread::spawn(move || {
            flood_until_stopped(&socket, target, &datagrams, &stop)
        }))
    } else {
        None
    };
    let mut histogram = Histogram::<u64>::new_with_bounds(1, HISTOGRAM_HIGHEST_US, 3).expect("constant bounds");
    let mut summary = PhaseSummary {
        flood,
        events: indexes.end - indexes.start,
        ..PhaseSummary::default()
    };
    let mut resolved: Vec<Resolution> = Vec::with_capacity(1024);
    let mut record = |resolved: &mut Vec<Resolution>, summary: &mut PhaseSummary| {
        for resolution in resolved.drain(..) {
            match resolution {
                Resolution::Stored(id, latency) => {
                    let latency_us = (latency.as_micros() as u64).clamp(1, HISTOGRAM_HIGHEST_US);
                    histogram
                        .record(latency_us)
                        .expect("clamped into the histogram's range");
                    acked_ids.push(id);
                }
                Resolution::Rejected => summary.rejected += 1,
            }
        }
    };
    let started = Instant::now();
    let mut next = indexes.start;
    while next < indexes.end {
        let due = indexes.start + (started.elapsed().as_secs_f64() * arguments.rate as f64) as u64 + 1;
        while next < due.min(indexes.end) {
            client.send(client_event(seq_base, next));
            next += 1;
        }
        client.poll(&mut resolved);
        record(&mut resolved, &mut summary);
    }
    let flood_elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    if let Some(flooder) = flooder {
        let datagrams = flooder.join().map_err(|_| "the flooder thread panicked".to_string())?;
        summary.flood_datagrams = datagrams;
        summary.flood_datagrams_per_sec = datagrams as f64 / flood_elapsed.as_secs_f64();
    }
    let drain_deadline = Instant::now() + DRAIN_GRACE;
    while !client.pending.is_empty() && Instant::now() < drain_deadline {
        client.poll(&mut resolved);
        record(&mut resolved, &mut summary);
    }
    // Never answered stored within the grace: lost, as far as this client knows.
    summary.lost = client.give_up();
    summary.latency_us = Percentiles::of(&histogram);
    summary.resends = client.resends - resends_before;
    summary.retry_answers = client.retry_answers - retries_before;
    if let (Some(before), Some(address)) = (counters_before, arguments.metrics) {
        let after = server_counters(address)?;
        summary.frames_limited = Some(after.0.saturating_sub(before.0));
        summary.kernel_drops = Some(after.1.saturating_sub(before.1));
    }
    Ok(summary)
}

/// The flood, built ahead: in turn a datagram of valid frames (distinct ids), of frames with a
/// bad crc, of random bytes, and of bytes that start like a header.
fn flood_datagrams(seed: u64, frames_per_datagram: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_seq = seed;
    (0..FLOOD_DATAGRAMS)
        .map(|index| {
            let mut datagram = Vec::with_capacity(frames_per_datagram * 64);
            match index % 4 {
                0 | 1 => {
                    for _ in 0..frames_per_datagram {
                        let start = datagram.len();
                        encode_action(
                            &ActionFields {
                                id: EventId {
                                    player_id: FLOOD_PLAYER,
                                    seq: next_seq,
                                },
                                client_time_us: next_seq,
                                action_type: 9,
                                payload: &[],
                            },
                            &mut datagram,
                        );
                        next_seq += 1;
                        if index % 4 == 1 {
                            // A bad crc: REJECTED if answered.
                            let last = datagram.len() - 1;
                            datagram[last] ^= 0xff;
                        }
                        debug_assert!(datagram.len() > start);
                    }
                }
                2 => {
                    datagram.resize(rng.gen_range(1..1400), 0);
                    rng.fill(&mut datagram[..]);
                }
                _ => {
                    datagram.extend_from_slice(b"SG\x01\x01");
                    datagram.resize(rng.gen_range(36..200), 0);
                    rng.fill(&mut datagram[4..]);
                }
            }
            datagram
        })
        .collect()
}

/// Sends `datagrams` round and round until `stop`, as fast as one thread can; returns how many.
fn flood_until_stopped(socket: &UdpSocket, target: SocketAddr, datagrams: &[Vec<u8>], stop: &AtomicBool) -> u64 {
    let mut sent = 0u64;
    loop {
        for (index, datagram) in datagrams.iter().enumerate() {
            // Looking at the flag every datagram would cost more than the send.
            if index % 256 == 0 && stop.load(Ordering::Relaxed) {
                return sent;
            }
            // A loopback send fails only for a full buffer (ENOBUFS): the flood goes on.
            if socket.send_to(datagram, target).is_ok() {
                sent += 1;
            }
        }
    }
}

/// The server's `shardgate_frames_limited_total` and `shardgate_udp_kernel_drops_total`, summed
/// over its shards.
fn server_counters(address: SocketAddr) -> Result<(u64, u64), String> {
    let failed = |error: std::io::Error| format!("cannot scrape http://{address}/metrics: {error}");
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).map_err(failed)?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(failed)?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(failed)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(failed)?;
    let sum = |name: &str| -> u64 {
        response
            .lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok((
        sum("shardgate_frames_limited_total"),
        sum("shardgate_udp_kernel_drops_total"),
    ))
}

fn to_text(summary: &FloodSummary) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "flood: {} | client {}/s from 127.0.0.1, {} s per phase | flooder from {}",
        summary.target, summary.rate, summary.duration_s, summary.flood_source
    );
    let _ = writeln!(
        text,
        "{:<10} {:>7} {:>5} {:>9} {:>9} {:>10} {:>9} {:>8} {:>6} {:>14} {:>14} {:>13}",
        "phase",
        "events",
        "lost",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "resends",
        "RETRY",
        "flood dgram/s",
        "frames limited",
        "kernel drops"
    );
    for phase in &summary.phases {
        let optional = |value: Option<u64>| value.map_or("-".to_string(), |value| value.to_string());
        let _ = writeln!(
            text,
            "{:<10} {:>7} {:>5} {:>9} {:>9} {:>10} {:>9} {:>8} {:>6} {:>14.0} {:>14} {:>13}",
            if phase.flood { "flood" } else { "no flood" },
            phase.events,
            phase.lost,
            phase.latency_us.p50,
            phase.latency_us.p99,
            phase.latency_us.p999,
            phase.latency_us.max,
            phase.resends,
            phase.retry_answers,
            phase.flood_datagrams_per_sec,
            optional(phase.frames_limited),
            optional(phase.kernel_drops)
        );
    }
    if let Some(verification) = &summary.verification {
        let _ = writeln!(
            text,
            "redis: {} of the client's {} events stored, {} stored twice, {} acked but missing",
            verification.stored, verification.events, verification.stored_twice, verification.acked_missing
        );
    }
    text
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("shardgate-bench flood: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's ids are exactly the dense per-player runs `verify::Ledger` indexes.
    #[test]
    fn client_ids_match_the_ledger_layout() {
        let seq_base = 1_000;
        let total = 2 * PLAYERS + 5;
        let mut per_player = vec![0u64; PLAYERS as usize];
        for index in 0..total {
            let id = client_event(seq_base, index);
            let count = &mut per_player[(id.player_id - 1) as usize];
            *count += 1;
            assert_eq!(id.seq, seq_base + *count);
        }
        let expected: Vec<u64> = (0..PLAYERS)
            .map(|player| total / PLAYERS + u64::from(player < total % PLAYERS))
            .collect();
        assert_eq!(per_player, expected);
    }

    /// The flood holds each kind of datagram, and its frames never name a client player.
    #[test]
    fn flood_datagrams_mix_valid_and_garbage() {
        let datagrams = flood_datagrams(7, 4);
        assert_eq!(datagrams.len(), FLOOD_DATAGRAMS);
        let valid = shardgate_proto::frame::check(&datagrams[0]).expect("a whole header");
        assert!(shardgate_proto::frame::parse(&datagrams[0][..valid.frame_bytes]).is_ok());
        assert_eq!(valid.id.player_id, FLOOD_PLAYER);
        let bad_crc = shardgate_proto::frame::check(&datagrams[1]).expect("a whole header");
        assert!(shardgate_proto::frame::parse(&datagrams[1][..bad_crc.frame_bytes]).is_err());
    }
}
