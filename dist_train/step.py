"""The training step, written once.

    micro-batches (forward, backward; no gradient sync until the last one)
    -> gradients averaged across ranks
    -> global L2 norm of all gradients, unscaled   (grad_norm_raw; one read of the gradients, which also
                                                     gives each tensor's norm)
    -> clip policy decides a threshold              (from its state on the device: past steps only)
    -> spike skip (clip.skip_sigma), if on          (raw, or the loss, against its window of past steps)
    -> coef = min(1, threshold / (raw + eps))       (AGC instead scales each unit of each gradient)
    -> optimizer step: gradients divided by loss_scale / coef inside the optimizer's own pass;
       no update at all when raw is NaN/Inf or the step is a spike (decided on the device)
    -> the policy and the spike window record this step, masked: a skipped step enters neither
    -> zero gradients

With a fused optimizer (torch's Adam/AdamW/Adagrad/SGD with fused=True, which the
trainer builds: dist_train.optim) nothing in the step reads a value back to the host: the skip
decision is the optimizer's `found_inf` tensor, the fp16 unscale and the clip
coefficient are its `grad_scale` tensor, the fp16 scale update and the policy's
state update are device ops masked by finiteness. The gradients are read once
for the norm and once by the optimizer (which, given a grad_scale, writes them
back unscaled in that same pass), and never scaled in a pass of their own. An optimizer
without that support (`folds_clipping` False) takes the explicit path: unscale,
scale by coef, and one host read to decide whether to step.

Where an engine owns everything after the backward (DeepSpeed), the policy's
threshold is handed to it before its step, and the engine reports this step's
raw norm and whether it skipped the update; the metrics mean the same.

Strategies (`dist_train.strategies`) supply the pieces: how gradients are
synchronised, the autocast context, backward with the scaler, unscaling, the
norm over shards. None of them reorders these steps. Metrics stay tensors
on the device; the caller calls `.item()` only on the steps it logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from dist_train.clip import ClipPolicy, SpikeSkip, clip_coefficient, scale_grads_
from dist_train.errors import UsageError
from dist_train.strategies.base import Amp, Strategy

__all__ = ["Amp", "Strategy", "StepMetrics", "engine_update", "folds_clipping", "lm_loss", "train_step",
           "update_step"]

Batch = Any  # what the loss function takes: (x, y) for `lm_loss`; a task's batch (dist_train.tasks)
#: (model, batch) -> the mean loss over the batch's samples, or (that loss, {name: 0-dim tensor}) with metrics
#: of its own (means over the samples too), which the step averages over the micro-batches.
LossFn = Callable[[torch.nn.Module, Batch], Any]


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy; the model maps (B, T) ids to (B, T, V) logits."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


@dataclass
class StepMetrics:
    """What one optimizer step measured. Tensors are 0-dim, on the training device."""

    loss: torch.Tensor
    """Mean loss over this rank's micro-batches (not yet averaged over ranks)."""
    grad_norm_raw: torch.Tensor
    """Global L2 norm of the averaged, unscaled gradients, before clipping."""
    grad_norm_clipped: torch.Tensor
    """Norm after scaling, derived as raw * clip_coef (what the optimizer saw)."""
    clip_coef: torch.Tensor
    """min(1, threshold / (raw + eps)); 1 means not clipped."""
    threshold: torch.Tensor
    """The policy's threshold for this step (inf: the policy does not clip)."""
    skipped: torch.Tensor
    """0-dim bool: True when raw was NaN/Inf (or `halt` was set) and the optimizer step was skipped."""
    loss_scale: Optional[torch.Tensor] = None
    """fp16 GradScaler scale used for this step's backward (None without a scaler)."""
    spike: Optional[torch.Tensor] = None
    """0-dim bool: True when the step was skipped as a spike (clip.skip_sigma); None without spike skipping."""
    spike_clipped: Optional[torch.Tensor] = None
    """0-dim bool: True when a spike-flagging policy (zscore), past its warm-up, clipped this step."""
    param_norms: Optional[torch.Tensor] = None
    """Raw (unscaled, whole) L2 norm of each parameter's gradient, in the order of the step's `params`
    (0 for a parameter without a gradient); None where the engine computes the norm (DeepSpeed)."""
    stats: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """The clip policy's and the spike skip's statistics this step's decisions used (README glossary)."""
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """The loss function's own metrics (classify: accuracy), means over this rank's micro-batches."""


#: Optimizers whose fused step skips cleanly on found_inf: parameters, state and step counts untouched.
#: SGD with momentum only once its momentum buffers exist: in torch 2.13 fused SGD creates them with
#: empty_like on the first step and returns early on found_inf, so a skipped first step would leave them
#: uninitialised (dist_train.optim.prime_momentum creates them as zeros, which changes no number).
FOLDING_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.SGD)


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` reads `grad_scale` and `found_inf` tensors (torch's fused Adam, AdamW,
    Adagrad and SGD, through the hooks GradScaler uses): it then divides each gradient by grad_scale as it
    reads it, and makes no update at all, step counts and momentum included, where found_inf is 1, without a
    host read."""
    if not isinstance(optimizer, FOLDING_OPTIMIZERS) or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if isinstance(optimizer, torch.optim.SGD):
        return all(optimizer.state.get(p, {}).get("momentum_buffer") is not None
                   for g in optimizer.param_groups if g["momentum"] for p in g["params"])
    return True


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    policy: ClipPolicy,
    *,
    loss_fn: LossFn = lm_loss,
    strategy: Optional[Strategy] = None,
    eps: float = 1e-6,
    params: Optional[Iterable[torch.nn.Parameter]] = None,
    halt: Optional[torch.Tensor] = None,
    skip: Optional[SpikeSkip] = None,
) -> StepMetrics:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).

    `halt` (a 0-dim bool on the device) skips the update whatever the norm: the trainer sets it once
    too many steps in a row were non-finite, so a step run before the host learns of that changes nothing.
    An engine that steps itself (DeepSpeed) ignores it; the trainer then checks the limit every step.
    `skip` (clip.skip_sigma) skips the update of a step whose raw norm (or loss) is a spike: like a
    non-finite step, parameters, moments and step counts stay as they were, and neither the policy nor the
    spike window records it.
    """
    n_micro = len(micro_batches)
    if n_micro == 0:
        raise ValueError("train_step needs at least one micro-batch")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    strategy = strategy or Strategy()

    loss_sum = None
    extra: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == n_micro - 1
        # Only the last micro-batch communicates: one gradient sync per optimizer step.
        with contextlib.nullcontext() if last else strategy.no_sync(model):
            with strategy.autocast():
                loss, metrics = _loss_and_metrics(loss_fn(model, batch))
            # Dividing by n_micro makes the accumulated gradient the gradient of the
            # mean loss over the whole local batch, whatever the micro-batch split.
            strategy.backward(loss / n_micro)  # scaled by the fp16 loss scale, if any
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for k, v in metrics.items():
            v = v.detach().float()
            extra[k] = v if k not in extra else extra[k] + v
    extra = {k: v / n_micro for k, v in extra.items()}

    loss_scale = strategy.loss_scale()  # the scale this step's backward used (fp16)

    loss = loss_sum / n_micro
    if strategy.engine_steps:
        m = engine_update(policy, strategy.engine_step, loss.device, loss_scale)
        m.loss, m.extra = loss, extra
        return m

    m = update_step(optimizer, params, policy, strategy=strategy, loss=loss, eps=eps, halt=halt, skip=skip,
                    loss_scale=loss_scale)
    optimizer.zero_grad(set_to_none=True)
    m.extra = extra
    return m


def update_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    policy: ClipPolicy,
    *,
    strategy: Strategy,
    loss: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    halt: Optional[torch.Tensor] = None,
    skip: Optional[SpikeSkip] = None,
    loss_scale: Optional[torch.Tensor] = None,
) -> StepMetrics:
    """Everything after the backward, on the gradients it left: averaged over ranks, the global norm (unscaled),
    the threshold, spike skipping, the clip, then the optimizer's step or none. Shared by `train_step` and
    `dist_train.Clipper.step` (a user's own loop): one implementation. The gradients are not zeroed."""
    has_grad = [i for i, p in enumerate(params) if p.grad is not None]
    if not has_grad:  # which parameters hold a gradient is known on the host: no device read
        raise UsageError(NO_GRADIENT)
    with_grad = [params[i] for i in has_grad]
    grads = [p.grad for p in with_grad]
    strategy.average_grads(grads)
    d = _Decision(policy, skip, strategy, loss, halt, eps, list(zip(with_grad, grads)))

    if folds_clipping(optimizer):
        _fused_step(optimizer, grads, d, strategy, loss_scale)
    else:
        _explicit_step(optimizer, grads, d, strategy)

    norms = d.each
    if len(with_grad) != len(params):  # a parameter without a gradient (unused this step): norm 0
        norms = torch.zeros(len(params), dtype=d.each.dtype, device=d.each.device)
        norms[has_grad] = d.each
    return StepMetrics(
        loss=loss if loss is not None else torch.full((), float("nan"), device=d.raw.device),
        grad_norm_raw=d.raw,
        grad_norm_clipped=d.clipped,
        clip_coef=d.coef,
        threshold=d.threshold,
        skipped=d.skipped,
        loss_scale=loss_scale,
        spike=d.spike,
        spike_clipped=_spike_clipped(policy, d.warm, d.coef, d.take),
        param_norms=norms,
        stats=d.stats,
    )


def engine_update(policy: ClipPolicy, engine_step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, bool]],
                  device: torch.device, loss_scale: Optional[torch.Tensor] = None) -> StepMetrics:
    """Everything after the backward where an engine reduces, unscales, clips and updates (DeepSpeed:
    `dist_train.strategies.deepspeed.EngineClip.step`): the threshold comes from past norms only and is handed
    over before the engine's step, which reports this step's raw norm and whether it skipped. Shared by
    `train_step` and `dist_train.Clipper.step(engine)`."""
    threshold = policy.next_threshold(device)
    stats, warm = policy.stats(), policy.warm()
    raw, clipped, skipped = engine_step(threshold)
    taken = torch.tensor(not skipped, device=raw.device)
    policy.observe(raw, taken)
    # Derived from the engine's arithmetic (it reports neither): min(raw, threshold), up to its eps.
    coef = torch.where(raw == 0, torch.ones_like(raw), clipped / raw)
    return StepMetrics(loss=torch.full((), float("nan"), device=raw.device), grad_norm_raw=raw,
                       grad_norm_clipped=clipped, clip_coef=coef, threshold=threshold.float(), skipped=~taken,
                       loss_scale=loss_scale, spike_clipped=_spike_clipped(policy, warm, coef, taken), stats=stats)


NO_GRADIENT = ("no parameter of the model received a gradient from the loss: the loss does not depend on the "
               "model's trainable parameters (a detached output, or a model that ignores its input's path to "
               "them?); check the model's forward and the loss")


def _loss_and_metrics(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss function's result as (loss, metrics); a loss without a gradient is a one-line UsageError (its
    requires_grad is known on the host), where backward would raise an internal error."""
    loss, metrics = (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) \
        else (out, {})
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UsageError(f"the loss must be a 0-dim tensor, got {got}")
    if not loss.requires_grad:
        raise UsageError(NO_GRADIENT)
    return loss, metrics


def _spike_clipped(policy: ClipPolicy, warm: torch.Tensor, coef: torch.Tensor, taken: torch.Tensor
                   ) -> Optional[torch.Tensor]:
    """A step a spike-flagging policy (zscore) clipped with its adaptive threshold (`warm`: past its warm-up, as
    of before this step), and took: a spike it clipped."""
    return (coef < 1) & taken & warm.to(coef.device) if policy.flags_spikes else None


class _Decision:
    """What the step does with this step's gradients, decided on the device from the raw norm: the threshold,
    the coefficient, whether to update at all; and, once the update is done, the records of the policy
    and the spike window. Shared by the fused and the explicit path."""

    def __init__(self, policy, skip, strategy, loss, halt, eps, pairs):
        self.policy, self.skip, self.strategy, self.loss, self.halt, self.eps = policy, skip, strategy, loss, halt, eps
        self.pairs = pairs

    def decide(self, raw: torch.Tensor, each: torch.Tensor, loss_scale: Optional[torch.Tensor]) -> None:
        """`raw` and `each` are unscaled; the gradients may still carry `loss_scale` (the fused path)."""
        policy, skip = self.policy, self.skip
        self.raw, self.each = raw, each
        self.threshold = policy.threshold(raw)
        stats, self.warm = policy.stats(), policy.warm()
        finite = torch.isfinite(raw)
        ok = finite if self.halt is None else finite & ~self.halt
        self.spike = None
        self.take = ok
        if skip is not None:
            stats.update(skip.stats())
            # Without a loss (a user's loop that judges the norm alone) the window's loss row holds zeros.
            loss = self.loss if self.loss is not None else torch.zeros_like(raw)
            self.loss_global = self.strategy.mean_over_ranks(loss) if skip.on != "norm" else loss
            self.spike = skip.spike(raw, self.loss_global) & ok
            self.take = ok & ~self.spike
        self.skipped = ~ok
        if policy.unitwise:
            # Each unit of each gradient scaled in place (a pass of its own); the optimizer gets coef 1.
            self.clipped = policy.apply_(self.pairs, loss_scale)
            self.coef = torch.where(raw > 0, self.clipped / raw, torch.ones_like(raw))
            self.optimizer_coef = torch.ones_like(raw)
            stats.update(policy.stats())
        else:
            self.coef = self.optimizer_coef = clip_coefficient(raw, self.threshold, self.eps)
            self.clipped = raw * self.coef
        self.stats = stats

    def record(self) -> None:
        """After the update: this step enters the policy's state and the spike window where it was taken."""
        self.policy.observe(self.raw, self.take)
        if self.skip is not None:
            self.skip.observe(self.raw, self.loss_global, self.take, self.spike)


def _fused_step(optimizer, grads, d: _Decision, strategy, loss_scale):
    """The step with no host read: the optimizer unscales and clips inside its own pass."""
    # One read of the gradients: the norm of the still-scaled fp16 gradients, divided by the scale.
    total, each = strategy.grad_norms(grads)
    d.decide(unscaled_norm(total, loss_scale), unscaled_norm(each, loss_scale), loss_scale)
    raw, coef, policy = d.raw, d.optimizer_coef, d.policy
    found_inf = (~d.take).float()  # 1: the optimizer leaves parameters, moments and step counts as they are
    # Each gradient is divided by grad_scale where the optimizer reads it. When nothing is clipped (coef 1)
    # and there is no loss scale, that is a division by exactly 1; an fp16 scale alone is a power of two.
    if loss_scale is not None:
        grad_scale = loss_scale.to(raw.device).float() / coef
    elif policy.clips and not policy.unitwise:
        grad_scale = coef.reciprocal()
    else:
        grad_scale = None
    optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    d.record()
    scaler = strategy.scaler
    if scaler is not None:
        update_scale(scaler, optimizer, (~torch.isfinite(raw)).float())


def unscaled_norm(norm: torch.Tensor, loss_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The raw norm from the norm of the gradients as the backward left them: divided by the fp16 loss
    scale, if any. GradScaler's scale is a power of two, so this equals the norm of the unscaled gradients
    bit for bit (short of fp32 underflow)."""
    return norm if loss_scale is None else norm / loss_scale.to(norm.device)


def _explicit_step(optimizer, grads, d: _Decision, strategy):
    """The step for an optimizer that cannot take grad_scale/found_inf: separate passes, one host read."""
    strategy.unscale_(optimizer)  # the norm must be taken on true gradients
    d.decide(*strategy.grad_norms(grads), None)
    if d.policy.clips and not d.policy.unitwise:
        scale_grads_(grads, d.coef)
    # The host read of this path: whether to update at all. A NaN/Inf norm (or a spike) must leave
    # parameters, optimizer moments and the policy's history untouched.
    if bool(d.take):
        # Not scaler.step(): it would read the same answer back from the device a second time (its
        # found_inf). A finite raw norm means every gradient is finite, its condition for stepping.
        optimizer.step()
    d.record()
    if strategy.scaler is not None:
        strategy.scaler.update()  # reads unscale_'s found_inf: lowers the scale after an overflow


def update_scale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """GradScaler.update() for a step that did not go through scaler.unscale_ (the fused optimizer unscaled
    in its own pass): this step's overflow flag is recorded as unscale_ would have, then the usual update
    halves the scale after an overflow or grows it after a run of clean steps, on the device."""
    if not scaler.is_enabled():
        return
    scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = {found_inf.device: found_inf}
    scaler.update()
