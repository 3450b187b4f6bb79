//! Fake shardgate servers for the client's tests: a UDP and a TCP server on loopback, each on
//! its own thread, answering every frame as a script says and logging what arrived and when.
//! They are the client's unit of truth: no Redis and no real server, and every answer
//! (order, coalescing, malformed bytes, silence, a dropped connection) is chosen by the test.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shardgate_client::frame::{self, EventId, Status, ACK_BYTES};
use shardgate_client::{Client, ClientConfig, Event, Resolution};

/// How the fake server answers one frame.
pub enum Answer {
    Ack(Status),
    /// No answer at all, as if the frame or the ack were lost.
    Silent,
    /// These bytes instead of an ack (malformed acks, acks for other ids).
    Raw(Vec<u8>),
    /// TCP: close the connection without answering.
    Close,
}

/// Decides the answer to each frame from its id and which copy of that id it is (1-based).
pub type Script = Box<dyn FnMut(EventId, u32) -> Answer + Send>;

/// What the fake server saw and sent.
#[derive(Clone, Debug, Default)]
pub struct Log {
    /// Each UDP datagram (or TCP read) as received.
    pub datagrams: Vec<Vec<u8>>,
    /// Every frame's id with its arrival time, in arrival order.
    pub copies: Vec<(EventId, Instant)>,
    /// Byte length of each reply datagram (UDP) or reply write (TCP).
    pub replies: Vec<usize>,
    /// Frames that `frame::parse` refused: the client must never send one.
    pub bad_frames: usize,
    /// Raw bytes of every whole frame, in arrival order.
    pub frames: Vec<Vec<u8>>,
    pub connections: usize,
}

impl Log {
    pub fn copies_of(&self, id: EventId) -> Vec<Instant> {
        self.copies
            .iter()
            .filter(|(copy_id, _)| *copy_id == id)
            .map(|(_, at)| *at)
            .collect()
    }
}

/// Options beyond the script.
#[derive(Clone, Copy, Default)]
pub struct Style {
    /// Reply to a datagram's frames in reverse order.
    pub reverse: bool,
    /// TCP: write each reply in two parts with a pause between, so acks arrive cut in two.
    pub split_writes: bool,
}

pub struct FakeServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub fn udp(script: impl FnMut(EventId, u32) -> Answer + Send + 'static, style: Style) -> FakeServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind fake udp server");
        socket
            .set_read_timeout(Some(Duration::from_millis(10)))
            .expect("set read timeout");
        let addr = socket.local_addr().expect("local addr");
        FakeServer::spawn(addr, move |log, stop| {
            serve_udp(socket, Box::new(script), style, log, stop)
        })
    }

    pub fn tcp(script: impl FnMut(EventId, u32) -> Answer + Send + 'static, style: Style) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake tcp server");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        FakeServer::spawn(addr, move |log, stop| {
            serve_tcp(listener, Box::new(script), style, log, stop)
        })
    }

    fn spawn(addr: SocketAddr, serve: impl FnOnce(Arc<Mutex<Log>>, Arc<AtomicBool>) + Send + 'static) -> FakeServer {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            std::thread::spawn(move || serve(log, stop))
        };
        FakeServer {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    pub fn log(&self) -> Log {
        self.log.lock().expect("log lock").clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Per-id copy counts, so scripts can answer the n-th copy differently.
struct Copies(std::collections::HashMap<EventId, u32>);

impl Copies {
    fn next(&mut self, id: EventId) -> u32 {
        let count = self.0.entry(id).or_insert(0);
        *count += 1;
        *count
    }
}

/// Splits `bytes` into whole frames, logs each and asks the script; returns the reply chunks and
/// whether the script asked to close.
fn answer_frames(
    bytes: &[u8],
    script: &mut Script,
    copies: &mut Copies,
    log: &Mutex<Log>,
) -> (Vec<Vec<u8>>, bool, usize) {
    let mut chunks = Vec::new();
    let mut offset = 0;
    let mut close = false;
    while let Ok(header) = frame::check(&bytes[offset..]) {
        let whole = &bytes[offset..offset + header.frame_bytes];
        offset += header.frame_bytes;
        let copy = copies.next(header.id);
        {
            let mut log = log.lock().expect("log lock");
            log.copies.push((header.id, Instant::now()));
            log.frames.push(whole.to_vec());
            if frame::parse(whole).is_err() {
                log.bad_frames += 1;
            }
        }
        match script(header.id, copy) {
            Answer::Ack(status) => chunks.push(frame::encode_ack(status, header.id).to_vec()),
            Answer::Silent => {}
            Answer::Raw(raw) => chunks.push(raw),
            Answer::Close => close = true,
        }
    }
    (chunks, close, offset)
}

fn serve_udp(socket: UdpSocket, mut script: Script, style: Style, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>) {
    let mut copies = Copies(Default::default());
    let mut datagram = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((length, source)) = socket.recv_from(&mut datagram) else {
            continue;
        };
        let bytes = &datagram[..length];
        log.lock().expect("log lock").datagrams.push(bytes.to_vec());
        let (mut chunks, _, _) = answer_frames(bytes, &mut script, &mut copies, &log);
        if style.reverse {
            chunks.reverse();
        }
        // All answers to one datagram share one reply datagram, as the real server coalesces.
        let reply: Vec<u8> = chunks.concat();
        if !reply.is_empty() {
            let _ = socket.send_to(&reply, source);
            log.lock().expect("log lock").replies.push(reply.len());
        }
    }
}

fn serve_tcp(listener: TcpListener, mut script: Script, style: Style, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>) {
    let mut copies = Copies(Default::default());
    // One connection at a time is all the client opens; a new one replaces a closed one.
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => continue,
        };
        log.lock().expect("log lock").connections += 1;
        serve_tcp_connection(stream, &mut script, &mut copies, style, &log, &stop);
    }
}

fn serve_tcp_connection(
    mut stream: TcpStream,
    script: &mut Script,
    copies: &mut Copies,
    style: Style,
    log: &Mutex<Log>,
    stop: &AtomicBool,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(10)));
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let length = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(length) => length,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        };
        log.lock().expect("log lock").datagrams.push(buffer[..length].to_vec());
        pending.extend_from_slice(&buffer[..length]);
        let (mut chunks, close, consumed) = answer_frames(&pending, script, copies, log);
        pending.drain(..consumed);
        if close {
            return;
        }
        if style.reverse {
            chunks.reverse();
        }
        let reply: Vec<u8> = chunks.concat();
        if reply.is_empty() {
            continue;
        }
        let written = if style.split_writes {
            // Cut inside an ack, never on a boundary, so the client must reassemble.
            let cut = ACK_BYTES / 2 + 1;
            stream.write_all(&reply[..cut]).is_ok() && {
                std::thread::sleep(Duration::from_millis(5));
                stream.write_all(&reply[cut..]).is_ok()
            }
        } else {
            stream.write_all(&reply).is_ok()
        };
        if !written {
            return;
        }
        log.lock().expect("log lock").replies.push(reply.len());
    }
}

/// A 28-byte ack, for scripts that build raw replies.
pub fn ack(status: Status, id: EventId) -> Vec<u8> {
    frame::encode_ack(status, id).to_vec()
}

/// A client config for tests: the fake server's address, short deterministic waits (no jitter).
pub fn config(server: &FakeServer) -> ClientConfig {
    let mut config = ClientConfig::udp(server.addr);
    config.ack_timeout = Duration::from_millis(30);
    config.backoff_max = Duration::from_secs(1);
    config.jitter_percent = 0;
    config
}

pub fn id(player_id: u64, seq: u64) -> EventId {
    EventId { player_id, seq }
}

pub fn event(player_id: u64, seq: u64, payload: &[u8]) -> Event<'_> {
    Event {
        player_id,
        seq,
        client_time_us: 1_700_000_000_000_000 + seq,
        action_type: 1,
        payload,
    }
}

/// Polls until `count` events resolved; panics after `timeout`.
pub fn resolve(client: &mut Client, count: usize, timeout: Duration) -> Vec<Resolution> {
    let deadline = Instant::now() + timeout;
    let mut resolved = Vec::new();
    while resolved.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} events resolved within {timeout:?}: {resolved:?}",
            resolved.len()
        );
        client.poll_into(Duration::from_millis(20), &mut resolved);
    }
    resolved
}

/// Gaps between consecutive instants.
pub fn gaps(instants: &[Instant]) -> Vec<Duration> {
    instants.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

pub fn hex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "hex text has an odd length");
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&text[index..index + 2], 16).expect("valid hex"))
        .collect()
}
