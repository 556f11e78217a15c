#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine, for tests: slurmctld, munge, and two
# simulated nodes (n1, n2), each with its own slurmd. Real daemons, real sbatch.
#
#   tests/slurm/cluster.sh start [DIR]   install the Debian packages if missing, start the cluster,
#                                        wait until both nodes are idle, print what clients need
#   tests/slurm/cluster.sh stop [DIR]    stop every daemon by its recorded PID (slurmd, slurmctld, munged)
#
# DIR (default: $DIST_TRAIN_SLURM_DIR or /tmp/dist_train_slurm) holds the config, the munge key and
# socket, state, logs and PIDs. Clients need `export SLURM_CONF=DIR/slurm.conf` (printed by start).
# Needs root (the daemons run as root). A throwaway test cluster only: it trusts this machine.
set -euo pipefail

cmd="${1:-}"
DIR="${2:-${DIST_TRAIN_SLURM_DIR:-/tmp/dist_train_slurm}}"
die() { echo "tests/slurm/cluster.sh: $*" >&2; exit 2; }

stop() {
  local name pid
  for name in slurmd-n1 slurmd-n2 slurmctld munged; do  # nodes first, then the controller, then munge
    [[ -f "$DIR/$name.pid" ]] || continue
    pid=$(cat "$DIR/$name.pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$name.pid"
  done
}

start() {
  [[ $(id -u) == 0 ]] || die "start needs root (the Slurm daemons run as root)"
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
      || ! command -v munged >/dev/null; then
    echo "tests/slurm/cluster.sh: installing slurmctld slurmd slurm-client munge" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
             slurmctld slurmd slurm-client munge >/dev/null; } \
      || die "could not install the Slurm packages with apt-get"
  fi
  stop  # an earlier cluster in the same directory
  local port
  for port in 16817 17001 17002; do  # a cluster started from another directory holds them
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port is in use (another test cluster? stop it with: tests/slurm/cluster.sh stop ITS_DIR)"
    fi
  done
  # A throwaway cluster: no jobs or node states of an earlier one (a run killed mid-job leaves them, and its
  # nodes would come up allocated).
  rm -rf "$DIR/state" "$DIR/spool-n1" "$DIR/spool-n2"
  mkdir -p "$DIR"/{state,spool-n1,spool-n2,log,munge}
  chmod 755 "$DIR/munge"
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))  # MB each node offers
  [[ -f "$DIR/munge/munge.key" ]] || mungekey -c -k "$DIR/munge/munge.key"
  chmod 600 "$DIR/munge/munge.key"
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=dist_train_test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=17001
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
JobRequeue=1
SchedulerType=sched/backfill
# A requeued job becomes eligible cred_expire + 1 s after its requeue (AuthInfo above: 5, the least
# accepted) and then waits for a scheduling pass: the main one every sched_interval (60 s by default),
# as backfill skips cycles where no job or node changed. Each preemption test waited 14-25 s from the
# requeue to the restart with cred_expire=10 and the defaults, 7 s with these.
SchedulerParameters=bf_interval=1,sched_interval=1
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=60 State=UP
EOF
  munged -F --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid.run" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed" \
    >/dev/null 2>&1 &
  echo $! > "$DIR/munged.pid"
  for _ in $(seq 50); do [[ -S "$DIR/munge/munge.socket" ]] && break; sleep 0.1; done
  [[ -S "$DIR/munge/munge.socket" ]] || die "munged did not start; see $DIR/log/munged.log"
  export SLURM_CONF="$DIR/slurm.conf"
  slurmctld -D -f "$SLURM_CONF" >"$DIR/log/slurmctld.out" 2>&1 &
  echo $! > "$DIR/slurmctld.pid"
  local n
  for n in n1 n2; do
    slurmd -D -N "$n" -f "$SLURM_CONF" >"$DIR/log/slurmd-$n.out" 2>&1 &
    echo $! > "$DIR/slurmd-$n.pid"
  done
  for _ in $(seq 150); do  # both nodes idle: up to 15 s
    if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | tr '\n' ' ') == "n1 n2 " ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.1
  done
  sinfo -N >&2 || true
  stop
  die "the cluster did not come up (nodes not idle); see $DIR/log/"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) die "usage: tests/slurm/cluster.sh start|stop [DIR]" ;;
esac
