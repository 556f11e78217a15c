"""The plain DDP backend: wrapping, gradient synchronisation, the replica guard."""

from __future__ import annotations

from typing import ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.distributed import DistState
from dist_train.errors import TrainingError


class DDPGradSync:
    """DDP averages gradients inside the last micro-batch's backward.

    Non-final micro-batches run under `no_sync()`, so there is exactly one
    gradient all-reduce per optimizer step, and the norm and clipping in the
    step come after it.
    """

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        return model.no_sync()

    def average_grads(self, grads: list[torch.Tensor]) -> None:
        return None  # already averaged over ranks by DDP's reducer


def wrap(model: torch.nn.Module, device: torch.device) -> DDP:
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def param_checksum(model: torch.nn.Module) -> torch.Tensor:
    """(sum, sum of squares) of all parameters in fp64: equal on every rank iff replicas agree (in practice)."""
    params = [p.detach() for p in unwrap(model).parameters()]
    total = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    for p in params:
        d = p.double()
        total[0] += d.sum()
        total[1] += (d * d).sum()
    return total


def check_replicas(model: torch.nn.Module, dist: DistState, step: int) -> None:
    """Raise on every rank if any rank's parameters differ from the others'."""
    lo, hi = dist.min_max(param_checksum(model))
    if not torch.equal(lo, hi):
        raise TrainingError(
            f"replicas diverged at step {step}: parameter checksums differ across ranks "
            f"(sum {lo[0].item():.17g} vs {hi[0].item():.17g}); gradients are not being synchronised "
            "identically; run 'dist-train verify' on this cluster"
        )
