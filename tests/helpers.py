"""Small models and factories the tests plug in through public APIs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from dist_train.config import ModelConfig
from dist_train.model import TinyGPT


def random_mlp_lm(vocab: int = 16, d: int = 24, seed: int = 0) -> nn.Module:
    """A tiny token model with several parameter shapes (embedding, linears, norm)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(vocab, d), nn.Linear(d, d), nn.Tanh(), nn.LayerNorm(d), nn.Linear(d, vocab))


class ScaleAt(nn.Module):
    """Wraps a model; training-mode forward calls whose index is in `calls` multiply the logits by `factor`.

    NaN plants a non-finite gradient; a large finite factor (3e4) is finite in the forward, but under
    fp16 the backward through that product overflows (a real fp16 overflow). Eval-mode calls (the
    trainer's shape probe of a factory's model) are not counted.
    """

    def __init__(self, inner: nn.Module, calls: set[int], factor: float = float("nan")):
        super().__init__()
        self.inner = inner
        self.scaled_calls = calls
        self.factor = factor
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if not self.training:
            return out
        if self.calls in self.scaled_calls:
            out = out * self.factor
        self.calls += 1
        return out


def _calls(var: str) -> set[int]:
    return {int(c) for c in os.environ.get(var, "").split(",") if c}


def nan_gpt(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory for trainer tests: NaN at the 0-based forward calls listed in NAN_CALLS."""
    return ScaleAt(TinyGPT(cfg, vocab_size), _calls("NAN_CALLS"))


def fail_on_rank1(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory: rank 1's 4th forward call raises (one rank failing mid-run)."""
    rank = int(os.environ.get("RANK", "0"))
    return RaiseAt(TinyGPT(cfg, vocab_size), at_call=3 if rank == 1 else -1)


class RaiseAt(nn.Module):
    def __init__(self, inner: nn.Module, at_call: int):
        super().__init__()
        self.inner = inner
        self.at_call = at_call
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.inner(x)
        if self.calls == self.at_call:
            raise RuntimeError("planted failure on this rank")
        self.calls += 1
        return self.inner(x)


def slow_gpt(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory: TinyGPT whose training forward takes SLOW_S seconds (time to send two signals)."""
    return SlowAt(TinyGPT(cfg, vocab_size), float(os.environ.get("SLOW_S", "0.5")))


class SlowAt(nn.Module):
    def __init__(self, inner: nn.Module, seconds: float):
        super().__init__()
        self.inner = inner
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:

            time.sleep(self.seconds)
        return self.inner(x)


def fail_at_first_step(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory: the first training forward raises (a run that fails before logging anything)."""
    return RaiseAt(TinyGPT(cfg, vocab_size), at_call=0)


def overflow_gpt(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory: an fp16 overflow at the 0-based forward calls listed in OVERFLOW_CALLS."""
    return ScaleAt(TinyGPT(cfg, vocab_size), _calls("OVERFLOW_CALLS"), factor=3e4)


def signal_gpt(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory: TinyGPT that sends STOP_SIGNAL (default SIGTERM) to its own process (or its parent) at training forward
    call STOP_AT_CALL (0-based), on rank STOP_RANK (default 0): a stop at a known step. Unset: a plain TinyGPT
    with the same parameter names, so stopped, resumed and uninterrupted runs share checkpoints."""
    import signal as S

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    at = int(os.environ.get("STOP_AT_CALL", "-1")) if rank == int(os.environ.get("STOP_RANK", "0")) else -1
    # Under a launcher, STOP_TARGET=parent signals the launcher's agent, which forwards it to every rank.
    target = os.getppid() if os.environ.get("STOP_TARGET") == "parent" else os.getpid()
    if os.environ.get("WHERE_DIR"):  # which node each rank ran on (Slurm's simulated nodes share one host)
        where = Path(os.environ["WHERE_DIR"]) / f"rank{rank}"
        where.write_text(f"{os.environ.get('SLURMD_NODENAME', '?')}\n")
    if os.environ.get("LATE_RANK") == str(rank):  # this rank reads the run directory late, when resuming
        _read_late(float(os.environ.get("LATE_S", "3")))
    model = SignalAt(TinyGPT(cfg, vocab_size), at, getattr(S, os.environ.get("STOP_SIGNAL", "SIGTERM")), target)
    model.sleep = float(os.environ.get("SLOW_S", "0"))  # seconds per training forward: time to act mid-run
    return model


def signal_net() -> nn.Module:
    """model.factory: the article's CNN (examples/seed_cnn.py) that sends SIGTERM to its own process at training
    forward call STOP_AT_CALL (0-based; unset: never): a classifier stopped at a known step."""
    import signal as S

    from examples.seed_cnn import Net

    return SignalAt(Net(), int(os.environ.get("STOP_AT_CALL", "-1")), S.SIGTERM, os.getpid())


def _read_late(seconds: float) -> None:
    """Delay this rank's look at whether run.out_dir already holds a run (train.resume=<path>): the last
    read of the run directory before rank 0 writes it. A rank that is descheduled there on a loaded
    machine does the same."""
    import time

    from dist_train import checkpoint

    holds = checkpoint._holds_a_run

    def late(out_dir: Path) -> bool:
        time.sleep(seconds)
        return holds(out_dir)

    checkpoint._holds_a_run = late


class SignalAt(nn.Module):
    def __init__(self, inner: nn.Module, at_call: int, signum: int, pid: int):
        super().__init__()
        self.inner = inner
        self.at_call = at_call
        self.signum = signum
        self.pid = pid
        self.calls = 0
        self.sleep = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.calls == self.at_call:
                os.kill(self.pid, self.signum)
            self.calls += 1
            if self.sleep:
                time.sleep(self.sleep)
        return self.inner(x)


def spike_gpt(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """model.factory: TinyGPT whose training forward multiplies the logits by SPIKE_FACTOR (default 30) when
    a row of its input is the token sequence SPIKE_TOKENS (comma-separated): a loss spike caused by one
    sample, so it follows the data (a rerun that leaves its batch out has none). Unset: a plain TinyGPT."""
    tokens = [int(t) for t in os.environ.get("SPIKE_TOKENS", "").split(",") if t]
    return SpikeOn(TinyGPT(cfg, vocab_size), tokens, float(os.environ.get("SPIKE_FACTOR", "30")))


class SpikeOn(nn.Module):
    def __init__(self, inner: nn.Module, tokens: list[int], factor: float):
        super().__init__()
        self.inner = inner
        self.tokens = torch.tensor(tokens, dtype=torch.long) if tokens else None
        self.factor = factor
        self.spiked = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training and self.tokens is not None and self.tokens.numel() == x.shape[1]:
            hit = (x == self.tokens.to(x.device)).all(dim=1).any()
            if hit:  # a host read, in a test model only
                self.spiked += 1
                out = out * self.factor
        return out


def smoothed_loss(model: nn.Module, batch) -> tuple:
    """task.loss: cross-entropy with label smoothing 0.1, and a metric of its own, top-2 accuracy."""
    x, y = batch
    logits = model(x)
    top2 = (logits.topk(2, dim=1).indices == y[:, None]).any(dim=1).float().mean()
    return torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1), {"top2": top2}
