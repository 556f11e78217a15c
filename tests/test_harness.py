"""The test harness itself: ranks forked by the warm server (tests/dist_utils.spawn) and commands forked
by it (tests/forkserver.run). A failing or hung body fails its own test, with the rank named, and leaves
the server able to run the next one."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests import forkserver
from tests.conftest import ROOT, cli
from tests.dist_utils import spawn


def _allreduce_rank():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        return dist.get_rank(), float(t), os.getpid()
    finally:
        dist.destroy_process_group()


def _rank1_fails_while_rank0_waits():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # never completes: rank 1 is gone
    return "unreachable"


def _rank1_hangs():
    if int(os.environ["RANK"]) == 1:
        time.sleep(3600)
    return "rank 0 done"


def test_ranks_are_real_processes_of_their_own_that_reduce_over_gloo():
    first = spawn(_allreduce_rank, 2)
    assert [(r, v) for r, v, _ in first] == [(0, 3.0), (1, 3.0)]
    second = spawn(_allreduce_rank, 2)
    pids = {pid for *_, pid in first + second}
    assert len(pids) == 4 and os.getpid() not in pids  # fresh processes every time, never this one


def test_a_failing_rank_fails_with_its_traceback_and_the_next_body_runs():
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as e:
        spawn(_rank1_fails_while_rank0_waits, 2, timeout=120)
    assert "rank 1:" in str(e.value) and "ValueError: planted failure on rank 1" in str(e.value)
    assert "Traceback" in str(e.value)
    assert time.monotonic() - t0 < 60  # rank 0, stuck in its barrier, was killed, not waited for
    assert [v for _, v, _ in spawn(_allreduce_rank, 2)] == [3.0, 3.0]


def test_a_hung_rank_times_out_naming_it_and_the_next_body_runs():
    with pytest.raises(AssertionError, match=r"timed out after 3s; ranks that had not finished: \[1\]") as e:
        spawn(_rank1_hangs, 2, timeout=3)
    # Where it hung: the rank's stacks (faulthandler), and that its body had not returned. The signal that
    # asks for them is none dist_train acts on (SIGUSR1 would be a requeue request).
    from dist_train.signals import REQUEUE_SIGNALS

    assert forkserver.DUMP_SIGNAL not in (*REQUEUE_SIGNALS, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    assert "rank 1 (its body had not returned)" in str(e.value)
    assert re.search(r'File ".*test_harness.py", line \d+ in _rank1_hangs', str(e.value)), str(e.value)
    assert [v for _, v, _ in spawn(_allreduce_rank, 2)] == [3.0, 3.0]


def test_a_forked_command_has_its_own_cwd_and_exit_code(tmp_path):
    p = cli("train", "--config", "missing.yaml", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr == "dist-train: error: config file 'missing.yaml' not found\n"
    assert not list(tmp_path.iterdir())


def _hanging_factory(d) -> list[str]:
    """A command that hangs for good: its model factory's module sleeps at import."""
    (d / "hang.py").write_text("import time\ntime.sleep(3600)\n")
    return ["train", "--config", str(ROOT / "configs/debug.yaml"), "model.factory=hang:build", "run.out_dir=out"]


def test_a_forked_command_that_hangs_is_killed_at_its_timeout(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(forkserver.subprocess.TimeoutExpired):
        forkserver.run(_hanging_factory(tmp_path), cwd=tmp_path, env=dict(os.environ), timeout=2)
    assert time.monotonic() - t0 < 30
    assert cli("train", "--config", "missing.yaml", cwd=tmp_path).returncode == 2  # the server goes on


def test_a_command_killed_by_a_signal_reports_it(tmp_path):
    with open(os.devnull, "rb") as inp, open(tmp_path / "log", "wb") as out:
        sock, pid = forkserver.start(["-m", *_hanging_factory(tmp_path)], tmp_path, dict(os.environ),
                                     (inp.fileno(), out.fileno(), out.fileno()))
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    assert forkserver.wait(sock, pid, 60) == -signal.SIGKILL


def test_the_forked_torchrun_agent_gives_each_worker_torchruns_environment_and_forwards_signals(tmp_path):
    """tests/forkserver._agent stands in for torchrun where the launcher is not what is tested: a stop signal
    to the agent reaches every worker (STOP_TARGET=parent: rank 0's model signals its parent, the agent), the
    run stops on both ranks and the job exits 128 + SIGTERM, as under torchrun."""
    from tests.conftest import DEBUG, torchrun_cli

    run = tmp_path / "run"
    p = torchrun_cli("train", "-c", str(DEBUG), f"run.out_dir={run}", "train.max_steps=50", "optim.warmup_steps=0",
                     "logging.every=1", "logging.wandb.mode=disabled", "model.factory=tests.helpers:signal_gpt",
                     nproc=2, env={"STOP_AT_CALL": "2", "STOP_TARGET": "parent"})
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "2 processes (torchrun, backend gloo)" in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("dist-train: stopped: SIGTERM")]) == 1


def test_the_forked_torchrun_agent_stops_the_others_when_a_worker_fails(tmp_path):
    from tests.conftest import DEBUG, torchrun_cli

    t0 = time.monotonic()
    p = torchrun_cli("train", "-c", str(DEBUG), f"run.out_dir={tmp_path / 'r'}", "train.max_steps=12",
                     "logging.wandb.mode=disabled", "model.factory=tests.helpers:fail_on_rank1", nproc=2, timeout=120)
    assert p.returncode == 1 and "planted failure on this rank" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 60
