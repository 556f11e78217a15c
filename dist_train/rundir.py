"""The run directory: checked before any setup, locked while a run uses it, never clobbered.

- `check()` finds, without writing anything, every reason the run could not
  use the directory: a path that is a file or lies under one, one that cannot be
  created or written, names too long, a run still in progress there (the lock),
  an earlier run (unless `run.overwrite`), and, with `run.overwrite`, files
  dist_train did not write.
- `open()` creates the directory and takes an OS file lock on it (`flock`; the
  kernel releases it when the process ends, however it ends, so a crash never
  leaves it locked). Only then does `run.overwrite` remove the earlier run's
  files, and only the files dist_train writes.
- `finish()` releases the lock; a run that failed before logging a single row
  first removes everything it wrote, so a plain rerun is not blocked by a stub.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import fnmatch
import functools
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from dist_train.errors import UsageError, io_error, writing

#: Files dist_train writes at the top of a run directory.
RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "plot.png", "vocab.json", "spikes.jsonl", "per_layer.jsonl",
             "per_layer.png")
LOCK = ".dist_train.lock"
WANDB = "wandb"
#: What wandb writes under <run dir>/wandb: one folder per run, and links/logs beside them.
WANDB_ENTRIES = ("offline-run-*", "run-*", "latest-run", "debug*.log")
#: Room for the longest name written below the run directory (W&B's run folder and logs).
LONGEST_INSIDE = 120


def _is_ours(name: str) -> bool:
    return name in RUN_FILES or name in (LOCK, WANDB) or name.startswith(".tmp-")


def _foreign(path: Path) -> list[str]:
    """Entries of a run directory that dist_train (or wandb, under wandb/) did not write."""
    out = [p.name for p in sorted(path.iterdir()) if not _is_ours(p.name)]
    wandb_dir = path / WANDB
    if wandb_dir.is_dir() and not wandb_dir.is_symlink():
        out += [
            f"{WANDB}/{p.name}"
            for p in sorted(wandb_dir.iterdir())
            if not any(fnmatch.fnmatch(p.name, pat) for pat in WANDB_ENTRIES)
        ]
    elif wandb_dir.exists() or wandb_dir.is_symlink():
        out.append(WANDB)  # a file or a link named wandb is not ours
    return out


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._created: Optional[Path] = None  # the topmost directory this run created
        self._written: list[str] = []

    # ---- before anything is written ------------------------------------------------------
    def check(self, overwrite: bool, resume: bool = False) -> None:
        """Raise a one-line UsageError if this run cannot use the directory. Writes nothing.
        `resume`: the run continues the one in the directory, which is then expected, not refused."""
        self._check_path()
        if self.path.is_dir():
            self._check_contents(overwrite, locked_by_us=False, resume=resume)

    def _check_path(self) -> None:
        p, key = self.path, f"run.out_dir '{self.path}'"
        # Lengths first: a name over the limit makes even exists() fail.
        try:
            name_max = os.pathconf(p.anchor or ".", "PC_NAME_MAX")
            path_max = os.pathconf(p.anchor or ".", "PC_PATH_MAX")
        except (OSError, ValueError):
            name_max, path_max = 255, 4096
        for part in p.parts:
            if len(os.fsencode(part)) > name_max:
                raise UsageError(f"run.out_dir has a name of {len(part)} characters, longer than this file "
                                 f"system's limit of {name_max}; choose a shorter run.out_dir")
        if len(os.fsencode(str(p.absolute()))) + LONGEST_INSIDE > path_max:
            raise UsageError(f"run.out_dir is too long ({len(str(p.absolute()))} characters; the files inside "
                             f"must stay under {path_max}); choose a shorter run.out_dir")
        if p.exists() and not p.is_dir():
            raise UsageError(f"{key} is an existing file, not a directory; choose another run.out_dir")
        existing = p
        while not existing.exists():
            if existing.is_symlink():
                raise UsageError(f"{key}: '{existing}' is a broken symbolic link; choose another run.out_dir")
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"{key} lies under '{existing}', which is a file; choose another run.out_dir")
        # A real probe, removed at once: as root, os.access says yes to read-only file systems.
        try:
            if p.is_dir():
                fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=p)
                os.close(fd)
                os.unlink(probe)
            else:
                os.rmdir(tempfile.mkdtemp(prefix=".tmp-probe-", dir=existing))
        except OSError as e:
            raise UsageError(f"{key} cannot be created: writing a test entry in '{existing}' failed "
                             f"({e.strerror or e}); choose a directory you can write to") from None

    def _check_contents(self, overwrite: bool, locked_by_us: bool, resume: bool = False) -> None:
        p = self.path
        lock_path = p / LOCK
        if not locked_by_us and lock_path.is_file():
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except OSError:
                fd = None
            if fd is not None:
                try:
                    free = _try_lock(fd)
                finally:
                    os.close(fd)  # closing releases our probe lock, if we got it
                if not free:
                    raise UsageError(f"run directory '{p}' is in use by a run in progress{_holder(lock_path)}; "
                                     "wait for it to end or choose another run.out_dir (run.overwrite does not "
                                     "apply to a live run)")
        existing = [name for name in (*RUN_FILES, WANDB) if (p / name).exists() or (p / name).is_symlink()]
        if existing and not overwrite and not resume:
            raise UsageError(f"run directory '{p}' already holds a run ({', '.join(existing)}); continue it with "
                             "train.resume=auto, or choose another run.out_dir, or start over with run.overwrite=true "
                             "(which deletes it)")
        if overwrite:
            foreign = _foreign(p)
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UsageError(f"run.overwrite=true: run directory '{p}' holds files dist_train did not write "
                                 f"({shown}); move them away or choose another run.out_dir")

    # ---- the run's lifetime ------------------------------------------------------------------
    def open(self, overwrite: bool, resume: bool = False) -> None:
        """Create and lock the directory; with run.overwrite, remove the earlier run's files; with `resume`,
        keep them (the run continues there)."""
        self.check(overwrite, resume)
        top = self.path
        while not top.parent.exists():
            top = top.parent
        with writing(self.path):
            if not self.path.exists():
                self._created = top
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise UsageError(f"run directory '{self.path}' is in use by a run in progress"
                             f"{_holder(self.path / LOCK)}; wait for it to end or choose another run.out_dir")
        self._lock_fd = fd
        try:
            # Checked again under the lock: another run may have started in between.
            self._check_contents(overwrite, locked_by_us=True, resume=resume)
            started = datetime.datetime.now().isoformat(timespec="seconds")
            with writing(self.path / LOCK):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
            if not resume:
                for name in (*RUN_FILES, WANDB):
                    self._remove(self.path / name)
        except BaseException:
            self.finish(discard=True)
            raise

    def write_text(self, name: str, text: str) -> Path:
        """Write a file of the run atomically (a temporary file, then a rename)."""
        target = self.path / name
        existed = target.exists()
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
        if not existed:  # a resumed run's own files are not removed if it fails
            self.wrote(name)
        return target

    def wrote(self, name: str) -> None:
        """Record that this run created `name` (removed again if the run fails before logging)."""
        if name not in self._written:
            self._written.append(name)

    def finish(self, discard: bool) -> None:
        """Release the lock; with `discard`, first remove everything this run wrote (and nothing else)."""
        if discard:
            for name in self._written:
                with contextlib.suppress(OSError):
                    self._remove(self.path / name)
            if self._created is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / LOCK)
                d = self.path
                while True:  # the directories this run created, if nothing else lives there
                    with contextlib.suppress(OSError):
                        d.rmdir()
                    if d == self._created or d == d.parent:
                        break
                    d = d.parent
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    @staticmethod
    def _remove(p: Path) -> None:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """A temporary path beside `target` (named `prefix` + random characters + `target`'s suffix), renamed
    onto it on success and removed on failure.

    An OSError (a full disk) becomes a one-line TrainingError naming `target`;
    no partial or temporary file is left behind either way, unless the process is killed before the
    rename: a caller whose folder a later start cleans gives a `prefix` of its own for that cleanup to find.
    """
    tmp: Optional[Path] = None
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
        tmp = Path(name)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the run's files from other users
        os.close(fd)
        yield tmp
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise io_error(target, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


class _Recording:
    """A file wrapper that remembers the OSError of a failed write.

    torch.save reports a failed write (a full disk) as a RuntimeError about a
    zip-file position; this keeps the real cause so it can be reported.
    """

    def __init__(self, f):
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: object, target: Path) -> None:
    """torch.save through atomic_path: whole or absent, and a full disk reported as such."""
    import torch

    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        out = _Recording(f)
        try:
            torch.save(obj, out)
        except RuntimeError as e:
            if out.error is None:
                raise
            raise out.error from e
