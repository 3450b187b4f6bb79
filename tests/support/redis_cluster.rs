//! A private Redis Cluster of 6 nodes (3 masters, 3 replicas) on loopback ports (or on one
//! given local address), in temp dirs, built with `redis-cli --cluster create`; every node is
//! killed on drop.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;

use super::basics::send_signal;
use super::redis_server::redis_ping_at;
use super::stored::{read_stream, StoredEvent};
use super::Signal;

/// One node: its process, address, port and data dir.
pub struct ClusterNode {
    child: Option<Child>,
    /// The one address it binds, and announces to the other nodes and to clients.
    pub host: Ipv4Addr,
    pub port: u16,
    node_timeout_ms: u32,
    dir: tempfile::TempDir,
}

impl ClusterNode {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts `redis-server` on its port and data dir (with the `nodes.conf` a run before it
    /// left there), its log appended to.
    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("node log");
        let log2 = log.try_clone().expect("clone log fd");
        let dir = self.dir.path().to_str().expect("utf-8 tempdir").to_string();
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                &self.host.to_string(),
                "--dir",
                &dir,
            ])
            .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &self.node_timeout_ms.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // A replica's full sync starts at once, not 5 s later (the default, to gather
            // more replicas into one transfer): tests wait for their replicas to be online.
            .args(["--repl-diskless-sync-delay", "0"]);
        if !self.host.is_loopback() {
            // What the other nodes and the clients are told to reach it at; and protected
            // mode would refuse them (no password, not loopback). The address is a test
            // network's, which exists only on this machine.
            command.args(["--cluster-announce-ip", &self.host.to_string()]);
            command.args(["--protected-mode", "no"]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
    }

    fn wait_ping(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !redis_ping_at(IpAddr::V4(self.host), self.port, Duration::from_millis(250)) {
            assert!(
                Instant::now() < deadline,
                "cluster node {}:{} did not answer PING within {timeout:?}",
                self.host,
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        let client = redis::Client::open(format!("redis://{}:{}", self.host, self.port)).expect("redis url");
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to cluster node {}: {e}", self.port));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        conn
    }

    /// SIGSTOP: its connections stay open but it answers nothing (a replica acknowledges nothing).
    pub fn pause(&self) {
        let pid = self.child.as_ref().expect("the node runs").id();
        send_signal(pid, Signal::SIGSTOP).expect("SIGSTOP a cluster node");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        let pid = self.child.as_ref().expect("the node runs").id();
        send_signal(pid, Signal::SIGCONT).expect("SIGCONT a cluster node");
    }

    /// SIGKILL (`kill -9`): a crash, nothing written on the way out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// After [`kill`](Self::kill): starts it again on the same port and data dir, as a
    /// supervisor would, and waits (10 s at most) until it answers PING. Its `nodes.conf`
    /// makes it rejoin the cluster; with no persistence it comes back empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running node {}", self.port);
        self.spawn();
        self.wait_ping(Duration::from_secs(10));
    }

    /// What `ROLE` says: `master`, `slave`, or empty when it does not answer.
    pub fn role(&self) -> String {
        let client = redis::Client::open(format!("redis://{}:{}", self.host, self.port)).expect("redis url");
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
            return String::new();
        };
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut conn).unwrap_or_default();
        match role.first() {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            _ => String::new(),
        }
    }
}

/// Six nodes joined as 3 masters with a replica each; `cluster_state:ok` on every node.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

/// A port on `host` whose cluster bus port (port + 10000) is free too, both below the
/// ephemeral range so that no client socket takes them meanwhile.
fn free_node_port(host: Ipv4Addr) -> u16 {
    let mut rng = rand::thread_rng();
    for _attempt in 0..1000 {
        let port = rng.gen_range(12_000..22_000u16);
        let free = |port: u16| TcpListener::bind(SocketAddr::from((host, port))).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster node in 12000..22000");
}

impl RedisCluster {
    /// Starts 6 nodes on loopback, creates the cluster, and waits (30 s at most) until every
    /// node says `cluster_state:ok` and knows all 6 nodes.
    pub fn start() -> RedisCluster {
        RedisCluster::start_on(Ipv4Addr::LOCALHOST, 2000)
    }

    /// As [`start`](Self::start), every node bound to (and announcing) `host`, a local
    /// address, with `cluster-node-timeout` `node_timeout_ms`: how long a master may be
    /// unreachable before its replica is promoted.
    pub fn start_on(host: Ipv4Addr, node_timeout_ms: u32) -> RedisCluster {
        let mut cluster = RedisCluster { nodes: Vec::new() };
        for _ in 0..6 {
            let dir = tempfile::Builder::new()
                .prefix("sg-cluster-")
                .tempdir()
                .expect("tempdir for a cluster node");
            let mut node = ClusterNode {
                child: None,
                host,
                port: free_node_port(host),
                node_timeout_ms,
                dir,
            };
            node.spawn();
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            node.wait_ping(Duration::from_secs(10));
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(ClusterNode::address).collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// `redis-cluster://` with the first two nodes as seeds.
    pub fn url(&self) -> String {
        format!(
            "redis-cluster://{},{}",
            self.nodes[0].address(),
            self.nodes[1].address()
        )
    }

    /// Waits until every node says `cluster_state:ok`, knows 6 nodes, and agrees on 3 masters.
    pub fn wait_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pending = Vec::new();
            for node in &self.nodes {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut node.connection())
                    .unwrap_or_default();
                let ok = info.contains("cluster_state:ok")
                    && info.contains("cluster_known_nodes:6")
                    && info.contains("cluster_size:3");
                if !ok {
                    pending.push(node.port);
                }
            }
            if pending.is_empty() && self.masters().len() == 3 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok on nodes {pending:?} after {timeout:?}; log of the first:\n{}",
                std::fs::read_to_string(self.nodes[0].log_path()).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every master has a replica online (`INFO replication`: `connected_slaves:1`
    /// and `state=online`), i.e. done with its first sync: before that a `WAIT 1` confirms
    /// nothing. `wait_ok` does not wait for it.
    pub fn wait_replicas_online(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pending: Vec<u16> = self
                .masters()
                .into_iter()
                .filter(|&port| {
                    let info: String = redis::cmd("INFO")
                        .arg("replication")
                        .query(&mut self.node(port).connection())
                        .unwrap_or_default();
                    !(info.contains("connected_slaves:1") && info.contains("state=online"))
                })
                .collect();
            if pending.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "masters {pending:?} have no replica online after {timeout:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the (first) replica of the master on `master_port`, from its
    /// `INFO replication` (`slave0:ip=..,port=N,state=..`).
    pub fn replica_of(&self, master_port: u16) -> u16 {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut self.node(master_port).connection())
            .expect("INFO replication");
        info.lines()
            .find_map(|line| line.strip_prefix("slave0:"))
            .and_then(|fields| fields.split(',').find_map(|pair| pair.strip_prefix("port=")))
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("master {master_port} lists no replica:\n{info}"))
    }

    /// The masters' ports (`ROLE` per running node; a killed node is none).
    pub fn masters(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some() && node.role() == "master")
            .map(|node| node.port)
            .collect()
    }

    pub fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|node| node.port == port)
            .expect("a node of this cluster")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster")
    }

    /// Every key each master holds, by master port (SCAN on each, which sees its own keys).
    pub fn keys_by_master(&self) -> HashMap<u16, Vec<String>> {
        let mut found = HashMap::new();
        for port in self.masters() {
            let mut conn = self.node(port).connection();
            let mut keys = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut conn)
                    .expect("SCAN");
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            keys.sort();
            keys.dedup();
            found.insert(port, keys);
        }
        found
    }

    /// Every event of every `<prefix>:{p}:events` stream, each read from the master that holds it.
    pub fn read_events(&self, prefix: &str) -> Vec<StoredEvent> {
        let mut events = Vec::new();
        for (port, keys) in self.keys_by_master() {
            let mut conn = self.node(port).connection();
            for key in keys {
                let partition = key
                    .strip_prefix(&format!("{prefix}:{{"))
                    .and_then(|rest| rest.strip_suffix("}:events"))
                    .and_then(|partition| partition.parse::<u64>().ok());
                if let Some(partition) = partition {
                    events.extend(read_stream(&mut conn, &key, partition));
                }
            }
        }
        events
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn key_slot(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.nodes[0].connection())
            .expect("CLUSTER KEYSLOT")
    }

    /// The master port serving `slot`, as the first master sees it (`CLUSTER SLOTS`).
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        let first_master = self.masters()[0];
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut self.node(first_master).connection())
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let redis::Value::Array(parts) = range else { continue };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end)), Some(redis::Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            if (*start..=*end).contains(&i64::from(slot)) {
                if let Some(redis::Value::Int(port)) = master.get(1) {
                    return *port as u16;
                }
            }
        }
        panic!("no master serves slot {slot}");
    }
}

impl RedisCluster {
    fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port).connection())
            .expect("CLUSTER MYID")
    }

    /// Moves `slot` from the master that serves it to the master on `to`, as
    /// `redis-cli --cluster reshard` does: IMPORTING on the target, MIGRATING on the source,
    /// MIGRATE of its keys `keys_per_step` at a time (pausing `pause` between steps, so that a
    /// load running meanwhile meets the slot half moved), then SETSLOT NODE on every master.
    /// A key the target already holds fails the MIGRATE (no REPLACE): that would be a key
    /// written twice. Returns the keys moved.
    pub fn migrate_slot(&self, slot: u16, to: u16, keys_per_step: usize, pause: Duration) -> usize {
        let from = self.owner_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let mut source = self.node(from).connection();
        let mut target = self.node(to).connection();
        let setslot = |conn: &mut redis::Connection, state: &str, id: &str| {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .query(conn)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} {id}: {e}"));
        };
        setslot(&mut target, "IMPORTING", &from_id);
        setslot(&mut source, "MIGRATING", &to_id);
        let mut moved = 0;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(keys_per_step)
                .query(&mut source)
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg(self.node(to).host.to_string())
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut source)
                .unwrap_or_else(|e| panic!("MIGRATE of {} keys of slot {slot}: {e}", keys.len()));
            moved += keys.len();
            thread::sleep(pause);
        }
        setslot(&mut target, "NODE", &to_id);
        setslot(&mut source, "NODE", &to_id);
        for master in self.masters() {
            if master != from && master != to {
                setslot(&mut self.node(master).connection(), "NODE", &to_id);
            }
        }
        moved
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
