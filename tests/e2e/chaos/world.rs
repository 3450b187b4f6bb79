//! The world the faults act on: the client (a generator and one thread per UDP socket and TCP
//! connection, resending until answered), the garbage sender, the server's incarnations and the
//! Redis faults; and `execute`, which applies one planned fault to them.

use shardgate_client::resend::Verdict;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::schedule::{Fault, Journal};
use super::{
    lock, BACKOFF_BASE, BACKOFF_MAX, DEDUP_CAPACITY, DRAIN_TIMEOUT_MS, EXIT_TIMEOUT, GARBAGE_PLAYER_BASE, MAX_PAYLOAD,
    PLAYERS, PLAYER_BASE, RATE_PER_SEC, REDIS_TIMEOUT_MS, RSS_SAMPLE_EVERY, TCP_ACK_TIMEOUT, TCP_CHANNELS, TCP_WINDOW,
    UDP_ACK_TIMEOUT, UDP_WINDOW,
};

// ---------------------------------------------------------------------------------------
// the client: a generator and one thread per UDP socket / TCP connection
// ---------------------------------------------------------------------------------------

/// State the generator, the channels and the orchestrator share.
pub(super) struct Load {
    pub(super) events: Mutex<Vec<Event>>,
    pub(super) stop_gen: AtomicBool,
    pub(super) abort: AtomicBool,
    /// copies handed to channels and not yet answered ACCEPTED/DUPLICATE (or REJECTED)
    pub(super) outstanding: AtomicUsize,
    pub(super) copies: AtomicUsize,
    pub(super) started: Instant,
    /// ms since `started` of the last ACCEPTED/DUPLICATE anywhere
    pub(super) last_progress_ms: AtomicU64,
    /// per TCP channel: cut requests so far, and whether the latest wants RST
    pub(super) cut_requests: Vec<AtomicU64>,
    pub(super) cut_reset: Vec<AtomicBool>,
    pub(super) hard_deadline: Instant,
}

impl Load {
    fn progress(&self) {
        self.last_progress_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn stopped(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || Instant::now() > self.hard_deadline
    }
}

/// Sets `abort` when dropped, so a panicking test does not leave client threads running.
pub(super) struct AbortOnDrop(pub(super) Arc<Load>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.stop_gen.store(true, Ordering::Relaxed);
        self.0.abort.store(true, Ordering::Relaxed);
    }
}

type Work = (Key, Arc<Vec<u8>>);

#[derive(Debug, Default)]
pub(super) struct GenReport {
    events: usize,
    extra_copies: usize,
    late_duplicates: usize,
}

/// Fresh events at `RATE_PER_SEC`, each as 1..=3 copies on distinct channels, plus now and
/// then a late copy of an older event (recent or from anywhere in the run).
pub(super) fn run_generator(load: Arc<Load>, inboxes: Vec<Sender<Work>>, seed: u64) -> GenReport {
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

/// One copy handed to a channel.
struct CopyState {
    key: Key,
    frame: Arc<Vec<u8>>,
    done: bool,
}

pub(super) enum Link {
    Udp(UdpClient),
    Tcp {
        addr: SocketAddr,
        index: usize,
        conn: Option<TcpClient>,
        cuts_seen: u64,
    },
}

#[derive(Default)]
pub(super) struct ChannelReport {
    pub(super) name: String,
    pub(super) answers: HashMap<Key, Vec<St>>,
    pub(super) counts: StatusCounts,
    pub(super) copies: usize,
    pub(super) frames_sent: usize,
    pub(super) timeouts: usize,
    pub(super) stray: usize,
    pub(super) foreign: Vec<AckMsg>,
    pub(super) reconnects: usize,
    pub(super) cuts: usize,
    pub(super) unresolved: Vec<Key>,
    pub(super) udp_drops: u64,
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

/// One channel's copies: every copy handed to it, by index, and the copies of each id.
#[derive(Default)]
struct Copies {
    all: Vec<CopyState>,
    of: HashMap<Key, Vec<usize>>,
    unresolved: usize,
}

impl Copies {
    /// Marks a copy resolved, once; a long soak holds millions of copies, so its frame goes.
    fn resolve(&mut self, copy: usize, load: &Load, empty: &Arc<Vec<u8>>) {
        let state = &mut self.all[copy];
        if !state.done {
            state.done = true;
            state.frame = empty.clone();
            self.unresolved -= 1;
            load.outstanding.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One client channel: sends the copies handed to it, resends on RETRY (backoff) and on
/// silence (timeout) as the one resend loop (`ChannelLoop`) says, reconnects a broken TCP
/// connection, and runs until the generator hung up and every copy is resolved, or the test
/// aborts.
pub(super) fn run_channel(
    name: String,
    mut link: Link,
    inbox: Receiver<Work>,
    load: Arc<Load>,
    seed: u64,
) -> ChannelReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rep = ChannelReport {
        name,
        ..ChannelReport::default()
    };
    let mut copies = Copies::default();
    let (window, ack_timeout) = match link {
        Link::Udp(_) => (UDP_WINDOW, UDP_ACK_TIMEOUT),
        Link::Tcp { .. } => (TCP_WINDOW, TCP_ACK_TIMEOUT),
    };
    let mut channel = ChannelLoop::new(window, ack_timeout, BACKOFF_BASE, BACKOFF_MAX);
    let (mut inbox_open, mut resend_all) = (true, false);
    let (mut sends, mut batch) = (Vec::new(), Vec::new());
    let empty: Arc<Vec<u8>> = Arc::default();
    while !load.stopped() {
        while inbox_open {
            match inbox.try_recv() {
                Ok((key, frame)) => {
                    let copy = copies.all.len();
                    copies.all.push(CopyState {
                        key,
                        frame,
                        done: false,
                    });
                    copies.of.entry(key).or_default().push(copy);
                    channel.push(key, copy);
                    copies.unresolved += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => inbox_open = false,
            }
        }
        if !inbox_open && copies.unresolved == 0 {
            break;
        }
        channel.retain_waiting(|copy| !copies.all[copy].done);
        if let Link::Tcp { .. } = link {
            if !tcp_ready(&mut link, &channel, &copies, &load, &mut rng, &mut rep, &mut resend_all) {
                continue;
            }
        }
        sends.clear();
        channel.take_sends(&mut rng, std::mem::take(&mut resend_all), &mut sends, &mut rep.timeouts);
        rep.frames_sent += sends.len();
        if !send(&mut link, &sends, &copies, &mut rng, &mut batch) {
            rep.reconnects += 1;
            resend_all = true;
            continue;
        }
        // waits about 5 ms when nothing is there
        let acks = receive(&mut link, &mut rep.reconnects, &mut resend_all);
        for ack in acks {
            apply(ack, &mut channel, &mut copies, &load, &mut rng, &mut rep, &empty);
        }
    }
    if let Link::Udp(client) = &link {
        rep.udp_drops = client.drops();
    }
    rep.copies = copies.all.len();
    rep.unresolved = copies.all.iter().filter(|c| !c.done).map(|c| c.key).collect();
    rep
}

/// Carries out a requested cut of the TCP connection (half a frame on the wire, then gone,
/// with RST if asked), and connects if there is something to send. False while the server
/// cannot be reached (after a pause).
fn tcp_ready(
    link: &mut Link,
    channel: &ChannelLoop,
    copies: &Copies,
    load: &Load,
    rng: &mut StdRng,
    rep: &mut ChannelReport,
    resend_all: &mut bool,
) -> bool {
    let Link::Tcp {
        addr,
        index,
        conn,
        cuts_seen,
    } = link
    else {
        return true;
    };
    let cuts = load.cut_requests[*index].load(Ordering::SeqCst);
    if cuts != *cuts_seen {
        *cuts_seen = cuts;
        if let Some(mut c) = conn.take() {
            if let Some(copy) = channel.peek_waiting() {
                let f = &copies.all[copy].frame;
                let _ = c.send(&f[..rng.gen_range(1..f.len())]);
            }
            if load.cut_reset[*index].load(Ordering::SeqCst) {
                set_linger_zero(c.stream());
            }
            drop(c);
            *resend_all = true;
            rep.cuts += 1;
        }
    }
    if conn.is_none() && !channel.is_idle() {
        match TcpClient::connect(*addr) {
            Ok(c) => *conn = Some(c),
            Err(_) => {
                // the server is restarting
                thread::sleep(Duration::from_millis(50));
                return false;
            }
        }
    }
    true
}

/// Writes `sends`: over UDP up to 4 frames (1400 bytes) per datagram, over TCP in one write cut
/// at random offsets. False if the TCP write failed (the connection is dropped).
fn send(link: &mut Link, sends: &[usize], copies: &Copies, rng: &mut StdRng, batch: &mut Vec<u8>) -> bool {
    match link {
        Link::Udp(client) => {
            let mut rest = sends;
            while !rest.is_empty() {
                let max_frames = rng.gen_range(1..=4);
                batch.clear();
                let mut taken = 0;
                for &copy in rest {
                    let f = &copies.all[copy].frame;
                    if taken > 0 && (taken >= max_frames || batch.len() + f.len() > 1_400) {
                        break;
                    }
                    batch.extend_from_slice(f);
                    taken += 1;
                }
                client.send_frames(batch);
                rest = &rest[taken..];
            }
            true
        }
        Link::Tcp { conn, .. } => {
            let Some(c) = conn.as_mut().filter(|_| !sends.is_empty()) else {
                return true;
            };
            batch.clear();
            for &copy in sends {
                batch.extend_from_slice(&copies.all[copy].frame);
            }
            if c.send_split(batch, rng).is_err() {
                *conn = None;
                return false;
            }
            true
        }
    }
}

/// Every ack that has arrived; a TCP connection found closed is dropped, and what was in flight
/// on it goes again.
fn receive(link: &mut Link, reconnects: &mut usize, resend_all: &mut bool) -> Vec<AckMsg> {
    match link {
        Link::Udp(client) => client.try_recv_queued(),
        Link::Tcp { conn, .. } => match conn.as_mut() {
            Some(c) => {
                let acks = c.poll_acks();
                if c.is_closed() {
                    *conn = None;
                    *reconnects += 1;
                    *resend_all = true;
                }
                acks
            }
            None => {
                thread::sleep(Duration::from_millis(5));
                Vec::new()
            }
        },
    }
}

/// Records one ack and resolves the copy the resend loop says it ended.
fn apply(
    ack: AckMsg,
    channel: &mut ChannelLoop,
    copies: &mut Copies,
    load: &Load,
    rng: &mut StdRng,
    rep: &mut ChannelReport,
    empty: &Arc<Vec<u8>>,
) {
    let key = ack.key();
    rep.answers.entry(key).or_default().push(ack.status);
    rep.counts.add(ack.status);
    if !copies.of.contains_key(&key) {
        rep.foreign.push(ack);
        return;
    }
    if ack.status.is_stored() {
        load.progress();
    }
    match channel.answered(key, ack.status, rng) {
        Verdict::Ended(ending) => copies.resolve(ending.payload, load, empty),
        Verdict::ResendAt { .. } => {}
        Verdict::Unknown => {
            rep.stray += 1;
            // a client pairs answers by id: a late final answer resolves a copy still waiting too
            if ack.status != St::Retry {
                let waiting = copies.of[&key].iter().copied().find(|&copy| !copies.all[copy].done);
                if let Some(copy) = waiting {
                    copies.resolve(copy, load, empty);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// garbage
// ---------------------------------------------------------------------------------------

/// Sends garbage and keeps its sockets a while to check what comes back: only REJECTED,
/// by the id of a garbage frame whose crc matched.
pub(super) struct GarbageSender {
    udp: UdpClient,
    tcp: Vec<(TcpClient, Instant)>,
    pub(super) answers: StatusCounts,
    pub(super) not_rejected: Vec<AckMsg>,
    /// Ids of garbage frames sent with a matching crc: the only ids REJECTED may name.
    vouched: HashSet<Key>,
    /// REJECTED answers naming another id (revision 2: only an intact crc vouches for one).
    pub(super) rejected_unvouched: Vec<AckMsg>,
    pub(super) datagrams: usize,
    pub(super) tcp_conns: usize,
    tcp_refused: usize,
    next_id: u64,
}

impl GarbageSender {
    pub(super) fn new(udp: SocketAddr) -> GarbageSender {
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
    pub(super) fn poll(&mut self) {
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

pub(super) enum Phase {
    Running,
    Draining { since: Instant, down_ms: u64 },
    Down { start_at: Instant },
}

#[derive(Default)]
pub(super) struct Rss {
    pub(super) samples: usize,
    pub(super) max_rss_kb: u64,
    pub(super) max_hwm_kb: u64,
    /// per incarnation: (pid, max VmRSS kB, max VmHWM kB)
    pub(super) per_incarnation: Vec<(u32, u64, u64)>,
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

pub(super) struct Gate {
    pub(super) redis_url: String,
    pub(super) udp: SocketAddr,
    pub(super) tcp: SocketAddr,
    pub(super) dedup_window_secs: u64,
    pub(super) current: Option<Server>,
    pub(super) phase: Phase,
    pub(super) retired: Vec<Server>,
    pub(super) restart_pending: Option<u64>,
    pub(super) exit_problems: Vec<String>,
    pub(super) rss: Rss,
    pub(super) last_sample: Instant,
    /// log lines of the current server already looked at for "panicked"
    pub(super) scanned: usize,
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

    pub(super) fn pid(&self) -> Option<u32> {
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

    pub(super) fn sigterm(&mut self, down_ms: u64, journal: &Journal) {
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
    pub(super) fn tick(&mut self, journal: &Journal) {
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

    pub(super) fn bring_up(&mut self, journal: &Journal) {
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
    pub(super) fn ensure_running(&mut self, journal: &Journal) {
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

    pub(super) fn all_servers(&self) -> impl Iterator<Item = &Server> {
        self.retired.iter().chain(self.current.iter())
    }
}

pub(super) fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Redis faults
// ---------------------------------------------------------------------------------------

pub(super) enum RedisPhase {
    Up,
    Down { since: Instant, restart_at: Instant },
    Stopped { since: Instant, resume_at: Instant },
}

pub(super) struct RedisSide {
    pub(super) redis: RedisServer,
    pub(super) phase: RedisPhase,
    pub(super) pause_until: Option<Instant>,
}

impl RedisSide {
    pub(super) fn tick(&mut self, journal: &Journal, force: bool) {
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

pub(super) fn execute(
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
