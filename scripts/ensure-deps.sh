#!/usr/bin/env bash
# Installs what shardgate's demo and tests need and the machine lacks:
# redis-server (Debian package) and a Rust toolchain check. Sourced by
# scripts/demo.sh and scripts/test.sh.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
# The metrics test lints /metrics with promtool, from Debian's prometheus package.
if [ "${SHARDGATE_NEED_PROMTOOL:-0}" = 1 ]; then
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
  # scripts/vendored-patches.sh check, run by the tests.
  command -v patch >/dev/null 2>&1 || need_apt+=(patch)
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_apt[*]} with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing: ${need_apt[*]}. Install with: sudo apt-get update && sudo apt-get install -y ${need_apt[*]}" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "missing: cargo. Install Rust (1.85 or newer) with rustup: https://rustup.rs" >&2
  exit 1
fi
