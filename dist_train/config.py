"""The typed configuration tree: YAML file + dotted command-line overrides.

Every field has one meaning, documented here and in the README. Loading is
strict: an unknown key, a value of the wrong type or an invalid value raises
`ConfigError` with a one-line message naming the key, before anything is
written anywhere.
"""

from __future__ import annotations

import enum
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_train.errors import ConfigError


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, enum.Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(str, enum.Enum):
    auto = "auto"  # online when an API key is configured, else offline
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Progress(str, enum.Enum):
    auto = "auto"  # a bar on an interactive terminal, plain lines otherwise
    bar = "bar"
    plain = "plain"


class Backend(str, enum.Enum):
    auto = "auto"  # nccl on CUDA, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class Schedule(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class RunConfig:
    out_dir: str = "runs/debug"
    """The run directory: metrics.jsonl, config.yaml, wandb/, plots, checkpoint."""
    name: Optional[str] = None
    """Run name shown in W&B; defaults to the run directory's name."""
    overwrite: bool = False
    """Allow reusing a run directory that already holds a run (its files are replaced)."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Number of optimizer steps."""
    global_batch_size: int = 32
    """Samples in one optimizer step, summed over ranks and micro-batches."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each rank."""
    seed: int = 0
    """Seeds model init and data order; identical runs give identical metrics."""
    device: Device = Device.auto
    """auto: CUDA when available, else CPU."""
    precision: Precision = Precision.no
    """no (fp32) | bf16 (autocast) | fp16 (autocast + GradScaler, unscaled before the norm)."""
    checkpoint: bool = True
    """Save model, optimizer, clip-policy and scaler state to checkpoint.pt at the end."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    schedule: Schedule = Schedule.constant
    """After warm-up: constant, or cosine decay to 10% of lr at max_steps."""


@dataclass
class ClipConfig:
    policy: str = "fixed"
    """Clip policy name: none | fixed."""
    max_norm: float = 1.0
    """Threshold of the fixed policy (global L2 norm)."""
    eps: float = 1e-6
    """coef = min(1, threshold / (raw + eps)), the same eps as torch.nn.utils.clip_grad_norm_."""
    max_consecutive_nonfinite: int = 10
    """Stop the run after this many optimizer steps in a row had a NaN/Inf raw norm."""


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.auto
    project: str = "dist_train"
    entity: Optional[str] = None


@dataclass
class LoggingConfig:
    every: int = 10
    """Log one metrics line every this many optimizer steps (and at the last step)."""
    progress: Progress = Progress.auto
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ModelConfig:
    factory: Optional[str] = None
    """'package.module:function' building your own model; None: the embedded GPT."""
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    block_size: int = 32
    """Sequence length of a sample (tokens per sample)."""
    dropout: float = 0.0


@dataclass
class DataConfig:
    text_file: Optional[str] = None
    """Character-level training on this UTF-8 file; None: the synthetic task."""
    num_samples: int = 65536
    """Size of the synthetic data set (one epoch)."""
    vocab_size: int = 32
    """Vocabulary of the synthetic task."""


@dataclass
class DistConfig:
    backend: Backend = Backend.auto
    """Process-group backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    timeout_s: float = 300.0
    """Limit for joining the process group and for any one collective, in seconds."""
    check_sync_every: int = 0
    """Every N optimizer steps, check that parameters are identical on all ranks (0: never)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0].strip()
    if "Key '" in msg and "not in" in msg:
        return f"unknown config key '{key}'; check its spelling against configs/debug.yaml"
    if key:
        return f"config key '{key}': {msg}"
    return f"config: {msg}"


def load_config(path: Optional[str | os.PathLike], overrides: list[str] = ()) -> Config:
    """Load, merge and validate; raise ConfigError (one line) on any problem."""
    base = OmegaConf.structured(Config)
    try:
        layers: list[Any] = [base]
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file '{path}' not found; pass an existing YAML file to --config")
            try:
                layers.append(OmegaConf.load(p))
            except OmegaConfBaseException:
                raise
            except Exception as e:  # YAML syntax errors come from the yaml library
                first = str(e).splitlines()[0]
                raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
        for item in overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    validate(cfg)
    return cfg


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    from dist_train.clip import POLICIES

    t = cfg.train
    _require(t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    _require(t.global_batch_size > 0, "train.global_batch_size", f"must be > 0, got {t.global_batch_size}")
    _require(t.grad_accum_steps > 0, "train.grad_accum_steps", f"must be > 0, got {t.grad_accum_steps}")
    _require(
        t.global_batch_size % t.grad_accum_steps == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}",
    )
    o = cfg.optim
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    _require(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    c = cfg.clip
    _require(c.policy in POLICIES, "clip.policy", f"unknown policy '{c.policy}'; choose one of {', '.join(POLICIES)}")
    _require(c.max_norm > 0, "clip.max_norm", f"must be > 0, got {c.max_norm}")
    _require(c.eps >= 0, "clip.eps", f"must be >= 0, got {c.eps}")
    _require(
        c.max_consecutive_nonfinite > 0,
        "clip.max_consecutive_nonfinite",
        f"must be > 0, got {c.max_consecutive_nonfinite}",
    )
    _require(cfg.logging.every > 0, "logging.every", f"must be > 0, got {cfg.logging.every}")
    m = cfg.model
    for key in ("n_layer", "n_head", "d_model", "block_size"):
        v = getattr(m, key)
        _require(v > 0, f"model.{key}", f"must be > 0, got {v}")
    _require(m.d_model % m.n_head == 0, "model.d_model", f"{m.d_model} is not divisible by model.n_head={m.n_head}")
    _require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.factory is not None:
        resolve_factory(m.factory)
    d = cfg.data
    if d.text_file is not None:
        _require(Path(d.text_file).is_file(), "data.text_file", f"file '{d.text_file}' not found")
    else:
        _require(d.vocab_size >= 8, "data.vocab_size", f"must be >= 8, got {d.vocab_size}")
        _require(d.num_samples > 0, "data.num_samples", f"must be > 0, got {d.num_samples}")
    import torch

    cuda = torch.cuda.is_available()
    if t.device == Device.cuda:
        _require(cuda, "train.device", "cuda requested but no CUDA device is available; use auto or cpu")
    if cfg.dist.backend == Backend.nccl:
        _require(
            cuda and t.device != Device.cpu,
            "dist.backend",
            "nccl needs CUDA devices, and this run trains on the CPU; use auto or gloo",
        )
    _require(bool(cfg.run.out_dir), "run.out_dir", "must not be empty")
    _require(cfg.dist.timeout_s > 0, "dist.timeout_s", f"must be > 0, got {cfg.dist.timeout_s}")
    _require(cfg.dist.check_sync_every >= 0, "dist.check_sync_every", f"must be >= 0, got {cfg.dist.check_sync_every}")


def resolve_factory(spec: str):
    """'pkg.module:function' -> the function; ConfigError if it cannot be imported."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config key 'model.factory': '{spec}' is not of the form 'package.module:function'")
    # Like other tools that import user code by path (uvicorn, gunicorn), look in
    # the working directory too, so `dist-train` finds ./my_pkg as python -m would.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"config key 'model.factory': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"config key 'model.factory': module '{module_name}' has no callable '{attr}'")
    return fn


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]

