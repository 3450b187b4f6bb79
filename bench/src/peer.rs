//! `shardgate-bench peer`: the same workload with no middle tier, for comparison.
//!
//! Instead of sending frames to shardgate, simulated game clients store their events in the
//! backend themselves:
//! - `peer redis` (`peer_redis.rs`): each event is one `EVALSHA` of shardgate's own
//!   dedup-and-append script, so the data in Redis and its guarantees are exactly shardgate's;
//!   what is missing is shardgate's batching of many events into one call.
//! - `peer nats` (`peer_nats.rs`): each event is one JetStream publish whose `Nats-Msg-Id`
//!   header lets the stream drop copies within its duplicate window.
//!
//! This module holds what both share: the flags, the open-loop timetable, the event ids and
//! copies, the per-lane tallies, and the summary, whose JSON carries the same keys as
//! `shardgate-bench run`'s so one script can compare all of them.
//!
//! # The workload
//! As in `run`: events at a fixed rate, open loop (wrk2-style: latency counts from each
//! event's *intended* send time, so a backend that stalls shows the stall instead of slowing
//! the generator), a share `--dup-ratio` of the sends being copies of recent events, and every
//! event retried until it is stored or the run's grace ends. Lane `l` (one connection) sends
//! timetable slots `l, l + lanes, ...` and owns the players `p` with `(p - 1) % lanes == l`, so
//! each player's seq rises by one per fresh event without any shared counter. Copies come from
//! a small shared ring of recent events, preferring another lane's, so they race the original
//! on another connection as a client's retry on another path would.
//!
//! # Verification
//! Every fresh id is `(player, seq_base + n)` for `n` in `1..=sent`, as in `run`, so the
//! verification can use `verify::Ledger` and `verify::Checker`: stored, stored twice, acked but
//! missing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shardgate_proto::frame::{EventId, PAYLOAD_BYTES_MAX};

use crate::parse::{format_duration, parse_duration};
use crate::report::{write_outcome_lines, OutcomeLines, Percentiles, SLO_FIRST_P999_US};
use crate::verify::Verification;

/// Connections one run may open.
const LANES_MAX: usize = 1_024;
/// Players tracked: each costs one 8-byte counter.
const PLAYERS_MAX: u64 = 10_000_000;
/// Scheduled events one run may plan. Each answered send keeps its 16-byte id for the
/// verification, so this bounds that memory at under 1 GB; a typo like `--rate 10000000`
/// is refused instead of eating the machine.
const EVENTS_PLANNED_MAX: u128 = 50_000_000;
/// Time after the last scheduled send to finish retries and collect answers (as `run`).
pub const GRACE: Duration = Duration::from_secs(2);
/// Recent fresh events copies are drawn from (as `run`'s ring).
const RECENT_EVENTS: usize = 4_096;
/// Random draws from the ring when looking for another lane's event.
const COPY_DRAWS_MAX: usize = 4;
/// action_type values used.
const ACTION_TYPES: u16 = 16;
/// Lost ids shown in the summary.
pub const LOST_SAMPLE_MAX: usize = 10;
/// Latency histograms: 1 µs to 60 s, 3 significant digits, as `run`'s.
const HISTOGRAM_HIGHEST_US: u64 = 60_000_000;
/// Time between the lanes' start and the first send, so every thread is up first.
pub const START_DELAY: Duration = Duration::from_millis(100);

pub const EXIT_SLO_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CONNECTION: u8 = 3;

/// Flags of `shardgate-bench peer`.
#[derive(Debug, Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    backend: Backend,
}

#[derive(Debug, Subcommand)]
enum Backend {
    /// Clients call Redis directly: one EVALSHA of shardgate's dedup-and-append script per event.
    Redis(crate::peer_redis::RedisArgs),
    /// Clients publish to NATS JetStream directly, deduplicated by the Nats-Msg-Id header.
    Nats(crate::peer_nats::NatsArgs),
}

/// Runs `peer redis` or `peer nats`.
pub fn command(arguments: PeerArgs) -> ExitCode {
    match arguments.backend {
        Backend::Redis(arguments) => crate::peer_redis::command(arguments),
        Backend::Nats(arguments) => crate::peer_nats::command(arguments),
    }
}

/// The workload flags both peers take, with the same names and defaults as `run`'s.
#[derive(Clone, Debug, Args)]
pub struct WorkloadArgs {
    /// Events per second, first sends only (retries come on top).
    #[arg(long, value_name = "N")]
    rate: u64,

    /// How long scheduled sends go on, warmup included, e.g. 30s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,

    /// The first part of the run whose events are sent and verified but not timed.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    warmup: Duration,

    /// Players (ids 1..=N) picked at random; each has its own rising seq.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    players: u64,

    /// Share of sends that are copies of a recently sent event, from another connection if possible.
    #[arg(long, value_name = "RATIO", default_value_t = 0.3)]
    dup_ratio: f64,

    /// Payload bytes per event (0..=1024).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    payload: usize,

    /// Connections to the backend, each driven by its own sender.
    #[arg(long, value_name = "N", default_value_t = 16)]
    connections: usize,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Exit 1 if lost > 0, stored_twice > 0, acked_missing > 0 or first-attempt p99.9 >= 5 ms.
    #[arg(long)]
    slo_check: bool,

    /// Allow a backend that is not on a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
}

/// The checked workload.
#[derive(Clone, Debug)]
pub struct Workload {
    pub rate_per_sec: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub players: u64,
    pub dup_ratio: f64,
    pub payload_bytes: usize,
    pub lanes: usize,
    pub json_path: Option<PathBuf>,
    pub slo_check: bool,
}

impl Workload {
    /// Checks every bound; the message names the flag.
    pub fn new(arguments: WorkloadArgs) -> Result<Workload, String> {
        if arguments.rate == 0 {
            return Err("--rate must be at least 1 event per second".into());
        }
        if arguments.duration.is_zero() {
            return Err("--duration must be longer than 0".into());
        }
        if arguments.warmup >= arguments.duration {
            return Err("--warmup must be shorter than --duration: the warmup is the start of the run".into());
        }
        if !(1..=LANES_MAX).contains(&arguments.connections) {
            return Err(format!("--connections must be within 1..={LANES_MAX}"));
        }
        if !(arguments.connections as u64..=PLAYERS_MAX).contains(&arguments.players) {
            return Err(format!(
                "--players must be within --connections ({}) ..={PLAYERS_MAX}: each connection owns its players",
                arguments.connections
            ));
        }
        if !(0.0..1.0).contains(&arguments.dup_ratio) {
            return Err("--dup-ratio must be within 0 (no copies) and below 1".into());
        }
        if arguments.payload > PAYLOAD_BYTES_MAX {
            return Err(format!("--payload must be at most {PAYLOAD_BYTES_MAX} bytes"));
        }
        let planned = arguments.duration.as_nanos() * u128::from(arguments.rate) / 1_000_000_000;
        if planned > EVENTS_PLANNED_MAX {
            return Err(format!(
                "--rate × --duration plans {planned} events; at most {EVENTS_PLANNED_MAX} per run"
            ));
        }
        Ok(Workload {
            rate_per_sec: arguments.rate,
            duration: arguments.duration,
            warmup: arguments.warmup,
            players: arguments.players,
            dup_ratio: arguments.dup_ratio,
            payload_bytes: arguments.payload,
            lanes: arguments.connections,
            json_path: arguments.json,
            slo_check: arguments.slo_check,
        })
    }
}

/// Whether `host` names this machine's loopback (an IP in 127/8 or ::1, or `localhost`).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// Checks that `url` (given as `--{flag}`) names a loopback host unless
/// `allow_remote`; the error is the message to print.
pub fn check_target_url(url: &str, flag: &str, scheme: &str, allow_remote: bool) -> Result<(), String> {
    match url_host(url) {
        Some(host) if allow_remote || is_loopback_host(host) => Ok(()),
        Some(host) => Err(format!(
            "--{flag} host {host} is not a loopback address (see --allow-remote)"
        )),
        None => Err(format!("--{flag} {url:?}: expected {scheme}://HOST:PORT")),
    }
}

/// The host part of `scheme://[user[:password]@]host[:port][/path]`.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host_port)| host_port);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        &host_port[..bracketed.find(']')? + 2]
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// The fixed timetable: slot `i` is due `i / rate` seconds after the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timetable {
    rate_per_sec: u64,
    lanes: u64,
    /// Slots due before `duration_ns`.
    pub slots_total: u64,
    pub duration_ns: u64,
    /// Slots due before this are sent and verified but not timed.
    pub warmup_ns: u64,
    /// Nothing is sent or awaited after this.
    pub end_ns: u64,
}

impl Timetable {
    pub fn new(workload: &Workload) -> Timetable {
        let duration_ns = nanos(workload.duration);
        let slots = workload.duration.as_nanos() * u128::from(workload.rate_per_sec);
        Timetable {
            rate_per_sec: workload.rate_per_sec,
            lanes: workload.lanes as u64,
            slots_total: u64::try_from(slots.div_ceil(1_000_000_000)).unwrap_or(u64::MAX),
            duration_ns,
            warmup_ns: nanos(workload.warmup),
            end_ns: duration_ns.saturating_add(nanos(GRACE)),
        }
    }

    pub fn intended_ns(&self, slot: u64) -> u64 {
        u64::try_from(u128::from(slot) * 1_000_000_000 / u128::from(self.rate_per_sec)).unwrap_or(u64::MAX)
    }

    /// The slots lane `lane` sends: `lane, lane + lanes, ...` below `slots_total`.
    pub fn slots_of(&self, lane: usize) -> impl Iterator<Item = u64> {
        (lane as u64..self.slots_total).step_by(self.lanes as usize)
    }
}

/// The run's time origin; times inside a run are nanoseconds since it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn starting_in(delay: Duration) -> Clock {
        Clock {
            start: Instant::now() + delay,
        }
    }

    /// Nanoseconds since the start; 0 before it.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sleeps until `due_ns`, or not at all if it has passed.
    pub fn sleep_until(&self, due_ns: u64) {
        let now_ns = self.now_ns();
        if due_ns > now_ns {
            std::thread::sleep(Duration::from_nanos(due_ns - now_ns));
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Unix time in microseconds: the events' client_time_us.
pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One event as first sent; a copy or a retry sends exactly these fields again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub id: EventId,
    pub client_time_us: u64,
    pub action_type: u16,
}

/// The payload of `id`: `payload_bytes` bytes derived from the id (as `run` does), so every
/// send of one event carries the same bytes without storing payloads.
pub fn fill_payload(id: EventId, payload_bytes: usize, payload: &mut Vec<u8>) {
    let pattern = (id.player_id.rotate_left(32) ^ id.seq).to_le_bytes();
    payload.clear();
    payload.extend(pattern.iter().cycle().take(payload_bytes));
}

/// The recent fresh events copies are drawn from, shared by the lanes.
pub struct RecentEvents {
    ring: Mutex<Ring>,
}

struct Ring {
    events: Vec<(Event, usize)>,
    next_slot: usize,
}

impl RecentEvents {
    pub fn new() -> RecentEvents {
        RecentEvents {
            ring: Mutex::new(Ring {
                events: Vec::with_capacity(RECENT_EVENTS),
                next_slot: 0,
            }),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Every write is one slot store, so a panicking lane cannot leave the ring inconsistent.
        self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remember(&self, event: Event, lane: usize) {
        let mut ring = self.ring();
        let slot = ring.next_slot;
        if ring.events.len() < RECENT_EVENTS {
            ring.events.push((event, lane));
        } else {
            ring.events[slot] = (event, lane);
        }
        ring.next_slot = (slot + 1) % RECENT_EVENTS;
    }

    /// A recent event, preferably one another lane sent; None before anything was sent.
    fn copy_for(&self, rng: &mut impl Rng, lane: usize) -> Option<Event> {
        let ring = self.ring();
        if ring.events.is_empty() {
            return None;
        }
        let mut fallback = None;
        for _ in 0..COPY_DRAWS_MAX {
            let (event, first_lane) = ring.events[rng.gen_range(0..ring.events.len())];
            if first_lane != lane {
                return Some(event);
            }
            fallback = Some(event);
        }
        fallback
    }
}

impl Default for RecentEvents {
    fn default() -> RecentEvents {
        RecentEvents::new()
    }
}

/// One lane's source of events: its own players' counters, and copies from the shared ring.
pub struct LaneEvents {
    lane: usize,
    lanes: usize,
    seq_base: u64,
    dup_ratio: f64,
    /// Fresh events sent per owned player: index `k` is player `lane + 1 + k × lanes`.
    sent_per_owned_player: Vec<u64>,
    rng: StdRng,
}

impl LaneEvents {
    pub fn new(workload: &Workload, lane: usize, seq_base: u64) -> LaneEvents {
        let owned = (workload.players - lane as u64).div_ceil(workload.lanes as u64);
        LaneEvents {
            lane,
            lanes: workload.lanes,
            seq_base,
            dup_ratio: workload.dup_ratio,
            sent_per_owned_player: vec![0; usize::try_from(owned).expect("players are bounded")],
            rng: StdRng::seed_from_u64(seq_base ^ (lane as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        }
    }

    /// The next send: a copy of a recent event (with probability dup_ratio, once one exists),
    /// or a fresh event of a random owned player. The flag says whether it is a copy.
    pub fn next(&mut self, recent: &RecentEvents, client_time_us: u64) -> (Event, bool) {
        if self.dup_ratio > 0.0 && self.rng.gen_bool(self.dup_ratio) {
            if let Some(event) = recent.copy_for(&mut self.rng, self.lane) {
                return (event, true);
            }
        }
        let owned_index = self.rng.gen_range(0..self.sent_per_owned_player.len());
        self.sent_per_owned_player[owned_index] += 1;
        let event = Event {
            id: EventId {
                player_id: (self.lane + 1 + owned_index * self.lanes) as u64,
                seq: self.seq_base + self.sent_per_owned_player[owned_index],
            },
            client_time_us,
            action_type: self.rng.gen_range(0..ACTION_TYPES),
        };
        recent.remember(event, self.lane);
        (event, false)
    }

    /// Adds this lane's counters into `sent_per_player` (index `player_id - 1`).
    pub fn record_sent(&self, sent_per_player: &mut [u64]) {
        for (owned_index, &sent) in self.sent_per_owned_player.iter().enumerate() {
            sent_per_player[self.lane + owned_index * self.lanes] = sent;
        }
    }
}

/// What one lane did; lanes' tallies are merged into the run's.
pub struct Tally {
    /// First sends (fresh events and copies).
    pub sent: u64,
    pub copies: u64,
    /// Sends after a failed attempt.
    pub resent: u64,
    /// Answers: stored now, or already stored.
    pub accepted: u64,
    pub duplicate: u64,
    /// Attempts that failed (error reply, timeout, broken connection) and were retried.
    pub failed_attempts: u64,
    pub send_errors: u64,
    pub reconnects: u64,
    /// Sends without a final answer when the run ended.
    pub lost: u64,
    pub lost_sample: Vec<EventId>,
    pub fresh_events: u64,
    pub first_us: Histogram<u64>,
    pub final_us: Histogram<u64>,
    /// Ids answered stored or already stored (a copy repeats its id).
    pub acked_ids: Vec<EventId>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            sent: 0,
            copies: 0,
            resent: 0,
            accepted: 0,
            duplicate: 0,
            failed_attempts: 0,
            send_errors: 0,
            reconnects: 0,
            lost: 0,
            lost_sample: Vec::new(),
            fresh_events: 0,
            first_us: new_histogram(),
            final_us: new_histogram(),
            acked_ids: Vec::new(),
        }
    }

    /// Counts one first send.
    pub fn on_send(&mut self, is_copy: bool) {
        self.sent += 1;
        self.copies += u64::from(is_copy);
        self.fresh_events += u64::from(!is_copy);
    }

    /// Records a latency from the intended time, unless the send was in the warmup.
    pub fn record(histogram: &mut Histogram<u64>, intended_ns: u64, now_ns: u64, timetable: &Timetable) {
        if intended_ns >= timetable.warmup_ns {
            // saturating_record clamps to the histogram's range instead of failing.
            histogram.saturating_record((now_ns.saturating_sub(intended_ns) / 1_000).max(1));
        }
    }

    pub fn on_lost(&mut self, id: EventId) {
        self.lost += 1;
        if self.lost_sample.len() < LOST_SAMPLE_MAX {
            self.lost_sample.push(id);
        }
    }

    pub fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.copies += other.copies;
        self.resent += other.resent;
        self.accepted += other.accepted;
        self.duplicate += other.duplicate;
        self.failed_attempts += other.failed_attempts;
        self.send_errors += other.send_errors;
        self.reconnects += other.reconnects;
        self.lost += other.lost;
        for id in other.lost_sample {
            if self.lost_sample.len() < LOST_SAMPLE_MAX {
                self.lost_sample.push(id);
            }
        }
        self.fresh_events += other.fresh_events;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.first_us.add(&other.first_us);
        let _ = self.final_us.add(&other.final_us);
        self.acked_ids.extend(other.acked_ids);
    }
}

impl Default for Tally {
    fn default() -> Tally {
        Tally::new()
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_HIGHEST_US, 3).expect("constant histogram bounds are valid")
}

/// The peer's summary. Its JSON has every key `run`'s has (same meaning; `frames_per_datagram`
/// is 1, `retry` counts failed attempts, `rejected` and the ack counters are 0), plus `peer`
/// and `skipped`.
#[derive(Clone, Debug, Serialize)]
pub struct PeerSummary {
    pub peer: String,
    /// True when the backend was not reachable and nothing ran.
    pub skipped: bool,
    pub target: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub lanes: usize,
    pub frames_per_datagram: usize,
    pub payload_bytes: usize,
    pub dup_ratio: f64,
    pub offered_rate: u64,
    pub achieved_rate: f64,
    pub scheduled: u64,
    pub sent: u64,
    pub copies: u64,
    pub resent: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub retry: u64,
    pub rejected: u64,
    pub lost: u64,
    pub lost_sample: Vec<String>,
    pub unmatched_acks: u64,
    pub malformed_acks: u64,
    pub send_errors: u64,
    pub reconnects: u64,
    pub latency_first_us: Percentiles,
    pub latency_final_us: Percentiles,
    pub events: u64,
    pub stored: Option<u64>,
    pub stored_twice: Option<u64>,
    pub acked_missing: Option<u64>,
    pub events_not_stored: Option<u64>,
    pub slo_ok: bool,
    pub slo_failures: Vec<String>,
}

impl PeerSummary {
    pub fn new(
        peer: &str,
        target: String,
        workload: &Workload,
        timetable: &Timetable,
        tally: &Tally,
        verification: Option<&Verification>,
    ) -> PeerSummary {
        let mut summary = PeerSummary {
            peer: peer.to_string(),
            skipped: false,
            target,
            duration_s: workload.duration.as_secs_f64(),
            warmup_s: workload.warmup.as_secs_f64(),
            lanes: workload.lanes,
            frames_per_datagram: 1,
            payload_bytes: workload.payload_bytes,
            dup_ratio: workload.dup_ratio,
            offered_rate: workload.rate_per_sec,
            achieved_rate: ((tally.sent as f64 / workload.duration.as_secs_f64()) * 10.0).round() / 10.0,
            scheduled: timetable.slots_total,
            sent: tally.sent,
            copies: tally.copies,
            resent: tally.resent,
            accepted: tally.accepted,
            duplicate: tally.duplicate,
            retry: tally.failed_attempts,
            rejected: 0,
            lost: tally.lost,
            lost_sample: tally
                .lost_sample
                .iter()
                .map(|id| format!("{}:{}", id.player_id, id.seq))
                .collect(),
            unmatched_acks: 0,
            malformed_acks: 0,
            send_errors: tally.send_errors,
            reconnects: tally.reconnects,
            latency_first_us: Percentiles::of(&tally.first_us),
            latency_final_us: Percentiles::of(&tally.final_us),
            events: tally.fresh_events,
            stored: verification.map(|verification| verification.stored),
            stored_twice: verification.map(|verification| verification.stored_twice),
            acked_missing: verification.map(|verification| verification.acked_missing),
            events_not_stored: verification.map(|verification| verification.events_not_stored),
            slo_ok: true,
            slo_failures: Vec::new(),
        };
        summary.judge();
        summary
    }

    /// The summary of a run that did not happen because the backend was unreachable.
    pub fn skipped(peer: &str, target: String, workload: &Workload, reason: &str) -> PeerSummary {
        let mut summary = PeerSummary::new(peer, target, workload, &Timetable::new(workload), &Tally::new(), None);
        summary.skipped = true;
        summary.scheduled = 0;
        summary.slo_ok = false;
        summary.slo_failures = vec![format!("skipped: {reason}")];
        summary
    }

    /// The SLO `run` applies: nothing lost, stored twice or acked but missing, and first-attempt
    /// p99.9 under 5 ms. A run that was not verified cannot meet it.
    fn judge(&mut self) {
        let mut failures = Vec::new();
        if self.lost > 0 {
            failures.push(format!("lost {} > 0", self.lost));
        }
        match (self.stored_twice, self.acked_missing) {
            (Some(stored_twice), Some(acked_missing)) => {
                if stored_twice > 0 {
                    failures.push(format!("stored_twice {stored_twice} > 0"));
                }
                if acked_missing > 0 {
                    failures.push(format!("acked_missing {acked_missing} > 0"));
                }
            }
            _ => failures.push("not verified".to_string()),
        }
        if self.latency_first_us.p999 >= SLO_FIRST_P999_US {
            failures.push(format!(
                "first-attempt p99.9 {} µs >= {SLO_FIRST_P999_US} µs",
                self.latency_first_us.p999
            ));
        }
        self.slo_ok = failures.is_empty();
        self.slo_failures = failures;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a summary is plain data")
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_json() + "\n")
    }

    /// The human summary, laid out like `run`'s.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        if self.skipped {
            let _ = writeln!(text, "peer {}: {}: skipped", self.peer, self.target);
            return text;
        }
        let _ = writeln!(
            text,
            "peer {}: {}  duration {} (warmup {})  connections {}  payload {} B  dup-ratio {}",
            self.peer,
            self.target,
            format_duration(Duration::from_secs_f64(self.duration_s)),
            format_duration(Duration::from_secs_f64(self.warmup_s)),
            self.lanes,
            self.payload_bytes,
            self.dup_ratio
        );
        let _ = writeln!(
            text,
            "  rate      offered {}/s  achieved {:.1}/s",
            self.offered_rate, self.achieved_rate
        );
        let _ = writeln!(
            text,
            "  events    scheduled {}  sent {} (copies {}, events {})  resent {}  send_errors {}  reconnects {}",
            self.scheduled, self.sent, self.copies, self.events, self.resent, self.send_errors, self.reconnects
        );
        let _ = writeln!(
            text,
            "  answers   accepted {}  duplicate {}  failed attempts {}",
            self.accepted, self.duplicate, self.retry
        );
        write_outcome_lines(
            &mut text,
            &OutcomeLines {
                lost: self.lost,
                lost_sample: &self.lost_sample,
                latency_first_us: &self.latency_first_us,
                latency_final_us: &self.latency_final_us,
                verification: match (
                    self.stored,
                    self.stored_twice,
                    self.acked_missing,
                    self.events_not_stored,
                ) {
                    (Some(stored), Some(stored_twice), Some(acked_missing), Some(events_not_stored)) => {
                        Some([stored, stored_twice, acked_missing, events_not_stored])
                    }
                    _ => None,
                },
                verification_label: "stored",
                not_verified: "not verified",
                slo_ok: self.slo_ok,
                slo_failures: &self.slo_failures,
            },
        );
        text
    }
}

/// Prints the summary, writes the JSON if asked, and picks the exit code.
pub fn finish(summary: &PeerSummary, workload: &Workload) -> ExitCode {
    print!("{}", summary.to_text());
    if let Some(path) = &workload.json_path {
        if let Err(error) = summary.write_json(path) {
            return fail(
                &summary.peer,
                EXIT_CONNECTION,
                &format!("cannot write {}: {error}", path.display()),
            );
        }
    }
    if workload.slo_check && !summary.slo_ok && !summary.skipped {
        return ExitCode::from(EXIT_SLO_FAILED);
    }
    ExitCode::SUCCESS
}

pub fn fail(peer: &str, code: u8, message: &str) -> ExitCode {
    eprintln!("shardgate-bench peer {peer}: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn arguments() -> WorkloadArgs {
        WorkloadArgs {
            rate: 1_000,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            players: 100,
            dup_ratio: 0.3,
            payload: 64,
            connections: 4,
            json: None,
            slo_check: false,
            allow_remote: false,
        }
    }

    #[test]
    fn workload_bounds() {
        assert!(Workload::new(arguments()).is_ok());
        type Change = fn(&mut WorkloadArgs);
        let cases: [(&str, Change); 7] = [
            ("--rate", |a| a.rate = 0),
            ("--warmup", |a| a.warmup = a.duration),
            ("--connections", |a| a.connections = 0),
            ("--players", |a| a.players = 3),
            ("--dup-ratio", |a| a.dup_ratio = 1.0),
            ("--payload", |a| a.payload = 1_025),
            ("--rate", |a| a.rate = 100_000_000),
        ];
        for (flag, change) in cases {
            let mut arguments = arguments();
            change(&mut arguments);
            let error = Workload::new(arguments).unwrap_err();
            assert!(error.contains(flag), "{flag}: {error}");
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(url_host("redis://127.0.0.1:6379"), Some("127.0.0.1"));
        assert_eq!(url_host("redis://user:pw@localhost:6379/0"), Some("localhost"));
        assert_eq!(url_host("nats://[::1]:4222"), Some("[::1]"));
        assert_eq!(url_host("nats://example.com"), Some("example.com"));
        assert_eq!(url_host("127.0.0.1:4222"), None);
        assert!(is_loopback_host("127.0.0.2") && is_loopback_host("[::1]") && is_loopback_host("LOCALHOST"));
        assert!(!is_loopback_host("10.0.0.1") && !is_loopback_host("example.com"));
    }

    // The lanes' slots tile the timetable exactly once, and the last is due before the end.
    #[test]
    fn timetable_tiles_slots() {
        let workload = Workload::new(arguments()).unwrap();
        let timetable = Timetable::new(&workload);
        assert_eq!(timetable.slots_total, 10_000);
        let mut all: Vec<u64> = (0..workload.lanes).flat_map(|lane| timetable.slots_of(lane)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        assert_eq!(timetable.intended_ns(1_000), 1_000_000_000);
        assert!(timetable.intended_ns(9_999) < timetable.duration_ns);
        assert_eq!(timetable.end_ns, timetable.duration_ns + nanos(GRACE));
    }

    // Each lane uses only its own players, their seqs rise by one from the base, the counters
    // say exactly what was sent, and copies repeat earlier ids.
    #[test]
    fn lane_events() {
        let workload = Workload::new(arguments()).unwrap();
        let recent = RecentEvents::new();
        let mut lanes: Vec<LaneEvents> = (0..4).map(|lane| LaneEvents::new(&workload, lane, 1_000)).collect();
        let mut last_seq = vec![1_000u64; 100];
        let mut fresh_ids = std::collections::HashSet::new();
        let (mut copies, mut fresh) = (0, 0);
        for round in 0..4_000 {
            let lane = round % 4;
            let (event, is_copy) = lanes[lane].next(&recent, 7);
            let player = event.id.player_id;
            if is_copy {
                copies += 1;
                assert!(fresh_ids.contains(&event.id), "a copy repeats a sent id");
                continue;
            }
            fresh += 1;
            assert_eq!((player - 1) as usize % 4, lane, "player {player} is not lane {lane}'s");
            assert_eq!(event.id.seq, last_seq[player as usize - 1] + 1);
            last_seq[player as usize - 1] = event.id.seq;
            fresh_ids.insert(event.id);
        }
        assert!((1_000..1_400).contains(&copies), "copies {copies}");
        let mut sent_per_player = vec![0; 100];
        for lane in &lanes {
            lane.record_sent(&mut sent_per_player);
        }
        assert_eq!(sent_per_player.iter().sum::<u64>(), fresh);
        for player in 0..100 {
            assert_eq!(1_000 + sent_per_player[player], last_seq[player]);
        }
    }

    // The ring keeps the most recent events only, and prefers another lane's.
    #[test]
    fn copies_prefer_other_lanes() {
        let recent = RecentEvents::new();
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(recent.copy_for(&mut rng, 0), None);
        let event = |seq| Event {
            id: EventId { player_id: 1, seq },
            client_time_us: 0,
            action_type: 0,
        };
        recent.remember(event(1), 0);
        assert_eq!(recent.copy_for(&mut rng, 0), Some(event(1)));
        for seq in 2..RECENT_EVENTS as u64 * 2 {
            recent.remember(event(seq), 1);
        }
        assert_eq!(recent.ring().events.len(), RECENT_EVENTS);
        for _ in 0..50 {
            assert!(recent.copy_for(&mut rng, 0).unwrap().id.seq >= RECENT_EVENTS as u64);
        }
    }

    fn tally() -> Tally {
        let mut tally = Tally::new();
        for value_us in 1..=1_000 {
            tally.first_us.record(value_us).unwrap();
            tally.final_us.record(value_us).unwrap();
        }
        tally.sent = 20_000;
        tally.accepted = 14_000;
        tally.duplicate = 6_000;
        tally.fresh_events = 14_000;
        tally
    }

    // The JSON has every key `run`'s summary has (report.rs's documented keys and the rest),
    // plus peer and skipped.
    #[test]
    fn json_matches_runs_keys() {
        let workload = Workload::new(arguments()).unwrap();
        let verification = Verification {
            stored: 14_000,
            events: 14_000,
            ..Verification::default()
        };
        let summary = PeerSummary::new(
            "redis",
            "redis://127.0.0.1:6379".into(),
            &workload,
            &Timetable::new(&workload),
            &tally(),
            Some(&verification),
        );
        assert!(summary.slo_ok, "{:?}", summary.slo_failures);
        let json: serde_json::Value = serde_json::from_str(&summary.to_json()).unwrap();
        for key in [
            "target",
            "duration_s",
            "warmup_s",
            "lanes",
            "frames_per_datagram",
            "payload_bytes",
            "dup_ratio",
            "offered_rate",
            "achieved_rate",
            "scheduled",
            "sent",
            "copies",
            "resent",
            "accepted",
            "duplicate",
            "retry",
            "rejected",
            "lost",
            "lost_sample",
            "unmatched_acks",
            "malformed_acks",
            "send_errors",
            "reconnects",
            "latency_first_us",
            "latency_final_us",
            "events",
            "stored",
            "stored_twice",
            "acked_missing",
            "events_not_stored",
            "slo_ok",
            "slo_failures",
            "peer",
            "skipped",
        ] {
            assert!(json.get(key).is_some(), "missing key {key}");
        }
        assert_eq!(json["achieved_rate"], 2_000.0);
        assert_eq!(json["latency_first_us"]["p999"], 999);
        assert_eq!(json["stored_twice"], 0);
        assert!(summary.to_text().contains("SLO       met"));
    }

    // Each SLO rule fails on its own; unverified and skipped runs never meet it.
    #[test]
    fn slo_rules() {
        let workload = Workload::new(arguments()).unwrap();
        let timetable = Timetable::new(&workload);
        let verified = Verification::default();
        let judge = |tally: &Tally, verification: Option<&Verification>| {
            PeerSummary::new("nats", "x".into(), &workload, &timetable, tally, verification).slo_failures
        };
        assert!(judge(&tally(), Some(&verified)).is_empty());
        assert_eq!(judge(&tally(), None), ["not verified"]);
        let mut lost = tally();
        lost.on_lost(EventId { player_id: 1, seq: 2 });
        assert!(judge(&lost, Some(&verified))[0].contains("lost 1"));
        let twice = Verification {
            stored_twice: 2,
            ..verified
        };
        assert!(judge(&tally(), Some(&twice))[0].contains("stored_twice 2"));
        let mut slow = tally();
        slow.first_us.record_n(6_000, 10).unwrap();
        assert!(judge(&slow, Some(&verified))[0].contains("p99.9"));
        let skipped = PeerSummary::skipped("nats", "nats://127.0.0.1:4222".into(), &workload, "no server");
        assert!(skipped.skipped && !skipped.slo_ok);
        assert!(skipped.to_text().contains("skipped"));
    }

    // Latencies count from the intended time, only after the warmup.
    #[test]
    fn records_after_warmup_only() {
        let workload = Workload::new(arguments()).unwrap();
        let timetable = Timetable::new(&workload);
        let mut histogram = new_histogram();
        Tally::record(&mut histogram, 0, 5_000_000, &timetable);
        assert!(histogram.is_empty());
        Tally::record(
            &mut histogram,
            timetable.warmup_ns,
            timetable.warmup_ns + 3_000_000,
            &timetable,
        );
        assert_eq!(histogram.len(), 1);
        assert!(histogram.equivalent(histogram.max(), 3_000));
    }
}
