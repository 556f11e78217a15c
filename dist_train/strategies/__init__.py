"""Ways of distributing the one training step, each a small adapter (see `base.Strategy`).

    single      one process, no launcher (`base.Strategy`)
    ddp         torchrun (or any env:// launcher), DistributedDataParallel   (`ddp`)
    fsdp        torchrun, FSDP2 `fully_shard`: sharded parameters and grads   (`fsdp`)
    accelerate  `accelerate launch`, the Accelerator's DDP or FSDP2           (`accelerate`)
    deepspeed   DeepSpeed's engine, ZeRO stages 0-3 (deepspeed or torchrun)   (`deepspeed`)

`resolve` turns `dist.strategy` and `train.precision` (both may be `auto`) and the
launcher's environment into a `Plan`; `load_config` runs it, so a
combination that cannot work is one line before anything starts; `create` builds
the strategy for a rank. Nothing outside this package branches on the strategy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from dist_train.config import Config, Precision, StrategyName
from dist_train.errors import ConfigError
from dist_train.launchers import world_size_from_env

#: Set in every process `accelerate launch` starts, whatever its launcher mode.
ACCELERATE_MARKER = "ACCELERATE_MIXED_PRECISION"


@dataclass(frozen=True)
class Plan:
    strategy: str
    """single | ddp | fsdp | accelerate | deepspeed"""
    precision: Precision
    """no | bf16 | fp16 (never auto)"""


def env_true(var: str, env: Mapping[str, str] = os.environ) -> bool:
    """A launcher's boolean variable (accelerate writes true/True)."""
    return env.get(var, "").strip().lower() in ("1", "true", "yes")


def resolve(cfg: Config, env: Mapping[str, str] = os.environ, cuda: Optional[bool] = None) -> Plan:
    """The strategy and precision this process will run, or a ConfigError saying what to change."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    requested = cfg.dist.strategy
    precision = cfg.train.precision
    by_accelerate = ACCELERATE_MARKER in env
    if cfg.dist.deepspeed_config is not None and requested != StrategyName.deepspeed and not (
            by_accelerate and env_true("ACCELERATE_USE_DEEPSPEED", env)):
        raise ConfigError(
            f"config key 'dist.deepspeed_config' is set, but dist.strategy is {requested.value}, which does not use "
            "it; set dist.strategy=deepspeed (launch/deepspeed.sh does), or remove dist.deepspeed_config")
    sharded = requested == StrategyName.fsdp or (by_accelerate and env_true("ACCELERATE_USE_FSDP", env))
    if sharded and cfg.dist.check_sync_every:
        raise ConfigError(
            "config key 'dist.check_sync_every': under FSDP each rank holds a shard, not a replica, so there is "
            "nothing to compare; set it to 0")
    if by_accelerate:
        if requested not in (StrategyName.auto, StrategyName.accelerate):
            raise ConfigError(
                f"config key 'dist.strategy': {requested.value} under accelerate launch, which sets up processes "
                "and mixed precision itself; use dist.strategy=auto (or accelerate), or start the job with "
                "launch/torchrun.sh")
        precision = _accelerate_precision(precision, env, cuda)
        if env_true("ACCELERATE_USE_DEEPSPEED", env):
            # Accelerate decided the precision; the DeepSpeed JSON must agree with it.
            import dataclasses

            _deepspeed_precision(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision)),
                                 env, cuda)
        return Plan("accelerate", precision)
    if requested == StrategyName.accelerate:
        raise ConfigError("config key 'dist.strategy': accelerate needs a job started by accelerate launch; "
                          "use launch/accelerate.sh, or dist.strategy=auto")
    if requested == StrategyName.deepspeed:
        return Plan("deepspeed", _deepspeed_precision(cfg, env, cuda))
    precision = Precision.no if precision == Precision.auto else precision
    if requested == StrategyName.fsdp:
        return Plan("fsdp", precision)
    # ddp over one process is the single-process step (DDP with one rank only adds a wrapper).
    return Plan("ddp" if world_size_from_env(env) > 1 else "single", precision)


def _deepspeed_precision(cfg: Config, env: Mapping[str, str], cuda: bool) -> Precision:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("DeepSpeed is not installed; pip install 'dist_train[deepspeed]'")
    from dist_train.strategies.deepspeed import deepspeed_config

    world = world_size_from_env(env) if "WORLD_SIZE" in env else None  # None: a launcher's preflight
    _, precision = deepspeed_config(cfg, world, env)
    if precision == Precision.fp16 and not cuda and not cpu_fp16_supported():
        # What DeepSpeed's CPU accelerator checks; it would fail later with "fp16 is not supported".
        raise ConfigError("DeepSpeed runs fp16 on a CPU only where oneDNN supports fp16, and this CPU's does not; "
                          "use train.precision=bf16 (or fp32) and a DeepSpeed JSON without fp16, or a GPU")
    return precision


def cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator allows fp16 here (it asks oneDNN, as this does)."""
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def _accelerate_precision(precision: Precision, env: Mapping[str, str], cuda: bool) -> Precision:
    acc = env.get(ACCELERATE_MARKER, "no").strip().lower()
    if acc not in ("no", "bf16", "fp16"):
        raise ConfigError(f"accelerate launch asks for mixed precision '{acc}', which dist_train does not support; "
                          "use no, bf16 or fp16 (--mixed_precision or mixed_precision in the Accelerate config)")
    if precision not in (Precision.auto, Precision(acc)):
        raise ConfigError(
            f"config key 'train.precision': {precision.value} contradicts Accelerate's mixed_precision '{acc}', "
            "which decides it under accelerate launch; set train.precision=auto (or to the same value), or change "
            "--mixed_precision / the Accelerate config")
    # The silent fallbacks of Accelerate on a CPU-only machine, caught before anything starts.
    deepspeed = env_true("ACCELERATE_USE_DEEPSPEED", env)
    if not cuda and deepspeed and env_true("ACCELERATE_USE_CPU", env):
        raise ConfigError("the Accelerate config asks for DeepSpeed, which Accelerate drops for plain data-parallel "
                          "under ACCELERATE_USE_CPU=true; on a CPU launch without it (launch/accelerate.sh does): "
                          "dist_train runs DeepSpeed's CPU accelerator over gloo")
    if not cuda and not deepspeed:
        if world_size_from_env(env) > 1 and not env_true("ACCELERATE_USE_CPU", env):
            raise ConfigError(
                f"accelerate launch started {world_size_from_env(env)} processes on a machine without GPUs, but "
                "without ACCELERATE_USE_CPU=true Accelerate would let each train its own model; use "
                "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N (launch/accelerate.sh "
                "does this)")
        if "WORLD_SIZE" not in env and env.get("MASTER_PORT"):
            raise ConfigError(
                "accelerate launch --cpu starts a single process whatever --num_processes says (its multi-process "
                "CPU mode is mpirun); use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
                "(launch/accelerate.sh does this)")
        if env_true("ACCELERATE_USE_FSDP", env):
            raise ConfigError(
                "the Accelerate config asks for FSDP, which Accelerate runs only on GPUs: on this machine it would "
                "silently train plain data-parallel instead; for sharding on a CPU use dist.strategy=fsdp with "
                "launch/torchrun.sh, or DeepSpeed (configs/accelerate/deepspeed.yaml)")
    if env_true("ACCELERATE_USE_FSDP", env) and env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("the Accelerate config asks for FSDP version 1; dist_train supports FSDP2: set "
                          "fsdp_version: 2 in fsdp_config (configs/accelerate/fsdp2.yaml)")
    if env_true("ACCELERATE_USE_FSDP", env) and env_true("FSDP_OFFLOAD_PARAMS", env):
        raise ConfigError("the Accelerate config asks for FSDP CPU offloading, which dist_train does not support "
                          "(the global norm is reduced on the training device); set fsdp_offload_params: false")
    accum = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").strip()
    if accum != "1":
        # accelerator.backward would divide every loss by it, on top of the step's own division.
        raise ConfigError(
            f"accelerate launch sets gradient accumulation to {accum}; dist_train accumulates itself: remove "
            "gradient_accumulation_steps from the Accelerate config (and ACCELERATE_GRADIENT_ACCUMULATION_STEPS) "
            "and set train.grad_accum_steps instead")
    return Precision(acc)


def create(plan: Plan, dist, device: torch.device, cfg: Optional[Config] = None):
    """The strategy object for this rank (after the process group exists)."""
    from dist_train.amp import build_amp

    if plan.strategy == "deepspeed" or (plan.strategy == "accelerate" and env_true("ACCELERATE_USE_DEEPSPEED")):
        import dataclasses

        from dist_train.strategies.deepspeed import AccelerateDeepSpeedStrategy, DeepSpeedStrategy

        # The precision resolve() decided (from the JSON, or from Accelerate), so the JSON is filled with it.
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=plan.precision))
        cls = DeepSpeedStrategy if plan.strategy == "deepspeed" else AccelerateDeepSpeedStrategy
        return cls(dist, device, cfg)

    if plan.strategy == "accelerate":
        from dist_train.strategies.accelerate import AccelerateStrategy

        return AccelerateStrategy(dist, device)
    if plan.strategy == "fsdp":
        from dist_train.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(dist, device, plan.precision)
    amp = build_amp(plan.precision, device)
    if plan.strategy == "ddp":
        from dist_train.strategies.ddp import DDPStrategy

        return DDPStrategy(dist, device, amp)
    from dist_train.strategies.base import Strategy

    return Strategy(amp)
