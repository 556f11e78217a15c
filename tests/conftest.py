from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
