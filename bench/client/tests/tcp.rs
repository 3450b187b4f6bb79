//! The client over TCP against a scripted fake server on loopback: acks cut across reads,
//! reordered, and a connection the server drops.

mod support;

use std::collections::HashSet;
use std::net::TcpListener;
use std::time::Duration;

use shardgate_client::frame::Status;
use shardgate_client::{Client, ClientConfig, Outcome};
use support::{event, resolve, Answer, FakeServer, Style};

const PATIENCE: Duration = Duration::from_secs(10);

fn tcp_config(server: &FakeServer) -> ClientConfig {
    let mut config = support::config(server);
    config.transport = shardgate_client::Transport::Tcp;
    config
}

// Acks written in reverse order and cut in the middle of an ack are reassembled and matched.
#[test]
fn acks_cut_across_reads_are_reassembled() {
    let server = FakeServer::tcp(
        |_, _| Answer::Ack(Status::Accepted),
        Style {
            reverse: true,
            split_writes: true,
        },
    );
    let mut client = Client::connect(tcp_config(&server)).expect("connect");
    for seq in 0..40 {
        client.send(&event(20, seq, b"trade")).expect("send");
    }
    let resolved = resolve(&mut client, 40, PATIENCE);
    let seqs: HashSet<u64> = resolved.iter().map(|r| r.id.seq).collect();
    assert_eq!(seqs.len(), 40);
    assert!(resolved
        .iter()
        .all(|r| r.outcome == Outcome::Stored { first: true } && r.attempts == 1));
    let stats = client.stats();
    assert_eq!(
        (stats.acks, stats.acks_malformed, stats.disconnects),
        (40, 0, 0),
        "{stats:?}"
    );
    assert_eq!(server.log().bad_frames, 0);
}

// When the server drops the connection, the client reconnects and resends what was unanswered.
#[test]
fn dropped_connection_is_reestablished_and_resent() {
    let server = FakeServer::tcp(
        |_, copy| {
            if copy == 1 {
                Answer::Close
            } else {
                Answer::Ack(Status::Duplicate)
            }
        },
        Style::default(),
    );
    let mut client = Client::connect(tcp_config(&server)).expect("connect");
    client.send(&event(21, 1, b"")).expect("send");
    let resolved = resolve(&mut client, 1, PATIENCE);
    assert_eq!(
        (resolved[0].outcome, resolved[0].attempts),
        (Outcome::Stored { first: false }, 2)
    );
    let stats = client.stats();
    assert!(stats.disconnects >= 1 && stats.reconnects >= 1, "{stats:?}");
    assert_eq!(server.log().connections, 2);
}

// A TCP server that is not there is an error at connect, with a lowercase message.
#[test]
fn connect_fails_without_a_server() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let error = Client::connect(ClientConfig::tcp(addr)).err().expect("no server");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("cannot open tcp to {addr}: ")),
        "{message}"
    );
    assert_eq!(message, message.to_lowercase());
}
