#!/usr/bin/env python3
"""Reads a shardgate `.hlog` with HdrHistogram's Python port (`hdrh.log`), an
implementation independent of the Rust crate that wrote it.

Checks what belongs to the format itself and exits non-zero (naming the line)
on the first violation:
  - the header lines Java's HistogramLogWriter writes: the format version, the
    StartTime with its date (which must name the same second), the BaseTime, and
    the column legend, all before the first interval;
  - every interval payload is compressed V2 (cookie 0x1c849314);
  - `hdrh.log.HistogramLogReader` decodes every interval line, none skipped, and
    finds the same start time;
  - each line's Interval_Max column equals the decoded histogram's maximum.

Then prints what it decoded, for the caller to compare with what it sent:
    start_time=<secs> base_time=<secs> intervals=<n>
    interval tag=<tag> count=<n> min=<us> max=<us> p50=<us> p99=<us> \
        lowest=<n> highest=<n> digits=<n> start=<secs> length=<secs>

Usage: hlog_reader.py FILE.hlog
"""

import base64
import datetime
import re
import struct
import sys

from hdrh.log import HistogramLogReader

FORMAT_VERSION_LINE = "#[Histogram log format version 1.3]"
LEGEND_LINE = '"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"'
COMPRESSED_V2_COOKIE = 0x1C849314
START_TIME = re.compile(r"^#\[StartTime: (\d+\.\d{3}) \(seconds since epoch\), (.+)\]$")
BASE_TIME = re.compile(r"^#\[BaseTime: (\d+\.\d{3}) \(seconds since epoch\)\]$")
INTERVAL = re.compile(r"^Tag=([^, ]+),(\d+\.\d{3}),(\d+\.\d{3}),(\d+\.\d{3}),([A-Za-z0-9+/=]+)$")
# java.util.Date.toString() in UTC.
JAVA_DATE_FORMAT = "%a %b %d %H:%M:%S UTC %Y"


class FormatError(Exception):
    pass


def check_lines(path):
    """The raw lines: header order and content, payload cookies. Returns the
    start time, base time and the interval lines as (tag, max column)."""
    with open(path, encoding="utf-8") as log:
        lines = log.read().splitlines()
    start_time = base_time = None
    seen_version = seen_legend = False
    intervals = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}: {line[:120]!r}"
        if line == FORMAT_VERSION_LINE:
            seen_version = True
        elif START_TIME.match(line):
            match = START_TIME.match(line)
            start_time = float(match.group(1))
            try:
                date = datetime.datetime.strptime(match.group(2), JAVA_DATE_FORMAT)
            except ValueError as error:
                raise FormatError(f"{where}: date is not java.util.Date's format: {error}")
            date_secs = date.replace(tzinfo=datetime.timezone.utc).timestamp()
            if int(date_secs) != int(start_time):
                raise FormatError(f"{where}: the date is {date_secs:.0f} s, the seconds {start_time:.3f}")
        elif BASE_TIME.match(line):
            base_time = float(BASE_TIME.match(line).group(1))
        elif line == LEGEND_LINE:
            seen_legend = True
        elif line.startswith("#"):
            continue
        else:
            match = INTERVAL.match(line)
            if not match:
                raise FormatError(f"{where}: neither a header line nor a tagged interval")
            if not (seen_version and seen_legend and start_time is not None and base_time is not None):
                raise FormatError(f"{where}: interval before the version, StartTime, BaseTime and legend lines")
            payload = base64.b64decode(match.group(5), validate=True)
            (cookie,) = struct.unpack(">I", payload[:4])
            if cookie != COMPRESSED_V2_COOKIE:
                raise FormatError(f"{where}: payload cookie {cookie:#x}, not compressed V2 {COMPRESSED_V2_COOKIE:#x}")
            intervals.append((match.group(1), float(match.group(4))))
    if not intervals:
        raise FormatError(f"{path}: no interval lines")
    return start_time, base_time, intervals


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    try:
        start_time, base_time, lines = check_lines(path)
        # The reference histogram is only for add_next_interval_histogram, unused here.
        reader = HistogramLogReader(path, None)
        decoded = []
        while True:
            histogram = reader.get_next_interval_histogram()
            if histogram is None:
                break
            decoded.append(histogram)
        if len(decoded) != len(lines):
            raise FormatError(f"{path}: the reader decoded {len(decoded)} of {len(lines)} interval lines")
        if abs(reader.get_start_time_sec() - start_time) > 0.0005:
            raise FormatError(f"{path}: the reader's start time {reader.get_start_time_sec()} is not {start_time}")
        print(f"start_time={start_time:.3f} base_time={base_time:.3f} intervals={len(decoded)}")
        for histogram, (tag, max_column) in zip(decoded, lines):
            if histogram.get_tag() != tag:
                raise FormatError(f"{path}: the reader tagged {histogram.get_tag()!r} the line tagged {tag!r}")
            if histogram.get_max_value() != max_column:
                raise FormatError(
                    f"{path}: tag {tag}: Interval_Max {max_column} but the payload's max is {histogram.get_max_value()}"
                )
            empty = histogram.get_total_count() == 0
            start_secs = histogram.get_start_time_stamp() / 1000.0 - start_time
            length_secs = (histogram.get_end_time_stamp() - histogram.get_start_time_stamp()) / 1000.0
            print(
                f"interval tag={tag} count={histogram.get_total_count()}"
                f" min={0 if empty else histogram.get_min_value()} max={histogram.get_max_value()}"
                f" p50={histogram.get_value_at_percentile(50)} p99={histogram.get_value_at_percentile(99)}"
                f" lowest={histogram.lowest_trackable_value} highest={histogram.highest_trackable_value}"
                f" digits={histogram.significant_figures}"
                f" start={start_secs:.3f} length={length_secs:.3f}"
            )
    except FormatError as error:
        sys.exit(f"hlog_reader: {error}")


if __name__ == "__main__":
    main()
