"""Nothing lost, nothing clobbered: graceful stop on signals (one process and
torchrun), a full disk, the run-directory lock, run.overwrite, failed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train.metrics import read_jsonl
from tests import forkserver
from tests.conftest import ROOT, cli
from tests.wandb_reader import exit_code as wandb_exit_code
from tests.wandb_reader import history

DEBUG = str(ROOT / "configs/debug.yaml")
LONG = ["train.max_steps=100000", "optim.warmup_steps=0", "logging.every=5"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    env.update(WANDB_SILENT="true", PYTHONPATH=str(ROOT), PYTHON=sys.executable, **extra)
    return env


def start(args: list[str], cwd: Path = ROOT, env: dict | None = None, script: str | None = None,
          warm: bool = False) -> subprocess.Popen | forkserver.Process:
    """`dist-train train -c debug.yaml ARGS` (or `bash SCRIPT ARGS`) left running, in its own session: a fresh
    interpreter, or with warm=True forked by the test server (for what does not depend on a cold start)."""
    if warm:
        return forkserver.Process(["train", "-c", DEBUG, *args], cwd, env or _env())
    cmd = ["bash", str(ROOT / script)] if script else [sys.executable, "-m", "dist_train", "train", "-c", DEBUG]
    return subprocess.Popen(cmd + args, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_rows(run: Path, proc: subprocess.Popen, rows: int = 2, timeout: float = 120) -> None:
    """Until metrics.jsonl holds `rows` complete lines (the run is training)."""
    path = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_bytes().count(b"\n") >= rows:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()[1]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the run never logged")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s; the end of its stderr:\n{err[-3000:]}") from None
    return proc.returncode, out, err


def assert_complete_metrics(run: Path) -> list[dict]:
    """Every line whole (newline-terminated JSON objects), steps strictly increasing."""
    data = (run / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps
    return rows


def assert_no_temporary_files(run: Path) -> None:
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]


def assert_stopped(rc: int, err: str, run: Path, signum: int, wandb: bool = True) -> int:
    """A graceful stop: exit code, its one line (once), complete metrics, W&B finished as stopped, plot."""
    assert rc == 128 + signum, err
    name = signal.Signals(signum).name
    stop_lines = [ln for ln in err.splitlines() if ln.startswith("dist-train: stopped:")]
    assert len(stop_lines) == 1, err  # once, by rank 0, however many ranks
    assert stop_lines[0].startswith(f"dist-train: stopped: {name} received; stopped after step "), err
    step = int(stop_lines[0].split("stopped after step ")[1].split()[0])
    rows = assert_complete_metrics(run)
    assert rows[-1]["step"] == step  # the step it stopped after is logged
    if wandb:
        assert [r["_step"] for r in history(run)] == [r["step"] for r in rows]  # every row reached W&B
        assert wandb_exit_code(run) == 128 + signum  # finished, and marked as not a success
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / f"checkpoints/step_{step:08d}/checkpoint.pt").is_file()  # the stop wrote a checkpoint
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    assert_no_temporary_files(run)
    assert "Traceback" not in err
    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_current_step_single_process(tmp_path, signum):
    """A fresh interpreter, as a user's Ctrl-C or a scheduler's SIGTERM finds it (the other runs signalled
    below are forked warm: their signal handling is dist_train's, installed the same way in both), with
    torch's default thread count, as a user's run has it (the suite's processes run one thread: conftest)."""
    run = tmp_path / "run"
    env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}
    p = start([f"run.out_dir={run}", *LONG, "logging.wandb.mode=offline"], env=env)
    wait_for_rows(run, p)
    p.send_signal(signum)
    rc, _, err = finish(p)
    assert_stopped(rc, err, run, signum)


PIPED = "{cmd} train -c {debug} run.out_dir={run} train.max_steps=100000 optim.warmup_steps=0 logging.every=1 " \
        "logging.wandb.mode=offline 2>&1 | head -3; echo \"exit ${{PIPESTATUS[0]}}\" >&2"


def _piped(cmd: str, run: Path) -> tuple[int, str, str]:
    """`CMD train ... 2>&1 | head -3` in bash: the training's exit code, what head printed, bash's stderr."""
    p = subprocess.run(["bash", "-c", PIPED.format(cmd=cmd, debug=DEBUG, run=run)], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    return int(p.stderr.strip().splitlines()[-1].split()[1]), p.stdout, p.stderr


def test_a_reader_that_goes_away_stops_the_run_quietly_and_whole(tmp_path):
    """`dist-train train ... | head -3`: head exits after three lines, the next write fails with EPIPE. The
    run stops as on a stop signal (SIGPIPE): exit 141 as any CLI killed by SIGPIPE, nothing printed after
    head's three lines, every logged step whole in metrics.jsonl and W&B, a checkpoint, the plot."""
    run = tmp_path / "run"
    rc, out, err = _piped(f"{sys.executable} -m dist_train", run)
    assert rc == 128 + signal.SIGPIPE, err
    assert len(out.splitlines()) == 3 and out.startswith("dist-train: "), out
    assert "Traceback" not in err and err.strip().splitlines() == [f"exit {rc}"], err
    rows = assert_complete_metrics(run)
    assert [r["_step"] for r in history(run)] == [r["step"] for r in rows]
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    step = rows[-1]["step"]
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{step:08d}"
    assert (run / f"checkpoints/step_{step:08d}/checkpoint.pt").is_file()
    assert_no_temporary_files(run)
    assert step < 100  # it stopped, soon after head went away


def test_negative_control_main_without_the_guard_dies_at_the_first_write(tmp_path):
    """The same pipe around `main()` without entry()'s guard: the broken pipe is an error, not a stop, so
    the test above can tell the two apart."""
    run = tmp_path / "run"
    rc, _, err = _piped(f"{sys.executable} -c 'import sys; from dist_train.cli import main; sys.exit(main())'", run)
    assert rc != 128 + signal.SIGPIPE, err


def test_signal_stop_survives_a_wandb_service_that_is_already_gone(tmp_path):
    run = tmp_path / "run"
    p = start([f"run.out_dir={run}", *LONG, "logging.wandb.mode=offline"], warm=True)
    wait_for_rows(run, p)
    # Under Slurm the same signal reaches W&B's background service: kill it first.
    service = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert service, "no W&B service process found"
    for pid in service:
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rc, _, err = finish(p)
    assert rc == 143, err
    assert "dist-train: warning: W&B stopped working" in err
    assert err.strip().splitlines()[-1].startswith("dist-train: stopped: SIGTERM received")
    assert_complete_metrics(run)
    assert (run / "plot.png").is_file()


def test_second_signal_aborts_at_once(tmp_path):
    run = tmp_path / "run"
    p = start([f"run.out_dir={run}", *LONG, "logging.every=1", "logging.wandb.mode=disabled",
               "model.factory=tests.helpers:slow_gpt"], env=_env(SLOW_S="2"), warm=True)
    wait_for_rows(run, p, rows=1)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)  # inside the next 2-second step
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rc, _, err = finish(p)
    assert time.monotonic() - t0 < 1.5  # did not wait for the step to end
    assert rc == 130
    assert "aborting at once" in err.strip().splitlines()[-1]
    assert_complete_metrics(run)


@pytest.mark.parametrize("script, env", [("launch/torchrun.sh", {"NPROC_PER_NODE": "2"}),
                                         ("launch/accelerate.sh", {"NUM_PROCESSES": "2"})],
                         ids=["torchrun", "accelerate"])
def test_sigterm_under_a_launcher_stops_every_rank_at_the_same_step(tmp_path, script, env):
    run = tmp_path / "run"
    p = start([f"run.out_dir={run}", *LONG, "logging.wandb.mode=offline"], script=script, env=_env(**env))
    wait_for_rows(run, p, rows=3)
    os.kill(p.pid, signal.SIGTERM)  # the launch script, as scancel or a time limit would
    rc, out, err = finish(p, timeout=90)  # within torchrun's 30 s grace period and then some
    # Ranks that disagreed on the step would hang in a collective and be killed: no stop line, no plot.
    assert_stopped(rc, out + err, run, signal.SIGTERM)


# ---- full disk -------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A tmpfs of a few KiB (needs root, as CI has). CI must not skip this test."""
    mounts = []

    def mount(size: str) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if p.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs in CI: {p.stderr.strip()}")
            pytest.skip(f"mounting a tmpfs was refused here ({p.stderr.strip()}); CI runs it as root")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)


def assert_disk_full_error(rc: int, err: str, path: Path) -> None:
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"dist-train: error: could not write '{path}': No space left on device"), err
    assert not [ln for ln in lines if ln.startswith("dist-train:") and "error" in ln][:-1], err  # one error line
    assert "warning" not in err and "Traceback" not in err, err


def test_disk_full_while_logging(tiny_disk):
    run = tiny_disk("48k") / "run"
    p = start([f"run.out_dir={run}", *LONG, "logging.every=1", "logging.wandb.mode=disabled"], warm=True)
    rc, _, err = finish(p)
    assert_disk_full_error(rc, err, run / "metrics.jsonl")
    rows = read_jsonl(run / "metrics.jsonl")  # readable, no partial line
    assert len(rows) > 10 and assert_complete_metrics(run) == rows
    assert_no_temporary_files(run)


def test_disk_full_at_the_checkpoint(tiny_disk):
    # Room for config, metrics and the plot, not for the checkpoint (about 1.3 MB).
    run = tiny_disk("600k") / "run"
    p = start([f"run.out_dir={run}", "train.max_steps=12", "optim.warmup_steps=0", "logging.every=4",
               "logging.wandb.mode=disabled"], warm=True)
    rc, _, err = finish(p)
    assert_disk_full_error(rc, err, run / "checkpoints/step_00000012")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [4, 8, 12]
    assert not list((run / "checkpoints").iterdir())  # nothing half-written, not even a temporary folder
    assert_no_temporary_files(run)


def test_disk_full_with_wandb_offline_neither_hangs_nor_loses_metrics(tiny_disk):
    # 128k: full after about 100 logged steps (W&B's files share the disk). 256k took 200 steps, 20-30 s on
    # a loaded 2-core machine, and once ran past finish's 120 s in the suite.
    run = tiny_disk("128k") / "run"
    p = start([f"run.out_dir={run}", *LONG, "logging.every=1", "logging.wandb.mode=offline"], warm=True)
    rc, _, err = finish(p)
    assert rc == 1 and err.strip().splitlines()[-1].startswith("dist-train: error: could not write"), err
    assert_complete_metrics(run)
    assert_no_temporary_files(run)


# ---- the run directory: lock, overwrite, failed runs ---------------------------------------


def train(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A run to completion, its own process forked warm."""
    return cli("train", "-c", DEBUG, *args, cwd=cwd, env=_env(), timeout=300)


def test_a_live_run_directory_is_locked_even_against_overwrite(tmp_path):
    run = tmp_path / "run"
    live = start([f"run.out_dir={run}", *LONG, "logging.wandb.mode=offline"], warm=True)
    try:
        wait_for_rows(run, live)
        before = sorted(p.name for p in run.iterdir())
        for extra in ([], ["run.overwrite=true"]):
            p = train([f"run.out_dir={run}", "train.max_steps=3", "optim.warmup_steps=0", *extra])
            assert p.returncode == 2, p.stderr
            assert p.stderr.strip().startswith(f"dist-train: error: run directory '{run}' is in use by a run in "
                                               f"progress (pid {live.pid} on "), p.stderr
            assert len(p.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in run.iterdir()) == before  # nothing of the live run was touched
        assert live.poll() is None
    finally:
        live.send_signal(signal.SIGTERM)
    rc, _, err = finish(live)
    assert_stopped(rc, err, run, signal.SIGTERM)  # the live run's W&B and metrics are intact


def test_a_crashed_run_leaves_no_lock_behind(tmp_path):
    run = tmp_path / "run"
    live = start([f"run.out_dir={run}", *LONG, "logging.wandb.mode=disabled"], warm=True)
    wait_for_rows(run, live)
    os.killpg(live.pid, signal.SIGKILL)
    live.wait()
    assert (run / ".dist_train.lock").exists()
    p = train([f"run.out_dir={run}", "train.max_steps=3", "optim.warmup_steps=0", "logging.wandb.mode=disabled",
               "run.overwrite=true"])
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [3]


def test_overwrite_refuses_files_it_did_not_write(tmp_path):
    run = tmp_path / "run"
    args = [f"run.out_dir={run}", "train.max_steps=2", "optim.warmup_steps=0", "logging.wandb.mode=offline"]
    assert train(args).returncode == 0
    (run / "notes.txt").write_text("mine")
    (run / "wandb" / "important.txt").write_text("mine too")
    p = train(args + ["run.overwrite=true"])
    assert p.returncode == 2
    assert "holds files dist_train did not write (notes.txt, wandb/important.txt)" in p.stderr
    assert (run / "notes.txt").read_text() == "mine" and (run / "wandb/important.txt").read_text() == "mine too"
    assert (run / "checkpoints/latest").exists()  # the earlier run is untouched as well
    (run / "notes.txt").unlink()
    (run / "wandb" / "important.txt").unlink()
    p = train(args + ["run.overwrite=true", "train.max_steps=3"])
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [3]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # the old W&B run went with the old run


def test_overwrite_of_the_working_directory_keeps_unrelated_files(tmp_path):
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "important.txt").write_text("keep")
    p = train(["run.out_dir=.", "run.overwrite=true", "train.max_steps=2", "optim.warmup_steps=0"], cwd=tmp_path)
    assert p.returncode == 2 and "wandb/important.txt" in p.stderr
    assert sorted(str(q.relative_to(tmp_path)) for q in tmp_path.rglob("*")) == ["wandb", "wandb/important.txt"]


def test_a_run_that_fails_before_its_first_logged_step_leaves_nothing(tmp_path):
    run = tmp_path / "out" / "run"
    p = train([f"run.out_dir={run}", "train.max_steps=3", "optim.warmup_steps=0", "logging.wandb.mode=offline",
               "model.factory=tests.helpers:fail_at_first_step"])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "dist-train: error: RuntimeError: planted failure on this rank (run with --debug for the traceback)")
    assert not (tmp_path / "out").exists()  # the directories it created are gone too
    p = train([f"run.out_dir={run}", "train.max_steps=3", "optim.warmup_steps=0", "logging.wandb.mode=disabled"])
    assert p.returncode == 0, p.stderr  # a plain rerun is not blocked


def test_a_run_losing_the_race_for_a_directory_removes_nothing_of_the_winner(tmp_path, monkeypatch):
    from dist_train.errors import UsageError
    from dist_train.rundir import RunDir

    run = tmp_path / "run"
    loser = RunDir(run)
    loser.check(overwrite=False)  # nothing there yet
    # Another run takes the directory between this run's check and its lock.
    (run / "wandb" / "offline-run-x").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr(RunDir, "check", lambda self, overwrite, resume=False: None)  # as it passed a moment ago
    with pytest.raises(UsageError, match="already holds a run"):
        loser.open(overwrite=False)  # found again under the lock
    assert (run / "wandb" / "offline-run-x").is_dir() and (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
