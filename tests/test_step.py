"""The training step: norm, clipping, accumulation, fp16 unscale, non-finite skips.

Each test names the mistake it catches; where cheap, a negative control shows
that the same check fails on the buggy variant.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dist_train.clip import FixedClip, NoClip
from dist_train.step import Amp, Strategy, lm_loss, train_step
from tests.helpers import ScaleAt, random_mlp_lm

VOCAB = 16


def batch(n: int, t: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, t), generator=g)
    y = torch.randint(0, VOCAB, (n, t), generator=g)
    return x, y


class GradSpy:
    """Records the gradients the optimizer is about to apply (after clipping)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.grads: list[torch.Tensor] | None = None
        optimizer.register_step_pre_hook(self._hook)

    def _hook(self, opt, args, kwargs):
        self.grads = [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]


def reference_clip(model, b, max_norm):
    """What torch.nn.utils.clip_grad_norm_ does to the same gradients."""
    model.zero_grad()
    lm_loss(model, b).backward()
    params = [p for p in model.parameters()]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return total, [p.grad.clone() for p in params]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_norm_factor", [0.1, 0.5, 3.0])  # below and above the raw norm
def test_raw_norm_and_clipped_grads_match_torch(seed, max_norm_factor):
    model = random_mlp_lm(VOCAB, seed=seed)
    ref_model = copy.deepcopy(model)
    b = batch(8, seed=seed)
    ref_total, _ = reference_clip(copy.deepcopy(model), b, 1.0)
    max_norm = float(ref_total) * max_norm_factor
    ref_total, ref_grads = reference_clip(ref_model, b, max_norm)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = GradSpy(opt)
    m = train_step(model, opt, [b], FixedClip(max_norm))

    # raw is the norm of the gradients before clipping, exactly what torch computes
    assert torch.equal(m.grad_norm_raw, ref_total)
    # the optimizer saw exactly what clip_grad_norm_ produces
    for got, want in zip(spy.grads, ref_grads):
        assert torch.equal(got, want)
    remeasured = torch.nn.utils.get_total_norm(spy.grads)
    assert remeasured <= max_norm * (1 + 1e-5)
    # clipped is derived as raw * coef; it equals the re-measured norm to fp rounding
    assert torch.allclose(m.grad_norm_clipped, remeasured, rtol=1e-5)
    assert torch.allclose(m.threshold, torch.tensor(max_norm))
    if max_norm_factor < 1:
        assert m.clip_coef < 1
        assert torch.allclose(m.grad_norm_clipped, torch.tensor(max_norm), rtol=1e-5)
    else:
        assert m.clip_coef == 1
        assert torch.equal(m.grad_norm_clipped, m.grad_norm_raw)


def test_no_clip_policy_leaves_gradients_alone():
    model = random_mlp_lm(VOCAB)
    b = batch(8)
    _, ref_grads = reference_clip(copy.deepcopy(model), b, math.inf)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = GradSpy(opt)
    m = train_step(model, opt, [b], NoClip())
    assert m.clip_coef == 1 and math.isinf(m.threshold.item())
    assert torch.equal(m.grad_norm_clipped, m.grad_norm_raw)
    for got, want in zip(spy.grads, ref_grads):
        assert torch.equal(got, want)


def test_step_zeroes_gradients_and_updates_parameters():
    model = random_mlp_lm(VOCAB)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, [batch(4)], FixedClip(1.0))
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _accum_run(micro_batches, max_norm, clip_inside_accumulation=False):
    model = random_mlp_lm(VOCAB, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if not clip_inside_accumulation:
        m = train_step(model, opt, micro_batches, FixedClip(max_norm))
        return m.grad_norm_raw, [p.detach().clone() for p in model.parameters()]
    # The bug the test must catch: clipping each micro-batch's contribution.
    raws = []
    for x, y in micro_batches:
        before = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        (lm_loss(model, (x, y)) / len(micro_batches)).backward()
        contrib = [p.grad - b for p, b in zip(model.parameters(), before)]
        raws.append(torch.nn.utils.clip_grad_norm_(contrib, max_norm))
        for p, b, c in zip(model.parameters(), before, contrib):
            p.grad = b + c
    opt.step()
    return torch.nn.utils.get_total_norm(raws), [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    (na, pa), (nb, pb) = a, b
    torch.testing.assert_close(na, nb, rtol=1e-5, atol=0)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_big_batch(k):
    x, y = batch(4 * k, seed=7)
    one = _accum_run([(x, y)], max_norm=0.05)  # clips: the norm is well above 0.05
    micro = list(zip(x.split(4), y.split(4)))
    _assert_same(_accum_run(micro, max_norm=0.05), one)


def test_accumulation_check_catches_clipping_inside_accumulation():
    x, y = batch(16, seed=7)
    one = _accum_run([(x, y)], max_norm=0.05)
    buggy = _accum_run(list(zip(x.split(4), y.split(4))), max_norm=0.05, clip_inside_accumulation=True)
    with pytest.raises(AssertionError):
        _assert_same(buggy, one)


def _fp16_amp(init_scale: float) -> Amp:
    import functools

    return Amp(
        autocast=functools.partial(torch.autocast, device_type="cpu", dtype=torch.float16),
        scaler=torch.amp.GradScaler("cpu", init_scale=init_scale),
    )


def _assert_unscaled(raw: torch.Tensor, ref: torch.Tensor) -> None:
    # fp16 autocast changes the gradients by ~1e-3 relative; a missing unscale by 2**12.
    torch.testing.assert_close(raw, ref, rtol=2e-2, atol=0)


def test_fp16_norm_is_taken_after_unscale():
    model = random_mlp_lm(VOCAB, seed=5)
    ref_model = copy.deepcopy(model)
    b = batch(8, seed=5)
    lm_loss(ref_model, b).backward()
    ref = torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()])

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = GradSpy(opt)
    amp = _fp16_amp(2.0**12)
    m = train_step(model, opt, [b], FixedClip(float(ref) * 0.5), strategy=Strategy(amp))
    assert not m.skipped
    assert m.loss_scale == 2.0**12
    _assert_unscaled(m.grad_norm_raw, ref)
    # the optimizer applied unscaled, clipped gradients (not unscaled twice, not scaled)
    torch.testing.assert_close(torch.nn.utils.get_total_norm(spy.grads), ref * 0.5, rtol=2e-2, atol=0)

    # Negative control: the norm of the still-scaled gradients fails the same check.
    model2 = copy.deepcopy(ref_model)
    model2.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lm_loss(model2, b)
    scaler.scale(loss).backward()
    scaled_norm = torch.nn.utils.get_total_norm([p.grad for p in model2.parameters()])
    with pytest.raises(AssertionError):
        _assert_unscaled(scaled_norm, ref)


class RecordingPolicy(FixedClip):
    def __init__(self, max_norm):
        super().__init__(max_norm)
        self.seen: list[float] = []

    def observe(self, raw, taken):
        if taken:
            self.seen.append(float(raw))


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    return params, state


def _assert_state_equal(a, b):
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            assert torch.equal(v, sb["state"][k][name]), name


def test_nan_gradient_skips_step_and_training_continues():
    model = ScaleAt(random_mlp_lm(VOCAB, seed=1), {2})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = RecordingPolicy(1.0)
    for i in range(2):
        assert not train_step(model, opt, [batch(4, seed=i)], policy).skipped
    before = _snapshot(model, opt)
    m = train_step(model, opt, [batch(4, seed=2)], policy)
    assert m.skipped and math.isnan(m.grad_norm_raw.item())
    _assert_state_equal(_snapshot(model, opt), before)  # params and Adam moments untouched
    assert len(policy.seen) == 2  # the NaN never reached the policy's history
    assert all(p.grad is None for p in model.parameters())
    m = train_step(model, opt, [batch(4, seed=3)], policy)
    assert not m.skipped and math.isfinite(m.grad_norm_raw.item())
    assert len(policy.seen) == 3


def test_fp16_overflow_is_a_skipped_step_and_lowers_the_scale():
    model = random_mlp_lm(VOCAB, seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = RecordingPolicy(1.0)
    amp = _fp16_amp(2.0**100)  # scaled fp16 gradients overflow
    before = _snapshot(model, opt)
    m = train_step(model, opt, [batch(4)], policy, strategy=Strategy(amp))
    assert m.skipped
    _assert_state_equal(_snapshot(model, opt), before)
    assert policy.seen == []
    assert amp.scaler.get_scale() < 2.0**100
