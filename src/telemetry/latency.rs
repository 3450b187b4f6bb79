//! HDR latency histograms, and the files they are written to on shutdown.
//!
//! Each shard records two histograms in microseconds: intake to ack (from the
//! moment a datagram or read completed to the moment its answer was decided:
//! at once for cache hits, RETRY and REJECTED, after the Redis call for the
//! rest, just before the answers are handed to the socket) and the Redis round trip of each script call. Recording is a
//! few arithmetic operations into memory allocated at shard start.
//!
//! Files, for `--hdr-out DIR/NAME.hgrm`:
//! - `NAME.hgrm`: intake to ack, all shards merged, in HdrHistogram's
//!   percentile-distribution text format (what its plotter reads);
//! - `NAME.redis.hgrm`: Redis round trip, merged;
//! - `NAME.shard<N>.hgrm` and `NAME.shard<N>.redis.hgrm`: the same per shard;
//! - `NAME.hlog`: every histogram above in one HdrHistogram interval log
//!   (log format 1.3, as Java's `HistogramLogWriter` writes it: header lines,
//!   then one line per histogram with a compressed V2 payload), tagged `ack`,
//!   `redis`, `ack-shard<N>`, `redis-shard<N>`, one interval each covering the
//!   run so far. Values and the `Interval_Max` column are in microseconds.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

use crate::limits::{HISTOGRAM_HIGHEST_US, HISTOGRAM_SIGNIFICANT_DIGITS};

/// Quantile steps per half-distance in the percentile output, as HdrHistogram's default.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The interval log format version Java's `HistogramLogWriter` announces; readers
/// of every port accept it.
const INTERVAL_LOG_FORMAT_VERSION: &str = "1.3";

/// The column legend line that Java's `HistogramLogWriter` writes before the intervals.
const INTERVAL_LOG_LEGEND: &str =
    "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"";

#[derive(Clone)]
pub struct Latency {
    pub intake_to_ack_us: Histogram<u64>,
    pub redis_round_trip_us: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            intake_to_ack_us: new_histogram(),
            redis_round_trip_us: new_histogram(),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_HIGHEST_US, HISTOGRAM_SIGNIFICANT_DIGITS)
        .expect("the bounds are constants that hdrhistogram accepts")
}

impl Latency {
    pub fn record_intake_to_ack(&mut self, received_at: Instant, now: Instant) {
        self.intake_to_ack_us.saturating_record(elapsed_us(received_at, now));
    }

    pub fn record_redis_round_trip(&mut self, round_trip: Duration) {
        self.redis_round_trip_us
            .saturating_record(round_trip.as_micros().clamp(1, u128::from(u64::MAX)) as u64);
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds everywhere, so adding never fails.
        self.intake_to_ack_us
            .add(&other.intake_to_ack_us)
            .expect("histograms share bounds");
        self.redis_round_trip_us
            .add(&other.redis_round_trip_us)
            .expect("histograms share bounds");
    }
}

fn elapsed_us(start: Instant, end: Instant) -> u64 {
    end.saturating_duration_since(start)
        .as_micros()
        .clamp(1, u128::from(u64::MAX)) as u64
}

/// HdrHistogram's percentile-distribution text, values in microseconds.
pub fn percentile_distribution(histogram: &Histogram<u64>) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for step in histogram.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        let quantile = step.quantile_iterated_to();
        let value = step.value_iterated_to() as f64;
        let total_count = histogram.count_between(0, step.value_iterated_to());
        if quantile < 1.0 {
            let _ = writeln!(
                text,
                "{value:12.3} {quantile:2.12} {total_count:10} {:14.2}",
                1.0 / (1.0 - quantile)
            );
        } else {
            let _ = writeln!(text, "{value:12.3} {quantile:2.12} {total_count:10}");
        }
    }
    let _ = writeln!(
        text,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        histogram.mean(),
        histogram.stdev()
    );
    let _ = writeln!(
        text,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        histogram.max() as f64,
        histogram.len()
    );
    let _ = writeln!(
        text,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        histogram.buckets(),
        sub_bucket_count()
    );
    text
}

/// HdrHistogram's sub-bucket count for our precision, as its footer reports it.
fn sub_bucket_count() -> u64 {
    (2 * 10u64.pow(u32::from(HISTOGRAM_SIGNIFICANT_DIGITS))).next_power_of_two()
}

/// The files for one run; see the module doc for their names.
pub fn write_files(
    path: &Path,
    merged: &Latency,
    shards: &[Latency],
    started: SystemTime,
) -> std::io::Result<Vec<PathBuf>> {
    let sibling = |suffix: &str| -> PathBuf {
        let stem = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!("{stem}{suffix}"))
    };
    let mut written = Vec::new();
    let mut write = |target: PathBuf, histogram: &Histogram<u64>| -> std::io::Result<()> {
        write_then_rename(&target, |file| {
            file.write_all(percentile_distribution(histogram).as_bytes())
        })?;
        written.push(target);
        Ok(())
    };
    write(path.to_path_buf(), &merged.intake_to_ack_us)?;
    write(sibling(".redis.hgrm"), &merged.redis_round_trip_us)?;
    for (index, shard) in shards.iter().enumerate() {
        write(sibling(&format!(".shard{index}.hgrm")), &shard.intake_to_ack_us)?;
        write(
            sibling(&format!(".shard{index}.redis.hgrm")),
            &shard.redis_round_trip_us,
        )?;
    }
    let log_path = sibling(".hlog");
    write_then_rename(&log_path, |file| write_interval_log(file, merged, shards, started))?;
    written.push(log_path);
    Ok(written)
}

/// Writes a file under a temporary name beside it and renames it into place,
/// so that a reader (a test, an operator's script after SIGUSR1) sees either
/// the previous file or the whole new one, never one being written.
fn write_then_rename(
    target: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut temporary_name = target.as_os_str().to_owned();
    temporary_name.push(".tmp");
    let temporary = PathBuf::from(temporary_name);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&temporary)?);
    let written = write(&mut file).and_then(|()| file.flush());
    drop(file);
    match written {
        Ok(()) => std::fs::rename(&temporary, target),
        Err(error) => {
            let _ = std::fs::remove_file(&temporary);
            Err(error)
        }
    }
}

/// An HdrHistogram interval log, line for line what Java's `HistogramLogWriter`
/// writes: a comment naming the writer and the unit, the format version, the
/// start and base time, the legend, then one `Tag=...` line per histogram whose
/// payload is compressed V2 (cookie 0x1c849314), the only encoding the readers
/// of interval logs (HistogramLogAnalyzer, the Java, Python, C and Go ports)
/// accept. Timestamps are seconds since the start; every interval covers the
/// run so far.
fn write_interval_log(
    file: &mut std::io::BufWriter<std::fs::File>,
    merged: &Latency,
    shards: &[Latency],
    started: SystemTime,
) -> std::io::Result<()> {
    let invalid = |error: String| std::io::Error::new(std::io::ErrorKind::InvalidData, error);
    let run_duration = SystemTime::now().duration_since(started).unwrap_or_default();
    let started_unix = started.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let started_secs = started_unix.as_secs_f64();
    writeln!(
        file,
        "#[Logged with shardgate {} (intake to ack and Redis round trip in microseconds)]",
        env!("CARGO_PKG_VERSION")
    )?;
    writeln!(file, "#[Histogram log format version {INTERVAL_LOG_FORMAT_VERSION}]")?;
    writeln!(
        file,
        "#[StartTime: {started_secs:.3} (seconds since epoch), {}]",
        java_date_utc(started_unix.as_secs())
    )?;
    writeln!(file, "#[BaseTime: {started_secs:.3} (seconds since epoch)]")?;
    writeln!(file, "{INTERVAL_LOG_LEGEND}")?;
    let mut serializer = V2DeflateSerializer::new();
    // The header is ours (the crate's builder writes neither the version nor
    // the legend); with no start time, base time or divisor set, the builder
    // adds nothing to it and the writer only formats the interval lines.
    let mut writer = IntervalLogWriterBuilder::new()
        .with_max_value_divisor(1.0)
        .begin_log_with(&mut *file, &mut serializer)
        .map_err(|error| invalid(format!("cannot start interval log: {error}")))?;
    let mut entries: Vec<(String, &Histogram<u64>)> = vec![
        ("ack".into(), &merged.intake_to_ack_us),
        ("redis".into(), &merged.redis_round_trip_us),
    ];
    for (index, shard) in shards.iter().enumerate() {
        entries.push((format!("ack-shard{index}"), &shard.intake_to_ack_us));
        entries.push((format!("redis-shard{index}"), &shard.redis_round_trip_us));
    }
    for (tag, histogram) in &entries {
        let tag = Tag::new(tag).ok_or_else(|| invalid(format!("invalid interval log tag {tag}")))?;
        writer
            .write_histogram(histogram, Duration::ZERO, run_duration, Some(tag))
            .map_err(|error| invalid(format!("cannot write interval log: {error}")))?;
    }
    file.flush()
}

/// `Sun Dec 06 20:15:50 UTC 2026`: what Java's `Date.toString()` prints in UTC,
/// which its `HistogramLogWriter` puts after the StartTime seconds.
fn java_date_utc(unix_secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let second_of_day = unix_secs % 86_400;
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[((days + 4) % 7) as usize];
    let (year, month, day) = civil_from_days(days);
    format!(
        "{weekday} {} {day:02} {:02}:{:02}:{:02} UTC {year}",
        MONTHS[(month - 1) as usize],
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01, by Howard
/// Hinnant's `civil_from_days` (proleptic Gregorian, eras of 400 years).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March, so that February's leap day falls last.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file is replaced whole or not at all: a failed write keeps the old
    /// content and leaves no temporary file behind; a good one replaces it.
    #[test]
    fn files_are_replaced_whole_or_not_at_all() {
        let directory = tempfile::tempdir().unwrap();
        let target = directory.path().join("latency.hgrm");
        std::fs::write(&target, "old").unwrap();
        let failed = write_then_rename(&target, |file| {
            file.write_all(b"half of the new")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(
            std::fs::read_dir(directory.path()).unwrap().count(),
            1,
            "no temporary file is left"
        );
        write_then_rename(&target, |file| file.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }

    /// Java's Date.toString() in UTC for days across leap years, century rules and month ends.
    #[test]
    fn java_date_matches_known_days() {
        let cases = [
            (0, "Thu Jan 01 00:00:00 UTC 1970"),
            (951_782_400, "Tue Feb 29 00:00:00 UTC 2000"),
            (4_107_542_399, "Sun Feb 28 23:59:59 UTC 2100"),
            (4_107_542_400, "Mon Mar 01 00:00:00 UTC 2100"),
            (1_796_588_150, "Sun Dec 06 20:15:50 UTC 2026"),
            (1_704_067_199, "Sun Dec 31 23:59:59 UTC 2023"),
        ];
        for (unix_secs, expected) in cases {
            assert_eq!(java_date_utc(unix_secs), expected, "unix {unix_secs}");
        }
    }
}
