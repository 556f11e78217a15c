"""Weights & Biases: the same records as metrics.jsonl, with the resolved config.

metrics.jsonl is the record that must not be lost; W&B mirrors it. If W&B
stops working mid-run (its background service killed by the same signal that
stops the run, a full disk, a network failure), the run warns once and goes on
without it instead of failing or hanging.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from dist_train.config import WandbConfig, WandbMode
from dist_train.errors import UsageError, describe

log = logging.getLogger("dist_train")


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
    def __init__(self, cfg: WandbConfig, run_dir: Path, name: str, config: dict[str, Any],
                 run_id: Optional[str] = None):
        """`run_id`: continue that W&B run (a resumed training run), rather than start a new one."""
        self.mode = resolve_mode(cfg.mode)
        try:
            import wandb

            self.run: Optional[Any] = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                dir=str(run_dir),
                config=config,
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
        except Exception as e:
            raise UsageError(
                f"W&B could not start in {self.mode} mode ({describe(e)}); check the network and the API key, "
                "or pass logging.wandb.mode=offline (or disabled)"
            ) from None
        #: The offline run's folder, the argument of `wandb sync` (None when online).
        self.sync_dir: Optional[Path] = Path(self.run.settings.sync_dir) if self.mode == "offline" else None
        self.url: Optional[str] = getattr(self.run, "url", None) if self.mode == "online" else None
        #: The run's id, saved in checkpoints so that a resumed run continues it.
        self.run_id: Optional[str] = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        data = {k: v for k, v in record.items() if k != "step"}
        try:
            self.run.log(data, step=record["step"])
        except Exception as e:
            self._lost(e)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run; a non-zero exit code marks it failed (or stopped, 128 + signal) in W&B."""
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self._lost(e)
            return
        self.run = None
        try:
            # Shut W&B's service down now rather than at interpreter exit: a requeued Slurm job's processes
            # get SIGTERM (the service too) right after, and the exit hook would print a traceback.
            import wandb

            wandb.teardown()
        except Exception:
            pass  # the run is finished and its files are written; the service's end is not ours to report

    def _lost(self, e: Exception) -> None:
        log.warning("W&B stopped working (%s); metrics.jsonl keeps every row; going on without W&B", describe(e))
        self.run = None
        try:
            import wandb

            # Drops wandb's exit hook first, which would otherwise print a traceback
            # at interpreter exit while trying to reach the lost service again.
            wandb.teardown()
        except Exception:
            pass  # the service is gone: that is what it reports
