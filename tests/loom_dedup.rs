//! Model check (loom) of the dedup cache's single-writer seqlock: one writer thread inserts,
//! evicts and promotes ids in a bucket while a reader on another thread looks ids up. loom runs
//! every interleaving of the two threads (up to a preemption bound) and, for each relaxed load,
//! every value the C++/Rust memory model lets it return, so a torn read the seqlock fails to
//! catch shows up here as a failed assertion with the schedule that caused it.
//!
//! What each model proves, for every execution loom explores:
//! - the reader never answers `Found` for an id that was never inserted, in particular for the
//!   "torn" ids that mix the `player_id` of one way with the `seq` of the id the writer is
//!   shifting over it;
//! - an id inserted before the reader started and not evicted is never answered `Absent`; the
//!   only other answer is `Found`, or `Contended` if the reader gave up retrying, which callers
//!   treat as absent and ask Redis (the safe direction: it costs a round trip, never an event).
//!
//! The writer runs on the model's main thread and the reader on the one it spawns (see `model`
//! for why). The table has one bucket of `WAYS` ids, so every id collides. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom_dedup` (`scripts/loom.sh`); in any
//! other build this file is empty.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};

use loom::thread;

/// The cache under test, compiled into this test crate so that, with `--cfg loom` and `test`
/// both set, it takes its atomics from loom (see `mod sync` in `src/pipeline/dedup.rs`).
#[allow(dead_code)]
#[path = "../src/pipeline/dedup.rs"]
mod dedup;

/// `src/pipeline/dedup.rs` names its id type as `crate::wire::frame::EventId`.
mod wire {
    pub mod frame {
        pub use shardgate::wire::frame::EventId;
    }
}

use dedup::{new_cache_seeded, DedupReader, DedupWriter, Insert, Lookup, WAYS};
use wire::frame::EventId;

/// A table of one bucket: every id lands in it, so the writer's shifts pass every way.
const CAPACITY_EVENTS: usize = WAYS;
const HASH_SEED: u64 = 7;

/// Context switches loom may force per execution beyond the ones blocking forces. Two cover a
/// reader that starts inside a write section and a writer that starts one between the reader's
/// two version loads; with relaxed loads free to return older stores on top, that is where a
/// seqlock breaks (removing either fence fails every model). Three took minutes per model.
const PREEMPTIONS_MAX: usize = 2;

/// Fewer executions than this means loom did not interleave the threads at all (see `model`).
const EXECUTIONS_MIN: usize = 100;

/// Id number `k`: its halves differ per id, so a torn way (player of one id, seq of another) is
/// an id no one inserted.
fn id(k: u64) -> EventId {
    EventId {
        player_id: k,
        seq: 1000 + k,
    }
}

/// What a way reads as if its `player_id` is from id `k` and its `seq` from id `other`.
fn torn(k: u64, other: u64) -> EventId {
    EventId {
        player_id: k,
        seq: 1000 + other,
    }
}

/// A cache holding ids `1..=count`, id `count` the most recent.
fn filled(count: u64) -> (DedupWriter, DedupReader) {
    let (mut writer, reader) = new_cache_seeded(CAPACITY_EVENTS, HASH_SEED);
    assert_eq!(writer.capacity_events(), WAYS, "the model needs a table of one bucket");
    for k in 1..=count {
        assert_eq!(writer.insert(id(k)), Insert::Added);
    }
    (writer, reader)
}

/// How often the reader gave up, over all executions of one model, to print with the result.
struct Outcomes {
    executions: AtomicUsize,
    contended: AtomicUsize,
}

impl Outcomes {
    const fn new() -> Self {
        Outcomes {
            executions: AtomicUsize::new(0),
            contended: AtomicUsize::new(0),
        }
    }

    fn record(&self, lookup: Lookup) {
        if lookup == Lookup::Contended {
            self.contended.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prints the counts, and fails a model that explored too few executions to mean anything.
    fn report(&self, model: &str) {
        let executions = self.executions.load(Ordering::Relaxed);
        assert!(
            executions >= EXECUTIONS_MIN,
            "{model}: only {executions} executions explored"
        );
        println!(
            "{model}: {} executions, survivor lookups contended in {}",
            self.executions.load(Ordering::Relaxed),
            self.contended.load(Ordering::Relaxed)
        );
    }
}

/// Runs `body` under loom. Each model writes on the model's main thread and reads on the thread
/// it spawns, not the other way round: loom 0.7's DPOR keeps one last access per atomic, so when
/// the writer ran second, its own load of the version word (just before storing it) hid the
/// reader's earlier load, and loom explored a single execution. `Outcomes::report` checks that
/// a model did explore.
fn model(body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(PREEMPTIONS_MAX);
    builder.check(body);
}

/// An id present before the reader began and never evicted must not be reported absent.
fn assert_seen(reader: &DedupReader, present: EventId, outcomes: &Outcomes) {
    let lookup = reader.lookup(present);
    assert_ne!(lookup, Lookup::Absent, "{present:?} was stored and not evicted");
    outcomes.record(lookup);
}

/// An id never inserted must never be reported found.
fn assert_not_fabricated(reader: &DedupReader, never_inserted: EventId) {
    assert_ne!(
        reader.lookup(never_inserted),
        Lookup::Found,
        "{never_inserted:?} was never inserted"
    );
}

// An insert into a full bucket shifts every way and evicts the last; a concurrent reader never
// finds a torn id or the new id's neighbours mixed, and still sees an id that stays.
#[test]
fn eviction_never_fabricates_and_keeps_survivors() {
    static OUTCOMES: Outcomes = Outcomes::new();
    let full = WAYS as u64;
    model(move || {
        OUTCOMES.executions.fetch_add(1, Ordering::Relaxed);
        let (mut writer, reader) = filled(full);
        let newest = full + 1;
        let reading = thread::spawn(move || {
            // Id 2 moves into the last way, the one the eviction overwrites: the hardest to keep.
            assert_seen(&reader, id(2), &OUTCOMES);
            assert_not_fabricated(&reader, torn(3, 4));
            assert_not_fabricated(&reader, torn(4, 3));
            reader
        });
        // Evicts id 1 and moves ids 2..=full one way down: way w goes from id full-w to
        // id full+1-w, so a torn way reads torn(full-w, full+1-w) or torn(full+1-w, full-w).
        assert_eq!(writer.insert(id(newest)), Insert::AddedEvicting { evicted: id(1) });
        let reader = reading.join().expect("reader thread");
        assert_eq!(
            reader.lookup(id(1)),
            Lookup::Absent,
            "evicted id is gone once both are done"
        );
        assert_eq!(
            reader.lookup(id(newest)),
            Lookup::Found,
            "a finished insert is visible after join"
        );
    });
    OUTCOMES.report("eviction");
}

// A promotion (owner hit, moved to the front) followed by an insert into a free way: the
// reader never sees the torn ways either write leaves behind, nor loses an id that stays.
#[test]
fn promotion_and_insert_never_fabricate_and_keep_survivors() {
    static OUTCOMES: Outcomes = Outcomes::new();
    model(move || {
        OUTCOMES.executions.fetch_add(1, Ordering::Relaxed);
        let (mut writer, reader) = filled(3);
        let reading = thread::spawn(move || {
            assert_seen(&reader, id(2), &OUTCOMES);
            assert_not_fabricated(&reader, torn(2, 3));
            assert_not_fabricated(&reader, torn(1, 3));
            assert_not_fabricated(&reader, torn(1, 4));
            reader
        });
        // Ways hold 3, 2, 1; the hit on 1 shifts 3 and 2 down: 1, 3, 2.
        assert!(writer.contains(id(1)));
        // Then 4 takes the front and the count goes from 3 to 4: 4, 1, 3, 2.
        assert_eq!(writer.insert(id(4)), Insert::Added);
        let reader = reading.join().expect("reader thread");
        assert_eq!(
            reader.lookup(id(4)),
            Lookup::Found,
            "a finished insert is visible after join"
        );
    });
    OUTCOMES.report("promotion and insert");
}

// Two inserts back to back, so the reader can straddle two write sections: it may load the
// version in the first and re-check it in the second. It still never finds a torn id and never
// loses the id that stays.
#[test]
fn back_to_back_inserts_never_fabricate() {
    static OUTCOMES: Outcomes = Outcomes::new();
    model(move || {
        OUTCOMES.executions.fetch_add(1, Ordering::Relaxed);
        let (mut writer, reader) = filled(1);
        let reading = thread::spawn(move || {
            assert_seen(&reader, id(1), &OUTCOMES);
            assert_not_fabricated(&reader, torn(2, 3));
        });
        // Ways go 1, then 2 1, then 3 2 1: way 0 holds 1, 2, 3 in turn, way 1 holds 1 then 2.
        assert_eq!(writer.insert(id(2)), Insert::Added);
        assert_eq!(writer.insert(id(3)), Insert::Added);
        reading.join().expect("reader thread");
    });
    OUTCOMES.report("back-to-back inserts");
}
