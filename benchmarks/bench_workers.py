"""Data workers: samples per second the trainer's loader delivers with data.num_workers=2 against 0, side by side.

The data set is a Dataset factory (`augmented` below) of CIFAR-shaped images with a per-sample
transform, the kind a user's Dataset applies in `__getitem__`: a random crop of the image padded by 4,
a random horizontal flip and per-channel normalisation, then a 3x3 blur. Both arms read the same
steps through the trainer's own path (`dist_train.trainer.setup.step_batches`: the step's global batch,
this rank's share, the task's label check, the device), without training, so the figure is the
loader's alone. The arms alternate rounds in one process; we report the median samples per second of
each and their ratio.

    python benchmarks/bench_workers.py [--steps 40] [--rounds 5] [--samples 4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from quick import add_quick, apply_quick  # benchmarks/quick.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


class Augmented(torch.utils.data.Dataset):
    """Images (3, 32, 32) and labels from examples/seed_cnn.py, transformed per sample on every read."""

    def __init__(self, n: int, seed: int):
        sys.path.insert(0, str(ROOT))
        from examples.seed_cnn import make_images

        self.images, self.labels = make_images(n, seed)
        self.blur = torch.full((3, 1, 3, 3), 1 / 9)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.nn.functional.pad(self.images[i], (4, 4, 4, 4), mode="reflect")
        top, left = torch.randint(0, 9, (2,), generator=g).tolist()
        x = x[:, top:top + 32, left:left + 32]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)
        x = torch.nn.functional.conv2d(x[None], self.blur, padding=1, groups=3)[0]
        return x, int(self.labels[i])


def augmented(cfg, seed: int) -> Augmented:
    """data.factory: data.num_samples augmented images."""
    return Augmented(cfg.num_samples, seed)


def setup(workers: int, args):
    from dist_train.preflight import load_config
    from dist_train.trainer import build

    sys.path.insert(0, str(ROOT))
    cfg = load_config(ROOT / "configs/seed_cnn.yaml", [
        "data.file=null", "data.val_file=null", "data.factory=bench_workers:augmented",
        f"data.num_samples={args.samples}", f"data.num_workers={workers}", "train.epochs=null",
        f"train.max_steps={args.steps * (args.rounds + 1)}", "train.global_batch_size=64",
        "logging.wandb.mode=disabled", "train.device=cpu"])
    return build(cfg, device=torch.device("cpu"))


def read(s, start: int, steps: int) -> float:
    """Samples per second over `steps` steps' batches, from step `start` (a fresh loader, as a run starts)."""
    from dist_train.trainer.setup import step_batches

    it = step_batches(s, start)
    next(it)  # the workers' start-up and the first batch: paid once a run, not a rate
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps - 1):
        n += sum(b[1].numel() for b in next(it))
    elapsed = time.perf_counter() - t0
    it.close()
    return n / elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="steps read per arm per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, the arms in turn (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4096, help="images in the data set (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers of the second arm (default: %(default)s)")
    smoke = add_quick(p, steps=3, rounds=1, samples=256)
    args = apply_quick(p, p.parse_args(), smoke)
    arms = {0: setup(0, args), args.workers: setup(args.workers, args)}
    rates: dict[int, list[float]] = {k: [] for k in arms}
    for r in range(args.rounds):
        for k in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            rates[k].append(read(arms[k], r * args.steps, args.steps))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps "
          "of 64 samples per arm")
    print(f"median samples/s: {args.workers} workers {med[args.workers]:.0f}, 0 workers {med[0]:.0f}, "
          f"ratio {med[args.workers] / med[0]:.2f}")


if __name__ == "__main__":
    main()
