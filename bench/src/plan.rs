//! The checked settings of one run.
//!
//! `main.rs` turns flags into a [`Plan`]; every range is checked here, before any socket is
//! opened, so the rest of the crate can rely on them (at least one target and one lane per
//! target, one transport, a payload that fits a frame, a datagram that fits UDP, a warmup
//! shorter than the run).

use std::path::PathBuf;
use std::time::Duration;

use shardgate_proto::frame::{FRAME_OVERHEAD_BYTES, PAYLOAD_BYTES_MAX};

use crate::parse::{Target, Transport};

/// Largest UDP payload over IPv4.
const UDP_DATAGRAM_BYTES_MAX: usize = 65_507;
/// Sockets or connections one run may open; far above what one host needs to spread load.
const LANES_MAX: usize = 1_024;
/// Frames one write may carry over TCP: a bound so a write buffer stays small.
const FRAMES_PER_SEND_MAX: usize = 1_024;
/// Players tracked: each costs one 8-byte seq counter, so 10M players is 80 MB.
const PLAYERS_MAX: u64 = 10_000_000;
/// Scheduled frames one run may plan. Memory grows with rate × duration (about 16 bytes per
/// answered frame kept for verification), so a typo like `--rate 10000000 --duration 1m` is
/// refused rather than allowed to eat the machine.
const FRAMES_PLANNED_MAX: u128 = 200_000_000;
/// Time after the last scheduled send to collect answers and resend.
pub const GRACE: Duration = Duration::from_secs(2);
/// Redis streams partitions, as the server bounds them.
const PARTITIONS_MAX: u32 = 1_024;
/// Bounds of `--slice`: below 10 µs a sleep costs more than it saves; above 100 ms the sends'
/// lateness alone would swamp a 5 ms SLO.
const SLICE_MIN: Duration = Duration::from_micros(10);
const SLICE_MAX: Duration = Duration::from_millis(100);

/// Everything a run needs, validated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Where the lanes go, in turn: lane `i` sends to `targets[i % targets.len()]`. Never
    /// empty; all of one transport.
    pub targets: Vec<Target>,
    pub transport: Transport,
    pub rate_per_sec: u64,
    /// Whole run, warmup included: scheduled sends stop at `duration`.
    pub duration: Duration,
    /// The first part of `duration` whose frames are sent and verified but not timed.
    pub warmup: Duration,
    pub players: u64,
    pub dup_ratio: f64,
    /// Frames in one datagram (UDP) or one write (TCP).
    pub frames_per_send: usize,
    pub payload_bytes: usize,
    /// Sockets (UDP) or connections (TCP).
    pub lanes: usize,
    /// Shortest time between the engine's passes (see `engine.rs`).
    pub slice: Duration,
    pub redis_url: Option<String>,
    pub prefix: String,
    pub partitions: u32,
    pub json_path: Option<PathBuf>,
    pub slo_check: bool,
    /// Run the stall probe (`stall_probe.rs`) beside the load.
    pub stall_probe: bool,
}

/// The raw values from the command line.
#[derive(Clone)]
pub struct PlanInput {
    pub targets: Vec<Target>,
    pub allow_remote: bool,
    pub rate_per_sec: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub players: u64,
    pub dup_ratio: f64,
    pub frames_per_datagram: usize,
    pub payload_bytes: usize,
    pub sockets: usize,
    pub connections: usize,
    pub slice: Duration,
    pub redis_url: Option<String>,
    pub prefix: String,
    pub partitions: u32,
    pub json_path: Option<PathBuf>,
    pub slo_check: bool,
    /// Run the stall probe (`stall_probe.rs`) beside the load.
    pub stall_probe: bool,
}

impl Plan {
    /// Checks every bound; the message names the flag.
    pub fn new(input: PlanInput) -> Result<Plan, String> {
        let Some(first_target) = input.targets.first() else {
            return Err("--target is required".into());
        };
        let transport = first_target.transport;
        if let Some(other) = input.targets.iter().find(|target| target.transport != transport) {
            return Err(format!(
                "--target {other} is not {}: every target of a run uses the same transport",
                transport.name()
            ));
        }
        if let Some(remote) = input.targets.iter().find(|target| !target.is_loopback()) {
            if !input.allow_remote {
                return Err(format!(
                    "--target {remote} is not a loopback address; this tool only sends to its own machine unless \
                     --allow-remote is given"
                ));
            }
        }
        if input.rate_per_sec == 0 {
            return Err("--rate must be at least 1 frame per second".into());
        }
        if input.duration.is_zero() {
            return Err("--duration must be longer than 0".into());
        }
        if input.warmup >= input.duration {
            return Err(format!(
                "--warmup ({:?}) must be shorter than --duration ({:?}): the warmup is the start of the run",
                input.warmup, input.duration
            ));
        }
        if !(1..=PLAYERS_MAX).contains(&input.players) {
            return Err(format!("--players must be within 1..={PLAYERS_MAX}"));
        }
        if !(0.0..1.0).contains(&input.dup_ratio) {
            return Err("--dup-ratio must be within 0 (no copies) and below 1".into());
        }
        if input.payload_bytes > PAYLOAD_BYTES_MAX {
            return Err(format!("--payload must be at most {PAYLOAD_BYTES_MAX} bytes"));
        }
        let frame_bytes = FRAME_OVERHEAD_BYTES + input.payload_bytes;
        let frames_per_send_max = match transport {
            Transport::Udp => UDP_DATAGRAM_BYTES_MAX / frame_bytes,
            Transport::Tcp => FRAMES_PER_SEND_MAX,
        };
        if !(1..=frames_per_send_max).contains(&input.frames_per_datagram) {
            return Err(format!(
                "--frames-per-datagram must be within 1..={frames_per_send_max} for {}-byte frames over {}",
                frame_bytes,
                transport.name()
            ));
        }
        let (lanes, lanes_flag) = match transport {
            Transport::Udp => (input.sockets, "--sockets"),
            Transport::Tcp => (input.connections, "--connections"),
        };
        if !(1..=LANES_MAX).contains(&lanes) {
            return Err(format!("{lanes_flag} must be within 1..={LANES_MAX}"));
        }
        if lanes < input.targets.len() {
            return Err(format!(
                "{lanes_flag} ({lanes}) must be at least the number of targets ({}): each target needs a lane",
                input.targets.len()
            ));
        }
        if !(SLICE_MIN..=SLICE_MAX).contains(&input.slice) {
            return Err("--slice must be within 10us..=100ms".into());
        }
        if !(1..=PARTITIONS_MAX).contains(&input.partitions) {
            return Err(format!("--partitions must be within 1..={PARTITIONS_MAX}"));
        }
        if input.prefix.is_empty() {
            return Err("--prefix must not be empty".into());
        }
        let plan = Plan {
            targets: input.targets,
            transport,
            rate_per_sec: input.rate_per_sec,
            duration: input.duration,
            warmup: input.warmup,
            players: input.players,
            dup_ratio: input.dup_ratio,
            frames_per_send: input.frames_per_datagram,
            payload_bytes: input.payload_bytes,
            lanes,
            slice: input.slice,
            redis_url: input.redis_url,
            prefix: input.prefix,
            partitions: input.partitions,
            json_path: input.json_path,
            slo_check: input.slo_check,
            stall_probe: input.stall_probe,
        };
        let frames_planned = plan.duration.as_nanos() * u128::from(plan.rate_per_sec) / 1_000_000_000;
        if frames_planned > FRAMES_PLANNED_MAX {
            return Err(format!(
                "--rate × --duration plans {frames_planned} frames, more than {FRAMES_PLANNED_MAX}; shorten the run"
            ));
        }
        Ok(plan)
    }

    pub fn frame_bytes(&self) -> usize {
        FRAME_OVERHEAD_BYTES + self.payload_bytes
    }

    /// The target lane `lane` sends to: the targets take the lanes in turn.
    pub fn target_of_lane(&self, lane: usize) -> &Target {
        &self.targets[lane % self.targets.len()]
    }

    /// The targets as `--target` takes them, comma-separated: for the summary and messages.
    pub fn targets_text(&self) -> String {
        targets_text(&self.targets)
    }
}

/// Targets comma-separated, as `--target` takes them.
pub fn targets_text(targets: &[Target]) -> String {
    targets.iter().map(Target::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::parse::parse_target;

    pub(crate) fn input() -> PlanInput {
        PlanInput {
            targets: vec![parse_target("udp://127.0.0.1:4000").unwrap()],
            allow_remote: false,
            rate_per_sec: 1_000,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            players: 100,
            dup_ratio: 0.3,
            frames_per_datagram: 1,
            payload_bytes: 64,
            sockets: 4,
            connections: 2,
            slice: Duration::from_micros(200),
            redis_url: None,
            prefix: "sg".into(),
            partitions: 16,
            json_path: None,
            slo_check: false,
            stall_probe: false,
        }
    }

    // Lanes come from --sockets or --connections by transport.
    #[test]
    fn lanes_follow_the_transport() {
        let plan = Plan::new(PlanInput {
            targets: vec![parse_target("tcp://127.0.0.1:4000").unwrap()],
            ..input()
        })
        .unwrap();
        assert_eq!(plan.lanes, 2);
    }

    // Several targets take the lanes in turn; they must share a transport, each needs a lane,
    // and any remote one needs --allow-remote.
    #[test]
    fn targets_take_the_lanes_in_turn() {
        let targets = |texts: &[&str]| texts.iter().map(|text| parse_target(text).unwrap()).collect::<Vec<_>>();
        let plan = Plan::new(PlanInput {
            targets: targets(&["udp://127.0.0.1:4000", "udp://127.0.0.1:4001", "udp://127.0.0.1:4002"]),
            sockets: 8,
            ..input()
        })
        .unwrap();
        let ports: Vec<u16> = (0..8).map(|lane| plan.target_of_lane(lane).address.port()).collect();
        assert_eq!(ports, [4000, 4001, 4002, 4000, 4001, 4002, 4000, 4001]);
        assert_eq!(
            plan.targets_text(),
            "udp://127.0.0.1:4000,udp://127.0.0.1:4001,udp://127.0.0.1:4002"
        );
        let refused = |targets: Vec<Target>, sockets: usize| {
            Plan::new(PlanInput {
                targets,
                sockets,
                ..input()
            })
            .unwrap_err()
        };
        assert!(refused(targets(&["udp://127.0.0.1:4000", "tcp://127.0.0.1:4001"]), 4).contains("same transport"));
        assert!(refused(targets(&["udp://127.0.0.1:4000", "udp://127.0.0.1:4001"]), 1).contains("--sockets"));
        assert!(refused(targets(&["udp://127.0.0.1:4000", "udp://10.0.0.1:4001"]), 4).contains("--allow-remote"));
        assert!(refused(Vec::new(), 4).contains("--target"));
    }

    // Remote targets need --allow-remote; bad ranges name their flag.
    #[test]
    fn refuses_bad_settings() {
        let remote = || PlanInput {
            targets: vec![parse_target("udp://10.0.0.1:4000").unwrap()],
            ..input()
        };
        assert!(Plan::new(remote()).unwrap_err().contains("--allow-remote"));
        assert!(Plan::new(PlanInput {
            allow_remote: true,
            ..remote()
        })
        .is_ok());
        let cases: Vec<(PlanInput, &str)> = vec![
            (
                PlanInput {
                    rate_per_sec: 0,
                    ..input()
                },
                "--rate",
            ),
            (
                PlanInput {
                    warmup: Duration::from_secs(10),
                    ..input()
                },
                "--warmup",
            ),
            (
                PlanInput {
                    duration: Duration::ZERO,
                    warmup: Duration::ZERO,
                    ..input()
                },
                "--duration",
            ),
            (PlanInput { players: 0, ..input() }, "--players"),
            (
                PlanInput {
                    dup_ratio: 1.0,
                    ..input()
                },
                "--dup-ratio",
            ),
            (
                PlanInput {
                    dup_ratio: -0.1,
                    ..input()
                },
                "--dup-ratio",
            ),
            (
                PlanInput {
                    payload_bytes: 1025,
                    ..input()
                },
                "--payload",
            ),
            (
                PlanInput {
                    frames_per_datagram: 0,
                    ..input()
                },
                "--frames-per-datagram",
            ),
            (
                PlanInput {
                    frames_per_datagram: 700,
                    ..input()
                },
                "--frames-per-datagram",
            ),
            (PlanInput { sockets: 0, ..input() }, "--sockets"),
            (
                PlanInput {
                    slice: Duration::from_secs(1),
                    ..input()
                },
                "--slice",
            ),
            (
                PlanInput {
                    partitions: 0,
                    ..input()
                },
                "--partitions",
            ),
            (
                PlanInput {
                    rate_per_sec: 100_000_000,
                    duration: Duration::from_secs(60),
                    ..input()
                },
                "--rate",
            ),
        ];
        for (case, flag) in cases {
            let error = Plan::new(case).unwrap_err();
            assert!(error.contains(flag), "{error:?} does not name {flag}");
        }
    }
}
