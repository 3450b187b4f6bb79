//! Per-shard dedup cache of event ids that are *confirmed stored* in Redis.
//!
//! # Shape
//!
//! A set-associative table allocated once by [`new_cache`]; it never grows,
//! never moves and never frees anything until the last handle is dropped.
//! Each bucket is 128 bytes (two cache lines, which the adjacent-line
//! prefetcher fetches as a pair) and holds a seqlock version word, a count of
//! occupied ways and [`WAYS`] = 7 full event ids. An id lives in exactly one
//! bucket, chosen by a keyed 64-bit mix of `(player_id, seq)`; within the
//! bucket the ways are ordered by recency (way 0 is the most recently used),
//! so eviction is LRU per bucket. Every operation touches one bucket: O(WAYS),
//! no allocation, no pointer chasing.
//!
//! # Memory formula
//!
//! `buckets = next_power_of_two(ceil(capacity_events / WAYS))` and
//! `table_bytes = 128 * buckets`, so the real capacity is `WAYS * buckets`
//! (>= the request) at 128 / 7 ≈ 18.3 bytes per event slot. Requesting
//! `WAYS << k` events wastes nothing: e.g. `7 << 17` = 917,504 events in
//! 16 MiB. [`table_bytes`] computes it for operators.
//!
//! # Why exact ids, not fingerprints
//!
//! A "found" answer makes the shard reply DUPLICATE without touching Redis.
//! A fingerprint collision would answer DUPLICATE for an event that was never
//! stored: a silently lost event. So each way stores the whole 16-byte id and
//! a hit is an exact match.
//!
//! # Why a single-writer seqlock, not crossbeam-epoch, not a Mutex
//!
//! The owning shard is the only writer ([`DedupWriter`] is not `Clone`); other
//! shards only read ([`DedupReader`]). Epoch-based reclamation exists to keep
//! memory alive while a reader may still hold a pointer into it; this table
//! never frees or moves a byte while any handle exists, so an epoch pin would
//! be pure overhead on every lookup (a thread-local access and a fence). What
//! readers do need is a way to detect a *torn* read of a bucket the writer is
//! reordering: the per-bucket seqlock gives exactly that, with atomics only
//! (no `unsafe`): the writer makes the version odd, updates the ways with
//! relaxed stores, then makes it even again; a reader retries if the version
//! was odd or changed across its relaxed loads. A Mutex would make the owning
//! shard's hot path wait on other cores' readers.
//!
//! # Why readers give up after [`READ_RETRIES_MAX`] tries, answering "absent"
//!
//! The two possible wrong answers are not symmetric. A wrong "absent" costs
//! one Redis round trip, and Redis has the final say on duplicates, so the
//! event is still stored exactly once. A wrong "found" would drop an event.
//! So a reader that keeps colliding with the writer (for instance because the
//! writer thread was preempted mid-update) stops spinning after a bounded
//! number of tries and answers "absent"; it never answers "found" from a read
//! it could not validate. [`DedupReader::lookup`] reports that case as
//! [`Lookup::Contended`] for callers that want to count it.
//!
//! The version is a `u32` bumped by 2 per write, so a reader could be fooled
//! only if it stalled between its two version loads for exactly a multiple of
//! 2^31 writes to the same bucket.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;

use self::sync::{fence, prefetch, spin_loop, AtomicU32, AtomicU64, Ordering};

use crate::wire::frame::EventId;

/// Where the seqlock's atomics come from. A loom model test (`tests/loom_dedup.rs`, built with
/// `RUSTFLAGS="--cfg loom"`) needs loom's, so that the model checker sees every load, store and
/// fence and can try every interleaving and every value a relaxed load may return; every other
/// build uses std's, and the code using them is the same in both.
#[cfg(not(all(loom, test)))]
mod sync {
    pub(super) use crate::sys::prefetch;
    pub(super) use std::hint::spin_loop;
    pub(super) use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
}

#[cfg(all(loom, test))]
mod sync {
    pub(super) use loom::hint::spin_loop;
    pub(super) use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

    /// A cache hint has no meaning in the model, and the test crate has no `sys`.
    pub(super) fn prefetch<T>(_value: &T) {}
}

/// Event ids per bucket. 7 ids of 16 bytes plus two `u32` words fill 128 bytes.
pub const WAYS: usize = 7;

/// Largest `capacity_events` accepted by [`new_cache`]: 2^30 events is a
/// 32 GiB table, already far beyond one shard's memory budget.
pub const CAPACITY_EVENTS_MAX: usize = 1 << 30;

/// How many times a reader retries a bucket the writer is updating before it
/// answers "absent" (see the module doc for why that answer is the safe one).
pub(crate) const READ_RETRIES_MAX: u32 = 8;

/// Bytes per bucket: two 64-byte cache lines.
const BUCKET_BYTES: usize = 128;

/// Odd constant (2^64 / golden ratio) for the final multiply of the mixer.
const MIX_MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

/// One stored id. Two separate atomics: a reader may see them torn, which the
/// seqlock validation rejects.
struct Way {
    player_id: AtomicU64,
    seq: AtomicU64,
}

#[repr(C, align(128))]
struct Bucket {
    /// Seqlock version: odd while the writer is mid-update.
    version: AtomicU32,
    /// Occupied ways, always <= WAYS; ways `0..count` are valid, in recency order.
    count: AtomicU32,
    ways: [Way; WAYS],
}

// loom's atomics carry the model's bookkeeping, so only std's fit the two cache lines.
#[cfg(not(all(loom, test)))]
const _: () = assert!(std::mem::size_of::<Bucket>() == BUCKET_BYTES);
const _: () = assert!(std::mem::align_of::<Bucket>() == BUCKET_BYTES);
const _: () = assert!(WAYS >= 2 && WAYS <= u32::MAX as usize);
const _: () = assert!(READ_RETRIES_MAX >= 1);
const _: () = assert!(CAPACITY_EVENTS_MAX.is_power_of_two());

impl Way {
    fn empty() -> Self {
        Self {
            player_id: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        }
    }

    fn load(&self) -> EventId {
        EventId {
            player_id: self.player_id.load(Ordering::Relaxed),
            seq: self.seq.load(Ordering::Relaxed),
        }
    }

    fn store(&self, id: EventId) {
        self.player_id.store(id.player_id, Ordering::Relaxed);
        self.seq.store(id.seq, Ordering::Relaxed);
    }

    fn holds(&self, id: EventId) -> bool {
        self.player_id.load(Ordering::Relaxed) == id.player_id && self.seq.load(Ordering::Relaxed) == id.seq
    }
}

impl Bucket {
    fn empty() -> Self {
        Self {
            version: AtomicU32::new(0),
            count: AtomicU32::new(0),
            ways: std::array::from_fn(|_| Way::empty()),
        }
    }

    /// Clamped so that even a torn read can never index past the ways.
    fn occupied_ways(&self) -> usize {
        (self.count.load(Ordering::Relaxed) as usize).min(WAYS)
    }

    fn position_of(&self, id: EventId, occupied_ways: usize) -> Option<usize> {
        self.ways[..occupied_ways].iter().position(|way| way.holds(id))
    }

    /// Runs `update` as one seqlock write section. Only the owning writer calls it.
    fn write_section(&self, update: impl FnOnce(&Self)) {
        let version = self.version.load(Ordering::Relaxed);
        debug_assert!(version % 2 == 0, "nested or concurrent bucket write");
        self.version.store(version.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd version before every data store below: a reader that
        // sees any new data then also sees a version different from its first load.
        fence(Ordering::Release);
        update(self);
        self.version.store(version.wrapping_add(2), Ordering::Release);
    }

    /// Runs `read` on a snapshot validated by the seqlock, or returns `None`
    /// after [`READ_RETRIES_MAX`] torn attempts.
    fn read_section<R>(&self, read: impl Fn(&Self) -> R) -> Option<R> {
        for _ in 0..READ_RETRIES_MAX {
            let version_before = self.version.load(Ordering::Acquire);
            if version_before % 2 == 0 {
                let result = read(self);
                // Orders the data loads above before the version re-check.
                fence(Ordering::Acquire);
                let version_after = self.version.load(Ordering::Relaxed);
                if version_before == version_after {
                    return Some(result);
                }
            }
            spin_loop();
        }
        None
    }

    /// Moves ways `0..last_way` to `1..=last_way` and writes `id` at way 0.
    /// Whatever was at `last_way` is overwritten (promoted or evicted).
    fn shift_down_and_write_front(&self, last_way: usize, id: EventId) {
        debug_assert!(last_way < WAYS);
        for way in (1..=last_way).rev() {
            self.ways[way].store(self.ways[way - 1].load());
        }
        self.ways[0].store(id);
    }
}

/// The shared table. Never resized, never freed while a handle lives.
struct Table {
    buckets: Box<[Bucket]>,
    bucket_index_mask: u64,
    hash_keys: [u64; 3],
}

impl Table {
    fn new(capacity_events: usize, hash_keys: [u64; 3]) -> Self {
        let bucket_count = bucket_count_for(capacity_events);
        let buckets: Box<[Bucket]> = (0..bucket_count).map(|_| Bucket::empty()).collect();
        debug_assert!(buckets.len().is_power_of_two());
        Self {
            buckets,
            bucket_index_mask: (bucket_count - 1) as u64,
            hash_keys,
        }
    }

    /// Keyed mix of both id halves; the keys are secret per process, so a
    /// client cannot aim many ids at one bucket without seeing the keys.
    fn bucket_index(&self, id: EventId) -> usize {
        let [key_player, key_seq, key_final] = self.hash_keys;
        let halves_mixed = folded_multiply(id.player_id ^ key_player, id.seq ^ key_seq);
        let mixed = folded_multiply(halves_mixed ^ key_final, MIX_MULTIPLIER);
        (mixed & self.bucket_index_mask) as usize
    }

    fn bucket_for(&self, id: EventId) -> &Bucket {
        &self.buckets[self.bucket_index(id)]
    }

    fn capacity_events(&self) -> usize {
        self.buckets.len() * WAYS
    }

    /// Starts loading `id`'s bucket into the cache (`sys::prefetch`, a hint
    /// that never waits). The table is tens of MB, so nearly every lookup
    /// misses the cache; a shard prefetches every frame of a `recvmmsg` read
    /// before deciding any, and the misses of that read overlap instead of
    /// stalling one after another (one shard at 40 000/s spent 7.6% of its
    /// samples on the one load in `contains`). Both lines of the bucket: the
    /// ways a lookup reads span them.
    fn prefetch(&self, id: EventId) {
        let bucket = self.bucket_for(id);
        prefetch(&bucket.count);
        prefetch(&bucket.ways[WAYS - 1]);
    }
}

/// Full 128-bit product folded to 64 bits: every output bit depends on every
/// input bit of both factors.
fn folded_multiply(left: u64, right: u64) -> u64 {
    let product = u128::from(left) * u128::from(right);
    (product as u64) ^ ((product >> 64) as u64)
}

fn bucket_count_for(capacity_events: usize) -> usize {
    assert!(
        (WAYS..=CAPACITY_EVENTS_MAX).contains(&capacity_events),
        "capacity_events {capacity_events} outside {WAYS}..={CAPACITY_EVENTS_MAX}"
    );
    let bucket_count = capacity_events.div_ceil(WAYS).next_power_of_two();
    debug_assert!(bucket_count * WAYS >= capacity_events);
    bucket_count
}

/// Bytes the table for `capacity_events` occupies (see the module doc formula).
///
/// # Panics
/// Same bounds as [`new_cache`].
pub fn table_bytes(capacity_events: usize) -> usize {
    bucket_count_for(capacity_events) * BUCKET_BYTES
}

/// Hash keys from std's per-process random seed (the one `HashMap` uses).
fn random_hash_keys() -> [u64; 3] {
    let state = RandomState::new();
    [state.hash_one(1_u64), state.hash_one(2_u64), state.hash_one(3_u64)]
}

/// Hash keys derived from a fixed seed (splitmix64), for reproducible tests.
fn seeded_hash_keys(seed: u64) -> [u64; 3] {
    let mut state = seed;
    std::array::from_fn(|_| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    })
}

/// Creates the cache: the one writer (for the owning shard) and a reader
/// (clone it for the other shards). Allocates the whole table now; nothing
/// allocates afterwards.
///
/// The real capacity is rounded up; see [`DedupWriter::capacity_events`].
///
/// # Panics
/// If `capacity_events` is below [`WAYS`] or above [`CAPACITY_EVENTS_MAX`].
pub fn new_cache(capacity_events: usize) -> (DedupWriter, DedupReader) {
    split(Table::new(capacity_events, random_hash_keys()))
}

/// Like [`new_cache`] but with bucket placement fixed by `hash_seed`, so a
/// failing randomized test replays exactly. Production code must use
/// [`new_cache`]: a known seed lets clients aim ids at one bucket.
#[doc(hidden)]
pub fn new_cache_seeded(capacity_events: usize, hash_seed: u64) -> (DedupWriter, DedupReader) {
    split(Table::new(capacity_events, seeded_hash_keys(hash_seed)))
}

fn split(table: Table) -> (DedupWriter, DedupReader) {
    let table = Arc::new(table);
    let reader = DedupReader {
        table: Arc::clone(&table),
    };
    let writer = DedupWriter {
        table,
        len_events: 0,
        evictions_total: 0,
    };
    (writer, reader)
}

/// Outcome of [`DedupWriter::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// The id was absent and took a free way.
    Added,
    /// The id was already present; it is now the most recent in its bucket.
    AlreadyPresent,
    /// The id was absent and its bucket was full: the least recent id of
    /// that bucket was dropped to make room.
    AddedEvicting { evicted: EventId },
}

/// Outcome of [`DedupReader::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The id is in the cache: it is confirmed stored in Redis.
    Found,
    /// The id is not in the cache (never stored, or evicted).
    Absent,
    /// The writer kept updating the bucket for [`READ_RETRIES_MAX`] tries;
    /// treat as absent (ask Redis).
    Contended,
}

/// The owning shard's handle: the only one that can modify the table.
///
/// Not `Clone`, so there is exactly one writer per table:
/// ```compile_fail,E0599
/// let (writer, _reader) = shardgate::pipeline::dedup::new_cache(64);
/// let _second_writer = writer.clone();
/// ```
pub struct DedupWriter {
    table: Arc<Table>,
    /// Occupied ways over all buckets; a plain counter since only we write.
    len_events: usize,
    evictions_total: u64,
}

impl DedupWriter {
    /// Owner lookup. A hit also makes `id` the most recent in its bucket
    /// (a seqlock write, unless it already was).
    pub fn contains(&mut self, id: EventId) -> bool {
        let bucket = self.table.bucket_for(id);
        let found_way = bucket.position_of(id, owner_occupied_ways(bucket));
        if let Some(way) = found_way {
            promote(bucket, way, id);
        }
        found_way.is_some()
    }

    /// Starts loading `id`'s bucket; see `Table::prefetch`. Changes nothing.
    pub fn prefetch(&self, id: EventId) {
        self.table.prefetch(id);
    }

    /// Records `id` as stored in Redis. Idempotent: inserting a present id
    /// only refreshes its recency. When the bucket is full its least recent
    /// id is evicted.
    pub fn insert(&mut self, id: EventId) -> Insert {
        let bucket = self.table.bucket_for(id);
        let occupied_ways = owner_occupied_ways(bucket);
        let outcome = match bucket.position_of(id, occupied_ways) {
            Some(way) => {
                promote(bucket, way, id);
                Insert::AlreadyPresent
            }
            None if occupied_ways < WAYS => {
                bucket.write_section(|bucket| {
                    bucket.shift_down_and_write_front(occupied_ways, id);
                    bucket.count.store(occupied_ways as u32 + 1, Ordering::Relaxed);
                });
                self.len_events += 1;
                Insert::Added
            }
            None => {
                let evicted = bucket.ways[WAYS - 1].load();
                bucket.write_section(|bucket| bucket.shift_down_and_write_front(WAYS - 1, id));
                self.evictions_total += 1;
                Insert::AddedEvicting { evicted }
            }
        };
        debug_assert_eq!(bucket.ways[0].load(), id, "inserted id must be most recent");
        debug_assert!(self.len_events <= self.table.capacity_events());
        outcome
    }

    /// A new read-only handle for another shard.
    pub fn reader(&self) -> DedupReader {
        DedupReader {
            table: Arc::clone(&self.table),
        }
    }

    /// Real capacity: `WAYS * buckets`, >= the requested capacity.
    pub fn capacity_events(&self) -> usize {
        self.table.capacity_events()
    }

    /// Ids currently held.
    pub fn len_events(&self) -> usize {
        self.len_events
    }

    /// Ids dropped so far to make room for newer ones.
    pub fn evictions_total(&self) -> u64 {
        self.evictions_total
    }

    /// Which bucket `id` maps to; for tests that need ids sharing a bucket.
    #[doc(hidden)]
    pub fn bucket_of(&self, id: EventId) -> usize {
        self.table.bucket_index(id)
    }
}

impl std::fmt::Debug for DedupWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DedupWriter")
            .field("capacity_events", &self.capacity_events())
            .field("len_events", &self.len_events)
            .field("evictions_total", &self.evictions_total)
            .finish()
    }
}

/// The writer's view of a bucket's count: no seqlock needed, it wrote it.
fn owner_occupied_ways(bucket: &Bucket) -> usize {
    let occupied_ways = bucket.count.load(Ordering::Relaxed) as usize;
    debug_assert!(occupied_ways <= WAYS);
    occupied_ways
}

/// Makes the id at `way` the most recent of its bucket.
fn promote(bucket: &Bucket, way: usize, id: EventId) {
    debug_assert_eq!(bucket.ways[way].load(), id);
    if way != 0 {
        bucket.write_section(|bucket| bucket.shift_down_and_write_front(way, id));
    }
}

/// A read-only handle for shards other than the owner. Lock-free: it never
/// waits on the writer and never writes shared memory (so lookups do not
/// refresh recency).
#[derive(Clone)]
pub struct DedupReader {
    table: Arc<Table>,
}

impl DedupReader {
    /// Starts loading `id`'s bucket; see `Table::prefetch`. Changes nothing.
    pub fn prefetch(&self, id: EventId) {
        self.table.prefetch(id);
    }

    /// True only if `id` is certainly in the cache. A lookup that could not
    /// get a consistent snapshot answers false (see [`Lookup::Contended`]).
    pub fn contains(&self, id: EventId) -> bool {
        self.lookup(id) == Lookup::Found
    }

    /// Like [`contains`](Self::contains) but tells "absent" from "gave up".
    pub fn lookup(&self, id: EventId) -> Lookup {
        let bucket = self.table.bucket_for(id);
        let snapshot = bucket.read_section(|bucket| bucket.position_of(id, bucket.occupied_ways()).is_some());
        match snapshot {
            Some(true) => Lookup::Found,
            Some(false) => Lookup::Absent,
            None => Lookup::Contended,
        }
    }

    /// Real capacity of the shared table.
    pub fn capacity_events(&self) -> usize {
        self.table.capacity_events()
    }

    /// Which bucket `id` maps to; for tests that need ids sharing a bucket.
    #[doc(hidden)]
    pub fn bucket_of(&self, id: EventId) -> usize {
        self.table.bucket_index(id)
    }
}

impl std::fmt::Debug for DedupReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DedupReader")
            .field("capacity_events", &self.capacity_events())
            .finish()
    }
}
