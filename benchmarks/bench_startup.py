"""Time to the first step: a 1-step `dist-train train` against a bare torch script, as whole processes.

The bare script imports torch, builds the same TinyGPT (configs/debug.yaml's model, the synthetic task's
vocabulary) and the same fused AdamW, and takes one step on one batch of the same shape: the least any
program that trains this model pays. The package's arms run `python -m dist_train train --config
configs/debug.yaml train.max_steps=1` in a fresh directory: with W&B offline (what a user gets without an
API key) and with W&B disabled. Each round runs every arm once, in a rotated order, so machine noise hits
all of them; we report each arm's median wall time and its ratio to the bare script's.

    python benchmarks/bench_startup.py [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]

BARE = """
import sys
import torch
import yaml
from dist_train.config import ModelConfig, SYNTHETIC_VOCAB_SIZE
from dist_train.model import TinyGPT

m = yaml.safe_load(open(sys.argv[1]))["model"]
device = torch.device(sys.argv[2])
torch.manual_seed(0)
cfg = ModelConfig(**{k: v for k, v in m.items() if k != "factory"})
model = TinyGPT(cfg, SYNTHETIC_VOCAB_SIZE).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
x = torch.randint(0, SYNTHETIC_VOCAB_SIZE, (32, cfg.block_size + 1), device=device)
logits = model(x[:, :-1])
loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
opt.step()
opt.zero_grad(set_to_none=True)
print(float(loss))
"""


def arms(device: str) -> dict[str, list[str]]:
    cfg = str(ROOT / "configs/debug.yaml")
    train = [sys.executable, "-m", "dist_train", "train", "--config", cfg, "train.max_steps=1",
             f"train.device={device}", "run.out_dir=run"]
    return {
        "bare torch script": [sys.executable, "-c", BARE, cfg, device],
        "dist-train, W&B offline": [*train, "logging.wandb.mode=offline"],
        "dist-train, W&B disabled": [*train, "logging.wandb.mode=disabled"],
    }


def timed(cmd: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="dist_train_startup_") as d:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"bench_startup.py: {cmd[2:4]} failed ({p.returncode}):\n{p.stderr[-2000:]}")
        shutil.rmtree(d, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every arm (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    smoke = add_quick(ap, rounds=1)
    args = apply_quick(ap, ap.parse_args(), smoke)
    table = arms(args.device)
    times: dict[str, list[float]] = {name: [] for name in table}
    names = list(table)
    if not args.quick:
        timed(table[names[0]])  # warm the page cache: the first start of anything reads torch from disk
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(table[name]))
    base = statistics.median(times[names[0]])
    print(f"time to the first step, whole process, {args.device}, {args.rounds} rounds (median):")
    for name in names:
        med = statistics.median(times[name])
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:26s} {med:6.2f} s   ratio {med / base:.3f}   ({runs})")


if __name__ == "__main__":
    main()
