//! Starting the shards, stopping them, and what the process says about it.
//!
//! Start: check the cores, raise RLIMIT_MEMLOCK, pick the shared ports, start
//! one executor per core. Each shard binds its UDP socket and builds its state,
//! then waits at a start gate; only when every shard is ready do they listen on
//! TCP, so the TCP port accepts connections once every shard is serving. Then
//! one line `shardgate: serving shards=N udp=ADDR tcp=ADDR` goes to stderr.
//!
//! Stop: SIGTERM and SIGINT are blocked in every thread and taken by a
//! dedicated thread with `sigwait`, which sets one flag. Each shard notices it
//! within `SHUTDOWN_POLL_MS`, stops reading, drains what is in flight (bounded
//! by `drain_timeout_ms`), answers every copy, and returns its statistics and
//! histograms; the histograms are then written to `--hdr-out`. When another
//! process has joined the UDP group (a rolling restart), each shard first
//! leaves it, and TCP listeners close as intake ends, so new traffic goes to
//! the other process; UDP answers of the drain then go unsent (clients resend).

use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use glommio::LocalExecutorBuilder;
use nix::sys::signal::{SigSet, Signal};

use crate::host::config::Config;
use crate::host::placement;
use crate::host::sdnotify::{self, Heartbeats, Notifier};
use crate::intake::tcp::Connections;
use crate::intake::udp::{GroupShare, UdpIo};
use crate::pipeline::dedup::{new_cache, DedupReader, DedupWriter};
use crate::pipeline::shard::Shard;
use crate::pipeline::Outage;
use crate::redis::store::{Store, TimeDriver};
use crate::telemetry::latency::{self, Latency};
use crate::telemetry::metrics::{RetryCause, ShardMetrics};
use crate::telemetry::snapshot::Snapshots;
use crate::wire::frame::Status;

/// How long a starting shard waits for Redis to check the partition count
/// before it serves anyway (answering RETRY until Redis comes).
const STARTUP_REDIS_WAIT: Duration = Duration::from_secs(1);

/// Glommio's default io_uring buffer memory per shard, plus headroom.
const MEMLOCK_BYTES_PER_SHARD: u64 = 16 << 20;

/// Why the server could not start, or stopped with an error.
#[derive(Debug)]
pub struct ServerError {
    message: String,
    exit_code: u8,
}

impl fmt::Display for ServerError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl ServerError {
    fn failed(message: String) -> ServerError {
        ServerError { message, exit_code: 1 }
    }

    /// A start refused because serving would break the contract (a partition
    /// count that differs from the recorded one): exit code 2, like a bad flag.
    fn refused(message: String) -> ServerError {
        ServerError { message, exit_code: 2 }
    }

    /// The process's exit code for this error.
    pub fn exit_code(&self) -> u8 {
        self.exit_code
    }
}

impl std::error::Error for ServerError {}

impl From<crate::host::config::ConfigError> for ServerError {
    fn from(error: crate::host::config::ConfigError) -> ServerError {
        ServerError::failed(error.to_string())
    }
}

/// What a shard hands back when it stops.
pub struct ShardReport {
    pub metrics: Arc<ShardMetrics>,
    pub latency: Latency,
    pub drained_events: usize,
    pub cache_events: usize,
}

/// Runs until SIGTERM/SIGINT, then drains and writes the histograms.
pub fn run(config: Config) -> Result<(), ServerError> {
    let started = SystemTime::now();
    let signals = block_signals()?;
    let (config, ports) = prepare_host(config)?;
    let process = Process::start(&config, signals, started)?;
    let shards = start_shards(&config, &process.common, &process.metrics)?;
    let serving = wait_until_serving(
        &config,
        &process.start_events,
        &process.common.gate,
        &process.common.stop,
    );
    // Every shard has bound the ports by now (or the start failed): the placeholders can go.
    drop(ports);
    let allocations_at_serving = crate::sys::allocations();
    if serving.is_ok() {
        announce_serving(&config, &process)?;
    }
    let reports = join_shards(shards);
    serving?;
    let frames = reports.iter().map(|report| report.metrics.frames()).sum();
    report_allocations(allocations_at_serving, frames);
    finish(&config, &reports, started)
}

/// Checks the cores against the cgroup's cpuset, raises RLIMIT_MEMLOCK and
/// picks the shared ports. The config returned has the picked ports in place
/// of port 0; the ports stay held until the shards have bound them.
fn prepare_host(config: Config) -> Result<(Arc<Config>, SharedPorts), ServerError> {
    let allowed = crate::host::cpuset::allowed()?;
    allowed.check(&config.cores)?;
    let memlock_bytes = raise_memlock(config.cores.len());
    let ports = SharedPorts::pick(config.udp, config.tcp)?;
    let config = Arc::new(Config {
        udp: ports.udp,
        tcp: ports.tcp,
        ..config
    });
    tracing::info!(config = ?*config, memlock_bytes, allowed_cores = %allowed.cores_text(), allowed_from = %allowed.source_name(), "starting");
    Ok((config, ports))
}

/// The process-wide parts the shards run beside, alive until `run` returns.
struct Process {
    notifier: Arc<Notifier>,
    metrics: Vec<Arc<ShardMetrics>>,
    /// Where the Prometheus exporter listens, with `--metrics`.
    metrics_address: Option<SocketAddr>,
    /// The shards' (and the signal thread's) startup messages.
    start_events: mpsc::Receiver<StartEvent>,
    common: ShardCommon,
}

impl Process {
    /// Starts the timer thread, the metrics exporter, the snapshot thread and
    /// the signal thread, in that order.
    fn start(config: &Config, signals: SigSet, started: SystemTime) -> Result<Process, ServerError> {
        let notifier = Arc::new(Notifier::from_env());
        // fred's timers; the thread runs as long as the process.
        let time_driver =
            TimeDriver::start().map_err(|error| ServerError::failed(format!("cannot start timer thread: {error}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let metrics: Vec<Arc<ShardMetrics>> = config.cores.iter().map(|_| Arc::default()).collect();
        let metrics_address = match config.metrics {
            Some(address) => Some(start_exporter(address, &metrics)?),
            None => None,
        };
        let snapshots = Snapshots::start(config.hdr_out.clone(), config.cores.len(), started)
            .map_err(|error| ServerError::failed(format!("cannot start the snapshot thread: {error}")))?;
        let (events, start_events) = mpsc::channel();
        spawn_signal_thread(
            signals,
            Arc::clone(&stop),
            events.clone(),
            snapshots.clone(),
            Arc::clone(&notifier),
            metrics.clone(),
        )?;
        let common = ShardCommon {
            stop,
            gate: Arc::new(StartGate::default()),
            events,
            snapshots,
            timers: time_driver.handle(),
            heartbeats: Heartbeats::new(config.cores.len()),
        };
        Ok(Process {
            notifier,
            metrics,
            metrics_address,
            start_events,
            common,
        })
    }
}

fn start_exporter(address: SocketAddr, metrics: &[Arc<ShardMetrics>]) -> Result<SocketAddr, ServerError> {
    crate::telemetry::exporter::start(address, metrics.to_vec())
        .map_err(|error| ServerError::failed(format!("cannot serve metrics on {address}: {error}")))
}

/// The `serving` log line, then READY=1 to systemd.
fn announce_serving(config: &Config, process: &Process) -> Result<(), ServerError> {
    let metrics = process
        .metrics_address
        .map(|address| address.to_string())
        .unwrap_or_else(|| "off".into());
    tracing::info!(
        shards = config.cores.len(),
        udp = %config.udp,
        tcp = %config.tcp,
        placement = config.placement.name(),
        cores = ?config.cores,
        redis = %config.redis_url,
        redis_mode = if config.redis_url.is_cluster() { "cluster" } else { "standalone" },
        metrics,
        "serving"
    );
    let common = &process.common;
    tell_systemd_serving(config, &process.notifier, common.heartbeats.clone(), &common.stop)
}

/// Waits for every shard to stop. A shard that failed or panicked is logged
/// and has no report.
fn join_shards(shards: Vec<ShardHandle>) -> Vec<ShardReport> {
    let mut reports = Vec::with_capacity(shards.len());
    for (index, handle) in shards.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(error)) => tracing::error!(shard = index, %error, "shard failed"),
            Err(error) => tracing::error!(shard = index, %error, "shard panicked"),
        }
    }
    reports
}

/// READY=1 once every shard serves, and the watchdog pings if systemd asked
/// for them (`sdnotify.rs`). Outside systemd this does nothing.
fn tell_systemd_serving(
    config: &Config,
    notifier: &Arc<Notifier>,
    heartbeats: Heartbeats,
    stop: &Arc<AtomicBool>,
) -> Result<(), ServerError> {
    if !notifier.is_enabled() {
        return Ok(());
    }
    notifier.send(&format!(
        "READY=1\nSTATUS=serving {} shards ({}) udp {} tcp {}",
        config.cores.len(),
        config.placement.name(),
        config.udp,
        config.tcp
    ));
    let Some(timeout) = sdnotify::watchdog_timeout() else {
        return Ok(());
    };
    tracing::info!(watchdog_ms = timeout.as_millis() as u64, "systemd watchdog on");
    sdnotify::spawn_watchdog(Arc::clone(notifier), timeout, heartbeats, Arc::clone(stop))
        .map_err(|error| ServerError::failed(format!("cannot start the watchdog thread: {error}")))
}

/// With the `count-allocations` feature: heap use while serving, per frame.
fn report_allocations(at_serving: (u64, u64), frames: u64) {
    if !cfg!(feature = "count-allocations") {
        return;
    }
    let (allocations_now, bytes_now) = crate::sys::allocations();
    let allocations = allocations_now - at_serving.0;
    let allocated_bytes = bytes_now - at_serving.1;
    let per_frame = |total: u64| if frames == 0 { 0.0 } else { total as f64 / frames as f64 };
    tracing::info!(
        frames,
        allocations,
        allocated_bytes,
        allocations_per_frame = per_frame(allocations),
        allocated_bytes_per_frame = per_frame(allocated_bytes),
        "heap use while serving"
    );
}

/// Merges the shards' reports, writes the histograms, prints the summary.
fn finish(config: &Config, reports: &[ShardReport], started: SystemTime) -> Result<(), ServerError> {
    if reports.len() != config.cores.len() {
        return Err(ServerError::failed(format!(
            "{} of {} shards failed",
            config.cores.len() - reports.len(),
            config.cores.len()
        )));
    }
    let mut merged = Latency::default();
    for report in reports {
        merged.merge(&report.latency);
    }
    let drained_events: usize = reports.iter().map(|report| report.drained_events).sum();
    if let Some(path) = &config.hdr_out {
        let shards: Vec<Latency> = reports.iter().map(|report| report.latency.clone()).collect();
        let files = latency::write_files(path, &merged, &shards, started)
            .map_err(|error| ServerError::failed(format!("cannot write histograms to {}: {error}", path.display())))?;
        tracing::info!(files = files.len(), path = %path.display(), "wrote histograms");
    }
    let total = |count: fn(&ShardMetrics) -> u64| -> u64 { reports.iter().map(|report| count(&report.metrics)).sum() };
    let ack = &merged.intake_to_ack_us;
    tracing::info!(
        frames = total(ShardMetrics::frames),
        accepted = total(|metrics| metrics.acks(Status::Accepted)),
        duplicate = total(|metrics| metrics.acks(Status::Duplicate)),
        retry = total(|metrics| metrics.acks(Status::Retry)),
        rejected = total(|metrics| metrics.acks(Status::Rejected)),
        unparseable = total(ShardMetrics::unparseable_total),
        retry_overload = total(|metrics| metrics.retries_by(RetryCause::Overload)),
        retry_redis = total(|metrics| metrics.retries_by(RetryCause::RedisDown)
            + metrics.retries_by(RetryCause::RedisError)
            + metrics.retries_by(RetryCause::ReplicaUnconfirmed)),
        drained_events,
        batches = total(|metrics| metrics.batch_events.read().count()),
        cache_events = reports.iter().map(|report| report.cache_events).sum::<usize>(),
        ack_p50_us = ack.value_at_quantile(0.5),
        ack_p99_us = ack.value_at_quantile(0.99),
        ack_p999_us = ack.value_at_quantile(0.999),
        ack_max_us = ack.max(),
        "stopped"
    );
    Ok(())
}

/// Startup messages from shards to the main thread.
enum StartEvent {
    Prepared,
    Listening,
    Failed(usize, String),
    /// A shard found the prefix's recorded partition count differs from ours.
    Refused(String),
    Signal(Signal),
}

/// Holds every shard until all have prepared, so none listens on TCP before
/// the others can serve. Startup only: never on the data path.
#[derive(Default)]
struct StartGate {
    decision: Mutex<Option<bool>>,
    decided: Condvar,
}

impl StartGate {
    fn decide(&self, go: bool) {
        let mut decision = self.decision.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        decision.get_or_insert(go);
        self.decided.notify_all();
    }

    fn wait(&self) -> bool {
        let mut decision = self.decision.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            if let Some(go) = *decision {
                return go;
            }
            decision = self
                .decided
                .wait(decision)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

struct ShardInit {
    index: usize,
    config: Arc<Config>,
    dedup: DedupWriter,
    peers: Vec<DedupReader>,
    metrics: Arc<ShardMetrics>,
    common: ShardCommon,
}

/// What every shard shares with the main thread.
#[derive(Clone)]
struct ShardCommon {
    stop: Arc<AtomicBool>,
    gate: Arc<StartGate>,
    events: mpsc::Sender<StartEvent>,
    snapshots: Snapshots,
    timers: tokio::runtime::Handle,
    heartbeats: Heartbeats,
}

type ShardHandle = glommio::ExecutorJoinHandle<Result<ShardReport, String>>;

fn start_shards(
    config: &Arc<Config>,
    common: &ShardCommon,
    metrics: &[Arc<ShardMetrics>],
) -> Result<Vec<ShardHandle>, ServerError> {
    let (writers, readers): (Vec<DedupWriter>, Vec<DedupReader>) =
        config.cores.iter().map(|_| new_cache(config.dedup_capacity)).unzip();
    let mut handles = Vec::with_capacity(config.cores.len());
    for (index, dedup) in writers.into_iter().enumerate() {
        let core = config.cores[index];
        let peers = readers
            .iter()
            .enumerate()
            .filter(|(peer, _)| *peer != index)
            .map(|(_, reader)| reader.clone());
        let init = ShardInit {
            index,
            config: Arc::clone(config),
            dedup,
            peers: peers.collect(),
            metrics: Arc::clone(&metrics[index]),
            common: common.clone(),
        };
        let placement = placement::placement_for(config.placement, core, &config.cores)?;
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{index}"))
            .preempt_timer(Duration::from_micros(crate::limits::PREEMPT_TIMER_US))
            .spin_before_park(Duration::from_micros(config.spin_before_park_us))
            .spawn(move || run_shard(init))
            .map_err(|error| ServerError::failed(format!("cannot start shard {index} on core {core}: {error}")))?;
        handles.push(handle);
    }
    Ok(handles)
}

fn wait_until_serving(
    config: &Config,
    events: &mpsc::Receiver<StartEvent>,
    gate: &StartGate,
    stop: &AtomicBool,
) -> Result<(), ServerError> {
    let shard_count = config.cores.len();
    let abort_with = |error: ServerError| {
        stop.store(true, Ordering::Relaxed);
        gate.decide(false);
        Err(error)
    };
    let abort = |message: String| abort_with(ServerError::failed(message));
    for phase in [Phase::Prepared, Phase::Listening] {
        let mut ready = 0;
        while ready < shard_count {
            match events.recv() {
                Ok(StartEvent::Prepared) if phase == Phase::Prepared => ready += 1,
                Ok(StartEvent::Listening) if phase == Phase::Listening => ready += 1,
                Ok(StartEvent::Failed(index, error)) => return abort(format!("shard {index} cannot start: {error}")),
                Ok(StartEvent::Refused(message)) => return abort_with(ServerError::refused(message)),
                Ok(StartEvent::Signal(signal)) => return abort(format!("stopped by {signal} while starting")),
                Ok(_) | Err(_) => return abort("shards stopped while starting".into()),
            }
        }
        if phase == Phase::Prepared {
            gate.decide(true);
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepared,
    Listening,
}

/// One shard's life: prepare, wait at the start gate, serve until the stop, drain.
async fn run_shard(init: ShardInit) -> Result<ShardReport, String> {
    let common = init.common.clone();
    let config = Arc::clone(&init.config);
    let _timers = common.timers.enter();
    let (udp, shard) = prepare_shard(init).await?;
    if !common.gate.wait() {
        return Err("start aborted".into());
    }
    let intake = start_intake(&config, &common, &shard, &udp)?;
    tick_loop(&shard, &common).await;
    let drained_events = intake.stop(&config, &shard, &udp).await;
    Ok(shard_report(&shard, &udp, drained_events))
}

/// Binds the UDP socket, connects the store, builds the shard and checks the
/// partition count Redis recorded; tells the main thread how that went.
async fn prepare_shard(init: ShardInit) -> Result<(Rc<UdpIo>, Rc<Shard>), String> {
    let ShardInit {
        index,
        config,
        dedup,
        peers,
        metrics,
        common,
    } = init;
    let failed = |error: String| start_failed(&common, index, error);
    let udp = UdpIo::bind(config.udp)
        .map(Rc::new)
        .map_err(|error| failed(format!("cannot bind udp {}: {error}", config.udp)))?;
    metrics.udp_socket_inode.store(udp.socket_inode(), Ordering::Relaxed);
    let store = Store::new(&config.store_settings()).map_err(|error| failed(error.to_string()))?;
    store.connect();
    let shard = Rc::new(Shard::new(
        index,
        config.pipeline_settings(),
        store,
        dedup,
        peers,
        metrics,
    ));
    if let Err(message) = shard.check_partitions_at_start(STARTUP_REDIS_WAIT).await {
        let _ = common.events.send(StartEvent::Refused(message.clone()));
        return Err(message);
    }
    let _ = common.events.send(StartEvent::Prepared);
    Ok((udp, shard))
}

/// Tells the main thread this shard cannot start, and hands the error on.
fn start_failed(common: &ShardCommon, index: usize, error: String) -> String {
    let _ = common.events.send(StartEvent::Failed(index, error.clone()));
    error
}

/// A serving shard's tasks, awaited in order when it stops.
struct Intake {
    udp_task: glommio::Task<()>,
    tcp_task: glommio::Task<()>,
    /// Shard 0's: keeps the UDP group's spreading program sized to the group.
    spread_task: Option<glommio::Task<()>>,
    linger_task: glommio::Task<()>,
    caller_tasks: Vec<glommio::Task<()>>,
    connections: Rc<Connections>,
}

/// Listens on TCP, sizes the UDP group's spreading (shard 0), tells the main
/// thread this shard listens, and starts the intake and pipeline tasks.
fn start_intake(config: &Config, common: &ShardCommon, shard: &Rc<Shard>, udp: &Rc<UdpIo>) -> Result<Intake, String> {
    let listener = crate::intake::tcp::bind(config.tcp).map_err(|error| {
        start_failed(
            common,
            shard.index,
            format!("cannot listen on tcp {}: {error}", config.tcp),
        )
    })?;
    // Every shard has bound by now: size the UDP group's program for all of it, including
    // another process's sockets during a rolling restart, before the process says it serves.
    let settings = config.intake_settings();
    let spread_task = (shard.index == 0).then(|| spawn_spreading(shard, udp, settings.shard_count));
    let _ = common.events.send(StartEvent::Listening);

    let connections = Rc::new(Connections::default());
    let udp_task = crate::intake::udp::serve(Rc::clone(shard), Rc::clone(udp), settings.clone());
    let tcp_task = crate::intake::tcp::serve(Rc::clone(shard), listener, settings, Rc::clone(&connections));
    Ok(Intake {
        udp_task: glommio::spawn_local(udp_task),
        tcp_task: glommio::spawn_local(tcp_task),
        spread_task,
        linger_task: glommio::spawn_local(Rc::clone(shard).linger_loop()),
        caller_tasks: (0..config.batches_in_flight_max)
            .map(|caller| glommio::spawn_local(Rc::clone(shard).caller_loop(caller, Rc::clone(udp))))
            .collect(),
        connections,
    })
}

/// Sizes the UDP group's spreading program for the sockets bound now, and keeps it
/// sized as sockets join or leave (`udp.rs`).
fn spawn_spreading(shard: &Rc<Shard>, udp: &Rc<UdpIo>, shard_count: usize) -> glommio::Task<()> {
    let attached_size = udp.spread_over_group(0, shard_count);
    let keep = crate::intake::udp::keep_spread_over_group(Rc::clone(shard), Rc::clone(udp), attached_size, shard_count);
    glommio::spawn_local(keep)
}

impl Intake {
    /// Stopping: intake ends, in-flight work drains, then connections flush.
    /// Returns how many events the drain answered.
    async fn stop(self, config: &Config, shard: &Rc<Shard>, udp: &UdpIo) -> usize {
        self.udp_task.await;
        if let Some(task) = self.spread_task {
            task.await;
        }
        leave_udp_group_if_shared(shard, udp);
        // The listener closes here: new connections go to the other process's listeners.
        self.tcp_task.await;
        let deadline = Instant::now() + Duration::from_millis(config.drain_timeout_ms);
        let drained_events = shard.drain(deadline, udp).await;
        self.linger_task.await;
        shard.close_callers();
        for task in self.caller_tasks {
            task.await;
        }
        self.connections
            .wait_closed(deadline + Duration::from_millis(500))
            .await;
        shard.store.quit().await;
        drained_events
    }
}

/// What the stopped shard hands back. UDP answers of the drain that went
/// unsent (the socket had left the group) are logged here.
fn shard_report(shard: &Shard, udp: &UdpIo, drained_events: usize) -> ShardReport {
    let replies_unsent = udp.replies_unsent();
    if replies_unsent > 0 {
        tracing::info!(
            shard = shard.index,
            replies_unsent,
            "udp replies of the drain not sent: the socket had left the group; their clients resend"
        );
    }
    ShardReport {
        metrics: Arc::clone(&shard.metrics),
        latency: shard.latency.borrow().clone(),
        drained_events,
        cache_events: shard.dedup_len_events(),
    }
}

/// The shard's tick, every `SHUTDOWN_POLL_MS` until the process-wide stop: a watchdog
/// heartbeat, a histogram snapshot when one is asked for, and the pipeline's liveness
/// (`Shard::tick`: Redis up or down, held batches, outage log lines).
async fn tick_loop(shard: &Rc<Shard>, common: &ShardCommon) {
    let period = Duration::from_millis(crate::limits::SHUTDOWN_POLL_MS);
    let mut outage = Outage::default();
    let mut snapshot_answered = 0;
    loop {
        common.heartbeats.beat(shard.index);
        if let Some(generation) = common.snapshots.due(&mut snapshot_answered) {
            common
                .snapshots
                .submit(shard.index, generation, shard.latency.borrow().clone());
        }
        shard.tick(&mut outage);
        if common.stop.load(Ordering::Relaxed) {
            shard.stop();
            return;
        }
        glommio::timer::sleep(period).await;
    }
}

/// A rolling restart (docs/design.md, "Rolling restart"): when another process has joined the
/// UDP group, this shard closes its socket before draining, so the kernel routes every later
/// datagram to the sockets that are still read; the frames already queued on it go unanswered
/// and are resent by their clients. Alone in the group, the socket stays open to send the
/// drain's answers: no other process could take the datagrams anyway.
fn leave_udp_group_if_shared(shard: &Shard, udp: &UdpIo) {
    match udp.group_share() {
        Ok(GroupShare::Alone) => {}
        Ok(GroupShare::Shared { other_sockets }) => {
            udp.leave_group();
            if shard.index == 0 {
                tracing::info!(
                    other_sockets,
                    "another process serves the udp address: left the group before draining"
                );
            }
        }
        Err(error) => {
            tracing::warn!(shard = shard.index, %error, "cannot tell whether another process serves the udp address; keeping the socket while draining");
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGUSR1 in this thread and every thread it
/// starts later, so only the signal thread's `sigwait` receives them.
fn block_signals() -> Result<SigSet, ServerError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGUSR1);
    signals
        .thread_block()
        .map_err(|error| ServerError::failed(format!("cannot block signals: {error}")))?;
    Ok(signals)
}

/// Exit code after a second SIGTERM or SIGINT cut the drain short: 128 + SIGINT,
/// what a shell reports for an interrupted command.
const EXIT_CODE_INTERRUPTED: i32 = 130;

/// SIGUSR1 asks for a histogram snapshot; the first SIGTERM or SIGINT stops
/// (drains), and a second one exits at once, saying how many events it abandons.
fn spawn_signal_thread(
    signals: SigSet,
    stop: Arc<AtomicBool>,
    events: mpsc::Sender<StartEvent>,
    snapshots: Snapshots,
    notifier: Arc<Notifier>,
    metrics: Vec<Arc<ShardMetrics>>,
) -> Result<(), ServerError> {
    std::thread::Builder::new()
        .name("shardgate-signals".into())
        .spawn(move || {
            while let Ok(signal) = signals.wait() {
                if signal == Signal::SIGUSR1 {
                    if !snapshots.request() {
                        tracing::warn!("SIGUSR1 ignored: no --hdr-out to write histograms beside");
                    }
                    continue;
                }
                if stop.load(Ordering::Relaxed) {
                    let abandoned_events: i64 = metrics.iter().map(|shard| shard.events_in_flight.get()).sum();
                    tracing::warn!(%signal, abandoned_events, "second signal: exiting without finishing the drain; the abandoned events were not answered and their clients resend them");
                    eprintln!("shardgate: second {signal}: exiting now, {abandoned_events} events abandoned unanswered");
                    std::process::exit(EXIT_CODE_INTERRUPTED);
                }
                tracing::info!(%signal, "draining");
                notifier.send("STOPPING=1\nSTATUS=draining");
                stop.store(true, Ordering::Relaxed);
                let _ = events.send(StartEvent::Signal(signal));
            }
        })
        .map(|_| ())
        .map_err(|error| ServerError::failed(format!("cannot start signal thread: {error}")))
}

/// Raises RLIMIT_MEMLOCK for glommio's io_uring buffers. Kernels since 5.12
/// charge io_uring memory to the cgroup instead, so a refusal is a warning
/// that names the limit needed, not an error.
fn raise_memlock(shard_count: usize) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let needed_bytes = MEMLOCK_BYTES_PER_SHARD * shard_count as u64;
    let Ok((soft_bytes, hard_bytes)) = getrlimit(Resource::RLIMIT_MEMLOCK) else {
        return 0;
    };
    if soft_bytes >= needed_bytes {
        return soft_bytes;
    }
    if setrlimit(Resource::RLIMIT_MEMLOCK, needed_bytes, hard_bytes.max(needed_bytes)).is_ok() {
        return needed_bytes;
    }
    let raised_bytes = hard_bytes.min(needed_bytes);
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, raised_bytes, hard_bytes);
    tracing::warn!(
        limit_kib = raised_bytes / 1024,
        wanted_kib = needed_bytes / 1024,
        "RLIMIT_MEMLOCK is below what {shard_count} shards want for io_uring; raise it (systemd LimitMEMLOCK={needed_bytes}, \
         or `ulimit -l {}`). Continuing: kernels >= 5.12 do not need it",
        needed_bytes / 1024
    );
    raised_bytes
}

/// Port 0 means "pick one": the same port must then be shared by all shards,
/// so it is picked once here and held by a placeholder socket in the same
/// SO_REUSEPORT group until the shards have bound it.
struct SharedPorts {
    udp: SocketAddr,
    tcp: SocketAddr,
    _placeholders: Vec<socket2::Socket>,
}

impl SharedPorts {
    fn pick(udp: SocketAddr, tcp: SocketAddr) -> Result<SharedPorts, ServerError> {
        let mut placeholders = Vec::new();
        let udp = hold_port(udp, socket2::Type::DGRAM, &mut placeholders)?;
        // Same address for both with port 0: use one port number for both.
        let tcp = if tcp.port() == 0 && tcp.ip() == udp.ip() {
            reserve(udp, socket2::Type::STREAM, &mut placeholders)
                .or_else(|_| reserve(tcp, socket2::Type::STREAM, &mut placeholders))?
        } else {
            hold_port(tcp, socket2::Type::STREAM, &mut placeholders)?
        };
        Ok(SharedPorts {
            udp,
            tcp,
            _placeholders: placeholders,
        })
    }
}

fn hold_port(
    address: SocketAddr,
    kind: socket2::Type,
    placeholders: &mut Vec<socket2::Socket>,
) -> Result<SocketAddr, ServerError> {
    if address.port() != 0 {
        return Ok(address);
    }
    reserve(address, kind, placeholders)
}

/// Binds a placeholder on `address` (port 0 picks one) and returns the bound address.
///
/// For UDP the kernel's pick is not enough: a socket that sets SO_REUSEPORT
/// before binding port 0 may be given a port that another process of the same
/// user already serves with SO_REUSEPORT, and would join that process's group
/// and take its datagrams (two servers started with port 0 at once met this).
/// So a UDP port is picked by a probe without SO_REUSEPORT, which the kernel
/// never puts on a port in use, and the placeholder that then binds it must be
/// the group's only member; otherwise another port is tried.
fn reserve(
    address: SocketAddr,
    kind: socket2::Type,
    placeholders: &mut Vec<socket2::Socket>,
) -> Result<SocketAddr, ServerError> {
    let cannot = |error: std::io::Error| ServerError::failed(format!("cannot pick a port on {address}: {error}"));
    if kind != socket2::Type::DGRAM || address.port() != 0 {
        let (socket, bound) = bind_socket(address, kind, true).map_err(cannot)?;
        placeholders.push(socket);
        return Ok(bound);
    }
    for _ in 0..PORT_PICK_ATTEMPTS {
        let (probe, picked) = bind_socket(address, kind, false).map_err(cannot)?;
        drop(probe);
        let Ok((socket, bound)) = bind_socket(picked, kind, true) else {
            continue; // Taken between the probe and the placeholder.
        };
        if crate::sys::udp_group_inodes(bound).map_err(cannot)?.len() == 1 {
            placeholders.push(socket);
            return Ok(bound);
        }
    }
    Err(cannot(std::io::Error::other(format!(
        "every port of {PORT_PICK_ATTEMPTS} picks was already served by another process"
    ))))
}

/// Picks of a free UDP port before giving up: a pick is lost only to a process
/// that binds the same port in the microseconds between probe and placeholder.
const PORT_PICK_ATTEMPTS: usize = 8;

fn bind_socket(
    address: SocketAddr,
    kind: socket2::Type,
    reuse_port: bool,
) -> std::io::Result<(socket2::Socket, SocketAddr)> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), kind, None)?;
    socket.set_reuse_port(reuse_port)?;
    socket.bind(&address.into())?;
    let bound = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an inet address"))?;
    Ok((socket, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP port picked for port 0 is never one that another SO_REUSEPORT
    /// group already serves, and its placeholder is alone in its group.
    #[test]
    fn picked_udp_port_joins_no_other_group() {
        let _table = crate::sys::tests::lock_udp_table();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Other "servers": reuseport groups on ports the kernel picked.
        let others: Vec<(socket2::Socket, SocketAddr)> = (0..64)
            .map(|_| bind_socket(loopback, socket2::Type::DGRAM, true).unwrap())
            .collect();
        // With SO_REUSEPORT set before binding port 0, about 1 pick in 300
        // landed on one of 64 held groups here: 512 picks would show it.
        for _ in 0..512 {
            let mut placeholders = Vec::new();
            let picked = reserve(loopback, socket2::Type::DGRAM, &mut placeholders).unwrap();
            assert!(
                others.iter().all(|(_, other)| other.port() != picked.port()),
                "picked {picked}, a port another group serves"
            );
            assert_eq!(crate::sys::udp_group_inodes(picked).unwrap().len(), 1);
            assert_eq!(placeholders.len(), 1);
        }
    }
}
