//! Proves the per-source abuse limits of the transports, each on a one-shard server: a UDP
//! source over its rate gets silence while another source does not notice; one host cannot
//! hold more TCP connections than its cap; an idle TCP connection is closed; a TCP client
//! that never reads its acks is disconnected without the server's memory growing, and its
//! event stays stored. Each closing is counted by reason on /metrics.
//!
//! The tests are several sources at once by binding 127.0.0.2 and 127.0.0.3 (all of
//! 127.0.0.0/8 is local on Linux).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::*;

const ONE_SOURCE: [u8; 4] = [127, 0, 0, 2];
const OTHER_SOURCE: [u8; 4] = [127, 0, 0, 3];

/// Frames of `count` fresh events of `player`, back to back.
fn frames(player: u64, seqs: std::ops::Range<u64>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for seq in seqs {
        Event::new(player, seq, b"abuse").encode_into(&mut bytes);
    }
    bytes
}

/// Reads acks from `stream` until `want` arrived or `deadline`; (acks, closed by the server).
fn read_acks(stream: &mut TcpStream, want: usize, deadline: Instant) -> (Vec<AckMsg>, bool) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    while bytes.len() / 28 < want && Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return (parse_acks(&bytes[..bytes.len() / 28 * 28]), true),
            Ok(read) => bytes.extend_from_slice(&chunk[..read]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (parse_acks(&bytes[..bytes.len() / 28 * 28]), true),
        }
    }
    (parse_acks(&bytes[..bytes.len() / 28 * 28]), false)
}

/// Waits until the server ends the connection (EOF or reset) or `deadline`: true if it did.
fn closed_by_server(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Polls /metrics until `name{filter}` reaches `want` (counts land when a connection's tasks
/// end) or 5 s pass; returns the last value.
fn wait_metric(metrics: SocketAddr, name: &str, filter: &[(&str, &str)], want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric_sum(&scrape_metrics(metrics), name, filter);
        if value >= want || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// A UDP source past its burst gets no answer at all for the rest, counted as limited, while another source is answered in full.
#[test]
fn udp_source_over_its_rate_gets_silence() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--udp-source-frames-per-sec", 1)
        .arg("--udp-source-burst-frames", 5)
        .start();
    let metrics = serving_metrics_address(&server);
    let flooder = udp_socket_from(ONE_SOURCE);
    flooder.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // Redis may still be connecting: wait until a frame of another source is answered stored.
    // (The probe is limited too if Redis takes long: only what follows is counted exactly.)
    let mut probe = UdpClient::new(server.udp_addr());
    let started = Instant::now();
    loop {
        probe.send_frames(&frames(1, 0..1));
        if probe
            .recv_acks(Instant::now() + Duration::from_millis(200))
            .iter()
            .any(|ack| ack.status.is_stored())
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server never stored a frame"
        );
    }
    let limited_before = metric_sum(&scrape_metrics(metrics), "shardgate_frames_limited_total", &[]);

    // 20 frames in one datagram from a source whose bucket holds 5.
    flooder.send_to(&frames(2, 0..20), server.udp_addr()).unwrap();
    let mut acks = Vec::new();
    let mut reply = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok((length, _)) = flooder.recv_from(&mut reply) {
            acks.extend(parse_acks(&reply[..length]));
        }
    }
    let answered: Vec<u64> = acks.iter().map(|ack| ack.seq).collect();
    assert_eq!(
        acks.len(),
        5,
        "the first 5 frames and nothing else are answered: {acks:?}"
    );
    assert!(answered.iter().all(|&seq| seq < 5), "{answered:?}");
    assert!(acks.iter().all(|ack| ack.status.is_stored()), "{acks:?}");

    // Another source still gets every answer.
    let other = udp_socket_from(OTHER_SOURCE);
    other.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    other.send_to(&frames(3, 0..5), server.udp_addr()).unwrap();
    let mut other_acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while other_acks.len() < 5 && Instant::now() < deadline {
        if let Ok((length, _)) = other.recv_from(&mut reply) {
            other_acks.extend(parse_acks(&reply[..length]));
        }
    }
    assert_eq!(other_acks.len(), 5, "{other_acks:?}");

    let body = scrape_metrics(metrics);
    let limited = metric_sum(&body, "shardgate_frames_limited_total", &[("transport", "udp")]);
    assert_eq!(limited - limited_before, 15);
    let received = metric_sum(&body, "shardgate_frames_received_total", &[]);
    let answered = metric_sum(&body, "shardgate_acks_sent_total", &[]);
    assert_eq!(answered + limited, received, "every frame is answered or limited");
}

// One host holds at most --tcp-connections-per-source connections: the next is closed at accept (reason source_limit), another host is not affected, and closing one frees its slot.
#[test]
fn tcp_connections_per_source_cap_one_host() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--tcp-connections-per-source", 3)
        .start();
    let metrics = serving_metrics_address(&server);
    let tcp = server.tcp_addr();
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut held: Vec<TcpStream> = (0..3)
        .map(|n| {
            let mut stream = tcp_connect_from(ONE_SOURCE, tcp).expect("connect");
            // Each is served: its frame is answered (RETRY while Redis connects is an answer too).
            stream.write_all(&frames(10 + n, 0..1)).unwrap();
            let (acks, closed) = read_acks(&mut stream, 1, deadline());
            assert!(acks.len() == 1 && !closed, "connection {n}: {acks:?} closed {closed}");
            stream
        })
        .collect();

    let mut refused = tcp_connect_from(ONE_SOURCE, tcp).expect("the kernel completes the handshake");
    let _ = refused.write_all(&frames(20, 0..1));
    assert!(
        closed_by_server(&mut refused, Instant::now() + Duration::from_secs(5)),
        "a 4th connection from one host was not closed"
    );
    assert_eq!(
        wait_metric(
            metrics,
            "shardgate_tcp_connections_closed_total",
            &[("reason", "source_limit")],
            1
        ),
        1
    );

    let mut other = tcp_connect_from(OTHER_SOURCE, tcp).expect("connect from another host");
    other.write_all(&frames(21, 0..1)).unwrap();
    let (acks, closed) = read_acks(&mut other, 1, deadline());
    assert!(acks.len() == 1 && !closed, "another host: {acks:?} closed {closed}");

    // Closing one of the three frees a slot for the host.
    drop(held.pop());
    assert!(
        wait_metric(
            metrics,
            "shardgate_tcp_connections_closed_total",
            &[("reason", "peer_closed")],
            1
        ) >= 1,
        "the server did not see the close"
    );
    let mut again = tcp_connect_from(ONE_SOURCE, tcp).expect("connect again");
    again.write_all(&frames(22, 0..1)).unwrap();
    let (acks, closed) = read_acks(&mut again, 1, deadline());
    assert!(acks.len() == 1 && !closed, "after a close: {acks:?} closed {closed}");
    let body = scrape_metrics(metrics);
    assert_eq!(
        metric_sum(
            &body,
            "shardgate_tcp_connections_closed_total",
            &[("reason", "source_limit")]
        ),
        1
    );
    assert_eq!(metric_sum(&body, "shardgate_tcp_connections_open", &[]), 4);
}

// A TCP connection that sends nothing for --tcp-idle-timeout-ms is closed (reason idle), while one that keeps sending stays open.
#[test]
fn idle_tcp_connection_is_closed() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--tcp-idle-timeout-ms", 400)
        .start();
    let metrics = serving_metrics_address(&server);
    let tcp = server.tcp_addr();

    let mut idle = tcp_connect_from(ONE_SOURCE, tcp).expect("connect");
    idle.write_all(&frames(30, 0..1)).unwrap();
    let (acks, _) = read_acks(&mut idle, 1, Instant::now() + Duration::from_secs(10));
    assert_eq!(acks.len(), 1, "the first frame is answered");
    let silent_since = Instant::now();

    // Meanwhile another connection sends every 100 ms for 1.5 s: never idle.
    let mut busy = tcp_connect_from(OTHER_SOURCE, tcp).expect("connect");
    for seq in 0..15 {
        busy.write_all(&frames(31, seq..seq + 1)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        closed_by_server(&mut idle, Instant::now() + Duration::from_secs(3)),
        "the idle connection is still open after {:?}",
        silent_since.elapsed()
    );
    let idle_for = silent_since.elapsed();
    assert!(idle_for >= Duration::from_millis(350), "closed after only {idle_for:?}");
    let (acks, closed) = read_acks(&mut busy, 15, Instant::now() + Duration::from_secs(10));
    assert!(
        !closed && acks.len() == 15,
        "the busy connection: {} acks, closed {closed}",
        acks.len()
    );
    assert_eq!(
        wait_metric(
            metrics,
            "shardgate_tcp_connections_closed_total",
            &[("reason", "idle")],
            1
        ),
        1
    );
}

// Clients that send and never read their acks are disconnected after --tcp-write-timeout-ms (reason slow_reader), the server's memory stays bounded meanwhile, and their events stay stored: a resend gets DUPLICATE.
#[test]
fn non_reading_tcp_client_is_disconnected_with_bounded_memory() {
    let _turn = take_turn(module_path!());
    const CLIENTS: usize = 16;
    let redis = RedisServer::start();
    let server = Server::builder(&redis.url())
        .arg("--metrics", "127.0.0.1:0")
        .arg("--tcp-write-timeout-ms", 500)
        .start();
    let metrics = serving_metrics_address(&server);
    let tcp = server.tcp_addr();
    // The one event every client sends, stored first by a reading client.
    let event = Event::new(40, 1, b"stored once");
    let mut reader = TcpClient::connect(tcp).expect("connect");
    let started = Instant::now();
    loop {
        reader.send(&event.frame()).unwrap();
        let acks = reader.recv_acks_until(Instant::now() + Duration::from_secs(2), 1);
        if acks.iter().any(|ack| ack.status.is_stored()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never stored: {acks:?}");
    }
    drop(reader);
    let rss_before = resident_bytes(server.pid());

    // Each client sends copies of the event (each answered DUPLICATE from the cache) as fast as
    // it can and reads nothing, with a small receive buffer so the server's writes stall soon.
    let copies: Vec<u8> = (0..1000).flat_map(|_| event.frame()).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let copies = copies.clone();
            std::thread::spawn(move || {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                socket.set_recv_buffer_size(4096).unwrap();
                socket.connect_timeout(&tcp.into(), Duration::from_secs(2)).unwrap();
                let mut stream: TcpStream = socket.into();
                stream.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
                let started = Instant::now();
                let mut stalled_at = None;
                while started.elapsed() < Duration::from_secs(20) {
                    match stream.write(&copies) {
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                            stalled_at.get_or_insert_with(Instant::now);
                        }
                        // Reset or broken pipe: the server gave up on us.
                        Err(_) => return stalled_at.map(|at| at.elapsed()),
                    }
                }
                panic!("the server never disconnected a client that does not read");
            })
        })
        .collect();
    let mut peak_rss = rss_before;
    while clients.iter().any(|client| !client.is_finished()) {
        peak_rss = peak_rss.max(resident_bytes(server.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    for client in clients {
        let stalled_for = client.join().expect("client thread");
        println!("disconnected {stalled_for:?} after the client's writes first stalled");
        // The write timeout (0.5 s) counts from when the server's writes stall, a little after ours.
        assert!(
            stalled_for.is_some_and(|stalled| stalled < Duration::from_secs(5)),
            "{stalled_for:?}"
        );
    }
    let growth = peak_rss.saturating_sub(rss_before);
    println!("server RSS {rss_before} before, {peak_rss} at most while {CLIENTS} clients did not read");
    assert!(growth < 32 << 20, "RSS grew by {growth} bytes");
    assert_eq!(
        wait_metric(
            metrics,
            "shardgate_tcp_connections_closed_total",
            &[("reason", "slow_reader")],
            CLIENTS as u64
        ),
        CLIENTS as u64
    );

    // The acks they never read were dropped; the event is stored once and a resend is DUPLICATE.
    let mut client = TcpClient::connect(tcp).expect("connect");
    client.send(&event.frame()).unwrap();
    let acks = client.recv_acks_until(Instant::now() + Duration::from_secs(5), 1);
    assert_eq!(acks.first().map(|ack| ack.status), Some(St::Duplicate), "{acks:?}");
    let stored = read_events(&mut redis.connection(), "sg", 16);
    assert_eq!(stored.iter().filter(|s| s.key() == event.key()).count(), 1);
}
