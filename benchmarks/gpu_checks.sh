#!/usr/bin/env bash
# The checks that need a GPU, in one go (nothing in CI depends on them):
#   - the host-sync-free step under torch.cuda.set_sync_debug_mode("error"), and the fused-step tests, on CUDA;
#   - the whole-step and norm+clip benchmarks on the GPU.
# Run from the repository root in an environment with a CUDA build of torch and this package installed:
#   bash benchmarks/gpu_checks.sh            (figures go to stdout; quote the GPU's name with them)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
python -m pytest -q -p no:cacheprovider tests/test_fused_step.py -k "cuda or fused or folded or planted"
python benchmarks/bench_step.py --device cuda --steps 50 --rounds 10
python benchmarks/bench_clip.py --device cuda --steps 10 --rounds 10
