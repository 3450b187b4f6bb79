//! The only `unsafe` in shardgate: a second handle on an accepted TCP socket,
//! the UDP group's spreading program, and a counting global allocator for
//! measuring the hot path's allocations. Beside the program, the safe reads of
//! /proc that tell how many sockets the group has and which are this process's.
//!
//! The kernel hands each datagram to one socket of an SO_REUSEPORT group by a
//! hash of its source address and port, so a few busy sources (a relay, a NAT,
//! a load generator with 8 sockets) can load one shard with most of the
//! traffic: measured, 8 source ports split 25/75 over two shards, and the
//! loaded one fell behind at 50k/s while the other idled. A two-instruction
//! classic BPF program attached to the group picks a socket at random instead,
//! per datagram. Order per source does not matter here: every copy of an event
//! is deduplicated across shards and by Redis.
//!
//! The program takes the group's size as a constant (classic BPF has no way to
//! ask for it), and the group is shared with any other process bound to the
//! same address: during a rolling restart the old and the new process
//! (docs/design.md, "Rolling restart"). So the size is counted from the
//! kernel's socket table, /proc/net/udp, and the program re-attached when the
//! count changes. A stale size never loses a datagram: a smaller one leaves
//! the sockets past it idle, a larger one sends the datagrams whose index
//! falls past the end to the kernel's hash, which picks a live socket.
//!
//! Each TCP connection has a reader task and a writer task, so that acks for
//! earlier frames go out while the reader waits for more bytes. Glommio's
//! `TcpStream` takes `&mut self` for both directions and has no split, and a
//! lock-based split would put a lock on the data path. A duplicated file
//! descriptor gives each task its own stream on the same socket; the kernel
//! closes the connection when both are dropped.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use glommio::net::TcpStream;

/// A second stream on the same socket as `stream`.
pub fn duplicate_stream(stream: &TcpStream) -> io::Result<TcpStream> {
    // SAFETY: `stream` is a live, open TcpStream borrowed for this whole call,
    // so its descriptor stays valid while `borrowed` exists; `borrowed` does
    // not outlive this function.
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let owned = borrowed.try_clone_to_owned()?;
    Ok(TcpStream::from(socket2::Socket::from(std::net::TcpStream::from(owned))))
}

/// Linux's `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; x86_64 and aarch64 use the generic
/// value). The `libc` crate defines it only for Android.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Classic BPF for an SO_REUSEPORT group: `A = random(); A %= group_size; return A`. The kernel
/// takes the returned value as the index of the socket in the group, and falls back to its hash
/// when the index is past the group's end (a shard that already closed its socket).
pub fn random_socket_program(group_size: u32) -> [libc::sock_filter; 3] {
    assert!(group_size >= 1, "a group has at least one socket");
    let instruction = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    [
        instruction(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
        ),
        instruction(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, group_size),
        instruction(libc::BPF_RET | libc::BPF_A, 0),
    ]
}

/// Makes the kernel give each datagram for `socket`'s SO_REUSEPORT group to a random one of its
/// `group_size` sockets (see the module docs). Attaching it again, from another member, replaces
/// the group's program with the same one.
pub fn spread_datagrams_randomly(socket: &impl AsRawFd, group_size: u32) -> io::Result<()> {
    let mut program = random_socket_program(group_size);
    let program_description = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the descriptor is open (borrowed for the call); `program_description` points at
    // `program`, a live array of `len` instructions, and both outlive the call; the option
    // length is exactly the size of the `sock_fprog` passed. The kernel copies and validates
    // the program before setsockopt returns, and keeps no pointer into our memory.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&program_description as *const libc::sock_fprog).cast::<libc::c_void>(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's socket table for `address`'s family, and how it writes `address` in its
/// `local_address` column: each 32-bit word of the address in host byte order as hex, then the
/// port (`udp4_format_sock` and `udp6_sock_seq_show` in the kernel).
fn proc_net_udp_key(address: SocketAddr) -> (&'static str, String) {
    match address {
        SocketAddr::V4(v4) => (
            "/proc/net/udp",
            format!("{:08X}:{:04X}", u32::from_ne_bytes(v4.ip().octets()), v4.port()),
        ),
        SocketAddr::V6(v6) => {
            let octets = v6.ip().octets();
            let words: String = octets
                .chunks_exact(4)
                .map(|word| format!("{:08X}", u32::from_ne_bytes([word[0], word[1], word[2], word[3]])))
                .collect();
            ("/proc/net/udp6", format!("{words}:{:04X}", v6.port()))
        }
    }
}

/// Inodes of the rows of a /proc/net/udp{,6} `table` whose local address is `key`.
fn inodes_bound_to(table: &str, key: &str) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            (columns.get(1) == Some(&key)).then(|| columns.get(9)?.parse().ok())?
        })
        .collect()
}

/// Inodes of every UDP socket in this network namespace bound to exactly `address`: the members
/// of its SO_REUSEPORT group, of this process and of any other. Sockets that set no
/// SO_REUSEADDR (shardgate's do not) share a bound address only through the group. Costs
/// about 100 µs however few sockets there are: the kernel walks its whole UDP hash table.
pub fn udp_group_inodes(address: SocketAddr) -> io::Result<Vec<u64>> {
    let (path, key) = proc_net_udp_key(address);
    Ok(inodes_bound_to(&std::fs::read_to_string(path)?, &key))
}

/// Inodes of the sockets this process holds open (the `socket:[INODE]` links in
/// /proc/self/fd). A socket whose last descriptor is closed is no longer among them, even while
/// the kernel finishes with it.
pub fn own_socket_inodes() -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        // A descriptor closed while we list is simply not there.
        let Ok(target) = entry.and_then(|entry| std::fs::read_link(entry.path())) else {
            continue;
        };
        let inode: Option<u64> = target
            .to_str()
            .and_then(|target| target.strip_prefix("socket:["))
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|number| number.parse().ok());
        inodes.extend(inode);
    }
    Ok(inodes)
}

/// The system allocator, counting allocations and bytes. Installed by the
/// `count-allocations` feature of the binary and by the allocation test; the
/// counters are process-wide atomics, so it is for measuring, not production.
pub struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Allocations (including reallocations) and bytes requested since start.
pub fn allocations() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    )
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged, so it upholds exactly the contract the caller relies
// on; the counters are a side effect that never touches the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `pointer` came from this allocator, which is the system's.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED_BYTES.fetch_add(new_size.saturating_sub(layout.size()) as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    fn group_member(address: std::net::SocketAddr) -> std::net::UdpSocket {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        socket.set_reuse_port(true).unwrap();
        socket.bind(&address.into()).unwrap();
        let socket: std::net::UdpSocket = socket.into();
        socket.set_nonblocking(true).unwrap();
        socket
    }

    fn drain(socket: &std::net::UdpSocket) -> usize {
        let mut buffer = [0u8; 16];
        let mut received = 0;
        while socket.recv_from(&mut buffer).is_ok() {
            received += 1;
        }
        received
    }

    /// With the program attached, datagrams from one source port reach every socket of a group of
    /// 1 to 4 (the hash alone sends them all to one), each socket getting a fair share, and none is
    /// lost.
    #[test]
    fn one_source_is_spread_over_the_whole_group() {
        const DATAGRAMS: usize = 2000;
        for group_size in 1..=4usize {
            let first = group_member("127.0.0.1:0".parse().unwrap());
            let address = first.local_addr().unwrap();
            let mut group = vec![first];
            group.extend((1..group_size).map(|_| group_member(address)));
            spread_datagrams_randomly(&group[group_size - 1], group_size as u32).unwrap();
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut received = vec![0usize; group_size];
            for sent in 0..DATAGRAMS {
                sender.send_to(&(sent as u32).to_le_bytes(), address).unwrap();
                if sent % 100 == 99 {
                    for (member, socket) in group.iter().enumerate() {
                        received[member] += drain(socket);
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            for (member, socket) in group.iter().enumerate() {
                received[member] += drain(socket);
            }
            assert_eq!(
                received.iter().sum::<usize>(),
                DATAGRAMS,
                "group of {group_size}: {received:?}"
            );
            let fair = DATAGRAMS / group_size;
            for count in &received {
                assert!(
                    *count > fair / 2 && *count < fair * 3 / 2,
                    "group of {group_size}: {received:?}"
                );
            }
        }
    }

    /// Sends `count` datagrams from one source port to `address`, and says how many each socket of
    /// `group` received.
    fn spread_counts(group: &[std::net::UdpSocket], address: std::net::SocketAddr, count: usize) -> Vec<usize> {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut received = vec![0usize; group.len()];
        for sent in 0..count {
            sender.send_to(&(sent as u32).to_le_bytes(), address).unwrap();
            if sent % 100 == 99 {
                for (member, socket) in group.iter().enumerate() {
                    received[member] += drain(socket);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        for (member, socket) in group.iter().enumerate() {
            received[member] += drain(socket);
        }
        received
    }

    /// The group's members are found in /proc/net/udp by the bound address, as this process's
    /// sockets, and one that closes is gone from both lists.
    #[test]
    fn group_members_are_counted_by_bound_address() {
        let first = group_member("127.0.0.1:0".parse().unwrap());
        let address = first.local_addr().unwrap();
        let mut group = vec![first, group_member(address), group_member(address)];
        let outsider = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let members = udp_group_inodes(address).unwrap();
        assert_eq!(members.len(), 3, "{members:?}");
        let own = own_socket_inodes().unwrap();
        assert!(
            members.iter().all(|inode| own.contains(inode)),
            "{members:?} not in {own:?}"
        );
        let outsider_members = udp_group_inodes(outsider.local_addr().unwrap()).unwrap();
        assert_eq!(outsider_members.len(), 1);
        assert!(!members.contains(&outsider_members[0]));
        drop(group.pop());
        let after = udp_group_inodes(address).unwrap();
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(after.iter().all(|inode| members.contains(inode)));
        let members: HashSet<u64> = members.into_iter().collect();
        assert_eq!(own_socket_inodes().unwrap().intersection(&members).count(), 2);
    }

    /// The kernel's table writes addresses as host-order 32-bit words: 127.0.0.1:8080 and
    /// [::1]:8080 as the kernel prints them on this machine's byte order.
    #[test]
    fn proc_key_matches_the_kernel_format() {
        let (table, key) = proc_net_udp_key("127.0.0.1:8080".parse().unwrap());
        assert_eq!(table, "/proc/net/udp");
        let expected = if cfg!(target_endian = "little") {
            "0100007F:1F90"
        } else {
            "7F000001:1F90"
        };
        assert_eq!(key, expected);
        let (table, key) = proc_net_udp_key("[::1]:8080".parse().unwrap());
        assert_eq!(table, "/proc/net/udp6");
        let last = if cfg!(target_endian = "little") {
            "01000000"
        } else {
            "00000001"
        };
        assert_eq!(key, format!("000000000000000000000000{last}:1F90"));
        let row = format!("   1: {key} 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4242 2 0000000000000000 0");
        let table = format!("  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n{row}\n");
        assert_eq!(inodes_bound_to(&table, &key), vec![4242]);
        assert_eq!(inodes_bound_to(&table, "0100007F:1F91"), Vec::<u64>::new());
    }

    /// A handover at the socket level: a second set of sockets joins a group of two, and with the
    /// program sized by the counted group all four get datagrams; when the first two close, a
    /// stale size loses nothing (indices past the end go by hash), and the recounted size spreads
    /// over the remaining two.
    #[test]
    fn handover_spreads_over_both_sets_then_the_new_one() {
        const DATAGRAMS: usize = 2000;
        let first = group_member("127.0.0.1:0".parse().unwrap());
        let address = first.local_addr().unwrap();
        let old = vec![first, group_member(address)];
        spread_datagrams_randomly(&old[0], udp_group_inodes(address).unwrap().len() as u32).unwrap();
        let new = vec![group_member(address), group_member(address)];
        let size = udp_group_inodes(address).unwrap().len();
        assert_eq!(size, 4);
        spread_datagrams_randomly(&new[0], size as u32).unwrap();
        let both: Vec<std::net::UdpSocket> = old.into_iter().chain(new).collect();
        let received = spread_counts(&both, address, DATAGRAMS);
        assert_eq!(received.iter().sum::<usize>(), DATAGRAMS, "{received:?}");
        assert!(received.iter().all(|count| *count > DATAGRAMS / 8), "{received:?}");
        let new: Vec<std::net::UdpSocket> = both.into_iter().skip(2).collect();
        let stale = spread_counts(&new, address, DATAGRAMS);
        assert_eq!(stale.iter().sum::<usize>(), DATAGRAMS, "stale size: {stale:?}");
        let size = udp_group_inodes(address).unwrap().len();
        assert_eq!(size, 2);
        spread_datagrams_randomly(&new[1], size as u32).unwrap();
        let recounted = spread_counts(&new, address, DATAGRAMS);
        assert_eq!(recounted.iter().sum::<usize>(), DATAGRAMS, "{recounted:?}");
        assert!(recounted.iter().all(|count| *count > DATAGRAMS / 4), "{recounted:?}");
    }

    /// The program is the documented three instructions, and a group of none is refused.
    #[test]
    fn program_is_random_modulo_group_size() {
        let program = random_socket_program(7);
        assert_eq!(program[1].k, 7);
        assert_eq!(program[0].k as i32, libc::SKF_AD_OFF + libc::SKF_AD_RANDOM);
        assert_eq!(u32::from(program[2].code), libc::BPF_RET | libc::BPF_A);
        assert!(std::panic::catch_unwind(|| random_socket_program(0)).is_err());
    }
    use glommio::net::TcpListener;
    use glommio::LocalExecutorBuilder;

    /// Bytes written through the duplicate arrive on the peer, bytes sent by the peer are read through
    /// the original, and dropping one handle leaves the other usable; for many rounds of random sizes.
    #[test]
    fn duplicate_shares_the_socket() {
        LocalExecutorBuilder::default()
            .spawn(|| async move {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let address = listener.local_addr().unwrap();
                let peer_task = glommio::spawn_local(async move { TcpStream::connect(address).await.unwrap() });
                let accepted = listener.accept().await.unwrap();
                let mut peer = peer_task.await;
                let mut original = accepted;
                let mut duplicate = duplicate_stream(&original).unwrap();
                let seed: u64 = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos()
                    .into();
                let mut state = seed | 1;
                for round in 0..64 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let size = 1 + (state % 4096) as usize;
                    let outgoing: Vec<u8> = (0..size).map(|index| (index as u64 ^ state) as u8).collect();
                    duplicate.write_all(&outgoing).await.unwrap();
                    let mut incoming = vec![0; size];
                    peer.read_exact(&mut incoming).await.unwrap();
                    assert_eq!(incoming, outgoing, "seed {seed} round {round}");
                    peer.write_all(&outgoing).await.unwrap();
                    original.read_exact(&mut incoming).await.unwrap();
                    assert_eq!(incoming, outgoing, "seed {seed} round {round}");
                }
                drop(duplicate);
                original.write_all(b"still open").await.unwrap();
                let mut incoming = [0u8; 10];
                peer.read_exact(&mut incoming).await.unwrap();
                assert_eq!(&incoming, b"still open");
                drop(original);
                let mut rest = Vec::new();
                assert_eq!(
                    peer.read_to_end(&mut rest).await.unwrap(),
                    0,
                    "both handles dropped closes the socket"
                );
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
