#!/usr/bin/env bash
# Runs the host-side tests: shellcheck on every host shell script, then the
# tests in tests/host/ (tune-host.sh and cgroups/setup.sh on fake host trees,
# systemd-analyze verify on the units, the sample config against config.rs).
#
# Installs shellcheck with apt when missing, and systemd when systemd-analyze is
# missing (the package only provides the tools here; nothing is started). Needs
# root for that, or the tools already installed. Exits non-zero on any failure.
# A check that cannot run in this environment (systemd-analyze present but
# unable to verify even a trivial unit) is reported as SKIP with the reason.
#
# Usage: scripts/test-host.sh   (SHARDGATE_BIN=path also parses the sample
# config with that binary; by default target/{release,debug}/shardgate if built)
set -euo pipefail
cd "$(dirname "$0")/.."

SCRIPTS=(scripts/tune-host.sh scripts/test-host.sh scripts/rolling-restart.sh cgroups/setup.sh tests/host/*.sh)

# apt_install PACKAGE: installs it, refreshing the package lists if needed.
apt_install() {
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "test-host: cannot install $1 (needs root and apt-get): sudo apt-get install -y $1" >&2
    return 1
  fi
  echo "test-host: installing $1 with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1 ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null; }
}

ensure_tools() {
  command -v shellcheck >/dev/null || apt_install shellcheck || exit 1
  if ! command -v systemd-analyze >/dev/null; then
    apt_install systemd ||
      echo "test-host: systemd-analyze is missing and could not be installed: the unit checks will be SKIPPED" >&2
  fi
}

run_shellcheck() {
  echo "== shellcheck ${SCRIPTS[*]}"
  shellcheck -x "${SCRIPTS[@]}"
  echo "shellcheck: clean"
}

main() {
  local started failed=0 test
  started=$(date +%s)
  ensure_tools
  run_shellcheck || failed=1
  for test in tests/host/test-*.sh; do
    echo "== $test"
    bash "$test" || failed=1
  done
  echo "test-host: $([[ $failed -eq 0 ]] && echo passed || echo FAILED) in $(($(date +%s) - started)) s"
  return "$failed"
}

main "$@"
