"""`dist-train prepare`: UTF-8 text (a file, or a folder of files) to a token file for data.token_file.

Character-level, with text_dataset's vocabulary rule (the distinct characters,
sorted by code point, line ends translated as text-mode open() does), so the
ids of a file are exactly the ones data.text_file would train on. The text is
streamed in chunks, twice: once for the vocabulary and the length, once to
write the ids; memory stays at a few chunks whatever the input's size.

Output: OUT (raw little-endian ids, uint16 when the vocabulary has at most
65536 characters, else uint32: nanoGPT's format) and its sidecar OUT with the
suffix .json ({"dtype", "vocab_size", "num_tokens", "vocab"}: vocab[i] is the
character of id i). Both are written to temporary files beside OUT and renamed
into place at the end (SIGINT and SIGTERM held back between the two renames),
so an error or Ctrl-C leaves nothing behind; existing output is replaced only
with overwrite=True.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dist_train.data import CHUNK_BYTES, _code_points, _decoded_chunks, char_counts, id_lookup, sidecar, sidecar_path
from dist_train.errors import UsageError
from dist_train.progress import hms
from dist_train.rundir import atomic_path

#: Files of a folder named on the plain progress lines and in the report before the rest are counted.
LISTED_FILES = 10
#: Seconds between plain progress lines (a bar on a terminal updates continuously).
PLAIN_EVERY_S = 5.0


@dataclass(frozen=True)
class Prepared:
    files: list[Path]
    out: Path
    sidecar: Path
    num_tokens: int
    vocab_size: int
    dtype: str


def input_files(source: Path, pattern: str = "*") -> list[Path]:
    """`source` itself, or every file under the folder `source` whose name matches `pattern`.

    Recursively, in sorted order of the path below `source` (the order their
    texts are concatenated in); names starting with '.' (hidden files and
    folders, such as .git) are skipped, and so are symbolic links to folders.
    """
    if not source.exists():
        raise UsageError(f"prepare: input '{source}' not found")
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise UsageError(f"prepare: input '{source}' is neither a file nor a folder (a FIFO or device?)")
    files = []
    for folder, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(folder, name)
            if not name.startswith(".") and fnmatch.fnmatch(name, pattern) and p.is_file():
                files.append(p)
    if not files:
        raise UsageError(f"prepare: folder '{source}' holds no file matching '{pattern}' (names starting with '.' are "
                         "skipped)")
    files.sort(key=lambda p: p.relative_to(source).parts)
    return files


def _check_output(source: Path, out: Path, overwrite: bool) -> Path:
    """The sidecar's path, once OUT is known to be writable without harm; UsageError otherwise."""
    side = sidecar_path(out)
    if side == out:
        raise UsageError(f"prepare: output '{out}' ends in .json, the name of its own sidecar; choose e.g. "
                         f"'{out.with_suffix('.bin')}'")
    if not out.parent.is_dir():
        raise UsageError(f"prepare: the folder of the output '{out}' does not exist; create it first")
    src, dst = source.resolve(), out.resolve()
    if dst == src or (source.is_dir() and src in dst.parents):
        raise UsageError(f"prepare: output '{out}' would be {'the input' if dst == src else 'inside the input folder'} "
                         f"'{source}'; write it elsewhere")
    for p in (out, side):
        if p.is_dir():
            raise UsageError(f"prepare: output '{p}' is a folder")
        if p.exists() and not overwrite:
            raise UsageError(f"prepare: '{p}' exists; pass --overwrite to replace '{out}' and '{side}'")
    return side


class ByteProgress:
    """One pass over the text, `phase` (e.g. "1/2 vocabulary"): bytes read out of the text's size, from 0 to
    100%; a bar of its own on a terminal, else a plain line every PLAIN_EVERY_S seconds and at the end."""

    def __init__(self, total: int, phase: str, stream=None):
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        self.done = 0
        self.t0 = self.last = time.monotonic()
        self.phase = phase
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=phase, file=self.stream, unit="B", unit_scale=True, dynamic_ncols=True)

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= PLAIN_EVERY_S:
            self.line()

    def line(self) -> None:
        if self.bar is not None:
            return
        now = time.monotonic()
        self.last = now
        elapsed = now - self.t0
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        print(f"{time.strftime('%H:%M:%S')} prepare: {self.phase}: {_size(self.done)} of {_size(self.total)} read "
              f"({100 * self.done / self.total:.0f}%) [{hms(elapsed)} elapsed, "
              f"{hms(left) if left == left else '?'} left]", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is left (then arrive): the renames happen both or neither."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def prepare(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, pattern: str = "*",
            chunk_bytes: int = CHUNK_BYTES, say: Callable[[str], None] = lambda s: None,
            stream=None) -> Prepared:
    """Write the character-level token file OUT and its sidecar from `source` (see the module docstring).

    `say` gets the lines for people (which files are taken); progress goes to
    `stream` (default stderr). Raises UsageError for bad input, before anything
    is written or, for text that is not UTF-8, with nothing left behind.
    """
    source, out = Path(source), Path(out)
    files = input_files(source, pattern)
    side = _check_output(source, out, overwrite)
    for p in files:
        if not os.access(p, os.R_OK):
            raise UsageError(f"prepare: input file '{p}' is not readable; check its permissions")
    total = sum(p.stat().st_size for p in files)
    if total == 0:  # any byte is text (or not UTF-8): no bytes, no text
        raise UsageError(f"prepare: input '{source}' holds no text")
    if source.is_dir():
        shown = ", ".join(str(p.relative_to(source)) for p in files[:LISTED_FILES])
        more = f", and {len(files) - LISTED_FILES} more" if len(files) > LISTED_FILES else ""
        say(f"dist-train: prepare: {len(files)} file{'s' if len(files) != 1 else ''} under '{source}' matching '{pattern}', in this order: "
            f"{shown}{more}")
    with ByteProgress(total, "1/2 vocabulary", stream) as progress:
        counts = char_counts(files, chunk_bytes, "prepare: input file", progress)
        progress.line()
    num_tokens = int(counts.sum())
    vocab = counts.nonzero().squeeze(1)
    dtype = "uint16" if vocab.numel() <= 2**16 else "uint32"
    lookup = id_lookup(vocab, torch.int32)
    with ByteProgress(total, "2/2 ids", stream) as progress:
        held = contextlib.ExitStack()
        with held, atomic_path(out) as tmp_out:
            with atomic_path(side) as tmp_side:
                written = _write_ids(files, tmp_out, lookup, np.dtype(dtype).newbyteorder("<"), chunk_bytes, progress)
                progress.line()
                if written != num_tokens:
                    raise UsageError(f"prepare: the input changed while it was read ({num_tokens} characters, then "
                                     f"{written}); run prepare again")
                itos = [chr(c) for c in vocab.tolist()]
                with open(tmp_side, "w", encoding="utf-8") as f:
                    json.dump(sidecar(dtype, itos, len(itos), num_tokens), f, ensure_ascii=False)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                held.enter_context(_signals_held())  # left after both renames: the sidecar's, then the ids'
    return Prepared(files, out, side, num_tokens, len(itos), dtype)


def _write_ids(files: list[Path], target: Path, lookup: torch.Tensor, dtype: np.dtype, chunk_bytes: int,
               progress: Callable[[int], None]) -> int:
    """Write the ids of the files' characters to `target`, chunk by chunk; the number of ids written."""
    written = 0
    with open(target, "wb") as f:
        for path in files:
            for text in _decoded_chunks(path, chunk_bytes, "prepare: input file", progress):
                ids = torch.index_select(lookup, 0, _code_points(text)).numpy().astype(dtype)
                f.write(memoryview(ids))
                written += ids.size
        f.flush()
        os.fsync(f.fileno())
    return written
