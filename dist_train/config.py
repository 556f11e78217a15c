"""The typed configuration tree: YAML file + dotted command-line overrides.

Every field has one meaning, documented here and in the README. Loading is
strict: an unknown key, a value of the wrong type or an invalid value raises
`ConfigError` with a one-line message naming the key, before anything is
written anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_train.errors import ConfigError, describe, first_line


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, enum.Enum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def label(self) -> str:
        """The name a user reads: fp32 for `no` (Accelerate's spelling, kept as the stored value)."""
        return "fp32" if self is Precision.no else self.value


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


class StrategyName(str, enum.Enum):
    auto = "auto"
    ddp = "ddp"
    fsdp = "fsdp"
    accelerate = "accelerate"
    deepspeed = "deepspeed"


class TokenDtype(str, enum.Enum):
    uint16 = "uint16"
    uint32 = "uint32"


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
    """Start over in a run directory that holds an earlier run: removes only the files dist_train wrote
    there, and refuses a directory holding files it does not know or a run still in progress."""


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
    precision: Precision = Precision.auto
    """auto (Accelerate's mixed_precision under accelerate launch, else fp32) | fp32 (also spelt no, as
    Accelerate does) | bf16 (autocast) | fp16 (autocast + GradScaler, unscaled before the norm)."""
    checkpoint: bool = True
    """Write checkpoints to <run dir>/checkpoints/: every train.checkpoint_every steps, at the end, and when a
    stop signal arrives."""
    checkpoint_every: int = 0
    """Also checkpoint after every N optimizer steps (0: only at the end and on a stop)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (older ones are removed after a new one is complete)."""
    resume: str = "none"
    """none | auto (continue from the newest intact checkpoint in run.out_dir, or start at step 0 if there is none)
    | PATH (a checkpoint folder, or a run directory: its newest intact checkpoint)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps: step s (1-based) takes lr * s / warmup_steps.
    A warm-up longer than train.max_steps is allowed (a startup note says so): the rate ramps and never reaches
    its peak."""
    schedule: Schedule = Schedule.constant
    """After warm-up: constant, or cosine decay to 10% of lr at max_steps."""


@dataclass
class ClipConfig:
    policy: str = "fixed"
    """Clip policy name: none | fixed | zscore | percentile | agc (see the README's Clip policies)."""
    max_norm: float = 1.0
    """Threshold of the fixed policy (global L2 norm), and of zscore and percentile during their warm-up."""
    warmup_steps: int = 25
    """zscore and percentile: the first N finite norms are clipped at clip.max_norm and build the statistics."""
    zscore_alpha: float = 0.97
    """zscore: EMA factor of the mean and variance (ZClip's default)."""
    zscore_z: float = 2.5
    """zscore: threshold = EMA mean + z * EMA std (ZClip's default z)."""
    zscore_update_with: str = "clipped"
    """zscore: what enters the EMA: clipped (min(raw, threshold), ZClip's choice: a spike enters at the
    threshold) | raw."""
    percentile: float = 10.0
    """percentile: threshold = this percentile (0-100) of the window of past finite norms (AutoClip's p=10)."""
    window: int = 1000
    """percentile: how many past finite norms the window holds."""
    agc_lambda: float = 0.01
    """agc: each unit's gradient norm is kept <= agc_lambda * max(its weight's norm, agc_eps)."""
    agc_eps: float = 1e-3
    """agc: the floor of a unit's weight norm (zero-initialised units can still move)."""
    skip_sigma: float = 0.0
    """Skip the optimizer step when the raw norm (clip.skip_on) exceeds mean + skip_sigma * std of the last
    clip.skip_window accepted steps (0: off). Combines with any policy."""
    skip_window: int = 128
    """Spike skipping: the window of past accepted steps."""
    skip_min_steps: int = 64
    """Spike skipping: active once the window holds this many steps."""
    skip_on: str = "norm"
    """Spike skipping looks at: norm (the raw gradient norm) | loss (the global batch's loss) | both."""
    skip_max_consecutive: int = 5
    """Spike skipping: after this many spikes skipped in a row, the next is taken (clipped by the policy) and
    enters the window, so that a norm that moved for good is followed instead of skipped for ever."""
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
    per_layer_every: int = 0
    """Every N optimizer steps, log the raw gradient norm of each module to per_layer.jsonl and W&B (0: off);
    those steps are logged steps."""
    spike_top_k: int = 5
    """spikes.jsonl: how many modules, largest gradient norm first, a spike's line names."""
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


#: The synthetic task's vocabulary when data.vocab_size is not set.
SYNTHETIC_VOCAB_SIZE = 32


@dataclass
class DataConfig:
    text_file: Optional[str] = None
    """Character-level training on this UTF-8 file, held in memory; None (and no data.token_file): the synthetic
    task."""
    token_file: Optional[str] = None
    """Training on a flat file of token ids (raw little-endian uint16 or uint32, no header: nanoGPT's format),
    memory-mapped, so its size does not matter. Its sidecar, the same name ending in .json (`dist-train prepare`
    writes both), gives the dtype and vocabulary; without one, data.token_dtype and data.vocab_size must."""
    token_dtype: Optional[TokenDtype] = None
    """Width of the ids of a data.token_file that has no sidecar: uint16 | uint32 (with a sidecar: unset, or the
    sidecar's)."""
    num_samples: int = 65536
    """Size of the synthetic data set (one epoch)."""
    skip_steps: list[int] = field(default_factory=list)
    """Global batches to leave out, by the step that draws them in a run without skips (1-based, the `batch`
    of a spikes.jsonl line): step s then trains on the s-th batch not listed. Resuming may add batches after
    the checkpoint's step."""
    skip_steps_file: Optional[str] = None
    """A file of more such batches: a spikes.jsonl (its `batch` fields) or whitespace-separated numbers."""
    vocab_size: Optional[int] = None
    """Vocabulary size: of the synthetic task (unset: 32), or of a data.token_file without a sidecar (required there;
    every id must be below it). A text file's vocabulary is its characters, a sidecar's its own."""


@dataclass
class DistConfig:
    strategy: StrategyName = StrategyName.auto
    """auto (accelerate under accelerate launch, else ddp with 2+ processes, else single process) | ddp |
    fsdp (FSDP2, torchrun) | accelerate | deepspeed (ZeRO 0-3; launch/deepspeed.sh)."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON for dist.strategy=deepspeed (configs/deepspeed/zero0.json ... zero3.json and their _bf16/_fp16
    variants); its "auto" values are filled from this config and a value contradicting it is an error. None: the
    same as configs/deepspeed/zero2.json."""
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


def all_keys(schema: Any = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config tree, e.g. 'train.max_steps'."""
    keys = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += all_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def keys_named(leaf: str) -> list[str]:
    """The dotted keys whose last part is `leaf` ('lr' -> ['optim.lr']; '-' read as '_')."""
    leaf = leaf.replace("-", "_")
    return [k for k in all_keys() if k.rpartition(".")[2] == leaf]


def _steer_bare_key(item: str) -> None:
    """`lr=1e-3` names a key without its section: say which key it means, with the user's value."""
    key, _, value = item.partition("=")
    if "." in key or key in {f.name for f in dataclasses.fields(Config)}:
        return
    matches = keys_named(key)
    if matches:
        raise ConfigError(f"override '{item}' names no section; did you mean "
                          f"{' or '.join(f'{k}={value}' for k in matches)}? (keys are section.key)")


def _unknown_key(key: str) -> str:
    """The unknown-key message, with the nearest valid keys (typos) or the valid choices."""
    keys = all_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == parent] if parent else []
    if siblings:  # a known section: compare the last part only, or every key would match on "train."
        by_leaf = {k.rpartition(".")[2]: k for k in siblings}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)]
    else:
        sections = list(dict.fromkeys(k.split(".")[0] for k in keys))
        close = difflib.get_close_matches(key, sections if not parent else keys, n=3, cutoff=0.6)
    if close:
        return f"unknown config key '{key}'; did you mean {' or '.join(repr(k) for k in close)}?"
    if siblings:
        return f"unknown config key '{key}'; the keys of '{parent}' are {', '.join(k.rpartition('.')[2] for k in siblings)}"
    return f"unknown config key '{key}'; the sections are {', '.join(sections)}"


#: Keys holding a list, and an example of one for the message when something else is given.
LIST_KEYS = {"data.skip_steps": "data.skip_steps=[120,121,122]"}


#: Enum keys whose accepted spellings are more than the enum's values (ALIASES): the list an error shows.
CHOICES = {"train.precision": "auto, fp32 (or no), bf16, fp16"}


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(getattr(exc, "msg", None) or exc).splitlines()[0].strip()
    if key in CHOICES and "expected one of" in msg:
        msg = msg.split("expected one of")[0] + f"expected one of {CHOICES[key]}"
    if key in LIST_KEYS and "ListConfig" in msg:
        return f"config key '{key}': must be a list of steps, e.g. {LIST_KEYS[key]} (quote it in a shell)"
    if "Key '" in msg and "not in" in msg:
        return _unknown_key(str(key))
    if key:
        return f"config key '{key}': {msg}"
    return f"config: {msg}"


def _regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a readable regular file; a one-line ConfigError otherwise.

    Checked before opening: opening a FIFO would block, a directory would fail late.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} '{path}' not found")
    if p.is_dir():
        raise ConfigError(f"{what} '{path}' is a directory, not a file")
    if not p.is_file():
        raise ConfigError(f"{what} '{path}' is not a regular file (a FIFO or device?)")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{what} '{path}' is not readable; check its permissions")
    return p


#: Spellings accepted for enum values, applied before validation. YAML reads a
#: bare `no` as the boolean false, so `train.precision=no` would otherwise fail.
ALIASES: dict[str, dict[Any, str]] = {
    "train.precision": {False: "no", "fp32": "no"},
}


def _apply_aliases(layer: Any) -> None:
    for key, table in ALIASES.items():
        value = OmegaConf.select(layer, key, default=None)
        # `is False`, not ==: 0 == False, and `train.precision=0` is no spelling of "no".
        if value is False or (isinstance(value, str) and value in table):
            OmegaConf.update(layer, key, table[value])


def _load_yaml(path: str | os.PathLike) -> Any:
    p = _regular_file(path, "config file")
    try:
        layer = OmegaConf.load(p)
    except OmegaConfBaseException:
        raise
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except Exception as e:  # YAML syntax errors come from the yaml library
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark and problem else first_line(e)
        raise ConfigError(f"config file '{path}' is not valid YAML: {where}") from None
    if not isinstance(layer, DictConfig):
        kind = "a list" if isinstance(layer, ListConfig) else type(layer).__name__
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (train:, optim:, ...), not {kind}"
        )
    return layer


def load_config(path: Optional[str | os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Load, merge and validate; raise ConfigError (one line) on any problem."""
    base = OmegaConf.structured(Config)
    try:
        layers: list[Any] = [base]
        if path is not None:
            layers.append(_load_yaml(path))
        for item in overrides:
            if "=" not in item or item.startswith("="):
                raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)")
            _steer_bare_key(item)
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers[1:]:
            _apply_aliases(layer)
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    d = cfg.data
    if d.text_file is None and d.token_file is None and d.vocab_size is None:
        d.vocab_size = SYNTHETIC_VOCAB_SIZE  # filled in, so that the saved config says what was trained
    validate(cfg)
    return cfg


def field_docs() -> dict[str, str]:
    """Each dotted key's docstring, as written under its field in this module ('' where there is none)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs = by_class.setdefault(node.name, {})
            for a, b in zip(node.body, node.body[1:] + [None]):
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
                    doc = b.value.value if (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                                            and isinstance(b.value.value, str)) else ""
                    docs[a.target.id] = " ".join(doc.split())

    def walk(schema: Any, prefix: str) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(schema):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                out.update(walk(sub, f"{prefix}{f.name}."))
            else:
                out[prefix + f.name] = by_class.get(schema.__name__, {}).get(f.name, "")
        return out

    return walk(Config, "")


def describe_config(cfg: Config) -> str:
    """The resolved config as YAML, each key with its meaning above it: what `train --print-config` prints."""
    import textwrap

    docs = field_docs()
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    lines = ["# The resolved config: defaults, then the --config file, then the key=value overrides.",
             "# Override any key on the command line as section.key=value, e.g. train.max_steps=10."]

    def emit(node: dict, prefix: str, indent: int) -> None:
        pad = "  " * indent
        for key, value in node.items():
            dotted = prefix + key
            if isinstance(value, dict):
                lines.append(f"{pad}{key}:")
                emit(value, dotted + ".", indent + 1)
                continue
            for doc_line in textwrap.wrap(docs.get(dotted, ""), 110 - len(pad)):
                lines.append(f"{pad}# {doc_line}")
            text = OmegaConf.to_yaml({key: value}).rstrip("\n")
            lines.extend(pad + t for t in text.splitlines())

    emit(plain, "", 0)
    return "\n".join(lines) + "\n"


def notes(cfg: Config) -> list[str]:
    """Settings that are allowed but may not do what was meant: one line each, said before anything runs."""
    out = []
    o, t = cfg.optim, cfg.train
    if o.warmup_steps > t.max_steps:
        out.append(f"optim.warmup_steps={o.warmup_steps} is more than train.max_steps={t.max_steps}: the learning "
                   f"rate ramps linearly and ends at {t.max_steps}/{o.warmup_steps} of optim.lr={o.lr:g} "
                   "(it never reaches its peak)")
    return out


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _finite(value: float, key: str, lo: float, hi: float = math.inf, lo_open: bool = True) -> None:
    """Require lo < value <= hi (lo <= value when not lo_open), and value finite."""
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        lo_txt = f"> {lo:g}" if lo_open else f">= {lo:g}"
        rng = f"finite and {lo_txt}" if hi == math.inf else f"finite, {lo_txt} and <= {hi:g}"
        raise ConfigError(f"config key '{key}': must be {rng}, got {value}")


GiB = 1024**3
MAX_SEED = 2**62  # seed + epoch and seed + rank must stay within torch's 64-bit seeds
MAX_TIMEOUT_S = 7 * 24 * 3600
#: The clip policies (dist_train.clip.POLICIES builds them), named here so that a config is checked as far
#: as it can be without importing torch: a typo is reported in a fraction of a second.
POLICY_NAMES = ("none", "fixed", "zscore", "percentile", "agc")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; everything checkable before training."""
    t = cfg.train
    _require(t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    _require(t.global_batch_size > 0, "train.global_batch_size", f"must be > 0, got {t.global_batch_size}")
    _require(t.grad_accum_steps > 0, "train.grad_accum_steps", f"must be > 0, got {t.grad_accum_steps}")
    _require(
        t.global_batch_size % t.grad_accum_steps == 0,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}",
    )
    _require(0 <= t.seed <= MAX_SEED, "train.seed", f"must be in [0, 2^62], got {t.seed}")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _require(bool(t.resume), "train.resume", "must be none, auto or a checkpoint path")
    if t.resume != "none":
        _require(not cfg.run.overwrite, "train.resume",
                 f"{t.resume} continues a run, and run.overwrite=true would start over; pass only one of them")
        _require(t.checkpoint, "train.resume", "resuming needs train.checkpoint=true (a resumed run that never "
                 "checkpoints could not be resumed again)")
    o = cfg.optim
    _finite(o.lr, "optim.lr", 0)
    _finite(o.weight_decay, "optim.weight_decay", 0, lo_open=False)
    _require(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    _require(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    c = cfg.clip
    _require(c.policy in POLICY_NAMES, "clip.policy",
             f"unknown policy '{c.policy}'; choose one of {', '.join(POLICY_NAMES)}")
    _finite(c.max_norm, "clip.max_norm", 0)
    # A large eps silently shrinks every step (eps=inf trains nothing); 1e-6 is the norm.
    _finite(c.eps, "clip.eps", 0, hi=1e-2, lo_open=False)
    _require(c.warmup_steps >= 1, "clip.warmup_steps", f"must be >= 1 (the statistics need a norm), got {c.warmup_steps}")
    _require(0 < c.zscore_alpha < 1, "clip.zscore_alpha", f"must be in (0, 1), got {c.zscore_alpha}")
    _finite(c.zscore_z, "clip.zscore_z", 0)
    _require(c.zscore_update_with in ("clipped", "raw"), "clip.zscore_update_with",
             f"must be clipped or raw, got '{c.zscore_update_with}'")
    _require(0 <= c.percentile <= 100, "clip.percentile", f"must be in [0, 100], got {c.percentile}")
    _require(c.window >= 1, "clip.window", f"must be >= 1, got {c.window}")
    _finite(c.agc_lambda, "clip.agc_lambda", 0)
    _finite(c.agc_eps, "clip.agc_eps", 0)
    _finite(c.skip_sigma, "clip.skip_sigma", 0, lo_open=False)
    _require(c.skip_window >= 1, "clip.skip_window", f"must be >= 1, got {c.skip_window}")
    _require(c.skip_min_steps >= 1, "clip.skip_min_steps", f"must be >= 1, got {c.skip_min_steps}")
    if c.skip_sigma:
        _require(c.skip_min_steps <= c.skip_window, "clip.skip_min_steps",
                 f"{c.skip_min_steps} is more than clip.skip_window={c.skip_window}, so spike skipping would never "
                 "start; lower it (or raise clip.skip_window)")
    _require(c.skip_max_consecutive >= 1, "clip.skip_max_consecutive", f"must be >= 1, got {c.skip_max_consecutive}")
    _require(c.skip_on in ("norm", "loss", "both"), "clip.skip_on", f"must be norm, loss or both, got '{c.skip_on}'")
    _require(
        c.max_consecutive_nonfinite > 0,
        "clip.max_consecutive_nonfinite",
        f"must be > 0, got {c.max_consecutive_nonfinite}",
    )
    _require(cfg.logging.every > 0, "logging.every", f"must be > 0, got {cfg.logging.every}")
    _require(cfg.logging.per_layer_every >= 0, "logging.per_layer_every",
             f"must be >= 0, got {cfg.logging.per_layer_every}")
    _require(cfg.logging.spike_top_k >= 1, "logging.spike_top_k", f"must be >= 1, got {cfg.logging.spike_top_k}")
    if cfg.logging.wandb.mode == WandbMode.online:
        from dist_train.wandb_sink import api_key_configured

        _require(
            api_key_configured(),
            "logging.wandb.mode",
            "online needs a W&B API key, and none is configured; run 'wandb login' or set WANDB_API_KEY, "
            "or use logging.wandb.mode=offline",
        )
    _require(bool(cfg.run.out_dir), "run.out_dir", "must not be empty")
    _finite(cfg.dist.timeout_s, "dist.timeout_s", 0, hi=MAX_TIMEOUT_S)
    _require(cfg.dist.check_sync_every >= 0, "dist.check_sync_every", f"must be >= 0, got {cfg.dist.check_sync_every}")
    m = cfg.model
    for key in ("n_layer", "n_head", "d_model", "block_size"):
        v = getattr(m, key)
        _require(v > 0, f"model.{key}", f"must be > 0, got {v}")
    _require(m.d_model % m.n_head == 0, "model.d_model", f"{m.d_model} is not divisible by model.n_head={m.n_head}")
    _require(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.factory is not None:
        resolve_factory(m.factory)
    vocab_size = _validate_data(cfg.data, m.block_size)
    import torch  # the checks above need none (a typo is reported at once); those below need the device

    cuda = torch.cuda.is_available()
    if t.device == Device.cuda:
        _require(cuda, "train.device", "cuda requested but no CUDA device is available; use auto or cpu")
    if cfg.dist.backend == Backend.nccl:
        _require(
            cuda and t.device != Device.cpu,
            "dist.backend",
            "nccl needs CUDA devices, and this run trains on the CPU; use auto or gloo",
        )
    _check_fits_in_memory(cfg, vocab_size, on_gpu=cuda and t.device != Device.cpu)
    from dist_train.strategies import resolve

    resolve(cfg)  # strategy x precision x launcher: a combination that cannot work fails here


def skipped_batches(d: DataConfig) -> list[int]:
    """data.skip_steps and the batches of data.skip_steps_file, sorted, without repeats (1-based)."""
    steps = set(d.skip_steps)
    if d.skip_steps_file is not None:
        path = _regular_file(d.skip_steps_file, "config key 'data.skip_steps_file': file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config key 'data.skip_steps_file': cannot read '{path}' ({describe(e)})") from None
        import json

        for i, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise ConfigError(f"config key 'data.skip_steps_file': line {i} of '{path}' is not valid JSON "
                                      "(cut off?); mend or remove that line") from None
                if not isinstance(obj, dict) or "batch" not in obj:
                    raise ConfigError(f"config key 'data.skip_steps_file': line {i} of '{path}' is a JSON object "
                                      "without a 'batch' (is it a spikes.jsonl written by dist-train?)")
                items = [obj["batch"]]
            else:
                items = line.split()
            for item in items:
                try:
                    steps.add(int(item))
                except (TypeError, ValueError):
                    raise ConfigError(f"config key 'data.skip_steps_file': line {i} of '{path}' holds "
                                      f"'{item}', not a step number") from None
    bad = [s for s in steps if s < 1]
    if bad:
        key = "data.skip_steps" if min(bad) in d.skip_steps else "data.skip_steps_file"
        raise ConfigError(f"config key '{key}': steps are 1-based, got {min(bad)}")
    return sorted(steps)


def _validate_data(d: DataConfig, block_size: int) -> int:
    """Check the data.* keys (a token file against its size and sidecar); the vocabulary size, or a bound on it."""
    skipped_batches(d)
    _require(d.text_file is None or d.token_file is None, "data.token_file",
             "data.text_file is set too; pass only one of them")
    if d.token_file is None:
        _require(d.token_dtype is None, "data.token_dtype", "is for data.token_file, which is not set; remove it")
    if d.text_file is not None:
        _regular_file(d.text_file, "config key 'data.text_file': file")
        _require(d.vocab_size is None, "data.vocab_size",
                 "a data.text_file's vocabulary is its distinct characters; remove data.vocab_size")
        return 256  # unknown until the file is read; a bound for the memory check
    if d.token_file is not None:
        from dist_train.data import inspect_token_file

        return inspect_token_file(d, block_size).vocab_size
    assert d.vocab_size is not None  # load_config fills in the synthetic default
    _require(d.vocab_size >= 8, "data.vocab_size", f"must be >= 8, got {d.vocab_size}")
    _require(d.num_samples > 0, "data.num_samples", f"must be > 0, got {d.num_samples}")
    return d.vocab_size


def _available_memory(on_gpu: bool) -> Optional[int]:
    """Bytes this process can expect to use: the GPU's memory, or the host's available memory."""
    if on_gpu:
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def tinygpt_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Parameter count of the embedded TinyGPT (dist_train.model)."""
    d = m.d_model
    per_block = 12 * d * d + 13 * d  # qkv, proj, 2-layer MLP (4x), two LayerNorms, with biases
    return vocab_size * d + m.block_size * d + m.n_layer * per_block + 2 * d + d * vocab_size


def _check_fits_in_memory(cfg: Config, vocab_size: int, on_gpu: bool) -> None:
    """Refuse sizes that cannot fit at all, before anything is allocated or written.

    A sanity bound, not a tight one: the embedded model's weights, gradients and
    two AdamW moments in fp32 (16 bytes a parameter, activations not counted),
    and the synthetic data set held in memory (the shuffle stores nothing per sample).
    """
    available = _available_memory(on_gpu)
    if available is None:
        return
    where = "GPU" if on_gpu else "host"
    if cfg.model.factory is None:
        n = tinygpt_parameters(cfg.model, vocab_size)
        need = 16 * n
        _require(
            need <= available,
            "model.d_model",
            f"this model has {n:.3g} parameters and needs about {need / GiB:.3g} GiB for weights, gradients and "
            f"AdamW state, more than the {available / GiB:.3g} GiB of {where} memory available; use a smaller model "
            "(model.d_model, model.n_layer)",
        )
    if cfg.data.text_file is None and cfg.data.token_file is None:
        need = cfg.data.num_samples * (cfg.model.block_size + 1) * 8  # int64 samples
        host = _available_memory(False)
        _require(
            host is None or need <= host,
            "data.num_samples",
            f"{cfg.data.num_samples} samples of model.block_size+1 tokens need about {need / GiB:.3g} GiB, more "
            f"than the {(host or 0) / GiB:.3g} GiB of host memory available; lower it",
        )


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
    except SyntaxError as e:
        raise ConfigError(
            f"config key 'model.factory': module '{module_name}' has a syntax error "
            f"({e.msg}, {Path(e.filename or '?').name} line {e.lineno})"
        ) from None
    except Exception as e:  # user code raising at import time
        raise ConfigError(
            f"config key 'model.factory': importing module '{module_name}' raised {describe(e)}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"config key 'model.factory': module '{module_name}' has no callable '{attr}'")
    return fn


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]

