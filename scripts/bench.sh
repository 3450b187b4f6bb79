#!/usr/bin/env bash
# The comparison: how fast can shardgate go while holding its SLO, next to the
# raw ceiling of this machine and next to clients that store directly ("no
# middle tier"). Writes bench/RESULTS.md.
#
#   scripts/bench.sh [--out FILE] [--step 8s] [--budget-secs 560] [--instr-secs 180] [--durable] [--nats URL] [--keep-logs DIR] [--no-efficiency]
#   scripts/bench.sh --only efficiency [scripts/bench-efficiency.sh's flags]
#   scripts/bench.sh --cluster [scripts/bench-cluster.sh's flags]
#
# --cluster (or --only cluster) runs only the Redis Cluster comparison, scripts/bench-cluster.sh:
# shardgate against a private 6-node cluster (3 masters) and a standalone Redis in the same run,
# the highest SLO-holding rate and p99.9 of each and the capacity model's per-core figures; it
# writes its own section of bench/RESULTS.md and leaves the others as they are.
#
# After the flood section, the efficiency section (issue 14: server CPU per frame against a
# blocking UDP echo, Redis CPU and memory per stored event, system calls per frame, the headline
# three times in a row; about 5 more minutes) is scripts/bench-efficiency.sh, which also runs
# alone; --no-efficiency leaves it out.
#
# Series, each searched for the highest rate that holds the SLO (0 lost,
# 0 stored twice, 0 acked but missing, first-attempt p99.9 < 5 ms):
#   reflector      shardgate-bench reflector: UDP echo, no work (the ceiling),
#                  1 and 16 frames per datagram
#   shardgate udp  1 frame per datagram, then 16 frames per datagram
#   shardgate tcp
#   peer redis     clients call Redis directly, one EVALSHA of the same script per event
#   peer nats      clients publish to NATS JetStream directly (Nats-Msg-Id dedup)
# and one headline step: shardgate UDP at 50 000/s for 30 s (5 s warmup), the
# issue's speed goal as stated. "The goals" table sets each goal against the run.
#
# Then the instrumentation cost: one shardgate started with --metrics, swept
# four times over the same rates around shardgate UDP's best (1 frame per
# datagram), in the order A B B A: A scrapes /metrics every second while the
# load runs (`--scrape`), B does not. It reports the highest rate that held the
# SLO each way, their ratio, how far the two repeats of each disagree (the
# run-to-run noise); then four fixed-rate runs, A B B A again, give the server's
# CPU per frame each way, a finer measure than the highest rate. It gets its own slice of the budget (--instr-secs).
#
# Every step is one `run` or `peer` of --step (warmup 2 s included) at a fixed
# rate, shardgate steps each against a freshly started server. The search
# doubles the rate from a start until a step fails (halving instead if the
# start fails), then bisects twice. A budget (default 560 s from the script's
# start, build included, leaving room for the flood section under 10 minutes)
# is shared equally by the series still to run, less --instr-secs kept for the
# instrumentation sweeps, each getting at least one step; a search cut short
# says so in the results.
#
# Redis: a private redis-server on a free loopback port in a temp dir, with no
# persistence (--save "" --appendonly no) unless --durable (appendonly yes,
# appendfsync always). The same Redis, settings and workload serve shardgate
# and the redis peer, and it is flushed between steps, so both pay the same for
# whatever persistence is chosen; without it the comparison measures the
# intake tiers, not this VM's disk. NATS: a private nats-server with JetStream
# (if the binary exists), the stream in memory for the same reason.
#
# Everything started here is stopped on exit; only loopback addresses are used.
set -euo pipefail
command_line="scripts/bench.sh${*:+ $*}"
cd "$(dirname "$0")/.."
if [ "${1:-}" = --only ]; then
  case "${2:-}" in
    efficiency) shift 2; exec scripts/bench-efficiency.sh "$@" ;;
    cluster) shift 2; exec scripts/bench-cluster.sh "$@" ;;
    *) echo "--only takes: efficiency, cluster" >&2; exit 2 ;;
  esac
fi
if [ "${1:-}" = --cluster ]; then
  shift
  exec scripts/bench-cluster.sh "$@"
fi
started_s=$(date +%s)
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)

out=bench/RESULTS.md
step=8s
warmup=2s
budget_s=560
instr_s=180
durable=0
nats_url=""
keep_logs=""
efficiency=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --step) step="$2"; shift 2 ;;
    --budget-secs) budget_s="$2"; shift 2 ;;
    --instr-secs) instr_s="$2"; shift 2 ;;
    --durable) durable=1; shift ;;
    --nats) nats_url="$2"; shift 2 ;;
    --keep-logs) keep_logs="$2"; shift 2 ;;
    --no-efficiency) efficiency=0; shift ;;
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ "$step" =~ ^[0-9]+s$ ]] && [ "${step%s}" -ge 4 ] || { echo "--step must be whole seconds, at least 4s (e.g. 8s)" >&2; exit 2; }
[[ "$budget_s" =~ ^[0-9]+$ ]] && [[ "$instr_s" =~ ^[0-9]+$ ]] && [ "$instr_s" -lt "$budget_s" ] \
  || { echo "--budget-secs and --instr-secs must be whole seconds, --instr-secs below --budget-secs" >&2; exit 2; }
case "$nats_url" in ""|nats://127.*|nats://localhost*|nats://\[::1\]*) ;; *) echo "--nats must be a loopback URL" >&2; exit 2 ;; esac

source scripts/ensure-deps.sh
# jq reads the steps' JSON; nats-server is optional (the NATS peer then says skipped).
if ! command -v jq >/dev/null 2>&1 || ! command -v nats-server >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    want=()
    command -v jq >/dev/null 2>&1 || want+=(jq)
    command -v nats-server >/dev/null 2>&1 || want+=(nats-server)
    echo "== installing ${want[*]} with apt-get" >&2
    timeout 120 apt-get install -y -qq "${want[@]}" >/dev/null 2>&1 \
      || { timeout 60 apt-get update -qq >/dev/null 2>&1 && timeout 120 apt-get install -y -qq "${want[@]}" >/dev/null 2>&1; } \
      || true
  fi
fi
command -v jq >/dev/null 2>&1 || { echo "missing: jq (apt-get install jq)" >&2; exit 1; }

work=$(mktemp -d /tmp/shardgate-bench.XXXXXX)
# pids, cleanup, log, stop, free_port, wait_for, process_cpu_s, cpu_snapshot, foreign_cpu, start_redis.
source scripts/bench-lib.sh
trap cleanup EXIT
trap 'exit 130' INT TERM
cpu_snapshot
cpu_start=("$snap_busy" "$snap_own" "$(elapsed)")

log "building (release)"
cargo build --release -q -p shardgate -p shardgate-bench
build_s=$(elapsed)
# Private copies: a build running meanwhile in this tree must not swap the binaries mid-series.
cp target/release/shardgate target/release/shardgate-bench "$work/"
bench="$work/shardgate-bench"
server="$work/shardgate"

if [ "$durable" = 1 ]; then
  start_redis --appendonly yes --appendfsync always
  redis_settings="appendonly yes, appendfsync always"
else
  start_redis --appendonly no
  redis_settings="no persistence (save \"\", appendonly no)"
fi
log "private redis-server on $redis_url ($redis_settings)"

nats_note=""
if [ -z "$nats_url" ] && command -v nats-server >/dev/null 2>&1; then
  nats_port=$(free_port)
  nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/nats" >"$work/nats.log" 2>&1 &
  pids+=($!)
  nats_url="nats://127.0.0.1:$nats_port"
  wait_for "$work/nats.log" "Server is ready" || true
  nats_note="private nats-server $(nats-server --version 2>/dev/null | awk '{print $2}') with JetStream, stream in memory"
elif [ -z "$nats_url" ]; then
  nats_url="nats://127.0.0.1:4222"
  nats_note="no nats-server binary; tried $nats_url"
else
  nats_note="NATS at $nats_url, stream in memory"
fi
log "nats: $nats_note"

# shardgate for one step: a fresh server on the cores scripts/shard-cores.sh picks (as
# scripts/demo.sh runs it), so no step inherits the backlog or state an overloaded step before it
# left behind. The generator's 8 sockets stand for many clients, so the per-source limit is raised
# out of the way (the flood section measures it at its default). Arguments are added to its
# command line (the instrumentation section adds --metrics).
shard_cores=$(scripts/shard-cores.sh)
start_shardgate() {
  "$server" serve --cores "$shard_cores" --placement fenced --udp 127.0.0.1:0 --tcp 127.0.0.1:0 \
    --udp-source-frames-per-sec 100000 --redis "$redis_url" --prefix sgb "$@" 2>>"$work/server.log" &
  server_pid=$!
  pids+=("$server_pid")
  local serving_lines
  # Each server appends to one log: it is ready when the log has one more "serving" line.
  serving_lines=$(grep -c "shardgate: serving" "$work/server.log" || true)
  for _ in $(seq 100); do
    [ "$(grep -c "shardgate: serving" "$work/server.log" || true)" -gt "$serving_lines" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  udp_address=$(grep -o 'udp=[0-9.:]*' "$work/server.log" | tail -1 | cut -d= -f2)
  tcp_address=$(grep -o 'tcp=[0-9.:]*' "$work/server.log" | tail -1 | cut -d= -f2)
  metrics_address=$(grep 'shardgate: serving' "$work/server.log" | tail -1 | grep -o 'metrics="\?[0-9.:]*' | tr -d '"' | cut -d= -f2 || true)
  kill -0 "$server_pid" 2>/dev/null
}

# One step. Usage: probe SERIES RATE COMMAND...; the command gets --rate, --duration,
# --warmup and --json appended. An argument holding @UDP@ or @TCP@ means the step needs
# shardgate: a fresh server is started for it and its address put there. Returns 0 when the
# step held the SLO.
probe() {
  local series=$1 rate=$2
  shift 2
  local json="$work/$series-$rate.json" with_server=no arguments=() argument
  redis-cli -p "$redis_port" flushall >/dev/null
  case "$*" in *@UDP@*|*@TCP@*) with_server=yes ;; esac
  if [ "$with_server" = yes ]; then
    start_shardgate || { log "$series $rate/s: shardgate did not start"; tail -3 "$work/server.log" >&2; }
    for argument in "$@"; do
      argument=${argument//@UDP@/$udp_address}
      arguments+=("${argument//@TCP@/$tcp_address}")
    done
  else
    arguments=("$@")
  fi
  timeout 90 "${arguments[@]}" --rate "$rate" --duration "$step" --warmup "$warmup" --json "$json" \
    >"$work/$series-$rate.txt" 2>&1 || true
  [ "$with_server" = yes ] && stop "$server_pid"
  if [ ! -s "$json" ]; then
    printf '%s\t%s\tfailed\t-\t-\t-\t-\n' "$series" "$rate" >>"$work/steps.tsv"
    log "$series $rate/s: no result ($(tail -1 "$work/$series-$rate.txt"))"
    return 1
  fi
  local ok p999 lost twice achieved
  ok=$(jq -r 'if .skipped == true then "skipped" elif .slo_ok then "held" else "failed" end' "$json")
  p999=$(jq -r '.latency_first_us.p999' "$json")
  lost=$(jq -r '.lost' "$json")
  twice=$(jq -r '.stored_twice // "-"' "$json")
  achieved=$(jq -r '.achieved_rate' "$json")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$series" "$rate" "$ok" "$p999" "$lost" "$twice" "$achieved" >>"$work/steps.tsv"
  log "$series $rate/s: $ok (p99.9 ${p999} µs, lost $lost, stored twice $twice)"
  [ "$ok" = held ]
}

# The search. Usage: search SERIES START_RATE MAX_RATE COMMAND...
# Writes "SERIES BEST LOWEST_FAILED CUT" to best.tsv (0 when none). Each series gets an equal
# share of the time left, and always at least its first step, so a slow build makes every
# series coarser instead of dropping the last ones.
step_s=${step%s}
step_cost_s=$(( step_s + 5 ))
# The headline step (the issue's speed goal, as stated): 50k/s for 30 s after a 5 s warmup.
headline_rate=50000
headline_s=45
series_left=7
search() {
  local series=$1 rate=$2 max=$3
  shift 3
  local best=0 failed=0 cut=no tries=0 steps=0
  local deadline=$(( $(elapsed) + (budget_s - instr_s - headline_s - $(elapsed)) / series_left ))
  series_left=$(( series_left - 1 ))
  over_budget() { [ "$steps" -gt 0 ] && [ $(( $(elapsed) + step_cost_s )) -gt "$deadline" ]; }
  # Up, doubling, until a step fails or the maximum is reached.
  while [ "$rate" -le "$max" ]; do
    if over_budget; then cut=yes; break; fi
    steps=$(( steps + 1 ))
    if probe "$series" "$rate" "$@"; then best=$rate; rate=$(( rate * 2 )); else failed=$rate; break; fi
  done
  if [ -s "$work/$series-$rate.json" ] && [ "$(jq -r '.skipped // false' "$work/$series-$rate.json")" = true ]; then
    echo -e "$series\tskipped\t0\tno" >>"$work/best.tsv"
    return
  fi
  # Down, if even the start failed: halving, up to three times.
  while [ "$best" -eq 0 ] && [ "$failed" -gt 1000 ] && [ "$tries" -lt 3 ]; do
    if over_budget; then cut=yes; break; fi
    tries=$(( tries + 1 ))
    steps=$(( steps + 1 ))
    rate=$(( failed / 2 ))
    if probe "$series" "$rate" "$@"; then best=$rate; else failed=$rate; fi
  done
  # Between the best held and the lowest failed, twice, to within ~1000/s.
  for _ in 1 2; do
    [ "$best" -gt 0 ] && [ "$failed" -gt 0 ] || break
    rate=$(( (best + failed) / 2 / 1000 * 1000 ))
    [ "$rate" -gt "$best" ] && [ "$rate" -lt "$failed" ] || break
    if over_budget; then cut=yes; break; fi
    steps=$(( steps + 1 ))
    if probe "$series" "$rate" "$@"; then best=$rate; else failed=$rate; fi
  done
  echo -e "$series\t$best\t$failed\t$cut" >>"$work/best.tsv"
}
: >"$work/steps.tsv"
: >"$work/best.tsv"
: >"$work/server.log"

log "reflector (the ceiling)"
"$bench" reflector --udp 127.0.0.1:0 2>"$work/reflector.log" &
reflector_pid=$!
pids+=("$reflector_pid")
wait_for "$work/reflector.log" "reflector: serving" || { cat "$work/reflector.log" >&2; exit 1; }
reflector_address=$(grep -o 'udp=[0-9.:]*' "$work/reflector.log" | cut -d= -f2)
search reflector-1 50000 800000 "$bench" run --target "udp://$reflector_address" --frames-per-datagram 1
search reflector-16 100000 1600000 "$bench" run --target "udp://$reflector_address" --frames-per-datagram 16
stop "$reflector_pid"

log "shardgate (a fresh server per step)"
sg_run=("$bench" run --redis "$redis_url" --prefix sgb)
search sg-udp-1 20000 400000 "${sg_run[@]}" --target "udp://@UDP@" --frames-per-datagram 1
search sg-udp-16 20000 400000 "${sg_run[@]}" --target "udp://@UDP@" --frames-per-datagram 16
search sg-tcp 20000 400000 "${sg_run[@]}" --target "tcp://@TCP@"

log "headline: shardgate UDP at ${headline_rate}/s for 30 s"
saved_step=$step saved_warmup=$warmup
step=35s warmup=5s
probe headline "$headline_rate" "${sg_run[@]}" --target "udp://@UDP@" --frames-per-datagram 1 || true
step=$saved_step warmup=$saved_warmup

log "peers"
search peer-redis 10000 400000 "$bench" peer redis --redis "$redis_url"
search peer-nats 5000 400000 "$bench" peer nats --nats "$nats_url"
cpu_snapshot
cpu_instr=("$snap_busy" "$snap_own" "$(elapsed)")

# ---- instrumentation cost ---------------------------------------------------------------
# One server with --metrics; four sweeps of the same rates (around shardgate UDP's best, 1 frame
# per datagram) in the order A B B A, A scraping http://.../metrics every second, B not. Each
# sweep stops at its first failed step; the passes' JSON is read back by the report.
instr_passes=(A1 B1 B2 A2)
instr_note=""
instr_center=$(awk -F'\t' '$1 == "sg-udp-1" { print $2 }' "$work/best.tsv")
[[ "$instr_center" =~ ^[0-9]+$ ]] && [ "$instr_center" -gt 0 ] || instr_center=5000
# Rates: six steps of 10% of the centre (rounded to 250/s), from 60% to 110% of it (the centre
# is one step's luck, so the sweeps start well below it), fewer if the time left cannot hold a
# warm-up step and four passes of them (each step costs its length and ~3 s more).
instr_unit=$(( (instr_center / 10 + 125) / 250 * 250 ))
[ "$instr_unit" -ge 250 ] || instr_unit=250
# The warm-up step and the four fixed-rate CPU runs after the sweeps come off the time left.
instr_steps=$(( (budget_s - $(elapsed) - 5 * (step_s + 3)) / 4 / (step_s + 3) ))
[ "$instr_steps" -le 5 ] || instr_steps=5
instr_from=$(( instr_center - 4 * instr_unit ))
[ "$instr_from" -ge 250 ] || instr_from=250
instr_to=$(( instr_from + (instr_steps - 1) * instr_unit ))
if [ "$instr_steps" -lt 2 ]; then
  instr_note="skipped: only $(( budget_s - $(elapsed) )) s of the budget left"
  log "instrumentation cost: $instr_note"
else
  log "instrumentation cost: one server with --metrics, sweeps A B B A over ${instr_from}..${instr_to}/s step ${instr_unit}/s"
  redis-cli -p "$redis_port" flushall >/dev/null
  if start_shardgate --metrics 127.0.0.1:0 && [ -n "$metrics_address" ]; then
    instr_server_pid=$server_pid
    # Not scored: one step's worth of load first, so the first sweep does not pay for a cold
    # server (first connections, script load, caches) and the second does not.
    timeout 60 "$bench" run --target "udp://$udp_address" --rate "$instr_from" --duration "$step" --warmup "$warmup" \
      >"$work/instr-warmup.txt" 2>&1 || true
    for pass in "${instr_passes[@]}"; do
      scrape_arguments=()
      [ "${pass:0:1}" = A ] && scrape_arguments=(--scrape "http://$metrics_address/metrics" --scrape-interval 1s)
      redis-cli -p "$redis_port" flushall >/dev/null
      sleep 2
      timeout $(( instr_steps * (step_s + 8) + 30 )) "$bench" sweep --target "udp://$udp_address" \
        --from "$instr_from" --to "$instr_to" --step "$instr_unit" --duration "$step" --warmup "$warmup" \
        --redis "$redis_url" --prefix sgb "${scrape_arguments[@]}" --json "$work/instr-$pass.json" \
        >"$work/instr-$pass.txt" 2>&1 || true
      if [ -s "$work/instr-$pass.json" ]; then
        log "instrumentation $pass: $(tail -1 "$work/instr-$pass.txt")"
      else
        log "instrumentation $pass: no result ($(tail -1 "$work/instr-$pass.txt"))"
      fi
    done
    # The CPU comparison: the same fixed rate (the sweeps' lowest) four times, A B B A again,
    # with the server's CPU time read before and after each run.
    instr_cpu_rate=$instr_from
    for pass in "${instr_passes[@]}"; do
      scrape_arguments=()
      [ "${pass:0:1}" = A ] && scrape_arguments=(--scrape "http://$metrics_address/metrics" --scrape-interval 1s)
      redis-cli -p "$redis_port" flushall >/dev/null
      sleep 1
      cpu_before=$(process_cpu_s "$instr_server_pid")
      timeout 60 "$bench" run --target "udp://$udp_address" --rate "$instr_cpu_rate" --duration "$step" \
        --warmup "$warmup" --prefix sgb "${scrape_arguments[@]}" --json "$work/cpu-$pass.json" \
        >"$work/cpu-$pass.txt" 2>&1 || true
      awk -v a="$cpu_before" -v b="$(process_cpu_s "$instr_server_pid")" 'BEGIN { printf "%.2f\n", b - a }' \
        >"$work/cpu-$pass.cpu"
    done
    log "instrumentation cpu: $(cat "$work"/cpu-*.cpu | tr '\n' ' ')CPU-s at ${instr_cpu_rate}/s"
    stop "$instr_server_pid"
  else
    instr_note="skipped: shardgate with --metrics did not start ($(tail -1 "$work/server.log"))"
    log "instrumentation cost: $instr_note"
  fi
fi
total_s=$(elapsed)
cpu_snapshot
cpu_end=("$snap_busy" "$snap_own" "$(elapsed)")
foreign_searches=$(foreign_cpu "${cpu_start[@]}" "${cpu_instr[@]}")
foreign_instr=$(foreign_cpu "${cpu_instr[@]}" "${cpu_end[@]}")
foreign_all_cores=$(foreign_cores "${cpu_start[@]}" "${cpu_end[@]}")
log "other work on the machine: $foreign_searches during the series, $foreign_instr during the instrumentation sweeps"

# ---- the report -------------------------------------------------------------------------
label() {
  case "$1" in
    reflector-1) echo "reflector, 1 frame/datagram (UDP echo, no work: the ceiling)" ;;
    reflector-16) echo "reflector, 16 frames/datagram (the ceiling)" ;;
    sg-udp-1) echo "shardgate UDP, 1 frame/datagram" ;;
    sg-udp-16) echo "shardgate UDP, 16 frames/datagram" ;;
    sg-tcp) echo "shardgate TCP" ;;
    peer-redis) echo "peer redis (EVALSHA per event)" ;;
    peer-nats) echo "peer nats (JetStream, Nats-Msg-Id)" ;;
  esac
}
best_of() { awk -F'\t' -v s="$1" '$1 == s { print $2 }' "$work/best.tsv"; }
step_of() { awk -F'\t' -v s="$1" -v r="$2" -v c="$3" '$1 == s && $2 == r { print $c }' "$work/steps.tsv" | tail -1; }
sg_best=0
for series in sg-udp-1 sg-udp-16 sg-tcp; do
  b=$(best_of "$series")
  if [[ "$b" =~ ^[0-9]+$ ]] && [ "$b" -gt "$sg_best" ]; then sg_best=$b; fi
done
ratio() { # $1 divided by $2, or "-" when either is not a positive number
  [[ "$1" =~ ^[0-9]+$ ]] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ] && [ "$2" -gt 0 ] \
    && awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }' || echo "-"
}

plot_note="no plot: python3 not found"
instr_plot_note=""
if command -v python3 >/dev/null 2>&1; then
  plot_dir=$(dirname "$out")
  plot_file="$plot_dir/RESULTS-p999.svg"
  cat >"$work/plot.py" <<'PY'
# p99.9 of every step against its offered rate, one line per series, log scales, 5 ms line.
import math, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
series = {}
for name, rate, verdict, p999, *_ in rows:
    if p999 not in ("-", "") and verdict != "skipped":
        series.setdefault(name, []).append((int(rate), max(int(p999), 1), verdict == "held"))
if not series:
    sys.exit(1)
W, H, L, R, T, B = 760, 420, 70, 230, 20, 50
rates = [r for pts in series.values() for r, _, _ in pts]
x0, x1 = math.log10(min(rates) / 1.5), math.log10(max(rates) * 1.5)
y0, y1 = math.log10(50), math.log10(max(10_000_000, max(p for pts in series.values() for _, p, _ in pts)))
X = lambda r: L + (math.log10(r) - x0) / (x1 - x0) * (W - L - R)
Y = lambda p: T + (1 - (math.log10(max(p, 50)) - y0) / (y1 - y0)) * (H - T - B)
colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{Y(5000):.1f}" x2="{W-R}" y2="{Y(5000):.1f}" stroke="#999" stroke-dasharray="4"/>',
       f'<text x="{L+6}" y="{Y(5000)-4:.1f}" fill="#666">SLO: p99.9 &lt; 5 ms</text>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
       f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">offered rate (events/s, log)</text>',
       f'<text x="16" y="{(T+H-B)/2}" transform="rotate(-90 16 {(T+H-B)/2})" text-anchor="middle">first-attempt p99.9 (log)</text>']
for p, name in ((100, "0.1 ms"), (1_000, "1 ms"), (10_000, "10 ms"), (100_000, "100 ms"), (1_000_000, "1 s"), (10_000_000, "10 s")):
    if y0 <= math.log10(p) <= y1:
        out.append(f'<text x="{L-6}" y="{Y(p)+4:.1f}" text-anchor="end">{name}</text>')
        out.append(f'<line x1="{L}" y1="{Y(p):.1f}" x2="{W-R}" y2="{Y(p):.1f}" stroke="#eee"/>')
# Rate ticks: 1-2-5 per decade, or more when the rates span less than about a decade.
mantissas = (1, 2, 5) if x1 - x0 > 1.2 else (1, 1.5, 2, 3, 4, 5, 6, 8)
for r in sorted(m * 10 ** e for m in mantissas for e in range(2, 7)):
    if x0 <= math.log10(r) <= x1:
        out.append(f'<text x="{X(r):.1f}" y="{H-B+16}" text-anchor="middle">{r/1000:g}k</text>')
        out.append(f'<line x1="{X(r):.1f}" y1="{T}" x2="{X(r):.1f}" y2="{H-B}" stroke="#eee"/>')
for i, (name, pts) in enumerate(sorted(series.items())):
    c = colors[i % len(colors)]
    pts.sort()
    out.append('<polyline fill="none" stroke="%s" points="%s"/>' % (c, " ".join(f"{X(r):.1f},{Y(p):.1f}" for r, p, _ in pts)))
    for r, p, held in pts:
        out.append(f'<circle cx="{X(r):.1f}" cy="{Y(p):.1f}" r="4" fill="{c if held else "white"}" stroke="{c}"/>')
    out.append(f'<text x="{W-R+12}" y="{T+16+i*18}" fill="{c}">● {name}</text>')
out.append(f'<text x="{W-R+12}" y="{T+16+len(series)*18+10}" fill="#666">filled: SLO held</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PY
  if python3 "$work/plot.py" "$work/steps.tsv" "$plot_file"; then
    plot_note="![first-attempt p99.9 against offered rate]($(basename "$plot_file"))"
  else
    plot_note="no plot: no step produced a latency"
  fi
  # The instrumentation sweeps, one line each, from their JSON.
  : >"$work/instr-steps.tsv"
  for pass in "${instr_passes[@]}"; do
    [ -s "$work/instr-$pass.json" ] || continue
    case "$pass" in
      A1) name="1 A: scraping every 1 s" ;; B1) name="2 B: no scraping" ;;
      B2) name="3 B: no scraping" ;; A2) name="4 A: scraping every 1 s" ;;
    esac
    jq -r --arg name "$name" '.steps[] | [$name, .offered_rate, (if .slo_ok then "held" else "failed" end), .latency_first_us.p999] | @tsv' \
      "$work/instr-$pass.json" >>"$work/instr-steps.tsv"
  done
  instr_plot_file="$plot_dir/RESULTS-instrumentation.svg"
  if [ -s "$work/instr-steps.tsv" ] && python3 "$work/plot.py" "$work/instr-steps.tsv" "$instr_plot_file"; then
    instr_plot_note="![instrumentation sweeps: first-attempt p99.9 against offered rate]($(basename "$instr_plot_file"))"
  fi
fi

# The server's CPU per frame at one fixed rate, A against B: a much finer measure of what a
# scrape costs than the highest rate, which moves in 10% steps and with the machine's noise.
instr_cpu_paragraph() {
  local pass cpu frames line="" per a_sum=0 b_sum=0 a_n=0 b_n=0
  for pass in "${instr_passes[@]}"; do
    cpu=$(cat "$work/cpu-$pass.cpu" 2>/dev/null || echo "")
    frames=$(jq -r '.sent + .resent' "$work/cpu-$pass.json" 2>/dev/null || echo 0)
    [[ "$frames" =~ ^[0-9]+$ ]] && [ "$frames" -gt 0 ] && [ -n "$cpu" ] || continue
    per=$(awk -v c="$cpu" -v f="$frames" 'BEGIN { printf "%.2f", c * 1e6 / f }')
    line+="${line:+, }$pass $per µs ($cpu CPU-s over $frames frames)"
    if [ "${pass:0:1}" = A ]; then a_sum=$(awk -v s="$a_sum" -v p="$per" 'BEGIN { print s + p }'); a_n=$(( a_n + 1 ))
    else b_sum=$(awk -v s="$b_sum" -v p="$per" 'BEGIN { print s + p }'); b_n=$(( b_n + 1 )); fi
  done
  if [ "$a_n" -eq 0 ] || [ "$b_n" -eq 0 ]; then
    echo "**Server CPU per frame**: not measured (a sweep gave no result)."
    return
  fi
  awk -v a="$a_sum" -v an="$a_n" -v b="$b_sum" -v bn="$b_n" -v line="$line" -v rate="$instr_cpu_rate" 'BEGIN {
    a /= an; b /= bn
    printf "**Server CPU per frame at one rate**: after the sweeps, the same server ran four more steps A B B A at %s/s ", rate
    printf "(the sweeps'"'"' lowest rate), and the script read the server process'"'"'s user + system time before and after each; "
    printf "divided by the frames sent to it, retries included: %s. Scraping every second: %.2f µs against %.2f µs, ", line, a, b
    printf "**%+.1f%%** of the server'"'"'s CPU per frame (the goal: under 3%%). Unlike the highest rate, this does not move in 10%% ", (a / b - 1) * 100
    printf "steps; it still carries the machine'"'"'s noise (the generator and Redis share the 2 cores).\n"
  }'
}

# The "Instrumentation cost" section, from the four sweeps' JSON.
instr_field() { # PASS JQ-FILTER: the filter's value in that pass's sweep JSON, or "-"
  [ -s "$work/instr-$1.json" ] && jq -r "$2" "$work/instr-$1.json" 2>/dev/null || echo "-"
}
instr_section() {
  echo "## Instrumentation cost"
  echo
  if [ -n "$instr_note" ]; then
    echo "The comparison of scraping against not scraping was $instr_note."
    return
  fi
  echo "The cost of being watched: one shardgate, started once with \`--metrics 127.0.0.1:0\` (otherwise as above),"
  echo "after one unscored warm-up step at ${instr_from}/s served four sweeps of the same rates, ${instr_from}/s to ${instr_to}/s"
  echo "in steps of ${instr_unit}/s (10% of shardgate UDP's best above, ${instr_center}/s, starting well below it) (UDP, 1 frame per"
  echo "datagram, steps of $step with the first $warmup not timed, 1 s pause between steps, Redis flushed between sweeps; a"
  echo "sweep stops at its first failed step). **A** scraped \`http://ADDR/metrics\` every second while each step's load ran"
  echo "(\`shardgate-bench sweep ... --scrape http://ADDR/metrics --scrape-interval 1s\`), **B** did not. The order"
  echo "A B B A puts the two of each at the same mean time, so a drift over the section (the machine's other load,"
  echo "Redis, the server's caches filling) weighs on both alike. Other work on the machine meanwhile: $foreign_instr."
  echo
  echo "| sweep | scraping | highest rate holding the SLO | its p99.9 | scrapes (failed) |"
  echo "|---|---|---|---|---|"
  local pass best top_ok p999 scrapes failures shown
  for pass in "${instr_passes[@]}"; do
    best=$(instr_field "$pass" '.highest_rate_held // 0')
    if [ "$best" = "-" ]; then
      echo "| $pass | $([ "${pass:0:1}" = A ] && echo "every 1 s" || echo no) | no result | - | - |"
      continue
    fi
    top_ok=$(instr_field "$pass" "[.steps[] | select(.offered_rate == $instr_to and .slo_ok)] | length")
    p999=$(instr_field "$pass" "[.steps[] | select(.offered_rate == $best) | .latency_first_us.p999][0] // \"-\"")
    scrapes=$(instr_field "$pass" '[.steps[].scrape.scrapes // 0] | add // 0')
    failures=$(instr_field "$pass" '[.steps[].scrape.failures // 0] | add // 0')
    if [ "$best" -eq 0 ]; then
      shown="none held (${instr_from}/s failed)"
    elif [ "$top_ok" = 1 ]; then
      shown="**≥ $best/s** (every step held)"
    else
      shown="**$best/s**"
    fi
    [ "$p999" = "-" ] || p999="$p999 µs"
    echo "| $pass | $([ "${pass:0:1}" = A ] && echo "every 1 s" || echo no) | $shown | $p999 | $scrapes ($failures) |"
  done
  echo
  local a1 a2 b1 b2
  a1=$(instr_field A1 '.highest_rate_held // 0'); a2=$(instr_field A2 '.highest_rate_held // 0')
  b1=$(instr_field B1 '.highest_rate_held // 0'); b2=$(instr_field B2 '.highest_rate_held // 0')
  if [[ "$a1$a2$b1$b2" =~ ^[0-9]+$ ]] && [ "$a1" -gt 0 ] && [ "$a2" -gt 0 ] && [ "$b1" -gt 0 ] && [ "$b2" -gt 0 ]; then
    awk -v a1="$a1" -v a2="$a2" -v b1="$b1" -v b2="$b2" -v unit="$instr_unit" -v center="$instr_center" 'BEGIN {
      a = (a1 + a2) / 2; b = (b1 + b2) / 2
      cost = (1 - a / b) * 100
      noise_a = (a1 > a2 ? a1 - a2 : a2 - a1) / a * 100
      noise_b = (b1 > b2 ? b1 - b2 : b2 - b1) / b * 100
      noise = noise_a > noise_b ? noise_a : noise_b
      resolution = unit / center * 100
      bound = noise > resolution ? noise : resolution
      printf "**Ratio** (mean of the A sweeps ÷ mean of the B sweeps): %.0f/s ÷ %.0f/s = **%.3f**, ", a, b, a / b
      printf "i.e. scraping cost %.1f%% of the highest SLO-holding rate (negative: A did better). ", cost
      printf "**Noise**: the two sweeps of the same kind differ by %.1f%% (A) and %.1f%% (B), ", noise_a, noise_b
      printf "and one rate step is %.1f%% of the rates swept. ", resolution
      if ((cost < 0 ? -cost : cost) <= bound)
        printf "The difference is inside that noise: this run cannot tell scraping from not scraping, and it bounds the cost only to about %.0f%%, not to the 3%% goal; ", bound
      else
        printf "The difference is larger than that noise, so it is likely a real cost (or gain) of scraping; "
      printf "a finer answer needs more repeats and smaller steps on a quiet machine.\n"
    }'
  else
    echo "**Ratio**: not computed: a sweep gave no result or held at no rate (see the table)."
  fi
  echo
  instr_cpu_paragraph
  echo
  echo "First-attempt p99.9 (µs) of every step, per sweep (✗: the step failed the SLO; \`-\`: not run, the"
  echo "sweep had stopped):"
  echo
  echo "| rate | A1 (scraping) | B1 (none) | B2 (none) | A2 (scraping) |"
  echo "|---|---|---|---|---|"
  local rate row
  for (( rate = instr_from; rate <= instr_to; rate += instr_unit )); do
    row="| $rate/s |"
    for pass in "${instr_passes[@]}"; do
      row+=" $(instr_field "$pass" "[.steps[] | select(.offered_rate == $rate) | \"\(.latency_first_us.p999)\(if .slo_ok then \"\" else \" ✗\" end)\"][0] // \"-\"") |"
    done
    echo "$row"
  done
  echo
  [ -n "$instr_plot_note" ] && echo "$instr_plot_note" && echo
  echo "The scraper is a thread of the generator (\`bench/src/scrape.rs\`): one plain HTTP/1.1 \`GET\` per interval,"
  echo "\`Connection: close\`, classic text format, timeouts of one interval; it counts failures and non-200 answers. The"
  echo "metrics endpoint runs on its own thread in the server, outside the shards (\`src/telemetry/exporter.rs\`); the shards'"
  echo "counters are updated whether or not anyone scrapes, so this measures the scrape itself, not the counters."
  echo
}

# "The goals": each speed goal of the benchmark issue against this run's figures, met or by how far.
goals_section() {
  local verdict p999 lost twice ceiling1 ceiling16 peer_best peer
  echo "## The goals"
  echo
  echo "| goal | this run | met |"
  echo "|---|---|---|"
  verdict=$(step_of headline "$headline_rate" 3); p999=$(step_of headline "$headline_rate" 4)
  lost=$(step_of headline "$headline_rate" 5); twice=$(step_of headline "$headline_rate" 6)
  if [ -n "$verdict" ]; then
    echo "| headline: ${headline_rate}/s for 30 s, UDP, 1 frame/datagram, all on this machine, SLO held | p99.9 $p999 µs, lost $lost, stored twice $twice | $([ "$verdict" = held ] && echo yes || echo "**no**: shardgate UDP's best here is $(best_of sg-udp-1)/s, $(ratio "$(best_of sg-udp-1)" "$headline_rate") of the goal") |"
  else
    echo "| headline: ${headline_rate}/s for 30 s | not run | **no** |"
  fi
  ceiling1=$(ratio "$(best_of sg-udp-1)" "$(best_of reflector-1)")
  ceiling16=$(ratio "$(best_of sg-udp-16)" "$(best_of reflector-16)")
  echo "| ceiling: the highest SLO-holding rate ≥ 0.6 × the reflector's | $ceiling1 (1 frame/datagram: $(best_of sg-udp-1)/s ÷ $(best_of reflector-1)/s), $ceiling16 (16 frames/datagram) | $(awk -v r="$ceiling1" 'BEGIN { print (r + 0 >= 0.6) ? "yes" : "**no**" }') |"
  peer_best=0
  for peer in peer-redis peer-nats; do
    [[ "$(best_of "$peer")" =~ ^[0-9]+$ ]] && [ "$(best_of "$peer")" -gt "$peer_best" ] && peer_best=$(best_of "$peer")
  done
  echo "| peers: ≥ 2 × both peers' highest SLO-holding rate | shardgate's best $sg_best/s ÷ the better peer's $peer_best/s = $(ratio "$sg_best" "$peer_best") | $(awk -v r="$(ratio "$sg_best" "$peer_best")" 'BEGIN { print (r + 0 >= 2) ? "yes" : "**no**" }') |"
  echo "| instrumentation: scraping every second costs < 3% | see \"Instrumentation cost\" below | see below |"
  echo "| memory: ≤ 16 B of heap per event at 50k/s; RSS flat; ≥ 95% of copies answered from a cache | \`scripts/bench-memory.sh\` writes [RESULTS-memory.md](RESULTS-memory.md) (a second build, so not in this run) | see there |"
  echo "| cache: fastest of four at 2 threads | \`cargo bench --bench dedup\`, table in docs/design.md, \"The dedup cache\" | yes |"
  echo
}

{
  echo "# shardgate benchmark results"
  echo
  echo "Written by \`$command_line\` on $(date -u '+%Y-%m-%d %H:%M UTC'), in $(elapsed) s, on a shared virtual machine"
  echo "with $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), Linux $(uname -r)); load average at the start"
  echo "$load_at_start, at the end $(cut -d' ' -f1-3 /proc/loadavg). Generator, servers and Redis share this one machine, and"
  echo "other work on it (builds, test suites) may run at the same time, so every number below includes their fight for"
  echo "its cores. Every figure and every ratio on this page comes from this one run: shardgate, the reflector ceiling"
  echo "and the peers were measured minutes apart on the same machine with the same binaries."
  echo
  echo "**Other work on the machine** (CPU time of every process this script did not start, from /proc/stat less its"
  echo "own processes): $foreign_searches while the series ran, $foreign_instr during the"
  echo "instrumentation sweeps.$(awk -v c="$foreign_all_cores" 'BEGIN { if (c >= 0.15) printf " That is enough to disturb a 2-core benchmark: treat the figures as a noisy sample, lower than a quiet machine would give." ; else printf " Little enough that the figures are this machine'"'"'s own." }')"
  echo
  echo "**SLO** per step: 0 lost, 0 stored twice, 0 acked but missing, first-attempt p99.9 < 5 ms (latency from each"
  echo "event's intended send time, open loop). **Workload**: 100 000 players, 30% copies of recent events, 64-byte"
  echo "payloads, steps of $step (the first $warmup not timed). The search doubles the rate until a step fails"
  echo "(halves it while the start fails), then bisects twice: the best rate is a lower bound, within about 25% of"
  echo "the true one when the search was not cut short. On a shared 2-core machine one noisy step can fail a rate"
  echo "that holds on a rerun, so read the best rates as approximate."
  echo
  echo "| series | highest rate holding the SLO | its p99.9 | lost | stored twice | shardgate's best ÷ this |"
  echo "|---|---|---|---|---|---|"
  while IFS=$'\t' read -r series best failed cut; do
    note=""
    [ "$cut" = yes ] && note=" (search cut short by the time budget)"
    if [ "$best" = skipped ]; then
      echo "| $(label "$series") | skipped: no NATS reachable | - | - | - | - |"
    elif [ "$best" -gt 0 ]; then
      # Against a ceiling, shardgate's series of the same datagram shape; against a peer, its best.
      case "$series" in
        sg-*) shown_ratio="-" ;;
        reflector-1) shown_ratio=$(ratio "$(best_of sg-udp-1)" "$best") ;;
        reflector-16) shown_ratio=$(ratio "$(best_of sg-udp-16)" "$best") ;;
        *) shown_ratio=$(ratio "$sg_best" "$best") ;;
      esac
      echo "| $(label "$series") | **$best/s**$note | $(step_of "$series" "$best" 4) µs | $(step_of "$series" "$best" 5) | $(step_of "$series" "$best" 6) | $shown_ratio |"
    else
      echo "| $(label "$series") | none held (lowest rate tried, ${failed}/s, failed)$note | - | - | - | - |"
    fi
  done <"$work/best.tsv"
  echo
  echo "The last column: for a reflector row, shardgate UDP with the same frames per datagram ÷ the reflector (the"
  echo "share of the ceiling shardgate keeps); for a peer, shardgate's best over its three series ($sg_best/s) ÷ the"
  echo "peer. \"stored twice\" is \`-\` where nothing is stored (the reflector)."
  echo
  goals_section
  instr_section
  echo "## Every step"
  echo
  echo "| series | offered rate | SLO | p99.9 (µs) | lost | stored twice | achieved rate |"
  echo "|---|---|---|---|---|---|---|"
  while IFS=$'\t' read -r series rate verdict p999 lost twice achieved; do
    echo "| $series | $rate/s | $verdict | $p999 | $lost | $twice | $achieved/s |"
  done <"$work/steps.tsv"
  echo
  echo "## Latency"
  echo
  echo "$plot_note"
  echo
  echo "## Settings"
  echo
  echo "- Redis: private \`redis-server $(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2)\` on loopback, $redis_settings, flushed"
  echo "  before every step; the same for shardgate and the redis peer. Durability is Redis's own choice and costs both"
  echo "  alike; run \`scripts/bench.sh --durable\` for \`appendfsync always\`."
  echo "- NATS: $nats_note; duplicate window 2 min."
  echo "- shardgate: \`serve --cores $shard_cores --placement fenced --udp-source-frames-per-sec 100000\` (\`scripts/shard-cores.sh\`: half the cores, one on 2 cores, since Redis and the generator share them), defaults otherwise (batches of up to 256 events, calls paced 1 ms apart), started afresh for every step."
  echo "- Generator: \`shardgate-bench run\` (8 UDP sockets or TCP connections); the peers use 16 connections, each sending every event that is due as one pipeline of one-event \`EVALSHA\`s"
  echo "  (redis), or publishing each event and awaiting its ack asynchronously (nats)."
  echo "- Time: build ${build_s} s, whole script $(elapsed) s of a ${budget_s} s budget (${instr_s} s of it kept for the instrumentation sweeps)."
  echo
  echo "Reproduce one step, e.g.: \`shardgate-bench peer redis --redis redis://127.0.0.1:6379 --rate 20000 --duration $step --warmup $warmup\`."
} >"$out"
log "wrote $out in ${total_s}s of measuring ($(elapsed)s in all)"
cat "$out"

# --- Flood (issue 6), appended to $out: a well-behaved client's latency without and with one
# source flooding one shard (`shardgate-bench flood`; docs/design.md, "Abuse limits"). Its own
# one-shard server with the default limits, so the client and the flooder share a shard.
log "flood: one shard, a 300/s client from 127.0.0.1, then a flooder from 127.0.0.2 too"
redis-cli -p "$redis_port" flushall >/dev/null
"$server" serve --cores 0 --udp 127.0.0.1:0 --tcp 127.0.0.1:0 --redis "$redis_url" --prefix sgf \
  --metrics 127.0.0.1:0 2>"$work/flood-server.log" &
flood_pid=$!
pids+=("$flood_pid")
wait_for "$work/flood-server.log" "shardgate: serving" || true
flood_udp=$(grep -o 'udp=[0-9.:]*' "$work/flood-server.log" | tail -1 | cut -d= -f2 || true)
flood_metrics=$(grep 'shardgate: serving' "$work/flood-server.log" | grep -o 'metrics="\?[0-9.:]*' | tr -d '"' | cut -d= -f2 || true)
timeout 180 "$bench" flood --target "udp://$flood_udp" --rate 300 --duration "$step" --redis "$redis_url" \
  --prefix sgf --metrics "$flood_metrics" --json "$work/flood.json" >"$work/flood.txt" 2>&1 || true
stop "$flood_pid"
{
  echo
  echo "## Flood"
  echo
  if [ -s "$work/flood.json" ]; then
    echo "A well-behaved client (300 events/s over UDP from 127.0.0.1, one per datagram, resending on RETRY and on"
    echo "silence) against one shard (\`serve --cores 0\`, default limits), for $step without and then $step with one"
    echo "source (127.0.0.2) flooding as fast as one thread sends: valid frames, bad crcs, garbage, header-like bytes."
    echo "Latency is from the client's first send to ACCEPTED or DUPLICATE, resends included."
    echo
    echo "| phase | events | lost | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | resends | flood datagrams/s | frames limited | kernel drops |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    jq -r '.phases[] | "| \(if .flood then "flood" else "no flood" end) | \(.events) | \(.lost) | \(.latency_us.p50) | \(.latency_us.p99) | \(.latency_us.p999) | \(.latency_us.max) | \(.resends) | \(.flood_datagrams_per_sec | floor) | \(.frames_limited // "-") | \(.kernel_drops // "-") |"' "$work/flood.json"
    echo
    jq -r '.verification | if . == null then empty else "Redis: \(.stored) of \(.events) client events stored, \(.stored_twice) stored twice, \(.acked_missing) acked but missing." end' "$work/flood.json"
    echo
    echo "Reproduce: \`shardgate serve --cores 0 --udp 127.0.0.1:7700 --tcp 127.0.0.1:7700 --redis URL --metrics 127.0.0.1:7701\`, then"
    echo "\`shardgate-bench flood --target udp://127.0.0.1:7700 --rate 300 --duration $step --redis URL --metrics 127.0.0.1:7701\`."
  else
    echo "The flood run gave no result: $(tail -1 "$work/flood.txt")"
  fi
} >>"$out"
# The history of speed changes, kept by hand with their before and after.
if [ -s bench/wins.md ]; then
  { echo; cat bench/wins.md; } >>"$out"
fi
sed -n '/^## Flood$/,$p' "$out"
# The efficiency section, with the binaries built above; it goes in before "## Wins".
if [ "$efficiency" = 1 ]; then
  stop "$redis_pid"
  scripts/bench-efficiency.sh --out "$out" --no-build ${keep_logs:+--keep-logs "$keep_logs/efficiency"}
fi
