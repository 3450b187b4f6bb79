#!/usr/bin/env bash
# Shared helpers of the host tests: assertions, a test runner, snapshots of a
# fake tree, and a fake host for scripts/tune-host.sh. Sourced, not run.
#
# The fake host is a 4-core machine (cores 0-3) with a PCI NIC eth0 (msi_irqs,
# four TxRx queues and a misc IRQ), a virtio NIC eth1, an interface eth10
# without a device whose IRQ name starts like eth1's, an NVMe IRQ, cpufreq on cores 0-2 only, untuned sysctls,
# THP "always", an irqbalance config and a fake systemctl whose unit states
# are files. tests/host/fixtures/interrupts is its /proc/interrupts.

HOST_TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$HOST_TESTS_DIR/../.." && pwd)
FAILURES=0
PASSES=0
SKIPS=0

# Ends the test (each runs in its own subshell).
fail() {
  echo "    assertion failed: $*" >&2
  exit 1
}

assert_eq() {
  [[ $1 == "$2" ]] || fail "${3:-value}: expected '$2', got '$1'"
}

assert_contains() {
  [[ $1 == *"$2"* ]] || fail "${3:-output} does not contain '$2':"$'\n'"$1"
}

assert_not_contains() {
  [[ $1 != *"$2"* ]] || fail "${3:-output} contains '$2':"$'\n'"$1"
}

assert_file() {
  assert_eq "$(<"$1")" "$2" "$1"
}

# run_test NAME: runs the function NAME in a subshell with errexit, in a fresh
# temporary directory $WORK, and records the result. The subshell is not run
# as a condition, since bash ignores errexit inside one.
run_test() {
  local name=$1 log status
  WORK=$(mktemp -d)
  log=$WORK.log
  set +e
  (
    set -euo pipefail
    shopt -s inherit_errexit
    cd "$WORK"
    "$name"
  ) >"$log" 2>&1
  status=$?
  set -e
  if [[ $status -eq 0 && -e $WORK.skip ]]; then
    SKIPS=$((SKIPS + 1))
    echo "SKIP $name: $(<"$WORK.skip")"
  elif [[ $status -eq 0 ]]; then
    PASSES=$((PASSES + 1))
    echo "ok   $name"
  else
    FAILURES=$((FAILURES + 1))
    echo "FAIL $name"
    sed 's/^/    /' "$log"
  fi
  rm -rf "$WORK" "$log" "$WORK.skip"
}

# skip REASON: ends the test as skipped, saying why.
skip() {
  echo "$*" >"$WORK.skip"
  exit 0
}

finish_tests() {
  echo "$(basename "$0"): $PASSES passed, $FAILURES failed, $SKIPS skipped"
  [[ $FAILURES -eq 0 ]]
}

# snapshot DIR: every file's path and bytes (symlinks as their target), sorted;
# the fake systemctl's call log is left out.
snapshot() {
  (cd "$1" && find . \( -type f -o -type l \) ! -name systemctl.log -print | sort | while read -r file; do
    if [[ -L $file ]]; then
      echo "$file -> $(readlink "$file")"
    else
      echo "$file: $(cat "$file")"
    fi
  done)
}

# The same, with "[selected]" lists reduced to the selected word, as the
# kernel shows them: a fake file written with "madvise" then reads the same.
snapshot_values() {
  snapshot "$1" | sed -E 's/^([^:]*): .*\[([^]]*)\].*$/\1: \2/'
}

write() {
  mkdir -p "$(dirname "$1")"
  printf '%s\n' "$2" >"$1"
}

# make_host DIR: builds the fake host described above under DIR.
make_host() {
  local root=$1 core irq
  write "$root/sys/devices/system/cpu/online" "0-3"
  for core in 0 1 2 3; do mkdir -p "$root/sys/devices/system/cpu/cpu$core"; done
  for core in 0 1 2; do
    write "$root/sys/devices/system/cpu/cpu$core/cpufreq/scaling_governor" powersave
    write "$root/sys/devices/system/cpu/cpu$core/cpufreq/scaling_available_governors" "performance powersave"
  done
  write "$root/sys/kernel/mm/transparent_hugepage/enabled" "[always] madvise never"
  write "$root/sys/kernel/mm/transparent_hugepage/defrag" "always defer defer+madvise [madvise] never"
  make_sysctls "$root/proc/sys"
  make_nics "$root"
  cp "$HOST_TESTS_DIR/fixtures/interrupts" "$root/proc/interrupts"
  for irq in 1 39 40 41 42 43 45 50 51 52 60; do write "$root/proc/irq/$irq/smp_affinity_list" "0-3"; done
  write "$root/proc/cpuinfo" "flags		: fpu vme de pse"
  write "$root/etc/default/irqbalance" "# irqbalance settings
IRQBALANCE_ONESHOT=0
IRQBALANCE_BANNED_CPUS=00000001"
  make_systemctl "$root"
  write "$root/systemd/irqbalance.service.active" active
  write "$root/systemd/irqbalance.service.enabled" enabled
}

make_sysctls() {
  write "$1/net/core/rmem_max" 212992
  write "$1/net/core/wmem_max" 8388608 # already above the tuned value: must stay
  write "$1/net/core/rmem_default" 212992
  write "$1/net/core/netdev_max_backlog" 1000
  write "$1/net/core/somaxconn" 4096 # already tuned
  write "$1/net/core/busy_read" 0
  write "$1/net/core/busy_poll" 0
  write "$1/kernel/numa_balancing" 1
  write "$1/kernel/io_uring_disabled" 2
}

make_nics() {
  local root=$1 irq
  for irq in 39 40 41 42 43; do write "$root/sys/class/net/eth0/device/msi_irqs/$irq" msix; done
  write "$root/sys/class/net/eth0/queues/rx-0/rps_cpus" c # cores 2 and 3
  write "$root/sys/class/net/eth0/queues/rx-1/rps_cpus" 0
  mkdir -p "$root/sys/devices/virtio5" "$root/sys/class/net/eth1" "$root/sys/class/net/eth10" "$root/sys/class/net/lo"
  ln -s ../../../devices/virtio5 "$root/sys/class/net/eth1/device"
}

# A systemctl that keeps unit states in $root/systemd/UNIT.{active,enabled}
# and logs every call to $root/systemctl.log.
make_systemctl() {
  local root=$1
  mkdir -p "$root/systemd"
  cat >"$root/systemctl" <<EOF
#!/usr/bin/env bash
set -euo pipefail
dir=$root/systemd
echo "\$*" >>$root/systemctl.log
now=no
[[ \$1 == disable || \$1 == enable ]] && [[ \${2:-} == --now ]] && { now=yes; set -- "\$1" "\$3"; }
unit=\$2
[[ -e \$dir/\$unit.active ]] || { echo "Failed to get unit file state for \$unit" >&2; exit 1; }
case \$1 in
is-active) cat "\$dir/\$unit.active"; [[ \$(cat "\$dir/\$unit.active") == active ]] ;;
is-enabled) cat "\$dir/\$unit.enabled"; [[ \$(cat "\$dir/\$unit.enabled") == enabled ]] ;;
start|restart) echo active >"\$dir/\$unit.active" ;;
stop) echo inactive >"\$dir/\$unit.active" ;;
enable) echo enabled >"\$dir/\$unit.enabled"; [[ \$now == no ]] || echo active >"\$dir/\$unit.active" ;;
disable) echo disabled >"\$dir/\$unit.enabled"; [[ \$now == no ]] || echo inactive >"\$dir/\$unit.active" ;;
*) echo "fake systemctl: unknown verb \$1" >&2; exit 1 ;;
esac
EOF
  chmod +x "$root/systemctl"
}

# tune ROOT ARGS...: runs tune-host.sh against the fake host at ROOT.
tune() {
  local root
  root=$(cd "$1" && pwd)
  shift
  SYSFS_ROOT=$root/sys PROC_ROOT=$root/proc ETC_ROOT=$root/etc STATE_DIR=$root/state \
    SYSTEMCTL=${FAKE_SYSTEMCTL-$root/systemctl} bash "$REPO_DIR/scripts/tune-host.sh" "$@"
}
