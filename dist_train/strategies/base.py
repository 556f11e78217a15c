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
    grad_norms      the L2 norm of the whole model's gradients, over every shard, and each tensor's
    mean_over_ranks a loss averaged over ranks (only for spike skipping on the loss)

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
    #: The process group's state, where there is one (the distributed strategies set it).
    dist: Optional[Any] = None

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

    def cast_inputs(self, batch: Any) -> Any:
        """A batch on the device as the model takes it: unchanged, except where the engine casts the model's
        weights to bf16/fp16 without autocast (DeepSpeed), whose floating-point inputs must follow."""
        return batch

    def after_eval(self, model: torch.nn.Module) -> None:
        """After forward passes without a backward (evaluation): leave the model as training expects it."""

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

    def grad_norms(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2 norm over every gradient of the model (all shards), a 0-dim fp32 tensor; the L2 norm of each
        gradient tensor, whole, a vector in the order of `grads`)."""
        return grad_norms(grads)

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a 0-dim tensor over ranks (a collective where distributed)."""
        return t if self.dist is None else self.dist.mean(t)

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

    def check_resume(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Refuse a checkpoint of this strategy's kind that this run still cannot resume from (ConfigError)."""

    def load_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                        check_state: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
        """Every rank calls this: restore the model and optimizer from `folder`, return the trainer's state.
        `check_state` sees the trainer's state first, before the model or the optimizer is touched: a resume
        on another data set is refused as that, not as a model of another shape that fails to load."""
        from dist_train.checkpoint import safe_load

        data = safe_load(folder / CHECKPOINT_FILE)
        if check_state is not None:
            check_state(data)
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
    """The L2 norm of all gradients (see `grad_norms`)."""
    return grad_norms(grads)[0]


def grad_norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2 norm of all gradients, and of each gradient tensor, whether plain tensors or sharded DTensors.

    Plain tensors: each rank already holds the whole (averaged) gradient. The per-tensor norms are one
    `_foreach_norm` and the total is their norm: the arithmetic of torch.nn.utils.get_total_norm, so the
    total equals it bit for bit, and the per-tensor norms cost nothing extra.
    DTensors sharded over a 1-D mesh: each rank's local shards give partial sums of squares, one per tensor;
    one all-reduce of that vector (in fp64, so no square overflows) gives every tensor's whole norm and
    the model's. That is the only collective here, and it makes the norms identical on every rank. Taking
    one rank's local norm instead is the bug this exists to avoid (about 1/sqrt(world) of the true norm).
    """
    if not grads:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.reshape(0)
    from torch.distributed.tensor import DTensor

    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return _total_and_each(grads)
    if len(sharded) != len(grads):
        raise RuntimeError("gradients mix sharded and plain tensors; wrap the whole model with fully_shard")
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh for g in sharded) or any(
            not p.is_shard() for g in sharded for p in g.placements):
        raise RuntimeError("the global gradient norm supports gradients sharded over one 1-D device mesh only")
    import torch.distributed as dist

    _, local = _total_and_each([g.to_local() for g in sharded])
    squares = local.double().square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=mesh.get_group())
    return squares.sum().sqrt().float(), squares.sqrt().float()


def _total_and_each(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """get_total_norm's arithmetic (foreach norms per device and dtype, then the norm of their stack), keeping
    the stack, in the order of `tensors`."""
    first = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    norms: list[Optional[torch.Tensor]] = [None] * len(tensors)
    for idx in groups.values():
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2.0)):
            norms[i] = n.to(first)
    each = torch.stack(norms)  # type: ignore[arg-type]
    order = [i for idx in groups.values() for i in idx]  # get_total_norm stacks them in group order
    total = torch.linalg.vector_norm(each if order == sorted(order) else each[order], 2.0)
    return total.float(), each.float()
