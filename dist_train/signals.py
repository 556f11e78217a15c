"""Graceful stop on SIGTERM and SIGINT.

The first signal only records a request; the training loop finishes the
optimizer step in progress, the ranks agree on where to stop
(`distributed.StopVote`), and the run ends cleanly: metrics.jsonl complete,
W&B finished and marked stopped, the plot drawn, exit code 128 + signal.
SIGTERM is what `scancel`, a time limit, a preemption and torchrun's agent
send; SIGINT is Ctrl-C. A second signal calls `on_abort`, which ends the
process at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Installs the handlers for its `with` block and restores the previous ones after it."""

    def __init__(self, on_first: Callable[[int], None], on_abort: Callable[[int], None]):
        self.on_first = on_first
        self.on_abort = on_abort
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            self.on_first(signum)
        else:
            self.on_abort(signum)

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
