"""DeepSpeed ZeRO stages 0-3: the engine owns gradient reduction, mixed precision, clipping and the update.

The DeepSpeed config is built from ours (`deepspeed_config`): the user's JSON
(`dist.deepspeed_config`) may leave the values dist_train owns as "auto" or
give the same value; a different one is an error naming the key. Batch sizes,
accumulation, precision and `gradient_clipping` are always written explicitly
(DeepSpeed's default for `gradient_clipping` changed from 0.0 to 1.0 in 0.19.3,
so leaving it out means different runs on different versions). DeepSpeed's own
monitors (W&B, TensorBoard, CSV, Comet) stay off: dist_train's sinks log.

The step (`dist_train.step.train_step`) keeps its shape; the engine does the
part after the last backward (`engine_step`):

- the clip policy's threshold for the coming step (from past norms alone) is
  written into the engine before `engine.step()`: its config value at stage 0
  in fp32, the wrapped optimizer's `clip_grad` everywhere else;
- `grad_norm/raw` is the engine's pre-clip global norm where it reports one
  (ZeRO 1-3, and every bf16/fp16 optimizer), read after its step, so it is
  this step's. Stage 0 in fp32 reports none: there every rank holds the whole
  all-reduced gradient, and the norm is computed locally before the step (no
  collective);
- a step the engine skipped (fp16 overflow, or a NaN/Inf norm; what the
  engine then keeps as its norm is not this step's) is logged as skipped with
  a null norm; stage 0 in fp32 has no such check in the engine, so dist_train
  skips that step itself;
- `grad_norm/clipped` is derived from the engine's clip, coef = threshold /
  (raw + 1e-6) when below 1, which it does not report: min(raw, threshold) up
  to 1e-6 (and on ZeRO-3 fp16 steps that raise the loss scale, what the
  engine really applied; see `engine_step`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dist_train.clip import ClipPolicy, clip_coefficient
from dist_train.config import ClipConfig, Config, OptimName, Precision, betas
from dist_train.deepspeed_shm import release_deepspeed_shm
from dist_train.errors import ConfigError, TrainingError, UsageError
from dist_train.strategies import env_true
from dist_train.strategies.base import OptimizerFactory, Strategy, global_norm

#: What dist.deepspeed_config=null means: the same as configs/deepspeed/zero2.json.
DEFAULT_JSON: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}
MONITORS = ("wandb", "tensorboard", "csv_monitor", "comet")
INSTALL_HINT = "pip install 'dist_train[deepspeed]'"


def read_json(path: str) -> dict[str, Any]:
    from dist_train.files import regular_file

    p = regular_file(path, "config key 'dist.deepspeed_config': file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"DeepSpeed config '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {e.msg} at line {e.lineno}, "
                          f"column {e.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config '{path}' must hold a JSON object, not {type(data).__name__}")
    return data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _Builder:
    """Fills one DeepSpeed config from ours; every refusal names the key to change."""

    def __init__(self, cfg: Config, data: dict[str, Any], source: str):
        self.cfg = cfg
        self.ds = copy.deepcopy(data)
        self.source = source

    def fail(self, ds_key: str, value: Any, ours: str, want: Any, change: Optional[str] = None) -> None:
        raise ConfigError(
            f"DeepSpeed config {self.source} sets {ds_key}={json.dumps(value)}, but {ours} gives {json.dumps(want)}; "
            f"set {ds_key} to \"auto\" (or remove it) so dist_train fills it, or change {change or ours}")

    def own(self, ds_key: str, ours: str, want: Any, change: Optional[str] = None) -> None:
        """Fill a key dist_train owns: absent or "auto" takes our value; any other must be equal."""
        section, _, leaf = ds_key.rpartition(".")
        node = self.ds.setdefault(section, {}) if section else self.ds
        value = node.get(leaf, "auto")
        if value != "auto" and not _same(value, want):
            self.fail(ds_key, value, ours, want, change)
        node[leaf] = want

    def section(self, name: str) -> dict[str, Any]:
        node = self.ds.get(name)
        if node is None:
            return {}
        if not isinstance(node, dict):
            raise ConfigError(f"DeepSpeed config {self.source}: '{name}' must be a JSON object, not "
                              f"{json.dumps(node)}")
        return node

    def precision(self, requested: Precision, source: str) -> Precision:
        enabled = {}
        for name in ("bf16", "fp16"):
            value = self.section(name).get("enabled", "auto")
            if value not in (True, False, "auto"):
                raise ConfigError(f"DeepSpeed config {self.source}: {name}.enabled must be true, false or \"auto\", "
                                  f"got {json.dumps(value)}")
            enabled[name] = value
        if "bfloat16" in self.ds:
            raise ConfigError(f"DeepSpeed config {self.source}: rename the old 'bfloat16' section to 'bf16'")
        for name in ("amp", "torch_autocast"):
            if self.section(name).get("enabled", False):
                raise ConfigError(f"DeepSpeed config {self.source}: {name}.enabled=true is not supported by "
                                  "dist_train; use bf16 or fp16 (train.precision) instead")
        asked = [Precision(n) for n in ("bf16", "fp16") if enabled[n] is True]
        if len(asked) == 2:
            raise ConfigError(f"DeepSpeed config {self.source} enables both bf16 and fp16; enable at most one")
        if requested == Precision.auto:
            precision = asked[0] if asked else Precision.no
        else:
            precision = requested
            for name in sorted(("bf16", "fp16"), key=lambda n: enabled[n] is not True):  # an enabled one first
                want = precision == Precision(name)
                if enabled[name] != "auto" and enabled[name] is not want:
                    fix = ("set train.precision=auto to take the precision from the JSON" if source == "train.precision"
                           else "change mixed_precision in the Accelerate config")
                    raise ConfigError(
                        f"DeepSpeed config {self.source} sets {name}.enabled={json.dumps(enabled[name])}, but "
                        f"{source}={precision.value} gives {json.dumps(want)}; set {name}.enabled to \"auto\" so "
                        f"dist_train fills it, or {fix}")
        for name in ("bf16", "fp16"):
            self.ds.setdefault(name, {})
            self.ds[name]["enabled"] = precision == Precision(name)
        if precision == Precision.bf16:
            # Without it DeepSpeed's bf16 ZeRO path applies a step whose norm is NaN/Inf (reported as -1).
            if self.section("bf16").get("check_grad_overflow", True) is not True:
                raise ConfigError(f"DeepSpeed config {self.source}: bf16.check_grad_overflow=false lets a NaN/Inf "
                                  "gradient reach the weights; remove it (dist_train skips such steps)")
            self.ds["bf16"]["check_grad_overflow"] = True
        return precision


def deepspeed_config(cfg: Config, world_size: Optional[int] = None, env: Mapping[str, str] = os.environ
                     ) -> tuple[dict[str, Any], Precision]:
    """The DeepSpeed config for this run and its precision; ConfigError (one line) on any contradiction.

    `world_size` None (a launcher's preflight, before the workers exist) checks
    everything that does not depend on it and leaves the micro batch "auto".
    Under `accelerate launch` the JSON is the Accelerate config's deepspeed_config_file.
    """
    from dist_train.clip import build_policy

    path = json_path(cfg, env)
    data = read_json(path) if path is not None else DEFAULT_JSON
    b = _Builder(cfg, data, f"'{path}'" if path is not None else "(default)")
    t, o = cfg.train, cfg.optim

    b.own("train_batch_size", "train.global_batch_size", t.global_batch_size)
    b.own("gradient_accumulation_steps", "train.grad_accum_steps", t.grad_accum_steps)
    micro = b.ds.get("train_micro_batch_size_per_gpu", "auto")
    if world_size is not None:
        b.own("train_micro_batch_size_per_gpu",
              f"train.global_batch_size / ({world_size} processes x train.grad_accum_steps)",
              t.global_batch_size // (world_size * t.grad_accum_steps),
              "train.global_batch_size or train.grad_accum_steps")
    elif micro != "auto" and (not isinstance(micro, int) or isinstance(micro, bool) or micro <= 0
                              or t.global_batch_size % (micro * t.grad_accum_steps)):
        raise ConfigError(
            f"DeepSpeed config {b.source} sets train_micro_batch_size_per_gpu={json.dumps(micro)}, which does not "
            f"divide train.global_batch_size={t.global_batch_size} into train.grad_accum_steps={t.grad_accum_steps} "
            "micro-batches per rank; set it to \"auto\" so dist_train fills it from the world size")

    policy = build_policy(cfg.clip)
    check_clip(cfg.clip, policy, "dist.strategy=ddp or fsdp")
    threshold = float(policy.next_threshold(torch.device("cpu")))
    b.own("gradient_clipping", "clip.max_norm" if policy.clips else "clip.policy=none",
          threshold if math.isfinite(threshold) else 0.0)

    precision = b.precision(t.precision, "Accelerate's mixed_precision" if "ACCELERATE_MIXED_PRECISION" in env
                            else "train.precision")

    name = o.name.value
    if "optimizer" in b.ds:
        opt = b.section("optimizer")
        if str(opt.get("type", "")).lower() != name:
            raise ConfigError(f"DeepSpeed config {b.source}: optimizer type {json.dumps(opt.get('type'))}, but "
                              f"optim.name is {name}; dist_train trains with torch's optimizer from optim.*: remove "
                              "the 'optimizer' section (or set optim.name)")
        params = opt.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"DeepSpeed config {b.source}: optimizer.params must be a JSON object")
        ours: dict[str, tuple[str, Any]] = {"lr": ("optim.lr", o.lr),
                                            "weight_decay": ("optim.weight_decay", o.weight_decay)}
        if o.name == OptimName.sgd:
            ours.update(momentum=("optim.momentum", o.momentum or 0.0), nesterov=("optim.nesterov", o.nesterov))
        else:
            ours.update(betas=("optim.beta1/optim.beta2", list(betas(o))), eps=(f"torch's {name} default", 1e-8))
        for key, value in params.items():
            if key not in ours:
                raise ConfigError(f"DeepSpeed config {b.source}: optimizer.params.{key} has no dist_train "
                                  f"counterpart; remove it (dist_train builds {name} from optim.*)")
            if value != "auto" and not _same(value, ours[key][1]):
                b.fail(f"optimizer.params.{key}", value, ours[key][0], ours[key][1])
        del b.ds["optimizer"]  # dist_train passes its own torch optimizer built from the same values
    if o.name == OptimName.sgd:
        # DeepSpeed's ZeRO lists the optimizers it has tested (Adam, AdamW, Adagrad, its own); torch's SGD is a
        # plain torch optimizer over the partition it is given, which is all ZeRO needs.
        b.ds["zero_allow_untested_optimizer"] = True
    if "scheduler" in b.ds:
        raise ConfigError(f"DeepSpeed config {b.source}: remove the 'scheduler' section; the learning-rate schedule "
                          "is optim.warmup_steps and optim.schedule")

    zero = b.section("zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"DeepSpeed config {b.source}: zero_optimization.stage must be 0, 1, 2 or 3, got "
                          f"{json.dumps(stage)}")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key) or {}
        if not isinstance(offload, dict) or offload.get("device", "none") not in ("none", None):
            raise ConfigError(f"DeepSpeed config {b.source}: zero_optimization.{key} is not supported by dist_train "
                              "yet; remove it")
    if stage == 0 and precision == Precision.fp16:
        raise ConfigError(
            f"DeepSpeed config {b.source}: ZeRO stage 0 in fp16 is refused: DeepSpeed's engine does not scale the "
            "loss for its stage-0 fp16 optimizer, which then divides the unscaled gradients by the loss scale "
            "(65536) and clips at 65536 times the threshold; use stage 1-3 for fp16 "
            "(configs/deepspeed/zero1_fp16.json), or bf16")
    if zero.get("compute_grad_norm", True) is not True:
        raise ConfigError(f"DeepSpeed config {b.source}: zero_optimization.compute_grad_norm=false leaves no gradient "
                          "norm to log or clip; remove it")
    b.ds.setdefault("zero_optimization", {})["stage"] = stage

    for name in MONITORS:
        if b.section(name).get("enabled", False):
            raise ConfigError(f"DeepSpeed config {b.source}: {name}.enabled=true; dist_train logs itself "
                              "(logging.wandb and metrics.jsonl): set it to false")
        b.ds[name] = {"enabled": False}

    left = _auto_left(b.ds)
    if left and not (world_size is None and left == ["train_micro_batch_size_per_gpu"]):
        raise ConfigError(f"DeepSpeed config {b.source}: {left[0]} is \"auto\", which dist_train does not fill "
                          "(it fills batch sizes, accumulation, gradient_clipping, bf16/fp16 and optimizer params); "
                          "give it a value")
    if cfg.dist.check_sync_every and stage > 0:
        raise ConfigError(
            "config key 'dist.check_sync_every': under ZeRO stages 1-3 the fp32 weights are partitioned over "
            "ranks, so there are no replicas to compare; set it to 0")
    return b.ds, precision


def json_path(cfg: Config, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """dist.deepspeed_config, or under accelerate launch the Accelerate config's DeepSpeed JSON."""
    ours = cfg.dist.deepspeed_config
    if not env_true("ACCELERATE_USE_DEEPSPEED", env):
        return ours
    theirs = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not theirs:
        raise ConfigError("the Accelerate config's deepspeed_config has no deepspeed_config_file; dist_train reads "
                          "DeepSpeed's settings from a JSON: set deepspeed_config_file (configs/accelerate/deepspeed.yaml)")
    if ours is not None and os.path.realpath(ours) != os.path.realpath(theirs):
        raise ConfigError(f"config key 'dist.deepspeed_config': '{ours}' but the Accelerate config names "
                          f"'{theirs}'; under accelerate launch the Accelerate config decides, so remove "
                          "dist.deepspeed_config")
    return theirs


def _auto_left(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _auto_left(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _auto_left(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "auto" else []


def check_clip(clip: ClipConfig, policy: ClipPolicy, instead: str) -> None:
    """The clip settings DeepSpeed's engine can honour: it computes the norm and clips inside its own step, which
    then updates, so the threshold must come from past norms alone. `instead`: the alternative to name."""
    if policy.needs_current_norm or policy.needs_parameters:
        need = "this step's gradient norm before clipping" if policy.needs_current_norm else "per-parameter gradients"
        raise ConfigError(
            f"config key 'clip.policy': '{policy.name}' needs {need}, which DeepSpeed's engine does not give (it clips "
            "inside its own step, over partitioned gradients, and a ZeRO partition breaks a weight's rows); use a "
            f"policy whose threshold depends on past norms only (fixed, zscore, percentile), or {instead}")
    if clip.skip_sigma:
        raise ConfigError(
            "config key 'clip.skip_sigma': spike skipping decides from this step's gradient norm before the update, "
            "and DeepSpeed's engine computes that norm inside its own step, which then updates; remove "
            f"clip.skip_sigma (an adaptive clip.policy still works), or use {instead}")
    if clip.eps != 1e-6:
        raise ConfigError("config key 'clip.eps': DeepSpeed's engine clips with eps 1e-6 and cannot be told "
                          "another; remove clip.eps (or set it to 1e-6)")


class EngineClip:
    """The part of a step after the last backward, done by a DeepSpeed engine at a threshold dist_train chose
    (the module's docstring says how): one implementation for the trainer's DeepSpeed strategies and for
    `Clipper.step(engine)` in a user's loop. Built once per engine."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.precision = (Precision.fp16 if engine.fp16_enabled() else
                          Precision.bf16 if engine.bfloat16_enabled() else Precision.no)
        self.device = torch.device(engine.device)
        # Stage 0 in fp32 hands the step to the torch optimizer and keeps no norm: dist_train computes it, and
        # a step whose norm is NaN/Inf must not reach the optimizer (the engine has no such check there).
        self.own_norm = self.stage == 0 and self.precision == Precision.no
        self._skip_update = False
        if self.own_norm:
            optimizer = engine.optimizer
            inner = optimizer.step

            def step(opt, *args, **kwargs):
                return None if self._skip_update else inner(*args, **kwargs)

            optimizer.step = types.MethodType(step, optimizer)  # a bound method, as LR schedulers expect

    def refusal(self) -> Optional[str]:
        """Why this engine cannot report a true norm (None: it can); the config refuses these before building."""
        engine = self.engine
        if self.stage == 0 and self.precision == Precision.fp16:
            return ("ZeRO stage 0 in fp16: DeepSpeed's engine does not scale the loss for its stage-0 fp16 optimizer, "
                    "which then divides the unscaled gradients by the loss scale and clips at that many times the "
                    "threshold; use stage 1-3 for fp16, or bf16")
        if self.stage > 0 and not engine.zero_compute_grad_norm():
            return "zero_optimization.compute_grad_norm=false leaves no gradient norm to log or clip; remove it"
        if self.precision == Precision.bf16 and not engine._config.bfloat16_config.check_grad_overflow:
            return "bf16.check_grad_overflow=false lets a NaN/Inf gradient reach the weights; remove it"
        return None

    def loss_scale(self) -> Optional[torch.Tensor]:
        if self.precision != Precision.fp16:
            return None
        return torch.tensor(self._scale(), device=self.device)

    def step(self, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Clip at `threshold` and update, inside the engine: (this step's raw norm, the norm of the
        gradients the engine applied, skipped). Norms are NaN on a skipped step."""
        engine = self.engine
        value = float(threshold)
        clip = value if math.isfinite(value) else 0.0  # 0: DeepSpeed does not clip
        engine._config.gradient_clipping = clip  # read by stage 0's fp32 path at every step
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = clip  # the wrapped optimizers' own copy (stages 1-3, bf16, fp16)
        if self.own_norm:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            raw = global_norm(grads)  # whole, all-reduced gradients on every rank: no collective
            self._skip_update = skipped = not bool(torch.isfinite(raw))
            try:
                engine.step()
            finally:
                self._skip_update = False
            return raw, raw * clip_coefficient(raw, threshold.to(raw.dtype), 1e-6), skipped
        scale_before = self._scale()
        engine.step()
        nan = torch.full((), math.nan, device=self.device)
        if not engine.was_step_applied():
            return nan, nan, True
        norm = engine.get_global_grad_norm()
        if norm is None or not math.isfinite(float(norm)) or float(norm) < 0:
            raise TrainingError(f"DeepSpeed {_version()} applied an update but reports its gradient norm as {norm}; "
                                "dist_train cannot log a true norm for this step")
        # ZeRO-3 in fp16 divides the norm by the loss scale after raising it (a step that grows the
        # scale): the norm it reports, and clips by, is then `growth` times too small, and unclipped
        # gradients are applied divided by `growth`. Undo it for raw; report what was applied.
        growth = self._scale() / scale_before if self.stage == 3 and self.precision == Precision.fp16 else 1.0
        raw = float(norm) * growth
        # The engine's clip: coef = threshold / (its norm + 1e-6) when below 1, on gradients unscaled by its scale.
        applied = raw / (growth * max(1.0, (raw / growth + 1e-6) / clip)) if clip > 0 else raw / growth
        return (torch.tensor(raw, dtype=torch.float32, device=self.device),
                torch.tensor(applied, dtype=torch.float32, device=self.device), False)

    def _scale(self) -> float:
        return float(self.engine._get_optimizer_loss_scale()) if self.precision == Precision.fp16 else 1.0


class DeepSpeedStrategy(Strategy):
    """`deepspeed.initialize` around the model and dist_train's torch optimizer; see the module's docstring."""

    engine_steps = True
    fused_optimizer = False  # the engine drives torch's default implementation itself

    def __init__(self, dist, device: torch.device, cfg: Config):
        super().__init__()
        # DeepSpeed 0.19 calls collectives torch 2.13 deprecates, once per step: nothing a user can act on.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                r"is deprecated", category=FutureWarning)
        self.dist = dist
        self.device = device
        self.config, self.precision = deepspeed_config(cfg, dist.world_size)
        self.stage = self.config["zero_optimization"]["stage"]
        self.replicated = self.stage == 0
        self.engine = None
        self.clip: Optional[EngineClip] = None

    def setup(self, model: torch.nn.Module, make_optimizer: OptimizerFactory):
        from dist_train.distributed import one_process_group

        one_process_group(self.device)  # one process (no launcher, or one process): DeepSpeed still needs a group
        self._start_comm()
        release_deepspeed_shm()  # on the CPU its shm buffers would outlive the run; before anything can fail
        optimizer = make_optimizer(list(model.parameters()))
        self.engine = engine = self._initialize(model, optimizer)
        self.clip = EngineClip(engine)
        # The scheduler and the trainer see the torch AdamW: its param_groups are the engine's.
        return engine, optimizer

    def _start_comm(self) -> None:
        """DeepSpeed's communication backend over the process group, as `deepspeed.initialize` starts it (on
        the CPU it creates the shm buffers then); starting it first lets the buffers be released before
        anything else can fail."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   dist_init_required=False)

    def _initialize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=copy.deepcopy(self.config),
                                               dist_init_required=False)
        return engine

    def describe(self) -> str:
        precision = self.precision.label
        where = f"over {self.dist.world_size} processes" if self.dist.world_size > 1 else "in one process"
        return f"DeepSpeed {_version()} ZeRO stage {self.stage} {where} ({precision}, the engine clips and steps)"

    # ---- the step's pieces -----------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        # No no_sync: the engine knows the accumulation boundary from gradient_accumulation_steps. Stages
        # 0-1 reduce once per step; stages 2-3 reduce-scatter each micro-batch into their partitions.
        engine = self.engine
        engine.backward(loss, scale_wrt_gas=False)  # the step already divided by the micro-batch count
        if not engine.is_gradient_accumulation_boundary():
            engine.step()  # only counts the micro-batch; the update is engine_step's

    def cast_inputs(self, batch: Any) -> Any:
        """Floating-point inputs in the engine's dtype: under bf16/fp16 DeepSpeed casts the weights and runs no
        autocast, so an fp32 image batch would meet bf16 weights (token ids and labels stay integers)."""
        if self.precision == Precision.no:
            return batch
        from dist_train.samples import map_tensors

        dtype = torch.bfloat16 if self.precision == Precision.bf16 else torch.float16
        return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)

    def loss_scale(self) -> Optional[torch.Tensor]:
        return self.clip.loss_scale()

    def engine_step(self, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return self.clip.step(threshold)

    # ---- beyond the step -------------------------------------------------------------------
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if hasattr(model, "module") else model

    def num_parameters(self, model: torch.nn.Module) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.unwrap(model).parameters())  # ZeRO-3: partitioned

    def full_parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The fp32 weights, whole: the optimizer's master copy where the model runs in bf16/fp16 or is
        partitioned (a collective from stage 1 on: call on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        opt = self.engine.optimizer
        # Stage 0 in bf16/fp16: DeepSpeed's unfused optimizer keeps fp32 copies beside the model's groups.
        master = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                  for lp, hp in zip(lps, hps)}
        out = []
        for p in self.unwrap(model).parameters():
            if id(p) in master:
                full = master[id(p)].detach()
            elif self.stage > 0:
                full = safe_get_full_fp32_param(p)
            else:
                full = p.detach()
            out.append(full.float())
        return out

    checkpoint_kind = "deepspeed"

    def check_resume(self, folder: Path, manifest: dict[str, Any]) -> None:
        world = manifest.get("world_size")
        if world != self.dist.world_size:
            raise ConfigError(f"train.resume: the DeepSpeed checkpoint '{folder}' was written by {world} processes "
                              f"and this run has {self.dist.world_size}; DeepSpeed's checkpoints resume on the same "
                              "world size")

    def save_checkpoint(self, model, optimizer, folder: Path, state: dict[str, Any], is_main: bool) -> None:
        """`engine.save_checkpoint` into `folder` (every rank writes its partitions), and the trainer's state
        in `trainer.pt` (rank 0). The engine's `latest` is not written: dist_train keeps its own."""
        from dist_train.checkpoint import TRAINER
        from dist_train.rundir import torch_save

        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        if is_main:
            torch_save(state, folder / TRAINER)

    def load_checkpoint(self, model, optimizer, folder: Path, check_state=None) -> dict[str, Any]:
        """Every file is first read with weights_only=True (allowing DeepSpeed's own loss-scaler and ZeRO
        stage classes, which its optimizer state holds): only then does the engine, which unpickles
        without that restriction, load them. `check_state` sees the trainer's state before all that."""
        from dist_train.checkpoint import TRAINER, safe_load

        state = safe_load(folder / TRAINER)  # every rank reads it, so every rank refuses alike
        if check_state is not None:
            check_state(state)
        # Each rank reads its share of the files (every world-th); all learn whether any was refused.
        refused: Optional[BaseException] = None
        for f in sorted(p for p in folder.glob("*.pt") if p.name != TRAINER)[self.dist.rank::self.dist.world_size]:
            try:
                safe_load(f, allow=_deepspeed_safe_globals())
            except UsageError as e:  # one that needs arbitrary pickle, or no file of torch.save at all
                refused = e
                break
        if self.dist.any(refused is not None):
            if refused is not None:
                raise refused
            err = UsageError(f"refusing to load '{folder}': another rank found a file it could not load safely "
                             "(its error says why)")
            err.scope = "main"
            raise err
        path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise ConfigError(f"DeepSpeed found no checkpoint in '{folder}'")
        return state


def _deepspeed_safe_globals() -> list[Any]:
    """DeepSpeed classes its checkpoints hold besides tensors (plain data: the loss scaler's settings, the
    ZeRO stage enum, the (start, numel) address of a parameter's fragment in a partition)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class AccelerateDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed through `accelerate launch`: Accelerate starts the processes and its `prepare` runs
    `deepspeed.initialize` with the config dist_train filled; the step drives the engine exactly as
    under dist.strategy=deepspeed, so the raw norm still comes from the engine. Never
    `accelerator.backward`: it would step the engine before the threshold is handed over."""

    def __init__(self, dist, device: torch.device, cfg: Config):
        super().__init__(dist, device, cfg)
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

        # The process group's backend, given explicitly: on a CPU Accelerate would otherwise make
        # every rank process 0 of 1 while the engine still reduces over all of them.
        handlers = [InitProcessGroupKwargs(backend=dist.backend)] if dist.backend else []
        plugin = DeepSpeedPlugin(hf_ds_config=copy.deepcopy(self.config))
        self.accelerator = acc = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=handlers)
        release_deepspeed_shm()  # Accelerate started DeepSpeed's communication, and with it its shm buffers
        if acc.distributed_type != DistributedType.DEEPSPEED or acc.num_processes != dist.world_size:
            raise ConfigError(
                f"the Accelerate config asks for DeepSpeed over {dist.world_size} processes, but Accelerate set up "
                f"{acc.distributed_type.value} over {acc.num_processes}; check the Accelerate config's "
                "distributed_type and that ACCELERATE_USE_CPU is not set")

    def _start_comm(self) -> None:
        pass  # the Accelerator started it (above)

    def _initialize(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        engine, _ = self.accelerator.prepare(model, optimizer)
        return engine

    def describe(self) -> str:
        return f"Accelerate {self.accelerator.distributed_type.value}: " + super().describe()


def _version() -> str:
    import deepspeed

    return deepspeed.__version__
