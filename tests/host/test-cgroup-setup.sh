#!/usr/bin/env bash
# Tests of cgroups/setup.sh against fake cgroup v2 and v1 trees, and of its
# --systemd mode against a fake /etc/systemd/system. Run by scripts/test-host.sh.
set -euo pipefail
# shellcheck source=tests/host/lib.sh
source "$(dirname "$0")/lib.sh"

# An 8-core cgroup v2 root whose cpuset controller is available but not yet
# enabled for children, holding three processes.
make_v2() {
  write "$1/cgroup.controllers" "cpuset cpu io memory pids"
  write "$1/cgroup.subtree_control" "cpu memory"
  write "$1/cpuset.cpus.effective" "0-7"
  write "$1/cpuset.mems.effective" "0"
  printf '1\n200\n300\n' >"$1/cgroup.procs"
}

# A 4-core cgroup v1 host with a cpuset hierarchy, as on the CI machine.
make_v1() {
  write "$1/cpuset/cpuset.cpus" "0-3"
  write "$1/cpuset/cpuset.mems" "0"
  printf '1\n200\n' >"$1/cpuset/cgroup.procs"
  mkdir -p "$1/memory"
}

setup() {
  local root
  root=$(cd "$1" && pwd)
  shift
  CGROUP_ROOT=$root SYSTEMD_DIR=$WORK/systemd SYSTEMCTL="$WORK/fake-systemctl" \
    bash "$REPO_DIR/cgroups/setup.sh" "$@"
}

make_fake_systemctl() {
  printf '#!/bin/sh\necho "$*" >>%s/systemctl.log\n' "$WORK" >fake-systemctl
  chmod +x fake-systemctl
}

test_v2_creates_both_cpusets_and_moves_root_processes() {
  # Proves: on cgroup v2 it enables cpuset for children, makes shardgate (shard cores) and housekeeping (the rest), and moves the root's processes.
  make_v2 cg
  local output
  output=$(setup cg --cores 2-7)
  assert_contains "$output" "cgroup v2"
  assert_file cg/cgroup.subtree_control "+cpuset"
  assert_file cg/shardgate/cpuset.cpus 2-7
  assert_file cg/shardgate/cpuset.mems 0
  assert_file cg/housekeeping/cpuset.cpus 0-1
  assert_file cg/housekeeping/cpuset.mems 0
  assert_file cg/housekeeping/cgroup.procs 300 # the fake keeps the last pid written
}

test_v2_dry_run_changes_nothing_and_second_run_changes_nothing() {
  # Proves: --dry-run prints the commands and changes nothing; after a run (and the kernel emptying the root), a second run changes nothing.
  make_v2 cg
  local before output
  before=$(snapshot cg)
  output=$(setup cg --cores 2-7 --dry-run)
  assert_eq "$(snapshot cg)" "$before" "tree after --dry-run"
  assert_contains "$output" "echo +cpuset > $WORK/cg/cgroup.subtree_control"
  assert_contains "$output" "echo 2-7 > $WORK/cg/shardgate/cpuset.cpus"
  assert_contains "$output" "nothing was changed"
  setup cg --cores 2-7 >/dev/null
  : >cg/cgroup.procs # the kernel moved them out
  before=$(snapshot cg)
  output=$(setup cg --cores 2-7)
  assert_eq "$(snapshot cg)" "$before" "tree after the second run"
  assert_contains "$output" "# 0 change(s)"
}

test_v1_creates_both_cpusets() {
  # Proves: on a cgroup v1 cpuset hierarchy it makes cpuset/shardgate and cpuset/housekeeping with cpus and mems, and moves the root's processes.
  make_v1 cg
  local output
  output=$(setup cg --cores 1 --housekeeping 0)
  assert_contains "$output" "cgroup v1"
  assert_file cg/cpuset/shardgate/cpuset.cpus 1
  assert_file cg/cpuset/shardgate/cpuset.mems 0
  assert_file cg/cpuset/housekeeping/cpuset.cpus 0
  assert_file cg/cpuset/housekeeping/cpuset.mems 0
  assert_file cg/cpuset/housekeeping/cgroup.procs 200
  : >cg/cpuset/cgroup.procs
  assert_contains "$(setup cg --cores 1 --housekeeping 0)" "# 0 change(s)"
}

test_v1_dry_run_changes_nothing() {
  # Proves: --dry-run on v1 prints mkdir and each write, in the order a v1 cpuset needs (cpus and mems before tasks), and changes nothing.
  make_v1 cg
  local before output
  before=$(snapshot cg)
  output=$(setup cg --cores 2-3 --dry-run)
  assert_eq "$(snapshot cg)" "$before" "tree after --dry-run"
  assert_eq "$(grep -c . <<<"$output")" 11 "lines of output"
  assert_contains "$output" "mkdir $WORK/cg/cpuset/shardgate
echo 2-3 > $WORK/cg/cpuset/shardgate/cpuset.cpus
echo 0 > $WORK/cg/cpuset/shardgate/cpuset.mems
for pid in"
}

test_bad_lists_fail_clearly() {
  # Proves: cores outside the root cpuset, overlapping or empty housekeeping, and a missing hierarchy fail with a message, changing nothing.
  make_v1 cg
  local before
  before=$(snapshot cg)
  assert_contains "$(setup cg --cores 5 2>&1 || true)" "core 5 is not in the root cpuset (0-3)"
  assert_contains "$(setup cg --cores 1 --housekeeping 0-1 2>&1 || true)" "core 1 is a shard core"
  assert_contains "$(setup cg --cores 0-3 2>&1 || true)" "no housekeeping core left"
  assert_contains "$(setup cg 2>&1 || true)" "--cores LIST is required"
  mkdir empty
  assert_contains "$(setup empty --cores 1 2>&1 || true)" "no cgroup v2 root"
  setup cg --cores 5 >/dev/null 2>&1 && fail "an invalid --cores exited 0"
  assert_eq "$(snapshot cg)" "$before" "tree after errors"
}

test_systemd_mode_writes_the_slice_and_drop_ins() {
  # Proves: --systemd installs shardgate.slice and the system/user.slice drop-ins with the cores filled in, reloads systemd once, and is idempotent.
  make_v2 cg
  make_fake_systemctl
  setup cg --cores 4-7 --systemd >/dev/null
  assert_contains "$(<systemd/shardgate.slice)" $'[Slice]\nAllowedCPUs=4-7'
  assert_contains "$(<systemd/system.slice.d/50-shardgate-housekeeping.conf)" $'[Slice]\nAllowedCPUs=0-3'
  assert_contains "$(<systemd/user.slice.d/50-shardgate-housekeeping.conf)" $'[Slice]\nAllowedCPUs=0-3'
  assert_file systemctl.log "daemon-reload"
  [[ ! -e cg/shardgate ]] || fail "--systemd also made a cgroup directly"
  assert_contains "$(setup cg --cores 4-7 --systemd)" "# 0 change(s)"
  assert_file systemctl.log "daemon-reload"
}

test_systemd_mode_refuses_cgroup_v1() {
  # Proves: --systemd on a v1 host fails and says why, since AllowedCPUs= would silently do nothing there.
  make_v1 cg
  assert_contains "$(setup cg --cores 1 --systemd 2>&1 || true)" "--systemd needs cgroup v2"
}

for test in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
  run_test "$test"
done
finish_tests
