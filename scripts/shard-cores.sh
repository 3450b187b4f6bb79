#!/usr/bin/env bash
# Prints the --cores list for shardgate on a machine it shares with its Redis and its load
# generator (the demo, the benchmarks, CI): the first half of the cores, at least one.
#
# Why (measured, bench/wins.md, 2026-12-07): on this project's 2-core machine one shard beside
# Redis and the generator cost 8.5 µs of CPU per frame at 50 000/s against 11.7 µs for two
# shards, with p99.9 of 12-15 ms against 19-42 ms. A second shard on a core that Redis and the
# generator also need adds wake-ups and context switches, not throughput. On dedicated metal the
# rule is different: one shard per core reserved for shardgate, with Redis, the NIC's
# interrupts and housekeeping kept off those cores (docs/operations.md, scripts/tune-host.sh).
set -euo pipefail
cores=$(nproc)
shards=$(( cores / 2 ))
[ "$shards" -ge 1 ] || shards=1
if [ "$shards" -eq 1 ]; then echo 0; else echo "0-$(( shards - 1 ))"; fi
