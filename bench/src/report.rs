//! The run's summary: the numbers, the SLO verdict, and their text and JSON forms.
//!
//! The JSON keys are a contract for scripts that compare runs; the text is for people. Both are
//! built from one [`Summary`], so they cannot disagree.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::parse::format_duration;
use crate::plan::Plan;
use crate::run::RunOutcome;
use crate::scrape::ScrapeStats;
use crate::stall_probe::StallReport;
use crate::verify::Verification;

/// First-attempt p99.9 must stay below this for the SLO.
pub const SLO_FIRST_P999_US: u64 = 5_000;

/// The latency SLI's bound: an answer this fast is good. The same 5 ms as the server's SLO
/// (docs/monitoring/shardgate-slos.toml), so a run reads the way the burn-rate alerts do.
pub const SLI_LATENCY_BOUND_US: u64 = 5_000;

/// Latency quantiles in microseconds; all 0 when nothing was measured (`count` says so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
    pub count: u64,
    /// Latencies within [`SLI_LATENCY_BOUND_US`] (to the histogram's 3 significant digits).
    pub within_5ms: u64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: histogram.value_at_quantile(0.5),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            p9999: histogram.value_at_quantile(0.9999),
            max: histogram.max(),
            count: histogram.len(),
            within_5ms: histogram.count_between(0, SLI_LATENCY_BOUND_US),
        }
    }

    /// The share within [`SLI_LATENCY_BOUND_US`]; `None` when nothing was measured.
    pub fn within_5ms_share(&self) -> Option<f64> {
        (self.count > 0).then(|| self.within_5ms as f64 / self.count as f64)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub target: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub lanes: usize,
    pub frames_per_datagram: usize,
    pub payload_bytes: usize,
    pub dup_ratio: f64,
    /// Frames per second the schedule asked for.
    pub offered_rate: u64,
    /// First sends per second of the run's duration.
    pub achieved_rate: f64,
    /// Frames the schedule held; more than `sent` when the generator fell behind.
    pub scheduled: u64,
    /// First sends of frames (fresh events and copies), not resends.
    pub sent: u64,
    pub copies: u64,
    pub resent: u64,
    /// Answers received, by status.
    pub accepted: u64,
    pub duplicate: u64,
    pub retry: u64,
    pub rejected: u64,
    /// Frames without a final answer at the end.
    pub lost: u64,
    pub lost_sample: Vec<String>,
    pub unmatched_acks: u64,
    pub malformed_acks: u64,
    pub send_errors: u64,
    pub reconnects: u64,
    pub latency_first_us: Percentiles,
    pub latency_final_us: Percentiles,
    /// The two SLIs of docs/operations.md ("Service level objectives"), as the alerts read
    /// them: the share of first-attempt answers within 5 ms (client side, so the network
    /// is in it), and the share of the server's answers that were RETRY with a cause of ours
    /// (from `--scrape`; null without it or with fewer than two good scrapes).
    pub sli_within_5ms_share: Option<f64>,
    pub sli_retry_ours_share: Option<f64>,
    /// Distinct events (fresh ids) sent.
    pub events: u64,
    /// The verification; null without --redis.
    pub stored: Option<u64>,
    pub stored_twice: Option<u64>,
    pub acked_missing: Option<u64>,
    pub events_not_stored: Option<u64>,
    pub slo_ok: bool,
    pub slo_failures: Vec<String>,
    /// CPU time (user + system) the generator used while the load ran, and that per frame
    /// sent (first sends): the generator's share of a machine it shares with the server.
    pub generator_cpu_s: f64,
    pub generator_cpu_us_per_frame: f64,
    /// What `--scrape` did while the load ran (scrapes, failures, their time); null without it.
    pub scrape: Option<ScrapeStats>,
    /// What `--stall-probe` saw while the load ran (`stall_probe.rs`); null without it.
    pub stall_probe: Option<StallReport>,
}

impl Summary {
    pub fn new(plan: &Plan, outcome: &RunOutcome, verification: Option<&Verification>) -> Summary {
        let tally = &outcome.tally;
        let mut summary = Summary {
            target: plan.targets_text(),
            duration_s: plan.duration.as_secs_f64(),
            warmup_s: plan.warmup.as_secs_f64(),
            lanes: plan.lanes,
            frames_per_datagram: plan.frames_per_send,
            payload_bytes: plan.payload_bytes,
            dup_ratio: plan.dup_ratio,
            offered_rate: plan.rate_per_sec,
            achieved_rate: round_tenths(tally.sent as f64 / plan.duration.as_secs_f64()),
            scheduled: outcome.frames_scheduled,
            sent: tally.sent,
            copies: tally.copies,
            resent: tally.resent,
            accepted: tally.accepted,
            duplicate: tally.duplicate,
            retry: tally.retry,
            rejected: tally.rejected,
            lost: outcome.lost,
            lost_sample: outcome
                .lost_sample
                .iter()
                .map(|id| format!("{}:{}", id.player_id, id.seq))
                .collect(),
            unmatched_acks: tally.unmatched_acks,
            malformed_acks: tally.malformed_acks,
            send_errors: tally.send_errors,
            reconnects: tally.reconnects,
            latency_first_us: Percentiles::of(&outcome.latencies.first_us),
            latency_final_us: Percentiles::of(&outcome.latencies.final_us),
            sli_within_5ms_share: None,
            sli_retry_ours_share: outcome.scrape.as_ref().and_then(ScrapeStats::retry_ours_share),
            events: outcome.events,
            stored: verification.map(|verification| verification.stored),
            stored_twice: verification.map(|verification| verification.stored_twice),
            acked_missing: verification.map(|verification| verification.acked_missing),
            events_not_stored: verification.map(|verification| verification.events_not_stored),
            slo_ok: true,
            slo_failures: Vec::new(),
            generator_cpu_s: round_thousandths(outcome.generator_cpu.as_secs_f64()),
            generator_cpu_us_per_frame: round_thousandths(
                outcome.generator_cpu.as_secs_f64() * 1e6 / tally.sent.max(1) as f64,
            ),
            scrape: outcome.scrape.clone(),
            stall_probe: outcome.stall_probe.clone(),
        };
        summary.sli_within_5ms_share = summary.latency_first_us.within_5ms_share();
        summary.slo_failures = slo_failures(&summary);
        summary.slo_ok = summary.slo_failures.is_empty();
        summary
    }

    /// The two SLIs in a few words: `within 5 ms 99.950%  RETRY ours 0.010%`.
    pub fn sli_text(&self) -> String {
        format!(
            "within 5 ms {}  RETRY ours {}",
            share_text(self.sli_within_5ms_share, "no answer"),
            share_text(self.sli_retry_ours_share, "n/a (no --scrape)")
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a summary is plain data")
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_json() + "\n")
    }

    /// The human summary, several lines.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "shardgate-bench: {}  duration {} (warmup {})  lanes {}  frames/send {}  payload {} B  dup-ratio {}",
            self.target,
            format_duration(std::time::Duration::from_secs_f64(self.duration_s)),
            format_duration(std::time::Duration::from_secs_f64(self.warmup_s)),
            self.lanes,
            self.frames_per_datagram,
            self.payload_bytes,
            self.dup_ratio
        );
        let _ = writeln!(
            text,
            "  rate      offered {}/s  achieved {:.1}/s",
            self.offered_rate, self.achieved_rate
        );
        let _ = writeln!(
            text,
            "  frames    scheduled {}  sent {} (copies {}, events {})  resent {}  send_errors {}  reconnects {}",
            self.scheduled, self.sent, self.copies, self.events, self.resent, self.send_errors, self.reconnects
        );
        let _ = writeln!(
            text,
            "  answers   accepted {}  duplicate {}  retry {}  rejected {}  (late {}, malformed {})",
            self.accepted, self.duplicate, self.retry, self.rejected, self.unmatched_acks, self.malformed_acks
        );
        let _ = writeln!(
            text,
            "  generator cpu {:.2} s, {:.2} µs per frame sent",
            self.generator_cpu_s, self.generator_cpu_us_per_frame
        );
        let _ = writeln!(text, "  SLIs      {}", self.sli_text());
        if let Some(scrape) = &self.scrape {
            let first_error = scrape
                .first_error
                .as_deref()
                .map(|error| format!("  first error: {error}"))
                .unwrap_or_default();
            let _ = writeln!(
                text,
                "  scrape    {} every {}: {} scrapes, {} failed, {} skipped, last body {} B, mean {:.2} ms, max {:.2} ms{first_error}",
                scrape.url,
                format_duration(std::time::Duration::from_secs_f64(scrape.interval_s)),
                scrape.scrapes,
                scrape.failures,
                scrape.skipped,
                scrape.body_bytes_last,
                scrape.duration_mean_ms,
                scrape.duration_max_ms,
            );
        }
        if let Some(stalls) = &self.stall_probe {
            text.push_str(&stalls.text());
        }
        write_outcome_lines(
            &mut text,
            &OutcomeLines {
                lost: self.lost,
                lost_sample: &self.lost_sample,
                latency_first_us: &self.latency_first_us,
                latency_final_us: &self.latency_final_us,
                verification: match (
                    self.stored,
                    self.stored_twice,
                    self.acked_missing,
                    self.events_not_stored,
                ) {
                    (Some(stored), Some(stored_twice), Some(acked_missing), Some(events_not_stored)) => {
                        Some([stored, stored_twice, acked_missing, events_not_stored])
                    }
                    _ => None,
                },
                verification_label: "redis",
                not_verified: "not verified (no --redis)",
                slo_ok: self.slo_ok,
                slo_failures: &self.slo_failures,
            },
        );
        text
    }
}

/// Why the run misses the SLO: nothing lost, nothing stored twice, nothing acked but missing,
/// first-attempt p99.9 under 5 ms. Empty when it is met.
pub fn slo_failures(summary: &Summary) -> Vec<String> {
    let mut failures = Vec::new();
    if summary.lost > 0 {
        failures.push(format!("lost {} > 0", summary.lost));
    }
    if let Some(stored_twice) = summary.stored_twice.filter(|&count| count > 0) {
        failures.push(format!("stored_twice {stored_twice} > 0"));
    }
    if let Some(acked_missing) = summary.acked_missing.filter(|&count| count > 0) {
        failures.push(format!("acked_missing {acked_missing} > 0"));
    }
    if summary.latency_first_us.p999 >= SLO_FIRST_P999_US {
        failures.push(format!(
            "first-attempt p99.9 {} µs >= {SLO_FIRST_P999_US} µs",
            summary.latency_first_us.p999
        ));
    }
    failures
}

/// A share as a percentage with three decimals (99.9% leaves 0.1% to see), or what is missing.
fn share_text(share: Option<f64>, missing: &str) -> String {
    match share {
        Some(share) => format!("{:.3}%", share * 100.0),
        None => missing.to_string(),
    }
}

fn round_tenths(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn round_thousandths(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

/// The lines every text summary ends with (`run` and `peer` alike): what was
/// lost, the two latencies, the verification and the SLO verdict.
pub struct OutcomeLines<'a> {
    pub lost: u64,
    pub lost_sample: &'a [String],
    pub latency_first_us: &'a Percentiles,
    pub latency_final_us: &'a Percentiles,
    /// stored, stored twice, acked but missing, events not stored.
    pub verification: Option<[u64; 4]>,
    pub verification_label: &'a str,
    pub not_verified: &'a str,
    pub slo_ok: bool,
    pub slo_failures: &'a [String],
}

pub fn write_outcome_lines(text: &mut String, lines: &OutcomeLines<'_>) {
    let lost_sample = if lines.lost_sample.is_empty() {
        String::new()
    } else {
        format!("  e.g. player:seq {}", lines.lost_sample.join(" "))
    };
    let _ = writeln!(text, "  lost      {}{lost_sample}", lines.lost);
    let _ = writeln!(
        text,
        "  latency   {:<14}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}",
        "µs", "p50", "p99", "p99.9", "p99.99", "max", "count"
    );
    for (name, percentiles) in [
        ("first attempt", lines.latency_first_us),
        ("final", lines.latency_final_us),
    ] {
        let _ = writeln!(
            text,
            "            {name:<14}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}",
            percentiles.p50, percentiles.p99, percentiles.p999, percentiles.p9999, percentiles.max, percentiles.count
        );
    }
    let label = lines.verification_label;
    match lines.verification {
        Some([stored, stored_twice, acked_missing, events_not_stored]) => {
            let _ = writeln!(
                text,
                "  {label:<9} stored {stored}  stored_twice {stored_twice}  acked_missing {acked_missing}  \
                 events_not_stored {events_not_stored}"
            );
        }
        None => {
            let _ = writeln!(text, "  {label:<9} {}", lines.not_verified);
        }
    }
    if lines.slo_ok {
        let _ = writeln!(text, "  SLO       met");
    } else {
        let _ = writeln!(text, "  SLO       FAILED: {}", lines.slo_failures.join("; "));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::live::Tally;
    use crate::tracker::Latencies;

    pub(crate) fn outcome() -> RunOutcome {
        let mut latencies = Latencies::new();
        for value_us in 1..=1_000 {
            latencies.first_us.record(value_us).unwrap();
            latencies.final_us.record(value_us * 2).unwrap();
        }
        RunOutcome {
            tally: Tally {
                sent: 20_000,
                copies: 6_000,
                accepted: 14_000,
                duplicate: 6_000,
                retry: 10,
                ..Tally::default()
            },
            latencies,
            acked_ids: Vec::new(),
            lost: 0,
            lost_sample: Vec::new(),
            frames_scheduled: 20_000,
            events: 14_000,
            sent_per_player: Vec::new(),
            seq_base: 0,
            generator_cpu: std::time::Duration::from_millis(50),
            stall_probe: None,
            scrape: None,
        }
    }

    fn plan() -> Plan {
        Plan::new(crate::plan::tests::input()).unwrap()
    }

    // The JSON carries every documented key, latencies with their five quantiles, and null
    // verification without --redis.
    #[test]
    fn json_has_the_documented_keys() {
        let summary = Summary::new(&plan(), &outcome(), None);
        let json: serde_json::Value = serde_json::from_str(&summary.to_json()).unwrap();
        for key in [
            "offered_rate",
            "achieved_rate",
            "sent",
            "accepted",
            "duplicate",
            "retry",
            "rejected",
            "lost",
            "latency_first_us",
            "latency_final_us",
            "stored",
            "stored_twice",
            "acked_missing",
        ] {
            assert!(json.get(key).is_some(), "missing key {key}");
        }
        for latency in ["latency_first_us", "latency_final_us"] {
            for quantile in ["p50", "p99", "p999", "p9999", "max"] {
                assert!(json[latency][quantile].is_u64(), "{latency}.{quantile}");
            }
        }
        assert!(json["stored"].is_null() && json["stored_twice"].is_null() && json["acked_missing"].is_null());
        assert_eq!(json["offered_rate"], 1_000);
        assert_eq!(json["achieved_rate"], 2_000.0);
        assert_eq!(json["latency_first_us"]["max"], 1_000);
        assert_eq!(json["latency_first_us"]["p50"], 500);
        assert_eq!(json["slo_ok"], true);
    }

    // With verification the numbers are there; each SLO rule fails on its own.
    #[test]
    fn slo_rules() {
        let verification = Verification {
            stored: 14_000,
            events: 14_000,
            ..Verification::default()
        };
        let summary = Summary::new(&plan(), &outcome(), Some(&verification));
        assert!(summary.slo_ok, "{:?}", summary.slo_failures);
        assert_eq!(summary.stored, Some(14_000));
        assert!(summary.to_text().contains("SLO       met"));

        let mut lost = outcome();
        lost.lost = 2;
        assert!(Summary::new(&plan(), &lost, Some(&verification)).slo_failures[0].contains("lost 2"));
        let twice = Verification {
            stored_twice: 1,
            ..verification
        };
        assert!(Summary::new(&plan(), &outcome(), Some(&twice)).slo_failures[0].contains("stored_twice"));
        let missing = Verification {
            acked_missing: 3,
            ..verification
        };
        assert!(Summary::new(&plan(), &outcome(), Some(&missing)).slo_failures[0].contains("acked_missing"));
        let mut slow = outcome();
        slow.latencies.first_us.record(1_000_000).unwrap();
        slow.latencies.first_us.record_n(6_000, 10).unwrap();
        let failures = Summary::new(&plan(), &slow, Some(&verification)).slo_failures;
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("p99.9"), "{failures:?}");
    }

    // The latency SLI counts first-attempt answers within 5 ms; the availability SLI comes from
    // the scrape's counters, and is missing without it.
    #[test]
    fn slis_next_to_the_latencies() {
        let summary = Summary::new(&plan(), &outcome(), None);
        assert_eq!(summary.latency_first_us.within_5ms, 1_000);
        assert_eq!(summary.sli_within_5ms_share, Some(1.0));
        assert_eq!(summary.sli_retry_ours_share, None);
        assert!(
            summary
                .to_text()
                .contains("SLIs      within 5 ms 100.000%  RETRY ours n/a (no --scrape)"),
            "{}",
            summary.to_text()
        );

        let mut slow = outcome();
        slow.latencies.first_us.record_n(6_000, 1).unwrap();
        slow.latencies.first_us.record_n(5_000, 1).unwrap();
        slow.scrape = Some(ScrapeStats {
            answers: Some(20_000),
            retries_ours: Some(3),
            ..ScrapeStats::default()
        });
        let summary = Summary::new(&plan(), &slow, None);
        assert_eq!(
            (summary.latency_first_us.within_5ms, summary.latency_first_us.count),
            (1_001, 1_002)
        );
        assert_eq!(summary.sli_retry_ours_share, Some(0.00015));
        assert_eq!(summary.sli_text(), "within 5 ms 99.900%  RETRY ours 0.015%");
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["latency_first_us"]["within_5ms"], 1_001);
        assert_eq!(json["sli_retry_ours_share"], 0.00015);
        let nothing = Summary::new(
            &plan(),
            &RunOutcome {
                latencies: crate::tracker::Latencies::new(),
                ..outcome()
            },
            None,
        );
        assert_eq!(nothing.sli_within_5ms_share, None);
        assert!(nothing.sli_text().starts_with("within 5 ms no answer"));
    }

    // The text names every number a reader needs.
    #[test]
    fn text_names_the_numbers() {
        let text = Summary::new(&plan(), &outcome(), None).to_text();
        for needle in [
            "offered 1000/s",
            "achieved 2000.0/s",
            "sent 20000",
            "accepted 14000",
            "duplicate 6000",
            "retry 10",
            "rejected 0",
            "lost      0",
            "first attempt",
            "final",
            "not verified",
            "2.50 µs per frame sent",
        ] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
        assert!(!text.contains("  scrape    "), "{text}");
        assert!(serde_json::to_value(Summary::new(&plan(), &outcome(), None)).unwrap()["scrape"].is_null());
        let mut scraped = outcome();
        scraped.scrape = Some(ScrapeStats {
            url: "http://127.0.0.1:9100/metrics".into(),
            interval_s: 1.0,
            scrapes: 9,
            failures: 1,
            ..ScrapeStats::default()
        });
        let summary = Summary::new(&plan(), &scraped, None);
        let text = summary.to_text();
        assert!(
            text.contains("scrape    http://127.0.0.1:9100/metrics every 1s: 9 scrapes, 1 failed"),
            "{text}"
        );
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            (json["scrape"]["scrapes"].as_u64(), json["scrape"]["failures"].as_u64()),
            (Some(9), Some(1))
        );
    }
}
