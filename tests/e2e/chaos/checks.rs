//! The checks after the run: what Redis holds against every answer the client saw, the server's
//! memory, its logs and exits, and what the garbage got back.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::support::*;

use super::schedule::Journal;
use super::world::{ChannelReport, GarbageSender, Gate, GenReport, Load};
use super::{lock, PARTITIONS, RSS_BOUND_BYTES};

/// Everything a finished run leaves for the checks.
pub(super) struct Finished<'a> {
    pub(super) seed: u64,
    pub(super) secs: u64,
    pub(super) run_started: Instant,
    pub(super) journal: &'a Journal,
    pub(super) load: &'a Load,
    pub(super) reports: Vec<ChannelReport>,
    pub(super) gen_report: GenReport,
    pub(super) redis: &'a RedisServer,
    pub(super) gate: &'a mut Gate,
    pub(super) garbage: &'a GarbageSender,
    /// what went wrong during the run already (a settle deadline that passed)
    pub(super) problems: Vec<String>,
}

/// Every check of the finished run; returns the summary line, panics with every problem found.
pub(super) fn check(run: Finished<'_>) -> String {
    let Finished {
        seed,
        secs,
        run_started,
        journal,
        load,
        reports,
        gen_report,
        redis,
        gate,
        garbage,
        mut problems,
    } = run;
    let events = std::mem::take(&mut *lock(&load.events));
    let mut answers: HashMap<Key, Vec<St>> = HashMap::new();
    let mut counts = StatusCounts::default();
    let mut frames_sent = 0;
    let mut copies = 0;
    for r in &reports {
        for (k, v) in &r.answers {
            answers.entry(*k).or_default().extend(v.iter().copied());
        }
        counts.merge(&r.counts);
        frames_sent += r.frames_sent;
        copies += r.copies;
        if !r.foreign.is_empty() {
            problems.push(format!(
                "channel {}: {} answers for ids it never sent, e.g. {:?}",
                r.name,
                r.foreign.len(),
                &r.foreign[..r.foreign.len().min(5)]
            ));
        }
        if r.counts.rejected > 0 {
            problems.push(format!(
                "channel {}: {} valid frames answered REJECTED",
                r.name, r.counts.rejected
            ));
        }
        println!(
            "channel {}: copies={} frames_sent={} answers={:?} timeouts={} stray={} reconnects={} cuts={} \
             unresolved={} udp_client_drops={}",
            r.name,
            r.copies,
            r.frames_sent,
            r.counts,
            r.timeouts,
            r.stray,
            r.reconnects,
            r.cuts,
            r.unresolved.len(),
            r.udp_drops
        );
    }
    println!("generator: {gen_report:?}");
    let acked: HashSet<Key> = answers
        .iter()
        .filter(|(_, v)| v.iter().any(|s| s.is_stored()))
        .map(|(k, _)| *k)
        .collect();

    let mut conn = redis.connection();
    let stored = read_events(&mut conn, "sg", PARTITIONS);
    let streams = stream_keys(&mut conn);
    let verdict = verify(&events, &answers, &acked, &stored, &streams);
    problems.extend(verdict);

    // memory
    let max_kb = gate.rss.max_rss_kb.max(gate.rss.max_hwm_kb);
    if max_kb * 1024 > RSS_BOUND_BYTES {
        problems.push(format!(
            "server RSS reached {} KiB (VmRSS max {} KiB, VmHWM max {} KiB), over the bound of {} KiB; per \
             incarnation (pid, VmRSS kB, VmHWM kB): {:?}",
            max_kb,
            gate.rss.max_rss_kb,
            gate.rss.max_hwm_kb,
            RSS_BOUND_BYTES / 1024,
            gate.rss.per_incarnation
        ));
    }
    let per = &gate.rss.per_incarnation;
    println!(
        "server RSS per incarnation (pid, max VmRSS kB, max VmHWM kB), first 12 of {}: {:?}",
        per.len(),
        &per[..per.len().min(12)]
    );
    if gate.rss.samples < 10 {
        problems.push(format!("only {} RSS samples were taken", gate.rss.samples));
    }
    // logs and exits
    problems.append(&mut gate.exit_problems);
    for s in gate.all_servers() {
        let lines: Vec<String> = s.stderr_lines().into_iter().chain(s.stdout_lines()).collect();
        let panics: Vec<&String> = lines.iter().filter(|l| l.contains("panicked")).collect();
        if !panics.is_empty() {
            problems.push(format!(
                "server pid {} logged a panic:\n{}",
                s.pid(),
                panics.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
            ));
        }
    }
    if !garbage.not_rejected.is_empty() {
        problems.push(format!(
            "garbage was answered other than REJECTED: {:?}",
            &garbage.not_rejected[..garbage.not_rejected.len().min(10)]
        ));
    }
    if !garbage.rejected_unvouched.is_empty() {
        problems.push(format!(
            "garbage was answered REJECTED by an id no intact frame carried (a bad crc must get no answer): {:?}",
            &garbage.rejected_unvouched[..garbage.rejected_unvouched.len().min(10)]
        ));
    }

    let summary = format!(
        "e2e_chaos summary: seed={} fault_phase={secs}s duration={:.1}s faults[{}] events={} copies={} frames_sent={} \
         answers[accepted={} duplicate={} retry={} rejected={}] acked={} stored={} incarnations={} \
         garbage[datagrams={} tcp_conns={} answers={:?}] max_rss={:.1}MiB (bound {}MiB, {} samples) problems={}",
        seed,
        run_started.elapsed().as_secs_f64(),
        journal.counts_line(),
        events.len(),
        copies,
        frames_sent,
        counts.accepted,
        counts.duplicate,
        counts.retry,
        counts.rejected,
        acked.len(),
        stored.len(),
        gate.all_servers().count(),
        garbage.datagrams,
        garbage.tcp_conns,
        garbage.answers,
        max_kb as f64 / 1024.0,
        RSS_BOUND_BYTES >> 20,
        gate.rss.samples,
        problems.len()
    );
    println!("{summary}");
    assert!(
        problems.is_empty(),
        "{} problems:\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
    summary
}

/// The final checks against Redis; returns every problem found.
fn verify(
    events: &[Event],
    answers: &HashMap<Key, Vec<St>>,
    acked: &HashSet<Key>,
    stored: &[StoredEvent],
    streams: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    let sent: HashMap<Key, &Event> = events.iter().map(|e| (e.key(), e)).collect();
    assert_eq!(sent.len(), events.len(), "the generator made two events with one id");
    let mut where_stored: HashMap<Key, Vec<&StoredEvent>> = HashMap::new();
    for s in stored {
        where_stored.entry(s.key()).or_default().push(s);
    }
    let mut twice: Vec<String> = where_stored
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(k, v)| {
            format!(
                "{k:?} at {} (answers {:?})",
                v.iter()
                    .map(|s| format!("{} {} recv_us={}", s.stream_key, s.entry_id, s.recv_us))
                    .collect::<Vec<_>>()
                    .join(", "),
                answers.get(k)
            )
        })
        .collect();
    twice.sort();
    if !twice.is_empty() {
        problems.push(format!(
            "STORED TWICE: {} event ids, e.g.\n  {}",
            twice.len(),
            twice[..twice.len().min(10)].join("\n  ")
        ));
    }
    let mut foreign = Vec::new();
    let mut altered = Vec::new();
    for s in stored {
        match sent.get(&s.key()) {
            None => foreign.push(format!("{:?} at {} {}", s.key(), s.stream_key, s.entry_id)),
            Some(e) => {
                if s.partition != s.player % PARTITIONS
                    || s.action_type != e.action_type
                    || s.client_time_us != e.client_time_us
                    || s.payload != e.payload
                {
                    altered.push(format!(
                        "{:?} at {} {}: stored type={} ts={} payload={} (partition {}), sent type={} ts={} payload={}",
                        s.key(),
                        s.stream_key,
                        s.entry_id,
                        s.action_type,
                        s.client_time_us,
                        hex(&s.payload),
                        s.partition,
                        e.action_type,
                        e.client_time_us,
                        hex(&e.payload)
                    ));
                }
            }
        }
    }
    if !foreign.is_empty() {
        problems.push(format!(
            "STORED BUT NEVER SENT as a valid frame (garbage stored?): {}, e.g.\n  {}",
            foreign.len(),
            foreign[..foreign.len().min(10)].join("\n  ")
        ));
    }
    if !altered.is_empty() {
        problems.push(format!(
            "STORED WITH OTHER BYTES than sent (a corrupted copy stored?): {}, e.g.\n  {}",
            altered.len(),
            altered[..altered.len().min(10)].join("\n  ")
        ));
    }
    let mut lost: Vec<Key> = acked
        .iter()
        .filter(|k| !where_stored.contains_key(k))
        .copied()
        .collect();
    lost.sort();
    if !lost.is_empty() {
        let detail: Vec<String> = lost
            .iter()
            .take(10)
            .map(|k| format!("{k:?} answers {:?}", answers.get(k)))
            .collect();
        problems.push(format!(
            "ACKED BUT NOT STORED: {} events answered ACCEPTED/DUPLICATE are missing from the streams, e.g.\n  {}",
            lost.len(),
            detail.join("\n  ")
        ));
    }
    let mut reaccepted: Vec<String> = answers
        .iter()
        .filter(|(_, v)| v.iter().filter(|s| **s == St::Accepted).count() > 1)
        .map(|(k, v)| format!("{k:?} answers {v:?}"))
        .collect();
    reaccepted.sort();
    if !reaccepted.is_empty() {
        problems.push(format!(
            "ACCEPTED MORE THAN ONCE (each ACCEPTED is an append): {} ids, e.g.\n  {}",
            reaccepted.len(),
            reaccepted[..reaccepted.len().min(10)].join("\n  ")
        ));
    }
    let expected_streams: HashSet<String> = (0..PARTITIONS).map(|p| format!("sg:{{{p}}}:events")).collect();
    let extra: Vec<&String> = streams.iter().filter(|k| !expected_streams.contains(*k)).collect();
    if !extra.is_empty() {
        problems.push(format!("streams other than sg:{{0..16}}:events: {extra:?}"));
    }
    let unacked_stored = where_stored.keys().filter(|k| !acked.contains(k)).count();
    println!(
        "verify: sent={} acked={} stored_entries={} stored_ids={} stored_but_never_acked={} streams={}",
        events.len(),
        acked.len(),
        stored.len(),
        where_stored.len(),
        unacked_stored,
        streams.len()
    );
    problems
}
