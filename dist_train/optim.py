"""The optimizer, built in one place from optim.*: torch's AdamW, Adam or SGD.

Where the strategy allows it (`Strategy.fused_optimizer`), the fused implementation:
one kernel per parameter group that also takes the clip coefficient, the fp16 unscale
and the skip decision as device tensors, so the step needs no host read
(`dist_train.step`). DeepSpeed's engine drives the optimizer itself and gets torch's
default implementation.

Fused SGD with momentum, in torch 2.13, creates its momentum buffers with `empty_like`
on the first step and returns early when told to skip it (`found_inf`): a skipped first
step would leave them uninitialised, and the next step would add garbage. So the buffers
are created here, as zeros, before the first step (`prime_momentum`). That changes no
number: torch's first step sets the buffer to the gradient, and momentum x 0 + gradient
is the gradient, exactly (optim.* has no dampening).
"""

from __future__ import annotations

from typing import Iterable

import torch

from dist_train.config import OptimConfig, OptimName, betas


def build_optimizer(o: OptimConfig, params: Iterable[torch.nn.Parameter], fused: bool) -> torch.optim.Optimizer:
    params = list(params)
    flag = fused or None  # None: torch's default implementation (foreach where it can)
    if o.name == OptimName.sgd:
        momentum = o.momentum or 0.0
        # torch 2.13 registers no DTensor rule for fused SGD's kernel (it does for fused Adam and AdamW): on sharded
        # parameters (FSDP2), the same kernel runs on each rank's local shards (ShardedFusedSGD).
        cls = ShardedFusedSGD if flag and any(_is_dtensor(p) for p in params) else torch.optim.SGD
        opt = cls(params, lr=o.lr, momentum=momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, fused=flag)
        prime_momentum(opt)
        return opt
    cls = torch.optim.AdamW if o.name == OptimName.adamw else torch.optim.Adam
    return cls(params, lr=o.lr, betas=betas(o), weight_decay=o.weight_decay, fused=flag)


def prime_momentum(opt: torch.optim.Optimizer) -> None:
    """Fused SGD with momentum: a zero momentum buffer for every parameter that has none yet (see the module's
    docstring). A no-op for every other optimizer, unfused SGD included: nothing skips its first step by
    found_inf, and an engine that re-partitions its parameters (DeepSpeed's ZeRO) must find no state keyed by
    the parameters it replaced."""
    if not isinstance(opt, torch.optim.SGD) or not opt.defaults.get("fused"):
        return
    for group in opt.param_groups:
        if not group["momentum"]:
            continue
        for p in group["params"]:
            state = opt.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def apply_config(opt: torch.optim.Optimizer, o: OptimConfig) -> None:
    """After a resume, this run's optim.* values in every parameter group (loading the optimizer restored the
    saved ones); the learning rate is the schedule's (the trainer sets it)."""
    for group in opt.param_groups:
        group["weight_decay"] = o.weight_decay
        if o.name == OptimName.sgd:
            group["momentum"] = o.momentum or 0.0
            group["nesterov"] = o.nesterov
        else:
            group["betas"] = betas(o)
    prime_momentum(opt)


def describe(o: OptimConfig) -> str:
    """A few words for the startup summary: 'sgd (momentum 0.9)', 'adamw (betas 0.9, 0.95)'."""
    if o.name == OptimName.sgd:
        extra = f"momentum {o.momentum:g}{', nesterov' if o.nesterov else ''}" if o.momentum else "no momentum"
    else:
        b1, b2 = betas(o)
        extra = f"betas {b1:g}, {b2:g}"
    wd = f", weight decay {o.weight_decay:g}" if o.weight_decay else ""
    return f"{o.name.value} ({extra}{wd}), lr {o.lr:g}"


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the storage its in-place updates write), or the tensor."""
    return t.to_local() if _is_dtensor(t) else t


class ShardedFusedSGD(torch.optim.SGD):
    """torch's fused SGD on FSDP2's sharded parameters: each rank runs the fused kernel on its local shards of
    the parameters, gradients and momentum buffers. SGD is element-wise, so the shards' updates are the whole
    tensors' update; the kernel reads `grad_scale` and `found_inf` as on plain tensors, so the step stays
    free of host reads. Its momentum buffers are primed (`prime_momentum`)."""

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "dist_train's step passes no closure"
        from torch.optim.sgd import sgd

        for group in self.param_groups:
            have = [p for p in group["params"] if p.grad is not None]
            if not have:
                continue
            momentum = group["momentum"]
            sgd([_local(p) for p in have], [_local(p.grad) for p in have],
                [_local(self.state[p]["momentum_buffer"]) for p in have] if momentum else [None] * len(have),
                weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
                has_sparse_grad=False, foreach=None, fused=True, grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None))
        return None
