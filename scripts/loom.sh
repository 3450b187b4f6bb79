#!/usr/bin/env bash
# Model-checks the dedup cache's seqlock with loom (tests/loom_dedup.rs, docs/fuzzing.md).
#
#   scripts/loom.sh
#
#   LOOM_SECONDS         wall-clock bound for the model run, build excluded (default 300)
#   LOOM_TARGET_DIR      where the --cfg loom build goes (default target/loom): a directory of
#                        its own, since other RUSTFLAGS would otherwise rebuild the main one
#
# Exits non-zero if a model finds an execution that breaks an assertion (loom prints the
# interleaving), or if the run takes longer than the bound.
set -euo pipefail
cd "$(dirname "$0")/.."

LOOM_SECONDS="${LOOM_SECONDS:-300}"
export CARGO_TARGET_DIR="${LOOM_TARGET_DIR:-target/loom}"
export RUSTFLAGS="--cfg loom"
# loom explores thousands of executions, so it needs optimised code; the release profile's LTO
# and single codegen unit only slow the build down here.
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
# On failure, show where each thread was in the failing interleaving.
export LOOM_LOCATION=1

build_start=$(date +%s)
cargo test --release --test loom_dedup --no-run
echo "build: $(($(date +%s) - build_start)) s"

run_start=$(date +%s)
timeout "$LOOM_SECONDS" cargo test --release --test loom_dedup -- --nocapture --test-threads=1
echo "loom models: $(($(date +%s) - run_start)) s"
