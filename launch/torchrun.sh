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

case "$COMMAND" in
  train|verify) ;;
  *) echo "launch/torchrun.sh: COMMAND must be train or verify, got '$COMMAND'" >&2; exit 2 ;;
esac

args=(--nproc_per_node="$NPROC_PER_NODE" --max_restarts="$MAX_RESTARTS")
if [[ "$NNODES" == 1 && -z "$RDZV_ENDPOINT" ]]; then
  args+=(--standalone)
else
  if [[ -z "$RDZV_ENDPOINT" ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (a host every node can reach)" >&2
    exit 2
  fi
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

rc=0
"$PYTHON" -m torch.distributed.run "${args[@]}" -m dist_train "$COMMAND" --config "$CONFIG" "$@" || rc=$?
if [[ $rc -ne 0 ]]; then
  echo "launch/torchrun.sh: torchrun exited with code $rc; the first failing rank's error is above" \
       "(a RendezvousTimeoutError means not all $NNODES node(s) reached ${RDZV_ENDPOINT:-the local rendezvous} within RDZV_TIMEOUT=${RDZV_TIMEOUT}s)" >&2
fi
exit $rc
