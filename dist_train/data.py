"""Data: the synthetic task, character-level text, and world-size-invariant batching.

Batches are addressed by optimizer step: step s of epoch e takes a contiguous
slice of one permutation of the data set (seeded by seed + e). Every rank takes
its own contiguous share of that global batch and splits it into micro-batches.
So the global batch of step s is the same set of samples, in the same order,
whatever the number of ranks or micro-batches: a 1-process and an N-process run
see identical data, and the epoch can never be forgotten (it follows from s).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train.config import DataConfig
from dist_train.errors import UsageError


class TokenDataset:
    """Samples of block_size + 1 token ids; sample i gives (x, y) = (ids[:-1], ids[1:])."""

    def __init__(self, samples: torch.Tensor, vocab_size: int, itos: list[str] | None = None):
        self.samples = samples
        self.vocab_size = vocab_size
        self.itos = itos

    def __len__(self) -> int:
        return self.samples.size(0)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[indices]
        return s[:, :-1], s[:, 1:]


def synthetic_dataset(num_samples: int, vocab_size: int, block_size: int, seed: int) -> TokenDataset:
    """Arithmetic progressions modulo vocab_size: x[t+1] = (x[t] + d) mod V.

    Each sequence has its own start and stride d in 1..4, so after its first two
    tokens every next token is determined: the loss falls from log(V) towards
    about 2 * log(V) / block_size once the model infers d in context, which a
    two-layer transformer does within a few hundred steps on a laptop CPU.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    start = torch.randint(0, vocab_size, (num_samples, 1), generator=g)
    stride = torch.randint(1, 5, (num_samples, 1), generator=g)
    t = torch.arange(block_size + 1).unsqueeze(0)
    return TokenDataset((start + stride * t) % vocab_size, vocab_size)


def text_dataset(path: str | Path, block_size: int) -> TokenDataset:
    """Character-level samples: consecutive, non-overlapping windows of the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data.text_file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = (ids.numel() - 1) // block_size
    if n < 1:
        raise UsageError(
            f"data.text_file '{path}' has {len(text)} characters, fewer than model.block_size+1={block_size + 1}"
        )
    windows = torch.stack([ids[i * block_size : i * block_size + block_size + 1] for i in range(n)])
    return TokenDataset(windows, len(itos), itos)


def build_dataset(cfg: DataConfig, block_size: int, seed: int) -> TokenDataset:
    if cfg.text_file is not None:
        return text_dataset(cfg.text_file, block_size)
    return synthetic_dataset(cfg.num_samples, cfg.vocab_size, block_size, seed)


@dataclass(frozen=True)
class GlobalBatches:
    """Which samples make up the global batch of each optimizer step."""

    num_samples: int
    global_batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch_size:
            raise UsageError(
                f"the data set has {self.num_samples} samples, fewer than train.global_batch_size="
                f"{self.global_batch_size}; use a larger data set or a smaller batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial batch is dropped

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of the global batch of `step` (0-based), in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = _permutation(self.num_samples, self.seed + epoch)
        return perm[k * self.global_batch_size : (k + 1) * self.global_batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_for_rank(indices: torch.Tensor, rank: int, world_size: int, grad_accum_steps: int) -> list[torch.Tensor]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    g = indices.numel()
    if g % (world_size * grad_accum_steps):
        raise ValueError(f"global batch {g} not divisible by world_size*grad_accum_steps={world_size * grad_accum_steps}")
    local = g // world_size
    mine = indices[rank * local : (rank + 1) * local]
    return list(mine.split(local // grad_accum_steps))
