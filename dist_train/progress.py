"""Progress: a bar on an interactive terminal, plain log lines otherwise (SLURM logs)."""

from __future__ import annotations

import sys
from typing import Any, Optional

from dist_train.config import Progress


def _fmt(v: Any) -> str:
    if v is None:
        return "nan"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


SHOWN = [
    ("train/loss", "loss"),
    ("grad_norm/raw", "raw"),
    ("grad_norm/clipped", "clipped"),
    ("grad_norm/clipped_frac", "clipped_frac"),
    ("optim/lr", "lr"),
    ("optim/skipped_steps", "skipped"),
    ("perf/samples_per_sec", "samples/s"),
]


def summary(record: dict[str, Any]) -> str:
    return " ".join(f"{short} {_fmt(record[key])}" for key, short in SHOWN if key in record)


class ProgressReporter:
    def __init__(self, mode: Progress, total: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = enabled
        use_bar = mode == Progress.bar or (mode == Progress.auto and self.stream.isatty())
        self.bar: Optional[Any] = None
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, dynamic_ncols=True, unit="step")

    def step(self, record: Optional[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if record is not None:
                self.bar.set_postfix_str(summary(record), refresh=False)
        elif record is not None:
            print(f"step {record['step']}/{self.total} {summary(record)}", file=self.stream, flush=True)

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
