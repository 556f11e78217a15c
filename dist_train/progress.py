"""Progress: a bar on an interactive terminal, plain log lines otherwise (SLURM logs).

Plain lines carry the wall-clock time, the elapsed time and an ETA, so a batch
log can be read on its own. The bar keeps its text short enough to stay a bar
at 80 columns; the plain lines carry every number.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from dist_train.config import Progress


def _fmt(v: Any) -> str:
    if v is None:
        return "nan"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


SHOWN = [
    ("train/loss", "loss"),
    ("grad_norm/raw", "raw"),
    ("grad_norm/clipped", "clipped"),
    ("grad_norm/clipped_frac", "clipped_frac"),
    ("optim/lr", "lr"),
    ("optim/skipped_steps", "skipped"),
    ("optim/spike_skipped_steps", "spike_skips"),
    ("perf/samples_per_sec", "samples/s"),
]
#: What the bar shows: the loss and the two norms, which fit beside a bar at 80 columns.
SHOWN_ON_BAR = SHOWN[:3]


def summary(record: dict[str, Any], shown=SHOWN) -> str:
    def value(key: str) -> str:
        if key == "grad_norm/clipped" and record.get("optim/spike_skipped"):
            return "skipped"  # a skipped spike applied nothing (null in metrics.jsonl)
        return _fmt(record[key])

    return " ".join(f"{short} {value(key)}" for key, short in shown if key in record)


class ProgressReporter:
    def __init__(self, mode: Progress, total: int, enabled: bool = True, stream=None, start: int = 0):
        self.stream = stream or sys.stderr
        self.total = total
        self.start = start  # steps done before this process (a resumed run)
        self.enabled = enabled
        self.t0 = time.monotonic()
        use_bar = mode == Progress.bar or (mode == Progress.auto and self.stream.isatty())
        self.bar: Optional[Any] = None
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, file=self.stream, dynamic_ncols=True, unit="step",
                bar_format="{n_fmt}/{total_fmt} {bar} {elapsed}<{remaining}{postfix}",
            )

    def eta(self, step: int) -> float:
        elapsed = time.monotonic() - self.t0
        done = step - self.start
        return elapsed / done * (self.total - step) if done > 0 else float("nan")

    def step(self, record: Optional[dict[str, Any]], advance: bool = True) -> None:
        """One optimizer step done, with its log record if it was logged. `advance=False`: only show a
        record of an earlier step (a skipped step the host learned of one step late)."""
        if not self.enabled:
            return
        if self.bar is not None:
            if advance:
                self.bar.update(1)
            if record is not None:
                self.bar.set_postfix_str(summary(record, SHOWN_ON_BAR), refresh=False)
        elif record is not None:
            n = record["step"]
            elapsed = time.monotonic() - self.t0
            eta = self.eta(n)
            print(
                f"{time.strftime('%H:%M:%S')} step {n}/{self.total} [{hms(elapsed)} elapsed, "
                f"{hms(eta) if eta == eta else '?'} left] {summary(record)}",
                file=self.stream,
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
