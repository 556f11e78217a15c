"""Data: the synthetic task, character-level text, token files, and world-size-invariant batching.

Batches are addressed by optimizer step: step s of epoch e takes a contiguous
slice of one permutation of the data set (keyed by the seed and e, computed
position by position by dist_train.shuffle, so no index is stored per sample).
Every rank takes its own contiguous share of that global batch and splits it
into micro-batches. So the global batch of step s is the same set of samples,
in the same order, whatever the number of ranks or micro-batches: a 1-process
and an N-process run see identical data, and the epoch can never be forgotten
(it follows from s).

A token file (data.token_file) is memory-mapped: a step reads only the pages of
its own samples, so a corpus of any size trains in the same memory. Its format
is nanoGPT's (raw little-endian uint16 or uint32 ids, no header); its sidecar
(`tokens.bin` -> `tokens.json`) holds the dtype and the vocabulary.
"""

from __future__ import annotations

import codecs
import io
import json
import mmap
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dist_train.config import DataConfig, TokenDtype
from dist_train.files import regular_file
from dist_train.errors import ConfigError, UsageError
from dist_train.samples import Samples
from dist_train.shuffle import EpochPermutation


class TokenDataset(Samples):
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
        self.what = "the data set"
        self._offsets = torch.arange(block_size + 1)
        self._len = (tokens.numel() - block_size - 1) // stride + 1

    def __len__(self) -> int:
        return self._len

    def windows(self, indices: torch.Tensor) -> torch.Tensor:
        """The samples at `indices` as one contiguous int64 tensor of (len(indices), block_size + 1)."""
        starts = torch.as_tensor(indices) * self.stride
        return self.tokens[starts.unsqueeze(1) + self._offsets].long()

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.windows(indices)
        return w[:, :-1], w[:, 1:]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The samples at `indices`: one contiguous (len(indices), block_size + 1) tensor of token ids; the task
        cuts it into inputs and targets on the device."""
        return self.windows(indices)


class TokenFileDataset(TokenDataset):
    """TokenDataset's windows (stride block_size) over a memory-mapped token file.

    Nothing is read up front: `get` gathers its samples' ids from the mapping (the
    kernel reads those pages), widens only that batch to int64, and checks its
    largest id against the vocabulary, so an id out of range is reported with
    the file, the token and the sample, at no cost of a scan over the file.
    """

    def __init__(self, info: "TokenFile", block_size: int):
        with open(info.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # Samples are read in shuffled order, a few KB each: read-ahead around every one would
        # read (and cache) tens of times the data a step uses.
        if hasattr(mmap, "MADV_RANDOM"):
            self._map.madvise(mmap.MADV_RANDOM)
        self.tokens = np.frombuffer(self._map, dtype=np.dtype(info.dtype).newbyteorder("<"))
        self.info = info
        self.what = f"data.token_file '{info.path}'"
        self.stride = block_size
        self.vocab_size = info.vocab_size
        self.itos = info.itos
        self._offsets = np.arange(block_size + 1)
        self._len = (info.num_tokens - block_size - 1) // block_size + 1

    def windows(self, indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices).numpy().astype(np.int64, copy=False)
        w = self.tokens[(idx * self.stride)[:, None] + self._offsets]
        if w.size and int(w.max()) >= self.vocab_size:
            row, col = divmod(int(w.argmax()), w.shape[1])
            i = int(idx[row])
            raise UsageError(
                f"data.token_file '{self.info.path}': token {i * self.stride + col} (in sample {i}) is id "
                f"{int(w[row, col])}, not below the vocabulary size {self.vocab_size} ({self.info.vocab_from}); "
                "the file's ids and its vocabulary do not belong together: give the vocabulary size of the "
                "tokenizer that wrote the file"
            )
        return torch.from_numpy(w.astype(np.int64))


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
    ds = TokenDataset(samples.reshape(-1), block_size, block_size + 1, vocab_size)
    ds.what = "the synthetic task"
    return ds


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
    counts = char_counts([path], chunk_bytes, "data.text_file")
    num_chars = int(counts.sum())
    if num_chars < block_size + 1:
        raise UsageError(
            f"data.text_file '{path}' has {num_chars} characters, fewer than model.block_size+1={block_size + 1}"
        )
    vocab = counts.nonzero().squeeze(1)  # ascending code points
    dtype = torch.int16 if vocab.numel() <= 2**15 else torch.int32
    lookup = id_lookup(vocab, dtype)
    tokens = torch.empty(num_chars, dtype=dtype)
    pos = 0
    for text in _decoded_chunks(path, chunk_bytes, "data.text_file"):
        cps = _code_points(text)
        torch.index_select(lookup, 0, cps, out=tokens[pos : pos + cps.numel()])
        pos += cps.numel()
    ds = TokenDataset(tokens, block_size, block_size, vocab.numel(), [chr(c) for c in vocab.tolist()])
    ds.what = f"data.text_file '{path}'"
    return ds


def char_counts(paths: Sequence[str | Path], chunk_bytes: int, what: str,
                progress: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """How often each code point occurs in the files' text (newlines translated), one count per code point.

    Its nonzero entries, in order, are the character vocabulary: distinct characters
    sorted by code point. `progress` is called with the bytes of each chunk read.
    """
    counts = torch.zeros(_NUM_CODE_POINTS, dtype=torch.long)
    for path in paths:
        for text in _decoded_chunks(path, chunk_bytes, what, progress):
            c = torch.bincount(_code_points(text))  # as long as the chunk's largest code point
            counts[: c.numel()] += c
    return counts


def id_lookup(vocab: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A table from code point to id: the id of vocab[i] is i (vocab: ascending code points)."""
    lookup = torch.zeros(_NUM_CODE_POINTS, dtype=dtype)
    lookup[vocab] = torch.arange(vocab.numel(), dtype=dtype)
    return lookup


def _decoded_chunks(path: str | Path, chunk_bytes: int, what: str = "data.text_file",
                    progress: Optional[Callable[[int], None]] = None) -> Iterator[str]:
    """The file's text, chunk by chunk, with newlines translated as text-mode open() does.

    A character split across two chunks comes out whole: the incremental decoder
    holds its leading bytes back until the rest arrives, and a trailing CR until it
    knows whether LF follows. Raises UsageError at the first byte that is not UTF-8,
    naming the file as `what 'path'`. `progress` is called with the bytes of each chunk.
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
                raise UsageError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {where})") from None
            if progress is not None and raw:
                progress(len(raw))
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


# ---- token files ---------------------------------------------------------------------------------------
#: Keys of a token file's sidecar: dtype and vocab_size always; vocab (the text of each id, which
#: becomes the run's vocab.json) and num_tokens (checked against the file's size) where known.
SIDECAR_KEYS = ("dtype", "vocab_size", "vocab", "num_tokens")
TOKEN_DTYPES = tuple(d.value for d in TokenDtype)


def sidecar_path(token_file: str | Path) -> Path:
    """Where a token file's dtype and vocabulary are: `tokens.bin` -> `tokens.json`."""
    return Path(token_file).with_suffix(".json")


def sidecar(dtype: str, vocab: Optional[list[str]], vocab_size: int, num_tokens: int) -> dict:
    """A sidecar's content, as `dist-train prepare` writes it."""
    return {"dtype": dtype, "vocab_size": vocab_size, "num_tokens": num_tokens, "vocab": vocab}


@dataclass(frozen=True)
class TokenFile:
    """What a token file holds, from its size, its sidecar and the config; checked, nothing read but the sidecar."""

    path: Path
    dtype: str  # "uint16" | "uint32"
    num_tokens: int
    vocab_size: int
    itos: Optional[list[str]]
    vocab_from: str  # where vocab_size came from, for messages


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_sidecar(path: Path) -> dict:
    regular_file(path, "config key 'data.token_file': sidecar")
    where = f"config key 'data.token_file': sidecar '{path}'"
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(side, dict):
        raise ConfigError(f"{where} must hold a JSON object with {', '.join(SIDECAR_KEYS)}")
    unknown = sorted(set(side) - set(SIDECAR_KEYS))
    if unknown:
        raise ConfigError(f"{where} has unknown key '{unknown[0]}'; its keys are {', '.join(SIDECAR_KEYS)}")
    if side.get("dtype") not in TOKEN_DTYPES:
        raise ConfigError(f"{where}: dtype must be {' or '.join(TOKEN_DTYPES)}, got {json.dumps(side.get('dtype'))}")
    v = side.get("vocab_size")
    if not _int(v) or v < 1:
        got = "it is missing" if "vocab_size" not in side else f"got {json.dumps(v)}"
        raise ConfigError(f"{where}: vocab_size must be a whole number >= 1 (the size of the vocabulary the ids "
                          f"come from), {got}")
    vocab = side.get("vocab")
    if vocab is not None and not (isinstance(vocab, list) and all(isinstance(t, str) for t in vocab)):
        raise ConfigError(f"{where}: vocab must be a list of strings (the text of each id) or null")
    if vocab is not None and len(vocab) != v:
        raise ConfigError(f"{where}: vocab has {len(vocab)} entries but vocab_size is {v}")
    n = side.get("num_tokens")
    if n is not None and (not _int(n) or n < 0):
        raise ConfigError(f"{where}: num_tokens must be a whole number >= 0 or null, got {json.dumps(n)}")
    return side


def inspect_token_file(cfg: DataConfig, block_size: int) -> TokenFile:
    """Check data.token_file against its size, its sidecar and the config; a one-line ConfigError otherwise.

    Reads the sidecar and the file's size, never the ids: an id beyond the
    vocabulary is found by TokenFileDataset.get, in the batch that holds it.
    """
    assert cfg.token_file is not None
    path = regular_file(cfg.token_file, "config key 'data.token_file': file")
    side_path = sidecar_path(path)
    if side_path == path:
        raise ConfigError(f"config key 'data.token_file': '{path}' ends in .json, the name of its own sidecar; "
                          "rename it (e.g. to .bin)")
    dtype_cfg = cfg.token_dtype.value if cfg.token_dtype is not None else None
    if side_path.exists():
        side = _read_sidecar(side_path)
        dtype, vocab_size, itos = side["dtype"], side["vocab_size"], side.get("vocab")
        if dtype_cfg is not None and dtype_cfg != dtype:
            raise ConfigError(f"config key 'data.token_dtype': {dtype_cfg} contradicts the sidecar '{side_path}' "
                              f"({dtype}); remove data.token_dtype")
        if cfg.vocab_size is not None and cfg.vocab_size != vocab_size:
            raise ConfigError(f"config key 'data.vocab_size': {cfg.vocab_size} contradicts the sidecar '{side_path}' "
                              f"(vocab_size {vocab_size}); remove data.vocab_size")
        vocab_from = f"from its sidecar '{side_path}'"
    else:
        side = {}
        if dtype_cfg is None:
            raise ConfigError(f"config key 'data.token_dtype': data.token_file '{path}' has no sidecar '{side_path}' "
                              "(dist-train prepare writes one), so set data.token_dtype=uint16 or uint32: the width "
                              "of its ids")
        if cfg.vocab_size is None:
            raise ConfigError(f"config key 'data.vocab_size': data.token_file '{path}' has no sidecar '{side_path}' "
                              "(dist-train prepare writes one), so set data.vocab_size: every id must be below it")
        if cfg.vocab_size < 1:
            raise ConfigError(f"config key 'data.vocab_size': must be >= 1, got {cfg.vocab_size}")
        dtype, vocab_size, itos, vocab_from = dtype_cfg, cfg.vocab_size, None, "data.vocab_size"
    width = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % width:
        raise ConfigError(f"config key 'data.token_file': '{path}' is {size} bytes, not a whole number of {dtype} ids "
                          f"({width} bytes each); is the file cut short, or its dtype wrong?")
    num_tokens = size // width
    if side.get("num_tokens") is not None and side["num_tokens"] != num_tokens:
        raise ConfigError(f"config key 'data.token_file': '{path}' holds {num_tokens} {dtype} ids, but its sidecar "
                          f"'{side_path}' says {side['num_tokens']}; they do not belong together (prepare them again)")
    if num_tokens < block_size + 1:
        raise ConfigError(f"config key 'data.token_file': '{path}' has {num_tokens} tokens, fewer than "
                          f"model.block_size+1={block_size + 1}")
    return TokenFile(path, dtype, num_tokens, vocab_size, itos, vocab_from)


def build_dataset(cfg: DataConfig, block_size: int, seed: int) -> TokenDataset:
    if cfg.text_file is not None:
        return text_dataset(cfg.text_file, block_size)
    if cfg.token_file is not None:
        return TokenFileDataset(inspect_token_file(cfg, block_size), block_size)
    return synthetic_dataset(cfg.num_samples, cfg.vocab_size, block_size, seed)


@dataclass(frozen=True)
class GlobalBatches:
    """Which samples make up the global batch of each optimizer step."""

    num_samples: int
    global_batch_size: int
    seed: int
    shuffle: bool = True
    """False: the samples in their order in the data set, epoch after epoch."""
    what: str = "the data set"

    def __post_init__(self) -> None:
        if self.num_samples < self.global_batch_size:
            raise UsageError(
                f"{self.what} has {self.num_samples} samples, fewer than train.global_batch_size="
                f"{self.global_batch_size}; use a larger data set or a smaller batch"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial batch is dropped

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices of the global batch of `step` (0-based), in order: positions
        k*B .. (k+1)*B - 1 of epoch e's permutation, where e, k = divmod(step, steps_per_epoch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        positions = torch.arange(k * self.global_batch_size, (k + 1) * self.global_batch_size)
        if not self.shuffle:
            return positions
        return EpochPermutation(self.num_samples, self.seed, epoch)(positions)


def split_for_rank(indices: torch.Tensor, rank: int, world_size: int, grad_accum_steps: int) -> list[torch.Tensor]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    g = indices.numel()
    if g % (world_size * grad_accum_steps):
        raise ValueError(f"global batch {g} not divisible by world_size*grad_accum_steps={world_size * grad_accum_steps}")
    local = g // world_size
    mine = indices[rank * local : (rank + 1) * local]
    return list(mine.split(local // grad_accum_steps))
