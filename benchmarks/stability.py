"""Stability study: how each clip policy's final loss depends on the learning rate.

Trains small TinyGPTs in-process (dist_train.trainer.build + optimizer_step, fp32, CPU, one thread per
worker) over a grid of tasks x learning rates x clip policies x seeds, and measures how sensitive the
final loss is to the learning rate (Wortsman et al. 2023, "Small-scale proxies for large-scale
Transformer training instabilities", arXiv 2309.14322).

Tasks:
  synthetic  the debug config's synthetic task (configs/debug.yaml's defaults, vocabulary 32)
  text       character-level modelling of a deterministic ~200 KB English text built from the docstrings
             of a fixed list of Python standard-library modules (ASCII only), written to a temp dir
Learning rates: log-spaced (--lr-min .. --lr-max, --n-lr values); linear warm-up over --warmup-frac of
the steps, then constant; AdamW with the config's defaults (beta2=0.95, no weight decay).
Policies:
  none        clip.policy=none
  fixed       clip.policy=fixed clip.max_norm=1.0
  zscore      clip.policy=zscore (defaults; clip.max_norm=1.0 during its warm-up)
  percentile  clip.policy=percentile (defaults)
  agc         clip.policy=agc (defaults)
  fixed+skip  clip.policy=fixed clip.max_norm=1.0 clip.skip_sigma=6 (--skip-window, --skip-min-steps)

Per cell (task, policy, lr, seed):
  initial loss   the loss of step 1 (before any update; the same for every lr and policy of a task+seed)
  final loss     the mean training loss of the last 10% of the steps; if any of them is non-finite the
                 final loss is non-finite (null in the JSON) and the cell counts as diverged
  spikes         after the first 10% of the steps, a step whose loss exceeds 1.5x the running minimum m of
                 all previous (finite) losses and also exceeds m + 0.1 nats (or is non-finite) is "high";
                 spikes = number of rising edges, i.e. high steps whose previous step was not high (a run
                 that blows up and stays up is 1 spike). The 0.1-nat margin keeps the batch-to-batch noise
                 of a near-zero loss (0.04 -> 0.07 on the solved synthetic task) from counting.
  skipped        optimizer steps skipped for a non-finite norm (m.skipped) and as spikes (m.spike), apart
  nonfinite_in_weights  whether any parameter held a NaN/Inf after any step (checked after every step;
                 must never happen: the script prints FAIL and exits 1 if it does)

LR sensitivity of a (policy, task), over the LR grid:
  per seed       l~(lr, s) = min(final(lr, s), initial(s)), where a diverged (non-finite) final counts
                 as initial(s)
  per lr         L(lr) = mean over seeds of l~(lr, s);  L0 = mean over seeds of initial(s)
  sensitivity    mean over lr of min(L(lr), L0)  -  min over lr of L(lr)
Lower is better: 0 means every learning rate of the grid reaches the best final loss. The script prints
the ratio of the best adaptive policy's (zscore, percentile, agc, fixed+skip) sensitivity to fixed's,
against the target "at least 30% lower than fixed 1.0" (ratio <= 0.7), per task and for the mean over
tasks.

Outputs: a Markdown table (printed and written to --out), the raw per-cell results as JSON next to it
(same name, .json) and a plot (same name, .png): final loss vs lr, one line per policy, one subplot per
task, the initial loss dashed.

    python benchmarks/stability.py [--steps 300] [--seeds 3] [--n-lr 7] [--lr-min 1e-3] [--lr-max 0.3]
        [--warmup-frac 0.1] [--jobs 2] [--out benchmarks/results/stability.md] [--quick]

(--out defaults to runs/stability-quick/stability.md with --quick.)

--quick runs a tiny grid (3 lrs, the 6 policies, 1 seed, both tasks, 24 steps, a smaller model) in well
under a minute; tests/test_stability.py runs it.
"""

from __future__ import annotations

import argparse
import inspect
import importlib
import json
import math
import multiprocessing
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

POLICIES = {
    "none": ["clip.policy=none"],
    "fixed": ["clip.policy=fixed", "clip.max_norm=1.0"],
    "zscore": ["clip.policy=zscore", "clip.max_norm=1.0"],
    "percentile": ["clip.policy=percentile", "clip.max_norm=1.0"],
    "agc": ["clip.policy=agc"],
    "fixed+skip": ["clip.policy=fixed", "clip.max_norm=1.0", "clip.skip_sigma=6"],
}
ADAPTIVE = ("zscore", "percentile", "agc", "fixed+skip")
TASKS = ("synthetic", "text")
TARGET_RATIO = 0.7  # "at least 30% lower than fixed 1.0"
SPIKE_FACTOR = 1.5
SPIKE_MIN_DELTA = 0.1  # nats

#: Standard-library modules whose docstrings make the text task (a fixed list, so the text is deterministic
#: for a given Python).
TEXT_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "ftplib", "functools",
    "glob", "gzip", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "nntplib", "operator", "optparse", "os", "pathlib", "pickle",
    "pydoc", "queue", "random", "re", "shlex", "shutil", "smtplib", "socket", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "turtle", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


def make_text(path: Path, size: int) -> int:
    """Write a deterministic English-like ASCII text of exactly `size` characters to `path`: the docstrings of
    TEXT_MODULES and their public members (in name order, each once), repeated if they are too short."""
    seen, parts = set(), []
    for name in TEXT_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from this Python (e.g. nntplib >= 3.13, turtle without tk)
            continue
        objs = [mod] + [getattr(mod, k) for k in sorted(vars(mod)) if not k.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isroutine(obj)) else None
            if doc and doc not in seen and len(doc) > 40:
                seen.add(doc)
                parts.append(doc)
    text = "\n\n".join(parts)
    text = "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)
    if not text:
        raise RuntimeError("no docstrings found for the text task")
    text = (text + "\n\n") * (size // (len(text) + 2) + 1)
    path.write_text(text[:size], encoding="ascii")
    return len(parts)


def count_spikes(losses: list[float], start: int, factor: float = SPIKE_FACTOR,
                 min_delta: float = SPIKE_MIN_DELTA) -> int:
    """Rising edges of `loss[t] > max(factor * m, m + min_delta)` with m = min(loss[:t]) (or loss[t] non-finite)
    for t >= start."""
    spikes, high, run_min = 0, False, math.inf
    for t, x in enumerate(losses):
        if t >= max(start, 1):
            now = not math.isfinite(x) or x > max(factor * run_min, run_min + min_delta)
            spikes += now and not high
            high = now
        if math.isfinite(x):
            run_min = min(run_min, x)
    return spikes


def final_loss(losses: list[float], steps: int) -> float:
    tail = losses[steps - max(1, steps // 10):]
    if not all(math.isfinite(x) for x in tail):
        return math.inf
    return sum(tail) / len(tail)


def run_cell(cell: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from dist_train.preflight import load_config
    from dist_train.trainer import build, optimizer_step

    t0 = time.perf_counter()
    steps = cell["steps"]
    s = build(load_config(None, cell["overrides"]), device=torch.device("cpu"))
    losses, nonfinite_skips, spike_skips, bad_step = [], 0, 0, None
    for step in range(steps):
        m = optimizer_step(s, step)
        losses.append(m.loss.item())
        nonfinite_skips += int(m.skipped.item())
        spike_skips += 0 if m.spike is None else int(m.spike.item())
        if bad_step is None and not all(torch.isfinite(p).all() for p in s.model.parameters()):
            bad_step = step + 1
    final = final_loss(losses, steps)
    return {
        **{k: cell[k] for k in ("task", "policy", "lr", "seed", "steps")},
        "initial_loss": losses[0],
        "final_loss": final if math.isfinite(final) else None,
        "diverged": not math.isfinite(final),
        "spikes": count_spikes(losses, steps // 10),
        "nonfinite_skips": nonfinite_skips,
        "spike_skips": spike_skips,
        "nonfinite_in_weights": bad_step is not None,
        "first_nonfinite_weight_step": bad_step,
        "losses": [round(x, 4) if math.isfinite(x) else None for x in losses],  # every step's loss
        "seconds": time.perf_counter() - t0,
        "overrides": cell["overrides"],
    }


def clipped_final(c: dict) -> float:
    """min(final, initial) of one cell; a diverged cell counts as its initial loss."""
    f = c["final_loss"]
    return c["initial_loss"] if f is None or not math.isfinite(f) else min(f, c["initial_loss"])


def lr_sensitivity(cells: list[dict]) -> tuple[float, dict[float, float], float]:
    """(sensitivity, {lr: L(lr)}, L0) of one policy and task's cells (see the module docstring)."""
    by_lr: dict[float, list[dict]] = {}
    for c in cells:
        by_lr.setdefault(c["lr"], []).append(c)
    curve = {lr: float(np.mean([clipped_final(c) for c in cs])) for lr, cs in sorted(by_lr.items())}
    seeds = {c["seed"]: c["initial_loss"] for c in cells}
    l0 = float(np.mean(list(seeds.values())))
    sens = float(np.mean([min(v, l0) for v in curve.values()])) - min(curve.values())
    return sens, curve, l0


def summarise(cells: list[dict], tasks, policies):
    rows = []
    for policy in policies:
        for task in tasks:
            cs = [c for c in cells if c["task"] == task and c["policy"] == policy]
            sens, curve, l0 = lr_sensitivity(cs)
            best_lr = min(curve, key=curve.get)
            rows.append({
                "policy": policy, "task": task, "sensitivity": sens, "best_final": curve[best_lr],
                "best_lr": best_lr, "initial": l0, "curve": curve,
                "spikes": sum(c["spikes"] for c in cs), "diverged": sum(c["diverged"] for c in cs),
                "nonfinite_skips": sum(c["nonfinite_skips"] for c in cs),
                "spike_skips": sum(c["spike_skips"] for c in cs),
                "nonfinite_in_weights": sum(c["nonfinite_in_weights"] for c in cs), "cells": len(cs),
            })
    return rows


def ratios(rows, tasks):
    """Per task and for the mean over tasks: (best adaptive policy, its sensitivity / fixed's)."""
    sens = {(r["policy"], r["task"]): r["sensitivity"] for r in rows}
    policies = {r["policy"] for r in rows}
    adaptive = [p for p in ADAPTIVE if p in policies]
    out = {}
    for key, ts in [(t, [t]) for t in tasks] + [("mean over tasks", list(tasks))]:
        fixed = float(np.mean([sens["fixed", t] for t in ts]))
        best = min(adaptive, key=lambda p: np.mean([sens[p, t] for t in ts]))
        value = float(np.mean([sens[best, t] for t in ts]))
        out[key] = (best, value / fixed if fixed > 0 else math.inf, value, fixed)
    return out


def render(rows, rat, args, lrs, wall, command, cells) -> str:
    lines = [
        "# Stability study: LR sensitivity of the clip policies",
        "",
        f"Grid: tasks {', '.join(args.tasks)}; lr {', '.join(f'{x:.3g}' for x in lrs)} (linear warm-up over "
        f"{args.warmup} steps, then constant); {len(args.policies)} policies; seeds "
        f"{', '.join(map(str, range(args.seeds)))}; {args.steps} steps; TinyGPT n_layer={args.n_layer} "
        f"d_model={args.d_model} block_size={args.block}, global batch {args.batch}, AdamW beta2=0.95, fp32 CPU. "
        f"{len(cells)} cells.",
        "",
        "LR sensitivity (Wortsman et al. 2023, arXiv 2309.14322) = mean over the lr grid of "
        "min(L(lr), L0) - min over the grid of L(lr), where L(lr) = mean over seeds of min(final loss, initial "
        "loss) (a diverged seed counts as its initial loss) and L0 = the mean initial loss. Final loss = mean "
        "train loss of the last 10% of steps. Spikes = rising edges of loss > max(1.5 m, m + 0.1) with m "
        "the running minimum of the previous losses (or loss non-finite), after the first 10% of steps, summed "
        "over the cells.",
        "",
        "| policy | task | LR sensitivity | best final loss (lr) | initial loss | diverged cells | total spikes "
        "| non-finite skips | spike skips | non-finite-in-weights |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['task']} | {r['sensitivity']:.4f} | {r['best_final']:.4f} ({r['best_lr']:.3g}) "
            f"| {r['initial']:.4f} | {r['diverged']}/{r['cells']} | {r['spikes']} | {r['nonfinite_skips']} "
            f"| {r['spike_skips']} | {r['nonfinite_in_weights']} |")
    lines += ["", "Final loss L(lr) (mean over seeds, min with the initial loss):", "",
              "| policy | task | " + " | ".join(f"{x:.3g}" for x in lrs) + " |",
              "|---|---|" + "---|" * len(lrs)]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['task']} | " + " | ".join(f"{r['curve'][lr]:.4f}" for lr in lrs) + " |")
    lines += ["", "Best adaptive policy (zscore, percentile, agc, fixed+skip) vs fixed (max_norm 1.0), target: "
              f"ratio <= {TARGET_RATIO} (at least 30% lower):", ""]
    for key, (best, ratio, value, fixed) in rat.items():
        verdict = "meets" if ratio <= TARGET_RATIO else "does not meet"
        lines.append(f"- {key}: {best} {value:.4f} / fixed {fixed:.4f} = ratio {ratio:.3f}: {verdict} the target")
    lines += ["", f"Wall time {wall:.1f} s, {args.jobs} jobs. Command: `{command}`", ""]
    return "\n".join(lines)


def dump_json(data: dict) -> str:
    """Strict JSON (no NaN/Infinity), one line per cell so that the file diffs and greps per cell."""
    head = {k: v for k, v in data.items() if k != "cells"}
    text = json.dumps(head, indent=1, allow_nan=False)[:-2]
    cells = ",\n  ".join(json.dumps(c, allow_nan=False) for c in data["cells"])
    return text + ',\n "cells": [\n  ' + cells + "\n ]\n}\n"


def plot(rows, tasks, policies, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        initial = None
        for policy in policies:
            r = next(r for r in rows if r["task"] == task and r["policy"] == policy)
            lrs = sorted(r["curve"])
            ax.plot(lrs, [r["curve"][lr] for lr in lrs], marker="o", label=policy)
            initial = r["initial"]
        ax.axhline(initial, color="k", linestyle="--", linewidth=1, label="initial loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final loss (mean over seeds, min with initial)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per cell (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--n-lr", type=int, default=7, help="learning rates in the grid (default: %(default)s)")
    p.add_argument("--lr-min", type=float, default=1e-3, help="(default: %(default)s)")
    p.add_argument("--lr-max", type=float, default=0.3, help="(default: %(default)s)")
    p.add_argument("--warmup-frac", type=float, default=0.1,
                   help="linear LR warm-up as a fraction of the steps (default: %(default)s)")
    p.add_argument("--n-layer", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--d-model", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--block", type=int, default=32, help="model.block_size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="train.global_batch_size (default: %(default)s)")
    p.add_argument("--clip-warmup", type=int, default=25,
                   help="clip.warmup_steps of zscore and percentile (default: %(default)s, the config's)")
    p.add_argument("--skip-window", type=int, default=64, help="clip.skip_window of fixed+skip (default: %(default)s)")
    p.add_argument("--skip-min-steps", type=int, default=32,
                   help="clip.skip_min_steps of fixed+skip (default: %(default)s)")
    p.add_argument("--text-kb", type=int, default=200, help="size of the text task's file (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="(default: %(default)s)")
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                   help="(default: all six)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="Markdown table; .json and .png beside it (default: benchmarks/results/stability.md, with "
                        "--quick runs/stability-quick/stability.md, so a quick grid never replaces the study's)")
    p.add_argument("--quick", action="store_true",
                   help="tiny grid for the test: 3 lrs, 1 seed, 24 steps, n_layer 1, d_model 32, block 16, batch 16")
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds, args.n_lr = 24, 1, 3
        args.n_layer, args.d_model, args.block, args.batch = 1, 32, 16, 16
        args.clip_warmup, args.skip_window, args.skip_min_steps, args.text_kb = 6, 16, 8, 20
    if "fixed" not in args.policies:
        p.error("--policies must include fixed (the reference of the sensitivity ratio)")
    args.warmup = max(1, round(args.warmup_frac * args.steps))
    command = shlex.join(["python"] + sys.argv)
    if args.out is None:
        args.out = "runs/stability-quick/stability.md" if args.quick else "benchmarks/results/stability.md"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in np.geomspace(args.lr_min, args.lr_max, args.n_lr)]

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="stability-"))
    try:
        text_file = tmp / "text.txt"
        if "text" in args.tasks:
            n_docs = make_text(text_file, args.text_kb * 1000)
            print(f"text task: {text_file.stat().st_size} characters from {n_docs} stdlib docstrings")
        base = [f"train.max_steps={args.steps}", f"optim.warmup_steps={args.warmup}", "optim.schedule=constant",
                f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", f"model.block_size={args.block}",
                f"train.global_batch_size={args.batch}", "train.device=cpu", "train.precision=no",
                f"clip.warmup_steps={args.clip_warmup}", f"clip.skip_window={args.skip_window}",
                f"clip.skip_min_steps={args.skip_min_steps}", "logging.wandb.mode=disabled"]
        task_over = {"synthetic": [f"data.num_samples={max(args.steps * args.batch, 1024)}"],
                     "text": [f"data.text_file={text_file}"]}
        cells = [{"task": task, "policy": policy, "lr": lr, "seed": seed, "steps": args.steps,
                  "overrides": base + task_over[task] + POLICIES[policy] + [f"optim.lr={lr!r}", f"train.seed={seed}"]}
                 for task in args.tasks for policy in args.policies for lr in lrs for seed in range(args.seeds)]
        print(f"{len(cells)} cells: {len(args.tasks)} tasks x {len(args.policies)} policies x {len(lrs)} lrs x "
              f"{args.seeds} seeds, {args.steps} steps each, {args.jobs} jobs")
        results = []
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for i, r in enumerate(pool.imap_unordered(run_cell, cells), 1):
                results.append(r)
                fl = "diverged" if r["diverged"] else f"{r['final_loss']:.4f}"
                print(f"[{i}/{len(cells)}] {r['task']:9s} {r['policy']:10s} lr={r['lr']:.3g} seed={r['seed']} "
                      f"initial {r['initial_loss']:.4f} final {fl} spikes {r['spikes']} skips "
                      f"{r['nonfinite_skips']}/{r['spike_skips']} ({r['seconds']:.1f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    order = {(c["task"], c["policy"], c["lr"], c["seed"]): i for i, c in enumerate(cells)}
    results.sort(key=lambda r: order[r["task"], r["policy"], r["lr"], r["seed"]])
    wall = time.perf_counter() - t0

    rows = summarise(results, args.tasks, args.policies)
    rat = ratios(rows, args.tasks)
    text = render(rows, rat, args, lrs, wall, command, results)
    print()
    print(text)
    out.write_text(text)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    json_path.write_text(dump_json({
        "command": command, "wall_s": wall, "tasks": args.tasks, "policies": args.policies, "lrs": lrs,
        "seeds": list(range(args.seeds)), "steps": args.steps, "warmup_steps": args.warmup,
        "spike_factor": SPIKE_FACTOR, "spike_min_delta": SPIKE_MIN_DELTA, "target_ratio": TARGET_RATIO,
        "summary": [{k: v for k, v in r.items() if k != "curve"} | {"curve": [[lr, v] for lr, v in r["curve"].items()]}
                    for r in rows],
        "ratios": {k: {"best_adaptive": b, "ratio": q if math.isfinite(q) else None, "adaptive": v, "fixed": f} for k, (b, q, v, f) in rat.items()},
        "cells": results,
    }))
    plot(rows, args.tasks, args.policies, png_path)
    print(f"wrote {out}, {json_path}, {png_path}")
    print(f"total wall time {wall:.1f} s")
    print(f"command: {command}")
    bad = [r for r in results if r["nonfinite_in_weights"]]
    for r in bad:
        print(f"FAIL: non-finite weights in {r['task']} {r['policy']} lr={r['lr']:.3g} seed={r['seed']} from step "
              f"{r['first_nonfinite_weight_step']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
