"""Weights & Biases: the same records as metrics.jsonl, with the resolved config."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dist_train.config import WandbConfig, WandbMode


def api_key_configured() -> bool:
    """True when wandb would find an API key (environment or netrc). Never reads it out."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: WandbMode) -> str:
    if mode == WandbMode.auto:
        return "online" if api_key_configured() else "offline"
    return mode.value


class WandbSink:
    def __init__(self, cfg: WandbConfig, run_dir: Path, name: str, config: dict[str, Any]):
        import wandb

        self.mode = resolve_mode(cfg.mode)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            dir=str(run_dir),
            config=config,
            mode=self.mode,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, record: dict[str, Any]) -> None:
        data = {k: v for k, v in record.items() if k != "step"}
        self.run.log(data, step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # a stopped run shows as failed in W&B
