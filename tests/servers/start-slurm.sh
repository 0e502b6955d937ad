#!/usr/bin/env bash
# Start munge and a single-node SLURM (slurmctld + slurmd on this host) for the tests.
#
# Needs root and Debian's packages: apt-get install slurm-wlm munge
# Writes /etc/slurm/slurm.conf for this host (only when absent or written by this script),
# starts munged, slurmctld and slurmd, and waits until sinfo shows the node idle.
# Safe to run twice: daemons already running on the same config are left alone.
#
#   tests/servers/start-slurm.sh          start (or check) the cluster
#   tests/servers/start-slurm.sh --stop   stop slurmd, slurmctld and munged started here
#
# Environment: SLURM_START_TIMEOUT (seconds to wait for the node, default 60).
set -uo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by diffprobe tests/servers/start-slurm.sh"
STATE=/var/lib/diffprobe-slurm
LOGS=/var/log/diffprobe-slurm
RUN=/run/diffprobe-slurm
TIMEOUT=${SLURM_START_TIMEOUT:-60}
NODE=$(hostname -s)

fail() { echo "start-slurm: $*" >&2; exit 1; }

# Alive: the pid file names a process that is not a zombie (a daemon killed with -9 stays a
# zombie until init reaps it) and whose name is the daemon's (pids get reused).
pid_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != "Z" ] || return 1
  [ "$(cat "/proc/$pid/comm")" = "$(basename "$1" .pid)" ]
}

stop_pidfile() {
  local pidfile=$1 pid i
  pid_alive "$pidfile" || return 0
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
}

if [ "${1:-}" = "--stop" ]; then
  stop_pidfile $RUN/slurmd.pid
  stop_pidfile $RUN/slurmctld.pid
  stop_pidfile /run/munge/munged.pid
  echo "start-slurm: stopped"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || fail "needs root (it writes $CONF and starts the daemons)"
for bin in munged slurmctld slurmd sinfo scontrol; do
  command -v "$bin" >/dev/null || PATH=$PATH:/usr/sbin
  command -v "$bin" >/dev/null || fail "$bin not found: apt-get install slurm-wlm munge"
done

# --- munge -----------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid
  # munged refuses to run as root; --force tolerates a stale socket left by a killed daemon.
  runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start (see /var/log/munge/munged.log)"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null 2>&1 || fail "munge does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm.conf ------------------------------------------------------------------------
# nproc honours OMP_NUM_THREADS, which test runners set to 1.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mib=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
limit=$(cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null | head -1)
if [[ "$limit" =~ ^[0-9]+$ ]] && [ $(( limit / 1048576 )) -lt "$mem_mib" ]; then
  mem_mib=$(( limit / 1048576 ))
fi
# Headroom for the OS, the daemons and the test process itself: 10 %, at least 512 MiB.
headroom=$(( mem_mib / 10 > 512 ? mem_mib / 10 : 512 ))
real_mem=$(( mem_mib - headroom ))
[ "$real_mem" -ge 256 ] || fail "only $mem_mib MiB of memory; SLURM needs more"
# Without DefMemPerCPU, CR_Core_Memory gives a job without --mem the whole node's memory.
def_mem=$(( real_mem / cpus / 2 ))
[ "$def_mem" -gt 1024 ] && def_mem=1024

new_conf=$(cat <<EOF
$MARK
ClusterName=diffprobe
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# No cgroups: linuxproc tracking and no task plugin work inside containers.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
# Use the node as configured here even where the hardware reports more.
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs leave squeue quickly, so tests can check that nothing is left.
MinJobAge=5
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)

changed=0
if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
  if sinfo -h >/dev/null 2>&1; then
    echo "start-slurm: $CONF is not ours and SLURM answers; using the running cluster"
    exit 0
  fi
  fail "$CONF exists and was not written by this script; move it away to use the test cluster"
fi
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  install -d -m 0755 "$CONF_DIR"
  printf '%s\n' "$new_conf" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  changed=1
fi
install -d -m 0755 "$STATE/ctld" "$STATE/d" "$LOGS" "$RUN"

# --- daemons ---------------------------------------------------------------------------
if [ "$changed" -eq 1 ]; then
  stop_pidfile $RUN/slurmd.pid
  stop_pidfile $RUN/slurmctld.pid
fi
if ! pid_alive $RUN/slurmctld.pid; then
  slurmctld || fail "slurmctld did not start (see $LOGS/slurmctld.log)"
fi
if ! pid_alive $RUN/slurmd.pid; then
  slurmd || fail "slurmd did not start (see $LOGS/slurmd.log)"
fi

# --- wait for the node -----------------------------------------------------------------
state=""
deadline=$(( SECONDS + TIMEOUT ))
while [ "$SECONDS" -lt "$deadline" ]; do
  state=$(timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)
  case "$state" in
    idle|mixed|allocated|completing)
      echo "start-slurm: node $NODE $state, partition cpu, $cpus CPUs, $real_mem MiB (DefMemPerCPU=$def_mem)"
      exit 0 ;;
    down*|drain*|fail*)
      # A node left down by an earlier run (killed slurmd, changed config) is put back.
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 ;;
  esac
  sleep 0.5
done
for log in $LOGS/slurmctld.log $LOGS/slurmd.log; do
  [ -f "$log" ] && { echo "--- last lines of $log" >&2; tail -n 8 "$log" >&2; }
done
# The summary last, where a caller showing one line looks.
fail "node $NODE not idle after ${TIMEOUT}s (state: '${state:-no answer from sinfo}'; logs in $LOGS)"
