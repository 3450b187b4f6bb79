//! `deliver_all`: resend until every copy is answered ACCEPTED or DUPLICATE.

use shardgate_client::resend::Schedule;
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
    /// frames in flight per UDP socket
    pub udp_window: usize,
    /// frames in flight per TCP connection
    pub tcp_window: usize,
    /// resend a UDP frame that got no answer in this long
    pub udp_ack_timeout: Duration,
    /// resend a TCP frame that got no answer in this long
    pub tcp_ack_timeout: Duration,
    /// bound on the whole call
    pub total_timeout: Duration,
    /// cut TCP writes at random byte offsets
    pub tcp_split_writes: bool,
    /// RETRY backoff: base * 2^attempt, capped, with jitter
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// how far apart (in positions of a channel's send order) copies of one event may be;
    /// None: a twentieth of the events. Some(1): all copies go out at about the same time.
    pub copy_spread: Option<usize>,
    /// put the copies of one event on different channels (as far as there are enough)
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
    /// answers with no copy of that id in flight on that channel (late answers)
    pub stray_acks: usize,
    /// answers naming an event id that was never sent (a server bug)
    pub foreign_acks: Vec<AckMsg>,
    pub reconnects: usize,
    /// datagrams dropped at the client sockets (lost acks)
    pub udp_client_drops: u64,
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
/// answered ACCEPTED or DUPLICATE (or REJECTED, which is final) or `total_timeout` passed.
pub fn deliver_all(udp: SocketAddr, tcp: SocketAddr, events: &[Event], opts: &DeliverOpts) -> DeliveryReport {
    let started = Instant::now();
    let n_chans = opts.udp_sockets + opts.tcp_conns;
    assert!(n_chans > 0, "deliver_all needs a UDP socket or a TCP connection");
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
        for k in 0..n {
            let ci = copies.len();
            copies.push(ei);
            let ch = if opts.distinct_channels {
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
        let chan = if ch < opts.udp_sockets {
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
    }
    report.elapsed = started.elapsed();
    report
}

/// The wait before resending a copy that got RETRY after `attempts` sends: the one resend
/// schedule (`shardgate_client::resend`), half of each wait as jitter.
fn backoff(opts: &DeliverOpts, attempts: u32, rng: &mut StdRng) -> Duration {
    Schedule::new(opts.backoff_base, opts.backoff_max, 50).delay(attempts + 1, rng.gen())
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
    let n = mine.len();
    let mut finals: Vec<Option<St>> = vec![None; n];
    let mut attempts: Vec<u32> = vec![0; n];
    let mut ready: VecDeque<usize> = (0..n).collect();
    let mut delayed: Vec<(Instant, usize)> = Vec::new();
    let mut inflight: HashMap<Key, VecDeque<(usize, Instant)>> = HashMap::new();
    let mut inflight_n = 0usize;
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
    };
    let (window, ack_timeout) = match chan {
        Chan::Udp(_) => (opts.udp_window, opts.udp_ack_timeout),
        Chan::Tcp { .. } => (opts.tcp_window, opts.tcp_ack_timeout),
    };
    let mut last_timeout_scan = Instant::now();
    let mut batch = Vec::new();
    while (!ready.is_empty() || !delayed.is_empty() || inflight_n > 0) && Instant::now() < deadline {
        let now = Instant::now();
        delayed.retain(|&(at, li)| {
            if at <= now {
                ready.push_back(li);
                false
            } else {
                true
            }
        });
        // send
        match &mut chan {
            Chan::Udp(client) => {
                while inflight_n < window && !ready.is_empty() {
                    batch.clear();
                    let max_frames = rng.gen_range(1..=opts.udp_max_frames.max(1));
                    let mut sent = Vec::new();
                    while let Some(&li) = ready.front() {
                        let f = &frames[mine[li].1];
                        if !sent.is_empty()
                            && (sent.len() >= max_frames
                                || batch.len() + f.len() > opts.udp_max_datagram
                                || inflight_n + sent.len() >= window)
                        {
                            break;
                        }
                        batch.extend_from_slice(f);
                        sent.push(li);
                        ready.pop_front();
                    }
                    client.send_frames(&batch);
                    let t = Instant::now();
                    for li in sent {
                        inflight.entry(keys[li]).or_default().push_back((li, t));
                        inflight_n += 1;
                        res.frames_sent += 1;
                    }
                }
            }
            Chan::Tcp { addr, client } => {
                if client.is_none() {
                    match TcpClient::connect(*addr) {
                        Ok(c) => *client = Some(c),
                        Err(_) => {
                            thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    }
                }
                if inflight_n < window && !ready.is_empty() {
                    batch.clear();
                    let mut sent = Vec::new();
                    while inflight_n + sent.len() < window {
                        let Some(li) = ready.pop_front() else { break };
                        batch.extend_from_slice(&frames[mine[li].1]);
                        sent.push(li);
                    }
                    let c = client.as_mut().expect("connected");
                    let r = if opts.tcp_split_writes {
                        c.send_split(&batch, &mut rng)
                    } else {
                        c.send(&batch)
                    };
                    let t = Instant::now();
                    for &li in &sent {
                        inflight.entry(keys[li]).or_default().push_back((li, t));
                        inflight_n += 1;
                        res.frames_sent += 1;
                    }
                    if r.is_err() {
                        // The connection broke: everything in flight on it goes again.
                        requeue_all(&mut inflight, &mut inflight_n, &mut ready);
                        *client = None;
                        res.reconnects += 1;
                        continue;
                    }
                }
            }
        }
        // receive
        let acks = match &mut chan {
            Chan::Udp(client) => {
                let mut acks = client.try_recv();
                // drain whatever else is queued without waiting again
                loop {
                    let more = client.try_recv();
                    if more.is_empty() {
                        break;
                    }
                    acks.extend(more);
                }
                acks
            }
            Chan::Tcp { client, .. } => {
                let c = client.as_mut().expect("connected");
                let acks = c.poll_acks();
                if c.is_closed() {
                    // handle what arrived, then requeue the rest below
                    *client = None;
                    res.reconnects += 1;
                }
                acks
            }
        };
        let now = Instant::now();
        for ack in acks {
            let key = ack.key();
            res.answers.entry(key).or_default().push(ack.status);
            res.counts.add(ack.status);
            if !known.contains(&key) {
                res.foreign.push(ack);
                continue;
            }
            let Some(li) = inflight.get_mut(&key).and_then(VecDeque::pop_front).map(|x| x.0) else {
                res.stray += 1;
                continue;
            };
            inflight_n -= 1;
            match ack.status {
                St::Accepted | St::Duplicate | St::Rejected => finals[li] = Some(ack.status),
                St::Retry => {
                    attempts[li] += 1;
                    delayed.push((now + backoff(opts, attempts[li], &mut rng), li));
                }
            }
        }
        if let Chan::Tcp { client: None, .. } = chan {
            requeue_all(&mut inflight, &mut inflight_n, &mut ready);
        }
        // resend what got no answer
        if now.duration_since(last_timeout_scan) > Duration::from_millis(50) {
            last_timeout_scan = now;
            for q in inflight.values_mut() {
                while let Some(&(li, t)) = q.front() {
                    if now.duration_since(t) < ack_timeout {
                        break;
                    }
                    q.pop_front();
                    inflight_n -= 1;
                    res.timeouts += 1;
                    ready.push_back(li);
                }
            }
        }
        if ready.is_empty() && inflight_n == 0 && !delayed.is_empty() {
            thread::sleep(Duration::from_millis(2));
        }
    }
    if let Chan::Udp(client) = &chan {
        res.udp_drops = client.drops();
    }
    res.finals = mine.iter().enumerate().map(|(li, &(ci, _))| (ci, finals[li])).collect();
    res
}

fn requeue_all(
    inflight: &mut HashMap<Key, VecDeque<(usize, Instant)>>,
    inflight_n: &mut usize,
    ready: &mut VecDeque<usize>,
) {
    for (_, q) in inflight.drain() {
        ready.extend(q.into_iter().map(|(li, _)| li));
    }
    *inflight_n = 0;
}
