"""Accelerate: `accelerate launch` starts the processes; the Accelerator owns process
setup, device placement, mixed precision and its DDP or FSDP2 wrapping.

The package keeps the step and its guarantees:
- the Accelerator prepares the model and optimizer, but the step uses the torch
  optimizer inside it: the prepared one would call `scaler.step()` and
  `scaler.update()` itself, a second host read and a second scale update. The LR
  scheduler is not prepared either (a prepared one steps once per process);
- non-final micro-batches run under `accelerator.no_sync`, so one gradient
  reduction per optimizer step;
- `accelerator.backward` scales the loss; the norm is divided by Accelerate's
  scale and the fused optimizer unscales as it reads the gradients (the step's
  explicit path, for an optimizer without that, calls
  `accelerator.unscale_gradients()` before the norm);
- the norm is the package's (raw and clipped, DTensor-aware), not
  `accelerator.clip_grad_norm_`, which returns one number;
- data are the package's step-addressed global batches; no dataloader is prepared.

Accelerate's silent fallbacks are refused, from the environment at config load
(`dist_train.strategies.resolve`) and again here from the Accelerator's state:
N processes that each train alone, and FSDP or DeepSpeed configs dropped on a
CPU. (A DeepSpeed config runs as `deepspeed.AccelerateDeepSpeedStrategy`.)
fp16 on a CPU, which Accelerate 1.x turns off without a word, is turned back on
with torch's CPU GradScaler, so the run is the precision that was asked for.
"""

from __future__ import annotations

from typing import ContextManager

import torch

from dist_train.distributed import DistState
from dist_train.errors import ConfigError
from dist_train.strategies import env_true
from dist_train.strategies.base import OptimizerFactory, Strategy
from dist_train.strategies.fsdp import load_sharded, reshard_all, save_sharded, whole_state

CPU_RECIPE = "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N (launch/accelerate.sh does this)"


class AccelerateStrategy(Strategy):
    def __init__(self, dist: DistState, device: torch.device):
        super().__init__()
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.dist = dist
        self.accelerator = acc = Accelerator()
        kind = acc.distributed_type
        if dist.world_size > 1 and (kind == DistributedType.NO or acc.num_processes != dist.world_size):
            raise ConfigError(
                f"accelerate launch started {dist.world_size} processes but Accelerate sees {acc.num_processes} "
                f"({kind.value}): each would train its own model; on a CPU-only machine use {CPU_RECIPE}")
        if env_true("ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
            raise ConfigError(
                f"the Accelerate config asks for FSDP but Accelerate set up {kind.value} (it runs FSDP only on GPUs); "
                "on a CPU use dist.strategy=fsdp with launch/torchrun.sh")
        if env_true("ACCELERATE_USE_DEEPSPEED") or kind == DistributedType.DEEPSPEED:
            # DeepSpeed is AccelerateDeepSpeedStrategy's (strategies.create picks it from the environment).
            raise ConfigError("Accelerate set up DeepSpeed for a job that did not ask for it through "
                              "ACCELERATE_USE_DEEPSPEED; start it with launch/accelerate.sh and an Accelerate config "
                              "whose distributed_type is DEEPSPEED (configs/accelerate/deepspeed.yaml)")
        # Accelerate names a single process's GPU `cuda` (no index): that is the current device.
        def index(d: torch.device) -> int:
            return torch.cuda.current_device() if d.index is None else d.index

        if acc.device.type != device.type or (device.type == "cuda" and index(acc.device) != index(device)):
            raise ConfigError(f"Accelerate places the model on {acc.device} but train.device gives {device}; "
                              "set train.device=auto, or pass --cpu to accelerate launch")
        if acc.gradient_accumulation_steps != 1:  # accelerator.backward would divide the loss by it
            raise ConfigError(f"Accelerate is set to accumulate gradients over {acc.gradient_accumulation_steps} "
                              "steps; dist_train accumulates itself: set train.grad_accum_steps instead")
        self.fsdp = kind == DistributedType.FSDP
        self.replicated = not self.fsdp
        self.cpu_fp16 = acc.mixed_precision == "fp16" and acc.scaler is None and acc.device.type == "cpu"
        if self.cpu_fp16:
            # Accelerate runs fp16 only on accelerators and otherwise trains in fp32 silently;
            # its own autocast, backward and unscale_gradients work on a CPU once these are set.
            acc.native_amp = True
            acc.scaler = torch.amp.GradScaler("cpu")

    def setup(self, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        optimizer = make_optimizer(list(model.parameters()))
        model, prepared = self.accelerator.prepare(model, optimizer)
        return model, prepared.optimizer

    def describe(self) -> str:
        acc = self.accelerator
        precision = {"no": "fp32"}.get(acc.mixed_precision, acc.mixed_precision)
        extra = ", fp16 on the CPU with torch's GradScaler" if self.cpu_fp16 else ""
        if acc.num_processes == 1:
            return f"Accelerate, one process ({precision}{extra})"
        return f"Accelerate {acc.distributed_type.value} over {acc.num_processes} processes ({precision}{extra})"

    @property
    def scaler(self):
        return self.accelerator.scaler

    def autocast(self) -> ContextManager:
        return self.accelerator.autocast()

    def no_sync(self, model: torch.nn.Module) -> ContextManager:
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.accelerator.unscale_gradients()

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def state_for_checkpoint(self, model, optimizer):
        if self.fsdp:
            return whole_state(model, optimizer)
        return super().state_for_checkpoint(model, optimizer)

    def after_eval(self, model: torch.nn.Module) -> None:
        if self.fsdp:
            reshard_all(model)

    @property
    def checkpoint_kind(self) -> str:  # type: ignore[override]
        return "dcp" if self.fsdp else "file"

    def save_checkpoint(self, model, optimizer, folder, state, is_main) -> None:
        if self.fsdp:  # Accelerate's FSDP2 model is fully_shard's: the same sharded checkpoint
            return save_sharded(model, optimizer, folder, state, is_main)
        return super().save_checkpoint(model, optimizer, folder, state, is_main)

    def load_checkpoint(self, model, optimizer, folder, check_state=None):
        if self.fsdp:
            return load_sharded(model, optimizer, folder, check_state)
        return super().load_checkpoint(model, optimizer, folder, check_state)
