"""A tiny spawner for multi-process tests over gloo, on public APIs only.

`spawn(fn, world_size, *args)` starts `world_size` fresh processes with the
env:// variables a launcher would export, runs `fn(*args)` in each, and returns
the per-rank results in rank order. Any rank raising fails the test with that
rank's traceback; a hang fails it after `timeout` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, results, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensors by value; the queue's own pickler would pass
        # shared-memory handles that die with this process.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def spawn(fn, world_size: int, *args, timeout: float = 180):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
            if errors:
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s; ranks that answered: {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
