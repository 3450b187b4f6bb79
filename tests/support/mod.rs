//! Shared end-to-end harness: a private `redis-server`, the `shardgate` binary, UDP/TCP
//! clients that speak the wire protocol, a resend-until-answered delivery loop, a steady
//! background sender, and strict readers of what landed in Redis.
//!
//! Everything here is bounded in time and count, and talks only to 127.0.0.1.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use nix::sys::signal::Signal;
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shardgate::wire::frame;

/// `(player_id, seq)`: an event id.
pub type Key = (u64, u64);

// ---------------------------------------------------------------------------------------
// seeds, ports, time
// ---------------------------------------------------------------------------------------

/// The seed for a randomized test: `SHARDGATE_TEST_SEED` if set, else fresh. Printed so that
/// a failing run (whose captured stdout is shown) can be replayed.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("SHARDGATE_TEST_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("SHARDGATE_TEST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    println!("{test}: seed {seed} (replay with SHARDGATE_TEST_SEED={seed})");
    seed
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn send_signal(pid: u32, sig: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), sig)
}

// ---------------------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------------------

/// A private `redis-server` on a loopback port, with its data dir in a temp dir.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    aof: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Plain in-memory Redis (no AOF, no RDB).
    pub fn start() -> RedisServer {
        Self::launch(None, false)
    }

    /// Redis with `--appendonly yes --appendfsync always`: what it acknowledged survives SIGKILL.
    pub fn start_with_aof() -> RedisServer {
        Self::launch(None, true)
    }

    /// Plain Redis on a given port (e.g. one a shardgate was already pointed at).
    pub fn start_on_port(port: u16) -> RedisServer {
        Self::launch(Some(port), false)
    }

    fn launch(port: Option<u16>, aof: bool) -> RedisServer {
        match Command::new("redis-server").arg("--version").output() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                panic!("redis-server not found: apt-get install redis-server")
            }
            Err(e) => panic!("cannot run redis-server --version: {e}"),
        }
        let dir = tempfile::Builder::new()
            .prefix("sg-redis-")
            .tempdir()
            .expect("tempdir for redis");
        let mut server = RedisServer {
            child: None,
            port: 0,
            aof,
            dir,
        };
        for _attempt in 0..5 {
            server.port = port.unwrap_or_else(free_port);
            let mut child = server.spawn_child();
            if wait_redis_ready(&mut child, server.port, Duration::from_secs(5)) {
                server.child = Some(child);
                return server;
            }
            let _ = child.kill();
            let _ = child.wait();
            if port.is_some() {
                thread::sleep(Duration::from_millis(200));
            }
        }
        panic!(
            "redis-server did not come up (port {}); log:\n{}",
            server.port,
            server.log()
        );
    }

    fn spawn_child(&self) -> Child {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open redis log");
        let log2 = log.try_clone().expect("clone log fd");
        let port = self.port.to_string();
        let dir = self.dir.path().to_str().expect("utf-8 tempdir").to_string();
        Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir])
            .args(["--save", "", "--daemonize", "no"])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn redis-server")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// redis-server's own output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis is not running").id()
    }

    /// A fresh sync connection (2 s connect timeout, 10 s read timeout).
    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("redis url");
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to test redis on {}: {e}", self.port));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        conn
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = send_signal(child.id(), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port and dir (so an AOF is reloaded); waits for PING.
    pub fn restart(&mut self) {
        self.kill();
        for _attempt in 0..5 {
            let mut child = self.spawn_child();
            if wait_redis_ready(&mut child, self.port, Duration::from_secs(10)) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "redis-server did not restart on port {}; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// SIGSTOP: connections stay open but nothing is answered.
    pub fn pause(&self) {
        send_signal(self.pid(), Signal::SIGSTOP).expect("SIGSTOP redis");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        send_signal(self.pid(), Signal::SIGCONT).expect("SIGCONT redis");
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait redis").is_none(),
            None => false,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// PING through the real client: true once Redis answers PONG (not LOADING).
pub fn redis_ping(port: u16, timeout: Duration) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(timeout) else {
        return false;
    };
    if conn.set_read_timeout(Some(timeout)).is_err() {
        return false;
    }
    matches!(redis::cmd("PING").query::<String>(&mut conn), Ok(s) if s == "PONG")
}

fn wait_redis_ready(child: &mut Child, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if redis_ping(port, Duration::from_millis(250)) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

// ---------------------------------------------------------------------------------------
// shardgate process
// ---------------------------------------------------------------------------------------

/// Builds the `shardgate serve ...` command line; defaults can be replaced or removed.
pub struct ServerBuilder {
    flags: Vec<(String, Option<String>)>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl ServerBuilder {
    /// Defaults: `--cores 0 --udp 127.0.0.1:0 --tcp 127.0.0.1:0 --redis URL
    /// --hdr-out <tempdir>/latency.hgrm --batch-linger-us 200`.
    pub fn new(redis_url: &str) -> ServerBuilder {
        let dir = tempfile::Builder::new()
            .prefix("sg-server-")
            .tempdir()
            .expect("tempdir for server");
        let hdr = dir.path().join("latency.hgrm");
        let mut b = ServerBuilder {
            flags: Vec::new(),
            extra: Vec::new(),
            dir,
        };
        b = b
            .arg("--cores", "0")
            .arg("--udp", "127.0.0.1:0")
            .arg("--tcp", "127.0.0.1:0")
            .arg("--redis", redis_url)
            .arg("--hdr-out", hdr.to_str().expect("utf-8 path"))
            .arg("--batch-linger-us", "200");
        b
    }

    /// Sets (or replaces) `flag value`.
    pub fn arg(mut self, flag: &str, value: impl ToString) -> ServerBuilder {
        let value = Some(value.to_string());
        match self.flags.iter_mut().find(|(f, _)| f == flag) {
            Some(slot) => slot.1 = value,
            None => self.flags.push((flag.to_string(), value)),
        }
        self
    }

    pub fn cores(self, cores: &str) -> ServerBuilder {
        self.arg("--cores", cores)
    }

    /// Removes a default flag.
    pub fn without(mut self, flag: &str) -> ServerBuilder {
        self.flags.retain(|(f, _)| f != flag);
        self
    }

    /// Appends raw arguments after the flags.
    pub fn extra(mut self, args: &[&str]) -> ServerBuilder {
        self.extra.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// A path inside the server's temp dir (for config files and the like).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["serve".to_string()];
        for (flag, value) in &self.flags {
            args.push(flag.clone());
            if let Some(v) = value {
                args.push(v.clone());
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    fn hdr_path(&self) -> PathBuf {
        match self.flags.iter().find(|(f, _)| f == "--hdr-out") {
            Some((_, Some(v))) => PathBuf::from(v),
            _ => self.dir.path().join("latency.hgrm"),
        }
    }

    /// Spawns and waits (20 s at most) for `shardgate: serving ...`.
    pub fn start(self) -> Server {
        let args = self.args();
        let hdr_path = self.hdr_path();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardgate");
        let pid = child.id();
        println!("started shardgate pid {pid}: {}", args.join(" "));
        let stderr_lines = Arc::new(Mutex::new(Vec::new()));
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            spawn_line_reader(
                child.stderr.take().expect("stderr"),
                stderr_lines.clone(),
                format!("[shardgate {pid} stderr]"),
            ),
            spawn_line_reader(
                child.stdout.take().expect("stdout"),
                stdout_lines.clone(),
                format!("[shardgate {pid} stdout]"),
            ),
        ];
        let mut server = Server {
            child,
            args,
            stderr_lines,
            stdout_lines,
            readers,
            udp: "0.0.0.0:0".parse().expect("addr"),
            tcp: "0.0.0.0:0".parse().expect("addr"),
            shards: 0,
            hdr_path,
            exit: None,
            _dir: self.dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = server
                .stderr_lines()
                .into_iter()
                .find(|l| l.starts_with("shardgate: serving"))
            {
                server.parse_serving_line(&line);
                return server;
            }
            if let Some(status) = server.child.try_wait().expect("try_wait") {
                server.join_readers(Duration::from_secs(2));
                panic!(
                    "shardgate exited with {status} before serving; args: {}\nstderr:\n{}",
                    server.args.join(" "),
                    server.stderr_lines().join("\n")
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "shardgate printed no serving line within 20 s; args: {}\nstderr:\n{}",
                    server.args.join(" "),
                    server.stderr_lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn spawn_line_reader<R: Read + Send + 'static>(pipe: R, sink: Arc<Mutex<Vec<String>>>, tag: String) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                    eprintln!("{tag} {line}");
                    sink.lock().expect("lines lock").push(line);
                }
            }
        }
    })
}

/// A running `shardgate serve`. Drop kills it.
pub struct Server {
    child: Child,
    args: Vec<String>,
    stderr_lines: Arc<Mutex<Vec<String>>>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    udp: SocketAddr,
    tcp: SocketAddr,
    shards: usize,
    hdr_path: PathBuf,
    exit: Option<ExitStatus>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn builder(redis_url: &str) -> ServerBuilder {
        ServerBuilder::new(redis_url)
    }

    fn parse_serving_line(&mut self, line: &str) {
        for token in line.split_whitespace() {
            if let Some(v) = token.strip_prefix("udp=") {
                self.udp = v.parse().unwrap_or_else(|e| panic!("bad udp= in {line:?}: {e}"));
            } else if let Some(v) = token.strip_prefix("tcp=") {
                self.tcp = v.parse().unwrap_or_else(|e| panic!("bad tcp= in {line:?}: {e}"));
            } else if let Some(v) = token.strip_prefix("shards=") {
                self.shards = v.parse().unwrap_or_else(|e| panic!("bad shards= in {line:?}: {e}"));
            }
        }
        assert!(
            self.udp.port() != 0 && self.tcp.port() != 0 && self.shards > 0,
            "serving line lacks shards=/udp=/tcp=: {line:?}"
        );
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn hdr_path(&self) -> &Path {
        &self.hdr_path
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr_lines.lock().expect("lines lock").clone()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().expect("lines lock").clone()
    }

    pub fn signal(&self, sig: Signal) {
        send_signal(self.child.id(), sig).unwrap_or_else(|e| panic!("send {sig} to shardgate: {e}"));
    }

    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// Still running?
    pub fn is_alive(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait") {
            Some(status) => {
                self.exit = Some(status);
                false
            }
            None => true,
        }
    }

    /// Waits for exit; on timeout SIGKILLs it and panics.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit = Some(status);
                self.join_readers(Duration::from_secs(2));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.join_readers(Duration::from_secs(2));
                panic!(
                    "shardgate did not exit within {timeout:?} (killed); stderr:\n{}",
                    self.stderr_lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn join_readers(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.readers.iter().any(|h| !h.is_finished()) {
            thread::sleep(Duration::from_millis(5));
        }
        for h in std::mem::take(&mut self.readers) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Output of a `shardgate` run that is expected to exit by itself.
#[derive(Debug)]
pub struct CliRun {
    /// `None` when it did not exit within the timeout (it was killed then).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// Runs `shardgate ARGS` to completion, bounded by `timeout` (killed after it).
pub fn run_cli(args: &[&str], timeout: Duration) -> CliRun {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardgate");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let run = CliRun {
        status,
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    };
    println!(
        "shardgate {} -> {:?}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        run.status,
        run.stdout,
        run.stderr
    );
    run
}

// ---------------------------------------------------------------------------------------
// events, frames, acks
// ---------------------------------------------------------------------------------------

/// One game action event as a client would send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub player: u64,
    pub seq: u64,
    pub client_time_us: u64,
    pub action_type: u16,
    pub payload: Vec<u8>,
}

impl Event {
    pub fn new(player: u64, seq: u64, payload: &[u8]) -> Event {
        Event {
            player,
            seq,
            client_time_us: unix_us(),
            action_type: (seq % 50) as u16,
            payload: payload.to_vec(),
        }
    }

    /// Random type, time and payload (0..=max_payload bytes, any byte values).
    pub fn random(rng: &mut StdRng, player: u64, seq: u64, max_payload: usize) -> Event {
        let len = match rng.gen_range(0..10) {
            0 => 0,
            1 => max_payload,
            _ => rng.gen_range(0..=max_payload),
        };
        let mut payload = vec![0u8; len];
        rng.fill(&mut payload[..]);
        let client_time_us = match rng.gen_range(0..8) {
            0 => 0,
            1 => u64::MAX,
            2 => rng.gen(),
            _ => unix_us(),
        };
        let action_type = match rng.gen_range(0..8) {
            0 => 0,
            1 => u16::MAX,
            _ => rng.gen(),
        };
        Event {
            player,
            seq,
            client_time_us,
            action_type,
            payload,
        }
    }

    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }

    /// Appends the ACTION frame (through the crate's codec).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        frame::encode_action(
            &frame::ActionFields {
                id: frame::EventId {
                    player_id: self.player,
                    seq: self.seq,
                },
                client_time_us: self.client_time_us,
                action_type: self.action_type,
                payload: &self.payload,
            },
            out,
        );
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.payload.len());
        self.encode_into(&mut v);
        v
    }

    pub fn raw(&self) -> RawFrame {
        RawFrame::from_event(self)
    }
}

/// A frame built byte by byte from the protocol table (independent of the crate's codec),
/// so tests can make every kind of malformed frame.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub magic: [u8; 2],
    pub version: u8,
    pub kind: u8,
    pub flags: u8,
    pub reserved5: u8,
    /// `None`: the payload's real length.
    pub payload_len: Option<u16>,
    pub player: u64,
    pub seq: u64,
    pub client_time_us: u64,
    pub action_type: u16,
    pub reserved34: u16,
    pub payload: Vec<u8>,
    pub auth_tag: Option<[u8; 16]>,
    /// XORed into the correct crc (0 = valid crc).
    pub crc_xor: u32,
}

impl RawFrame {
    pub fn from_event(e: &Event) -> RawFrame {
        RawFrame {
            magic: *b"SG",
            version: 1,
            kind: 1,
            flags: 0,
            reserved5: 0,
            payload_len: None,
            player: e.player,
            seq: e.seq,
            client_time_us: e.client_time_us,
            action_type: e.action_type,
            reserved34: 0,
            payload: e.payload.clone(),
            auth_tag: None,
            crc_xor: 0,
        }
    }

    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(60 + self.payload.len());
        v.extend_from_slice(&self.magic);
        v.push(self.version);
        v.push(self.kind);
        v.push(self.flags);
        v.push(self.reserved5);
        let len = self.payload_len.unwrap_or(self.payload.len() as u16);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&self.player.to_le_bytes());
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.client_time_us.to_le_bytes());
        v.extend_from_slice(&self.action_type.to_le_bytes());
        v.extend_from_slice(&self.reserved34.to_le_bytes());
        v.extend_from_slice(&self.payload);
        if let Some(tag) = &self.auth_tag {
            v.extend_from_slice(tag);
        }
        let crc = shardgate::wire::frame::crc(&v) ^ self.crc_xor;
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }
}

/// An ack status (mirror of `frame::Status`, hashable and printable here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum St {
    Accepted,
    Duplicate,
    Retry,
    Rejected,
}

impl St {
    /// ACCEPTED or DUPLICATE: the event is durably stored.
    pub fn is_stored(self) -> bool {
        matches!(self, St::Accepted | St::Duplicate)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckMsg {
    pub status: St,
    pub player: u64,
    pub seq: u64,
}

impl AckMsg {
    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }
}

/// Splits a reply (UDP datagram or TCP bytes) into 28-byte acks; panics on anything the
/// codec does not accept as an ack (a server bug).
pub fn parse_acks(bytes: &[u8]) -> Vec<AckMsg> {
    assert!(
        bytes.len() % frame::ACK_BYTES == 0,
        "ack bytes of length {} are not a multiple of {}: {}",
        bytes.len(),
        frame::ACK_BYTES,
        hex(&bytes[..bytes.len().min(120)])
    );
    bytes
        .chunks(frame::ACK_BYTES)
        .map(|chunk| {
            let ack =
                frame::decode_ack(chunk).unwrap_or_else(|e| panic!("server sent an invalid ack ({e}): {}", hex(chunk)));
            AckMsg {
                status: match ack.status {
                    frame::Status::Accepted => St::Accepted,
                    frame::Status::Duplicate => St::Duplicate,
                    frame::Status::Retry => St::Retry,
                    frame::Status::Rejected => St::Rejected,
                },
                player: ack.id.player_id,
                seq: ack.id.seq,
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub accepted: usize,
    pub duplicate: usize,
    pub retry: usize,
    pub rejected: usize,
}

impl StatusCounts {
    pub fn add(&mut self, st: St) {
        match st {
            St::Accepted => self.accepted += 1,
            St::Duplicate => self.duplicate += 1,
            St::Retry => self.retry += 1,
            St::Rejected => self.rejected += 1,
        }
    }

    pub fn merge(&mut self, o: &StatusCounts) {
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.retry += o.retry;
        self.rejected += o.rejected;
    }

    pub fn total(&self) -> usize {
        self.accepted + self.duplicate + self.retry + self.rejected
    }
}

// ---------------------------------------------------------------------------------------
// clients
// ---------------------------------------------------------------------------------------

fn set_rcvbuf(fd: i32, bytes: i32) {
    // SAFETY: plain setsockopt on a socket fd we own, with a properly sized int.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// A UDP client on its own ephemeral loopback port.
pub struct UdpClient {
    sock: UdpSocket,
    server: SocketAddr,
    /// datagrams that came from another address than the server's
    pub foreign_datagrams: usize,
}

impl UdpClient {
    pub fn new(server: SocketAddr) -> UdpClient {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp client");
        sock.set_read_timeout(Some(Duration::from_millis(5)))
            .expect("udp read timeout");
        set_rcvbuf(sock.as_raw_fd(), 4 << 20);
        UdpClient {
            sock,
            server,
            foreign_datagrams: 0,
        }
    }

    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().expect("local addr").port()
    }

    /// One datagram.
    pub fn send_frames(&self, bytes: &[u8]) {
        // A loopback send can fail only transiently (ENOBUFS); the caller's resend covers it.
        let _ = self.sock.send_to(bytes, self.server);
    }

    /// One receive attempt (about 5 ms at most): the acks of one datagram, if any.
    pub fn try_recv(&mut self) -> Vec<AckMsg> {
        let mut buf = [0u8; 65536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if from.port() != self.server.port() {
                    self.foreign_datagrams += 1;
                    return Vec::new();
                }
                parse_acks(&buf[..n])
            }
            Err(_) => Vec::new(),
        }
    }

    /// Every ack that arrives until `deadline`.
    pub fn recv_acks(&mut self, deadline: Instant) -> Vec<AckMsg> {
        self.recv_acks_until(deadline, usize::MAX)
    }

    /// Acks until `want` arrived or `deadline` passed.
    pub fn recv_acks_until(&mut self, deadline: Instant, want: usize) -> Vec<AckMsg> {
        let mut acks = Vec::new();
        while acks.len() < want && Instant::now() < deadline {
            acks.extend(self.try_recv());
        }
        acks
    }

    /// Datagrams the kernel dropped at this socket (full receive buffer): lost acks.
    pub fn drops(&self) -> u64 {
        udp_socket_drops(self.local_port()).unwrap_or(0)
    }
}

/// Per-socket drop counter from /proc/net/udp for a socket bound to 127.0.0.1:port (summed
/// over every such socket, e.g. all of a server's SO_REUSEPORT shards).
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!("0100007F:{port:04X}");
    let mut found = None;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() >= 13 && cols[1] == want {
            let drops: u64 = cols[cols.len() - 1].parse().ok()?;
            found = Some(found.unwrap_or(0) + drops);
        }
    }
    found
}

/// A TCP client; reassembles 28-byte acks across reads.
pub struct TcpClient {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl TcpClient {
    pub fn connect(addr: SocketAddr) -> io::Result<TcpClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(TcpClient {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes `bytes` in chunks cut at random offsets (each chunk its own segment).
    pub fn send_split(&mut self, bytes: &[u8], rng: &mut StdRng) -> io::Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            let max = match rng.gen_range(0..4) {
                0 => 8,
                1 => 64,
                2 => 700,
                _ => 4096,
            };
            let n = rng.gen_range(1..=max).min(rest.len());
            self.stream.write_all(&rest[..n])?;
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Has the server closed the connection (EOF or reset seen)?
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// One read attempt (about 5 ms at most).
    pub fn poll_acks(&mut self) -> Vec<AckMsg> {
        if self.closed {
            return Vec::new();
        }
        let mut tmp = [0u8; 16384];
        match self.stream.read(&mut tmp) {
            Ok(0) => self.closed = true,
            Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.closed = true,
        }
        let whole = self.buf.len() / frame::ACK_BYTES * frame::ACK_BYTES;
        let acks = parse_acks(&self.buf[..whole]);
        self.buf.drain(..whole);
        acks
    }

    pub fn recv_acks(&mut self, deadline: Instant) -> Vec<AckMsg> {
        self.recv_acks_until(deadline, usize::MAX)
    }

    pub fn recv_acks_until(&mut self, deadline: Instant, want: usize) -> Vec<AckMsg> {
        let mut acks = Vec::new();
        while acks.len() < want && !self.closed && Instant::now() < deadline {
            acks.extend(self.poll_acks());
        }
        acks
    }

    /// Reads until the server closes the connection or `deadline`; returns (closed, acks
    /// that arrived meanwhile).
    pub fn wait_closed(&mut self, deadline: Instant) -> (bool, Vec<AckMsg>) {
        let acks = self.recv_acks(deadline);
        (self.closed, acks)
    }

    /// Bytes received that do not (yet) form a whole ack.
    pub fn partial_bytes(&self) -> usize {
        self.buf.len()
    }
}

// ---------------------------------------------------------------------------------------
// deliver_all: resend until every copy is answered ACCEPTED or DUPLICATE
// ---------------------------------------------------------------------------------------

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

fn backoff(opts: &DeliverOpts, attempt: u32, rng: &mut StdRng) -> Duration {
    let exp = opts
        .backoff_base
        .saturating_mul(1u32 << attempt.min(10))
        .min(opts.backoff_max);
    exp / 2 + exp.mul_f64(rng.gen::<f64>() / 2.0)
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

// ---------------------------------------------------------------------------------------
// Firehose: a steady background stream of fresh events (plus duplicates), no resends
// ---------------------------------------------------------------------------------------

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

    /// Events generated so far.
    pub fn events_so_far(&self) -> usize {
        self.shared.events.lock().expect("lock").len()
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

// ---------------------------------------------------------------------------------------
// Redis contents
// ---------------------------------------------------------------------------------------

/// One stream entry, strictly parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub player: u64,
    pub seq: u64,
    pub action_type: u16,
    pub client_time_us: u64,
    pub recv_us: u64,
    pub payload: Vec<u8>,
    pub partition: u64,
    pub stream_key: String,
    pub entry_id: String,
}

impl StoredEvent {
    pub fn key(&self) -> Key {
        (self.player, self.seq)
    }
}

fn bulk(v: &redis::Value, what: &str) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b.clone(),
        redis::Value::SimpleString(s) => s.as_bytes().to_vec(),
        other => panic!("{what}: expected a bulk string, got {other:?}"),
    }
}

fn decimal<T: std::str::FromStr>(bytes: &[u8], what: &str) -> T {
    let s = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("{what}: not UTF-8: {}", hex(bytes)));
    assert!(
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0')),
        "{what}: not canonical decimal ASCII: {s:?}"
    );
    s.parse().unwrap_or_else(|_| panic!("{what}: out of range: {s:?}"))
}

/// Every entry of `<prefix>:{p}:events` for p in 0..partitions (XRANGE - +, paged).
/// Panics on an entry whose fields are not exactly player, seq, type, ts, recv_us, payload.
pub fn read_events(conn: &mut redis::Connection, prefix: &str, partitions: u64) -> Vec<StoredEvent> {
    let mut out = Vec::new();
    for p in 0..partitions {
        let key = format!("{prefix}:{{{p}}}:events");
        let mut start = "-".to_string();
        loop {
            let v: redis::Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query(conn)
                .unwrap_or_else(|e| panic!("XRANGE {key}: {e}"));
            let redis::Value::Array(entries) = v else {
                panic!("XRANGE {key}: expected an array, got {v:?}");
            };
            if entries.is_empty() {
                break;
            }
            for entry in &entries {
                let (id, ev) = parse_entry(entry, &key, p);
                start = format!("({id}");
                out.push(ev);
            }
            if entries.len() < 1000 {
                break;
            }
        }
    }
    out
}

fn parse_entry(entry: &redis::Value, key: &str, partition: u64) -> (String, StoredEvent) {
    let redis::Value::Array(parts) = entry else {
        panic!("{key}: entry is not an array: {entry:?}");
    };
    assert_eq!(parts.len(), 2, "{key}: entry is not [id, fields]: {entry:?}");
    let id = String::from_utf8(bulk(&parts[0], "entry id")).expect("utf-8 id");
    let redis::Value::Array(fields) = &parts[1] else {
        panic!("{key} {id}: fields are not an array: {:?}", parts[1]);
    };
    assert!(fields.len() % 2 == 0, "{key} {id}: odd field list");
    let mut map: HashMap<String, Vec<u8>> = HashMap::new();
    for pair in fields.chunks(2) {
        let name = String::from_utf8(bulk(&pair[0], "field name")).expect("utf-8 field name");
        let value = bulk(&pair[1], &name);
        assert!(
            map.insert(name.clone(), value).is_none(),
            "{key} {id}: field {name:?} appears twice"
        );
    }
    let mut names: Vec<&str> = map.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["payload", "player", "recv_us", "seq", "ts", "type"],
        "{key} {id}: the entry's fields are not exactly player, seq, type, ts, recv_us, payload"
    );
    let ctx = |f: &str| format!("{key} {id} field {f}");
    let ev = StoredEvent {
        player: decimal(&map["player"], &ctx("player")),
        seq: decimal(&map["seq"], &ctx("seq")),
        action_type: decimal(&map["type"], &ctx("type")),
        client_time_us: decimal(&map["ts"], &ctx("ts")),
        recv_us: decimal(&map["recv_us"], &ctx("recv_us")),
        payload: map["payload"].clone(),
        partition,
        stream_key: key.to_string(),
        entry_id: id.clone(),
    };
    (id, ev)
}

/// Every key of type stream in the database.
pub fn stream_keys(conn: &mut redis::Connection) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    for _ in 0..100_000 {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream")
            .query(conn)
            .expect("SCAN TYPE stream");
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Checks what landed in Redis against what was sent:
/// - no event id is stored twice;
/// - every stored event is one of `sent`, with exactly its type, ts and payload, in partition
///   `player % partitions`, and (when given) a recv_us inside `recv_window`;
/// - every id in `must_have` is stored.
///
/// Returns the set of stored ids.
pub fn check_stored(
    stored: &[StoredEvent],
    sent: &[Event],
    must_have: &HashSet<Key>,
    partitions: u64,
    recv_window: Option<(u64, u64)>,
    ctx: &str,
) -> HashSet<Key> {
    let by_key: HashMap<Key, &Event> = sent.iter().map(|e| (e.key(), e)).collect();
    let mut seen: HashMap<Key, Vec<&StoredEvent>> = HashMap::new();
    for s in stored {
        seen.entry(s.key()).or_default().push(s);
    }
    let mut twice: Vec<_> = seen
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| {
            (
                *k,
                v.iter()
                    .map(|s| format!("{} {}", s.stream_key, s.entry_id))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    twice.sort();
    assert!(
        twice.is_empty(),
        "{ctx}: {} event ids are stored more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    for s in stored {
        let Some(e) = by_key.get(&s.key()) else {
            panic!(
                "{ctx}: stored event {:?} was never sent as a valid frame ({} {})",
                s.key(),
                s.stream_key,
                s.entry_id
            );
        };
        assert_eq!(
            s.partition,
            s.player % partitions,
            "{ctx}: event {:?} is in {}, not partition player % {partitions}",
            s.key(),
            s.stream_key
        );
        assert_eq!(s.action_type, e.action_type, "{ctx}: type of {:?}", s.key());
        assert_eq!(s.client_time_us, e.client_time_us, "{ctx}: ts of {:?}", s.key());
        assert!(
            s.payload == e.payload,
            "{ctx}: payload of {:?} differs: stored {} bytes {}.., sent {} bytes {}..",
            s.key(),
            s.payload.len(),
            hex(&s.payload[..s.payload.len().min(32)]),
            e.payload.len(),
            hex(&e.payload[..e.payload.len().min(32)])
        );
        if let Some((lo, hi)) = recv_window {
            assert!(
                (lo..=hi).contains(&s.recv_us),
                "{ctx}: recv_us {} of {:?} is outside the test's run [{lo}, {hi}]",
                s.recv_us,
                s.key()
            );
        }
    }
    let stored_keys: HashSet<Key> = seen.keys().copied().collect();
    let mut missing: Vec<Key> = must_have.difference(&stored_keys).copied().collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{ctx}: {} event ids that must be stored are not in Redis, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    stored_keys
}

// ---------------------------------------------------------------------------------------
// HDR percentile-distribution files
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct HdrSummary {
    pub rows: usize,
    pub total_count: u64,
    pub max: f64,
}

/// Parses HdrHistogram's percentile-distribution text: a header line
/// `Value Percentile TotalCount 1/(1-Percentile)`, rows of those numbers (the last column may
/// be missing or `inf` on the 100 % row), and a `#[Max = ..., Total count = ...]` footer.
pub fn parse_hdr_percentiles(text: &str) -> Result<HdrSummary, String> {
    let mut header = false;
    let mut rows = 0usize;
    let mut last: Option<(f64, f64, u64)> = None;
    let mut max = None;
    let mut footer_total = None;
    for (no, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if let Some(body) = t.strip_prefix("#[") {
            let body = body.trim_end_matches(']');
            for part in body.split(',') {
                let mut kv = part.splitn(2, '=');
                let k = kv.next().unwrap_or("").trim();
                let v = kv.next().unwrap_or("").trim();
                match k {
                    "Max" => {
                        max = Some(
                            v.parse::<f64>()
                                .map_err(|e| format!("line {}: Max {v:?}: {e}", no + 1))?,
                        )
                    }
                    "Total count" => {
                        footer_total = Some(
                            v.parse::<u64>()
                                .map_err(|e| format!("line {}: Total count {v:?}: {e}", no + 1))?,
                        )
                    }
                    _ => {}
                }
            }
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        if t.contains("Value") && t.contains("Percentile") {
            if !t.contains("TotalCount") {
                return Err(format!("line {}: header without TotalCount: {t:?}", no + 1));
            }
            header = true;
            continue;
        }
        if !header {
            return Err(format!("line {}: data before the header: {t:?}", no + 1));
        }
        let cols: Vec<&str> = t.split_whitespace().collect();
        if !(3..=4).contains(&cols.len()) {
            return Err(format!("line {}: expected 3 or 4 columns: {t:?}", no + 1));
        }
        let value: f64 = cols[0]
            .parse()
            .map_err(|e| format!("line {}: value {:?}: {e}", no + 1, cols[0]))?;
        let pct: f64 = cols[1]
            .parse()
            .map_err(|e| format!("line {}: percentile {:?}: {e}", no + 1, cols[1]))?;
        let count: u64 = cols[2]
            .parse()
            .map_err(|e| format!("line {}: count {:?}: {e}", no + 1, cols[2]))?;
        if let Some(c) = cols.get(3) {
            let lc = c.to_ascii_lowercase();
            if lc != "inf" && lc != "infinity" {
                c.parse::<f64>()
                    .map_err(|e| format!("line {}: 1/(1-p) {c:?}: {e}", no + 1))?;
            }
        }
        if !(0.0..=1.0).contains(&pct) {
            return Err(format!("line {}: percentile {pct} outside [0, 1]", no + 1));
        }
        if let Some((v0, p0, c0)) = last {
            if value < v0 || pct < p0 || count < c0 {
                return Err(format!("line {}: not monotonic: {t:?}", no + 1));
            }
        }
        last = Some((value, pct, count));
        rows += 1;
    }
    if !header {
        return Err("no `Value Percentile TotalCount 1/(1-Percentile)` header".into());
    }
    let max = max.ok_or("no `#[Max = ...` footer")?;
    let total_count = match (footer_total, last) {
        (Some(t), Some((_, _, c))) if t != c => return Err(format!("footer total count {t} != last row's count {c}")),
        (Some(t), _) => t,
        (None, Some((_, _, c))) => c,
        (None, None) => 0,
    };
    Ok(HdrSummary { rows, total_count, max })
}

// ---------------------------------------------------------------------------------------
// misc
// ---------------------------------------------------------------------------------------

/// `n` distinct random events (ids unique, drawn from the whole u64 range, edge ids included).
pub fn random_events(rng: &mut StdRng, n: usize, max_payload: usize) -> Vec<Event> {
    let mut ids = HashSet::new();
    let mut out = Vec::with_capacity(n);
    let edge = [(0, 0), (u64::MAX, u64::MAX), (0, u64::MAX), (u64::MAX, 0)];
    for &(p, s) in edge.iter().take(n) {
        ids.insert((p, s));
        out.push(Event::random(rng, p, s, max_payload));
    }
    while out.len() < n {
        let player = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..64),
            _ => rng.gen(),
        };
        let seq = match rng.gen_range(0..2) {
            0 => rng.gen_range(0..10_000),
            _ => rng.gen(),
        };
        if ids.insert((player, seq)) {
            out.push(Event::random(rng, player, seq, max_payload));
        }
    }
    out.shuffle(rng);
    out
}

/// Picks `n` random bytes that do not start with the magic `SG`.
pub fn random_garbage(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    if v.len() >= 2 && v[0] == b'S' && v[1] == b'G' {
        v[0] = b'X';
    }
    v
}

// ---------------------------------------------------------------------------------------
// fixed ports that survive restarts (tests/e2e_chaos.rs)
// ---------------------------------------------------------------------------------------

impl RedisServer {
    /// Redis with `--appendonly yes --appendfsync always` on a given port.
    pub fn start_with_aof_on_port(port: u16) -> RedisServer {
        Self::launch(Some(port), true)
    }
}

/// A loopback port below the kernel's ephemeral range (`ip_local_port_range`; above it if
/// the range starts too low) that was free for both TCP and UDP a moment ago.
///
/// For a server that a test stops and starts again on the same port: while nothing listens
/// on an ephemeral port, a client's `connect()` to it may pick that very port as its own
/// source and connect to itself (TCP simultaneous open), which then holds the port and
/// swallows the client's frames. A port outside the range is never a source port.
pub fn free_port_outside_ephemeral() -> u16 {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let range = if lo > 11_000 {
        10_000..lo
    } else {
        assert!(hi < 64_000, "no port outside the ephemeral range {lo}-{hi}");
        hi + 1..u16::MAX
    };
    let mut rng = rand::thread_rng();
    for _attempt in 0..500 {
        let port = rng.gen_range(range.clone());
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {range:?}");
}

// ---------------------------------------------------------------------------------------
// abuse limits: other loopback sources, /metrics samples, resident memory
// ---------------------------------------------------------------------------------------

/// A UDP socket on `ip` (any 127.x.y.z is local on Linux), so a test can be several sources.
pub fn udp_socket_from(ip: [u8; 4]) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap_or_else(|e| panic!("bind udp {ip:?}: {e}"));
    set_rcvbuf(socket.as_raw_fd(), 4 << 20);
    socket
}

/// A TCP connection to `server` from `ip` (another loopback source), with short read and
/// write timeouts.
pub fn tcp_connect_from(ip: [u8; 4], server: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((ip, 0)).into())?;
    socket.connect_timeout(&server.into(), Duration::from_secs(2))?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// The `/metrics` address from the serving line (`metrics="127.0.0.1:PORT"`).
pub fn serving_metrics_address(server: &Server) -> SocketAddr {
    let lines = server.stderr_lines();
    let serving = lines
        .iter()
        .find(|line| line.starts_with("shardgate: serving"))
        .expect("the harness saw the serving line");
    let value = serving
        .split_whitespace()
        .find_map(|token| token.strip_prefix("metrics="))
        .unwrap_or_else(|| panic!("no metrics= in {serving:?}"));
    value
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("metrics={value} in {serving:?}: {e}"))
}

/// The body of one `GET /metrics`.
pub fn scrape_metrics(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to /metrics at {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("send GET");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read /metrics");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_string()
}

/// The sum of every sample named `name` whose labels include each `key="value"` of
/// `filter` (Prometheus text format, as /metrics serves it).
pub fn metric_sum(body: &str, name: &str, filter: &[(&str, &str)]) -> u64 {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (sample_name, labels) = series.split_once('{').unwrap_or((series, ""));
            let wanted = sample_name == name
                && filter
                    .iter()
                    .all(|(key, value)| labels.contains(&format!("{key}=\"{value}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

/// Resident memory of process `pid` (VmRSS), in bytes.
pub fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

impl Server {
    /// After the process exited: waits (up to `timeout`) until its stdout and stderr have been
    /// read to the end. [`Server::is_alive`] records the exit without this, so the last lines
    /// (the `shardgate: stopped` summary, a panic message) may not be in `stderr_lines` yet.
    pub fn wait_output(&mut self, timeout: Duration) {
        self.join_readers(timeout);
    }
}
