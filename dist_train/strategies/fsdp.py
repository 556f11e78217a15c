"""FSDP2 (torch's `fully_shard`): parameters, gradients and optimizer state sharded over ranks.

- Wrapping: every module of the model's `nn.ModuleList`s (a transformer's blocks)
  is one FSDP unit, and the root holds the rest (embeddings, head). Each unit's
  parameters are all-gathered for its forward and backward, and its gradients
  reduce-scattered after its backward.
- Accumulation: non-final micro-batches run with `set_requires_gradient_sync(False)`,
  FSDP2's `no_sync`: gradients accumulate unsharded and nothing is reduced, so each
  unit reduce-scatters once per optimizer step.
- Norm: each rank holds one shard of every gradient. The global norm is the local
  sums of squares, one per tensor, plus one all-reduce of that vector (`base.grad_norms`), never one shard's
  norm; the same reduction gives each tensor's whole norm (per-layer norms, spike forensics).
- Mixed precision (`MixedPrecisionPolicy`): bf16 and fp16 all-gather parameters in
  that dtype and compute in it, and reduce-scatter gradients in fp32; the sharded
  parameters, gradients and optimizer state stay fp32. fp16 adds torch's GradScaler:
  its overflow check on sharded gradients is reduced (max) over the mesh by DTensor,
  so every rank agrees on an overflow and keeps the same loss scale.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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
        self.device = device
        self.precision = precision
        self.units = 0

    def mp_policy(self) -> MixedPrecisionPolicy:
        dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(self.precision)
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)

    def setup(self, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        from dist_train.distributed import one_process_group

        one_process_group(self.device)  # one process: a mesh of one (nothing sharded; resumes a sharded run)
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

    def after_eval(self, model: torch.nn.Module) -> None:
        reshard_all(model)

    checkpoint_kind = "dcp"

    def state_for_checkpoint(self, model, optimizer):
        return whole_state(model, optimizer)

    def save_checkpoint(self, model, optimizer, folder: Path, state: dict[str, Any], is_main: bool) -> None:
        save_sharded(model, optimizer, folder, state, is_main)

    def load_checkpoint(self, model, optimizer, folder: Path, check_state=None) -> dict[str, Any]:
        return load_sharded(model, optimizer, folder, check_state)


def reshard_all(model: torch.nn.Module) -> None:
    """Free the unsharded parameters a forward without a backward left (FSDP2 keeps the root's after its
    forward, expecting the backward): the model's parameters are the sharded ones the optimizer holds again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path, state: dict[str, Any],
                 is_main: bool) -> None:
    """torch.distributed.checkpoint: every rank writes its shards of the model and of AdamW's moments into
    `folder`; rank 0 writes the trainer's state and the optimizer's param_groups to `trainer.pt`. Only
    tensors go through DCP (it would pickle anything else), so loading needs no arbitrary pickle."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from dist_train.checkpoint import TRAINER
    from dist_train.rundir import torch_save

    optim = get_optimizer_state_dict(model, optimizer)
    dcp.save({"model": get_model_state_dict(model), "optim": optim["state"]}, checkpoint_id=str(folder))
    if is_main:
        torch_save({**state, "param_groups": optim["param_groups"]}, folder / TRAINER)


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                 check_state: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """The inverse of save_sharded, on any number of ranks: DCP reshards the saved tensors onto this
    run's mesh, so a checkpoint of 2 processes resumes on 1 or 3. `check_state`: as in
    Strategy.load_checkpoint, before any tensor is loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from dist_train.checkpoint import TRAINER, check_dcp_metadata, safe_load

    state = safe_load(folder / TRAINER)
    if check_state is not None:
        check_state(state)
    check_dcp_metadata(folder)
    model_state = get_model_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer)  # AdamW's state, created (zero) if it has none yet
    dcp.load({"model": model_state, "optim": optim["state"]}, checkpoint_id=str(folder))
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, {"state": optim["state"], "param_groups": state.pop("param_groups")})
    return state
