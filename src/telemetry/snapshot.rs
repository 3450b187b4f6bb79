//! Latency histograms on demand: SIGUSR1 writes the current HDR histograms
//! without stopping the server.
//!
//! The histograms live on their shards' threads. The signal thread only bumps
//! a generation number; each shard notices it on its next tick (5 ms), copies
//! its histograms and sends the copy here; this thread merges the copies once
//! every shard has answered and writes them beside `--hdr-out`, named with the
//! time (`latency.<unix_ms>.hgrm`, ...). Nothing on the data path waits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use crate::telemetry::latency::{self, Latency};

#[derive(Clone)]
pub struct Snapshots {
    generation: Arc<AtomicU64>,
    /// None without `--hdr-out`: there is nowhere to write.
    sender: Option<mpsc::Sender<Snapshot>>,
}

struct Snapshot {
    shard: usize,
    generation: u64,
    latency: Latency,
}

impl Snapshots {
    pub fn start(hdr_out: Option<PathBuf>, shard_count: usize, started: SystemTime) -> std::io::Result<Snapshots> {
        let generation = Arc::new(AtomicU64::new(0));
        let Some(path) = hdr_out else {
            return Ok(Snapshots {
                generation,
                sender: None,
            });
        };
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("shardgate-snapshots".into())
            .spawn(move || write_snapshots(&receiver, &path, shard_count, started))?;
        Ok(Snapshots {
            generation,
            sender: Some(sender),
        })
    }

    /// Asks every shard for its histograms; false if there is nowhere to write.
    pub fn request(&self) -> bool {
        if self.sender.is_none() {
            return false;
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A shard's check on each tick: the generation to answer, if a new one.
    pub fn due(&self, answered: &mut u64) -> Option<u64> {
        let generation = self.generation.load(Ordering::Relaxed);
        if generation == *answered {
            return None;
        }
        *answered = generation;
        Some(generation)
    }

    pub fn submit(&self, shard: usize, generation: u64, latency: Latency) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(Snapshot {
                shard,
                generation,
                latency,
            });
        }
    }
}

fn write_snapshots(
    receiver: &mpsc::Receiver<Snapshot>,
    path: &std::path::Path,
    shard_count: usize,
    started: SystemTime,
) {
    let mut generation = 0;
    let mut parts: Vec<Option<Latency>> = vec![None; shard_count];
    while let Ok(snapshot) = receiver.recv() {
        if snapshot.generation != generation {
            // A newer request supersedes an incomplete older one.
            generation = snapshot.generation;
            parts.iter_mut().for_each(|part| *part = None);
        }
        if let Some(part) = parts.get_mut(snapshot.shard) {
            *part = Some(snapshot.latency);
        }
        if parts.iter().all(Option::is_some) {
            let shards: Vec<Latency> = parts.iter_mut().filter_map(Option::take).collect();
            write_one(path, &shards, started);
        }
    }
}

fn write_one(path: &std::path::Path, shards: &[Latency], started: SystemTime) {
    let mut merged = Latency::default();
    shards.iter().for_each(|shard| merged.merge(shard));
    let unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis())
        .unwrap_or(0);
    let stem = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "latency".into());
    let extension = path
        .extension()
        .map(|extension| extension.to_string_lossy().into_owned())
        .unwrap_or_else(|| "hgrm".into());
    let target = path.with_file_name(format!("{stem}.{unix_ms}.{extension}"));
    match latency::write_files(&target, &merged, shards, started) {
        Ok(files) => {
            tracing::info!(path = %target.display(), files = files.len(), count = merged.intake_to_ack_us.len(), "wrote histogram snapshot")
        }
        Err(error) => tracing::warn!(path = %target.display(), %error, "cannot write histogram snapshot"),
    }
}
