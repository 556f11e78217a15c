"""FSDP2 (torch's `fully_shard`): parameters, gradients and optimizer state sharded over ranks.

- Wrapping: every module of the model's `nn.ModuleList`s (a transformer's blocks)
  is one FSDP unit, and the root holds the rest (embeddings, head). Each unit's
  parameters are all-gathered for its forward and backward, and its gradients
  reduce-scattered after its backward.
- Accumulation: non-final micro-batches run with `set_requires_gradient_sync(False)`,
  FSDP2's `no_sync`: gradients accumulate unsharded and nothing is reduced, so each
  unit reduce-scatters once per optimizer step.
- Norm: each rank holds one shard of every gradient. The global norm is the local
  sum of squares plus one scalar all-reduce (`base.global_norm`), never one shard's norm.
- Mixed precision (`MixedPrecisionPolicy`): bf16 and fp16 all-gather parameters in
  that dtype and compute in it, and reduce-scatter gradients in fp32; the sharded
  parameters, gradients and optimizer state stay fp32. fp16 adds torch's GradScaler:
  its overflow check on sharded gradients is reduced (max) over the mesh by DTensor,
  so every rank agrees on an overflow and keeps the same loss scale.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dist_train.config import Precision
from dist_train.distributed import DistState
from dist_train.strategies.base import Amp, OptimizerFactory, Strategy


class FSDPStrategy(Strategy):
    replicated = False

    def __init__(self, dist: DistState, device: torch.device, precision: Precision):
        # No autocast: FSDP casts the parameters itself. fp16 needs a loss scale.
        super().__init__(Amp(scaler=torch.amp.GradScaler(device.type) if precision == Precision.fp16 else None))
        self.dist = dist
        self.precision = precision
        self.units = 0

    def mp_policy(self) -> MixedPrecisionPolicy:
        dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(self.precision)
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)

    def setup(self, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        mp = self.mp_policy()
        units = [unit for module in model.modules() if isinstance(module, torch.nn.ModuleList) for unit in module]
        # Reversed pre-order: a nested unit is sharded before the unit that holds it, as FSDP2 requires.
        for unit in reversed(units):
            fully_shard(unit, mp_policy=mp)
            self.units += 1
        fully_shard(model, mp_policy=mp)
        self.units += 1
        return model, make_optimizer(list(model.parameters()))

    def describe(self) -> str:
        p = self.precision.value
        mp = f"{p} compute, fp32 reduce-scatter" if self.precision in (Precision.bf16, Precision.fp16) else "fp32"
        return f"FSDP2 over {self.dist.world_size} processes ({self.units} units, {mp})"

    @contextlib.contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        assert isinstance(model, FSDPModule)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def state_for_checkpoint(self, model, optimizer):
        return whole_state(model, optimizer)


def whole_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state of a sharded model as whole tensors, gathered to rank 0 on the
    CPU (every rank takes part; the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
