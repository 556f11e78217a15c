"""The pieces of the training step a strategy supplies, and the single-process defaults.

`dist_train.step.train_step` is written once and calls these in a fixed order:

    setup           wrap the model and the optimizer (once, before training)
    no_sync         context for non-final micro-batches: accumulate, communicate nothing
    autocast        context for the forward pass (mixed precision)
    backward        backward of the loss (scaled by the fp16 scaler, if any)
    average_grads   after the last backward: gradients become the mean over ranks
    loss_scale      the fp16 loss scale this step's backward used, as a device tensor
    unscale_        divide fp16 gradients by the loss scale, before the norm (only on the explicit
                    path: a fused optimizer unscales inside its own pass)
    global_norm     the L2 norm of the whole model's gradients, over every shard

A strategy whose engine reduces, unscales, clips and updates inside its own
step (DeepSpeed: `engine_steps`) supplies `engine_step` for that part instead.
A strategy changes how a piece is done, never the order. What a strategy owns
beyond the step (checkpoint state, whether ranks hold replicas) is here too, so
the trainer knows nothing else about it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class Amp:
    """Mixed precision pieces: an autocast context factory and an optional fp16 scaler."""

    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    scaler: Optional[torch.amp.GradScaler] = None


class Strategy:
    """One process, no communication: the reference every other strategy must match."""

    #: True when every rank holds the whole model (parameters can be compared across ranks).
    replicated = True
    #: True when an engine does everything after the last backward (`engine_step`).
    engine_steps = False
    #: True: the trainer builds torch's fused AdamW, which folds the clip coefficient, the fp16 unscale and
    #: the skip decision into its own pass (dist_train.step). False where an engine drives the optimizer.
    fused_optimizer = True

    def __init__(self, amp: Optional[Amp] = None):
        self.amp = amp or Amp()

    # ---- setup -----------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, make_optimizer: OptimizerFactory
              ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap the model, then build the optimizer over the parameters it will train."""
        return model, make_optimizer(list(model.parameters()))

    def describe(self) -> str:
        """A few words for the startup line."""
        return "single process"

    # ---- the step's pieces -----------------------------------------------------------------
    @property
    def scaler(self) -> Optional[torch.amp.GradScaler]:
        return self.amp.scaler

    def autocast(self) -> ContextManager:
        return self.amp.autocast()

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def loss_scale(self) -> Optional[torch.Tensor]:
        """The fp16 loss scale this step's backward used (None without one), read without a host sync."""
        scaler = self.scaler
        # update() changes the scale in place: a copy. (get_scale() would sync with the host.)
        return scaler._get_scale_async().clone() if scaler is not None else None

    def average_grads(self, grads: list[torch.Tensor]) -> None:
        """Make `grads` the mean over ranks; a no-op where the backward already did it."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def global_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm over every gradient of the model (all shards), a 0-dim fp32 tensor."""
        return global_norm(grads)

    def engine_step(self, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Only where `engine_steps`: reduce, unscale, clip at `threshold` and update inside the engine;
        return this step's raw norm and the norm of the gradients applied (both NaN when skipped), and
        whether the update was skipped."""
        raise NotImplementedError

    # ---- beyond the step -------------------------------------------------------------------
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def num_parameters(self, model: torch.nn.Module) -> int:
        """The whole model's parameter count (a DTensor's numel is the global one)."""
        return sum(p.numel() for p in self.unwrap(model).parameters())

    def full_parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """Every parameter, whole (collective where sharded: call on every rank)."""
        return [full(p.detach()) for p in self.unwrap(model).parameters()]

    def state_for_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state dicts, whole (collective where sharded: call on every rank)."""
        return self.unwrap(model).state_dict(), optimizer.state_dict()

    #: How this strategy lays out a checkpoint: "file" (one whole file), "dcp" (torch.distributed.checkpoint
    #: shards), "deepspeed" (the engine's files). A checkpoint resumes under a strategy of the same kind.
    checkpoint_kind = "file"

    def save_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                        state: dict[str, Any], is_main: bool) -> None:
        """Every rank calls this (a sharded model is gathered); rank 0 writes `state` with the whole model
        and optimizer state into one file of `folder`, atomically."""
        from dist_train.rundir import torch_save

        model_state, optimizer_state = self.state_for_checkpoint(model, optimizer)
        if is_main:
            torch_save({**state, "model": model_state, "optimizer": optimizer_state}, folder / CHECKPOINT_FILE)

    def load_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path
                        ) -> dict[str, Any]:
        """Every rank calls this: restore the model and optimizer from `folder`, return the trainer's state."""
        from dist_train.checkpoint import safe_load

        data = safe_load(folder / CHECKPOINT_FILE)
        self.unwrap(model).load_state_dict(data.pop("model"))
        optimizer.load_state_dict(data.pop("optimizer"))
        return data


#: The one file of a checkpoint of a replicated model (single process, DDP, Accelerate).
CHECKPOINT_FILE = "checkpoint.pt"

def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's whole value (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients, whether plain tensors or sharded DTensors.

    Plain tensors: each rank already holds the whole (averaged) gradient.
    DTensors sharded over a 1-D mesh: each rank's local shards give a partial sum
    of squares; one all-reduce of that scalar (in fp64, so no square overflows)
    gives the whole model's norm. That is the only collective here, and it makes
    the norm identical on every rank. Taking one rank's local norm instead is the
    bug this exists to avoid (it is about 1/sqrt(world) of the true norm).
    """
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    from torch.distributed.tensor import DTensor

    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float()
    if len(sharded) != len(grads):
        raise RuntimeError("gradients mix sharded and plain tensors; wrap the whole model with fully_shard")
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh for g in sharded) or any(
            not p.is_shard() for g in sharded for p in g.placements):
        raise RuntimeError("the global gradient norm supports gradients sharded over one 1-D device mesh only")
    import torch.distributed as dist

    local = torch.nn.utils.get_total_norm([g.to_local() for g in sharded], norm_type=2.0)
    squares = local.double().square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return squares.sqrt().float()
