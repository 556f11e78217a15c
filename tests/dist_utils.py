"""A tiny spawner for multi-process tests over gloo, on public APIs only.

`spawn(fn, world_size, *args)` starts `world_size` fresh processes with the
env:// variables a launcher would export, runs `fn(*args)` in each, and returns
the per-rank results in rank order. Any rank raising fails the test with that
rank's traceback (and the end of its output); the other ranks are killed at
once, so a rank left waiting in a collective cannot hang the test. A hang fails
it after `timeout` seconds, naming the ranks that had not finished.

The processes are forked by the test session's warm server (tests/forkserver.py),
which imported torch once: each test body still gets processes of its own, with
nothing left over from an earlier body, and a failing or hung body takes only
its own processes down, never the server or the next test.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import tempfile
import time

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, "rb") as f:
        text = f.read().decode(errors="replace")
    return text[-chars:]


def _where(d: str, rank: int) -> str:
    """Whether a hung rank's body had returned (so it hangs on the way out) or not."""
    if os.path.exists(os.path.join(d, f"rank{rank}.pkl")):
        return "its body had returned; it hung while exiting"
    return "its body had not returned"


def spawn(fn, world_size: int, *args, timeout: float = 180):
    port = free_port()
    call = pickle.dumps((fn, args))
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH")) if p)  # fn's module
    with tempfile.TemporaryDirectory(prefix="dist_train_spawn_") as d:
        ranks = {}
        for rank in range(world_size):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                       LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       WANDB_SILENT="true")
            log = os.path.join(d, f"rank{rank}.log")
            with open(os.devnull, "rb") as inp, open(log, "wb") as out:
                sock, pid = forkserver.start([], os.getcwd(), env, (inp.fileno(), out.fileno(), out.fileno()),
                                             kind="call", call=call, result=os.path.join(d, f"rank{rank}.pkl"))
            ranks[sock] = (rank, pid, log)
        out, errors, exits = {}, [], {}
        deadline = time.monotonic() + timeout
        try:
            while len(exits) < world_size and not errors:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([s for s in ranks if ranks[s][0] not in exits], [], [], max(left, 0))
                if not ready:
                    pending = sorted(r for r, _, _ in ranks.values() if r not in exits)
                    for r, pid, _ in ranks.values():  # where each hung rank is: its stacks, into its log
                        if r in pending:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, forkserver.DUMP_SIGNAL)
                    time.sleep(1.0)
                    errors.append(f"timed out after {timeout}s; ranks that had not finished: {pending}; ranks "
                                  f"that answered: {sorted(out)}" + "".join(
                                      f"\n--- rank {r} ({_where(d, r)}) output and stacks (end):\n{_tail(log)}"
                                      for r, _, log in ranks.values() if r in pending))
                    break
                for sock in ready:
                    rank, pid, log = ranks[sock]
                    exits[rank] = forkserver.wait(sock, pid, None)
                    result = os.path.join(d, f"rank{rank}.pkl")
                    if os.path.exists(result):
                        with open(result, "rb") as f:
                            ok, value = pickle.load(f)
                    else:
                        ok, value = False, f"exited {exits[rank]} without a result"
                    if ok:
                        out[rank] = pickle.loads(value)
                    else:
                        errors.append(f"rank {rank}:\n{value}\n--- rank {rank} output (end):\n{_tail(log)}")
        finally:
            for sock, (rank, pid, _) in ranks.items():
                if rank not in exits:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    forkserver.wait(sock, pid, None)
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
