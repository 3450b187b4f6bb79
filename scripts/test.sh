#!/usr/bin/env bash
# Runs every test of the project, in this order:
#   1. the workspace's cargo tests (unit, property, end to end). Each end-to-end
#      test starts its own redis-server on a free loopback port; nothing here
#      uses a Redis that is already running. tests/e2e/hosts.rs runs servers in
#      network namespaces it makes (root and iproute2); it skips, saying so on
#      stderr, where it cannot, unless SHARDGATE_REQUIRE_NETNS=1 (.ci/run sets it). tests/e2e/hlog.rs reads the .hlog
#      with HdrHistogram's Python port, which it pip-installs into
#      target/tmp/hlog-venv: it needs python3 with venv and PyPI, and fails without;
#   2. the host-side tests (tune-host.sh, cgroups, systemd unit) on fake trees;
#   3. the monitoring artifacts (promtool on the alert rules, the dashboard);
#   4. the vendored glommio has no warnings and the demo keeps AOF everysec;
#   5. the loom model of the dedup cache (scripts/loom.sh);
#   6. a bounded fuzzing run of every fuzz target (scripts/fuzz.sh,
#      FUZZ_SECONDS per target, 30 by default here).
# Arguments go to `cargo test` (step 1). SHARDGATE_QUICK=1 runs step 1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDGATE_NEED_PROMTOOL=1
source scripts/ensure-deps.sh

step() { printf '\n== %s\n' "$*"; }

step "cargo test --workspace --all-targets $*"
cargo test --workspace --all-targets "$@"
if [ "${SHARDGATE_QUICK:-0}" = 1 ]; then
  exit 0
fi
step "host tests (scripts/test-host.sh)"
SHARDGATE_BIN="${SHARDGATE_BIN:-$PWD/target/debug/shardgate}" bash scripts/test-host.sh
step "monitoring artifacts (scripts/check-monitoring.sh)"
bash scripts/check-monitoring.sh
step "the vendored glommio and fred are crates.io releases plus numbered patches (scripts/vendored-patches.sh)"
bash scripts/vendored-patches.sh check
step "the vendored crates build without warnings, and the demo's Redis keeps the documented durability"
# cargo replays a path dependency's cached warnings on every build, so this costs no rebuild.
for vendored in glommio fred; do
  vendored_warnings=$(cargo build -p "$vendored" 2>&1 | grep -c '^warning' || true)
  if [ "$vendored_warnings" != 0 ]; then
    cargo build -p "$vendored" >&2
    echo "the vendored $vendored prints $vendored_warnings warnings: the demo shows them to every newcomer" >&2
    exit 1
  fi
done
grep -q -- '--appendonly yes --appendfsync everysec' scripts/demo.sh ||
  { echo "scripts/demo.sh no longer runs Redis with AOF everysec, the default docs/operations.md recommends" >&2; exit 1; }
echo "ok: no warnings from the vendored crates; demo Redis on AOF everysec"
step "loom model of the dedup cache (scripts/loom.sh)"
bash scripts/loom.sh
step "fuzzing (scripts/fuzz.sh)"
FUZZ_SECONDS="${FUZZ_SECONDS:-30}" bash scripts/fuzz.sh
step "all tests passed"
