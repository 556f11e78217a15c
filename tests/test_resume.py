"""Checkpoints and resume, outside Slurm: a run stopped at step k (SIGTERM) and resumed with
train.resume=auto equals the uninterrupted run, on one process, DDP, FSDP2 and DeepSpeed ZeRO-2; DDP
and FSDP2 checkpoints of 2 processes resume on 1 and on 3; a corrupt newest checkpoint falls back to
the previous one; a checkpoint that needs arbitrary pickle is refused, and one that is no file of
torch.save is said to be no checkpoint.

The stop comes from the model itself (tests.helpers:signal_gpt sends SIGTERM to its process at a
given forward call), so it lands at the same step every time. Same world size: the resumed run
repeats the uninterrupted run's arithmetic exactly, so losses, norms and final weights are compared
for equality. Another world size sums the same global batch in another order (the all-reduce of 2 or 3
partial gradients, not 1), so it is compared to fp32 tolerance (rel 1e-5, as the strategy tests).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from dist_train.metrics import read_jsonl
from tests.conftest import DEBUG, checkpoint_params, cli, latest_checkpoint, torchrun_cli
from tests.wandb_reader import history_of

# 48 samples a step: divisible by 1, 2 and 3 processes.
BASE = ["-c", str(DEBUG), "train.max_steps=12", "optim.warmup_steps=4", "logging.every=4", "logging.progress=plain",
        "train.global_batch_size=48", "model.factory=tests.helpers:signal_gpt"]
STOP_CALL = "6"  # the 7th training forward: one process stops after step 7; under torchrun the agent forwards the
# signal to every rank, and they stop together a step or two later (wherever, it is read from the stop line)
KEYS = ("train/loss", "grad_norm/raw", "grad_norm/clipped", "grad_norm/clip_coef", "grad_norm/threshold", "optim/lr",
        "optim/step_skipped", "optim/skipped_steps")


def train(run: Path, how: str, nproc: int = 1, *extra: str, stop: bool = False, wandb: str = "disabled", **env: str):
    if stop:
        env.update(STOP_AT_CALL=STOP_CALL, STOP_TARGET="self" if how == "single" else "parent")
    args = [f"run.out_dir={run}", f"logging.wandb.mode={wandb}", *extra]
    if how == "single":
        return cli("train", *BASE, *args, env=env)
    strategy = {"ddp": [], "fsdp": ["dist.strategy=fsdp"], "deepspeed": ["dist.strategy=deepspeed"]}[how]
    # torchrun's workers and its agent's signal forwarding (STOP_TARGET=parent signals the agent), forked warm.
    return torchrun_cli("train", *BASE, *args, *strategy, nproc=nproc, env=env)


def stopped_step(p) -> int:
    assert p.returncode == 128 + signal.SIGTERM, p.stdout + p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("dist-train: stopped:")][-1]
    assert "continue with train.resume=auto" in line, line
    return int(line.split("stopped after step ")[1].split()[0])


def assert_resumed_equals(run: Path, ref: Path, step: int, rel: float = 0.0) -> None:
    """metrics.jsonl: the uninterrupted run's rows, plus the row of the step it stopped after (always logged),
    each step once; the final weights equal (rel=0) or within `rel`."""
    rows = read_jsonl(run / "metrics.jsonl")
    want = read_jsonl(ref / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) == sorted({r["step"] for r in want} | {step}), steps
    by_step = {r["step"]: r for r in rows}
    for q in want:
        r = by_step[q["step"]]
        for key in KEYS:
            if rel == 0 or q[key] is None or isinstance(q[key], int):
                assert r[key] == q[key], (q["step"], key, r[key], q[key])
            else:
                assert r[key] == pytest.approx(q[key], rel=rel), (q["step"], key)
    got, ref_state = checkpoint_params(run), checkpoint_params(ref)
    assert sorted(got) == sorted(ref_state)
    for name in ref_state:
        if rel == 0:
            assert torch.equal(got[name].float(), ref_state[name].float()), name
        else:
            torch.testing.assert_close(got[name].float(), ref_state[name].float(), rtol=rel, atol=1e-6)


def stop_and_resume(tmp_path, how: str, nproc: int, *extra: str, wandb: str = "disabled"):
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = train(ref, how, nproc, *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    p = train(run, how, nproc, *extra, stop=True, wandb=wandb)
    k = stopped_step(p)
    assert 0 < k < 12 and (run / f"checkpoints/step_{k:08d}/manifest.json").is_file()
    p = train(run, how, nproc, *extra, "train.resume=auto", wandb=wandb)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{k:08d}'} (step {k})" in p.stderr
    return ref, run, k


def test_single_process_resumes_exactly_and_continues_the_wandb_run(tmp_path):
    # Dropout draws from the random generator every step: equality needs its state restored too.
    ref, run, k = stop_and_resume(tmp_path, "single", 1, "model.dropout=0.1", wandb="offline")
    assert k == 7
    assert_resumed_equals(run, ref, k)
    # W&B: one run, continued: both offline folders carry the same run id, and together hold every row once.
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].name == files[1].name, files
    steps = [row["_step"] for f in files for row in history_of(f)]
    assert sorted(steps) == [r["step"] for r in read_jsonl(run / "metrics.jsonl")]


def test_resume_is_exact_with_data_workers(tmp_path):
    """data.num_workers=2: the workers read ahead, the step still decides the samples, so a run stopped at step k
    and resumed reads on from step k, and equals the uninterrupted run (which equals one without workers)."""
    ref, run, k = stop_and_resume(tmp_path, "single", 1, "data.num_workers=2")
    assert_resumed_equals(run, ref, k)
    plain = tmp_path / "plain"
    assert train(plain, "single", 1).returncode == 0
    assert_resumed_equals(ref, plain, 12)


def test_ddp_resumes_exactly_and_on_another_world_size(tmp_path):
    ref, run, k = stop_and_resume(tmp_path, "ddp", 2)
    assert_resumed_equals(run, ref, k)
    # The 2-process checkpoint of step k, resumed on 1 and on 3 processes. On 3, the last rank reads the new
    # run directory 3 s late: it must not find the files rank 0 writes there as "another run" (rank 2 failed
    # so, unreported, once in CI: rank 0 went on to write config.yaml and metrics.jsonl while it lagged).
    for nproc in (1, 3):
        other = tmp_path / f"on{nproc}"
        late = {"LATE_RANK": "2"} if nproc == 3 else {}
        p = train(other, "ddp" if nproc > 1 else "single", nproc, f"train.resume={run / 'checkpoints' / f'step_{k:08d}'}",
                  **late)
        assert p.returncode == 0, p.stdout + p.stderr
        rows = read_jsonl(other / "metrics.jsonl")
        assert rows[0]["step"] > k  # a new run directory: its metrics start after the checkpoint
        assert_resumed_equals_after(other, ref, k)


def assert_resumed_equals_after(run: Path, ref: Path, k: int, rel: float = 1e-5) -> None:
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    want = [r for r in read_jsonl(ref / "metrics.jsonl") if r["step"] > k]
    assert sorted(rows) == [r["step"] for r in want]
    for q in want:
        for key in ("train/loss", "grad_norm/raw", "grad_norm/clipped", "optim/lr"):
            assert rows[q["step"]][key] == pytest.approx(q[key], rel=rel), (q["step"], key)
    got, ref_state = checkpoint_params(run), checkpoint_params(ref)
    for name in ref_state:
        # atol as tests.test_strategies.assert_same_parameters (AdamW's update where a gradient is near 0).
        torch.testing.assert_close(got[name].float(), ref_state[name].float(), rtol=rel, atol=1e-5)


def test_fsdp2_resumes_exactly_and_on_another_world_size(tmp_path):
    ref, run, k = stop_and_resume(tmp_path, "fsdp", 2)
    assert (latest_checkpoint(run) / ".metadata").is_file()
    assert sorted(p.name for p in latest_checkpoint(run).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert_resumed_equals(run, ref, k)
    for nproc in (1, 3):
        other = tmp_path / f"on{nproc}"
        p = train(other, "fsdp", nproc, f"train.resume={run / 'checkpoints' / f'step_{k:08d}'}")
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"FSDP2 over {nproc} processes" in p.stderr
        assert_resumed_equals_after(other, ref, k)


def test_deepspeed_zero2_resumes_exactly(tmp_path):
    ds_config = f"dist.deepspeed_config={Path('configs/deepspeed/zero2.json').resolve()}"
    ref, run, k = stop_and_resume(tmp_path, "deepspeed", 2, ds_config)
    assert list(latest_checkpoint(run).glob("*optim_states.pt"))
    assert_resumed_equals(run, ref, k)
    # Another world size is refused, with the reason.
    p = cli("train", *BASE, f"run.out_dir={tmp_path / 'on1'}", "dist.strategy=deepspeed", ds_config,
            f"train.resume={latest_checkpoint(run)}", "logging.wandb.mode=disabled")
    assert p.returncode == 2 and "DeepSpeed's checkpoints resume on the same world size" in p.stderr, p.stderr
    assert not (tmp_path / "on1").exists()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, monkeypatch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    every = ["optim.warmup_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    assert in_process(capsys, ref, *every)[0] == 0
    monkeypatch.setenv("STOP_AT_CALL", STOP_CALL)  # SIGTERM to this process, handled by dist-train's handler
    rc, err = in_process(capsys, run, *every)
    monkeypatch.delenv("STOP_AT_CALL")
    assert rc == 128 + signal.SIGTERM and "stopped after step 7 of 12" in err, err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000006", "step_00000007"]  # the newest 3 are kept
    newest = run / "checkpoints/step_00000007/checkpoint.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, different content
    newest.write_bytes(bytes(data))
    (run / "checkpoints/step_00000006/checkpoint.pt").write_bytes(b"")  # and a truncated one before it
    rc, err = in_process(capsys, run, *every, "train.resume=auto")
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warnings) == 3, err
    assert "step_00000007 cannot be used: checkpoint.pt is corrupt" in warnings[0]
    assert "step_00000006 cannot be used: checkpoint.pt is truncated" in warnings[1]
    assert "resumed from" in err and "(step 4)" in err
    assert "resuming from step 4 discards the later checkpoints step_00000007, step_00000006" in warnings[2]
    assert_resumed_equals(run, ref, 4)  # the row of step 7 was dropped with its checkpoint; 5-12 trained again


def in_process(capsys, run: Path, *extra: str) -> tuple[int, str]:
    """`dist-train train` in this process (no signal involved: cheaper than a subprocess); (exit code, stderr)."""
    from dist_train.cli import main

    capsys.readouterr()
    rc = main(["train", *BASE, f"run.out_dir={run}", "logging.wandb.mode=disabled", "optim.warmup_steps=0", *extra])
    return rc, capsys.readouterr().err


def resume_from_a_replaced_file(tmp_path, capsys, replace) -> tuple[Path, str]:
    """A checkpoint whose checkpoint.pt `replace(path)` rewrote, with a manifest that matches it (so only the
    load can tell), resumed into a new run directory: refused (exit 2) and nothing written. (the checkpoint
    folder, the error line)."""
    from dist_train.checkpoint import read_manifest, write_manifest

    run = tmp_path / "run"
    assert in_process(capsys, run, "train.max_steps=2")[0] == 0
    folder = latest_checkpoint(run)
    replace(folder / "checkpoint.pt")
    manifest = read_manifest(folder)
    write_manifest(folder, manifest["step"], {k: v for k, v in manifest.items() if k not in ("format", "step", "files")})
    rc, err = in_process(capsys, tmp_path / "other", "train.max_steps=4", f"train.resume={folder}")
    assert rc == 2, err
    assert not (tmp_path / "other").exists()
    return folder, err.strip().splitlines()[-1]


def test_a_checkpoint_that_needs_arbitrary_pickle_is_refused(tmp_path, capsys):
    def replace(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        state["payload"] = Path("/")  # any object torch.load(weights_only=True) does not rebuild
        torch.save(state, path)

    folder, line = resume_from_a_replaced_file(tmp_path, capsys, replace)
    assert line.startswith(f"dist-train: error: refusing to load '{folder / 'checkpoint.pt'}': it holds objects that "
                           "need arbitrary pickle"), line


def test_a_garbage_checkpoint_file_is_not_a_checkpoint(tmp_path, capsys):
    """Random bytes are no pickle of objects: they are refused as not a checkpoint at all (not as "objects
    that need arbitrary pickle", whatever unpickling them happens to say)."""
    import random

    folder, line = resume_from_a_replaced_file(tmp_path, capsys,
                                               lambda path: path.write_bytes(random.Random(0).randbytes(4096)))
    assert line.startswith(f"dist-train: error: '{folder / 'checkpoint.pt'}' is not a checkpoint (not a file "
                           "torch.save wrote"), line
    assert "pickle" not in line and "pass another checkpoint folder to train.resume" in line, line


def test_safe_load_tells_garbage_from_a_file_that_needs_arbitrary_pickle(tmp_path):
    """Either torch.save format holding an object weights_only cannot rebuild is unsafe; bytes no torch.save
    wrote (and a torch.distributed.checkpoint .metadata of random bytes) are not a checkpoint."""
    import random

    from dist_train.checkpoint import UnsafeCheckpoint, check_dcp_metadata, safe_load
    from dist_train.errors import UsageError

    for zip_format in (True, False):
        path = tmp_path / f"unsafe-{zip_format}.pt"
        torch.save({"payload": Path("/")}, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(UnsafeCheckpoint, match="need arbitrary pickle"):
            safe_load(path)
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=zip_format)
        assert torch.equal(safe_load(path)["w"], torch.ones(2))
    for seed in range(8):
        (tmp_path / "garbage.pt").write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UsageError, match="is not a checkpoint") as e:
            safe_load(tmp_path / "garbage.pt")
        assert not isinstance(e.value, UnsafeCheckpoint)
        (tmp_path / ".metadata").write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UsageError, match="is not a checkpoint") as e:
            check_dcp_metadata(tmp_path)
        assert not isinstance(e.value, UnsafeCheckpoint)


def test_resume_from_a_checkpoint_that_is_gone_lists_the_ones_there(tmp_path, capsys):
    """A checkpoint rotation removed (train.keep_checkpoints): the error names the ones that exist."""
    run = tmp_path / "run"
    assert in_process(capsys, run, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2")[0] == 0
    gone = run / "checkpoints/step_00000001"
    rc, err = in_process(capsys, tmp_path / "other", "train.max_steps=4", f"train.resume={gone}")
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dist-train: error: train.resume: the checkpoint '{gone}' does not exist"), line
    assert "checkpoints there: step_00000002, step_00000003; pass one of them" in line, line
    empty = tmp_path / "empty/checkpoints/step_00000001"
    rc, err = in_process(capsys, tmp_path / "other", "train.max_steps=4", f"train.resume={empty}")
    assert rc == 2, err
    assert f"there is no checkpoint in '{empty.parent}'" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "other").exists()


def test_resume_refuses_a_changed_trajectory_key(tmp_path, capsys):
    run = tmp_path / "run"
    assert in_process(capsys, run, "train.max_steps=2")[0] == 0
    rc, err = in_process(capsys, run, "train.max_steps=4", "train.resume=auto", "model.d_model=32")
    assert rc == 2
    assert "config key 'model.d_model' differs from the checkpoint's" in err, err
    # Without a change it continues: train.max_steps may grow.
    rc, err = in_process(capsys, run, "train.max_steps=4", "train.resume=auto")
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2, 4]
    # Resuming a finished run changes nothing and says so.
    before = (run / "metrics.jsonl").read_bytes()
    rc, err = in_process(capsys, run, "train.max_steps=4", "train.resume=auto")
    assert rc == 0 and "this run is complete, nothing left to train" in err, err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_checkpoint_of_another_format_is_refused(tmp_path, capsys):
    """A checkpoint written before the data order changed (format 1) would resume on other samples."""
    import json

    run = tmp_path / "run"
    assert in_process(capsys, run, "train.max_steps=2")[0] == 0
    manifest = latest_checkpoint(run) / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "format": 1}))
    rc, err = in_process(capsys, run, "train.max_steps=4", "train.resume=auto")
    assert rc == 2, err
    assert "has format 1 and this version of dist_train reads format 2" in err.strip().splitlines()[-1]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2]  # nothing appended


def test_resume_auto_without_a_checkpoint_starts_at_step_zero(tmp_path, capsys):
    run = tmp_path / "run"
    rc, err = in_process(capsys, run, "train.max_steps=4", "train.resume=auto")
    assert rc == 0, err
    assert "no checkpoint yet, starting at step 0" in err
    shutil.rmtree(run / "checkpoints")  # a run that never reached its first checkpoint
    rc, err = in_process(capsys, run, "train.max_steps=4", "train.resume=auto")
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [4]  # started over: no duplicate rows


def test_sigusr2_stops_with_a_checkpoint_and_says_when_the_requeue_fails(tmp_path, capsys, monkeypatch):
    """SIGUSR2, the slurm/ scripts' signal: outside Slurm a plain stop with a checkpoint (exit 128 + 12); in a
    Slurm job whose scontrol is missing, the checkpoint is written and the one error line says to resubmit."""
    monkeypatch.setenv("STOP_AT_CALL", STOP_CALL)
    monkeypatch.setenv("STOP_SIGNAL", "SIGUSR2")
    run = tmp_path / "run"
    rc, err = in_process(capsys, run)
    assert rc == 128 + signal.SIGUSR2, err
    assert "stopped: SIGUSR2 received; stopped after step 7" in err
    assert (run / "checkpoints/step_00000007/manifest.json").is_file()
    other = tmp_path / "other"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    rc, err = in_process(capsys, other)
    assert rc == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"dist-train: error: SIGUSR2: checkpoint {other / 'checkpoints/step_00000007'} written, "
                           "but scontrol requeue 42 could not run"), line
    assert line.endswith("resubmit the job: it resumes from the checkpoint with train.resume=auto"), line


def test_a_requeued_job_started_from_a_path_continues_its_own_progress(tmp_path, capsys):
    """slurm/ scripts pass the same arguments to every requeue of a job: a job started with
    train.resume=PATH must continue from its own newer checkpoints, not start from PATH again."""
    a, b = tmp_path / "a", tmp_path / "b"
    every = ["train.checkpoint_every=4", "train.keep_checkpoints=3"]
    assert in_process(capsys, a, *every)[0] == 0  # a: 4, 8, 12
    start = a / "checkpoints/step_00000008"
    rc, err = in_process(capsys, b, *every, f"train.resume={start}", "train.max_steps=10")
    assert rc == 0 and f"resumed from {start} (step 8)" in err, err
    # The same submission again (a requeue, or after the time limit), with more steps to go:
    rc, err = in_process(capsys, b, *every, f"train.resume={start}")
    assert rc == 0 and f"resumed from {b / 'checkpoints/step_00000010'} (step 10)" in err, err
    assert [r["step"] for r in read_jsonl(b / "metrics.jsonl")] == [10, 12]
    # Starting from another run's checkpoint into a directory that holds an unrelated run is refused.
    rc, err = in_process(capsys, a, f"train.resume={b / 'checkpoints/step_00000010'}")
    assert rc == 2 and "holds another run" in err, err


def test_a_rollback_discards_the_later_checkpoints_and_its_requeue_keeps_going(tmp_path, capsys):
    run = tmp_path / "run"
    every = ["train.checkpoint_every=4", "train.keep_checkpoints=3"]
    assert in_process(capsys, run, *every)[0] == 0  # 4, 8, 12
    back = run / "checkpoints/step_00000004"
    rc, err = in_process(capsys, run, *every, f"train.resume={back}", "train.max_steps=10")
    assert rc == 0, err
    assert "resuming from step 4 discards the later checkpoints step_00000012, step_00000008" in err, err
    assert (run / "checkpoints/latest").read_text() == "step_00000010\n"
    rc, err = in_process(capsys, run, *every, f"train.resume={back}")  # requeued: its own step 10, not step 4
    assert rc == 0 and "(step 10)" in err and "discards the later" not in err, err
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [4, 8, 10, 12]


def test_optim_keys_of_the_resumed_run_apply(tmp_path, capsys):
    run = tmp_path / "run"
    const = ["optim.schedule=constant", "optim.lr=1e-3", "optim.weight_decay=0.0"]
    assert in_process(capsys, run, *const, "train.max_steps=4")[0] == 0
    rc, err = in_process(capsys, run, "optim.schedule=constant", "optim.lr=2e-4", "train.max_steps=8",
                         "train.resume=auto")
    assert rc == 0, err
    assert [r["optim/lr"] for r in read_jsonl(run / "metrics.jsonl")] == [1e-3, 2e-4]


def test_a_changed_text_file_is_refused(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 200, encoding="utf-8")
    run = tmp_path / "run"
    args = [f"data.text_file={text}", "model.block_size=16", "train.global_batch_size=8", "train.max_steps=2"]
    assert in_process(capsys, run, *args)[0] == 0
    text.write_text("abcdefgz " * 200, encoding="utf-8")  # same size, another vocabulary
    rc, err = in_process(capsys, run, *args[:-1], "train.max_steps=4", "train.resume=auto")
    assert rc == 2 and "the data set differs from the checkpoint's" in err, err
    # One more character: a vocabulary of another size is a model of another shape too. The data check runs
    # before the model is loaded, so it is this refusal, not a failed load_state_dict (exit 1).
    text.write_text("abcdefgh " * 199 + "abcdefgh!", encoding="utf-8")
    rc, err = in_process(capsys, run, *args[:-1], "train.max_steps=4", "train.resume=auto")
    line = err.strip().splitlines()[-1]
    assert rc == 2, err
    assert line.startswith(f"dist-train: error: train.resume: the data set differs from the checkpoint's: "
                           f"data.text_file '{text}' has changed (a vocabulary of 10 symbols now, 9 then)"), line
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [2]  # nothing appended
