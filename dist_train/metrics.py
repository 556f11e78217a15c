"""Metric records: one dict per logged optimizer step, written to JSONL and W&B.

Every key has one documented meaning (README, "Metric glossary"). Records are
built on rank 0 only, from values already reduced across ranks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch

from dist_train.errors import UsageError, io_error, writing
from dist_train.step import StepMetrics

log = logging.getLogger("dist_train")


class Window:
    """Accumulates per-step facts between two log lines, on the device (no host sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self, t0: Optional[float] = None) -> None:
        """Start a new window at `t0` (perf_counter time; now by default)."""
        self.steps = 0
        self.samples = 0
        self.clipped = torch.zeros((), device=self.device)
        self.t0 = time.perf_counter() if t0 is None else t0

    def add(self, m: StepMetrics, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        taken = ~m.skipped if m.spike is None else ~m.skipped & ~m.spike
        self.clipped += (m.clip_coef < 1) & taken  # a skipped step is not a clipped one


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
    tokens_per_sample: Optional[int],
    t_end: Optional[float] = None,
    spike_skipped_total: Optional[int] = None,
) -> dict[str, Any]:
    """The log line of optimizer step `step` (1-based), its window ending at `t_end` (perf_counter time;
    now by default). The .item() calls live here."""
    elapsed = max((time.perf_counter() if t_end is None else t_end) - window.t0, 1e-9)
    rec: dict[str, Any] = {
        "step": step,
        "train/loss": _num(loss.item()),
        "grad_norm/raw": _num(m.grad_norm_raw.item()),
        "grad_norm/clipped": _num(m.grad_norm_clipped.item()),
        "grad_norm/clip_coef": _num(m.clip_coef.item()),
        "grad_norm/threshold": _num(m.threshold.item()),
        "grad_norm/clipped_frac": window.clipped.item() / max(window.steps, 1),
        "optim/lr": _num(lr),
        "optim/step_skipped": int(m.skipped),
        "optim/skipped_steps": skipped_total,
        "perf/samples_per_sec": window.samples / elapsed,
    }
    if tokens_per_sample is not None:  # token windows (task lm)
        rec["perf/tokens_per_sec"] = window.samples * tokens_per_sample / elapsed
    if spike_skipped_total is not None:  # spike skipping is on
        rec["optim/spike_skipped"] = int(bool(m.spike)) if m.spike is not None else 0
        rec["optim/spike_skipped_steps"] = spike_skipped_total
        if rec["optim/spike_skipped"]:
            rec["grad_norm/clipped"] = None  # nothing was applied
    if m.spike_clipped is not None:  # a policy whose clips are spikes (zscore)
        rec["clip/spike_clipped"] = int(bool(m.spike_clipped))
    for key, value in m.stats.items():
        rec[key] = _num(value.item())
    if m.loss_scale is not None:
        rec["amp/loss_scale"] = _num(m.loss_scale.item())
    return rec


def module_of(name: str) -> str:
    """The module a parameter belongs to: its name without the last part ('blocks.0.attn.qkv.weight' ->
    'blocks.0.attn.qkv'); a parameter of the root module is its own group."""
    return name.rpartition(".")[0] or name


def layer_norms(names: Sequence[str], param_norms: torch.Tensor) -> dict[str, Optional[float]]:
    """Each module's raw gradient norm, from the step's per-parameter norms (one host read): the root sum of
    squares of its parameters' norms, so that the root sum of squares over modules is grad_norm/raw."""
    values = param_norms.double().tolist()
    if len(values) != len(names):
        raise RuntimeError(f"{len(values)} gradient norms for {len(names)} parameter names")
    squares: dict[str, float] = {}
    for name, v in zip(names, values):
        key = module_of(name)
        squares[key] = squares.get(key, 0.0) + v * v
    return {k: _num(math.sqrt(v)) for k, v in squares.items()}


def spike_record(*, step: int, batch: int, record: dict[str, Any], m: StepMetrics,
                 layers: Optional[dict[str, Optional[float]]], top_k: int, samples: list[int]) -> dict[str, Any]:
    """The spikes.jsonl line of a spike: what was decided, the layers that carried it, and the samples of its
    global batch (indices into the data set) so they can be found and left out (data.skip_steps=[batch])."""
    skipped = bool(m.spike) if m.spike is not None else False
    top = None
    if layers is not None:
        finite = [(k, v) for k, v in layers.items() if v is not None]
        top = [{"module": k, "grad_norm": v} for k, v in sorted(finite, key=lambda kv: -kv[1])[:top_k]]
    line = {
        "step": step,
        "batch": batch,
        "action": "skipped" if skipped else "clipped",
        "grad_norm/raw": record["grad_norm/raw"],
        "train/loss": record["train/loss"],
        "grad_norm/threshold": record["grad_norm/threshold"],
        "clip/spike_limit": record.get("clip/spike_limit"),
        "clip/spike_loss_limit": record.get("clip/spike_loss_limit"),
        "top_layers": top,
        "samples": samples,
    }
    return line


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self, exit_code: int = 0) -> None: ...


#: The key of the first row a resumed run writes to metrics.jsonl: the step it resumed from (the checkpoint's).
#: The rows themselves continue without a gap or a repeat, so nothing else shows the resume. Only metrics.jsonl
#: (METRICS) carries it: the other files' readers take every key but "step" as data (per_layer.jsonl's modules).
RESUMED_FROM = "run/resumed_from"
METRICS = "metrics.jsonl"


class JsonlSink:
    """`metrics.jsonl`: one JSON object per logged step, each line written whole.

    A line goes out in one write() of the complete line. If the write fails or
    comes up short (a full disk), the file is cut back to its last complete line
    and the error names the file: the file never holds a partial line.
    """

    def __init__(self, path: Path, keep_through: Optional[int] = None):
        """A new file; or, with `keep_through=k` (a resumed run), the existing file cut back to its rows of
        steps <= k (rewritten atomically, the kept lines byte for byte), then appended to; in metrics.jsonl
        the first row written after that carries RESUMED_FROM: k (k = 0: a run that found no checkpoint, not
        a resume)."""
        self.path = path
        self.rows = 0
        self._size = 0
        self._resumed_from = (keep_through or None) if path.name == METRICS else None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if keep_through is not None and path.exists():
            from dist_train.rundir import atomic_path

            read_jsonl(path)  # a file that is not a metrics.jsonl is an error, not something to cut
            kept = []
            for line in path.read_bytes().split(b"\n"):
                try:
                    step = json.loads(line)["step"] if line.strip() else None
                except ValueError:
                    continue  # the incomplete last line read_jsonl warned about
                if step is not None and step <= keep_through:
                    kept.append(line + b"\n")
            data = b"".join(kept)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            self.rows, self._size = len(kept), len(data)
            flags = os.O_WRONLY | os.O_APPEND
        with writing(path):
            self._fd = os.open(path, flags, 0o644)

    def log(self, record: dict[str, Any]) -> None:
        if self._resumed_from is not None:
            record = {**record, RESUMED_FROM: self._resumed_from}
        data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {n} of {len(data)} bytes)")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise io_error(self.path, e) from e
        self._size += n
        self.rows += 1
        self._resumed_from = None

    def close(self, exit_code: int = 0) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl.

    A last line without its newline (a writer killed mid-line) is skipped with a
    warning; any other line that is not a record is a one-line UsageError.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read '{path}': {e.strerror or e}") from None
    lines = data.split(b"\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if i == len(lines):  # no newline after it: cut off mid-write
                log.warning("'%s' ends in an incomplete line (line %d); it was skipped", path, i)
                continue
            raise UsageError(f"'{path}' line {i} is not valid JSON; is this a metrics.jsonl written by dist-train?") \
                from None
        if not isinstance(obj, dict) or type(obj.get("step")) is not int:
            raise UsageError(f"'{path}' line {i} is not a metrics record (a JSON object with an integer 'step')")
        rows.append(obj)
    return rows
