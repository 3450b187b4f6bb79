//! `shardgate-bench`: an open-loop load generator for shardgate that checks the promise, not
//! just the speed.
//!
//! `shardgate-bench run` sends ACTION frames at a fixed rate over UDP or TCP, whatever the
//! server answers (open loop, wrk2-style: every latency counts from the frame's *intended* send
//! time, so a stalled server cannot hide its stall by slowing the generator down). A share of
//! the sends are copies of recent events, sent from another socket so that they land on another
//! shard. Every frame is resent on RETRY or silence until it is answered ACCEPTED or
//! DUPLICATE, as a real client would. Afterwards, with `--redis`, it reads the partition streams
//! back (from every master with `redis-cluster://`) and counts events stored twice and events
//! acked but missing. `--plot FILE.svg` draws the latencies by percentile. Several `--target`s
//! take the lanes in turn, so a copy often goes to another server than its original, as a
//! client failing over to another address would send it.
//!
//! `shardgate-bench sweep` runs the same workload at rising rates (`--from`, `--to`, `--step` or
//! `--factor`) until a step misses the SLO, and names the highest rate that held it.
//!
//! The generator is one thread driving every socket in time slices with batched system calls
//! (see `engine`): it shares the machine with the server it measures, so it must be cheap.
//!
//! # Modules, in the order a run uses them
//! - `main`: the command line and the exit code.
//! - `parse`: durations (`30s`) and targets (`udp://127.0.0.1:4000`).
//! - `plan`: the flags, range-checked into a `Plan`.
//! - `schedule`: the fixed timetable of sends and the run's clock.
//! - `events`: event ids, payloads, and the ring copies are drawn from.
//! - `lane`: one socket or connection: what its frames carry, resends, and ack handling.
//! - `engine`: the one thread that drives every lane in time slices.
//! - `udp`, `tcp`: moving the lanes' bytes, batched; `sys`: the system calls std lacks.
//! - `tracker`: per-frame state, driving the one resend loop (`shardgate_client::resend`), and
//!   latency histograms.
//! - `live`: shared counters and the progress line.
//! - `run`: lanes opened, the engine run, results gathered.
//! - `verify`: what Redis holds, held against what was sent and acked.
//! - `report`: the summary as text and JSON, and the SLO verdict.
//! - `plot`: the latency-by-percentile SVG.
//! - `sweep`: rising rates, one run each, until the SLO breaks.
//! - `flood`: `shardgate-bench flood`, a well-behaved client's latency without and with one
//!   source flooding the server (the per-source limits of docs/design.md, "Abuse limits").
//!
//! # Exit codes
//! 0: the run (or sweep) completed (even if the SLO failed, unless `run --slo-check`); 1: `run
//! --slo-check` and the SLO failed; 2: bad command line; 3: could not reach the target or Redis,
//! or write `--json` or `--plot`.

mod engine;
mod events;
mod flood;
mod lane;
mod live;
mod parse;
mod peer;
mod peer_nats;
mod peer_redis;
mod plan;
mod plot;
mod reflector;
mod report;
mod run;
mod schedule;
mod scrape;
mod stall_probe;
mod sweep;
mod sys;
mod tcp;
mod tracker;
mod udp;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::parse::{parse_duration, parse_target, Target};
use crate::plan::{Plan, PlanInput};
use crate::report::Summary;
use crate::run::RunFailure;

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
    /// Run the same workload at rising rates until the SLO breaks; report the highest that held.
    Sweep(SweepArgs),
    /// The raw ceiling: a UDP server that only answers every frame ACCEPTED (recvmmsg/sendmmsg,
    /// or --blocking: one recv_from and one send_to per datagram).
    Reflector(reflector::ReflectorArgs),
    /// No middle tier: clients store each event in Redis (same script) or NATS JetStream directly.
    Peer(peer::PeerArgs),
    /// A well-behaved client's ack latency without and with one source flooding the server.
    Flood(flood::FloodArgs),
    /// How long this machine stops running threads, idle and (--busy) with every core busy.
    Stalls(stall_probe::StallsArgs),
}

/// The workload flags `run` and `sweep` share.
#[derive(Debug, Args)]
struct WorkloadArgs {
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

    /// Sends leave in batches at most this far apart (10us..=100ms). Longer costs the generator
    /// less CPU per frame and adds up to this much to each latency (counted, never hidden).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "500us")]
    slice: Duration,

    /// Verify against this Redis after the run, e.g. redis://127.0.0.1:6379, or a Redis
    /// Cluster, redis-cluster://HOST:PORT[,HOST:PORT...] (each stream read from its master).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,

    /// The server's --prefix: streams are <prefix>:{p}:events.
    #[arg(long, value_name = "PREFIX", default_value = "sg")]
    prefix: String,

    /// The server's --partitions.
    #[arg(long, value_name = "N", default_value_t = 16)]
    partitions: u32,

    /// Draw latency by percentile (HdrHistogram style) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,

    /// Allow a target that is not a loopback address. Off by default: this tool must only
    /// load the machine it runs on unless told otherwise.
    #[arg(long)]
    allow_remote: bool,

    /// While the load runs, GET this metrics endpoint (http://HOST:PORT/metrics, loopback
    /// only) every --scrape-interval, and report the scrapes and failures.
    #[arg(long, value_name = "URL", value_parser = scrape::parse_url)]
    scrape: Option<scrape::Endpoint>,

    /// Time between two scrapes of --scrape.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    scrape_interval: Duration,

    /// While the load runs, a real-time thread per core measures how long the machine stops
    /// running threads, and the report sets the slow answers against those stalls.
    #[arg(long)]
    stall_probe: bool,
}

impl WorkloadArgs {
    /// `--scrape` and `--scrape-interval`, checked; None without `--scrape`.
    fn scrape_config(&self) -> Result<Option<scrape::ScrapeConfig>, String> {
        self.scrape
            .clone()
            .map(|endpoint| scrape::ScrapeConfig::new(endpoint, self.scrape_interval))
            .transpose()
    }

    fn into_plan_input(self, targets: Vec<Target>, rate_per_sec: u64) -> PlanInput {
        PlanInput {
            targets,
            allow_remote: self.allow_remote,
            rate_per_sec,
            duration: self.duration,
            warmup: self.warmup,
            players: self.players,
            dup_ratio: self.dup_ratio,
            frames_per_datagram: self.frames_per_datagram,
            payload_bytes: self.payload,
            sockets: self.sockets,
            connections: self.connections,
            slice: self.slice,
            redis_url: self.redis,
            prefix: self.prefix,
            partitions: self.partitions,
            json_path: None,
            slo_check: false,
            stall_probe: self.stall_probe,
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Where to send: udp://HOST:PORT or tcp://HOST:PORT (loopback only, see --allow-remote).
    /// Several targets (comma-separated, or the flag repeated), all of one transport, take the
    /// lanes in turn: one server each, or one cluster of servers behind several addresses.
    #[arg(long = "target", value_name = "URL", value_parser = parse_target, value_delimiter = ',', required = true)]
    targets: Vec<Target>,

    /// Frames per second, first sends only (resends come on top).
    #[arg(long, value_name = "N")]
    rate: u64,

    #[command(flatten)]
    workload: WorkloadArgs,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Exit 1 if lost > 0, stored_twice > 0, acked_missing > 0 or first-attempt p99.9 >= 5 ms.
    #[arg(long)]
    slo_check: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("increment").required(true).args(["step", "factor"])))]
struct SweepArgs {
    /// Where to send: udp://HOST:PORT or tcp://HOST:PORT (loopback only, see --allow-remote).
    /// Several targets (comma-separated, or the flag repeated), all of one transport, take the
    /// lanes in turn: one server each, or one cluster of servers behind several addresses.
    #[arg(long = "target", value_name = "URL", value_parser = parse_target, value_delimiter = ',', required = true)]
    targets: Vec<Target>,

    /// The first step's rate, frames per second.
    #[arg(long, value_name = "N")]
    from: u64,

    /// The highest rate tried.
    #[arg(long, value_name = "N")]
    to: u64,

    /// Raise the rate by this much per step.
    #[arg(long, value_name = "N")]
    step: Option<u64>,

    /// Or multiply it by this per step (above 1), e.g. 1.25.
    #[arg(long, value_name = "X")]
    factor: Option<f64>,

    /// Pause between steps, so the server's queues drain.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pause: Duration,

    /// Per step (each step is a whole run of this length).
    #[command(flatten)]
    workload: WorkloadArgs,

    /// Also write every step's summary and the highest rate that held as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(arguments) => run_command(arguments),
        Command::Sweep(arguments) => sweep_command(arguments),
        Command::Reflector(arguments) => reflector::command(arguments),
        Command::Peer(arguments) => peer::command(arguments),
        Command::Flood(arguments) => flood::command(arguments),
        Command::Stalls(arguments) => stall_probe::command(arguments),
    }
}

/// `run`: one rate, a summary, optionally JSON and a plot.
fn run_command(arguments: RunArgs) -> ExitCode {
    let RunArgs {
        targets,
        rate,
        workload,
        json,
        slo_check,
    } = arguments;
    let plot_path = workload.plot.clone();
    let scrape = match workload.scrape_config() {
        Ok(scrape) => scrape,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    let input = PlanInput {
        json_path: json,
        slo_check,
        ..workload.into_plan_input(targets, rate)
    };
    let plan = match Plan::new(input) {
        Ok(plan) => plan,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    // Connect before the load, so a wrong URL does not cost a whole run.
    let mut redis = match plan.redis_url.as_deref().map(verify::connect).transpose() {
        Ok(redis) => redis,
        Err(message) => return fail(EXIT_CONNECTION, &message),
    };
    let (outcome, verification) = match run::run_verified(&plan, redis.as_mut(), scrape.as_ref()) {
        Ok(measured) => measured,
        Err(RunFailure::Setup(message)) => return fail(EXIT_CONNECTION, &message),
        Err(RunFailure::Verify { outcome, message }) => {
            print!("{}", Summary::new(&plan, &outcome, None).to_text());
            return fail(EXIT_CONNECTION, &format!("verification failed: {message}"));
        }
    };
    let summary = Summary::new(&plan, &outcome, verification.as_ref());
    print!("{}", summary.to_text());
    if let Some(path) = &plan.json_path {
        if let Err(error) = summary.write_json(path) {
            return fail(EXIT_CONNECTION, &format!("cannot write {}: {error}", path.display()));
        }
    }
    if let Some(path) = &plot_path {
        let title = format!(
            "{} at {}/s, {} frame(s) per send: latency by percentile",
            plan.targets_text(),
            plan.rate_per_sec,
            plan.frames_per_send
        );
        let curves = [
            plot::Curve {
                label: "first attempt".into(),
                latencies_us: &outcome.latencies.first_us,
            },
            plot::Curve {
                label: "final (retries included)".into(),
                latencies_us: &outcome.latencies.final_us,
            },
        ];
        if let Err(message) = plot::write_svg(path, &title, &curves) {
            return fail(EXIT_CONNECTION, &message);
        }
    }
    if outcome.tally.sent > 0 && outcome.tally.answers_total() == 0 {
        return fail(
            EXIT_CONNECTION,
            &format!(
                "no answer at all from {}: is shardgate listening there?",
                plan.targets_text()
            ),
        );
    }
    if plan.slo_check && !summary.slo_ok {
        return ExitCode::from(EXIT_SLO_FAILED);
    }
    ExitCode::SUCCESS
}

/// `sweep`: rising rates until the SLO breaks; one line per step and the highest that held.
fn sweep_command(arguments: SweepArgs) -> ExitCode {
    let SweepArgs {
        targets,
        from,
        to,
        step,
        factor,
        pause,
        workload,
        json,
    } = arguments;
    let increment = match (step, factor) {
        (Some(step), _) => sweep::Increment::Step(step),
        (None, Some(factor)) => sweep::Increment::Factor(factor),
        (None, None) => return fail(EXIT_USAGE, "give --step or --factor"),
    };
    let rates = match sweep::rates(from, to, increment) {
        Ok(rates) => rates,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    let plot_path = workload.plot.clone();
    let scrape = match workload.scrape_config() {
        Ok(scrape) => scrape,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    let base = workload.into_plan_input(targets, from);
    // Checks the flags once before anything connects; each step's rate is checked in `sweep`.
    if let Err(message) = Plan::new(base.clone()) {
        return fail(EXIT_USAGE, &message);
    }
    let mut redis = match base.redis_url.as_deref().map(verify::connect).transpose() {
        Ok(redis) => redis,
        Err(message) => return fail(EXIT_CONNECTION, &message),
    };
    let report = match sweep::sweep(
        &base,
        &rates,
        pause,
        redis.as_mut(),
        plot_path.as_deref(),
        scrape.as_ref(),
    ) {
        Ok(report) => report,
        Err(sweep::SweepError::Plan(message)) => return fail(EXIT_USAGE, &message),
        Err(sweep::SweepError::Connection(message) | sweep::SweepError::NoAnswer(message)) => {
            return fail(EXIT_CONNECTION, &message)
        }
    };
    println!("{}", report.verdict());
    if let Some(path) = &json {
        if let Err(error) = report.write_json(path) {
            return fail(EXIT_CONNECTION, &format!("cannot write {}: {error}", path.display()));
        }
    }
    ExitCode::SUCCESS
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("shardgate-bench: {message}");
    ExitCode::from(code)
}
