from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs/debug.yaml"
#: A short debug run for end-to-end comparisons of launchers and strategies.
FAST = ["train.max_steps=12", "optim.warmup_steps=4", "logging.every=4", "logging.progress=plain"]


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m dist_train ARGS` as a user would; W&B never goes online in tests."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full_env.update({"WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dist_train", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def no_wandb_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("WANDB_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def single_runs(tmp_path_factory):
    """Single-process fp32 runs of the debug config: clean, and with a NaN at forward call 5 (step 6)."""
    from dist_train.cli import main

    root = tmp_path_factory.mktemp("single")
    os.environ["NAN_CALLS"] = "5"
    try:
        for name, extra in (("clean", []), ("nan", ["model.factory=tests.helpers:nan_gpt"])):
            assert main(["train", "-c", str(DEBUG), f"run.out_dir={root / name}", *FAST,
                         "logging.wandb.mode=disabled", *extra]) == 0
    finally:
        del os.environ["NAN_CALLS"]
    return root
