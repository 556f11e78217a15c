"""Progress: a bar on an interactive terminal, plain log lines otherwise (SLURM logs).

Plain lines carry the wall-clock time, the elapsed time and an ETA, so a batch
log can be read on its own. The bar keeps its text short enough to stay a bar
at 80 columns; the plain lines carry every number.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Optional

from dist_train.config import ProgressMode


def num(v: Any, digits: int = 4) -> str:
    """A number for people: `digits` significant digits, in fixed point within [1e-3, 1e5) (1.000, 20.85,
    0.003000, 14490), in scientific notation outside it (3.000e-04); ints as they are; None (what
    metrics.jsonl writes for NaN/Inf) as 'nan'."""
    if v is None:
        return "nan"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    exponent = int(f"{v:.{digits - 1}e}".split("e")[1])  # after rounding: 9.9996 is 1.000e+01
    if -3 <= exponent < 5:
        decimals = digits - 1 - exponent
        return f"{round(v, decimals):.{max(decimals, 0)}f}"
    return f"{v:.{digits - 1}e}"


def percent(frac: Optional[float]) -> str:
    """A fraction as a whole percentage; '<1%' and '>99%' rather than a 0% or 100% that is not quite so."""
    if frac is None:
        return "nan"
    p = 100 * frac
    if 0 < p < 1:
        return "<1%"
    if 99 < p < 100:
        return ">99%"
    return f"{p:.0f}%"


def count(n: int) -> str:
    """A count with three significant digits and a unit: 950, 20.6k, 106k, 1.23M, 7.00B."""
    if n < 1000:
        return str(n)
    for scale, unit in ((1e3, "k"), (1e6, "M"), (1e9, "B"), (1e12, "T")):
        exponent = int(f"{n / scale:.2e}".split("e")[1])  # after rounding: 999999 is 1.00M, not 1000k
        if exponent < 3 or unit == "T":
            return f"{n / scale:.{max(2 - exponent, 0)}f}{unit}"
    raise AssertionError


def hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _grad_norm(record: dict[str, Any], on_bar: bool) -> str:
    """'grad_norm RAW -> CLIPPED (90% of steps clipped)': the global norm before clipping and the one the
    optimizer applied, and the share of the steps since the last line that were clipped."""
    text = f"grad_norm {num(record['grad_norm/raw'])}"
    notes = []
    if record.get("optim/spike_skipped"):
        notes.append("spike: step skipped")  # nothing was applied (grad_norm/clipped is null)
    elif record.get("optim/step_skipped"):
        notes.append("step skipped")
    elif "grad_norm/clipped" in record:
        text += f" -> {num(record['grad_norm/clipped'])}"
    if not on_bar and "grad_norm/clipped_frac" in record:
        notes.append(f"{percent(record['grad_norm/clipped_frac'])} of steps clipped")
    return f"{text} ({'; '.join(notes)})" if notes else text


#: What a progress line shows, in order: (the key it needs, how it is written).
SHOWN: list[tuple[str, Callable[[dict[str, Any], bool], str]]] = [
    ("train/loss", lambda r, bar: f"loss {num(r['train/loss'])}"),
    ("grad_norm/raw", _grad_norm),
    ("train/accuracy", lambda r, bar: f"acc {num(r['train/accuracy'])}"),
    ("eval/loss", lambda r, bar: f"eval/loss {num(r['eval/loss'])}"),
    ("eval/accuracy", lambda r, bar: f"eval/accuracy {num(r['eval/accuracy'])}"),
    ("optim/lr", lambda r, bar: f"lr {num(r['optim/lr'])}"),
    ("optim/skipped_steps", lambda r, bar: f"skipped_steps {r['optim/skipped_steps']}"),
    ("optim/spike_skipped_steps", lambda r, bar: f"spike_skipped_steps {r['optim/spike_skipped_steps']}"),
    ("perf/samples_per_sec", lambda r, bar: f"samples/s {num(r['perf/samples_per_sec'])}"),
]
#: How many of SHOWN the bar shows: the loss and the norms, which fit beside a bar at 80 columns.
ON_BAR = 2


def summary(record: dict[str, Any], on_bar: bool = False) -> str:
    """The numbers of a log record for a progress line (on the bar: the loss and the norms only)."""
    shown = SHOWN[:ON_BAR] if on_bar else SHOWN
    return " ".join(write(record, on_bar) for key, write in shown if key in record)


#: The reporters whose bar is on a terminal now (`say` writes above them).
_OPEN_BARS: list["ProgressReporter"] = []


def say(text: str, stream=None) -> None:
    """A line for people on `stream` (default: sys.stderr now), on a line of its own: while a progress bar is
    showing there, the bar is cleared, the line written, and the bar drawn again below it."""
    stream = stream if stream is not None else sys.stderr
    for reporter in _OPEN_BARS:
        if reporter.stream is stream and reporter.bar is not None:
            reporter.bar.write(text, file=stream)
            stream.flush()
            return
    print(text, file=stream, flush=True)


class ProgressReporter:
    def __init__(self, mode: ProgressMode, total: int, enabled: bool = True, stream=None, start: int = 0):
        self.stream = stream or sys.stderr
        self.total = total
        self.start = start  # steps done before this process (a resumed run)
        self.enabled = enabled
        self.t0 = time.monotonic()
        use_bar = mode == ProgressMode.bar or (mode == ProgressMode.auto and self.stream.isatty())
        self.bar: Optional[Any] = None
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, file=self.stream, dynamic_ncols=True, unit="step",
                bar_format="{n_fmt}/{total_fmt} {bar} {elapsed}<{remaining}{postfix}",
            )
            _OPEN_BARS.append(self)

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
                self.bar.set_postfix_str(summary(record, on_bar=True), refresh=False)
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
        say(text, self.stream)

    def close(self) -> None:
        if self.bar is not None:
            _OPEN_BARS.remove(self)
            self.bar.close()
            self.bar = None
