"""DDP: every rank holds the whole model; gradients are all-reduced inside the last backward.

Non-final micro-batches run under DDP's `no_sync()`, so there is exactly one
gradient all-reduce per optimizer step, and the norm and clipping come after
it, on gradients that are already the global average.
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.distributed import DistState
from dist_train.errors import TrainingError
from dist_train.strategies.base import Amp, OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    def __init__(self, dist: DistState, device: torch.device, amp: Amp):
        super().__init__(amp)
        self.dist = dist
        self.device = device

    def setup(self, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, make_optimizer(list(model.parameters()))

    def describe(self) -> str:
        return f"DDP over {self.dist.world_size} processes"

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        return model.no_sync()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return unwrap(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


def param_checksum(params: list[torch.Tensor]) -> torch.Tensor:
    """(sum, sum of squares) of all parameters in fp64: equal on every rank iff replicas agree (in practice)."""
    total = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    for p in params:
        d = p.detach().double()
        total[0] += d.sum()
        total[1] += (d * d).sum()
    return total


def check_replicas(params: list[torch.Tensor], dist: DistState, step: int) -> None:
    """Raise on every rank if any rank's parameters differ from the others'."""
    lo, hi = dist.min_max(param_checksum(params))
    if not torch.equal(lo, hi):
        raise TrainingError(
            f"replicas diverged at step {step}: parameter checksums differ across ranks "
            f"(sum {lo[0].item():.17g} vs {hi[0].item():.17g}); gradients are not being synchronised "
            "identically; run 'dist-train verify' on this cluster"
        )
