#!/usr/bin/env bash
# Checks the operator artifacts in docs/monitoring/:
#   - the SLO rules and panels are what scripts/gen-slo-rules.py makes of
#     shardgate-slos.toml today: regenerated on copies, any difference fails
#     (stale rules after an objective changed);
#   - shardgate-alerts.yml: `promtool check rules`, then `promtool test rules`
#     with synthetic series, so each main alert is shown to fire (and not to
#     fire early), and shardgate-slo-tests.yml for the burn-rate alerts;
#   - shardgate-dashboard.json: valid JSON, importable (a ${DS_PROMETHEUS}
#     input that every panel uses), and every panel query valid PromQL
#     (promtool checks them as recording rules);
#   - every shardgate_* metric either file names is in the metrics reference
#     of docs/operations.md.
# Installs the Debian `prometheus` package (for promtool) when it is missing and
# we are root; otherwise prints the command and exits 1. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

ALERTS=docs/monitoring/shardgate-alerts.yml
SLO_TESTS=docs/monitoring/shardgate-slo-tests.yml
DASHBOARD=docs/monitoring/shardgate-dashboard.json
REFERENCE=docs/operations.md

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    # On a host running systemd this also enables the Prometheus service;
    # CI containers start no services.
    echo "installing prometheus (for promtool) with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "missing: promtool. Install with: sudo apt-get update && sudo apt-get install -y prometheus" >&2
    exit 1
  fi
fi
# The SLO generator reads TOML with tomllib (Python 3.11, Debian 12's python3).
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "missing: python3 3.11 or newer (scripts/gen-slo-rules.py). Install with: sudo apt-get install -y python3" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== SLO rules and panels against docs/monitoring/shardgate-slos.toml"
cp "$ALERTS" "$work/regenerated-alerts.yml"
cp "$DASHBOARD" "$work/regenerated-dashboard.json"
python3 scripts/gen-slo-rules.py --alerts "$work/regenerated-alerts.yml" --dashboard "$work/regenerated-dashboard.json"
stale=0
diff -u "$ALERTS" "$work/regenerated-alerts.yml" || stale=1
diff -u "$DASHBOARD" "$work/regenerated-dashboard.json" || stale=1
if [ "$stale" -ne 0 ]; then
  echo "stale SLO rules or panels (diff above): run python3 scripts/gen-slo-rules.py and commit the result" >&2
  exit 1
fi
echo "  generated rules and panels are up to date"

echo "== promtool check rules $ALERTS"
promtool check rules "$ALERTS"

echo "== promtool test rules (alerts against synthetic series)"
cp "$ALERTS" "$work/shardgate-alerts.yml"
cat >"$work/alerts-test.yml" <<'EOF'
rule_files:
  - shardgate-alerts.yml
evaluation_interval: 15s
tests:
  - name: one shard loses Redis; later the process stops answering scrapes
    interval: 15s
    input_series:
      - series: 'shardgate_redis_up{job="shardgate",instance="a:9100",shard="0"}'
        values: '1 1 0x10'
      - series: 'shardgate_redis_up{job="shardgate",instance="a:9100",shard="1"}'
        values: '1x12'
      - series: 'up{job="shardgate",instance="a:9100"}'
        values: '1x4 0x8'
    promql_expr_test:
      - expr: ALERTS{alertname="ShardgateRedisDown"}
        eval_time: 45s
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateRedisDown",alertstate="pending",instance="a:9100",severity="critical"}'
            value: 1
      - expr: ALERTS{alertname="ShardgateRedisDown",alertstate="firing"}
        eval_time: 75s
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateRedisDown",alertstate="firing",instance="a:9100",severity="critical"}'
            value: 1
      - expr: ALERTS{alertname="ShardgateDown",alertstate="firing"}
        eval_time: 90s
        exp_samples: []
      - expr: ALERTS{alertname="ShardgateDown",alertstate="firing"}
        eval_time: 135s
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateDown",alertstate="firing",instance="a:9100",job="shardgate",severity="critical"}'
            value: 1

  - name: --durability replica, a master's replica stops confirming
    interval: 1m
    input_series:
      - series: 'shardgate_redis_wait_shortfalls_total{job="shardgate",instance="a:9100",shard="0",node="10.0.0.3:7000"}'
        values: '0x3 0+20x10'
      - series: 'shardgate_redis_wait_shortfalls_total{job="shardgate",instance="a:9100",shard="1",node="10.0.0.3:7000"}'
        values: '0x3 0+5x10'
      - series: 'shardgate_redis_wait_shortfalls_total{job="shardgate",instance="a:9100",shard="0",node="10.0.0.1:7000"}'
        values: '0x13'
    promql_expr_test:
      - expr: ALERTS{alertname="ShardgateReplicaUnconfirmed",alertstate="firing"}
        eval_time: 4m
        exp_samples: []
      - expr: ALERTS{alertname="ShardgateReplicaUnconfirmed",alertstate="firing"}
        eval_time: 8m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateReplicaUnconfirmed",alertstate="firing",instance="a:9100",node="10.0.0.3:7000",severity="critical"}'
            value: 1

  - name: 10% RETRY, 2% REJECTED, p99.9 at 8.5 ms, a burst of UDP drops
    interval: 1m
    input_series:
      - series: 'shardgate_acks_sent_total{job="shardgate",instance="a:9100",shard="0",transport="udp",status="accepted"}'
        values: '0+5280x20'
      - series: 'shardgate_acks_sent_total{job="shardgate",instance="a:9100",shard="0",transport="udp",status="retry"}'
        values: '0+600x20'
      - series: 'shardgate_acks_sent_total{job="shardgate",instance="a:9100",shard="0",transport="udp",status="rejected"}'
        values: '0+120x20'
      - series: 'shardgate_intake_to_ack_seconds_bucket{job="shardgate",instance="a:9100",shard="0",transport="udp",le="0.002"}'
        values: '0+5900x20'
      - series: 'shardgate_intake_to_ack_seconds_bucket{job="shardgate",instance="a:9100",shard="0",transport="udp",le="0.005"}'
        values: '0+5980x20'
      - series: 'shardgate_intake_to_ack_seconds_bucket{job="shardgate",instance="a:9100",shard="0",transport="udp",le="0.01"}'
        values: '0+6000x20'
      - series: 'shardgate_intake_to_ack_seconds_bucket{job="shardgate",instance="a:9100",shard="0",transport="udp",le="+Inf"}'
        values: '0+6000x20'
      - series: 'shardgate_udp_kernel_drops_total{job="shardgate",instance="a:9100",shard="0"}'
        values: '0x10 30x10'
      - series: 'shardgate_retries_total{job="shardgate",instance="a:9100",shard="0",cause="overload"}'
        values: '0x20'
      - series: 'shardgate_tcp_connections_closed_total{job="shardgate",instance="a:9100",shard="0",reason="at_limit"}'
        values: '0x20'
    promql_expr_test:
      - expr: ALERTS{alertstate="firing"}
        eval_time: 3m
        exp_samples: []
      - expr: ALERTS{alertstate="firing"}
        eval_time: 12m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateRetryRatioHigh",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateRejectedRatioHigh",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateAckLatencyP999High",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateUdpKernelDrops",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
      - expr: ALERTS{alertstate="firing"}
        eval_time: 19m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateRetryRatioHigh",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateRejectedRatioHigh",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateAckLatencyP999High",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1

  - name: in-flight bound, TCP limit, memory growth
    interval: 1m
    input_series:
      - series: 'shardgate_events_in_flight{job="shardgate",instance="a:9100",shard="1"}'
        values: '100x3 2200x10'
      - series: 'shardgate_retries_total{job="shardgate",instance="a:9100",shard="1",cause="overload"}'
        values: '0x3 0+50x10'
      - series: 'shardgate_tcp_connections_open{job="shardgate",instance="a:9100",shard="1"}'
        values: '1000x13'
      - series: 'shardgate_tcp_connections_closed_total{job="shardgate",instance="a:9100",shard="1",reason="at_limit"}'
        values: '0x3 0+5x10'
      - series: 'shardgate_process_resident_memory_bytes{job="shardgate",instance="a:9100"}'
        values: '100000000+1000000x200'
    promql_expr_test:
      - expr: ALERTS{alertstate="firing"}
        eval_time: 12m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateEventsInFlightNearBound",alertstate="firing",instance="a:9100",shard="1",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateInFlightOverload",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateTcpConnectionsNearLimit",alertstate="firing",instance="a:9100",shard="1",severity="warning"}'
            value: 1
          - labels: 'ALERTS{alertname="ShardgateTcpConnectionsRefused",alertstate="firing",instance="a:9100",severity="warning"}'
            value: 1
      - expr: ALERTS{alertname="ShardgateMemoryGrowing",alertstate="firing"}
        eval_time: 150m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateMemoryGrowing",alertstate="firing",instance="a:9100",job="shardgate",severity="warning"}'
            value: 1

  - name: abuse limits
    interval: 1m
    input_series:
      - series: 'shardgate_frames_limited_total{job="shardgate",instance="a:9100",shard="0",transport="udp"}'
        values: '0x2 0+30000x30'
      - series: 'shardgate_tcp_connections_closed_total{job="shardgate",instance="a:9100",shard="0",reason="slow_reader"}'
        values: '0x2 0+2x30'
    promql_expr_test:
      # Limited frames at 500/s fire after the 10 min hold, not before.
      - expr: ALERTS{alertname="ShardgateSourcesLimited",alertstate="firing"}
        eval_time: 10m
        exp_samples: []
      - expr: ALERTS{alertname="ShardgateSourcesLimited",alertstate="firing"}
        eval_time: 20m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateSourcesLimited",alertstate="firing",instance="a:9100",severity="info"}'
            value: 1
      # Two slow readers a minute pass 10 in 15 min within about 6 min.
      - expr: ALERTS{alertname="ShardgateTcpSlowReaders",alertstate="firing"}
        eval_time: 3m
        exp_samples: []
      - expr: ALERTS{alertname="ShardgateTcpSlowReaders",alertstate="firing"}
        eval_time: 12m
        exp_samples:
          - labels: 'ALERTS{alertname="ShardgateTcpSlowReaders",alertstate="firing",instance="a:9100",severity="info"}'
            value: 1
EOF
(cd "$work" && promtool test rules alerts-test.yml)

echo "== promtool test rules $SLO_TESTS (burn-rate alerts)"
cp "$SLO_TESTS" "$work/"
(cd "$work" && promtool test rules "$(basename "$SLO_TESTS")")

echo "== $DASHBOARD"
python3 - "$DASHBOARD" "$work/dashboard-queries.yml" <<'EOF'
import json, sys

path, rules_path = sys.argv[1], sys.argv[2]
with open(path) as f:
    dashboard = json.load(f)  # raises on invalid JSON
problems = []
if not any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in dashboard.get("__inputs", [])):
    problems.append("no __inputs entry DS_PROMETHEUS of type prometheus: not importable")
if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < 36:
    problems.append(f"schemaVersion {dashboard.get('schemaVersion')!r}: want 36 or newer")
ids, queries = set(), []
for panel in dashboard.get("panels", []):
    if panel.get("id") in ids:
        problems.append(f"duplicate panel id {panel.get('id')}")
    ids.add(panel.get("id"))
    if panel.get("type") == "row":
        continue
    title = panel.get("title", "?")
    if panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        problems.append(f"panel {title!r}: datasource is not ${{DS_PROMETHEUS}}")
    targets = panel.get("targets", [])
    if not targets:
        problems.append(f"panel {title!r}: no queries")
    for target in targets:
        if target.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problems.append(f"panel {title!r} query {target.get('refId')}: datasource is not ${{DS_PROMETHEUS}}")
        expr = target.get("expr", "")
        if not expr:
            problems.append(f"panel {title!r} query {target.get('refId')}: empty expr")
        queries.append((panel["id"], target.get("refId", "X"), expr))
for variable in dashboard.get("templating", {}).get("list", []):
    if variable.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
        problems.append(f"variable {variable.get('name')!r}: datasource is not ${{DS_PROMETHEUS}}")
if problems:
    sys.exit("dashboard problems:\n  " + "\n  ".join(problems))
# Grafana's variables replaced by what they expand to, so promtool can parse each query.
with open(rules_path, "w") as out:
    out.write("groups:\n  - name: dashboard-queries\n    rules:\n")
    for panel_id, ref, expr in queries:
        expr = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        out.write(f"      - record: dashboard:panel{panel_id}_{ref}\n        expr: {json.dumps(expr)}\n")
print(f"  {len(ids)} panels, {len(queries)} queries, importable with ${{DS_PROMETHEUS}}")
EOF
promtool check rules "$work/dashboard-queries.yml" >/dev/null || {
  promtool check rules "$work/dashboard-queries.yml"
  echo "a dashboard query is not valid PromQL (above)" >&2
  exit 1
}
echo "  every panel query is valid PromQL"

echo "== metric names against the reference in $REFERENCE"
missing=0
for name in $(grep -ohE 'shardgate_[a-z0-9_]+' "$ALERTS" "$DASHBOARD" | sort -u); do
  base=$(sed -E 's/_(bucket|sum|count)$//' <<<"$name")
  if ! grep -qE "(^|[^a-z0-9_])${base}([^a-z0-9_]|\$)" "$REFERENCE"; then
    echo "  $name is used but $base is not in the metrics reference" >&2
    missing=1
  fi
done
[ "$missing" -eq 0 ] || exit 1
echo "  every metric used is documented"
echo "monitoring artifacts OK"
