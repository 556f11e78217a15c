"""The step with no host sync, and clipping folded into the fused optimizer.

- Host syncs are counted on a CPU: `.item()`, `float()`, `bool()`, `.tolist()` of a tensor all dispatch
  to `aten._local_scalar_dense`, which a TorchDispatchMode sees. A non-logged step must make none, under
  every strategy the package's own step runs (single process, DDP, FSDP2), fp32 and fp16. The negative
  control is the explicit path's `bool(isfinite(raw))`.
- Folding the clip coefficient and the fp16 unscale into the optimizer's `grad_scale` must give the update
  that explicit clipping followed by the same optimizer gives: bit for bit where nothing is clipped, and
  within the bound stated in `assert_close_update` where it is.
- A planted NaN is skipped on the device: parameters, moments, step counts and the scale as they were.
"""

from __future__ import annotations

import copy
from collections import Counter

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dist_train.step as step_module
from dist_train import trainer
from dist_train.trainer import loop as trainer_loop
from dist_train.clip import AGC, FixedClip, NoClip, PercentileClip, SpikeSkip, ZScoreClip
from dist_train.config import ProgressMode
from dist_train.preflight import load_config
from dist_train.errors import TrainingError
from dist_train.progress import ProgressReporter
from dist_train.step import Strategy, folds_clipping, lm_loss, train_step
from tests.conftest import DEBUG
from tests.dist_utils import spawn
from tests.helpers import ScaleAt, random_mlp_lm
from tests.test_step import _fp16_amp, _snapshot, _assert_state_equal, batch

CPU = torch.device("cpu")
LR = 1e-2


class SyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value by the host, attributed to the optimizer step running."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.by_step: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_step[self.step] += 1
        return func(*args, **(kwargs or {}))


def fused_adamw(params):
    return torch.optim.AdamW(params, lr=LR, fused=True)


# ---- train_step alone ---------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("policy", ["clipped", "unclipped", "none", "zscore", "percentile", "agc", "zscore+skip"])
def test_fused_step_reads_nothing_back(precision, policy):
    """Every policy, and spike skipping, decide and update their state on the device (the adaptive ones run
    past their warm-up here, so both branches of every `where` are taken)."""
    policy, skip = {
        "clipped": (FixedClip(0.05), None), "unclipped": (FixedClip(1e3), None), "none": (NoClip(), None),
        "zscore": (ZScoreClip(0.05, warmup=2), None), "percentile": (PercentileClip(0.05, window=3, warmup=2), None),
        "agc": (AGC(0.01), None), "zscore+skip": (ZScoreClip(0.05, warmup=2), SpikeSkip(0.5, 4, 2)),
    }[policy]
    model = random_mlp_lm(16, seed=1)
    opt = fused_adamw(model.parameters())
    assert folds_clipping(opt)
    strategy = Strategy(_fp16_amp(2.0**10)) if precision == "fp16" else Strategy()
    counter = SyncCounter()
    with counter:
        for i in range(6):
            train_step(model, opt, [batch(4, seed=i)], policy, strategy=strategy, skip=skip)
    assert sum(counter.by_step.values()) == 0, counter.by_step


def test_sync_counter_sees_the_explicit_paths_read(monkeypatch):
    """Negative control: the explicit path's bool(isfinite(raw)) is one read per step, and it is counted."""
    monkeypatch.setattr(step_module, "folds_clipping", lambda opt: False)
    model = random_mlp_lm(16, seed=1)
    opt = fused_adamw(model.parameters())
    counter = SyncCounter()
    with counter:
        for i in range(3):
            train_step(model, opt, [batch(4, seed=i)], FixedClip(0.05))
    assert counter.by_step[0] == 3


# ---- the trainer's loop, per step, on every strategy of the package's own step -------------------------
#: Adaptive clipping and spike skipping with limits no step reaches (a spike's row is a logged step): their
#: device-side statistics and masked updates, every step.
ADAPTIVE = ("clip.policy=zscore", "clip.warmup_steps=2", "clip.zscore_z=1e6", "clip.skip_sigma=1e6",
            "clip.skip_window=4", "clip.skip_min_steps=2")


def _loop_config(strategy: str, precision: str, steps: int, every: int, device: str, *extra: str):
    """A small debug run that clips every step, for the loop's sync checks."""
    return load_config(DEBUG, ["model.n_layer=2", "model.d_model=32", "train.global_batch_size=8",
                               f"train.max_steps={steps}", f"logging.every={every}", f"dist.strategy={strategy}",
                               f"train.precision={precision}", f"train.device={device}",
                               "logging.wandb.mode=disabled", "clip.max_norm=0.1", "optim.warmup_steps=2", *extra])


def _count_loop(strategy: str, precision: str, steps: int, every: int, *extra: str) -> dict[int, int]:
    """Runs the trainer's loop; the host reads of each optimizer step (1-based), from its start to the next's
    (the first step's, which create the optimizer's state, included)."""
    from dist_train.distributed import DistState

    torch.set_num_threads(1)
    cfg = _loop_config(strategy, precision, steps, every, "cpu", *extra)
    dist = DistState.from_env()
    with dist.session(CPU, "gloo", 120):
        s = trainer.build(cfg, dist, CPU)
        counter = SyncCounter()
        original = trainer_loop.optimizer_step

        def counted(s_, step, halt=None, batches=None):
            counter.step = step + 1
            return original(s_, step, halt, batches)

        trainer_loop.optimizer_step = counted
        try:
            with counter:
                trainer.run(s, [], ProgressReporter(ProgressMode.plain, steps, enabled=False))
        finally:
            trainer_loop.optimizer_step = original
    return dict(counter.by_step)


def _assert_logged_steps_only(by_step: dict[int, int], steps: int, every: int, writes_rows: bool = True) -> None:
    logged = {n for n in range(1, steps + 1) if n % every == 0 or n == steps}
    syncs = {n: c for n, c in by_step.items() if n not in logged and c}
    assert syncs == {}, f"host reads on steps that are not logged: {syncs}"
    if writes_rows:  # rank 0: the counter does see the reads of the rows it writes
        assert all(by_step.get(n, 0) > 0 for n in logged), by_step


#: SGD with momentum: fused SGD with its momentum buffers primed (dist_train.optim), the same sync-free step.
SGD = ("optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05")


@pytest.mark.parametrize("precision", ["no", "fp16"])
@pytest.mark.parametrize("extra", [(), ADAPTIVE, SGD, ("optim.name=sgd",)],
                         ids=["fixed", "zscore+skip", "sgd-momentum", "sgd"])
def test_single_process_loop_syncs_only_on_logged_steps(precision, extra):
    _assert_logged_steps_only(_count_loop("auto", precision, 7, 3, *extra), 7, 3)


@pytest.mark.parametrize("strategy, precision, extra", [("ddp", "no", ()), ("ddp", "fp16", ()), ("fsdp", "no", ()),
                                                        ("fsdp", "fp16", ()), ("ddp", "no", SGD), ("fsdp", "no", SGD)])
def test_distributed_loop_syncs_only_on_logged_steps(strategy, precision, extra):
    for rank, by_step in enumerate(spawn(_count_loop, 2, strategy, precision, 7, 3, *extra)):
        _assert_logged_steps_only(by_step, 7, 3, writes_rows=rank == 0)


def _cuda_loop_under_sync_debug(strategy: str, precision: str, steps: int, every: int, *extra: str) -> None:
    """The trainer's loop on the GPU with torch.cuda.set_sync_debug_mode("error") on every step that is
    not logged: any synchronizing CUDA call there raises."""
    from dist_train.distributed import DistState

    device = torch.device("cuda", 0)
    cfg = _loop_config(strategy, precision, steps, every, "cuda", *extra)
    dist = DistState.from_env()
    with dist.session(device, "nccl", 120):
        s = trainer.build(cfg, dist, device)
        original = trainer_loop.optimizer_step

        def guarded(s_, step, halt=None, batches=None):
            n = step + 1
            logged = n % every == 0 or n == steps
            # Step 1 is left out: it creates the optimizer's state and warms up the kernels.
            torch.cuda.set_sync_debug_mode("default" if logged or n == 1 else "error")
            return original(s_, step, halt, batches)

        trainer_loop.optimizer_step = guarded
        try:
            trainer.run(s, [], ProgressReporter(ProgressMode.plain, steps, enabled=False))
        finally:
            torch.cuda.set_sync_debug_mode("default")
            trainer_loop.optimizer_step = original


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy, precision", [("auto", "no"), ("auto", "fp16"), ("auto", "bf16"),
                                                 ("fsdp", "no"), ("fsdp", "bf16")])
def test_cuda_loop_has_no_sync_on_steps_that_are_not_logged(strategy, precision):
    spawn(_cuda_loop_under_sync_debug, 1, strategy, precision, 9, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_cuda_loop_with_adaptive_clipping_and_spike_skipping_has_no_sync(strategy):
    spawn(_cuda_loop_under_sync_debug, 1, strategy, "no", 9, 4, *ADAPTIVE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [SGD, ("optim.name=sgd",)], ids=["sgd-momentum", "sgd"])
def test_cuda_loop_with_sgd_has_no_sync(extra):
    spawn(_cuda_loop_under_sync_debug, 1, "auto", "no", 9, 4, *extra)


def _cuda_cnn_loop_under_sync_debug(precision: str) -> None:
    """The article's CNN (classify, image batches, labels checked on the host, SGD with momentum) under the same
    guard, evaluating at the end."""
    import tempfile

    from examples.seed_cnn import write

    with tempfile.TemporaryDirectory() as d:
        write(Path(d), 96, 20, 0)
        extra = ("model.factory=examples.seed_cnn:Net", "task.name=classify", f"data.file={d}/train_data.pth",
                 f"data.val_file={d}/val_data.pth", "train.global_batch_size=16", *SGD)
        _cuda_loop_under_sync_debug("auto", precision, 9, 4, *extra)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_cuda_cnn_loop_has_no_sync_on_steps_that_are_not_logged(precision):
    spawn(_cuda_cnn_loop_under_sync_debug, 1, precision)


# ---- folded clipping against explicit clipping --------------------------------------------------------
def _explicit_reference(model, opt, b, max_norm, scaler=None):
    """What a hand-written loop does: (unscale,) clip_grad_norm_, then the same fused AdamW, plain."""
    if scaler is None:
        lm_loss(model, b).backward()
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lm_loss(model, b)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    raw = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return raw


def assert_close_update(got, want, before):
    """The bound where the clip coefficient is folded in. The fused optimizer divides each gradient by
    grad_scale = S / coef (S: the fp16 loss scale, or 1), where the reference multiplies by 1/S and then by
    coef. Rounding S / coef and the division differ from the two products by at most 2 units in the last
    place of each gradient (relative 2^-22). AdamW's update m/(sqrt(v)+eps) is homogeneous of degree 0 in
    the gradient's scale, so it moves by at most about twice that, relatively: |delta update| <= lr * 1e-6
    here; the parameter can also land one rounding step apart (measured: one rounding step at most, 1.2e-7).
    AdamW is nearly blind to a constant factor on every gradient, so a missing or doubled clip shows only
    through the moments it mixes with earlier steps: measured, that moves updates by 5e-4 and more, far
    beyond the bound (`test_folded_clipping_bound_catches_a_missing_clip`)."""
    for g, w, b in zip(got, want, before):
        ulp = torch.finfo(torch.float32).eps * b.abs().clamp_min(1e-30)
        limit = LR * 1e-6 + 2 * ulp
        excess = ((g - w).abs() - limit).max()
        assert excess <= 0, f"update differs by more than the bound (excess {excess.item():.3g})"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("factor", [0.05, 3.0], ids=["clipped", "unclipped"])
def test_folded_clipping_equals_explicit_clipping(precision, factor):
    model = random_mlp_lm(16, seed=2)
    ref = copy.deepcopy(model)
    opt, ref_opt = fused_adamw(model.parameters()), fused_adamw(ref.parameters())
    amp = _fp16_amp(2.0**10) if precision == "fp16" else None
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
    probe = copy.deepcopy(model)
    lm_loss(probe, batch(8, seed=0)).backward()
    max_norm = float(torch.nn.utils.get_total_norm([p.grad for p in probe.parameters()])) * factor
    for i in range(4):
        b = batch(8, seed=i)
        before = [p.detach().clone() for p in ref.parameters()]
        m = train_step(model, opt, [b], FixedClip(max_norm), strategy=Strategy(amp) if amp else Strategy())
        raw = _explicit_reference(ref, ref_opt, b, max_norm, ref_scaler)
        if ref_scaler is not None:
            ref_scaler.update()
        # The raw norm is the same number: an fp16 scale is a power of two, so dividing the scaled norm by
        # it is exact.
        assert torch.equal(m.grad_norm_raw, raw.float())
        got, want = list(model.parameters()), list(ref.parameters())
        if factor > 1:  # nothing clipped: grad_scale is 1 (or the scale alone), the update bit for bit
            assert m.clip_coef == 1
            for g, w in zip(got, want):
                assert torch.equal(g, w)
        else:
            assert m.clip_coef < 0.2
            assert_close_update([g.detach() for g in got], [w.detach() for w in want], before)
            with torch.no_grad():  # the next step starts from the same state again
                for g, w in zip(got, want):
                    g.copy_(w)
                opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))


def test_folded_clipping_bound_catches_a_missing_clip():
    """Negative control for the bound: the same comparison against an unclipped reference fails."""
    model = random_mlp_lm(16, seed=2)
    ref = copy.deepcopy(model)
    opt, ref_opt = fused_adamw(model.parameters()), fused_adamw(ref.parameters())
    before = [p.detach().clone() for p in ref.parameters()]
    for i in range(2):  # the first AdamW step is sign-like; the second sees the clip in its moments
        train_step(model, opt, [batch(8, seed=i)], FixedClip(0.01))
        _explicit_reference(ref, ref_opt, batch(8, seed=i), float("inf"))
    with pytest.raises(AssertionError, match="bound"):
        assert_close_update(list(model.parameters()), list(ref.parameters()), before)


# ---- non-finite steps, on the device -------------------------------------------------------------------
class MeanNormClip(FixedClip):
    """A stateful policy as the interface asks for one: tensors on the device, updated masked by `taken`
    (the running sum and count of the raw norms it observed)."""

    def __init__(self, max_norm, masked=True):
        super().__init__(max_norm)
        self.masked = masked
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    def observe(self, raw, taken):
        take = taken if self.masked else torch.ones_like(taken)  # unmasked: the bug
        self.total = torch.where(take, self.total + raw.double(), self.total)
        self.count = self.count + take.long()


def _nan_at_step_3(precision, policy):
    model = ScaleAt(random_mlp_lm(16, seed=1), {2})
    opt = fused_adamw(model.parameters())
    amp = _fp16_amp(2.0**10) if precision == "fp16" else None
    strategy = Strategy(amp) if amp else Strategy()
    for i in range(2):
        assert not train_step(model, opt, [batch(4, seed=i)], policy, strategy=strategy).skipped
    before = _snapshot(model, opt)  # parameters, moments and step counts
    state = (policy.total.clone(), policy.count.clone())
    scale = amp.scaler.get_scale() if amp else None
    counter = SyncCounter()
    with counter:
        m = train_step(model, opt, [batch(4, seed=2)], policy, strategy=strategy)
    assert sum(counter.by_step.values()) == 0
    assert m.skipped and torch.isnan(m.grad_norm_raw)
    _assert_state_equal(_snapshot(model, opt), before)
    if amp:
        assert amp.scaler.get_scale() == scale / 2  # the overflow lowered the scale, on the device
    assert not train_step(model, opt, [batch(4, seed=3)], policy, strategy=strategy).skipped
    return state, (policy.total, policy.count)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_planted_nan_changes_nothing_without_a_host_read(precision):
    (total, count), (total_after, count_after) = _nan_at_step_3(precision, MeanNormClip(1.0))
    # The policy's state saw steps 1, 2 and 4; the NaN of step 3 never entered it.
    assert count == 2 and count_after == 3 and torch.isfinite(total_after) and total_after > total


def test_planted_nan_check_catches_an_unmasked_policy_update():
    """Negative control: a policy that ignores `taken` takes the NaN in, and the same check fails."""
    _, (total_after, count_after) = _nan_at_step_3("fp32", MeanNormClip(1.0, masked=False))
    assert count_after == 4 and not torch.isfinite(total_after)


def test_run_stops_at_most_one_step_late_and_that_step_changes_nothing(monkeypatch):
    """NaN at steps 3-5 with max_consecutive_nonfinite=3 and no logged step among them: the host learns of
    the third skip after step 6 has run; step 6 is halted on the device, so the weights and moments are
    those of step 2, and the error names step 5."""
    monkeypatch.setenv("NAN_CALLS", "2,3,4")
    cfg = load_config(DEBUG, ["model.factory=tests.helpers:nan_gpt", "train.max_steps=12", "logging.every=10",
                              "clip.max_consecutive_nonfinite=3", "logging.wandb.mode=disabled", "train.device=cpu",
                              "optim.warmup_steps=4"])
    s = trainer.build(cfg)
    snapshots = {}
    original = trainer_loop.optimizer_step

    def spy(s_, step, halt=None, batches=None):
        snapshots[step] = _snapshot(s_.model, s_.optimizer)  # the state before 0-based step `step`
        return original(s_, step, halt, batches)

    monkeypatch.setattr(trainer_loop, "optimizer_step", spy)
    rows = []

    class Sink:
        def log(self, record):
            rows.append(record)

    with pytest.raises(TrainingError, match="training stopped at step 5: 3 consecutive"):
        trainer.run(s, [Sink()], ProgressReporter(ProgressMode.plain, 12, enabled=False))
    assert max(snapshots) == 5  # steps 1-6 ran (0-based 0-5): one step past the limit, no more
    _assert_state_equal(_snapshot(s.model, s.optimizer), snapshots[2])  # nothing changed after step 2
    assert [r["step"] for r in rows] == [3, 4, 5]  # each skipped step has its own row, in order
    assert [r["optim/skipped_steps"] for r in rows] == [1, 2, 3]


def test_fused_sgd_takes_the_explicit_path():
    """torch 2.13's fused SGD makes its momentum buffers with empty_like on the first step and returns early
    on found_inf: a skipped first step would leave them uninitialised. It must not take the fused path, and
    a skipped first step followed by a real one must equal that real step alone."""
    sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)  # noqa: E731
    assert not folds_clipping(sgd([torch.nn.Parameter(torch.zeros(1))]))
    assert folds_clipping(torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))], fused=True))
    model = ScaleAt(random_mlp_lm(16, seed=1), {0})
    ref = copy.deepcopy(model.inner)
    opt, ref_opt = sgd(model.parameters()), sgd(ref.parameters())
    assert train_step(model, opt, [batch(4, seed=0)], FixedClip(1.0)).skipped  # NaN at the first step
    train_step(model, opt, [batch(4, seed=1)], FixedClip(1.0))
    train_step(ref, ref_opt, [batch(4, seed=1)], FixedClip(1.0))
    for a, b in zip(model.inner.parameters(), ref.parameters()):
        assert torch.equal(a, b)
