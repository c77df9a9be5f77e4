#!/usr/bin/env bash
# Stop the daemons tests/slurm/start_slurm.sh started, by the PIDs it recorded.
#
#   tests/slurm/stop_slurm.sh [STATE_DIR]       # default: $MEDVIT_SLURM_DIR or /tmp/medvit-slurm
#
# Jobs still running are cancelled first. Each recorded PID gets SIGTERM, then SIGKILL after
# 10 s; a PID is signalled only while it still runs the program recorded for it, so a
# reused PID is never hit. A munged that was running before start_slurm.sh is not touched.
set -uo pipefail

STATE=${1:-${MEDVIT_SLURM_DIR:-/tmp/medvit-slurm}}
PIDS=$STATE/pids
log() { echo "stop_slurm: $*" >&2; }

[ -f "$PIDS" ] || { log "no $PIDS: nothing to stop"; exit 0; }
if [ -f "$STATE/slurm.conf" ] && command -v scancel >/dev/null; then
  SLURM_CONF=$STATE/slurm.conf scancel --quiet --user "$(id -un)" 2>/dev/null || true
fi

runs() {  # runs NAME PID: PID is alive and its command is NAME
  [ -r "/proc/$2/comm" ] && [ "$(cat "/proc/$2/comm")" = "$1" ]
}

# slurmd before slurmctld before munged: the reverse of the start order.
rc=0
for name in slurmd slurmctld munged; do
  pid=$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")
  [ -n "$pid" ] || continue
  if ! runs "$name" "$pid"; then log "$name ($pid) is not running"; continue; fi
  kill -TERM "$pid"
  for _ in $(seq 100); do runs "$name" "$pid" || break; sleep 0.1; done
  if runs "$name" "$pid"; then
    log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" || rc=1
  fi
  log "stopped $name ($pid)"
done
# the /etc/slurm/slurm.conf link start_slurm.sh made to this configuration
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$STATE/slurm.conf" ]; then
  rm -f /etc/slurm/slurm.conf
fi
rm -f "$PIDS"
exit "$rc"
