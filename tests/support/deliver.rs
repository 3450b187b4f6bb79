//! `deliver_all`: resend until every copy is answered ACCEPTED or DUPLICATE; and
//! `ChannelLoop`, one channel's side of the one resend loop, which the chaos soak's channels and
//! the metrics test's exact-count client drive too.

use shardgate::wire::frame::{EventId, Status};
use shardgate_client::resend::{Due, Limits, Outstanding, Schedule, Verdict, Waits};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::clients::{TcpClient, UdpClient};
use super::events::{AckMsg, Event, Key, St, StatusCounts};
use super::server::Server;

#[derive(Clone, Debug)]
pub struct DeliverOpts {
    pub seed: u64,
    /// UDP client sockets (each its own source port); 0 = no UDP.
    pub udp_sockets: usize,
    /// TCP connections; 0 = no TCP.
    pub tcp_conns: usize,
    /// copies per event: uniformly in min..=max
    pub min_copies: usize,
    pub max_copies: usize,
    pub udp_max_datagram: usize,
    pub udp_max_frames: usize,
    /// copies outstanding (sent, not ended; RETRY-paused ones included) per UDP socket
    pub udp_window: usize,
    /// copies outstanding per TCP connection
    pub tcp_window: usize,
    /// resend a UDP frame that got no answer in this long
    pub udp_ack_timeout: Duration,
    /// resend a TCP frame that got no answer in this long
    pub tcp_ack_timeout: Duration,
    /// bound on the whole call
    pub total_timeout: Duration,
    /// cut TCP writes at random byte offsets
    pub tcp_split_writes: bool,
    /// RETRY backoff: base * 2^copies sent, capped, with jitter
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// how far apart (in positions of a channel's send order) copies of one event may be;
    /// None: a twentieth of the events. Some(1): all copies go out at about the same time.
    pub copy_spread: Option<usize>,
    /// put the copies of one event on different channels (as far as there are enough); to
    /// several hosts (`deliver_to_hosts`): on different hosts, as far as there are enough
    pub distinct_channels: bool,
}

impl Default for DeliverOpts {
    fn default() -> Self {
        DeliverOpts {
            seed: 1,
            udp_sockets: 2,
            tcp_conns: 1,
            min_copies: 1,
            max_copies: 1,
            udp_max_datagram: 1400,
            udp_max_frames: 6,
            udp_window: 48,
            tcp_window: 256,
            udp_ack_timeout: Duration::from_millis(1500),
            tcp_ack_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(30),
            tcp_split_writes: true,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(300),
            copy_spread: None,
            distinct_channels: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct DeliveryReport {
    pub events: usize,
    pub copies: usize,
    /// every answer received, per event id, in arrival order per channel
    pub answers: HashMap<Key, Vec<St>>,
    /// per copy: its event id and final answer (None: unresolved when time ran out)
    pub copy_final: Vec<(Key, Option<St>)>,
    pub counts: StatusCounts,
    /// frames written, resends included
    pub frames_sent: usize,
    /// resends after no answer
    pub timeouts: usize,
    /// answers with no copy of that id outstanding on that channel (late answers)
    pub stray_acks: usize,
    /// answers naming an event id that was never sent (a server bug)
    pub foreign_acks: Vec<AckMsg>,
    pub reconnects: usize,
    /// datagrams dropped at the client sockets (lost acks)
    pub udp_client_drops: u64,
    /// when each RETRY answer arrived
    pub retries_at: Vec<Instant>,
    pub elapsed: Duration,
}

impl DeliveryReport {
    /// Event ids with at least one copy unresolved.
    pub fn unresolved(&self) -> Vec<Key> {
        let mut v: Vec<Key> = self
            .copy_final
            .iter()
            .filter(|(_, st)| !st.is_some_and(St::is_stored))
            .map(|(k, _)| *k)
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Event ids that got at least one ACCEPTED or DUPLICATE.
    pub fn stored_keys(&self) -> HashSet<Key> {
        self.answers
            .iter()
            .filter(|(_, v)| v.iter().any(|s| s.is_stored()))
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "events={} copies={} frames_sent={} answers={:?} timeouts={} stray={} foreign={} \
             reconnects={} unresolved={} udp_client_drops={} elapsed={:?}",
            self.events,
            self.copies,
            self.frames_sent,
            self.counts,
            self.timeouts,
            self.stray_acks,
            self.foreign_acks.len(),
            self.reconnects,
            self.unresolved().len(),
            self.udp_client_drops,
            self.elapsed
        )
    }
}

enum Chan {
    Udp(UdpClient),
    Tcp {
        addr: SocketAddr,
        client: Option<TcpClient>,
    },
}

struct ChanResult {
    finals: Vec<(usize, Option<St>)>,
    answers: HashMap<Key, Vec<St>>,
    counts: StatusCounts,
    frames_sent: usize,
    timeouts: usize,
    stray: usize,
    foreign: Vec<AckMsg>,
    reconnects: usize,
    udp_drops: u64,
    retries_at: Vec<Instant>,
}

/// `deliver_all` to `server` with default options, failing the test unless
/// every copy was resolved within `total_timeout`.
pub fn deliver_resolved(server: &Server, events: &[Event], seed: u64, total_timeout: Duration) -> DeliveryReport {
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        events,
        &DeliverOpts {
            seed,
            total_timeout,
            ..DeliverOpts::default()
        },
    );
    assert!(report.unresolved().is_empty(), "{}", report.summary());
    report
}

/// Sends every event (each `min..=max` copies, spread over UDP sockets and TCP connections)
/// and resends every copy that got RETRY or no answer, with backoff, until each copy was
/// answered ACCEPTED or DUPLICATE (or REJECTED, which is final) or `total_timeout` passed. Each
/// channel runs the one resend loop (`ChannelLoop`) and only does its own I/O around it.
pub fn deliver_all(udp: SocketAddr, tcp: SocketAddr, events: &[Event], opts: &DeliverOpts) -> DeliveryReport {
    deliver_to_hosts(&[(udp, tcp)], events, opts)
}

/// [`deliver_all`] to several servers, each given as its (UDP, TCP) addresses: each gets
/// `opts.udp_sockets` UDP sockets and `opts.tcp_conns` TCP connections, and the copies of an
/// event are spread over all of them (with `distinct_channels`, over different hosts).
pub fn deliver_to_hosts(hosts: &[(SocketAddr, SocketAddr)], events: &[Event], opts: &DeliverOpts) -> DeliveryReport {
    let started = Instant::now();
    let per_host = opts.udp_sockets + opts.tcp_conns;
    assert!(per_host > 0, "deliver_all needs a UDP socket or a TCP connection");
    assert!(!hosts.is_empty(), "deliver_to_hosts needs a host");
    let n_chans = per_host * hosts.len();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let frames: Arc<Vec<Vec<u8>>> = Arc::new(events.iter().map(Event::frame).collect());
    let known: Arc<HashSet<Key>> = Arc::new(events.iter().map(Event::key).collect());
    // copy index -> event index; per channel: copies ordered by event index plus jitter, so
    // that copies of one event on different channels tend to be in flight together.
    let mut copies: Vec<usize> = Vec::new();
    let mut per_chan: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n_chans];
    let jitter = opts.copy_spread.unwrap_or(events.len() / 20).max(1);
    for (ei, _) in events.iter().enumerate() {
        let n = rng.gen_range(opts.min_copies..=opts.max_copies);
        let mut order: Vec<usize> = (0..n_chans).collect();
        order.shuffle(&mut rng);
        let first_host = if hosts.len() > 1 {
            rng.gen_range(0..hosts.len())
        } else {
            0
        };
        for k in 0..n {
            let ci = copies.len();
            copies.push(ei);
            let ch = if opts.distinct_channels && hosts.len() > 1 {
                let host = (first_host + k) % hosts.len();
                host * per_host + rng.gen_range(0..per_host)
            } else if opts.distinct_channels {
                order[k % n_chans]
            } else {
                rng.gen_range(0..n_chans)
            };
            per_chan[ch].push((ei + rng.gen_range(0..jitter), ci));
        }
    }
    let deadline = started + opts.total_timeout;
    let mut handles = Vec::new();
    for (ch, mut list) in per_chan.into_iter().enumerate() {
        list.sort();
        let mine: Vec<(usize, usize)> = list.into_iter().map(|(_, ci)| (ci, copies[ci])).collect();
        let (udp, tcp) = hosts[ch / per_host];
        let chan = if ch % per_host < opts.udp_sockets {
            Chan::Udp(UdpClient::new(udp))
        } else {
            Chan::Tcp {
                addr: tcp,
                client: None,
            }
        };
        let frames = frames.clone();
        let known = known.clone();
        let opts = opts.clone();
        let seed = opts.seed ^ (ch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let events_keys: Vec<Key> = mine.iter().map(|&(_, ei)| events[ei].key()).collect();
        handles.push(thread::spawn(move || {
            run_channel(chan, mine, events_keys, frames, known, &opts, deadline, seed)
        }));
    }
    let mut report = DeliveryReport {
        events: events.len(),
        copies: copies.len(),
        copy_final: copies.iter().map(|&ei| (events[ei].key(), None)).collect(),
        ..Default::default()
    };
    for h in handles {
        let r = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        for (ci, st) in r.finals {
            report.copy_final[ci].1 = st;
        }
        for (k, v) in r.answers {
            report.answers.entry(k).or_default().extend(v);
        }
        report.counts.merge(&r.counts);
        report.frames_sent += r.frames_sent;
        report.timeouts += r.timeouts;
        report.stray_acks += r.stray;
        report.foreign_acks.extend(r.foreign);
        report.reconnects += r.reconnects;
        report.udp_client_drops += r.udp_drops;
        report.retries_at.extend(r.retries_at);
    }
    report.retries_at.sort();
    report.elapsed = started.elapsed();
    report
}

#[allow(clippy::too_many_arguments)]
fn run_channel(
    mut chan: Chan,
    mine: Vec<(usize, usize)>,
    keys: Vec<Key>,
    frames: Arc<Vec<Vec<u8>>>,
    known: Arc<HashSet<Key>>,
    opts: &DeliverOpts,
    deadline: Instant,
    seed: u64,
) -> ChanResult {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut finals: Vec<Option<St>> = vec![None; mine.len()];
    let mut res = ChanResult {
        finals: Vec::new(),
        answers: HashMap::new(),
        counts: StatusCounts::default(),
        frames_sent: 0,
        timeouts: 0,
        stray: 0,
        foreign: Vec::new(),
        reconnects: 0,
        udp_drops: 0,
        retries_at: Vec::new(),
    };
    let (window, ack_timeout) = match chan {
        Chan::Udp(_) => (opts.udp_window, opts.udp_ack_timeout),
        Chan::Tcp { .. } => (opts.tcp_window, opts.tcp_ack_timeout),
    };
    let mut channel = ChannelLoop::new(window, ack_timeout, opts.backoff_base, opts.backoff_max);
    for (li, &key) in keys.iter().enumerate() {
        channel.push(key, li);
    }
    let (mut sends, mut batch) = (Vec::new(), Vec::new());
    // A broken TCP connection lost what was in flight on it: all goes again on the next.
    let mut resend_all = false;
    while !channel.is_idle() && Instant::now() < deadline {
        if let Chan::Tcp {
            addr,
            client: client @ None,
        } = &mut chan
        {
            match TcpClient::connect(*addr) {
                Ok(c) => *client = Some(c),
                Err(_) => {
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
        }
        sends.clear();
        channel.take_sends(&mut rng, std::mem::take(&mut resend_all), &mut sends, &mut res.timeouts);
        res.frames_sent += sends.len();
        let frame_of = |li: usize| &frames[mine[li].1];
        match &mut chan {
            Chan::Udp(client) => {
                let mut rest = &sends[..];
                while !rest.is_empty() {
                    let max_frames = rng.gen_range(1..=opts.udp_max_frames.max(1));
                    let taken = udp_datagram(rest, max_frames, opts.udp_max_datagram, frame_of, &mut batch);
                    client.send_frames(&batch);
                    rest = &rest[taken..];
                }
            }
            Chan::Tcp { client, .. } if !sends.is_empty() => {
                batch.clear();
                for &li in &sends {
                    batch.extend_from_slice(frame_of(li));
                }
                let c = client.as_mut().expect("connected");
                let written = if opts.tcp_split_writes {
                    c.send_split(&batch, &mut rng)
                } else {
                    c.send(&batch)
                };
                if written.is_err() {
                    *client = None;
                    res.reconnects += 1;
                    resend_all = true;
                    continue;
                }
            }
            Chan::Tcp { .. } => {}
        }
        let acks = receive(&mut chan, &mut res.reconnects, &mut resend_all);
        for ack in acks {
            let key = ack.key();
            res.answers.entry(key).or_default().push(ack.status);
            res.counts.add(ack.status);
            if ack.status == St::Retry {
                res.retries_at.push(Instant::now());
            }
            if !known.contains(&key) {
                res.foreign.push(ack);
                continue;
            }
            match channel.answered(key, ack.status, &mut rng) {
                Verdict::Ended(ending) => finals[ending.payload] = Some(ack.status),
                Verdict::ResendAt { .. } => {}
                // A late answer, to a copy an earlier answer already ended.
                Verdict::Unknown => res.stray += 1,
            }
        }
    }
    if let Chan::Udp(client) = &chan {
        res.udp_drops = client.drops();
    }
    res.finals = mine.iter().enumerate().map(|(li, &(ci, _))| (ci, finals[li])).collect();
    res
}

/// Packs the first of `sends` into `batch` as one datagram: at least one frame, then more while
/// there are at most `max_frames` and `max_bytes`. Returns how many it took.
fn udp_datagram<'a>(
    sends: &[usize],
    max_frames: usize,
    max_bytes: usize,
    frame_of: impl Fn(usize) -> &'a Vec<u8>,
    batch: &mut Vec<u8>,
) -> usize {
    batch.clear();
    let mut taken = 0;
    for &li in sends {
        let frame = frame_of(li);
        if taken > 0 && (taken >= max_frames || batch.len() + frame.len() > max_bytes) {
            break;
        }
        batch.extend_from_slice(frame);
        taken += 1;
    }
    taken
}

/// Every ack that has arrived (UDP: all queued datagrams; TCP: what the connection has). A TCP
/// connection found closed is dropped, and what was in flight on it goes again.
fn receive(chan: &mut Chan, reconnects: &mut usize, resend_all: &mut bool) -> Vec<AckMsg> {
    match chan {
        Chan::Udp(client) => client.try_recv_queued(),
        Chan::Tcp { client, .. } => {
            let Some(c) = client.as_mut() else {
                return Vec::new();
            };
            let acks = c.poll_acks();
            if c.is_closed() {
                *client = None;
                *reconnects += 1;
                *resend_all = true;
            }
            acks
        }
    }
}

/// One channel's side of the one resend loop (`shardgate_client::resend::Outstanding`): the
/// copies waiting for their first send, the loop's table of copies sent and not ended (the
/// payload is the caller's copy index), and its clock. The loop decides what every answer and
/// every timeout means; the channel only writes, reads and records.
///
/// The table is the channel's window: a copy paused by RETRY holds its place. Answers name only
/// the event id, so a channel has one copy of an id outstanding at a time; another copy of that
/// id waits until the first ends (copies of one event still race across channels).
pub struct ChannelLoop {
    table: Outstanding<usize>,
    waiting: VecDeque<(Key, usize)>,
    /// Copies whose id is outstanding on this channel, in arrival order.
    blocked: Vec<(Key, usize)>,
    origin: Instant,
}

impl ChannelLoop {
    /// `window` copies outstanding at most; a copy unanswered for `ack_timeout` is resent; after
    /// RETRY to the n-th copy, the next goes `retry_base × 2^n` later (capped at `retry_max`,
    /// half of each wait as jitter).
    pub fn new(window: usize, ack_timeout: Duration, retry_base: Duration, retry_max: Duration) -> ChannelLoop {
        let waits = Waits {
            answer: Schedule::new(ack_timeout, ack_timeout, 0),
            retry: Schedule::new(retry_base.saturating_mul(2), retry_max, 50),
        };
        ChannelLoop {
            table: Outstanding::new(window, waits, Limits::default()),
            waiting: VecDeque::new(),
            blocked: Vec::new(),
            origin: Instant::now(),
        }
    }

    /// Queues a copy for its first send.
    pub fn push(&mut self, key: Key, copy: usize) {
        self.waiting.push_back((key, copy));
    }

    /// No copy waiting and none outstanding.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.blocked.is_empty() && self.table.is_empty()
    }

    /// The next copy to go out for the first time, if any.
    pub fn peek_waiting(&self) -> Option<usize> {
        self.waiting.front().map(|&(_, copy)| copy)
    }

    /// Drops the copies waiting for a first send that `keep` refuses.
    pub fn retain_waiting(&mut self, mut keep: impl FnMut(usize) -> bool) {
        self.waiting.retain(|&(_, copy)| keep(copy));
        self.blocked.retain(|&(_, copy)| keep(copy));
    }

    /// The copies to write now, each already recorded as sent: resends whose wait ran out
    /// (counted in `timeouts` when no answer came), every outstanding copy if `resend_all`
    /// (a broken connection lost them), then first copies while the window has room.
    pub fn take_sends(&mut self, rng: &mut StdRng, resend_all: bool, sends: &mut Vec<usize>, timeouts: &mut usize) {
        let now_ns = self.now_ns();
        while let Some(due) = self.table.pop_due(now_ns, rng.gen()) {
            // No limits are set, so nothing ends unconfirmed.
            if let Due::Resend { id, timed_out, .. } = due {
                *timeouts += usize::from(timed_out);
                sends.extend(self.table.get(id).map(|entry| entry.payload));
            }
        }
        if resend_all {
            let ids: Vec<EventId> = self.table.entries().map(|entry| entry.id).collect();
            for id in ids {
                self.table.resent(id, now_ns, rng.gen());
                sends.extend(self.table.get(id).map(|entry| entry.payload));
            }
        }
        // Copies whose id ended go back to the front, in their order.
        for index in (0..self.blocked.len()).rev() {
            if !self.table.contains(event_id(self.blocked[index].0)) {
                self.waiting.push_front(self.blocked.remove(index));
            }
        }
        while self.table.len() < self.table.capacity() {
            let Some((key, copy)) = self.waiting.pop_front() else {
                break;
            };
            match self.table.first_sent(event_id(key), copy, now_ns, now_ns, rng.gen()) {
                Ok(_) => sends.push(copy),
                Err(_) => self.blocked.push((key, copy)),
            }
        }
    }

    /// What an answer received now means; see `resend::Verdict`.
    pub fn answered(&mut self, key: Key, status: St, rng: &mut StdRng) -> Verdict<usize> {
        let now_ns = self.now_ns();
        self.table
            .answered(event_id(key), wire_status(status), now_ns, rng.gen())
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// The resend loop's id of a test's event key.
pub fn event_id((player_id, seq): Key) -> EventId {
    EventId { player_id, seq }
}

/// The wire status of a test's answer, as the resend loop takes it.
pub fn wire_status(status: St) -> Status {
    match status {
        St::Accepted => Status::Accepted,
        St::Duplicate => Status::Duplicate,
        St::Retry => Status::Retry,
        St::Rejected => Status::Rejected,
    }
}
