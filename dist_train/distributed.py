"""Distributed state: the one module that reads launcher variables and talks to
torch.distributed.

`DistState.from_env()` maps the launcher's environment to rank, local rank and
world size through one declarative table; `session()` initialises the process
group (NCCL on CUDA, gloo on CPU), binds the device by local rank, and tears
the group down on normal exit and on error. Without a launcher environment it
is single-process mode: no process group, every collective the identity.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

from dist_train.errors import TrainingError, UsageError

T = TypeVar("T")

#: torch.distributed's env:// variables, as DistState fields.
TORCH_ENV = {"rank": "RANK", "local_rank": "LOCAL_RANK", "world_size": "WORLD_SIZE", "local_world_size": "LOCAL_WORLD_SIZE"}
#: Launcher -> (variable that identifies it, {field: variable}). First match wins.
LAUNCHERS: dict[str, tuple[str, dict[str, str]]] = {
    "torchrun": ("TORCHELASTIC_RUN_ID", TORCH_ENV),
    # Any launcher that exports the env:// variables (accelerate, deepspeed, mpirun wrappers).
    "env": ("RANK", TORCH_ENV),
}
#: Variables torch's env:// rendezvous needs when world_size > 1.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistState:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"
    backend: Optional[str] = None
    _active: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "DistState":
        for launcher, (marker, table) in LAUNCHERS.items():
            if marker not in env:
                continue
            values: dict[str, int] = {}
            for name, var in table.items():
                raw = env.get(var)
                if raw is None:
                    if name in ("local_rank", "local_world_size"):
                        continue  # optional: defaults below
                    raise UsageError(f"launcher environment is incomplete: {var} is not set ({launcher}); "
                                     "start the job with torchrun or export RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise UsageError(f"launcher variable {var}={raw!r} is not an integer") from None
            values.setdefault("local_rank", 0)
            values.setdefault("local_world_size", 1)
            state = cls(launcher=launcher, **values)
            if not 0 <= state.rank < state.world_size:
                raise UsageError(f"launcher variables say RANK={state.rank} but WORLD_SIZE={state.world_size}")
            if state.distributed:
                missing = [v for v in RENDEZVOUS_VARS if not env.get(v)]
                if missing:
                    raise UsageError(f"launcher environment is incomplete: {', '.join(missing)} not set; "
                                     "start the job with torchrun or export them")
            return state
        return cls()

    # ---- lifetime -----------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, device: torch.device, backend: str = "auto", timeout_s: float = 300) -> Iterator["DistState"]:
        """Initialise the process group for `device`; always destroy it on the way out."""
        if not self.distributed:
            yield self
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.backend = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            dist.init_process_group(
                backend=self.backend,
                init_method="env://",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, dist.DistError, TimeoutError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RendezvousError(
                f"rank {self.rank} of {self.world_size} could not join the process group at {addr} within "
                f"{timeout_s:g} s ({first}); check MASTER_ADDR/MASTER_PORT and that every rank was started"
            ) from None
        self._active = True
        try:
            yield self
            # Leave together: a rank that tears down its connections while another
            # still works (rank 0 writing the plot) can make gloo abort the process.
            dist.barrier()
        finally:
            self._active = False
            dist.destroy_process_group()

    # ---- collectives (identity in single-process mode) --------------------------------
    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks."""
        if not self._active:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world_size

    def min_max(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Element-wise min and max over ranks, in one all-reduce."""
        if not self._active:
            return t, t
        both = torch.stack([t, -t])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -both[1], both[0]

    def on_main(self, fn: Callable[[], T]) -> Optional[T]:
        """Run `fn` on rank 0 only; if it raises a UsageError, raise it on every rank.

        Without this, an error found on rank 0 alone (say, an existing run
        directory) would leave the other ranks waiting in their next collective.
        """
        result: Any = None
        error: Optional[str] = None
        if self.is_main:
            try:
                result = fn()
            except UsageError as e:
                error = str(e)
        if self._active:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise UsageError(error)
        return result


class RendezvousError(TrainingError):
    """The process group could not be formed (wrong address, missing ranks, timeout)."""
