"""Strategies: FSDP2's global norm over shards, Accelerate under a real `accelerate launch`,
Accelerate's silent CPU fallbacks refused, every shipped Accelerate config valid.

In-process checks run 2 ranks over gloo (tests.dist_utils.spawn; for Accelerate with
the environment `accelerate launch` gives its processes, so that its real
Accelerator sets up MULTI_CPU). End-to-end checks run the launch scripts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from dist_train.clip import FixedClip
from dist_train.config import Precision
from dist_train.preflight import load_config
from dist_train.distributed import DistState
from dist_train.errors import ConfigError
from dist_train.metrics import read_jsonl
from dist_train.strategies import Plan, resolve
from dist_train.trainer import build, optimizer_step
from tests.conftest import DEBUG, FAST, ROOT, checkpoint_params, torchrun_cli, warm_launch_env
from tests.dist_utils import spawn
from tests.test_train import assert_wandb_matches_jsonl

CPU = torch.device("cpu")
STEPS = 4
# Small and clipping hard, so that which norm is clipped matters.
OVERRIDES = ["train.global_batch_size=16", "clip.max_norm=0.3", "model.n_layer=2", "model.d_model=32"]
COLLECTIVES = ("all_reduce", "reduce_scatter_single", "all_gather_single")


def _cfg(accum: int, *extra: str):
    return load_config(DEBUG, [*OVERRIDES, f"train.grad_accum_steps={accum}", *extra])


def _flat(s) -> torch.Tensor:
    return torch.cat([p.reshape(-1).float() for p in s.strategy.full_parameters(s.model)])


def _run(s, steps: int = STEPS) -> dict:
    """`steps` optimizer steps; per step the raw norm, the collectives the step made, the whole parameters."""
    import torch.distributed as dist

    calls: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            calls.append((name, t.numel()))
            return originals[name](*args, **kwargs)

        return call

    out = {"raw": [], "clipped": [], "loss": [], "calls": [], "params": [], "skipped": [], "loss_scale": [], "dtypes": set()}
    linear = next(m for m in s.model.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda mod, args, output: out["dtypes"].add(output.dtype))
    for step in range(steps):
        calls.clear()
        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        try:
            m = optimizer_step(s, step)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
        out["raw"].append(m.grad_norm_raw.item())
        out["clipped"].append(m.grad_norm_clipped.item())
        out["loss"].append(s.dist.mean(m.loss).item())
        out["skipped"].append(m.skipped)
        out["loss_scale"].append(None if m.loss_scale is None else m.loss_scale.item())
        out["calls"].append(list(calls))
        out["params"].append(_flat(s).cpu())
    hook.remove()
    return out


def _reference(accum: int, world_size: int = 2, precision: Precision = Precision.no) -> dict:
    """One process over the same global batches, in micro-batches of one rank's size."""
    return _run(build(_cfg(accum * world_size), DistState(), CPU, plan=Plan("single", precision)))


def _local_shard_norms(grads):
    """The common bug: the norm of this rank's shard, logged as if it were the model's."""
    local = [g.to_local() for g in grads]
    return torch.nn.utils.get_total_norm(local), torch.stack([g.norm() for g in local])


# ---- FSDP2 ---------------------------------------------------------------------------------
def _fsdp_worker():
    state = DistState.from_env()
    with state.session(CPU, "gloo", timeout_s=60):
        out = {f"accum{a}": _run(build(_cfg(a, "dist.strategy=fsdp"), state, CPU)) for a in (1, 4)}
        s = build(_cfg(1, "dist.strategy=fsdp"), state, CPU)
        out["units"] = s.strategy.units
        out["n_params"] = sum(1 for _ in s.model.parameters())
        s.strategy.grad_norms = _local_shard_norms
        out["local_norm"] = _run(s)
        ddp = build(_cfg(1, "dist.strategy=ddp"), state, CPU)
        assert ddp.plan.strategy == "ddp"
        out["ddp"] = _run(ddp)
        for strategy in ("fsdp", "ddp"):
            for precision in ("bf16", "fp16"):
                s = build(_cfg(1, f"dist.strategy={strategy}", f"train.precision={precision}"), state, CPU)
                out[f"{strategy}_{precision}"] = _run(s)
        os.environ["OVERFLOW_CALLS"] = "1"
        out["overflow"] = _run(build(_cfg(1, "dist.strategy=fsdp", "train.precision=fp16",
                                          "model.factory=tests.helpers:overflow_gpt"), state, CPU), 3)
        return out


@pytest.fixture(scope="module")
def fsdp_results():
    return spawn(_fsdp_worker, 2)


def assert_raw_norms_match(run, ref, rel=1e-5):
    for step, (a, b) in enumerate(zip(run["raw"], ref["raw"])):
        assert a == pytest.approx(b, rel=rel), f"raw norm at step {step + 1}: {a} vs the whole model's {b}"


@pytest.mark.parametrize("accum", [1, 4])
def test_fsdp_raw_norm_is_the_whole_models_norm_on_every_rank(fsdp_results, accum):
    ref = _reference(accum)
    for rank in fsdp_results:
        run = rank[f"accum{accum}"]
        assert_raw_norms_match(run, ref)
        for step, (a, b) in enumerate(zip(run["params"], ref["params"])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"params after step {step + 1}: {m}")


def test_negative_control_one_shards_norm_fails_the_check(fsdp_results):
    ref = _reference(1)
    for rank in fsdp_results:
        with pytest.raises(AssertionError):
            assert_raw_norms_match(rank["local_norm"], ref)


def test_fsdp_norm_costs_exactly_one_small_collective_and_one_reduce_scatter_per_unit(fsdp_results):
    """The norm is one all-reduce of the per-tensor sums of squares (one number per parameter tensor, which
    also gives the per-layer norms), never one per tensor, and never a gather of gradients."""
    for rank in fsdp_results:
        units = rank["units"]
        assert units == 3  # two blocks and the root
        for accum in (1, 4):
            for calls in rank[f"accum{accum}"]["calls"]:
                assert [c for c in calls if c[0] == "all_reduce"] == [("all_reduce", rank["n_params"])], calls
                # Gradients are reduced once per optimizer step, after the last micro-batch only.
                assert sum(c[0] == "reduce_scatter_single" for c in calls) == units, (accum, calls)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "single"])
@pytest.mark.parametrize("precision, dtype, rel", [("bf16", torch.bfloat16, 1e-2), ("fp16", torch.float16, 2e-3)])
def test_mixed_precision_computes_in_half_and_matches_fp32(fsdp_results, strategy, precision, dtype, rel):
    """FSDP2's MixedPrecisionPolicy, DDP's and a single process's autocast: the layers compute in bf16/fp16 (seen by a forward
    hook), and the norm stays within that format's rounding of fp32 (bf16 keeps 8 significant bits, fp16
    11; over these 4 steps FSDP2's raw norm drifted up to 4.7e-4 and 3.5e-4, measured, against 8e-8 in
    fp32). A missed average or unscale would be off by sqrt(2) or 65536."""
    ref = _reference(1)
    if strategy == "single":  # build_amp's autocast and GradScaler, on the whole global batch
        runs = [_reference(1, precision=Precision(precision))]
    else:
        runs = [rank[f"{strategy}_{precision}"] for rank in fsdp_results]
    for run in runs:
        assert run["dtypes"] == {dtype}
        assert_raw_norms_match(run, ref, rel=rel)
        if precision == "fp16":
            assert run["loss_scale"][0] == 65536.0


def test_fsdp_fp16_overflow_is_skipped_on_every_rank_with_one_loss_scale(fsdp_results):
    # The overflow is in one forward on every rank; the scaler's check is reduced over the mesh, so every
    # rank skips the same step and backs off to the same scale.
    runs = [rank["overflow"] for rank in fsdp_results]
    for run in runs:
        assert run["skipped"] == [False, True, False]
        assert run["loss_scale"] == [65536.0, 65536.0, 32768.0]
        assert torch.equal(run["params"][0], run["params"][1])  # the skipped step changed nothing
    assert runs[0]["params"][2].equal(runs[1]["params"][2])


def test_fsdp_parameters_match_the_ddp_run(fsdp_results):
    for rank in fsdp_results:
        for a, b in zip(rank["accum1"]["params"], rank["ddp"]["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- Accelerate, in process ----------------------------------------------------------------------
def _accelerate_worker(precision: str):
    # What `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --mixed_precision P` exports.
    os.environ.update(ACCELERATE_USE_CPU="true", ACCELERATE_MIXED_PRECISION=precision, OVERFLOW_CALLS="1")
    state = DistState.from_env()
    assert state.launcher == "accelerate"
    with state.session(CPU, "gloo", timeout_s=60):
        out = {}
        if precision == "no":
            for accum in (1, 4):
                s = build(_cfg(accum), state, CPU)
                assert s.plan == Plan("accelerate", Precision.no)
                reductions = []

                def hook(process_group, bucket):
                    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                    reductions[-1] += 1
                    return allreduce_hook(process_group, bucket)

                s.model.register_comm_hook(state=None, hook=hook)
                run = {"raw": [], "reductions": []}
                for step in range(STEPS):
                    reductions.append(0)
                    run["raw"].append(optimizer_step(s, step).grad_norm_raw.item())
                run["reductions"] = reductions
                out[f"accum{accum}"] = run
            return out
        out["clean"] = _run(build(_cfg(1), state, CPU))
        if precision == "fp16":
            with _norm_before_unscale():  # negative control
                out["no_unscale"] = _run(build(_cfg(1), state, CPU), 1)
            s = build(_cfg(1, "model.factory=tests.helpers:overflow_gpt"), state, CPU)
            policy = s.policy = RecordingClip(0.3)
            before = [], []
            for step in range(3):
                before[0].append(list(policy.seen))
                before[1].append(_flat(s).cpu())
                m = optimizer_step(s, step)
                out.setdefault("overflow", []).append((m.skipped, m.grad_norm_raw.item(), m.loss_scale.item()))
            out["policy_seen"] = [before[0][1], before[0][2], list(policy.seen)]
            out["params_around_overflow"] = before[1][1:] + [_flat(s).cpu()]
        return out


@contextlib.contextmanager
def _norm_before_unscale():
    """The bug: take the norm of the still-scaled fp16 gradients as the raw norm (the fused step's norm not
    divided by the loss scale)."""
    import dist_train.step as step

    original = step.unscaled_norm
    step.unscaled_norm = lambda norm, loss_scale: norm
    try:
        yield
    finally:
        step.unscaled_norm = original


class RecordingClip(FixedClip):
    """A fixed clip whose state is every raw norm it observed."""

    def __init__(self, max_norm):
        super().__init__(max_norm)
        self.seen: list[float] = []

    def observe(self, raw, taken):
        if taken:
            self.seen.append(raw.item())


def test_accelerate_no_sync_gives_one_gradient_reduction_per_optimizer_step():
    results = spawn(_accelerate_worker, 2, "no")
    for accum in (1, 4):
        ref = _reference(accum)
        for rank in results:
            run = rank[f"accum{accum}"]
            assert_raw_norms_match(run, ref)
            assert len(set(run["reductions"])) == 1 and run["reductions"][0] >= 1
    for rank in results:  # 4 micro-batches: still one pass over the buckets, the 3 others ran under no_sync
        assert rank["accum4"]["reductions"] == rank["accum1"]["reductions"]


@pytest.fixture(scope="module")
def accelerate_fp16():
    return spawn(_accelerate_worker, 2, "fp16")


def test_accelerate_fp16_norm_is_taken_after_unscaling(accelerate_fp16):
    ref = _reference(1)
    for rank in accelerate_fp16:
        # fp16 really ran (Accelerate turns it off on a CPU unless re-enabled): autocast and a scaler.
        assert rank["clean"]["dtypes"] == {torch.float16} and rank["clean"]["loss_scale"][0] == 65536.0
        # fp16 autocast rounds activations to 11 significant bits: a few 1e-4 relative on the norm.
        assert_raw_norms_match(rank["clean"], ref, rel=2e-3)
        with pytest.raises(AssertionError):  # negative control: without the unscale, 65536x the norm
            assert_raw_norms_match(rank["no_unscale"], {"raw": ref["raw"][:1]}, rel=2e-3)


def test_accelerate_fp16_overflow_skips_the_step_and_leaves_the_policy_alone(accelerate_fp16):
    for rank in accelerate_fp16:
        (s0, _, scale0), (s1, raw1, scale1), (s2, _, scale2) = rank["overflow"]
        assert (s0, s1, s2) == (False, True, False)
        assert not torch.isfinite(torch.tensor(raw1))
        assert scale1 == scale0 and scale2 == scale1 / 2  # the scaler backed off after the overflow
        seen_before, seen_after_overflow, seen_end = rank["policy_seen"]
        assert seen_after_overflow == seen_before and len(seen_end) == len(seen_before) + 1
        before, after_overflow, _ = rank["params_around_overflow"]
        assert torch.equal(before, after_overflow)


def test_accelerate_bf16_matches_fp32_within_bf16_rounding():
    ref = _reference(1)
    for rank in spawn(_accelerate_worker, 2, "bf16"):
        # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per value); a norm over many
        # values averages it down. 1e-2 is loose enough for that and far from any real bug.
        assert_raw_norms_match(rank["clean"], ref, rel=1e-2)
        assert rank["clean"]["dtypes"] == {torch.bfloat16}  # Accelerate's autocast really ran
        for a, b in zip(rank["clean"]["params"], ref["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3)  # AdamW steps of lr 3e-3, sign-like


# ---- Accelerate, end to end with launch/accelerate.sh --------------------------------------------
def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "RANK", "WORLD_SIZE", "MASTER_", "ACCELERATE_", "FSDP_"))}
    env.update({"PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "WANDB_SILENT": "true", **extra})
    return env


def _script(script: str, *args: str, timeout=300, warm: bool = False, **env) -> subprocess.CompletedProcess:
    """`bash SCRIPT ARGS`; warm: its launcher and workers forked by the test server (conftest.warm_launch_env)."""
    full = warm_launch_env(_env(**env)) if warm else _env(**env)
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def assert_same_trajectory(rows, ref, rel):
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for r, q in zip(rows, ref):
        assert r["optim/step_skipped"] == q["optim/step_skipped"], r["step"]
        for key in ("train/loss", "grad_norm/raw", "grad_norm/clipped", "grad_norm/clip_coef"):
            if key == "train/loss" and q["optim/step_skipped"]:
                continue  # NaN logits in the reference, a finite forward and an overflowing backward in fp16
            if q[key] is None:
                assert r[key] is None, (r["step"], key)
            else:
                assert r[key] == pytest.approx(q[key], rel=rel), (r["step"], key)


def _model_state(run_dir):
    return checkpoint_params(run_dir)


def assert_same_parameters(run_dir, ref_dir):
    """Final parameters of two runs over the same global batches, to fp32 summation-order noise.

    AdamW moves every parameter by about lr (3e-3) a step, whatever its gradient's size,
    so where a gradient is near zero the different order of the fp32 sums (2 ranks x 16
    samples vs 1 x 32) changes the update itself. Measured: blocks.0.attn.proj.weight[1, 41]
    has a step-1 gradient of -1.16e-8, the smallest of its 4096 (the median is 1.7e-3), a
    near-cancellation of 32 terms of ~1e-3 whose rounding (~5e-10) is a few % of it; the first
    update lr * g / (|g| + 1e-8) is ill-conditioned there, and under Accelerate with 4
    micro-batches it ended 1.1e-5 from the reference after 12 steps (7 of the 106240
    parameters differed by more than 5e-6, the largest by 1.12e-5). atol 3e-5 is 1/100 of
    one step; a missed or doubled gradient moves parameters by whole steps.
    """
    ref_state = _model_state(ref_dir)
    for name, value in _model_state(run_dir).items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-5, atol=3e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("accum", [1, 4])
def test_accelerate_launch_fp32_matches_single_process(tmp_path, single_runs, accum, default_port_taken):
    """With port 29500 taken: on one machine the script takes a free port (Accelerate's default would warn
    that it is in use and fall back, or two launches at once would race for it)."""
    run = tmp_path / "acc"
    # accum 1: the real launcher and fresh workers; accum 4 the same script with them forked warm.
    p = _script("launch/accelerate.sh", f"run.out_dir={run}", f"train.grad_accum_steps={accum}", *FAST,
                "logging.wandb.mode=" + ("offline" if accum == 1 else "disabled"), NUM_PROCESSES="2", warm=accum > 1)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "already in use" not in p.stderr, p.stderr
    assert "strategy accelerate: Accelerate MULTI_CPU over 2 processes (fp32)" in p.stderr
    assert_same_trajectory(read_jsonl(run / "metrics.jsonl"), read_jsonl(single_runs / "clean/metrics.jsonl"), 1e-5)
    assert_same_parameters(run, single_runs / "clean")
    if accum == 1:
        assert_wandb_matches_jsonl(run)


@pytest.mark.parametrize("precision, rel", [("bf16", 5e-2), ("fp16", 2e-3)])
def test_accelerate_launch_mixed_precision_matches_fp32(tmp_path, single_runs, precision, rel):
    """Shipped configs, Accelerate's precision. fp16 overflows at step 6; the fp32 reference has a NaN there.

    Tolerances: over 12 steps the rounding of each step feeds the next. bf16 keeps 8
    significant bits and drifted 1.5% from fp32 on the raw norm by step 8 (measured);
    fp16 keeps 11 and stayed within 2e-4. 5e-2 and 2e-3 leave room for that and still
    catch every real mistake, which changes the norm by a factor: sqrt(2) for a
    gradient not averaged over 2 ranks, 65536 for a
    missed unscale.
    """
    run = tmp_path / precision
    p = _script("launch/accelerate.sh", f"run.out_dir={run}", *FAST, "logging.wandb.mode=disabled",
                "model.factory=tests.helpers:overflow_gpt", NUM_PROCESSES="2",
                ACCELERATE_CONFIG=f"configs/accelerate/ddp_{precision}.yaml",
                OVERFLOW_CALLS="5" if precision == "fp16" else "")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"precision {precision}" in p.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    if precision == "fp16":
        ref = read_jsonl(single_runs / "nan/metrics.jsonl")
        skipped = [r for r in rows if r["optim/step_skipped"]]
        assert [r["step"] for r in skipped] == [6] and skipped[0]["grad_norm/raw"] is None
        scales = {r["step"]: r["amp/loss_scale"] for r in rows}
        assert scales[6] == 65536.0 and scales[8] == 32768.0  # halved by the overflow
    else:
        ref = read_jsonl(single_runs / "clean/metrics.jsonl")
    assert_same_trajectory(rows, ref, rel)
    # Really mixed precision, not fp32: fp16 overflowed where fp32 cannot (the factor 3e4 is finite in
    # fp32), and bf16 drifts from fp32 by far more than fp32's own summation-order noise (< 1e-6 here).
    if precision == "bf16":
        drift = max(abs(r["grad_norm/raw"] / q["grad_norm/raw"] - 1) for r, q in zip(rows, ref))
        assert drift > 1e-4, drift


def test_verify_under_accelerate_launch():
    """Forked warm (the launcher runs with fresh workers in the tests above)."""
    p = _script("launch/accelerate.sh", "--steps", "3", COMMAND="verify", NUM_PROCESSES="2", warm=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "strategy accelerate" in p.stdout and "verdict: PASS" in p.stdout


# ---- FSDP2, end to end under torchrun's workers (the README runs launch/torchrun.sh with FSDP2, train and verify)
def test_fsdp_under_torchrun_matches_single_process_and_wandb(tmp_path, single_runs):
    run = tmp_path / "fsdp"
    p = torchrun_cli("train", "-c", str(DEBUG), f"run.out_dir={run}", "dist.strategy=fsdp", *FAST,
                     "logging.wandb.mode=offline", nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "strategy fsdp: FSDP2 over 2 processes" in p.stderr
    assert_same_trajectory(read_jsonl(run / "metrics.jsonl"), read_jsonl(single_runs / "clean/metrics.jsonl"), 1e-5)
    assert_wandb_matches_jsonl(run)
    assert_same_parameters(run, single_runs / "clean")  # the checkpoint, gathered whole from the shards


def test_verify_with_fsdp():
    p = torchrun_cli("verify", "-c", str(DEBUG), "--steps", "3", "dist.strategy=fsdp", nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "strategy fsdp" in p.stdout and "verdict: PASS" in p.stdout and "n/a (sharded" in p.stdout


# ---- Accelerate's silent CPU fallbacks -----------------------------------------------------------
def _accelerate_launch(tmp_path, *args: str, **env) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS -m dist_train train` (through the wrapper that keeps the worker's exit code).

    HF_HOME is empty, so no default Accelerate config of this machine's user changes the outcome. The
    launcher and its workers are forked warm (the shim; launch/accelerate.sh runs them fresh above).
    """
    full = warm_launch_env(_env(HF_HOME=str(tmp_path), **env))
    return subprocess.run([full["PYTHON"], "-m", "dist_train.accelerate_launch", *args, "--dynamo_backend", "no",
                           "-m", "dist_train", "train", "-c", str(DEBUG), "logging.wandb.mode=disabled"],
                          cwd=ROOT, env=full, capture_output=True, text=True, timeout=300)


def _one_error_line(p, fragment):
    errors = [line for line in p.stderr.splitlines() if line.startswith("dist-train: error:")]
    assert p.returncode == 2 and len(errors) == 1 and fragment in errors[0], p.stdout + p.stderr


@pytest.mark.parametrize(
    "args, env, fragment",
    [
        # Without ACCELERATE_USE_CPU both processes would report DistributedType.NO and train alone.
        (["--multi_gpu", "--num_processes", "2"], {}, "would let each train its own model"),
        # --cpu takes the simple launcher: one process whatever --num_processes says.
        (["--cpu", "--num_processes", "2"], {}, "starts a single process"),
        # With ACCELERATE_USE_CPU, Accelerate turns an FSDP config into plain MULTI_CPU.
        (["--config_file", "configs/accelerate/fsdp2.yaml", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "true"},
         "asks for FSDP, which Accelerate runs only on GPUs"),
    ],
    ids=["no-use-cpu", "cpu-flag", "fsdp-dropped"],
)
def test_accelerate_silent_cpu_fallbacks_are_refused(tmp_path, args, env, fragment):
    _one_error_line(_accelerate_launch(tmp_path, *args, **env), fragment)


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"MIXED_PRECISION": "fp8"}, "MIXED_PRECISION must be no, bf16 or fp16"),
        ({"ACCELERATE_CONFIG": "configs/accelerate/missing.yaml"}, "is not a file"),
        ({"NUM_MACHINES": "2"}, "needs MACHINE_RANK"),
        ({"NUM_MACHINES": "2", "MACHINE_RANK": "2"}, "MACHINE_RANK must be a whole number from 0 to NUM_MACHINES-1=1"),
        ({"NUM_MACHINES": "2", "MACHINE_RANK": "1"}, "needs MAIN_PROCESS_IP"),
        ({"ACCELERATE_CONFIG": "configs/accelerate/fsdp2.yaml"}, "asks for FSDP, which Accelerate runs only on GPUs"),
        # Only the extras named: Accelerate's DeepSpeed support would die on every rank importing transformers.
        ({"ACCELERATE_CONFIG": "configs/accelerate/deepspeed.yaml",
          "PYTHON": str(ROOT / "tests/bin/python-without-transformers")},
         "runs DeepSpeed, which needs deepspeed and transformers for"),
    ],
)
def test_accelerate_script_rejects_bad_settings_before_launching(env, fragment):
    p = _script("launch/accelerate.sh", timeout=120, **env)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], p.stderr


def test_precision_that_contradicts_accelerate_fails_at_config_load():
    p = _script("launch/accelerate.sh", "train.precision=fp16", timeout=120,
                ACCELERATE_CONFIG="configs/accelerate/ddp_bf16.yaml")
    assert p.returncode == 2 and "train.precision': fp16 contradicts Accelerate's mixed_precision 'bf16'" in p.stderr


# ---- config-load combinations and shipped configs ------------------------------------------------
@pytest.mark.parametrize(
    "overrides, env, fragment",
    [
        (["dist.strategy=fsdp", "dist.check_sync_every=5"], {}, "holds a shard, not a replica"),
        (["dist.check_sync_every=5"], {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true",
                                       "FSDP_VERSION": "2"}, "under FSDP each rank holds a shard"),
        ([], {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
              "FSDP_OFFLOAD_PARAMS": "true"}, "CPU offloading"),
        ([], {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
         "dist_train accumulates itself"),
        (["dist.strategy=accelerate"], {}, "needs a job started by accelerate launch"),
        (["dist.strategy=ddp"], {"ACCELERATE_MIXED_PRECISION": "no"}, "ddp under accelerate launch"),
        (["train.precision=fp16"], {"ACCELERATE_MIXED_PRECISION": "bf16"}, "contradicts Accelerate's mixed_precision"),
        ([], {"ACCELERATE_MIXED_PRECISION": "fp8"}, "mixed precision 'fp8'"),
        ([], {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
         "FSDP version 1"),
        ([], {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true"}, "no deepspeed_config_file"),
        ([], {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs/deepspeed/zero2_fp16.json")},
         "sets fp16.enabled=true, but Accelerate's mixed_precision=bf16 gives false"),
        (["dist.deepspeed_config=configs/deepspeed/zero1.json"],
         {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true",
          "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs/deepspeed/zero2.json")},
         "the Accelerate config decides"),
    ],
)
def test_combinations_that_cannot_work_are_refused(overrides, env, fragment):
    with pytest.raises(ConfigError) as e:
        resolve(_unresolved_cfg(overrides), env, cuda=True)  # cuda=True: the GPU-only rules aside
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_the_refusal_happens_at_config_load():
    with pytest.raises(ConfigError, match="holds a shard, not a replica"):
        load_config(DEBUG, ["dist.strategy=fsdp", "dist.check_sync_every=5"])


@pytest.mark.parametrize(
    "overrides, env, want",
    [
        ([], {}, Plan("single", Precision.no)),
        ([], {"WORLD_SIZE": "2"}, Plan("ddp", Precision.no)),
        # A bare srun: the world size is the step's task count (there is no WORLD_SIZE).
        ([], {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"},
         Plan("ddp", Precision.no)),
        ([], {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, Plan("single", Precision.no)),  # the batch script itself
        (["dist.strategy=ddp"], {}, Plan("single", Precision.no)),
        (["dist.strategy=fsdp", "train.precision=bf16"], {"WORLD_SIZE": "2"}, Plan("fsdp", Precision.bf16)),
        (["dist.strategy=fsdp", "train.precision=fp16"], {"WORLD_SIZE": "2"}, Plan("fsdp", Precision.fp16)),
        ([], {"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"},
         Plan("accelerate", Precision.bf16)),
        (["train.precision=fp16"], {"ACCELERATE_MIXED_PRECISION": "fp16"}, Plan("accelerate", Precision.fp16)),
        # DeepSpeed on a CPU: no ACCELERATE_USE_CPU (it would drop DeepSpeed); the JSON's "auto" takes bf16.
        ([], {"ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true",
              "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs/deepspeed/zero3.json")},
         Plan("accelerate", Precision.bf16)),
        (["dist.strategy=deepspeed"], {"WORLD_SIZE": "2"}, Plan("deepspeed", Precision.no)),
        (["dist.strategy=deepspeed", "dist.deepspeed_config=configs/deepspeed/zero1_bf16.json"], {},
         Plan("deepspeed", Precision.bf16)),
    ],
)
def test_auto_resolves_from_the_launcher(overrides, env, want):
    assert resolve(_unresolved_cfg(overrides), env, cuda=False) == want


def test_accelerate_deepspeed_with_use_cpu_is_refused_on_a_cpu():
    env = {"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true",
           "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "configs/deepspeed/zero2.json"}
    with pytest.raises(ConfigError, match="Accelerate drops for plain data-parallel under ACCELERATE_USE_CPU"):
        resolve(_unresolved_cfg([]), env, cuda=False)


def _unresolved_cfg(overrides):
    """The debug config with overrides, merged but not checked against this process's environment."""
    from omegaconf import OmegaConf

    from dist_train.config import Config

    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(DEBUG), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)


ACCELERATE_CONFIGS = sorted((ROOT / "configs/accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # Accelerate's own loader: an unknown or misspelled key raises
    assert cfg.distributed_type.value in ("NO", "MULTI_GPU", "FSDP", "DEEPSPEED")
    assert cfg.mixed_precision in ("no", "bf16", "fp16") or cfg.distributed_type.value == "DEEPSPEED"
    if cfg.distributed_type.value == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if cfg.distributed_type.value == "DEEPSPEED":
        ds = ROOT / cfg.deepspeed_config["deepspeed_config_file"]
        assert ds.parent == ROOT / "configs/deepspeed" and ds.is_file()
    assert len(ACCELERATE_CONFIGS) >= 6
