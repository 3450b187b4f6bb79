//! Tests of the per-shard dedup cache (`shardgate::pipeline::dedup`): exact answers,
//! bounded memory with LRU-ish eviction, per-bucket recency, readers on other
//! threads while the writer churns, and a model check of every answer.
//!
//! Randomized tests draw a seed from `DEDUP_SEED` (or the clock) and print it
//! when they fail; the same seed also fixes the table's bucket placement, so
//! `DEDUP_SEED=<seed> cargo test --test dedup` replays a failure exactly.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate::pipeline::dedup::{
    new_cache, new_cache_seeded, table_bytes, DedupReader, DedupWriter, Insert, Lookup, CAPACITY_EVENTS_MAX, WAYS,
};
use shardgate::wire::frame::EventId;

/// Seed of one randomized test; reports itself if the test panics.
struct TestSeed(u64);

impl TestSeed {
    fn new() -> Self {
        let seed = match std::env::var("DEDUP_SEED") {
            Ok(text) => text.parse().expect("DEDUP_SEED must be a u64"),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64,
        };
        Self(seed)
    }

    fn rng(&self, stream: u64) -> StdRng {
        StdRng::seed_from_u64(self.0 ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}

impl Drop for TestSeed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("randomized dedup test failed; reproduce with DEDUP_SEED={}", self.0);
        }
    }
}

fn event(player_id: u64, seq: u64) -> EventId {
    EventId { player_id, seq }
}

fn random_event(rng: &mut StdRng) -> EventId {
    event(rng.gen(), rng.gen())
}

/// `count` distinct ids (seq 0.. of `player_id`) that map to `bucket`.
fn ids_in_bucket(writer: &DedupWriter, player_id: u64, bucket: usize, count: usize) -> Vec<EventId> {
    (0..)
        .map(|seq| event(player_id, seq))
        .filter(|id| writer.bucket_of(*id) == bucket)
        .take(count)
        .collect()
}

// Proves the handles have the thread-safety shape the design needs (one Send writer, shareable readers).
#[test]
fn writer_is_send_and_reader_is_clone_send_sync() {
    fn assert_send<T: Send>() {}
    fn assert_clone_send_sync<T: Clone + Send + Sync>() {}
    assert_send::<DedupWriter>();
    assert_clone_send_sync::<DedupReader>();
}

// Proves capacity rounds up to a power-of-two bucket count and table_bytes follows the documented formula.
#[test]
fn capacity_rounds_up_to_whole_power_of_two_buckets() {
    let (writer, reader) = new_cache(100);
    // ceil(100 / 7) = 15 buckets, rounded up to 16.
    assert_eq!(writer.capacity_events(), 16 * WAYS);
    assert_eq!(reader.capacity_events(), 16 * WAYS);
    assert_eq!(table_bytes(100), 16 * 128);
    assert_eq!(table_bytes(WAYS << 17), 16 << 20, "7 << 17 events fill exactly 16 MiB");
    assert_eq!(table_bytes(WAYS), 128);
    assert_eq!(writer.len_events(), 0);
    assert_eq!(writer.evictions_total(), 0);
}

// Proves a capacity below one bucket is rejected.
#[test]
#[should_panic(expected = "capacity_events")]
fn capacity_below_one_bucket_panics() {
    let _ = new_cache(WAYS - 1);
}

// Proves a capacity above the documented maximum is rejected before anything is allocated.
#[test]
#[should_panic(expected = "capacity_events")]
fn capacity_above_maximum_panics() {
    let _ = new_cache(CAPACITY_EVENTS_MAX + 1);
}

// Proves exactness: every inserted (not evicted) id is found by writer and readers, and no other id ever is.
#[test]
fn inserted_ids_are_found_and_never_inserted_ids_never_are() {
    let seed = TestSeed::new();
    let mut rng = seed.rng(1);
    let (mut writer, reader) = new_cache_seeded(WAYS << 10, seed.0);
    let other_reader = writer.reader();

    let inserted: Vec<EventId> = (0..4_000).map(|_| random_event(&mut rng)).collect();
    let mut evicted = HashSet::new();
    for id in &inserted {
        if let Insert::AddedEvicting { evicted: dropped } = writer.insert(*id) {
            evicted.insert(dropped);
        }
    }
    let inserted_set: HashSet<EventId> = inserted.iter().copied().collect();
    assert!(evicted.is_subset(&inserted_set), "evicted an id never inserted");
    assert_eq!(writer.len_events(), inserted_set.len() - evicted.len());

    for id in &inserted {
        let expected = !evicted.contains(id);
        assert_eq!(reader.contains(*id), expected, "reader on {id:?}");
        assert_eq!(other_reader.contains(*id), expected, "second reader on {id:?}");
        assert_eq!(writer.contains(*id), expected, "writer on {id:?}");
    }
    // Re-inserting present ids changes nothing but recency.
    let len_before = writer.len_events();
    for id in inserted.iter().filter(|id| !evicted.contains(*id)) {
        assert_eq!(writer.insert(*id), Insert::AlreadyPresent, "{id:?}");
    }
    assert_eq!(writer.len_events(), len_before);

    for _ in 0..100_000 {
        let id = random_event(&mut rng);
        if inserted_set.contains(&id) {
            continue;
        }
        assert_eq!(reader.lookup(id), Lookup::Absent, "reader found never-inserted {id:?}");
        assert!(!writer.contains(id), "writer found never-inserted {id:?}");
    }
}

// Proves memory stays bounded under 10x capacity of distinct inserts, evictions are counted exactly, recent ids stay and old ones go.
#[test]
fn ten_times_capacity_of_inserts_stays_bounded_and_keeps_recent_ids() {
    let seed = TestSeed::new();
    let mut rng = seed.rng(2);
    let (mut writer, reader) = new_cache_seeded(WAYS << 10, seed.0);
    let capacity_events = writer.capacity_events();
    assert_eq!(capacity_events, WAYS << 10);

    // Distinct by construction: seq is the insert number.
    let inserted: Vec<EventId> = (0..10 * capacity_events as u64)
        .map(|seq| event(rng.gen(), seq))
        .collect();
    let mut added_total = 0_u64;
    let mut added_evicting_total = 0_u64;
    for id in &inserted {
        match writer.insert(*id) {
            Insert::Added => added_total += 1,
            Insert::AddedEvicting { .. } => added_evicting_total += 1,
            Insert::AlreadyPresent => panic!("distinct id {id:?} reported present"),
        }
        assert!(writer.len_events() <= capacity_events);
    }
    assert_eq!(writer.capacity_events(), capacity_events, "the table never grows");
    assert_eq!(writer.evictions_total(), added_evicting_total);
    assert_eq!(
        writer.evictions_total(),
        added_total + added_evicting_total - writer.len_events() as u64,
        "every id that is no longer held was counted as evicted"
    );
    // Each bucket saw ~70 inserts on average; one still below 7 is astronomically unlikely.
    assert_eq!(writer.len_events(), capacity_events, "every bucket ends full");

    let newest_quarter = &inserted[inserted.len() - capacity_events / 4..];
    let newest_present = newest_quarter.iter().filter(|id| reader.contains(**id)).count();
    assert!(
        newest_present * 10 >= newest_quarter.len() * 9,
        "only {newest_present} of the newest {} ids kept",
        newest_quarter.len()
    );
    let oldest = &inserted[..capacity_events];
    let oldest_present = oldest.iter().filter(|id| reader.contains(**id)).count();
    assert_eq!(
        oldest_present, 0,
        "ids from the first capacity's worth of inserts survived"
    );
}

// Proves per-bucket LRU: an id re-touched by writer.contains outlives the untouched ids of its bucket.
#[test]
fn retouched_id_survives_pressure_that_evicts_its_untouched_bucket_mates() {
    let (mut writer, reader) = new_cache_seeded(WAYS * 16, 7);
    let target = event(9, 9);
    let bucket = writer.bucket_of(target);
    let mates = ids_in_bucket(&writer, 10, bucket, 2 * (WAYS - 1) + 1);
    let (older_mates, rest) = mates.split_at(WAYS - 1);
    let (newer_mates, last_mate) = rest.split_at(WAYS - 1);

    assert_eq!(writer.insert(target), Insert::Added);
    for mate in older_mates {
        assert_eq!(writer.insert(*mate), Insert::Added);
    }
    // The bucket is full and target is its least recent id; touching it makes it the most recent.
    assert!(writer.contains(target));
    for (newer, older) in newer_mates.iter().zip(older_mates) {
        assert_eq!(
            writer.insert(*newer),
            Insert::AddedEvicting { evicted: *older },
            "eviction must take the least recent untouched mate"
        );
    }
    assert!(reader.contains(target), "touched id evicted before its untouched mates");
    assert!(older_mates.iter().all(|mate| !reader.contains(*mate)));

    // With no further touch, target is now the least recent and goes next.
    assert_eq!(writer.insert(last_mate[0]), Insert::AddedEvicting { evicted: target });
    assert!(!reader.contains(target));
    assert_eq!(writer.len_events(), WAYS);
    assert_eq!(writer.evictions_total(), WAYS as u64);
}

// Proves readers never write: a reader lookup does not refresh recency, so the looked-up id is still evicted first.
#[test]
fn reader_lookups_do_not_refresh_recency() {
    let (mut writer, reader) = new_cache_seeded(WAYS * 16, 11);
    let target = event(9, 9);
    let mates = ids_in_bucket(&writer, 10, writer.bucket_of(target), WAYS);

    assert_eq!(writer.insert(target), Insert::Added);
    for mate in &mates[..WAYS - 1] {
        assert_eq!(writer.insert(*mate), Insert::Added);
    }
    assert!(reader.contains(target));
    assert_eq!(
        writer.insert(mates[WAYS - 1]),
        Insert::AddedEvicting { evicted: target }
    );
}

// Proves cross-thread safety: while one writer churns up to 3 million inserts for 3 s, readers never answer "absent" for an id published before their lookup nor "found" for an id never inserted.
#[test]
fn readers_on_other_threads_see_published_ids_and_never_see_absent_ids_during_churn() {
    const CHURN_STEPS_MAX: u64 = 3_000_000;
    const WRITER_TIME_MAX: Duration = Duration::from_secs(3);
    const PROTECTED_IDS: usize = 40_000;
    const HOT_PROTECTED_IDS: usize = 2 * WAYS;
    const READER_THREADS: u64 = 2;

    let seed = TestSeed::new();
    let (mut writer, reader) = new_cache_seeded(WAYS << 14, seed.0);
    // Protected ids live only in even buckets, at most WAYS per bucket, and
    // churn ids only in odd ones: so protected ids can never be evicted,
    // while their buckets still get rewritten whenever the writer touches them.
    let is_protected_bucket = |bucket: usize| bucket % 2 == 0;
    // The hot ids fill two whole protected buckets, published first: touching
    // one of them almost always moves it to the front, a real bucket rewrite.
    let hot_buckets = [0, 2];
    let mut protected_ids: Vec<EventId> = hot_buckets
        .iter()
        .flat_map(|bucket| ids_in_bucket(&writer, 4, *bucket, WAYS))
        .collect();
    let mut protected_per_bucket = vec![0_usize; writer.capacity_events() / WAYS];
    for bucket in hot_buckets {
        protected_per_bucket[bucket] = WAYS;
    }
    protected_ids.extend(
        (0..)
            .map(|seq| event(2, seq))
            .filter(|id| {
                let bucket = writer.bucket_of(*id);
                let has_room = is_protected_bucket(bucket) && protected_per_bucket[bucket] < WAYS;
                protected_per_bucket[bucket] += usize::from(has_room);
                has_room
            })
            .take(PROTECTED_IDS - HOT_PROTECTED_IDS),
    );
    let protected = Arc::new(protected_ids);
    let published_count = Arc::new(AtomicUsize::new(0));
    let writer_done = Arc::new(AtomicBool::new(false));

    let writer_thread = {
        let protected = Arc::clone(&protected);
        let published_count = Arc::clone(&published_count);
        let writer_done = Arc::clone(&writer_done);
        let mut rng = seed.rng(3);
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut churn_seq = 0_u64;
            let mut published = 0_usize;
            let mut churn_inserts = 0_u64;
            for step in 0..CHURN_STEPS_MAX {
                if step % 1024 == 0 && started.elapsed() > WRITER_TIME_MAX {
                    break;
                }
                let churn_id = loop {
                    churn_seq += 1;
                    let id = event(1, churn_seq);
                    if !is_protected_bucket(writer.bucket_of(id)) {
                        break id;
                    }
                };
                assert_ne!(writer.insert(churn_id), Insert::AlreadyPresent);
                churn_inserts += 1;
                if step % 16 == 0 && published < protected.len() {
                    assert_eq!(writer.insert(protected[published]), Insert::Added);
                    published += 1;
                    published_count.store(published, Ordering::Release);
                }
                if published > 0 {
                    // Reorders a protected bucket under the readers' feet, mostly a few hot ones.
                    let range = if rng.gen_ratio(3, 4) {
                        published.min(HOT_PROTECTED_IDS)
                    } else {
                        published
                    };
                    let id = protected[rng.gen_range(0..range)];
                    assert!(writer.contains(id), "writer lost protected {id:?}");
                }
            }
            writer_done.store(true, Ordering::Release);
            (writer, churn_inserts, published)
        })
    };

    let reader_threads: Vec<_> = (0..READER_THREADS)
        .map(|reader_index| {
            let reader = reader.clone();
            let protected = Arc::clone(&protected);
            let published_count = Arc::clone(&published_count);
            let writer_done = Arc::clone(&writer_done);
            let mut rng = seed.rng(10 + reader_index);
            std::thread::spawn(move || {
                let mut published_lookups = 0_u64;
                let mut contended_lookups = 0_u64;
                let mut absent_lookups = 0_u64;
                while !writer_done.load(Ordering::Acquire) {
                    let published = published_count.load(Ordering::Acquire);
                    if published > 0 {
                        let range = if rng.gen_ratio(3, 4) {
                            published.min(HOT_PROTECTED_IDS)
                        } else {
                            published
                        };
                        let id = protected[rng.gen_range(0..range)];
                        let answer = reader.lookup(id);
                        assert_ne!(answer, Lookup::Absent, "published {id:?} not found");
                        published_lookups += 1;
                        contended_lookups += u64::from(answer == Lookup::Contended);
                    }
                    // Player 3 is never inserted; half of these land in churning buckets.
                    let never_inserted = event(3, rng.gen());
                    assert_ne!(
                        reader.lookup(never_inserted),
                        Lookup::Found,
                        "found never-inserted {never_inserted:?}"
                    );
                    absent_lookups += 1;
                }
                (published_lookups, contended_lookups, absent_lookups)
            })
        })
        .collect();

    let (mut writer, churn_inserts, published) = writer_thread.join().expect("writer thread");
    for reader_thread in reader_threads {
        let (published_lookups, contended_lookups, absent_lookups) = reader_thread.join().expect("reader thread");
        eprintln!(
            "reader: {published_lookups} published lookups ({contended_lookups} contended), {absent_lookups} absent lookups"
        );
        assert!(published_lookups > 1_000, "reader barely overlapped the writer");
        // Giving up is the designed answer when a bucket keeps changing; here
        // the writer hammers two buckets and may be preempted mid-update (three
        // threads on two cores), so some lookups give up, but far from most.
        assert!(
            contended_lookups * 4 < published_lookups,
            "{contended_lookups} of {published_lookups} lookups gave up"
        );
    }
    eprintln!(
        "writer: {churn_inserts} churn inserts, {published} protected ids, {} evictions",
        writer.evictions_total()
    );
    assert!(churn_inserts >= 100_000, "writer made too little progress");
    assert!(writer.evictions_total() > 0, "churn never filled a bucket");
    assert!(writer.len_events() <= writer.capacity_events());
    for id in &protected[..published] {
        assert!(reader.contains(*id) && writer.contains(*id), "protected {id:?} lost");
    }
}

/// One step of the model test.
#[derive(Clone, Copy, Debug)]
enum Operation {
    Insert(EventId),
    WriterContains(EventId),
    ReaderContains(EventId),
}

/// The reference: per bucket, ids from most to least recent.
struct ModelCache {
    buckets: Vec<VecDeque<EventId>>,
    evictions_total: u64,
}

impl ModelCache {
    fn insert(&mut self, bucket: usize, id: EventId) -> Insert {
        if self.promote(bucket, id) {
            return Insert::AlreadyPresent;
        }
        let ways = &mut self.buckets[bucket];
        ways.push_front(id);
        if ways.len() <= WAYS {
            return Insert::Added;
        }
        self.evictions_total += 1;
        Insert::AddedEvicting {
            evicted: ways.pop_back().expect("over-full bucket"),
        }
    }

    /// Moves `id` to the front if present.
    fn promote(&mut self, bucket: usize, id: EventId) -> bool {
        let ways = &mut self.buckets[bucket];
        let Some(position) = ways.iter().position(|held| *held == id) else {
            return false;
        };
        ways.remove(position);
        ways.push_front(id);
        true
    }

    fn contains(&self, bucket: usize, id: EventId) -> bool {
        self.buckets[bucket].contains(&id)
    }

    fn len_events(&self) -> usize {
        self.buckets.iter().map(VecDeque::len).sum()
    }
}

fn operation_strategy() -> impl Strategy<Value = Operation> {
    // A small id space over few buckets: plenty of hits, misses and evictions.
    let id = (0_u64..3, 0_u64..20).prop_map(|(player_id, seq)| event(player_id, seq));
    prop_oneof![
        3 => id.clone().prop_map(Operation::Insert),
        2 => id.clone().prop_map(Operation::WriterContains),
        1 => id.prop_map(Operation::ReaderContains),
    ]
}

proptest! {
    // Failures print the minimal failing case; nothing is persisted to files outside this test.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    // Proves every answer (insert outcome, writer and reader lookups, len, evictions) matches a per-bucket LRU model exactly.
    #[test]
    fn answers_match_a_per_bucket_lru_model(
        hash_seed: u64,
        capacity_events in WAYS..=4 * WAYS,
        operations in vec(operation_strategy(), 1..300),
    ) {
        let (mut writer, reader) = new_cache_seeded(capacity_events, hash_seed);
        let mut model = ModelCache {
            buckets: vec![VecDeque::new(); writer.capacity_events() / WAYS],
            evictions_total: 0,
        };
        for operation in operations {
            match operation {
                Operation::Insert(id) => {
                    let bucket = writer.bucket_of(id);
                    prop_assert_eq!(writer.insert(id), model.insert(bucket, id), "insert {:?}", id);
                }
                Operation::WriterContains(id) => {
                    let bucket = writer.bucket_of(id);
                    prop_assert_eq!(writer.contains(id), model.promote(bucket, id), "writer contains {:?}", id);
                }
                Operation::ReaderContains(id) => {
                    let bucket = reader.bucket_of(id);
                    prop_assert_eq!(reader.contains(id), model.contains(bucket, id), "reader contains {:?}", id);
                }
            }
            prop_assert_eq!(writer.len_events(), model.len_events());
            prop_assert_eq!(writer.evictions_total(), model.evictions_total);
        }
        // Final membership of the whole id space, seen by a reader (which does not disturb recency).
        for player_id in 0..3 {
            for seq in 0..20 {
                let id = event(player_id, seq);
                prop_assert_eq!(reader.contains(id), model.contains(reader.bucket_of(id), id), "final {:?}", id);
            }
        }
    }
}
