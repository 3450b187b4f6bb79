//! A private `redis-server` on a loopback port, which a test may kill, restart, pause and resume.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::basics::{free_port, send_signal};
use super::Signal;

/// A private `redis-server` on a loopback port, with its data dir in a temp dir.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    aof: bool,
    /// `--replicaof 127.0.0.1 <port>`: a replica of the Redis on that port.
    replica_of: Option<u16>,
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

    /// Redis with `--appendonly yes --appendfsync always` on a given port.
    pub fn start_with_aof_on_port(port: u16) -> RedisServer {
        Self::launch(Some(port), true)
    }

    /// Plain Redis replicating the (plain) Redis on `master_port`; waits until its link to
    /// the master is up (`master_link_status:up`), 20 s at most.
    pub fn start_replica_of(master_port: u16) -> RedisServer {
        let replica = Self::launch_with(None, false, Some(master_port));
        replica.wait_master_link_up(Duration::from_secs(20));
        replica
    }

    /// `INFO replication`, as text.
    pub fn info_replication(&self) -> String {
        redis::cmd("INFO")
            .arg("replication")
            .query::<String>(&mut self.connection())
            .unwrap_or_else(|e| panic!("INFO replication on {}: {e}", self.port))
    }

    /// Waits until this replica's link to its master is up; panics past `timeout`.
    pub fn wait_master_link_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info_replication();
            if info.lines().any(|line| line.trim() == "master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica on {} has no link to its master after {timeout:?}:\n{info}\nlog:\n{}",
                self.port,
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn launch(port: Option<u16>, aof: bool) -> RedisServer {
        Self::launch_with(port, aof, None)
    }

    fn launch_with(port: Option<u16>, aof: bool, replica_of: Option<u16>) -> RedisServer {
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
            replica_of,
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
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port, "--bind", "127.0.0.1", "--dir", &dir])
            .args(["--save", "", "--daemonize", "no"])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"]);
        if let Some(master_port) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &master_port.to_string()]);
        }
        command
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
    redis_ping_at(IpAddr::V4(Ipv4Addr::LOCALHOST), port, timeout)
}

/// [`redis_ping`] to a Redis on `host`.
pub fn redis_ping_at(host: IpAddr, port: u16, timeout: Duration) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://{host}:{port}")) else {
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
