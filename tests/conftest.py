from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train import deepspeed_shm
from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
#: A short debug run for end-to-end comparisons of launchers and strategies.
FAST = ["train.max_steps=12", "optim.warmup_steps=4", "logging.every=4", "logging.progress=plain"]


#: One intra-op thread per process, as torchrun gives its workers: the suite runs a worker per core, and each
#: test starts processes of its own, so torch's default (a thread per core in every process) oversubscribes
#: the cores, and threads waiting for a core cost more than they compute (measured on the 2-core machine:
#: 30% less CPU time and 20% less wall time for the resume and strategy tests). Set before anything imports
#: torch, so the workers, the test server and every process they start inherit it; a value already exported
#: is kept. One fresh run keeps torch's default (test_robustness: a signal stops a single process).
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: The shims (`python`, `dist-train`) that send a shell line's dist_train commands to the forkserver.
SHIMS = ROOT / "tests" / "bin"
#: The interpreter the shims run (the one running the tests).
os.environ["DIST_TRAIN_TEST_PYTHON"] = sys.executable


def _command_env(env: dict | None, drop: tuple[str, ...] = ("WANDB_",)) -> dict:
    """A test command's environment: this one without the variables in `drop` (W&B never goes online in
    tests; a torchrun job drops a launcher's too), dist_train from this checkout, then `env`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    full_env.update({"WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)})
    full_env.update(env or {})
    return full_env


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m dist_train ARGS` as a user would, as its own process forked by the warm test server
    (tests/forkserver.py)."""
    return forkserver.run(list(args), cwd=cwd, env=_command_env(env), timeout=timeout)


def torchrun_cli(*args: str, nproc: int, cwd: Path = ROOT, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC -m dist_train ARGS`, with the workers torchrun would start
    (its environment, its signal forwarding, the others stopped when one fails) forked warm
    (tests/forkserver._agent): for tests of the workers; the real launchers run in the launcher tests and
    the README's commands."""
    drop = ("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC")
    return forkserver.torchrun(list(args), nproc, cwd=cwd, env=_command_env(env, drop), timeout=timeout)


def warm_launch_env(env: dict) -> dict:
    """For a launch script whose launcher is not what a test checks: its $PYTHON is the shim, so the
    launcher and the workers it starts are forked warm (tests/bin/python). Each launcher also runs with
    fresh workers, in the test named where this is used."""
    forkserver.ForkServer.get()
    return dict(env, PYTHON=str(SHIMS / "python"), DIST_TRAIN_TEST_FORKSERVER=os.environ[forkserver.SOCKET_ENV])


_SESSION_START = time.monotonic()

#: Test files in the order the workers should take them, the costliest first (a test file runs on one worker:
#: `--dist loadfile`), so that the last files handed out are short and the workers end together. Seconds on
#: the 2-core machine under `-n 2`: deepspeed 135, readme 125, robustness 110, slurm 95, strategies 70,
#: resume 65, distributed 55, clipper 50, then 20 and less. `--no-loadscope-reorder` (pyproject.toml) keeps
#: this order:
#: pytest-xdist would otherwise hand out the files with the most tests first (the bad-input table), and the
#: README test, one of the longest, started last. xdist gives a worker its next file once it has 2 tests or
#: fewer left, so a worker holds the next file while it runs the README test's second test. Files not named
#: keep their place after these. A hint for speed only; any order passes.
HEAVY = ("test_deepspeed.py", "test_readme.py", "test_robustness.py", "test_slurm.py", "test_strategies.py",
         "test_resume.py", "test_distributed.py", "test_tasks.py", "test_clipper.py", "test_bad_input.py", "test_train.py",
         "test_harness.py",
         "test_shuffle.py", "test_adaptive_strategies.py", "test_spikes.py", "test_checkpoint_faults.py",
         "test_fused_step.py", "test_token_file.py", "test_data.py", "test_user_facing.py", "test_ci.py")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at least 2 (most of a test's time is waiting for its processes) and
    at most 4 (the tests' launchers and Slurm jobs each start several processes)."""
    return max(2, min(os.cpu_count() or 1, 4))


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY)))  # stable: the rest keep their order


#: DeepSpeed's shared-memory buffers there before the suite started (stale ones, or another program's).
_SHM_BEFORE = set(deepspeed_shm.SHM.glob(f"{deepspeed_shm.PREFIX}_*"))
_SHM_LEAKED: list[Path] = []


def pytest_sessionfinish(session):
    """The suite fails if it leaves DeepSpeed shm buffers behind: each is 69 MB of RAM taken until reboot, and
    a few hundred runs filled a 24 GiB machine (dist_train.deepspeed_shm). Checked once, by the controller."""
    if hasattr(session.config, "workerinput"):
        return
    _SHM_LEAKED.extend(p for p in deepspeed_shm.stale() if p not in _SHM_BEFORE)
    if _SHM_LEAKED and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    """The suite's wall time, last: what CI and a contributor compare (README, Contributing)."""
    if _SHM_LEAKED:
        terminalreporter.write_line(f"FAILED: the suite left {len(_SHM_LEAKED)} DeepSpeed shm buffer(s) that no "
                                    f"process uses, {', '.join(p.name for p in _SHM_LEAKED)}: a DeepSpeed run (the "
                                    "suite's, or another program's on this machine meanwhile) did not call "
                                    "dist_train.release_deepspeed_shm()", red=True)
    terminalreporter.write_line(f"suite wall time: {time.monotonic() - _SESSION_START:.0f} s")


@pytest.fixture(scope="session", autouse=True)
def _forkserver_shutdown():
    yield
    forkserver.ForkServer.shutdown()


@pytest.fixture
def default_port_taken():
    """Port 29500, the launchers' usual default, held by a listener for the test: a launch on one machine
    must take a free port, as two jobs on one machine (or two test workers) would otherwise collide."""
    with socket.socket() as s:
        try:
            s.bind(("", 29500))
            s.listen()
        except OSError:
            pass  # something else holds it already: as good
        yield 29500


@pytest.fixture
def no_wandb_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def single_runs(tmp_path_factory):
    """Single-process fp32 runs of the debug config: clean, and with a NaN at forward call 5 (step 6)."""
    from dist_train.cli import main

    root = tmp_path_factory.mktemp("single")
    os.environ["NAN_CALLS"] = "5"
    try:
        for name, extra in (("clean", []), ("nan", ["model.factory=tests.helpers:nan_gpt"])):
            assert main(["train", "-c", str(DEBUG), f"run.out_dir={root / name}", *FAST,
                         "logging.wandb.mode=disabled", *extra]) == 0
    finally:
        del os.environ["NAN_CALLS"]
    return root


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint folder `checkpoints/latest` names."""
    root = Path(run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def checkpoint_params(run_dir_or_folder: Path) -> dict:
    """The fp32 model weights, whole, of a run's latest checkpoint (or of a checkpoint folder), whatever
    strategy wrote it: one file, torch.distributed.checkpoint shards, or DeepSpeed's ZeRO partitions."""
    import torch

    folder = Path(run_dir_or_folder)
    if not folder.name.startswith("step_"):
        folder = latest_checkpoint(folder)
    if (folder / "checkpoint.pt").exists():
        return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]
    if (folder / ".metadata").exists():
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as d:
            dcp_to_torch_save(folder, Path(d) / "whole.pt")
            return torch.load(Path(d) / "whole.pt", weights_only=False)["model"]
    if not list(folder.glob("*optim_states.pt")):
        return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
