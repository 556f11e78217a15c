"""DeepSpeed ZeRO 0-3 (`dist.strategy=deepspeed`): the engine reduces, clips and steps, and the
package still logs this step's true global norm, skipped steps and the threshold it handed over.

In-process checks run 2 ranks over gloo (tests.dist_utils.spawn) against the single-process
reference over the same global batches; end-to-end checks run launch/deepspeed.sh. DeepSpeed
JIT-builds one C++ op on a CPU the first time (about 40 s); it lands in torch's extensions
cache, which every test here shares, so one test run builds it once.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import deepspeed
import pytest
import torch

from dist_train.clip import FixedClip
from dist_train.config import Precision
from dist_train.distributed import DistState
from dist_train.strategies import Plan
from dist_train import trainer
from dist_train.config import ProgressMode
from dist_train.errors import TrainingError
from dist_train.progress import ProgressReporter
from dist_train.trainer import build
from dist_train.metrics import read_jsonl
from tests.conftest import FAST, ROOT, checkpoint_params, torchrun_cli
from tests.dist_utils import spawn
from tests.test_strategies import (CPU, _cfg, _reference, _run, _script, assert_raw_norms_match,
                                   assert_same_trajectory)
from tests.test_train import assert_wandb_matches_jsonl

STAGES = (0, 1, 2, 3)
JSON = ROOT / "configs/deepspeed"


def _ds(stage: int, accum: int = 1, *extra: str, variant: str = ""):
    return _cfg(accum, "dist.strategy=deepspeed", f"dist.deepspeed_config={JSON / f'zero{stage}{variant}.json'}", *extra)


class StepClip(FixedClip):
    """A threshold that depends on the step count only (past information): tiny on odd steps, huge on even."""

    name = "step"

    def __init__(self):
        super().__init__(1.0)
        self.steps = 0

    def next_threshold(self, device):
        return torch.full((), 1e-9 if self.steps % 2 else 1e6, dtype=torch.float64, device=device)

    def observe(self, raw, taken):
        if taken:
            self.steps += 1


def _tiny_clip_update(s) -> float:
    """Largest parameter change of one step (the debug model's AdamW, lr 1.5e-4 at step 1 of the warm-up)."""
    before = torch.cat([p.reshape(-1) for p in s.strategy.full_parameters(s.model)])
    _run(s, 1)
    after = torch.cat([p.reshape(-1) for p in s.strategy.full_parameters(s.model)])
    return (after - before).abs().max().item()


def _worker(tmp: str):
    state = DistState.from_env()
    out = {}
    with state.session(CPU, "gloo", timeout_s=120):
        for stage in STAGES:
            out[f"z{stage}"] = _run(build(_ds(stage), state, CPU))
            out[f"z{stage}_bf16"] = _run(build(_ds(stage, variant="_bf16"), state, CPU))
            for variant in ("", "_bf16"):
                s = build(_ds(stage, 1, "clip.max_norm=1e-9", variant=variant), state, CPU)
                assert s.strategy.engine.gradient_clipping() == 1e-9  # written explicitly, not DeepSpeed's default
                out[f"z{stage}{variant}_tiny"] = _tiny_clip_update(s)
                out[f"z{stage}{variant}_free"] = _tiny_clip_update(
                    build(_ds(stage, 1, "clip.policy=none", variant=variant), state, CPU))
            s = build(_ds(stage), state, CPU)
            s.policy = StepClip()
            out[f"z{stage}_stepclip"] = _run(s)
        for stage in STAGES:
            out[f"z{stage}_accum4"] = _run(build(_ds(stage, 4), state, CPU))
        out["ddp"] = _run(build(_cfg(1, "dist.strategy=ddp"), state, CPU))

        # A DeepSpeed JSON without gradient_clipping: dist_train writes clip.max_norm (0.3) into it.
        no_clip_json = os.path.join(tmp, "no_clipping.json")
        if state.is_main:
            with open(no_clip_json, "w") as f:
                json.dump({"zero_optimization": {"stage": 1}, "train_batch_size": 16}, f)
        torch.distributed.barrier()
        out["no_clipping_key"] = _run(build(_cfg(1, "dist.strategy=deepspeed",
                                                 f"dist.deepspeed_config={no_clip_json}"), state, CPU))

        # A planted NaN in the forward of step 2: skipped with a null norm, on every stage and precision.
        os.environ["NAN_CALLS"] = "1"
        for stage in STAGES:
            for variant in ("", "_bf16"):
                s = build(_ds(stage, 1, "model.factory=tests.helpers:nan_gpt", variant=variant), state, CPU)
                out[f"z{stage}{variant}_nan"] = _run(s, 3)
                out[f"z{stage}{variant}_nan"]["engine_skipped"] = s.strategy.engine.skipped_steps
        # NaN at steps 2 and 3 with clip.max_consecutive_nonfinite=2 and no logged step there: the engine
        # reads its skip on the host, so the trainer's loop stops at step 3 itself (no step after the limit).
        os.environ["NAN_CALLS"] = "1,2"
        s = build(_ds(2, 1, "model.factory=tests.helpers:nan_gpt", "clip.max_consecutive_nonfinite=2",
                      "logging.every=10", "train.max_steps=8", "optim.warmup_steps=2"), state, CPU)
        rows = []
        sink = type("Sink", (), {"log": lambda self, record: rows.append(record)})()
        try:
            trainer.run(s, [sink], ProgressReporter(ProgressMode.plain, 8, enabled=False))
            error = None
        except TrainingError as e:
            error = str(e)
        out["limit"] = {"error": error, "forwards": s.strategy.unwrap(s.model).calls,
                        "engine_skipped": s.strategy.engine.skipped_steps, "rows": [r["step"] for r in rows]}
        del os.environ["NAN_CALLS"]

        # engine.save_checkpoint / load_checkpoint: a fresh engine resumes the same trajectory.
        for stage in (2, 3):
            s = build(_ds(stage), state, CPU)
            _run(s, 2)
            path = Path(tmp) / f"ckpt{stage}" / "step_00000002"
            s.strategy.save_checkpoint(s.model, s.optimizer, path, {"step": 2, "scheduler": s.scheduler.state_dict()},
                                       state.is_main)
            after_save = _run(s, 1)
            fresh = build(_ds(stage), state, CPU)
            client = fresh.strategy.load_checkpoint(fresh.model, fresh.optimizer, path)
            fresh.scheduler.load_state_dict(client["scheduler"])  # the schedule is dist_train's, not the engine's
            out[f"z{stage}_resume"] = (client["step"], after_save, _run(fresh, 1))
    return out


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return spawn(_worker, 2, str(tmp_path_factory.mktemp("ds")), timeout=900)


@pytest.fixture(scope="module")
def ref():
    return {accum: _reference(accum) for accum in (1, 4)}


def assert_same_params(run, ref, atol=1e-5):
    # Summation order differs (2 ranks x 8 samples vs 1 x 16): AdamW turns that into at most a few
    # 1e-6 per parameter over 4 steps (measured 2.6e-6 after 10); a missed or doubled gradient moves
    # parameters by whole steps (lr 1.5e-4 per step here).
    for step, (a, b) in enumerate(zip(run["params"], ref["params"])):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"parameters after step {step + 1}: {m}")


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_matches_the_single_process_reference(ds, ref, stage):
    for rank in (0, 1):
        run = ds[rank][f"z{stage}"]
        assert_raw_norms_match(run, ref[1], rel=1e-5)
        for a, b in zip(run["loss"], ref[1]["loss"]):
            assert a == pytest.approx(b, rel=1e-5)
        assert_same_params(run, ref[1])
        assert not any(run["skipped"])
    assert all(math.isfinite(r) for r in ds[0]["z0"]["raw"])  # stage 0: computed, since the engine gives None


@pytest.mark.parametrize("stage", STAGES)
def test_accumulation_matches_the_reference(ds, ref, stage):
    run = ds[0][f"z{stage}_accum4"]
    assert_raw_norms_match(run, ref[4], rel=1e-5)
    assert_same_params(run, ref[4])


def test_negative_control_a_local_norm_would_fail(ds, ref):
    """The check above can fail: one rank's gradient (not averaged) is about sqrt(2) off the global one."""
    local = [r * math.sqrt(2) for r in ds[0]["z1"]["raw"]]
    with pytest.raises(AssertionError):
        assert_raw_norms_match({"raw": local}, ref[1], rel=1e-5)


def test_zero2_and_ddp_agree(ds):
    z2, ddp = ds[0]["z2"], ds[0]["ddp"]
    assert_raw_norms_match(z2, ddp, rel=1e-5)
    assert_same_params(z2, ddp)


def _update_error(run, ref) -> float:
    """Relative L2 error of the parameters' movement over steps 2..N against the reference's."""
    moved, moved_ref = run["params"][-1] - run["params"][0], ref["params"][-1] - ref["params"][0]
    return ((moved - moved_ref).norm() / moved_ref.norm()).item()


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_computes_in_bf16_and_stays_near_fp32(ds, ref, stage):
    """DeepSpeed's bf16 runs the whole model in bf16 (8 significant bits) with fp32 master weights.

    Measured against fp32 over 4 steps: raw norms within 1% (bf16's rounding of every
    activation and gradient, compounding); the fp32 master weights' movement over steps 2-4
    within 2% of the fp32 run's at stages 1-3 and 10% at stage 0 (DeepSpeed's unfused bf16
    optimizer there; the cause of the difference is not established). Per element, AdamW's
    sign-like update flips where a gradient is near zero, so elementwise bounds say little.
    3e-2 and 0.2 leave room and still catch a norm off by sqrt(2), and a skipped or doubled
    update (a movement error of 0.3 or more).
    """
    run = ds[0][f"z{stage}_bf16"]
    assert run["dtypes"] == {torch.bfloat16}
    assert_raw_norms_match(run, ref[1], rel=3e-2)
    assert _update_error(run, ref[1]) < 0.2
    drift = max(abs(a / b - 1) for a, b in zip(run["raw"], ref[1]["raw"]))
    assert drift > 1e-5, "bf16 should differ from fp32 by more than fp32's own noise"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", ["", "_bf16"])
def test_nan_step_is_skipped_with_a_null_norm_and_the_run_goes_on(ds, stage, variant):
    for rank in (0, 1):
        run = ds[rank][f"z{stage}{variant}_nan"]
        assert run["skipped"] == [False, True, False]
        assert math.isnan(run["raw"][1]), "a skipped step's norm is null: never -1 or the previous value"
        assert math.isfinite(run["raw"][0]) and math.isfinite(run["raw"][2]) and run["raw"][2] != run["raw"][0]
        torch.testing.assert_close(run["params"][1], run["params"][0], rtol=0, atol=0)  # untouched
        assert not torch.equal(run["params"][2], run["params"][1])  # and training went on
        # The engine counted the same skip, except where it has no check (stage 0 in fp32: dist_train skips).
        assert run["engine_skipped"] == (0 if (stage, variant) == (0, "") else 1)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", ["", "_bf16"])
def test_the_threshold_reaches_the_engine(ds, stage, variant):
    """clip.max_norm=1e-9 scales gradients to ~1e-9, below AdamW's eps (1e-8): its update shrinks ~10x.

    Without clipping the first AdamW step moves parameters by about lr (1.5e-4); with
    the gradient clipped to a norm of 1e-9 most of that step is eps's.
    """
    tiny, free = ds[0][f"z{stage}{variant}_tiny"], ds[0][f"z{stage}{variant}_free"]
    assert free > 1e-4
    assert tiny < free / 5, (tiny, free)


@pytest.mark.parametrize("stage", STAGES)
def test_a_threshold_that_changes_every_step_reaches_the_engine_every_step(ds, stage):
    """StepClip alternates 1e6 and 1e-9: the same policy in one process gives the same trajectory."""
    s = build(_cfg(2), DistState(), CPU, plan=Plan("single", Precision.no))
    s.policy = StepClip()
    ref = _run(s)
    run = ds[0][f"z{stage}_stepclip"]
    assert_raw_norms_match(run, ref, rel=1e-5)
    assert_same_params(run, ref)


class CurrentNormClip(FixedClip):
    name = "current"
    needs_current_norm = True


class PerParameterClip(FixedClip):
    name = "per_parameter"
    needs_parameters = True


@pytest.mark.parametrize("policy, fragment", [(CurrentNormClip, "needs this step's gradient norm before clipping"),
                                              (PerParameterClip, "needs per-parameter gradients")])
def test_a_policy_the_engine_cannot_serve_is_refused_at_config_load(monkeypatch, policy, fragment):
    from dist_train import clip, config
    from dist_train.preflight import load_config
    from dist_train.errors import ConfigError

    monkeypatch.setitem(clip.POLICIES, policy.name, lambda cfg: policy(cfg.max_norm))
    # a policy is registered twice: where it is built, and by name for the torch-free config check
    monkeypatch.setattr(config, "POLICY_NAMES", (*config.POLICY_NAMES, policy.name))
    overrides = [f"clip.policy={policy.name}", "logging.wandb.mode=disabled"]
    load_config(ROOT / "configs/debug.yaml", overrides)  # fine where dist_train clips
    with pytest.raises(ConfigError, match=fragment):
        load_config(ROOT / "configs/debug.yaml", [*overrides, "dist.strategy=deepspeed"])


def test_a_json_without_gradient_clipping_clips_at_clip_max_norm(ds, ref):
    run = ds[0]["no_clipping_key"]
    assert_raw_norms_match(run, ref[1], rel=1e-5)
    assert_same_params(run, ref[1])  # clipped at 0.3 like the reference: 1.0 would move them differently


@pytest.mark.parametrize("stage", (2, 3))
def test_checkpoint_resumes_the_same_trajectory(ds, stage):
    step, after_save, resumed = ds[0][f"z{stage}_resume"]
    assert step == 2
    assert resumed["raw"] == pytest.approx(after_save["raw"], rel=1e-6)
    torch.testing.assert_close(resumed["params"][0], after_save["params"][0], rtol=0, atol=1e-7)


# ---- end to end: launch/deepspeed.sh, and DeepSpeed under accelerate launch ------------------------
def assert_checkpoint_matches(run_dir, ref_dir):
    """See tests.test_strategies.assert_same_parameters for the tolerance."""
    ref_state = checkpoint_params(ref_dir)
    state = checkpoint_params(run_dir)
    assert sorted(state) == sorted(ref_state)
    for name, value in state.items():
        torch.testing.assert_close(value.float(), ref_state[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def _ds_workers(run: Path, stage: int, *extra: str, nproc: int = 2, **env: str):
    """DeepSpeed's training workers (dist.strategy=deepspeed, the shipped zero{stage}.json) under the forked
    torchrun agent: for what the workers compute. DeepSpeed's own launcher runs for real in
    test_deepspeed_launcher_trains_like_one_process[3] and the README's commands."""
    return torchrun_cli("train", "-c", str(ROOT / "configs/debug.yaml"), f"run.out_dir={run}", *FAST,
                        "dist.strategy=deepspeed", f"dist.deepspeed_config={JSON / f'zero{stage}.json'}", *extra,
                        nproc=nproc, env=env)


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_launcher_trains_like_one_process(tmp_path, single_runs, stage, request):
    """Stage 3 through DeepSpeed's launcher (launch/deepspeed.sh), W&B offline, with port 29500 taken (one
    machine: the script takes a free port; DeepSpeed's default would fail to bind); stages 0-2 the same
    workers under torchrun's environment (the README runs the launcher with stages 0 and 3 too)."""
    run = tmp_path / "ds"
    wandb = "offline" if stage == 3 else "disabled"
    if stage == 3:
        request.getfixturevalue("default_port_taken")
        p = _script("launch/deepspeed.sh", f"run.out_dir={run}", *FAST, f"logging.wandb.mode={wandb}",
                    NUM_PROCESSES="2", DS_CONFIG=f"configs/deepspeed/zero{stage}.json")
        assert "--master_port=29500" not in p.stdout + p.stderr
        launcher = "deepspeed"
    else:
        p = _ds_workers(run, stage, f"logging.wandb.mode={wandb}")
        launcher = "torchrun"
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"2 processes ({launcher}, backend gloo)" in p.stderr
    assert f"strategy deepspeed: DeepSpeed {deepspeed.__version__} ZeRO stage {stage} over 2 processes" in p.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(r["grad_norm/raw"] is not None for r in rows)  # stage 0 too: computed where the engine gives None
    assert_same_trajectory(rows, read_jsonl(single_runs / "clean/metrics.jsonl"), 1e-5)
    assert_checkpoint_matches(run, single_runs / "clean")
    if wandb == "offline":
        assert_wandb_matches_jsonl(run)


def test_the_run_stops_at_the_limit_itself_under_deepspeed(ds):
    """DeepSpeed ignores the device-side halt (its engine decides skips); the loop checks every step."""
    for rank in ds:
        got = rank["limit"]
        assert got["error"] is not None and got["error"].startswith("training stopped at step 3: 2 consecutive"), got
        assert got["forwards"] == 3 and got["engine_skipped"] == 2, got  # no step ran past the limit
    assert ds[0]["limit"]["rows"] == [2, 3]  # each skipped step's row, at its own step


def test_nan_under_the_launcher_is_logged_as_skipped(tmp_path, single_runs):
    run = tmp_path / "nan"
    p = _ds_workers(run, 2, "logging.wandb.mode=offline", "model.factory=tests.helpers:nan_gpt", NAN_CALLS="5")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    skipped = [r for r in rows if r["optim/step_skipped"]]
    assert [r["step"] for r in skipped] == [6] and skipped[0]["grad_norm/raw"] is None
    assert skipped[0]["grad_norm/clipped"] is None and rows[-1]["optim/skipped_steps"] == 1
    assert_same_trajectory(rows, read_jsonl(single_runs / "nan/metrics.jsonl"), 1e-5)
    assert_wandb_matches_jsonl(run)


def test_torchrun_form_and_accumulation(tmp_path, single_runs):
    """launch/deepspeed.sh's LAUNCHER=torchrun form (its workers; the README runs the script so) with
    gradient accumulation."""
    run = tmp_path / "tr"
    p = _ds_workers(run, 1, "logging.wandb.mode=disabled", "train.grad_accum_steps=2")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 processes (torchrun, backend gloo)" in p.stderr and "ZeRO stage 1" in p.stderr
    assert_same_trajectory(read_jsonl(run / "metrics.jsonl"), read_jsonl(single_runs / "clean/metrics.jsonl"), 1e-5)


@pytest.mark.parametrize("json_name, bf16", [("zero2.json", False), ("zero3.json", True)])
def test_accelerate_launch_with_deepspeed(tmp_path, single_runs, json_name, bf16):
    """The route on a CPU: accelerate launch without --cpu or ACCELERATE_USE_CPU (which would drop DeepSpeed),
    DeepSpeed's CPU accelerator, and the gloo group given to the Accelerator explicitly. zero3.json leaves
    the precision "auto": Accelerate's mixed_precision (bf16) must reach the engine."""
    run = tmp_path / "acc"
    acc_cfg = tmp_path / "acc.yaml"
    acc_cfg.write_text((ROOT / "configs/accelerate/deepspeed.yaml").read_text()
                       .replace("configs/deepspeed/zero2.json", f"configs/deepspeed/{json_name}")
                       .replace("mixed_precision: 'no'", f"mixed_precision: '{'bf16' if bf16 else 'no'}'"))
    # ZeRO-3 in bf16 with the real launcher and fresh workers; ZeRO-2 the same script forked warm.
    p = _script("launch/accelerate.sh", f"run.out_dir={run}", *FAST, "logging.wandb.mode=disabled",
                ACCELERATE_CONFIG=str(acc_cfg), NUM_PROCESSES="2", HF_HOME=str(tmp_path / "hf"), warm=not bf16)
    assert p.returncode == 0, p.stdout + p.stderr
    stage = 3 if bf16 else 2
    assert (f"strategy accelerate: Accelerate DEEPSPEED: DeepSpeed {deepspeed.__version__} ZeRO stage {stage} over 2 "
            f"processes ({'bf16' if bf16 else 'fp32'}") in p.stderr
    rows = read_jsonl(run / "metrics.jsonl")
    # bf16: the whole model in bf16 drifts from fp32 (see test_bf16_computes_in_bf16_and_stays_near_fp32);
    # 12 steps compound it: measured under 2% on the raw norm.
    assert_same_trajectory(rows, read_jsonl(single_runs / "clean/metrics.jsonl"), 5e-2 if bf16 else 1e-5)
    if not bf16:
        assert_checkpoint_matches(run, single_runs / "clean")


def test_verify_with_deepspeed():
    """`dist-train verify` under DeepSpeed ZeRO-3 (its workers; the README runs verify through DeepSpeed's
    launcher with ZeRO-0)."""
    p = torchrun_cli("verify", "-c", str(ROOT / "configs/debug.yaml"), "--steps", "3", "dist.strategy=deepspeed",
                     f"dist.deepspeed_config={JSON / 'zero3.json'}", nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "strategy deepspeed" in p.stdout and "verdict: PASS" in p.stdout


# ---- fp16 -------------------------------------------------------------------------------------------
FP16_STAGES = (1, 2, 3)  # stage 0 in fp16 is refused (DeepSpeed does not scale its loss)


def _fp16_worker(tmp: str):
    """DeepSpeed's fp16 on this CPU. DeepSpeed allows fp16 on a CPU only where oneDNN has fp16 kernels
    (a speed gate: torch computes fp16 on any CPU); this machine's has not, so the gate is opened here,
    in the test process only, to run DeepSpeed's real loss scaler and overflow handling."""
    import dist_train.strategies
    from deepspeed.accelerator import get_accelerator

    dist_train.strategies.cpu_fp16_supported = lambda: True
    type(get_accelerator()).is_fp16_supported = lambda self: True
    state = DistState.from_env()
    out = {}
    os.environ["OVERFLOW_CALLS"] = "1,2"  # steps 2 and 3
    with state.session(CPU, "gloo", timeout_s=120):
        for stage in FP16_STAGES:
            s = build(_ds(stage, 1, "model.factory=tests.helpers:overflow_gpt", variant="_fp16"), state, CPU)
            out[stage] = _run(s, 4)
            out[stage]["engine_skipped"] = s.strategy.engine.skipped_steps
            out[f"{stage}_tiny"] = _tiny_clip_update(build(_ds(stage, 1, "clip.max_norm=1e-9", variant="_fp16"),
                                                           state, CPU))
            out[f"{stage}_free"] = _tiny_clip_update(build(_ds(stage, 1, "clip.policy=none", variant="_fp16"),
                                                           state, CPU))
        # A loss scale that grows every 2 steps: ZeRO-3 divides its norm by the raised scale on those steps.
        del os.environ["OVERFLOW_CALLS"]
        growing = os.path.join(tmp, "growing.json")
        for stage in (2, 3):
            if state.is_main:
                cfg = json.loads((JSON / f"zero{stage}_fp16.json").read_text())
                cfg["fp16"]["loss_scale_window"] = 2
                with open(growing, "w") as f:
                    json.dump(cfg, f)
            torch.distributed.barrier()
            s = build(_cfg(1, "dist.strategy=deepspeed", f"dist.deepspeed_config={growing}", "clip.max_norm=10"),
                      state, CPU)
            out[f"{stage}_growing"] = _run(s, 3)
    return out


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return spawn(_fp16_worker, 2, str(tmp_path_factory.mktemp("fp16")), timeout=600)


@pytest.mark.parametrize("stage", FP16_STAGES)
def test_fp16_overflow_is_skipped_with_a_null_norm_and_the_scale_halves(fp16, ref, stage):
    """overflow_gpt multiplies the logits of steps 2 and 3 by 3e4: finite in the forward, an fp16 overflow
    in the backward. The engine skips both steps and, with hysteresis 2 (DeepSpeed's default, as in the
    shipped JSONs), halves its scale after the second."""
    for rank in (0, 1):
        run = fp16[rank][stage]
        assert run["dtypes"] == {torch.float16}
        assert run["skipped"] == [False, True, True, False] and run["engine_skipped"] == 2
        assert math.isnan(run["raw"][1]) and math.isnan(run["raw"][2]), "never the previous step's norm, never -1"
        torch.testing.assert_close(run["params"][2], run["params"][0], rtol=0, atol=0)
        # The scale each step's backward used, read before the engine's step lowers it.
        assert run["loss_scale"] == [2.0**16, 2.0**16, 2.0**16, 2.0**15]
    # Unscaled before the norm: step 1 matches fp32 within fp16's rounding (a norm taken on scaled gradients
    # would be 65536 times larger; 2e-3 is a few fp16 ulps compounded over the model).
    assert fp16[0][stage]["raw"][0] == pytest.approx(ref[1]["raw"][0], rel=2e-3)


@pytest.mark.parametrize("stage", FP16_STAGES)
def test_fp16_threshold_reaches_the_engine(fp16, stage):
    """As test_the_threshold_reaches_the_engine, through the fp16 optimizers (gradients unscaled, then clipped)."""
    assert fp16[0][f"{stage}_free"] > 1e-4 and fp16[0][f"{stage}_tiny"] < fp16[0][f"{stage}_free"] / 5


def test_zero3_fp16_norm_on_a_step_that_grows_the_loss_scale(fp16):
    """With loss_scale_window 2 the scale doubles after step 3. ZeRO-3 divides that step's norm by the doubled
    scale (ZeRO-2 by the one the backward used), and unscales its gradients by it too. dist_train undoes the
    first, so both log the same raw norm, and logs what ZeRO-3 really applied (half, below clip.max_norm=10)."""
    z2, z3 = fp16[0]["2_growing"], fp16[0]["3_growing"]
    assert z2["loss_scale"] == z3["loss_scale"] == [2.0**16, 2.0**16, 2.0**16]  # the next step's would be 2**17
    assert z3["raw"] == pytest.approx(z2["raw"], rel=1e-3)  # uncorrected, step 3 would be half
    assert z2["clipped"] == pytest.approx(z2["raw"], rel=1e-5)
    assert z3["clipped"][:2] == pytest.approx(z3["raw"][:2], rel=1e-5)
    assert z3["clipped"][2] == pytest.approx(z3["raw"][2] / 2, rel=1e-5)


def test_single_process_deepspeed_matches_the_single_process_run(tmp_path, single_runs):
    """No launcher: dist_train gives DeepSpeed a one-process group."""
    from tests.conftest import DEBUG, cli

    run = tmp_path / "one"
    p = cli("train", "-c", str(DEBUG), f"run.out_dir={run}", *FAST, "logging.wandb.mode=disabled",
            "dist.strategy=deepspeed", "dist.deepspeed_config=configs/deepspeed/zero1.json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ZeRO stage 1 in one process" in p.stderr
    assert_same_trajectory(read_jsonl(run / "metrics.jsonl"), read_jsonl(single_runs / "clean/metrics.jsonl"), 1e-5)


def _shm_worker() -> dict:
    import torch.distributed as dist

    from dist_train.deepspeed_shm import own_buffer, release_deepspeed_shm

    os.environ["LOCAL_SIZE"] = os.environ["WORLD_SIZE"]  # as DeepSpeed's launcher exports: all ranks local
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    created = [own_buffer(r).exists() for r in range(world)]
    released = release_deepspeed_shm()
    dist.barrier()
    left = [own_buffer(r).exists() for r in range(world)]
    t = torch.full((1000,), float(rank + 1))
    deepspeed.comm.inference_all_reduce(t)  # DeepSpeed's shm all-reduce, through the unlinked buffers
    return {"created": created, "released": released, "left": left, "sum": t.tolist(),
            "shm_op": bool(getattr(deepspeed.comm.comm.cdb, "shm_vector_kernel_level", 0))}


def test_deepspeeds_shm_buffers_are_released_and_its_shm_all_reduce_still_works():
    """DeepSpeed's CPU op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (69 MB each)
    and never unlinks it: each run left its RAM taken. The buffers exist under the name own_buffer gives (a
    DeepSpeed that renamed them fails here), release_deepspeed_shm unlinks them, and DeepSpeed's shm
    all-reduce still sums over the unlinked buffers."""
    for r in spawn(_shm_worker, 2):
        assert r["created"] == [True, True] and r["released"] and r["left"] == [False, False]
        assert r["sum"] == [3.0] * 1000
        if platform.machine() in ("x86_64", "AMD64"):  # the sum went through the shm kernel (its fp32 one needs AVX2)
            assert r["shm_op"] == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def test_stale_shm_buffers_are_those_no_process_uses(tmp_path, capsys):
    """`python -m dist_train.deepspeed_shm --remove` removes the buffers no running process maps or holds
    open, and keeps the others (a running job's) and other files."""
    from dist_train import deepspeed_shm

    names = [f"{deepspeed_shm.PREFIX}_{os.getuid()}_127.0.0.1_{port}_0" for port in (1001, 1002, 1003)]
    for name in names + ["other_file"]:
        (tmp_path / name).write_bytes(b"\0" * 4096)
    import mmap

    with open(tmp_path / names[1], "rb") as held, open(tmp_path / names[2], "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
        f.close()  # only the mapping holds it now
        try:
            assert deepspeed_shm.stale(tmp_path) == [tmp_path / names[0]]
            assert deepspeed_shm.main(["--dir", str(tmp_path)]) == 0
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + ["other_file"])  # listed only
            assert deepspeed_shm.main(["--dir", str(tmp_path), "--remove"]) == 0
            assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:] + ["other_file"])
        finally:
            mapped.close()
    assert deepspeed_shm.stale(tmp_path) == [tmp_path / n for n in names[1:]]  # nobody uses them now
    out = capsys.readouterr().out
    assert f"stale {tmp_path / names[0]} (0 MiB)" in out and "1 DeepSpeed shm buffer(s) removed: 0 MiB" in out
