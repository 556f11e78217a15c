"""Token files (data.token_file): the memory-mapped data set, its sidecar, `dist-train prepare`, and training
on one (the same run as on the text it came from, on one process or two)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

import dist_train.prepare as prep
from dist_train.cli import main
from dist_train.config import DataConfig, TokenDtype, all_keys
from dist_train.preflight import load_config
from dist_train.data import TokenDataset, TokenFileDataset, build_dataset, text_dataset
from dist_train.errors import ConfigError, UsageError
from dist_train.metrics import read_jsonl
from dist_train.prepare import prepare
from tests.conftest import ROOT, torchrun_cli
from tests.test_bad_input import DIR, _make, sidecar_text, tokens
from tests.test_data import TEXT
from tests.test_distributed import assert_same_trajectory

DEBUG = str(ROOT / "configs/debug.yaml")
FAST = ["train.max_steps=12", "optim.warmup_steps=4", "logging.every=4", "logging.wandb.mode=disabled",
        "logging.progress=plain"]
TRAJECTORY = ("train/loss", "grad_norm/raw", "grad_norm/clipped", "grad_norm/clip_coef")


def listing(d) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# ---- refusals, in process (tests/test_bad_input.py runs some of each kind through the real CLI) -------------
def side(**keys) -> str:
    return json.dumps({"dtype": "uint16", "vocab_size": 32, **keys})


BAD_CONFIGS = [
    # name, overrides ('{d}': the case's folder), files, the error line (a fragment of it)
    ("text_file_with_vocab_size", ["data.text_file={d}/t.txt", "data.vocab_size=64"], {"t.txt": "x" * 100},
     "'data.vocab_size': a data.text_file's vocabulary is its distinct characters; remove data.vocab_size"),
    ("token_dtype_without_token_file", ["data.token_dtype=uint16"], {},
     "'data.token_dtype': is for data.token_file, which is not set; remove it"),
    ("token_file_is_a_directory", ["data.token_file={d}/t"], {"t": DIR}, "file '{d}/t' is a directory"),
    ("token_file_named_json", ["data.token_file={d}/t.json"], {"t.json": b"ab" * 100},
     "ends in .json, the name of its own sidecar"),
    ("too_short", ["data.token_file={d}/t.bin"], tokens("t", 32), "has 32 tokens, fewer than model.block_size+1=33"),
    ("no_sidecar_no_vocab_size", ["data.token_file={d}/t.bin", "data.token_dtype=uint16"],
     tokens("t", 100, side=False), "'data.vocab_size': data.token_file '{d}/t.bin' has no sidecar '{d}/t.json'"),
    ("no_sidecar_vocab_size_0", ["data.token_file={d}/t.bin", "data.token_dtype=uint16", "data.vocab_size=0"],
     tokens("t", 100, side=False), "'data.vocab_size': must be >= 1, got 0"),
    ("dtype_contradicts_sidecar", ["data.token_file={d}/t.bin", "data.token_dtype=uint32"], tokens("t", 100),
     "'data.token_dtype': uint32 contradicts the sidecar '{d}/t.json' (uint16); remove data.token_dtype"),
    ("uint32_size_not_whole", ["data.token_file={d}/t.bin"], {"t.bin": bytes(402), "t.json": sidecar_text(
        32, None, "uint32")}, "is 402 bytes, not a whole number of uint32 ids (4 bytes each)"),
    ("sidecar_not_json", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": '{"dtype": '},
     "sidecar '{d}/t.json' is not valid JSON (Expecting value at line 1, column 11)"),
    ("sidecar_not_utf8", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": b'{"dtype": "\xff"}'},
     "sidecar '{d}/t.json' is not UTF-8"),
    ("sidecar_a_list", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": "[1, 2]"},
     "must hold a JSON object with dtype, vocab_size, vocab, num_tokens"),
    ("sidecar_a_folder", ["data.token_file={d}/t.bin"], {**tokens("t", 100, side=False), "t.json": DIR},
     "sidecar '{d}/t.json' is a directory"),
    ("sidecar_unknown_key", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(vocabsize=3)},
     "has unknown key 'vocabsize'; its keys are dtype, vocab_size, vocab, num_tokens"),
    ("sidecar_bad_dtype", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(dtype="int16")},
     'dtype must be uint16 or uint32, got "int16"'),
    ("sidecar_without_vocab_size", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(
        vocab_size=None)}, "vocab_size must be a whole number >= 1 (the size of the vocabulary the ids come from), "
        "got null"),
    ("sidecar_missing_vocab_size", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": json.dumps(
        {"dtype": "uint16"})}, "vocab_size must be a whole number >= 1 (the size of the vocabulary the ids come "
        "from), it is missing"),
    ("sidecar_vocab_size_true", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(
        vocab_size=True)}, "vocab_size must be a whole number >= 1 (the size of the vocabulary the ids come from), "
        "got true"),
    ("sidecar_vocab_not_strings", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(
        vocab=list(range(32)))}, "vocab must be a list of strings (the text of each id) or null"),
    ("sidecar_vocab_other_length", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(
        vocab=["a"] * 31)}, "vocab has 31 entries but vocab_size is 32"),
    ("sidecar_num_tokens_negative", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(
        num_tokens=-1)}, "num_tokens must be a whole number >= 0 or null, got -1"),
    ("sidecar_other_length", ["data.token_file={d}/t.bin"], {**tokens("t", 100), "t.json": side(num_tokens=120)},
     "'{d}/t.bin' holds 100 uint16 ids, but its sidecar '{d}/t.json' says 120; they do not belong together"),
]


@pytest.mark.parametrize("overrides, files, fragment", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_data_config_is_one_line_naming_the_key(tmp_path, overrides, files, fragment):
    _make(tmp_path, files)
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG, [o.format(d=tmp_path) for o in overrides])
    msg = str(e.value)
    assert fragment.format(d=tmp_path) in msg and "\n" not in msg
    assert msg.startswith("config key 'data.")


BAD_PREPARES = [
    # name, arguments of `dist-train prepare`, files, the error line (a fragment of it)
    ("input_missing", ["nope.txt", "t.bin"], {}, "prepare: input 'nope.txt' not found"),
    ("sidecar_exists", ["in.txt", "t.bin"], {"in.txt": "text\n", "t.json": "{}"}, "'t.json' exists; pass --overwrite"),
    ("output_is_a_folder", ["in.txt", "t.bin", "--overwrite"], {"in.txt": "text\n", "t.bin": DIR},
     "output 't.bin' is a folder"),
    ("output_folder_missing", ["in.txt", "out/t.bin"], {"in.txt": "text\n"},
     "the folder of the output 'out/t.bin' does not exist; create it first"),
    ("output_json", ["in.txt", "t.json"], {"in.txt": "text\n"},
     "output 't.json' ends in .json, the name of its own sidecar; choose e.g. 't.bin'"),
    ("output_is_the_input", ["in.txt", "in.txt", "--overwrite"], {"in.txt": "text\n"},
     "output 'in.txt' would be the input 'in.txt'"),
    ("output_inside_input", ["in", "in/sub/t.bin"], {"in/a.txt": "text\n", "in/sub": DIR},
     "output 'in/sub/t.bin' would be inside the input folder 'in'; write it elsewhere"),
    ("no_matching_file", ["in", "t.bin", "--glob", "*.txt"], {"in/a.md": "text\n", "in/.b.txt": "hidden\n"},
     "folder 'in' holds no file matching '*.txt' (names starting with '.' are skipped)"),
    ("empty_text", ["in.txt", "t.bin"], {"in.txt": ""}, "prepare: input 'in.txt' holds no text"),
]


@pytest.mark.parametrize("args, files, fragment", [c[1:] for c in BAD_PREPARES], ids=[c[0] for c in BAD_PREPARES])
def test_bad_prepare_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, files, fragment):
    monkeypatch.chdir(tmp_path)
    _make(tmp_path, files)
    before = listing(tmp_path)
    assert main(["prepare", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("dist-train: error: prepare: ") and fragment in err[0], err
    assert listing(tmp_path) == before


# ---- the memory-mapped data set ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, vocab", [("uint16", 5000), ("uint16", 65536), ("uint32", 70000)])
@pytest.mark.parametrize("num_tokens", [17, 1000, 1003])  # one window; whole windows; a partial one left over
def test_token_file_gives_the_samples_of_the_same_ids_in_memory(tmp_path, dtype, vocab, num_tokens):
    ids = np.random.default_rng(0).integers(0, vocab, num_tokens)
    ids[-1] = vocab - 1  # the largest id is allowed
    path = tmp_path / "t.bin"
    ids.astype(dtype).tofile(path)
    data = build_dataset(DataConfig(token_file=str(path), token_dtype=TokenDtype(dtype), vocab_size=vocab), 16, 0)
    ref = TokenDataset(torch.from_numpy(ids), 16, 16, vocab)  # stride block_size, as text_dataset
    assert isinstance(data, TokenFileDataset)
    assert len(data) == len(ref) == (num_tokens - 17) // 16 + 1 and data.vocab_size == vocab and data.itos is None
    for order in (torch.arange(len(ref)), torch.tensor([len(ref) - 1, 0, 0, len(ref) // 2])):
        (x, y), (rx, ry) = data.get(order), ref.get(order)
        assert x.dtype == y.dtype == torch.long
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_an_id_beyond_the_vocabulary_names_the_file_the_token_and_the_sample(tmp_path):
    ids = np.zeros(100, np.uint16)
    ids[57] = 40
    path = tmp_path / "t.bin"
    ids.tofile(path)
    data = build_dataset(DataConfig(token_file=str(path), token_dtype=TokenDtype.uint16, vocab_size=32), 8, 0)
    data.get(torch.tensor([0, 1, 2, 5, 8]))  # samples without token 57 are fine: nothing is scanned up front
    with pytest.raises(UsageError) as e:
        data.get(torch.tensor([3, 7]))  # sample 7 holds tokens 56..64
    assert str(e.value) == (f"data.token_file '{path}': token 57 (in sample 7) is id 40, not below the vocabulary "
                            "size 32 (data.vocab_size); the file's ids and its vocabulary do not belong together: "
                            "give the vocabulary size of the tokenizer that wrote the file")


def test_the_file_is_mapped_not_read(tmp_path):
    """Building the data set reads nothing: its ids live in the mapping, not in a copy."""
    path = tmp_path / "t.bin"
    np.arange(1 << 16, dtype=np.uint16).tofile(path)
    data = build_dataset(DataConfig(token_file=str(path), token_dtype=TokenDtype.uint16, vocab_size=1 << 16), 8, 0)
    assert not data.tokens.flags.owndata and not data.tokens.flags.writeable  # a read-only view of the mapping


def test_sidecar_gives_dtype_and_vocabulary_and_the_config_may_agree(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(40, dtype=np.uint32).tofile(path)
    vocab = [chr(0x41 + i) for i in range(40)]
    (tmp_path / "t.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 40, "num_tokens": 40,
                                                 "vocab": vocab}))
    for extra in ([], ["data.token_dtype=uint32", "data.vocab_size=40"]):
        cfg = load_config(DEBUG, [f"data.token_file={path}", "model.block_size=8", *extra])
        data = build_dataset(cfg.data, 8, 0)
        assert data.itos == vocab and data.vocab_size == 40 and len(data) == 4
        assert data.get(torch.tensor([1]))[0].tolist() == [list(range(8, 16))]
    with pytest.raises(ConfigError, match="'data.vocab_size': 41 contradicts the sidecar"):
        load_config(DEBUG, [f"data.token_file={path}", "data.vocab_size=41"])


def test_synthetic_vocabulary_default_is_saved_and_the_new_keys_are_documented():
    cfg = load_config(DEBUG)
    assert cfg.data.vocab_size == 32 and cfg.data.token_file is None and cfg.data.token_dtype is None
    reference = (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (`data\..*?) \|", reference, flags=re.M)
    documented = {k for row in rows for k in re.findall(r"`(data\.\w+)`", row)}
    assert documented == {k for k in all_keys() if k.startswith("data.")}


# ---- prepare -------------------------------------------------------------------------------------------
def decoded(out) -> str:
    side = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    ids = np.fromfile(out, dtype=np.dtype(side["dtype"]).newbyteorder("<"))
    assert side["num_tokens"] == ids.size and side["vocab_size"] == len(side["vocab"])
    return "".join(side["vocab"][i] for i in ids.tolist())


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 4096])  # 1-5: every multi-byte character is split
def test_prepare_round_trips_text_to_ids_to_text(tmp_path, chunk_bytes):
    src = tmp_path / "t.txt"
    src.write_bytes(TEXT.encode("utf-8"))
    done = prepare(src, tmp_path / "t.bin", chunk_bytes=chunk_bytes)
    assert decoded(done.out) == src.read_text(encoding="utf-8")  # newlines translated, as text mode reads them
    side = json.loads(done.sidecar.read_text(encoding="utf-8"))
    assert side["dtype"] == done.dtype == "uint16" and side["vocab"] == sorted(set(TEXT.replace("\r\n", "\n")
                                                                                     .replace("\r", "\n")))
    # The very ids data.text_file trains on.
    ids = np.fromfile(done.out, dtype="<u2")
    assert np.array_equal(ids, text_dataset(src, 1).tokens.numpy())


def test_prepare_a_folder_takes_its_files_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    files = {
        "b.txt": "\nzweite ✓\r\n",  # starts with LF after a file ending in CR: two line ends, not one
        "a/z.txt": "🙂 first 日本\r",
        "a/b/c.txt": "héllo\r\n",
        "notes.md": "not a .txt",
        ".hidden.txt": "hidden",
        ".git/x.txt": "hidden folder",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode("utf-8"))
    lines = []
    done = prepare(root, tmp_path / "t.bin", pattern="*.txt", chunk_bytes=3, say=lines.append)
    taken = ["a/b/c.txt", "a/z.txt", "b.txt"]
    assert [str(p.relative_to(root)) for p in done.files] == taken
    assert decoded(done.out) == "".join((root / rel).read_text(encoding="utf-8") for rel in taken)
    assert decoded(done.out).count("\n") == 4
    assert lines == [f"dist-train: prepare: 3 files under '{root}' matching '*.txt', in this order: "
                     "a/b/c.txt, a/z.txt, b.txt"]


def test_prepare_a_large_vocabulary_writes_uint32(tmp_path):
    text = "".join(chr(0x20000 + i) for i in range(65537)) + "\n"
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    done = prepare(src, tmp_path / "t.bin")
    assert done.dtype == "uint32" and done.vocab_size == 65538 and decoded(done.out) == text
    assert (tmp_path / "t.bin").stat().st_size == 4 * len(text)


@pytest.mark.parametrize("existing", [False, True])
def test_prepare_interrupted_leaves_nothing_and_the_old_output_whole(tmp_path, monkeypatch, existing):
    src = tmp_path / "in.txt"
    src.write_text(TEXT * 50, encoding="utf-8")
    out = tmp_path / "out.bin"
    if existing:
        out.write_bytes(b"old ids")
        out.with_suffix(".json").write_text("old sidecar")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    count = prep.ByteProgress.__call__

    def interrupt_while_writing(self, n):
        count(self, n)
        if self.phase.startswith("2/2") and self.done > self.total * 0.75:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep.ByteProgress, "__call__", interrupt_while_writing)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, overwrite=True, chunk_bytes=64)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_prepare_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("abc\n", encoding="utf-8")
    out = tmp_path / "out.bin"
    assert main(["prepare", str(src), str(out)]) == 0
    err = capsys.readouterr().err
    assert "prepare: 2/2 ids" in err  # plain progress lines off a terminal
    assert err.splitlines()[-1] == (f"dist-train: prepare: wrote 4 tokens (uint16, 4 distinct characters) to {out}, "
                                    f"and the vocabulary to {out.with_suffix('.json')}; train on it with "
                                    f"data.token_file={out}")
    src.write_text("abcd\n", encoding="utf-8")
    assert main(["prepare", str(src), str(out)]) == 2
    assert f"'{out}' exists; pass --overwrite" in capsys.readouterr().err
    assert decoded(out) == "abc\n"
    assert main(["prepare", str(src), str(out), "--overwrite"]) == 0
    assert decoded(out) == "abcd\n"


def test_prepare_stops_at_text_that_is_not_utf8_naming_file_and_byte(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text("fine ✓\n", encoding="utf-8")
    (root / "b.txt").write_bytes("ok 🙂".encode() + b"\xff")
    with pytest.raises(UsageError, match=re.escape(f"prepare: input file '{root / 'b.txt'}' is not UTF-8 text "
                                                   "(invalid start byte at byte 7)")):
        prepare(root, tmp_path / "t.bin", chunk_bytes=2)
    assert listing(tmp_path) == ["corpus", "corpus/a.txt", "corpus/b.txt"]


# ---- training on a token file ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same ids three ways: README.md as data.text_file, prepared into a token file with its sidecar, and
    as a user's own ids (no sidecar: data.token_dtype and data.vocab_size)."""
    root = tmp_path_factory.mktemp("token_runs")
    done = prepare(ROOT / "README.md", root / "readme.bin")
    own = root / "own.bin"
    np.fromfile(done.out, dtype="<u2").astype(np.uint16).tofile(own)  # as the README shows, no sidecar
    data = {
        "text": [f"data.text_file={ROOT / 'README.md'}"],
        "token": [f"data.token_file={done.out}"],
        "own": [f"data.token_file={own}", "data.token_dtype=uint16", f"data.vocab_size={done.vocab_size}"],
    }
    for name, keys in data.items():
        assert main(["train", "-c", DEBUG, f"run.out_dir={root / name}", *FAST, *keys]) == 0
    return root


def test_a_token_file_trains_exactly_as_the_text_it_came_from(runs):
    text = read_jsonl(runs / "text/metrics.jsonl")
    for name in ("token", "own"):
        rows = read_jsonl(runs / name / "metrics.jsonl")
        assert [r["step"] for r in rows] == [r["step"] for r in text] == [4, 8, 12]
        for r, q in zip(rows, text):
            assert {k: r[k] for k in TRAJECTORY} == {k: q[k] for k in TRAJECTORY}, (name, r["step"])
    assert (runs / "token/vocab.json").read_bytes() == (runs / "text/vocab.json").read_bytes()
    assert not (runs / "own/vocab.json").exists()  # ids without a vocabulary


def test_two_processes_on_a_token_file_match_one(runs, tmp_path):
    # torchrun's workers, forked warm (the README runs launch/torchrun.sh itself).
    p = torchrun_cli("train", "-c", str(ROOT / "configs/debug.yaml"), f"run.out_dir={tmp_path / 'two'}",
                     f"data.token_file={runs / 'readme.bin'}", *FAST, nproc=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_trajectory(read_jsonl(tmp_path / "two/metrics.jsonl"), read_jsonl(runs / "token/metrics.jsonl"))


def test_readme_own_tokenizer_lines_write_a_trainable_file(tmp_path):
    """The README's numpy lines for a user's own tokenizer, run as written (a stand-in tokenizer)."""
    readme = (ROOT / "docs/data.md").read_text(encoding="utf-8")
    block = readme.split("<!-- own-tokenizer -->", 2)[1]
    code = re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)

    class Tokenizer:
        def encode(self, text: str) -> list[int]:
            return [ord(c) % 50257 for c in text]

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, {"tokenizer": Tokenizer(), "text": TEXT * 20})
    finally:
        os.chdir(cwd)
    command = re.search(r"```text\n(dist-train train .*?)\n```", block, flags=re.S).group(1).split()
    keys = [w for w in command if w.startswith("data.")]
    cfg = load_config(DEBUG, [k.replace("=", f"={tmp_path}/", 1) if k.startswith("data.token_file") else k
                              for k in keys])
    data = build_dataset(cfg.data, cfg.model.block_size, 0)
    assert cfg.data.vocab_size == 50257 and data.tokens.tolist() == [ord(c) % 50257 for c in TEXT * 20]
