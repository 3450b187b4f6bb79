#!/usr/bin/env bash
# Runs every test of the workspace. Each test starts its own redis-server on a
# free loopback port; nothing here uses a Redis that is already running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
cargo test --workspace --all-targets "$@"
