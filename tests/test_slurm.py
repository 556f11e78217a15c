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


def submit(slurm: dict, script: Path, out: Path, options: list[str], args: list[str] = (), env: dict | None = None,
           cwd: Path = ROOT) -> str:
    """sbatch [options] script [args]; the job id."""
    full = {**os.environ, **slurm, **(env or {})}
    return subprocess.run(["sbatch", "--parsable", f"--output={out}", *options, str(script), *args], env=full, cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip().split(";")[0]


def job_info(slurm: dict, job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], env={**os.environ, **slurm}, capture_output=True,
                          text=True).stdout
    return dict(w.split("=", 1) for w in text.split() if "=" in w)


def wait_job(slurm: dict, job: str, timeout: float = 120) -> dict[str, str]:
    """Until the job has left the queue for good (a requeued job comes back): its final `scontrol show job`."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(slurm, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.3)
    subprocess.run(["scancel", job], env={**os.environ, **slurm})
    raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout} s")


def sbatch(slurm: dict, script: str, tmp: Path, *args: str, timeout: float = 120) -> tuple[str, str]:
    """Submit `script` (text), wait for the job to leave the queue; (final state, its output)."""
    path = tmp / "job.sh"
    path.write_text(script)
    out = tmp / "job.out"
    info = wait_job(slurm, submit(slurm, path, out, list(args)), timeout)
    return info["JobState"], out.read_text() if out.exists() else ""


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


# ---- the slurm/ sbatch scripts, as shipped, with the CPU overrides a GPU-less cluster needs -----------
#: sbatch options that adapt the GPU scripts to the test cluster (no GPUs, 2 CPUs a node), as a user of a
#: CPU cluster would pass them; the scripts themselves are submitted unchanged.
CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=5"]
#: 40 steps of 32 samples: long enough to be preempted in the middle.
JOB_ARGS = ["train.max_steps=40", "optim.warmup_steps=4", "logging.every=4", "logging.progress=plain",
            "model.factory=tests.helpers:signal_gpt"]


def job_env(tmp: Path, **extra: str) -> dict:
    """What the test's submission exports to the job: the interpreter, the first node's address (the
    simulated node names do not resolve), W&B offline and quiet, where to note each rank's node."""
    import sys

    where = tmp / "where"
    where.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHON=sys.executable, MASTER_ADDR="127.0.0.1", WANDB_SILENT="true", WHERE_DIR=str(where), **extra)
    return env


def nodes_of_ranks(tmp: Path) -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted((tmp / "where").iterdir())}


@pytest.fixture(scope="module")
def torchrun_job(slurm, tmp_path_factory):
    """slurm/torchrun.sbatch over two nodes, uninterrupted: (run directory, job info, log)."""
    tmp = tmp_path_factory.mktemp("torchrun_job")
    run, out = tmp / "run", tmp / "job.out"
    job = submit(slurm, ROOT / "slurm/torchrun.sbatch", out, CPU, [f"run.out_dir={run}", *JOB_ARGS,
                 "logging.wandb.mode=offline"], env=job_env(tmp))
    info = wait_job(slurm, job, timeout=180)
    return run, info, out.read_text(), tmp


def test_torchrun_sbatch_trains_over_two_nodes_like_one_process(torchrun_job, tmp_path):
    from dist_train.metrics import read_jsonl
    from tests.conftest import DEBUG, cli
    from tests.test_strategies import assert_same_trajectory

    run, info, log, tmp = torchrun_job
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "0" and info["NodeList"] == "n[1-2]"
    assert "2 processes (torchrun, backend gloo)" in log and "strategy ddp: DDP over 2 processes" in log, log
    # One rank on each node (c10d hands out ranks in the order the agents join: either node may be rank 0).
    ranks = nodes_of_ranks(tmp)
    assert sorted(ranks) == ["rank0", "rank1"] and sorted(ranks.values()) == ["n1", "n2"], ranks
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(4, 41, 4))  # written once: one writer, no duplicate rows
    ref = tmp_path / "single"
    p = cli("train", "-c", str(DEBUG), f"run.out_dir={ref}", *JOB_ARGS, "logging.wandb.mode=disabled")
    assert p.returncode == 0, p.stderr
    assert_same_trajectory(rows, read_jsonl(ref / "metrics.jsonl"), 1e-5)


def test_preemption_checkpoints_requeues_and_continues_exactly(slurm, torchrun_job, tmp_path):
    """The scripts' signal (SIGUSR2 to every process of the job step, what --signal=USR2@120 sends) in the
    middle of the run: checkpoint, scontrol requeue by rank 0, the requeued job resumes by itself. The end
    result equals the uninterrupted job's bit for bit: the same 2-rank arithmetic on the same batches."""
    from dist_train.metrics import read_jsonl
    from tests.test_resume import assert_resumed_equals
    from tests.wandb_reader import history_of

    ref = torchrun_job[0]
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, ROOT / "slurm/torchrun.sbatch", out, CPU, [f"run.out_dir={run}", *JOB_ARGS,
                 "logging.wandb.mode=offline"], env=job_env(tmp_path, SLOW_S="0.1"))
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_bytes().count(b"\n") >= 2):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "the job never logged"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], env={**os.environ, **slurm}, check=True)
    info = wait_job(slurm, job, timeout=240)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    stop = [ln for ln in log.splitlines() if "SIGUSR2: stopped after a checkpoint" in ln]
    assert len(stop) == 1 and f"Slurm job {job} requeued" in stop[0], log  # rank 0 alone requeued it
    k = int(stop[0].split("checkpoints/step_")[1].split(")")[0])
    assert 8 <= k < 40
    assert "(restart 0)" in log and "(restart 1)" in log  # one log, appended to (--open-mode=append)
    assert f"resumed from {run / 'checkpoints' / f'step_{k:08d}'} (step {k})" in log
    assert "Traceback" not in log
    assert_resumed_equals(run, ref, k)  # metrics and final weights equal the uninterrupted job's
    # One W&B run: the requeued job continued it (same id), and every row reached it once.
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name, files
    assert sorted(row["_step"] for f in files for row in history_of(f)) == [
        r["step"] for r in read_jsonl(run / "metrics.jsonl")]


@pytest.mark.parametrize("script", ["accelerate", "deepspeed"])
def test_accelerate_and_deepspeed_sbatch_train_over_two_nodes(slurm, torchrun_job, tmp_path, script):
    """slurm/accelerate.sbatch (CPU recipe: launch/accelerate.sh sets ACCELERATE_USE_CPU) and
    slurm/deepspeed.sbatch (ZeRO-2 over gloo): the same trajectory as the torchrun job. What these prove is
    the scripts' wiring (one task a node, machine ranks, the rendezvous, the launch scripts under srun), so
    the launchers' modules and their workers are forked warm (conftest.warm_launch_env); Accelerate's and
    DeepSpeed's launchers run with fresh workers in test_strategies and test_deepspeed, and the torchrun
    jobs here run fresh end to end."""
    from dist_train.metrics import read_jsonl
    from tests.conftest import warm_launch_env
    from tests.test_strategies import assert_same_trajectory

    run, out = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, ROOT / f"slurm/{script}.sbatch", out, CPU, [f"run.out_dir={run}", *JOB_ARGS,
                 "logging.wandb.mode=disabled"], env=warm_launch_env(job_env(tmp_path)))
    info = wait_job(slurm, job, timeout=240)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", log
    ranks = nodes_of_ranks(tmp_path)
    assert sorted(ranks) == ["rank0", "rank1"] and sorted(ranks.values()) == ["n1", "n2"], ranks
    want = {"accelerate": "Accelerate MULTI_CPU over 2 processes", "deepspeed": "ZeRO stage 2 over 2 processes"}
    assert want[script] in log, log
    assert_same_trajectory(read_jsonl(run / "metrics.jsonl"), read_jsonl(torchrun_job[0] / "metrics.jsonl"), 1e-5)


def test_the_article_model_trains_under_the_torchrun_sbatch(slurm, tmp_path):
    """The README's Slurm line for the article's CNN: slurm/torchrun.sbatch with CONFIG=configs/seed_cnn.yaml,
    over two nodes, matches the plain-torch loop of tests/test_tasks.py step by step (the launchers forked warm:
    this proves the config travels through the job; the torchrun jobs above run fresh)."""
    from examples.seed_cnn import write
    from tests.conftest import warm_launch_env
    from tests.test_tasks import SEED_CNN, TRAIN_N, VAL_N, assert_rows_match, cnn_args, reference, rows

    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "job.out"
    write(data, TRAIN_N, VAL_N, 0)
    env = warm_launch_env(job_env(tmp_path, CONFIG=SEED_CNN))
    job = submit(slurm, ROOT / "slurm/torchrun.sbatch", out, CPU, cnn_args(data, run)[3:], env=env)
    info = wait_job(slurm, job, timeout=240)
    assert info["JobState"] == "COMPLETED", out.read_text()
    assert "task classify (10 classes" in out.read_text()
    assert_rows_match(rows(run), reference(data, world=2)[0])


def test_debug_sbatch_is_preempted_through_the_batch_shell_and_resumes(slurm, tmp_path):
    """slurm/debug.sbatch has no job step: its signal is B:USR2 to the batch shell, which exec'd dist-train.
    Sent mid-run (scancel --batch): checkpoint, requeue, resume, the same trajectory as one process."""
    from tests.conftest import DEBUG, cli
    from tests.test_resume import assert_resumed_equals

    ref = tmp_path / "ref"
    assert cli("train", "-c", str(DEBUG), f"run.out_dir={ref}", *JOB_ARGS, "logging.wandb.mode=disabled").returncode == 0
    run, out = tmp_path / "run", tmp_path / "job.out"
    job = submit(slurm, ROOT / "slurm/debug.sbatch", out, ["--gpus=0", "--cpus-per-task=1", "--time=5"],
                 [f"run.out_dir={run}", *JOB_ARGS, "logging.wandb.mode=disabled"], env=job_env(tmp_path, SLOW_S="0.1"))
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_bytes().count(b"\n") >= 2):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "the job never logged"
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], env={**os.environ, **slurm}, check=True)
    info = wait_job(slurm, job, timeout=240)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    k = int(log.split("checkpoints/step_")[1].split(")")[0])
    assert "1 process (no launcher)" in log and f"(step {k}); metrics.jsonl continues" in log, log
    assert_resumed_equals(run, ref, k)


def test_requeue_without_scontrol_says_what_to_do(tmp_path, monkeypatch):
    """Inside some containers scontrol is missing: the requeue fails with a reason (the CLI then says the
    checkpoint is written and to resubmit), never silently."""
    from dist_train.distributed import requeue_slurm_job
    from dist_train.errors import TrainingError

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol on it
    with pytest.raises(TrainingError, match=r"scontrol requeue 42 could not run"):
        requeue_slurm_job({"SLURM_JOB_ID": "42"})
    with pytest.raises(TrainingError, match="not a Slurm job"):
        requeue_slurm_job({})
