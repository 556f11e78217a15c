"""DeepSpeed's shared-memory all-reduce buffers on the CPU: released after start-up, and stale ones found.

On the CPU, when every rank of a job runs on one machine (DeepSpeed's launcher exports LOCAL_SIZE equal to
the world size), DeepSpeed's communication op creates one POSIX shared-memory buffer per rank,
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB each in DeepSpeed
0.19), maps its peers' buffers, and never unlinks its own. /dev/shm is memory: every such run leaves
world_size x 69 MB of RAM taken after it ends, until the files are removed or the machine reboots. A few
hundred runs fill the machine, and then compilers and trainings die of memory with nothing to say why.

`release_deepspeed_shm()`, called on every rank once DeepSpeed has started (dist_train's DeepSpeed strategies
do it in `setup`), waits until every rank has mapped every peer's buffer, then unlinks this rank's file: the
mappings stay valid, and the kernel frees the memory when the last process using it exits, however it exits
(a crash or SIGKILL included). Call it in your own DeepSpeed loop after `deepspeed.initialize`
(examples/own_loop_deepspeed.py does).

Buffers left by runs that did not release them (earlier runs, other programs, a run killed during start-up):

    python -m dist_train.deepspeed_shm            # lists the stale ones: no running process maps or opens them
    python -m dist_train.deepspeed_shm --remove   # and removes them
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

PREFIX = "deepspeed_allreduce_buffer"
SHM = Path("/dev/shm")


def own_buffer(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """This rank's buffer, named as DeepSpeed's shm op names it (uid, MASTER_ADDR, MASTER_PORT, rank)."""
    return SHM / f"{PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def release_deepspeed_shm() -> bool:
    """On every rank, after DeepSpeed has started on the CPU: a barrier (every rank has then mapped every
    peer's buffer, which DeepSpeed does before its start-up returns), then unlink this rank's buffer. True if
    one was unlinked. Does nothing, and calls no collective, where DeepSpeed is not imported, torch.distributed
    is not initialised, or DeepSpeed's accelerator is not the CPU (its shm op exists only there)."""
    if "deepspeed" not in sys.modules:
        return False
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_available() or not dist.is_initialized() or get_accelerator().device_name() != "cpu":
        return False
    dist.barrier()
    try:
        own_buffer(dist.get_rank()).unlink()
    except FileNotFoundError:  # DeepSpeed used no shm buffer (ranks on several machines, no LOCAL_SIZE)
        return False
    return True


def _in_use(shm: Path) -> set[str]:
    """Names of the files under `shm` that a running process maps or holds open (read from /proc)."""
    used: set[str] = set()
    prefix = str(shm) + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            with open(proc / "maps") as f:
                for line in f:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at + len(prefix):].split()[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    used.add(target[len(prefix):].split()[0])
        except OSError:  # the process ended, or is not ours to read
            continue
    return used


def stale(shm: Path = SHM) -> list[Path]:
    """DeepSpeed buffers of this user under `shm` that no running process maps or holds open."""
    if not shm.is_dir():
        return []
    uid = os.getuid()
    mine = []
    for p in shm.glob(f"{PREFIX}_*"):
        try:
            if p.is_file() and p.stat().st_uid == uid:
                mine.append(p)
        except FileNotFoundError:  # a run released it meanwhile
            continue
    if not mine:
        return []
    used = _in_use(shm)
    return sorted(p for p in mine if p.name not in used)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dist_train.deepspeed_shm",
                                description="List (or remove) DeepSpeed's shared-memory all-reduce buffers that "
                                            "no running process uses: memory that runs which did not release "
                                            "them left behind.")
    p.add_argument("--remove", action="store_true", help="remove them")
    p.add_argument("--dir", type=Path, default=SHM, help="where to look (default: %(default)s)")
    args = p.parse_args(argv)
    found = stale(args.dir)
    if args.remove and found:  # asked again just before removing: a run that started meanwhile keeps its own
        again = set(stale(args.dir))
        found = [p for p in found if p in again]
    count = total = 0
    for path in found:
        try:
            size = path.stat().st_size
            if args.remove:
                path.unlink()
        except FileNotFoundError:  # removed meanwhile
            continue
        count += 1
        total += size
        print(f"{'removed' if args.remove else 'stale'} {path} ({size / 2**20:.0f} MiB)")
    verb = "removed" if args.remove else "stale, remove with --remove"
    print(f"{count} DeepSpeed shm buffer(s) {verb}: {total / 2**20:.0f} MiB" if count
          else f"no stale DeepSpeed shm buffers in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
