"""Clip policies and the clipping arithmetic.

A policy sees only the raw (pre-clip, global, unscaled) gradient norm and its
own state, and returns a threshold. It holds no model tensors. The training
step calls `threshold(raw)` and then `observe(raw, taken)` every step, with no
host read in between: a stateful policy keeps its state as tensors on the
device and updates it masked by `taken` (False when the norm was NaN/Inf and
the step was skipped), e.g. `torch.where(taken, new, old)`, so a NaN/Inf never
enters a policy's history (the bug that poisons adaptive clippers) and the step
never waits for the host. State is read on the host only for logging and
checkpoints (`state_dict`). `threshold` may return +inf ("do not clip"), which
lets an adaptive policy warm up on a history before it clips.

Where an engine clips inside its own step (DeepSpeed), the threshold must be
known before this step's norm exists: only policies whose threshold depends on
past norms alone (`next_threshold`) can run there; a policy that reads the
current norm or the parameters says so (`needs_current_norm`,
`needs_parameters`) and is refused at config load.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch

from dist_train.config import ClipConfig


class DeviceState:
    """State held as the tensors named in `STATE`, on the training device: moved, saved and restored alike."""

    STATE: tuple[str, ...] = ()

    def to(self, device: torch.device):
        """Move the state to the training device (once, before training)."""
        for k in self.STATE:
            setattr(self, k, getattr(self, k).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).cpu() for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s tensors; ValueError when they do not fit (other keys, another window size)."""
        if sorted(state) != sorted(self.STATE):
            raise ValueError(f"{type(self).__name__} holds {sorted(self.STATE) or 'no state'}, got {sorted(state)}")
        for k in self.STATE:
            mine, saved = getattr(self, k), state[k]
            if saved.shape != mine.shape:
                raise ValueError(f"its '{k}' has shape {tuple(saved.shape)} and this run's {tuple(mine.shape)}")
        for k in self.STATE:
            setattr(self, k, state[k].to(getattr(self, k).device))


class ClipPolicy(DeviceState):
    """Interface. Subclasses override `threshold`, and `observe`/`STATE` when stateful."""

    name: str = "base"
    #: False when the policy can never return a finite threshold; the step then
    #: skips the (no-op) scaling pass over the gradients.
    clips: bool = True
    #: True when the threshold depends on this step's raw norm (it cannot run where an engine clips).
    needs_current_norm: bool = False
    #: True when the policy needs per-parameter gradients (which ZeRO partitions do not give).
    needs_parameters: bool = False

    #: True for a policy whose threshold is an outlier test of past norms (zscore): a step it clips after its
    #: warm-up is a spike, and goes to spikes.jsonl.
    flags_spikes: bool = False
    #: True for a unit-wise policy (AGC): it scales gradients itself (`apply_`) and has no global threshold.
    unitwise: bool = False

    def threshold(self, raw: torch.Tensor) -> torch.Tensor:
        """Threshold for this step, a 0-dim tensor on raw's device. Must not change state."""
        return self.next_threshold(raw.device).to(raw.dtype)

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        """The threshold of the coming step from past norms alone, before its norm exists (a 0-dim fp64
        tensor, so a configured value reaches an engine exactly)."""
        raise NotImplementedError(f"clip policy '{self.name}' needs the current step's norm")

    def observe(self, raw: torch.Tensor, taken: torch.Tensor) -> None:
        """Record this step's raw norm where `taken` (a 0-dim bool on the device) is True; leave the state
        exactly as it was where it is False. No host reads: `raw` may be NaN here, masked out by `taken`."""

    def warm(self) -> torch.Tensor:
        """0-dim bool: whether the adaptive threshold is in force (past the warm-up)."""
        return torch.tensor(False)

    def stats(self) -> dict[str, torch.Tensor]:
        """The statistics this step's threshold was computed from (0-dim tensors on the device, NaN while
        undefined), logged under the keys given. Called before `observe`."""
        return {}


class NoClip(ClipPolicy):
    """Never clips: threshold +inf, so clip_coef is 1 and clipped == raw."""

    name = "none"
    clips = False

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        return torch.full((), math.inf, dtype=torch.float64, device=device)


class FixedClip(ClipPolicy):
    """Clips the global norm to a constant `max_norm`."""

    name = "fixed"

    def __init__(self, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = float(max_norm)

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        return torch.full((), self.max_norm, dtype=torch.float64, device=device)


class ZScoreClip(ClipPolicy):
    """ZClip-style adaptive threshold: mean + z * std of an EMA of past raw norms.

    Warm-up: the first `warmup` finite norms are clipped at the fixed `max_norm` and collected; the EMA starts
    from their mean and (population) variance. After that, each step's threshold is
    `mean + z * sqrt(var)` from the state of the previous steps, and the step's norm enters the EMA:
    `mean' = a*mean + (1-a)*x`, `var' = a*var + (1-a)*(x - mean')**2`, where x is the norm as clipped
    (`min(raw, threshold)`, ZClip's choice: a spike enters at the threshold, so it cannot inflate the
    statistics that judge the next one) or, with `update_with="raw"`, the raw norm.
    A step that was skipped (NaN/Inf norm, a skipped spike) changes nothing: every update is masked.
    """

    name = "zscore"
    flags_spikes = True
    STATE = ("count", "mean", "var")

    def __init__(self, max_norm: float, alpha: float = 0.97, z: float = 2.5, warmup: int = 25,
                 update_with: str = "clipped"):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        if update_with not in ("clipped", "raw"):
            raise ValueError(f"update_with must be clipped or raw, got {update_with}")
        self.max_norm, self.alpha, self.z, self.warmup, self.update_with = float(max_norm), alpha, z, warmup, update_with
        self.count = torch.zeros((), dtype=torch.int64)  # finite norms observed
        self.mean = torch.zeros((), dtype=torch.float64)  # during warm-up: the sum of the norms
        self.var = torch.zeros((), dtype=torch.float64)  # during warm-up: the sum of their squares

    def warm(self) -> torch.Tensor:
        return self.count >= self.warmup

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        adaptive = self.mean + self.z * self.var.clamp(min=0).sqrt()
        return torch.where(self.warm(), adaptive, torch.full_like(adaptive, self.max_norm)).to(device)

    def observe(self, raw: torch.Tensor, taken: torch.Tensor) -> None:
        x_raw = raw.to(self.mean)
        warm = self.warm()
        x = torch.minimum(x_raw, self.next_threshold(self.mean.device)) if self.update_with == "clipped" else x_raw
        a = self.alpha
        ema_mean = a * self.mean + (1 - a) * x
        ema_var = a * self.var + (1 - a) * (x - ema_mean).square()
        # Warm-up: sums; the observation that completes it turns them into the mean and variance.
        sum_, sumsq = self.mean + x_raw, self.var + x_raw.square()
        last = self.count + 1 == self.warmup
        n = float(self.warmup)
        start_mean = sum_ / n
        start_var = (sumsq / n - start_mean.square()).clamp(min=0)
        new_mean = torch.where(warm, ema_mean, torch.where(last, start_mean, sum_))
        new_var = torch.where(warm, ema_var, torch.where(last, start_var, sumsq))
        self.mean = torch.where(taken, new_mean, self.mean)
        self.var = torch.where(taken, new_var, self.var)
        self.count = self.count + taken.to(self.count.dtype)

    def stats(self) -> dict[str, torch.Tensor]:
        nan = torch.full_like(self.mean, math.nan)
        warm = self.warm()
        return {"clip/ema_mean": torch.where(warm, self.mean, nan),
                "clip/ema_std": torch.where(warm, self.var.clamp(min=0).sqrt(), nan)}


class PercentileClip(ClipPolicy):
    """AutoClip-style threshold: the p-th percentile of the last `window` finite raw norms.

    The window is a ring buffer on the device (bounded, unlike the paper's ever-growing history); the
    percentile interpolates linearly between order statistics (numpy's and torch.quantile's default).
    The threshold comes from past steps only; until `warmup` norms were seen it is the fixed `max_norm`.
    A skipped step (NaN/Inf, a skipped spike) writes nothing into the window.
    """

    name = "percentile"
    STATE = ("count", "values")
    # Not a spike detector: at p=10 about 90% of steps are clipped by design, so its clipped steps are routine
    # (pair it with clip.skip_sigma for spikes and their forensics).

    def __init__(self, max_norm: float, p: float = 10.0, window: int = 1000, warmup: int = 25):
        if not 0 <= p <= 100:
            raise ValueError(f"p must be in [0, 100], got {p}")
        if window < 1 or not 1 <= warmup:
            raise ValueError(f"window and warmup must be >= 1, got {window}, {warmup}")
        self.max_norm, self.p, self.window, self.warmup = float(max_norm), float(p), int(window), int(warmup)
        self.count = torch.zeros((), dtype=torch.int64)  # finite norms observed (the window holds the last ones)
        self.values = torch.full((self.window,), math.inf, dtype=torch.float64)  # unfilled slots: +inf

    def warm(self) -> torch.Tensor:
        return self.count >= self.warmup

    def percentile(self) -> torch.Tensor:
        """The p-th percentile of the window's values (NaN while it is empty)."""
        n = torch.clamp(self.count, max=self.window)
        ordered = torch.sort(self.values).values  # the unfilled (+inf) slots sort last
        rank = (self.p / 100.0) * (n - 1).to(torch.float64)
        lo = torch.floor(rank).to(torch.int64).clamp(min=0)
        hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
        # index_select, not ordered[lo]: a 0-dim index tensor would be read back to the host
        a, b = ordered.index_select(0, lo.reshape(1))[0], ordered.index_select(0, hi.reshape(1))[0]
        frac = rank - lo.to(torch.float64)
        value = torch.where(a == b, a, a + frac * (b - a))  # a == b: exact, also where both are +inf
        return torch.where(n > 0, value, torch.full_like(value, math.nan))

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        value = self.percentile()
        return torch.where(self.warm(), value, torch.full_like(value, self.max_norm)).to(device)

    def observe(self, raw: torch.Tensor, taken: torch.Tensor) -> None:
        slot = torch.remainder(self.count, self.window).reshape(1)
        old = self.values.index_select(0, slot)
        self.values = self.values.index_put((slot,), torch.where(taken, raw.to(self.values), old))
        self.count = self.count + taken.to(self.count.dtype)

    def stats(self) -> dict[str, torch.Tensor]:
        return {"clip/percentile": self.percentile()}


class AGC(ClipPolicy):
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise: each unit's gradient G_i is scaled so that
    ||G_i|| <= lam * max(||W_i||, eps). A unit is a row (the output dimension, dim 0) of a weight of 2 or more
    dimensions, and the whole tensor of a 1-D parameter (biases, norm gains). There is no global threshold
    (+inf is logged); the step applies it through `apply_` after the gradients are averaged and before the
    optimizer, and logs the norm of what it applied as grad_norm/clipped."""

    name = "agc"
    unitwise = True
    needs_parameters = True

    def __init__(self, lam: float = 0.01, eps: float = 1e-3):
        if not lam > 0 or not eps > 0:
            raise ValueError(f"lam and eps must be > 0, got {lam}, {eps}")
        self.lam, self.eps = float(lam), float(eps)
        self._clipped_frac: Optional[torch.Tensor] = None

    def next_threshold(self, device: torch.device) -> torch.Tensor:
        return torch.full((), math.inf, dtype=torch.float64, device=device)

    def apply_(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], loss_scale: Optional[torch.Tensor]
               ) -> torch.Tensor:
        """Scale each unit of each gradient in place; return the global norm of the scaled (unscaled-fp16)
        gradients. `pairs` are (parameter, gradient), plain tensors or DTensors sharded on dim 0 (FSDP2): a
        rank's rows are whole there, and 1-D parameters, split across ranks, get their norms from one
        all-reduce of a vector (the only collective)."""
        from torch.distributed.tensor import DTensor

        inv_scale = None if loss_scale is None else loss_scale.to(torch.float32).reciprocal()
        rows, flat, group = [], [], None
        total_units = 0
        for p, g in pairs:
            total_units += p.shape[0] if p.dim() >= 2 else 1  # a DTensor's shape is the global one
            if isinstance(g, DTensor):
                group = g.device_mesh.get_group()
                p, g = p.to_local(), g.to_local()
            (rows if p.dim() >= 2 else flat).append((p.detach(), g))
        device = pairs[0][1].device if pairs else torch.device("cpu")
        # Whole-tensor squares of the 1-D parameters (local pieces), and the clipped rows' squares and counts.
        vec = torch.zeros(2 * len(flat) + 2, dtype=torch.float64, device=device)
        for i, (p, g) in enumerate(flat):
            vec[2 * i] = g.double().square().sum()
            vec[2 * i + 1] = p.double().square().sum()
        units = torch.zeros((), dtype=torch.float64, device=device)
        for p, g in rows:
            g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
            if inv_scale is not None:
                g_norm = g_norm * inv_scale.to(g_norm.device)
            factor = self._factor(g_norm, torch.linalg.vector_norm(p.flatten(1), dim=1))
            g.mul_(factor.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
            vec[-2] += (g_norm.double() * factor.double()).square().sum()
            units += (factor < 1).sum()
        vec[-1] = units
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
        clipped_sq = vec[-2]
        flat_clipped = torch.zeros((), dtype=torch.float64, device=device)
        for i, (p, g) in enumerate(flat):
            g_norm = vec[2 * i].sqrt().float()
            if inv_scale is not None:
                g_norm = g_norm * inv_scale.to(g_norm.device)
            factor = self._factor(g_norm, vec[2 * i + 1].sqrt().float())
            g.mul_(factor.to(g.dtype))
            clipped_sq = clipped_sq + (g_norm.double() * factor.double()).square()
            flat_clipped = flat_clipped + (factor < 1)
        self._clipped_frac = ((vec[-1] + flat_clipped) / max(total_units, 1)).float()
        return clipped_sq.sqrt().float()

    def _factor(self, g_norm: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
        limit = self.lam * w_norm.clamp(min=self.eps)
        return torch.where(g_norm > limit, limit / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))

    def stats(self) -> dict[str, torch.Tensor]:
        return {} if self._clipped_frac is None else {"clip/agc_clipped_frac": self._clipped_frac}


class SpikeSkip(DeviceState):
    """Spike skipping (`clip.skip_sigma`), beside any clip policy: skip the optimizer step when this step's raw
    norm (and/or the loss) exceeds mean + k * std of the last `window` accepted values, once `min_count` of
    them were seen. The statistics are the window's population mean and std (a single value: std 0). The
    decision uses past steps only; a skipped step (a spike, or a NaN/Inf norm) does not enter the window,
    so a spike cannot inflate the std that judges the next one. State on the device, updated masked.

    A window that only accepted steps enter cannot follow a norm that moved for good (it would skip every
    step from then on): after `max_consecutive` spikes skipped in a row, the next spike is taken (clipped by
    the policy) and enters the window, so the statistics follow a level shift at 1 step in max_consecutive+1.
    """

    STATE = ("count", "values", "run")

    def __init__(self, k: float, window: int = 128, min_count: int = 64, on: str = "norm", max_consecutive: int = 5):
        if not k > 0 or window < 1 or not 1 <= min_count <= window or on not in ("norm", "loss", "both") \
                or max_consecutive < 1:
            raise ValueError(f"bad spike-skip settings k={k} window={window} min_count={min_count} on={on} "
                             f"max_consecutive={max_consecutive}")
        self.k, self.window, self.min_count, self.on = float(k), int(window), int(min_count), on
        self.max_consecutive = int(max_consecutive)
        self.run = torch.zeros((), dtype=torch.int64)  # spikes skipped in a row
        self.count = torch.zeros((), dtype=torch.int64)
        self.values = torch.zeros((2, self.window), dtype=torch.float64)  # rows: norm, loss

    def limits(self) -> torch.Tensor:
        """mean + k * std of the window, for (norm, loss); +inf before `min_count` values."""
        n = torch.clamp(self.count, max=self.window)
        valid = torch.arange(self.window, device=self.values.device) < n
        nf = n.clamp(min=1).to(torch.float64)
        mean = torch.where(valid, self.values, 0).sum(dim=1) / nf
        var = torch.where(valid, (self.values - mean[:, None]).square(), 0).sum(dim=1) / nf
        limit = mean + self.k * var.sqrt()
        return torch.where(self.count >= self.min_count, limit, torch.full_like(limit, math.inf))

    def spike(self, raw: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool: this step is a spike (False for a NaN/Inf value: that is the non-finite skip's)."""
        limit = self.limits()
        by_norm = raw.to(limit) > limit[0]
        by_loss = loss.to(limit) > limit[1]
        spike = by_norm if self.on == "norm" else by_loss if self.on == "loss" else by_norm | by_loss
        return spike & (self.run < self.max_consecutive)

    def observe(self, raw: torch.Tensor, loss: torch.Tensor, taken: torch.Tensor,
                spike: Optional[torch.Tensor] = None) -> None:
        """Record a step: its values enter the window where `taken`; `spike` (it was skipped as one) extends
        the run of spikes, anything else ends it."""
        if spike is not None:
            self.run = torch.where(spike, self.run + 1, torch.zeros_like(self.run))
        slot = torch.remainder(self.count, self.window).reshape(1)
        old = self.values.index_select(1, slot)
        new = torch.stack([raw.to(self.values), loss.to(self.values)]).reshape(2, 1)
        self.values = self.values.index_put((torch.arange(2, device=slot.device), slot),
                                            torch.where(taken, new, old).reshape(2))
        self.count = self.count + taken.to(self.count.dtype)

    def stats(self) -> dict[str, torch.Tensor]:
        limit = self.limits()
        out = {}
        if self.on != "loss":
            out["clip/spike_limit"] = limit[0]
        if self.on != "norm":
            out["clip/spike_loss_limit"] = limit[1]
        return out


POLICIES: dict[str, Callable[[ClipConfig], ClipPolicy]] = {
    "none": lambda cfg: NoClip(),
    "fixed": lambda cfg: FixedClip(cfg.max_norm),
    "zscore": lambda cfg: ZScoreClip(cfg.max_norm, cfg.zscore_alpha, cfg.zscore_z, cfg.warmup_steps,
                                     cfg.zscore_update_with),
    "percentile": lambda cfg: PercentileClip(cfg.max_norm, cfg.percentile, cfg.window, cfg.warmup_steps),
    "agc": lambda cfg: AGC(cfg.agc_lambda, cfg.agc_eps),
}


def build_policy(cfg: ClipConfig) -> ClipPolicy:
    return POLICIES[cfg.policy](cfg)


def build_spike_skip(cfg: ClipConfig) -> Optional[SpikeSkip]:
    """The spike skip of clip.skip_sigma, or None (0: off)."""
    if not cfg.skip_sigma:
        return None
    return SpikeSkip(cfg.skip_sigma, cfg.skip_window, cfg.skip_min_steps, cfg.skip_on, cfg.skip_max_consecutive)


def clip_coefficient(raw: torch.Tensor, threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """min(1, threshold / (raw + eps)): the factor every gradient is multiplied by.

    The same formula, eps and order of operations included, as
    torch.nn.utils.clip_grad_norm_ (which evaluates `max_norm / t` as
    `t.reciprocal() * max_norm`), so our clipped gradients equal its result bit
    for bit in fp32.
    """
    return torch.clamp((raw + eps).reciprocal() * threshold, max=1.0)


def scale_grads_(grads: Iterable[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient in place by `coef` (one fused pass per device/dtype)."""
    grads = list(grads)
    if not grads:
        return
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))
