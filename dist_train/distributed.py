"""Distributed state: the one module that reads launcher variables and talks to
torch.distributed. Without a launcher environment it is single-process mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DistState:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (identity in single-process mode)."""
        return t
