#!/usr/bin/env bash
# Redis Cluster against standalone Redis (issue 15): shardgate's highest SLO-holding rate and
# p99.9 with each, and the per-core figures the capacity model in docs/operations.md uses
# (server CPU per frame, Redis CPU per stored event summed over the masters, script calls per
# second, events per call), measured in the same run. Writes the "## Redis Cluster" section of
# bench/RESULTS.md (in place if it is there, else before "## Wins", else at the end) and prints
# it. About 3-6 minutes after the build.
#
#   scripts/bench-cluster.sh [--out FILE] [--step 8s] [--start 5000] [--max 400000] [--rates R1,R2,..]
#                            [--budget-secs 420] [--partitions 16] [--no-build] [--keep-logs DIR]
#   scripts/bench.sh --cluster [the same flags]
#
# Two Redis setups, started here and stopped on exit (a trap), both on loopback with no
# persistence (save "", appendonly no):
#   standalone  one redis-server;
#   cluster     six redis-servers joined by `redis-cli --cluster create --cluster-replicas 1`:
#               3 masters with one replica each, on free ports whose bus ports are free too.
# Each step is one shardgate server, started afresh against one of them (`serve --cores` from
# scripts/shard-cores.sh, `--placement fenced`, the per-source limit raised out of the way as in
# scripts/bench.sh, `--metrics`, `--partitions` as given), and one `shardgate-bench run` of --step
# (the first 2 s not timed) over UDP, 1 frame per datagram, 30% copies, verified with `--redis`
# (`redis-cluster://` for the cluster: each stream read from its master). Redis is emptied
# (FLUSHALL, on every master) before each step.
#
# The search: one ladder of rates for both, doubling from --start, each rate run standalone then
# cluster (so a drift of the machine's load weighs on both alike), a setup leaving the ladder at
# its first overloaded step (frames lost, RETRY over 1%, under 95% of the rate achieved, or p99.9
# of 50 ms or more; a step that only missed the 5 ms bound does not stop it, since on this
# machine a low rate's tail is no better than a high one's); then, per setup, bisecting twice
# between the highest rate that held the SLO and the lowest that failed above it. --rates runs
# fixed rates instead, both setups at each. A budget (--budget-secs from the start, build
# included) cuts the search; the output says so.
#
# Per-core figures, in every step: after the warmup the script reads the server's and every
# redis-server's utime + stime (/proc/PID/stat) and the server's counters (/metrics), waits
# --step minus 3 s, and reads them again. Server CPU per frame = its CPU ÷ frames received;
# Redis CPU per stored event = the masters' CPU summed (standalone: the one) ÷ events answered
# ACCEPTED (newly stored); the replicas' CPU is shown beside it, apart; calls per second =
# shardgate_redis_calls_total ÷ the window; events per call = events sent to Redis
# (shardgate_batch_events_sum) ÷ calls. "Other work" is every process's CPU on the machine less
# this script's own (/proc/stat), over each step.
set -euo pipefail
command_line="scripts/bench.sh --cluster${*:+ $*}"
cd "$(dirname "$0")/.."
started_s=$(date +%s)
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)

out=bench/RESULTS.md
step=8s
warmup_s=2
start_rate=5000
max_rate=400000
fixed_rates=""
budget_s=420
partitions=16
build=1
keep_logs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --step) step="$2"; shift 2 ;;
    --start) start_rate="$2"; shift 2 ;;
    --max) max_rate="$2"; shift 2 ;;
    --rates) fixed_rates="$2"; shift 2 ;;
    --budget-secs) budget_s="$2"; shift 2 ;;
    --partitions) partitions="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    --keep-logs) keep_logs="$2"; shift 2 ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ "$step" =~ ^[0-9]+s$ ]] && [ "${step%s}" -ge 5 ] || { echo "--step must be whole seconds, at least 5s" >&2; exit 2; }
[[ "$start_rate" =~ ^[0-9]+$ ]] && [ "$start_rate" -ge 1000 ] && [[ "$max_rate" =~ ^[0-9]+$ ]] \
  && [[ "$budget_s" =~ ^[0-9]+$ ]] && [[ "$partitions" =~ ^[0-9]+$ ]] \
  || { echo "--start (at least 1000), --max, --budget-secs and --partitions must be whole numbers" >&2; exit 2; }
[[ "$fixed_rates" =~ ^([0-9]+(,[0-9]+)*)?$ ]] || { echo "--rates is a comma-separated list of rates" >&2; exit 2; }
step_s=${step%s}
# The CPU window: after the warmup and half a second more, up to a second before the sends end.
window_s=$(( step_s - warmup_s - 1 ))

source scripts/ensure-deps.sh
for tool in jq curl python3 redis-cli; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool" >&2; exit 1; }
done

work=$(mktemp -d /tmp/shardgate-cluster.XXXXXX)
# pids, cleanup, log, stop, free_port, wait_for, process_cpu_s, cpu_snapshot, foreign_cores,
# start_redis, start_redis_cluster, cluster_pid.
source scripts/bench-lib.sh
trap cleanup EXIT
trap 'exit 130' INT TERM
cpu_snapshot
cpu_start=("$snap_busy" "$snap_own" "$(elapsed)")

if [ "$build" = 1 ]; then
  log "building (release)"
  cargo build --release -q -p shardgate -p shardgate-bench
fi
build_s=$(elapsed)
# Private copies: a build running meanwhile in this tree must not swap the binaries mid-section.
cp target/release/shardgate target/release/shardgate-bench "$work/"
server="$work/shardgate"
bench="$work/shardgate-bench"

start_redis --appendonly no
log "standalone: private redis-server on $redis_url (no persistence)"
start_redis_cluster --appendonly no
log "cluster: masters ${cluster_masters[*]}, replicas ${cluster_replicas[*]} ($cluster_url)"
shard_cores=$(scripts/shard-cores.sh)

url_of() { [ "$1" = cluster ] && echo "$cluster_url" || echo "$redis_url"; }
flush() { # MODE
  local port
  if [ "$1" = cluster ]; then
    for port in "${cluster_masters[@]}"; do redis-cli -p "$port" flushall >/dev/null; done
  else
    redis-cli -p "$redis_port" flushall >/dev/null
  fi
}
# The summed utime + stime of the redis-servers of MODE in ROLE (masters or replicas).
redis_cpu() { # MODE ROLE
  local port total=0 ports=()
  if [ "$1" = standalone ]; then
    [ "$2" = masters ] && process_cpu_s "$redis_pid" || echo 0
    return
  fi
  if [ "$2" = masters ]; then ports=("${cluster_masters[@]}"); else ports=("${cluster_replicas[@]}"); fi
  for port in "${ports[@]}"; do
    total=$(awk -v t="$total" -v c="$(process_cpu_s "$(cluster_pid "$port")")" 'BEGIN { printf "%.2f", t + c }')
  done
  echo "$total"
}

start_server() { # MODE NAME: sets server_pid, udp_address, metrics_address
  local log_file="$work/$2-server.log"
  "$server" serve --cores "$shard_cores" --placement fenced --udp 127.0.0.1:0 --tcp 127.0.0.1:0 \
    --udp-source-frames-per-sec 100000 --redis "$(url_of "$1")" --prefix sgc --partitions "$partitions" \
    --metrics 127.0.0.1:0 2>"$log_file" &
  server_pid=$!
  pids+=("$server_pid")
  wait_for "$log_file" "shardgate: serving" || return 1
  udp_address=$(grep -o 'udp=[0-9.:]*' "$log_file" | tail -1 | cut -d= -f2)
  metrics_address=$(grep 'shardgate: serving' "$log_file" | tail -1 | grep -o 'metrics="\?[0-9.:]*' | tr -d '"' | cut -d= -f2)
  [ -n "$udp_address" ] && [ -n "$metrics_address" ] && kill -0 "$server_pid" 2>/dev/null
}
scrape() { curl -s --max-time 2 "http://$metrics_address/metrics" >"$work/metrics.txt" || : >"$work/metrics.txt"; }
# The sum of the metric lines matching the regex $1 in the last scrape.
metric_sum() { awk -v pattern="$1" '$0 ~ pattern { s += $NF } END { printf "%.6f", s }' "$work/metrics.txt"; }
# One reading: "time server_cpu masters_cpu replicas_cpu frames accepted retries calls batches batch_events rt_sum".
read_step() { # MODE
  local time cpu masters replicas
  time=$(date +%s.%N); cpu=$(process_cpu_s "$server_pid")
  masters=$(redis_cpu "$1" masters); replicas=$(redis_cpu "$1" replicas)
  scrape
  echo "$time $cpu $masters $replicas $(metric_sum '^shardgate_frames_received_total') \
$(metric_sum '^shardgate_acks_sent_total.*status="accepted"') $(metric_sum '^shardgate_acks_sent_total.*status="retry"') \
$(metric_sum '^shardgate_redis_calls_total') $(metric_sum '^shardgate_batch_events_count') \
$(metric_sum '^shardgate_batch_events_sum') $(metric_sum '^shardgate_redis_round_trip_seconds_sum')"
}

# One step: MODE at RATE. Appends to steps.tsv: mode rate verdict p999 lost twice missing
# achieved, then the window's differences (seconds, server CPU, masters' CPU, replicas' CPU,
# frames, accepted, retries, calls, batches, batch events, round-trip seconds) and the other
# work's cores. Returns 0 when the step held the SLO.
: >"$work/steps.tsv"
probe() { # MODE RATE
  local mode=$1 rate=$2 name="$1-$2" generator_pid before after json="$work/$1-$2.json" verdict fields
  local snap0_busy snap0_own snap0_time other
  flush "$mode"
  if ! start_server "$mode" "$name"; then
    log "$name: the server did not start ($(tail -1 "$work/$name-server.log"))"
    stop "$server_pid"
    printf '%s\t%s\tfailed\t-\t-\t-\t-\t-\n' "$mode" "$rate" >>"$work/steps.tsv"
    return 1
  fi
  cpu_snapshot
  snap0_busy=$snap_busy snap0_own=$snap_own snap0_time=$(elapsed)
  timeout 120 "$bench" run --target "udp://$udp_address" --rate "$rate" --duration "$step" --warmup "${warmup_s}s" \
    --frames-per-datagram 1 --redis "$(url_of "$mode")" --prefix sgc --partitions "$partitions" --json "$json" \
    >"$work/$name.txt" 2>&1 &
  generator_pid=$!
  pids+=("$generator_pid")
  sleep "$warmup_s.5"
  before=$(read_step "$mode")
  sleep "$window_s"
  after=$(read_step "$mode")
  wait "$generator_pid" 2>/dev/null || true
  forget "$generator_pid"
  stop "$server_pid"
  cpu_snapshot
  other=$(foreign_cores "$snap0_busy" "$snap0_own" "$snap0_time" "$snap_busy" "$snap_own" "$(elapsed)")
  if [ ! -s "$json" ]; then
    printf '%s\t%s\tfailed\t-\t-\t-\t-\t-\n' "$mode" "$rate" >>"$work/steps.tsv"
    log "$name: no result ($(tail -1 "$work/$name.txt"))"
    return 1
  fi
  verdict=$(jq -r 'if .slo_ok then "held" else "failed" end' "$json")
  fields=$(jq -r '[.latency_first_us.p999, .lost, (.stored_twice // "-"), (.acked_missing // "-"), .achieved_rate] | @tsv' "$json")
  awk -v OFS='\t' -v b="$before" -v a="$after" -v head="$mode	$rate	$verdict	$fields" -v other="$other" 'BEGIN {
    n = split(b, x, " "); split(a, y, " "); line = head
    for (i = 1; i <= n; i++) line = line OFS sprintf("%.6f", y[i] - x[i])
    print line, other }' >>"$work/steps.tsv"
  log "$name: $verdict (p99.9 $(jq -r '.latency_first_us.p999' "$json") µs, lost $(jq -r '.lost' "$json"), stored twice $(jq -r '.stored_twice // "-"' "$json")), $(tail -1 "$work/steps.tsv" | awk -F'\t' '$13 > 0 && $16 > 0 { printf "server %.2f µs/frame, Redis %.2f µs/stored event, %.0f calls/s, %.1f events/call", $10 * 1e6 / $13, $11 * 1e6 / ($14 > 0 ? $14 : 1), $16 / $9, $18 / $16 }'), other work $other cores"
  [ "$verdict" = held ]
}

# ---- the search ----------------------------------------------------------------------------
# True when MODE's step at RATE shows a setup that could not keep up, not one that only missed
# the p99.9 bound: frames lost, RETRY for over 1% of the frames, the achieved rate under 95% of
# the offered one, or a p99.9 of 50 ms or more (ten times the SLO's). On this shared 2-core
# machine a low rate's tail is no better than a higher one's (the wake-ups cost the same), so a
# step that missed the SLO narrowly does not end its setup's climb; an overloaded one does.
overloaded() { # MODE RATE
  awk -F'\t' -v m="$1" -v r="$2" '$1 == m && $2 == r { row = $0 } END {
    if (row == "") exit 0
    split(row, f, "\t")
    if (f[4] == "-") exit 0
    exit !(f[5] > 0 || f[4] >= 50000 || f[8] < r * 0.95 || (f[13] > 0 && f[15] / f[13] > 0.01)) }' "$work/steps.tsv"
}
# The lowest rate above BEST at which MODE failed the SLO, or 0.
failed_above() { # MODE BEST
  awk -F'\t' -v m="$1" -v b="$2" '$1 == m && $2 + 0 > b + 0 && $3 != "held" && (low == 0 || $2 + 0 < low) { low = $2 + 0 }
    END { print low + 0 }' "$work/steps.tsv"
}
step_cost_s=$(( step_s + 6 ))
over_budget() { [ $(( $(elapsed) + step_cost_s )) -gt "$budget_s" ]; }
declare -A best failed cut
modes=(standalone cluster)
for mode in "${modes[@]}"; do best[$mode]=0; failed[$mode]=0; cut[$mode]=no; done
if [ -n "$fixed_rates" ]; then
  log "fixed rates: $fixed_rates/s, standalone then cluster at each"
  for rate in ${fixed_rates//,/ }; do
    for mode in "${modes[@]}"; do
      if over_budget; then cut[$mode]=yes; continue; fi
      if probe "$mode" "$rate"; then
        [ "$rate" -gt "${best[$mode]}" ] && best[$mode]=$rate
      elif [ "${failed[$mode]}" = 0 ] || [ "$rate" -lt "${failed[$mode]}" ]; then
        failed[$mode]=$rate
      fi
    done
  done
else
  log "search: doubling from ${start_rate}/s, standalone then cluster at each rate"
  active=("${modes[@]}")
  rate=$start_rate
  while [ "${#active[@]}" -gt 0 ] && [ "$rate" -le "$max_rate" ]; do
    still=()
    for mode in "${active[@]}"; do
      if over_budget; then cut[$mode]=yes; continue; fi
      if probe "$mode" "$rate"; then best[$mode]=$rate; fi
      overloaded "$mode" "$rate" || still+=("$mode")
    done
    active=("${still[@]}")
    rate=$(( rate * 2 ))
  done
  for mode in "${modes[@]}"; do
    for _ in 1 2; do
      failed[$mode]=$(failed_above "$mode" "${best[$mode]}")
      [ "${best[$mode]}" -gt 0 ] && [ "${failed[$mode]}" -gt 0 ] || break
      rate=$(( (best[$mode] + failed[$mode]) / 2 / 1000 * 1000 ))
      [ "$rate" -gt "${best[$mode]}" ] && [ "$rate" -lt "${failed[$mode]}" ] || break
      if over_budget; then cut[$mode]=yes; break; fi
      if probe "$mode" "$rate"; then best[$mode]=$rate; fi
    done
  done
fi
for mode in "${modes[@]}"; do failed[$mode]=$(failed_above "$mode" "${best[$mode]}"); done
cpu_snapshot
cpu_end=("$snap_busy" "$snap_own" "$(elapsed)")
foreign_all=$(foreign_cpu "${cpu_start[@]}" "${cpu_end[@]}")
foreign_all_cores=$(foreign_cores "${cpu_start[@]}" "${cpu_end[@]}")
log "other work on the machine: $foreign_all"

# ---- the section ---------------------------------------------------------------------------
step_field() { awk -F'\t' -v m="$1" -v r="$2" -v c="$3" '$1 == m && $2 == r { v = $c } END { print v }' "$work/steps.tsv"; }
# The per-core figures of MODE's step at RATE, as "name value" lines (empty when the window saw
# no frames): server_us redis_us replicas_us calls_per_s events_per_call calls_per_batch round_trip_ms.
figures() { # MODE RATE
  awk -F'\t' -v m="$1" -v r="$2" '$1 == m && $2 == r && NF >= 20 && $13 > 0 { row = $0 } END {
    if (row == "") exit
    split(row, f, "\t")
    printf "server_us %.2f\n", f[10] * 1e6 / f[13]
    printf "redis_us %s\n", (f[14] > 0 ? sprintf("%.2f", f[11] * 1e6 / f[14]) : "-")
    printf "replicas_us %s\n", (f[14] > 0 && f[1] == "cluster" ? sprintf("%.2f", f[12] * 1e6 / f[14]) : "-")
    printf "calls_per_s %.0f\n", f[16] / f[9]
    printf "events_per_call %s\n", (f[16] > 0 ? sprintf("%.2f", f[18] / f[16]) : "-")
    printf "calls_per_batch %s\n", (f[17] > 0 ? sprintf("%.2f", f[16] / f[17]) : "-")
    printf "round_trip_ms %s\n", (f[17] > 0 ? sprintf("%.2f", f[19] * 1e3 / f[17]) : "-")
    printf "retry_share %s\n", (f[13] > 0 ? sprintf("%.1f%%", f[15] * 100 / f[13]) : "-")
  }' "$work/steps.tsv"
}
figure() { figures "$1" "$2" | awk -v n="$3" '$1 == n { print $2 }'; }
divide() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf "%.2f", a / b; else printf "-" }'; }
# The rate of the side-by-side figures: the highest both setups ran and held; else the highest
# neither was overloaded at; else the highest both ran. common_kind says which.
both_ran=$(awk -F'\t' '{ ran[$1 "\t" $2] = 1 } END { for (k in ran) { split(k, p, "\t")
  if (p[1] == "standalone" && ran["cluster\t" p[2]]) print p[2] } }' "$work/steps.tsv" | sort -rn)
common_rate=0 common_kind=""
for rate in $both_ran; do
  if [ "$(step_field standalone "$rate" 3)" = held ] && [ "$(step_field cluster "$rate" 3)" = held ]; then
    common_rate=$rate common_kind=held; break
  fi
done
if [ "$common_rate" = 0 ]; then
  for rate in $both_ran; do
    if ! overloaded standalone "$rate" && ! overloaded cluster "$rate"; then common_rate=$rate common_kind=kept; break; fi
  done
fi
if [ "$common_rate" = 0 ]; then
  for rate in $both_ran; do common_rate=$rate common_kind=ran; break; done
fi
label() { [ "$1" = cluster ] && echo "Redis Cluster, 3 masters + 3 replicas" || echo "standalone Redis"; }

section="$work/section.md"
{
  echo "## Redis Cluster"
  echo
  echo "Written by \`$command_line\` on $(date -u '+%Y-%m-%d %H:%M UTC') in $(elapsed) s (build ${build_s} s), on $(nproc) cores"
  echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), Linux $(uname -r)); load average at the start"
  echo "$load_at_start, at the end $(cut -d' ' -f1-3 /proc/loadavg). **Other work on the machine** (CPU of processes this"
  echo "script did not start, /proc/stat less its own): $foreign_all; per step in the last column below.$(awk -v c="$foreign_all_cores" 'BEGIN { if (c >= 0.15) printf " That disturbs a 2-core measurement: read the ratios, not the microseconds." }')"
  echo
  echo "One shardgate (\`serve --cores $shard_cores --placement fenced --partitions $partitions --udp-source-frames-per-sec 100000 --metrics ...\`),"
  echo "started afresh for each step, against a private standalone \`redis-server\` or a private 6-node Redis Cluster (3 masters,"
  echo "one replica each; \`redis-cli --cluster create --cluster-replicas 1\`), all $(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2), on loopback, no persistence, emptied"
  echo "before each step. Load: \`shardgate-bench run\`, UDP, 1 frame per datagram, 30% copies, 8 sockets, steps of $step (the first"
  echo "${warmup_s} s not timed), verified with \`--redis\` (the cluster: \`redis-cluster://...\`, each stream read from its master). SLO per"
  echo "step: 0 lost, 0 stored twice, 0 acked but missing, first-attempt p99.9 < 5 ms."
  echo
  echo "**This machine cannot show scaling.** The 3 masters, their 3 replicas, the server and the generator all share"
  echo "$(nproc) cores, so the cluster's masters cannot add cores the way they would on their own hosts: what this measures is"
  echo "what the split costs (more calls, fewer events each, a batch waiting for its slowest call), not what 3 masters on"
  echo "3 hosts serve."
  echo
  echo "| Redis | highest rate holding the SLO | its p99.9 | lost | stored twice | lowest failed rate above it |"
  echo "|---|---|---|---|---|---|"
  for mode in "${modes[@]}"; do
    note=""
    [ "${cut[$mode]}" = yes ] && note=" (search cut short by the time budget)"
    if [ "${best[$mode]}" -gt 0 ]; then
      echo "| $(label "$mode") | **${best[$mode]}/s**$note | $(step_field "$mode" "${best[$mode]}" 4) µs | $(step_field "$mode" "${best[$mode]}" 5) | $(step_field "$mode" "${best[$mode]}" 6) | $([ "${failed[$mode]}" -gt 0 ] && echo "${failed[$mode]}/s (p99.9 $(step_field "$mode" "${failed[$mode]}" 4) µs)" || echo none) |"
    else
      echo "| $(label "$mode") | none held$note (p99.9 at each rate: \"Every step\") | - | - | - | - |"
    fi
  done
  echo
  echo "Cluster ÷ standalone, highest SLO-holding rate: **$(divide "${best[cluster]}" "${best[standalone]}")**."
  echo
  echo "### Per-core figures, cluster against standalone"
  echo
  if [ "$common_rate" -gt 0 ]; then
    case "$common_kind" in
      held) shown="the highest rate both setups ran and held the SLO at" ;;
      kept) shown="the highest rate both setups ran without being overloaded (neither held the SLO at a rate both ran; see the first table)" ;;
      *) shown="the highest rate both setups ran (at least one was overloaded there: its figures show it)" ;;
    esac
    echo "At ${common_rate}/s, $shown, in the symbols of docs/operations.md, \"A capacity model\":"
    echo
    echo "| figure | standalone | cluster | cluster ÷ standalone |"
    echo "|---|---|---|---|"
    for row in "server_us|\`c_s\`: server CPU per frame (µs)" "redis_us|\`c_r\`: Redis CPU per stored event, summed over the masters (µs)" \
      "replicas_us|the replicas' CPU per stored event, summed (µs; not in \`c_r\`)" "calls_per_s|script calls per second" \
      "events_per_call|events per call" "calls_per_batch|calls per batch" "round_trip_ms|mean batch round trip (ms; a cluster batch: all its calls)" \
      "retry_share|RETRY answers per frame received"; do
      key=${row%%|*} text=${row#*|}
      s=$(figure standalone "$common_rate" "$key"); c=$(figure cluster "$common_rate" "$key")
      echo "| $text | ${s:--} | ${c:--} | $(divide "${c%\%}" "${s%\%}") |"
    done
  else
    echo "No rate was run by both setups: no side-by-side figures."
  fi
  echo
  echo "### Every step"
  echo
  echo "Each row is one step. The per-core columns come from a ${window_s} s window after the warmup: CPU from"
  echo "\`/proc/PID/stat\` (utime + stime, all threads), counts from the server's \`/metrics\`; server CPU per frame over"
  echo "\`shardgate_frames_received_total\`, Redis CPU per stored event over ACCEPTED answers (newly stored), masters summed"
  echo "(replicas apart), events per call = \`shardgate_batch_events_sum\` ÷ \`shardgate_redis_calls_total\`."
  echo
  echo "| Redis | rate | SLO | p99.9 (µs) | lost | stored twice | server CPU per frame | Redis CPU per stored event (masters) | replicas' CPU per stored event | calls/s | events per call | calls per batch | batch round trip | RETRY per frame | other work (cores) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  sort -t$'\t' -k2,2n -k1,1r "$work/steps.tsv" | while IFS=$'\t' read -r mode rate verdict p999 lost twice _ _ rest; do
    other=$(echo "$rest" | awk -F'\t' '{ print $NF }')
    [ -n "$rest" ] || other="-"
    # The figure NAME of this step with UNIT after it, or "-".
    f() { local v; v=$(figure "$mode" "$rate" "$1"); [ -n "$v" ] && [ "$v" != - ] && echo "$v${2:+ $2}" || echo -; }
    echo "| $mode | $rate/s | $verdict | $p999 | $lost | $twice | $(f server_us µs) | $(f redis_us µs) | $(f replicas_us µs) | $(f calls_per_s) | $(f events_per_call) | $(f calls_per_batch) | $(f round_trip_ms ms) | $(f retry_share) | $other |"
  done
  echo
} >"$section"

# Into $out: replace the section if it is there, else insert it before "## Wins", else append.
if [ ! -s "$out" ]; then
  { echo "# shardgate benchmark results"; echo; cat "$section"; } >"$out"
elif grep -q '^## Redis Cluster$' "$out"; then
  awk -v file="$section" '
    /^## Redis Cluster$/ { while ((getline line < file) > 0) print line; skip = 1; next }
    skip && /^## / { skip = 0 }
    !skip' "$out" >"$work/out.md" && cp "$work/out.md" "$out"
elif grep -q '^## Wins' "$out"; then
  awk -v file="$section" '
    /^## Wins/ && !done { while ((getline line < file) > 0) print line; done = 1 }
    { print }' "$out" >"$work/out.md" && cp "$work/out.md" "$out"
else
  { echo; cat "$section"; } >>"$out"
fi
log "wrote the Redis Cluster section into $out"
cat "$section"
