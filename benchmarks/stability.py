"""Stability study: what each clip policy buys, on three workloads, against three questions.

Workloads (each a task of the package, trained in-process on the CPU in fp32, one thread per worker):
  cnn   the article's CNN (examples/seed_cnn.py, task classify) with SGD, momentum 0.9, batch 16, on 4800
        CIFAR-shaped images drawn from seed 0 (one epoch in 300 steps); default threshold 5.0, the article's
  lstm  a character-level 2-layer LSTM language model (examples/lstm_lm.py, d_model 64, 64-character windows)
        with plain SGD, batch 32, on benchmarks/data/pydocs.txt; default threshold 0.25 (Zhang et al. 2020's)
  gpt   the embedded TinyGPT (2 layers, d_model 64, 32-character windows) with AdamW (beta2 0.95), batch 32, on
        the same text; default threshold 1.0

Every run: --steps optimizer steps, a linear LR warm-up over the first 10% of them, then constant; seeds are
fixed up front (0 .. --seeds-1). Policies: none; fixed at the workload's default threshold; zscore and
percentile at their defaults (their warm-up clips at the default threshold); agc at its defaults; fixed plus
clip.skip_sigma=6 (spike skipping at its defaults: on the norm, window 128, active after 64 steps).

Q1, learning-rate sensitivity. A log grid of --n-lr rates per workload (cnn 1e-3..1, lstm 1..1000, gpt
  1e-3..1; wide enough that unclipped SGD diverges at the top), the 6 policies, every seed. Sensitivity is
  Wortsman et al.'s (2023, arXiv 2309.14322): per seed min(final, initial), a diverged run counting as its
  initial loss; L(lr) the mean over seeds; sensitivity = mean over the grid of min(L(lr), L0) - min over the
  grid of L(lr), L0 the mean initial loss. A run diverged when a loss of its final window is non-finite or
  its final loss ends above its initial loss.
Q2, threshold sensitivity. At the rate where fixed clipping's L(lr) is lowest in Q1 and at the next rate of
  the grid (3.2x), fixed clipping over 7 thresholds (the default x 0.1 .. x 10, log-spaced), zscore over z
  in 1.5, 2, 2.5, 3, 4 and percentile over p in 5, 10, 25, 50. Per policy and rate: the best and worst L of
  its knob, and its spread (worst - best) / best; each adaptive default's gap to the best fixed threshold,
  (L(default) - L(best fixed)) / L(best fixed).
Q3, bad batches. At fixed clipping's best rate, seed 0: --n-bad global batches planted at steps drawn from
  --bad-seed (numpy's default_rng, without repeats, after the spike window is full and before the final
  window) are corrupted: cnn's images x100; lstm's and gpt's windows become one character repeated (each
  sample's first). Per policy (none, fixed, zscore, fixed + skip_sigma on the norm, and on the loss with
  clip.skip_on=loss): the final loss and the damage, the signed area between the loss curve and the same
  policy's clean run's over the steps that are not planted, the sum of min(loss, initial) - min(clean loss,
  initial) (a non-finite loss counts as the initial loss). Then the forensics recipe through dist_train.trainer.train,
  as a user runs it, for both skipping policies: the run's spikes.jsonl must list exactly the planted
  batches (its clean run's none), and a rerun of the bad data
  with data.skip_steps_file=<that spikes.jsonl> must equal, loss for loss, the clean run leaving out the
  same batches.

Per run: initial loss (step 1, before any update), final loss (the mean of the last 10% of the steps), every
step's loss, skipped steps (non-finite, spikes), whether a non-finite value ever reached the weights (it must
not: the script prints FAIL and exits 1).

Outputs: a Markdown report (printed and written to --out), the raw results as JSON beside it (.json: every
run's overrides and losses, and the summaries) and three plots (-lr.png, -threshold.png, -bad.png).

    python benchmarks/stability.py [--steps 300] [--seeds 2] [--n-lr 7] [--jobs 2] [--out PATH] [--quick]

--quick runs a tiny grid (smaller models, 30 steps, 3 rates, 1 seed, fewer knob values, 2 planted batches)
for the tests; --out then defaults to runs/stability-quick/stability.md, so it never replaces the study's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import multiprocessing
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "benchmarks/data/pydocs.txt"
POLICIES = ("none", "fixed", "zscore", "percentile", "agc", "fixed+skip")
BAD_POLICIES = ("none", "fixed", "zscore", "fixed+skip", "fixed+skip-loss")
SKIPPERS = ("fixed+skip", "fixed+skip-loss")
Z_VALUES = (1.5, 2.0, 2.5, 3.0, 4.0)
P_VALUES = (5.0, 10.0, 25.0, 50.0)
THRESHOLD_FACTORS = tuple(float(x) for x in np.geomspace(0.1, 10, 7))


@dataclass(frozen=True)
class Workload:
    name: str
    overrides: tuple[str, ...]
    lr_range: tuple[float, float]
    max_norm: float
    corrupt: str
    """How a planted batch is corrupted: 'scale' (inputs x100) or 'repeat' (one character repeated)."""


def workloads(quick: bool, data_dir: Path) -> dict[str, Workload]:
    return {
        "cnn": Workload("cnn", (
            "model.factory=examples.seed_cnn:Net", "task.name=classify", f"data.file={data_dir / 'train_data.pth'}",
            "optim.name=sgd", "optim.momentum=0.9", "train.global_batch_size=16"), (1e-3, 1.0), 5.0, "scale"),
        "lstm": Workload("lstm", (
            "model.factory=examples.lstm_lm:LSTMLM", "model.n_layer=2", f"model.d_model={32 if quick else 64}",
            f"model.block_size={16 if quick else 64}", f"data.text_file={TEXT}", "optim.name=sgd",
            "train.global_batch_size=32"), (1.0, 1000.0), 0.25, "repeat"),
        "gpt": Workload("gpt", (
            "model.n_layer=2" if not quick else "model.n_layer=1", f"model.d_model={32 if quick else 64}",
            f"model.block_size={16 if quick else 32}", f"data.text_file={TEXT}", "optim.name=adamw",
            "train.global_batch_size=32"), (1e-3, 1.0), 1.0, "repeat"),
    }


def policy_overrides(policy: str, max_norm: float, knob: float | None = None) -> list[str]:
    """The clip.* overrides of a policy; `knob` is fixed's max_norm, zscore's z or percentile's p."""
    threshold = f"clip.max_norm={max_norm!r}"
    if policy == "none":
        return ["clip.policy=none"]
    if policy == "fixed":
        return ["clip.policy=fixed", f"clip.max_norm={knob if knob is not None else max_norm!r}"]
    if policy == "zscore":
        return ["clip.policy=zscore", threshold] + ([f"clip.zscore_z={knob!r}"] if knob is not None else [])
    if policy == "percentile":
        return ["clip.policy=percentile", threshold] + ([f"clip.percentile={knob!r}"] if knob is not None else [])
    if policy == "agc":
        return ["clip.policy=agc"]
    if policy == "fixed+skip":
        return ["clip.policy=fixed", threshold, "clip.skip_sigma=6"]
    if policy == "fixed+skip-loss":
        return ["clip.policy=fixed", threshold, "clip.skip_sigma=6", "clip.skip_on=loss"]
    raise ValueError(policy)


# ----------------------------------------------------------------------------------------------- bad batches

def plant_steps(seed: int, n: int, lo: int, hi: int) -> list[int]:
    """`n` distinct 0-based steps in [lo, hi), drawn from `seed` alone, sorted."""
    if hi - lo < n:
        raise ValueError(f"cannot plant {n} batches in steps [{lo}, {hi})")
    return sorted(int(x) for x in np.random.default_rng(seed).choice(np.arange(lo, hi), size=n, replace=False))


def corrupt(batch, kind: str):
    """A corrupted copy of a host batch: 'scale' multiplies the inputs (the first tensor of a tuple) by 100;
    'repeat' turns every token window into its first token repeated."""
    import torch

    if kind == "scale":
        inputs, *rest = batch
        return (inputs * 100, *rest)
    if kind == "repeat":
        assert isinstance(batch, torch.Tensor)
        return batch[:, :1].expand_as(batch).clone()
    raise ValueError(kind)


class PlantedSamples:
    """A training set whose planted global batches come out corrupted.

    A batch is recognised by its sample indices, in order: the global batch `b` of the data order is
    `batches.indices(b)` (one process, no accumulation, so the step reads it whole). The same samples come
    again in later epochs, mixed with others and in another order, and are then clean. `hits` lists the
    planted batches (0-based) as they were read."""

    def __init__(self, inner, batches, planted: list[int], kind: str):
        self.inner, self.kind, self.hits = inner, kind, []
        self.planted = {tuple(batches.indices(b).tolist()): b for b in planted}

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batch(self, indices):
        out = self.inner.batch(indices)
        b = self.planted.get(tuple(indices.tolist()))
        if b is None:
            return out
        self.hits.append(b)
        return corrupt(out, self.kind)


def plant(s, planted: list[int], kind: str) -> PlantedSamples:
    """Wrap a built Setup's training set so that its global batches `planted` (0-based) are corrupted."""
    s.dataset = PlantedSamples(s.dataset, s.batches, planted, kind)
    return s.dataset


# ------------------------------------------------------------------------------------------------- the runs

def final_loss(losses: list[float], steps: int) -> float:
    """The mean of the last 10% of the steps; inf if one of them is non-finite."""
    tail = losses[steps - max(1, steps // 10):]
    if not all(x is not None and math.isfinite(x) for x in tail):
        return math.inf
    return sum(tail) / len(tail)


def run_cell(cell: dict) -> dict:
    """One run: in-process build + optimizer_step (kind 'steps'), or dist_train.trainer.train into a run
    directory (kind 'train', the forensics runs)."""
    import torch

    torch.set_num_threads(1)
    from dist_train.preflight import load_config
    from dist_train.trainer import build, optimizer_step, train

    t0 = time.perf_counter()
    steps, planted = cell["steps"], cell.get("planted", [])
    cfg = load_config(None, cell["overrides"])
    if cell["kind"] == "steps":
        s = build(cfg, device=torch.device("cpu"))
        hits = plant(s, planted, cell["corrupt"]).hits if planted else []
        losses, nonfinite, spikes, bad_step = [], 0, 0, None
        for step in range(steps):
            m = optimizer_step(s, step)
            x = m.loss.item()
            losses.append(x if math.isfinite(x) else None)
            nonfinite += int(m.skipped.item())
            spikes += 0 if m.spike is None else int(m.spike.item())
            if bad_step is None and not all(torch.isfinite(p).all() for p in s.model.parameters()):
                bad_step = step + 1
        out = {"nonfinite_skips": nonfinite, "spike_skips": spikes, "nonfinite_in_weights": bad_step is not None,
               "first_nonfinite_weight_step": bad_step}
    else:
        built = []
        log = io.StringIO()  # the run's progress lines: shown only if it fails

        def prepare(s) -> None:
            built.append((s, plant(s, planted, cell["corrupt"]).hits if planted else []))

        try:
            with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
                run_dir = train(cfg, device=torch.device("cpu"), prepare=prepare)
        except BaseException:
            sys.stderr.write(log.getvalue())
            raise
        ((s, hits),) = built
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        spikes_file = run_dir / "spikes.jsonl"
        lines = [json.loads(line) for line in spikes_file.read_text().splitlines() if line.strip()]
        # The weights are checked once, after the last step (a non-finite value stays non-finite under SGD's
        # and AdamW's updates, so it would still be there).
        finite = all(torch.isfinite(p).all() for p in s.model.parameters())
        out = {"spike_batches": [x["batch"] for x in lines], "spikes_file": str(spikes_file),
               "spike_skips": sum(x["action"] == "skipped" for x in lines),
               "nonfinite_skips": rows[-1]["optim/skipped_steps"], "nonfinite_in_weights": not finite,
               "first_nonfinite_weight_step": None if finite else steps}
    final = final_loss(losses, steps)
    initial = losses[0]
    return {
        **{k: v for k, v in cell.items() if k not in ("overrides",)},
        "initial_loss": initial,
        "final_loss": final if math.isfinite(final) else None,
        "diverged": not math.isfinite(final) or final > initial,
        "planted_read": hits,
        **out,
        "losses": [round(x, 5) if x is not None and math.isfinite(x) else None for x in losses],
        "seconds": time.perf_counter() - t0,
        "overrides": cell["overrides"],
    }


# ------------------------------------------------------------------------------------------------ summaries

def clipped_final(c: dict) -> float:
    """min(final, initial) of one run; a diverged run counts as its initial loss."""
    f = c["final_loss"]
    return c["initial_loss"] if f is None or not math.isfinite(f) else min(f, c["initial_loss"])


def mean_final(cells: list[dict]) -> float:
    """L: the mean over seeds of clipped_final."""
    return float(np.mean([clipped_final(c) for c in cells]))


def lr_sensitivity(cells: list[dict]) -> tuple[float, dict[float, float], float]:
    """(sensitivity, {lr: L(lr)}, L0) of one workload and policy's cells."""
    by_lr: dict[float, list[dict]] = {}
    for c in cells:
        by_lr.setdefault(c["lr"], []).append(c)
    curve = {lr: mean_final(cs) for lr, cs in sorted(by_lr.items())}
    l0 = float(np.mean(list({c["seed"]: c["initial_loss"] for c in cells}.values())))
    return float(np.mean([min(v, l0) for v in curve.values()])) - min(curve.values()), curve, l0


def lr_summary(cells: list[dict], names, policies) -> list[dict]:
    rows = []
    for w in names:
        for policy in policies:
            cs = [c for c in cells if c["q"] == "lr" and c["workload"] == w and c["policy"] == policy]
            sens, curve, l0 = lr_sensitivity(cs)
            best = min(curve, key=curve.get)
            rows.append({"workload": w, "policy": policy, "sensitivity": sens, "best_final": curve[best],
                         "best_lr": best, "initial": l0, "curve": curve, "runs": len(cs),
                         "diverged": sum(c["diverged"] for c in cs),
                         "nonfinite_skips": sum(c["nonfinite_skips"] for c in cs),
                         "spike_skips": sum(c["spike_skips"] for c in cs),
                         "seconds": float(np.median([c["seconds"] for c in cs]))})
    return rows


def best_rate(cells: list[dict], workload: str) -> float:
    """The rate of the grid where fixed clipping at the default threshold has the lowest L."""
    _, curve, _ = lr_sensitivity([c for c in cells if c["q"] == "lr" and c["workload"] == workload
                                  and c["policy"] == "fixed"])
    return min(curve, key=curve.get)


def threshold_summary(cells: list[dict], names) -> list[dict]:
    """Per workload, rate and policy (fixed, zscore, percentile): L at each knob value, best, worst, spread;
    and each adaptive default's gap to the best fixed threshold."""
    rows = []
    for w in names:
        ws = [c for c in cells if c["q"] == "threshold" and c["workload"] == w]
        for lr in sorted({c["lr"] for c in ws}):
            by = {}
            for policy in ("fixed", "zscore", "percentile"):
                knobs = sorted({c["knob"] for c in ws if c["policy"] == policy})
                curve = {k: mean_final([c for c in ws if c["policy"] == policy and c["lr"] == lr and c["knob"] == k])
                         for k in knobs}
                best, worst = min(curve.values()), max(curve.values())
                by[policy] = curve
                rows.append({"workload": w, "lr": lr, "policy": policy, "curve": curve, "best": best,
                             "best_knob": min(curve, key=curve.get), "worst": worst,
                             "worst_knob": max(curve, key=curve.get), "spread": (worst - best) / best})
            best_fixed = min(by["fixed"].values())
            for r in rows[-3:]:
                default = {"fixed": None, "zscore": 2.5, "percentile": 10.0}[r["policy"]]
                r["default"] = r["curve"].get(default) if default is not None else None
                r["default_gap"] = None if r["default"] is None else (r["default"] - best_fixed) / best_fixed
    return rows


def damage(bad: list, clean: list, initial: float, planted: list[int]) -> float:
    """The area between the run's loss curve and its clean run's: the sum over the steps that are not planted
    of capped(loss) - capped(clean loss), capped(x) = min(x, initial), a non-finite loss counting as the
    initial loss. Signed, so that the step-to-step noise of two runs that drifted apart cancels instead of
    adding up (with max(0, .) two harmlessly different runs of the CNN already differ by about 20 nat x steps)."""
    return float(sum(excess(bad, clean, initial, planted)))


def capped(x, initial: float) -> float:
    return initial if x is None or not math.isfinite(x) else min(x, initial)


def excess(bad: list, clean: list, initial: float, planted: list[int]) -> list[float]:
    """capped(loss) - capped(clean loss) at each step that is not planted."""
    skip = set(planted)
    return [capped(x, initial) - capped(ref, initial) for t, (x, ref) in enumerate(zip(bad, clean)) if t not in skip]


def bad_summary(cells: list[dict], names) -> list[dict]:
    rows = []
    for w in names:
        ws = [c for c in cells if c["q"] == "bad" and c["workload"] == w]
        for policy in BAD_POLICIES:
            (clean,) = [c for c in ws if c["policy"] == policy and c["role"] == "clean"]
            (bad,) = [c for c in ws if c["policy"] == policy and c["role"] == "bad"]
            rows.append({"workload": w, "policy": policy, "lr": bad["lr"], "planted": bad["planted"],
                         "clean_final": clean["final_loss"], "bad_final": bad["final_loss"],
                         "diverged": bad["diverged"], "damage": damage(bad["losses"], clean["losses"],
                                                                       bad["initial_loss"], bad["planted"]),
                         "spike_skips": bad["spike_skips"]})
    return rows


def forensics_summary(cells: list[dict], names) -> list[dict]:
    rows = []
    for w, policy in [(w, p) for w in names for p in SKIPPERS]:
        ws = {c["role"]: c for c in cells if c["q"] == "bad" and c["workload"] == w and c["policy"] == policy}
        planted = [b + 1 for b in ws["bad"]["planted"]]  # spikes.jsonl's batches are 1-based
        rerun, reference = ws["rerun"], ws["clean-skipped"]
        rows.append({"workload": w, "policy": policy, "planted": planted, "found": ws["bad"]["spike_batches"],
                     "clean_found": ws["clean"]["spike_batches"],
                     "exact": ws["bad"]["spike_batches"] == planted and not ws["clean"]["spike_batches"],
                     "rerun_equal": rerun["losses"] == reference["losses"],
                     "rerun_max_diff": max((abs(a - b) for a, b in zip(rerun["losses"], reference["losses"])
                                            if a is not None and b is not None), default=0.0),
                     "rerun_final": rerun["final_loss"], "clean_final": ws["clean"]["final_loss"],
                     "bad_final": ws["bad"]["final_loss"]})
    return rows


# ------------------------------------------------------------------------------------------------ rendering

def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def fmt(x: float | None) -> str:
    return "non-finite" if x is None else f"{x:.4f}" if abs(x) < 1000 else f"{x:.3g}"


def render(data: dict) -> str:
    a = data["settings"]
    lines = [
        "# Stability study: what each clip policy buys",
        "",
        f"Workloads: {', '.join(data['workloads'])}; {a['steps']} steps a run (10% linear LR warm-up, then "
        f"constant); seeds {', '.join(map(str, data['seeds']))}; fp32 CPU. {len(data['cells'])} runs in "
        f"{data['wall_s']:.0f} s with {a['jobs']} jobs. Command: `{data['command']}`. Definitions: the module "
        "docstring of benchmarks/stability.py.",
        "",
        "## Q1: learning-rate sensitivity",
        "",
        "| workload | policy | LR sensitivity | best L (lr) | initial | diverged runs | non-finite skips | spike skips "
        "| s a run (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["lr_summary"]:
        lines.append(f"| {r['workload']} | {r['policy']} | {r['sensitivity']:.4f} | {r['best_final']:.4f} "
                     f"({r['best_lr']:.3g}) | {r['initial']:.4f} | {r['diverged']}/{r['runs']} | "
                     f"{r['nonfinite_skips']} | {r['spike_skips']} | {r['seconds']:.1f} |")
    for w in data["workloads"]:
        lrs = data["lrs"][w]
        lines += ["", f"L(lr), {w} (mean over seeds of min(final, initial)):", "",
                  "| policy | " + " | ".join(f"{x:.3g}" for x in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for r in data["lr_summary"]:
            if r["workload"] == w:
                lines.append(f"| {r['policy']} | " + " | ".join(f"{r['curve'][lr]:.4f}" for lr in lrs) + " |")
    lines += ["", "## Q2: threshold sensitivity", "",
              "Spread = (worst - best) / best of L over the policy's knob; gap = (L at the policy's default - the "
              "best fixed threshold's L) / the latter.", "",
              "| workload | lr | policy | knob: L | best (knob) | worst (knob) | spread | default | gap |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in data["threshold_summary"]:
        curve = ", ".join(f"{k:.3g}: {v:.3f}" for k, v in r["curve"].items())
        default = "" if r["default"] is None else f"{r['default']:.4f}"
        lines.append(f"| {r['workload']} | {r['lr']:.3g} | {r['policy']} | {curve} | {r['best']:.4f} "
                     f"({r['best_knob']:.3g}) | {r['worst']:.4f} ({r['worst_knob']:.3g}) | {100 * r['spread']:.1f}% "
                     f"| {default} | {pct(r['default_gap'])} |")
    lines += ["", "## Q3: bad batches", "",
              "Damage = the signed area between the loss curve and the same policy's clean curve (nat x steps, "
              "planted steps left out).", "",
              "| workload | lr | policy | planted steps | clean final | final with bad batches | damage "
              "| spike skips |",
              "|---|---|---|---|---|---|---|---|"]
    for r in data["bad_summary"]:
        planted = ", ".join(str(b + 1) for b in r["planted"])
        lines.append(f"| {r['workload']} | {r['lr']:.3g} | {r['policy']} | {planted} | {fmt(r['clean_final'])} | "
                     f"{fmt(r['bad_final'])}{' (diverged)' if r['diverged'] else ''} | {r['damage']:.2f} | "
                     f"{r['spike_skips']} |")
    lines += ["", "Forensics (fixed + skip_sigma=6 on the norm, and on the loss): spikes.jsonl against the planted "
              "batches, and the rerun with data.skip_steps_file against the clean run leaving out the same batches:",
              "", "| workload | policy | planted batches | spikes.jsonl | clean run's spikes.jsonl | exact | rerun = "
              "clean without them | rerun final | clean final |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["forensics"]:
        lines.append(f"| {r['workload']} | {r['policy']} | {r['planted']} | {r['found']} | {r['clean_found']} | "
                     f"{'yes' if r['exact'] else 'NO'} | {'yes, every loss' if r['rerun_equal'] else 'NO'} | "
                     f"{fmt(r['rerun_final'])} | {fmt(r['clean_final'])} |")
    return "\n".join(lines) + "\n"


def dump_json(data: dict) -> str:
    """Strict JSON (no NaN/Infinity), one line per run so that the file diffs and greps per run."""
    head = {k: v for k, v in data.items() if k != "cells"}
    text = json.dumps(head, indent=1, allow_nan=False)[:-2]
    cells = ",\n  ".join(json.dumps(c, allow_nan=False) for c in data["cells"])
    return text + ',\n "cells": [\n  ' + cells + "\n ]\n}\n"


def jsonable(rows: list[dict]) -> list[dict]:
    """Float-keyed curves as [[key, value], ...] (JSON keys are strings)."""
    return [{k: ([[x, y] for x, y in v.items()] if k == "curve" else v) for k, v in r.items()} for r in rows]


def plots(data: dict, lr_rows, th_rows, bad_cells, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = data["workloads"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.3), squeeze=False)
    for ax, w in zip(axes[0], names):
        for r in (r for r in lr_rows if r["workload"] == w):
            lrs = sorted(r["curve"])
            ax.plot(lrs, [r["curve"][x] for x in lrs], marker="o", label=r["policy"])
            ax.axhline(r["initial"], color="k", linestyle="--", linewidth=1)
        ax.set(xscale="log", xlabel="learning rate", ylabel="final loss (min with initial; dashed: initial)",
               title=f"{w}: final loss against the learning rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "-lr.png"), dpi=100)
    plt.close(fig)

    lrs_of = {w: sorted({r["lr"] for r in th_rows if r["workload"] == w}) for w in names}
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.6), squeeze=False)
    for ax, w in zip(axes[0], names):
        for lr, style in zip(lrs_of[w], ("-", "--")):
            rows = {r["policy"]: r for r in th_rows if r["workload"] == w and r["lr"] == lr}
            f = rows["fixed"]["curve"]
            xs = sorted(f)
            line, = ax.plot(xs, [f[k] for k in xs], marker="o", linestyle=style, label=f"fixed, lr {lr:.3g}")
            # Each adaptive policy to the right of the sweep: its range over its knob, a marker at its default.
            for i, (policy, marker) in enumerate((("zscore", "^"), ("percentile", "s"))):
                x = xs[-1] * (2.2 if i == 0 else 4.0) * (1.0 if style == "-" else 1.25)
                curve = rows[policy]["curve"]
                ax.plot([x, x], [min(curve.values()), max(curve.values())], color=line.get_color(), linewidth=2)
                ax.plot([x], [rows[policy]["default"]], marker=marker, color=line.get_color(), linestyle="none",
                        markersize=8, label=f"{policy}, lr {lr:.3g}: default; bar: range over its knob")
        ax.set(xscale="log", xlabel="fixed clipping's max_norm  (right: zscore ^ over z, percentile ■ over p)",
               ylabel="final loss (mean over seeds)", title=f"{w}: the threshold sweep")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "-threshold.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 8), squeeze=False, sharex="col")
    for col, w in enumerate(names):
        top, bottom = axes[0][col], axes[1][col]
        ws = [c for c in bad_cells if c["workload"] == w]
        planted = clean_planted(ws)
        clean = next(c for c in ws if c["policy"] == "fixed" and c["role"] == "clean")
        top.plot(smooth(clean["losses"], planted), color="k", linewidth=1.5, label="clean data, fixed")
        for policy in BAD_POLICIES:
            c = next(c for c in ws if c["policy"] == policy and c["role"] == "bad")
            ref = next(r for r in ws if r["policy"] == policy and r["role"] == "clean")
            line, = top.plot(smooth(c["losses"], planted), linewidth=1, label=f"bad batches, {policy}")
            steps = [t for t in range(len(c["losses"])) if t not in set(planted)]
            so_far = np.cumsum(excess(c["losses"], ref["losses"], c["initial_loss"], planted))
            bottom.plot(steps, so_far, color=line.get_color(), linewidth=1.2, label=policy)
        for ax in (top, bottom):
            for b in planted:
                ax.axvline(b, color="r", alpha=0.25, linewidth=1)
            ax.grid(True, alpha=0.3)
        top.set(ylim=(0, 1.3 * clean["initial_loss"]), ylabel="training loss (running mean of 10, planted steps "
                "left out)", title=f"{w}: 10 bad batches (red)" if len(planted) == 10 else f"{w}: bad batches (red)")
        bottom.set(xlabel="step", ylabel="damage so far: sum of (loss - own clean run's loss)",
                   yscale="symlog")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "-bad.png"), dpi=100)
    plt.close(fig)


def clean_planted(ws: list[dict]) -> list[int]:
    return next(c["planted"] for c in ws if c["role"] == "bad")


def smooth(losses: list, leave_out=(), k: int = 10) -> list[float]:
    """A trailing running mean of k steps over the steps not in `leave_out` (a non-finite loss makes it NaN, so
    the line breaks there)."""
    x = np.array([np.nan if v is None else v for v in losses], dtype=float)
    keep = np.ones(len(x), bool)
    keep[list(leave_out)] = False
    out = []
    for i in range(len(x)):
        window = x[max(0, i - k + 1): i + 1][keep[max(0, i - k + 1): i + 1]]
        out.append(float(np.mean(window)) if len(window) else float("nan"))
    return out


# ------------------------------------------------------------------------------------------------------ main

def make_text(path: Path, size: int) -> int:
    """How benchmarks/data/pydocs.txt was made (Python 3.11): the docstrings of a fixed list of standard-library
    modules and their public members, in name order, each once, ASCII only, cut to `size` characters."""
    modules = ("argparse asyncio base64 bisect calendar collections configparser contextlib copy csv dataclasses "
               "datetime decimal difflib email enum fractions ftplib functools glob gzip heapq hmac html http.client "
               "http.server imaplib inspect ipaddress itertools json logging mailbox nntplib operator optparse os "
               "pathlib pickle pydoc queue random re shlex shutil smtplib socket statistics string subprocess "
               "tarfile tempfile textwrap threading timeit turtle typing unittest urllib.parse urllib.request uuid "
               "warnings weakref xml.dom.minidom zipfile").split()
    seen, parts = set(), []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod] + [getattr(mod, k) for k in sorted(vars(mod)) if not k.startswith("_")]:
            ok = inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)
            doc = inspect.getdoc(obj) if ok else None
            if doc and doc not in seen and len(doc) > 40:
                seen.add(doc)
                parts.append(doc)
    text = "".join(c for c in "\n\n".join(parts) if c == "\n" or 32 <= ord(c) < 127)
    path.write_text(((text + "\n\n") * (size // (len(text) + 2) + 1))[:size], encoding="ascii")
    return len(parts)


@dataclass
class Grid:
    """The runs of the study, each run once: a run listed again (another question, the same overrides) is
    reported under both."""

    base: list[str]
    steps: int
    done: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    twins: dict[tuple, list[dict]] = field(default_factory=dict)
    results: dict[tuple, dict] = field(default_factory=dict)

    def add(self, q: str, w: Workload, policy: str, lr: float, seed: int, knob=None, kind="steps", more=(),
            **extra) -> None:
        over = (self.base + list(w.overrides) + policy_overrides(policy, w.max_norm, knob)
                + [f"optim.lr={lr!r}", f"train.seed={seed}"] + list(more))
        key = (kind, tuple(over), tuple(extra.get("planted", ())))
        cell = {"q": q, "workload": w.name, "policy": policy, "lr": lr, "seed": seed, "knob": knob, "kind": kind,
                "steps": self.steps, "corrupt": w.corrupt, **extra, "overrides": over}
        if key in self.results:
            self.done.append(relabel(self.results[key], cell))
        elif key in self.twins:
            self.twins[key].append(cell)
        else:
            self.twins[key] = []
            self.pending.append(cell | {"key": key})

    def run(self, pool) -> None:
        """Run the runs added since the last call, in the worker processes of `pool`."""
        cells, self.pending = self.pending, []
        print(f"{len(cells)} runs", flush=True)
        for r in pool.imap_unordered(run_cell, cells):
            key = r.pop("key")
            self.results[key] = r
            self.done += [r] + [relabel(r, twin) for twin in self.twins.pop(key)]
            fl = "diverged" if r["diverged"] else f"{r['final_loss']:.4f}"
            print(f"[{len(self.done)}] {r['q']:9s} {r['workload']:4s} {r['policy']:10s} lr={r['lr']:.3g} "
                  f"knob={r['knob']} seed={r['seed']} {r.get('role', '')} initial {r['initial_loss']:.4f} "
                  f"final {fl} ({r['seconds']:.1f} s)", flush=True)


def relabel(result: dict, cell: dict) -> dict:
    """A run's result reported under another question."""
    return result | {k: cell[k] for k in ("q", "knob", "role") if k in cell}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps a run (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 of Q1 and Q2 (default: %(default)s)")
    p.add_argument("--n-lr", type=int, default=7, help="rates in each workload's grid (default: %(default)s)")
    p.add_argument("--n-bad", type=int, default=10, help="planted bad batches (default: %(default)s)")
    p.add_argument("--bad-seed", type=int, default=0, help="seed of the planted steps (default: %(default)s)")
    p.add_argument("--workloads", nargs="+", choices=("cnn", "lstm", "gpt"), default=["cnn", "lstm", "gpt"],
                   help="(default: all three)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default: %(default)s)")
    p.add_argument("--out", default=None, help="the Markdown report; .json and the plots beside it (default: "
                   "benchmarks/results/stability.md; with --quick runs/stability-quick/stability.md)")
    smoke = add_quick(p, steps=30, seeds=1, n_lr=3, n_bad=2)  # and smaller models, 3 thresholds, 2 z and 2 p values
    p.add_argument("--write-text", type=Path, metavar="PATH", help="write the text corpus (as "
                   "benchmarks/data/pydocs.txt was made) to PATH and exit")
    p.add_argument("--report", type=Path, metavar="JSON", help="write the report and the plots again from the runs "
                   "of a study's JSON (after a change to the summaries or the plots; nothing is run) to --out")
    args = apply_quick(p, p.parse_args(), smoke)
    if args.report:
        try:
            raw = json.loads(args.report.read_text())
            data = {k: raw[k] for k in ("command", "wall_s", "settings", "workloads", "lrs", "best_lr", "seeds",
                                        "planted", "cells")}
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--report {args.report}: cannot read a study's JSON from it ({type(e).__name__}: {e})")
        return report(data, Path(args.out or args.report.with_suffix(".md")))
    if args.write_text:
        print(f"{args.write_text}: {make_text(args.write_text, 200_000)} docstrings")
        return 0
    factors, zs, ps = THRESHOLD_FACTORS, Z_VALUES, P_VALUES
    skip = {"window": 128, "min": 64}
    if args.quick:
        factors, zs, ps = (0.1, 1.0, 10.0), (2.5, 4.0), (10.0, 50.0)
        skip = {"window": 16, "min": 8}
    lo, hi = skip["min"] + 1 + args.steps // 20, args.steps - max(1, args.steps // 10)
    if args.seeds < 1 or args.n_lr < 2 or args.jobs < 1 or args.n_bad < 1:
        p.error("--seeds, --jobs and --n-bad must be at least 1, --n-lr at least 2")
    if hi - lo < args.n_bad:
        p.error(f"--steps {args.steps} leaves {max(0, hi - lo)} steps to plant {args.n_bad} bad batches in (after the "
                f"spike window's {skip['min']} steps, before the final 10%); raise --steps or lower --n-bad")
    out = Path(args.out or ("runs/stability-quick/stability.md" if args.quick else "benchmarks/results/stability.md"))
    command = shlex.join(["python"] + sys.argv)
    steps = args.steps
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stability-"))
    pool = multiprocessing.get_context("spawn").Pool(args.jobs)  # one set of workers: each imports torch once
    try:
        sys.path.insert(0, str(ROOT))
        from examples.seed_cnn import write

        write(tmp / "cnn", 16 * steps, 100, 0)  # one epoch of batch 16
        works = {k: v for k, v in workloads(args.quick, tmp / "cnn").items() if k in args.workloads}
        base = [f"train.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}", "optim.schedule=constant",
                "train.device=cpu", "train.precision=no", "logging.wandb.mode=disabled", "logging.progress=plain",
                f"clip.skip_window={skip['window']}", f"clip.skip_min_steps={skip['min']}",
                f"clip.warmup_steps={25 if not args.quick else 6}"]
        lrs = {w: [float(x) for x in np.geomspace(*works[w].lr_range, args.n_lr)] for w in works}
        grid = Grid(base, steps)
        for w in works.values():
            for policy in POLICIES:
                for lr in lrs[w.name]:
                    for seed in range(args.seeds):
                        grid.add("lr", w, policy, lr, seed, knob={"zscore": 2.5, "percentile": 10.0}.get(
                            policy, w.max_norm if policy == "fixed" else None))
        print("Q1: ", end="")
        grid.run(pool)
        done = grid.done

        # Q2 and Q3 at fixed clipping's best rate (and Q2 also at the next one up).
        planted = plant_steps(args.bad_seed, args.n_bad, lo, hi)
        best = {}
        for w in works.values():
            rates = lrs[w.name]
            best[w.name] = b = best_rate(done, w.name)
            for lr in [b] + rates[rates.index(b) + 1: rates.index(b) + 2]:
                for seed in range(args.seeds):
                    for f in factors:
                        grid.add("threshold", w, "fixed", lr, seed, knob=w.max_norm * f)
                    for z in zs:
                        grid.add("threshold", w, "zscore", lr, seed, knob=z)
                    for q in ps:
                        grid.add("threshold", w, "percentile", lr, seed, knob=q)
            for policy in BAD_POLICIES:
                knob = {"zscore": 2.5, "fixed": w.max_norm}.get(policy)
                kind = "train" if policy in SKIPPERS else "steps"
                more = [f"run.out_dir={tmp / 'runs' / w.name / policy}-{{role}}", "logging.every=1",
                        "train.checkpoint=false"] if kind == "train" else []
                for role, extra in (("clean", {}), ("bad", {"planted": planted})):
                    grid.add("bad", w, policy, b, 0, knob=knob, kind=kind, role=role,
                             more=[m.format(role=role) for m in more], **extra)
        print("Q2 and Q3: ", end="")
        grid.run(pool)

        # The forensics rerun: the bad data, leaving out the batches the skip run's spikes.jsonl lists; and the
        # clean data leaving out the same batches, which the rerun must equal loss for loss.
        for w, policy in [(w, p) for w in works.values() for p in SKIPPERS]:
            (skip_run,) = [c for c in done if c["q"] == "bad" and c["workload"] == w.name
                           and c["policy"] == policy and c.get("role") == "bad"]
            listed = tmp / f"{w.name}-{policy}-spikes.jsonl"
            shutil.copy(skip_run["spikes_file"], listed)
            for role, bad in (("rerun", {"planted": planted}), ("clean-skipped", {})):
                grid.add("bad", w, policy, best[w.name], 0, kind="train", role=role, **bad,
                         more=[f"run.out_dir={tmp / 'runs' / w.name / policy}-{role}", "logging.every=1",
                               "train.checkpoint=false", f"data.skip_steps_file={listed}"])
        print("the forensics reruns: ", end="")
        grid.run(pool)
    finally:
        pool.terminate()  # every run's result is in by now, or the study failed
        pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
    for c in grid.done:  # the study's temporary folder is gone: its paths say nothing, and would differ per run
        c.pop("spikes_file", None)
        c["overrides"] = [o.replace(str(tmp), "$TMP") for o in c["overrides"]]
    return report({
        "command": command, "wall_s": time.perf_counter() - t0,
        "settings": {"steps": steps, "jobs": args.jobs, "quick": args.quick, "n_bad": args.n_bad,
                     "bad_seed": args.bad_seed, "threshold_factors": list(factors), "z_values": list(zs),
                     "p_values": list(ps), "skip_window": skip["window"], "skip_min_steps": skip["min"]},
        "workloads": list(works), "lrs": lrs, "best_lr": best, "seeds": list(range(args.seeds)),
        "planted": planted, "cells": grid.done}, out)


def report(data: dict, out: Path) -> int:
    """Summarise the runs of `data` (the raw results: settings and cells), then write the report, the JSON and
    the plots; 1 if a non-finite value reached the weights of a run."""
    names, done = data["workloads"], data["cells"]
    lr_rows = lr_summary(done, names, POLICIES)
    th_rows = threshold_summary(done, names)
    order = {"lr": 0, "threshold": 1, "bad": 2}
    done.sort(key=lambda c: (order[c["q"]], names.index(c["workload"]), c["policy"], c["lr"], str(c["knob"]),
                             c["seed"], c.get("role", "")))
    data = {k: v for k, v in data.items() if k != "cells"} | {
        "lr_summary": jsonable(lr_rows), "threshold_summary": jsonable(th_rows),
        "bad_summary": bad_summary(done, names), "forensics": forensics_summary(done, names), "cells": done}
    text = render(data | {"lr_summary": lr_rows, "threshold_summary": th_rows})
    print()
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(dump_json(data))
    plots(data, lr_rows, th_rows, [c for c in done if c["q"] == "bad"], out.with_suffix(""))
    print(f"wrote {out}, {out.with_suffix('.json')} and the plots {out.with_suffix('')}-{{lr,threshold,bad}}.png")
    print(f"total wall time of the runs {data['wall_s']:.1f} s")
    bad = [c for c in done if c["nonfinite_in_weights"]]
    for c in bad:
        print(f"FAIL: non-finite weights in {c['workload']} {c['policy']} lr={c['lr']:.3g} seed={c['seed']} from "
              f"step {c['first_nonfinite_weight_step']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
