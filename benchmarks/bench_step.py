"""dist_train's train_step against a bare hand-written loop, side by side.

Both arms train copies of the same TinyGPT on the same batches with torch's fused
AdamW (what the trainer builds); the bare loop is forward, backward,
torch.nn.utils.clip_grad_norm_(foreach=True), step, zero_grad. `--model cnn` runs the
article's CNN classifier (examples/seed_cnn.py) on batches of 16 images with SGD at lr
0.01 instead (torch's fused SGD in both arms; the package's step through its classify
task, which also measures the accuracy). The package's step
folds the clip coefficient into the fused optimizer and reads nothing back to the
host; the bare loop reads nothing back either.
Time: the arms alternate in blocks of steps within one process (the order
flips every round), so machine noise hits both; we report the median step time
of each and their ratio. Memory: each arm runs alone in a fresh process and we
report the growth of the peak resident set during training (CPU, Linux) or
torch.cuda.max_memory_allocated (GPU), and their ratio.

    python benchmarks/bench_step.py [--steps 20] [--rounds 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dist_train.clip import FixedClip
from dist_train.config import ModelConfig
from dist_train.data import synthetic_dataset
from dist_train.model import TinyGPT
from dist_train.step import lm_loss, train_step
from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

MAX_NORM = 1.0


def setup(args):
    torch.manual_seed(0)
    if args.model == "cnn":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: examples/
        from examples.seed_cnn import Net, make_images

        model = Net().to(args.device)
        images, labels = make_images(16 * 64, seed=0)
        batches = [(images[i * 16:(i + 1) * 16].to(args.device), labels[i * 16:(i + 1) * 16].to(args.device))
                   for i in range(64)]
        return model, batches
    cfg = ModelConfig(n_layer=args.layers, n_head=4, d_model=args.d_model, block_size=args.block)
    model = TinyGPT(cfg, 64).to(args.device)
    data = synthetic_dataset(args.batch * 64, 64, args.block, seed=0)
    batches = [tuple(t.to(args.device) for t in data.get(torch.arange(i * args.batch, (i + 1) * args.batch)))
               for i in range(64)]
    return model, batches


def make_arm(name, model, batches, kind="gpt"):
    model = copy.deepcopy(model)
    if kind == "cnn":
        from dist_train.config import OptimConfig, OptimName
        from dist_train.optim import build_optimizer
        from dist_train.tasks import Classify

        if name == "package":
            opt = build_optimizer(OptimConfig(name=OptimName.sgd, lr=0.01), model.parameters(), fused=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, fused=True)
        package_loss = Classify(10).loss

        def bare_loss(m, batch):
            return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        package_loss = bare_loss = lm_loss
    policy = FixedClip(MAX_NORM)
    i = 0

    def package_step():
        nonlocal i
        train_step(model, opt, [batches[i % len(batches)]], policy, loss_fn=package_loss)
        i += 1

    def bare_step():
        nonlocal i
        loss = bare_loss(model, batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        i += 1

    return package_step if name == "package" else bare_step


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_arms(args):
    model, batches = setup(args)
    arms = {name: make_arm(name, model, batches, args.model) for name in ("package", "bare")}
    times = {name: [] for name in arms}
    for name, fn in arms.items():  # warm-up: allocator, Adam state, kernels
        for _ in range(3):
            fn()
    for r in range(args.rounds):
        order = ["package", "bare"] if r % 2 == 0 else ["bare", "package"]
        for name in order:
            for _ in range(args.steps):
                sync(args.device)
                t0 = time.perf_counter()
                arms[name]()
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_memory(args, name):
    """Run one arm alone in this process; print the peak memory growth as JSON."""
    model, batches = setup(args)
    fn = make_arm(name, model, batches, args.model)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
    for _ in range(args.steps):
        fn()
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status("VmHWM")
    print(json.dumps({"peak_growth_bytes": peak - base}))


def memory_in_subprocess(args, name):
    cmd = [sys.executable, __file__, "--memory-arm", name] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("memory_arm", "quick") and v is not None
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth_bytes"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--steps", type=int, default=20, help="steps per arm per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=10, help="rounds, the arms in turn (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="TinyGPT layers (default: %(default)s)")
    p.add_argument("--d-model", type=int, default=128, help="TinyGPT width (default: %(default)s)")
    p.add_argument("--block", type=int, default=64, help="tokens per sample (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="samples per batch (default: %(default)s)")
    p.add_argument("--model", choices=["gpt", "cnn"], default="gpt",
                   help="gpt: TinyGPT with AdamW; cnn: the article's CNN with SGD (default: %(default)s)")
    p.add_argument("--memory-arm", choices=["package", "bare"], help=argparse.SUPPRESS)
    smoke = add_quick(p, steps=2, rounds=1, layers=1, d_model=32)
    args = apply_quick(p, p.parse_args(), smoke)
    if args.memory_arm:
        peak_memory(args, args.memory_arm)
        return

    med = time_arms(args)
    mem = {name: memory_in_subprocess(args, name) for name in ("package", "bare")}
    print(f"model {args.model}, device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps per arm")
    print(f"median step time: package {med['package'] * 1e3:.2f} ms, bare {med['bare'] * 1e3:.2f} ms, "
          f"ratio {med['package'] / med['bare']:.4f}")
    print(f"peak memory growth: package {mem['package'] / 2**20:.1f} MiB, bare {mem['bare'] / 2**20:.1f} MiB, "
          f"ratio {mem['package'] / max(mem['bare'], 1):.4f}")


if __name__ == "__main__":
    main()
