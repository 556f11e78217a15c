"""Clip policies and the clipping arithmetic.

A policy sees only the raw (pre-clip, global, unscaled) gradient norm and its
own state, and returns a threshold. It holds no model tensors. The training
step calls `threshold(raw)` and then `observe(raw, taken)` every step, with no
host read in between: a stateful policy keeps its state as tensors on the
device and updates it masked by `taken` (False when the norm was NaN/Inf and
the step was skipped), e.g. `torch.where(taken, new, old)`, so a NaN/Inf never
enters a policy's history (the bug that poisons adaptive clippers) and the step
never waits for the host. State is read on the host only for logging and
checkpoints (`state_dict`). `threshold` may return +inf ("do not clip"), which
lets an adaptive policy warm up on a history before it clips.

Where an engine clips inside its own step (DeepSpeed), the threshold must be
known before this step's norm exists: only policies whose threshold depends on
past norms alone (`next_threshold`) can run there; a policy that reads the
current norm or the parameters says so (`needs_current_norm`,
`needs_parameters`) and is refused at config load.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from dist_train.config import ClipConfig


class ClipPolicy:
    """Interface. Subclasses override `threshold`, and `observe`/state when stateful."""

    name: str = "base"
    #: False when the policy can never return a finite threshold; the step then
    #: skips the (no-op) scaling pass over the gradients.
    clips: bool = True
    #: True when the threshold depends on this step's raw norm (it cannot run where an engine clips).
    needs_current_norm: bool = False
    #: True when the policy needs per-parameter gradients (which ZeRO partitions do not give).
    needs_parameters: bool = False

    def threshold(self, raw: torch.Tensor) -> torch.Tensor:
        """Threshold for this step, a 0-dim tensor on raw's device. Must not change state."""
        return self.next_threshold(raw.device).to(raw.dtype)

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        """The threshold of the coming step from past norms alone, before its norm exists (a 0-dim fp64
        tensor, so a configured value reaches an engine exactly)."""
        raise NotImplementedError(f"clip policy '{self.name}' needs the current step's norm")

    def observe(self, raw: torch.Tensor, taken: torch.Tensor) -> None:
        """Record this step's raw norm where `taken` (a 0-dim bool on the device) is True; leave the state
        exactly as it was where it is False. No host reads: `raw` may be NaN here, masked out by `taken`."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"clip policy '{self.name}' has no state, got keys {sorted(state)}")


class NoClip(ClipPolicy):
    """Never clips: threshold +inf, so clip_coef is 1 and clipped == raw."""

    name = "none"
    clips = False

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        return torch.full((), math.inf, dtype=torch.float64, device=device)


class FixedClip(ClipPolicy):
    """Clips the global norm to a constant `max_norm`."""

    name = "fixed"

    def __init__(self, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        return torch.full((), self.max_norm, dtype=torch.float64, device=device)


POLICIES: dict[str, Callable[[ClipConfig], ClipPolicy]] = {
    "none": lambda cfg: NoClip(),
    "fixed": lambda cfg: FixedClip(cfg.max_norm),
}


def build_policy(cfg: ClipConfig) -> ClipPolicy:
    return POLICIES[cfg.policy](cfg)


def clip_coefficient(raw: torch.Tensor, threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """min(1, threshold / (raw + eps)): the factor every gradient is multiplied by.

    The same formula, eps and order of operations included, as
    torch.nn.utils.clip_grad_norm_ (which evaluates `max_norm / t` as
    `t.reciprocal() * max_norm`), so our clipped gradients equal its result bit
    for bit in fp32.
    """
    return torch.clamp((raw + eps).reciprocal() * threshold, max=1.0)


def scale_grads_(grads: Iterable[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient in place by `coef` (one fused pass per device/dtype)."""
    grads = list(grads)
    if not grads:
        return
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))
