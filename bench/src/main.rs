//! `shardgate-bench`: an open-loop load generator for shardgate that checks the promise, not
//! just the speed.
//!
//! `shardgate-bench run` sends ACTION frames at a fixed rate over UDP or TCP, whatever the
//! server answers (open loop, wrk2-style: every latency counts from the frame's *intended* send
//! time, so a stalled server cannot hide its stall by slowing the generator down). A share of
//! the sends are copies of recent events, sent from another socket so that they land on another
//! shard. Every frame is resent on RETRY or silence until it is answered ACCEPTED or
//! DUPLICATE, as a real client would. Afterwards, with `--redis`, it reads the partition streams
//! back and counts events stored twice and events acked but missing.
//!
//! # Modules, in the order a run uses them
//! - `main`: the command line and the exit code.
//! - `parse`: durations (`30s`) and targets (`udp://127.0.0.1:4000`).
//! - `plan`: the flags, range-checked into a `Plan`.
//! - `schedule`: the fixed timetable of sends and the run's clock.
//! - `events`: event ids, payloads, and the ring copies are drawn from.
//! - `lane`: one socket or connection: the paced sender loop and ack handling.
//! - `udp`, `tcp`: moving a lane's bytes.
//! - `tracker`: per-frame state, retry timers and latency histograms.
//! - `live`: shared counters and the progress line.
//! - `run`: threads up, threads down, results gathered.
//! - `verify`: what Redis holds, held against what was sent and acked.
//! - `report`: the summary as text and JSON, and the SLO verdict.
//!
//! # Exit codes
//! 0: the run completed (even if the SLO failed, unless `--slo-check`); 1: `--slo-check` and the
//! SLO failed; 2: bad command line; 3: could not reach the target or Redis, or write `--json`.

mod events;
mod lane;
mod live;
mod parse;
mod plan;
mod report;
mod run;
mod schedule;
mod tcp;
mod tracker;
mod udp;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::parse::{parse_duration, parse_target, Target};
use crate::plan::{Plan, PlanInput};
use crate::report::Summary;
use crate::verify::Ledger;

const EXIT_SLO_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONNECTION: u8 = 3;

/// Open-loop load generator for shardgate, with coordinated-omission-corrected latencies and
/// a Redis check that every acked event is stored exactly once.
#[derive(Debug, Parser)]
#[command(name = "shardgate-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send at a fixed rate for a fixed time, then report (and verify with --redis).
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Where to send: udp://HOST:PORT or tcp://HOST:PORT (loopback only, see --allow-remote).
    #[arg(long, value_name = "URL", value_parser = parse_target)]
    target: Target,

    /// Frames per second, first sends only (resends come on top).
    #[arg(long, value_name = "N")]
    rate: u64,

    /// How long scheduled sends go on, warmup included, e.g. 30s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Duration,

    /// The first part of the run whose frames are sent and verified but not timed.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    warmup: Duration,

    /// Players (ids 1..=N) picked at random; each has its own rising seq.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    players: u64,

    /// Share of sends that are copies of a recently sent event, from another socket if possible.
    #[arg(long, value_name = "RATIO", default_value_t = 0.3)]
    dup_ratio: f64,

    /// Frames packed into one datagram (UDP) or one write (TCP).
    #[arg(long, value_name = "K", default_value_t = 1)]
    frames_per_datagram: usize,

    /// Payload bytes per frame (0..=1024).
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    payload: usize,

    /// UDP sockets (distinct source ports, spread over the server's shards).
    #[arg(long, value_name = "N", default_value_t = 8)]
    sockets: usize,

    /// TCP connections.
    #[arg(long, value_name = "N", default_value_t = 8)]
    connections: usize,

    /// Verify against this Redis after the run, e.g. redis://127.0.0.1:6379.
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// The server's --prefix: streams are <prefix>:{p}:events.
    #[arg(long, value_name = "PREFIX", default_value = "sg")]
    prefix: String,

    /// The server's --partitions.
    #[arg(long, value_name = "N", default_value_t = 16)]
    partitions: u32,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Exit 1 if lost > 0, stored_twice > 0, acked_missing > 0 or first-attempt p99.9 >= 5 ms.
    #[arg(long)]
    slo_check: bool,

    /// Allow a target that is not a loopback address. Off by default: this tool must only
    /// load the machine it runs on unless told otherwise.
    #[arg(long)]
    allow_remote: bool,
}

impl RunArgs {
    fn into_plan_input(self) -> PlanInput {
        PlanInput {
            target: self.target,
            allow_remote: self.allow_remote,
            rate_per_sec: self.rate,
            duration: self.duration,
            warmup: self.warmup,
            players: self.players,
            dup_ratio: self.dup_ratio,
            frames_per_datagram: self.frames_per_datagram,
            payload_bytes: self.payload,
            sockets: self.sockets,
            connections: self.connections,
            redis_url: self.redis,
            prefix: self.prefix,
            partitions: self.partitions,
            json_path: self.json,
            slo_check: self.slo_check,
        }
    }
}

fn main() -> ExitCode {
    let Cli {
        command: Command::Run(arguments),
    } = Cli::parse();
    let plan = match Plan::new(arguments.into_plan_input()) {
        Ok(plan) => plan,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    // Connect before the load, so a wrong URL does not cost a whole run.
    let mut redis = match plan.redis_url.as_deref().map(verify::connect).transpose() {
        Ok(redis) => redis,
        Err(message) => return fail(EXIT_CONNECTION, &message),
    };
    let outcome = match run::run(&plan) {
        Ok(outcome) => outcome,
        Err(message) => return fail(EXIT_CONNECTION, &message),
    };
    let verification = match redis.as_mut() {
        Some(connection) => {
            let ledger = Ledger::new(outcome.seq_base, &outcome.sent_per_player);
            match verify::verify(connection, &plan.prefix, plan.partitions, ledger, &outcome.acked_ids) {
                Ok(verification) => Some(verification),
                Err(message) => {
                    print!("{}", Summary::new(&plan, &outcome, None).to_text());
                    return fail(EXIT_CONNECTION, &format!("verification failed: {message}"));
                }
            }
        }
        None => None,
    };
    let summary = Summary::new(&plan, &outcome, verification.as_ref());
    print!("{}", summary.to_text());
    if let Some(path) = &plan.json_path {
        if let Err(error) = summary.write_json(path) {
            return fail(EXIT_CONNECTION, &format!("cannot write {}: {error}", path.display()));
        }
    }
    if outcome.tally.sent > 0 && outcome.tally.answers_total() == 0 {
        return fail(
            EXIT_CONNECTION,
            &format!("no answer at all from {}: is shardgate listening there?", plan.target),
        );
    }
    if plan.slo_check && !summary.slo_ok {
        return ExitCode::from(EXIT_SLO_FAILED);
    }
    ExitCode::SUCCESS
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("shardgate-bench: {message}");
    ExitCode::from(code)
}
