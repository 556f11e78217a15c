"""The character-level text loader and the synthetic data set."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_train.data import synthetic_dataset, text_dataset
from dist_train.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

# Multi-byte characters of every UTF-8 length, and CRLF/CR line ends (text mode reads both as LF).
TEXT = "héllo wörld ✓ 日本 🙂\r\nsecond line\rthird ✓✓ 🙂🙂 ende\n" * 3


def reference_text_dataset(path: Path, block_size: int) -> tuple[list[str], torch.Tensor]:
    """The loader as it was: a Python list of ids, then every window stacked."""
    text = path.read_text(encoding="utf-8")
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    n = (ids.numel() - 1) // block_size
    return itos, torch.stack([ids[i * block_size : i * block_size + block_size + 1] for i in range(n)])


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 4096])
@pytest.mark.parametrize("block_size", [1, 8, 13])
def test_text_matches_reference(tmp_path, chunk_bytes, block_size):
    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    itos, samples = reference_text_dataset(path, block_size)
    data = text_dataset(path, block_size, chunk_bytes=chunk_bytes)
    assert data.itos == itos and data.vocab_size == len(itos) and len(data) == samples.size(0)
    x, y = data.get(torch.arange(len(data)))
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x, samples[:, :-1]) and torch.equal(y, samples[:, 1:])
    order = torch.tensor([2, 0, 2, len(data) - 1])
    x, y = data.get(order)
    assert torch.equal(x, samples[order, :-1]) and torch.equal(y, samples[order, 1:])


def test_text_large_vocabulary_uses_int32(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(0x20000 + i) for i in range(40_000)), encoding="utf-8")
    itos, samples = reference_text_dataset(path, 64)
    data = text_dataset(path, 64, chunk_bytes=1000)
    assert data.tokens.dtype == torch.int32 and data.itos == itos
    x, y = data.get(torch.arange(len(data)))
    assert torch.equal(x, samples[:, :-1]) and torch.equal(y, samples[:, 1:])


@pytest.mark.parametrize("chunk_bytes", [1, 3, 4, 16, 4096])
@pytest.mark.parametrize(
    "content",
    [
        "ab✓日本".encode() + b"\xff" + b"tail",  # invalid start byte, in a later chunk
        "abcdefgh🙂xy".encode() + b"\xe6\x97x",  # a character cut short by an ASCII byte
        "héllo wörld".encode() + b"\xf0\x9f\x99",  # the file ends inside a character
        b"\xed\xa0\x80abc",  # an encoded surrogate
    ],
)
def test_text_not_utf8_reports_file_offset(tmp_path, chunk_bytes, content):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UnicodeDecodeError) as expected:
        content.decode("utf-8")
    e = expected.value
    with pytest.raises(UsageError) as got:
        text_dataset(path, 2, chunk_bytes=chunk_bytes)
    assert str(got.value) == f"data.text_file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})"


@pytest.mark.parametrize(("text", "n"), [("", 0), ("ab✓🙂", 4), ("ab✓\r\n", 4)])
def test_text_too_short(tmp_path, text, n):
    path = tmp_path / "short.txt"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(UsageError) as got:
        text_dataset(path, n, chunk_bytes=2)
    assert str(got.value) == f"data.text_file '{path}' has {n} characters, fewer than model.block_size+1={n + 1}"


def test_text_exactly_one_sample(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("ab✓🙂", encoding="utf-8")
    x, y = text_dataset(path, 3, chunk_bytes=2).get(torch.tensor([0]))
    assert x.tolist() == [[0, 1, 2]] and y.tolist() == [[1, 2, 3]]


def test_synthetic_dataset_unchanged():
    num_samples, vocab, block, seed = 50, 17, 9, 3
    g = torch.Generator().manual_seed(10_000 + seed)
    start = torch.randint(0, vocab, (num_samples, 1), generator=g)
    stride = torch.randint(1, 5, (num_samples, 1), generator=g)
    samples = (start + stride * torch.arange(block + 1).unsqueeze(0)) % vocab
    data = synthetic_dataset(num_samples, vocab, block, seed)
    assert len(data) == num_samples and data.vocab_size == vocab and data.itos is None
    idx = torch.tensor([49, 0, 7, 7, 23])
    x, y = data.get(idx)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x, samples[idx, :-1]) and torch.equal(y, samples[idx, 1:])


MEASURE = """
import resource, sys
import torch
from dist_train.data import text_dataset
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = text_dataset(sys.argv[1], 256)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB only on Linux")
def test_text_peak_memory_is_a_small_multiple_of_the_file(tmp_path):
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.\n" * 20 + "éü✓日本🙂"
    unit = "".join(rng.choices(alphabet, k=1 << 20))
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(19):
            f.write(unit)
    size = path.stat().st_size
    p = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    growth = int(p.stdout)
    assert growth <= 6 * size, f"peak RSS grew by {growth / size:.2f}x the file size ({size} bytes)"
