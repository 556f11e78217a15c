"""Data: the synthetic task, character-level text, and world-size-invariant batching.

Batches are addressed by optimizer step: step s of epoch e takes a contiguous
slice of one permutation of the data set (seeded by seed + e). Every rank takes
its own contiguous share of that global batch and splits it into micro-batches.
So the global batch of step s is the same set of samples, in the same order,
whatever the number of ranks or micro-batches: a 1-process and an N-process run
see identical data, and the epoch can never be forgotten (it follows from s).
"""

from __future__ import annotations

import codecs
import functools
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_train.config import DataConfig
from dist_train.errors import UsageError


class TokenDataset:
    """Windows of block_size + 1 tokens over a 1-D token stream; window i starts at i * stride.

    Window i gives (x, y) = (w[:-1], w[1:]). The stream may be stored in a narrow
    integer type (a large text file as int16); `get` widens only the gathered batch
    to int64, which is what the embedding and the loss take.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int, vocab_size: int,
                 itos: list[str] | None = None):
        self.tokens = tokens
        self.stride = stride
        self.vocab_size = vocab_size
        self.itos = itos
        self._offsets = torch.arange(block_size + 1)
        self._len = (tokens.numel() - block_size - 1) // stride + 1

    def __len__(self) -> int:
        return self._len

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.as_tensor(indices) * self.stride
        w = self.tokens[starts.unsqueeze(1) + self._offsets].long()
        return w[:, :-1], w[:, 1:]


def synthetic_dataset(num_samples: int, vocab_size: int, block_size: int, seed: int) -> TokenDataset:
    """Arithmetic progressions modulo vocab_size: x[t+1] = (x[t] + d) mod V.

    Each sequence has its own start and stride d in 1..4, so after its first two
    tokens every next token is determined: the loss falls from log(V) towards
    about 2 * log(V) / block_size once the model infers d in context, which a
    two-layer transformer does within a few hundred steps on a laptop CPU.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    start = torch.randint(0, vocab_size, (num_samples, 1), generator=g)
    stride = torch.randint(1, 5, (num_samples, 1), generator=g)
    t = torch.arange(block_size + 1).unsqueeze(0)
    samples = (start + stride * t) % vocab_size
    # Independent sequences laid end to end: window i is exactly row i.
    return TokenDataset(samples.reshape(-1), block_size, block_size + 1, vocab_size)


# Bytes read per chunk. The per-chunk temporaries (the bytes, the decoded str, its
# 4-bytes-per-character copy) are a few times this, on top of the 2 or 4 bytes per
# character of the token stream. Chunks of 256 KiB keep them small and in cache:
# measured on a 20 MB file, 4 MiB chunks took twice the peak memory and were slower.
CHUNK_BYTES = 256 << 10

_NUM_CODE_POINTS = 0x110000


def text_dataset(path: str | Path, block_size: int, *, chunk_bytes: int = CHUNK_BYTES) -> TokenDataset:
    """Character-level samples: consecutive, non-overlapping windows of the file.

    The vocabulary is the file's distinct characters sorted by code point; line ends
    are read as text-mode open() reads them (CRLF and CR become LF). The file is read
    twice, chunk by chunk: once to check it is UTF-8 and collect the
    vocabulary and length, once to fill a preallocated token stream (int16 when the
    vocabulary allows). Characters become code points through str.encode, and code
    points become ids through a lookup table, so no Python code runs per character.
    """
    counts = torch.zeros(_NUM_CODE_POINTS, dtype=torch.long)
    for text in _decoded_chunks(path, chunk_bytes):
        c = torch.bincount(_code_points(text))  # as long as the chunk's largest code point
        counts[: c.numel()] += c
    num_chars = int(counts.sum())
    if num_chars < block_size + 1:
        raise UsageError(
            f"data.text_file '{path}' has {num_chars} characters, fewer than model.block_size+1={block_size + 1}"
        )
    vocab = counts.nonzero().squeeze(1)  # ascending code points
    dtype = torch.int16 if vocab.numel() <= 2**15 else torch.int32
    lookup = torch.zeros(_NUM_CODE_POINTS, dtype=dtype)
    lookup[vocab] = torch.arange(vocab.numel(), dtype=dtype)
    tokens = torch.empty(num_chars, dtype=dtype)
    pos = 0
    for text in _decoded_chunks(path, chunk_bytes):
        cps = _code_points(text)
        torch.index_select(lookup, 0, cps, out=tokens[pos : pos + cps.numel()])
        pos += cps.numel()
    return TokenDataset(tokens, block_size, block_size, vocab.numel(), [chr(c) for c in vocab.tolist()])


def _decoded_chunks(path: str | Path, chunk_bytes: int) -> Iterator[str]:
    """The file's text, chunk by chunk, with newlines translated as text-mode open() does.

    A character split across two chunks comes out whole: the incremental decoder
    holds its leading bytes back until the rest arrives, and a trailing CR until it
    knows whether LF follows. Raises UsageError at the first byte that is not UTF-8.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset = 0  # bytes of the file before this chunk
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            pending = len(utf8.getstate()[0])  # bytes held back from the previous chunk
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                # e.start counts from the first held-back byte, not from the chunk.
                where = offset - pending + e.start
                raise UsageError(f"data.text_file '{path}' is not UTF-8 text ({e.reason} at byte {where})") from None
            if text:
                yield text
            if not raw:
                return
            offset += len(raw)


def _code_points(text: str) -> torch.Tensor:
    """The code points of `text` as an int32 tensor sharing memory with one encoded copy."""
    with warnings.catch_warnings():
        # The bytes object is read-only but so is our use of the tensor; copying it
        # to a bytearray just to silence the warning would cost another 4 bytes/char.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(text.encode("utf-32-le"), dtype=torch.int32)


def build_dataset(cfg: DataConfig, block_size: int, seed: int) -> TokenDataset:
    if cfg.text_file is not None:
        return text_dataset(cfg.text_file, block_size)
    return synthetic_dataset(cfg.num_samples, cfg.vocab_size, block_size, seed)


@dataclass(frozen=True)
class GlobalBatches:
    """Which samples make up the global batch of each optimizer step."""

    num_samples: int
    global_batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch_size:
            raise UsageError(
                f"the data set has {self.num_samples} samples, fewer than train.global_batch_size="
                f"{self.global_batch_size}; use a larger data set or a smaller batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial batch is dropped

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of the global batch of `step` (0-based), in order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = _permutation(self.num_samples, self.seed + epoch)
        return perm[k * self.global_batch_size : (k + 1) * self.global_batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_for_rank(indices: torch.Tensor, rank: int, world_size: int, grad_accum_steps: int) -> list[torch.Tensor]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    g = indices.numel()
    if g % (world_size * grad_accum_steps):
        raise ValueError(f"global batch {g} not divisible by world_size*grad_accum_steps={world_size * grad_accum_steps}")
    local = g // world_size
    mine = indices[rank * local : (rank + 1) * local]
    return list(mine.split(local // grad_accum_steps))
