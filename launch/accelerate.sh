#!/usr/bin/env bash
# Training under `accelerate launch`, with a shipped Accelerate config.
#
# One machine, DDP in bf16 on 2 processes (GPUs, or the CPU on a machine without them):
#   ACCELERATE_CONFIG=configs/accelerate/ddp_bf16.yaml NUM_PROCESSES=2 launch/accelerate.sh
# Many machines (the same line on every machine, its own MACHINE_RANK):
#   ACCELERATE_CONFIG=configs/accelerate/multinode.yaml NUM_MACHINES=2 NUM_PROCESSES=16 \
#     MACHINE_RANK=0 MAIN_PROCESS_IP=node0 MAIN_PROCESS_PORT=29500 launch/accelerate.sh
#
# Accelerate owns process setup, device placement and mixed precision (its config's
# mixed_precision, or MIXED_PRECISION); train.precision may be left at auto.
# On a machine without GPUs this script sets ACCELERATE_USE_CPU=true and passes
# --multi_gpu for a DDP config: otherwise Accelerate would start N processes that
# each train alone, or one process where N were asked for. A DeepSpeed config
# (configs/accelerate/deepspeed.yaml) runs on DeepSpeed's CPU accelerator over gloo.
#
# Environment (all optional):
#   ACCELERATE_CONFIG  Accelerate config file          (default: configs/accelerate/ddp.yaml)
#   CONFIG             training config                  (default: configs/debug.yaml)
#   COMMAND            train | verify                   (default: train)
#   NUM_PROCESSES      processes in total, all machines (default: the Accelerate config's)
#   MIXED_PRECISION    no | bf16 | fp16                 (default: the Accelerate config's)
#   NUM_MACHINES       machines                         (default: the Accelerate config's)
#   MACHINE_RANK       this machine's rank, 0..NUM_MACHINES-1 (needed with NUM_MACHINES > 1)
#   MAIN_PROCESS_IP    machine 0's address              (needed with NUM_MACHINES > 1)
#   MAIN_PROCESS_PORT  machine 0's port                 (default: 29500 on several machines; on one, a
#                      free port, so two jobs on one machine do not collide)
#   PYTHON             interpreter with dist_train and accelerate installed (default: python)
# Extra arguments go to the command: dotted overrides (and verify's flags).
set -euo pipefail
cd "$(dirname "$0")/.."

ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}"
CONFIG="${CONFIG:-configs/debug.yaml}"
COMMAND="${COMMAND:-train}"
PYTHON="${PYTHON:-python}"

die() { echo "launch/accelerate.sh: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 >= $2 )); }  # an integer >= $2

case "$COMMAND" in
  train|verify) ;;
  *) die "COMMAND must be train or verify, got '$COMMAND'" ;;
esac
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter on PATH; set PYTHON to one with dist_train installed"
# find_spec, not an import: importing accelerate imports torch (seconds).
has() { "$PYTHON" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@" 2>/dev/null; }
has accelerate || die "accelerate is not installed for $PYTHON; install it with: pip install 'dist_train[accelerate]'"
[[ -f "$ACCELERATE_CONFIG" ]] || die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG is not a file; see configs/accelerate/"

# What the Accelerate config asks for: distributed type, processes, machines, precision,
# FSDP version (without torch: a bad setting below is refused in a blink).
info=$("$PYTHON" - "$ACCELERATE_CONFIG" 2>&1 <<'PY'
import sys
try:
    import yaml
    c = yaml.safe_load(open(sys.argv[1], encoding="utf-8")) or {}
    if not isinstance(c, dict):
        raise ValueError("its top level is not a mapping")
    fsdp = c.get("fsdp_config") or {}
    ds_file = (c.get("deepspeed_config") or {}).get("deepspeed_config_file") or "-"
    print(c.get("distributed_type", "NO"), c.get("num_processes", 1), c.get("num_machines", 1),
          "no" if c.get("mixed_precision") is False else str(c.get("mixed_precision", "no")).lower(), fsdp.get("fsdp_version", 1),
          str(fsdp.get("fsdp_offload_params", False)).lower(), ds_file)
except Exception as e:
    print(" ".join(f"{type(e).__name__}: {e}".split()))
    sys.exit(1)
PY
) || die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG cannot be read ($info)"
read -r DIST_TYPE CFG_NPROC CFG_NMACH CFG_MP FSDP_VERSION FSDP_OFFLOAD DS_FILE <<< "$info"
if [[ "$DIST_TYPE" == DEEPSPEED ]]; then
  # Accelerate's DeepSpeed support imports transformers (a version check) on every rank.
  has deepspeed transformers || die "ACCELERATE_CONFIG=$ACCELERATE_CONFIG runs DeepSpeed, which needs deepspeed and" \
    "transformers for $PYTHON: pip install 'dist_train[accelerate,deepspeed]' transformers"
fi

NUM_PROCESSES="${NUM_PROCESSES:-$CFG_NPROC}"
NUM_MACHINES="${NUM_MACHINES:-$CFG_NMACH}"
MIXED_PRECISION="${MIXED_PRECISION:-$CFG_MP}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-}"
is_count "$NUM_PROCESSES" 1 || die "NUM_PROCESSES must be a whole number >= 1, got '$NUM_PROCESSES'"
is_count "$NUM_MACHINES" 1 || die "NUM_MACHINES must be a whole number >= 1, got '$NUM_MACHINES'"
case "$MIXED_PRECISION" in
  no|bf16|fp16) ;;
  *) die "MIXED_PRECISION must be no, bf16 or fp16, got '$MIXED_PRECISION'" ;;
esac
if [[ -n "$MAIN_PROCESS_PORT" ]]; then
  [[ "$MAIN_PROCESS_PORT" =~ ^[0-9]+$ ]] && (( 10#$MAIN_PROCESS_PORT >= 1 && 10#$MAIN_PROCESS_PORT <= 65535 )) \
    || die "MAIN_PROCESS_PORT must be a port number (1-65535), got '$MAIN_PROCESS_PORT'"
elif (( 10#$NUM_MACHINES > 1 )); then
  MAIN_PROCESS_PORT=29500
else  # one machine: a port the system has free now, as torchrun --standalone takes one
  MAIN_PROCESS_PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
fi
(( 10#$NUM_PROCESSES % 10#$NUM_MACHINES == 0 )) \
  || die "NUM_PROCESSES=$NUM_PROCESSES (all machines) is not divisible by NUM_MACHINES=$NUM_MACHINES"

args=(--config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_PROCESSES" --num_machines "$NUM_MACHINES"
      --mixed_precision "$MIXED_PRECISION" --main_process_port "$MAIN_PROCESS_PORT" --dynamo_backend no)
if (( 10#$NUM_MACHINES > 1 )); then
  # Each machine's own rank and machine 0's address come from the environment, never from
  # a shared file: a machine that forgot its rank would join as a second machine 0.
  [[ -n "${MACHINE_RANK:-}" ]] || die "NUM_MACHINES=$NUM_MACHINES needs MACHINE_RANK (this machine's rank, 0..$((10#$NUM_MACHINES - 1)))"
  is_count "$MACHINE_RANK" 0 && (( 10#$MACHINE_RANK < 10#$NUM_MACHINES )) \
    || die "MACHINE_RANK must be a whole number from 0 to NUM_MACHINES-1=$((10#$NUM_MACHINES - 1)), got '$MACHINE_RANK'"
  [[ -n "${MAIN_PROCESS_IP:-}" ]] || die "NUM_MACHINES=$NUM_MACHINES needs MAIN_PROCESS_IP (machine 0's address)"
  args+=(--machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP")
fi

# Whether this machine has a GPU, as the launched processes' torch will see it (a torch built without
# CUDA answers without being imported).
GPUS=$("$PYTHON" -m dist_train.launchers gpus 2>/dev/null) \
  || die "PYTHON=$PYTHON cannot import torch or dist_train (try: $PYTHON -c 'import torch'); install dist_train for it"
HAS_GPU=$(( GPUS > 0 ))

# The environment the launched processes will see, for the check below.
env_check=(ACCELERATE_MIXED_PRECISION="$MIXED_PRECISION" WORLD_SIZE="$NUM_PROCESSES")
if [[ "$HAS_GPU" == 0 && "$DIST_TYPE" != DEEPSPEED ]]; then
  # No GPU: Accelerate's CPU data-parallel mode. Several processes of a plain
  # data-parallel config (NO, MULTI_CPU, MULTI_GPU) need --multi_gpu, or Accelerate
  # starts one; an FSDP config keeps its type, so the check below can refuse it
  # instead of letting Accelerate drop it silently. (DeepSpeed runs on its CPU
  # accelerator without ACCELERATE_USE_CPU, which would drop it; dist_train gives it gloo.)
  export ACCELERATE_USE_CPU=true
  env_check+=(ACCELERATE_USE_CPU=true)
  case "$DIST_TYPE" in
    NO|MULTI_CPU|MULTI_GPU) (( 10#$NUM_PROCESSES > 1 )) && args+=(--multi_gpu) ;;
  esac
fi
case "$DIST_TYPE" in
  FSDP) env_check+=(ACCELERATE_USE_FSDP=true FSDP_VERSION="$FSDP_VERSION" FSDP_OFFLOAD_PARAMS="$FSDP_OFFLOAD") ;;
  DEEPSPEED)
    env_check+=(ACCELERATE_USE_DEEPSPEED=true)
    [[ "$DS_FILE" == - ]] || env_check+=(ACCELERATE_DEEPSPEED_CONFIG_FILE="$DS_FILE") ;;
esac

# Check the config once, as the launched processes will see it: a bad config or a
# combination that cannot work is one line and exit 2 here, before any process starts.
env "${env_check[@]}" "$PYTHON" -m dist_train "$COMMAND" --check --config "$CONFIG" "$@" || exit $?

exec "$PYTHON" -m dist_train.accelerate_launch "${args[@]}" -m dist_train "$COMMAND" --config "$CONFIG" "$@"
