"""A kill at any moment of a checkpoint's commit leaves every checkpoint complete or absent, and no
temporary file that outlives the next start.

strace's fault injection (`-e inject=SYSCALL:signal=KILL:when=N`) kills a small driver process on
entering the N-th call of a kind, before the call runs. The driver imports only dist_train.checkpoint
(no torch: a tenth of a second a process) and runs one of its operations on checkpoint folders the
package's own writer built: a commit with its `latest` replacement and rotation (train.keep_checkpoints),
a re-save of a step that exists, and the rollback's drop of later checkpoints. An uninjected traced run
first lists every unlink, rmdir and rename of the operation; the test then kills the driver at each of
them in turn, and after each kill checks that every `step_*` folder passes the package's integrity check
(`checkpoint.problem`) and loads, and that the startup cleanup (`checkpoint.remove_leftovers`, or a whole
`train.resume=auto` run on real checkpoints) leaves no temporary file behind, and never a user's file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train import checkpoint as ckpt
from tests.conftest import DEBUG, ROOT

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install -y strace): "
                                                       "the kills are injected with its fault injection")

#: The system calls that take files and folders out of (or put them into) the checkpoint set.
CALLS = ("unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2")
MARK = ".fault-marker"

DRIVER = r"""
import os, sys
from pathlib import Path
from dist_train import checkpoint as ckpt

op, root = sys.argv[1], Path(sys.argv[2])
if op == "commit":
    step, keep = int(sys.argv[3]), int(sys.argv[4])
    tmp = root / f".tmp-{ckpt.name_of(step)}"
    files = ckpt.hash_files(tmp)  # as the ranks hash them before rank 0 commits
    like = ckpt.checkpoints_in(root)[0]
    extra = {k: v for k, v in ckpt.read_manifest(like).items() if k not in ("format", "step", "files")}
try:
    os.rmdir(root.parent / %(mark)r)  # fails: marks where the calls under test begin
except FileNotFoundError:
    pass
if op == "commit":
    ckpt.commit(root, tmp, step, keep, extra, files)
elif op == "drop":
    ckpt.drop_newer(root, int(sys.argv[3]))
""" % {"mark": MARK}

#: A user's files in the checkpoints folder: the cleanup must leave them.
USER_FILES = ("notes.txt", ".tmp-notes")


def driver(args: list[str], cwd: Path, *strace_args: str) -> subprocess.CompletedProcess:
    # No .pyc written: its rename would count in one run and not the next, and shift every `when=N`.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [STRACE, "-f", "-qq", *strace_args, "-e", f"trace={','.join(CALLS)}", sys.executable, "-c", DRIVER, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def kill_points(template: Path, args: list[str]) -> list[tuple[str, int, str]]:
    """(syscall, its occurrence number in the process, the trace line) of every call of CALLS the operation
    makes, from an uninjected traced run on a copy of `template`. strace counts `when=N` per syscall."""
    work = template.parent / "trace-run"
    shutil.copytree(template, work, symlinks=True)
    trace = template.parent / "trace.txt"
    p = driver([a.replace(str(template), str(work)) for a in args], work, "-o", str(trace))
    assert p.returncode == 0, p.stderr
    seen: dict[str, int] = {}
    points, started = [], False
    for line in trace.read_text().splitlines():
        m = re.match(r"^(?:\d+\s+)?(\w+)\(", line)
        if m is None or "resumed>" in line:
            continue
        name = m.group(1)
        seen[name] = seen.get(name, 0) + 1
        if MARK in line:
            started = True
        elif started:
            points.append((name, seen[name], line))
    shutil.rmtree(work)
    return points


def kill_at(template: Path, args: list[str], point: tuple[str, int, str], n: int) -> Path:
    """A fresh copy of `template` with the operation killed on entering the call `point`."""
    name, occurrence, line = point
    work = template.parent / f"kill-{n}"
    shutil.copytree(template, work, symlinks=True)
    p = driver([a.replace(str(template), str(work)) for a in args], work, "-o", os.devnull,
               "-e", f"inject={name}:signal=KILL:when={occurrence}")
    assert p.returncode in (-9, 137), (line, p.returncode, p.stderr)  # strace dies of its tracee's signal
    return work


def assert_complete_or_absent(root: Path, where: str) -> list[str]:
    """Every step_* folder is a complete checkpoint (the package's integrity check, and its checkpoint.pt
    loads); at least one is left. Returns their names."""
    names = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith("step_"):
            assert folder.is_dir() and (folder / ckpt.MANIFEST).is_file() and (folder / "checkpoint.pt").is_file(), \
                (where, folder.name, sorted(p.name for p in folder.iterdir()))
            assert ckpt.problem(folder) is None, (where, folder.name, ckpt.problem(folder))
            ckpt.safe_load(folder / "checkpoint.pt")
            names.append(folder.name)
    assert names, (where, sorted(os.listdir(root)))
    return names


def assert_clean(root: Path, where: str, user_files: tuple[str, ...] = ()) -> None:
    """Only checkpoints, `latest` (naming the newest) and the user's files: no temporary file or folder."""
    entries = sorted(os.listdir(root))
    steps = sorted((e for e in entries if ckpt.step_of(Path(e)) is not None), reverse=True)
    assert entries == sorted([ckpt.LATEST, *steps, *user_files]), (where, entries)
    assert (root / ckpt.LATEST).read_text() == steps[0] + "\n", where


def fake_checkpoints(root: Path, steps: list[int], pending: int | None = None) -> None:
    """Checkpoints of `steps` written by the package's own writer (begin, torch_save, commit), and the
    temporary folder of `pending`, its files written but not yet committed."""
    import torch

    from dist_train.rundir import torch_save

    for step in [*steps, pending]:
        if step is None:
            continue
        tmp = ckpt.begin(root, step)
        torch_save({"step": step, "model": {"w": torch.full((4,), float(step))}}, tmp / "checkpoint.pt")
        if step != pending:
            ckpt.commit(root, tmp, step, keep=100, extra={"kind": "file"}, files=ckpt.hash_files(tmp))
    for name in USER_FILES:
        (root / name).write_text("mine\n")


@pytest.mark.parametrize("scenario", ["rotation", "drop_newer"])
def test_a_kill_at_any_call_leaves_checkpoints_complete_or_absent(tmp_path, scenario):
    """rotation: step 2 committed beside step 1 with train.keep_checkpoints=1 (manifest, rename, `latest`,
    step 1 taken out). drop_newer: a rollback to step 1 drops steps 2 and 3."""
    template = tmp_path / "template"
    root = template / ckpt.DIR
    root.mkdir(parents=True)
    if scenario == "rotation":
        fake_checkpoints(root, [1], pending=2)
        args = ["commit", str(root), "2", "1"]
    else:
        fake_checkpoints(root, [1, 2, 3])
        args = ["drop", str(root), "1"]
    points = kill_points(template, args)
    names = {p[0] for p in points}
    assert names & {"rename", "renameat", "renameat2"} and names & {"unlink", "unlinkat", "rmdir"}, points
    if scenario == "rotation":
        assert any(f'{ckpt.DIR}/{ckpt.LATEST}"' in line for *_, line in points), points  # the `latest` replacement
    for n, point in enumerate(points):
        work = kill_at(template, args, point, n)
        where = f"killed at {point[2]}"
        left = assert_complete_or_absent(work / ckpt.DIR, where)
        if scenario == "drop_newer":
            assert "step_00000001" in left, where
        ckpt.remove_leftovers(work / ckpt.DIR)
        assert_clean(work / ckpt.DIR, where, USER_FILES)
        assert_complete_or_absent(work / ckpt.DIR, where)
        shutil.rmtree(work)


#: The smallest model and batch: each of the resumes below trains a step or two.
TINY = ["model.n_layer=1", "model.n_head=2", "model.d_model=16", "model.block_size=8", "train.global_batch_size=4"]


def in_process(capsys, run: Path, *extra: str) -> tuple[int, str]:
    from dist_train.cli import main

    capsys.readouterr()
    rc = main(["train", "-c", str(DEBUG), f"run.out_dir={run}", "logging.wandb.mode=disabled", "optim.warmup_steps=0",
               "logging.every=1", "logging.progress=plain", "train.checkpoint_every=1", *TINY, *extra])
    return rc, capsys.readouterr().err


def test_a_kill_while_a_real_run_saves_again_and_rotates_leaves_a_run_that_resumes_clean(tmp_path, capsys):
    """Real checkpoints of steps 1 and 2; step 2 saved again (a run resumed from it, stopped before its next
    step) with train.keep_checkpoints=1: the old step 2 and step 1 are taken out. After a kill at each call,
    train.resume=auto resumes from a complete checkpoint and leaves only its own newest one."""
    run = tmp_path / "template"
    rc, err = in_process(capsys, run, "train.max_steps=2", "train.keep_checkpoints=2")
    assert rc == 0, err
    root = run / ckpt.DIR
    tmp = root / ".tmp-step_00000002"
    tmp.mkdir()
    shutil.copy2(root / "step_00000002" / "checkpoint.pt", tmp / "checkpoint.pt")
    args = ["commit", str(root), "2", "1"]
    points = kill_points(run, args)
    assert len(points) >= 6, points
    for n, point in enumerate(points):
        work = kill_at(run, args, point, n)
        where = f"killed at {point[2]}"
        left = assert_complete_or_absent(work / ckpt.DIR, where)
        rc, err = in_process(capsys, work, "train.max_steps=3", "train.keep_checkpoints=1", "train.resume=auto")
        assert rc == 0, (where, err)
        assert f"resumed from {work / ckpt.DIR / left[-1]}" in err, (where, left, err)
        assert_clean(work / ckpt.DIR, where)
        assert sorted(os.listdir(work / ckpt.DIR)) == [ckpt.LATEST, "step_00000003"], where
        shutil.rmtree(work)
