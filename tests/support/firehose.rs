//! The firehose: a steady background stream of fresh events (plus duplicates), no resends.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate::wire::frame;

use super::clients::{set_rcvbuf, udp_socket_drops, TcpClient};
use super::events::{parse_acks, AckMsg, Event, Key, St, StatusCounts};

#[derive(Clone, Debug)]
pub struct FirehoseOpts {
    pub seed: u64,
    pub udp_sockets: usize,
    pub tcp_conns: usize,
    /// fresh events per second, all channels together
    pub rate_per_sec: u64,
    /// chance in percent that a send is an extra copy of an earlier event
    pub dup_percent: u32,
    /// players are player_base + (n % players)
    pub player_base: u64,
    pub players: u64,
    pub max_payload: usize,
}

impl Default for FirehoseOpts {
    fn default() -> Self {
        FirehoseOpts {
            seed: 1,
            udp_sockets: 2,
            tcp_conns: 2,
            rate_per_sec: 2000,
            dup_percent: 10,
            player_base: 1_000_000,
            players: 257,
            max_payload: 300,
        }
    }
}

#[derive(Default)]
struct FireShared {
    events: Mutex<Vec<Event>>,
    answers: Mutex<HashMap<Key, Vec<St>>>,
    counts: Mutex<StatusCounts>,
    copies_sent: AtomicUsize,
    next: AtomicU64,
    tcp_closed_by_server: AtomicUsize,
}

/// Sends fresh events at a steady rate over UDP and TCP, each once, plus extra copies of
/// earlier events; records every answer. Does not resend (follow up with `deliver_all`).
pub struct Firehose {
    stop_send: Arc<AtomicBool>,
    stop_read: Arc<AtomicBool>,
    shared: Arc<FireShared>,
    senders: Vec<JoinHandle<()>>,
    readers: Vec<JoinHandle<u64>>,
}

pub struct FirehoseResult {
    pub events: Vec<Event>,
    pub answers: HashMap<Key, Vec<St>>,
    pub counts: StatusCounts,
    pub copies_sent: usize,
    pub udp_client_drops: u64,
    pub tcp_closed_by_server: usize,
}

impl FirehoseResult {
    pub fn stored_keys(&self) -> HashSet<Key> {
        self.answers
            .iter()
            .filter(|(_, v)| v.iter().any(|s| s.is_stored()))
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "events={} copies_sent={} answers={:?} udp_client_drops={} tcp_closed_by_server={}",
            self.events.len(),
            self.copies_sent,
            self.counts,
            self.udp_client_drops,
            self.tcp_closed_by_server
        )
    }
}

impl Firehose {
    pub fn start(udp: SocketAddr, tcp: SocketAddr, opts: &FirehoseOpts) -> Firehose {
        let n_chans = opts.udp_sockets + opts.tcp_conns;
        assert!(n_chans > 0);
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_read = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(FireShared::default());
        let mut senders = Vec::new();
        let mut readers = Vec::new();
        let per_chan_rate = (opts.rate_per_sec as f64 / n_chans as f64).max(1.0);
        for ch in 0..n_chans {
            let seed = opts.seed ^ (ch as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F);
            let opts = opts.clone();
            let shared2 = shared.clone();
            let stop2 = stop_send.clone();
            if ch < opts.udp_sockets {
                let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
                set_rcvbuf(sock.as_raw_fd(), 4 << 20);
                sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
                let rsock = sock.try_clone().expect("clone udp");
                let shared3 = shared.clone();
                let stop_r = stop_read.clone();
                let server_port = udp.port();
                readers.push(thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    let port = rsock.local_addr().expect("addr").port();
                    while !stop_r.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = rsock.recv_from(&mut buf) {
                            if from.port() == server_port {
                                record(&shared3, &parse_acks(&buf[..n]));
                            }
                        }
                    }
                    udp_socket_drops(port).unwrap_or(0)
                }));
                senders.push(thread::spawn(move || {
                    fire_loop(&shared2, &stop2, &opts, per_chan_rate, seed, |bytes, _| {
                        let _ = sock.send_to(bytes, udp);
                        true
                    })
                }));
            } else {
                let Ok(client) = TcpClient::connect(tcp) else {
                    panic!("firehose: cannot connect to {tcp}");
                };
                let mut rstream = client.stream().try_clone().expect("clone tcp");
                rstream
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                let shared3 = shared.clone();
                let stop_r = stop_read.clone();
                readers.push(thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 16384];
                    while !stop_r.load(Ordering::Relaxed) {
                        match rstream.read(&mut tmp) {
                            Ok(0) => {
                                shared3.tcp_closed_by_server.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            Ok(n) => {
                                buf.extend_from_slice(&tmp[..n]);
                                let whole = buf.len() / frame::ACK_BYTES * frame::ACK_BYTES;
                                record(&shared3, &parse_acks(&buf[..whole]));
                                buf.drain(..whole);
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                                ) => {}
                            Err(_) => {
                                shared3.tcp_closed_by_server.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    0
                }));
                let mut client = client;
                senders.push(thread::spawn(move || {
                    fire_loop(&shared2, &stop2, &opts, per_chan_rate, seed, |bytes, rng| {
                        client.send_split(bytes, rng).is_ok()
                    })
                }));
            }
        }
        Firehose {
            stop_send,
            stop_read,
            shared,
            senders,
            readers,
        }
    }

    /// Answers so far.
    pub fn counts_so_far(&self) -> StatusCounts {
        *self.shared.counts.lock().expect("lock")
    }

    /// Stops sending, keeps reading answers for `grace`, then stops.
    pub fn stop(self, grace: Duration) -> FirehoseResult {
        self.stop_send.store(true, Ordering::Relaxed);
        for h in self.senders {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
        thread::sleep(grace);
        self.stop_read.store(true, Ordering::Relaxed);
        let mut drops = 0;
        for h in self.readers {
            drops += h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
        let shared = Arc::try_unwrap(self.shared).ok().expect("firehose threads are gone");
        FirehoseResult {
            events: shared.events.into_inner().expect("lock"),
            answers: shared.answers.into_inner().expect("lock"),
            counts: shared.counts.into_inner().expect("lock"),
            copies_sent: shared.copies_sent.load(Ordering::Relaxed),
            udp_client_drops: drops,
            tcp_closed_by_server: shared.tcp_closed_by_server.load(Ordering::Relaxed),
        }
    }
}

fn record(shared: &FireShared, acks: &[AckMsg]) {
    if acks.is_empty() {
        return;
    }
    let mut answers = shared.answers.lock().expect("lock");
    let mut counts = shared.counts.lock().expect("lock");
    for a in acks {
        answers.entry(a.key()).or_default().push(a.status);
        counts.add(a.status);
    }
}

fn fire_loop(
    shared: &FireShared,
    stop: &AtomicBool,
    opts: &FirehoseOpts,
    rate: f64,
    seed: u64,
    mut send: impl FnMut(&[u8], &mut StdRng) -> bool,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut done = 0u64;
    let mut batch = Vec::new();
    // a hard cap, whatever the caller does
    let hard_stop = started + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if done >= due {
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        let n = (due - done).min(rng.gen_range(1..=4));
        batch.clear();
        for _ in 0..n {
            let dup = {
                let events = shared.events.lock().expect("lock");
                if !events.is_empty() && rng.gen_range(0..100) < opts.dup_percent {
                    let lo = events.len().saturating_sub(200);
                    Some(events[rng.gen_range(lo..events.len())].clone())
                } else {
                    None
                }
            };
            let e = match dup {
                Some(e) => e,
                None => {
                    let i = shared.next.fetch_add(1, Ordering::Relaxed);
                    let e = Event::random(&mut rng, opts.player_base + i % opts.players, i, opts.max_payload);
                    shared.events.lock().expect("lock").push(e.clone());
                    e
                }
            };
            e.encode_into(&mut batch);
            done += 1;
        }
        shared.copies_sent.fetch_add(n as usize, Ordering::Relaxed);
        if !send(&batch, &mut rng) {
            // TCP connection gone (e.g. server shut down): this channel is finished.
            break;
        }
    }
}
