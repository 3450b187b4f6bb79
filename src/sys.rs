//! The only `unsafe` in shardgate: a second handle on an accepted TCP socket,
//! the UDP group's spreading program, a cache prefetch hint for the dedup
//! table, and a counting global allocator for measuring the hot path's
//! allocations. Beside the program, the safe reads of
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
//! A shard reads UDP datagrams with `recvmmsg`, many per system call, into a
//! `DatagramBatch` allocated once at shard start: in this VM a system call
//! costs microseconds, as much as the rest of a frame's work, and one call
//! per datagram plus one that finds the queue empty was most of the gap to a
//! plain echo (issue 14's measurements).
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

/// Datagrams read by one `recvmmsg`, in buffers allocated once.
///
/// The kernel writes into `storage` (one `slot_bytes` slot per datagram) and
/// `sources`, through the pointers in `headers` and `iovecs`. Those pointers
/// point into the boxed slices below, whose heap memory never moves, so they
/// are set once in `new` and stay valid for the life of the batch, whatever
/// happens to the `DatagramBatch` value itself.
pub struct DatagramBatch {
    storage: Box<[u8]>,
    slot_bytes: usize,
    sources: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    /// Datagrams the last `receive` returned.
    received: usize,
}

impl DatagramBatch {
    pub fn new(slots: usize, slot_bytes: usize) -> DatagramBatch {
        assert!(slots > 0 && slot_bytes > 0);
        assert!(u32::try_from(slots).is_ok() && u32::try_from(slot_bytes).is_ok());
        let mut storage = vec![0u8; slots * slot_bytes].into_boxed_slice();
        // SAFETY: sockaddr_storage is a plain C struct for which all-zero bytes are a valid value.
        let mut sources: Box<[libc::sockaddr_storage]> = (0..slots).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut iovecs: Box<[libc::iovec]> = storage
            .chunks_exact_mut(slot_bytes)
            .map(|slot| libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: slot_bytes,
            })
            .collect();
        let headers: Box<[libc::mmsghdr]> = iovecs
            .iter_mut()
            .zip(sources.iter_mut())
            .map(|(iovec, source)| {
                // SAFETY: msghdr and mmsghdr are plain C structs; all-zero is valid (no control data, no flags).
                let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
                header.msg_hdr.msg_name = (source as *mut libc::sockaddr_storage).cast();
                header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                header.msg_hdr.msg_iov = iovec;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        DatagramBatch {
            storage,
            slot_bytes,
            sources,
            iovecs,
            headers,
            received: 0,
        }
    }

    pub fn slots(&self) -> usize {
        self.headers.len()
    }

    /// Reads every datagram waiting on `socket`, up to `slots`, without
    /// blocking: `Ok(0)` when none is waiting.
    pub fn receive(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.received = 0;
        for header in self.headers.iter_mut() {
            // The kernel overwrote these on the last call.
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_flags = 0;
            header.msg_len = 0;
        }
        debug_assert_eq!(self.iovecs.len(), self.headers.len());
        // SAFETY: every header points at its own iovec and sockaddr_storage, and every iovec at its
        // own slot of `storage`, all owned by `self` and alive for the call (see the type's doc);
        // `vlen` is the number of headers. MSG_DONTWAIT makes the call return at once.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock => Ok(0),
                _ => Err(error),
            };
        }
        self.received = received as usize;
        assert!(
            self.received <= self.headers.len(),
            "the kernel fills at most vlen headers"
        );
        Ok(self.received)
    }

    /// The `index`-th datagram of the last `receive` and its source; `None`
    /// for a source that is neither IPv4 nor IPv6, or for a datagram larger
    /// than a slot (cut short by the kernel: `MSG_TRUNC`).
    pub fn datagram(&self, index: usize) -> Option<(&[u8], SocketAddr)> {
        assert!(index < self.received, "only datagrams of the last receive");
        let header = &self.headers[index];
        if header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        let length_bytes = (header.msg_len as usize).min(self.slot_bytes);
        let start = index * self.slot_bytes;
        let source = socket_address(&self.sources[index], header.msg_hdr.msg_namelen)?;
        Some((&self.storage[start..start + length_bytes], source))
    }
}

/// A kernel-written socket address as a `SocketAddr`; `None` for other families.
fn socket_address(storage: &libc::sockaddr_storage, length: libc::socklen_t) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET if length as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large and aligned enough for.
            let address = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(address.sin_port))))
        }
        libc::AF_INET6 if length as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let address = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(address.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(address.sin6_port),
                address.sin6_flowinfo,
                address.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A second stream on the same socket as `stream`.
pub(crate) fn duplicate_stream(stream: &TcpStream) -> io::Result<TcpStream> {
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
pub(crate) fn random_socket_program(group_size: u32) -> [libc::sock_filter; 3] {
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
pub(crate) fn spread_datagrams_randomly(socket: &impl AsRawFd, group_size: u32) -> io::Result<()> {
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
pub(crate) fn own_socket_inodes() -> io::Result<HashSet<u64>> {
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

/// Asks the CPU to start loading the cache line holding `value`, and returns
/// at once: unlike a load, a prefetch retires without waiting for the data, so
/// the work after it goes on while the line arrives (`dedup.rs` prefetches the
/// buckets of a whole `recvmmsg` read). A no-op off x86_64.
#[inline]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is unsafe only because it is declared with
    // `#[target_feature(enable = "sse")]`, and SSE is part of the x86_64
    // baseline, so every CPU this code runs on has it. A prefetch is a hint:
    // it never faults, whatever the address, and never changes memory; here
    // the address is that of a live reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((value as *const T).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// The system allocator, counting allocations and bytes. Installed by the
/// `count-allocations` feature of the binary and by the allocation test; the
/// counters are process-wide atomics, so it is for measuring, not production.
pub struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's share of the counts. A `const` initializer and no
    /// destructor: nothing here allocates or registers, so the allocator can
    /// touch it on any thread, at any time.
    static THREAD_ALLOCATIONS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Allocations (including reallocations) and bytes requested since start, by every thread.
pub fn allocations() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    )
}

/// Allocations and bytes requested by the calling thread since it started. A test harness
/// prints from its own threads while a test runs, so a test counts its own thread's.
pub fn thread_allocations() -> (u64, u64) {
    THREAD_ALLOCATIONS.try_with(std::cell::Cell::get).unwrap_or((0, 0))
}

fn count_allocation(bytes: u64) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    ALLOCATED_BYTES.fetch_add(bytes, Ordering::Relaxed);
    let _ = THREAD_ALLOCATIONS.try_with(|counts| {
        let (allocations, allocated_bytes) = counts.get();
        counts.set((allocations + 1, allocated_bytes + bytes));
    });
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged, so it upholds exactly the contract the caller relies
// on; the counters are a side effect that never touches the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size() as u64);
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size() as u64);
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `pointer` came from this allocator, which is the system's.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation(new_size.saturating_sub(layout.size()) as u64);
        // SAFETY: forwarded unchanged; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

#[cfg(test)]
mod datagram_batch_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A prefetch changes nothing it touches, wherever in a buffer it points.
        #[test]
        fn prefetch_changes_nothing(bytes in proptest::collection::vec(any::<u8>(), 1..4096), pick in any::<usize>()) {
            let before = bytes.clone();
            prefetch(&bytes[pick % bytes.len()]);
            prefetch(&bytes);
            prop_assert_eq!(bytes, before);
        }

        /// Whatever datagrams wait (sizes, sources, v4 or v6), `receive` returns each exactly once, byte for
        /// byte, with its sender, in order, never more than the slots, and `Ok(0)` once the queue is empty.
        #[test]
        fn reads_what_was_sent(
            sizes in proptest::collection::vec(0usize..=300, 1..40),
            slots in 1usize..9,
            ipv6 in any::<bool>(),
        ) {
            let local = if ipv6 { "[::1]:0" } else { "127.0.0.1:0" };
            let receiver = std::net::UdpSocket::bind(local).unwrap();
            let senders = [std::net::UdpSocket::bind(local).unwrap(), std::net::UdpSocket::bind(local).unwrap()];
            let mut sent = Vec::new();
            for (index, &size) in sizes.iter().enumerate() {
                let sender = &senders[index % 2];
                let bytes: Vec<u8> = (0..size).map(|offset| (index * 31 + offset) as u8).collect();
                sender.send_to(&bytes, receiver.local_addr().unwrap()).unwrap();
                sent.push((bytes, sender.local_addr().unwrap()));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            let mut batch = DatagramBatch::new(slots, 512);
            let mut received = Vec::new();
            loop {
                let count = batch.receive(&receiver).unwrap();
                prop_assert!(count <= slots);
                if count == 0 {
                    break;
                }
                for index in 0..count {
                    let (bytes, source) = batch.datagram(index).expect("fits a slot, v4 or v6");
                    received.push((bytes.to_vec(), source));
                }
            }
            prop_assert_eq!(received, sent);
        }
    }

    /// A datagram larger than a slot is reported as cut, never as a shorter datagram.
    #[test]
    fn a_datagram_larger_than_a_slot_is_refused() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(&[7u8; 100], receiver.local_addr().unwrap()).unwrap();
        sender.send_to(&[8u8; 10], receiver.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut batch = DatagramBatch::new(4, 64);
        assert_eq!(batch.receive(&receiver).unwrap(), 2);
        assert!(batch.datagram(0).is_none());
        assert_eq!(batch.datagram(1).unwrap().0, &[8u8; 10]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
            let received = spread_counts(&group, address, DATAGRAMS);
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

    /// Serializes the tests that read /proc/net/udp with those that bind many UDP sockets:
    /// the kernel prints the table in chunks, and sockets bound or closed between two chunks
    /// can be missed, so a count read meanwhile is short.
    pub(crate) fn lock_udp_table() -> std::sync::MutexGuard<'static, ()> {
        static UDP_TABLE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        UDP_TABLE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The group's members are found in /proc/net/udp by the bound address, as this process's
    /// sockets, and one that closes is gone from both lists.
    #[test]
    fn group_members_are_counted_by_bound_address() {
        let _table = lock_udp_table();
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
        let _table = lock_udp_table();
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
        let _table = lock_udp_table();
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
        let _table = lock_udp_table();
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
