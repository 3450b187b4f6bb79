//! The fault schedule, drawn from the seed alone, and the journal of what was done when.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;

use super::{lock, DRAIN_TIMEOUT_MS, QUIET_TAIL_MS, TCP_CHANNELS, WARMUP_MS};

// ---------------------------------------------------------------------------------------
// the fault plan
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Kind {
    RedisKill,
    RedisStop,
    ClientPause,
    Garbage,
    TcpCut,
    ServerRestart,
}

const KINDS: [Kind; 6] = [
    Kind::RedisKill,
    Kind::RedisStop,
    Kind::ClientPause,
    Kind::Garbage,
    Kind::TcpCut,
    Kind::ServerRestart,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::RedisKill => "redis_kill",
            Kind::RedisStop => "redis_stop",
            Kind::ClientPause => "client_pause",
            Kind::Garbage => "garbage",
            Kind::TcpCut => "tcp_cut",
            Kind::ServerRestart => "server_restart",
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum Fault {
    /// SIGKILL Redis, restart it (same port and AOF) after `down_ms`.
    RedisKill { down_ms: u64 },
    /// SIGSTOP Redis, SIGCONT after `for_ms`.
    RedisStop { for_ms: u64 },
    /// `CLIENT PAUSE ms ALL|WRITE`.
    ClientPause { ms: u64, write_only: bool },
    /// Garbage datagrams and connections, their bytes drawn from `seed`.
    Garbage { seed: u64 },
    /// Drop a client TCP connection (`None`: all of them) mid-stream, with RST or FIN.
    TcpCut { channel: Option<usize>, reset: bool },
    /// SIGTERM the server, wait for it to drain and exit, start it again `down_ms` later.
    ServerRestart { down_ms: u64 },
}

impl Fault {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Fault::RedisKill { .. } => Kind::RedisKill,
            Fault::RedisStop { .. } => Kind::RedisStop,
            Fault::ClientPause { .. } => Kind::ClientPause,
            Fault::Garbage { .. } => Kind::Garbage,
            Fault::TcpCut { .. } => Kind::TcpCut,
            Fault::ServerRestart { .. } => Kind::ServerRestart,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::RedisKill { down_ms } => write!(f, "redis SIGKILL, restart after {down_ms} ms"),
            Fault::RedisStop { for_ms } => write!(f, "redis SIGSTOP for {for_ms} ms"),
            Fault::ClientPause { ms, write_only } => {
                write!(f, "CLIENT PAUSE {ms} {}", if *write_only { "WRITE" } else { "ALL" })
            }
            Fault::Garbage { seed } => write!(f, "garbage (seed {seed})"),
            Fault::TcpCut { channel, reset } => write!(
                f,
                "cut {} with {}",
                channel.map_or("every client TCP connection".to_string(), |c| format!(
                    "client TCP connection {c}"
                )),
                if *reset { "RST" } else { "FIN" }
            ),
            Fault::ServerRestart { down_ms } => {
                write!(f, "server SIGTERM, drain, exit, start again {down_ms} ms later")
            }
        }
    }
}

#[derive(Clone, Debug)]
pub(super) struct Planned {
    pub(super) at_ms: u64,
    pub(super) fault: Fault,
}

/// The whole schedule, drawn from `rng` alone. Faults on Redis (kill, stop, pause) never
/// overlap each other, nor do server restarts; the rest may land anywhere, also inside a
/// Redis fault or a restart.
pub(super) fn plan(rng: &mut StdRng, chaos_ms: u64) -> Vec<Planned> {
    let mut out = Vec::new();
    let last = chaos_ms.saturating_sub(QUIET_TAIL_MS);
    let mut t = WARMUP_MS;
    let mut redis_free_at = 0u64;
    let mut server_free_at = 0u64;
    loop {
        // Exponential gaps, mean 1.1 s, clamped to 150 ms .. 4 s.
        let u: f64 = rng.gen_range(1e-9..1.0);
        t += (-u.ln() * 1_100.0).clamp(150.0, 4_000.0) as u64;
        if t >= last {
            break;
        }
        let fault = match rng.gen_range(0..15) {
            0..=1 => Fault::RedisKill {
                down_ms: rng.gen_range(100..=2_000),
            },
            2..=3 => Fault::RedisStop {
                for_ms: rng.gen_range(100..=2_500),
            },
            4..=5 => Fault::ClientPause {
                ms: rng.gen_range(100..=2_000),
                write_only: rng.gen_bool(0.5),
            },
            6..=8 => Fault::Garbage { seed: rng.gen() },
            9..=11 => Fault::TcpCut {
                channel: if rng.gen_bool(0.3) {
                    None
                } else {
                    Some(rng.gen_range(0..TCP_CHANNELS))
                },
                reset: rng.gen_bool(0.5),
            },
            _ => Fault::ServerRestart {
                down_ms: rng.gen_range(0..=800),
            },
        };
        let mut at = t;
        match fault {
            Fault::RedisKill { down_ms }
            | Fault::RedisStop { for_ms: down_ms }
            | Fault::ClientPause { ms: down_ms, .. } => {
                at = at.max(redis_free_at);
                // a restart reloads the AOF: give it a second before the next Redis fault
                let extra = if fault.kind() == Kind::RedisKill { 1_000 } else { 0 };
                redis_free_at = at + down_ms + extra + 300;
            }
            Fault::ServerRestart { down_ms } => {
                at = at.max(server_free_at);
                server_free_at = at + DRAIN_TIMEOUT_MS + down_ms + 2_000;
            }
            Fault::Garbage { .. } | Fault::TcpCut { .. } => {}
        }
        if at < last {
            out.push(Planned { at_ms: at, fault });
        }
    }
    out.sort_by_key(|p| p.at_ms);
    out
}

/// What was done when, in the order it happened.
#[derive(Clone)]
pub(super) struct Journal {
    t0: Arc<Mutex<Instant>>,
    pub(super) lines: Arc<Mutex<Vec<String>>>,
    counts: Arc<Mutex<BTreeMap<Kind, usize>>>,
}

impl Journal {
    pub(super) fn new() -> Journal {
        Journal {
            t0: Arc::new(Mutex::new(Instant::now())),
            lines: Arc::default(),
            counts: Arc::default(),
        }
    }

    pub(super) fn restart_clock(&self) {
        *lock(&self.t0) = Instant::now();
    }

    pub(super) fn elapsed(&self) -> Duration {
        lock(&self.t0).elapsed()
    }

    pub(super) fn log(&self, msg: impl AsRef<str>) {
        let line = format!("[{:>8.3}s] {}", self.elapsed().as_secs_f64(), msg.as_ref());
        println!("chaos {line}");
        lock(&self.lines).push(line);
    }

    pub(super) fn count(&self, kind: Kind) {
        *lock(&self.counts).entry(kind).or_default() += 1;
    }

    pub(super) fn counts_line(&self) -> String {
        let counts = lock(&self.counts);
        KINDS
            .iter()
            .map(|k| format!("{}={}", k.name(), counts.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub(super) fn print_schedule(plan: &[Planned]) {
    println!("planned fault schedule ({} faults, ms after load start):", plan.len());
    for p in plan {
        println!(
            "  {:>8.3}s  {:<14} {}",
            p.at_ms as f64 / 1000.0,
            p.fault.kind().name(),
            p.fault
        );
    }
}
