"""A warm interpreter that forks one real process per `dist-train` command, for tests.

A fresh `python -m dist_train` pays 3-7 s before it does anything: `import torch`,
`torch._dynamo` (which torch's optimizers import on first use) and matplotlib. A
suite that runs a few hundred commands spends most of its time there. This server
imports those third-party modules once; each command is then a `fork()` of it that
becomes the command: its own pid, process group, working directory, environment,
`sys.path` (its cwd, then PYTHONPATH, as `python -m` builds it), stdin/stdout/stderr
(the caller's file descriptors, passed over a Unix socket), signals and exit code.
It runs `dist_train`'s real entry point (`python -m dist_train` or the `dist-train`
console script) and ends as an interpreter ends: atexit handlers, non-daemon
threads joined, streams flushed.

What is not the same as a fresh interpreter, and why it does not matter here:
the server imported torch, numpy, matplotlib, omegaconf, wandb and tqdm before the
command's environment was set, so an environment variable those read at import
time would be missed (no test sets one); and dist_train itself is never imported
by the server, so a command gets the dist_train its PYTHONPATH names (the README
test's fresh copy). Launchers (torchrun, accelerate, deepspeed) start their
workers with `sys.executable`, so those are fresh interpreters as in real use,
and a few tests keep a plain `python -m dist_train` subprocess for what only a
fresh one shows.

    python tests/forkserver.py SOCKET       the server (started by `ForkServer.get()`)
    tests/bin/dist-train, tests/bin/python  shims for shell commands (the README's)
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

#: The modules a command would spend its start-up importing (dist_train's own are left to the command).
WARM = ("numpy", "torch", "torch._dynamo", "torch.distributed", "torch.distributed.fsdp", "torch.optim",
        "omegaconf", "tqdm", "matplotlib", "matplotlib.pyplot", "matplotlib.figure", "wandb")
SOCKET_ENV = "DIST_TRAIN_TEST_FORKSERVER"
#: Sent to a hung command to have it print every thread's stack to its stderr (faulthandler). A real-time
#: signal, not SIGUSR1: dist_train treats SIGUSR1 as a requeue request (signals.REQUEUE_SIGNALS).
DUMP_SIGNAL = signal.SIGRTMIN + 1


# ---- wire format: length-prefixed pickles, fds alongside ---------------------------------------------
def _send(sock: socket.socket, obj, fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(obj)
    msg = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [msg], list(fds))
    else:
        sock.sendall(msg)


def _recv(sock: socket.socket, with_fds: bool = False):
    fds: list[int] = []
    head = b""
    while len(head) < 4:
        if with_fds and not fds:
            chunk, got, _, _ = socket.recv_fds(sock, 4 - len(head), 8)
            fds.extend(got)
        else:
            chunk = sock.recv(4 - len(head))
        if not chunk:
            raise EOFError("forkserver connection closed")
        head += chunk
    (n,) = struct.unpack("!I", head)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise EOFError("forkserver connection closed")
        body += chunk
    return (pickle.loads(body), fds) if with_fds else pickle.loads(body)


# ---- the server --------------------------------------------------------------------------------------
def _child(req: dict, fds: list[int], close: list[socket.socket]) -> None:
    """Become the command (never returns)."""
    code = 1
    try:
        for s in close:
            s.close()
        os.setpgid(0, 0)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A test that gives up on a hung command asks it for its stacks first (dist_utils.spawn).
        faulthandler.register(DUMP_SIGNAL, file=2, all_threads=True)
        env = req["env"]
        os.chdir(req["cwd"])
        if "multiprocessing.process" in sys.modules:  # where a fresh interpreter started: its spawned children
            sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.path.abspath(os.getcwd())  # find __main__
        os.environ.clear()
        os.environ.update(env)
        sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
        extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *_BASE_PATH]
        unbuffered = bool(env.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                      line_buffering=os.isatty(1), write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        sys.argv = list(req["argv"])
        code = _run_main(req["kind"], req)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads, as exit does
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
        finally:
            os._exit(code & 0xFF if code >= 0 else 1)


_KEPT_GROUPS: list = []


def _keep_process_groups() -> None:
    """Keep every process group a test body destroys referenced until the process ends (by os._exit).

    A body that leaves its session (`destroy_process_group`) while it still holds a DDP model frees the
    model when it returns, and the model's Reducer then holds the last reference to the gloo group:
    ~Reducer runs with the GIL held and joins gloo's worker thread, which is itself waiting for the GIL
    to free the tensors of the last all-reduce. Seen as a rank hung for good in 3 of 60 2-rank bodies on
    a loaded machine (py-spy: ~ProcessGroupGloo -> std::thread::join under Reducer's dealloc; the worker
    in gil_scoped_acquire under ~AsyncAllreduceWork). A dist_train rank frees its model inside the
    session and ends with os._exit (cli.entry), so it never drops a group that way.
    """
    import torch.distributed.distributed_c10d as c10d

    destroy = c10d.destroy_process_group

    def keeping(group=None):
        _KEPT_GROUPS.extend(list(c10d._world.pg_map) if group is None else [group])
        return destroy(group)

    c10d.destroy_process_group = keeping
    sys.modules["torch.distributed"].destroy_process_group = keeping


def _run_main(kind: str, req: dict) -> int:
    import runpy

    if kind == "call":  # a test body: fn(*args), its result or traceback pickled to req["result"]
        import traceback

        torch = sys.modules["torch"]
        torch.set_num_threads(1)
        _keep_process_groups()
        try:
            fn, args = pickle.loads(req["call"])
            outcome = (True, pickle.dumps(fn(*args)))
        except BaseException:
            outcome = (False, traceback.format_exc())
        tmp = req["result"] + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(outcome, f)
        os.rename(tmp, req["result"])
        return 0 if outcome[0] else 1
    if kind == "agent":  # torchrun's agent, for tests where the launcher is not what is tested
        return _agent(req)
    if kind == "path":  # python SCRIPT ... (a benchmark of the README's, from the shim): its folder first
        sys.executable = req["executable"]
        sys.path[0] = os.path.dirname(os.path.abspath(req["module"]))
        runpy.run_path(req["module"], run_name="__main__")
        return 0
    if kind == "module":  # python -m dist_train ... (or a launcher's module, from the shim)
        if req.get("executable"):  # the shim: a launcher starts its workers through it too
            sys.executable = req["executable"]
        sys.argv[0] = "-m"
        runpy.run_module(req.get("module", "dist_train"), run_name="__main__", alter_sys=True)
    else:  # the dist-train console script
        from dist_train.cli import entry

        entry()
    return 0


#: What torchrun's agent exports to each worker (torch.distributed.elastic), for `nproc` ranks on one node.
def _torchrun_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "forkserver", "OMP_NUM_THREADS": "1"}


#: The signals torchrun's agent forwards to its workers (TORCHELASTIC_SIGNALS_TO_HANDLE's default).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
#: torchrun's --shutdown_timeout: how long the workers have after the agent forwards a signal or a worker failed.
SHUTDOWN_S = 30.0


def _agent(req: dict) -> int:
    """`torchrun --standalone --nproc_per_node=N -m dist_train ARGS` as its agent behaves: N workers with its
    environment (warm forks of this process, not fresh interpreters), a signal the agent receives forwarded
    to every worker, the others stopped when one fails; exit 0, 128 + the signal it received (as
    dist_train.torchrun ends), or 1 when a worker failed."""
    import socket as _socket

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nproc = int(req["nproc"])
    ranks: dict[int, int] = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            for signum in FORWARDED:
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.environ.update(_torchrun_env(rank, nproc, port))
            return _run_main("module", req)
        ranks[pid] = rank
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    codes: dict[int, int] = {}
    deadline = None
    while len(codes) < nproc:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            if deadline is None and received:
                deadline = time.monotonic() + SHUTDOWN_S
            if deadline is not None and time.monotonic() > deadline:
                for p in ranks:
                    if ranks[p] not in codes:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
            time.sleep(0.02)
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        codes[ranks[pid]] = code
        if code != 0 and deadline is None and not received:  # a worker failed: stop the others
            deadline = time.monotonic() + SHUTDOWN_S
            for p in ranks:
                if ranks[p] not in codes:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGTERM)
    if received:
        return 128 + received[0]
    return 0 if all(c == 0 for c in codes.values()) else 1


_BASE_PATH: list[str] = []


def serve(path: str) -> None:
    here = str(Path(__file__).resolve().parent)
    _BASE_PATH[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
    import matplotlib

    matplotlib.use("Agg")
    import importlib

    for name in WARM:
        importlib.import_module(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener], [], [], 0.02)
        if ready:
            conn, _ = listener.accept()
            try:
                req, fds = _recv(conn, with_fds=True)
            except (EOFError, OSError):
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, fds, [listener, conn, *waiting.values()])
            for fd in fds:
                os.close(fd)
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    _send(conn, {"returncode": code})
                except OSError:
                    pass
                conn.close()
        if os.getppid() != parent:  # the test session is gone
            os._exit(0)


# ---- the client --------------------------------------------------------------------------------------
class ForkServer:
    _instance: Optional["ForkServer"] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dist_train_forkserver_")
        self.path = os.path.join(self.dir, "sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], stdout=subprocess.PIPE, env=env,
                                     cwd=self.dir, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the test forkserver did not start (exit {self.proc.poll()})")
        os.environ[SOCKET_ENV] = self.path  # for the shims in tests/bin

    @classmethod
    def get(cls) -> "ForkServer":
        with cls._lock:
            if cls._instance is None or cls._instance.proc.poll() is not None:
                cls._instance = ForkServer()
            return cls._instance

    @classmethod
    def shutdown(cls) -> None:
        with cls._lock:
            if cls._instance is not None and cls._instance.proc.poll() is None:
                cls._instance.proc.terminate()
                cls._instance.proc.wait(10)
            cls._instance = None


def start(argv: list[str], cwd, env: dict, fds: tuple[int, int, int], kind: str = "module",
          path: Optional[str] = None, **extra) -> tuple[socket.socket, int]:
    """Ask the server to fork a command with these stdio fds; the connection and the command's pid."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path or ForkServer.get().path)
    _send(sock, {"argv": list(argv), "cwd": str(cwd), "env": dict(env), "kind": kind, **extra}, fds)
    return sock, _recv(sock)["pid"]


def wait(sock: socket.socket, pid: int, timeout: Optional[float]) -> Optional[int]:
    """The command's exit code (negative: killed by that signal); None if `timeout` ran out (it is killed)."""
    if timeout is not None:
        r, _, _ = select.select([sock], [], [], timeout)
        if not r:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _recv(sock)
            sock.close()
            return None
    code = _recv(sock)["returncode"]
    sock.close()
    return code


def _captured(argv: list[str], cwd, env: dict, timeout: Optional[float], cmd: list[str], input: str = "",
              **extra) -> subprocess.CompletedProcess:
    """Fork `argv` (see start) with its stdout and stderr captured, as subprocess.run(cmd, capture_output=True,
    text=True, timeout=timeout) would return it; TimeoutExpired (the command killed) when it outlasts it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        inp.write(input.encode())
        inp.seek(0)
        t0 = time.monotonic()
        sock, pid = start(argv, cwd, env, (inp.fileno(), out.fileno(), err.fileno()), **extra)
        code = wait(sock, pid, timeout)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if code is None:
        raise subprocess.TimeoutExpired(cmd, time.monotonic() - t0, stdout, stderr)
    return subprocess.CompletedProcess(cmd, code, stdout, stderr)


class Process:
    """`python -m dist_train ARGS` forked warm and left running, with the part of subprocess.Popen's interface
    the tests use: pid (also its process group, as with start_new_session), poll, wait, send_signal, kill,
    communicate (stdout and stderr as text, captured in files) and returncode (negative: that signal)."""

    def __init__(self, args: list[str], cwd, env: dict) -> None:
        self.args = [sys.executable, "-m", "dist_train", *args]
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        with open(os.devnull, "rb") as inp:
            self._sock, self.pid = start(["-m", *args], cwd, env, (inp.fileno(), self._out.fileno(), self._err.fileno()))
        self.returncode: Optional[int] = None

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            r, _, _ = select.select([self._sock], [], [], timeout)
            if not r:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = _recv(self._sock)["returncode"]
            self._sock.close()
        return self.returncode

    def poll(self) -> Optional[int]:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: Optional[float] = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = []
        for f in (self._out, self._err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
            f.close()
        return texts[0], texts[1]


def run(args: list[str], cwd, env: dict, timeout: Optional[float] = None, input: str = "") -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, dist_train, *args], capture_output=True, text=True)`, forked warm."""
    return _captured(["-m", *args], cwd, env, timeout, [sys.executable, "-m", "dist_train", *args], input)


def torchrun(args: list[str], nproc: int, cwd, env: dict, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=NPROC -m dist_train ARGS`, its workers forked warm (see _agent):
    for tests of what the workers do, not of the launcher (which other tests and the README run for real)."""
    cmd = ["torchrun", f"--nproc_per_node={nproc}", "-m", "dist_train", *args]
    return _captured(["-m", *args], cwd, env, timeout, cmd, kind="agent", nproc=nproc)


def shim(kind: str, module: str = "dist_train", executable: str = "") -> None:
    """A `dist-train`, `python -m MODULE` or `python SCRIPT` command of a shell line (MODULE dist_train or a
    launcher's, SCRIPT a benchmark: see tests/bin/python; kind "path" gives the script as `module`): forked by
    the server, with this process's stdio and `executable` (the shim) as its sys.executable; signals sent to
    this process are passed on; exits as the command did."""
    path = os.environ[SOCKET_ENV]
    args = sys.argv[2:] if kind == "path" else sys.argv[1:]  # a script's path is its argv[1] here
    argv = [{"script": "dist-train", "path": module}.get(kind, "-m"), *args]
    sock, pid = start(argv, os.getcwd(), dict(os.environ), (0, 1, 2), kind, path, module=module,
                      executable=executable)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda s, _f: os.kill(pid, s))
    code = wait(sock, pid, None)
    if code is not None and code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    serve(sys.argv[1])
