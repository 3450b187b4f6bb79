#!/usr/bin/env bash
# Tests of systemd/shardgate.service, the slices in cgroups/, and the sample
# systemd/shardgate.toml: `systemd-analyze verify` accepts the units with no
# warning, the unit has what issue 5 asks for, and the sample config has every
# key of src/config.rs with its default. Run by scripts/test-host.sh.
#
# systemd-analyze verify checks that ExecStart's binary exists, so the unit is
# verified as a copy whose ExecStart points at a dummy executable (same
# arguments); everything else is the shipped text.
set -euo pipefail
# shellcheck source=tests/host/lib.sh
source "$(dirname "$0")/lib.sh"

# verify FILE...: systemd-analyze verify must pass and print nothing.
verify() {
  local output
  output=$(systemd-analyze verify "$@" 2>&1) || fail "systemd-analyze verify $* failed:"$'\n'"$output"
  [[ -z $output ]] || fail "systemd-analyze verify $* warned:"$'\n'"$output"
}

# Skips the test when systemd-analyze cannot verify even a trivial unit here.
need_systemd_analyze() {
  command -v systemd-analyze >/dev/null || skip "systemd-analyze is not installed"
  mkdir -p probe
  printf '[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/sh -c true\n' >probe/probe.service
  local output
  output=$(systemd-analyze verify "$WORK/probe/probe.service" 2>&1) ||
    skip "systemd-analyze verify cannot run in this environment: $output"
}

# The unit, with ExecStart's binary replaced by a dummy executable.
unit_copy() {
  mkdir -p units bin
  printf '#!/bin/sh\nexit 0\n' >bin/shardgate
  chmod +x bin/shardgate
  sed "s#^ExecStart=/usr/local/bin/shardgate #ExecStart=$WORK/bin/shardgate #" \
    "$REPO_DIR/systemd/shardgate.service" >units/shardgate.service
  grep -q "^ExecStart=$WORK/bin/shardgate serve --config /etc/shardgate/shardgate.toml$" units/shardgate.service ||
    fail "ExecStart is not '/usr/local/bin/shardgate serve --config /etc/shardgate/shardgate.toml'"
  cp "$REPO_DIR/cgroups/shardgate.slice" units/
}

test_service_unit_verifies() {
  # Proves: systemd-analyze verify accepts shardgate.service (in its slice) without a single warning.
  need_systemd_analyze
  unit_copy
  verify "$WORK/units/shardgate.service"
}

test_slices_and_drop_ins_verify() {
  # Proves: shardgate.slice and the system.slice/user.slice drop-ins verify, as shipped and as setup.sh --systemd writes them.
  need_systemd_analyze
  local dir
  mkdir -p shipped/system.slice.d shipped/user.slice.d cg
  cp "$REPO_DIR/cgroups/shardgate.slice" shipped/
  cp "$REPO_DIR/cgroups/system.slice.d/50-housekeeping.conf" shipped/system.slice.d/
  cp "$REPO_DIR/cgroups/user.slice.d/50-housekeeping.conf" shipped/user.slice.d/
  write cg/cgroup.controllers "cpuset cpu"
  write cg/cpuset.cpus.effective 0-3
  write cg/cpuset.mems.effective 0
  CGROUP_ROOT=$WORK/cg SYSTEMD_DIR=$WORK/installed SYSTEMCTL="" \
    bash "$REPO_DIR/cgroups/setup.sh" --systemd --cores 2-3 >/dev/null
  for dir in shipped installed; do
    # system.slice is built into systemd; a stand-in file makes verify load its drop-in.
    printf '[Unit]\nDescription=System Slice\n' >"$dir/system.slice"
    printf '[Unit]\nDescription=User Slice\n' >"$dir/user.slice"
    verify "$WORK/$dir/shardgate.slice" "$WORK/$dir/system.slice" "$WORK/$dir/user.slice"
  done
  assert_contains "$(<installed/shardgate.slice)" "AllowedCPUs=2-3"
  assert_contains "$(<installed/system.slice.d/50-shardgate-housekeeping.conf)" "AllowedCPUs=0-1"
}

# unit_value KEY: the unit's last value for KEY.
unit_value() {
  sed -n "s/^$1=//p" "$REPO_DIR/systemd/shardgate.service" | tail -n 1
}

test_service_unit_has_what_issue_5_asks() {
  # Proves: the unit is Type=notify in shardgate.slice, stops slower than the default drain, is hardened, and lets io_uring through its syscall filter.
  assert_eq "$(unit_value Type)" notify Type
  assert_eq "$(unit_value Slice)" shardgate.slice Slice
  assert_eq "$(unit_value LimitMEMLOCK)" infinity LimitMEMLOCK
  assert_eq "$(unit_value ExecStart)" "/usr/local/bin/shardgate serve --config /etc/shardgate/shardgate.toml" ExecStart
  assert_eq "$(unit_value ExecReload)" "" ExecReload
  assert_eq "$(unit_value StateDirectory)" shardgate StateDirectory
  local drain_ms stop_s
  drain_ms=$(sed -n 's/^pub const DRAIN_TIMEOUT_MS_DEFAULT: u64 = \([0-9_]*\);/\1/p' "$REPO_DIR/src/limits.rs" | tr -d _)
  [[ -n $drain_ms ]] || fail "no DRAIN_TIMEOUT_MS_DEFAULT in src/limits.rs"
  stop_s=$(unit_value TimeoutStopSec)
  stop_s=${stop_s%s}
  ((stop_s * 1000 > drain_ms + 5000)) || fail "TimeoutStopSec=${stop_s}s is not above the ${drain_ms} ms drain plus 5 s"
  for setting in DynamicUser=yes NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
    "CapabilityBoundingSet=" "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"; do
    grep -qx "$setting" "$REPO_DIR/systemd/shardgate.service" || fail "the unit lacks $setting"
  done
  local filter
  filter=$(grep '^SystemCallFilter=[^~]' "$REPO_DIR/systemd/shardgate.service")
  for call in io_uring_setup io_uring_enter io_uring_register; do
    assert_contains "$filter" "$call" "SystemCallFilter"
  done
}

test_service_unit_security_exposure_is_ok() {
  # Proves: systemd-analyze security rates the unit's exposure OK or better (below 2.0 of 10).
  need_systemd_analyze
  unit_copy
  local output exposure
  output=$(systemd-analyze security --offline=yes "$WORK/units/shardgate.service" 2>&1) ||
    skip "systemd-analyze security --offline is not supported here: ${output##*$'\n'}"
  exposure=$(sed -n 's/.*Overall exposure level for shardgate.service: \([0-9.]*\).*/\1/p' <<<"$output")
  [[ -n $exposure ]] || fail "no exposure level in:"$'\n'"$output"
  awk -v e="$exposure" 'BEGIN { exit !(e < 2.0) }' || fail "exposure $exposure is 2.0 or more"
}

# ServeArgs' keys from src/config.rs, each with the default its doc comment
# states: a value, "-" (off or none: commented out), or "required".
config_keys() {
  awk '/^pub struct ServeArgs/ { on = 1 } on && /^}/ { on = 0 } on' "$REPO_DIR/src/config.rs" | awk '
    /\/\/\// { doc = doc $0; next }
    /#\[serde\(skip\)\]/ { skipped = 1; next }
    /^ *pub [a-z_]+: Option</ {
      name = $2; sub(":", "", name); value = "?"
      if (match(doc, /\[default: [^]]*\]/)) value = substr(doc, RSTART + 10, RLENGTH - 11)
      else if (doc ~ /\[required/) value = "required"
      else if (doc ~ /\[not supported yet\]/) value = "none"
      if (value == "off" || value == "none") value = "-"
      if (!skipped) print name, value
      skipped = 0; doc = ""
    }'
}

test_sample_config_has_every_key_with_its_default() {
  # Proves: systemd/shardgate.toml names every key of src/config.rs, each with the default config.rs documents, and no other key.
  local sample=$REPO_DIR/systemd/shardgate.toml keys name default line active
  keys=$(config_keys)
  [[ $(wc -l <<<"$keys") -ge 20 ]] || fail "read only these keys from src/config.rs: $keys"
  while read -r name default; do
    line=$(grep -E "^(# )?$name = " "$sample") || fail "$name is not in the sample"
    [[ $(wc -l <<<"$line") -eq 1 ]] || fail "$name is in the sample more than once"
    grep -B1 -E "^(# )?$name = " "$sample" | head -n 1 | grep -q '^#' || fail "$name has no comment above it"
    active=no
    [[ $line == "#"* ]] || active=yes
    case $default in
    required) assert_eq "$active" yes "$name (required) set" ;;
    -) assert_eq "$active" no "$name (no default) commented out" ;;
    *)
      assert_eq "$active" yes "$name set"
      assert_eq "$(sed -E 's/^[a-z_]+ = "?([^"]*)"?$/\1/' <<<"$line")" "$default" "$name's value"
      ;;
    esac
  done <<<"$keys"
  while read -r name; do
    grep -q "^$name " <<<"$keys" || fail "the sample has $name, which src/config.rs does not know"
  done < <(sed -n -E 's/^(# )?([a-z_]+) = .*/\2/p' "$sample")
  if command -v python3 >/dev/null && python3 -c 'import tomllib' 2>/dev/null; then
    python3 -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$sample" || fail "the sample is not valid TOML"
  fi
}

test_sample_config_is_accepted_by_shardgate() {
  # Proves: shardgate itself parses the sample (every key known, every value valid), using a built binary when there is one.
  local binary=${SHARDGATE_BIN:-}
  for candidate in "$REPO_DIR/target/release/shardgate" "$REPO_DIR/target/debug/shardgate"; do
    [[ -n $binary || ! -x $candidate ]] || binary=$candidate
  done
  [[ -n $binary ]] || skip "no shardgate binary (set SHARDGATE_BIN, or cargo build first)"
  local output status=0
  # A flag wins over the file: --partitions 0 fails only after the file parsed and merged.
  output=$("$binary" serve --config "$REPO_DIR/systemd/shardgate.toml" --partitions 0 2>&1) || status=$?
  assert_eq "$status" 2 "exit status"
  assert_contains "$output" "--partitions 0 is out of range"
}

for test in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
  run_test "$test"
done
finish_tests
