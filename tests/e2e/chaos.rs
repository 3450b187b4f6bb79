//! Proves that under a seeded storm of faults every acked event is stored exactly once, nothing else is stored, RSS stays bounded and nothing panics.
//!
//! A soak in the spirit of TigerBeetle's VOPR. One seed drives everything the test decides:
//! the fault schedule (Redis SIGKILL + AOF restart, Redis SIGSTOP/SIGCONT, `CLIENT PAUSE`
//! ALL or WRITE, server SIGTERM + drain + restart on the same ports, cut client TCP
//! connections with FIN or RST, garbage over UDP and TCP), the events, how many copies of
//! each go out and on which of the client's UDP sockets and TCP connections (so copies cross
//! shards and transports), the late duplicates of old events, and the garbage bytes. The
//! client behaves like a real one: it resends every copy that got RETRY (with exponential
//! backoff and jitter) or no answer, and reconnects when its connection breaks, until each
//! copy is answered ACCEPTED or DUPLICATE.
//!
//! After the fault phase the faults stop, the client resolves everything outstanding (with
//! a deadline), the server is stopped with SIGTERM, and the test checks:
//! 1. every event acked ACCEPTED or DUPLICATE is in the streams exactly once, with the bytes
//!    that were sent; no event is ACCEPTED twice;
//! 2. nothing else is stored: no id twice, no id that was never sent as a valid frame (the
//!    garbage), no stream outside `sg:{0..16}:events`; an event sent but never acked may be
//!    stored, at most once;
//! 3. the server's RSS (VmRSS and VmHWM from /proc, sampled through every incarnation)
//!    stayed under [`RSS_BOUND_BYTES`];
//! 4. no incarnation printed "panicked", each exited 0 on SIGTERM within its drain bound, and
//!    garbage was only ever answered REJECTED, and only for a frame whose crc matched, by
//!    that frame's id (protocol revision 2: a bad crc is never answered).
//!
//! A server that stops answering (no ack for [`STALL_LIMIT`]), dies, or does not exit after
//! SIGTERM fails the test with a message; every wait has a deadline.
//!
//! # Running it
//! - `cargo test --test e2e chaos:: -- --nocapture`: the default fault phase is
//!   [`CHAOS_SECS_DEFAULT`] seconds, about 2 minutes in all with warm-up, settling and checks.
//! - `SHARDGATE_CHAOS_SECS=600`: a longer soak (the fault phase in seconds).
//! - `SHARDGATE_CHAOS_SEED=N`: replay a seed (otherwise a random one, always printed). A
//!   failure prints the seed, the planned schedule and the journal of what was done when;
//!   `SHARDGATE_CHAOS_SEED=N SHARDGATE_CHAOS_SECS=S cargo test --test e2e chaos:: -- --nocapture`
//!   runs the same schedule, load and garbage again. Thread interleavings and kernel timing
//!   are not under the seed's control, so a replay reproduces the storm, not every race.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Length of the fault phase when `SHARDGATE_CHAOS_SECS` is not set.
const CHAOS_SECS_DEFAULT: u64 = 75;
/// Load without faults before the first one, so Redis is connected and acks flow.
const WARMUP_MS: u64 = 2_000;
/// No fault starts in the last second of the fault phase.
const QUIET_TAIL_MS: u64 = 1_000;
/// Fresh events per second (all channels). With copies, late duplicates and resends the
/// server sees roughly twice as many frames: modest for a debug build on 2 shared cores.
const RATE_PER_SEC: f64 = 400.0;
const UDP_CHANNELS: usize = 4;
const TCP_CHANNELS: usize = 2;
/// Valid events use players `PLAYER_BASE..PLAYER_BASE + PLAYERS` and a unique seq each.
const PLAYER_BASE: u64 = 40_000_000;
const PLAYERS: u64 = 211;
/// Garbage that does not reuse a real event's id uses players from here: never valid.
const GARBAGE_PLAYER_BASE: u64 = 9_000_000_000;
const MAX_PAYLOAD: usize = 96;
const PARTITIONS: u64 = 16;
/// Each shard's dedup cache: 2048 requested is 512 buckets of 7 ids, 3584 ids in 64 KiB.
/// Far fewer than the events of a run, so the cache evicts all the time, late duplicates
/// must be caught by the Redis marker, and the RSS bound below means something.
const DEDUP_CAPACITY: usize = 2048;
const DRAIN_TIMEOUT_MS: u64 = 2_000;
const REDIS_TIMEOUT_MS: u64 = 1_000;
/// SIGTERM to exit: the drain bound, the server's 500 ms connection flush, and slack for a
/// debug build on a loaded machine. Past it the server is wedged.
const EXIT_TIMEOUT: Duration = Duration::from_millis(DRAIN_TIMEOUT_MS + 8_000);
/// After the faults stop, how long every outstanding copy may take to be resolved.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(45);
/// No fault lasts more than a few seconds; no ACCEPTED/DUPLICATE at all for this long while
/// copies are outstanding means the server (or the test) is wedged.
const STALL_LIMIT: Duration = Duration::from_secs(25);
/// A UDP copy with no answer in this long is sent again (the longest legitimate wait for
/// an answer is a Redis call's timeout plus the linger).
const UDP_ACK_TIMEOUT: Duration = Duration::from_millis(2_000);
/// On TCP an answer is lost only with the connection; this is the safety net.
const TCP_ACK_TIMEOUT: Duration = Duration::from_millis(4_000);
const UDP_WINDOW: usize = 64;
const TCP_WINDOW: usize = 128;
const BACKOFF_BASE: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(1_000);
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// The server's resident memory (VmRSS, and the peak VmHWM) must stay under this, in every
/// incarnation. What it holds is bounded by construction: per shard a 64 KiB dedup table
/// (`DEDUP_CAPACITY`), 9 batches of at most 256 events with their blobs, the in-flight set,
/// a 40 KiB outbox per TCP connection (a handful here), glommio's io_uring rings and
/// buffers, the Redis client's queues; plus the histograms and a debug build's code. This
/// workload measures 38-45 MiB. 96 MiB is about twice that: room for allocator and page
/// cache noise, while a queue that grows during an outage (Redis down, frames piling up)
/// or a per-event leak over the tens of thousands of events shows.
const RSS_BOUND_BYTES: u64 = 96 << 20;

// ---------------------------------------------------------------------------------------
// the fault plan
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
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
enum Fault {
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
    fn kind(&self) -> Kind {
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
struct Planned {
    at_ms: u64,
    fault: Fault,
}

/// The whole schedule, drawn from `rng` alone. Faults on Redis (kill, stop, pause) never
/// overlap each other, nor do server restarts; the rest may land anywhere, also inside a
/// Redis fault or a restart.
fn plan(rng: &mut StdRng, chaos_ms: u64) -> Vec<Planned> {
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
struct Journal {
    t0: Arc<Mutex<Instant>>,
    lines: Arc<Mutex<Vec<String>>>,
    counts: Arc<Mutex<BTreeMap<Kind, usize>>>,
}

impl Journal {
    fn new() -> Journal {
        Journal {
            t0: Arc::new(Mutex::new(Instant::now())),
            lines: Arc::default(),
            counts: Arc::default(),
        }
    }

    fn restart_clock(&self) {
        *lock(&self.t0) = Instant::now();
    }

    fn elapsed(&self) -> Duration {
        lock(&self.t0).elapsed()
    }

    fn log(&self, msg: impl AsRef<str>) {
        let line = format!("[{:>8.3}s] {}", self.elapsed().as_secs_f64(), msg.as_ref());
        println!("chaos {line}");
        lock(&self.lines).push(line);
    }

    fn count(&self, kind: Kind) {
        *lock(&self.counts).entry(kind).or_default() += 1;
    }

    fn counts_line(&self) -> String {
        let counts = lock(&self.counts);
        KINDS
            .iter()
            .map(|k| format!("{}={}", k.name(), counts.get(k).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Locks, ignoring poisoning: a panicking thread must not hide the report.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// the client: a generator and one thread per UDP socket / TCP connection
// ---------------------------------------------------------------------------------------

/// State the generator, the channels and the orchestrator share.
struct Load {
    events: Mutex<Vec<Event>>,
    stop_gen: AtomicBool,
    abort: AtomicBool,
    /// copies handed to channels and not yet answered ACCEPTED/DUPLICATE (or REJECTED)
    outstanding: AtomicUsize,
    copies: AtomicUsize,
    started: Instant,
    /// ms since `started` of the last ACCEPTED/DUPLICATE anywhere
    last_progress_ms: AtomicU64,
    /// per TCP channel: cut requests so far, and whether the latest wants RST
    cut_requests: Vec<AtomicU64>,
    cut_reset: Vec<AtomicBool>,
    hard_deadline: Instant,
}

impl Load {
    fn progress(&self) {
        self.last_progress_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn stopped(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || Instant::now() > self.hard_deadline
    }
}

/// Sets `abort` when dropped, so a panicking test does not leave client threads running.
struct AbortOnDrop(Arc<Load>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.stop_gen.store(true, Ordering::Relaxed);
        self.0.abort.store(true, Ordering::Relaxed);
    }
}

type Work = (Key, Arc<Vec<u8>>);

#[derive(Debug, Default)]
struct GenReport {
    events: usize,
    extra_copies: usize,
    late_duplicates: usize,
}

/// Fresh events at `RATE_PER_SEC`, each as 1..=3 copies on distinct channels, plus now and
/// then a late copy of an older event (recent or from anywhere in the run).
fn run_generator(load: Arc<Load>, inboxes: Vec<Sender<Work>>, seed: u64) -> GenReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = GenReport::default();
    let started = Instant::now();
    let mut made = 0u64;
    let mut channels: Vec<usize> = (0..inboxes.len()).collect();
    let hand_out = |key: Key, frame: &Arc<Vec<u8>>, channel: usize| {
        load.outstanding.fetch_add(1, Ordering::SeqCst);
        load.copies.fetch_add(1, Ordering::Relaxed);
        // a channel only hangs up when aborted
        let _ = inboxes[channel].send((key, frame.clone()));
    };
    while !load.stop_gen.load(Ordering::Relaxed) && !load.stopped() {
        let due = (started.elapsed().as_secs_f64() * RATE_PER_SEC) as u64;
        if made >= due {
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        let player = PLAYER_BASE + rng.gen_range(0..PLAYERS);
        let event = Event::random(&mut rng, player, made, MAX_PAYLOAD);
        made += 1;
        let frame = Arc::new(event.frame());
        let key = event.key();
        lock(&load.events).push(event);
        report.events += 1;
        let n = match rng.gen_range(0..10) {
            0..=6 => 1,
            7..=8 => 2,
            _ => 3,
        };
        channels.shuffle(&mut rng);
        for &c in &channels[..n] {
            hand_out(key, &frame, c);
        }
        report.extra_copies += n - 1;
        if rng.gen_range(0..100) < 8 {
            let old = {
                let events = lock(&load.events);
                let len = events.len();
                let i = if rng.gen_bool(0.7) {
                    rng.gen_range(len.saturating_sub(300)..len)
                } else {
                    rng.gen_range(0..len)
                };
                events[i].clone()
            };
            hand_out(old.key(), &Arc::new(old.frame()), rng.gen_range(0..inboxes.len()));
            report.late_duplicates += 1;
        }
    }
    report
}

struct CopyState {
    key: Key,
    frame: Arc<Vec<u8>>,
    attempts: u32,
    done: bool,
}

enum Link {
    Udp(UdpClient),
    Tcp {
        addr: SocketAddr,
        index: usize,
        conn: Option<TcpClient>,
        cuts_seen: u64,
    },
}

#[derive(Default)]
struct ChannelReport {
    name: String,
    answers: HashMap<Key, Vec<St>>,
    counts: StatusCounts,
    copies: usize,
    frames_sent: usize,
    timeouts: usize,
    stray: usize,
    foreign: Vec<AckMsg>,
    reconnects: usize,
    cuts: usize,
    unresolved: Vec<Key>,
    udp_drops: u64,
}

fn backoff(attempt: u32, rng: &mut StdRng) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(10)).min(BACKOFF_MAX);
    exp / 2 + exp.mul_f64(rng.gen::<f64>() / 2.0)
}

/// Drops a TCP connection with RST instead of FIN when it is closed.
fn set_linger_zero(stream: &std::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd we own, with a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// One client channel: sends the copies handed to it, resends on RETRY (backoff) and on
/// silence (timeout), reconnects a broken TCP connection, and runs until the generator hung
/// up and every copy is resolved, or the test aborts.
fn run_channel(name: String, mut link: Link, inbox: Receiver<Work>, load: Arc<Load>, seed: u64) -> ChannelReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rep = ChannelReport {
        name,
        ..ChannelReport::default()
    };
    let mut copies: Vec<CopyState> = Vec::new();
    let mut copies_of: HashMap<Key, Vec<usize>> = HashMap::new();
    let mut ready: VecDeque<usize> = VecDeque::new();
    let mut delayed: Vec<(Instant, usize)> = Vec::new();
    let mut inflight: HashMap<Key, VecDeque<(usize, Instant)>> = HashMap::new();
    let mut inflight_n = 0usize;
    let mut unresolved = 0usize;
    let mut inbox_open = true;
    let mut last_scan = Instant::now();
    let mut batch = Vec::new();
    let empty: Arc<Vec<u8>> = Arc::default();
    let ack_timeout = match link {
        Link::Udp(_) => UDP_ACK_TIMEOUT,
        Link::Tcp { .. } => TCP_ACK_TIMEOUT,
    };
    let requeue_all =
        |inflight: &mut HashMap<Key, VecDeque<(usize, Instant)>>, n: &mut usize, ready: &mut VecDeque<usize>| {
            for (_, q) in inflight.drain() {
                ready.extend(q.into_iter().map(|(ci, _)| ci));
            }
            *n = 0;
        };
    while !load.stopped() {
        while inbox_open {
            match inbox.try_recv() {
                Ok((key, frame)) => {
                    let ci = copies.len();
                    copies.push(CopyState {
                        key,
                        frame,
                        attempts: 0,
                        done: false,
                    });
                    copies_of.entry(key).or_default().push(ci);
                    ready.push_back(ci);
                    unresolved += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => inbox_open = false,
            }
        }
        if !inbox_open && unresolved == 0 {
            break;
        }
        let now = Instant::now();
        delayed.retain(|&(at, ci)| {
            if at <= now {
                ready.push_back(ci);
                false
            } else {
                true
            }
        });
        ready.retain(|&ci| !copies[ci].done);

        // send
        match &mut link {
            Link::Udp(client) => {
                while inflight_n < UDP_WINDOW && !ready.is_empty() {
                    batch.clear();
                    let max_frames = rng.gen_range(1..=4);
                    let mut sent = Vec::new();
                    while let Some(&ci) = ready.front() {
                        let f = &copies[ci].frame;
                        if !sent.is_empty() && (sent.len() >= max_frames || batch.len() + f.len() > 1_400) {
                            break;
                        }
                        batch.extend_from_slice(f);
                        sent.push(ci);
                        ready.pop_front();
                    }
                    client.send_frames(&batch);
                    let t = Instant::now();
                    for ci in sent {
                        inflight.entry(copies[ci].key).or_default().push_back((ci, t));
                        inflight_n += 1;
                        rep.frames_sent += 1;
                    }
                }
            }
            Link::Tcp {
                addr,
                index,
                conn,
                cuts_seen,
            } => {
                let cuts = load.cut_requests[*index].load(Ordering::SeqCst);
                if cuts != *cuts_seen {
                    *cuts_seen = cuts;
                    if let Some(mut c) = conn.take() {
                        // mid-stream: half a frame on the wire, then gone
                        if let Some(&ci) = ready.front() {
                            let f = &copies[ci].frame;
                            let _ = c.send(&f[..rng.gen_range(1..f.len())]);
                        }
                        if load.cut_reset[*index].load(Ordering::SeqCst) {
                            set_linger_zero(c.stream());
                        }
                        drop(c);
                        requeue_all(&mut inflight, &mut inflight_n, &mut ready);
                        rep.cuts += 1;
                    }
                }
                if conn.is_none() && (!ready.is_empty() || inflight_n > 0) {
                    match TcpClient::connect(*addr) {
                        Ok(c) => *conn = Some(c),
                        Err(_) => {
                            // the server is restarting
                            thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    }
                }
                if let Some(c) = conn.as_mut() {
                    if inflight_n < TCP_WINDOW && !ready.is_empty() {
                        batch.clear();
                        let mut sent = Vec::new();
                        while inflight_n + sent.len() < TCP_WINDOW {
                            let Some(ci) = ready.pop_front() else { break };
                            batch.extend_from_slice(&copies[ci].frame);
                            sent.push(ci);
                        }
                        let r = c.send_split(&batch, &mut rng);
                        let t = Instant::now();
                        for ci in sent {
                            inflight.entry(copies[ci].key).or_default().push_back((ci, t));
                            inflight_n += 1;
                            rep.frames_sent += 1;
                        }
                        if r.is_err() {
                            *conn = None;
                            requeue_all(&mut inflight, &mut inflight_n, &mut ready);
                            rep.reconnects += 1;
                            continue;
                        }
                    }
                }
            }
        }

        // receive (waits about 5 ms when nothing is there)
        let acks = match &mut link {
            Link::Udp(client) => {
                let mut acks = client.try_recv();
                if !acks.is_empty() {
                    loop {
                        let more = client.try_recv();
                        if more.is_empty() {
                            break;
                        }
                        acks.extend(more);
                    }
                }
                acks
            }
            Link::Tcp { conn, .. } => match conn.as_mut() {
                Some(c) => {
                    let acks = c.poll_acks();
                    if c.is_closed() {
                        *conn = None;
                        rep.reconnects += 1;
                        requeue_all(&mut inflight, &mut inflight_n, &mut ready);
                    }
                    acks
                }
                None => {
                    thread::sleep(Duration::from_millis(5));
                    Vec::new()
                }
            },
        };
        let now = Instant::now();
        for ack in acks {
            let key = ack.key();
            rep.answers.entry(key).or_default().push(ack.status);
            rep.counts.add(ack.status);
            let Some(mine) = copies_of.get(&key) else {
                rep.foreign.push(ack);
                continue;
            };
            let matched = inflight.get_mut(&key).and_then(VecDeque::pop_front).map(|(ci, _)| ci);
            if matched.is_some() {
                inflight_n -= 1;
            } else {
                rep.stray += 1;
            }
            match ack.status {
                St::Accepted | St::Duplicate | St::Rejected => {
                    // a client pairs answers by id: a late answer resolves a copy too
                    let target = matched
                        .filter(|&ci| !copies[ci].done)
                        .or_else(|| mine.iter().copied().find(|&ci| !copies[ci].done));
                    if let Some(ci) = target {
                        copies[ci].done = true;
                        // a long soak holds millions of copies: keep only what is still needed
                        copies[ci].frame = empty.clone();
                        unresolved -= 1;
                        load.outstanding.fetch_sub(1, Ordering::SeqCst);
                    }
                    if ack.status.is_stored() {
                        load.progress();
                    }
                }
                St::Retry => {
                    if let Some(ci) = matched.filter(|&ci| !copies[ci].done) {
                        copies[ci].attempts += 1;
                        delayed.push((now + backoff(copies[ci].attempts, &mut rng), ci));
                    }
                }
            }
        }

        // resend what got no answer
        if now.duration_since(last_scan) > Duration::from_millis(50) {
            last_scan = now;
            for q in inflight.values_mut() {
                while let Some(&(ci, t)) = q.front() {
                    if now.duration_since(t) < ack_timeout {
                        break;
                    }
                    q.pop_front();
                    inflight_n -= 1;
                    rep.timeouts += 1;
                    ready.push_back(ci);
                }
            }
        }
    }
    if let Link::Udp(client) = &link {
        rep.udp_drops = client.drops();
    }
    rep.copies = copies.len();
    rep.unresolved = copies.iter().filter(|c| !c.done).map(|c| c.key).collect();
    rep
}

// ---------------------------------------------------------------------------------------
// garbage
// ---------------------------------------------------------------------------------------

/// Sends garbage and keeps its sockets a while to check what comes back: only REJECTED,
/// by the id of a garbage frame whose crc matched.
struct GarbageSender {
    udp: UdpClient,
    tcp: Vec<(TcpClient, Instant)>,
    answers: StatusCounts,
    not_rejected: Vec<AckMsg>,
    /// Ids of garbage frames sent with a matching crc: the only ids REJECTED may name.
    vouched: HashSet<Key>,
    /// REJECTED answers naming another id (revision 2: only an intact crc vouches for one).
    rejected_unvouched: Vec<AckMsg>,
    datagrams: usize,
    tcp_conns: usize,
    tcp_refused: usize,
    next_id: u64,
}

impl GarbageSender {
    fn new(udp: SocketAddr) -> GarbageSender {
        GarbageSender {
            udp: UdpClient::new(udp),
            tcp: Vec::new(),
            answers: StatusCounts::default(),
            not_rejected: Vec::new(),
            vouched: HashSet::new(),
            rejected_unvouched: Vec::new(),
            datagrams: 0,
            tcp_conns: 0,
            tcp_refused: 0,
            next_id: 0,
        }
    }

    fn record(&mut self, acks: Vec<AckMsg>) {
        for a in acks {
            self.answers.add(a.status);
            if a.status != St::Rejected {
                self.not_rejected.push(a);
            } else if !self.vouched.contains(&a.key()) {
                self.rejected_unvouched.push(a);
            }
        }
    }

    /// Reads what came back (about 5 ms per socket) and closes connections kept long enough.
    fn poll(&mut self) {
        let acks = self.udp.try_recv();
        self.record(acks);
        let now = Instant::now();
        let mut tcp = std::mem::take(&mut self.tcp);
        for (c, _) in tcp.iter_mut() {
            let acks = c.poll_acks();
            self.record(acks);
        }
        tcp.retain(|(c, until)| !c.is_closed() && *until > now);
        self.tcp = tcp;
    }

    /// A frame that may be answered REJECTED only if its crc matches (then by its id), and
    /// not at all otherwise. `last`: nothing after it in a datagram is needed, so it may
    /// also break the length.
    fn bad_frame(&mut self, rng: &mut StdRng, real: &[Event], last: bool) -> Vec<u8> {
        let event = if !real.is_empty() && rng.gen_bool(0.5) {
            // a corrupted copy of a real event: must not disturb the real one
            real[rng.gen_range(0..real.len())].clone()
        } else {
            self.next_id += 1;
            Event::random(rng, GARBAGE_PLAYER_BASE + self.next_id % 31, self.next_id, MAX_PAYLOAD)
        };
        let mut raw = event.raw();
        match rng.gen_range(0..if last { 7 } else { 4 }) {
            0 => raw.crc_xor = 1 << rng.gen_range(0..32),
            1 => {
                // one flipped bit anywhere but magic, version, kind and length; crc untouched
                let mut bytes = raw.bytes();
                let body = 4..bytes.len() - 4;
                let mut at = rng.gen_range(body);
                if (6..8).contains(&at) {
                    at = 4;
                }
                bytes[at] ^= 1 << rng.gen_range(0..8);
                return bytes;
            }
            2 => {
                raw.flags = 1 << rng.gen_range(1..8);
                self.vouched.insert(event.key());
            }
            3 => {
                if rng.gen_bool(0.5) {
                    raw.reserved5 = rng.gen_range(1..=255);
                } else {
                    raw.reserved34 = rng.gen_range(1..=u16::MAX);
                }
                self.vouched.insert(event.key());
            }
            4 => raw.payload_len = Some(raw.payload.len() as u16 + rng.gen_range(1..200)),
            5 => raw.payload_len = Some(rng.gen_range(1025..=u16::MAX)),
            _ => {
                let len = raw.payload.len() as u16;
                raw.payload_len = Some(if len == 0 { 1 } else { rng.gen_range(0..len) });
            }
        }
        raw.bytes()
    }

    fn inject(&mut self, seed: u64, tcp: SocketAddr, real: &[Event]) -> String {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut parts = Vec::new();
        for _ in 0..rng.gen_range(1..=4) {
            let mut dgram = Vec::new();
            let what = match rng.gen_range(0..5) {
                0 => {
                    let len = rng.gen_range(1..=1_400);
                    dgram = random_garbage(&mut rng, len);
                    "random bytes"
                }
                1 => {
                    // a truncated header that starts like a frame
                    dgram = self.bad_frame(&mut rng, real, false);
                    dgram.truncate(rng.gen_range(2..36));
                    "short header"
                }
                _ => {
                    let n = rng.gen_range(1..=5);
                    for i in 0..n {
                        let f = self.bad_frame(&mut rng, real, i == n - 1);
                        dgram.extend(f);
                    }
                    if rng.gen_bool(0.3) {
                        let len = rng.gen_range(1..100);
                        dgram.extend(random_garbage(&mut rng, len));
                    }
                    "corrupted frames"
                }
            };
            self.udp.send_frames(&dgram);
            self.datagrams += 1;
            parts.push(format!("udp {what} {}B", dgram.len()));
        }
        for _ in 0..rng.gen_range(0..=2) {
            let mut bytes = Vec::new();
            for _ in 0..rng.gen_range(0..=5) {
                let f = self.bad_frame(&mut rng, real, false);
                bytes.extend(f);
            }
            let end = match rng.gen_range(0..10) {
                0..=3 => {
                    let len = rng.gen_range(36..=600);
                    bytes.extend(random_garbage(&mut rng, len));
                    "random bytes"
                }
                4..=6 => {
                    let f = self.bad_frame(&mut rng, real, true);
                    bytes.extend(f);
                    "bad length"
                }
                _ => "nothing",
            };
            match TcpClient::connect(tcp) {
                Ok(mut c) => {
                    let _ = c.send_split(&bytes, &mut rng);
                    self.tcp.push((c, Instant::now() + Duration::from_millis(1_500)));
                    self.tcp_conns += 1;
                    parts.push(format!("tcp {}B ending in {end}", bytes.len()));
                }
                Err(e) => {
                    self.tcp_refused += 1;
                    parts.push(format!("tcp connect failed ({e})"));
                }
            }
        }
        parts.join(", ")
    }
}

// ---------------------------------------------------------------------------------------
// the server's incarnations
// ---------------------------------------------------------------------------------------

enum Phase {
    Running,
    Draining { since: Instant, down_ms: u64 },
    Down { start_at: Instant },
}

#[derive(Default)]
struct Rss {
    samples: usize,
    max_rss_kb: u64,
    max_hwm_kb: u64,
    /// per incarnation: (pid, max VmRSS kB, max VmHWM kB)
    per_incarnation: Vec<(u32, u64, u64)>,
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

struct Gate {
    redis_url: String,
    udp: SocketAddr,
    tcp: SocketAddr,
    dedup_window_secs: u64,
    current: Option<Server>,
    phase: Phase,
    retired: Vec<Server>,
    restart_pending: Option<u64>,
    exit_problems: Vec<String>,
    rss: Rss,
    last_sample: Instant,
    /// log lines of the current server already looked at for "panicked"
    scanned: usize,
}

impl Gate {
    fn start_server(&self) -> Server {
        Server::builder(&self.redis_url)
            .cores("0,1")
            .arg("--udp", self.udp)
            .arg("--tcp", self.tcp)
            .arg("--dedup-capacity", DEDUP_CAPACITY)
            .arg("--dedup-window-secs", self.dedup_window_secs)
            .arg("--drain-timeout-ms", DRAIN_TIMEOUT_MS)
            .arg("--redis-timeout-ms", REDIS_TIMEOUT_MS)
            .start()
    }

    fn pid(&self) -> Option<u32> {
        self.current.as_ref().map(Server::pid)
    }

    fn sample_rss(&mut self) {
        let Some(pid) = self.pid() else { return };
        self.last_sample = Instant::now();
        let (Some(rss), hwm) = (proc_status_kb(pid, "VmRSS:"), proc_status_kb(pid, "VmHWM:")) else {
            return;
        };
        let hwm = hwm.unwrap_or(rss);
        self.rss.samples += 1;
        self.rss.max_rss_kb = self.rss.max_rss_kb.max(rss);
        self.rss.max_hwm_kb = self.rss.max_hwm_kb.max(hwm);
        match self.rss.per_incarnation.last_mut() {
            Some(entry) if entry.0 == pid => {
                entry.1 = entry.1.max(rss);
                entry.2 = entry.2.max(hwm);
            }
            _ => self.rss.per_incarnation.push((pid, rss, hwm)),
        }
    }

    /// Every `RSS_SAMPLE_EVERY`: an RSS sample, and a look at the new log lines, so that a
    /// shard that panicked (the process may live on with the other shard) fails the test at
    /// once instead of at the settle deadline.
    fn watch(&mut self) {
        if self.last_sample.elapsed() < RSS_SAMPLE_EVERY {
            return;
        }
        self.sample_rss();
        let Some(server) = self.current.as_ref() else { return };
        let lines = server.stderr_lines();
        if let Some(at) = lines[self.scanned.min(lines.len())..]
            .iter()
            .position(|l| l.contains("panicked"))
        {
            let at = self.scanned + at;
            panic!(
                "shardgate pid {} panicked:\n{}",
                server.pid(),
                lines[at..lines.len().min(at + 12)].join("\n")
            );
        }
        self.scanned = lines.len();
    }

    fn sigterm(&mut self, down_ms: u64, journal: &Journal) {
        self.sample_rss();
        let server = self.current.as_ref().expect("running server");
        server.terminate();
        journal.log(format!("server pid {} SIGTERM", server.pid()));
        self.phase = Phase::Draining {
            since: Instant::now(),
            down_ms,
        };
    }

    /// Moves the state machine on; panics if the server died or is wedged.
    fn tick(&mut self, journal: &Journal) {
        match self.phase {
            Phase::Running => {
                let server = self.current.as_mut().expect("running server");
                if !server.is_alive() {
                    let pid = server.pid();
                    let status = server.wait_exit(Duration::from_secs(1));
                    server.wait_output(Duration::from_secs(3));
                    panic!(
                        "shardgate pid {pid} died by itself ({status}); stderr:\n{}",
                        server.stderr_lines().join("\n")
                    );
                }
                self.watch();
                if let Some(down_ms) = self.restart_pending.take() {
                    journal.log("postponed server restart runs now");
                    self.sigterm(down_ms, journal);
                }
            }
            Phase::Draining { since, down_ms } => {
                let server = self.current.as_mut().expect("draining server");
                if server.is_alive() {
                    if since.elapsed() > EXIT_TIMEOUT {
                        panic!(
                            "shardgate pid {} did not exit within {EXIT_TIMEOUT:?} of SIGTERM (wedged in \
                             drain?); stderr:\n{}",
                            server.pid(),
                            server.stderr_lines().join("\n")
                        );
                    }
                    self.watch();
                    return;
                }
                let pid = server.pid();
                let status = server.wait_exit(Duration::from_secs(1));
                server.wait_output(Duration::from_secs(3));
                let stopped = server
                    .stderr_lines()
                    .iter()
                    .any(|l| l.starts_with("shardgate: stopped"));
                journal.log(format!(
                    "server pid {pid} exited {status} after {:?}{}",
                    since.elapsed(),
                    if stopped {
                        ""
                    } else {
                        " WITHOUT a `shardgate: stopped` line"
                    }
                ));
                if !status.success() || !stopped {
                    self.exit_problems.push(format!(
                        "server pid {pid} exited {status} on SIGTERM (stopped line: {stopped}); last stderr:\n{}",
                        tail(&server.stderr_lines(), 20)
                    ));
                }
                self.retired.push(self.current.take().expect("server"));
                self.phase = Phase::Down {
                    start_at: Instant::now() + Duration::from_millis(down_ms),
                };
            }
            Phase::Down { start_at } => {
                if Instant::now() >= start_at {
                    self.bring_up(journal);
                }
            }
        }
    }

    fn bring_up(&mut self, journal: &Journal) {
        let t = Instant::now();
        let server = self.start_server();
        journal.log(format!(
            "server pid {} serving on udp={} tcp={} (start took {:?})",
            server.pid(),
            server.udp_addr(),
            server.tcp_addr(),
            t.elapsed()
        ));
        assert_eq!(
            (server.udp_addr(), server.tcp_addr()),
            (self.udp, self.tcp),
            "restarted on other ports"
        );
        self.current = Some(server);
        self.phase = Phase::Running;
        self.scanned = 0;
        self.sample_rss();
    }

    /// Brings the server back (if it is restarting) and waits until it serves.
    fn ensure_running(&mut self, journal: &Journal) {
        self.restart_pending = None;
        let deadline = Instant::now() + EXIT_TIMEOUT + Duration::from_secs(25);
        while !matches!(self.phase, Phase::Running) {
            if let Phase::Down { .. } = self.phase {
                self.bring_up(journal);
                break;
            }
            assert!(Instant::now() < deadline, "server did not come back");
            self.tick(journal);
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn all_servers(&self) -> impl Iterator<Item = &Server> {
        self.retired.iter().chain(self.current.iter())
    }
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Redis faults
// ---------------------------------------------------------------------------------------

enum RedisPhase {
    Up,
    Down { since: Instant, restart_at: Instant },
    Stopped { since: Instant, resume_at: Instant },
}

struct RedisSide {
    redis: RedisServer,
    phase: RedisPhase,
    pause_until: Option<Instant>,
}

impl RedisSide {
    fn tick(&mut self, journal: &Journal, force: bool) {
        let now = Instant::now();
        match self.phase {
            RedisPhase::Down { since, restart_at } if force || now >= restart_at => {
                let t = Instant::now();
                self.redis.restart();
                journal.log(format!(
                    "redis restarted from its AOF after {:?} down (restart took {:?})",
                    since.elapsed(),
                    t.elapsed()
                ));
                self.phase = RedisPhase::Up;
            }
            RedisPhase::Stopped { since, resume_at } if force || now >= resume_at => {
                self.redis.resume();
                journal.log(format!("redis SIGCONT after {:?} stopped", since.elapsed()));
                self.phase = RedisPhase::Up;
            }
            _ => {}
        }
        if force {
            if let Some(until) = self.pause_until.take() {
                if until > now {
                    let r = self.command(&["CLIENT", "UNPAUSE"]);
                    journal.log(format!("CLIENT UNPAUSE: {r}"));
                }
            }
        }
    }

    /// One command on a fresh connection, with short timeouts; the reply or the error.
    fn command(&self, args: &[&str]) -> String {
        let run = || -> redis::RedisResult<redis::Value> {
            let client = redis::Client::open(self.redis.url())?;
            let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query(&mut conn)
        };
        match run() {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// the test
// ---------------------------------------------------------------------------------------

fn chaos_seed() -> u64 {
    match std::env::var("SHARDGATE_CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SHARDGATE_CHAOS_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

fn chaos_secs() -> u64 {
    match std::env::var("SHARDGATE_CHAOS_SECS") {
        Ok(s) => {
            let secs: u64 = s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("SHARDGATE_CHAOS_SECS={s:?} is not a number of seconds"));
            assert!(secs >= 5, "SHARDGATE_CHAOS_SECS={secs}: at least 5");
            secs
        }
        Err(_) => CHAOS_SECS_DEFAULT,
    }
}

fn print_schedule(plan: &[Planned]) {
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

// One seed drives Redis crashes, stalls and pauses, server restarts, cut connections and
// garbage under duplicate-heavy UDP+TCP load; acked events are stored exactly once.
#[test]
fn chaos_soak_acked_events_stored_exactly_once() {
    let _turn = take_turn(module_path!());
    let seed = chaos_seed();
    let secs = chaos_secs();
    let replay =
        format!("SHARDGATE_CHAOS_SEED={seed} SHARDGATE_CHAOS_SECS={secs} cargo test --test e2e chaos:: -- --nocapture");
    println!("e2e_chaos: seed {seed}, fault phase {secs} s; replay with {replay}");
    let mut master = StdRng::seed_from_u64(seed);
    let schedule = plan(&mut StdRng::seed_from_u64(master.gen()), secs * 1000);
    let journal = Journal::new();
    let started = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| soak(seed, &mut master, secs, &schedule, &journal)));
    match outcome {
        Ok(_summary) => {}
        Err(e) => {
            println!(
                "\n======== e2e_chaos FAILED: seed {seed} after {:?} ========",
                started.elapsed()
            );
            print_schedule(&schedule);
            println!("journal (what was done, s after load start):");
            for l in lock(&journal.lines).iter() {
                println!("  {l}");
            }
            println!("faults done: {}", journal.counts_line());
            println!("replay with: {replay}");
            println!("======== e2e_chaos FAILED: seed {seed} ========\n");
            panic::resume_unwind(e);
        }
    }
}

/// The whole run; returns the summary line, panics with every problem found.
fn soak(seed: u64, master: &mut StdRng, secs: u64, schedule: &[Planned], journal: &Journal) -> String {
    let run_started = Instant::now();
    let chaos = Duration::from_secs(secs);
    // Markers must outlive the run: an expired marker would let a late copy be appended again.
    let dedup_window_secs = (2 * secs + 600).max(600);
    let redis = RedisServer::start_with_aof_on_port(free_port_outside_ephemeral());
    let port = free_port_outside_ephemeral();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut gate = Gate {
        redis_url: redis.url(),
        udp: addr,
        tcp: addr,
        dedup_window_secs,
        current: None,
        phase: Phase::Down {
            start_at: Instant::now(),
        },
        retired: Vec::new(),
        restart_pending: None,
        exit_problems: Vec::new(),
        rss: Rss::default(),
        last_sample: Instant::now(),
        scanned: 0,
    };
    let mut redis = RedisSide {
        redis,
        phase: RedisPhase::Up,
        pause_until: None,
    };
    journal.restart_clock();
    gate.bring_up(journal);

    // the client
    let n_chans = UDP_CHANNELS + TCP_CHANNELS;
    let load = Arc::new(Load {
        events: Mutex::new(Vec::new()),
        stop_gen: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        outstanding: AtomicUsize::new(0),
        copies: AtomicUsize::new(0),
        started: Instant::now(),
        last_progress_ms: AtomicU64::new(0),
        cut_requests: (0..TCP_CHANNELS).map(|_| AtomicU64::new(0)).collect(),
        cut_reset: (0..TCP_CHANNELS).map(|_| AtomicBool::new(false)).collect(),
        hard_deadline: Instant::now() + chaos + SETTLE_TIMEOUT + Duration::from_secs(60),
    });
    let _abort_guard = AbortOnDrop(load.clone());
    let mut inboxes = Vec::new();
    let mut channels: Vec<JoinHandle<ChannelReport>> = Vec::new();
    for ch in 0..n_chans {
        let (tx, rx) = mpsc::channel();
        inboxes.push(tx);
        let (name, link) = if ch < UDP_CHANNELS {
            (format!("udp{ch}"), Link::Udp(UdpClient::new(addr)))
        } else {
            let index = ch - UDP_CHANNELS;
            (
                format!("tcp{index}"),
                Link::Tcp {
                    addr,
                    index,
                    conn: None,
                    cuts_seen: 0,
                },
            )
        };
        let load = load.clone();
        let seed = master.gen();
        channels.push(thread::spawn(move || run_channel(name, link, rx, load, seed)));
    }
    let generator = {
        let load = load.clone();
        let seed = master.gen();
        thread::spawn(move || run_generator(load, inboxes, seed))
    };
    journal.log(format!(
        "load started: {RATE_PER_SEC}/s fresh events on {UDP_CHANNELS} UDP sockets + {TCP_CHANNELS} TCP \
         connections; server pid {} on {addr}; redis {}",
        gate.pid().unwrap_or(0),
        redis.redis.url()
    ));
    let mut garbage = GarbageSender::new(addr);

    // the fault phase
    let mut next = 0;
    while journal.elapsed() < chaos {
        let now_ms = journal.elapsed().as_millis() as u64;
        redis.tick(journal, false);
        gate.tick(journal);
        while next < schedule.len() && schedule[next].at_ms <= now_ms {
            let fault = schedule[next].fault.clone();
            next += 1;
            execute(&fault, &mut redis, &mut gate, &mut garbage, &load, journal);
        }
        garbage.poll();
        if let Some(i) = channels.iter().position(|h| h.is_finished()) {
            let h = channels.remove(i);
            h.join().unwrap_or_else(|e| panic::resume_unwind(e));
            panic!("client channel {i} stopped during the fault phase");
        }
        if load.outstanding.load(Ordering::SeqCst) > 0 && load.since_progress() > STALL_LIMIT {
            panic!(
                "no event was answered ACCEPTED/DUPLICATE for {:?} with {} copies outstanding: server wedged? \
                 server stderr (last 30 lines):\n{}",
                load.since_progress(),
                load.outstanding.load(Ordering::SeqCst),
                gate.current
                    .as_ref()
                    .map(|s| tail(&s.stderr_lines(), 30))
                    .unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }

    // faults off: everything back up, no new events, everything outstanding resolves
    journal.log("fault phase over: ending the faults still on, stopping new events");
    redis.tick(journal, true);
    gate.ensure_running(journal);
    load.stop_gen.store(true, Ordering::Relaxed);
    let gen_report = generator.join().unwrap_or_else(|e| panic::resume_unwind(e));
    let settle_started = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    loop {
        let outstanding = load.outstanding.load(Ordering::SeqCst);
        if outstanding == 0 {
            journal.log(format!(
                "all copies resolved {:?} after the faults stopped",
                settle_started.elapsed()
            ));
            break;
        }
        if settle_started.elapsed() > SETTLE_TIMEOUT {
            problems.push(format!(
                "{outstanding} copies still unresolved {SETTLE_TIMEOUT:?} after the faults stopped (server wedged?); \
                 server stderr (last 30 lines):\n{}",
                gate.current
                    .as_ref()
                    .map(|s| tail(&s.stderr_lines(), 30))
                    .unwrap_or_default()
            ));
            journal.log(format!("settle deadline passed with {outstanding} copies unresolved"));
            break;
        }
        gate.tick(journal);
        garbage.poll();
        thread::sleep(Duration::from_millis(20));
    }
    load.abort.store(true, Ordering::Relaxed);
    let join_deadline = Instant::now() + Duration::from_secs(10);
    while channels.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < join_deadline,
            "client channels did not stop within 10 s"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let reports: Vec<ChannelReport> = channels
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|e| panic::resume_unwind(e)))
        .collect();
    let garbage_deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < garbage_deadline {
        garbage.poll();
    }

    // a last clean stop, so every incarnation's log is complete
    gate.sigterm(0, journal);
    let stop_deadline = Instant::now() + EXIT_TIMEOUT + Duration::from_secs(1);
    while matches!(gate.phase, Phase::Draining { .. }) {
        assert!(Instant::now() < stop_deadline, "final SIGTERM: state machine stuck");
        gate.tick(journal);
        thread::sleep(Duration::from_millis(10));
    }

    // ---- checks
    let events = std::mem::take(&mut *lock(&load.events));
    let mut answers: HashMap<Key, Vec<St>> = HashMap::new();
    let mut counts = StatusCounts::default();
    let mut frames_sent = 0;
    let mut copies = 0;
    for r in &reports {
        for (k, v) in &r.answers {
            answers.entry(*k).or_default().extend(v.iter().copied());
        }
        counts.merge(&r.counts);
        frames_sent += r.frames_sent;
        copies += r.copies;
        if !r.foreign.is_empty() {
            problems.push(format!(
                "channel {}: {} answers for ids it never sent, e.g. {:?}",
                r.name,
                r.foreign.len(),
                &r.foreign[..r.foreign.len().min(5)]
            ));
        }
        if r.counts.rejected > 0 {
            problems.push(format!(
                "channel {}: {} valid frames answered REJECTED",
                r.name, r.counts.rejected
            ));
        }
        println!(
            "channel {}: copies={} frames_sent={} answers={:?} timeouts={} stray={} reconnects={} cuts={} \
             unresolved={} udp_client_drops={}",
            r.name,
            r.copies,
            r.frames_sent,
            r.counts,
            r.timeouts,
            r.stray,
            r.reconnects,
            r.cuts,
            r.unresolved.len(),
            r.udp_drops
        );
    }
    println!("generator: {gen_report:?}");
    let acked: HashSet<Key> = answers
        .iter()
        .filter(|(_, v)| v.iter().any(|s| s.is_stored()))
        .map(|(k, _)| *k)
        .collect();

    let mut conn = redis.redis.connection();
    let stored = read_events(&mut conn, "sg", PARTITIONS);
    let streams = stream_keys(&mut conn);
    let verdict = verify(&events, &answers, &acked, &stored, &streams);
    problems.extend(verdict);

    // memory
    let max_kb = gate.rss.max_rss_kb.max(gate.rss.max_hwm_kb);
    if max_kb * 1024 > RSS_BOUND_BYTES {
        problems.push(format!(
            "server RSS reached {} KiB (VmRSS max {} KiB, VmHWM max {} KiB), over the bound of {} KiB; per \
             incarnation (pid, VmRSS kB, VmHWM kB): {:?}",
            max_kb,
            gate.rss.max_rss_kb,
            gate.rss.max_hwm_kb,
            RSS_BOUND_BYTES / 1024,
            gate.rss.per_incarnation
        ));
    }
    let per = &gate.rss.per_incarnation;
    println!(
        "server RSS per incarnation (pid, max VmRSS kB, max VmHWM kB), first 12 of {}: {:?}",
        per.len(),
        &per[..per.len().min(12)]
    );
    if gate.rss.samples < 10 {
        problems.push(format!("only {} RSS samples were taken", gate.rss.samples));
    }
    // logs and exits
    problems.append(&mut gate.exit_problems);
    for s in gate.all_servers() {
        let lines: Vec<String> = s.stderr_lines().into_iter().chain(s.stdout_lines()).collect();
        let panics: Vec<&String> = lines.iter().filter(|l| l.contains("panicked")).collect();
        if !panics.is_empty() {
            problems.push(format!(
                "server pid {} logged a panic:\n{}",
                s.pid(),
                panics.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
            ));
        }
    }
    if !garbage.not_rejected.is_empty() {
        problems.push(format!(
            "garbage was answered other than REJECTED: {:?}",
            &garbage.not_rejected[..garbage.not_rejected.len().min(10)]
        ));
    }
    if !garbage.rejected_unvouched.is_empty() {
        problems.push(format!(
            "garbage was answered REJECTED by an id no intact frame carried (a bad crc must get no answer): {:?}",
            &garbage.rejected_unvouched[..garbage.rejected_unvouched.len().min(10)]
        ));
    }

    let summary = format!(
        "e2e_chaos summary: seed={} fault_phase={secs}s duration={:.1}s faults[{}] events={} copies={} frames_sent={} \
         answers[accepted={} duplicate={} retry={} rejected={}] acked={} stored={} incarnations={} \
         garbage[datagrams={} tcp_conns={} answers={:?}] max_rss={:.1}MiB (bound {}MiB, {} samples) problems={}",
        seed,
        run_started.elapsed().as_secs_f64(),
        journal.counts_line(),
        events.len(),
        copies,
        frames_sent,
        counts.accepted,
        counts.duplicate,
        counts.retry,
        counts.rejected,
        acked.len(),
        stored.len(),
        gate.all_servers().count(),
        garbage.datagrams,
        garbage.tcp_conns,
        garbage.answers,
        max_kb as f64 / 1024.0,
        RSS_BOUND_BYTES >> 20,
        gate.rss.samples,
        problems.len()
    );
    println!("{summary}");
    assert!(
        problems.is_empty(),
        "{} problems:\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
    summary
}

/// The final checks against Redis; returns every problem found.
fn verify(
    events: &[Event],
    answers: &HashMap<Key, Vec<St>>,
    acked: &HashSet<Key>,
    stored: &[StoredEvent],
    streams: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    let sent: HashMap<Key, &Event> = events.iter().map(|e| (e.key(), e)).collect();
    assert_eq!(sent.len(), events.len(), "the generator made two events with one id");
    let mut where_stored: HashMap<Key, Vec<&StoredEvent>> = HashMap::new();
    for s in stored {
        where_stored.entry(s.key()).or_default().push(s);
    }
    let mut twice: Vec<String> = where_stored
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| {
            format!(
                "{k:?} at {} (answers {:?})",
                v.iter()
                    .map(|s| format!("{} {} recv_us={}", s.stream_key, s.entry_id, s.recv_us))
                    .collect::<Vec<_>>()
                    .join(", "),
                answers.get(k)
            )
        })
        .collect();
    twice.sort();
    if !twice.is_empty() {
        problems.push(format!(
            "STORED TWICE: {} event ids, e.g.\n  {}",
            twice.len(),
            twice[..twice.len().min(10)].join("\n  ")
        ));
    }
    let mut foreign = Vec::new();
    let mut altered = Vec::new();
    for s in stored {
        match sent.get(&s.key()) {
            None => foreign.push(format!("{:?} at {} {}", s.key(), s.stream_key, s.entry_id)),
            Some(e) => {
                if s.partition != s.player % PARTITIONS
                    || s.action_type != e.action_type
                    || s.client_time_us != e.client_time_us
                    || s.payload != e.payload
                {
                    altered.push(format!(
                        "{:?} at {} {}: stored type={} ts={} payload={} (partition {}), sent type={} ts={} payload={}",
                        s.key(),
                        s.stream_key,
                        s.entry_id,
                        s.action_type,
                        s.client_time_us,
                        hex(&s.payload),
                        s.partition,
                        e.action_type,
                        e.client_time_us,
                        hex(&e.payload)
                    ));
                }
            }
        }
    }
    if !foreign.is_empty() {
        problems.push(format!(
            "STORED BUT NEVER SENT as a valid frame (garbage stored?): {}, e.g.\n  {}",
            foreign.len(),
            foreign[..foreign.len().min(10)].join("\n  ")
        ));
    }
    if !altered.is_empty() {
        problems.push(format!(
            "STORED WITH OTHER BYTES than sent (a corrupted copy stored?): {}, e.g.\n  {}",
            altered.len(),
            altered[..altered.len().min(10)].join("\n  ")
        ));
    }
    let mut lost: Vec<Key> = acked
        .iter()
        .filter(|k| !where_stored.contains_key(k))
        .copied()
        .collect();
    lost.sort();
    if !lost.is_empty() {
        let detail: Vec<String> = lost
            .iter()
            .take(10)
            .map(|k| format!("{k:?} answers {:?}", answers.get(k)))
            .collect();
        problems.push(format!(
            "ACKED BUT NOT STORED: {} events answered ACCEPTED/DUPLICATE are missing from the streams, e.g.\n  {}",
            lost.len(),
            detail.join("\n  ")
        ));
    }
    let mut reaccepted: Vec<String> = answers
        .iter()
        .filter(|(_, v)| v.iter().filter(|s| **s == St::Accepted).count() > 1)
        .map(|(k, v)| format!("{k:?} answers {v:?}"))
        .collect();
    reaccepted.sort();
    if !reaccepted.is_empty() {
        problems.push(format!(
            "ACCEPTED MORE THAN ONCE (each ACCEPTED is an append): {} ids, e.g.\n  {}",
            reaccepted.len(),
            reaccepted[..reaccepted.len().min(10)].join("\n  ")
        ));
    }
    let expected_streams: HashSet<String> = (0..PARTITIONS).map(|p| format!("sg:{{{p}}}:events")).collect();
    let extra: Vec<&String> = streams.iter().filter(|k| !expected_streams.contains(*k)).collect();
    if !extra.is_empty() {
        problems.push(format!("streams other than sg:{{0..16}}:events: {extra:?}"));
    }
    let unacked_stored = where_stored.keys().filter(|k| !acked.contains(k)).count();
    println!(
        "verify: sent={} acked={} stored_entries={} stored_ids={} stored_but_never_acked={} streams={}",
        events.len(),
        acked.len(),
        stored.len(),
        where_stored.len(),
        unacked_stored,
        streams.len()
    );
    problems
}

fn execute(
    fault: &Fault,
    redis: &mut RedisSide,
    gate: &mut Gate,
    garbage: &mut GarbageSender,
    load: &Load,
    journal: &Journal,
) {
    match *fault {
        Fault::RedisKill { down_ms } => {
            if !matches!(redis.phase, RedisPhase::Up) {
                journal.log(format!("skipped ({fault}): redis is not up"));
                return;
            }
            redis.redis.kill();
            let now = Instant::now();
            redis.phase = RedisPhase::Down {
                since: now,
                restart_at: now + Duration::from_millis(down_ms),
            };
            redis.pause_until = None;
            journal.log(format!("{fault}"));
        }
        Fault::RedisStop { for_ms } => {
            if !matches!(redis.phase, RedisPhase::Up) {
                journal.log(format!("skipped ({fault}): redis is not up"));
                return;
            }
            redis.redis.pause();
            let now = Instant::now();
            redis.phase = RedisPhase::Stopped {
                since: now,
                resume_at: now + Duration::from_millis(for_ms),
            };
            journal.log(format!("{fault}"));
        }
        Fault::ClientPause { ms, write_only } => {
            if !matches!(redis.phase, RedisPhase::Up) {
                journal.log(format!("skipped ({fault}): redis is not up"));
                return;
            }
            let ms_s = ms.to_string();
            let r = redis.command(&["CLIENT", "PAUSE", &ms_s, if write_only { "WRITE" } else { "ALL" }]);
            redis.pause_until = Some(Instant::now() + Duration::from_millis(ms));
            journal.log(format!("{fault}: {r}"));
        }
        Fault::Garbage { seed } => {
            let recent: Vec<Event> = {
                let events = lock(&load.events);
                events[events.len().saturating_sub(50)..].to_vec()
            };
            let what = garbage.inject(seed, gate.tcp, &recent);
            journal.log(format!("{fault}: {what}"));
        }
        Fault::TcpCut { channel, reset } => {
            for c in 0..TCP_CHANNELS {
                if channel.is_none_or(|want| want == c) {
                    load.cut_reset[c].store(reset, Ordering::SeqCst);
                    load.cut_requests[c].fetch_add(1, Ordering::SeqCst);
                }
            }
            journal.log(format!("{fault}"));
        }
        Fault::ServerRestart { down_ms } => {
            if matches!(gate.phase, Phase::Running) {
                journal.log(format!("{fault}"));
                gate.sigterm(down_ms, journal);
            } else {
                journal.log(format!("{fault}: postponed, the server is still restarting"));
                gate.restart_pending = Some(down_ms);
            }
        }
    }
    journal.count(fault.kind());
}
