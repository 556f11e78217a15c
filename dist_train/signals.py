"""Graceful stop on SIGTERM, SIGINT and a closed output; checkpoint and requeue on SIGUSR2 (and SIGUSR1).

The first signal only records a request; the training loop finishes the
optimizer step in progress, the ranks agree on where to stop
(`distributed.StopVote`), and the run ends cleanly: metrics.jsonl complete,
W&B finished and marked stopped, the plot drawn, exit code 128 + signal.
SIGTERM is what `scancel`, a time limit, a preemption and torchrun's agent
send; SIGINT is Ctrl-C. When the reader of the output goes away
(`dist-train train ... | head -3`) the CLI silences that stream and the run
stops as on SIGTERM, quietly, as SIGPIPE (exit 141). A second signal calls `on_abort`, which ends the
process at once; the same signal again within `duplicate_s` seconds does not:
in a Slurm job step a signal reaches every process, and torchrun's agent
forwards its copy to the workers as well.

SIGUSR2 (the signal the slurm/ scripts ask for before the time limit or a
preemption; SIGUSR1 does the same) stops the run the same way, and after its
checkpoint is written the job is requeued (`scontrol requeue`, by rank 0); the
requeued job resumes from that checkpoint (train.resume=auto). Outside Slurm
it is a plain stop.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

#: A repeat of the first signal within this many seconds is the same request delivered twice, not an abort:
#: short where nothing duplicates signals (a second Ctrl-C aborts), longer in a Slurm job step, where Slurm
#: signals every process and torchrun's agent forwards its own copy a moment later.
DUPLICATE_S = 0.1
DUPLICATE_S_SLURM = 2.0
#: Signals that ask for a checkpoint and a requeue of the Slurm job.
REQUEUE_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1)
#: What a write to an output whose reader has gone is reported as (`dist-train train ... | head`): a stop like
#: SIGTERM, never an abort. No handler is installed for it: Python ignores SIGPIPE, so that a broken socket
#: (W&B's service gone) is an error where it happens, not a stop; the CLI's guarded stdout and stderr call
#: `reader_gone()` instead.
READER_GONE = signal.SIGPIPE
SIGNALS = (signal.SIGTERM, signal.SIGINT, *REQUEUE_SIGNALS)


class StopSignal:
    """Installs the handlers for its `with` block and restores the previous ones after it."""

    def __init__(self, on_first: Callable[[int], None], on_abort: Callable[[int], None],
                 duplicate_s: float = DUPLICATE_S):
        self.on_first = on_first
        self.on_abort = on_abort
        self.duplicate_s = duplicate_s
        self.signum: Optional[int] = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def requeue(self) -> bool:
        return self.signum in REQUEUE_SIGNALS

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum = signum
            self._at = now
            self.on_first(signum)
        elif signum == self.signum and now - self._at < self.duplicate_s:
            pass  # the same signal delivered twice (by Slurm to every process, and by torchrun's agent)
        elif signum == READER_GONE:
            pass  # the output's reader is gone: there is nobody to abort for
        else:
            self.on_abort(signum)

    #: The StopSignal whose `with` block is running (the one reader_gone() asks to stop).
    current: Optional["StopSignal"] = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        self._outer, StopSignal.current = StopSignal.current, self
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        StopSignal.current = self._outer


def reader_gone() -> None:
    """The reader of stdout or stderr went away: stop the run in progress as on a stop signal (SIGPIPE)."""
    if StopSignal.current is not None:
        StopSignal.current._handle(READER_GONE, None)
