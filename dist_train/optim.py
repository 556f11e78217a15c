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
        if flag and any(_is_dtensor(p) for p in params):
            # torch 2.13 registers no DTensor rule for fused SGD's kernel (it does for fused Adam and AdamW):
            # under FSDP2, SGD takes torch's foreach implementation and the step's explicit path (one host read).
            flag = None
        momentum = o.momentum or 0.0
        opt = torch.optim.SGD(params, lr=o.lr, momentum=momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                              fused=flag)
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
