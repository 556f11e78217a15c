"""Which launcher started this process, from its environment variables alone.

No torch here: the command line reads these before it knows whether it will train at all (who prints
an error, how a multi-process rank exits), and a config error should not wait for torch to import.
"""

from __future__ import annotations

import os
from typing import Mapping

#: torch.distributed's env:// variables, as DistState fields.
TORCH_ENV = {"rank": "RANK", "local_rank": "LOCAL_RANK", "world_size": "WORLD_SIZE", "local_world_size": "LOCAL_WORLD_SIZE"}
#: Launcher -> (variables that identify it, {field: variable}). First match wins.
LAUNCHERS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # accelerate launch starts its processes through torch elastic, so it goes first.
    "accelerate": (("ACCELERATE_MIXED_PRECISION", "RANK"), TORCH_ENV),
    "torchrun": (("TORCHELASTIC_RUN_ID",), TORCH_ENV),
    # DeepSpeed's launcher (deepspeed.launcher.launch) names its node rank and local size its own way.
    "deepspeed": (("CROSS_RANK", "LOCAL_SIZE", "RANK"), {**TORCH_ENV, "local_world_size": "LOCAL_SIZE"}),
    # Any launcher that exports the env:// variables (accelerate, deepspeed, mpirun wrappers).
    "env": (("RANK",), TORCH_ENV),
    # A bare `srun python -m dist_train ...`, one task per device: a job step's variables. (A batch
    # script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but no SLURM_STEP_ID: one process.)
    "slurm": (("SLURM_STEP_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),
              {"rank": "SLURM_PROCID", "local_rank": "SLURM_LOCALID", "world_size": "SLURM_STEP_NUM_TASKS"}),
}


def world_size_from_env(env: Mapping[str, str] = os.environ) -> int:
    """The world size the launcher's variables give (WORLD_SIZE, or 1, where no launcher is recognised;
    1 when unreadable, which from_env reports). For decisions made before the process group exists,
    such as the strategy."""
    var = next((table["world_size"] for markers, table in LAUNCHERS.values() if all(m in env for m in markers)),
               TORCH_ENV["world_size"])
    try:
        return int(env.get(var, "1"))
    except ValueError:
        return 1


def ranks_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(rank, local rank) as the launcher set them, (0, 0) when unset or unreadable.

    For deciding who prints an error, where DistState.from_env may itself be what failed.
    """
    def read(var: str) -> int:
        try:
            return int(env.get(var, "0"))
        except ValueError:
            return 0

    if "RANK" not in env and "SLURM_STEP_ID" in env:  # a bare srun
        return read("SLURM_PROCID"), read("SLURM_LOCALID")
    return read(TORCH_ENV["rank"]), read(TORCH_ENV["local_rank"])


def gpu_count() -> int:
    """torch.cuda.device_count() as the launched processes will see it, without importing torch where its
    build has no GPU support: a torch built without CUDA or ROCm says so in its version file, read here in
    milliseconds, where importing torch to ask takes 1-3.5 s. A launch script runs this before it starts
    anything (ModuleNotFoundError: no torch for this interpreter, from the import at the end)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    for folder in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(folder, "version.py")
        if os.path.isfile(path):
            version: dict = {}
            with open(path, encoding="utf-8") as f:
                exec(compile(f.read(), path, "exec"), version)  # torch's own file: its version strings
            if not (version.get("cuda") or version.get("hip")):
                return 0
            break
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":  # python -m dist_train.launchers gpus: the launch scripts' question
    import sys

    if sys.argv[1:] != ["gpus"]:
        sys.exit("usage: python -m dist_train.launchers gpus")
    print(gpu_count())
