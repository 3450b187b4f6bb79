//! Proves authenticated intake end to end: with a secret, only frames with a valid, fresh tag
//! under the current or the rotation secret are stored; everything else is REJECTED and counted,
//! a replay after the dedup window is refused, and an exposed secret file stops the start.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;
use shardgate::wire::auth::player_key;
use shardgate::wire::frame::{encode_action, encode_action_signed, ActionFields, EventId};

const OLD_SECRET: &[u8] = b"old-rotation-secret-0123456789";
const NEW_SECRET: &[u8] = b"new-rotation-secret-0123456789";

fn secret_file(directory: &Path, name: &str, secret: &[u8], mode: u32) -> PathBuf {
    let path = directory.join(name);
    let mut bytes = secret.to_vec();
    bytes.push(b'\n');
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn fields(player_id: u64, seq: u64, client_time_us: u64) -> ActionFields<'static> {
    ActionFields {
        id: EventId { player_id, seq },
        client_time_us,
        action_type: 5,
        payload: b"chest:17",
    }
}

fn signed(secret: &[u8], player_id: u64, seq: u64, client_time_us: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_action_signed(
        &fields(player_id, seq, client_time_us),
        &player_key(secret, player_id),
        &mut out,
    );
    out
}

/// Sends one frame over UDP and returns its one answer.
fn answer(client: &mut UdpClient, frame: &[u8], player_id: u64, seq: u64) -> St {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        client.send_frames(frame);
        let acks = client.recv_acks_until(Instant::now() + Duration::from_millis(500), 1);
        if let Some(ack) = acks.iter().find(|ack| ack.key() == (player_id, seq)) {
            if ack.status != St::Retry || Instant::now() > deadline {
                return ack.status;
            }
        }
        assert!(Instant::now() < deadline, "no answer for ({player_id}, {seq})");
    }
}

/// Valid tags under either rotation secret are stored; missing, forged and stale ones are REJECTED
/// with reason `auth`, and nothing rejected reaches Redis.
#[test]
fn only_valid_fresh_tags_are_stored() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let directory = tempfile::tempdir().unwrap();
    let old = secret_file(directory.path(), "old.secret", OLD_SECRET, 0o600);
    let new = secret_file(directory.path(), "new.secret", NEW_SECRET, 0o400);
    let metrics_port = free_port();
    let server = Server::builder(&redis.url())
        .arg("--metrics", format!("127.0.0.1:{metrics_port}"))
        .extra(&[
            "--auth-secret-file",
            old.to_str().unwrap(),
            "--auth-secret-file",
            new.to_str().unwrap(),
        ])
        .start();
    let mut client = UdpClient::new(server.udp_addr());
    let now_us = unix_us();
    let half_window_us = 300 * 1_000_000;

    assert_eq!(
        answer(&mut client, &signed(OLD_SECRET, 7, 1, now_us), 7, 1),
        St::Accepted
    );
    assert_eq!(
        answer(&mut client, &signed(NEW_SECRET, 7, 2, now_us), 7, 2),
        St::Accepted
    );
    assert_eq!(
        answer(&mut client, &signed(NEW_SECRET, 7, 2, now_us), 7, 2),
        St::Duplicate
    );

    let mut unsigned = Vec::new();
    encode_action(&fields(7, 3, now_us), &mut unsigned);
    let refused = [
        (unsigned, 3),
        (signed(b"attacker-guessed-secret-000000", 7, 4, now_us), 4),
        (signed(OLD_SECRET, 7, 5, now_us - half_window_us - 5_000_000), 5),
        (signed(NEW_SECRET, 7, 6, now_us + half_window_us + 5_000_000), 6),
    ];
    for (frame, seq) in &refused {
        assert_eq!(answer(&mut client, frame, 7, *seq), St::Rejected, "seq {seq}");
    }
    // Another player's key does not sign for player 7.
    let mut stolen = Vec::new();
    encode_action_signed(&fields(7, 8, now_us), &player_key(OLD_SECRET, 8), &mut stolen);
    assert_eq!(answer(&mut client, &stolen, 7, 8), St::Rejected);

    let rejected_auth = metric_sum(
        &scrape_metrics(std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port))),
        "shardgate_frames_rejected_total",
        &[("reason", "auth")],
    );
    assert!(rejected_auth >= 5, "5 auth rejections counted, got {rejected_auth}");
    let stored: Vec<Key> = read_events(&mut redis.connection(), "sg", 16)
        .iter()
        .map(|event| event.key())
        .collect();
    let mut stored_sorted = stored.clone();
    stored_sorted.sort();
    assert_eq!(
        stored_sorted,
        vec![(7, 1), (7, 2)],
        "exactly the two valid events, once each"
    );
}

/// A frame replayed once its dedup marker expired is REJECTED as stale, never stored twice.
#[test]
fn replay_after_the_window_is_refused() {
    let _turn = take_turn(module_path!());
    let redis = RedisServer::start();
    let directory = tempfile::tempdir().unwrap();
    let secret = secret_file(directory.path(), "auth.secret", OLD_SECRET, 0o600);
    let server = Server::builder(&redis.url())
        .arg("--dedup-window-secs", 2)
        .extra(&["--auth-secret-file", secret.to_str().unwrap()])
        .start();
    let mut client = UdpClient::new(server.udp_addr());
    let captured = signed(OLD_SECRET, 9, 1, unix_us());
    assert_eq!(answer(&mut client, &captured, 9, 1), St::Accepted);
    // Past the 2 s marker TTL, and past half the window of freshness.
    std::thread::sleep(Duration::from_millis(2_500));
    let mut marker_keys: Vec<String> = redis::cmd("KEYS").arg("sg:*").query(&mut redis.connection()).unwrap();
    // Streams and the partition count (protocol revision 2) stay; markers expire.
    marker_keys.retain(|key| !key.ends_with(":events") && key != "sg:partitions");
    assert!(marker_keys.is_empty(), "the dedup marker expired: {marker_keys:?}");
    assert_eq!(answer(&mut client, &captured, 9, 1), St::Rejected);
    let stored = read_events(&mut redis.connection(), "sg", 16);
    assert_eq!(stored.len(), 1, "the replay was not stored again");
}

/// A secret file group or others can read stops the start with a clear message and exit 2.
#[test]
fn exposed_secret_file_stops_the_start() {
    let _turn = take_turn(module_path!());
    let directory = tempfile::tempdir().unwrap();
    let exposed = secret_file(directory.path(), "auth.secret", OLD_SECRET, 0o644);
    let run = run_cli(
        &[
            "serve",
            "--cores",
            "0",
            "--udp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--redis",
            "redis://127.0.0.1:1",
            "--auth-secret-file",
            exposed.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_eq!(run.code(), Some(2), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("may be read by group or others (mode 644); chmod 600 it"),
        "{}",
        run.stderr
    );
}
