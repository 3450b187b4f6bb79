//! `shardgate-bench reflector`: the raw UDP ceiling of this machine.
//!
//! A UDP echo server that answers every whole ACTION frame with a 28-byte ACCEPTED ack and does
//! nothing else: no crc check, no dedup, no Redis. Pointing `shardgate-bench run` at it (without
//! `--redis`) measures what the generator, the kernel's loopback path and one receiving thread
//! can do together, so shardgate's own results can be read as a share of that ceiling.
//!
//! It answers the way shardgate does, so the generator sees the same traffic shape: the acks of
//! one datagram go back in one reply datagram to its source address, at most
//! [`ACKS_PER_REPLY_MAX`] acks (one MTU) per reply, as shardgate's UDP path coalesces them.
//!
//! It reads and writes in batches with `recvmmsg`/`sendmmsg` on one thread, because one
//! system call per datagram would make the reflector, not the generator, the bottleneck, and
//! the point is to measure the most a single-threaded reader could ever get.
//!
//! `--blocking` is the other reference, the plainest echo server there is: one thread, one
//! blocking `recv_from` and one `send_to` per datagram. The efficiency section of
//! `scripts/bench.sh` sets shardgate's CPU per frame against it, because "what would a
//! do-nothing server written the obvious way cost here" is the bar a middle tier is judged by,
//! while the batched mode shows how much of that is system calls.
//!
//! SIGTERM and SIGINT set a flag; the receive call returns on the signal (the handler is
//! installed without `SA_RESTART`) or within [`RECEIVE_POLL`] at the latest. SIGUSR1 prints the
//! counts so far as one `reflector: counts ...` line on stderr, so a script can read what was
//! served between two moments without stopping the reflector.

use std::io::{self, ErrorKind};
use std::mem::{size_of, MaybeUninit};
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use shardgate_proto::frame::{check, encode_ack, Status, ACK_BYTES};
use socket2::{Domain, Protocol, Socket, Type};

/// Acks in one reply datagram: 50 × 28 = 1400 bytes, under a 1500-byte MTU with headers, the
/// same bound shardgate's UDP replies keep.
pub const ACKS_PER_REPLY_MAX: usize = 50;
/// Bytes of one reply buffer.
const REPLY_BYTES_MAX: usize = ACKS_PER_REPLY_MAX * ACK_BYTES;
/// Largest datagram read. A larger one could only arrive truncated; 64 KiB holds any UDP payload.
const DATAGRAM_BYTES_MAX: usize = 65_536;
/// Most datagrams one `recvmmsg` may return; bounds the buffers at 64 MiB.
pub const BATCH_MAX: usize = 1_024;
/// The receive call wakes at least this often to see the stop flag, in case the signal went to
/// a moment when no receive call was blocked.
const RECEIVE_POLL: Duration = Duration::from_millis(100);
/// Kernel buffers: the default ~200 KiB holds a few hundred datagrams, too few to absorb the
/// moments the reflector thread is descheduled on a busy 2-core host.
const SOCKET_BUFFER_BYTES: usize = 8 << 20;

const EXIT_USAGE: u8 = 2;
const EXIT_SOCKET: u8 = 3;

/// Flags of `shardgate-bench reflector`.
#[derive(Debug, Args)]
pub struct ReflectorArgs {
    /// UDP address to serve, e.g. 127.0.0.1:7800 (port 0 picks a free one, printed when ready).
    #[arg(long, value_name = "ADDR")]
    udp: SocketAddr,

    /// Most datagrams read (and replies written) per system call (1..=1024).
    #[arg(long, value_name = "N", default_value_t = 64)]
    batch: usize,

    /// One blocking `recv_from` and one `send_to` per datagram instead of batches (`--batch`
    /// then does not apply): the plain echo server, for the CPU-per-frame reference.
    #[arg(long)]
    blocking: bool,

    /// Pin the serving thread to this CPU core.
    #[arg(long, value_name = "N")]
    core: Option<usize>,

    /// Serve a non-loopback address. Off by default: the reflector is for measuring this
    /// machine only.
    #[arg(long)]
    allow_remote: bool,
}

/// What the reflector did, printed at exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReflectorStats {
    pub datagrams_received: u64,
    /// Received datagrams that held at least one whole frame and so got a reply.
    pub datagrams_echoed: u64,
    pub replies_sent: u64,
    pub acks_sent: u64,
    /// Replies the kernel refused (e.g. the generator's socket was already closed).
    pub send_errors: u64,
}

/// Set by SIGTERM/SIGINT. A static, because a signal handler can reach nothing else.
static STOP: AtomicBool = AtomicBool::new(false);
/// Set by SIGUSR1: print the counts at the next turn of the serving loop.
static REPORT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    // Only an atomic store: the one thing a signal handler may safely do here.
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_report_signal(_signal: libc::c_int) {
    REPORT.store(true, Ordering::SeqCst);
}

/// Runs the subcommand: serve until SIGTERM or SIGINT, then print the counts.
pub fn command(arguments: ReflectorArgs) -> ExitCode {
    if !(1..=BATCH_MAX).contains(&arguments.batch) {
        return fail(EXIT_USAGE, &format!("--batch must be within 1..={BATCH_MAX}"));
    }
    if !arguments.allow_remote && !arguments.udp.ip().is_loopback() {
        return fail(
            EXIT_USAGE,
            &format!("--udp {} is not a loopback address (see --allow-remote)", arguments.udp),
        );
    }
    if let Some(core) = arguments.core {
        if let Err(error) = pin_to_core(core) {
            return fail(EXIT_USAGE, &format!("cannot pin to core {core}: {error}"));
        }
    }
    if let Err(error) = install_stop_handlers() {
        return fail(EXIT_SOCKET, &format!("cannot install signal handlers: {error}"));
    }
    let socket = match bind(arguments.udp) {
        Ok(socket) => socket,
        Err(error) => return fail(EXIT_SOCKET, &format!("cannot bind udp {}: {error}", arguments.udp)),
    };
    let local = socket.local_addr().map_or(arguments.udp, |address| address);
    let mode = if arguments.blocking { "blocking" } else { "batched" };
    eprintln!("reflector: serving udp={local} mode={mode}");
    let counters = Counters::default();
    let result = if arguments.blocking {
        serve_blocking(&socket, &STOP, &counters)
    } else {
        serve(&socket, arguments.batch, &STOP, &counters)
    };
    let stats = counters.snapshot();
    eprintln!(
        "reflector: stopped; echoed {} datagrams ({} received, {} replies, {} acks, {} send errors)",
        stats.datagrams_echoed, stats.datagrams_received, stats.replies_sent, stats.acks_sent, stats.send_errors
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(EXIT_SOCKET, &format!("receive failed: {error}")),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("shardgate-bench reflector: {message}");
    ExitCode::from(code)
}

/// The reflector's counters; atomics so a test can read them while `serve` runs elsewhere.
#[derive(Debug, Default)]
pub struct Counters {
    datagrams_received: AtomicU64,
    datagrams_echoed: AtomicU64,
    replies_sent: AtomicU64,
    acks_sent: AtomicU64,
    send_errors: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> ReflectorStats {
        ReflectorStats {
            datagrams_received: self.datagrams_received.load(Ordering::Relaxed),
            datagrams_echoed: self.datagrams_echoed.load(Ordering::Relaxed),
            replies_sent: self.replies_sent.load(Ordering::Relaxed),
            acks_sent: self.acks_sent.load(Ordering::Relaxed),
            send_errors: self.send_errors.load(Ordering::Relaxed),
        }
    }

    fn add(counter: &AtomicU64, amount: u64) {
        // One writer (the serving thread): a load and a store, no locked instruction.
        counter.store(counter.load(Ordering::Relaxed) + amount, Ordering::Relaxed);
    }

    /// Prints the counts if SIGUSR1 asked for them since the last call. Called once per turn
    /// of a serving loop, between system calls, so the line is at most one turn late.
    fn report_if_asked(&self) {
        if REPORT.swap(false, Ordering::Relaxed) {
            let stats = self.snapshot();
            eprintln!(
                "reflector: counts datagrams_received={} datagrams_echoed={} replies_sent={} acks_sent={} send_errors={}",
                stats.datagrams_received, stats.datagrams_echoed, stats.replies_sent, stats.acks_sent, stats.send_errors
            );
        }
    }
}

/// Calls `emit` with the ack of each whole ACTION frame at the front of `datagram`, in order,
/// and returns how many. Stops at the first bytes that are not a whole frame: after them no
/// frame boundary can be trusted (shardgate would answer some of those REJECTED; the reflector
/// only measures the accepted path, so it answers nothing there). Never panics.
pub fn acks_for_datagram(datagram: &[u8], mut emit: impl FnMut([u8; ACK_BYTES])) -> usize {
    let mut rest = datagram;
    let mut acks = 0;
    while let Ok(header) = check(rest) {
        emit(encode_ack(Status::Accepted, header.id));
        acks += 1;
        // check() promises frame_bytes <= rest.len() on Ok; get() keeps that unprovable step safe.
        rest = rest.get(header.frame_bytes..).unwrap_or_default();
    }
    acks
}

/// Binds the serving socket with large kernel buffers.
pub fn bind(address: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(address), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.rmem_max/wmem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&address.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(RECEIVE_POLL))?;
    Ok(socket)
}

/// Serves `socket` until `stop` is set. `batch` is clamped to `1..=BATCH_MAX`.
pub fn serve(socket: &UdpSocket, batch: usize, stop: &AtomicBool, counters: &Counters) -> io::Result<()> {
    let batch = batch.clamp(1, BATCH_MAX);
    let mut receive = Batch::new(batch, DATAGRAM_BYTES_MAX);
    // One reply per received datagram is the usual case; a datagram with more than 50 frames
    // needs several, and a full reply batch is simply flushed before more are built.
    let mut replies = Batch::new(batch, REPLY_BYTES_MAX);
    let descriptor = {
        use std::os::fd::AsRawFd;
        socket.as_raw_fd()
    };
    while !stop.load(Ordering::Relaxed) {
        counters.report_if_asked();
        let received = match receive.receive(descriptor) {
            Ok(received) => received,
            Err(error) if is_transient(&error) => continue,
            Err(error) => return Err(error),
        };
        Counters::add(&counters.datagrams_received, received as u64);
        let mut echoed = 0u64;
        for index in 0..received {
            let (datagram, source) = receive.message(index);
            let mut answered_any = false;
            acks_for_datagram(datagram, |ack| {
                answered_any = true;
                if !replies.append(source, &ack, REPLY_BYTES_MAX) {
                    replies.flush(descriptor, counters);
                    // An empty batch always takes an ack.
                    let _ = replies.append(source, &ack, REPLY_BYTES_MAX);
                }
            });
            // The next datagram's acks start a new reply: a reply goes to one address.
            replies.seal();
            echoed += u64::from(answered_any);
        }
        replies.flush(descriptor, counters);
        Counters::add(&counters.datagrams_echoed, echoed);
    }
    Ok(())
}

/// Serves `socket` until `stop` is set, the obvious way: one blocking `recv_from`, then one
/// `send_to` per reply (one per datagram unless it held more than [`ACKS_PER_REPLY_MAX`]
/// frames). Buffers are allocated once, before the loop.
pub fn serve_blocking(socket: &UdpSocket, stop: &AtomicBool, counters: &Counters) -> io::Result<()> {
    let mut datagram = vec![0u8; DATAGRAM_BYTES_MAX];
    let mut reply: Vec<u8> = Vec::with_capacity(REPLY_BYTES_MAX);
    while !stop.load(Ordering::Relaxed) {
        counters.report_if_asked();
        let (length, source) = match socket.recv_from(&mut datagram) {
            Ok(received) => received,
            Err(error) if is_transient(&error) => continue,
            Err(error) => return Err(error),
        };
        Counters::add(&counters.datagrams_received, 1);
        let acks = acks_for_datagram(&datagram[..length], |ack| {
            if reply.len() + ACK_BYTES > REPLY_BYTES_MAX {
                send_reply(socket, &reply, source, counters);
                reply.clear();
            }
            reply.extend_from_slice(&ack);
        });
        if !reply.is_empty() {
            send_reply(socket, &reply, source, counters);
            reply.clear();
        }
        Counters::add(&counters.datagrams_echoed, u64::from(acks > 0));
    }
    Ok(())
}

/// Sends one reply with `send_to`, again if a signal interrupted it; any other refusal is
/// counted and the reply dropped, as the batched mode and shardgate drop a refused reply.
fn send_reply(socket: &UdpSocket, reply: &[u8], destination: SocketAddr, counters: &Counters) {
    loop {
        match socket.send_to(reply, destination) {
            Ok(_) => {
                Counters::add(&counters.replies_sent, 1);
                Counters::add(&counters.acks_sent, (reply.len() / ACK_BYTES) as u64);
                return;
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                Counters::add(&counters.send_errors, 1);
                return;
            }
        }
    }
}

/// Errors after which serving goes on: the poll timeout, a signal, and ICMP errors reported
/// on the socket for an earlier reply (e.g. port unreachable when a generator lane closed).
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted | ErrorKind::ConnectionRefused
    ) || error.raw_os_error() == Some(libc::EHOSTUNREACH)
        || error.raw_os_error() == Some(libc::ENETUNREACH)
}

/// Fixed buffers and headers for one `recvmmsg` or `sendmmsg` call. Every pointer in
/// `headers` points into this struct's own boxed slices, which never move or grow after
/// `new`, so the headers stay valid for the struct's life.
struct Batch {
    buffers: Box<[u8]>,
    buffer_bytes: usize,
    addresses: Box<[libc::sockaddr_storage]>,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    /// Send side: messages built so far, and whether the last one is still open for more acks.
    built: usize,
    open: bool,
}

impl Batch {
    fn new(slots: usize, buffer_bytes: usize) -> Batch {
        let mut buffers = vec![0u8; slots * buffer_bytes].into_boxed_slice();
        // SAFETY: sockaddr_storage is plain data for which all-zero bytes are a valid value.
        let mut addresses: Box<[libc::sockaddr_storage]> = (0..slots)
            .map(|_| unsafe { MaybeUninit::zeroed().assume_init() })
            .collect();
        let mut iovecs: Box<[libc::iovec]> = (0..slots)
            .map(|slot| libc::iovec {
                iov_base: buffers[slot * buffer_bytes..].as_mut_ptr().cast(),
                iov_len: buffer_bytes,
            })
            .collect();
        let headers: Box<[libc::mmsghdr]> = (0..slots)
            .map(|slot| {
                // SAFETY: mmsghdr is plain data (pointers and integers); all-zero is valid.
                let mut header: libc::mmsghdr = unsafe { MaybeUninit::zeroed().assume_init() };
                header.msg_hdr.msg_name = (&mut addresses[slot] as *mut libc::sockaddr_storage).cast();
                header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                header.msg_hdr.msg_iov = &mut iovecs[slot];
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        Batch {
            buffers,
            buffer_bytes,
            addresses,
            iovecs,
            headers,
            built: 0,
            open: false,
        }
    }

    /// Waits for at least one datagram, then takes as many as are ready, up to the batch size.
    fn receive(&mut self, descriptor: libc::c_int) -> io::Result<usize> {
        for (header, iovec) in self.headers.iter_mut().zip(self.iovecs.iter_mut()) {
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_flags = 0;
            header.msg_len = 0;
            iovec.iov_len = self.buffer_bytes;
        }
        // SAFETY: the headers point into buffers this struct owns (see the struct's comment),
        // each iovec covers exactly its own slot, and the count is the headers' length.
        let received = unsafe {
            libc::recvmmsg(
                descriptor,
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(received as usize)
    }

    /// The bytes and source of received message `index` (< what `receive` returned).
    fn message(&self, index: usize) -> (&[u8], Source) {
        let header = &self.headers[index];
        let length = (header.msg_len as usize).min(self.buffer_bytes);
        let start = index * self.buffer_bytes;
        let source = Source {
            address: self.addresses[index],
            length: header.msg_hdr.msg_namelen,
        };
        (&self.buffers[start..start + length], source)
    }

    /// Adds `bytes` to the open reply for `destination`, opening a new one if needed. False when
    /// every slot is taken: flush, then append again.
    fn append(&mut self, destination: Source, bytes: &[u8], reply_bytes_max: usize) -> bool {
        if self.open && self.iovecs[self.built - 1].iov_len + bytes.len() > reply_bytes_max {
            self.seal();
        }
        if !self.open {
            if self.built == self.headers.len() {
                return false;
            }
            let slot = self.built;
            self.addresses[slot] = destination.address;
            self.headers[slot].msg_hdr.msg_namelen = destination.length;
            self.iovecs[slot].iov_len = 0;
            self.built += 1;
            self.open = true;
        }
        let slot = self.built - 1;
        let used = self.iovecs[slot].iov_len;
        let start = slot * self.buffer_bytes + used;
        self.buffers[start..start + bytes.len()].copy_from_slice(bytes);
        self.iovecs[slot].iov_len = used + bytes.len();
        true
    }

    /// Closes the open reply: the next append starts another.
    fn seal(&mut self) {
        self.open = false;
    }

    /// Sends every built reply. A reply the kernel refuses is counted and skipped: a UDP reply
    /// is never retried, exactly as shardgate does not retry one.
    fn flush(&mut self, descriptor: libc::c_int, counters: &Counters) {
        let mut first = 0;
        while first < self.built {
            // SAFETY: as in `receive`; only the built headers [first, built) are passed, and
            // each one's iovec length is within its slot.
            let sent = unsafe {
                libc::sendmmsg(
                    descriptor,
                    self.headers[first..].as_mut_ptr(),
                    (self.built - first) as libc::c_uint,
                    0,
                )
            };
            if sent < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == ErrorKind::Interrupted {
                    continue;
                }
                // The first remaining reply failed; skip it and send the rest.
                Counters::add(&counters.send_errors, 1);
                first += 1;
                continue;
            }
            for header in &self.headers[first..first + sent as usize] {
                Counters::add(&counters.replies_sent, 1);
                Counters::add(&counters.acks_sent, (header.msg_len as usize / ACK_BYTES) as u64);
            }
            first += sent as usize;
        }
        self.built = 0;
        self.open = false;
    }
}

/// A datagram's source address as the kernel gave it.
#[derive(Clone, Copy)]
struct Source {
    address: libc::sockaddr_storage,
    length: libc::socklen_t,
}

/// SIGTERM and SIGINT set [`STOP`], SIGUSR1 sets [`REPORT`]. Without `SA_RESTART`, so a
/// blocked receive returns `EINTR` at once instead of after the poll timeout.
fn install_stop_handlers() -> io::Result<()> {
    let handlers: [(libc::c_int, extern "C" fn(libc::c_int)); 3] = [
        (libc::SIGTERM, on_stop_signal),
        (libc::SIGINT, on_stop_signal),
        (libc::SIGUSR1, on_report_signal),
    ];
    for (signal, handler) in handlers {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe; sigemptyset and sigaction get valid pointers.
        unsafe {
            let mut action: libc::sigaction = MaybeUninit::zeroed().assume_init();
            action.sa_sigaction = handler as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Pins the calling thread to one CPU core.
pub fn pin_to_core(core: usize) -> io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(ErrorKind::InvalidInput, "core number out of range"));
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET is given an index below CPU_SETSIZE (checked
    // above); sched_setaffinity gets the set's real size, and pid 0 means this thread.
    unsafe {
        let mut set: libc::cpu_set_t = MaybeUninit::zeroed().assume_init();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_proto::frame::{decode_ack, encode_action, ActionFields, EventId};
    use std::sync::Arc;

    fn frame(player_id: u64, seq: u64, payload_bytes: usize, out: &mut Vec<u8>) {
        encode_action(
            &ActionFields {
                id: EventId { player_id, seq },
                client_time_us: 1,
                action_type: 2,
                payload: &vec![7; payload_bytes],
            },
            out,
        );
    }

    fn acks_of(datagram: &[u8]) -> Vec<EventId> {
        let mut ids = Vec::new();
        let count = acks_for_datagram(datagram, |ack| {
            let ack = decode_ack(&ack).unwrap();
            assert_eq!(ack.status, Status::Accepted);
            ids.push(ack.id);
        });
        assert_eq!(count, ids.len());
        ids
    }

    // Every whole frame gets an ACCEPTED ack with its id, in order.
    #[test]
    fn acks_each_whole_frame() {
        let mut datagram = Vec::new();
        frame(1, 10, 0, &mut datagram);
        frame(2, 20, 64, &mut datagram);
        frame(3, 30, 1024, &mut datagram);
        let ids = acks_of(&datagram);
        assert_eq!(
            ids,
            [(1, 10), (2, 20), (3, 30)].map(|(player_id, seq)| EventId { player_id, seq })
        );
    }

    // A cut tail, garbage and an empty datagram get nothing; frames before the fault still do.
    #[test]
    fn stops_at_the_first_fault() {
        let mut datagram = Vec::new();
        frame(1, 1, 8, &mut datagram);
        frame(2, 2, 8, &mut datagram);
        let whole = datagram.len();
        assert_eq!(acks_of(&datagram[..whole - 1]).len(), 1);
        assert_eq!(acks_of(&datagram[..30]).len(), 0);
        assert_eq!(acks_of(&[]).len(), 0);
        assert_eq!(acks_of(b"GET / HTTP/1.1\r\n\r\n").len(), 0);
        let mut garbage_after = datagram.clone();
        garbage_after.extend_from_slice(&[0xff; 100]);
        frame(3, 3, 8, &mut garbage_after);
        assert_eq!(acks_of(&garbage_after).len(), 2);
    }

    // Replies hold at most 50 acks, go to their datagram's source, and a full batch flushes.
    #[test]
    fn replies_are_coalesced_and_bounded() {
        let mut batch = Batch::new(2, REPLY_BYTES_MAX);
        // SAFETY: all-zero sockaddr_storage is valid.
        let source = Source {
            address: unsafe { MaybeUninit::zeroed().assume_init() },
            length: 16,
        };
        let ack = [1u8; ACK_BYTES];
        for _ in 0..ACKS_PER_REPLY_MAX {
            assert!(batch.append(source, &ack, REPLY_BYTES_MAX));
        }
        assert_eq!((batch.built, batch.iovecs[0].iov_len), (1, REPLY_BYTES_MAX));
        assert!(batch.append(source, &ack, REPLY_BYTES_MAX));
        assert_eq!((batch.built, batch.iovecs[1].iov_len), (2, ACK_BYTES));
        batch.seal();
        assert!(!batch.append(source, &ack, REPLY_BYTES_MAX), "both slots are taken");
    }

    /// Serves over loopback with `serve` on its own thread: 60 frames in one datagram and one
    /// junk datagram in; returns the acked seqs in order of arrival and the final counts.
    fn echo_over_loopback(
        serve: impl FnOnce(&UdpSocket, &AtomicBool, &Counters) -> io::Result<()> + Send + 'static,
    ) -> (Vec<u64>, ReflectorStats) {
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let server = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::spawn(move || serve(&socket, &stop, &counters))
        };
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(address).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut datagram = Vec::new();
        for seq in 1..=60 {
            frame(9, seq, 16, &mut datagram);
        }
        client.send(&datagram).unwrap();
        client.send(b"junk").unwrap();
        let mut acked = Vec::new();
        let mut buffer = [0u8; 2048];
        while acked.len() < 60 {
            let length = client.recv(&mut buffer).unwrap();
            assert!(length <= REPLY_BYTES_MAX && length % ACK_BYTES == 0);
            acked.extend(
                buffer[..length]
                    .chunks_exact(ACK_BYTES)
                    .map(|ack| decode_ack(ack).unwrap().id.seq),
            );
        }
        // The junk datagram is counted as received but never answered.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while counters.snapshot().datagrams_received < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::SeqCst);
        server.join().unwrap().unwrap();
        (acked, counters.snapshot())
    }

    /// What both modes must report for `echo_over_loopback`'s traffic: 60 acks in two replies
    /// (50 + 10), the junk received but not echoed.
    const LOOPBACK_STATS: ReflectorStats = ReflectorStats {
        datagrams_received: 2,
        datagrams_echoed: 1,
        replies_sent: 2,
        acks_sent: 60,
        send_errors: 0,
    };

    // End to end over loopback, batched: frames in, acks out, counts kept, stop honoured.
    #[test]
    fn serves_over_loopback() {
        let (acked, stats) = echo_over_loopback(|socket, stop, counters| serve(socket, 4, stop, counters));
        assert_eq!(acked, (1..=60).collect::<Vec<_>>());
        assert_eq!(stats, LOOPBACK_STATS);
    }

    // The blocking echo answers the same traffic with the same replies and counts.
    #[test]
    fn blocking_mode_serves_over_loopback() {
        let (acked, stats) = echo_over_loopback(serve_blocking);
        assert_eq!(acked, (1..=60).collect::<Vec<_>>());
        assert_eq!(stats, LOOPBACK_STATS);
    }
}
