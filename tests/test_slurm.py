"""Slurm: a real two-node cluster on this machine (tests/slurm/cluster.sh), with real sbatch jobs.

CI starts the cluster before the tests (.ci/run exports SLURM_CONF) and sets
DIST_TRAIN_REQUIRE_SLURM=1, so a cluster that cannot start fails there instead of
skipping. Elsewhere the fixture starts a throwaway cluster itself, or skips with the reason.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLUSTER = ROOT / "tests/slurm/cluster.sh"


def _unavailable(reason: str):
    if os.environ.get("DIST_TRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"the Slurm test cluster is required here but {reason}")
    pytest.skip(f"no Slurm test cluster: {reason}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment clients of the test cluster need (SLURM_CONF)."""
    if os.environ.get("SLURM_CONF"):
        yield {"SLURM_CONF": os.environ["SLURM_CONF"]}
        return
    if os.geteuid() != 0:
        _unavailable("starting one needs root")
    d = tmp_path_factory.mktemp("slurm")
    p = subprocess.run(["bash", str(CLUSTER), "start", str(d)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        _unavailable(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"start exited {p.returncode}")
    try:
        yield {"SLURM_CONF": str(d / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(d)], capture_output=True, timeout=60)


def sbatch(slurm: dict, script: str, tmp: Path, *args: str, timeout: float = 120) -> tuple[str, str]:
    """Submit `script` (text), wait for the job to leave the queue; (final state, its output)."""
    path = tmp / "job.sh"
    path.write_text(script)
    env = {**os.environ, **slurm}
    out = tmp / "job-%j.out"
    job = subprocess.run(["sbatch", "--parsable", f"--output={out}", *args, str(path)], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                               text=True).stdout
        if any(f"JobState={s}" in state for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
            break
        time.sleep(0.3)
    final = next((w.split("=")[1] for w in state.split() if w.startswith("JobState=")), "UNKNOWN")
    text = Path(str(out).replace("%j", job)).read_text() if Path(str(out).replace("%j", job)).exists() else ""
    return final, text


def test_the_test_cluster_runs_one_task_on_each_of_two_nodes(slurm, tmp_path):
    script = ("#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --time=2\n"
              "srun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME'\n")
    state, out = sbatch(slurm, script, tmp_path)
    assert state == "COMPLETED", out
    assert sorted(line for line in out.splitlines() if line.startswith("task ")) == ["task 0 on n1", "task 1 on n2"], out


def test_bare_srun_trains_one_rank_per_task_like_one_process(slurm, tmp_path, single_runs):
    """`srun python -m dist_train train` with one task on each node: ranks from the step's Slurm variables,
    the port derived from the job id. The test cluster's node names do not resolve, so the batch script
    gives MASTER_ADDR as the first node's address, as a cluster's script would where names do not."""
    import sys

    from dist_train.metrics import read_jsonl
    from tests.conftest import DEBUG, FAST
    from tests.test_strategies import assert_same_trajectory

    run = tmp_path / "run"
    script = f"""#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
srun {sys.executable} -m dist_train train -c {DEBUG} run.out_dir={run} {' '.join(FAST)} logging.wandb.mode=disabled
"""
    state, out = sbatch(slurm, script, tmp_path, f"--chdir={tmp_path}", timeout=240)
    assert state == "COMPLETED", out
    assert "2 processes (slurm, backend gloo)" in out, out
    assert_same_trajectory(read_jsonl(run / "metrics.jsonl"), read_jsonl(single_runs / "clean/metrics.jsonl"), 1e-5)
