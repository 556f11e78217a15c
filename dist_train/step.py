"""The training step, written once.

    micro-batches (forward, backward; no gradient sync until the last one)
    -> gradients averaged across ranks
    -> unscale (fp16 GradScaler)
    -> global L2 norm of all gradients            (grad_norm_raw)
    -> clip policy decides a threshold
    -> scale all gradients by min(1, threshold / (raw + eps))
    -> optimizer step, or skip it when raw is NaN/Inf
    -> zero gradients

Backends supply the pieces (how gradients are synchronised, the autocast
context, the scaler); none of them reorders these steps. Metrics stay tensors
on the device; the caller calls `.item()` only on the steps it logs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from dist_train.clip import ClipPolicy, clip_coefficient, scale_grads_

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy; the model maps (B, T) ids to (B, T, V) logits."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


class GradSync(Protocol):
    """How gradients reach the same global average on every rank."""

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        """Context for the non-final micro-batches: accumulate locally, communicate nothing."""

    def average_grads(self, grads: list[torch.Tensor]) -> None:
        """After the last backward: make `grads` the mean over ranks (no-op if already done)."""


class LocalGradSync:
    """Single process: gradients are already global."""

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        return contextlib.nullcontext()

    def average_grads(self, grads: list[torch.Tensor]) -> None:
        return None


@dataclass
class Amp:
    """Mixed precision pieces: an autocast context factory and an optional fp16 scaler."""

    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    scaler: Optional[torch.amp.GradScaler] = None


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
    amp: Optional[Amp] = None,
    grad_sync: Optional[GradSync] = None,
    eps: float = 1e-6,
    params: Optional[Iterable[torch.nn.Parameter]] = None,
) -> StepMetrics:
    """One optimizer step over `micro_batches` (this rank's share of the global batch)."""
    n_micro = len(micro_batches)
    if n_micro == 0:
        raise ValueError("train_step needs at least one micro-batch")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    amp = amp or Amp()
    grad_sync = grad_sync or LocalGradSync()
    scaler = amp.scaler

    loss_sum = None
    for i, batch in enumerate(micro_batches):
        last = i == n_micro - 1
        # Only the last micro-batch communicates: one gradient sync per optimizer step.
        with contextlib.nullcontext() if last else grad_sync.no_sync(model):
            with amp.autocast():
                loss = loss_fn(model, batch)
            # Dividing by n_micro makes the accumulated gradient the gradient of the
            # mean loss over the whole local batch, whatever the micro-batch split.
            scaled = loss / n_micro
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()

    # The scale this step's backward used; update() below changes it in place.
    # (_get_scale_async reads it without a host sync, unlike get_scale().)
    loss_scale = scaler._get_scale_async().clone() if scaler is not None else None

    grads = [p.grad for p in params if p.grad is not None]
    grad_sync.average_grads(grads)

    # The norm must be taken on true gradients: unscale fp16 gradients first.
    if scaler is not None:
        scaler.unscale_(optimizer)

    raw = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
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
