"""Metric records: one dict per logged optimizer step, written to JSONL and W&B.

Every key has one documented meaning (README, "Metric glossary"). Records are
built on rank 0 only, from values already reduced across ranks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from dist_train.step import StepMetrics


class Window:
    """Accumulates per-step facts between two log lines, on the device (no host sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.samples = 0
        self.clipped = torch.zeros((), device=self.device)
        self.t0 = time.perf_counter()

    def add(self, m: StepMetrics, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        if not m.skipped:
            self.clipped += m.clip_coef < 1


def _num(x: Any) -> Optional[float]:
    """A JSON number, or None for NaN/Inf (strict JSON has neither)."""
    v = float(x)
    return v if math.isfinite(v) else None


def make_record(
    *,
    step: int,
    loss: torch.Tensor,
    m: StepMetrics,
    window: Window,
    lr: float,
    skipped_total: int,
    tokens_per_sample: int,
) -> dict[str, Any]:
    """The log line of optimizer step `step` (1-based). The .item() calls live here."""
    elapsed = max(time.perf_counter() - window.t0, 1e-9)
    rec: dict[str, Any] = {
        "step": step,
        "train/loss": _num(loss.item()),
        "grad_norm/raw": _num(m.grad_norm_raw.item()),
        "grad_norm/clipped": _num(m.grad_norm_clipped.item()),
        "grad_norm/clip_coef": _num(m.clip_coef.item()),
        "grad_norm/threshold": _num(m.threshold.item()),
        "grad_norm/clipped_frac": window.clipped.item() / max(window.steps, 1),
        "optim/lr": lr,
        "optim/step_skipped": int(m.skipped),
        "optim/skipped_steps": skipped_total,
        "perf/samples_per_sec": window.samples / elapsed,
        "perf/tokens_per_sec": window.samples * tokens_per_sample / elapsed,
    }
    if m.loss_scale is not None:
        rec["amp/loss_scale"] = _num(m.loss_scale.item())
    return rec


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self, failed: bool = False) -> None: ...


class JsonlSink:
    """`metrics.jsonl`: one JSON object per logged step, flushed at once."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "w", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()

    def close(self, failed: bool = False) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
