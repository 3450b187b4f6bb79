#!/usr/bin/env bash
# cgroups/setup.sh: reserves shard cores for shardgate with a cgroup cpuset.
#
# Why: pinning every shard hard to a core stalled shards for 8 ms when a
# noisy neighbour ran on the same core. The fix is to reserve the cores with a
# cpuset that only shardgate uses, keep everything else on the housekeeping
# cores, and run `shardgate serve --placement fenced` inside the cpuset so the
# scheduler may still move a shard thread within it.
#
# Two ways:
#   --systemd  (hosts with systemd and cgroup v2): writes shardgate.slice with
#              AllowedCPUs=<cores> and drop-ins keeping system.slice and
#              user.slice on the housekeeping cores into $SYSTEMD_DIR, then
#              `systemctl daemon-reload`. shardgate.service runs in the slice.
#   default    (hosts without systemd): creates the cpusets directly, for
#              cgroup v2 (a unified hierarchy at $CGROUP_ROOT) or v1 (a cpuset
#              hierarchy at $CGROUP_ROOT/cpuset): a `shardgate` cgroup on the
#              shard cores and a `housekeeping` cgroup on the rest, and moves
#              every process of the root cgroup into `housekeeping`.
#
# Idempotent: only what differs is written. --dry-run prints the exact commands
# and changes nothing. CGROUP_ROOT (default /sys/fs/cgroup), SYSTEMD_DIR
# (default /etc/systemd/system) and SYSTEMCTL let tests use a fake tree.
#
# Limits: kernel threads stay in the root cgroup (per-core kernel threads must);
# processes already in other child cgroups (containers) are not moved; a
# process started later inherits its parent's cgroup. Without systemd nothing
# here survives a reboot: run it at boot, before shardgate. It does not use
# cpuset partitions (cgroup v2 cpuset.cpus.partition) or isolcpus.
set -euo pipefail

CGROUP_ROOT=${CGROUP_ROOT:-/sys/fs/cgroup}
SYSTEMD_DIR=${SYSTEMD_DIR:-/etc/systemd/system}
TEMPLATES=$(cd "$(dirname "$0")" && pwd)
GROUP=shardgate
HOUSEKEEPING_GROUP=housekeeping
DRY_RUN=no
SYSTEMD=no
CORES=""
HOUSEKEEPING=""
CHANGES=0

usage() {
  cat <<'EOF'
usage: cgroups/setup.sh --cores LIST [--housekeeping LIST] [--systemd] [--dry-run]

  --cores LIST         the shard cores, e.g. 2-7 (shardgate runs one shard each)
  --housekeeping LIST  cores for everything else; default: every other core of
                       the root cpuset. Must not overlap --cores.
  --systemd            write shardgate.slice and the system.slice/user.slice
                       drop-ins into /etc/systemd/system (SYSTEMD_DIR; cgroup v2 only) instead of
                       creating cpusets directly
  --dry-run            print the commands it would run; change nothing

Then start shardgate in the cpuset (without systemd):
  echo $$ > /sys/fs/cgroup/shardgate/cgroup.procs          (v2)
  echo $$ > /sys/fs/cgroup/cpuset/shardgate/cgroup.procs   (v1)
  exec shardgate serve --placement fenced --config /etc/shardgate/shardgate.toml
or with systemd: systemctl start shardgate (the unit has Slice=shardgate.slice).
EOF
}

die() {
  echo "cgroups/setup.sh: $*" >&2
  exit 1
}

# "0-2,5" -> "0 1 2 5"; fails on anything else.
expand_list() {
  local part first last core parts=()
  [[ -n $1 ]] || return 1
  IFS=, read -r -a parts <<<"$1"
  for part in "${parts[@]}"; do
    [[ $part =~ ^([0-9]+)(-([0-9]+))?$ ]] || return 1
    first=${BASH_REMATCH[1]} last=${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}
    ((first <= last)) || return 1
    for ((core = first; core <= last; core++)); do echo "$core"; done
  done | sort -n -u | tr '\n' ' ' | sed 's/ $//'
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

# run COMMAND: runs it, or prints it under --dry-run.
run() {
  CHANGES=$((CHANGES + 1))
  if [[ $DRY_RUN == yes ]]; then
    echo "$1"
  else
    echo "+ $1"
    bash -c "$1"
  fi
}

# set_value FILE VALUE: writes VALUE unless FILE already holds it (as a list).
set_value() {
  local file=$1 value=$2 current=""
  [[ -e $file ]] && current=$(<"$file")
  if [[ $current == "$value" ]] || [[ -n $current && "$(expand_list "$current" 2>/dev/null)" == "$(expand_list "$value" 2>/dev/null)" ]]; then
    return
  fi
  run "echo $value > $file"
}

# The hierarchy: v2 when the root is a unified one, v1 when a cpuset one is mounted.
detect_version() {
  if [[ -e $CGROUP_ROOT/cgroup.controllers ]]; then
    echo v2
  elif [[ -e $CGROUP_ROOT/cpuset/cpuset.cpus ]]; then
    echo v1
  else
    die "no cgroup v2 root with cgroup.controllers nor a v1 cpuset hierarchy under $CGROUP_ROOT"
  fi
}

# The cores and memory nodes the root cpuset has.
root_cpus() {
  case $1 in
  v2) cat "$CGROUP_ROOT/cpuset.cpus.effective" 2>/dev/null || die "cannot read $CGROUP_ROOT/cpuset.cpus.effective" ;;
  v1) cat "$CGROUP_ROOT/cpuset/cpuset.cpus" ;;
  esac
}

root_mems() {
  case $1 in
  v2) cat "$CGROUP_ROOT/cpuset.mems.effective" 2>/dev/null || echo 0 ;;
  v1) cat "$CGROUP_ROOT/cpuset/cpuset.mems" ;;
  esac
}

# Checks --cores and --housekeeping against the root cpuset's cores.
resolve_lists() {
  local all=$1 core cores housekeeping rest=""
  cores=$(expand_list "$CORES") || die "--cores '$CORES' must be a list of cores or ranges, e.g. 2-7"
  for core in $cores; do
    [[ " $all " == *" $core "* ]] || die "--cores: core $core is not in the root cpuset ($(compress_list "$all"))"
  done
  for core in $all; do [[ " $cores " == *" $core "* ]] || rest+=" $core"; done
  if [[ -z $HOUSEKEEPING ]]; then
    housekeeping=${rest# }
  else
    housekeeping=$(expand_list "$HOUSEKEEPING") || die "--housekeeping '$HOUSEKEEPING' must be a list of cores or ranges"
    for core in $housekeeping; do
      [[ " $rest " == *" $core "* ]] || die "--housekeeping: core $core is a shard core or not in the root cpuset ($(compress_list "$all"))"
    done
  fi
  [[ -n $housekeeping ]] || die "no housekeeping core left: --cores takes every core ($(compress_list "$all")); leave at least one for the rest of the host"
  CORES=$(compress_list "$cores") HOUSEKEEPING=$(compress_list "$housekeeping")
}

# make_cpuset DIR CPUS MEMS: one cpuset cgroup (v1 needs mems before tasks).
make_cpuset() {
  [[ -d $1 ]] || run "mkdir $1"
  set_value "$1/cpuset.cpus" "$2"
  set_value "$1/cpuset.mems" "$3"
}

# Moves every process of the root cgroup into DIR; kernel threads refuse, and stay.
move_root_processes() {
  local root=$1 target=$2
  # cgroupfs files show size 0, so test the content rather than -s.
  if [[ -z "$(cat "$root/cgroup.procs" 2>/dev/null)" ]]; then
    return
  fi
  run "for pid in \$(cat $root/cgroup.procs); do echo \$pid > $target/cgroup.procs 2>/dev/null || true; done"
}

setup_v2() {
  local mems
  grep -qw cpuset "$CGROUP_ROOT/cgroup.controllers" ||
    die "the cpuset controller is not in $CGROUP_ROOT/cgroup.controllers (bound to a v1 hierarchy?)"
  grep -qw cpuset "$CGROUP_ROOT/cgroup.subtree_control" 2>/dev/null ||
    run "echo +cpuset > $CGROUP_ROOT/cgroup.subtree_control"
  mems=$(root_mems v2)
  make_cpuset "$CGROUP_ROOT/$HOUSEKEEPING_GROUP" "$HOUSEKEEPING" "$mems"
  make_cpuset "$CGROUP_ROOT/$GROUP" "$CORES" "$mems"
  move_root_processes "$CGROUP_ROOT" "$CGROUP_ROOT/$HOUSEKEEPING_GROUP"
}

setup_v1() {
  local root=$CGROUP_ROOT/cpuset mems
  mems=$(root_mems v1)
  make_cpuset "$root/$HOUSEKEEPING_GROUP" "$HOUSEKEEPING" "$mems"
  make_cpuset "$root/$GROUP" "$CORES" "$mems"
  move_root_processes "$root" "$root/$HOUSEKEEPING_GROUP"
}

# install_unit TEMPLATE TARGET CPUS: the template with its AllowedCPUs= set.
install_unit() {
  local template=$1 target=$2 content
  content=$(sed "s/^AllowedCPUs=.*/AllowedCPUs=$3/" "$template")
  if [[ -f $target && "$(<"$target")" == "$content" ]]; then
    return
  fi
  CHANGES=$((CHANGES + 1))
  if [[ $DRY_RUN == yes ]]; then
    printf "mkdir -p %s && cat > %s <<'EOF'\n%s\nEOF\n" "$(dirname "$target")" "$target" "$content"
  else
    echo "+ write $target (AllowedCPUs=$3)"
    mkdir -p "$(dirname "$target")"
    echo "$content" >"$target"
  fi
}

setup_systemd() {
  local before=$CHANGES systemctl=${SYSTEMCTL-systemctl}
  [[ $1 == v2 ]] || die "--systemd needs cgroup v2: systemd's AllowedCPUs= does nothing on this $1 host; run without --systemd"
  install_unit "$TEMPLATES/shardgate.slice" "$SYSTEMD_DIR/shardgate.slice" "$CORES"
  install_unit "$TEMPLATES/system.slice.d/50-housekeeping.conf" "$SYSTEMD_DIR/system.slice.d/50-shardgate-housekeeping.conf" "$HOUSEKEEPING"
  install_unit "$TEMPLATES/user.slice.d/50-housekeeping.conf" "$SYSTEMD_DIR/user.slice.d/50-shardgate-housekeeping.conf" "$HOUSEKEEPING"
  if [[ $CHANGES -ne $before && -n $systemctl ]]; then
    run "$systemctl daemon-reload"
  fi
}

# How to start shardgate inside the cpuset, as a comment.
print_start_hint() {
  local procs=$CGROUP_ROOT/$GROUP/cgroup.procs
  [[ $1 == v2 ]] || procs=$CGROUP_ROOT/cpuset/$GROUP/cgroup.procs
  echo "# start shardgate inside it (placement fenced lets shards move between its cores):"
  echo "#   sh -c 'echo \$\$ > $procs && exec /usr/local/bin/shardgate serve --placement fenced --config /etc/shardgate/shardgate.toml'"
}

parse_args() {
  while [[ $# -gt 0 ]]; do
    case $1 in
    --cores) CORES=${2:?--cores needs a LIST}; shift ;;
    --housekeeping) HOUSEKEEPING=${2:?--housekeeping needs a LIST}; shift ;;
    --systemd) SYSTEMD=yes ;;
    --dry-run) DRY_RUN=yes ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [[ -n $CORES ]] || die "--cores LIST is required, e.g. --cores 2-7 (see --help)"
}

main() {
  local version
  parse_args "$@"
  version=$(detect_version)
  resolve_lists "$(expand_list "$(root_cpus "$version")")"
  echo "# cgroup $version at $CGROUP_ROOT: shard cores $CORES, housekeeping cores $HOUSEKEEPING"
  if [[ $SYSTEMD == yes ]]; then
    setup_systemd "$version"
  else
    "setup_$version"
    print_start_hint "$version"
  fi
  if [[ $DRY_RUN == yes ]]; then
    echo "# would run $CHANGES command(s); nothing was changed"
  else
    echo "# $CHANGES change(s); nothing else differed"
  fi
}

main "$@"
