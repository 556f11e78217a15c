"""The typed configuration tree: YAML file + dotted command-line overrides.

Every field has one meaning, documented here (docs/configuration.md is generated
from these docstrings). Loading is strict: an unknown key, a value of the wrong type or an invalid value raises
`ConfigError` with a one-line message naming the key, before anything is
written anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dist_train.errors import ConfigError, first_line


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


class ProgressMode(str, enum.Enum):
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


class TaskName(str, enum.Enum):
    auto = "auto"
    lm = "lm"
    classify = "classify"
    model = "model"


class OptimName(str, enum.Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


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


#: train.max_steps when neither it nor train.epochs is set.
DEFAULT_MAX_STEPS = 300


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    """Number of optimizer steps (unset, and no train.epochs: 300)."""
    epochs: Optional[int] = None
    """Train for this many passes over the training set instead: train.max_steps = epochs x the steps of an
    epoch (the samples // train.global_batch_size; the last partial batch of an epoch is left out). Set one of
    train.max_steps and train.epochs."""
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


#: optim.beta1 and optim.beta2 of adam and adamw when not set.
DEFAULT_BETAS = (0.9, 0.95)


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw
    """The optimizer, torch's: adamw | adam | sgd."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay: decoupled under adamw, added to the gradient (L2) under adam and sgd."""
    beta1: Optional[float] = None
    """adam, adamw: the first moment's decay (unset: 0.9)."""
    beta2: Optional[float] = None
    """adam, adamw: the second moment's decay (unset: 0.95)."""
    momentum: Optional[float] = None
    """sgd: momentum (unset: 0, plain SGD)."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs optim.momentum > 0)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps: step s (1-based) takes lr * s / warmup_steps.
    A warm-up longer than train.max_steps is allowed (a startup note says so): the rate ramps and never reaches
    its peak."""
    schedule: Schedule = Schedule.constant
    """After warm-up: constant, or cosine decay to 10% of lr at max_steps."""


@dataclass
class ClipConfig:
    policy: str = "fixed"
    """Clip policy name: none | fixed | zscore | percentile | agc (docs/clipping.md)."""
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
    """auto (online if an API key is configured, through WANDB_API_KEY or netrc, else offline) | offline |
    online | disabled. The API key is never printed or stored by dist_train."""
    project: str = "dist_train"
    """The W&B project the run goes to."""
    entity: Optional[str] = None
    """The W&B entity (user or team) the run goes to; unset: the key's default."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Log one metrics line every this many optimizer steps (and at the last step)."""
    per_layer_every: int = 0
    """Every N optimizer steps, log the raw gradient norm of each module to per_layer.jsonl and W&B (0: off);
    those steps are logged steps."""
    spike_top_k: int = 5
    """spikes.jsonl: how many modules, largest gradient norm first, a spike's line names."""
    progress: ProgressMode = ProgressMode.auto
    """How progress shows: auto (a bar on a terminal, plain lines otherwise) | bar | plain."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TaskConfig:
    name: TaskName = TaskName.auto
    """What the model computes and what it is trained on: lm (logits over a vocabulary, next-token
    cross-entropy) | classify ((B, C) logits, integer labels, cross-entropy; accuracy) | model (the model returns
    its own loss: `.loss`, ["loss"] or its first element) | auto (token data: lm; otherwise inferred from the
    samples and the model's output, and named in the startup summary)."""
    loss: Optional[str] = None
    """'package.module:function': your own loss, `fn(model, batch) -> loss` or `(loss, {name: tensor})` for
    metrics of its own; replaces the task's loss."""


@dataclass
class EvalConfig:
    every: Optional[int] = None
    """Evaluate on the validation set every N optimizer steps (unset: at the end of each epoch under
    train.epochs, else at the last step; 0: never)."""
    max_batches: Optional[int] = None
    """Evaluate on the first N x train.global_batch_size validation samples only (unset: all of them)."""


@dataclass
class ModelConfig:
    factory: Optional[str] = None
    """'package.module:name': a function or class building your own model, called with the keyword arguments
    it declares out of cfg (this section), vocab_size (token data) and num_classes (classify); None: the
    embedded GPT."""
    n_layer: int = 2
    """The embedded TinyGPT: transformer blocks."""
    n_head: int = 4
    """The embedded TinyGPT: attention heads (they divide model.d_model)."""
    d_model: int = 64
    """The embedded TinyGPT: width of the residual stream."""
    block_size: int = 32
    """Sequence length of a sample (tokens per sample)."""
    dropout: float = 0.0
    """The embedded TinyGPT: dropout probability."""


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
    file: Optional[str] = None
    """Training on what torch.save wrote: a tuple or list of tensors (e.g. (images, labels)) or a dict of
    tensors, of equal first dimensions; sample i is every tensor's row i. Loaded with weights_only=True and
    mmap=True (a file larger than memory trains); a pickled Dataset object is refused."""
    val_file: Optional[str] = None
    """The validation set, in data.file's format (with data.file or data.factory)."""
    factory: Optional[str] = None
    """'package.module:function' returning a map-style torch Dataset, or a dict with "train" (and "val"),
    called with the keyword arguments it declares out of cfg (this section) and seed; samples (tensors, tuples
    or dicts of tensors) are batched by torch's default_collate."""
    val_fraction: float = 0.0
    """Hold out this fraction of the training samples as the validation set (chosen by train.seed, the same
    samples on every run of that seed); 0: none, unless data.val_file or the factory's "val" gives one."""
    shuffle: bool = True
    """false: read the samples in their order in the data set (epoch after epoch), as a DataLoader with
    shuffle=False does; true: another permutation each epoch."""
    num_workers: int = 0
    """Worker processes loading this rank's batches ahead of the step (torch's DataLoader, pinned memory on
    CUDA); 0: in the training process."""
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
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
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
    from dist_train.files import regular_file

    p = regular_file(path, "config file")
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


def parse_config(path: Optional[str | os.PathLike], overrides: Sequence[str] = ()) -> Config:
    """Load, merge and check the values; raise ConfigError (one line) on any problem. Nothing on the machine
    is looked at beyond the YAML file: `dist_train.preflight.load_config` adds that."""
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
    if all(getattr(d, k.split(".")[1]) is None for k in DATA_SOURCES) and d.vocab_size is None:
        d.vocab_size = SYNTHETIC_VOCAB_SIZE  # filled in, so that the saved config says what was trained
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        cfg.train.max_steps = DEFAULT_MAX_STEPS
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
    if t.max_steps is not None and o.warmup_steps > t.max_steps:
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
    """The checks of values alone, pure (no file, device or import is looked at): types cannot express
    them. `dist_train.preflight` checks what the config names on this machine."""
    t = cfg.train
    if t.epochs is not None:
        _require(t.max_steps is None, "train.epochs",
                 f"train.max_steps={t.max_steps} is set too; set one of them (train.max_steps=null trains by epochs)")
        _require(t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    else:
        _require(t.max_steps is not None and t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
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
    _validate_optim(cfg.optim)
    validate_clip(cfg.clip)
    _require(cfg.logging.every > 0, "logging.every", f"must be > 0, got {cfg.logging.every}")
    _require(cfg.logging.per_layer_every >= 0, "logging.per_layer_every",
             f"must be >= 0, got {cfg.logging.per_layer_every}")
    _require(cfg.logging.spike_top_k >= 1, "logging.spike_top_k", f"must be >= 1, got {cfg.logging.spike_top_k}")
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
        _require(_spec_ok(m.factory), "model.factory", f"'{m.factory}' is not of the form 'package.module:function'")
    if cfg.task.loss is not None:
        _require(_spec_ok(cfg.task.loss), "task.loss", f"'{cfg.task.loss}' is not of the form 'package.module:function'")
    _validate_data(cfg)
    e = cfg.eval
    _require(e.every is None or e.every >= 0, "eval.every", f"must be >= 0 (0: never), got {e.every}")
    _require(e.max_batches is None or e.max_batches >= 1, "eval.max_batches", f"must be >= 1, got {e.max_batches}")


def validate_clip(c: ClipConfig) -> None:
    """The clip.* checks (also dist_train.Clipper's, by the same keys)."""
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


def _spec_ok(spec: str) -> bool:
    module_name, sep, attr = spec.partition(":")
    return bool(sep and module_name and attr)


def _validate_optim(o: OptimConfig) -> None:
    """optim.*: ranges, and no option of another optimizer (betas under sgd, momentum under adam)."""
    _finite(o.lr, "optim.lr", 0)
    _finite(o.weight_decay, "optim.weight_decay", 0, lo_open=False)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    name = o.name.value
    if o.name == OptimName.sgd:
        for key in ("beta1", "beta2"):
            _require(getattr(o, key) is None, f"optim.{key}",
                     "is an option of adam and adamw, and optim.name is sgd; remove it (sgd takes optim.momentum)")
        momentum = o.momentum or 0.0
        _require(math.isfinite(momentum) and 0 <= momentum < 1, "optim.momentum", f"must be in [0, 1), got {momentum}")
        _require(not o.nesterov or momentum > 0, "optim.nesterov",
                 "Nesterov momentum needs momentum: set optim.momentum > 0 (e.g. 0.9), or optim.nesterov=false")
    else:
        _require(o.momentum is None, "optim.momentum",
                 f"is an option of sgd, and optim.name is {name}; remove it (adam and adamw take optim.beta1)")
        _require(not o.nesterov, "optim.nesterov", f"is an option of sgd, and optim.name is {name}; remove it")
        for key in ("beta1", "beta2"):
            v = getattr(o, key)
            _require(v is None or 0 <= v < 1, f"optim.{key}", f"must be in [0, 1), got {v}")


def betas(o: OptimConfig) -> tuple[float, float]:
    """adam's and adamw's (beta1, beta2), their defaults where unset."""
    return (DEFAULT_BETAS[0] if o.beta1 is None else o.beta1, DEFAULT_BETAS[1] if o.beta2 is None else o.beta2)


#: The keys that name a source of training samples; at most one is set (none: the synthetic task).
DATA_SOURCES = ("data.text_file", "data.token_file", "data.file", "data.factory")


def token_data(d: DataConfig) -> bool:
    """Whether the samples are token windows (the synthetic task, a text file, a token file)."""
    return d.file is None and d.factory is None


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    given = [k for k in DATA_SOURCES if getattr(d, k.split(".")[1]) is not None]
    _require(len(given) <= 1, given[-1] if given else "data", f"{given[0] if given else ''} is set too; pass only one "
             "of them")
    if d.token_file is None:
        _require(d.token_dtype is None, "data.token_dtype", "is for data.token_file, which is not set; remove it")
    if d.text_file is not None:
        _require(d.vocab_size is None, "data.vocab_size",
                 "a data.text_file's vocabulary is its distinct characters; remove data.vocab_size")
    if d.val_file is not None:
        _require(not token_data(d), "data.val_file", "is a validation set for data.file or data.factory; with token "
                 "data use data.val_fraction")
        _require(d.val_fraction == 0, "data.val_fraction", "data.val_file gives the validation set already; remove one")
    _require(math.isfinite(d.val_fraction) and 0 <= d.val_fraction < 1, "data.val_fraction",
             f"must be in [0, 1), got {d.val_fraction}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.factory is not None:
        _require(_spec_ok(d.factory), "data.factory", f"'{d.factory}' is not of the form 'package.module:function'")
    if d.text_file is None and d.token_file is None and d.file is None and d.factory is None:
        assert d.vocab_size is not None  # load_config fills in the synthetic default
        _require(d.vocab_size >= 8, "data.vocab_size", f"must be >= 8, got {d.vocab_size}")
        _require(d.num_samples > 0, "data.num_samples", f"must be > 0, got {d.num_samples}")
    elif d.vocab_size is not None and d.token_file is None:
        _require(d.vocab_size >= 1, "data.vocab_size", f"must be >= 1, got {d.vocab_size}")


def tinygpt_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Parameter count of the embedded TinyGPT (dist_train.model)."""
    d = m.d_model
    per_block = 12 * d * d + 13 * d  # qkv, proj, 2-layer MLP (4x), two LayerNorms, with biases
    return vocab_size * d + m.block_size * d + m.n_layer * per_block + 2 * d + d * vocab_size


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]

