//! Proves the host-facing start-up contract: systemd's notify protocol
//! (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) and `--placement fenced`
//! taking its cores from what the process may use.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::{take_turn, RedisServer};

/// A `shardgate serve` started through `prefix` (e.g. `taskset -c 1`) with
/// `env`, its stderr lines streamed into a channel.
struct Started {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Started {
    fn spawn(prefix: &[&str], args: &[&str], env: &[(&str, &str)]) -> Started {
        let binary = env!("CARGO_BIN_EXE_shardgate");
        let (program, rest): (&str, Vec<&str>) = match prefix.split_first() {
            Some((program, prefix_args)) => (program, prefix_args.iter().copied().chain([binary]).collect()),
            None => (binary, Vec::new()),
        };
        let mut child = Command::new(program)
            .args(rest)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shardgate");
        let stderr = child.stderr.take().expect("stderr");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[shardgate] {line}");
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Started { child, lines }
    }

    /// The first stderr line starting with `prefix`, within `timeout`.
    fn line_starting(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    fn terminate_and_wait(mut self, timeout: Duration) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve_args(redis_url: &str) -> Vec<String> {
    [
        "serve",
        "--udp",
        "127.0.0.1:0",
        "--tcp",
        "127.0.0.1:0",
        "--redis",
        redis_url,
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

fn strings(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The notify datagrams that arrive within `timeout`, as text.
fn receive_all(socket: &UnixDatagram, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut buffer = [0u8; 512];
    while Instant::now() < deadline {
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if let Ok(length) = socket.recv(&mut buffer) {
            received.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
        }
    }
    received
}

/// Under systemd's protocol the server says READY=1 with its shard count once serving,
/// pings the watchdog while its shards tick, and says STOPPING=1 when it drains.
#[test]
fn speaks_the_systemd_notify_protocol() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut args = serve_args(&redis.url());
    args.extend(["--cores".to_string(), "0".to_string()]);
    let server = Started::spawn(
        &[],
        &strings(&args),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    assert!(
        server
            .line_starting("shardgate: serving", Duration::from_secs(20))
            .is_some(),
        "server never served"
    );
    let received = receive_all(&socket, Duration::from_millis(1500));
    let ready = received
        .iter()
        .find(|message| message.contains("READY=1"))
        .expect("READY=1 sent");
    assert!(ready.contains("STATUS=serving 1 shards"), "{ready}");
    let pings = received.iter().filter(|message| *message == "WATCHDOG=1").count();
    assert!(pings >= 5, "a ping every 100 ms for 1.5 s, got {pings}: {received:?}");
    assert!(
        received.iter().all(|message| !message.contains("STOPPING")),
        "{received:?}"
    );

    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let after_stop = receive_all(&socket, Duration::from_millis(500));
    assert!(
        after_stop.iter().any(|message| message.starts_with("STOPPING=1")),
        "{after_stop:?}"
    );
    assert_eq!(server.terminate_and_wait(Duration::from_secs(20)), Some(0));
}

/// A watchdog meant for another process (WATCHDOG_PID) gets no pings, only READY=1.
#[test]
fn watchdog_for_another_pid_is_ignored() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let directory = tempfile::tempdir().unwrap();
    let socket_path = directory.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut args = serve_args(&redis.url());
    args.extend(["--cores".to_string(), "0".to_string()]);
    let server = Started::spawn(
        &[],
        &strings(&args),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    assert!(server
        .line_starting("shardgate: serving", Duration::from_secs(20))
        .is_some());
    let received = receive_all(&socket, Duration::from_millis(600));
    assert!(
        received.iter().any(|message| message.contains("READY=1")),
        "{received:?}"
    );
    assert!(!received.iter().any(|message| message == "WATCHDOG=1"), "{received:?}");
    assert_eq!(server.terminate_and_wait(Duration::from_secs(20)), Some(0));
}

fn taskset_available() -> bool {
    Command::new("taskset")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// `--placement fenced` without `--cores` starts one shard per core the process
/// may use: under `taskset -c 1`, exactly one shard.
#[test]
fn fenced_without_cores_takes_the_allowed_cores() {
    let _turn = take_turn(module_path!());
    if !taskset_available() {
        panic!("taskset (util-linux) is needed for this test");
    }
    let redis = RedisServer::start();
    let mut args = serve_args(&redis.url());
    args.extend(["--placement".to_string(), "fenced".to_string()]);
    let server = Started::spawn(&["taskset", "-c", "1"], &strings(&args), &[]);
    let serving = server
        .line_starting("shardgate: serving", Duration::from_secs(20))
        .expect("server never served");
    assert!(serving.contains("shards=1 "), "{serving}");
    assert_eq!(server.terminate_and_wait(Duration::from_secs(20)), Some(0));
}

/// A pinned core outside the allowed set stops the start with a message naming it.
#[test]
fn pinned_core_outside_the_allowed_set_is_refused() {
    let _turn = take_turn(module_path!());
    if !taskset_available() {
        panic!("taskset (util-linux) is needed for this test");
    }
    let redis = RedisServer::start();
    let mut args = serve_args(&redis.url());
    args.extend(["--placement", "pinned", "--cores", "0"].map(String::from));
    let server = Started::spawn(&["taskset", "-c", "1"], &strings(&args), &[]);
    let mut child = server.child;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not refuse to start");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());
    let output: Vec<String> = std::iter::from_fn(|| server.lines.recv_timeout(Duration::from_secs(5)).ok()).collect();
    let text = output.join("\n");
    assert!(text.contains("core 0 is not available to this process"), "{text}");
    assert!(text.contains("allowed cores are 1"), "{text}");
}
