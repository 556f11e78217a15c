"""Clipper: the trainer's clipping for your own training loop.

    clipper = Clipper("zscore", max_norm=1.0)        # any policy; the options are the config's clip.* keys
    for step, batch in enumerate(loader, 1):
        loss = model(**batch).loss
        loss.backward()                              # or scaler.scale(loss).backward()
        stats = clipper.step(model, optimizer)       # global norm -> threshold -> clip -> optimizer step, or skip
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            wandb.log(stats.to_dict(), step=step)    # the only host read

`step` runs the same code as dist_train's own step (`dist_train.step.update_step`) on the
gradients the backward left: already averaged by DDP, or reduce-scattered by FSDP2
(`fully_shard`), whose norm is each rank's sums of squares plus one all-reduce. With a
fused optimizer (torch's Adam, AdamW, Adagrad or SGD with fused=True) the clip
coefficient, the fp16 unscale and the skip decision go into the optimizer's own pass,
and nothing is read back to the host; any other optimizer takes the explicit path
(unscale, scale, one host read to decide whether to step). A step whose norm is NaN/Inf,
or a spike (skip_sigma), leaves parameters, moments and step counts untouched, and
enters neither the policy's statistics nor the spike window. Given a GradScaler, `step`
unscales (or folds the unscale in) and updates its scale: do not call scaler.step() or
scaler.update() yourself. Objects `accelerator.prepare` returned are unwrapped (the torch
optimizer inside, Accelerate's scaler). A DeepSpeed engine, `clipper.step(engine)`, replaces
`engine.step()` at the accumulation boundary: the threshold is handed to the engine, whose own
norm and skip are read back (`dist_train.strategies.deepspeed.EngineClip`, the trainer's too).
docs/clipper.md shows a loop for each launcher.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from dist_train.clip import ClipPolicy, SpikeSkip, build_policy, build_spike_skip
from dist_train.config import ClipConfig, validate_clip
from dist_train.errors import ConfigError, UsageError
from dist_train.metrics import layer_norms as _layer_norms
from dist_train.step import StepMetrics, update_step
from dist_train.strategies.base import Amp, Strategy

#: Clipper's options: the clip.* config keys (policy is its first argument).
OPTIONS = tuple(f.name for f in dataclasses.fields(ClipConfig) if f.name != "policy")


@dataclass
class ClipStats:
    """What one `Clipper.step` measured: 0-dim tensors on the gradients' device, plain (never DTensors) and the
    same on every rank. Their meanings are the README glossary's; `to_dict()` reads them back."""

    grad_norm_raw: torch.Tensor
    """Global L2 norm of the (averaged, unscaled) gradients before clipping."""
    grad_norm_clipped: torch.Tensor
    """The norm the optimizer applied: raw * clip_coef."""
    clip_coef: torch.Tensor
    """min(1, threshold / (raw + eps)); 1: not clipped."""
    threshold: torch.Tensor
    """The policy's threshold for this step (inf: none)."""
    skipped: torch.Tensor
    """True when the norm was NaN/Inf and the optimizer step was skipped."""
    spike: Optional[torch.Tensor] = None
    """True when the step was skipped as a spike (skip_sigma); None without spike skipping."""
    loss_scale: Optional[torch.Tensor] = None
    """The GradScaler's scale this step's backward used (None without one)."""
    param_norms: Optional[torch.Tensor] = None
    """Each parameter's gradient norm, whole, in the order of `names`."""
    names: tuple[str, ...] = ()
    stats: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """The policy's and the spike window's statistics (clip/ema_mean, clip/spike_limit, ...)."""

    @classmethod
    def of(cls, m: StepMetrics, names: Sequence[str]) -> "ClipStats":
        """The public part of the step's metrics; `names` the parameters', as the model names them."""
        return cls(grad_norm_raw=m.grad_norm_raw, grad_norm_clipped=m.grad_norm_clipped, clip_coef=m.clip_coef,
                   threshold=m.threshold, skipped=m.skipped, spike=m.spike, loss_scale=m.loss_scale,
                   param_norms=m.param_norms, names=tuple(_clean(n) for n in names), stats=m.stats)

    def layer_norms(self) -> dict[str, Optional[float]]:
        """Each module's gradient norm by name (a host read)."""
        if self.param_norms is None:
            raise ValueError("no per-parameter norms were measured for this step (a DeepSpeed engine computes the "
                             "norm inside its step and gives only the total)")
        return _layer_norms(self.names, self.param_norms)

    def to_dict(self) -> dict[str, Any]:
        """The values, read back to the host (the one read), with metrics.jsonl's keys; NaN/Inf are None."""
        def num(t: torch.Tensor) -> Optional[float]:
            v = float(t)
            return v if math.isfinite(v) else None

        out: dict[str, Any] = {
            "grad_norm/raw": num(self.grad_norm_raw),
            "grad_norm/clipped": num(self.grad_norm_clipped),
            "grad_norm/clip_coef": num(self.clip_coef),
            "grad_norm/threshold": num(self.threshold),
            "optim/step_skipped": int(bool(self.skipped)),
        }
        if self.spike is not None:
            out["optim/spike_skipped"] = int(bool(self.spike))
            if out["optim/spike_skipped"]:
                out["grad_norm/clipped"] = None  # nothing was applied
        if self.loss_scale is not None:
            out["amp/loss_scale"] = num(self.loss_scale)
        out.update({k: num(v) for k, v in self.stats.items()})
        return out


class _Ranks(Strategy):
    """The pieces for a user's loop: gradients as the backward left them (DDP averaged them; FSDP2's are
    sharded DTensors, whose norm base.grad_norms reduces), the user's GradScaler, means over the default group."""

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / dist.get_world_size()


class Clipper:
    """Global-norm clipping, adaptive policies and spike skipping for any training loop (see the module's
    docstring). `policy`: none | fixed | zscore | percentile | agc; the options are the clip.* config keys
    (max_norm, warmup_steps, zscore_alpha, skip_sigma, ...), with the same defaults and checks."""

    def __init__(self, policy: str = "fixed", **options: Any):
        unknown = [k for k in options if k not in OPTIONS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], OPTIONS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"Clipper: unknown option '{unknown[0]}'; {hint}(the options are the clip.* config keys: "
                              f"{', '.join(OPTIONS)})")
        for key, value in options.items():
            _check_type(key, value)
        self.config = ClipConfig(policy=policy, **options)
        try:
            validate_clip(self.config)  # the config's clip.* checks, by their keys
        except ConfigError as e:
            raise ConfigError(f"Clipper: {e}".replace("config key 'clip.", "option '")) from None
        self.policy: ClipPolicy = build_policy(self.config)
        self.skip: Optional[SpikeSkip] = build_spike_skip(self.config)
        self._device: Optional[torch.device] = None
        self._engine: Any = None  # the EngineClip of the DeepSpeed engine last stepped, if any

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            self.policy = self.policy.to(device)
            if self.skip is not None:
                self.skip = self.skip.to(device)
            self._device = device

    def step(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
             scaler: Optional[torch.amp.GradScaler] = None, loss: Optional[torch.Tensor] = None) -> ClipStats:
        """Norm, threshold, spike skip, clip and the optimizer's step (or none), on the gradients of `model`'s
        trainable parameters. `loss` (this step's, on this rank) is needed only for skip_on=loss or both.
        `model` may be a DeepSpeed engine: `clipper.step(engine)` then replaces `engine.step()` at the
        accumulation boundary (see `_engine_step`)."""
        if _is_deepspeed_engine(model):
            return self._engine_step(model, optimizer, scaler)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"Clipper.step(model, optimizer): model must be a torch.nn.Module (or a DeepSpeed engine), "
                             f"got {type(model).__name__}; the model comes first, then its optimizer")
        if optimizer is None:
            raise UsageError("Clipper.step(model, optimizer): pass the optimizer that steps model's parameters")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"Clipper.step(model, optimizer): optimizer must be a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        optimizer, scaler = _unwrap_accelerate(optimizer, scaler)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UsageError("Clipper.step: the model has no trainable parameter (requires_grad is False on all of "
                             "them); unfreeze the ones to train")
        names, params = zip(*named)
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:  # which parameters hold a gradient is known on the host: no device read
            raise UsageError("Clipper.step: no trainable parameter of the model has a gradient: call loss.backward() "
                             "(or scaler.scale(loss).backward()) before clipper.step, on a loss that depends on the "
                             "model's parameters")
        stepped = {id(q) for group in optimizer.param_groups for q in group["params"]}
        if not any(id(p) in stepped for p in with_grad):
            raise UsageError("Clipper.step(model, optimizer): the optimizer holds none of the model's parameters "
                             "that have gradients; build it over this model's parameters (after wrapping it with "
                             "fully_shard, which replaces them)")
        if scaler is not None and scaler.is_enabled():
            from torch.amp.grad_scaler import OptState

            if scaler._scale is None:
                raise UsageError("Clipper.step: the GradScaler has not scaled a loss yet: call "
                                 "scaler.scale(loss).backward() (not loss.backward()) when you pass a scaler")
            if scaler._per_optimizer_states[id(optimizer)]["stage"] is not OptState.READY:
                raise ConfigError("Clipper.step: scaler.unscale_(optimizer) was already called this step; the "
                                  "Clipper unscales itself (or folds the unscale into the optimizer): remove that call")
        if self.config.skip_sigma and self.config.skip_on != "norm" and loss is None:
            raise ConfigError(f"Clipper.step: skip_on={self.config.skip_on} judges the loss: pass step(..., loss=loss)")
        self._to(_local_device(with_grad[0].grad))
        strategy = _Ranks(Amp(scaler=scaler if scaler is not None and scaler.is_enabled() else None))
        m = update_step(optimizer, list(params), self.policy, strategy=strategy,
                        loss=loss.detach() if loss is not None else None, eps=self.config.eps, skip=self.skip,
                        loss_scale=strategy.loss_scale())
        return ClipStats.of(m, names)

    def _engine_step(self, engine: Any, optimizer: Any, scaler: Any) -> ClipStats:
        """A DeepSpeed engine reduces (or reduce-scatters), unscales, clips and updates inside its own step: the
        policy's threshold (from past norms alone) is handed to it before that step, and its own global norm
        and skip decision are read back after it, as dist_train's DeepSpeed strategy does (one implementation:
        `EngineClip`). Policies that need this step's norm before the update (agc, spike skipping) are refused."""
        from dist_train.step import engine_update
        from dist_train.strategies.deepspeed import EngineClip, check_clip

        if scaler is not None:
            raise UsageError("Clipper.step(engine): DeepSpeed's engine scales the fp16 loss itself; do not pass a "
                              "GradScaler")
        # The optimizer deepspeed.initialize returned (the engine's), the torch one inside it, or Accelerate's wrapper.
        def ids(opt: Any) -> set[int]:
            return {id(o) for o in (opt, getattr(opt, "optimizer", None)) if o is not None}

        if optimizer is not None and not ids(engine.optimizer) & ids(optimizer):
            raise UsageError("Clipper.step(engine, optimizer): this optimizer is not the engine's; call "
                              "clipper.step(engine)")
        if self._engine is None or self._engine.engine is not engine:
            try:
                check_clip(self.config, self.policy, "clip a DDP or FSDP2 model with clipper.step(model, optimizer)")
            except ConfigError as e:
                raise ConfigError(f"Clipper.step(engine): {e}".replace("config key 'clip.", "option '")) from None
            clip = EngineClip(engine)
            why = clip.refusal()
            if why is not None:
                raise ConfigError(f"Clipper.step(engine): DeepSpeed's {why}")
            self._engine = clip
        if not engine.is_gradient_accumulation_boundary():
            raise ConfigError("Clipper.step(engine) was called inside DeepSpeed's gradient accumulation window: call "
                              "engine.step() after the micro-batches before the boundary, and clipper.step(engine) "
                              "only where engine.is_gradient_accumulation_boundary() is True")
        clip = self._engine
        self._to(clip.device)
        m = engine_update(self.policy, clip.step, clip.device, clip.loss_scale())
        return ClipStats.of(m, [n for n, p in engine.module.named_parameters() if p.requires_grad])

    def state_dict(self) -> dict[str, Any]:
        """The policy's and the spike window's state (checkpoint it with your model)."""
        return {"policy": self.config.policy, "state": self.policy.state_dict(),
                "spike_skip": self.skip.state_dict() if self.skip is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a state the settings no longer fit (another policy, another window size)
        starts afresh, with a warning (a UserWarning), as the trainer does on resume."""
        import warnings

        if state.get("policy") != self.config.policy:
            warnings.warn(f"Clipper: the saved policy is {state.get('policy')} and this one {self.config.policy}: "
                          "it starts afresh", stacklevel=2)
            return
        for what, target, saved in (("policy", self.policy, state.get("state")),
                                    ("spike window", self.skip, state.get("spike_skip"))):
            if target is None or saved is None:
                continue
            try:
                target.load_state_dict(saved)
            except ValueError as e:
                warnings.warn(f"Clipper: the saved {what} state does not fit these settings ({e}): it starts afresh",
                              stacklevel=2)


def _check_type(key: str, value: Any) -> None:
    """An option's value of the type its clip.* key takes (a float option takes an int too; never a bool)."""
    default = next(f.default for f in dataclasses.fields(ClipConfig) if f.name == key)
    kind = float if isinstance(default, float) else type(default)
    ok = (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind))
    if not ok:
        raise ConfigError(f"Clipper: option '{key}' takes {kind.__name__}, got {type(value).__name__} {value!r}")


def _unwrap_accelerate(optimizer: Any, scaler: Optional[torch.amp.GradScaler]):
    """An optimizer `accelerator.prepare` returned: the torch optimizer inside it (whose fused step takes the clip
    coefficient; the wrapper's step would call scaler.step and scaler.update itself) and Accelerate's GradScaler.
    A step inside Accelerate's accumulation window is refused: its gradients are not yet synchronised."""
    if type(optimizer).__name__ != "AcceleratedOptimizer" or not hasattr(optimizer, "optimizer"):
        return optimizer, scaler
    state = getattr(optimizer, "gradient_state", None)
    if state is not None and not state.sync_gradients:
        raise ConfigError("Clipper.step was called inside Accelerate's gradient accumulation window "
                          "(accelerator.sync_gradients is False): the gradients are not synchronised yet; call it "
                          "only when accelerator.sync_gradients is True")
    return optimizer.optimizer, scaler if scaler is not None else getattr(optimizer, "scaler", None)


def _is_deepspeed_engine(model: Any) -> bool:
    import sys

    ds = sys.modules.get("deepspeed")  # an engine exists only once deepspeed was imported
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def _local_device(t: torch.Tensor) -> torch.device:
    from torch.distributed.tensor import DTensor

    return t.to_local().device if isinstance(t, DTensor) else t.device


def _clean(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP's module., torch.compile's _orig_mod.)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


__all__: Sequence[str] = ("Clipper", "ClipStats")
