"""The training step, written once.

    micro-batches (forward, backward; no gradient sync until the last one)
    -> gradients averaged across ranks
    -> unscale (fp16 GradScaler)
    -> global L2 norm of all gradients            (grad_norm_raw)
    -> clip policy decides a threshold
    -> scale all gradients by min(1, threshold / (raw + eps))
    -> optimizer step, or skip it when raw is NaN/Inf
    -> zero gradients

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
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from dist_train.clip import ClipPolicy, clip_coefficient, scale_grads_
from dist_train.strategies.base import Amp, Strategy

__all__ = ["Amp", "Strategy", "StepMetrics", "lm_loss", "train_step"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


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
    skipped: bool
    """True when raw was NaN/Inf and the optimizer step was skipped."""
    loss_scale: Optional[torch.Tensor] = None
    """fp16 GradScaler scale used for this step's backward (None without a scaler)."""


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
) -> StepMetrics:
    """One optimizer step over `micro_batches` (this rank's share of the global batch)."""
    n_micro = len(micro_batches)
    if n_micro == 0:
        raise ValueError("train_step needs at least one micro-batch")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    strategy = strategy or Strategy()
    scaler = strategy.scaler

    loss_sum = None
    for i, batch in enumerate(micro_batches):
        last = i == n_micro - 1
        # Only the last micro-batch communicates: one gradient sync per optimizer step.
        with contextlib.nullcontext() if last else strategy.no_sync(model):
            with strategy.autocast():
                loss = loss_fn(model, batch)
            # Dividing by n_micro makes the accumulated gradient the gradient of the
            # mean loss over the whole local batch, whatever the micro-batch split.
            strategy.backward(loss / n_micro)  # scaled by the fp16 loss scale, if any
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()

    loss_scale = strategy.loss_scale()  # the scale this step's backward used (fp16)

    if strategy.engine_steps:
        # The engine reduces, unscales, clips and updates; the threshold comes from past norms only.
        threshold = policy.next_threshold(loss_sum.device)
        raw, clipped, skipped = strategy.engine_step(threshold)
        if not skipped:
            policy.observe(raw)
        # Derived from the engine's arithmetic (it reports neither): min(raw, threshold), up to its eps.
        coef = torch.where(raw == 0, torch.ones_like(raw), clipped / raw)
        return StepMetrics(loss=loss_sum / n_micro, grad_norm_raw=raw, grad_norm_clipped=clipped,
                           clip_coef=coef, threshold=threshold.float(), skipped=skipped, loss_scale=loss_scale)

    grads = [p.grad for p in params if p.grad is not None]
    strategy.average_grads(grads)

    # The norm must be taken on true gradients: unscale fp16 gradients first.
    strategy.unscale_(optimizer)

    # The whole model's norm: over every shard where gradients are sharded.
    raw = strategy.global_norm(grads)
    threshold = policy.threshold(raw)
    coef = clip_coefficient(raw, threshold, eps)
    if policy.clips:
        scale_grads_(grads, coef)

    # The one host sync of the step: whether to update at all. A NaN/Inf norm must
    # leave parameters, optimizer moments and the policy's history untouched.
    skipped = not bool(torch.isfinite(raw))
    if not skipped:
        # Not scaler.step(): it would read the same answer back from the device a
        # second time (its found_inf). A finite raw norm means every gradient is
        # finite, which is exactly its condition for stepping.
        optimizer.step()
        policy.observe(raw)
    if scaler is not None:
        scaler.update()  # reads unscale_'s found_inf: lowers the scale after an overflow
    optimizer.zero_grad(set_to_none=True)

    return StepMetrics(
        loss=loss_sum / n_micro,
        grad_norm_raw=raw,
        grad_norm_clipped=raw * coef,
        clip_coef=coef,
        threshold=threshold,
        skipped=skipped,
        loss_scale=loss_scale,
    )
