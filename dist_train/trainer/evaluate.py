"""Evaluation on the validation set, exact on any number of ranks.

Rank r of W takes the contiguous part [n*r//W, n*(r+1)//W) of the n validation samples:
the parts are disjoint and cover every sample once, with no padding. (torch's
DistributedSampler pads the last part by repeating samples, so a set that does not
divide evenly counts some twice: the bug this avoids.) Each rank sums each metric
over its samples, in fp64, and one all-reduce of (samples, sums) gives every rank
the totals; the metric is total / samples: the single process's number.

Every rank runs the same number of forward passes: FSDP2 and ZeRO-3 gather
parameters inside the forward, and DDP broadcasts buffers there, so a rank that
stopped early would leave the others waiting. A rank whose part is used up runs its
last passes on one sample with weight 0 (its sums are not added).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dist_train.metrics import _num
from dist_train.trainer.setup import Setup, on_device


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous part of n samples: disjoint across ranks, covering all, sizes differing by 1 at
    most."""
    return n * rank // world, n * (rank + 1) // world


def eval_size(s: Setup) -> int:
    """The validation samples an evaluation covers: all, or the first eval.max_batches x global batch."""
    assert s.val is not None
    n = len(s.val)
    if s.cfg.eval.max_batches is not None:
        n = min(n, s.cfg.eval.max_batches * s.cfg.train.global_batch_size)
    return n


def evaluate(s: Setup) -> dict[str, Optional[float]]:
    """`eval/<metric>` of the model on the validation set (a collective: every rank calls it). The model is in
    eval mode, without gradients, for the duration."""
    assert s.val is not None
    d = s.dist
    n = eval_size(s)
    lo, hi = rank_range(n, d.rank, d.world_size)
    size = s.cfg.train.global_batch_size // (d.world_size * s.cfg.train.grad_accum_steps)  # a micro-batch
    passes = math.ceil(math.ceil(n / d.world_size) / size)  # the largest part's, the same on every rank
    sums: dict[str, torch.Tensor] = {}
    samples = 0
    was_training = s.model.training
    s.model.eval()
    try:
        with torch.no_grad():
            for k in range(passes):
                a = lo + k * size
                b = min(a + size, hi)
                weight = 1.0 if a < b else 0.0
                idx = torch.arange(a, b) if a < b else torch.arange(0, 1)  # a pass to keep in step with the others
                batch = on_device(s, s.val.batch(idx), idx, s.val)
                with s.strategy.autocast():
                    part = s.task.eval_sums(s.model, batch)
                for key, v in part.items():
                    v = v.detach().double() * weight
                    sums[key] = v if key not in sums else sums[key] + v
                samples += b - a if a < b else 0
    finally:
        s.strategy.after_eval(s.model)
        s.model.train(was_training)
    keys = sorted(sums)
    totals = torch.stack([torch.tensor(float(samples), dtype=torch.float64, device=s.device),
                          *[sums[k].to(s.device) for k in keys]])
    totals = d.sum(totals)  # collective
    values = (totals[1:] / totals[0]).tolist()  # an evaluation step is a logged step: its host read
    return {f"eval/{k}": _num(v) for k, v in zip(keys, values)}



