"""End to end: the CLI as users run it, the run directory it writes, W&B contents."""

from __future__ import annotations

import math
import shlex

import pytest
import torch
import yaml

from dist_train.cli import main
from dist_train.data import GlobalBatches, split_for_rank
from dist_train.metrics import read_jsonl
from tests import forkserver
from tests.conftest import ROOT, cli, latest_checkpoint
from tests.wandb_reader import config as wandb_config
from tests.wandb_reader import exit_code as wandb_exit_code
from tests.wandb_reader import history

DEBUG = str(ROOT / "configs/debug.yaml")
FAST = ["train.max_steps=12", "optim.warmup_steps=4", "logging.every=4"]


def readme_train_command() -> list[str]:
    """The `dist-train train ...` part of the README's first quick-start command."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- quickstart -->", 2)[1]
    lines = [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("```")]
    first = lines[0]
    train = first.split("&&")[-1].strip()
    words = shlex.split(train)
    assert words[:2] == ["dist-train", "train"], first
    return words[1:]


def assert_wandb_matches_jsonl(run_dir):
    rows = read_jsonl(run_dir / "metrics.jsonl")
    logged = {r["_step"]: r for r in history(run_dir)}
    assert sorted(logged) == [r["step"] for r in rows]
    for r in rows:
        w = logged[r["step"]]
        for key, value in r.items():
            if key == "step":
                continue
            assert w[key] == value, (r["step"], key)


def test_readme_first_command_writes_metrics_wandb_run_and_plot(tmp_path):
    args = readme_train_command() + [f"run.out_dir={tmp_path / 'run'}", *FAST]
    p = cli(*args, cwd=ROOT)  # the README's commands run from the repository root
    assert p.returncode == 0, p.stderr
    run = tmp_path / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    for r in rows:
        assert r["grad_norm/clipped"] <= r["grad_norm/threshold"] * (1 + 1e-5)
        assert r["grad_norm/clipped"] == pytest.approx(r["grad_norm/raw"] * r["grad_norm/clip_coef"], rel=1e-6)
    assert_wandb_matches_jsonl(run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    sent = wandb_config(run)
    for section in ("train", "clip", "optim", "model"):
        assert sent[section] == saved[section], section  # the resolved config, as saved, reached W&B
    assert saved["train"]["max_steps"] == 12
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file() and (run / "checkpoints/step_00000012/checkpoint.pt").is_file()
    assert (run / "checkpoints/latest").read_text() == "step_00000012\n"
    assert "step 12/12" in p.stderr  # plain log lines when not on a terminal


def test_planted_nan_is_skipped_logged_and_training_continues(tmp_path, monkeypatch, no_wandb_env):
    monkeypatch.setenv("NAN_CALLS", "5")  # forward call 5 = optimizer step 6
    run = tmp_path / "run"
    rc = main(["train", "-c", DEBUG, f"run.out_dir={run}", *FAST, "model.factory=tests.helpers:nan_gpt",
               "logging.wandb.mode=offline"])
    assert rc == 0
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert rows[6]["optim/step_skipped"] == 1 and rows[6]["grad_norm/raw"] is None
    assert rows[12]["optim/skipped_steps"] == 1 and rows[12]["optim/step_skipped"] == 0
    assert math.isfinite(rows[12]["grad_norm/raw"])
    assert_wandb_matches_jsonl(run)  # nulls included
    assert wandb_exit_code(run) == 0


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch, no_wandb_env, capsys):
    monkeypatch.setenv("NAN_CALLS", "2,3,4")
    run = tmp_path / "run"
    rc = main(["train", "-c", DEBUG, f"run.out_dir={run}", *FAST, "model.factory=tests.helpers:nan_gpt",
               "clip.max_consecutive_nonfinite=3", "logging.wandb.mode=offline"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dist-train: error: training stopped at step 5: 3 consecutive optimizer steps")
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 4, 5]  # every skipped step is logged; nothing is lost
    assert rows[-1]["optim/skipped_steps"] == 3
    assert not (run / "checkpoints").exists()  # a failed run writes no checkpoint
    assert_wandb_matches_jsonl(run)
    assert wandb_exit_code(run) == 1  # the stopped run is marked failed in W&B


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "-c", "missing.yaml"], "config file 'missing.yaml' not found"),
        (["train", "-c", DEBUG, "train.bogus=1"], "unknown config key 'train.bogus'"),
        (["train", "-c", DEBUG, "train.max_steps=ten"], "'train.max_steps'"),
        (["train", "-c", DEBUG, "clip.max_norm=-0.5"], "'clip.max_norm': must be finite and > 0"),
        (["train", "-c", DEBUG, "data.text_file=missing.txt"], "'data.text_file': file 'missing.txt' not found"),
        (["train", "--nope"], "unrecognized arguments: --nope"),
        (["plot", "missing_run"], "has no metrics.jsonl"),
        (["verify", "-c", DEBUG, "--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, fragment):
    extra = [f"run.out_dir={tmp_path / 'out'}"] if args[0] == "train" and "--nope" not in args else []
    p = cli(*args, *extra, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_existing_run_is_not_overwritten(tmp_path, no_wandb_env, capsys):
    run = tmp_path / "run"
    args = ["train", "-c", DEBUG, f"run.out_dir={run}", "train.max_steps=2", "optim.warmup_steps=2", "logging.wandb.mode=disabled"]
    assert main(args) == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err
    # Continuing comes first: a user who meant to continue is not steered to deleting the run.
    assert err.index("train.resume=auto") < err.index("run.out_dir") < err.index("run.overwrite=true"), err
    assert (run / "metrics.jsonl").read_bytes() == before
    assert main(args + ["run.overwrite=true", "train.max_steps=3"]) == 0
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [3]


def test_runs_are_deterministic(tmp_path, no_wandb_env):
    def run(name):
        d = tmp_path / name
        assert main(["train", "-c", DEBUG, f"run.out_dir={d}", *FAST, "logging.wandb.mode=disabled"]) == 0
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_jsonl(d / "metrics.jsonl")]

    assert run("a") == run("b")


def test_text_file_character_level(tmp_path, no_wandb_env):
    text = tmp_path / "tiny.txt"
    text.write_text("hello wörld, the quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    run = tmp_path / "run"
    rc = main(["train", "-c", DEBUG, f"run.out_dir={run}", *FAST, f"data.text_file={text}",
               "model.block_size=16", "train.global_batch_size=8", "logging.wandb.mode=disabled"])
    assert rc == 0
    ckpt = torch.load(latest_checkpoint(run) / "checkpoint.pt", weights_only=True)
    assert ckpt["model"]["tok.weight"].shape[0] == len(set(text.read_text(encoding="utf-8")))


def test_text_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc" * 100)
    p = cli("train", "-c", DEBUG, f"data.text_file={bad}", f"run.out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert p.returncode == 2 and "is not UTF-8" in p.stderr
    assert not (tmp_path / "run").exists()


def test_custom_model_factory_example(tmp_path, no_wandb_env, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    assert main(["train", "-c", DEBUG, f"run.out_dir={run}", *FAST, "model.factory=examples.custom_model:build",
                 "logging.wandb.mode=disabled"]) == 0
    assert "conv.weight" in torch.load(latest_checkpoint(run) / "checkpoint.pt", weights_only=True)["model"]


def test_plot_command_redraws(tmp_path, no_wandb_env, capsys):
    run = tmp_path / "run"
    assert main(["train", "-c", DEBUG, f"run.out_dir={run}", "train.max_steps=3", "optim.warmup_steps=0", "logging.every=1",
                 "logging.wandb.mode=disabled"]) == 0
    (run / "plot.png").unlink()
    out = tmp_path / "p.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 2)])
def test_global_batch_is_the_same_for_any_world_size(world, accum):
    gb = GlobalBatches(num_samples=100, global_batch_size=16, seed=3)
    for step in (0, 5, 6, 13):  # 6 steps per epoch: crosses two epoch boundaries
        idx = gb.indices(step)
        parts = [m for r in range(world) for m in split_for_rank(idx, r, world, accum)]
        assert len(parts) == world * accum
        assert torch.equal(torch.cat(parts), idx)
    assert not torch.equal(gb.indices(0), gb.indices(6))  # a new epoch is a new permutation
    assert torch.equal(torch.sort(gb.indices(0)).values.unique(), torch.sort(gb.indices(0)).values)


def test_launch_debug_script(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # PYTHON: tests/bin/python forks `-m dist_train` warm (the script's exec is what is tested).
    env.update(PYTHON=str(ROOT / "tests/bin/python"), DEVICE="cpu", RANK="3", WORLD_SIZE="8")  # stale launcher vars are dropped
    p = subprocess.run(
        ["bash", str(ROOT / "launch/debug.sh"), f"run.out_dir={tmp_path / 'run'}", *FAST, "logging.wandb.mode=disabled"],
        env={**env, "DIST_TRAIN_TEST_FORKSERVER": forkserver.ForkServer.get().path}, capture_output=True, text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert len(read_jsonl(tmp_path / "run/metrics.jsonl")) == 3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, no_wandb_env, precision):
    run = tmp_path / "run"
    assert main(["train", "-c", DEBUG, f"run.out_dir={run}", *FAST, f"train.precision={precision}",
                 "train.device=cpu", "logging.wandb.mode=disabled"]) == 0
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert ("amp/loss_scale" in rows[-1]) == (precision == "fp16")
