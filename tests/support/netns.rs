//! Hosts in network namespaces: each `shardgate` of a multi-host test runs in a namespace of
//! its own (`ip netns exec`), with two links: one on a "client" bridge, where the test's
//! clients (in the root namespace) reach it, and one on a "redis" bridge, where it reaches the
//! Redis nodes, which bind the root namespace's address on that bridge. Cutting a host's Redis
//! link thus leaves its clients able to reach it.
//!
//! A network takes a slot S (1..=250) held by a lock file for its lifetime, and its addresses
//! are 10.213.S.0/24 (clients) and 10.214.S.0/24 (Redis): they exist only on this machine, and
//! no two networks of concurrent tests share them. Its namespaces and links are named
//! `sgnSSS...` (at most 9 characters; Linux allows 15). Drop removes them, also when the test
//! fails; a test killed before its drop leaves them behind, and the next network made removes
//! those of every slot whose lock no test holds.
//!
//! Namespaces need root and `ip` (iproute2). Where they cannot be made, [`Network::create`]
//! says so on stderr and the test skips; `SHARDGATE_REQUIRE_NETNS=1` (set by `.ci/run`)
//! makes that a failure instead.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use super::server::{Server, ServerBuilder};

/// First two octets of the clients' and the Redis nodes' networks; the third is the slot.
const CLIENT_NET: [u8; 2] = [10, 213];
const REDIS_NET: [u8; 2] = [10, 214];
const SLOTS: u16 = 250;
/// A host's last octet is this plus its index; the root namespace's is 1 on each bridge.
const FIRST_HOST_OCTET: u8 = 10;
/// Link names inside a host's namespace (each namespace has its own names).
const CLIENT_LINK: &str = "client";
const REDIS_LINK: &str = "redis";
/// Makes a namespace that cannot be made a test failure rather than a skip.
const REQUIRE_ENV: &str = "SHARDGATE_REQUIRE_NETNS";

/// Why a network could not be made (or a command on it failed).
#[derive(Debug)]
pub struct NetworkError(String);

impl fmt::Display for NetworkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One host: its namespace and its addresses on the two bridges.
struct NetHost {
    namespace: String,
    client_address: Ipv4Addr,
    redis_address: Ipv4Addr,
}

/// The bridges, the hosts' namespaces and their links; all removed on drop.
pub struct Network {
    prefix: String,
    slot: u8,
    hosts: Vec<NetHost>,
    /// Held (flock) while the network exists: the slot is this network's.
    _slot_lock: File,
}

impl Network {
    /// `hosts` namespaces, each linked to both bridges. `None` (after saying why on stderr)
    /// when namespaces cannot be made here, unless `SHARDGATE_REQUIRE_NETNS=1`: then it panics.
    pub fn create(test: &str, hosts: usize) -> Option<Network> {
        match Network::try_create(hosts) {
            Ok(network) => {
                println!(
                    "{test}: network {} (clients 10.213.{}.0/24, redis 10.214.{}.0/24), {hosts} hosts",
                    network.prefix, network.slot, network.slot
                );
                Some(network)
            }
            Err(error) if std::env::var(REQUIRE_ENV).is_ok_and(|value| value == "1") => {
                panic!("{test}: network namespaces are required ({REQUIRE_ENV}=1) and cannot be made: {error}")
            }
            Err(error) => {
                // Straight to the process's stderr: the test harness shows what `eprintln!`
                // writes only for a failed test, and a skip must be seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** {test}: SKIPPED, network namespaces cannot be made here: {error}\n\
                     *** (run as root with iproute2; {REQUIRE_ENV}=1 makes this a failure)\n"
                );
                None
            }
        }
    }

    fn try_create(host_count: usize) -> Result<Network, NetworkError> {
        assert!((1..=200).contains(&host_count), "1..=200 hosts per network");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetworkError("not root".to_string()));
        }
        remove_stale_networks()?;
        let (slot, lock) = take_slot()?;
        let prefix = slot_prefix(slot);
        remove_leftovers(&prefix);
        let mut network = Network {
            prefix,
            slot,
            hosts: Vec::new(),
            _slot_lock: lock,
        };
        // From here on a failure drops `network`, which removes what was made.
        for (bridge, net) in [
            (network.client_bridge(), CLIENT_NET),
            (network.redis_bridge(), REDIS_NET),
        ] {
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&["addr", "add", &format!("{}/24", address(net, slot, 1)), "dev", &bridge])?;
            ip(&["link", "set", &bridge, "up"])?;
        }
        for index in 0..host_count {
            let host = NetHost {
                namespace: format!("{}h{index}", network.prefix),
                client_address: address(CLIENT_NET, slot, FIRST_HOST_OCTET + index as u8),
                redis_address: address(REDIS_NET, slot, FIRST_HOST_OCTET + index as u8),
            };
            ip(&["netns", "add", &host.namespace])?;
            network.hosts.push(host);
            let host = &network.hosts[index];
            in_namespace(&host.namespace, &["link", "set", "lo", "up"])?;
            let links = [
                (
                    format!("{}c{index}", network.prefix),
                    CLIENT_LINK,
                    network.client_bridge(),
                    host.client_address,
                ),
                (
                    format!("{}r{index}", network.prefix),
                    REDIS_LINK,
                    network.redis_bridge(),
                    host.redis_address,
                ),
            ];
            for (outer, inner, bridge, host_address) in links {
                ip(&[
                    "link",
                    "add",
                    &outer,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    inner,
                    "netns",
                    &host.namespace,
                ])?;
                ip(&["link", "set", &outer, "master", &bridge, "up"])?;
                in_namespace(
                    &host.namespace,
                    &["addr", "add", &format!("{host_address}/24"), "dev", inner],
                )?;
                in_namespace(&host.namespace, &["link", "set", inner, "up"])?;
            }
        }
        Ok(network)
    }

    fn client_bridge(&self) -> String {
        format!("{}cb", self.prefix)
    }

    fn redis_bridge(&self) -> String {
        format!("{}rb", self.prefix)
    }

    /// The root namespace's address on the Redis bridge: where the Redis nodes bind.
    pub fn redis_gateway(&self) -> Ipv4Addr {
        address(REDIS_NET, self.slot, 1)
    }

    /// Starts `builder`'s server in host `index`'s namespace, its UDP, TCP and metrics
    /// listeners on the host's client address.
    pub fn start_server(&self, index: usize, builder: ServerBuilder) -> Server {
        let host = &self.hosts[index];
        let listen = format!("{}:0", host.client_address);
        builder
            .arg("--udp", &listen)
            .arg("--tcp", &listen)
            .arg("--metrics", &listen)
            .launched_by(&["ip", "netns", "exec", &host.namespace])
            .start()
    }

    /// Sets host `index`'s link to the Redis bridge down or up, from inside its namespace.
    pub fn set_redis_link(&self, index: usize, up: bool) {
        let namespace = &self.hosts[index].namespace;
        let state = if up { "up" } else { "down" };
        in_namespace(namespace, &["link", "set", REDIS_LINK, state])
            .unwrap_or_else(|error| panic!("set the redis link of {namespace} {state}: {error}"));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        remove_leftovers(&self.prefix);
    }
}

fn address(net: [u8; 2], slot: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], slot, host)
}

/// Takes the first free slot from a start that differs per process and per call, so that
/// concurrent tests seldom try the same one: free means its lock file is not held and no
/// address of its two networks is on any link of the root namespace.
fn take_slot() -> Result<(u8, File), NetworkError> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static CALLS: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() as u16)
        .wrapping_mul(7)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed));
    let addresses = ip(&["-4", "-o", "addr", "show"])?;
    for offset in 0..SLOTS {
        let slot = ((start.wrapping_add(offset)) % SLOTS + 1) as u8;
        let Some(lock) = lock_slot(slot)? else {
            continue;
        };
        let prefix = slot_prefix(slot);
        let in_use = [CLIENT_NET, REDIS_NET].iter().any(|net| {
            let subnet = format!(" {}.{}.{slot}.", net[0], net[1]);
            addresses
                .lines()
                .any(|line| line.contains(&subnet) && !line_names_link_of(line, &prefix))
        });
        if !in_use {
            return Ok((slot, lock));
        }
    }
    Err(NetworkError(format!("no free slot of {SLOTS} for a test network")))
}

/// The slot's lock file, locked, or `None` while another test holds it.
fn lock_slot(slot: u8) -> Result<Option<File>, NetworkError> {
    let path = std::env::temp_dir().join(format!("shardgate-netns-{slot}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| NetworkError(format!("open {}: {error}", path.display())))?;
    // SAFETY: flock on a file descriptor this function owns; the lock goes with the file.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok(locked.then_some(lock))
}

fn slot_prefix(slot: u8) -> String {
    format!("sgn{slot:03}")
}

/// Removes the namespaces and links of every slot no test holds: what tests killed before
/// their drop left behind.
fn remove_stale_networks() -> Result<(), NetworkError> {
    let names = ip(&["netns", "list"])? + &ip(&["-o", "link", "show"])?;
    let mut slots: Vec<u8> = names
        .split(|c: char| c.is_whitespace() || c == ':' || c == '@')
        .filter_map(|name| name.strip_prefix("sgn"))
        .filter_map(|rest| rest.get(..3)?.parse().ok())
        .filter(|slot| (1..=SLOTS).contains(slot))
        .map(|slot: u16| slot as u8)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    for slot in slots {
        if let Some(_lock) = lock_slot(slot)? {
            remove_leftovers(&slot_prefix(slot));
        }
    }
    Ok(())
}

/// Whether an `ip -o addr show` line is about a link named with `prefix` (a leftover).
fn line_names_link_of(line: &str, prefix: &str) -> bool {
    line.split_whitespace()
        .nth(1)
        .is_some_and(|name| name.starts_with(prefix))
}

/// Deletes every namespace and link named with `prefix` (deleting a namespace deletes the
/// links in it, and their veth peers). Best effort: what is already gone is fine.
fn remove_leftovers(prefix: &str) {
    if let Ok(namespaces) = ip(&["netns", "list"]) {
        for name in namespaces.lines().filter_map(|line| line.split_whitespace().next()) {
            if name.starts_with(prefix) {
                let _ = ip(&["netns", "delete", name]);
            }
        }
    }
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        for line in links.lines() {
            // `7: sgn012c0@if2: <BROADCAST,...`
            let name = line
                .split_whitespace()
                .nth(1)
                .map(|name| name.trim_end_matches(':'))
                .map(|name| name.split('@').next().unwrap_or(name));
            if let Some(name) = name.filter(|name| name.starts_with(prefix)) {
                let _ = ip(&["link", "delete", name]);
            }
        }
    }
}

fn in_namespace(namespace: &str, args: &[&str]) -> Result<String, NetworkError> {
    let mut full = vec!["netns", "exec", namespace, "ip"];
    full.extend_from_slice(args);
    ip(&full)
}

/// Runs `ip ARGS`; its stdout, or why it failed.
fn ip(args: &[&str]) -> Result<String, NetworkError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| NetworkError(format!("run ip {}: {error}", args.join(" "))))?;
    if !output.status.success() {
        return Err(NetworkError(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
