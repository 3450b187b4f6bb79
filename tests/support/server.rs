//! The `shardgate` process: a `serve` started and watched until it exits, and runs of the CLI.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::basics::send_signal;
use super::Signal;

/// Builds the `shardgate serve ...` command line; defaults can be replaced or removed.
pub struct ServerBuilder {
    flags: Vec<(String, Option<String>)>,
    extra: Vec<String>,
    launcher: Vec<String>,
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
            launcher: Vec::new(),
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

    /// Starts the binary through `launcher` (e.g. `ip netns exec NS`), which must exec it, so
    /// that the child's pid (signals, `kill -9`) is shardgate's.
    pub fn launched_by(mut self, launcher: &[&str]) -> ServerBuilder {
        self.launcher = launcher.iter().map(|s| s.to_string()).collect();
        self
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
        let binary = env!("CARGO_BIN_EXE_shardgate");
        let mut command = match self.launcher.split_first() {
            Some((launcher, launcher_args)) => {
                let mut command = Command::new(launcher);
                command.args(launcher_args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardgate");
        let pid = child.id();
        println!(
            "started shardgate pid {pid}: {} {}",
            self.launcher.join(" "),
            args.join(" ")
        );
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

    /// After the process exited: waits (up to `timeout`) until its stdout and stderr have been
    /// read to the end. [`Server::is_alive`] records the exit without this, so the last lines
    /// (the `shardgate: stopped` summary, a panic message) may not be in `stderr_lines` yet.
    pub fn wait_output(&mut self, timeout: Duration) {
        self.join_readers(timeout);
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
