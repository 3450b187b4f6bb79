//! The only `unsafe` in shardgate: a second handle on an accepted TCP socket,
//! and a counting global allocator for measuring the hot path's allocations.
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
