//! `shardgate-bench sweep`: the same workload as `run` at rising rates, until the SLO breaks.
//!
//! Each step is a whole run (its own sockets, warmup and grace) at one rate, verified against
//! Redis when `--redis` is given, and judged by the same SLO as `run --slo-check`: nothing
//! lost, nothing stored twice, nothing acked but missing, first-attempt p99.9 under 5 ms. The
//! sweep stops after the first step that fails it, and names the highest rate that held.
//!
//! Steps do not share ids: each run's seqs start from its own start time in microseconds (see
//! `events.rs`), so a step's fresh events are never taken for an earlier step's. Between steps
//! the sweep pauses (`--pause`, 1 s by default) so the server's queues and Redis drain and one
//! step's backlog is not charged to the next.
//!
//! With `--scrape`, every step scrapes the server's metrics while its load runs (`scrape.rs`),
//! so two sweeps of one server, with and without it, show what instrumentation costs.

use std::path::Path;
use std::thread;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::plan::{Plan, PlanInput};
use crate::plot::{self, Curve};
use crate::report::Summary;
use crate::run::{self, RunFailure};
use crate::scrape::ScrapeConfig;

/// Steps one sweep may plan: far more than a useful sweep, few enough that a typo in `--step`
/// cannot keep the machine busy for days.
const STEPS_MAX: usize = 200;
/// Largest `--factor`: beyond it a sweep is two or three steps and says little.
const FACTOR_MAX: f64 = 100.0;
/// Steps whose curves the plot keeps (the last ones): bounds the histograms held.
const PLOTTED_STEPS_MAX: usize = 12;

/// How the rate rises from one step to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Increment {
    /// Add this many frames per second.
    Step(u64),
    /// Multiply by this (> 1), rounded, and at least one more.
    Factor(f64),
}

/// The rates a sweep tries, in order: from `from` up to `to` (inclusive when reached).
pub fn rates(from: u64, to: u64, increment: Increment) -> Result<Vec<u64>, String> {
    if from == 0 {
        return Err("--from must be at least 1 frame per second".into());
    }
    if to < from {
        return Err(format!("--to ({to}) must not be below --from ({from})"));
    }
    match increment {
        Increment::Step(0) => return Err("--step must be at least 1".into()),
        Increment::Factor(factor) if !(factor > 1.0 && factor <= FACTOR_MAX) => {
            return Err(format!("--factor must be above 1 and at most {FACTOR_MAX}"));
        }
        _ => {}
    }
    let mut rates = vec![from];
    loop {
        let last = rates[rates.len() - 1];
        let next = match increment {
            Increment::Step(step) => last.checked_add(step),
            // Rounded; a factor close to 1 still moves at least one frame per second.
            Increment::Factor(factor) => {
                let next = ((last as f64 * factor).round() as u64).max(last.saturating_add(1));
                (next > last).then_some(next)
            }
        };
        match next {
            Some(next) if next <= to => {
                if rates.len() == STEPS_MAX {
                    return Err(format!(
                        "--from {from} --to {to} makes more than {STEPS_MAX} steps; use a larger --step or --factor"
                    ));
                }
                rates.push(next);
            }
            _ => return Ok(rates),
        }
    }
}

/// Everything a sweep found.
#[derive(Serialize)]
pub struct SweepReport {
    /// Every step run, in order; the last one failed the SLO unless all held.
    pub steps: Vec<Summary>,
    /// The highest offered rate whose step held the SLO; null if none did.
    pub highest_rate_held: Option<u64>,
}

impl SweepReport {
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).expect("a sweep report is plain data");
        std::fs::write(path, json + "\n")
    }

    /// The closing line.
    pub fn verdict(&self) -> String {
        match self.highest_rate_held {
            Some(rate) => format!("highest rate that held the SLO: {rate}/s"),
            None => "highest rate that held the SLO: none".into(),
        }
    }
}

/// Why a sweep ended early without a verdict.
pub enum SweepError {
    /// A step's settings are out of range, e.g. too many frames planned at its rate (exit 2).
    Plan(String),
    /// A step could not start, or Redis could not be read back (exit 3).
    Connection(String),
    /// A step got no answer at all: nothing listens at the target (exit 3).
    NoAnswer(String),
}

/// One step's line: its rate, what it achieved, the SLO's numbers and the verdict.
pub fn step_line(index: usize, steps: usize, summary: &Summary) -> String {
    let redis = match (summary.stored_twice, summary.acked_missing) {
        (Some(stored_twice), Some(acked_missing)) => {
            format!("  stored_twice {stored_twice}  acked_missing {acked_missing}")
        }
        _ => String::new(),
    };
    let scrape = match &summary.scrape {
        Some(scrape) => format!("  scrapes {} (failed {})", scrape.scrapes, scrape.failures),
        None => String::new(),
    };
    let verdict = if summary.slo_ok {
        "SLO met".to_string()
    } else {
        format!("SLO FAILED: {}", summary.slo_failures.join("; "))
    };
    format!(
        "step {}/{steps}  rate {}/s  achieved {:.1}/s  first p99.9 {} µs  {}  final p99.9 {} µs  lost {}{redis}  \
         resent {}  cpu {:.2} µs/frame{scrape}  {verdict}",
        index + 1,
        summary.offered_rate,
        summary.achieved_rate,
        summary.latency_first_us.p999,
        summary.sli_text(),
        summary.latency_final_us.p999,
        summary.lost,
        summary.resent,
        summary.generator_cpu_us_per_frame,
    )
}

/// Runs the steps, printing one line per step, until one fails the SLO or the rates run out.
/// With `plot_path`, draws the steps' first-attempt curves; with `scrape`, scrapes the server
/// during every step. Every step's plan is checked before the first one starts, so a bad rate
/// fails at once.
pub fn sweep(
    base: &PlanInput,
    rates: &[u64],
    pause: Duration,
    mut redis: Option<&mut crate::verify::Streams>,
    plot_path: Option<&Path>,
    scrape: Option<&ScrapeConfig>,
) -> Result<SweepReport, SweepError> {
    let plans = rates
        .iter()
        .map(|&rate_per_sec| {
            Plan::new(PlanInput {
                rate_per_sec,
                json_path: None,
                slo_check: false,
                ..base.clone()
            })
        })
        .collect::<Result<Vec<Plan>, String>>()
        .map_err(SweepError::Plan)?;
    let mut report = SweepReport {
        steps: Vec::with_capacity(plans.len()),
        highest_rate_held: None,
    };
    let mut plotted: Vec<(String, Histogram<u64>)> = Vec::new();
    for (index, plan) in plans.iter().enumerate() {
        if index > 0 {
            thread::sleep(pause);
        }
        let (outcome, verification) = match run::run_verified(plan, redis.as_deref_mut(), scrape) {
            Ok(measured) => measured,
            Err(RunFailure::Setup(message)) => return Err(SweepError::Connection(message)),
            Err(RunFailure::Verify { outcome, message }) => {
                println!("{}", step_line(index, plans.len(), &Summary::new(plan, &outcome, None)));
                return Err(SweepError::Connection(format!("verification failed: {message}")));
            }
        };
        let summary = Summary::new(plan, &outcome, verification.as_ref());
        println!("{}", step_line(index, plans.len(), &summary));
        if outcome.tally.sent > 0 && outcome.tally.answers_total() == 0 {
            return Err(SweepError::NoAnswer(format!(
                "no answer at all from {}: is shardgate listening there?",
                plan.targets_text()
            )));
        }
        if plotted.len() == PLOTTED_STEPS_MAX {
            plotted.remove(0);
        }
        let verdict = if summary.slo_ok { "held" } else { "failed" };
        plotted.push((
            format!("{}/s ({verdict})", plan.rate_per_sec),
            outcome.latencies.first_us,
        ));
        let held = summary.slo_ok;
        if held {
            report.highest_rate_held = Some(plan.rate_per_sec);
        }
        report.steps.push(summary);
        if !held {
            break;
        }
    }
    if let Some(path) = plot_path {
        let curves: Vec<Curve<'_>> = plotted
            .iter()
            .map(|(label, histogram)| Curve {
                label: label.clone(),
                latencies_us: histogram,
            })
            .collect();
        let title = format!(
            "{}: first-attempt latency by percentile, per rate",
            crate::plan::targets_text(&base.targets)
        );
        plot::write_svg(path, &title, &curves).map_err(SweepError::Connection)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_rise_by_step_or_factor() {
        assert_eq!(rates(10, 50, Increment::Step(20)), Ok(vec![10, 30, 50]));
        assert_eq!(rates(10, 55, Increment::Step(20)), Ok(vec![10, 30, 50]));
        assert_eq!(rates(7, 7, Increment::Step(1)), Ok(vec![7]));
        assert_eq!(
            rates(1_000, 10_000, Increment::Factor(2.0)),
            Ok(vec![1_000, 2_000, 4_000, 8_000])
        );
        assert_eq!(rates(1, 4, Increment::Factor(1.1)), Ok(vec![1, 2, 3, 4]));
        assert_eq!(
            rates(u64::MAX - 1, u64::MAX, Increment::Step(5)),
            Ok(vec![u64::MAX - 1])
        );
    }

    #[test]
    fn rates_refuse_bad_ranges() {
        for (from, to, increment, flag) in [
            (0, 10, Increment::Step(1), "--from"),
            (10, 5, Increment::Step(1), "--to"),
            (1, 10, Increment::Step(0), "--step"),
            (1, 10, Increment::Factor(1.0), "--factor"),
            (1, 10, Increment::Factor(f64::NAN), "--factor"),
            (1, 10, Increment::Factor(1_000.0), "--factor"),
            (1, 1_000_000, Increment::Step(1), "--step"),
        ] {
            let error = rates(from, to, increment).unwrap_err();
            assert!(error.contains(flag), "{error:?} does not name {flag}");
        }
    }

    // The line carries the rate, the SLO's numbers and the verdict; the JSON every step and
    // the highest rate held.
    #[test]
    fn lines_and_json() {
        let plan = Plan::new(crate::plan::tests::input()).unwrap();
        let outcome = crate::report::tests::outcome();
        let summary = Summary::new(&plan, &outcome, None);
        let line = step_line(0, 3, &summary);
        for needle in [
            "step 1/3",
            "rate 1000/s",
            "first p99.9 ",
            "within 5 ms 100.000%  RETRY ours n/a",
            "lost 0",
            "SLO met",
        ] {
            assert!(line.contains(needle), "{needle:?} not in {line}");
        }
        let report = SweepReport {
            steps: vec![summary],
            highest_rate_held: Some(1_000),
        };
        assert_eq!(report.verdict(), "highest rate that held the SLO: 1000/s");
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["highest_rate_held"], 1_000);
        assert_eq!(json["steps"][0]["offered_rate"], 1_000);
        let none = SweepReport {
            steps: Vec::new(),
            highest_rate_held: None,
        };
        assert_eq!(none.verdict(), "highest rate that held the SLO: none");
        assert!(serde_json::to_value(&none).unwrap()["highest_rate_held"].is_null());
    }
}
