//! Throughput of the per-shard dedup cache against the designs it was chosen over.
//!
//! Every operation is the shard's admit check: look an id up; if it is not
//! known, record it (in the server the insert comes after Redis confirms; here
//! at once). Ids come from a per-thread stream: `hit_percent` of them are
//! drawn from a hot set inserted beforehand, the rest are fresh, so every cache
//! runs full and evicts on each miss. All caches hold `CAPACITY_EVENTS`.
//!
//! Contenders:
//! - `shardgate`: one `DedupWriter` per thread (its own shard). With 2 threads
//!   each thread, on a local miss, also asks the other shard's `DedupReader`,
//!   exactly as `shard.rs` admits a frame.
//! - `shardgate_epoch_pin`: the same, plus a `crossbeam_epoch::pin()` around
//!   the lookups: what an epoch-reclaimed design would add to each admit.
//! - `quick_cache`, `moka`, `mutex_lru`: concurrent maps; with 2 threads both
//!   threads share one instance (a shared map needs no peer lookups). The
//!   mutex is taken once for the lookup and again for the insert, as the
//!   insert comes later in the server.
//!
//! Throughput is in operations (elements) per second summed over threads.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use lru::LruCache;
use shardgate::pipeline::dedup::{new_cache, DedupReader, DedupWriter, WAYS};
use shardgate::wire::frame::EventId;

/// 917,504 events: a whole number of buckets for ours (16 MiB), the same count for all.
const CAPACITY_EVENTS: usize = WAYS << 17;
/// Ids per thread that the hit fraction of operations draws from.
const HOT_IDS: u64 = 1 << 16;
const HIT_PERCENTS: [u64; 2] = [0, 30];
const THREAD_COUNTS: [usize; 2] = [1, 2];
/// Operations run before measuring, also used to report the achieved hit ratio.
const CHECK_OPERATIONS: u64 = 200_000;

/// One shard's view of a cache.
trait Shard: Send {
    /// The admit check: true if `id` is known stored; otherwise records it.
    fn lookup_or_insert(&mut self, id: EventId) -> bool;
}

struct OursShard<const PIN_EPOCH: bool> {
    writer: DedupWriter,
    peers: Vec<DedupReader>,
}

impl<const PIN_EPOCH: bool> Shard for OursShard<PIN_EPOCH> {
    fn lookup_or_insert(&mut self, id: EventId) -> bool {
        let guard = PIN_EPOCH.then(crossbeam_epoch::pin);
        let known = self.writer.contains(id) || self.peers.iter().any(|peer| peer.contains(id));
        drop(guard);
        if !known {
            self.writer.insert(id);
        }
        known
    }
}

/// One cache per thread; each thread also reads every other thread's cache.
fn ours<const PIN_EPOCH: bool>(thread_count: usize) -> Vec<OursShard<PIN_EPOCH>> {
    let (writers, readers): (Vec<DedupWriter>, Vec<DedupReader>) =
        (0..thread_count).map(|_| new_cache(CAPACITY_EVENTS)).unzip();
    assert_eq!(writers[0].capacity_events(), CAPACITY_EVENTS);
    writers
        .into_iter()
        .enumerate()
        .map(|(own_index, writer)| OursShard {
            writer,
            peers: readers
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != own_index)
                .map(|(_, reader)| reader.clone())
                .collect(),
        })
        .collect()
}

/// A handle on a cache all threads share.
struct SharedMap<Cache> {
    cache: Arc<Cache>,
}

fn shared<Cache: Send + Sync>(cache: Cache, thread_count: usize) -> Vec<SharedMap<Cache>> {
    let cache = Arc::new(cache);
    (0..thread_count)
        .map(|_| SharedMap {
            cache: Arc::clone(&cache),
        })
        .collect()
}

type QuickCache = quick_cache::sync::Cache<EventId, ()>;
type MokaCache = moka::sync::Cache<EventId, ()>;
type MutexLru = Mutex<LruCache<EventId, ()>>;

impl Shard for SharedMap<QuickCache> {
    fn lookup_or_insert(&mut self, id: EventId) -> bool {
        let known = self.cache.get(&id).is_some();
        if !known {
            self.cache.insert(id, ());
        }
        known
    }
}

impl Shard for SharedMap<MokaCache> {
    fn lookup_or_insert(&mut self, id: EventId) -> bool {
        let known = self.cache.get(&id).is_some();
        if !known {
            self.cache.insert(id, ());
        }
        known
    }
}

impl Shard for SharedMap<MutexLru> {
    fn lookup_or_insert(&mut self, id: EventId) -> bool {
        let known = self.cache.lock().expect("lru mutex poisoned").get(&id).is_some();
        if !known {
            self.cache.lock().expect("lru mutex poisoned").put(id, ());
        }
        known
    }
}

/// A thread's ids: `hit_percent` from its hot set, the rest never seen before.
struct IdStream {
    random_state: u64,
    player_id: u64,
    fresh_seq_next: u64,
    hit_percent: u64,
}

impl IdStream {
    fn new(thread_index: usize, hit_percent: u64) -> Self {
        Self {
            random_state: 0x9E37_79B9_7F4A_7C15 ^ (thread_index as u64 + 1),
            player_id: thread_index as u64 + 1,
            fresh_seq_next: HOT_IDS,
            hit_percent,
        }
    }

    /// xorshift64*: a few cycles, the same for every contender.
    fn next_random(&mut self) -> u64 {
        self.random_state ^= self.random_state >> 12;
        self.random_state ^= self.random_state << 25;
        self.random_state ^= self.random_state >> 27;
        self.random_state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn next_fresh(&mut self) -> EventId {
        self.fresh_seq_next += 1;
        EventId {
            player_id: self.player_id,
            seq: self.fresh_seq_next,
        }
    }

    fn next_id(&mut self) -> EventId {
        let random = self.next_random();
        if random % 100 < self.hit_percent {
            EventId {
                player_id: self.player_id,
                seq: (random >> 32) % HOT_IDS,
            }
        } else {
            self.next_fresh()
        }
    }
}

struct Worker<S> {
    shard: S,
    ids: IdStream,
}

impl<S: Shard> Worker<S> {
    /// Inserts `fresh_ids` never-seen ids (enough to fill the cache), then the hot set.
    fn prefill(&mut self, fresh_ids: usize) {
        for _ in 0..fresh_ids {
            let id = self.ids.next_fresh();
            self.shard.lookup_or_insert(id);
        }
        for seq in 0..HOT_IDS {
            self.shard.lookup_or_insert(EventId {
                player_id: self.ids.player_id,
                seq,
            });
        }
    }

    fn run(&mut self, operations: u64) -> u64 {
        let mut hits = 0;
        for _ in 0..operations {
            let id = self.ids.next_id();
            hits += u64::from(black_box(self.shard.lookup_or_insert(black_box(id))));
        }
        hits
    }
}

/// Runs `operations_per_thread` on every worker at once; returns the wall time
/// until the last one finishes, and the hits summed.
fn run_all<S: Shard>(workers: &mut [Worker<S>], operations_per_thread: u64) -> (Duration, u64) {
    let (first, others) = workers.split_first_mut().expect("at least one worker");
    let barrier = Barrier::new(others.len() + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = others
            .iter_mut()
            .map(|worker| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    worker.run(operations_per_thread)
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let mut hits = first.run(operations_per_thread);
        for handle in handles {
            hits += handle.join().expect("bench worker");
        }
        (started.elapsed(), hits)
    })
}

fn bench_contender<S: Shard>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    hit_percent: u64,
    shards: Vec<S>,
    prefill_fresh_ids_per_thread: usize,
) {
    let mut workers: Vec<Worker<S>> = shards
        .into_iter()
        .enumerate()
        .map(|(thread_index, shard)| Worker {
            shard,
            ids: IdStream::new(thread_index, hit_percent),
        })
        .collect();
    for worker in &mut workers {
        worker.prefill(prefill_fresh_ids_per_thread);
    }
    let (_, hits) = run_all(&mut workers, CHECK_OPERATIONS);
    let operations = CHECK_OPERATIONS * workers.len() as u64;
    eprintln!(
        "{name}: hit ratio {:.1}% (target {hit_percent}%)",
        100.0 * hits as f64 / operations as f64
    );
    group.bench_function(name, |bencher| {
        bencher.iter_custom(|iterations| run_all(&mut workers, iterations).0)
    });
}

fn dedup_benches(criterion: &mut Criterion) {
    for hit_percent in HIT_PERCENTS {
        for thread_count in THREAD_COUNTS {
            let mut group = criterion.benchmark_group(format!("hit{hit_percent}_threads{thread_count}"));
            // One iteration is one operation on every thread.
            group.throughput(Throughput::Elements(thread_count as u64));
            // Ours has a cache per thread to fill; the shared maps one in all.
            let per_thread_cache = CAPACITY_EVENTS;
            let shared_cache = CAPACITY_EVENTS / thread_count;
            let shards = ours::<false>(thread_count);
            bench_contender(&mut group, "shardgate", hit_percent, shards, per_thread_cache);
            let shards = ours::<true>(thread_count);
            bench_contender(&mut group, "shardgate_epoch_pin", hit_percent, shards, per_thread_cache);
            let shards = shared(QuickCache::new(CAPACITY_EVENTS), thread_count);
            bench_contender(&mut group, "quick_cache", hit_percent, shards, shared_cache);
            let shards = shared(MokaCache::new(CAPACITY_EVENTS as u64), thread_count);
            bench_contender(&mut group, "moka", hit_percent, shards, shared_cache);
            let capacity = NonZeroUsize::new(CAPACITY_EVENTS).expect("nonzero capacity");
            let shards = shared(Mutex::new(LruCache::new(capacity)), thread_count);
            bench_contender(&mut group, "mutex_lru", hit_percent, shards, shared_cache);
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    // Small samples and no plots keep the whole run near a minute on a 2-core machine.
    config = Criterion::default()
        .without_plots()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    targets = dedup_benches
}
criterion_main!(benches);
