"""Data parallel over gloo: gradients averaged before the norm, world-size
invariance, one gradient sync per step, launch scripts, verify, bounded failures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from dist_train.preflight import load_config
from dist_train.strategies.ddp import check_replicas, unwrap
from dist_train.distributed import DistState
from dist_train.errors import TrainingError, UsageError
from dist_train.metrics import read_jsonl
from dist_train.trainer import build, micro_batches, optimizer_step
from tests.conftest import ROOT, cli, torchrun_cli
from tests.dist_utils import free_port, spawn

DEBUG = ROOT / "configs/debug.yaml"
STEPS = 4
# Small and clipping hard, so that where clipping happens matters.
OVERRIDES = ["train.global_batch_size=16", "clip.max_norm=0.3", "model.n_layer=1", "model.d_model=32"]


def _cfg(accum: int):
    return load_config(DEBUG, OVERRIDES + [f"train.grad_accum_steps={accum}"])


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in unwrap(model).parameters()])


def _reference(accum: int, world_size: int):
    """Single process over the concatenated global batch, same micro-batch size as a rank."""
    s = build(_cfg(accum * world_size))
    raws, params = [], []
    for step in range(STEPS):
        m = optimizer_step(s, step)
        raws.append(m.grad_norm_raw.item())
        params.append(_flat(s.model))
    return raws, params


def _ddp_run(accum: int):
    """On each rank: STEPS optimizer steps of the real DDP setup, counting gradient all-reduces."""
    state = DistState.from_env()
    s = build(_cfg(accum), state, torch.device("cpu"))
    calls = []

    def counting_hook(process_group, bucket):
        calls[-1] += 1
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(process_group, bucket)

    s.model.register_comm_hook(state=None, hook=counting_hook)
    raws, params = [], []
    for step in range(STEPS):
        calls.append(0)
        m = optimizer_step(s, step)
        raws.append(m.grad_norm_raw.item())
        params.append(_flat(s.model))
    return raws, params, calls


def _clip_before_allreduce_run():
    """The classic bug: clip each rank's local gradients, then average them."""
    state = DistState.from_env()
    s = build(_cfg(1), state, torch.device("cpu"), sync_grads=False)
    raws, params = [], []
    for step in range(STEPS):
        (w,) = micro_batches(s, step)  # one micro-batch of token windows
        x, y = w[:, :-1], w[:, 1:]
        torch.nn.functional.cross_entropy(s.model(x).flatten(0, 1), y.flatten()).backward()
        raw = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.clip.max_norm)
        for p in s.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= state.world_size
        s.optimizer.step()
        s.optimizer.zero_grad()
        s.scheduler.step()
        raws.append(raw.item())
        params.append(_flat(s.model))
    return raws, params


def _worker():
    state = DistState.from_env()
    with state.session(torch.device("cpu"), "gloo", timeout_s=60):
        return {
            "accum1": _ddp_run(1),
            "accum4": _ddp_run(4),
            "buggy": _clip_before_allreduce_run(),
        }


def assert_matches_reference(run, ref):
    raws, params = run[0], run[1]
    ref_raws, ref_params = ref
    for step, (a, b) in enumerate(zip(raws, ref_raws)):
        assert a == pytest.approx(b, rel=1e-5), f"raw norm at step {step + 1}: {a} vs {b}"
    for step, (a, b) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"params after step {step + 1}: {m}")


@pytest.fixture(scope="module")
def two_rank_results():
    return spawn(_worker, 2)


@pytest.mark.parametrize("accum", [1, 4])
def test_ddp_matches_single_process_on_every_rank(two_rank_results, accum):
    ref = _reference(accum, 2)
    for rank_result in two_rank_results:
        assert_matches_reference(rank_result[f"accum{accum}"], ref)
    a, b = (r[f"accum{accum}"][1] for r in two_rank_results)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)  # replicas bitwise identical after every step


def test_exactly_one_gradient_sync_per_optimizer_step(two_rank_results):
    for rank_result in two_rank_results:
        per_step_1 = rank_result["accum1"][2]
        per_step_4 = rank_result["accum4"][2]
        assert len(set(per_step_1)) == 1 and per_step_1[0] >= 1  # one sync = one pass over the buckets
        # with 4 micro-batches, still exactly one sync: the 3 others ran under no_sync
        assert per_step_4 == per_step_1


def test_negative_control_clipping_before_allreduce_fails_parity(two_rank_results):
    ref = _reference(1, 2)
    for rank_result in two_rank_results:
        with pytest.raises(AssertionError):
            assert_matches_reference(rank_result["buggy"], ref)


def _replica_guard_worker():
    state = DistState.from_env()
    with state.session(torch.device("cpu"), "gloo", timeout_s=60):
        s = build(_cfg(1), state, torch.device("cpu"))
        check_replicas(s.strategy.full_parameters(s.model), state, step=1)  # identical: passes
        if state.rank == 1:
            with torch.no_grad():
                next(unwrap(s.model).parameters()).view(-1)[0] += 1e-6
        try:
            check_replicas(s.strategy.full_parameters(s.model), state, step=2)
        except TrainingError as e:
            return str(e)
        return None


def test_replica_guard_stops_every_rank_when_parameters_differ():
    messages = spawn(_replica_guard_worker, 2)
    for msg in messages:
        assert msg is not None and msg.startswith("replicas diverged at step 2")


SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]"}

ENV_CASES = [
    ({}, DistState()),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     DistState(rank=1, local_rank=1, world_size=2, launcher="env")),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     DistState(rank=3, local_rank=1, world_size=4, local_world_size=2, launcher="torchrun")),
    ({"RANK": "0", "WORLD_SIZE": "1"}, DistState(launcher="env")),
    # Slurm: a batch script itself is one process, whatever the job's task count ...
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}, DistState()),
    # ... a task of `srun python -m dist_train` is a rank, the port derived from the job id ...
    ({**SLURM_STEP, "SLURM_PROCID": "1", "MASTER_ADDR": "h"},
     DistState(rank=1, world_size=2, launcher="slurm", rendezvous={"MASTER_PORT": "20007"})),
    # ... and torchrun (or exported env:// variables) inside an srun step win over the step's variables.
    ({**SLURM_STEP, "TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
      "MASTER_ADDR": "h", "MASTER_PORT": "1"}, DistState(rank=3, local_rank=1, world_size=4, launcher="torchrun")),
    ({**SLURM_STEP, "RANK": "0", "WORLD_SIZE": "1"}, DistState(launcher="env")),
]


@pytest.mark.parametrize("env, want", ENV_CASES)
def test_dist_state_from_env(env, want):
    assert DistState.from_env(env) == want


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"RANK": "0"}, "WORLD_SIZE is not set"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 but WORLD_SIZE=2"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not set"),
    ],
)
def test_dist_state_rejects_broken_launcher_env(env, fragment):
    with pytest.raises(UsageError, match=fragment):
        DistState.from_env(env)


def test_slurm_master_address_is_the_first_host_scontrol_expands(tmp_path, monkeypatch):
    """The node list is expanded by Slurm's own `scontrol show hostnames` (here a stand-in printing what it would)."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[1-2]" ] && printf "node1\\nnode2\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    state = DistState.from_env(SLURM_STEP)
    assert state.rendezvous == {"MASTER_ADDR": "node1", "MASTER_PORT": "20007"} and state.world_size == 2
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="export MASTER_ADDR in the batch script"):
        DistState.from_env(SLURM_STEP)


# ---- whole jobs under torchrun -------------------------------------------------------

FAST = ["train.max_steps=12", "optim.warmup_steps=4", "logging.every=4", "logging.wandb.mode=disabled"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, **extra)
    return env


def torchrun(*args, env=None, timeout=180):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _single_process_metrics(tmp_path):
    from dist_train.cli import main

    assert main(["train", "-c", str(DEBUG), f"run.out_dir={tmp_path / 'single'}", *FAST]) == 0
    return read_jsonl(tmp_path / "single/metrics.jsonl")


def assert_same_trajectory(rows, ref):
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for r, q in zip(rows, ref):
        for key in ("train/loss", "grad_norm/raw", "grad_norm/clipped", "grad_norm/clip_coef"):
            assert r[key] == pytest.approx(q[key], rel=1e-5), (r["step"], key)


def test_one_node_two_processes_match_single_process(tmp_path):
    p = subprocess.run(["bash", "launch/torchrun.sh", f"run.out_dir={tmp_path / 'two'}", "dist.check_sync_every=3",
                        *FAST], cwd=ROOT,
                       env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_trajectory(read_jsonl(tmp_path / "two/metrics.jsonl"), _single_process_metrics(tmp_path))


def test_two_simulated_nodes_with_c10d_rendezvous_match_single_process(tmp_path):
    port = free_port()
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
              "--rdzv_id=test", "-m", "dist_train", "train", "-c", str(DEBUG), f"run.out_dir={tmp_path / 'nodes'}", *FAST]
    procs = [torchrun(f"--node_rank={i}", *common) for i in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert_same_trajectory(read_jsonl(tmp_path / "nodes/metrics.jsonl"), _single_process_metrics(tmp_path))


def test_launch_script_two_nodes_with_fixed_node_ranks_match_single_process(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(["bash", "launch/torchrun.sh", f"run.out_dir={tmp_path / 'nodes'}", *FAST], cwd=ROOT,
                         env=_env(NNODES="2", NODE_RANK=str(i), NPROC_PER_NODE="1", RDZV_ENDPOINT=endpoint,
                                  RDZV_TIMEOUT="60"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert_same_trajectory(read_jsonl(tmp_path / "nodes/metrics.jsonl"), _single_process_metrics(tmp_path))


def test_verify_passes_and_catches_unsynchronised_gradients():
    """verify's workers (the README runs `COMMAND=verify launch/torchrun.sh` for real), and its self-test."""
    ok = torchrun_cli("verify", "-c", str(DEBUG), "--steps", "4", nproc=2)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict: PASS" in ok.stdout and "parameters identical on all ranks: yes" in ok.stdout
    bad = torchrun_cli("verify", "-c", str(DEBUG), "--steps", "3", "--inject", "unsynced-grads", nproc=2)
    assert bad.returncode != 0
    assert "verdict: FAIL" in bad.stdout and "parameters identical on all ranks: NO" in bad.stdout


def test_unreachable_rendezvous_fails_clearly_within_the_timeout(tmp_path):
    env = _env(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    p = cli("train", "-c", str(DEBUG), "dist.timeout_s=3", f"run.out_dir={tmp_path / 'r'}", env=env, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("dist-train: error: rank 1 of 2 could not join the process group")
    assert elapsed < 60
    assert not (tmp_path / "r").exists()


def test_one_rank_raising_ends_the_whole_job_promptly(tmp_path):
    t0 = time.monotonic()
    p = torchrun("--standalone", "--nproc_per_node=2", "-m", "dist_train", "train", "-c", str(DEBUG),
                 f"run.out_dir={tmp_path / 'r'}", "model.factory=tests.helpers:fail_on_rank1", *FAST)
    out = p.communicate(timeout=120)[0]
    assert p.returncode != 0
    assert "planted failure on this rank" in out
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize(
    "env, fragment",
    [({"NNODES": "2"}, "NNODES=2 needs RDZV_ENDPOINT"), ({"COMMAND": "evaluate"}, "COMMAND must be train or verify")],
)
def test_launch_script_rejects_bad_settings(env, fragment):
    p = subprocess.run(["bash", "launch/torchrun.sh"], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and fragment in p.stderr
