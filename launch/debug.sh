#!/usr/bin/env bash
# Single-process debug training: one GPU or the CPU, no launcher.
#
# Environment (all optional):
#   CONFIG        training config            (default: configs/debug.yaml)
#   DEVICE        auto | cpu | cuda          (default: auto)
#   PYTHON        interpreter with dist_train installed (default: python)
#   CUDA_VISIBLE_DEVICES  which GPU to use   (default: as set)
# Extra arguments are dotted config overrides, e.g.:
#   launch/debug.sh optim.lr=3e-4 clip.max_norm=0.5
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG="${CONFIG:-configs/debug.yaml}"
DEVICE="${DEVICE:-auto}"
PYTHON="${PYTHON:-python}"

# A leftover launcher environment would make this look like one rank of a job.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT

exec "$PYTHON" -m dist_train train --config "$CONFIG" "train.device=$DEVICE" "$@"
