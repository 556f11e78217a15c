"""Errors meant for people: one line, saying what is wrong and what to do.

Errors are classified where they arise (bad input, a failed run, a stop by
signal) and reported in one place, the CLI (`dist_train.cli.main`), which
prints the line and returns the exit code. Nothing below the CLI prints an
error or exits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from typing import Iterator, Optional


class DistTrainError(Exception):
    """Base of the errors the CLI reports as one line."""

    exit_code = 1
    label = "error"
    #: Which ranks print it: "every" rank, each "node" once (local rank 0; for
    #: errors every rank finds alike, such as a bad config), or only the "main" rank
    #: (errors rank 0 found and shared with the others).
    scope = "every"


class UsageError(DistTrainError):
    """Bad input: arguments, config, files, model factory, launcher environment. Exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is unknown, of the wrong type, or has an invalid value."""

    scope = "node"


class TrainingError(DistTrainError):
    """The run cannot continue (non-finite norms, an I/O error, a lost rank). Exit 1."""

    exit_code = 1


class Stopped(DistTrainError):
    """The run stopped early on a signal, after a complete optimizer step. Exit 128 + signal."""

    label = "stopped"
    scope = "main"  # every rank stops at the same step; rank 0 says so

    def __init__(self, message: str, signum: int, checkpoint: Optional[os.PathLike] = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.checkpoint = checkpoint  # written on the way out, if any


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (messages here are one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def describe(e: BaseException) -> str:
    """'TypeName: first line of the message', for errors from code we do not own."""
    return f"{type(e).__name__}: {first_line(e)}"


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM, Python's MemoryError, or the CPU allocator's failure (a RuntimeError)."""
    return (
        isinstance(e, MemoryError)
        or type(e).__name__ == "OutOfMemoryError"
        or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))
    )


def io_error(path: str | os.PathLike, exc: OSError) -> TrainingError:
    """One line for an OSError on `path`, with a hint for the common causes."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {
        errno.ENOSPC: "; free space on that file system or choose another run.out_dir",
        errno.EDQUOT: "; the disk quota is exhausted",
        errno.EROFS: "; the file system is read-only",
        errno.EACCES: "; check the permissions",
    }.get(exc.errno, "")
    return TrainingError(f"could not write '{path}': {reason}{hint}")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError while writing `path` into a one-line TrainingError naming it."""
    try:
        yield
    except OSError as e:
        raise io_error(path, e) from e
