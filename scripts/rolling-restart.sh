#!/usr/bin/env bash
# Rolling restart of shardgate under systemd: hands the traffic over from the
# running instance of systemd/shardgate@.service to the other one, with no
# moment in which nothing serves (docs/operations.md, "Rolling restart").
#
#   1. Finds the running instance: shardgate@a or shardgate@b (or the single
#      unit shardgate.service, to move onto the instances; the new one is then
#      shardgate@a).
#   2. Starts the other instance. The unit is Type=notify, so this returns once
#      every shard serves; its sockets have joined the old one's SO_REUSEPORT
#      groups and the UDP spread covers both processes. If it fails, the old
#      instance keeps serving and the script stops with an error.
#   3. Stops the old instance: SIGTERM; its shards leave the UDP group, close
#      their listeners, drain what is in flight, and it exits 0. Clients resend
#      what it left unanswered, to the new instance.
#   4. Enables the new instance and disables the old one, so a reboot starts
#      the one that serves now.
#
# Exits 0 when the new instance serves and the old one stopped cleanly; 1
# (with a message) when it could not start the handover, or the new instance
# failed to start, or the old one did not stop cleanly. Refuses to run while
# both instances are active (a handover under way, or one left behind).
#
# Usage: scripts/rolling-restart.sh [--dry-run]
#   --dry-run  print the systemctl commands instead of running them
# Environment: SYSTEMCTL (default systemctl) runs the systemctl commands;
# the host tests point it at a fake.
set -euo pipefail

SYSTEMCTL=${SYSTEMCTL:-systemctl}
INSTANCES=(shardgate@a.service shardgate@b.service)
SINGLE=shardgate.service

die() {
  echo "rolling-restart: $*" >&2
  exit 1
}

say() {
  echo "rolling-restart: $*"
}

is_active() {
  "$SYSTEMCTL" is-active --quiet "$1"
}

# act COMMAND...: runs systemctl COMMAND..., or prints it with --dry-run.
act() {
  if [[ $DRY_RUN == yes ]]; then
    echo "$SYSTEMCTL $*"
  else
    "$SYSTEMCTL" "$@"
  fi
}

DRY_RUN=no
case ${1:-} in
"") ;;
--dry-run) DRY_RUN=yes ;;
-h | --help)
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
  ;;
*) die "unknown argument '$1' (usage: rolling-restart.sh [--dry-run])" ;;
esac

active=()
for unit in "${INSTANCES[@]}" "$SINGLE"; do
  if is_active "$unit"; then
    active+=("$unit")
  fi
done
case ${#active[@]} in
0) die "no shardgate unit is active: nothing to hand over from (start one: systemctl enable --now ${INSTANCES[0]})" ;;
1) ;;
*) die "${active[*]} are all active: a handover is under way or was left half done; stop the one that should not serve (systemctl stop UNIT) and run again" ;;
esac
old=${active[0]}
if [[ $old == "${INSTANCES[0]}" ]]; then
  new=${INSTANCES[1]}
else
  new=${INSTANCES[0]}
fi

say "handing over from $old to $new"
if ! act start "$new"; then
  die "$new did not start; $old still serves (see: journalctl -u $new)"
fi
if [[ $DRY_RUN == no ]] && ! is_active "$new"; then
  die "$new is not active after starting; $old still serves (see: journalctl -u $new)"
fi
say "$new serves beside $old; stopping $old (it leaves the groups and drains)"
stopped=yes
act stop "$old" || stopped=no
act enable "$new" >/dev/null
act disable "$old" >/dev/null
if [[ $DRY_RUN == no ]]; then
  result=$("$SYSTEMCTL" show --property=Result --value "$old")
  [[ $stopped == yes && $result == success ]] ||
    die "$old did not stop cleanly (result '$result'); $new serves (see: journalctl -u $old)"
fi
say "done: $new serves, $old stopped"
