#!/usr/bin/env bash
# Tests of systemd/shardgate.service, systemd/shardgate@.service, the slices in
# cgroups/, the sample systemd/shardgate.toml and scripts/rolling-restart.sh:
# `systemd-analyze verify` accepts the units with no warning, the unit has what
# issue 5 asks for, the instance unit differs from it only where a rolling
# restart needs it, the sample config has every key of src/host/config.rs with its
# default, and the rolling restart drives a fake systemctl in the right order.
# Run by scripts/test-host.sh.
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
  # The default the settings table documents (a unit test holds the docs to the code).
  drain_ms=$(config_keys | awk '$1 == "drain_timeout_ms" { print $2 }' | tr -d _)
  [[ $drain_ms =~ ^[0-9]+$ ]] || fail "no drain_timeout_ms default in src/host/config.rs: '$drain_ms'"
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

# The instance unit with ExecStart's binary replaced by a dummy executable, as shardgate@.service.
instance_unit_copy() {
  mkdir -p units bin
  printf '#!/bin/sh\nexit 0\n' >bin/shardgate
  chmod +x bin/shardgate
  sed "s#^ExecStart=/usr/local/bin/shardgate #ExecStart=$WORK/bin/shardgate #" \
    "$REPO_DIR/systemd/shardgate@.service" >units/shardgate@.service
  grep -q "^ExecStart=$WORK/bin/shardgate serve --config /etc/shardgate/shardgate.toml$" units/shardgate@.service ||
    fail "the instance unit's ExecStart is not the single unit's"
  cp "$REPO_DIR/cgroups/shardgate.slice" units/
}

test_instance_unit_verifies() {
  # Proves: systemd-analyze verify accepts shardgate@a.service and shardgate@b.service (the template, instantiated) without a warning, and rates its exposure OK.
  need_systemd_analyze
  instance_unit_copy
  verify "$WORK/units/shardgate@a.service"
  verify "$WORK/units/shardgate@b.service"
  local output exposure
  output=$(systemd-analyze security --offline=yes "$WORK/units/shardgate@a.service" 2>&1) ||
    skip "systemd-analyze security --offline is not supported here: ${output##*$'\n'}"
  exposure=$(sed -n 's/.*Overall exposure level for shardgate@a.service: \([0-9.]*\).*/\1/p' <<<"$output")
  [[ -n $exposure ]] || fail "no exposure level in:"$'\n'"$output"
  awk -v e="$exposure" 'BEGIN { exit !(e < 2.0) }' || fail "exposure $exposure is 2.0 or more"
}

# settings FILE: the unit's KEY=VALUE lines, without comments and blank lines.
settings() {
  grep -v -e '^#' -e '^$' "$1"
}

test_instance_unit_is_the_single_unit_plus_a_shared_user() {
  # Proves: shardgate@.service has every setting of shardgate.service, and differs only in its Description (naming the instance) and a fixed User=/Group=, which both instances need to share one SO_REUSEPORT group.
  local single instance
  single=$(settings "$REPO_DIR/systemd/shardgate.service" | grep -v '^Description=')
  instance=$(settings "$REPO_DIR/systemd/shardgate@.service" | grep -v -e '^Description=' -e '^User=shardgate$' -e '^Group=shardgate$')
  assert_eq "$instance" "$single" "the instance unit's settings besides Description, User and Group"
  assert_eq "$(grep -c '^User=shardgate$' "$REPO_DIR/systemd/shardgate@.service")" 1 "User=shardgate lines"
  assert_eq "$(grep -c '^Group=shardgate$' "$REPO_DIR/systemd/shardgate@.service")" 1 "Group=shardgate lines"
  grep -q '^DynamicUser=yes$' "$REPO_DIR/systemd/shardgate@.service" || fail "the instance unit lacks DynamicUser=yes"
  grep -q '^Description=.*%i' "$REPO_DIR/systemd/shardgate@.service" || fail "the instance unit's Description does not name the instance"
}

# A fake systemctl for scripts/rolling-restart.sh: a unit is active while
# state/UNIT exists; every call is appended to calls. FAKE_FAIL_START=UNIT makes
# starting that unit fail; FAKE_STOP_RESULT is the Result= a stopped unit shows.
fake_systemctl() {
  mkdir -p state
  cat >systemctl <<'FAKE'
#!/usr/bin/env bash
set -euo pipefail
dir=$(dirname "$0")
echo "$*" >>"$dir/calls"
case $1 in
is-active) [[ -e $dir/state/$3 ]] ;;
start)
  [[ $2 != "${FAKE_FAIL_START:-}" ]] || exit 1
  touch "$dir/state/$2"
  ;;
stop) rm -f "$dir/state/$2" ;;
enable | disable) echo "$1d $2" ;;
show) echo "${FAKE_STOP_RESULT:-success}" ;;
*) exit 3 ;;
esac
FAKE
  chmod +x systemctl
  local unit
  for unit in "$@"; do
    touch "state/$unit"
  done
}

# rolling_restart: runs the script with the fake systemctl; sets $output and $status.
rolling_restart() {
  status=0
  output=$(SYSTEMCTL=$WORK/systemctl bash "$REPO_DIR/scripts/rolling-restart.sh" "$@" 2>&1) || status=$?
}

# changes: the fake's calls that change something, in order.
changes() {
  grep -v -e '^is-active' -e '^show' calls || true
}

test_rolling_restart_hands_over_from_a_to_b_and_back() {
  # Proves: with shardgate@a active the script starts shardgate@b before it stops shardgate@a, then enables b and disables a; run again, it hands back to a.
  fake_systemctl shardgate@a.service
  rolling_restart
  assert_eq "$status" 0 "exit status ($output)"
  assert_eq "$(changes)" $'start shardgate@b.service\nstop shardgate@a.service\nenable shardgate@b.service\ndisable shardgate@a.service'
  assert_contains "$output" "done: shardgate@b.service serves, shardgate@a.service stopped"
  [[ -e state/shardgate@b.service && ! -e state/shardgate@a.service ]] || fail "b is not the one active"
  rm calls
  rolling_restart
  assert_eq "$status" 0 "exit status ($output)"
  assert_eq "$(changes)" $'start shardgate@a.service\nstop shardgate@b.service\nenable shardgate@a.service\ndisable shardgate@b.service'
}

test_rolling_restart_moves_the_single_unit_onto_the_instances() {
  # Proves: with only shardgate.service active, the script starts shardgate@a, then stops and disables shardgate.service.
  fake_systemctl shardgate.service
  rolling_restart
  assert_eq "$status" 0 "exit status ($output)"
  assert_eq "$(changes)" $'start shardgate@a.service\nstop shardgate.service\nenable shardgate@a.service\ndisable shardgate.service'
}

test_rolling_restart_keeps_the_old_instance_when_the_new_fails() {
  # Proves: when shardgate@b fails to start, the script exits 1 saying so and never stops, enables or disables anything.
  fake_systemctl shardgate@a.service
  FAKE_FAIL_START=shardgate@b.service rolling_restart
  assert_eq "$status" 1 "exit status"
  assert_contains "$output" "shardgate@b.service did not start; shardgate@a.service still serves"
  assert_eq "$(changes)" "start shardgate@b.service"
}

test_rolling_restart_refuses_without_exactly_one_active_unit() {
  # Proves: with no unit active, or with both instances active, the script exits 1 with a message and changes nothing.
  fake_systemctl
  rolling_restart
  assert_eq "$status" 1 "exit status with none active"
  assert_contains "$output" "no shardgate unit is active"
  assert_eq "$(changes)" ""
  touch state/shardgate@a.service state/shardgate@b.service
  rolling_restart
  assert_eq "$status" 1 "exit status with both active"
  assert_contains "$output" "shardgate@a.service shardgate@b.service are all active"
  assert_eq "$(changes)" ""
}

test_rolling_restart_reports_an_unclean_stop() {
  # Proves: when the old instance's stop ends in a Result other than success (a drain that was killed), the script exits 1 naming it, with the new instance left serving and enabled.
  fake_systemctl shardgate@b.service
  FAKE_STOP_RESULT=timeout rolling_restart
  assert_eq "$status" 1 "exit status"
  assert_contains "$output" "shardgate@b.service did not stop cleanly (result 'timeout'); shardgate@a.service serves"
  assert_contains "$(changes)" "enable shardgate@a.service"
  [[ -e state/shardgate@a.service ]] || fail "a is not active"
}

test_rolling_restart_dry_run_only_prints() {
  # Proves: --dry-run prints the start, stop, enable and disable commands and runs none of them.
  fake_systemctl shardgate@a.service
  rolling_restart --dry-run
  assert_eq "$status" 0 "exit status ($output)"
  assert_contains "$output" "$WORK/systemctl start shardgate@b.service"
  assert_contains "$output" "$WORK/systemctl stop shardgate@a.service"
  assert_eq "$(changes)" ""
}

# The keys of the settings table in src/host/config.rs (`macro_rules! serve_settings`,
# one entry `name: Type [= default ...],` per setting), each with the default its doc
# comment states: a value, "-" (off or none: commented out), or "required". The unit
# test documented_defaults_are_the_table_defaults checks those docs against the code.
config_keys() {
  awk '/^macro_rules! serve_settings/ { on = 1 } on && /^}/ { on = 0 } on' "$REPO_DIR/src/host/config.rs" | awk '
    /\/\/\// { doc = doc $0; next }
    /#\[serde\(skip\)\]/ { skipped = 1; next }
    /^ *[a-z_]+: [A-Za-z]/ {
      name = $1; sub(":", "", name); value = "?"
      if (match(doc, /\[default: [^]]*\]/)) value = substr(doc, RSTART + 10, RLENGTH - 11)
      else if (doc ~ /\[required/) value = "required"
      else if (doc ~ /\[not supported yet\]/) value = "none"
      if (value == "off" || value == "none") value = "-"
      if (!skipped) print name, value
      skipped = 0; doc = ""
    }'
}

test_sample_config_has_every_key_with_its_default() {
  # Proves: systemd/shardgate.toml names every key of src/host/config.rs, each with the default config.rs documents, and no other key.
  local sample=$REPO_DIR/systemd/shardgate.toml keys name default line active
  keys=$(config_keys)
  [[ $(wc -l <<<"$keys") -ge 20 ]] || fail "read only these keys from src/host/config.rs: $keys"
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
    grep -q "^$name " <<<"$keys" || fail "the sample has $name, which src/host/config.rs does not know"
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
