#!/usr/bin/env bash
# Data-parallel training with torchrun, on one node or many.
#
# One node, N processes (standalone rendezvous on this host):
#   NPROC_PER_NODE=8 launch/torchrun.sh optim.lr=3e-4
# Many nodes (run the same line on every node; c10d rendezvous):
#   NNODES=2 RDZV_ENDPOINT=node0:29400 NPROC_PER_NODE=8 launch/torchrun.sh
#   Without NODE_RANK: c10d rendezvous, node ranks assigned as nodes join
#   (elastic ids). With NODE_RANK=0|1|...: static rendezvous with fixed node
#   ranks, and RDZV_ENDPOINT must be node 0.
#
# Environment (all optional unless said):
#   CONFIG          training config                      (default: configs/debug.yaml)
#   COMMAND         train | verify                        (default: train)
#   NNODES          number of nodes                       (default: 1)
#   NPROC_PER_NODE  processes per node: a number, or gpu | cpu | auto (torchrun's
#                   meanings; auto = one per GPU, else one per CPU) (default: auto)
#   NODE_RANK       this node's rank (static rendezvous)  (default: assigned on join)
#   RDZV_ENDPOINT   host:port of the rendezvous           (required when NNODES > 1)
#   RDZV_ID         job id shared by all nodes            (default: dist_train)
#   RDZV_TIMEOUT    seconds to wait for all nodes to join (default: 600)
#   MAX_RESTARTS    torchrun worker restarts              (default: 0)
#   PYTHON          interpreter with dist_train installed (default: python)
# Extra arguments go to the command: dotted overrides (and verify's flags).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/debug.yaml}"
COMMAND="${COMMAND:-train}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-auto}"
NODE_RANK="${NODE_RANK:-}"
RDZV_ENDPOINT="${RDZV_ENDPOINT:-}"
RDZV_ID="${RDZV_ID:-dist_train}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
PYTHON="${PYTHON:-python}"

die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 >= $2 )); }  # an integer >= $2

case "$COMMAND" in
  train|verify) ;;
  *) die "COMMAND must be train or verify, got '$COMMAND'" ;;
esac
is_count "$NNODES" 1 || die "NNODES must be a whole number of nodes >= 1, got '$NNODES'"
case "$NPROC_PER_NODE" in
  gpu|cpu|auto) ;;
  *) is_count "$NPROC_PER_NODE" 1 || die "NPROC_PER_NODE must be a number >= 1 or gpu, cpu, auto; got '$NPROC_PER_NODE'" ;;
esac
if [[ -n "$NODE_RANK" ]]; then
  is_count "$NODE_RANK" 0 && (( 10#$NODE_RANK < 10#$NNODES )) \
    || die "NODE_RANK must be a whole number from 0 to NNODES-1=$((10#$NNODES - 1)), got '$NODE_RANK'"
fi
is_count "$RDZV_TIMEOUT" 1 || die "RDZV_TIMEOUT must be a whole number of seconds >= 1, got '$RDZV_TIMEOUT'"
is_count "$MAX_RESTARTS" 0 || die "MAX_RESTARTS must be a whole number >= 0, got '$MAX_RESTARTS'"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an interpreter on PATH; set PYTHON to one with dist_train installed"

args=(--nproc_per_node="$NPROC_PER_NODE" --max_restarts="$MAX_RESTARTS")
if [[ "$NNODES" == 1 && -z "$RDZV_ENDPOINT" ]]; then
  args+=(--standalone)
else
  [[ -n "$RDZV_ENDPOINT" ]] || die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (a host every node can reach)"
  if [[ -n "$NODE_RANK" ]]; then
    # Fixed node ranks: static rendezvous; node 0 hosts the store at RDZV_ENDPOINT.
    args+=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv_backend=static
           --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" --rdzv_conf="timeout=$RDZV_TIMEOUT")
  else
    # Elastic ids: c10d rendezvous; ranks are assigned as nodes join.
    args+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID"
           --rdzv_conf="join_timeout=$RDZV_TIMEOUT")
  fi
fi

# Check the config once on this node before starting any worker: a bad config is
# one line and exit 2 here, rather than one error per rank and torchrun's summary.
"$PYTHON" -m dist_train "$COMMAND" --check --config "$CONFIG" "$@" || exit $?

# exec: torchrun receives scancel's, a time limit's or Ctrl-C's signal itself and
# forwards it to the workers, which stop after their current optimizer step; the
# job then exits with 128 + signal (dist_train.torchrun is torchrun, minus the
# traceback it prints when it stops on a signal).
exec "$PYTHON" -m dist_train.torchrun "${args[@]}" -m dist_train "$COMMAND" --config "$CONFIG" "$@"
