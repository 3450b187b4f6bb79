#!/usr/bin/env bash
# Tests of scripts/tune-host.sh against a fake host tree (tests/host/lib.sh):
# dry-run, apply, check, undo and idempotence, both IRQ policies, and what it
# does where a setting cannot be changed. Run by scripts/test-host.sh.
set -euo pipefail
# shellcheck source=tests/host/lib.sh
source "$(dirname "$0")/lib.sh"

test_dry_run_changes_nothing_and_prints_runnable_commands() {
  # Proves: --dry-run changes no file, and its output, run as a script, is exactly the tuning (check then passes).
  make_host host
  local before output
  before=$(snapshot host)
  output=$(tune host --cores 2-3 --dry-run)
  assert_eq "$(snapshot host)" "$before" "tree after --dry-run"
  assert_contains "$output" "echo 4194304 > $WORK/host/proc/sys/net/core/rmem_max"
  assert_contains "$output" "echo performance > $WORK/host/sys/devices/system/cpu/cpu2/cpufreq/scaling_governor"
  assert_contains "$output" "$WORK/host/systemctl restart irqbalance.service"
  assert_contains "$output" "nothing was changed"
  [[ ! -e host/state ]] || fail "--dry-run created the state directory"
  bash -euo pipefail -c "$output" >/dev/null
  tune host --cores 2-3 --check >/dev/null || fail "--check fails after running the dry-run's commands"
}

test_check_fails_before_apply_and_passes_after() {
  # Proves: --check exits 1 and names each difference on an untuned host, and exits 0 once applied.
  make_host host
  local output status=0
  output=$(tune host --cores 2-3 --check) || status=$?
  assert_eq "$status" 1 "--check exit status before apply"
  assert_contains "$output" "differs  net.core.rmem_max: now 212992, tuned 4194304"
  assert_contains "$output" "differs  kernel.io_uring_disabled: now 2, tuned 0"
  assert_contains "$output" "differs  transparent hugepages enabled: now always, tuned madvise"
  assert_contains "$output" "differs  irq 40 (eth0-TxRx-0) of eth0: now 0-3, tuned 0"
  assert_not_contains "$output" "differs  net.core.wmem_max" "--check (wmem_max is already above)"
  tune host --cores 2-3 >/dev/null
  output=$(tune host --cores 2-3 --check) || fail "--check after apply exits non-zero: $output"
  assert_contains "$output" "0 setting(s) differ"
}

test_apply_sets_every_setting_and_only_on_shard_cores() {
  # Proves: apply sets each setting to its tuned value, never lowers a higher one, and leaves non-shard cores and other devices alone.
  make_host host
  local output
  output=$(tune host --cores 2-3)
  assert_file host/proc/sys/net/core/rmem_max 4194304
  assert_file host/proc/sys/net/core/rmem_default 4194304
  assert_file host/proc/sys/net/core/wmem_max 8388608
  assert_file host/proc/sys/net/core/netdev_max_backlog 16384
  assert_file host/proc/sys/net/core/somaxconn 4096
  assert_file host/proc/sys/net/core/busy_read 0
  assert_file host/proc/sys/kernel/numa_balancing 0
  assert_file host/proc/sys/kernel/io_uring_disabled 0
  assert_file host/sys/kernel/mm/transparent_hugepage/enabled madvise
  assert_file host/sys/devices/system/cpu/cpu2/cpufreq/scaling_governor performance
  assert_file host/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor powersave
  assert_file host/sys/devices/system/cpu/cpu1/cpufreq/scaling_governor powersave
  assert_contains "$output" "skipped  cpufreq governor cpu3: no cpufreq on this core"
  # housekeeping policy: queue q on housekeeping core q mod 2, the misc IRQ on both.
  assert_file host/proc/irq/40/smp_affinity_list 0
  assert_file host/proc/irq/41/smp_affinity_list 1
  assert_file host/proc/irq/42/smp_affinity_list 0
  assert_file host/proc/irq/43/smp_affinity_list 1
  assert_file host/proc/irq/39/smp_affinity_list 0-1
  assert_file host/proc/irq/51/smp_affinity_list 0
  assert_file host/proc/irq/50/smp_affinity_list 0-1
  assert_file host/proc/irq/45/smp_affinity_list 0-3 # eth10-TxRx-0 is not eth1's
  assert_file host/proc/irq/60/smp_affinity_list 0-3 # nvme: not a NIC
  assert_file host/sys/class/net/eth0/queues/rx-0/rps_cpus 0
  assert_file host/etc/default/irqbalance "# irqbalance settings
IRQBALANCE_ONESHOT=0
IRQBALANCE_BANNED_CPULIST=2-3"
  assert_contains "$(<host/systemctl.log)" "restart irqbalance.service"
  assert_file host/etc/security/limits.d/90-shardgate-memlock.conf "# Written by shardgate's scripts/tune-host.sh: glommio locks io_uring memory.
shardgate soft memlock unlimited
shardgate hard memlock unlimited"
  assert_not_contains "$output" "eth10"
}

test_second_apply_changes_nothing() {
  # Proves: running apply twice changes nothing the second time: same tree, same state file, no service touched.
  make_host host
  tune host --cores 2-3 >/dev/null
  local before output
  before=$(snapshot host)
  : >host/systemctl.log
  output=$(tune host --cores 2-3)
  assert_eq "$(snapshot host)" "$before" "tree after the second apply"
  assert_contains "$output" "changed 0 setting(s)"
  assert_not_contains "$output" "changed  "
  assert_not_contains "$(<host/systemctl.log)" "restart"
}

test_undo_restores_the_originals() {
  # Proves: --undo puts back every value and file apply changed (and removes files it created), then forgets the state.
  make_host host
  local before output
  before=$(snapshot_values host)
  tune host --cores 2-3 >/dev/null
  tune host --cores 2-3 >/dev/null
  output=$(tune host --undo)
  assert_contains "$output" "restored $WORK/host/proc/sys/net/core/rmem_max: 212992"
  assert_eq "$(snapshot_values host)" "$before" "tree after --undo"
  [[ ! -e host/state ]] || fail "the state directory survived --undo"
  assert_contains "$(tune host --undo)" "nothing to undo"
}

test_shard_local_puts_queues_on_shard_cores_and_stops_irqbalance() {
  # Proves: --irq-policy shard-local maps RSS queue q to shard core q mod N, turns on busy polling, stops irqbalance, and undo restarts it.
  make_host host
  local output
  output=$(tune host --cores 2-3 --nic eth0 --irq-policy shard-local)
  assert_file host/proc/irq/40/smp_affinity_list 2
  assert_file host/proc/irq/41/smp_affinity_list 3
  assert_file host/proc/irq/42/smp_affinity_list 2
  assert_file host/proc/irq/43/smp_affinity_list 3
  assert_file host/proc/irq/39/smp_affinity_list 0-1
  assert_file host/proc/irq/51/smp_affinity_list 0-3 # eth1 not named
  assert_file host/proc/sys/net/core/busy_read 50
  assert_file host/proc/sys/net/core/busy_poll 50
  assert_file host/systemd/irqbalance.service.active inactive
  assert_file host/systemd/irqbalance.service.enabled disabled
  tune host --cores 2-3 --nic eth0 --irq-policy shard-local --check >/dev/null || fail "--check fails after a shard-local apply"
  tune host --undo >/dev/null
  assert_file host/systemd/irqbalance.service.active active
  assert_file host/systemd/irqbalance.service.enabled enabled
  assert_file host/proc/irq/40/smp_affinity_list 0-3
}

test_shard_local_notes_fewer_queues_than_cores() {
  # Proves: a NIC with fewer RSS queues than shard cores is reported, with the command that adds queues.
  make_host host
  local output
  output=$(tune host --cores 1-3 --nic eth1 --irq-policy shard-local --dry-run)
  assert_contains "$output" "1 RSS queue(s) for 3 shard cores"
  assert_contains "$output" "echo 1 > $WORK/host/proc/irq/51/smp_affinity_list"
}

test_what_cannot_be_changed_is_skipped_not_fatal() {
  # Proves: a missing NIC, cpufreq, THP, NUMA balancing, io_uring switch, or an IRQ the kernel will not move is reported and skipped, exit 0.
  make_host host
  rm -rf host/sys/devices/system/cpu/cpu*/cpufreq host/sys/kernel/mm/transparent_hugepage \
    host/proc/sys/kernel/numa_balancing host/proc/sys/kernel/io_uring_disabled
  rm host/proc/irq/40/smp_affinity_list
  ln -s /dev/null host/proc/irq/40/smp_affinity_list
  local output
  output=$(tune host --cores 2-3 --nic nosuch0 --nic lo --nic eth0) || fail "apply failed: $output"
  assert_contains "$output" "skipped  nic nosuch0: no such interface"
  assert_contains "$output" "skipped  nic lo: a virtual interface without a device"
  assert_contains "$output" "skipped  cpufreq governor cpu2: no cpufreq"
  assert_contains "$output" "skipped  transparent hugepages enabled: this kernel has no transparent hugepages"
  assert_contains "$output" "skipped  kernel.numa_balancing"
  assert_contains "$output" "skipped  kernel.io_uring_disabled: kernels before 6.6 have no switch"
  assert_contains "$output" "skipped  irq 40 (eth0-TxRx-0) of eth0: $WORK/host/proc/irq/40/smp_affinity_list holds no core list"
  assert_file host/proc/irq/41/smp_affinity_list 1
}

test_irqbalance_without_systemd_is_reported() {
  # Proves: with no systemd, a running irqbalance is reported as a difference and not touched.
  make_host host
  write host/proc/4242/comm irqbalance
  local output status=0
  output=$(FAKE_SYSTEMCTL="" tune host --cores 2-3 --check) || status=$?
  assert_eq "$status" 1 "--check exit status"
  assert_contains "$output" "irqbalance: runs as pid 4242 but systemd does not"
  assert_contains "$output" "systemd is not running here"
  FAKE_SYSTEMCTL="" tune host --cores 2-3 >/dev/null
  [[ ! -e host/systemctl.log ]] || fail "systemctl was called without systemd"
}

test_bad_arguments_fail_clearly() {
  # Proves: wrong arguments exit 2 with a message naming the problem, before anything changes.
  make_host host
  local before output status
  before=$(snapshot host)
  for args in "--cores 7" "--cores x" "" "--cores 2 --dry-run --check" "--cores 2 --irq-policy shard-local" \
    "--cores 2 --irq-policy other" "--cores 2 --bogus"; do
    status=0
    # shellcheck disable=SC2086 # the arguments are split on purpose
    output=$(tune host $args 2>&1) || status=$?
    assert_eq "$status" 2 "exit status of '$args'"
    assert_contains "$output" "tune-host: "
  done
  assert_contains "$(tune host --cores 7 2>&1 || true)" "core 7 is not online (online: 0-3)"
  assert_contains "$(tune host --cores 2 --irq-policy shard-local 2>&1 || true)" "needs --nic"
  assert_eq "$(snapshot host)" "$before" "tree after bad arguments"
  assert_contains "$(tune host --help)" "--irq-policy housekeeping"
}

test_all_cores_for_shards_leaves_irqs_alone() {
  # Proves: when --cores covers every online core there is nowhere to move IRQs, which is reported, and nothing else breaks.
  make_host host
  local output
  output=$(tune host --cores 0-3)
  assert_contains "$output" "skipped  nic irqs: every online core is a shard core"
  assert_file host/proc/irq/40/smp_affinity_list 0-3
  assert_file host/proc/sys/net/core/rmem_max 4194304
}

for test in $(declare -F | awk '$3 ~ /^test_/ { print $3 }'); do
  run_test "$test"
done
finish_tests
