"""Config loading: strict keys, types and values; every shipped config loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_train.config import Config, Precision
from dist_train.preflight import load_config
from dist_train.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path, tmp_path, monkeypatch):
    if path.name == "seed_cnn.yaml":  # it names the data examples/seed_cnn.py writes, relative to the working dir
        from examples.seed_cnn import write

        write(tmp_path / "runs/seed_cnn_data", 4, 2, 0)
        monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_overrides_apply_with_types():
    cfg = load_config(ROOT / "configs/debug.yaml", ["optim.lr=3e-4", "clip.max_norm=0.5", "train.precision=bf16"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.clip.max_norm == 0.5
    assert cfg.train.precision is Precision.bf16


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["nope.x=1"], "unknown config key 'nope"),
        (["train.max_steps=abc"], "'train.max_steps'"),
        (["train.precision=fp8"], "'train.precision'"),
        (["clip.max_norm=-1"], "'clip.max_norm': must be finite and > 0"),
        (["train.global_batch_size=0"], "'train.global_batch_size': must be > 0"),
        (["train.global_batch_size=30", "train.grad_accum_steps=4"], "not divisible"),
        (["clip.policy=zclip"], "unknown policy 'zclip'; choose one of none, fixed, zscore, percentile, agc"),
        (["data.text_file=/nonexistent/file.txt"], "'data.text_file': file"),
        (["model.factory=nosuchpkg.mod:build"], "cannot import module 'nosuchpkg.mod'"),
        (["model.factory=no_colon"], "not of the form"),
        (["optim.lr"], "not of the form key=value"),
        (["dist.backend=nccl", "train.device=cpu"], "'dist.backend': nccl needs CUDA devices"),
        (["dist.timeout_s=0"], "'dist.timeout_s': must be finite, > 0"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/debug.yaml", overrides)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'missing.yaml' not found"):
        load_config("missing.yaml")


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.max_stepz'"):
        load_config(p)


def test_the_config_reference_is_current_and_made_from_the_docstrings(monkeypatch, capsys):
    """docs/configuration.md's table is what `python -m dist_train.reference` generates from the config
    dataclasses' docstrings, one row per key with its default. Negative control: a changed docstring (or
    default) makes it stale, and --check says so."""
    import re

    import dist_train.config as config
    from dist_train import reference
    from dist_train.config import all_keys

    page = reference.DOC.read_text(encoding="utf-8")
    assert reference.render(page) == page, "docs/configuration.md is stale: run python -m dist_train.reference"
    assert reference.main(["--check"]) == 0
    assert re.findall(r"^\| `([\w.]+)` \|", page, flags=re.M) == all_keys()
    assert "| `clip.max_norm` | `1.0` | Threshold of the fixed policy" in page
    docs = config.field_docs()
    monkeypatch.setattr(config, "field_docs", lambda: {**docs, "clip.max_norm": "another meaning"})
    assert reference.render(page) != page
    assert reference.main(["--check"]) == 1
    assert "configuration.md is stale: run python -m dist_train.reference" in capsys.readouterr().err
