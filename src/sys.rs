//! The only `unsafe` in shardgate: a second handle on an accepted TCP socket,
//! the UDP group's spreading program, and a counting global allocator for
//! measuring the hot path's allocations.
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
//! Each TCP connection has a reader task and a writer task, so that acks for
//! earlier frames go out while the reader waits for more bytes. Glommio's
//! `TcpStream` takes `&mut self` for both directions and has no split, and a
//! lock-based split would put a lock on the data path. A duplicated file
//! descriptor gives each task its own stream on the same socket; the kernel
//! closes the connection when both are dropped.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io;
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
