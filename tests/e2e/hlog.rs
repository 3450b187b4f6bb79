//! Proves the `.hlog` beside `--hdr-out` is a standard HdrHistogram interval log: HdrHistogram's
//! own Python port (`hdrh.log.HistogramLogReader`, driven by tests/hlog_reader.py) loads every
//! interval of a SIGUSR1 snapshot and of the shutdown log, with the tags, counts and maxima the
//! server answered. The Python package is installed into a venv under target/ by this test,
//! which fails (never skips) when python3, venv or PyPI is unavailable.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The reader under test, pinned so that a new release cannot change the verdict unnoticed.
const HDRHISTOGRAM_REQUIREMENT: &str = "hdrhistogram==0.10.8";
/// Creating the venv and installing the package from PyPI; minutes on a slow mirror.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// Reading one log; seconds at most.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `command`'s output, or a panic naming `what` and `hint` when it cannot start, fails or
/// outlives `timeout` (it is killed then).
fn run_bounded(command: &mut Command, what: &str, hint: &str, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}. {hint}"));
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = Vec::new();
        // Drain stderr on its own thread so that neither pipe fills while the other is read.
        let err_reader = thread::spawn(move || {
            let _ = stderr.read_to_end(&mut err);
            err
        });
        let _ = stdout.read_to_end(&mut out);
        let err = err_reader.join().unwrap_or_default();
        let status = child.wait();
        let _ = done.send(status.map(|status| Output {
            status,
            stdout: out,
            stderr: err,
        }));
    });
    let output = match finished.recv_timeout(timeout) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{what}: waiting for {command:?}: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("{what}: {command:?} did not finish within {timeout:?} (killed). {hint}");
        }
    };
    assert!(
        output.status.success(),
        "{what}: {command:?} exited {}. {hint}\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The venv's python, with the pinned `hdrhistogram` importable. Built once per target dir
/// (target/tmp/hlog-venv) and reused while its marker names the pinned requirement.
fn python_with_hdrh() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hlog-venv");
            let python = venv.join("bin").join("python");
            let marker = venv.join("shardgate-installed");
            let imports = || {
                Command::new(&python)
                    .args(["-c", "import hdrh.log"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success())
            };
            if std::fs::read_to_string(&marker).is_ok_and(|installed| installed == HDRHISTOGRAM_REQUIREMENT)
                && imports()
            {
                return python;
            }
            // A venv from an interrupted or older run: start over.
            let _ = std::fs::remove_dir_all(&venv);
            let started = Instant::now();
            run_bounded(
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
                "creating the venv for the Python HdrHistogram reader",
                "needs python3 with its venv module (Debian: apt-get install python3-venv)",
                INSTALL_TIMEOUT,
            );
            run_bounded(
                Command::new(&python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-input",
                    HDRHISTOGRAM_REQUIREMENT,
                ]),
                "installing the Python HdrHistogram reader",
                "needs PyPI (or a pip mirror configured for python3); this test does not skip without it",
                INSTALL_TIMEOUT,
            );
            assert!(
                imports(),
                "{HDRHISTOGRAM_REQUIREMENT} installed but `import hdrh.log` fails"
            );
            std::fs::write(&marker, HDRHISTOGRAM_REQUIREMENT).expect("write the venv marker");
            println!(
                "installed {HDRHISTOGRAM_REQUIREMENT} into {} in {:?}",
                venv.display(),
                started.elapsed()
            );
            python
        })
        .clone()
}

/// One interval as the Python reader decoded it; values in microseconds.
#[derive(Clone, Debug)]
struct Interval {
    count: u64,
    min: u64,
    max: u64,
    p50: u64,
    p99: u64,
    lowest: u64,
    highest: u64,
    digits: u64,
    start_secs: f64,
    length_secs: f64,
}

/// What hlog_reader.py printed for one log.
#[derive(Debug)]
struct Decoded {
    start_time_secs: f64,
    base_time_secs: f64,
    /// by tag; `lines` counts every interval, so a repeated tag shows as a difference
    intervals: BTreeMap<String, Interval>,
    lines: usize,
}

/// `key=value` tokens of a line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|token| token.split_once('='))
        .collect()
}

fn field<T: std::str::FromStr>(fields: &BTreeMap<&str, &str>, key: &str, line: &str) -> T {
    fields
        .get(key)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// Runs the Python reader on `hlog`; panics with its message if it refuses the file.
fn read_with_python(hlog: &Path) -> Decoded {
    let python = python_with_hdrh();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("hlog_reader.py");
    let text = std::fs::read_to_string(hlog).unwrap_or_else(|e| panic!("{}: {e}", hlog.display()));
    let output = run_bounded(
        Command::new(&python).arg(&script).arg(hlog),
        &format!("the Python HdrHistogram reader on {}", hlog.display()),
        &format!("the log:\n{text}"),
        READ_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{}:\n{stdout}", hlog.display());
    let mut decoded = Decoded {
        start_time_secs: -1.0,
        base_time_secs: -1.0,
        intervals: BTreeMap::new(),
        lines: 0,
    };
    for line in stdout.lines() {
        let values = fields(line);
        if let Some(rest) = line.strip_prefix("interval ") {
            let tag = values.get("tag").unwrap_or_else(|| panic!("no tag= in {line:?}"));
            let interval = Interval {
                count: field(&values, "count", rest),
                min: field(&values, "min", rest),
                max: field(&values, "max", rest),
                p50: field(&values, "p50", rest),
                p99: field(&values, "p99", rest),
                lowest: field(&values, "lowest", rest),
                highest: field(&values, "highest", rest),
                digits: field(&values, "digits", rest),
                start_secs: field(&values, "start", rest),
                length_secs: field(&values, "length", rest),
            };
            decoded.lines += 1;
            decoded.intervals.insert(tag.to_string(), interval);
        } else {
            decoded.start_time_secs = field(&values, "start_time", line);
            decoded.base_time_secs = field(&values, "base_time", line);
        }
    }
    decoded
}

/// `ack`, `redis`, then `ack-shard<N>` and `redis-shard<N>` for every shard.
fn expected_tags(shards: usize) -> Vec<String> {
    let mut tags = vec!["ack".to_string(), "redis".to_string()];
    for shard in 0..shards {
        tags.push(format!("ack-shard{shard}"));
        tags.push(format!("redis-shard{shard}"));
    }
    tags.sort();
    tags
}

/// Checks that hold for every log: one interval per expected tag, the histogram bounds the
/// server uses, sane percentiles, shards adding up to the merged histograms, the interval
/// covering the run so far, and the start time inside the window the server started in.
fn check_decoded(decoded: &Decoded, shards: usize, started_within: (f64, f64), run_secs: f64) {
    let tags: Vec<String> = decoded.intervals.keys().cloned().collect();
    assert_eq!(tags, expected_tags(shards), "tags in the log");
    assert_eq!(decoded.lines, tags.len(), "one interval per tag: {decoded:?}");
    let (earliest, latest) = started_within;
    assert!(
        decoded.start_time_secs >= earliest - 0.001 && decoded.start_time_secs <= latest + 0.001,
        "StartTime {} outside the server's start window {earliest:.3}..{latest:.3}",
        decoded.start_time_secs
    );
    assert_eq!(
        decoded.base_time_secs, decoded.start_time_secs,
        "timestamps are relative to the start"
    );
    for (tag, interval) in &decoded.intervals {
        let context = format!("tag {tag}: {interval:?}");
        assert_eq!(
            (interval.lowest, interval.digits),
            (1, 3),
            "histogram bounds: {context}"
        );
        assert!(interval.highest >= 60_000_000, "highest trackable value: {context}");
        assert_eq!(interval.start_secs, 0.0, "interval starts with the run: {context}");
        assert!(
            interval.length_secs >= 0.0 && interval.length_secs <= run_secs + 0.001,
            "interval length beyond the {run_secs:.3} s the server has run: {context}"
        );
        if interval.count == 0 {
            assert_eq!((interval.min, interval.max), (0, 0), "empty histogram: {context}");
            continue;
        }
        assert!(
            1 <= interval.min
                && interval.min <= interval.p50
                && interval.p50 <= interval.p99
                && interval.p99 <= interval.max,
            "min <= p50 <= p99 <= max: {context}"
        );
        // No answer can take longer than the server has been up (plus HDR's 0.1% rounding up).
        assert!(
            (interval.max as f64) <= run_secs * 1e6 * 1.001 + 1.0,
            "max beyond the run's {run_secs:.3} s: {context}"
        );
    }
    for kind in ["ack", "redis"] {
        let per_shard: u64 = (0..shards)
            .map(|shard| decoded.intervals[&format!("{kind}-shard{shard}")].count)
            .sum();
        let merged = &decoded.intervals[kind];
        assert_eq!(per_shard, merged.count, "{kind}: shards add up to the merged histogram");
        let max_of_shards = (0..shards)
            .map(|shard| decoded.intervals[&format!("{kind}-shard{shard}")].max)
            .max()
            .unwrap_or(0);
        assert_eq!(
            max_of_shards, merged.max,
            "{kind}: the merged max is the largest shard max"
        );
    }
}

/// Sends SIGUSR1 and waits for the `wrote histogram snapshot` line; returns the snapshot's `.hlog`.
fn snapshot(server: &Server) -> PathBuf {
    let prefix = "shardgate: wrote histogram snapshot";
    let written = |server: &Server| -> Vec<String> {
        server
            .stderr_lines()
            .into_iter()
            .filter(|line| line.starts_with(prefix))
            .collect()
    };
    let before = written(server).len();
    server.signal(Signal::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = written(server).get(before) {
            let hgrm = fields(line)
                .get("path")
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("no path= in {line:?}"));
            return hgrm.with_extension("hlog");
        }
        assert!(
            Instant::now() < deadline,
            "no `{prefix}` line within 10 s of SIGUSR1; stderr:\n{}",
            server.stderr_lines().join("\n")
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn unix_secs(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// The Python port reads the snapshot and shutdown logs of a two-shard server fed over UDP and
/// TCP with duplicates: every interval decodes, and the ack counts are the frames answered.
#[test]
fn hlog_loads_in_hdrhistogram_python_reader() {
    let _turn = take_turn(module_path!());
    let seed = test_seed("hlog_loads_in_hdrhistogram_python_reader");
    // Install first: a missing PyPI fails here, before a server is started.
    python_with_hdrh();
    let redis = RedisServer::start();
    let spawned = SystemTime::now();
    let mut server = Server::builder(&redis.url()).cores("0,1").start();
    let serving = SystemTime::now();
    let started_within = (unix_secs(spawned), unix_secs(serving));
    let run_secs = || unix_secs(SystemTime::now()) - started_within.0;
    let shards = server.shards();
    assert_eq!(shards, 2, "two shards, so the per-shard tags are exercised");

    // Before any traffic: every histogram empty, and still a log every reader loads.
    let idle = read_with_python(&snapshot(&server));
    check_decoded(&idle, shards, started_within, run_secs());
    assert!(
        idle.intervals.values().all(|interval| interval.count == 0),
        "nothing answered yet: {idle:?}"
    );

    let mut rng = StdRng::seed_from_u64(seed);
    let events = random_events(&mut rng, 400, 200);
    let report = deliver_all(
        server.udp_addr(),
        server.tcp_addr(),
        &events,
        &DeliverOpts {
            seed,
            min_copies: 1,
            max_copies: 3,
            ..DeliverOpts::default()
        },
    );
    println!("seed {seed}: {}", report.summary());
    assert!(report.unresolved().is_empty(), "seed {seed}: {}", report.summary());
    assert!(
        report.counts.accepted > 0 && report.counts.duplicate > 0,
        "seed {seed}: both first copies and duplicates answered: {}",
        report.summary()
    );
    // Every answer the client received was recorded before it was sent; a lost UDP answer or
    // a late answer to a resend still in flight is the only way the server counts more.
    let exact = report.timeouts == 0 && report.udp_client_drops == 0;
    let received = report.counts.total() as u64;

    let loaded = read_with_python(&snapshot(&server));
    check_decoded(&loaded, shards, started_within, run_secs());
    assert_eq!(loaded.start_time_secs, idle.start_time_secs, "one start time per run");
    let ack = &loaded.intervals["ack"];
    if exact {
        assert_eq!(ack.count, received, "seed {seed}: snapshot acks = answers received");
    } else {
        assert!(
            ack.count >= received,
            "seed {seed}: snapshot acks {ack:?} < answers received {received}"
        );
    }
    assert!(loaded.intervals["redis"].count > 0, "Redis calls recorded: {loaded:?}");
    for shard in 0..shards {
        assert!(
            loaded.intervals[&format!("ack-shard{shard}")].count > 0,
            "seed {seed}: the kernel gives each datagram to a random shard, yet shard {shard} answered none"
        );
    }

    server.terminate();
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status}");
    let run_secs = run_secs();
    let stopped_line = server
        .stderr_lines()
        .into_iter()
        .find(|line| line.starts_with("shardgate: stopped"))
        .expect("a `shardgate: stopped` line");
    let stopped = fields(&stopped_line);
    let answered: u64 = ["accepted", "duplicate", "retry", "rejected"]
        .iter()
        .map(|status| field::<u64>(&stopped, status, &stopped_line))
        .sum();
    let batches: u64 = field(&stopped, "batches", &stopped_line);

    let hgrm = server.hdr_path().to_path_buf();
    let last = read_with_python(&hgrm.with_extension("hlog"));
    check_decoded(&last, shards, started_within, run_secs);
    assert_eq!(last.start_time_secs, idle.start_time_secs, "one start time per run");
    let ack = &last.intervals["ack"];
    assert_eq!(
        ack.count, answered,
        "shutdown log acks = frames the server answered ({stopped_line})"
    );
    if exact {
        assert_eq!(ack.count, received, "seed {seed}: shutdown log acks = answers received");
    }
    assert!(ack.count >= loaded.intervals["ack"].count, "counts only grow");
    assert_eq!(
        last.intervals["redis"].count, batches,
        "one Redis round trip per batch ({stopped_line})"
    );
    // The percentile text beside it, read by the tests' own parser, agrees on count and max.
    for (tag, suffix) in [("ack", ".hgrm"), ("redis", ".redis.hgrm")] {
        let path = hgrm.with_file_name(format!("latency{suffix}"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let summary = parse_hdr_percentiles(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let interval = &last.intervals[tag];
        assert_eq!(
            (summary.total_count, summary.max),
            (interval.count, interval.max as f64),
            "{tag}: {} and the .hlog disagree",
            path.display()
        );
    }
}
