#!/usr/bin/env bash
# The memory goals of the benchmark issue, measured in one run: heap allocated per
# event, RSS over the run, and the share of duplicate copies answered without a
# Redis round trip. Writes bench/RESULTS-memory.md.
#
#   scripts/bench-memory.sh [--rate 50000] [--duration 30s] [--out FILE] [--server BIN]
#
# The server is a second build with the `count-allocations` feature (a counting
# global allocator, shared atomics: for measuring only), in its own target
# directory so it never replaces the release binary (--server BIN runs a
# count-allocations binary built before instead, to compare two of them in one
# session). It runs as the suite runs
# it (`serve --cores $(scripts/shard-cores.sh) --placement fenced`, defaults otherwise, --metrics on),
# against a private redis-server on a free loopback port with no persistence.
# The load is `shardgate-bench run` with the issue's workload: 1 frame per
# datagram, 100 000 players, 30% copies, 64-byte payloads, for --duration after
# a 5 s warmup. The server's RSS is sampled every second. On SIGTERM the server
# prints the heap it allocated while serving; the script divides it by frames
# and by unique events, and reads the dedup outcomes from /metrics.
#
# A cold build of the second binary takes a few minutes on 2 cores; the run
# itself takes --duration plus about 15 s. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
started_s=$(date +%s)

rate=50000
duration=30s
warmup=5s
out=bench/RESULTS-memory.md
server=
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --server) server="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ "$rate" =~ ^[0-9]+$ ]] || { echo "--rate must be a whole number of frames per second" >&2; exit 2; }
[[ "$duration" =~ ^[0-9]+s$ ]] || { echo "--duration must be whole seconds, e.g. 30s" >&2; exit 2; }

source scripts/ensure-deps.sh
command -v jq >/dev/null 2>&1 || { echo "missing: jq (apt-get install jq)" >&2; exit 1; }

work=$(mktemp -d /tmp/shardgate-memory.XXXXXX)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "== [$(( $(date +%s) - started_s ))s] $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# The value of one metric line (the sum over shards of lines starting with $1).
metric_sum() { grep "^$1" "$work/metrics.txt" | awk '{ s += $NF } END { printf "%d", s }'; }

log "building: shardgate-bench (release)${server:+; the server is $server}"
cargo build --release -q -p shardgate-bench
if [ -z "${server:-}" ]; then
  log "building: shardgate with count-allocations (target/count-allocations)"
  cargo build --release -q -p shardgate --features count-allocations --target-dir target/count-allocations
  server=target/count-allocations/release/shardgate
fi
[ -x "$server" ] || { echo "--server $server: no such executable" >&2; exit 2; }
bench=target/release/shardgate-bench

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis_url="redis://127.0.0.1:$redis_port"

metrics_port=$(free_port)
"$server" serve --cores "$(scripts/shard-cores.sh)" --placement fenced --udp-source-frames-per-sec 100000 --udp 127.0.0.1:0 --tcp 127.0.0.1:0 \
  --redis "$redis_url" --prefix sgm --metrics "127.0.0.1:$metrics_port" 2>"$work/server.log" &
server_pid=$!
pids+=("$server_pid")
wait_for "$work/server.log" 'shardgate: serving' || { cat "$work/server.log" >&2; exit 1; }
udp_address=$(grep -o 'udp=[0-9.:]*' "$work/server.log" | tail -1 | cut -d= -f2)

# RSS every second while the load runs.
( while kill -0 "$server_pid" 2>/dev/null; do
    awk '/^VmRSS/ { print $2 }' "/proc/$server_pid/status" 2>/dev/null || true
    sleep 1
  done ) >"$work/rss.kib" &
pids+=($!)

log "load: $rate frames/s for $duration after $warmup of warmup, UDP, 1 frame per datagram"
"$bench" run --target "udp://$udp_address" --rate "$rate" --duration "$(( ${duration%s} + ${warmup%s} ))s" \
  --warmup "$warmup" --redis "$redis_url" --prefix sgm --json "$work/run.json" | tee "$work/run.txt" >&2 || true
curl -s "http://127.0.0.1:$metrics_port/metrics" >"$work/metrics.txt"
kill -TERM "$server_pid"
wait "$server_pid" || true
heap_line=$(grep 'heap use while serving' "$work/server.log" | tail -1)
[ -n "$heap_line" ] || { echo "the server printed no heap line: is count-allocations on?" >&2; tail "$work/server.log" >&2; exit 1; }
field() { echo "$heap_line" | grep -o "$1=[0-9.]*" | cut -d= -f2; }
frames=$(field frames)
allocated_bytes=$(field allocated_bytes)
allocations=$(field allocations)
events=$(jq '.accepted' "$work/run.json")
duplicates_answered=$(metric_sum 'shardgate_acks_sent_total{.*status="duplicate"')
own_hits=$(metric_sum 'shardgate_dedup_lookups_total{.*outcome="own_shard_hit"')
peer_hits=$(metric_sum 'shardgate_dedup_lookups_total{.*outcome="other_shard_hit"')
in_flight=$(metric_sum 'shardgate_dedup_lookups_total{.*outcome="in_flight"')
misses=$(metric_sum 'shardgate_dedup_lookups_total{.*outcome="miss"')
batches=$(metric_sum 'shardgate_batch_events_count')
read -r rss_first rss_last rss_max samples < <(awk 'NF { if (!n) f = $1; l = $1; if ($1 > m) m = $1; n++ } END { printf "%d %d %d %d\n", f, l, m, n }' "$work/rss.kib")
ratio() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN { if (b > 0) printf f, a / b; else printf "-" }'; }

mkdir -p "$(dirname "$out")"
{
  echo "# shardgate memory results"
  echo
  echo "Written by \`scripts/bench-memory.sh --rate $rate --duration $duration\` on $(date -u '+%Y-%m-%d %H:%M UTC'), on"
  echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//' | cut -d' ' -f1-3)), Linux $(uname -r); load average at the end $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Generator, server and Redis share the machine. The server is the \`count-allocations\` build."
  echo
  echo "## The run"
  echo
  echo '```'
  sed -n '1,40p' "$work/run.txt"
  echo '```'
  echo
  echo "## Heap allocated while serving (the server's own count, from \"serving\" to the drain)"
  echo
  echo "| frames received | unique events stored | allocations | bytes allocated | allocations per frame | bytes per frame | bytes per event | Redis calls (batches) | events per batch |"
  echo "|---|---|---|---|---|---|---|---|---|"
  echo "| $frames | $events | $allocations | $allocated_bytes | $(ratio "$allocations" "$frames" %.2f) | $(ratio "$allocated_bytes" "$frames" %.0f) | $(ratio "$allocated_bytes" "$events" %.0f) | $batches | $(ratio "$misses" "$batches" %.1f) |"
  echo
  echo "Goal: at most 150 bytes per event (issue 14); the moonshot is 16. Decode, dedup, batching and acks allocate nothing"
  echo "(\`tests/alloc.rs\`); what is counted here is per reactor wake-up and per Redis call (fred's"
  echo "command, its argument vector and the reply frame; glommio's timer entries), so it falls per event as"
  echo "batches grow with load."
  echo
  echo "## RSS"
  echo
  echo "Sampled every second, $samples samples: first $rss_first KiB, last $rss_last KiB, highest $rss_max KiB"
  echo "($(ratio "$(( rss_last - rss_first ))" 1024 %.1f) MiB from first to last). The dedup table and the"
  echo "batches are allocated at start, so RSS should stay flat."
  echo
  echo "## Duplicate copies answered without a Redis round trip"
  echo
  echo "| DUPLICATE answers | from this shard's cache | from another shard's cache | share from a cache | copies that met their original in flight (held, answered with it) | misses (Redis decided) |"
  echo "|---|---|---|---|---|---|"
  echo "| $duplicates_answered | $own_hits | $peer_hits | $(ratio "$(( (own_hits + peer_hits) * 100 ))" "$duplicates_answered" %.1f)% | $in_flight | $misses |"
  echo
  echo "Goal: at least 95% with a cache that holds the window (the default \`--dedup-capacity\` holds"
  echo "1.8 M ids per shard, the run sends far fewer)."
} >"$out"
log "wrote $out"
