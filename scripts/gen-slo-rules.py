#!/usr/bin/env python3
"""Generates shardgate's SLO rules and dashboard panels from docs/monitoring/shardgate-slos.toml.

The objectives (99.9%), the latency bound (5 ms), the windows and the burn
rates are written once, in the TOML file. This script derives from them:

  - in docs/monitoring/shardgate-alerts.yml, the groups between the
    "BEGIN generated SLO rules" and "END generated SLO rules" lines: one
    recording rule per SLI and window (the bad ratio, per instance), and the
    multi-window, multi-burn-rate alerts (ShardgateLatencyBudgetFastBurn, ...);
  - in docs/monitoring/shardgate-dashboard.json, the "Error budgets" row: the
    panels with ids from GENERATED_PANEL_ID_FIRST on, placed below the
    hand-made ones.

Everything outside those parts is kept byte for byte. Both files are rewritten
in place, or at --alerts/--dashboard; scripts/check-monitoring.sh runs it on
copies and fails when the committed files differ (stale rules).

Python 3.11 or newer (tomllib), standard library only.
"""

import argparse
import json
import re
import textwrap
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python before 3.11
    sys.exit("gen-slo-rules.py needs Python 3.11 or newer (tomllib)")

ROOT = Path(__file__).resolve().parent.parent
SLOS = ROOT / "docs/monitoring/shardgate-slos.toml"
ALERTS = ROOT / "docs/monitoring/shardgate-alerts.yml"
DASHBOARD = ROOT / "docs/monitoring/shardgate-dashboard.json"
METRICS_RS = ROOT / "src/telemetry/metrics.rs"

BEGIN = "  # BEGIN generated SLO rules"
END = "  # END generated SLO rules"
# Panels with ids from here on belong to this script; hand-made panels stay below it.
GENERATED_PANEL_ID_FIRST = 100
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
WINDOW_PATTERN = re.compile(r"^[1-9][0-9]*[mhd]$")


class SloError(Exception):
    """The SLO file is inconsistent; the message says how."""


def number(value):
    """A number as PromQL and YAML read it back: 6, 14.4, 0.001."""
    value = float(value)
    if value.is_integer():
        return str(int(value))
    text = repr(value)
    if "e" in text:
        raise SloError(f"{text}: too small to write as a plain decimal")
    return text


def budget(objective):
    """The error budget's share, rounded so 1 - 0.999 reads 0.001."""
    return round(1.0 - objective, 12)


def latency_bounds_us():
    text = METRICS_RS.read_text()
    found = re.search(r"pub(?:\(crate\))? const LATENCY_BOUNDS_US: \[u64; \d+\] = \[([^\]]*)\]", text)
    if not found:
        raise SloError(f"no LATENCY_BOUNDS_US in {METRICS_RS}")
    return [int(item.replace("_", "")) for item in found.group(1).split(",") if item.strip()]


def load(path):
    with open(path, "rb") as file:
        slos = tomllib.load(file)
    windows = slos["windows"]
    for window in windows:
        if not WINDOW_PATTERN.match(window):
            raise SloError(f"window {window!r}: want a count and m, h or d")
    for name in ("latency", "availability"):
        objective = slos[name]["objective"]
        if not 0.5 < objective < 1:
            raise SloError(f"{name} objective {objective}: want a share between 0.5 and 1")
    bound_us = slos["latency"]["bound_seconds"] * 1e6
    if round(bound_us) not in latency_bounds_us() or abs(bound_us - round(bound_us)) > 1e-6:
        raise SloError(
            f"latency bound {slos['latency']['bound_seconds']} s is not a bucket bound of "
            f"shardgate_intake_to_ack_seconds (LATENCY_BOUNDS_US in src/telemetry/metrics.rs): "
            "the SLI would be interpolated, not counted"
        )
    if not slos["availability"]["our_retry_causes"]:
        raise SloError("availability: our_retry_causes is empty")
    for alert in slos["alerts"]:
        for key in ("long_window", "short_window"):
            if alert[key] not in windows:
                raise SloError(f"alert {alert['name']}: {key} {alert[key]} is not in windows")
        if alert["burn_rate"] <= 1:
            raise SloError(f"alert {alert['name']}: burn_rate {alert['burn_rate']} must exceed 1")
    return slos


def slis(slos):
    """The two SLIs: name, title, what is bad, and the bad ratio's PromQL for a window."""
    job = slos["job"]
    bound = slos["latency"]["bound_seconds"]
    bucket = "shardgate_intake_to_ack_seconds_bucket"
    causes = "|".join(slos["availability"]["our_retry_causes"])

    def latency(window):
        return (
            f'1 - (\n  sum by (instance) (rate({bucket}{{job="{job}",le="{number(bound)}"}}[{window}]))\n'
            f'    / sum by (instance) (rate({bucket}{{job="{job}",le="+Inf"}}[{window}]))\n)'
        )

    def availability(window):
        return (
            f'sum by (instance) (rate(shardgate_retries_total{{job="{job}",cause=~"{causes}"}}[{window}]))\n'
            f'  / sum by (instance) (rate(shardgate_acks_sent_total{{job="{job}"}}[{window}]))'
        )

    bound_ms = number(bound * 1000)
    return [
        {
            "name": "latency",
            "title": "Latency",
            "objective": slos["latency"]["objective"],
            "good": f"answers within {bound_ms} ms",
            "bad": f"answers slower than {bound_ms} ms (intake to ack)",
            "expr": latency,
            "check": (
                "Compare the Redis round trip (shardgate_redis_round_trip_seconds) with intake to ack, "
                "look for RETRY with cause overload and for UDP kernel drops, and take exact HDR "
                "histograms with SIGUSR1 (docs/operations.md, \"Service level objectives\")."
            ),
        },
        {
            "name": "availability",
            "title": "Availability",
            "objective": slos["availability"]["objective"],
            "good": "answers free of a RETRY whose cause is ours",
            "bad": f"answers RETRY with cause {', '.join(slos['availability']['our_retry_causes'])}",
            "expr": availability,
            "check": (
                "shardgate_retries_total by cause says which: redis_down (is Redis up and reachable?), "
                "redis_error (shardgate_redis_errors_total by kind, Redis latency), overload (the "
                "in-flight bound: Redis does not keep up). docs/operations.md, \"Service level objectives\"."
            ),
        },
    ]


def record_name(sli, window):
    return f"instance:shardgate_slo_{sli['name']}_errors:ratio_rate{window}"


def block(text, indent):
    """A multi-line PromQL expression as a YAML folded-literal body."""
    pad = " " * indent
    return "\n".join(pad + line for line in text.splitlines())


def window_words(window):
    count, unit = window[:-1], window[-1]
    return f"{count} {({'m': 'min', 'h': 'h', 'd': 'd'})[unit]}"


def rules_text(slos):
    """The generated groups, between the BEGIN and END lines."""
    source = "docs/monitoring/shardgate-slos.toml"
    lines = [
        f"{BEGIN} (scripts/gen-slo-rules.py from {source}; edit that file, not these lines)",
        "  #",
        "  # Recording rules: each SLI's bad ratio per instance over every window. The",
        "  # alerts compare them with burn_rate x the error budget's share (1 - objective):",
        "  # a page needs both the long and the short window over the rate, so it starts",
        "  # when enough budget is gone and stops soon after the burn does.",
    ]
    for sli in slis(slos):
        share = budget(sli["objective"])
        lines += [
            f"  - name: shardgate-slo-{sli['name']}",
            "    rules:",
        ]
        for window in slos["windows"]:
            lines += [
                f"      - record: {record_name(sli, window)}",
                "        expr: |-",
                block(sli["expr"](window), 10),
            ]
        for alert in slos["alerts"]:
            rate = number(alert["burn_rate"])
            long_window, short_window = alert["long_window"], alert["short_window"]
            name = f"Shardgate{sli['title']}Budget{alert['name']}"
            spent = alert["burn_rate"] * _window_hours(long_window) / (slos["period_days"] * 24)
            lines += [
                f"      - alert: {name}",
                "        expr: |-",
                f"          ({record_name(sli, long_window)} / {number(share)}) > {rate}",
                "          and",
                f"          ({record_name(sli, short_window)} / {number(share)}) > {rate}",
                "        labels:",
                f"          severity: {alert['severity']}",
                "        annotations:",
                "          summary: >-",
                f"            shardgate {{{{ $labels.instance }}}} spends its {sli['name']} error budget at",
                f'            {{{{ $value | printf "%.1f" }}}}x the sustainable rate over {long_window}',
                "          description: >-",
            ]
            description = (
                f"{sli['title']} SLO: {number(sli['objective'] * 100)}% of {sli['good']}, over "
                f"{slos['period_days']} days. Over both the last {window_words(long_window)} and the last "
                f"{window_words(short_window)}, {sli['bad']} were more than {rate}x the budget's share "
                f"({number(share * 100)}%); at this pace {number(round(spent * 100, 1))}% of the "
                f"{slos['period_days']}-day budget goes every {window_words(long_window)}. {sli['check']}"
            )
            lines += textwrap.wrap(description, width=100, initial_indent=" " * 12, subsequent_indent=" " * 12)
    lines.append(END)
    return "\n".join(lines) + "\n"


def _window_hours(window):
    count, unit = int(window[:-1]), window[-1]
    return count * {"m": 1 / 60, "h": 1, "d": 24}[unit]


def splice_alerts(text, generated):
    """The alerts file with its generated part replaced, or appended when it has none."""
    start = text.find(BEGIN)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + generated
    end = text.find(END, start)
    if end < 0:
        raise SloError(f"{BEGIN!r} without {END!r}")
    end = text.index("\n", end) + 1 if "\n" in text[end:] else len(text)
    return text[:start] + generated + text[end:]


def target(ref, expr, legend):
    return {"datasource": DATASOURCE, "refId": ref, "expr": expr, "legendFormat": legend, "range": True}


def panels(slos, top):
    """The "Error budgets" row: budget left, burn rate per window, SLI against objective."""
    job = slos["job"]
    period = f"{slos['period_days']}d"
    out = [
        {
            "id": GENERATED_PANEL_ID_FIRST,
            "type": "row",
            "title": "Error budgets (generated from docs/monitoring/shardgate-slos.toml)",
            "collapsed": False,
            "gridPos": {"x": 0, "y": top, "w": 24, "h": 1},
            "panels": [],
        }
    ]
    y = top + 1
    for column, sli in enumerate(slis(slos)):
        share = budget(sli["objective"])
        x = column * 12
        base = GENERATED_PANEL_ID_FIRST + 1 + column * 10
        # The budget over the whole period comes from the counters, not from an average
        # of the recorded ratios, so quiet hours weigh less than busy ones.
        period_bad = sli["expr"](period).replace(f'job="{job}"', f'job="{job}",instance=~"$instance"')
        out.append(
            {
                "id": base,
                "type": "stat",
                "title": f"{sli['title']} error budget left ({slos['period_days']} d)",
                "description": (
                    f"1 - (bad share over {slos['period_days']} days) / (1 - {number(sli['objective'])}). "
                    f"Bad: {sli['bad']}. Below 0 the SLO is missed for the period."
                ),
                "datasource": DATASOURCE,
                "gridPos": {"x": x, "y": y, "w": 4, "h": 8},
                "targets": [target("A", f"1 - ({period_bad}) / {number(share)}", "{{instance}}")],
                "fieldConfig": {
                    "defaults": {
                        "unit": "percentunit",
                        "decimals": 1,
                        "thresholds": {
                            "mode": "absolute",
                            "steps": [
                                {"color": "red", "value": None},
                                {"color": "orange", "value": 0},
                                {"color": "green", "value": 0.5},
                            ],
                        },
                    },
                    "overrides": [],
                },
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background",
                    "graphMode": "none",
                    "textMode": "auto",
                    "justifyMode": "auto",
                    "orientation": "auto",
                },
            }
        )
        burn_targets = [
            target(
                chr(ord("A") + index),
                f'{record_name(sli, window)}{{instance=~"$instance"}} / {number(share)}',
                f"{{{{instance}}}} {window}",
            )
            for index, window in enumerate(slos["windows"])
        ]
        rates = sorted({alert["burn_rate"] for alert in slos["alerts"]})
        out.append(
            timeseries(
                base + 1,
                f"{sli['title']} burn rate by window (1 = budget lasts {slos['period_days']} d)",
                (
                    f"Bad share over each window / budget share ({number(share)}). Alerts: "
                    + "; ".join(
                        f"{alert['severity']} above {number(alert['burn_rate'])} over "
                        f"{alert['long_window']} and {alert['short_window']}"
                        for alert in slos["alerts"]
                    )
                    + "."
                ),
                {"x": x + 4, "y": y, "w": 8, "h": 8},
                burn_targets,
                "none",
                [{"color": "green", "value": None}]
                + [{"color": color, "value": rate} for color, rate in zip(["orange", "red"], rates)],
            )
        )
        out.append(
            timeseries(
                base + 2,
                f"{sli['title']} SLI: {sli['good']} (objective {number(sli['objective'] * 100)}%)",
                f"Good share over 1h and 1d against the objective. Bad: {sli['bad']}.",
                {"x": x, "y": y + 8, "w": 12, "h": 8},
                [
                    target("A", f'1 - {record_name(sli, "1h")}{{instance=~"$instance"}}', "{{instance}} 1h"),
                    target("B", f'1 - {record_name(sli, "1d")}{{instance=~"$instance"}}', "{{instance}} 1d"),
                    target("C", f"vector({number(sli['objective'])})", "objective"),
                ],
                "percentunit",
                [{"color": "red", "value": None}, {"color": "green", "value": sli["objective"]}],
            )
        )
    return out


def timeseries(panel_id, title, description, grid, targets, unit, steps):
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 0,
                    "stacking": {"mode": "none", "group": "A"},
                    "showPoints": "never",
                    "spanNulls": False,
                    "thresholdsStyle": {"mode": "line"},
                },
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def splice_dashboard(text, slos):
    dashboard = json.loads(text)
    kept = [panel for panel in dashboard["panels"] if panel.get("id", 0) < GENERATED_PANEL_ID_FIRST]
    top = max((panel["gridPos"]["y"] + panel["gridPos"]["h"] for panel in kept), default=0)
    dashboard["panels"] = kept + panels(slos, top)
    if len({panel["id"] for panel in dashboard["panels"]}) != len(dashboard["panels"]):
        raise SloError("a generated panel id is taken")
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slos", type=Path, default=SLOS)
    parser.add_argument("--alerts", type=Path, default=ALERTS, help="rewritten in place")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD, help="rewritten in place")
    args = parser.parse_args()
    try:
        slos = load(args.slos)
        alerts = splice_alerts(args.alerts.read_text(), rules_text(slos))
        dashboard = splice_dashboard(args.dashboard.read_text(), slos)
    except KeyError as error:
        sys.exit(f"gen-slo-rules.py: {args.slos}: missing key {error}")
    except (SloError, OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        sys.exit(f"gen-slo-rules.py: {error}")
    args.alerts.write_text(alerts)
    args.dashboard.write_text(dashboard)


if __name__ == "__main__":
    main()
