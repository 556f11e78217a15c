"""Spike skipping, spike forensics, data.skip_steps, per-layer norms and the policies' state across a resume,
on one process (the multi-process equivalents are in test_adaptive_strategies.py).

The planted spike is data-caused: tests.helpers:spike_gpt multiplies the logits by 30 when one chosen
sample is in the batch, so the spike follows that sample, and a rerun that leaves its batch out has none.
The data is a text of random letters, so that every sample is unique (the synthetic task repeats its
sequences).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dist_train.cli import main
from dist_train.preflight import load_config
from dist_train.metrics import read_jsonl
from dist_train.trainer import batch_of, build, optimizer_step
from tests.conftest import DEBUG

CPU = torch.device("cpu")
SPIKE_STEP = 10  # 1-based: the step (and batch) whose batch holds the spiking sample
SMALL = ["train.global_batch_size=16", "model.d_model=32", "optim.warmup_steps=2", "optim.schedule=constant",
         "logging.progress=plain", "logging.wandb.mode=disabled"]
SKIP = ["clip.skip_sigma=4", "clip.skip_window=16", "clip.skip_min_steps=4"]


def _cfg(*extra):
    return load_config(DEBUG, [*SMALL, *extra])


@pytest.fixture(scope="module", autouse=True)
def text_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "letters.txt"
    path.write_text("".join(rng.choice("abcdefghijklmnopqrst ") for _ in range(60_000)))
    SMALL.append(f"data.text_file={path}")
    yield path
    SMALL.remove(f"data.text_file={path}")


@pytest.fixture(scope="module")
def spike_env():
    """SPIKE_TOKENS = the first sample of batch SPIKE_STEP (0-based SPIKE_STEP - 1) of the data order."""
    s = build(_cfg(), device=CPU)
    samples = s.batches.indices(SPIKE_STEP - 1)
    tokens = s.dataset.windows(samples[:1])[0, :-1]
    old = dict(os.environ)
    os.environ["SPIKE_TOKENS"] = ",".join(str(t) for t in tokens.tolist())
    yield samples.tolist()
    os.environ.clear()
    os.environ.update(old)


def _snapshot(s):
    opt = [{k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()} for st in s.optimizer.state.values()]
    return [p.detach().clone() for p in s.model.parameters()], opt


def _same(a, b) -> bool:
    params_equal = all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    state_equal = all(torch.equal(x[k], y[k]) for x, y in zip(a[1], b[1]) for k in x)
    return params_equal and state_equal


@pytest.mark.parametrize("on", ["norm", "loss"])
def test_a_planted_spike_is_skipped_and_nothing_moves(spike_env, on):
    s = build(_cfg(*SKIP, f"clip.skip_on={on}", "model.factory=tests.helpers:spike_gpt"), device=CPU)
    for step in range(SPIKE_STEP + 1):
        before, window = _snapshot(s), s.skip.state_dict()
        m = optimizer_step(s, step)
        after = _snapshot(s)
        if step == SPIKE_STEP - 1:
            assert bool(m.spike) and not bool(m.skipped), "the spike is skipped as a spike, not as non-finite"
            assert _same(before, after), "parameters, AdamW moments or step counts changed on a skipped spike"
            assert all(torch.equal(window[k], v) for k, v in s.skip.state_dict().items() if k != "run")
            assert s.optimizer.state[next(s.model.parameters())]["step"].item() == SPIKE_STEP - 1
        else:
            assert not bool(m.spike), step
            assert not _same(before, after), f"step {step + 1} should have updated (the check above can fail)"
    assert s.strategy.unwrap(s.model).spiked == 1


def test_without_skip_sigma_the_spike_is_applied(spike_env):
    """Negative control: the planted sample does reach the weights when spike skipping is off."""
    s = build(_cfg("model.factory=tests.helpers:spike_gpt"), device=CPU)
    for step in range(SPIKE_STEP):
        before = _snapshot(s)
        m = optimizer_step(s, step)
    assert m.spike is None and not _same(before, _snapshot(s))


@pytest.fixture(scope="module")
def spike_runs(tmp_path_factory, spike_env):
    """The CLI run with the planted spike, and reruns leaving its batch out by data.skip_steps and by the file."""
    root = tmp_path_factory.mktemp("spikes")
    base = ["train", "-c", str(DEBUG), *SMALL, *SKIP, "model.factory=tests.helpers:spike_gpt", "train.max_steps=14",
            "logging.every=1", "logging.per_layer_every=3"]
    assert main([*base, f"run.out_dir={root / 'spiked'}", "logging.wandb.mode=offline"]) == 0
    assert main([*base, f"run.out_dir={root / 'rerun'}", f"data.skip_steps=[{SPIKE_STEP}]"]) == 0
    assert main([*base, f"run.out_dir={root / 'from_file'}",
                 f"data.skip_steps_file={root / 'spiked' / 'spikes.jsonl'}"]) == 0
    return root


def test_the_spike_is_in_spikes_jsonl_with_its_samples(spike_runs, spike_env):
    lines = read_jsonl(spike_runs / "spiked" / "spikes.jsonl")
    assert [(r["step"], r["batch"], r["action"]) for r in lines] == [(SPIKE_STEP, SPIKE_STEP, "skipped")]
    line = lines[0]
    assert line["samples"] == spike_env
    assert line["grad_norm/raw"] > line["clip/spike_limit"]
    assert len(line["top_layers"]) == 5
    assert [t["grad_norm"] for t in line["top_layers"]] == sorted((t["grad_norm"] for t in line["top_layers"]),
                                                                  reverse=True)
    row = {r["step"]: r for r in read_jsonl(spike_runs / "spiked" / "metrics.jsonl")}[SPIKE_STEP]
    assert (row["optim/spike_skipped"], row["optim/spike_skipped_steps"]) == (1, 1)
    assert (row["optim/step_skipped"], row["optim/skipped_steps"]) == (0, 0)  # separate from non-finite skips
    assert row["grad_norm/clipped"] is None  # nothing was applied


@pytest.mark.parametrize("rerun", ["rerun", "from_file"])
def test_a_rerun_with_skip_steps_leaves_the_batch_out(spike_runs, rerun):
    spiked = read_jsonl(spike_runs / "spiked" / "metrics.jsonl")
    again = read_jsonl(spike_runs / rerun / "metrics.jsonl")
    assert read_jsonl(spike_runs / rerun / "spikes.jsonl") == []
    assert not any(r["optim/spike_skipped"] for r in again)
    for a, b in zip(spiked[:SPIKE_STEP - 1], again[:SPIKE_STEP - 1]):  # the same trajectory up to the batch
        assert (a["train/loss"], a["grad_norm/raw"]) == (b["train/loss"], b["grad_norm/raw"])
    assert again[SPIKE_STEP - 1]["train/loss"] != spiked[SPIKE_STEP - 1]["train/loss"]  # the next batch instead


def test_batch_of_leaves_the_listed_batches_out():
    s = build(_cfg("data.skip_steps=[2,3,7]"), device=CPU)
    assert [batch_of(s, i) + 1 for i in range(7)] == [1, 4, 5, 6, 8, 9, 10]


def test_per_layer_norms_add_up_to_the_raw_norm_and_reach_wandb(spike_runs):
    from tests.wandb_reader import history

    run = spike_runs / "spiked"
    metrics = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    rows = read_jsonl(run / "per_layer.jsonl")
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    names = {k for k in rows[0] if k != "step"}
    # module names as the model has them (spike_gpt wraps TinyGPT as `inner`)
    assert {"grad_norm_layer/inner.head", "grad_norm_layer/inner.blocks.0.attn.qkv", "grad_norm_layer/inner.tok"} <= names
    for r in rows:
        rss = math.sqrt(sum(v * v for k, v in r.items() if k != "step"))
        assert rss == pytest.approx(metrics[r["step"]]["grad_norm/raw"], rel=1e-6)
    wandb_rows = [h for h in history(run) if "grad_norm_layer/inner.head" in h]
    assert [h["_step"] for h in wandb_rows] == [3, 6, 9, 12]
    assert (run / "per_layer.png").stat().st_size > 0


@pytest.mark.parametrize("policy", ["zscore", "percentile", "agc", "fixed"])
def test_a_non_finite_step_updates_nothing_under_every_policy(policy, monkeypatch):
    monkeypatch.setenv("NAN_CALLS", "5")
    s = build(_cfg(f"clip.policy={policy}", "clip.warmup_steps=3", *SKIP, "model.factory=tests.helpers:nan_gpt"),
              device=CPU)
    for step in range(7):
        before, state = _snapshot(s), json.dumps({k: v.tolist() for k, v in s.policy.state_dict().items()})
        m = optimizer_step(s, step)
        if step == 5:
            assert bool(m.skipped) and not bool(m.spike)
            assert _same(before, _snapshot(s))
            assert json.dumps({k: v.tolist() for k, v in s.policy.state_dict().items()}) == state
        assert math.isfinite(m.threshold.item()) or policy == "agc"
        assert all(torch.isfinite(p).all() for p in s.model.parameters())


@pytest.mark.parametrize("policy", ["zscore", "percentile"])
def test_resume_mid_run_continues_the_same_threshold_sequence(tmp_path, policy, monkeypatch):
    args = ["train", "-c", str(DEBUG), *SMALL, f"clip.policy={policy}", "clip.warmup_steps=3", "clip.max_norm=0.3",
            "train.max_steps=12", "logging.every=1", "train.checkpoint_every=6", "train.keep_checkpoints=3", *SKIP]
    assert main([*args, f"run.out_dir={tmp_path / 'full'}"]) == 0
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    fork = tmp_path / "full" / "checkpoints" / "step_00000006"
    assert main([*args, f"run.out_dir={tmp_path / 'resumed'}", f"train.resume={fork}"]) == 0
    resumed = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    keys = ("grad_norm/threshold", "grad_norm/raw", "clip/spike_limit",
            "clip/ema_mean" if policy == "zscore" else "clip/percentile")
    assert [r["step"] for r in resumed] == list(range(7, 13))
    for a, b in zip(full[6:], resumed):
        assert [a[k] for k in keys] == [b[k] for k in keys], a["step"]
    assert len({r["grad_norm/threshold"] for r in full[3:]}) > 3  # the threshold moved: the check has teeth

    # Negative control: a resume that drops the policy's state starts its statistics afresh.
    monkeypatch.setattr(type(build(_cfg(f"clip.policy={policy}"), device=CPU).policy), "load_state_dict",
                        lambda self, state: None)
    assert main([*args, f"run.out_dir={tmp_path / 'amnesia'}", f"train.resume={fork}"]) == 0
    amnesia = read_jsonl(tmp_path / "amnesia" / "metrics.jsonl")
    assert [r["grad_norm/threshold"] for r in amnesia] != [r["grad_norm/threshold"] for r in full[6:]]


def test_a_resume_may_leave_out_batches_after_its_checkpoint_only(tmp_path, capsys):
    args = ["train", "-c", str(DEBUG), *SMALL, "train.max_steps=8", "logging.every=1", "train.checkpoint_every=4"]
    assert main([*args, f"run.out_dir={tmp_path / 'a'}"]) == 0
    fork = tmp_path / "a" / "checkpoints" / "step_00000004"
    capsys.readouterr()
    assert main([*args, f"run.out_dir={tmp_path / 'b'}", f"train.resume={fork}", "data.skip_steps=[3]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("dist-train: error: train.resume: data.skip_steps leaves out batch(es) 3, but the checkpoint "
                       "at step 4 has already passed batch 4; leave out only batches after 4 (or resume from an "
                       "earlier checkpoint)"), err
    assert not (tmp_path / "b").exists()
    # After the checkpoint: steps 5 and 6 train on batches 5 and 7 (batch 6 left out).
    assert main([*args, f"run.out_dir={tmp_path / 'c'}", f"train.resume={fork}", "data.skip_steps=[6]"]) == 0
    a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    c = read_jsonl(tmp_path / "c" / "metrics.jsonl")
    assert [r["step"] for r in c] == [5, 6, 7, 8]
    assert c[0]["train/loss"] == a[4]["train/loss"]  # step 5: batch 5 in both
    assert c[1]["train/loss"] != a[5]["train/loss"]  # step 6: batch 7 instead of 6


def test_a_resume_with_another_window_size_starts_the_statistics_afresh(tmp_path, capsys):
    args = ["train", "-c", str(DEBUG), *SMALL, "train.max_steps=6", "logging.every=1", "train.checkpoint_every=3",
            "clip.policy=percentile", "clip.warmup_steps=2", *SKIP]
    assert main([*args, f"run.out_dir={tmp_path / 'a'}", "clip.window=8"]) == 0
    capsys.readouterr()
    fork = tmp_path / "a" / "checkpoints" / "step_00000003"
    assert main([*args, f"run.out_dir={tmp_path / 'b'}", f"train.resume={fork}", "clip.window=4",
                 "clip.skip_window=12"]) == 0
    err = capsys.readouterr().err
    assert "clip policy percentile state does not fit this run's settings" in err and "starts afresh" in err, err
    assert "spike window state does not fit" in err, err
    rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert rows[0]["grad_norm/threshold"] == 1.0  # the warm-up's max_norm again: the window starts empty


def test_settings_that_would_do_nothing_are_named_at_startup(tmp_path, capsys):
    """clip.skip_on without clip.skip_sigma, and a skip file that lists no batch: a note each, not silence."""
    empty = tmp_path / "spikes.jsonl"
    empty.write_text("\n")
    args = ["train", "-c", str(DEBUG), *SMALL, "train.max_steps=2", f"run.out_dir={tmp_path / 'a'}"]
    assert main([*args, "clip.skip_on=loss", f"data.skip_steps_file={empty}"]) == 0
    err = capsys.readouterr().err
    assert "dist-train: note: clip.skip_on=loss does nothing without clip.skip_sigma > 0: spike skipping is off" in err
    assert f"dist-train: note: data.skip_steps_file '{empty}' lists no batch: it leaves nothing out" in err
    # Neither note when the settings take effect (skip_sigma set, a batch listed, even one also in skip_steps).
    empty.write_text("3\n")
    assert main([*args[:-1], f"run.out_dir={tmp_path / 'b'}", "clip.skip_on=loss",
                 *SKIP, f"data.skip_steps_file={empty}", "data.skip_steps=[3]"]) == 0
    assert "dist-train: note: clip.skip_on" not in (err := capsys.readouterr().err) and "lists no batch" not in err
