#!/usr/bin/env bash
# tune-host.sh: tunes a dedicated Linux host for shardgate's shard cores, and
# checks or undoes that tuning.
#
# Why: shardgate runs one shard per reserved core and answers within 5 ms at
# p99.9. Interrupts, frequency scaling, NUMA page migration, THP compaction and
# small socket buffers each cost milliseconds on such a core. This script sets
# every host knob that matters, reports the ones it cannot set (no such NIC, a
# VM without cpufreq) and skips them, and never touches a core outside --cores
# except to move work off the shard cores.
#
# Every /sys, /proc and /etc path goes through SYSFS_ROOT, PROC_ROOT and
# ETC_ROOT, and the saved originals live in STATE_DIR, so tests run it against a
# fake host tree (tests/host/). Run `scripts/tune-host.sh --help` for details.
set -euo pipefail

SYSFS_ROOT=${SYSFS_ROOT:-/sys}
PROC_ROOT=${PROC_ROOT:-/proc}
ETC_ROOT=${ETC_ROOT:-/etc}
STATE_DIR=${STATE_DIR:-/var/lib/shardgate-tune-host}
STATE_FILE=$STATE_DIR/state

# Tuned values, with the reason in --help.
UDP_BUFFER_BYTES=4194304 # what shardgate asks for per UDP socket (limits.rs)
NETDEV_MAX_BACKLOG=16384
SOMAXCONN=4096
BUSY_POLL_US=50
THP_MODE=madvise
THP_DEFRAG=madvise
MEMLOCK_FILE_NAME=90-shardgate-memlock.conf

MODE=apply
POLICY=housekeeping
SERVICE_USER=shardgate
CORES=()
HOUSEKEEPING=()
NICS=()
CHANGED=0
DIFFERS=0
SKIPPED=0
ALREADY=0

usage() {
  cat <<EOF
usage: scripts/tune-host.sh --cores LIST [--nic IFACE ...] [--irq-policy housekeeping|shard-local]
                            [--user NAME] [--dry-run | --check | --undo]

Tunes this host for shardgate shards on the cores in LIST (e.g. 2-7 or 1,3),
the rest of the online cores being housekeeping cores.

Modes:
  (none)      apply: change what differs, saving each original value first in
              \$STATE_DIR/state; a second run changes nothing.
  --dry-run   print every change as the exact shell command it would run (the
              output is a script); change nothing. Other lines start with '#'.
  --check     print each setting that differs from the tuned state; exit 1 if
              any does, 0 if none.
  --undo      restore every value saved in the state file, then remove it.

Settings, and why:
  kernel.io_uring_disabled = 0
      shardgate's executors are io_uring; 1 or 2 makes it fail at start.
  net.core.rmem_max, net.core.wmem_max >= $UDP_BUFFER_BYTES
      shardgate asks for 4 MiB UDP buffers; the kernel caps them here. A
      burst of 120k frames/s during a 20 ms stall needs ~250 KiB; 4 MiB
      leaves room for much worse instead of dropping datagrams.
  net.core.rmem_default >= $UDP_BUFFER_BYTES
      the same buffer for sockets that do not size their own (clients and
      tools on this host, and shardgate if its setsockopt is refused).
  net.core.netdev_max_backlog >= $NETDEV_MAX_BACKLOG
      packets queued per core between the NIC and the protocol layer; the
      default 1000 drops bursts when softirq processing is late.
  net.core.somaxconn >= $SOMAXCONN
      TCP accept queue: game servers reconnecting together after a restart.
  net.core.busy_read, net.core.busy_poll = $BUSY_POLL_US (shard-local only)
      a shard's socket read polls its NIC queue for up to ${BUSY_POLL_US} us before
      sleeping, skipping an interrupt and a wake-up. Only with shard-local,
      where the queue is served on the shard's own core; under housekeeping
      the values are left as they are (busy polling would spin a shard core
      on a queue another core serves).
  kernel.numa_balancing = 0
      automatic NUMA balancing unmaps pages to sample them; each fault is a
      stall on a shard. Absent on kernels without NUMA balancing.
  transparent hugepages: enabled = $THP_MODE, defrag = $THP_DEFRAG
      'always' compacts memory in the page-fault path (millisecond stalls)
      and Redis warns about it; 'madvise' keeps huge pages for programs that
      ask for them.
  cpufreq governor = performance on each --cores core
      no frequency ramp-up after an idle moment. Skipped where there is no
      cpufreq (most virtual machines) or no 'performance' governor.
  NIC interrupts (--nic IFACE, repeatable; default with housekeeping: every
  interface that has a device, i.e. not lo, bridges, veth):
      each IRQ of the NIC found in msi_irqs or named after it (or after its
      virtio device) in /proc/interrupts. An IRQ whose name ends in a queue
      number (TxRx-3, rx-3, input.3, comp3) is an RSS queue q.
      --irq-policy housekeeping (default): an IRQ whose affinity includes a
          shard core is moved: queue q to housekeeping core q mod H, others
          to all housekeeping cores. IRQs already off the shard cores are
          left alone. Shards are never interrupted by packet processing.
      --irq-policy shard-local: queue q goes to shard core q mod N (RSS then
          spreads receive work over the shard cores); non-queue IRQs move off
          the shard cores. Needs --nic. The kernel's SO_REUSEPORT hash, not
          RSS, picks the shard that reads a flow, so this spreads softirq
          work; it does not make every packet's path core-local.
      RPS (queues/rx-N/rps_cpus) that steers packets onto a shard core is
      turned off (0): the IRQ's own core then processes them.
  irqbalance
      housekeeping: IRQBALANCE_BANNED_CPULIST=<cores> in its config
      (/etc/default/irqbalance, or /etc/sysconfig/irqbalance), then a restart
      if it runs, so it never moves an IRQ onto a shard core.
      shard-local: stopped and disabled, since it would move the NIC queues
      back off the banned shard cores. Managed through systemctl when systemd
      runs; an irqbalance running without systemd is reported, not touched.
  RLIMIT_MEMLOCK: /etc/security/limits.d/$MEMLOCK_FILE_NAME
      'NAME soft/hard memlock unlimited' for --user NAME (default
      shardgate), for shardgate started from a login session; glommio locks
      io_uring memory, which kernels before 5.12 count against this limit.
      Under systemd the unit's LimitMEMLOCK=infinity applies instead.

Limits:
  Values in /proc and /sys last until reboot (the limits.d and irqbalance
  files persist): run this again at boot, before shardgate starts. A NIC
  driver reload resets IRQ affinity too. It does not change the RSS
  indirection table or the queue count (ethtool -X/-L), XPS, isolcpus or
  nohz_full (boot parameters), or IRQs of other devices.

Environment (for tests and unusual hosts):
  SYSFS_ROOT=/sys PROC_ROOT=/proc ETC_ROOT=/etc
  STATE_DIR=/var/lib/shardgate-tune-host   where originals are saved
  SYSTEMCTL=systemctl   used only when systemd runs (/run/systemd/system);
                        set it to a command to force it, or empty to skip
                        services.

Exit: 0 done (skipped settings included); 1 --check found differences;
2 bad arguments.
EOF
}

die() {
  echo "tune-host: $*" >&2
  exit 2
}

# --- core lists -------------------------------------------------------------

# "0-2,5" -> "0 1 2 5" (sorted, unique). Fails on anything else.
expand_list() {
  local text=$1 part first last core parts=() out=()
  [[ -n $text ]] || return 1
  IFS=, read -r -a parts <<<"$text"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
      first=$((10#${BASH_REMATCH[1]})) last=$((10#${BASH_REMATCH[2]}))
    elif [[ $part =~ ^[0-9]+$ ]]; then
      first=$((10#$part)) last=$first
    else
      return 1
    fi
    ((first <= last)) || return 1
    for ((core = first; core <= last; core++)); do out+=("$core"); done
  done
  printf '%s\n' "${out[@]}" | sort -n -u | tr '\n' ' ' | sed 's/ $//'
}

# "0 1 2 5" -> "0-2,5".
compress_list() {
  local text="" start="" prev="" core
  for core in $1; do
    if [[ -n $prev && $core -eq $((prev + 1)) ]]; then
      prev=$core
      continue
    fi
    [[ -n $start ]] && text+="$(range_text "$start" "$prev"),"
    start=$core prev=$core
  done
  [[ -n $start ]] && text+="$(range_text "$start" "$prev")"
  echo "$text"
}

range_text() {
  if [[ $1 -eq $2 ]]; then echo "$1"; else echo "$1-$2"; fi
}

# Whether the expanded list $2 holds any core of CORES.
has_shard_core() {
  local core
  for core in $1; do
    if is_shard_core "$core"; then return 0; fi
  done
  return 1
}

is_shard_core() {
  local core
  for core in "${CORES[@]}"; do
    [[ $core -eq $1 ]] && return 0
  done
  return 1
}

# --- reporting --------------------------------------------------------------

# In --dry-run, everything but the commands is a comment, so the output runs.
note() {
  if [[ $MODE == dry-run ]]; then echo "# $*"; else echo "$*"; fi
}

report_ok() {
  ALREADY=$((ALREADY + 1))
  note "ok       $1: $2"
}

report_skip() {
  SKIPPED=$((SKIPPED + 1))
  note "skipped  $1: $2"
}

# --- the state file ---------------------------------------------------------

# save_state KIND KEY VALUE: remembers an original once; later runs keep it.
save_state() {
  local kind=$1 key=$2 value=$3
  if [[ -f $STATE_FILE ]] && awk -F'\t' -v k="$kind" -v p="$key" '$1 == k && $2 == p { found = 1 } END { exit !found }' "$STATE_FILE"; then
    return 0
  fi
  mkdir -p "$STATE_DIR" || return 1
  printf '%s\t%s\t%s\n' "$kind" "$key" "$value" >>"$STATE_FILE"
}

# Backs up a file before its first change: KEY is its path.
save_file_state() {
  local path=$1 backup
  if [[ ! -e $path ]]; then
    save_state file "$path" absent
    return
  fi
  mkdir -p "$STATE_DIR/files" || return 1
  backup=$STATE_DIR/files/$(echo "$path" | tr '/' '_')
  [[ -e $backup ]] || cp -p "$path" "$backup" || return 1
  save_state file "$path" "$backup"
}

# --- one value in /proc or /sys ---------------------------------------------

# Reads a value; for a "[selected]" list (THP) only the selected word.
read_value() {
  local text
  text=$(<"$1")
  if [[ $text =~ \[([^]]*)\] ]]; then text=${BASH_REMATCH[1]}; fi
  echo "$text"
}

# satisfied COMPARE CURRENT WANTED
satisfied() {
  case $1 in
  at-least) [[ $2 =~ ^[0-9]+$ ]] && (($2 >= $3)) ;;
  cpus) [[ "$(expand_list "$2" 2>/dev/null || echo "$2")" == "$(expand_list "$3")" ]] ;;
  *) [[ $2 == "$3" ]] ;;
  esac
}

# tune_value LABEL PATH WANTED COMPARE WHY_ABSENT
# Brings one file to WANTED in the current mode; COMPARE is exact, at-least or cpus.
tune_value() {
  local label=$1 path=$2 wanted=$3 compare=$4 why_absent=$5 current
  if [[ ! -e $path ]]; then
    report_skip "$label" "$why_absent ($path absent)"
    return
  fi
  if ! current=$(read_value "$path" 2>/dev/null); then
    report_skip "$label" "cannot read $path"
    return
  fi
  if satisfied "$compare" "$current" "$wanted"; then
    report_ok "$label" "$current"
    return
  fi
  change_value "$label" "$path" "$current" "$wanted"
}

change_value() {
  local label=$1 path=$2 current=$3 wanted=$4 error after
  case $MODE in
  check)
    DIFFERS=$((DIFFERS + 1))
    echo "differs  $label: now $current, tuned $wanted"
    ;;
  dry-run)
    CHANGED=$((CHANGED + 1))
    echo "# $label: $current -> $wanted"
    echo "echo $wanted > $path"
    ;;
  apply)
    if ! save_state value "$path" "$current" 2>/dev/null; then
      report_skip "$label" "cannot save the original in $STATE_FILE, so not changed"
      return
    fi
    if ! error=$({ echo "$wanted" >"$path"; } 2>&1); then
      report_skip "$label" "cannot write $path: ${error##*: }"
      return
    fi
    after=$(read_value "$path" 2>/dev/null || true)
    if [[ $after != "$wanted" ]] && ! satisfied cpus "$after" "$wanted"; then
      report_skip "$label" "wrote $wanted but the kernel kept $after"
      return
    fi
    CHANGED=$((CHANGED + 1))
    echo "changed  $label: $current -> $wanted"
    ;;
  esac
}

# --- one whole file under /etc ----------------------------------------------

# tune_file LABEL PATH CONTENT: PATH must hold exactly CONTENT. Sets
# LAST_FILE_CHANGED to yes when it changed it (or would, under --dry-run).
tune_file() {
  local label=$1 path=$2 content=$3
  LAST_FILE_CHANGED=no
  if [[ -f $path && "$(<"$path")" == "$content" ]]; then
    report_ok "$label" "$path up to date"
    return
  fi
  case $MODE in
  check)
    DIFFERS=$((DIFFERS + 1))
    if [[ -e $path ]]; then
      echo "differs  $label: $path has other content"
    else
      echo "differs  $label: $path is missing"
    fi
    ;;
  dry-run)
    CHANGED=$((CHANGED + 1)) LAST_FILE_CHANGED=yes
    echo "# $label: write $path"
    echo "mkdir -p $(dirname "$path") && cat > $path <<'EOF'"
    echo "$content"
    echo "EOF"
    ;;
  apply) write_file "$label" "$path" "$content" ;;
  esac
}

write_file() {
  local label=$1 path=$2 content=$3
  if ! save_file_state "$path" 2>/dev/null; then
    report_skip "$label" "cannot save the original in $STATE_DIR, so not changed"
  elif ! mkdir -p "$(dirname "$path")" 2>/dev/null || ! { echo "$content" >"$path"; } 2>/dev/null; then
    report_skip "$label" "cannot write $path"
  else
    CHANGED=$((CHANGED + 1)) LAST_FILE_CHANGED=yes
    echo "changed  $label: wrote $path"
  fi
}

# --- services -----------------------------------------------------------------

systemctl_usable() {
  [[ -n $SYSTEMCTL ]]
}

# run_service ARGS...: systemctl, or its command line under --dry-run.
run_service() {
  if [[ $MODE == dry-run ]]; then
    echo "$SYSTEMCTL_SHOWN $*"
    return 0
  fi
  $SYSTEMCTL "$@" >/dev/null 2>&1
}

service_state() {
  local active enabled
  active=$($SYSTEMCTL is-active "$1" 2>/dev/null || true)
  enabled=$($SYSTEMCTL is-enabled "$1" 2>/dev/null || true)
  echo "${active:-unknown} ${enabled:-unknown}"
}

# --- the settings -------------------------------------------------------------

tune_sysctls() {
  local why="not in this kernel"
  tune_value kernel.io_uring_disabled "$PROC_ROOT/sys/kernel/io_uring_disabled" 0 exact \
    "kernels before 6.6 have no switch, so io_uring is allowed"
  tune_value net.core.rmem_max "$PROC_ROOT/sys/net/core/rmem_max" "$UDP_BUFFER_BYTES" at-least "$why"
  tune_value net.core.wmem_max "$PROC_ROOT/sys/net/core/wmem_max" "$UDP_BUFFER_BYTES" at-least "$why"
  tune_value net.core.rmem_default "$PROC_ROOT/sys/net/core/rmem_default" "$UDP_BUFFER_BYTES" at-least "$why"
  tune_value net.core.netdev_max_backlog "$PROC_ROOT/sys/net/core/netdev_max_backlog" "$NETDEV_MAX_BACKLOG" at-least "$why"
  tune_value net.core.somaxconn "$PROC_ROOT/sys/net/core/somaxconn" "$SOMAXCONN" at-least "$why"
  if [[ $POLICY == shard-local ]]; then
    tune_value net.core.busy_read "$PROC_ROOT/sys/net/core/busy_read" "$BUSY_POLL_US" exact "$why (no busy polling)"
    tune_value net.core.busy_poll "$PROC_ROOT/sys/net/core/busy_poll" "$BUSY_POLL_US" exact "$why (no busy polling)"
  else
    note "ok       net.core.busy_read, net.core.busy_poll: left as they are under --irq-policy housekeeping"
  fi
  tune_value kernel.numa_balancing "$PROC_ROOT/sys/kernel/numa_balancing" 0 exact \
    "this kernel has no automatic NUMA balancing to turn off"
}

tune_thp() {
  local dir=$SYSFS_ROOT/kernel/mm/transparent_hugepage why="this kernel has no transparent hugepages"
  tune_value "transparent hugepages enabled" "$dir/enabled" "$THP_MODE" exact "$why"
  tune_value "transparent hugepages defrag" "$dir/defrag" "$THP_DEFRAG" exact "$why"
}

tune_governors() {
  local core dir available
  for core in "${CORES[@]}"; do
    dir=$SYSFS_ROOT/devices/system/cpu/cpu$core/cpufreq
    if [[ ! -e $dir/scaling_governor ]]; then
      report_skip "cpufreq governor cpu$core" "no cpufreq on this core (virtual machine, or no cpufreq driver): the frequency is not ours to set"
      continue
    fi
    available=$(cat "$dir/scaling_available_governors" 2>/dev/null || echo performance)
    if [[ " $available " != *" performance "* ]]; then
      report_skip "cpufreq governor cpu$core" "no 'performance' governor (available: $available)"
      continue
    fi
    tune_value "cpufreq governor cpu$core" "$dir/scaling_governor" performance exact "no cpufreq"
  done
}

# Prints "IRQ NAME" for each interrupt of IFACE.
nic_irqs() {
  local iface=$1 device msi="" virtio="" file
  device=$SYSFS_ROOT/class/net/$iface/device
  if [[ -d $device/msi_irqs ]]; then
    for file in "$device"/msi_irqs/*; do
      [[ -e $file ]] && msi+=" ${file##*/}"
    done
  fi
  if [[ -L $device ]]; then
    virtio=$(basename "$(readlink "$device")")
    [[ $virtio =~ ^virtio[0-9]+$ ]] || virtio=""
  fi
  [[ -r $PROC_ROOT/interrupts ]] || return 0
  awk -v iface="$iface" -v msi="$msi " -v virtio="$virtio" '
    $1 ~ /^[0-9]+:$/ {
      irq = substr($1, 1, length($1) - 1); name = $NF
      if (index(msi, " " irq " ") || name == iface || index(name, iface "-") == 1 ||
          index(name, "-" iface "-") || (virtio != "" && index(name, virtio "-") == 1))
        print irq, name
    }' "$PROC_ROOT/interrupts"
}

# The RSS queue number in an IRQ name, or nothing for a non-queue IRQ.
queue_of() {
  local name=${1,,}
  if [[ $name =~ (txrx|rx|tx|input|output|comp|fp|queue)[-._]?([0-9]+) ]]; then
    echo "$((10#${BASH_REMATCH[2]}))"
  fi
}

# The affinity IRQ should have, given its current list, or the current list.
wanted_affinity() {
  local queue=$1 current=$2
  if [[ $POLICY == shard-local && -n $queue ]]; then
    echo "${CORES[queue % ${#CORES[@]}]}"
  elif ! has_shard_core "$current"; then
    compress_list "$current"
  elif [[ -n $queue ]]; then
    echo "${HOUSEKEEPING[queue % ${#HOUSEKEEPING[@]}]}"
  else
    compress_list "${HOUSEKEEPING[*]}"
  fi
}

tune_nic() {
  local iface=$1 irq name queue path current queues=0 lines
  if [[ ! -e $SYSFS_ROOT/class/net/$iface ]]; then
    report_skip "nic $iface" "no such interface"
    return
  fi
  if [[ ! -e $SYSFS_ROOT/class/net/$iface/device ]]; then
    report_skip "nic $iface" "a virtual interface without a device: no IRQs of its own"
    return
  fi
  lines=$(nic_irqs "$iface")
  if [[ -z $lines ]]; then
    report_skip "nic $iface" "no IRQ of it found in msi_irqs or $PROC_ROOT/interrupts"
  fi
  while read -r irq name; do
    [[ -n $irq ]] || continue
    queue=$(queue_of "$name")
    [[ -n $queue ]] && queues=$((queues > queue ? queues : queue + 1))
    path=$PROC_ROOT/irq/$irq/smp_affinity_list
    if [[ ! -e $path ]]; then
      report_skip "irq $irq ($name)" "$path absent"
      continue
    fi
    current=$(expand_list "$(read_value "$path")" 2>/dev/null || true)
    if [[ -z $current ]]; then
      report_skip "irq $irq ($name) of $iface" "$path holds no core list"
      continue
    fi
    tune_value "irq $irq ($name) of $iface" "$path" "$(wanted_affinity "$queue" "$current")" cpus "absent"
  done <<<"$lines"
  if [[ $POLICY == shard-local && $queues -gt 0 && $queues -lt ${#CORES[@]} ]]; then
    note "note     nic $iface: $queues RSS queue(s) for ${#CORES[@]} shard cores; cores past the first $queues get none (ethtool -L $iface combined ${#CORES[@]} adds queues)"
  fi
  tune_rps "$iface"
}

# RPS that steers packets onto a shard core is turned off.
tune_rps() {
  local file mask
  for file in "$SYSFS_ROOT/class/net/$1"/queues/rx-*/rps_cpus; do
    [[ -e $file ]] || continue
    mask=$(<"$file")
    if mask_has_shard_core "$mask"; then
      change_value "rps $1 $(basename "$(dirname "$file")")" "$file" "$mask" 0
    else
      report_ok "rps $1 $(basename "$(dirname "$file")")" "$mask (no shard core)"
    fi
  done
}

# Whether a hex CPU mask like "ff,0000000f" has a bit of a shard core set.
mask_has_shard_core() {
  local hex=${1//,/} core digit
  for core in "${CORES[@]}"; do
    ((core / 4 < ${#hex})) || continue
    digit=${hex:${#hex}-1-core/4:1}
    (((16#$digit >> (core % 4)) & 1)) && return 0
  done
  return 1
}

tune_nics() {
  local iface
  if [[ ${#HOUSEKEEPING[@]} -eq 0 ]]; then
    report_skip "nic irqs" "every online core is a shard core: no housekeeping core to move interrupts to"
    return
  fi
  if [[ ${#NICS[@]} -eq 0 ]]; then
    for iface in "$SYSFS_ROOT"/class/net/*; do
      [[ -e $iface/device ]] && NICS+=("${iface##*/}")
    done
    note "nics     no --nic given, so every interface with a device: ${NICS[*]:-none}"
  fi
  for iface in "${NICS[@]}"; do tune_nic "$iface"; done
}

irqbalance_config() {
  if [[ -e $ETC_ROOT/sysconfig/irqbalance ]]; then
    echo "$ETC_ROOT/sysconfig/irqbalance"
  else
    echo "$ETC_ROOT/default/irqbalance"
  fi
}

# The pid of an irqbalance process, if one runs.
irqbalance_pid() {
  local comm
  for comm in "$PROC_ROOT"/[0-9]*/comm; do
    [[ -r $comm && "$(<"$comm")" == irqbalance ]] || continue
    comm=${comm%/comm}
    echo "${comm##*/}"
    return
  done
}

tune_irqbalance() {
  local config pid state
  config=$(irqbalance_config)
  pid=$(irqbalance_pid 2>/dev/null || true)
  if ! systemctl_usable; then
    if [[ -n $pid ]]; then
      DIFFERS=$((DIFFERS + 1))
      report_skip irqbalance "runs as pid $pid but systemd does not: stop it yourself (it may move IRQs onto shard cores)"
    elif [[ ! -e $config ]]; then
      report_ok irqbalance "not running, not configured (no systemd, no $config)"
      return
    fi
  else
    state=$(service_state irqbalance.service)
    if [[ $state == *"unknown" && ! -e $config ]]; then
      report_ok irqbalance "not installed"
      return
    fi
  fi
  if [[ $POLICY == shard-local ]]; then
    stop_irqbalance "${state:-}"
  elif [[ ${#HOUSEKEEPING[@]} -eq 0 ]]; then
    report_skip irqbalance "every online core is a shard core; nothing to ban it to"
  else
    ban_irqbalance "$config" "${state:-}"
  fi
}

ban_irqbalance() {
  local config=$1 state=$2 content=""
  if [[ -e $config ]]; then
    content=$(grep -v -E '^[[:space:]]*IRQBALANCE_BANNED_(CPULIST|CPUS)=' "$config" || true)
    content+=$'\n'
  fi
  content+="IRQBALANCE_BANNED_CPULIST=$(compress_list "${CORES[*]}")"
  tune_file "irqbalance banned cores" "$config" "$content"
  if [[ $LAST_FILE_CHANGED == yes && $state == active* ]]; then
    restart_irqbalance
  fi
}

restart_irqbalance() {
  if [[ $MODE == apply ]]; then save_state restart irqbalance.service - 2>/dev/null || true; fi
  if ! run_service restart irqbalance.service; then
    report_skip irqbalance "systemctl restart failed: it still runs with its old banned cores"
  elif [[ $MODE == apply ]]; then
    echo "changed  irqbalance: restarted to read the banned cores"
  fi
}

stop_irqbalance() {
  local state=$1
  if [[ $state != active* && $state != *" enabled" ]]; then
    report_ok irqbalance "stopped and not enabled"
    return
  fi
  case $MODE in
  check)
    DIFFERS=$((DIFFERS + 1))
    echo "differs  irqbalance: $state; shard-local needs it stopped and disabled"
    ;;
  dry-run)
    CHANGED=$((CHANGED + 1))
    echo "# irqbalance: $state -> inactive disabled"
    run_service disable --now irqbalance.service
    ;;
  apply)
    if ! save_state service irqbalance.service "$state" 2>/dev/null; then
      report_skip irqbalance "cannot save its state in $STATE_FILE, so not stopped"
    elif ! run_service disable --now irqbalance.service; then
      report_skip irqbalance "systemctl disable --now irqbalance.service failed"
    else
      CHANGED=$((CHANGED + 1))
      echo "changed  irqbalance: $state -> stopped and disabled"
    fi
    ;;
  esac
}

tune_memlock() {
  local path=$ETC_ROOT/security/limits.d/$MEMLOCK_FILE_NAME content
  content="# Written by shardgate's scripts/tune-host.sh: glommio locks io_uring memory.
$SERVICE_USER soft memlock unlimited
$SERVICE_USER hard memlock unlimited"
  tune_file "RLIMIT_MEMLOCK for $SERVICE_USER" "$path" "$content"
}

# --- undo ---------------------------------------------------------------------

undo() {
  local kind key value
  if [[ ! -f $STATE_FILE ]]; then
    echo "nothing to undo: no $STATE_FILE"
    return
  fi
  while IFS=$'\t' read -r kind key value; do
    case $kind in
    value) restore_value "$key" "$value" ;;
    file) restore_file "$key" "$value" ;;
    esac
  done < <(tac "$STATE_FILE")
  while IFS=$'\t' read -r kind key value; do
    case $kind in
    service) restore_service "$key" "$value" ;;
    restart) restore_restart "$key" ;;
    esac
  done <"$STATE_FILE"
  rm -rf "$STATE_DIR"
  echo "undone: restored $CHANGED value(s), skipped $SKIPPED; removed $STATE_DIR"
}

restore_value() {
  if { echo "$2" >"$1"; } 2>/dev/null; then
    CHANGED=$((CHANGED + 1))
    echo "restored $1: $2"
  else
    report_skip "$1" "cannot write $2 back"
  fi
}

restore_file() {
  if [[ $2 == absent ]]; then
    rm -f "$1" && echo "restored $1: removed (it did not exist)"
  elif cp -p "$2" "$1"; then
    echo "restored $1: from $2"
  else
    report_skip "$1" "cannot copy $2 back"
    return
  fi
  CHANGED=$((CHANGED + 1))
}

restore_service() {
  local unit=$1 state=$2
  if ! systemctl_usable; then
    report_skip "$unit" "no systemd to restore '$state' with"
    return
  fi
  if [[ $state == *" enabled" ]]; then run_service enable "$unit" || true; fi
  if [[ $state == active* ]]; then run_service start "$unit" || true; fi
  CHANGED=$((CHANGED + 1))
  echo "restored $unit: $state"
}

restore_restart() {
  if systemctl_usable && [[ "$(service_state "$1")" == active* ]]; then
    run_service restart "$1" || true
    echo "restored $1: restarted to reread its config"
  fi
}

# --- main ---------------------------------------------------------------------

parse_args() {
  local cores_text=""
  while [[ $# -gt 0 ]]; do
    case $1 in
    --cores) cores_text=${2:?--cores needs a LIST}; shift ;;
    --nic) NICS+=("${2:?--nic needs an IFACE}"); shift ;;
    --irq-policy) POLICY=${2:?--irq-policy needs housekeeping or shard-local}; shift ;;
    --user) SERVICE_USER=${2:?--user needs a NAME}; shift ;;
    --dry-run) set_mode dry-run ;;
    --check) set_mode check ;;
    --undo) set_mode undo ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [[ $POLICY == housekeeping || $POLICY == shard-local ]] ||
    die "--irq-policy '$POLICY' must be housekeeping or shard-local"
  [[ $SERVICE_USER =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user '$SERVICE_USER' is not a user name"
  [[ $MODE == undo ]] && return
  [[ -n $cores_text ]] || die "--cores LIST is required, e.g. --cores 2-7 (see --help)"
  resolve_cores "$cores_text"
  [[ $POLICY == housekeeping || ${#NICS[@]} -gt 0 ]] ||
    die "--irq-policy shard-local needs --nic IFACE: the NIC whose queues go onto the shard cores"
}

set_mode() {
  [[ $MODE == apply ]] || die "--dry-run, --check and --undo exclude each other"
  MODE=$1
}

# Checks --cores against the online cores; the rest are housekeeping.
resolve_cores() {
  local list online core
  list=$(expand_list "$1") || die "--cores '$1' must be a list of cores or ranges, e.g. 1 or 2-7 or 1,3"
  online=$(expand_list "$(<"$SYSFS_ROOT/devices/system/cpu/online")") ||
    die "cannot read the online cores from $SYSFS_ROOT/devices/system/cpu/online"
  read -r -a CORES <<<"$list"
  for core in "${CORES[@]}"; do
    [[ " $online " == *" $core "* ]] || die "--cores: core $core is not online (online: $(compress_list "$online"))"
  done
  for core in $online; do
    is_shard_core "$core" || HOUSEKEEPING+=("$core")
  done
}

pick_systemctl() {
  if [[ -n ${SYSTEMCTL+set} ]]; then
    SYSTEMCTL_SHOWN=${SYSTEMCTL:-systemctl}
    return
  fi
  SYSTEMCTL=""
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then SYSTEMCTL=systemctl; fi
  SYSTEMCTL_SHOWN=systemctl
}

# Says up front what a virtual machine or a container cannot tune.
report_host() {
  if grep -q -w hypervisor "$PROC_ROOT/cpuinfo" 2>/dev/null; then
    note "host     virtual machine (hypervisor flag in $PROC_ROOT/cpuinfo): its NIC queues and cpufreq are virtual or absent, and the hypervisor's vCPU scheduling, outside this script's reach, decides the real latency"
  fi
  if [[ -z $SYSTEMCTL ]]; then
    note "host     systemd is not running here: services (irqbalance) cannot be managed"
  fi
}

summary() {
  case $MODE in
  check)
    echo "tune-host: $DIFFERS setting(s) differ from the tuned state; $ALREADY tuned; $SKIPPED skipped"
    [[ $DIFFERS -eq 0 ]] || exit 1
    ;;
  dry-run) echo "# tune-host: would change $CHANGED setting(s); $ALREADY already tuned; $SKIPPED skipped; nothing was changed" ;;
  apply) echo "tune-host: changed $CHANGED setting(s); $ALREADY already tuned; $SKIPPED skipped; originals in $STATE_FILE" ;;
  esac
}

main() {
  parse_args "$@"
  pick_systemctl
  if [[ $MODE == undo ]]; then
    undo
    return
  fi
  note "tune-host: $MODE; shard cores $(compress_list "${CORES[*]}"); housekeeping cores $(compress_list "${HOUSEKEEPING[*]}"); irq policy $POLICY"
  if [[ $MODE == apply && $EUID -ne 0 ]]; then
    note "tune-host: not root: most writes will be refused and reported as skipped"
  fi
  report_host
  tune_sysctls
  tune_thp
  tune_governors
  tune_nics
  tune_irqbalance
  tune_memlock
  summary
}

main "$@"
