#!/usr/bin/env bash
# DeepSpeed ZeRO training (dist.strategy=deepspeed), started by DeepSpeed's own launcher or by torchrun.
#
# One machine, N processes (the deepspeed launcher):
#   NUM_PROCESSES=2 DS_CONFIG=configs/deepspeed/zero3.json launch/deepspeed.sh
# Several machines (the deepspeed launcher reaches the other hosts with pdsh/ssh; run it on the first):
#   HOSTFILE=hostfile DS_CONFIG=configs/deepspeed/zero2_bf16.json launch/deepspeed.sh
#   hostfile lines are "hostname slots=N" (N processes on that host)
# The torchrun form (run on every node, with launch/torchrun.sh's variables: NNODES, RDZV_ENDPOINT, ...):
#   LAUNCHER=torchrun NPROC_PER_NODE=2 DS_CONFIG=configs/deepspeed/zero1.json launch/deepspeed.sh
#
# Environment (all optional):
#   DS_CONFIG      DeepSpeed JSON, passed as dist.deepspeed_config  (default: configs/deepspeed/zero2.json)
#   LAUNCHER       deepspeed | torchrun                            (default: deepspeed)
#   CONFIG         training config                                  (default: configs/debug.yaml)
#   COMMAND        train | verify                                   (default: train)
#   NUM_PROCESSES  processes on this machine (deepspeed launcher)   (default: every GPU; 1 without GPUs)
#   HOSTFILE       DeepSpeed hostfile for several machines (deepspeed launcher; NUM_PROCESSES then unused)
#   MASTER_ADDR    address of the first host (deepspeed launcher)   (default: the first host of HOSTFILE)
#   MASTER_PORT    rendezvous port (deepspeed launcher)             (default: 29500 with HOSTFILE; on one
#                  machine a free port, so two jobs on one machine do not collide)
#   PYTHON         interpreter with dist_train and deepspeed        (default: python)
# Extra arguments go to the command: dotted overrides (and verify's flags).
set -euo pipefail
cd "$(dirname "$0")/.."

DS_CONFIG="${DS_CONFIG:-configs/deepspeed/zero2.json}"
LAUNCHER="${LAUNCHER:-deepspeed}"
CONFIG="${CONFIG:-configs/debug.yaml}"
COMMAND="${COMMAND:-train}"
NUM_PROCESSES="${NUM_PROCESSES:-}"
HOSTFILE="${HOSTFILE:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-}"
PYTHON="${PYTHON:-python}"

die() { echo "launch/deepspeed.sh: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 >= $2 )); }

case "$COMMAND" in
  train|verify) ;;
  *) die "COMMAND must be train or verify, got '$COMMAND'" ;;
esac
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter on PATH; set PYTHON to one with dist_train installed"
[[ -f "$DS_CONFIG" ]] || die "DS_CONFIG=$DS_CONFIG is not a file; pick one of configs/deepspeed/*.json"
args=("dist.strategy=deepspeed" "dist.deepspeed_config=$DS_CONFIG" "$@")

case "$LAUNCHER" in
  torchrun)
    for var in NUM_PROCESSES HOSTFILE; do
      [[ -z "${!var}" ]] || die "$var is for LAUNCHER=deepspeed; with torchrun use NPROC_PER_NODE, NNODES and RDZV_ENDPOINT (see launch/torchrun.sh)"
    done
    CONFIG="$CONFIG" COMMAND="$COMMAND" PYTHON="$PYTHON" exec launch/torchrun.sh "${args[@]}" ;;
  deepspeed) ;;
  *) die "LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" ;;
esac

# find_spec, not an import: importing deepspeed takes seconds (torch and its accelerator probe).
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)" 2>/dev/null \
  || die "deepspeed is not installed for $PYTHON; pip install 'dist_train[deepspeed]'"
if [[ -n "$MASTER_PORT" ]]; then
  is_count "$MASTER_PORT" 1 && (( 10#$MASTER_PORT < 65536 )) || die "MASTER_PORT must be a port number (1-65535), got '$MASTER_PORT'"
elif [[ -n "$HOSTFILE" ]]; then
  MASTER_PORT=29500
else  # one machine: a port the system has free now, as torchrun --standalone takes one
  MASTER_PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
fi
ds=(--master_port="$MASTER_PORT" --no_local_rank)
if [[ -n "$HOSTFILE" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE is not a file (lines of 'hostname slots=N')"
  [[ -z "$NUM_PROCESSES" ]] || die "set NUM_PROCESSES or HOSTFILE, not both: with a hostfile its slots say how many processes each host runs"
  grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" \
    || die "HOSTFILE=$HOSTFILE has no line of the form 'hostname slots=N'"
  ds+=(--hostfile="$HOSTFILE")
  [[ -z "$MASTER_ADDR" ]] || ds+=(--master_addr="$MASTER_ADDR")
else
  if [[ -z "$NUM_PROCESSES" ]]; then
    GPUS=$("$PYTHON" -m dist_train.launchers gpus 2>/dev/null) \
      || die "PYTHON=$PYTHON cannot import torch or dist_train (try: $PYTHON -c 'import torch'); install dist_train for it"
    NUM_PROCESSES=$(( GPUS > 1 ? GPUS : 1 ))
  fi
  is_count "$NUM_PROCESSES" 1 || die "NUM_PROCESSES must be a whole number >= 1, got '$NUM_PROCESSES'"
  # No hostfile: the launcher starts the processes on this machine only, without pdsh.
  ds+=(--num_gpus="$NUM_PROCESSES")
  [[ -z "$MASTER_ADDR" ]] || ds+=(--master_addr="$MASTER_ADDR")
fi

# Check the config once before starting any worker: a bad config is one line and exit 2.
"$PYTHON" -m dist_train "$COMMAND" --check --config "$CONFIG" "${args[@]}" || exit $?
if [[ -z "$HOSTFILE" && ! -e /dev/nvidiactl ]]; then
  echo "launch/deepspeed.sh: note: no GPU here; DeepSpeed's CPU accelerator numbers its processes through" \
       "CUDA_VISIBLE_DEVICES (the launcher's 'Setting CUDA_VISIBLE_DEVICES=...' line), which selects no GPU" >&2
fi

exec "$PYTHON" -m deepspeed.launcher.runner "${ds[@]}" --module dist_train "$COMMAND" --config "$CONFIG" "${args[@]}"
