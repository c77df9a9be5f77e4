#!/usr/bin/env bash
# Start a real one-node SLURM on this machine (munged, slurmctld, slurmd), without systemd.
#
#   tests/slurm/start_slurm.sh [STATE_DIR]      # default: $MEDVIT_SLURM_DIR or /tmp/medvit-slurm
#   . STATE_DIR/env                             # SLURM_CONF for sbatch, squeue, scontrol
#   tests/slurm/stop_slurm.sh [STATE_DIR]       # stops exactly the daemons started here
#
# Installs Debian's slurm-wlm and munge with apt-get when they are missing (needs root).
# Writes STATE_DIR/slurm.conf (linked from /etc/slurm/slurm.conf; one node = this machine, one partition `debug`), the daemons'
# logs and state, STATE_DIR/env, and STATE_DIR/pids ("<name> <pid>" for every daemon THIS
# script started; a munged that was already running is used and left alone). Waits until
# the node is idle. No accounting daemon: the executor plugin queries job states with
# squeue (`--slurm-status-command squeue`), which works because MinJobAge keeps finished
# jobs in the controller for an hour; jobcomp/filetxt keeps a permanent record of every
# finished job in STATE_DIR/jobcomp.log.
#
# Exit status: 0 the node is idle; 3 SLURM cannot be set up here (not root, or no apt-get,
# and SLURM is not installed); 1 anything else (the daemons' logs are printed).
set -euo pipefail

STATE=${1:-${MEDVIT_SLURM_DIR:-/tmp/medvit-slurm}}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
CONF=$STATE/slurm.conf
PIDS=$STATE/pids

log() { echo "start_slurm: $*" >&2; }
fail() {
  log "$*"
  for f in "$STATE"/slurmctld.log "$STATE"/slurmd.log; do
    [ -f "$f" ] && { echo "--- $f (last lines)" >&2; tail -n 30 "$f" >&2; }
  done
  exit 1
}

if [ -s "$PIDS" ]; then
  log "$PIDS exists: SLURM from an earlier start may still run; run tests/slurm/stop_slurm.sh $STATE first"
  exit 1
fi

# ------------------------------------------------------------------------------ install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "slurm-wlm and munge are not installed and cannot be installed here (needs root and apt-get)"
    exit 3
  fi
  log "installing slurm-wlm and munge with apt-get"
  t0=$(date +%s)
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  log "installed in $(( $(date +%s) - t0 )) s"
fi
if [ "$(id -u)" -ne 0 ]; then
  log "slurmd must run as root to start jobs; run this script as root"
  exit 3
fi

# -------------------------------------------------------------------------------- munge
: > "$PIDS"
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged is already running: using it"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile /etc/munge/munge.key
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key
  chmod 0700 /etc/munge && chmod 0600 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  [ -s /run/munge/munged.pid ] || fail "munged did not start"
  echo "munged $(cat /run/munge/munged.pid)" >> "$PIDS"
  munge -n | unmunge >/dev/null || fail "munge does not answer"
fi

# ------------------------------------------------------------------------ configuration
HOST=$(hostname -s)
# Daemons of another SLURM on this machine (a run killed before its stop_slurm.sh, or a
# concurrent one) must not answer for ours: they are listed, and ours take two free ports
# unless MEDVIT_SLURMCTLD_PORT / MEDVIT_SLURMD_PORT say which.
others=$( (pgrep -a -x slurmctld; pgrep -a -x slurmd) || true)
[ -z "$others" ] || log "other SLURM daemons already run here (left alone): $(echo "$others" | tr '\n' ';')"
read -r CTLD_PORT SLURMD_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
CTLD_PORT=${MEDVIT_SLURMCTLD_PORT:-$CTLD_PORT}
SLURMD_PORT=${MEDVIT_SLURMD_PORT:-$SLURMD_PORT}
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
mkdir -p "$STATE/ctld" "$STATE/spool"
cat > "$CONF" <<EOF
# One-node SLURM for medvit's integration test (tests/slurm/start_slurm.sh).
ClusterName=medvit
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
# Finished jobs stay visible to squeue/scontrol for an hour (the executor polls squeue).
MinJobAge=3600
ReturnToService=2
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "export SLURM_CONF=$CONF" > "$STATE/env"
export SLURM_CONF=$CONF
# srun inside a batch job reads the default /etc/slurm/slurm.conf (SLURM_CONF does not reach
# it): link it to this configuration unless a real one is there.
ETC=/etc/slurm/slurm.conf
if [ -e "$ETC" ] && [ ! -L "$ETC" ]; then
  fail "$ETC exists and is not a link made by this script: this machine has its own SLURM; not touching it"
fi
mkdir -p /etc/slurm
ln -sfn "$CONF" "$ETC"

# ------------------------------------------------------------------------------ daemons
rm -f "$STATE/slurmctld.pid" "$STATE/slurmd.pid"
slurmctld -f "$CONF" -i || fail "slurmctld did not start"
for _ in $(seq 100); do [ -s "$STATE/slurmctld.pid" ] && break; sleep 0.1; done
[ -s "$STATE/slurmctld.pid" ] || fail "slurmctld wrote no pid file"
echo "slurmctld $(cat "$STATE/slurmctld.pid")" >> "$PIDS"
slurmd -f "$CONF" || fail "slurmd did not start"
for _ in $(seq 100); do [ -s "$STATE/slurmd.pid" ] && break; sleep 0.1; done
[ -s "$STATE/slurmd.pid" ] || fail "slurmd wrote no pid file"
echo "slurmd $(cat "$STATE/slurmd.pid")" >> "$PIDS"

state=""
for _ in $(seq 60); do
  state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
  [ "$state" = "idle" ] && break
  sleep 1
done
[ "$state" = "idle" ] || fail "node $HOST is '${state:-unknown}', not idle, after 60 s"
log "node $HOST idle ($CPUS CPUs, ${MEM_MB} MB; ports $CTLD_PORT, $SLURMD_PORT); SLURM_CONF=$CONF"
