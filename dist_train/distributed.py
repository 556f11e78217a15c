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
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

from dist_train.errors import DistTrainError, Stopped, TrainingError, UsageError
from dist_train.launchers import LAUNCHERS

T = TypeVar("T")

#: Variables torch's env:// rendezvous needs when world_size > 1.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


def slurm_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR and MASTER_PORT for the tasks of a Slurm job step, where the batch script exported
    none: the first host of the step's node list, expanded by `scontrol show hostnames` (Slurm's own
    parser), and a port derived from the job id, so jobs sharing a node do not collide."""
    out: dict[str, str] = {}
    if not env.get("MASTER_ADDR"):
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        try:
            p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=60)
            hosts = p.stdout.split() if p.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            hosts = []
        if not nodelist or not hosts:
            raise UsageError(f"cannot find the first host of the Slurm node list {nodelist!r} (scontrol show "
                             "hostnames failed or is missing); export MASTER_ADDR in the batch script")
        out["MASTER_ADDR"] = hosts[0]
    if not env.get("MASTER_PORT"):
        job = env.get("SLURM_JOB_ID", "")
        if not job.isdigit():
            raise UsageError(f"SLURM_JOB_ID={job!r} gives no port; export MASTER_PORT in the batch script")
        out["MASTER_PORT"] = str(20000 + int(job) % 20000)
    return out


@dataclass
class DistState:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"
    backend: Optional[str] = None
    rendezvous: dict[str, str] = field(default_factory=dict, repr=False)
    """MASTER_ADDR/MASTER_PORT this process derived (under Slurm) where the launcher exported none."""
    _active: bool = field(default=False, repr=False)
    _cpu_group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "DistState":
        for launcher, (markers, table) in LAUNCHERS.items():
            if not all(m in env for m in markers):
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
                if launcher == "slurm":
                    state.rendezvous = slurm_rendezvous(env)
                    env = {**env, **state.rendezvous}
                missing = [v for v in RENDEZVOUS_VARS if not env.get(v)]
                if missing:
                    raise UsageError(f"launcher environment is incomplete: {', '.join(missing)} not set; "
                                     "start the job with torchrun or export them")
                port = env["MASTER_PORT"]
                if not (port.isdigit() and 0 < int(port) < 65536):
                    raise UsageError(f"launcher variable MASTER_PORT={port!r} is not a port number (1-65535)")
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
        os.environ.update(self.rendezvous)  # env:// reads them (and so do DeepSpeed and Accelerate)
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
        # Stop votes travel on the CPU (see StopVote): NCCL would need a device tensor,
        # and reading it back would be a host sync on every step.
        self._cpu_group = None if self.backend == "gloo" else dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        try:
            try:
                yield self
            except Stopped:
                dist.barrier()  # a stop every rank agreed on: leave together too (below)
                raise
            # Leave together: a rank that tears down its connections while another
            # still works (rank 0 writing the plot) can make gloo abort the process,
            # and a launcher that sees one rank exit ends the others.
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

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of a tensor over ranks."""
        if not self._active:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min_max(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Element-wise min and max over ranks, in one all-reduce."""
        if not self._active:
            return t, t
        both = torch.stack([t, -t])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return -both[1], both[0]

    def on_main(self, fn: Callable[[], T]) -> Optional[T]:
        """Run `fn` on rank 0 only; if it fails, fail on every rank.

        Without this, an error found on rank 0 alone (say, an existing run
        directory) would leave the other ranks waiting in their next collective.
        Rank 0 raises its own error; the others raise one with the same message
        and exit code that only rank 0 reports.
        """
        result: Any = None
        failure: Optional[tuple[int, str]] = None
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:
                error = e
                code = e.exit_code if isinstance(e, DistTrainError) else 1
                failure = (code, str(e) if isinstance(e, DistTrainError) else f"rank 0 failed: {type(e).__name__}")
        if self._active:
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        if error is not None:
            raise error
        if failure is not None:
            shared = UsageError(failure[1]) if failure[0] == 2 else TrainingError(failure[1])
            shared.scope = "main"
            raise shared
        return result

    def barrier(self) -> None:
        if self._active:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (one small all-reduce, on the CPU)."""
        if not self._active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return bool(t.item())

    def share(self, value: T) -> T:
        """Rank 0's `value` on every rank (a broadcast of a small picklable object)."""
        if not self._active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self._active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def stop_vote(self) -> "StopVote":
        return StopVote(self._cpu_group if self._active else None, self._active)


def one_process_group(device: torch.device) -> None:
    """A process group of one rank, for a strategy whose library needs one even in a single process
    (DeepSpeed's engine, FSDP2's mesh); destroyed with the process."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    for var in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(var, "0")  # DeepSpeed reads them
    os.environ.setdefault("WORLD_SIZE", "1")


def slurm_job_id(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """This Slurm job's id (None outside Slurm)."""
    return env.get("SLURM_JOB_ID") or None


def in_slurm_step(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in a Slurm job step (under srun), where Slurm signals every process."""
    return "SLURM_STEP_ID" in env


def requeue_slurm_job(env: Mapping[str, str] = os.environ) -> str:
    """`scontrol requeue` this Slurm job (call from one rank). Returns the job id; raises TrainingError
    outside Slurm or when scontrol fails or is missing (inside some containers)."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise TrainingError("not a Slurm job (SLURM_JOB_ID is not set), so there is nothing to requeue")
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TrainingError(f"scontrol requeue {job} could not run ({e})") from None
    if p.returncode != 0:
        why = (p.stderr or p.stdout).strip().splitlines()
        raise TrainingError(f"scontrol requeue {job} failed ({why[0] if why else f'exit {p.returncode}'})")
    return job


class StopVote:
    """Agree on the optimizer step at which every rank stops, without waiting on it.

    A stop signal reaches the ranks at different moments; a rank that stopped
    alone would leave the others hanging in their next collective. Each step,
    every rank contributes its flag to a non-blocking all-reduce (MAX, on the CPU)
    and reads the result of the previous step's one, which has long completed, so
    no step waits for it and nothing is read back from the GPU. Every rank reads
    the same result at the same step, so all stop after the same step: at most
    one optimizer step after the first rank saw the signal (at once when single-process).
    """

    def __init__(self, group: Any, active: bool):
        self._group = group
        self._active = active
        self._pending: Optional[tuple[Any, torch.Tensor]] = None

    def poll(self, local: bool) -> bool:
        """Call once per optimizer step on every rank; True: stop after this step."""
        if not self._active:
            return local
        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            work.wait()
            if flag.numpy()[0]:  # a host tensor (the vote runs on the CPU group): no device read
                return True
        flag = torch.tensor([int(local)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flag)
        return False

    def close(self) -> None:
        """Wait for the last vote (every rank calls this after its last step)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


class RendezvousError(TrainingError):
    """The process group could not be formed (wrong address, missing ranks, timeout)."""
