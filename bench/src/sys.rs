//! The few system calls std does not offer, each behind a safe function: batched datagram
//! sends and receives (`sendmmsg`, `recvmmsg`), kernel receive timestamps, readiness checks
//! (`epoll`), the process's CPU time and the thread's timer slack.
//!
//! Why they matter: the generator shares a 2-core machine with the server and Redis, so every
//! microsecond it spends per frame is taken from what it measures. One thread drives every
//! socket in time slices (see `engine.rs`); these calls let that thread move a slice's
//! datagrams in a few system calls and learn when each reply *arrived* even though it reads
//! them later.
//!
//! All `unsafe` of the crate's engine lives here. Every pointer handed to the kernel points
//! into a buffer borrowed for the length of the call, and every length is the buffer's own.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::io::FromRawFd;
use std::ptr;
use std::time::Duration;

/// Bytes reserved per message for control data: one `SCM_TIMESTAMPNS` (a `timespec`) needs
/// `CMSG_SPACE(16)` = 32 on 64-bit Linux; the rest is headroom for anything else the kernel adds.
const CONTROL_BYTES: usize = 64;

/// Asks the kernel to stamp each datagram or segment this socket receives with the time it
/// arrived (`SO_TIMESTAMPNS`, wall-clock nanoseconds), read back with [`RecvBatch`] or
/// [`recv_stream`]. The first socket of a process to ask turns stamping on for the whole host
/// through deferred kernel work, so replies in the first moment may come unstamped; the caller
/// then uses the time it read them.
pub fn enable_receive_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int and the length passed is its size.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            ptr::from_ref(&on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `UDP_SEGMENT` from linux/udp.h; the libc crate does not export it for glibc targets.
const UDP_SEGMENT: libc::c_int = 103;

/// Makes every send on this UDP socket longer than `segment_bytes` leave as datagrams of
/// `segment_bytes` each (the last may be shorter): UDP generic segmentation offload (Linux
/// 4.18+). The receiver sees the same separate datagrams; the sender pays for one trip through
/// its network stack instead of one per datagram. 0 turns it off.
pub fn set_udp_segment(fd: RawFd, segment_bytes: u16) -> io::Result<()> {
    let value = libc::c_int::from(segment_bytes);
    // SAFETY: `value` is a live c_int and the length passed is its size.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            UDP_SEGMENT,
            ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The wall clock in nanoseconds since the epoch, the clock receive timestamps use.
pub fn realtime_now_ns() -> i128 {
    let now = std::time::SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => since.as_nanos() as i128,
        Err(error) => -(error.duration().as_nanos() as i128),
    }
}

/// The wall-clock arrival time in a message's control data, if the kernel put one there.
///
/// # Safety
/// `header` must describe control data the kernel just wrote (`msg_control` pointing at a
/// live buffer of `msg_controllen` bytes).
unsafe fn arrival_realtime_ns(header: &libc::msghdr) -> Option<i128> {
    // SAFETY: per the caller's contract, the CMSG_* walk stays inside the control buffer.
    unsafe {
        let mut control = libc::CMSG_FIRSTHDR(header);
        while !control.is_null() {
            let entry = &*control;
            let payload_bytes = (entry.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            if entry.cmsg_level == libc::SOL_SOCKET
                && entry.cmsg_type == libc::SCM_TIMESTAMPNS
                && payload_bytes >= size_of::<libc::timespec>()
            {
                let stamp: libc::timespec = ptr::read_unaligned(libc::CMSG_DATA(control).cast());
                return Some(i128::from(stamp.tv_sec) * 1_000_000_000 + i128::from(stamp.tv_nsec));
            }
            control = libc::CMSG_NXTHDR(header, control);
        }
    }
    None
}

/// Sends one message per span of `bytes` on a connected socket, in as few `sendmmsg` calls as
/// the kernel allows, without blocking. Returns how many messages left, and the error that
/// stopped the rest (the caller decides whether to skip the message at that position and go
/// on). With [`set_udp_segment`] on, a message longer than the segment size leaves as several
/// datagrams.
pub fn send_messages(
    fd: RawFd,
    bytes: &[u8],
    spans: &[(usize, usize)],
    scratch: &mut SendScratch,
) -> (usize, Option<io::Error>) {
    scratch.iovecs.clear();
    for &(start, end) in spans {
        let end = end.min(bytes.len());
        let message = &bytes[start.min(end)..end];
        scratch.iovecs.push(libc::iovec {
            iov_base: message.as_ptr().cast_mut().cast(),
            iov_len: message.len(),
        });
    }
    scratch.headers.clear();
    for iovec in &mut scratch.iovecs {
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let mut header: libc::mmsghdr = unsafe { zeroed() };
        header.msg_hdr.msg_iov = ptr::from_mut(iovec);
        header.msg_hdr.msg_iovlen = 1;
        scratch.headers.push(header);
    }
    let mut sent = 0;
    while sent < scratch.headers.len() {
        let remaining = &mut scratch.headers[sent..];
        let count = remaining.len().min(libc::c_uint::MAX as usize) as libc::c_uint;
        // SAFETY: each header points at one iovec in `scratch.iovecs`, each iovec at a slice of
        // `bytes`; all outlive the call, which only reads them (and writes msg_len).
        let result = unsafe { libc::sendmmsg(fd, remaining.as_mut_ptr(), count, libc::MSG_DONTWAIT) };
        if result < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (sent, Some(error));
        }
        if result == 0 {
            return (sent, Some(io::Error::from(io::ErrorKind::WriteZero)));
        }
        sent += result as usize;
    }
    (sent, None)
}

/// Buffers [`send_messages`] reuses between calls, so a send allocates nothing.
#[derive(Default)]
pub struct SendScratch {
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside are rebuilt before every use and never dereferenced after the
// call that filled them; holding stale ones across threads is harmless.
unsafe impl Send for SendScratch {}

/// One received datagram, as [`RecvBatch::datagram`] shows it.
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    /// The datagram was longer than the slot and was cut.
    pub truncated: bool,
    /// When the kernel received it (wall clock, ns since the epoch), if stamped.
    pub arrived_realtime_ns: Option<i128>,
}

/// Buffers for reading up to `slots` datagrams with one `recvmmsg`.
pub struct RecvBatch {
    slot_bytes: usize,
    buffers: Vec<u8>,
    control: Vec<u8>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

// SAFETY: as for SendScratch: the pointers are rebuilt before each call.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `slots` datagrams of at most `slot_bytes` each (both at least 1).
    pub fn new(slots: usize, slot_bytes: usize) -> RecvBatch {
        let (slots, slot_bytes) = (slots.max(1), slot_bytes.max(1));
        RecvBatch {
            slot_bytes,
            buffers: vec![0; slots * slot_bytes],
            control: vec![0; slots * CONTROL_BYTES],
            iovecs: Vec::with_capacity(slots),
            headers: Vec::with_capacity(slots),
            received: 0,
        }
    }

    pub fn slots(&self) -> usize {
        self.buffers.len() / self.slot_bytes
    }

    /// Reads what is waiting on `fd`, without blocking: `Ok(0)` when nothing is. A full batch
    /// (`== slots()`) means more may be waiting.
    pub fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received = 0;
        self.iovecs.clear();
        for slot in self.buffers.chunks_exact_mut(self.slot_bytes) {
            self.iovecs.push(libc::iovec {
                iov_base: slot.as_mut_ptr().cast(),
                iov_len: slot.len(),
            });
        }
        self.headers.clear();
        for (iovec, control) in self.iovecs.iter_mut().zip(self.control.chunks_exact_mut(CONTROL_BYTES)) {
            // SAFETY: an all-zero mmsghdr is valid.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            header.msg_hdr.msg_iov = ptr::from_mut(iovec);
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = control.as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = control.len() as _;
            self.headers.push(header);
        }
        loop {
            // SAFETY: every header points at one iovec over its own slot of `buffers` and at its
            // own `CONTROL_BYTES` of `control`; the kernel writes only within those lengths.
            let result = unsafe {
                libc::recvmmsg(
                    fd,
                    self.headers.as_mut_ptr(),
                    self.headers.len() as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if result >= 0 {
                self.received = result as usize;
                return Ok(self.received);
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(error),
            }
        }
    }

    /// Datagram `index` of the last [`receive`](RecvBatch::receive) (index < its result).
    pub fn datagram(&self, index: usize) -> Datagram<'_> {
        debug_assert!(index < self.received);
        let header = &self.headers[index];
        let length_bytes = (header.msg_len as usize).min(self.slot_bytes);
        let start = index * self.slot_bytes;
        Datagram {
            bytes: &self.buffers[start..start + length_bytes],
            truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            // SAFETY: the kernel filled this header's control buffer in the last receive, and
            // the buffer (`self.control`) is still alive and unchanged.
            arrived_realtime_ns: unsafe { arrival_realtime_ns(&header.msg_hdr) },
        }
    }
}

/// Reads what a stream socket holds into `buffer`, without blocking, with the arrival time of
/// the last segment read (TCP reports one stamp per read: the newest). `Ok((0, _))` is EOF;
/// `WouldBlock` means nothing is waiting.
pub fn recv_stream(fd: RawFd, buffer: &mut [u8]) -> io::Result<(usize, Option<i128>)> {
    let mut control = [0u8; CONTROL_BYTES];
    let mut iovec = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is valid.
    let mut header: libc::msghdr = unsafe { zeroed() };
    header.msg_iov = ptr::from_mut(&mut iovec);
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = control.len() as _;
    loop {
        // SAFETY: the header points at `iovec` (over `buffer`) and at `control`, both alive for
        // the call; the kernel writes only within their lengths.
        let result = unsafe { libc::recvmsg(fd, &mut header, libc::MSG_DONTWAIT) };
        if result >= 0 {
            // SAFETY: the kernel just wrote `control`, which is still alive.
            let arrived = unsafe { arrival_realtime_ns(&header) };
            return Ok((result as usize, arrived));
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Readiness interest of a registered descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Data (or EOF, or an error) to read.
    Read,
    /// A non-blocking connect finished (or failed).
    Write,
}

impl Interest {
    fn events(self) -> u32 {
        match self {
            Interest::Read => (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            Interest::Write => libc::EPOLLOUT as u32,
        }
    }
}

/// An epoll instance used only to ask "which of my sockets have something now?" without
/// blocking: the engine sleeps by the clock, not on readiness, so a burst of replies costs one
/// wake-up, not one per reply.
pub struct Readiness {
    epoll: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Readiness {
    /// Room for `capacity` ready descriptors per check (more stay ready for the next one).
    pub fn new(capacity: usize) -> io::Result<Readiness> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Readiness {
            // SAFETY: `fd` was just created and is owned by nothing else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            // SAFETY: an all-zero epoll_event is valid.
            events: vec![unsafe { zeroed() }; capacity.max(1)],
        })
    }

    fn control(&self, operation: libc::c_int, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: interest.events(),
            u64: token,
        };
        // SAFETY: `event` is alive for the call; the kernel copies it.
        let result = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), operation, fd, &mut event) };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Watches `fd`, reported as `token`.
    pub fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    pub fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    /// Stops watching `fd` (closing it does too, as long as it was never duplicated).
    pub fn remove(&self, fd: RawFd) {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL since Linux 2.6.9.
        let _ = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, ptr::null_mut()) };
    }

    /// The tokens of the descriptors ready right now, into `ready` (cleared first).
    pub fn ready_now(&mut self, ready: &mut Vec<u64>) {
        ready.clear();
        let capacity = self.events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: `events` holds `capacity` writable entries.
        let count = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), capacity, 0) };
        // An error (only EINTR is plausible) reports nothing ready; the next slice looks again.
        for event in self.events.iter().take(usize::try_from(count).unwrap_or(0)) {
            ready.push(event.u64);
        }
    }
}

/// CPU time (user + system) this process has used so far, all threads.
pub fn process_cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes it.
    let mut usage: libc::rusage = unsafe { zeroed() };
    // SAFETY: `usage` is alive for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let time = |value: libc::timeval| {
        Duration::from_secs(u64::try_from(value.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(value.tv_usec).unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Lets this thread's sleeps end at most `slack` after they are due (default 50 µs): the
/// engine's slices are a few hundred µs, and every µs a sleep overruns is added to the latency
/// of the frames due meanwhile. Best effort.
pub fn set_timer_slack(slack: Duration) {
    let nanos = libc::c_ulong::try_from(slack.as_nanos())
        .unwrap_or(libc::c_ulong::MAX)
        .max(1);
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, nanos, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    // Datagrams go out in one call, come back whole, in order, with an arrival time close to
    // the wall clock; an empty socket reads 0 and is reported not ready.
    #[test]
    fn datagrams_round_trip_with_timestamps() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        enable_receive_timestamps(receiver.as_raw_fd()).unwrap();
        // Stamping is switched on by deferred kernel work.
        std::thread::sleep(Duration::from_millis(20));
        let mut readiness = Readiness::new(4).unwrap();
        readiness.add(receiver.as_raw_fd(), 7, Interest::Read).unwrap();
        let mut ready = Vec::new();
        readiness.ready_now(&mut ready);
        assert!(ready.is_empty());

        let before_ns = realtime_now_ns();
        let spans = [(1, 3), (3, 6), (6, 7)];
        let (sent, error) = send_messages(sender.as_raw_fd(), b"xaabbbc", &spans, &mut SendScratch::default());
        assert_eq!((sent, error.is_none()), (3, true));
        std::thread::sleep(Duration::from_millis(20));
        readiness.ready_now(&mut ready);
        assert_eq!(ready, vec![7]);

        let mut batch = RecvBatch::new(2, 2);
        assert_eq!(batch.receive(receiver.as_raw_fd()).unwrap(), 2);
        assert_eq!(batch.datagram(0).bytes, b"aa");
        let cut = batch.datagram(1);
        assert_eq!((cut.bytes, cut.truncated), (&b"bb"[..], true));
        let arrived = cut.arrived_realtime_ns.expect("stamped");
        assert!(arrived >= before_ns - 1_000_000 && arrived <= realtime_now_ns());
        assert_eq!(batch.receive(receiver.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.datagram(0).bytes, b"c");
        assert_eq!(batch.receive(receiver.as_raw_fd()).unwrap(), 0);
    }

    // With segmentation on, one message of 3 × 2 + 1 bytes arrives as 4 datagrams.
    #[test]
    fn segmented_sends_arrive_as_separate_datagrams() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        set_udp_segment(sender.as_raw_fd(), 2).unwrap();
        let (sent, error) = send_messages(sender.as_raw_fd(), b"aabbccd", &[(0, 7)], &mut SendScratch::default());
        assert_eq!((sent, error.is_none()), (1, true));
        std::thread::sleep(Duration::from_millis(20));
        let mut batch = RecvBatch::new(8, 16);
        assert_eq!(batch.receive(receiver.as_raw_fd()).unwrap(), 4);
        let got: Vec<&[u8]> = (0..4).map(|index| batch.datagram(index).bytes).collect();
        assert_eq!(got, vec![&b"aa"[..], b"bb", b"cc", b"d"]);
    }

    // A TCP read reports its bytes and the newest segment's arrival; EOF reads 0.
    #[test]
    fn stream_reads_carry_a_timestamp() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        enable_receive_timestamps(server.as_raw_fd()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut buffer = [0u8; 16];
        let nothing = recv_stream(server.as_raw_fd(), &mut buffer).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);
        client.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (length, arrived) = recv_stream(server.as_raw_fd(), &mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"hello");
        assert!(arrived.is_some());
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(recv_stream(server.as_raw_fd(), &mut buffer).unwrap().0, 0);
    }

    #[test]
    fn cpu_time_advances() {
        let before = process_cpu_time();
        let mut spin = 0u64;
        while process_cpu_time() <= before {
            spin = spin.wrapping_add(1);
        }
        assert!(process_cpu_time() > before, "{spin}");
    }
}
