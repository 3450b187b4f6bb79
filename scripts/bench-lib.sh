#!/usr/bin/env bash
# Helpers the bench scripts share (scripts/bench.sh, scripts/bench-efficiency.sh), sourced after
# the caller has set $work (its temp dir) and $started_s (its start, epoch seconds). Every process
# a script starts goes into $pids, so `cleanup` (the caller's EXIT trap) stops exactly those and
# nothing else on the machine. $keep_logs, if set, is where cleanup copies the logs first.

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "${keep_logs:-}" ]; then
    mkdir -p "$keep_logs" && cp "$work"/*.txt "$work"/*.json "$work"/*.log "$work"/*.tsv "$keep_logs"/ 2>/dev/null || true
  fi
  rm -rf "$work"
}

elapsed() { echo $(( $(date +%s) - started_s )); }
log() { echo "== [$(elapsed)s] $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
# Waits up to 10 s for a line matching $2 in file $1.
wait_for() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# Stops one process this script started, by pid, and forgets it (its pid may be reused later).
stop() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 80); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  forget "$1"
}
# Drops a process that has ended and been waited for from $pids, so that nothing signals its pid
# (which the kernel may give to another process) later.
forget() {
  local kept=() pid
  for pid in "${pids[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
  pids=("${kept[@]}")
}

# A private redis-server on a free loopback port in $work, RDB snapshots off; the arguments add
# settings (e.g. --appendonly no). Sets redis_port, redis_pid and redis_url; exits if it does not
# answer within 5 s.
start_redis() {
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" --save "" "$@" \
    --daemonize no --logfile "$work/redis.log" &
  redis_pid=$!
  pids+=("$redis_pid")
  redis_url="redis://127.0.0.1:$redis_port"
  for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$redis_port" ping >/dev/null || { echo "redis-server did not start" >&2; cat "$work/redis.log" >&2; exit 1; }
}

# CPU seconds since boot: all cores busy (user, nice, system from /proc/stat), and this script's
# own processes (its reaped children from `times`, plus those still running: Redis, NATS, a
# server), so that other work on the machine can be told apart. Sets snap_busy and snap_own; it
# must run in this shell, not in $(...), for `times` to see the children.
clk_tck=$(getconf CLK_TCK 2>/dev/null || echo 100)
# CPU seconds (user + system) one process has used so far: utime + stime of /proc/PID/stat,
# every thread included.
process_cpu_s() { awk -v hz="$clk_tck" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_snapshot() {
  local pid
  snap_busy=$(awk -v hz="$clk_tck" '/^cpu / { printf "%.2f", ($2 + $3 + $4) / hz; exit }' /proc/stat)
  times >"$work/times"
  snap_own=$(awk '{ for (i = 1; i <= 2; i++) { split($i, part, "m"); s += part[1] * 60 + part[2] } } END { printf "%.2f", s }' "$work/times")
  for pid in "${pids[@]}"; do
    [ -r "/proc/$pid/stat" ] || continue
    snap_own=$(awk -v own="$snap_own" -v process="$(process_cpu_s "$pid")" 'BEGIN { printf "%.2f", own + process }')
  done
}
# Other work's CPU between two snapshots, as "S s (C cores on average over W s)".
foreign_cpu() { # BUSY0 OWN0 TIME0 BUSY1 OWN1 TIME1
  awk -v b0="$1" -v o0="$2" -v t0="$3" -v b1="$4" -v o1="$5" -v t1="$6" 'BEGIN {
    f = (b1 - b0) - (o1 - o0); if (f < 0) f = 0; w = t1 - t0; if (w < 1) w = 1
    printf "%.0f CPU-s (%.2f cores on average over %d s)", f, f / w, w }'
}
foreign_cores() { # the same, only the average cores
  awk -v b0="$1" -v o0="$2" -v t0="$3" -v b1="$4" -v o1="$5" -v t1="$6" 'BEGIN {
    f = (b1 - b0) - (o1 - o0); if (f < 0) f = 0; w = t1 - t0; if (w < 1) w = 1; printf "%.2f", f / w }'
}

# A loopback port whose Redis Cluster bus port (port + 10000) is free too, both below the
# ephemeral range so that no client socket takes them meanwhile.
free_cluster_port() {
  python3 -c '
import random, socket
for _ in range(1000):
    port = random.randrange(12000, 22000)
    try:
        for p in (port, port + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close()
    except OSError:
        continue
    print(port); break'
}

# A private Redis Cluster: 6 redis-servers on loopback in $work/cluster-PORT (3 masters with one
# replica each, `redis-cli --cluster create`), RDB snapshots off; the arguments add settings to
# every node (e.g. --appendonly no). Waits until every node says cluster_state:ok and every
# master's replica is online (its first sync done). Sets cluster_ports (all six),
# cluster_masters, cluster_replicas (ports), cluster_pid_of_PORT per node, and cluster_url
# (redis-cluster:// with two seeds); exits if it does not form within 60 s.
start_redis_cluster() {
  local port dir ready role addresses=()
  cluster_ports=() cluster_masters=() cluster_replicas=()
  for _ in 1 2 3 4 5 6; do
    port=$(free_cluster_port)
    [ -n "$port" ] || { echo "no free port pair for a cluster node" >&2; exit 1; }
    dir="$work/cluster-$port"
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" --cluster-enabled yes \
      --cluster-config-file nodes.conf "$@" --daemonize no --logfile "$dir/redis.log" &
    pids+=($!)
    printf -v "cluster_pid_of_$port" '%s' "$!"
    cluster_ports+=("$port")
    addresses+=("127.0.0.1:$port")
  done
  for port in "${cluster_ports[@]}"; do
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$port" ping >/dev/null || { echo "cluster node $port did not start" >&2; cat "$work/cluster-$port/redis.log" >&2; exit 1; }
  done
  redis-cli --cluster create "${addresses[@]}" --cluster-replicas 1 --cluster-yes \
    >"$work/cluster-create.log" 2>&1 || { echo "redis-cli --cluster create failed" >&2; cat "$work/cluster-create.log" >&2; exit 1; }
  for _ in $(seq 600); do
    ready=1 cluster_masters=() cluster_replicas=()
    for port in "${cluster_ports[@]}"; do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ready=0
      role=$(redis-cli -p "$port" role 2>/dev/null | head -1)
      case "$role" in
        master) cluster_masters+=("$port")
          redis-cli -p "$port" info replication 2>/dev/null | grep -q '^slave0:.*state=online' || ready=0 ;;
        slave) cluster_replicas+=("$port") ;;
        *) ready=0 ;;
      esac
    done
    [ "$ready" = 1 ] && [ "${#cluster_masters[@]}" = 3 ] && break
    sleep 0.1
  done
  [ "$ready" = 1 ] && [ "${#cluster_masters[@]}" = 3 ] \
    || { echo "the cluster did not form in 60 s" >&2; redis-cli -p "${cluster_ports[0]}" cluster info >&2; exit 1; }
  cluster_url="redis-cluster://127.0.0.1:${cluster_masters[0]},127.0.0.1:${cluster_masters[1]}"
}
# The pid of cluster node PORT.
cluster_pid() { local name="cluster_pid_of_$1"; echo "${!name}"; }
