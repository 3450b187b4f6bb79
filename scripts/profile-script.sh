#!/usr/bin/env bash
# Where Redis spends the dedup-and-append script's cost, in instructions per event (issue 14,
# goal 2). Instructions, not seconds: valgrind's callgrind counts what redis-server executes, so
# the figures repeat exactly on a machine whose other work moves every timing.
#
#   scripts/profile-script.sh [BATCH]        (default 32 events per call)
#
# It takes the server's script from src/redis/script.rs and cuts it down step by step, each
# variant one stage less, then runs each under `valgrind --tool=callgrind redis-server` (a
# private one on a free loopback port, no persistence) with scripts/bench-script.py's load:
# 120 000 events in calls of BATCH, 30% copies, 64-byte payloads. The differences between
# neighbours are the stages' costs:
#   call       the loop fills the outcomes and reads no event: the call, its arguments, the reply
#   unpack     + struct.unpack of each event's seven fields into Lua strings
#   marker key + the marker key's concatenation
#   set        + SET NX EX (every event; the XADD replaced by nothing)
#   server     + XADD for the events whose marker was new: the server's script, unchanged
#   xadd only  bench/script-variants/xadd-only.lua: every event appended, no marker at all
# Takes about 3 minutes on 2 cores. Needs valgrind and redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
batch="${1:-32}"
[[ "$batch" =~ ^[0-9]+$ ]] && [ "$batch" -ge 1 ] || { echo "BATCH must be a whole number of events" >&2; exit 2; }
for tool in valgrind callgrind_annotate redis-server redis-cli python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool (apt-get install valgrind redis-server)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/shardgate-script-profile.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The variants, each made from the server's script by a replacement that must apply.
python3 - "$work" <<'EOF'
import sys
work = sys.argv[1]
text = open('src/redis/script.rs').read()
server = text.split('DEDUP_APPEND_LUA: &str = r#"')[1].split('"#;')[0]
def cut(source, old, new, name):
    if old not in source:
        sys.exit(f"profile-script.sh: the '{name}' cut no longer matches src/redis/script.rs; update it")
    return source.replace(old, new)
body_start = server.index("  local marked = redis.pcall('SET'")
body_end = server.index("if position ~= #blob + 1 then")
marker_key = server[:body_start] + "  outcomes[index] = 'A'\nend\n" + server[body_end:]
unpack = cut(marker_key, "  local marker = marker_prefix .. player .. ':' .. seq\n", "", "unpack")
loop_start = unpack.index("for index = 1, count do")
loop_end = unpack.index("if position ~= #blob + 1 then")
call = unpack[:loop_start] + "for index = 1, count do\n  outcomes[index] = 'A'\nend\nposition = #blob + 1\n" + unpack[loop_end:]
set_only = cut(server, """    local appended = redis.pcall('XADD', stream, '*', 'player', player, 'seq', seq,
      'type', action_type, 'ts', ts, 'recv_us', recv_us, 'payload', payload)""", "    local appended = 1", "set")
for name, source in [('1-call', call), ('2-unpack', unpack), ('3-marker-key', marker_key), ('4-set', set_only), ('5-server', server)]:
    open(f'{work}/{name}.lua', 'w').write(source)
EOF
cp bench/script-variants/xadd-only.lua "$work/6-xadd-only.lua"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
calls=$(( 120000 / batch )); [ "$calls" -ge 200 ] || calls=200
events=$(( calls * batch ))   # as scripts/bench-script.py sends them
printf '%-16s %16s %14s\n' variant instructions "per event"
for script in "$work"/[1-6]-*.lua; do
  name=$(basename "$script" .lua)
  port=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file="$work/$name.callgrind" \
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/$name.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 120); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.5; done
  BATCHES="$batch" python3 scripts/bench-script.py "$port" "$script" >"$work/$name.txt"
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  wait "$redis_pid" || true
  total=$(callgrind_annotate "$work/$name.callgrind" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  printf '%-16s %16s %14s\n' "${name#?-}" "$total" "$(( total / events ))"
done
echo "(redis-server under callgrind, $events events in calls of $batch, 30% copies; startup included, about 1% of each total)"
