//! Proves the command line contract: help text with defaults, clear start-up failures,
//! `--config` honoured with flags winning over it; plus self-tests of the e2e harness.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// Every documented `serve` flag, with the default its help must show (None: no default).
const FLAGS: &[(&str, Option<&str>)] = &[
    ("--cores", None),
    ("--udp", None),
    ("--tcp", None),
    ("--redis", None),
    ("--config", None),
    ("--placement", Some("pinned")),
    ("--prefix", Some("sg")),
    ("--partitions", Some("16")),
    ("--dedup-window-secs", Some("600")),
    ("--dedup-capacity", None),
    ("--metrics", None),
    ("--hdr-out", None),
    ("--auth-secret-file", None),
    ("--batch-linger-us", Some("1000")),
    ("--drain-timeout-ms", Some("5000")),
    ("--redis-timeout-ms", Some("1000")),
    ("--log-format", Some("text")),
    ("--log-level", Some("info")),
    ("--tcp-connections-per-source", Some("64")),
    ("--tcp-idle-timeout-ms", Some("30000")),
    ("--tcp-write-timeout-ms", Some("10000")),
    ("--udp-source-frames-per-sec", Some("5000")),
    ("--udp-source-burst-frames", Some("10000")),
    ("--udp-source-table-entries", Some("65536")),
];

/// The help block of one flag: its line and the indented lines after it, up to the next flag.
fn flag_block(help: &str, flag: &str) -> Option<String> {
    let lines: Vec<&str> = help.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_start().split([' ', ',', '=']).any(|word| word == flag))?;
    let mut block = vec![lines[start]];
    for l in &lines[start + 1..] {
        let t = l.trim_start();
        if t.starts_with('-') || t.is_empty() || !l.starts_with(' ') {
            break;
        }
        block.push(l);
    }
    Some(block.join("\n"))
}

fn assert_help_lists_flags(help: &str, what: &str) {
    for (flag, default) in FLAGS {
        let block = flag_block(help, flag).unwrap_or_else(|| panic!("{what} does not mention {flag}:\n{help}"));
        if let Some(d) = default {
            let words: HashSet<&str> = block
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .collect();
            assert!(
                words.contains(d),
                "{what}: the help of {flag} does not show its default {d}:\n{block}"
            );
        }
    }
    for mode in ["pinned", "fenced"] {
        let block = flag_block(help, "--placement").expect("--placement");
        assert!(
            block.contains(mode),
            "{what}: --placement does not name {mode}:\n{block}"
        );
    }
}

/// Arguments of a valid `serve` pointing at a port where nothing listens.
fn serve_args(redis_port: u16) -> Vec<String> {
    [
        "serve",
        "--cores",
        "0",
        "--udp",
        "127.0.0.1:0",
        "--tcp",
        "127.0.0.1:0",
        "--redis",
        &format!("redis://127.0.0.1:{redis_port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> CliRun {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&refs, CLI_TIMEOUT)
}

// `shardgate serve --help` names every flag and shows each default.
#[test]
fn serve_help_lists_every_flag_with_default() {
    let _turn = take_turn(module_path!());
    let out = run_cli(&["serve", "--help"], CLI_TIMEOUT);
    assert_eq!(out.code(), Some(0), "serve --help failed: {out:?}");
    assert_help_lists_flags(&out.stdout, "shardgate serve --help");
}

// `shardgate --help` names every flag and shows each default too.
#[test]
fn top_level_help_lists_every_flag_with_default() {
    let _turn = take_turn(module_path!());
    let out = run_cli(&["--help"], CLI_TIMEOUT);
    assert_eq!(out.code(), Some(0), "--help failed: {out:?}");
    assert!(out.stdout.contains("serve"), "--help does not name `serve`");
    assert_help_lists_flags(&out.stdout, "shardgate --help");
}

// A missing or too-short auth secret file stops the start (exit 2), naming the file and the fault.
#[test]
fn bad_auth_secret_file_exits_2() {
    let _turn = take_turn(module_path!());
    use std::os::unix::fs::PermissionsExt;
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing");
    let short = dir.path().join("short");
    std::fs::write(&short, "gala-secret").expect("write secret");
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    for (file, must_name) in [(&missing, "cannot read auth secret file"), (&short, "holds 11 bytes")] {
        let mut args = serve_args(port);
        args.extend(["--auth-secret-file".into(), file.to_str().expect("utf-8").into()]);
        let out = run(&args);
        assert_eq!(out.code(), Some(2), "{}: {out:?}", file.display());
        assert!(out.stderr.contains(must_name), "{}: {out:?}", file.display());
        assert!(
            out.stderr.contains(file.to_str().expect("utf-8")),
            "{}: {out:?}",
            file.display()
        );
    }
}

// A core that does not exist, or a malformed list, fails at start naming the problem.
#[test]
fn bad_cores_fail_clearly() {
    let _turn = take_turn(module_path!());
    let port = free_port();
    for (cores, must_name) in [("99", "99"), ("0,99", "99"), ("x-y", "x-y")] {
        let mut args = serve_args(port);
        args[2] = cores.to_string();
        let out = run(&args);
        let code = out.code();
        assert!(
            code.is_some() && code != Some(0),
            "--cores {cores}: expected a non-zero exit, got {out:?}"
        );
        assert!(
            out.stderr.contains(must_name) && out.stderr.to_lowercase().contains("core"),
            "--cores {cores}: stderr does not name the core: {:?}",
            out.stderr
        );
        assert!(!out.stderr.contains("shardgate: serving"), "--cores {cores} served");
    }
}

// An unparseable --redis URL fails at start (it does not serve and retry forever).
#[test]
fn bad_redis_url_fails_clearly() {
    let _turn = take_turn(module_path!());
    let port = free_port();
    for url in ["not a url", "redis://127.0.0.1:notaport", "redis://[::1"] {
        let mut args = serve_args(port);
        args[8] = url.to_string();
        let out = run(&args);
        let code = out.code();
        assert!(
            code.is_some() && code != Some(0),
            "--redis {url:?}: expected a non-zero exit within {CLI_TIMEOUT:?}, got {out:?}"
        );
        assert!(
            out.stderr.to_lowercase().contains("redis"),
            "--redis {url:?}: stderr does not say what is wrong: {:?}",
            out.stderr
        );
        assert!(!out.stderr.contains("shardgate: serving"), "--redis {url:?} served");
    }
}

// An unknown flag is a usage error.
#[test]
fn unknown_flag_is_usage_error() {
    let _turn = take_turn(module_path!());
    let mut args = serve_args(free_port());
    args.push("--no-such-flag".into());
    let out = run(&args);
    assert_eq!(out.code(), Some(2), "{out:?}");
}

// `--cores 0-1` is a range: two shards serve.
#[test]
fn core_range_runs_one_shard_per_core() {
    let _turn = take_turn(module_path!());
    // Redis need not be up for the server to start.
    let url = format!("redis://127.0.0.1:{}", free_port());
    let mut server = Server::builder(&url).cores("0-1").start();
    assert_eq!(server.shards(), 2, "serving line: {:?}", server.stderr_lines());
    let fenced = Server::builder(&url).cores("0,1").arg("--placement", "fenced").start();
    assert_eq!(fenced.shards(), 2);
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

fn deliver_few(server: &Server, seed: u64, player_base: u64) -> Vec<Event> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let events: Vec<Event> = (0..40)
        .map(|i| Event::random(&mut rng, player_base + i, i, 64))
        .collect();
    deliver_resolved(server, &events, seed, Duration::from_secs(15));
    events
}

// --config is honoured (prefix, partitions, udp, tcp) and flags win over the file.
#[test]
fn config_file_is_honoured_and_flags_win() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("config_file_is_honoured_and_flags_win");
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("shardgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "prefix = \"cfg\"\npartitions = 4\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
             redis = \"{}\"\ncores = \"0\"\n",
            redis.url()
        ),
    )
    .expect("write config");
    let cfg = cfg.to_str().expect("utf-8").to_string();
    let mut conn = redis.connection();

    // 1. Only the file: prefix cfg, 4 partitions, addresses and redis from the file.
    let server = Server::builder("unused")
        .without("--cores")
        .without("--udp")
        .without("--tcp")
        .without("--redis")
        .arg("--config", &cfg)
        .start();
    let events = deliver_few(&server, seed, 1000);
    drop(server);
    let all: HashSet<Key> = events.iter().map(Event::key).collect();
    let stored = read_events(&mut conn, "cfg", 4);
    check_stored(&stored, &events, &all, 4, None, "config file only");
    let keys = stream_keys(&mut conn);
    assert!(
        keys.iter().all(|k| k.starts_with("cfg:{")),
        "streams outside prefix cfg: {keys:?}"
    );
    assert!(keys.len() <= 4, "more than 4 partitions: {keys:?}");

    // 2. File plus flags: --prefix and --partitions on the command line win.
    let server = Server::builder(&redis.url())
        .arg("--config", &cfg)
        .arg("--prefix", "flg")
        .arg("--partitions", "8")
        .start();
    let events2 = deliver_few(&server, seed ^ 1, 5000);
    drop(server);
    let all2: HashSet<Key> = events2.iter().map(Event::key).collect();
    let stored2 = read_events(&mut conn, "flg", 8);
    check_stored(&stored2, &events2, &all2, 8, None, "flags over file");
    assert_eq!(
        read_events(&mut conn, "cfg", 4).len(),
        events.len(),
        "the second run wrote under the file's prefix"
    );
    let keys = stream_keys(&mut conn);
    assert!(
        keys.iter().all(|k| k.starts_with("cfg:{") || k.starts_with("flg:{")),
        "unexpected streams: {keys:?}"
    );
}

// Harness self-test: the raw frame builder, the crate's encoder and protocol.md agree.
#[test]
fn harness_frames_match_protocol_vectors() {
    let _turn = take_turn(module_path!());
    let e1 = Event {
        player: 1,
        seq: 1,
        client_time_us: 0,
        action_type: 0,
        payload: vec![],
    };
    let v1 = "5347010100000000010000000000000001000000000000000000000000000000000000005f487c5d";
    assert_eq!(hex(&e1.frame()), v1);
    assert_eq!(hex(&e1.raw().bytes()), v1);
    let e2 = Event {
        player: 0x0102030405060708,
        seq: 42,
        client_time_us: 1_700_000_000_000_000,
        action_type: 7,
        payload: b"dig:x=3,y=9".to_vec(),
    };
    let v2 = "5347010100000b0008070605040302012a0000000000000000401e18240a0600070000006469673a783d332c793d39e8afc833";
    assert_eq!(hex(&e2.frame()), v2);
    assert_eq!(hex(&e2.raw().bytes()), v2);
    let acks = parse_acks(&unhex(concat!(
        "534701020000000001000000000000000100000000000000bb9dfb71",
        "534701020100000008070605040302012a000000000000001612c88a"
    )));
    assert_eq!(
        acks,
        vec![
            AckMsg {
                status: St::Accepted,
                player: 1,
                seq: 1
            },
            AckMsg {
                status: St::Duplicate,
                player: 0x0102030405060708,
                seq: 42
            }
        ]
    );
}

// Harness self-test: RedisServer with AOF keeps acknowledged writes across SIGKILL and
// restart on the same port; pause/resume stalls and revives it.
#[test]
fn harness_redis_kill_restart_keeps_aof() {
    let _turn = take_turn(module_path!());
    let mut redis = RedisServer::start_with_aof();
    let port = redis.port();
    let mut conn = redis.connection();
    for i in 0..50 {
        let _: String = redis::cmd("XADD")
            .arg("t:{0}:events")
            .arg("*")
            .arg("i")
            .arg(i)
            .query(&mut conn)
            .expect("XADD");
    }
    redis.kill();
    assert!(!redis.is_running());
    assert!(!redis_ping(port, Duration::from_millis(200)), "killed redis answers");
    redis.restart();
    assert_eq!(redis.port(), port);
    let mut conn = redis.connection();
    let n: u64 = redis::cmd("XLEN").arg("t:{0}:events").query(&mut conn).expect("XLEN");
    assert_eq!(n, 50, "AOF did not keep acknowledged writes; log:\n{}", redis.log());

    redis.pause();
    assert!(
        !redis_ping(port, Duration::from_millis(300)),
        "paused redis answered PING"
    );
    redis.resume();
    assert!(redis_ping(port, Duration::from_secs(2)), "resumed redis is silent");

    let plain = RedisServer::start();
    assert_ne!(plain.port(), port);
    let mut c = plain.connection();
    let n: u64 = redis::cmd("DBSIZE").query(&mut c).expect("DBSIZE");
    assert_eq!(n, 0);
}

// Harness self-test: the HDR parser accepts HdrHistogram's format and refuses junk.
#[test]
fn harness_hdr_parser() {
    let _turn = take_turn(module_path!());
    let text = "       Value     Percentile TotalCount 1/(1-Percentile)\n\n\
         \x20      5.000 0.000000000000          1           1.00\n\
         \x20      7.000 0.500000000000          2           2.00\n\
         \x20      9.000 1.000000000000          3\n\
         #[Mean    =        7.000, StdDeviation   =        1.633]\n\
         #[Max     =        9.000, Total count    =            3]\n\
         #[Buckets =           20, SubBuckets     =         2048]\n";
    let s = parse_hdr_percentiles(text).expect("valid");
    assert_eq!((s.rows, s.total_count), (3, 3));
    assert!(parse_hdr_percentiles("hello\n").is_err());
    assert!(parse_hdr_percentiles(&text.replace("#[Max", "#[Nope")).is_err());
}
